//! Tools beside the node's own code: local PostgreSQL servers
//! ([`localpg`]), `hotrepart demo` ([`demo`]), and the verifying load
//! generator of `proxyctl loadtest` ([`loadtest`]).

pub mod demo;
pub mod loadtest;
pub mod localpg;
