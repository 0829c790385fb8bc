//! The catalog service: a tokio driver task that owns a [`Replica`], its
//! timers, the transport ([`crate::net`]), the disk ([`SharedStorage`]) and
//! the lease state ([`crate::lease`]), behind a cloneable [`CatalogHandle`];
//! or, for a single node, the same state machine without replication.
//!
//! # What a handle guarantees
//!
//! * [`CatalogHandle::catalog`] is the catalog as of this node's applied
//!   prefix of the log, read without a lock; [`CatalogHandle::subscribe`]
//!   sees every change.
//! * [`CatalogHandle::propose`] answers once the command is decided *and
//!   applied here*, so a caller reads its own write. A timeout leaves the
//!   answer unknown (the command may still be applied later, at most once).
//! * [`CatalogHandle::lease_valid`]: while true, this node has applied every
//!   entry decided more than `lease` + margin ago ([`crate::lease`] has the
//!   argument). The data path checks it per statement.
//! * [`CatalogHandle::await_all_applied`]: when it returns, every node that
//!   holds a valid lease has applied the index.
//!
//! # Parts
//!
//! * `handle`: [`CatalogHandle`], the public API over either mode.
//! * `driver`: the cluster node's task and its event loop; `driver::reconfig`
//!   its membership changes. The driver reacts to one input at a time (a
//!   tick, a frame, a request); after each it applies what was decided,
//!   answers proposals, publishes the catalog and sends what the replica
//!   produced. Storage writes (fsync) run on the driver task: catalog
//!   traffic is small and rare. The handle owns the task and stops it
//!   ([`CatalogHandle::shutdown`]); the driver owns and stops the
//!   transport's tasks.
//! * `local`: a single node's catalog ([`CatalogHandle::local`]), applied
//!   on the caller's thread.
//! * `shared`: what the handles read and the driver writes, and the
//!   requests from one to the other.
//! * `settings`, `error`, `status`: [`ClusterSettings`], the errors, and
//!   the status DTOs ([`ClusterStatus`]).
//! * `fault`: the test-only partition switch
//!   ([`CatalogHandle::set_partitioned`]).
//!
//! Membership data and `membership.json` are one level down, in
//! [`crate::membership`], which the transport uses too.
//!
//! [`Replica`]: crate::Replica
//! [`SharedStorage`]: crate::SharedStorage

mod driver;
mod error;
mod fault;
mod handle;
mod local;
mod settings;
mod shared;
mod status;

pub use crate::membership::Membership;
pub use error::{ProposeError, ReconfigureError, ServiceError};
pub use handle::CatalogHandle;
pub use settings::ClusterSettings;
pub use status::{ClusterStatus, LeaseStatus, PeerStatus};
