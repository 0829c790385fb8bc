//! hotrepart-proxy: the hotrepart node as a library. The binaries in
//! `main.rs` only parse arguments and call into it.
//!
//! Code map: [`wire`] (frames), [`auth`] (client authentication),
//! [`backend`] (the node's logins to shards), [`pool`] (M:N pools),
//! [`state`] (session state that follows a client across backends),
//! [`routing`] (router decisions in node shard indexes), [`scatter`] (RUN ON
//! ALL in the simple protocol), [`copy`] (COPY split over the shards),
//! [`functions`] (WebAssembly routing functions compiled and attached to
//! snapshots), [`session`] (the per-client forwarding state machine),
//! [`twopc`] (two-phase commit and its resolver), [`node`] (listener and
//! handshake), [`supervisor`] (the node's background tasks, restarted when
//! they fail), [`cluster`] (the replicated catalog the node follows),
//! [`admin`] (the HTTP admin API `proxyctl` talks to), [`localpg`] and
//! [`demo`] (local PostgreSQL servers), [`reshard`] (the data-movement
//! engine of `proxyctl reshard`), [`jobs`] (reshard jobs run by the leader),
//! [`loadtest`] (the verifying load
//! generator of `proxyctl loadtest`).
#![deny(clippy::print_stdout)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod copy;
pub mod demo;
pub mod explain;
pub mod failpoint;
pub mod functions;
pub mod jobs;
pub mod loadtest;
pub mod localpg;
pub mod merge;
pub mod multi;
pub mod names;
pub mod node;
pub mod pool;
pub mod reshard;
pub mod routing;
pub mod scatter;
pub mod session;
pub mod state;
pub mod supervisor;
pub mod twopc;
pub mod wire;

pub use config::Config;
pub use node::Node;
