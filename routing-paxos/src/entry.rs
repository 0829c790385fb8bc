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

use omnipaxos::storage::{Entry, NoSnapshot};
use serde::{Deserialize, Serialize};

use crate::catalog::{Applied, Catalog, Rejected};
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
    // Log compaction with catalog snapshots is not implemented yet.
    type Snapshot = NoSnapshot;
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
