//! hotrepart-wire: the node's pure decoders, in a crate of their own so
//! that the coverage-guided fuzz targets (`fuzz/`, cargo-fuzz) build them
//! without the node's runtime (tokio's runtime, wasmtime): everything here
//! takes bytes and gives a value or an error, never a panic.
//!
//! - [`frame`]: PostgreSQL frames (tag + length + body) split from a byte
//!   stream, the client's startup packet, message tags and codes, and the
//!   few messages the node writes itself (the proxy's `wire` module).
//! - [`scram`]: client authentication, server side — SCRAM-SHA-256(-PLUS)
//!   client messages checked against a stored verifier, md5 (the proxy's
//!   `frontend::auth`); [`cbind`]: `tls-server-end-point` channel binding
//!   data of a certificate (`frontend::cbind`).
//! - [`backend`]: the backend messages the node reads itself (login
//!   exchange, ParameterStatus, BackendKeyData, ErrorResponse, DataRow,
//!   RowDescription, NotificationResponse).
//! - [`value`], [`binary`]: the merge's values — PostgreSQL's ordering and
//!   partial-aggregate arithmetic on text values, and text to binary
//!   output (the proxy's `exec::merge::{value, binary}`).
//! - [`encoding`]: client encodings other than UTF-8 — the strings of a
//!   client's messages read as text, the node's own written back.
//! - [`fuzzing`]: the fuzz targets' bodies (hidden from the docs).
//!
//! The proxy re-exports each module under its old path; this crate depends
//! on no other crate of the project.

pub mod backend;
pub mod binary;
pub mod cbind;
pub mod encoding;
pub mod frame;
pub mod scram;
pub mod value;

#[doc(hidden)]
pub mod fuzzing;

/// Malformed backend bytes never panic the merge: the decoders and the
/// value code are fed random and almost-valid input (seeded, replayable).
#[cfg(test)]
mod value_fuzz_tests;
