//! The node's side towards the shards: its logins and connections
//! ([`conn`]), the M:N pools ([`pool`]), and the session state that follows
//! a client from one pooled backend to the next ([`state`]), and the gate
//! new transactions wait at while the console has paused the node
//! ([`pause`]); the statements prepared on a backend, bounded ([`stmts`]).

pub mod conn;
pub mod notify;
pub mod pause;
pub mod pool;
pub mod state;
pub mod stmts;
pub mod stream;
