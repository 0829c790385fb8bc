//! hotrepart-proxy: the hotrepart node as a library. The binaries in
//! `main.rs` only parse arguments and call into it.
//!
//! Code map: [`wire`] (frames), [`auth`] (client authentication),
//! [`backend`] (the node's logins to shards), [`pool`] (M:N pools),
//! [`state`] (session state that follows a client across backends),
//! [`routing`] (router decisions in node shard indexes), [`scatter`] (RUN ON
//! ALL in the simple protocol), [`copy`] (COPY split over the shards),
//! [`session`] (the per-client forwarding state machine), [`node`] (listener
//! and handshake), [`localpg`] and [`demo`] (local PostgreSQL servers),
//! [`reshard`] (the data-movement engine of `proxyctl reshard`).
#![deny(clippy::print_stdout)]

pub mod auth;
pub mod backend;
pub mod config;
pub mod copy;
pub mod demo;
pub mod explain;
pub mod localpg;
pub mod merge;
pub mod multi;
pub mod node;
pub mod pool;
pub mod reshard;
pub mod routing;
pub mod scatter;
pub mod session;
pub mod state;
pub mod wire;

pub use config::Config;
pub use node::Node;
