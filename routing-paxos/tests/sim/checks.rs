//! The safety checks on what replicas apply: the same entry and outcome
//! at each index everywhere, epochs + 1 per routing change, tickets
//! answered once with what was proposed, equal state at equal applied
//! index (against a separate state machine replaying the log); and the
//! checks at the end of a run.

use std::collections::BTreeSet;

use hotrepart_routing_paxos::{Applied, CatalogCommand, CatalogEntry, Outcome, StateMachine};

use crate::world::Sim;

impl Sim {
    /// All replicas applied the same number of entries, which is everything
    /// decided, and no proposal is unanswered.
    pub(crate) fn converged(&self) -> bool {
        let mut applied = BTreeSet::new();
        for n in &self.nodes {
            let Some(r) = &n.replica else { return false };
            if r.applied_index() != r.decided_index() || !n.tickets.is_empty() {
                return false;
            }
            applied.insert(r.applied_index());
        }
        applied.len() == 1
    }

    pub(crate) fn final_checks(&self) {
        let bootstraps = self
            .log
            .iter()
            .filter(|(e, o)| {
                matches!(e.cmd, CatalogCommand::Bootstrap(_)) && matches!(o, Outcome::Applied(_))
            })
            .count();
        // Usually one wins; none when an AddShard created the catalog first.
        if bootstraps > 1 {
            self.fail(format!("{bootstraps} bootstrap seeds were accepted"));
        }
        // The stored logs themselves (not only what was applied from them)
        // are prefixes of the log.
        for n in &self.nodes {
            let Some(r) = n.replica.as_ref() else {
                continue;
            };
            // From the snapshot on: what it replaced was checked when
            // applied.
            let from = r.compacted_index();
            let stored = r.read_decided(from);
            for (i, (e, (want, _))) in stored
                .iter()
                .zip(self.log.iter().skip(from))
                .enumerate()
                .map(|(i, x)| (i + from, x))
            {
                if e != want {
                    self.fail(format!(
                        "node {} holds {e:?} at index {i}, applied everywhere: {want:?}",
                        n.pid
                    ));
                }
            }
        }
        for n in &self.nodes {
            if let Some(r) = &n.replica {
                let applied = r.applied_index();
                if applied > 0 && self.states[applied - 1] != *r.state() {
                    self.fail(format!("node {} ends with a different state", n.pid));
                }
            }
        }
    }

    pub(crate) fn apply(&mut self, i: usize) {
        let pid = self.nodes[i].pid;
        let Some(r) = self.nodes[i].replica.as_mut() else {
            return;
        };
        let before = r.applied_index();
        let decided = match r.apply_decided() {
            Ok(d) => d,
            Err(e) => self.fail(format!("node {pid} apply: {e}")),
        };
        // Proposals folded into a snapshot before this replica applied
        // them: answered "unknown".
        let lost = r.take_lost();
        if !lost.is_empty() {
            self.stats.lost += lost.len() as u64;
            let n = &mut self.nodes[i];
            for t in lost {
                if n.tickets.remove(&t).is_none() {
                    self.fail(format!("node {pid} ticket {t:?} lost after its answer"));
                }
                n.answered.insert(t);
            }
        }
        let Some(r) = self.nodes[i].replica.as_ref() else {
            return;
        };
        if decided.is_empty() && r.applied_index() == before {
            return;
        }
        if self.trace {
            let ids: Vec<(usize, u64, u64, u64)> = decided
                .iter()
                .map(|d| {
                    (
                        d.index,
                        d.entry.id.node,
                        d.entry.id.incarnation,
                        d.entry.id.seq,
                    )
                })
                .collect();
            eprintln!(
                "t{} node {pid} applied (index, node, incarnation, seq) {ids:?}",
                self.now
            );
        }
        let state = r.state().clone();
        let final_epoch = r.catalog().epoch();
        let applied = r.applied_index();
        let mut epoch = self.nodes[i].epoch;
        let mut next = before;
        for d in decided {
            if d.index != next {
                // Loaded a snapshot up to d.index.
                epoch = self.jumped(pid, next, d.index);
            }
            next = d.index + 1;
            // Same entry and outcome at this index everywhere.
            if d.index < self.log.len() {
                let (entry, outcome) = &self.log[d.index];
                if *entry != d.entry || *outcome != d.outcome {
                    self.fail(format!(
                        "node {pid} applied at index {}: {:?} -> {:?}; first applied there: {entry:?} -> {outcome:?}",
                        d.index, d.entry, d.outcome
                    ));
                }
            } else if d.index == self.log.len() {
                self.stats.entries += 1;
                match &d.outcome {
                    Outcome::Applied(_) => self.stats.accepted += 1,
                    Outcome::Rejected(_) => self.stats.rejected += 1,
                    Outcome::Stale => self.stats.stale += 1,
                }
                self.log.push((d.entry.clone(), d.outcome.clone()));
            } else {
                self.fail(format!("node {pid} skipped to index {}", d.index));
            }
            // Epochs: +1 per routing change, unchanged otherwise.
            if let Outcome::Applied(Applied::Routing(s)) = &d.outcome {
                if s.epoch() != epoch + 1 {
                    self.fail(format!(
                        "node {pid} index {}: epoch {} after {epoch}",
                        d.index,
                        s.epoch()
                    ));
                }
                epoch = s.epoch();
            }
            // Tickets: answered once, with what was proposed.
            if let Some(t) = d.ticket {
                let n = &mut self.nodes[i];
                match n.tickets.remove(&t) {
                    Some(cmd) if cmd == d.entry.cmd => {
                        n.answered.insert(t);
                    }
                    Some(cmd) => self.fail(format!(
                        "node {pid} ticket {t:?} proposed {cmd:?}, answered with {:?}",
                        d.entry.cmd
                    )),
                    None => self.fail(format!("node {pid} ticket {t:?} answered twice")),
                }
            }
        }
        if applied != next {
            epoch = self.jumped(pid, next, applied);
        }
        if final_epoch != epoch {
            self.fail(format!(
                "node {pid}: catalog epoch {final_epoch}, entries say {epoch}"
            ));
        }
        self.nodes[i].epoch = epoch;
        // Equal state at equal applied index: the reference state at each
        // index comes from a separate state machine replaying the log.
        if applied > 0 {
            replay_states(&self.log, &mut self.states, applied);
            if self.states[applied - 1] != state {
                self.fail(format!(
                    "node {pid} at applied index {applied} holds a different state"
                ));
            }
        }
    }
}

impl Sim {
    /// A replica loaded a snapshot: from applying entry `from` on, it went
    /// to `to` entries applied. Every entry of a snapshot was applied one
    /// by one by some replica first; returns the epoch after `to` entries.
    pub(crate) fn jumped(&mut self, pid: u64, from: usize, to: usize) -> u64 {
        if to < from || to > self.log.len() {
            self.fail(format!(
                "node {pid} jumped from index {from} to {to}; the log has {} entries",
                self.log.len()
            ));
        }
        self.stats.snapshot_loads += 1;
        if to == 0 {
            return 0;
        }
        replay_states(&self.log, &mut self.states, to);
        self.states[to - 1].catalog().epoch()
    }
}

/// Extends `states` (the state after each index of `log`) up to `upto`
/// entries by applying the log to a separate state machine.
pub(crate) fn replay_states(
    log: &[(CatalogEntry, Outcome)],
    states: &mut Vec<StateMachine>,
    upto: usize,
) {
    let mut sm = states.last().cloned().unwrap_or_default();
    while states.len() < upto {
        let (entry, _) = &log[states.len()];
        sm.apply(entry);
        states.push(sm.clone());
    }
}
