//! The control plane of a node, beside the data path: the replicated
//! catalog the node follows ([`cluster`]), the HTTP admin API
//! ([`admin`]), reshard jobs ([`jobs`]) and their data-movement engine
//! ([`reshard`]), the 2PC resolver ([`resolver`]), plain control-plane
//! connections ([`pg`]), configuration reload ([`reload`]), the admin
//! console ([`console`]), and the supervisor of the node's background tasks
//! ([`supervisor`]).

pub mod admin;
pub mod cluster;
pub mod console;
pub mod jobs;
pub mod pg;
pub mod reload;
pub mod reshard;
pub mod resolver;
pub mod supervisor;
