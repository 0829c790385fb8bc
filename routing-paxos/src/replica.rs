//! A sans-IO catalog replica: omnipaxos plus the state machine, driven from
//! outside.
//!
//! The driver (a tokio task in a node, a loop in the simulation) owns time,
//! the network and the disk; the replica owns none of them. The driver:
//!
//! * calls [`Replica::tick`] at a fixed period (all timeouts are counted in
//!   ticks),
//! * passes every message from a peer to [`Replica::handle`], and sends what
//!   [`Replica::outgoing`] returns (each message names its receiver),
//! * calls [`Replica::reconnected`] when a link to a peer comes back (a new
//!   connection after a broken one),
//! * calls [`Replica::apply_decided`] and publishes the resulting snapshot.
//!
//! # Proposals
//!
//! [`Replica::propose`] returns a [`Ticket`]. The replica re-proposes a
//! pending command every `retry_ticks` until it sees it decided (omnipaxos
//! may lose a proposal: see [`crate::entry`]); the first decided copy is
//! applied, later copies are [`Outcome::Stale`]. If a pending proposal is
//! overtaken by a later one of this replica and comes out `Stale`, it was
//! never applied and can never be: the replica proposes it again under a new
//! id, same ticket. So each ticket is answered exactly once (unless the
//! replica itself restarts: pending proposals die with it; a restarted
//! replica has a new incarnation, so its new ids never collide with old
//! ones).
//!
//! # Draining after every input
//!
//! omnipaxos 0.2.4 batches: while an AcceptDecide for a follower sits in its
//! outgoing buffer, a newly accepted entry is added to that message instead
//! of a new one. It does not forget that message when it sends the follower
//! an AcceptSync (which starts a new sequence session), so an entry accepted
//! after the AcceptSync but before the buffer is taken rides in the old
//! session's message; a follower that takes the AcceptSync discards that
//! message as outdated (or ignores it while preparing), stores the next
//! entry at the lost entry's index, and the logs diverge. The simulation
//! found this with reordering links (`HOTREPART_SIM_NET=chaos`, where the
//! trace showed exactly that); nothing in it needs reordering except that
//! the follower must be preparing again when the old message arrives.
//! Taking the outgoing messages resets that state, so the replica takes
//! them after every call into omnipaxos and keeps them in its own outbox
//! until [`Replica::outgoing`].
//!
//! # Restarting with a promise for our own ballot
//!
//! A node that starts an election writes a promise for its new ballot `P`
//! (durably) before its Prepare goes out. If it stops before `P` reaches
//! the accept phase (its Prepare lost, or answered by a minority only), it
//! restarts holding that promise. omnipaxos 0.2.4 then recovers like this:
//! sequence paxos starts in the Recover phase and sends PrepareReq(`P`) to
//! every peer; ballot leader election (BLE) takes `P` as its leader but
//! advertises its own ballot at round 0 (`RECOVERY_ROUND`), and a BLE only
//! ever adopts the *ballots* in heartbeat replies, never the leaders they
//! name. Meanwhile the others may have elected a leader `L` with a ballot
//! below `P` (they never saw `P`: e.g. both took over at the same round and
//! this node's pid is higher). Then nothing moves anyone past `P`: `L`
//! ignores PrepareReq(`P`) (it answers only requests at or below its own
//! ballot), this node ignores `L`'s Prepare (below its promise), and the
//! others' BLE, happy with `L` and never shown a ballot above it, never
//! starts an election. The node stays behind for as long as `L` leads (in
//! the simulation: forever; "all replicas catch up after healing" fails).
//!
//! So a replica that starts over a store whose promise is its own ballot
//! and whose accepted round is below that promise calls omnipaxos'
//! `try_become_leader`: a Prepare for ballot (`P.n + 1`, this pid), which
//! the others promise (it is above `L`); BLE takes that ballot from the
//! promise at its next round and advertises it, so the others' BLE follow.
//! If the cluster had already moved past `P + 1`, the PrepareReq(`P`) sent
//! just before reaches that leader, which answers with its Prepare, and
//! this node follows it (a Prepare above its promise).
//!
//! Safety: nothing is given up. The stored promise, accepted round and log
//! are untouched; starting a ballot is what any proposer may do at any time
//! in Paxos, and Paxos' safety (a value decided in a ballot is the value of
//! every higher ballot's accept phase) holds whoever starts which ballot
//! when, provided two proposers never use the same ballot. `P.n + 1` with
//! this pid was never used by this node: the promise is written before a
//! Prepare for it is sent and never decreases, so every ballot this node
//! ever started is at most `P`; no other node uses this pid. The condition
//! (own ballot, nothing accepted in it) only limits when the restarted node
//! makes itself a candidate: a node that was the accepting leader of `P`
//! (accepted round = `P`) had a majority promise `P`, and those followers'
//! BLE elect a successor above `P` once its heartbeats stop, as usual.
//! The condition also cannot be met by a torn state: the leader of `P`
//! writes accepted round `P` with the synced log in one atomic batch
//! (`write_atomically`, one journal record) before it queues its first
//! AcceptSync, and the driver sends messages only after the call returns;
//! so accepted round < `P` in the store proves that no node accepted, and
//! none decided, anything in `P`. The only party that relied on our
//! promise for `P` was our own election for `P`, which is abandoned (its
//! leader state is not stored, and the new ballot supersedes it). A crash
//! during the new election is the same case one ballot higher.
//!
//! # What the transport must provide
//!
//! Messages between two replicas must arrive in the order sent, each at
//! most once (a TCP connection per peer); a message may be lost only when
//! the connection breaks, and then [`Replica::reconnected`] must be called
//! on both ends when a new connection is up, before anything is delivered
//! on it. omnipaxos relies on this: with messages reordered on one link the
//! simulation finds both stuck followers and diverging logs
//! (`HOTREPART_SIM_NET=chaos`).

use std::collections::BTreeMap;
use std::sync::Arc;

use hotrepart_router::catalog::RoutingSnapshot;
use omnipaxos::util::{LogEntry, NodeId};
use omnipaxos::{ClusterConfig, OmniPaxos, OmniPaxosConfig, ServerConfig};

use crate::catalog::Catalog;
use crate::command::CatalogCommand;
use crate::entry::{CatalogEntry, CatalogSnapshot, Outcome, ProposalId, StateMachine};
use crate::storage::SharedStorage;

/// The messages replicas exchange (serde-serialisable).
pub type Message = omnipaxos::messages::Message<CatalogEntry>;

/// Settings of one replica. Timeouts are in ticks.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This node's id, non-zero, unique in the cluster.
    pub pid: NodeId,
    /// All nodes of the cluster, this one included (at least 2).
    pub nodes: Vec<NodeId>,
    /// The omnipaxos configuration id (1 for the first configuration; a
    /// reconfiguration makes the next).
    pub config_id: u32,
    /// Ticks per leader-election round (heartbeat period): a leader is
    /// replaced after about two rounds without its heartbeats. Must exceed
    /// the usual round-trip time in ticks.
    pub election_ticks: u64,
    /// Ticks before omnipaxos resends protocol messages that got no answer.
    pub resend_ticks: u64,
    /// Ticks before a proposal not yet decided is proposed again.
    pub retry_ticks: u64,
    /// Once the decided log holds more than this many entries beyond the
    /// last snapshot, the applied prefix is replaced by a snapshot
    /// ([`Replica::compact`]). 0: never compact (snapshots from peers are
    /// still taken in).
    pub compact_after: usize,
}

/// Default [`ReplicaConfig::compact_after`].
pub const COMPACT_AFTER: usize = 1000;

impl ReplicaConfig {
    /// Defaults for a cluster of `nodes`, as node `pid`: election round 10
    /// ticks, resend 20, retry 50 (with a 10 ms tick: 100 ms heartbeats).
    pub fn new(pid: NodeId, nodes: Vec<NodeId>) -> ReplicaConfig {
        ReplicaConfig {
            pid,
            nodes,
            config_id: 1,
            election_ticks: 10,
            resend_ticks: 20,
            retry_ticks: 50,
            compact_after: COMPACT_AFTER,
        }
    }
}

/// A replica could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The configuration is invalid (omnipaxos' check, or ours).
    #[error("invalid replica configuration: {0}")]
    Config(String),
    /// The storage handle is unusable.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// The log was trimmed past what this replica applied without a
    /// snapshot to take its place (this replica never trims without one).
    #[error("log trimmed at index {0} without a catalog snapshot")]
    Compacted(usize),
    /// A snapshot does not stand for the prefix of the log it replaces;
    /// it is not loaded.
    #[error("catalog snapshot refused: {0}")]
    BadSnapshot(String),
    /// The configuration was stopped for a reconfiguration (membership
    /// changes are not implemented yet).
    #[error("the cluster configuration is being changed; proposals are closed")]
    Reconfiguring,
}

/// The caller's handle for one proposal, answered once in
/// [`Decided::ticket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// One decided log entry, as applied by this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// Its index in the log (from 0).
    pub index: usize,
    /// The entry.
    pub entry: CatalogEntry,
    /// What applying it did.
    pub outcome: Outcome,
    /// Set when this entry answers one of this replica's proposals.
    pub ticket: Option<Ticket>,
}

struct Pending {
    ticket: Ticket,
    cmd: CatalogCommand,
    /// The incarnation in the proposal's id.
    incarnation: u64,
    /// Tick of the last (re-)proposal.
    sent_at: u64,
}

/// What a replica knows about itself and the cluster, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// This node.
    pub pid: NodeId,
    /// This start's incarnation.
    pub incarnation: u64,
    /// The leader it follows (the owner of its promised ballot), if any.
    pub leader: Option<NodeId>,
    /// Whether this replica is in the accept phase of that leader's ballot
    /// (it replicates entries), rather than preparing or recovering.
    pub accepting: bool,
    /// The round number of the promised ballot.
    pub round: u32,
    /// Entries decided.
    pub decided: usize,
    /// Entries applied to the catalog.
    pub applied: usize,
    /// The catalog epoch.
    pub epoch: u64,
    /// Proposals not answered yet.
    pub pending: usize,
    /// Log entries replaced by the snapshot (the snapshot's index; 0: none).
    pub compacted: usize,
    /// Log entries stored after the snapshot (accepted, decided or not).
    pub log_len: usize,
}

/// One catalog replica. See the module docs for how to drive it.
pub struct Replica {
    pid: NodeId,
    config_id: u32,
    nodes: Vec<NodeId>,
    incarnation: u64,
    paxos: OmniPaxos<CatalogEntry, SharedStorage>,
    /// Another handle on the store omnipaxos uses, for the incarnation.
    storage: SharedStorage,
    state: StateMachine,
    /// Number of log entries applied to `state`; the next one to apply.
    applied: usize,
    now: u64,
    retry_ticks: u64,
    compact_after: usize,
    /// Tickets whose entry was folded into a snapshot before this replica
    /// applied it one by one: their outcome is unknown here.
    lost: Vec<Ticket>,
    next_seq: u64,
    next_ticket: u64,
    /// Undecided proposals, by seq (seq never repeats within a process,
    /// even when the incarnation is raised).
    pending: BTreeMap<u64, Pending>,
    /// Messages taken out of omnipaxos, not yet handed to the driver.
    outbox: Vec<Message>,
}

impl Replica {
    /// Starts a replica over `storage`. With an empty store this is a new
    /// node; with the store of a replica that was dropped it is that node
    /// restarted: it recovers its promise and log from the store, replays
    /// the decided log into its catalog at the next
    /// [`apply_decided`](Self::apply_decided), and catches up from its peers.
    pub fn new(config: ReplicaConfig, storage: SharedStorage) -> Result<Replica, ReplicaError> {
        if config.retry_ticks == 0 {
            return Err(ReplicaError::Config(
                "retry_ticks must be at least 1".into(),
            ));
        }
        let incarnation = storage.next_incarnation()?;
        let nodes = config.nodes.clone();
        let op_config = OmniPaxosConfig {
            cluster_config: ClusterConfig {
                configuration_id: config.config_id,
                nodes: config.nodes,
                flexible_quorum: None,
            },
            server_config: ServerConfig {
                pid: config.pid,
                election_tick_timeout: config.election_ticks,
                resend_message_tick_timeout: config.resend_ticks,
                ..ServerConfig::default()
            },
        };
        // omnipaxos' ConfigError reports itself as its own `source()`, so it
        // is kept as text: an error-chain walker would loop on it.
        let mut paxos = op_config
            .build(storage.clone())
            .map_err(|e| ReplicaError::Config(e.to_string()))?;
        if stranded_own_ballot(&storage, config.pid) {
            // See "Restarting with a promise for our own ballot" in the
            // module docs.
            tracing::info!(
                pid = config.pid,
                round = paxos.get_promise().n,
                "restarted with a promise for its own ballot that never reached the accept phase: \
                 starting a higher ballot"
            );
            paxos.try_become_leader();
        }
        let mut replica = Replica {
            pid: config.pid,
            config_id: config.config_id,
            nodes,
            incarnation,
            paxos,
            storage,
            state: StateMachine::new(),
            applied: 0,
            now: 0,
            retry_ticks: config.retry_ticks,
            compact_after: config.compact_after,
            lost: Vec::new(),
            next_seq: 1,
            next_ticket: 1,
            pending: BTreeMap::new(),
            outbox: Vec::new(),
        };
        replica.drain();
        Ok(replica)
    }

    /// This node's id.
    pub fn pid(&self) -> NodeId {
        self.pid
    }

    /// The omnipaxos configuration this replica is part of.
    pub fn config_id(&self) -> u32 {
        self.config_id
    }

    /// The nodes of its configuration.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// Proposes the end of this configuration and the start of the next
    /// one (`config_id + 1`) with `nodes`; `metadata` is decided with it.
    /// Refused if a reconfiguration is already under way here.
    pub fn reconfigure(
        &mut self,
        nodes: Vec<NodeId>,
        metadata: Vec<u8>,
    ) -> Result<(), ReplicaError> {
        let next = ClusterConfig {
            configuration_id: self.config_id + 1,
            nodes,
            flexible_quorum: None,
        };
        let result = self
            .paxos
            .reconfigure(next, Some(metadata))
            .map_err(|e| match e {
                omnipaxos::ProposeErr::ConfigError(e, ..) => ReplicaError::Config(e.to_string()),
                _ => ReplicaError::Reconfiguring,
            });
        self.drain();
        result
    }

    /// The decided StopSign, once this configuration has ended: the next
    /// configuration and its metadata. Everything before it is decided (and
    /// applied, once [`apply_decided`](Self::apply_decided) ran).
    pub fn stopped(&self) -> Option<omnipaxos::storage::StopSign> {
        self.paxos.is_reconfigured()
    }

    /// Whether a reconfiguration was accepted here (decided or not): no
    /// proposal can be decided in this configuration any more.
    pub fn stopping(&self) -> bool {
        self.storage.stopsign_accepted()
    }

    /// The StopSign accepted here (decided or not), if any.
    pub fn pending_stopsign(&self) -> Option<omnipaxos::storage::StopSign> {
        use omnipaxos::storage::Storage;
        self.storage.get_stopsign().ok().flatten()
    }

    /// This start's incarnation (1 for the first start over a store).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The catalog as of the applied prefix of the log.
    pub fn catalog(&self) -> &Catalog {
        self.state.catalog()
    }

    /// The replicated state (catalog and proposal bookkeeping).
    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    /// The current routing snapshot, if the catalog is not empty.
    pub fn snapshot(&self) -> Option<&Arc<RoutingSnapshot>> {
        self.state.catalog().snapshot()
    }

    /// Number of log entries applied (the index of the next one).
    pub fn applied_index(&self) -> usize {
        self.applied
    }

    /// Length of this replica's omnipaxos log: entries accepted, decided
    /// or not (what a lease pong reports; see [`crate::lease`]).
    pub fn log_len(&self) -> usize {
        // omnipaxos' accepted index is the log length counted from the
        // start of the log, also once it is trimmed.
        self.paxos.get_accepted_idx()
    }

    /// Number of log entries decided (some may not be applied yet).
    pub fn decided_index(&self) -> usize {
        self.paxos.get_decided_idx()
    }

    /// The leader this replica follows, if it knows one.
    pub fn leader(&self) -> Option<NodeId> {
        self.paxos.get_current_leader().map(|(pid, _)| pid)
    }

    /// The decided entries from index `max(from, compacted_index())` on, as
    /// this replica's log holds them (for inspection;
    /// [`apply_decided`](Self::apply_decided) is how the catalog follows
    /// the log).
    pub fn read_decided(&self, from: usize) -> Vec<CatalogEntry> {
        self.paxos
            .read_decided_suffix(from)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| match e {
                LogEntry::Decided(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// A summary of this replica's state.
    pub fn status(&self) -> ReplicaStatus {
        let leader = self.paxos.get_current_leader();
        ReplicaStatus {
            pid: self.pid,
            incarnation: self.incarnation,
            leader: leader.map(|(pid, _)| pid),
            accepting: leader.is_some_and(|(_, accepting)| accepting),
            round: self.paxos.get_promise().n,
            decided: self.decided_index(),
            applied: self.applied,
            epoch: self.catalog().epoch(),
            pending: self.pending.len(),
            compacted: self.compacted_index(),
            log_len: self.log_len().saturating_sub(self.compacted_index()),
        }
    }

    /// Number of log entries replaced by the stored snapshot (0: none).
    pub fn compacted_index(&self) -> usize {
        self.paxos.get_compacted_idx()
    }

    /// Replaces the applied prefix of the log with a snapshot of the
    /// catalog, on this replica only (each replica compacts its own log;
    /// a peer that needs the prefix gets the snapshot from omnipaxos).
    /// No-op when nothing applied is left to compact.
    pub fn compact(&mut self) -> Result<(), ReplicaError> {
        let upto = self.applied.min(self.paxos.get_decided_idx());
        if upto <= self.compacted_index() {
            return Ok(());
        }
        self.paxos
            .snapshot(Some(upto), true)
            .map_err(|e| ReplicaError::BadSnapshot(format!("cannot compact at {upto}: {e}")))?;
        self.drain();
        tracing::debug!(
            pid = self.pid,
            index = self.compacted_index(),
            "catalog log compacted into a snapshot"
        );
        Ok(())
    }

    /// Takes the tickets whose outcome was lost: their entries were folded
    /// into a snapshot (from a peer) before this replica applied them one
    /// by one. Each was applied at most once, or never (if overtaken); the
    /// catalog tells which.
    pub fn take_lost(&mut self) -> Vec<Ticket> {
        std::mem::take(&mut self.lost)
    }

    /// Number of this replica's proposals not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Proposes a command. It is forwarded to the leader (or buffered until
    /// one is known) and re-proposed until decided.
    pub fn propose(&mut self, cmd: CatalogCommand) -> Result<Ticket, ReplicaError> {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.submit(ticket, cmd)?;
        Ok(ticket)
    }

    /// Sends `cmd` under a fresh proposal id.
    fn submit(&mut self, ticket: Ticket, cmd: CatalogCommand) -> Result<(), ReplicaError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let incarnation = self.incarnation;
        self.append(incarnation, seq, &cmd)?;
        self.pending.insert(
            seq,
            Pending {
                ticket,
                cmd,
                incarnation,
                sent_at: self.now,
            },
        );
        Ok(())
    }

    fn append(
        &mut self,
        incarnation: u64,
        seq: u64,
        cmd: &CatalogCommand,
    ) -> Result<(), ReplicaError> {
        let entry = CatalogEntry {
            id: ProposalId {
                node: self.pid,
                incarnation,
                seq,
            },
            cmd: cmd.clone(),
        };
        let result = self
            .paxos
            .append(entry)
            .map_err(|_| ReplicaError::Reconfiguring);
        self.drain();
        result
    }

    /// Moves omnipaxos' outgoing messages into our outbox. Called after
    /// every input, never later: see "Draining after every input" in the
    /// module docs.
    fn drain(&mut self) {
        self.paxos.take_outgoing_messages(&mut self.outbox);
    }

    /// Advances time by one tick: elections, resends, proposal retries.
    pub fn tick(&mut self) -> Result<(), ReplicaError> {
        self.now += 1;
        self.paxos.tick();
        self.drain();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| self.now - p.sent_at >= self.retry_ticks)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.sent_at = self.now;
                let (incarnation, cmd) = (p.incarnation, p.cmd.clone());
                self.append(incarnation, seq, &cmd)?;
            }
        }
        Ok(())
    }

    /// Handles one message from a peer.
    pub fn handle(&mut self, msg: Message) {
        if let Some(why) = self.unfit_log_sync(&msg) {
            // omnipaxos would panic on the store's refusal; a dropped
            // message is what Paxos tolerates.
            tracing::error!(
                pid = self.pid,
                from = msg.get_sender(),
                reason = %why,
                "dropping a catalog log sync from a peer: its snapshot does not fit the log (a peer's defect)"
            );
            return;
        }
        self.paxos.handle_incoming(msg);
        self.drain();
    }

    /// Why the log sync `msg` carries (an AcceptSync, or a Promise to this
    /// replica as a candidate leader) would be refused by the store as a
    /// corrupt snapshot, if it would: a complete snapshot must stand for
    /// exactly the entries its sync index says; a delta's entries must
    /// end there and start at most where this replica's stored entries end
    /// (see `SharedStorage`'s snapshot rebuild). Only what the store would
    /// refuse whatever omnipaxos merges the delta into: a false alarm
    /// drops a Promise a candidate needs (the simulation found one that
    /// refused stale deltas below the compacted index, which the store
    /// takes). A delta without entries is not checked.
    fn unfit_log_sync(&self, msg: &Message) -> Option<String> {
        use omnipaxos::messages::sequence_paxos::PaxosMsg;
        use omnipaxos::storage::SnapshotType;
        let omnipaxos::messages::Message::SequencePaxos(p) = msg else {
            return None;
        };
        let sync = match &p.msg {
            PaxosMsg::AcceptSync(a) => &a.log_sync,
            PaxosMsg::Promise(pr) => pr.log_sync.as_ref()?,
            _ => return None,
        };
        let idx = sync.sync_idx;
        let (_, stored_end) = self.storage.log_bounds();
        // A delta with a folded part replaces the snapshot when merged.
        let (whole, snap) = match sync.decided_snapshot.as_ref()? {
            SnapshotType::Complete(s) => (true, s),
            SnapshotType::Delta(d) => (d.folded() > 0, d),
        };
        if whole {
            return (snap.len() != idx)
                .then(|| format!("a snapshot for {} entries at sync index {idx}", snap.len()));
        }
        if snap.is_empty() {
            return None;
        }
        let Some(start) = idx.checked_sub(snap.len()) else {
            return Some(format!(
                "a delta of {} entries at sync index {idx}",
                snap.len()
            ));
        };
        (start > stored_end).then(|| {
            format!(
                "a delta for entries {start}..{idx}; this replica stores entries up to {stored_end}"
            )
        })
    }

    /// Tells the replica that the link to `peer` was re-established.
    pub fn reconnected(&mut self, peer: NodeId) {
        self.paxos.reconnected(peer);
        self.drain();
    }

    /// Takes the messages to send.
    pub fn outgoing(&mut self) -> Vec<Message> {
        self.drain();
        std::mem::take(&mut self.outbox)
    }

    /// Applies the newly decided entries to the catalog, in log order, and
    /// returns them with their outcomes. Where the log was compacted past
    /// what was applied, the snapshot's entries are applied one by one if
    /// its tail reaches back far enough, else its state is loaded whole
    /// (the tickets of this replica's proposals in the folded part then go
    /// to [`take_lost`](Self::take_lost)). Then, if the decided log holds
    /// more than `compact_after` entries beyond the snapshot, compacts it.
    pub fn apply_decided(&mut self) -> Result<Vec<Decided>, ReplicaError> {
        let mut out = Vec::new();
        if self.paxos.get_decided_idx() > self.applied {
            if let Some(entries) = self.paxos.read_decided_suffix(self.applied) {
                for entry in entries {
                    match entry {
                        LogEntry::Decided(entry) => {
                            let decided = self.apply_one(entry)?;
                            out.push(decided);
                        }
                        LogEntry::Snapshotted(s) => {
                            self.apply_snapshot(s.trimmed_idx, &s.snapshot, &mut out)?;
                        }
                        LogEntry::Trimmed(idx) => {
                            if idx > self.applied {
                                return Err(ReplicaError::Compacted(idx));
                            }
                        }
                        // Reconfiguration is handled by the service; an
                        // undecided entry cannot be in a decided suffix.
                        // Stop at either.
                        LogEntry::StopSign(..) | LogEntry::Undecided(_) => break,
                    }
                }
            }
        }
        let decided = self.paxos.get_decided_idx();
        if self.compact_after > 0
            && decided.saturating_sub(self.compacted_index()) > self.compact_after
        {
            self.compact()?;
        }
        Ok(out)
    }

    /// Brings the state to the end of a snapshot that stands for the first
    /// `idx` entries of the log.
    fn apply_snapshot(
        &mut self,
        idx: usize,
        snap: &CatalogSnapshot,
        out: &mut Vec<Decided>,
    ) -> Result<(), ReplicaError> {
        if snap.len() != idx {
            return Err(ReplicaError::BadSnapshot(format!(
                "it stands for {} entries, the log was compacted at {idx}",
                snap.len()
            )));
        }
        if idx <= self.applied {
            return Ok(());
        }
        if self.applied >= snap.folded() {
            // Apply the tail one by one: exact outcomes, tickets answered.
            let skip = self.applied - snap.folded();
            for e in &snap.tail()[skip..] {
                let decided = self.apply_one(e.clone())?;
                out.push(decided);
            }
            return Ok(());
        }
        let state = snap.state();
        // Our proposals that the snapshot covers (applied, or overtaken and
        // never to be applied): their outcome is not known here.
        let last = state.last_applied(self.pid);
        let covered: Vec<u64> = self
            .pending
            .iter()
            .filter(|(seq, p)| last.is_some_and(|l| (p.incarnation, **seq) <= l))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in covered {
            if let Some(p) = self.pending.remove(&seq) {
                self.lost.push(p.ticket);
            }
        }
        if let Some((inc, _)) = last {
            // The log knows a later incarnation of this node than ours (its
            // store was replaced): move past it.
            if inc > self.incarnation {
                self.incarnation = self.storage.raise_incarnation(inc + 1)?;
            }
        }
        tracing::info!(
            pid = self.pid,
            from = self.applied,
            to = idx,
            "catalog state loaded from a snapshot"
        );
        self.state = state;
        self.applied = idx;
        Ok(())
    }

    fn apply_one(&mut self, entry: CatalogEntry) -> Result<Decided, ReplicaError> {
        let index = self.applied;
        let outcome = self.state.apply(&entry);
        self.applied += 1;
        let mut ticket = None;
        let id = entry.id;
        let ours = id.node == self.pid
            && self
                .pending
                .get(&id.seq)
                .is_some_and(|p| p.incarnation == id.incarnation);
        if let Some(p) = ours.then(|| self.pending.remove(&id.seq)).flatten() {
            if outcome == Outcome::Stale {
                // Overtaken by a later proposal of ours: never applied, and
                // now it never will be. Propose it again. If the log knows a
                // later incarnation of this node than ours (its store was
                // replaced), move past it, or every proposal would be stale.
                if let Some((last, _)) = self.state.last_applied(self.pid) {
                    if last >= self.incarnation {
                        self.incarnation = self.storage.raise_incarnation(last + 1)?;
                    }
                }
                self.submit(p.ticket, p.cmd)?;
            } else {
                ticket = Some(p.ticket);
            }
        }
        Ok(Decided {
            index,
            entry,
            outcome,
            ticket,
        })
    }
}

/// Whether `storage` holds a promise for a ballot of node `pid` itself in
/// which that node never accepted anything: the ballot of an election it
/// started and did not see through to the accept phase before it stopped.
/// See "Restarting with a promise for our own ballot" in the module docs.
fn stranded_own_ballot(storage: &SharedStorage, pid: NodeId) -> bool {
    use omnipaxos::storage::Storage;
    let promise = storage.get_promise().ok().flatten();
    let accepted = storage.get_accepted_round().ok().flatten();
    promise.is_some_and(|p| p.pid == pid && accepted.is_none_or(|a| a < p))
}

#[cfg(test)]
mod tests;
