//! hotrepart-router: the pure, synchronous routing library.
//!
//! It owns the catalog model (shards, tables, key ranges) and turns statements
//! into routes. No sockets, no tokio, no globals.
//!
//! * [`hash`]: PostgreSQL-compatible 64-bit hashing (`hashint8extended` & co.),
//!   bit-identical to PostgreSQL on little-endian servers.
//! * [`catalog`]: the catalog model and the immutable, validated
//!   [`catalog::RoutingSnapshot`] that maps keys to points, points to ranges
//!   and ranges to shards.
//! * [`classify`]: what a statement string does besides reading and writing
//!   rows (session state, prepared statements, LISTEN, EXPLAIN, DEALLOCATE),
//!   from one lexing pass.
//! * [`route`]: statement routing — parse once into a cacheable
//!   [`route::Plan`], bind parameters and hints into a [`route::Route`].

#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

// The shared test fixture (`tests/common/mod.rs`) names the crate by its
// external name; the unit tests include it too.
#[cfg(test)]
extern crate self as hotrepart_router;

pub mod catalog;
pub mod classify;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod route;
