//! Catalog leases, sans-IO: which node may still route writes with the
//! catalog it has, and when every node has seen a given log entry.
//!
//! The driver passes the time in (milliseconds of the node's own monotonic
//! clock) and carries [`LeaseMsg`]s between nodes over the same ordered
//! links as the omnipaxos messages; the simulation drives it with virtual
//! time.
//!
//! # The rule
//!
//! Node N renews by sending `Ping { seq, applied }` to every peer at time
//! `ts` (its clock), every `lease / 8`. A peer R answers
//! `Pong { seq, log_len, applied }`, where `log_len` is the length of R's
//! omnipaxos log — entries R *accepted*, decided or not — when it answers.
//! N counts R's pong only once N's applied index is at least R's `log_len`
//! (N has applied everything R had accepted), and counts itself only once
//! its applied index is at least its own log length at `ts`. When the nodes
//! counted for one ping (N included) form a majority, N's lease is valid
//! until `ts + lease`. A node without a valid lease must not route writes.
//!
//! # Why it is safe
//!
//! Take an entry I decided at real time T: a majority M1 accepted I before
//! T. Any majority M2 that N counts for a ping sent at `ts` intersects M1.
//! A node of the intersection either answered N's ping (or, for N itself,
//! measured its log length at `ts`) *before* accepting I — then `ts < T`, and
//! the lease from that ping ends before `T + lease` — or after accepting I,
//! so it reported a log length above I, and N counted it only after having
//! applied I. Hence, at real time `T + lease` (plus a margin for the
//! difference between the nodes' clock rates), no node holds a lease that
//! was granted without I applied. A node applies I no earlier than T, so
//! [`Leases::safe_after`]: `lease + margin` after *this* node applied I,
//! every node with a valid lease has applied I. That is what a range
//! cut-over waits for (`await_all_applied`), unless every node acknowledged
//! I sooner: pings and pongs carry the sender's applied index.
//!
//! An entry that a node R accepted and that is later replaced by another
//! leader's entry at the same index only delays N (N waits to apply up to
//! that index); it never makes N count early.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Lease traffic between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseMsg {
    /// A renewal request; `applied` is the sender's applied index.
    Ping {
        /// Identifies the renewal round.
        seq: u64,
        /// Entries the sender has applied.
        applied: usize,
    },
    /// The answer to a [`LeaseMsg::Ping`].
    Pong {
        /// The ping's `seq`.
        seq: u64,
        /// Length of the answering node's omnipaxos log (accepted entries).
        log_len: usize,
        /// Entries the answering node has applied.
        applied: usize,
    },
}

struct Round {
    /// When the ping was sent.
    ts: u64,
    /// Whether this node counts itself (it measured `applied >= log_len` at
    /// `ts`, or has applied up to its log length at `ts` since).
    self_log_len: usize,
    /// Peer → the log length it reported.
    pongs: BTreeMap<u64, usize>,
}

/// One node's lease state and its view of the others' applied indexes.
pub struct Leases {
    peers: Vec<u64>,
    lease_ms: u64,
    renew_ms: u64,
    next_seq: u64,
    last_ping: Option<u64>,
    rounds: BTreeMap<u64, Round>,
    /// The lease is valid while `now < valid_until`.
    valid_until: u64,
    peer_applied: BTreeMap<u64, usize>,
    applied: usize,
    /// (applied index after a step, when) for recent steps.
    applied_at: VecDeque<(usize, u64)>,
    /// Every index up to this one was applied longer than
    /// `lease + margin` ago.
    applied_long_ago: usize,
}

impl Leases {
    /// A node whose peers are `peers` (not itself), with leases of
    /// `lease_ms`. It starts without a lease, with nothing applied.
    pub fn new(peers: impl IntoIterator<Item = u64>, lease_ms: u64) -> Leases {
        Leases {
            peers: peers.into_iter().collect(),
            lease_ms,
            renew_ms: (lease_ms / 8).max(1),
            next_seq: 1,
            last_ping: None,
            rounds: BTreeMap::new(),
            valid_until: 0,
            peer_applied: BTreeMap::new(),
            applied: 0,
            applied_at: VecDeque::new(),
            applied_long_ago: 0,
        }
    }

    /// The lease duration.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// The allowance for clock-rate differences: 10 % of the lease plus
    /// 50 ms.
    pub fn margin_ms(&self) -> u64 {
        self.lease_ms / 10 + 50
    }

    #[allow(clippy::manual_div_ceil)] // written as "n / 2 + 1" of n nodes
    fn majority(&self) -> usize {
        // More than half of the peers plus this node.
        (self.peers.len() + 1) / 2 + 1
    }

    /// Whether the lease is valid at `now`.
    pub fn is_valid(&self, now: u64) -> bool {
        now < self.valid_until
    }

    /// The end of the lease (0: never held one).
    pub fn valid_until(&self) -> u64 {
        self.valid_until
    }

    /// Advances time; `applied` and `log_len` are this node's applied index
    /// and omnipaxos log length now. Returns the pings to send, if a
    /// renewal is due.
    pub fn tick(&mut self, now: u64, applied: usize, log_len: usize) -> Vec<(u64, LeaseMsg)> {
        self.set_applied(now, applied);
        let lease = self.lease_ms;
        self.rounds.retain(|_, r| r.ts + lease > now);
        let margin = self.margin_ms();
        while let Some(&(idx, at)) = self.applied_at.front() {
            if at + lease + margin > now {
                break;
            }
            self.applied_long_ago = self.applied_long_ago.max(idx);
            self.applied_at.pop_front();
        }
        if self
            .last_ping
            .is_some_and(|last| now < last + self.renew_ms)
        {
            return Vec::new();
        }
        self.last_ping = Some(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.rounds.insert(
            seq,
            Round {
                ts: now,
                self_log_len: log_len,
                pongs: BTreeMap::new(),
            },
        );
        self.evaluate();
        self.peers
            .iter()
            .map(|&p| (p, LeaseMsg::Ping { seq, applied }))
            .collect()
    }

    /// Records that this node has applied `applied` entries at `now`. A
    /// node that applied something pings at the next tick instead of
    /// waiting for the renewal period: the ping carries the new applied
    /// index, which is what `all_applied` waits for (a cut-over's freeze is
    /// acknowledged within a round trip, not a renewal period). Renewing
    /// early is always safe: a round's lease counts from its own start.
    pub fn set_applied(&mut self, now: u64, applied: usize) {
        if applied > self.applied {
            self.applied = applied;
            self.applied_at.push_back((applied, now));
            self.last_ping = None;
            self.evaluate();
        }
    }

    /// Handles a message from `from`; returns the answer to send back, if
    /// any. `applied` and `log_len` are this node's, now.
    pub fn handle(
        &mut self,
        now: u64,
        from: u64,
        msg: LeaseMsg,
        applied: usize,
        log_len: usize,
    ) -> Option<LeaseMsg> {
        if !self.peers.contains(&from) {
            return None;
        }
        self.set_applied(now, applied);
        match msg {
            LeaseMsg::Ping {
                seq,
                applied: theirs,
            } => {
                self.peer_applied.insert(from, theirs);
                Some(LeaseMsg::Pong {
                    seq,
                    log_len,
                    applied,
                })
            }
            LeaseMsg::Pong {
                seq,
                log_len: theirs_len,
                applied: theirs,
            } => {
                self.peer_applied.insert(from, theirs);
                if let Some(r) = self.rounds.get_mut(&seq) {
                    r.pongs.insert(from, theirs_len);
                    self.evaluate();
                }
                None
            }
        }
    }

    /// Extends the lease by every round whose counted nodes form a majority.
    fn evaluate(&mut self) {
        let majority = self.majority();
        for r in self.rounds.values() {
            let me = usize::from(self.applied >= r.self_log_len);
            let them = r.pongs.values().filter(|&&l| self.applied >= l).count();
            if me + them >= majority {
                self.valid_until = self.valid_until.max(r.ts + self.lease_ms);
            }
        }
    }

    /// The applied index `peer` last reported.
    pub fn peer_applied(&self, peer: u64) -> Option<usize> {
        self.peer_applied.get(&peer).copied()
    }

    /// Whether this node and every peer have applied at least `index`
    /// entries (as last reported).
    pub fn all_applied(&self, index: usize) -> bool {
        self.applied >= index
            && self
                .peers
                .iter()
                .all(|p| self.peer_applied(*p).is_some_and(|a| a >= index))
    }

    /// The time after which no node can hold a lease granted before it had
    /// applied `index` entries: `lease + margin` after this node applied
    /// them (0 if that was longer ago than that). `None` while this node
    /// has not applied them.
    pub fn safe_after(&self, index: usize) -> Option<u64> {
        if index <= self.applied_long_ago {
            return Some(0);
        }
        self.applied_at
            .iter()
            .find(|(idx, _)| *idx >= index)
            .map(|(_, at)| at + self.lease_ms + self.margin_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 2000;

    /// Plays one renewal round for node 1 of {1, 2, 3}: peers answer with
    /// the given log lengths.
    fn round(l: &mut Leases, now: u64, applied: usize, answers: &[(u64, usize)]) {
        let pings = l.tick(now, applied, applied);
        assert_eq!(pings.len(), 2, "a renewal is due at {now}");
        let LeaseMsg::Ping { seq, .. } = pings[0].1 else {
            panic!("expected a ping");
        };
        for &(peer, log_len) in answers {
            l.handle(
                now + 1,
                peer,
                LeaseMsg::Pong {
                    seq,
                    log_len,
                    applied: log_len,
                },
                applied,
                applied,
            );
        }
    }

    #[test]
    fn a_majority_of_up_to_date_pongs_grants_the_lease() {
        let mut l = Leases::new([2, 3], LEASE);
        assert!(!l.is_valid(0));
        round(&mut l, 0, 5, &[(2, 5)]);
        assert!(l.is_valid(1));
        assert!(l.is_valid(LEASE - 1));
        assert!(!l.is_valid(LEASE));
    }

    #[test]
    fn a_peer_that_accepted_more_than_we_applied_does_not_count() {
        let mut l = Leases::new([2, 3], LEASE);
        // Both peers accepted entry 5 (log length 6); we applied 5 entries.
        round(&mut l, 0, 5, &[(2, 6), (3, 6)]);
        assert!(!l.is_valid(1), "no lease before applying what they hold");
        // Once we applied it, the same pongs count (the lease still runs
        // from the ping's time).
        l.set_applied(10, 6);
        assert!(l.is_valid(11));
        assert_eq!(l.valid_until(), LEASE);
    }

    #[test]
    fn self_counts_only_with_its_own_log_applied() {
        let mut l = Leases::new([2, 3], LEASE);
        // Our log holds 7 entries, 5 applied: we do not count ourselves, so
        // one up-to-date peer is not enough.
        let pings = l.tick(0, 5, 7);
        let LeaseMsg::Ping { seq, .. } = pings[0].1 else {
            panic!("expected a ping");
        };
        let pong = LeaseMsg::Pong {
            seq,
            log_len: 5,
            applied: 5,
        };
        l.handle(1, 2, pong, 5, 7);
        assert!(!l.is_valid(2));
        l.handle(2, 3, pong, 5, 7);
        assert!(l.is_valid(3), "two peers are a majority without us");
    }

    #[test]
    fn an_isolated_node_loses_its_lease() {
        let mut l = Leases::new([2, 3], LEASE);
        round(&mut l, 0, 1, &[(2, 1), (3, 1)]);
        assert!(l.is_valid(100));
        // From now on nobody answers; it keeps pinging.
        let mut now = 100;
        while now < 3 * LEASE {
            let _ = l.tick(now, 1, 1);
            now += 10;
        }
        assert!(!l.is_valid(now));
        assert_eq!(l.valid_until(), LEASE);
    }

    #[test]
    fn renewal_extends_the_lease() {
        let mut l = Leases::new([2, 3], LEASE);
        round(&mut l, 0, 1, &[(2, 1)]);
        let _ = l.tick(100, 1, 1); // not due yet
        round(&mut l, LEASE / 8, 1, &[(3, 1)]);
        assert_eq!(l.valid_until(), LEASE / 8 + LEASE);
        // A late pong for an expired round does nothing.
        let _ = l.handle(
            5 * LEASE,
            2,
            LeaseMsg::Pong {
                seq: 1,
                log_len: 0,
                applied: 1,
            },
            1,
            1,
        );
        assert_eq!(l.valid_until(), LEASE / 8 + LEASE);
    }

    #[test]
    fn pongs_from_strangers_are_ignored() {
        let mut l = Leases::new([2, 3], LEASE);
        let pings = l.tick(0, 1, 1);
        let LeaseMsg::Ping { seq, .. } = pings[0].1 else {
            panic!("expected a ping");
        };
        let pong = LeaseMsg::Pong {
            seq,
            log_len: 1,
            applied: 1,
        };
        assert_eq!(l.handle(1, 9, pong, 1, 1), None);
        assert!(!l.is_valid(2));
    }

    #[test]
    fn await_is_early_when_everyone_acked_and_bounded_otherwise() {
        let mut l = Leases::new([2, 3], LEASE);
        assert_eq!(l.safe_after(3), None, "not applied here yet");
        l.set_applied(100, 3);
        assert!(!l.all_applied(3));
        let safe = LEASE + l.margin_ms() + 100;
        assert_eq!(l.safe_after(3), Some(safe));
        assert_eq!(l.safe_after(2), Some(safe));
        // Peer pings carry their applied index.
        let reply = l.handle(200, 2, LeaseMsg::Ping { seq: 1, applied: 3 }, 3, 3);
        assert_eq!(
            reply,
            Some(LeaseMsg::Pong {
                seq: 1,
                log_len: 3,
                applied: 3
            })
        );
        assert!(!l.all_applied(3));
        let _ = l.handle(
            210,
            3,
            LeaseMsg::Pong {
                seq: 7,
                log_len: 4,
                applied: 4,
            },
            3,
            3,
        );
        assert!(l.all_applied(3));
        assert!(!l.all_applied(4), "we have not applied 4");
        // Long after, the bound is in the past.
        let _ = l.tick(safe + 1, 3, 3);
        assert_eq!(l.safe_after(3), Some(0));
    }

    #[test]
    fn a_single_node_renews_alone() {
        let mut l = Leases::new([], LEASE);
        assert!(l.tick(0, 2, 2).is_empty());
        assert!(l.is_valid(1));
        assert!(l.all_applied(2));
    }
}
