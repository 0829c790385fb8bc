use hotrepart_router::catalog::Span;

use super::*;
use crate::catalog::Applied;
use crate::command::Dsn;

/// Three replicas on a perfect network; messages go through serde_json, as
/// they will through a real transport.
struct Cluster {
    nodes: Vec<Option<Replica>>,
    storages: Vec<SharedStorage>,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        let storages: Vec<SharedStorage> = (0..n).map(|_| SharedStorage::new()).collect();
        let nodes = (1..=n)
            .map(|pid| Some(replica(pid, n, &storages[(pid - 1) as usize])))
            .collect();
        Cluster { nodes, storages }
    }

    fn node(&mut self, pid: u64) -> &mut Replica {
        self.nodes[(pid - 1) as usize]
            .as_mut()
            .expect("node is running")
    }

    /// One tick everywhere, then deliver every message (serialised).
    fn step(&mut self) -> Vec<(u64, Decided)> {
        let mut out = Vec::new();
        for r in self.nodes.iter_mut().flatten() {
            r.tick().expect("tick");
            out.extend(r.outgoing());
        }
        for m in out {
            let json = serde_json::to_string(&m).expect("serialize message");
            let m: Message = serde_json::from_str(&json).expect("deserialize message");
            let to = m.get_receiver();
            if let Some(r) = self.nodes[(to - 1) as usize].as_mut() {
                r.handle(m);
            }
        }
        let mut decided = Vec::new();
        for r in self.nodes.iter_mut().flatten() {
            let pid = r.pid();
            decided.extend(
                r.apply_decided()
                    .expect("apply")
                    .into_iter()
                    .map(|d| (pid, d)),
            );
        }
        decided
    }

    /// Steps until `pid` has an answer for `ticket`.
    fn answer(&mut self, pid: u64, ticket: Ticket) -> Decided {
        for _ in 0..1000 {
            for (from, d) in self.step() {
                if from == pid && d.ticket == Some(ticket) {
                    return d;
                }
            }
        }
        let status: Vec<_> = self.nodes.iter().flatten().map(Replica::status).collect();
        panic!("ticket {ticket:?} of node {pid} not answered in 1000 ticks: {status:#?}");
    }
}

fn replica(pid: u64, n: u64, storage: &SharedStorage) -> Replica {
    Replica::new(ReplicaConfig::new(pid, (1..=n).collect()), storage.clone()).expect("replica")
}

fn add(shard: &str) -> CatalogCommand {
    CatalogCommand::AddShard {
        shard: shard.into(),
        dsn: Dsn::from("host=x"),
    }
}

#[test]
fn proposals_from_any_node_are_applied_everywhere_in_one_order() {
    let mut c = Cluster::new(3);
    let t1 = c.node(2).propose(add("a")).expect("propose");
    let d = c.answer(2, t1);
    assert_eq!(d.index, 0);
    assert!(matches!(d.outcome, Outcome::Applied(Applied::Routing(ref s)) if s.epoch() == 1));

    let t2 = c.node(3).propose(add("a")).expect("propose");
    let d = c.answer(3, t2);
    assert_eq!(
        d.outcome,
        Outcome::Rejected(crate::Rejected::ShardExists("a".into()))
    );

    let t3 = c.node(1).propose(CatalogCommand::SplitRange {
        range: Span { lo: 0, hi: None },
        at: 100,
    });
    let d = c.answer(1, t3.expect("propose"));
    assert!(matches!(d.outcome, Outcome::Applied(_)));
    for _ in 0..50 {
        c.step();
    }
    let states: Vec<&StateMachine> = c.nodes.iter().flatten().map(Replica::state).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]));
    for r in c.nodes.iter().flatten() {
        assert_eq!(r.applied_index(), 3);
        assert_eq!(r.catalog().epoch(), 2);
        assert_eq!(r.pending(), 0);
        let s = r.status();
        assert_eq!((s.decided, s.applied, s.epoch), (3, 3, 2));
        assert!(s.leader.is_some());
    }
}

#[test]
fn a_restarted_replica_replays_its_log_and_keeps_up() {
    let mut c = Cluster::new(3);
    let t = c.node(1).propose(add("a")).expect("propose");
    c.answer(1, t);
    let t = c.node(1).propose(add("b")).expect("propose");
    c.answer(1, t);
    for _ in 0..20 {
        c.step();
    }
    let before = c.node(3).state().clone();

    // Crash node 3; the others go on.
    c.nodes[2] = None;
    let t = c.node(1).propose(add("c")).expect("propose");
    c.answer(1, t);

    // Restart it over the same storage: new incarnation, the catalog comes
    // back from the log, then it catches up.
    let r = replica(3, 3, &c.storages[2]);
    assert_eq!(r.incarnation(), 2);
    assert!(r.decided_index() >= 2);
    c.nodes[2] = Some(r);
    for peer in [1, 2] {
        c.node(peer).reconnected(3);
    }
    let replayed = c.node(3).apply_decided().expect("apply");
    assert!(replayed.len() >= 2);
    assert_eq!(*c.node(3).state(), before);
    let t = c.node(3).propose(add("d")).expect("propose");
    let d = c.answer(3, t);
    assert_eq!(d.entry.id.incarnation, 2);
    for _ in 0..50 {
        c.step();
    }
    let epochs: Vec<u64> = c
        .nodes
        .iter()
        .flatten()
        .map(|r| r.catalog().epoch())
        .collect();
    assert_eq!(epochs, [4, 4, 4]);
}

#[test]
fn a_duplicate_proposal_applies_once() {
    let mut sm = StateMachine::new();
    let entry = CatalogEntry {
        id: ProposalId {
            node: 1,
            incarnation: 1,
            seq: 1,
        },
        cmd: add("a"),
    };
    assert!(matches!(sm.apply(&entry), Outcome::Applied(_)));
    assert_eq!(sm.apply(&entry), Outcome::Stale);
    // An older proposal of the same node that arrives later: never applied.
    let mut later = entry.clone();
    later.id.seq = 3;
    later.cmd = add("b");
    assert!(matches!(sm.apply(&later), Outcome::Applied(_)));
    let mut overtaken = entry.clone();
    overtaken.id.seq = 2;
    overtaken.cmd = add("c");
    assert_eq!(sm.apply(&overtaken), Outcome::Stale);
    // A new incarnation starts over at seq 1.
    let mut restarted = entry;
    restarted.id.incarnation = 2;
    restarted.cmd = add("c");
    assert!(matches!(sm.apply(&restarted), Outcome::Applied(_)));
    // Other nodes are independent.
    let mut other = restarted.clone();
    other.id.node = 2;
    other.cmd = add("d");
    assert!(matches!(sm.apply(&other), Outcome::Applied(_)));
    assert_eq!(sm.catalog().epoch(), 4);
}

#[test]
fn bad_configuration_is_an_error() {
    let s = SharedStorage::new();
    assert!(matches!(
        Replica::new(ReplicaConfig::new(1, vec![1]), s.clone()),
        Err(ReplicaError::Config(_))
    ));
    assert!(matches!(
        Replica::new(ReplicaConfig::new(4, vec![1, 2, 3]), s.clone()),
        Err(ReplicaError::Config(_))
    ));
    let mut c = ReplicaConfig::new(1, vec![1, 2, 3]);
    c.retry_ticks = 0;
    assert!(matches!(Replica::new(c, s), Err(ReplicaError::Config(_))));
}

#[test]
fn a_node_whose_store_was_replaced_moves_past_its_old_incarnations() {
    let mut c = Cluster::new(3);
    // Node 1 lives three times; its third life has a proposal applied.
    for life in 2..=3 {
        c.nodes[0] = Some(replica(1, 3, &c.storages[0]));
        assert_eq!(c.node(1).incarnation(), life);
    }
    let t = c.node(1).propose(add("a")).expect("propose");
    assert_eq!(c.answer(1, t).entry.id.incarnation, 3);
    for _ in 0..20 {
        c.step();
    }
    // Its store is lost and it comes back empty (incarnation 1 again). (In
    // general that is not safe for Paxos — the node forgot its promises —
    // and should be a membership change; here nothing else fails.) Its first
    // proposal is stale against the log, so it is proposed again under
    // incarnation 4, and applied once.
    c.storages[0] = SharedStorage::new();
    c.nodes[0] = Some(replica(1, 3, &c.storages[0]));
    for peer in [2, 3] {
        c.node(peer).reconnected(1);
        // A node without a promise does not ask for the log by itself.
        c.node(1).reconnected(peer);
    }
    assert_eq!(c.node(1).incarnation(), 1);
    let t = c.node(1).propose(add("b")).expect("propose");
    let d = c.answer(1, t);
    assert!(matches!(d.outcome, Outcome::Applied(_)), "{d:?}");
    assert_eq!(d.entry.id.incarnation, 4);
    assert_eq!(c.node(1).incarnation(), 4);
    assert_eq!(c.storages[0].next_incarnation().expect("storage"), 5);
}

fn compacting(pid: u64, n: u64, storage: &SharedStorage, compact_after: usize) -> Replica {
    let mut config = ReplicaConfig::new(pid, (1..=n).collect());
    config.compact_after = compact_after;
    Replica::new(config, storage.clone()).expect("replica")
}

fn decision(i: u64) -> CatalogCommand {
    CatalogCommand::TxDecision {
        gid: format!("gid{i}"),
        commit: i.is_multiple_of(2),
        since: None,
    }
}

#[test]
fn the_log_is_compacted_and_restarts_and_laggards_catch_up_from_the_snapshot() {
    let mut c = Cluster::new(3);
    for pid in 1..=3 {
        c.nodes[(pid - 1) as usize] = Some(compacting(pid, 3, &c.storages[(pid - 1) as usize], 10));
    }
    let t = c.node(1).propose(add("a")).expect("propose");
    c.answer(1, t);
    for _ in 0..10 {
        c.step();
    }
    // Node 3 goes down; 60 entries are decided without it.
    c.nodes[2] = None;
    for i in 0..60 {
        let t = c.node(1 + (i % 2)).propose(decision(i)).expect("propose");
        let d = c.answer(1 + (i % 2), t);
        assert!(matches!(d.outcome, Outcome::Applied(_)), "{d:?}");
    }
    for _ in 0..10 {
        c.step();
    }
    for pid in [1, 2] {
        let s = c.node(pid).status();
        assert_eq!(s.applied, 61);
        assert!(s.compacted > 40, "{s:?}");
        assert!(s.log_len <= 11, "{s:?}");
        assert_eq!(s.compacted + s.log_len, 61);
        // What is stored: the log after the snapshot only.
        assert!(c.node(pid).read_decided(0).len() <= 11);
    }
    // Node 3 comes back with its disk (2 entries): the leader has compacted
    // far past that, so it catches up from a snapshot.
    c.nodes[2] = Some(compacting(3, 3, &c.storages[2], 10));
    for peer in [1, 2] {
        c.node(peer).reconnected(3);
    }
    let t = c.node(3).propose(decision(100)).expect("propose");
    let d = c.answer(3, t);
    assert!(matches!(d.outcome, Outcome::Applied(_)), "{d:?}");
    for _ in 0..50 {
        c.step();
    }
    let states: Vec<&StateMachine> = c.nodes.iter().flatten().map(Replica::state).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(states[0].catalog().decisions().count(), 61);
    for r in c.nodes.iter().flatten() {
        assert_eq!(r.applied_index(), 62);
    }
    // A restart from the compacted store loads the snapshot, then replays
    // the rest: the same state at the same index.
    let before = c.node(1).state().clone();
    c.nodes[0] = None;
    let mut r = compacting(1, 3, &c.storages[0], 10);
    assert!(r.compacted_index() > 0);
    r.apply_decided().expect("apply");
    assert_eq!(r.applied_index(), 62);
    assert_eq!(*r.state(), before);
}

#[test]
fn a_follower_behind_by_a_few_entries_applies_the_snapshot_tail_one_by_one() {
    let mut c = Cluster::new(3);
    for pid in 1..=3 {
        c.nodes[(pid - 1) as usize] = Some(compacting(pid, 3, &c.storages[(pid - 1) as usize], 5));
    }
    let t = c.node(1).propose(add("a")).expect("propose");
    c.answer(1, t);
    for _ in 0..10 {
        c.step();
    }
    c.nodes[2] = None;
    for i in 0..12 {
        let t = c.node(1).propose(decision(i)).expect("propose");
        c.answer(1, t);
    }
    c.nodes[2] = Some(compacting(3, 3, &c.storages[2], 5));
    for peer in [1, 2] {
        c.node(peer).reconnected(3);
    }
    // Node 3 replays its own log (1 entry), then gets the rest: a snapshot
    // whose tail reaches back to index 1, so every entry is applied (and
    // reported) one by one.
    let mut seen = Vec::new();
    for _ in 0..100 {
        for (pid, d) in c.step() {
            if pid == 3 {
                seen.push(d.index);
            }
        }
    }
    assert_eq!(seen, (0..13).collect::<Vec<_>>());
    let one = c.node(1).state().clone();
    assert_eq!(*c.node(3).state(), one);
}

/// The liveness defect of issue 17 (module docs, "Restarting with a promise
/// for our own ballot"): node 3 took over at the same round as the leader
/// the others elected (a higher ballot: its pid is higher), wrote its
/// promise, and stopped before its Prepare got out. Restarted, it must not
/// stay behind the others' (lower-ballot) leader.
#[test]
fn a_node_restarted_with_a_promise_for_its_own_unfinished_ballot_catches_up() {
    use omnipaxos::ballot_leader_election::Ballot;
    use omnipaxos::storage::Storage;

    let mut c = Cluster::new(3);
    let t = c.node(1).propose(add("a")).expect("propose");
    c.answer(1, t);

    // Node 3 (the first leader: highest initial ballot) stops; 1 and 2
    // elect a leader among themselves and decide more.
    c.nodes[2] = None;
    let t = c.node(1).propose(add("b")).expect("propose");
    c.answer(1, t);
    let status = c.node(1).status();
    let leader = status.leader.expect("nodes 1 and 2 have a leader");
    assert!(leader < 3 && status.accepting, "{status:?}");

    // What node 3's store holds after a takeover at the others' round that
    // never got out: a promise for its own ballot above their leader's, no
    // entry accepted in it.
    let mut store = c.storages[2].clone();
    let stranded = Ballot::with(1, status.round, 0, 3);
    store.set_promise(stranded).expect("set promise");
    let accepted = store.get_accepted_round().expect("read").expect("some");
    assert!(accepted < stranded);

    c.nodes[2] = Some(replica(3, 3, &c.storages[2]));
    for peer in [1, 2] {
        c.node(peer).reconnected(3);
    }
    // The others' leader keeps deciding; node 3 must follow, and its own
    // proposals must be decided.
    let t = c.node(1).propose(add("c")).expect("propose");
    c.answer(1, t);
    let t = c.node(3).propose(add("d")).expect("propose");
    let d = c.answer(3, t);
    assert!(matches!(d.outcome, Outcome::Applied(_)), "{d:?}");
    for _ in 0..50 {
        c.step();
    }
    let status: Vec<ReplicaStatus> = c.nodes.iter().flatten().map(Replica::status).collect();
    assert!(
        status
            .iter()
            .all(|s| s.applied == 4 && s.epoch == 4 && s.accepting),
        "{status:#?}"
    );
}

/// omnipaxos 0.2.4 counted an accepted StopSign twice in a log sync whose
/// common prefix reached the StopSign's slot (a new leader and a follower
/// that both accepted it): the follower's accepted index went one past its
/// log, its Accepted raised the leader's decided index past the leader's
/// log, and then neither saw the StopSign as decided (decided index ≠
/// accepted index): the membership change never finished on them, and a
/// later log sync from such a leader carried a snapshot that stood for
/// fewer entries than its index (the joining follower's panic in
/// `handle_acceptsync`). See routing-paxos/vendor/README.md.
#[test]
fn a_new_leader_after_a_stopsign_counts_it_once() {
    let mut c = Cluster::new(3);
    for shard in ["a", "b"] {
        let t = c.node(1).propose(add(shard)).expect("propose");
        c.answer(1, t);
    }
    let leader = c.node(1).leader().expect("a leader");
    c.node(leader)
        .reconfigure(vec![1, 2, 3], b"{}".to_vec())
        .expect("reconfigure");
    for _ in 0..200 {
        c.step();
        if c.nodes.iter().flatten().all(|r| r.stopped().is_some()) {
            break;
        }
    }
    let status: Vec<ReplicaStatus> = c.nodes.iter().flatten().map(Replica::status).collect();
    assert!(
        c.nodes.iter().flatten().all(|r| r.stopped().is_some()),
        "{status:#?}"
    );
    // Two entries and the StopSign.
    assert!(c
        .nodes
        .iter()
        .flatten()
        .all(|r| r.log_len() == 3 && r.decided_index() == 3));

    // The leader stops; the other two elect one of them, which syncs the
    // other: both accepted the StopSign in the same round.
    c.nodes[(leader - 1) as usize] = None;
    let others: Vec<u64> = (1..=3).filter(|p| *p != leader).collect();
    for _ in 0..300 {
        c.step();
        let leaders: Vec<Option<u64>> = others.iter().map(|p| c.node(*p).leader()).collect();
        if leaders.iter().all(|l| l.is_some_and(|l| l != leader)) {
            break;
        }
    }
    for _ in 0..100 {
        c.step();
    }
    for p in others {
        let r = c.node(p);
        let s = r.status();
        assert_ne!(s.leader, Some(leader), "{s:?}");
        assert_eq!(
            (r.log_len(), r.decided_index(), r.stopped().is_some()),
            (3, 3, true),
            "node {p}: {s:?}"
        );
    }
}

/// A log sync whose snapshot does not stand for the entries its index says
/// (a peer's bug, as omnipaxos' StopSign double count once made) is
/// dropped with an error log: omnipaxos panics when the store refuses a
/// write, and a peer's message must never stop a node. Paxos tolerates a
/// lost message: the others keep deciding.
#[test]
fn a_log_sync_with_a_snapshot_that_does_not_fit_is_dropped_not_a_panic() {
    use omnipaxos::messages::sequence_paxos::PaxosMsg;
    use omnipaxos::storage::SnapshotType;

    let mut c = Cluster::new(3);
    let t = c.node(1).propose(add("a")).expect("propose");
    c.answer(1, t);
    // Node 1 restarts: the leader syncs it with an AcceptSync, tampered
    // with on the way: a snapshot of no entry at index 1.
    c.nodes[0] = Some(replica(1, 3, &c.storages[0]));
    for peer in [2, 3] {
        c.node(peer).reconnected(1);
    }
    let mut tampered = 0;
    for _ in 0..300 {
        let mut out = Vec::new();
        for r in c.nodes.iter_mut().flatten() {
            r.tick().expect("tick");
            out.extend(r.outgoing());
        }
        for mut m in out {
            if let omnipaxos::messages::Message::SequencePaxos(p) = &mut m {
                if let PaxosMsg::AcceptSync(a) = &mut p.msg {
                    if p.to == 1 {
                        a.log_sync.decided_snapshot = Some(SnapshotType::Complete(
                            <CatalogSnapshot as omnipaxos::storage::Snapshot<CatalogEntry>>::create(
                                &[],
                            ),
                        ));
                        a.log_sync.sync_idx = 1;
                        tampered += 1;
                    }
                }
            }
            let to = m.get_receiver();
            if let Some(r) = c.nodes[(to - 1) as usize].as_mut() {
                r.handle(m);
            }
        }
        for r in c.nodes.iter_mut().flatten() {
            r.apply_decided().expect("apply");
        }
        if tampered > 0 {
            break;
        }
    }
    assert!(tampered > 0, "no AcceptSync to node 1 was seen");
    assert_eq!(c.node(1).compacted_index(), 0);
    // The others go on deciding.
    let t = c.node(2).propose(add("b")).expect("propose");
    c.answer(2, t);
}
