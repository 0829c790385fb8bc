//! hotrepart-proxy: the hotrepart node as a library. The binaries in
//! `main.rs` (`hotrepart`) and `bin/proxyctl.rs` only parse arguments and
//! call into it.
//!
//! The folders follow the way a statement travels, with the control plane
//! beside it (imports point down this list, never up):
//! - [`frontend`]: listener, TLS, startup handshake, authentication;
//! - [`session`]: the client protocol state machine after login;
//! - [`exec`]: multi-shard executors (scatter, merge, COPY, EXPLAIN, 2PC);
//! - [`routing`]: router decisions in node shard indexes, name resolution,
//!   WebAssembly routing functions;
//! - [`backend`]: the node's connections and pools, session state replay;
//! - [`node`]: what all sessions of a node share (routing table, pools,
//!   caches, pins);
//! - [`control`]: replicated catalog, admin API, reshard jobs and engine,
//!   background task supervisor;
//! - [`tools`]: local PostgreSQL servers, `hotrepart demo`, the load
//!   generator of `proxyctl loadtest`;
//! - [`config`], [`error`] (refusals, SQLSTATEs), [`wire`] (frames),
//!   [`sql`] (quoting SQL text the node writes), [`failpoint`] (test crash
//!   points).
#![deny(clippy::print_stdout)]

pub mod backend;
pub mod config;
pub mod control;
pub mod error;
pub mod exec;
pub mod failpoint;
pub mod frontend;
pub mod node;
pub mod routing;
pub mod session;
pub mod sql;
pub mod tools;
pub mod wire;

pub use config::Config;
pub use node::Node;
