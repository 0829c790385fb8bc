//! Values of a merged result, in PostgreSQL's text format: ordering and
//! partial-aggregate arithmetic. The code lives in the `hotrepart-wire`
//! crate (`proxy/wire/src/value.rs`, fuzzed there); re-exported here.

pub use hotrepart_wire::value::*;
