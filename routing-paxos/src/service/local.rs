//! Local mode: one node's catalog without replication
//! ([`CatalogHandle::local`](super::CatalogHandle::local)).
//!
//! The same state machine as a replica ([`StateMachine`]: [`Catalog::apply`]
//! and the at-most-once bookkeeping by proposal id) applied directly, under
//! the handle's mutex, on the caller's thread: no task, no runtime. With a
//! data directory every command is appended and fsynced before it is
//! applied and answered, replayed on open, and the log is compacted into a
//! snapshot by the same rule as a replica's. A write that fails stops the
//! catalog (`failed`): an fsync is not retried.
//!
//! [`Catalog::apply`]: crate::Catalog::apply

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use omnipaxos::storage::Storage;

use super::error::{storage_text, ProposeError, ServiceError};
use super::shared::Shared;
use crate::catalog::{Applied, Rejected};
use crate::command::{CatalogCommand, CatalogSeed};
use crate::entry::{CatalogEntry, CatalogSnapshot, Outcome, ProposalId, StateMachine};
use crate::storage::{DirLock, SharedStorage};

/// A single node's catalog without replication.
pub(super) struct LocalState {
    state: StateMachine,
    /// The data directory's lock, held as long as the catalog is open.
    _lock: Option<DirLock>,
    storage: Option<SharedStorage>,
    incarnation: u64,
    next_seq: u64,
    /// A write failed: no more proposals.
    failed: bool,
}

impl LocalState {
    /// Opens the catalog (replaying `data_dir`'s journal, if given, under
    /// its lock), bootstraps it from `seed` if it is empty, and publishes
    /// it in a new [`Shared`] whose lease is always valid.
    pub(super) fn open(
        seed: Option<CatalogSeed>,
        data_dir: Option<&Path>,
    ) -> Result<(Arc<Shared>, LocalState), ServiceError> {
        // Locked before anything is read: a second process must not even
        // replay a journal the first one is writing.
        let lock = data_dir.map(DirLock::acquire).transpose()?;
        let storage = data_dir.map(SharedStorage::open).transpose()?;
        let mut state = StateMachine::new();
        let mut incarnation = 1;
        if let Some(s) = &storage {
            incarnation = s.next_incarnation()?;
            let decided = s.get_decided_idx().map_err(storage_text)?;
            let compacted = s.get_compacted_idx().map_err(storage_text)?;
            if let Some(snap) = s.get_snapshot().map_err(storage_text)? {
                if snap.len() != compacted {
                    return Err(ServiceError::Config(format!(
                        "catalog storage: the snapshot stands for {} entries, the log was compacted at {compacted}",
                        snap.len()
                    )));
                }
                state = snap.state();
            } else if compacted > 0 {
                return Err(ServiceError::Config(format!(
                    "catalog storage: log trimmed at {compacted} without a snapshot"
                )));
            }
            for e in s.get_entries(compacted, decided).map_err(storage_text)? {
                state.apply(&e);
            }
        }
        let applied = storage
            .as_ref()
            .map(|s| s.get_decided_idx().unwrap_or(0))
            .unwrap_or(0);
        let shared = Arc::new(Shared::new(1, state.catalog().clone()));
        shared.lease_until.store(u64::MAX, Ordering::Release);
        let mut local = LocalState {
            state,
            _lock: lock,
            storage,
            incarnation,
            next_seq: 1,
            failed: false,
        };
        let mut applied = applied;
        if let Some(seed) = seed {
            if local.state.catalog().snapshot().is_none() {
                if let Err(r) = local.apply(CatalogCommand::Bootstrap(seed), &mut applied)? {
                    tracing::warn!(reason = %r, "the catalog seed was rejected");
                }
            }
        }
        shared.publish(local.state.catalog(), applied);
        Ok((shared, local))
    }

    /// Applies `cmd` (persisted first) and publishes the catalog: the
    /// local-mode answer to [`CatalogHandle::propose`].
    ///
    /// [`CatalogHandle::propose`]: super::CatalogHandle::propose
    pub(super) fn propose(
        &mut self,
        cmd: CatalogCommand,
        shared: &Shared,
    ) -> Result<Result<Applied, Rejected>, ProposeError> {
        if self.failed {
            return Err(ProposeError::Shutdown);
        }
        let mut applied = shared.applied.load(Ordering::Acquire);
        let outcome = match self.apply(cmd, &mut applied) {
            Ok(o) => o,
            Err(e) => {
                // fsync failures are not retried (the page cache may
                // have dropped the data): the catalog stops here.
                tracing::error!(error = %e, "local catalog: cannot persist a command; stopping");
                self.failed = true;
                return Err(ProposeError::Shutdown);
            }
        };
        shared.publish(self.state.catalog(), applied);
        Ok(outcome)
    }

    /// Whether the catalog is kept in a data directory.
    pub(super) fn is_durable(&self) -> bool {
        self.storage.is_some()
    }

    fn apply(
        &mut self,
        cmd: CatalogCommand,
        applied: &mut usize,
    ) -> Result<Result<Applied, Rejected>, ServiceError> {
        let entry = CatalogEntry {
            id: ProposalId {
                node: 1,
                incarnation: self.incarnation,
                seq: self.next_seq,
            },
            cmd,
        };
        self.next_seq += 1;
        if let Some(s) = self.storage.as_mut() {
            use omnipaxos::storage::StorageOp;
            s.write_atomically(vec![
                StorageOp::AppendEntry(entry.clone()),
                StorageOp::SetDecidedIndex(*applied + 1),
            ])
            .map_err(storage_text)?;
        }
        *applied += 1;
        let outcome = self.state.apply(&entry);
        if let Some(s) = self.storage.as_mut() {
            // Same rule as a replica: compact once more than
            // COMPACT_AFTER entries follow the snapshot. A failure leaves
            // the log as it is (the entry above is durable).
            let compacted = s.get_compacted_idx().unwrap_or(0);
            if *applied - compacted > crate::replica::COMPACT_AFTER {
                use omnipaxos::storage::StorageOp;
                let snap = CatalogSnapshot::of_state(self.state.clone(), *applied);
                if let Err(e) = s.write_atomically(vec![
                    StorageOp::Trim(*applied),
                    StorageOp::SetCompactedIdx(*applied),
                    StorageOp::SetSnapshot(Some(snap)),
                ]) {
                    tracing::error!(error = %e, "cannot compact the local catalog log");
                }
            }
        }
        Ok(match outcome {
            Outcome::Applied(a) => Ok(a),
            Outcome::Rejected(r) => Err(r),
            // Fresh ids only: a local entry is never stale.
            Outcome::Stale => {
                return Err(ServiceError::Config(
                    "a local catalog entry came out stale (incarnation counter reset?)".into(),
                ))
            }
        })
    }
}
