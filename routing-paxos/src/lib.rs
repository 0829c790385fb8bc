//! hotrepart-routing-paxos: the catalog, replicated among the hotrepart nodes
//! with omnipaxos.
//!
//! # What is replicated
//!
//! One log of [`CatalogCommand`]s: bootstrap from a configuration, add and
//! remove shards, declare sharded and reference tables, split, assign,
//! freeze and unfreeze key ranges, and 2PC decisions. Every replica applies
//! the decided log, in order, to a [`Catalog`]: the current
//! [`hotrepart_router::catalog::RoutingSnapshot`] plus the freezes and 2PC
//! decisions that the snapshot does not carry.
//!
//! * [`command`]: the commands (serde types; data only).
//! * [`catalog`]: the deterministic state machine, [`Catalog::apply`].
//! * [`entry`]: log entries with proposal ids, and the [`StateMachine`] that
//!   applies each proposal at most once.
//! * [`replica`]: [`Replica`], omnipaxos plus the state machine, sans-IO.
//! * [`storage`]: [`SharedStorage`], an in-memory log store that survives a
//!   replica (a restart "with the disk" in tests).
//!
//! # Determinism guarantee
//!
//! Applying a command reads only the catalog and the command: no clock, no
//! randomness, no I/O, ordered maps only. A rejected command (unknown shard,
//! split point outside its range, removing a shard that still owns ranges…)
//! stays in the log and applies as a no-op with the same reason everywhere.
//! Hence replicas that applied the same prefix of the log hold equal state,
//! and every accepted change of the routing table yields a snapshot whose
//! epoch is one more than the last. `tests/sim.rs` checks this, with
//! omnipaxos, over many seeds: random delays (messages on different links
//! arrive in any order), links that break and lose what is in flight,
//! partitions, and nodes that crash and restart from their storage.
//!
//! The transport (not written yet) must deliver each peer's messages in
//! order and at most once, like one TCP connection, and report a broken
//! link that comes back ([`Replica::reconnected`]); see [`replica`] for
//! why omnipaxos needs that.
//!
//! # Not done yet (issue 5)
//!
//! * The node-to-node transport (TCP, authenticated by a cluster secret or
//!   mutual TLS) and the driver task that owns timers, transport and disk.
//! * Persistence on disk (a `Storage` implementation over a file or an
//!   embedded pure-Rust store) and log compaction with catalog snapshots;
//!   today a restarted replica replays the whole log.
//! * Leases: a node routes writes only while it holds a lease for the
//!   current epoch; a freeze completes when every node acknowledged it or
//!   its lease expired.
//! * Forwarding of admin requests, the HTTP admin API, `proxyctl` commands,
//!   seeding the catalog from the configuration on first start.
//! * Membership changes (omnipaxos reconfiguration).
//! * The 2PC coordinator and the resolver of in-doubt transactions (the
//!   decisions are in the log already; forgetting old decisions is not).

#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

pub mod catalog;
pub mod command;
pub mod entry;
pub mod lease;
pub mod net;
pub mod replica;
pub mod service;
pub mod storage;

pub use catalog::{Applied, Catalog, Rejected};
pub use command::{CatalogCommand, FreezeId};
pub use entry::{CatalogEntry, Outcome, ProposalId, StateMachine};
pub use lease::{LeaseMsg, Leases};
pub use replica::{Decided, Message, Replica, ReplicaConfig, ReplicaError, ReplicaStatus, Ticket};
pub use service::{
    CatalogHandle, ClusterSettings, ClusterStatus, LeaseStatus, PeerStatus, ProposeError,
    ServiceError,
};
pub use storage::{SharedStorage, StorageError};
