//! Wire layer: PostgreSQL protocol frames as `Bytes`, and the few messages
//! the node itself has to write. The code lives in the `hotrepart-wire`
//! crate (`proxy/wire/src/frame.rs`, with the node's other pure decoders,
//! fuzzed there); re-exported here under its old path.

pub use hotrepart_wire::frame::*;

/// Client encodings other than UTF-8 (`hotrepart-wire`'s `encoding`).
pub use hotrepart_wire::encoding;
