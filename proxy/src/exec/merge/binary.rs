//! Text to binary output format for merged values. The code lives in the
//! `hotrepart-wire` crate (`proxy/wire/src/binary.rs`, fuzzed there);
//! re-exported here.

pub use hotrepart_wire::binary::*;
