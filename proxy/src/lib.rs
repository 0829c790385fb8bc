//! hotrepart-proxy: the hotrepart node as a library. The binaries in
//! `main.rs` (`hotrepart`) and `bin/proxyctl.rs` only parse arguments and
//! call into it.
//!
//! The folders follow the way a statement travels, with the control plane
//! beside it. Imports point down this list, never up, except into files
//! that import nothing of the crate (`node` uses `control::supervisor`,
//! `control::jobs::running` and `exec::decisions`; `config` uses
//! `frontend::auth`)
//! and the executors' use of the session's lower layer (`session::conn`);
//! no files import each other in a loop (`docs/ARCHITECTURE.md`):
//! - [`tools`]: local PostgreSQL servers, `hotrepart demo`, the load
//!   generator of `proxyctl loadtest`;
//! - [`frontend`]: listener, TLS, startup handshake, authentication, the
//!   node's life cycle;
//! - [`session`]: the client protocol state machine after login;
//! - [`control`]: replicated catalog, admin API, reshard jobs and engine,
//!   2PC resolver, background task supervisor;
//! - [`exec`]: multi-shard executors (scatter, merge, COPY, EXPLAIN, 2PC);
//! - [`node`]: what all sessions of a node share (routing state, pools,
//!   caches of the shards' catalogs, cancel keys, tasks);
//! - [`config`]: the typed TOML configuration;
//! - [`routing`]: router decisions in node shard indexes, the routing
//!   state (snapshot, plan cache, pins), name resolution, WebAssembly
//!   routing functions;
//! - [`backend`]: the node's connections and pools, session state replay;
//!   [`error`] (refusals, SQLSTATEs);
//! - [`wire`] (frames), [`sql`] (quoting SQL text the node writes),
//!   [`stats`] (per-database traffic counters, `SHOW STATS`),
//!   [`failpoint`] (test crash points), [`tls`] (TLS as a client:
//!   sslmode checks, a rustls connector for tokio-postgres).
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
pub mod stats;
pub mod tls;
pub mod tools;
pub mod wire;

pub use config::Config;
pub use node::Node;
