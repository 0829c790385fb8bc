//! hotrepart-routing-paxos: the replicated catalog (omnipaxos), not built yet.
//!
//! Until the replicated-catalog issue lands, a node's catalog comes from its
//! configuration file; this crate is an empty placeholder so that the
//! workspace layout of `DESIGN.md` holds.
