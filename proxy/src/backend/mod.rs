//! The node's side towards the shards: its logins and connections
//! ([`conn`]), the M:N pools ([`pool`]), and the session state that follows
//! a client from one pooled backend to the next ([`state`]).

pub mod conn;
pub mod notify;
pub mod pool;
pub mod state;
