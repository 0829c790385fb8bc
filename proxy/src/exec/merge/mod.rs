//! Merging the answers of several shards into the one answer a single
//! PostgreSQL holding all rows would give (the merge issue; in progress).
//!
//! [`exec`]: runs a router merge plan over the shards (simple and
//! extended protocol).
//! [`binary`]: merged text values in the binary format clients ask for.
//! [`value`]: PostgreSQL's ordering and the arithmetic for combining
//! partial aggregates, on text-format values.

pub mod binary;
mod combine;
pub mod exec;
pub mod value;

/// Malformed backend bytes never panic the merge: the decoders and the
/// value code are fed random and almost-valid input (seeded, replayable).
#[cfg(test)]
mod fuzz_tests;
