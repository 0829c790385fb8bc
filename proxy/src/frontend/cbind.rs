//! SCRAM channel binding data (`tls-server-end-point`) of the node's
//! certificate. The code lives in the `hotrepart-wire` crate
//! (`proxy/wire/src/cbind.rs`); re-exported here under its old path.

pub use hotrepart_wire::cbind::*;
