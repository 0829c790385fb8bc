//! Client authentication at the node: SCRAM-SHA-256 and, over TLS,
//! SCRAM-SHA-256-PLUS with channel binding (server side), md5 and trust.
//! The code lives in the `hotrepart-wire` crate (`proxy/wire/src/scram.rs`,
//! fuzzed there); re-exported here under its old path.

pub use hotrepart_wire::scram::*;
