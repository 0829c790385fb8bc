//! hotrepart-udf-wasm: the wasmtime host for WebAssembly routing functions.
//!
//! A routing function maps a shard key to a 64-bit *point* of the keyspace
//! (DESIGN §2); ranges of points then map to shards, so a WASM function
//! decides placement without a second routing mechanism. The ABI a module
//! must implement is documented in `docs/WASM_ABI.md` and summed up in
//! [`abi`].
//!
//! What this crate guarantees:
//!
//! * [`Function::compile`] accepts a module (binary `.wasm` or text `.wat`)
//!   only if it has **no imports at all** (so it is pure: no clock, no
//!   randomness, no I/O, no WASI), exports `memory`, `hr_abi_version`,
//!   `hr_alloc` and `hr_route` with the ABI's signatures, reports ABI version
//!   [`abi::ABI_VERSION`], fits in the memory cap, and answers trial calls
//!   within the limits, the same way twice.
//! * Every call runs with a fuel budget and a memory cap ([`Limits`]); running
//!   out of either, or trapping, is a [`CallError`] for that call only. The
//!   instance that failed is dropped and a fresh one serves the next call.
//! * Instances are reused across calls from a small internal pool;
//!   [`Function`] is `Send + Sync` and can be shared by all sessions of a
//!   node.
//! * A function is named by the SHA-256 of its binary module
//!   ([`Function::id`], [`sha256_id`] of [`Function::wasm`]): `.wat` text is
//!   converted to binary first, and the binary is what a node stores and
//!   replicates. The catalog's id type (`FunctionId`) is the router's; this
//!   crate depends on no other crate of the project.
//! * Floating-point NaNs are canonicalised and the non-deterministic
//!   proposals (threads, relaxed SIMD) are off, so every node computes the
//!   same point for the same key.

#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

pub mod abi;
mod error;
mod function;

#[doc(hidden)]
pub mod fuzzing;

pub use error::{CallError, Error};
pub use function::{sha256_id, Function, FunctionStats, Limits, Runtime};
