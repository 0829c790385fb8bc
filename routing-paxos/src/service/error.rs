//! The service's errors: it could not start ([`ServiceError`]), a proposal
//! or wait got no answer ([`ProposeError`]), a membership change was
//! refused ([`ReconfigureError`]).

use std::net::SocketAddr;

use crate::replica::ReplicaError;
use crate::storage::StorageError;

/// The service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The settings are invalid.
    #[error("invalid catalog cluster settings: {0}")]
    Config(String),
    /// The log store could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The replica could not be built.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A proposal or wait got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No answer within the timeout; the command may still be applied.
    /// (Also the answer when the entry was folded into a catalog snapshot
    /// from a peer before this node applied it: it was applied at most
    /// once, and the catalog shows whether.)
    #[error("no answer from the catalog cluster in time (the command may still be applied)")]
    Timeout,
    /// The service stopped (shut down, or stopped by a storage failure:
    /// a write that cannot be made durable stops the node, it is not
    /// retried).
    #[error("the catalog service is shut down")]
    Shutdown,
    /// This node is not a member of the catalog cluster (removed, or
    /// started to join and not added yet).
    #[error("this node is not a member of the catalog cluster")]
    NotMember,
}

/// A membership change was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigureError {
    /// The requested change is not valid (unknown id, already a member,
    /// more than one node changed, too few nodes left…).
    #[error("invalid membership change: {0}")]
    Invalid(String),
    /// This node is not a member of the current configuration.
    #[error("this node is not a member of the catalog cluster")]
    NotMember,
    /// A reconfiguration is already under way.
    #[error("a membership change is already under way")]
    InProgress,
    /// No answer in time; the change may still happen.
    #[error("no answer from the catalog cluster in time (the membership change may still happen)")]
    Timeout,
    /// The service stopped.
    #[error("the catalog service is shut down")]
    Shutdown,
}

/// A log store read failed while a catalog was opened.
pub(super) fn storage_text(e: Box<dyn std::error::Error>) -> ServiceError {
    ServiceError::Config(format!("catalog storage: {e}"))
}
