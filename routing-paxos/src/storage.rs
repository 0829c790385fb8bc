//! In-memory omnipaxos storage that outlives the replica using it.
//!
//! [`SharedStorage`] is a cloneable handle to omnipaxos' `MemoryStorage` plus
//! the node's incarnation counter. Dropping a [`crate::Replica`] and building
//! a new one over a clone of the same handle is a crash and a restart "with
//! the disk": every write the replica made is still there, as with a disk
//! store that syncs each `write_atomically` before returning. That is what
//! the simulation uses. A real disk store (issue 5) implements the same trait.

use std::sync::{Arc, Mutex, MutexGuard};

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::storage::{StopSign, Storage, StorageOp, StorageResult};
use omnipaxos_storage::memory_storage::MemoryStorage;

use crate::entry::CatalogEntry;

#[derive(Default)]
struct Inner {
    log: MemoryStorage<CatalogEntry>,
    incarnation: u64,
}

/// A shared, in-memory log store; clones share the contents.
#[derive(Clone, Default)]
pub struct SharedStorage {
    inner: Arc<Mutex<Inner>>,
}

/// The storage mutex was poisoned by a panic while a write was in progress.
#[derive(Debug, thiserror::Error)]
#[error("catalog storage is poisoned by an earlier panic")]
pub struct Poisoned;

impl SharedStorage {
    /// An empty store.
    pub fn new() -> SharedStorage {
        SharedStorage::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, Poisoned> {
        self.inner.lock().map_err(|_| Poisoned)
    }

    /// Increments and returns the incarnation counter (1 on the first start).
    pub fn next_incarnation(&self) -> Result<u64, Poisoned> {
        let mut inner = self.lock()?;
        inner.incarnation += 1;
        Ok(inner.incarnation)
    }

    /// Raises the incarnation counter to at least `at_least` and returns it.
    pub fn raise_incarnation(&self, at_least: u64) -> Result<u64, Poisoned> {
        let mut inner = self.lock()?;
        inner.incarnation = inner.incarnation.max(at_least);
        Ok(inner.incarnation)
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&MemoryStorage<CatalogEntry>) -> StorageResult<R>,
    ) -> StorageResult<R> {
        f(&self.lock()?.log)
    }

    fn with_mut<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryStorage<CatalogEntry>) -> StorageResult<R>,
    ) -> StorageResult<R> {
        f(&mut self.lock()?.log)
    }
}

impl Storage<CatalogEntry> for SharedStorage {
    fn write_atomically(&mut self, ops: Vec<StorageOp<CatalogEntry>>) -> StorageResult<()> {
        // One lock for the whole batch: a concurrent reader of the handle
        // never sees half of it. (MemoryStorage's own ops cannot fail.)
        self.with_mut(|s| s.write_atomically(ops))
    }

    fn append_entry(&mut self, entry: CatalogEntry) -> StorageResult<()> {
        self.with_mut(|s| s.append_entry(entry))
    }

    fn append_entries(&mut self, entries: Vec<CatalogEntry>) -> StorageResult<()> {
        self.with_mut(|s| s.append_entries(entries))
    }

    fn append_on_prefix(
        &mut self,
        from_idx: usize,
        entries: Vec<CatalogEntry>,
    ) -> StorageResult<()> {
        self.with_mut(|s| s.append_on_prefix(from_idx, entries))
    }

    fn set_promise(&mut self, n_prom: Ballot) -> StorageResult<()> {
        self.with_mut(|s| s.set_promise(n_prom))
    }

    fn set_decided_idx(&mut self, ld: usize) -> StorageResult<()> {
        self.with_mut(|s| s.set_decided_idx(ld))
    }

    fn get_decided_idx(&self) -> StorageResult<usize> {
        self.with(|s| s.get_decided_idx())
    }

    fn set_accepted_round(&mut self, na: Ballot) -> StorageResult<()> {
        self.with_mut(|s| s.set_accepted_round(na))
    }

    fn get_accepted_round(&self) -> StorageResult<Option<Ballot>> {
        self.with(|s| s.get_accepted_round())
    }

    fn get_entries(&self, from: usize, to: usize) -> StorageResult<Vec<CatalogEntry>> {
        self.with(|s| s.get_entries(from, to))
    }

    fn get_log_len(&self) -> StorageResult<usize> {
        self.with(|s| s.get_log_len())
    }

    fn get_suffix(&self, from: usize) -> StorageResult<Vec<CatalogEntry>> {
        self.with(|s| s.get_suffix(from))
    }

    fn get_promise(&self) -> StorageResult<Option<Ballot>> {
        self.with(|s| s.get_promise())
    }

    fn set_stopsign(&mut self, ss: Option<StopSign>) -> StorageResult<()> {
        self.with_mut(|s| s.set_stopsign(ss))
    }

    fn get_stopsign(&self) -> StorageResult<Option<StopSign>> {
        self.with(|s| s.get_stopsign())
    }

    fn trim(&mut self, idx: usize) -> StorageResult<()> {
        self.with_mut(|s| s.trim(idx))
    }

    fn set_compacted_idx(&mut self, idx: usize) -> StorageResult<()> {
        self.with_mut(|s| s.set_compacted_idx(idx))
    }

    fn get_compacted_idx(&self) -> StorageResult<usize> {
        self.with(|s| s.get_compacted_idx())
    }

    fn set_snapshot(&mut self, snapshot: Option<NoSnapshotOf>) -> StorageResult<()> {
        self.with_mut(|s| s.set_snapshot(snapshot))
    }

    fn get_snapshot(&self) -> StorageResult<Option<NoSnapshotOf>> {
        self.with(|s| s.get_snapshot())
    }
}

type NoSnapshotOf = <CatalogEntry as omnipaxos::storage::Entry>::Snapshot;
