//! Log entries and the replicated state machine that applies them: the
//! [`Catalog`] plus, per proposing node, the last proposal applied.
//!
//! # Why proposals carry an id
//!
//! omnipaxos can lose a proposal (a forwarded proposal is sent once; a leader
//! may crash before replicating it), so a replica re-proposes what it has not
//! seen decided. A re-proposal can then be decided twice. Each entry carries
//! a [`ProposalId`] `(node, incarnation, seq)`; the state machine remembers,
//! per node, the largest `(incarnation, seq)` it applied and skips every
//! entry at or below it ([`Outcome::Stale`]). So a proposal takes effect at
//! most once, and an entry that was overtaken by a later proposal of the same
//! node can never take effect afterwards — its proposer sees `Stale` for an
//! id it is still waiting for and proposes the command again under a new id
//! (see [`crate::Replica`]). This state is one pair per node, replicated like
//! the catalog and equal on every replica.

use std::collections::BTreeMap;

use omnipaxos::storage::{Entry, Snapshot};
use serde::{Deserialize, Serialize};

use crate::catalog::{Applied, BadImage, Catalog, CatalogImage, Rejected};
use crate::command::CatalogCommand;

/// Identifies one proposal: the proposing node, its incarnation (bumped at
/// every start, kept in the node's storage) and a sequence number within the
/// incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    /// The proposing node's omnipaxos pid.
    pub node: u64,
    /// The node's incarnation.
    pub incarnation: u64,
    /// Sequence number within the incarnation, from 1.
    pub seq: u64,
}

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Who proposed it.
    pub id: ProposalId,
    /// The change.
    pub cmd: CatalogCommand,
}

impl Entry for CatalogEntry {
    type Snapshot = CatalogSnapshot;
}

/// How many of the newest entries a stored [`CatalogSnapshot`] keeps as
/// entries rather than folding them into its state (see there).
pub const SNAPSHOT_TAIL: usize = 256;

/// What replaces a compacted prefix of the log: the [`StateMachine`] after
/// its first [`folded`](Self::folded) entries, plus the entries after those
/// (the tail), so it stands for [`len`](Self::len) entries from index 0.
///
/// # Why the tail
///
/// omnipaxos (with snapshots enabled) brings a lagging follower up to date
/// with a snapshot of the decided log rather than with the entries, and
/// compacts the follower's log to that point. A replica that then finds a
/// snapshot beyond what it applied can apply the tail's entries one by one
/// when it applied at least [`folded`](Self::folded) entries — the usual
/// case: a short lag, a few entries — so it learns the exact outcome of each
/// and answers its own proposals among them. Only a replica further behind
/// loads the state wholesale (see [`crate::Replica`]). A stored snapshot
/// keeps at most [`SNAPSHOT_TAIL`] entries in its tail (the store folds the
/// rest when it stores one: [`normalize`](Self::normalize)).
///
/// # omnipaxos' `Snapshot` contract, and its delta bug
///
/// * `create(entries)` is the delta of `entries`: nothing folded, `entries`
///   as the tail (also right for the log from index 0, the only case where
///   omnipaxos uses `create` without a stored snapshot to merge into).
/// * `merge(delta)` appends the delta's entries and remembers how many
///   ([`merged`](Self::merged)). A snapshot with a folded part is a
///   complete one; merging it replaces this one.
///
/// omnipaxos 0.2.4 merges a delta received in a log sync into a snapshot
/// of the follower's log made *after* it set its decided index to the
/// leader's: it reads the follower's entries up to the leader's decided
/// index (which it may not have, or has and then counts twice). The store
/// ([`crate::SharedStorage`]) checks every snapshot it is given against the
/// compacted index in the same write and rebuilds a wrong one from its own
/// snapshot, its own decided entries and the delta (the last
/// [`merged`](Self::merged) entries), which is exact.
///
/// Serialised as a [`StateImage`] plus the tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SnapshotWire", try_from = "SnapshotWire")]
pub struct CatalogSnapshot {
    folded: usize,
    state: StateMachine,
    tail: Vec<CatalogEntry>,
    /// Entries appended by the last merge (not serialised).
    merged: usize,
}

#[derive(Serialize, Deserialize)]
struct SnapshotWire {
    folded: usize,
    state: StateImage,
    tail: Vec<CatalogEntry>,
}

impl From<CatalogSnapshot> for SnapshotWire {
    fn from(s: CatalogSnapshot) -> SnapshotWire {
        SnapshotWire {
            folded: s.folded,
            state: s.state.image(),
            tail: s.tail,
        }
    }
}

impl TryFrom<SnapshotWire> for CatalogSnapshot {
    type Error = BadImage;
    fn try_from(w: SnapshotWire) -> Result<CatalogSnapshot, BadImage> {
        Ok(CatalogSnapshot {
            folded: w.folded,
            state: StateMachine::from_image(&w.state)?,
            tail: w.tail,
            merged: 0,
        })
    }
}

impl CatalogSnapshot {
    /// A snapshot of `state` after `len` entries (no tail).
    pub fn of_state(state: StateMachine, len: usize) -> CatalogSnapshot {
        CatalogSnapshot {
            folded: len,
            state,
            tail: Vec::new(),
            merged: 0,
        }
    }

    /// Number of log entries it stands for (from index 0).
    pub fn len(&self) -> usize {
        self.folded + self.tail.len()
    }

    /// Whether it stands for no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of entries folded into the state.
    pub fn folded(&self) -> usize {
        self.folded
    }

    /// The entries after the folded ones.
    pub fn tail(&self) -> &[CatalogEntry] {
        &self.tail
    }

    /// Number of entries the last `merge` appended (0 after
    /// [`normalize`](Self::normalize) and in a deserialised snapshot).
    pub fn merged(&self) -> usize {
        self.merged
    }

    /// The state after the folded entries.
    pub fn folded_state(&self) -> &StateMachine {
        &self.state
    }

    /// The state after all [`len`](Self::len) entries.
    pub fn state(&self) -> StateMachine {
        let mut state = self.state.clone();
        for e in &self.tail {
            state.apply(e);
        }
        state
    }

    /// Appends entries that follow this snapshot's.
    pub fn extend(&mut self, entries: impl IntoIterator<Item = CatalogEntry>) {
        self.tail.extend(entries);
    }

    /// Folds the tail's oldest entries beyond [`SNAPSHOT_TAIL`] into the
    /// state and forgets the last merge.
    pub fn normalize(&mut self) {
        if self.tail.len() > SNAPSHOT_TAIL {
            let n = self.tail.len() - SNAPSHOT_TAIL;
            for e in self.tail.drain(..n) {
                self.state.apply(&e);
            }
            self.folded += n;
        }
        self.merged = 0;
    }
}

impl Snapshot<CatalogEntry> for CatalogSnapshot {
    fn create(entries: &[CatalogEntry]) -> CatalogSnapshot {
        CatalogSnapshot {
            folded: 0,
            state: StateMachine::new(),
            tail: entries.to_vec(),
            merged: 0,
        }
    }

    fn merge(&mut self, delta: CatalogSnapshot) {
        if delta.folded > 0 {
            *self = delta;
            return;
        }
        self.merged = delta.tail.len();
        self.tail.extend(delta.tail);
    }

    fn use_snapshots() -> bool {
        true
    }
}

/// A [`StateMachine`] as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateImage {
    /// The catalog.
    pub catalog: CatalogImage,
    /// Per node: `(node, incarnation, seq)` of its last applied proposal.
    pub last_applied: Vec<(u64, u64, u64)>,
}

/// What applying one log entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command changed the catalog.
    Applied(Applied),
    /// The command was rejected; the catalog is unchanged.
    Rejected(Rejected),
    /// Skipped: its proposer already had this or a later proposal applied
    /// (a retry of an applied entry, or a proposal overtaken by a later one).
    Stale,
}

/// The replicated state: the catalog and the proposal bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateMachine {
    catalog: Catalog,
    /// node → largest `(incarnation, seq)` applied (accepted or rejected).
    last_applied: BTreeMap<u64, (u64, u64)>,
}

impl StateMachine {
    /// An empty state (empty catalog).
    pub fn new() -> StateMachine {
        StateMachine::default()
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// This state as data.
    pub fn image(&self) -> StateImage {
        StateImage {
            catalog: self.catalog.image(),
            last_applied: self
                .last_applied
                .iter()
                .map(|(n, (i, s))| (*n, *i, *s))
                .collect(),
        }
    }

    /// Rebuilds a state from its image.
    pub fn from_image(image: &StateImage) -> Result<StateMachine, BadImage> {
        Ok(StateMachine {
            catalog: Catalog::from_image(&image.catalog)?,
            last_applied: image
                .last_applied
                .iter()
                .map(|(n, i, s)| (*n, (*i, *s)))
                .collect(),
        })
    }

    /// The largest `(incarnation, seq)` applied from `node`.
    pub fn last_applied(&self, node: u64) -> Option<(u64, u64)> {
        self.last_applied.get(&node).copied()
    }

    /// Applies one decided entry. Deterministic.
    pub fn apply(&mut self, entry: &CatalogEntry) -> Outcome {
        let id = entry.id;
        let key = (id.incarnation, id.seq);
        if self
            .last_applied
            .get(&id.node)
            .is_some_and(|last| key <= *last)
        {
            return Outcome::Stale;
        }
        self.last_applied.insert(id.node, key);
        match self.catalog.apply(&entry.cmd) {
            Ok(applied) => Outcome::Applied(applied),
            Err(rejected) => Outcome::Rejected(rejected),
        }
    }
}
