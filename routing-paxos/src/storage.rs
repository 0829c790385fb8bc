//! omnipaxos storage that outlives the replica using it: in memory, or
//! backed by an append-only file.
//!
//! [`SharedStorage`] is a cloneable handle to omnipaxos' `MemoryStorage` plus
//! the node's incarnation counter. Dropping a [`crate::Replica`] and building
//! a new one over a clone of the same handle is a crash and a restart "with
//! the disk": every write the replica made is still there. That is what the
//! simulation uses ([`SharedStorage::new`]).
//!
//! [`SharedStorage::open`] adds a journal file (`catalog.log` in the given
//! directory). Every write (one `write_atomically` batch, one single-op
//! write, an incarnation bump) is appended as one record and fsynced
//! *before* the call returns and before the in-memory copy changes, so what
//! omnipaxos was told is stored is on disk: a promise or an acceptance is
//! never forgotten by a restart. On open, the records are replayed in order.
//!
//! # Record format
//!
//! `len: u32 LE | first 4 bytes of SHA-256(len) | first 8 bytes of
//! SHA-256(payload) | payload`, the payload being one JSON array of
//! operations. A batch is one record, so it is replayed whole or not at
//! all. A crash in the middle of an append leaves a torn last record: a
//! short header, a payload shorter than its (checked) length, a payload
//! whose checksum fails with nothing but zeros after it, or a bad header
//! with nothing but zeros after it. That is detected, cut off and ignored
//! (the write it held never returned). Anything else that does not check
//! out is corruption, reported as an error rather than cut off: dropping
//! records that were acknowledged would make the node forget promises it
//! made.
//!
//! A failed write (or fsync) stops the journal: every later write fails,
//! so omnipaxos stops this node rather than carry on over a file whose
//! tail is unknown (after a failed fsync the page cache may have dropped
//! the data). A restart reopens the file and cuts off a torn tail.
//!
//! # Compaction
//!
//! When the file has grown to more than twice its size after the last
//! compaction (plus 1 MiB), the whole current state is written as a single
//! record to `catalog.log.tmp`, fsynced, renamed over `catalog.log`, and the
//! directory is fsynced: a crash at any point leaves either the old or the
//! new file, both complete. The rewritten state holds the catalog snapshot
//! and the log after it only: once omnipaxos compacts the log (see
//! [`crate::Replica::compact`]), the next rewrite drops the trimmed entries
//! from the file, so the file stays bounded by the snapshot, the log
//! after it and the slack.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::storage::{StopSign, Storage, StorageOp, StorageResult};
use omnipaxos_storage::memory_storage::MemoryStorage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::entry::{CatalogEntry, CatalogSnapshot};

const FILE: &str = "catalog.log";
const TMP: &str = "catalog.log.tmp";
const HEADER: usize = 16;
/// A record larger than this is not a record (a torn or corrupt length).
const MAX_RECORD: usize = 1 << 30;
// Small under test, so that the tests see compactions.
const COMPACT_SLACK: u64 = if cfg!(test) { 4096 } else { 1 << 20 };

#[derive(Default)]
struct Inner {
    log: MemoryStorage<CatalogEntry>,
    incarnation: u64,
    /// MemoryStorage's trimmed index (it has no getter), for compaction.
    trimmed: usize,
    journal: Option<Journal>,
}

struct Journal {
    dir: PathBuf,
    file: File,
    /// Current file length.
    len: u64,
    /// File length right after the last compaction (or open).
    base: u64,
    /// A write failed: refuse all further writes.
    failed: bool,
}

/// One persisted write; a record holds a batch of them.
#[derive(Serialize, Deserialize)]
enum Op {
    Incarnation(u64),
    AppendEntries(Vec<CatalogEntry>),
    AppendOnPrefix(usize, Vec<CatalogEntry>),
    SetPromise(Ballot),
    SetDecidedIndex(usize),
    SetAcceptedRound(Ballot),
    SetCompactedIdx(usize),
    Trim(usize),
    SetStopsign(Option<StopSign>),
    SetSnapshot(Option<CatalogSnapshot>),
}

/// A shared log store; clones share the contents (and the file).
#[derive(Clone, Default)]
pub struct SharedStorage {
    inner: Arc<Mutex<Inner>>,
}

/// The storage mutex was poisoned by a panic while a write was in progress.
#[derive(Debug, thiserror::Error)]
#[error("catalog storage is poisoned by an earlier panic")]
pub struct Poisoned;

/// The store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An earlier panic poisoned the store.
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
    /// A file operation failed.
    #[error("catalog storage {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The journal holds a bad record that is not a torn tail.
    #[error("catalog storage {path} is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Another process holds the data directory's lock.
    #[error("data_dir {} is in use by another hotrepart process{}: two processes on one data_dir would break the catalog's consensus (Paxos) safety; stop the other process or give this node its own data_dir", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The pid the holder wrote into the lock file, if readable.
        pid: Option<u32>,
    },
}

/// Name of the lock file in a data directory.
pub const LOCK_FILE: &str = "hotrepart.lock";

/// An exclusive advisory lock (`flock`) on a data directory's
/// [`LOCK_FILE`], held until dropped (for a process that dies, the kernel
/// drops it). The holder's pid is written into the file, so that a
/// second process can name it. Two processes writing one catalog journal
/// would each make promises the other does not know of — the end of
/// consensus safety — so every catalog on disk is opened under this lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (created if missing), or fails at once with
    /// [`StorageError::Locked`] when another process (or another handle of
    /// this one) holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, StorageError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StorageError::Locked {
                    dir: dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        file.set_len(0).map_err(io(&path))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&path))?;
        Ok(DirLock { _file: file })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn encode(ops: &[Op]) -> Result<Vec<u8>, StorageError> {
    let payload = serde_json::to_vec(ops).map_err(|e| StorageError::Corrupt {
        path: PathBuf::new(),
        what: format!("cannot encode a record: {e}"),
    })?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_RECORD)
        .ok_or_else(|| StorageError::Corrupt {
            path: PathBuf::new(),
            what: "record too large".into(),
        })?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(len.to_le_bytes())[..4]);
    out.extend_from_slice(&Sha256::digest(&payload)[..8]);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Splits a journal into its records' ops. Returns the ops and the length
/// of the good prefix (a torn tail after it is to be cut off).
fn decode(path: &Path, bytes: &[u8]) -> Result<(Vec<Vec<Op>>, usize), StorageError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let bad = |what: &str| -> Result<(Vec<Vec<Op>>, usize), StorageError> {
            Err(StorageError::Corrupt {
                path: path.to_owned(),
                what: format!("{what} at offset {at}"),
            })
        };
        if rest.len() < HEADER {
            break; // torn header
        }
        let header_ok = Sha256::digest(&rest[..4])[..4] == rest[4..8];
        let mut len4 = [0u8; 4];
        len4.copy_from_slice(&rest[..4]);
        let len = u32::from_le_bytes(len4) as usize;
        if !header_ok || len == 0 || len > MAX_RECORD {
            // A bad header with nothing but zeros after it is the last
            // append, torn.
            if rest[HEADER..].iter().all(|b| *b == 0) {
                break;
            }
            return bad("bad record header");
        }
        if HEADER + len > rest.len() {
            break; // torn payload: the last record, cut short
        }
        let payload = &rest[HEADER..HEADER + len];
        let ends_file = rest[HEADER + len..].iter().all(|b| *b == 0);
        if Sha256::digest(payload)[..8] != rest[8..HEADER] {
            if ends_file {
                break;
            }
            return bad("checksum mismatch");
        }
        let ops: Vec<Op> = match serde_json::from_slice(payload) {
            Ok(ops) => ops,
            Err(e) => return bad(&format!("undecodable record ({e})")),
        };
        records.push(ops);
        at += HEADER + len;
    }
    Ok((records, at))
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Inner {
    fn apply(&mut self, op: Op) {
        // MemoryStorage's own ops cannot fail.
        let log = &mut self.log;
        let _ = match op {
            Op::Incarnation(n) => {
                self.incarnation = n;
                Ok(())
            }
            Op::AppendEntries(e) => log.append_entries(e),
            // Below the trimmed index (a stale sync re-sending compacted
            // entries): those entries are decided and the same; keep the
            // rest. (MemoryStorage would underflow.)
            Op::AppendOnPrefix(from, e) if from < self.trimmed => {
                if from + e.len() <= self.trimmed {
                    Ok(())
                } else {
                    let skip = self.trimmed - from;
                    log.append_on_prefix(self.trimmed, e.into_iter().skip(skip).collect())
                }
            }
            Op::AppendOnPrefix(from, e) => log.append_on_prefix(from, e),
            Op::SetPromise(b) => log.set_promise(b),
            Op::SetDecidedIndex(i) => log.set_decided_idx(i),
            Op::SetAcceptedRound(b) => log.set_accepted_round(b),
            Op::SetCompactedIdx(i) => log.set_compacted_idx(i),
            Op::Trim(i) if i <= self.trimmed => Ok(()),
            Op::Trim(i) => {
                self.trimmed = i;
                log.trim(i)
            }
            Op::SetStopsign(s) => log.set_stopsign(s),
            Op::SetSnapshot(s) => log.set_snapshot(s),
        };
    }

    /// Checks (and if need be repairs, see [`CatalogSnapshot`]) and
    /// normalises the snapshot a batch stores, against the compacted index
    /// the same batch sets and the store as it is before the batch.
    fn fix_snapshot(&self, ops: &mut [Op]) -> Result<(), StorageError> {
        let compacted = ops.iter().rev().find_map(|op| match op {
            Op::SetCompactedIdx(c) => Some(*c),
            _ => None,
        });
        let Some(snap) = ops.iter_mut().find_map(|op| match op {
            Op::SetSnapshot(Some(s)) => Some(s),
            _ => None,
        }) else {
            return Ok(());
        };
        if let Some(c) = compacted.filter(|c| *c != snap.len()) {
            let bad = |what: String| StorageError::Corrupt {
                path: PathBuf::new(),
                what: format!("a catalog snapshot for index {c}: {what}"),
            };
            let delta = snap.merged();
            let c0 = self.log.get_compacted_idx().unwrap_or(0);
            let mut fixed = match self.log.get_snapshot().unwrap_or(None) {
                Some(s) => s,
                None => {
                    <CatalogSnapshot as omnipaxos::storage::Snapshot<CatalogEntry>>::create(&[])
                }
            };
            if fixed.len() != c0 || delta == 0 || c < delta || c < c0 {
                return Err(bad(format!(
                    "it stands for {} entries (last merge {delta}), the stored one for {} at {c0}",
                    snap.len(),
                    fixed.len()
                )));
            }
            // The delta stands for entries start..c. Before it: our own
            // decided entries from our snapshot on; where it starts before
            // our snapshot's end (a stale sync re-sending what we already
            // compacted), only its part after our snapshot counts (decided
            // entries are the same everywhere).
            let start = c - delta;
            if start > c0 {
                let own = self.log.get_entries(c0, start).unwrap_or_default();
                if own.len() != start - c0 {
                    return Err(bad(format!("entries {c0}..{start} are not in the log")));
                }
                fixed.extend(own);
            }
            let skip = c0.saturating_sub(start);
            fixed.extend(
                snap.tail()[snap.tail().len() - delta + skip..]
                    .iter()
                    .cloned(),
            );
            if fixed.len() != c {
                return Err(bad(format!(
                    "rebuilt, it stands for {} entries",
                    fixed.len()
                )));
            }
            tracing::debug!(index = c, "catalog snapshot from a log sync rebuilt");
            *snap = fixed;
        }
        snap.normalize();
        Ok(())
    }

    /// Persists `ops` (if there is a journal), then applies them.
    fn write(&mut self, mut ops: Vec<Op>) -> Result<(), StorageError> {
        self.fix_snapshot(&mut ops)?;
        if let Some(j) = self.journal.as_mut() {
            let path = j.dir.join(FILE);
            if j.failed {
                return Err(StorageError::Io {
                    path,
                    source: std::io::Error::other("an earlier write failed; reopen the store"),
                });
            }
            let record = encode(&ops)?;
            let written = j.file.write_all(&record).and_then(|()| j.file.sync_data());
            if let Err(e) = written {
                j.failed = true;
                return Err(io(&path)(e));
            }
            j.len += record.len() as u64;
        }
        for op in ops {
            self.apply(op);
        }
        if self
            .journal
            .as_ref()
            .is_some_and(|j| j.len > 2 * j.base + COMPACT_SLACK)
        {
            // The write above is durable whatever happens here.
            if let Err(e) = self.compact() {
                tracing::error!(error = %e, "catalog journal compaction failed");
            }
        }
        Ok(())
    }

    /// The whole state as one batch.
    fn state_ops(&self) -> Vec<Op> {
        let log = &self.log;
        let mut ops = vec![Op::Incarnation(self.incarnation)];
        if let Ok(Some(snap)) = log.get_snapshot() {
            ops.push(Op::SetSnapshot(Some(snap)));
        }
        if self.trimmed > 0 {
            ops.push(Op::Trim(self.trimmed));
        }
        ops.push(Op::AppendEntries(
            log.get_suffix(self.trimmed).unwrap_or_default(),
        ));
        if let Ok(Some(b)) = log.get_promise() {
            ops.push(Op::SetPromise(b));
        }
        if let Ok(Some(b)) = log.get_accepted_round() {
            ops.push(Op::SetAcceptedRound(b));
        }
        ops.push(Op::SetDecidedIndex(log.get_decided_idx().unwrap_or(0)));
        ops.push(Op::SetCompactedIdx(log.get_compacted_idx().unwrap_or(0)));
        ops.push(Op::SetStopsign(log.get_stopsign().unwrap_or(None)));
        ops
    }

    /// Rewrites the journal as one record of the current state. A failure
    /// before the rename leaves the old journal in use (and postpones the
    /// next attempt until it has grown again); a failure after it stops
    /// the journal.
    fn compact(&mut self) -> Result<(), StorageError> {
        let record = encode(&self.state_ops())?;
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        if j.failed {
            return Ok(());
        }
        let tmp = j.dir.join(TMP);
        let path = j.dir.join(FILE);
        let staged = File::create(&tmp).and_then(|mut f| {
            f.write_all(&record)?;
            f.sync_all()
        });
        if let Err(e) = staged.and_then(|()| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            j.base = j.len;
            return Err(io(&tmp)(e));
        }
        // From here on the old file is gone: appending to its handle would
        // lose writes, so any failure stops the journal.
        let reopened = OpenOptions::new().append(true).open(&path);
        let synced = sync_dir(&j.dir);
        match (reopened, synced) {
            (Ok(file), Ok(())) => {
                j.file = file;
                j.len = record.len() as u64;
                j.base = j.len;
                Ok(())
            }
            (Err(e), _) => {
                j.failed = true;
                Err(io(&path)(e))
            }
            (Ok(_), Err(e)) => {
                j.failed = true;
                Err(e)
            }
        }
    }
}

impl SharedStorage {
    /// An empty in-memory store.
    pub fn new() -> SharedStorage {
        SharedStorage::default()
    }

    /// Opens (or creates) the store kept in directory `dir` (created if
    /// missing) and replays it. A torn last record is cut off.
    pub fn open(dir: &Path) -> Result<SharedStorage, StorageError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let (records, good) = decode(&path, &bytes)?;
        let mut inner = Inner::default();
        for ops in records {
            for op in ops {
                inner.apply(op);
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if good < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                torn_bytes = bytes.len() - good,
                "cutting off a torn last record of the catalog journal"
            );
            file.set_len(good as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        // A compaction that crashed before its rename left this behind.
        let _ = std::fs::remove_file(dir.join(TMP));
        sync_dir(dir)?;
        inner.journal = Some(Journal {
            dir: dir.to_owned(),
            file,
            len: good as u64,
            base: good as u64,
            failed: false,
        });
        Ok(SharedStorage {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// Whether this store is backed by a file.
    pub fn is_durable(&self) -> bool {
        self.lock().is_ok_and(|i| i.journal.is_some())
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, Poisoned> {
        self.inner.lock().map_err(|_| Poisoned)
    }

    /// Increments and returns the incarnation counter (1 on the first start).
    pub fn next_incarnation(&self) -> Result<u64, StorageError> {
        let mut inner = self.lock()?;
        let n = inner.incarnation + 1;
        inner.write(vec![Op::Incarnation(n)])?;
        Ok(n)
    }

    /// Raises the incarnation counter to at least `at_least` and returns it.
    pub fn raise_incarnation(&self, at_least: u64) -> Result<u64, StorageError> {
        let mut inner = self.lock()?;
        if inner.incarnation < at_least {
            inner.write(vec![Op::Incarnation(at_least)])?;
        }
        Ok(inner.incarnation)
    }

    /// The compacted index and the end of the stored entries (the index
    /// after the last one, counted from the start of the log).
    pub fn log_bounds(&self) -> (usize, usize) {
        self.lock().map_or((0, 0), |i| {
            (
                i.log.get_compacted_idx().unwrap_or(0),
                i.trimmed + i.log.get_log_len().unwrap_or(0),
            )
        })
    }

    /// Whether a StopSign is stored (accepted, decided or not).
    pub fn stopsign_accepted(&self) -> bool {
        self.lock()
            .is_ok_and(|i| i.log.get_stopsign().ok().flatten().is_some())
    }

    /// Makes a fresh store the start of a new configuration's log: its
    /// first `len` entries are `state` (a snapshot), decided. Refused if
    /// the store is not empty.
    pub fn preload(
        &self,
        state: crate::entry::StateMachine,
        len: usize,
    ) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        let empty = inner.log.get_log_len().unwrap_or(0) == 0
            && inner.log.get_decided_idx().unwrap_or(0) == 0
            && inner.log.get_compacted_idx().unwrap_or(0) == 0;
        if !empty {
            return Err(StorageError::Corrupt {
                path: inner
                    .journal
                    .as_ref()
                    .map(|j| j.dir.clone())
                    .unwrap_or_default(),
                what: "a new configuration's log is not empty".into(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        inner.write(vec![
            Op::Trim(len),
            Op::SetCompactedIdx(len),
            Op::SetSnapshot(Some(CatalogSnapshot::of_state(state, len))),
            Op::SetDecidedIndex(len),
        ])
    }

    /// Rewrites the journal as one record now (no-op in memory).
    pub fn compact(&self) -> Result<(), StorageError> {
        self.lock()?.compact()
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&MemoryStorage<CatalogEntry>) -> StorageResult<R>,
    ) -> StorageResult<R> {
        f(&self.lock()?.log)
    }

    fn write_ops(&mut self, ops: Vec<Op>) -> StorageResult<()> {
        Ok(self.lock()?.write(ops)?)
    }
}

fn convert(op: StorageOp<CatalogEntry>) -> Op {
    match op {
        StorageOp::AppendEntry(e) => Op::AppendEntries(vec![e]),
        StorageOp::AppendEntries(e) => Op::AppendEntries(e),
        StorageOp::AppendOnPrefix(from, e) => Op::AppendOnPrefix(from, e),
        StorageOp::SetPromise(b) => Op::SetPromise(b),
        StorageOp::SetDecidedIndex(i) => Op::SetDecidedIndex(i),
        StorageOp::SetAcceptedRound(b) => Op::SetAcceptedRound(b),
        StorageOp::SetCompactedIdx(i) => Op::SetCompactedIdx(i),
        StorageOp::Trim(i) => Op::Trim(i),
        StorageOp::SetStopsign(s) => Op::SetStopsign(s),
        StorageOp::SetSnapshot(s) => Op::SetSnapshot(s),
    }
}

impl Storage<CatalogEntry> for SharedStorage {
    fn write_atomically(&mut self, ops: Vec<StorageOp<CatalogEntry>>) -> StorageResult<()> {
        // One lock and one record for the whole batch: a concurrent reader
        // never sees half of it, and a restart replays all of it or none.
        self.write_ops(ops.into_iter().map(convert).collect())
    }

    fn append_entry(&mut self, entry: CatalogEntry) -> StorageResult<()> {
        self.write_ops(vec![Op::AppendEntries(vec![entry])])
    }

    fn append_entries(&mut self, entries: Vec<CatalogEntry>) -> StorageResult<()> {
        self.write_ops(vec![Op::AppendEntries(entries)])
    }

    fn append_on_prefix(
        &mut self,
        from_idx: usize,
        entries: Vec<CatalogEntry>,
    ) -> StorageResult<()> {
        self.write_ops(vec![Op::AppendOnPrefix(from_idx, entries)])
    }

    fn set_promise(&mut self, n_prom: Ballot) -> StorageResult<()> {
        self.write_ops(vec![Op::SetPromise(n_prom)])
    }

    fn set_decided_idx(&mut self, ld: usize) -> StorageResult<()> {
        self.write_ops(vec![Op::SetDecidedIndex(ld)])
    }

    fn get_decided_idx(&self) -> StorageResult<usize> {
        self.with(|s| s.get_decided_idx())
    }

    fn set_accepted_round(&mut self, na: Ballot) -> StorageResult<()> {
        self.write_ops(vec![Op::SetAcceptedRound(na)])
    }

    fn get_accepted_round(&self) -> StorageResult<Option<Ballot>> {
        self.with(|s| s.get_accepted_round())
    }

    fn get_entries(&self, from: usize, to: usize) -> StorageResult<Vec<CatalogEntry>> {
        // Entries before the trimmed index are gone: not a complete
        // interval (MemoryStorage would underflow).
        let inner = self.lock()?;
        if from < inner.trimmed || to < from {
            return Ok(Vec::new());
        }
        inner.log.get_entries(from, to)
    }

    fn get_log_len(&self) -> StorageResult<usize> {
        self.with(|s| s.get_log_len())
    }

    fn get_suffix(&self, from: usize) -> StorageResult<Vec<CatalogEntry>> {
        let inner = self.lock()?;
        if from < inner.trimmed {
            return Ok(Vec::new());
        }
        inner.log.get_suffix(from)
    }

    fn get_promise(&self) -> StorageResult<Option<Ballot>> {
        self.with(|s| s.get_promise())
    }

    fn set_stopsign(&mut self, ss: Option<StopSign>) -> StorageResult<()> {
        self.write_ops(vec![Op::SetStopsign(ss)])
    }

    fn get_stopsign(&self) -> StorageResult<Option<StopSign>> {
        self.with(|s| s.get_stopsign())
    }

    fn trim(&mut self, idx: usize) -> StorageResult<()> {
        self.write_ops(vec![Op::Trim(idx)])
    }

    fn set_compacted_idx(&mut self, idx: usize) -> StorageResult<()> {
        self.write_ops(vec![Op::SetCompactedIdx(idx)])
    }

    fn get_compacted_idx(&self) -> StorageResult<usize> {
        self.with(|s| s.get_compacted_idx())
    }

    fn set_snapshot(&mut self, snapshot: Option<CatalogSnapshot>) -> StorageResult<()> {
        self.write_ops(vec![Op::SetSnapshot(snapshot)])
    }

    fn get_snapshot(&self) -> StorageResult<Option<CatalogSnapshot>> {
        self.with(|s| s.get_snapshot())
    }
}

#[cfg(test)]
mod tests;
