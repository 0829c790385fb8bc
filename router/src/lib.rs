//! hotrepart-router: the pure, synchronous routing library.
//!
//! It owns the catalog model (shards, tables, key ranges) and turns statements
//! into routes. No sockets, no tokio, no globals.

pub mod catalog;
pub mod hash;
