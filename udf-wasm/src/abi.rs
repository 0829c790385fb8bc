//! The routing-function ABI, version 1 (full text: `docs/WASM_ABI.md`).
//!
//! A module exports:
//!
//! | export | type |
//! |---|---|
//! | `memory` | the module's linear memory (exactly one, 32-bit) |
//! | `hr_abi_version` | `() -> i32`, returns [`ABI_VERSION`] |
//! | `hr_alloc` | `(len: i32) -> i32`: address of `len` writable bytes |
//! | `hr_route` | `(type_oid: i32, ptr: i32, len: i32) -> i64`: the point |
//!
//! For each call the host calls `hr_alloc(len)`, copies the key there (in
//! PostgreSQL's binary send format for its type) and calls
//! `hr_route(type_oid, ptr, len)`. The `i64` result carries the point's 64
//! bits (`point = result as u64`). A key of a type the function does not
//! handle should trap (`unreachable`): the statement then fails.
//!
//! This module also holds the binary encodings of the key types, so the
//! router and tests encode keys exactly as the ABI says.

/// The ABI version this host implements; `hr_abi_version` must return it.
pub const ABI_VERSION: i32 = 1;

/// Name of the exported linear memory.
pub const EXPORT_MEMORY: &str = "memory";
/// Name of the exported ABI version function.
pub const EXPORT_ABI_VERSION: &str = "hr_abi_version";
/// Name of the exported key-buffer allocation function.
pub const EXPORT_ALLOC: &str = "hr_alloc";
/// Name of the exported routing function.
pub const EXPORT_ROUTE: &str = "hr_route";

/// PostgreSQL type OIDs of the key types (`pg_type.oid`).
pub mod oid {
    /// `smallint`: 2 bytes, big-endian two's complement.
    pub const INT2: u32 = 21;
    /// `integer`: 4 bytes, big-endian two's complement.
    pub const INT4: u32 = 23;
    /// `bigint`: 8 bytes, big-endian two's complement.
    pub const INT8: u32 = 20;
    /// `text`: the UTF-8 bytes, no terminator, no length header.
    pub const TEXT: u32 = 25;
    /// `uuid`: the 16 bytes in textual (network) order.
    pub const UUID: u32 = 2950;
    /// `record`: a multi-column key in `record_send` format, see
    /// [`encode_record`](super::encode_record).
    pub const RECORD: u32 = 2249;
}

/// Binary form of an `int2` key.
pub fn encode_int2(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}

/// Binary form of an `int4` key.
pub fn encode_int4(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Binary form of an `int8` key.
pub fn encode_int8(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A multi-column key in PostgreSQL's `record_send` format: the number of
/// columns (i32), then per column its type OID (u32), its length (i32, -1
/// for NULL) and its binary value — all big-endian. Passed with type OID
/// [`oid::RECORD`].
pub fn encode_record(columns: &[(u32, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + columns
            .iter()
            .map(|(_, v)| 8 + v.map_or(0, <[u8]>::len))
            .sum::<usize>(),
    );
    out.extend_from_slice(&(columns.len() as i32).to_be_bytes());
    for (type_oid, value) in columns {
        out.extend_from_slice(&type_oid.to_be_bytes());
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out
}
