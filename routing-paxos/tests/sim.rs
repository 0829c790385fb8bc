//! Deterministic simulation of the replicated catalog.
//!
//! 3–5 [`Replica`]s over a simulated network, in virtual time (ticks), all
//! randomness from one seed. The network (default: [`NetMode::Fifo`], the
//! model of one TCP connection per pair of nodes) delays every message by a
//! random number of ticks, with occasional long spikes, so messages on
//! different links arrive in any order; it breaks links for a while (all
//! messages in flight on them are lost; both ends are told when the link is
//! back), partitions the cluster into two groups (or cuts one node off) and
//! heals it. Replicas crash (everything in flight to them is lost) and
//! restart with their storage: the same [`SharedStorage`], i.e. "with their
//! disk" (omnipaxos recovers its promise and log from it, the catalog is
//! rebuilt by replaying the decided log). Random replicas propose random
//! catalog commands, valid and invalid, against their own (possibly stale)
//! view of the catalog; at the start every node proposes a bootstrap seed.
//! Then all faults end (links and partitions heal, crashed nodes restart,
//! no more delay spikes; ordinary delays stay) and the cluster must make
//! progress.
//!
//! Checks, at every step:
//! * every replica applies the same entry, with the same outcome, at each
//!   log index (also after a restart, when it replays its log);
//! * replicas at the same applied index hold equal state;
//! * within one replica life, every accepted routing change has epoch + 1
//!   and nothing else changes the epoch; a restarted replica gets back at
//!   least the decided prefix it had before the crash;
//! * every proposal (ticket) is answered at most once, with the command that
//!   was proposed; exactly one of the competing bootstrap seeds wins;
//! * after healing, a new proposal is decided, and all replicas catch up,
//!   within `HEAL_BOUND` ticks; every proposal of a live replica is answered.
//! * leases ([`Leases`], driven with virtual time: a tick is 10 ms, every
//!   node's clock runs at its own rate within ±1 %): no node holds a valid
//!   lease while it has not applied an entry that was decided more than
//!   lease + margin ago (decided: first seen decided by any replica); after
//!   healing, every node gets a lease within a few lease periods. Lease
//!   traffic has its own random stream and its own FIFO per link (the rule
//!   needs no ordering against omnipaxos messages), so adding it changed no
//!   seed's omnipaxos run.
//!
//! Environment:
//! * `HOTREPART_SIM_SEED=N` runs seed N only (replay a failure);
//! * `HOTREPART_SIM_SECS=S` wall-clock budget for random seeds after the
//!   fixed ones (default 20);
//! * `HOTREPART_SIM_SEEDS=K` at most K seeds in all;
//! * `HOTREPART_SIM_NET=fifo|oneway` runs every seed with that network
//!   (default: the fixed seeds with Fifo, then random seeds alternating
//!   Fifo and OneWay);
//! * `HOTREPART_SIM_NET=chaos` runs every seed with the Chaos network
//!   (messages reordered on one link, lost one by one). omnipaxos 0.2.4 does
//!   not tolerate that (a debug assertion in omnipaxos fires; with
//!   `--config 'profile.dev.package.omnipaxos.debug-assertions=false'` the
//!   logs can diverge and followers can get stuck), so it is an exploration
//!   mode, not part of the test: the default is Fifo, the model of the TCP
//!   transport;
//! * `HOTREPART_SIM_COMPACT=N` compacts the log every N entries (0:
//!   never; default: 5–44, from the seed);
//! * `HOTREPART_SIM_TRACE=1` prints every protocol message and applied entry
//!   (use with one seed).
//!
//! * `CI=true`: the seeds after the fixed ones come from a fixed stream,
//!   at most 200 (the same every CI run); otherwise they are random.
//!
//! Known issue (liveness only, found by random seeds, about one seed in
//! 700; the same on the commit before log compaction and membership
//! changes): a node restarted with a promise for its own higher ballot,
//! which never won a majority, is never moved past by the others, so the
//! check "all replicas catch up after healing" fails. omnipaxos 0.2.4's
//! ballot leader election does not raise the others' ballot above it.
//! Replay: `HOTREPART_SIM_NET=oneway HOTREPART_SIM_SEED=968891404810790783`,
//! `HOTREPART_SIM_NET=oneway HOTREPART_SIM_SEED=641761817930011128`,
//! `HOTREPART_SIM_NET=fifo HOTREPART_SIM_SEED=5546384697825125964`.
//!
//! Every failure message names the seed and the tick.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hotrepart_router::catalog::{KeyType, RoutingFunction, Span};
use hotrepart_routing_paxos::command::{CatalogSeed, Dsn, RangeSpec, ShardSpec, TableSpec};
use hotrepart_routing_paxos::{
    Applied, Catalog, CatalogCommand, CatalogEntry, FreezeId, LeaseMsg, Leases, Message, Outcome,
    Replica, ReplicaConfig, SharedStorage, StateMachine, Ticket,
};

/// Seeds always run, before the time-bounded random ones.
const FIXED_SEEDS: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 42, 1234, 0xDEAD_BEEF, u64::MAX];
/// Ticks after healing within which a new proposal must be decided and all
/// replicas must have caught up.
const HEAL_BOUND: u64 = 500;
/// Virtual milliseconds per tick (the service's default tick).
const TICK_MS: u64 = 10;
/// Lease duration in the simulation (short, so leases come and go often).
const LEASE_MS: u64 = 600;

/// splitmix64: small, fast, good enough, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// How the network treats one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetMode {
    /// Like TCP, the transport the nodes will use: each link delivers in
    /// order; messages are lost only when a link breaks (then everything in
    /// flight on it is lost, and both ends are told when it comes back).
    /// Messages on different links interleave in any order.
    Fifo,
    /// The model of the TCP transport as built (`net.rs`: one connection
    /// per direction): like Fifo, but a link break cuts one direction only
    /// while the other keeps delivering; both ends are told when it comes
    /// back. The test alternates it with Fifo for the random seeds.
    OneWay,
    /// Harsher than TCP: any message may be lost silently or overtake
    /// another on the same link.
    Chaos,
}

/// The knobs of one seed's run, drawn from the seed.
#[derive(Debug, Clone)]
struct Params {
    mode: NetMode,
    nodes: u64,
    chaos_ticks: u64,
    /// Per-message drop probability, per mille (Chaos mode only).
    drop_pm: u64,
    /// Per-tick chance (per mille) that a link breaks for a while.
    break_pm: u64,
    /// Messages take 1..=max_delay ticks.
    max_delay: u64,
    /// Per-message chance (per mille) of a long delay (20–80 ticks).
    spike_pm: u64,
    /// Per-tick chance (per mille) of each fault kind.
    crash_pm: u64,
    restart_pm: u64,
    partition_pm: u64,
    heal_pm: u64,
    /// Per-tick, per-node chance (per mille) of a proposal.
    propose_pm: u64,
}

impl Params {
    fn draw(rng: &mut Rng, mode: NetMode) -> Params {
        Params {
            mode,
            nodes: 3 + rng.below(3),
            chaos_ticks: 1000 + rng.below(2000),
            drop_pm: rng.below(150),
            break_pm: rng.below(20),
            max_delay: 1 + rng.below(6),
            spike_pm: rng.below(20),
            crash_pm: rng.below(6),
            restart_pm: 5 + rng.below(30),
            partition_pm: rng.below(6),
            heal_pm: 5 + rng.below(30),
            propose_pm: 10 + rng.below(60),
        }
    }
}

/// A lease message on its way.
struct LeaseFlight {
    at: u64,
    order: u64,
    from: u64,
    to: u64,
    msg: LeaseMsg,
}

struct InFlight {
    at: u64,
    /// Random tie-break among messages due at the same tick.
    order: u64,
    from: u64,
    to: u64,
    msg: Message,
}

struct Node {
    pid: u64,
    storage: SharedStorage,
    replica: Option<Replica>,
    /// Partition group; nodes talk only within a group.
    group: u64,
    /// Epoch of the last applied entry in this life of the replica.
    epoch: u64,
    /// Decided index when it crashed.
    decided_at_crash: usize,
    /// This life's unanswered proposals.
    tickets: BTreeMap<Ticket, CatalogCommand>,
    answered: BTreeSet<Ticket>,
    /// This life's lease state (a restart starts without a lease).
    leases: Option<Leases>,
    /// The node's clock rate, per mille of virtual time.
    clock_pm: u64,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    ticks: u64,
    entries: u64,
    accepted: u64,
    rejected: u64,
    stale: u64,
    crashes: u64,
    partitions: u64,
    messages: u64,
    dropped: u64,
    heal_ticks_max: u64,
    /// Node-ticks with a valid lease.
    leased: u64,
    /// Proposals whose outcome was folded into a snapshot.
    lost: u64,
    /// Catalog states loaded from a snapshot (not applied entry by entry).
    snapshot_loads: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    p: Params,
    now: u64,
    nodes: Vec<Node>,
    net: Vec<InFlight>,
    /// The log as first applied by any replica: entry and outcome per index.
    log: Vec<(CatalogEntry, Outcome)>,
    /// State after applying index i, as first computed.
    states: Vec<StateMachine>,
    /// Drop probability now (0 after healing).
    drop_pm: u64,
    /// Delay-spike probability now (0 after healing).
    spike_pm: u64,
    /// Broken links (pid pair, smaller first) and the tick they come back.
    broken: BTreeMap<(u64, u64), u64>,
    /// Delivery time of the last message per directed link (Fifo mode).
    last_at: BTreeMap<(u64, u64), u64>,
    sent: u64,
    /// Print protocol messages and applied entries (HOTREPART_SIM_TRACE).
    trace: bool,
    stats: Stats,
    /// Randomness of the lease traffic, apart from `rng`.
    lease_rng: Rng,
    lease_net: Vec<LeaseFlight>,
    lease_last_at: BTreeMap<(u64, u64), u64>,
    /// Tick at which each log index was first seen decided.
    decided_at: Vec<u64>,
}

impl Sim {
    fn new(seed: u64, mode: NetMode) -> Sim {
        let mut rng = Rng(seed);
        let p = Params::draw(&mut rng, mode);
        let pids: Vec<u64> = (1..=p.nodes).collect();
        let mut sim = Sim {
            seed,
            drop_pm: p.drop_pm,
            spike_pm: p.spike_pm,
            p,
            rng,
            now: 0,
            nodes: Vec::new(),
            net: Vec::new(),
            log: Vec::new(),
            states: Vec::new(),
            broken: BTreeMap::new(),
            last_at: BTreeMap::new(),
            sent: 0,
            trace: std::env::var_os("HOTREPART_SIM_TRACE").is_some(),
            stats: Stats::default(),
            lease_rng: Rng(seed ^ 0x1EA5_E5EE_D000_0001),
            lease_net: Vec::new(),
            lease_last_at: BTreeMap::new(),
            decided_at: Vec::new(),
        };
        for &pid in &pids {
            let storage = SharedStorage::new();
            let replica = sim.start(pid, &storage);
            sim.nodes.push(Node {
                pid,
                storage,
                replica: Some(replica),
                group: 0,
                epoch: 0,
                decided_at_crash: 0,
                tickets: BTreeMap::new(),
                answered: BTreeSet::new(),
                leases: Some(sim.new_leases(pid)),
                clock_pm: 990 + sim.lease_rng.below(21),
            });
        }
        sim
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "seed {} tick {}: {what}\n  params {:?}\n  replay: HOTREPART_SIM_SEED={} cargo nextest run -p hotrepart-routing-paxos --test sim",
            self.seed, self.now, self.p, self.seed
        )
    }

    fn start(&self, pid: u64, storage: &SharedStorage) -> Replica {
        let pids: Vec<u64> = (1..=self.p.nodes).collect();
        let mut config = ReplicaConfig::new(pid, pids);
        config.compact_after = self.compact_after();
        Replica::new(config, storage.clone())
            .unwrap_or_else(|e| self.fail(format!("node {pid} does not start: {e}")))
    }

    /// The compaction threshold: small, so that every run compacts often
    /// and lagging or restarted replicas catch up from snapshots. Derived
    /// from the seed, not drawn (the draws stay as they were).
    fn compact_after(&self) -> usize {
        match env_u64("HOTREPART_SIM_COMPACT") {
            Some(n) => n as usize,
            None => 5 + (self.seed % 40) as usize,
        }
    }

    fn new_leases(&self, pid: u64) -> Leases {
        Leases::new((1..=self.p.nodes).filter(|p| *p != pid), LEASE_MS)
    }

    /// Node `i`'s clock, in its milliseconds.
    fn local_ms(&self, i: usize) -> u64 {
        self.now * TICK_MS * self.nodes[i].clock_pm / 1000
    }

    /// The key of the link from `a` to `b` in `broken`: the pair, or the
    /// direction (OneWay).
    fn link_key(&self, a: u64, b: u64) -> (u64, u64) {
        if self.p.mode == NetMode::OneWay {
            (a, b)
        } else {
            (a.min(b), a.max(b))
        }
    }

    fn idx(&self, pid: u64) -> usize {
        (pid - 1) as usize
    }

    fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.replica.is_some())
            .map(|n| n.pid)
            .collect()
    }

    fn linked(&self, a: u64, b: u64) -> bool {
        self.nodes[self.idx(a)].group == self.nodes[self.idx(b)].group
            && !self.broken.contains_key(&self.link_key(a, b))
    }

    /// Both ends of a link that came back learn of it (a new connection).
    fn reconnect(&mut self, a: u64, b: u64) {
        for (x, y) in [(a, b), (b, a)] {
            let i = self.idx(x);
            if let Some(r) = self.nodes[i].replica.as_mut() {
                r.reconnected(y);
            }
        }
    }

    /// Loses everything in flight on links that are down now.
    fn purge(&mut self) {
        let before = self.net.len();
        let groups: Vec<u64> = self.nodes.iter().map(|n| n.group).collect();
        let broken = &self.broken;
        let one_way = self.p.mode == NetMode::OneWay;
        let key = |a: u64, b: u64| {
            if one_way {
                (a, b)
            } else {
                (a.min(b), a.max(b))
            }
        };
        self.net.retain(|m| {
            groups[(m.from - 1) as usize] == groups[(m.to - 1) as usize]
                && !broken.contains_key(&key(m.from, m.to))
        });
        self.stats.dropped += (before - self.net.len()) as u64;
        self.lease_net.retain(|m| {
            groups[(m.from - 1) as usize] == groups[(m.to - 1) as usize]
                && !broken.contains_key(&key(m.from, m.to))
        });
    }

    fn run(mut self) -> Stats {
        // Every node seeds the catalog at start, as nodes do when a cluster
        // is first created; one seed must win.
        for i in 0..self.nodes.len() {
            let cmd = CatalogCommand::Bootstrap(seed_catalog(self.nodes[i].pid));
            self.propose(i, cmd);
        }
        while self.now < self.p.chaos_ticks {
            self.faults();
            self.step(true);
        }
        self.heal();
        let heal_start = self.now;
        let target = self.live()[self.rng.below(self.p.nodes) as usize];
        let i = self.idx(target);
        let marker = CatalogCommand::TxDecision {
            gid: format!("progress-{}", self.seed),
            commit: true,
        };
        let ticket = self.propose(i, marker);
        loop {
            if self.p.mode == NetMode::Chaos && self.now - heal_start > HEAL_BOUND {
                // omnipaxos promises no progress when one link reorders
                // (see NetMode::Chaos): check agreement only.
                self.final_checks();
                self.stats.ticks = self.now;
                return self.stats;
            }
            if self.now - heal_start > HEAL_BOUND {
                let states: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("{:?}", n.replica.as_ref().map(Replica::status)))
                    .collect();
                self.fail(format!(
                    "no progress within {HEAL_BOUND} ticks after healing (marker answered: {}):\n  {}",
                    self.nodes[i].answered.contains(&ticket),
                    states.join("\n  ")
                ));
            }
            self.step(false);
            if self.nodes[i].answered.contains(&ticket) && self.converged() {
                break;
            }
        }
        self.stats.heal_ticks_max = self.now - heal_start;
        self.final_checks();
        self.leases_come_back();
        // A late copy of a re-proposed command (stale, a no-op) may be
        // decided while the leases come back: let everyone learn it.
        let settle = self.now;
        while self.now - settle < HEAL_BOUND
            && !self.nodes.iter().all(|n| {
                n.replica.as_ref().is_some_and(|r| {
                    r.decided_index() == self.log.len() && r.applied_index() == self.log.len()
                })
            })
        {
            self.step(false);
        }
        // All have caught up: their logs are the whole log.
        for n in &self.nodes {
            let len = n.replica.as_ref().map_or(0, Replica::decided_index);
            if len != self.log.len() {
                self.fail(format!(
                    "node {} holds {len} decided entries, the log has {}",
                    n.pid,
                    self.log.len()
                ));
            }
        }
        self.stats.ticks = self.now;
        self.stats
    }

    /// All replicas applied the same number of entries, which is everything
    /// decided, and no proposal is unanswered.
    fn converged(&self) -> bool {
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

    fn final_checks(&self) {
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

    fn propose(&mut self, i: usize, cmd: CatalogCommand) -> Ticket {
        let Some(r) = self.nodes[i].replica.as_mut() else {
            self.fail("proposing on a crashed node")
        };
        match r.propose(cmd.clone()) {
            Ok(t) => {
                self.nodes[i].tickets.insert(t, cmd);
                t
            }
            Err(e) => self.fail(format!("propose failed: {e}")),
        }
    }

    fn faults(&mut self) {
        let live = self.live();
        if self.rng.chance(self.p.crash_pm) && !live.is_empty() {
            let pid = *self.rng.pick(&live);
            self.crash(pid);
        }
        let down: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.replica.is_none())
            .map(|n| n.pid)
            .collect();
        if !down.is_empty() && self.rng.chance(self.p.restart_pm) {
            let pid = *self.rng.pick(&down);
            self.restart(pid);
        }
        if self.rng.chance(self.p.break_pm) {
            let a = 1 + self.rng.below(self.p.nodes);
            let b = 1 + self.rng.below(self.p.nodes);
            if a != b {
                let until = self.now + 1 + self.rng.below(50);
                let key = self.link_key(a, b);
                self.broken.insert(key, until);
                self.purge();
            }
        }
        let now = self.now;
        let restored: Vec<(u64, u64)> = self
            .broken
            .iter()
            .filter(|(_, &until)| until <= now)
            .map(|(&k, _)| k)
            .collect();
        for (a, b) in restored {
            self.broken.remove(&(a, b));
            if self.linked(a, b) {
                self.reconnect(a, b);
            }
        }
        let partitioned = self.nodes.iter().any(|n| n.group != 0);
        if !partitioned && self.rng.chance(self.p.partition_pm) {
            self.stats.partitions += 1;
            if self.rng.chance(500) {
                // Cut one node off.
                let pid = 1 + self.rng.below(self.p.nodes);
                let i = self.idx(pid);
                self.nodes[i].group = 1;
            } else {
                for i in 0..self.nodes.len() {
                    self.nodes[i].group = self.rng.below(2);
                }
            }
            self.purge();
        } else if partitioned && self.rng.chance(self.p.heal_pm) {
            self.heal_partition();
        }
    }

    fn crash(&mut self, pid: u64) {
        self.stats.crashes += 1;
        let i = self.idx(pid);
        let n = &mut self.nodes[i];
        n.decided_at_crash = n.replica.as_ref().map_or(0, Replica::decided_index);
        n.replica = None;
        // Proposals die with the node that made them.
        n.tickets.clear();
        n.epoch = 0;
        n.leases = None;
        // Whatever was on its way to the node is lost with the connection.
        self.net.retain(|m| m.to != pid);
        self.lease_net.retain(|m| m.to != pid);
    }

    fn restart(&mut self, pid: u64) {
        let i = self.idx(pid);
        let storage = self.nodes[i].storage.clone();
        let replica = self.start(pid, &storage);
        if replica.decided_index() < self.nodes[i].decided_at_crash {
            self.fail(format!(
                "node {pid} restarted with decided index {} < {} before the crash",
                replica.decided_index(),
                self.nodes[i].decided_at_crash
            ));
        }
        self.nodes[i].replica = Some(replica);
        self.nodes[i].leases = Some(self.new_leases(pid));
        // Its peers see the connection come back.
        for j in 0..self.nodes.len() {
            let peer = self.nodes[j].pid;
            if j != i && self.linked(pid, peer) {
                if let Some(r) = self.nodes[j].replica.as_mut() {
                    r.reconnected(pid);
                }
            }
        }
    }

    fn heal_partition(&mut self) {
        let groups: Vec<u64> = self.nodes.iter().map(|n| n.group).collect();
        for n in &mut self.nodes {
            n.group = 0;
        }
        for a in 1..=self.p.nodes {
            for b in a + 1..=self.p.nodes {
                let (ga, gb) = (groups[self.idx(a)], groups[self.idx(b)]);
                // (OneWay: either direction that works now had lost what
                // was in flight.)
                if ga != gb && (self.linked(a, b) || self.linked(b, a)) {
                    self.reconnect(a, b);
                }
            }
        }
    }

    /// Ends all faults: links and partitions heal, crashed nodes restart, no
    /// more drops or delay spikes. Delays of 1..=max_delay ticks stay: below
    /// the election round (10 ticks), as progress needs.
    fn heal(&mut self) {
        let broken: Vec<(u64, u64)> = self.broken.keys().copied().collect();
        self.broken.clear();
        for (a, b) in broken {
            self.reconnect(a, b);
        }
        self.heal_partition();
        for pid in 1..=self.p.nodes {
            if self.nodes[self.idx(pid)].replica.is_none() {
                self.restart(pid);
            }
        }
        self.drop_pm = 0;
        self.spike_pm = 0;
    }

    fn step(&mut self, chaos: bool) {
        self.now += 1;
        // Deliver what is due, in a random order among equal times.
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.order));
        for m in due {
            let linked = self.linked(m.from, m.to);
            let to = self.idx(m.to);
            if self.trace {
                trace_message(now, &m);
            }
            match self.nodes[to].replica.as_mut() {
                Some(r) if linked => r.handle(m.msg),
                _ => self.stats.dropped += 1,
            }
        }
        self.deliver_leases();
        // Every live node: tick, maybe propose, apply, send.
        for i in 0..self.nodes.len() {
            let Some(r) = self.nodes[i].replica.as_mut() else {
                continue;
            };
            if let Err(e) = r.tick() {
                self.fail(format!("node {} tick: {e}", i + 1));
            }
            if chaos && self.rng.chance(self.p.propose_pm) {
                let view = r.catalog().clone();
                let cmd = random_command(&mut self.rng, &view);
                self.propose(i, cmd);
            }
            self.apply(i);
            self.send(i);
            self.tick_leases(i);
        }
        self.check_leases();
    }

    fn deliver_leases(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.lease_net.len() {
            if self.lease_net[i].at <= now {
                due.push(self.lease_net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.order));
        let mut replies = Vec::new();
        for m in due {
            if !self.linked(m.from, m.to) {
                continue;
            }
            let to = self.idx(m.to);
            let local = self.local_ms(to);
            let n = &mut self.nodes[to];
            let (Some(r), Some(l)) = (n.replica.as_ref(), n.leases.as_mut()) else {
                continue;
            };
            if let Some(reply) = l.handle(local, m.from, m.msg, r.applied_index(), r.log_len()) {
                replies.push((m.to, m.from, reply));
            }
        }
        for (from, to, msg) in replies {
            self.send_lease(from, to, msg);
        }
    }

    fn tick_leases(&mut self, i: usize) {
        let local = self.local_ms(i);
        let n = &mut self.nodes[i];
        let pid = n.pid;
        let (Some(r), Some(l)) = (n.replica.as_ref(), n.leases.as_mut()) else {
            return;
        };
        let pings = l.tick(local, r.applied_index(), r.log_len());
        for (to, msg) in pings {
            self.send_lease(pid, to, msg);
        }
    }

    /// Lease traffic: same links, same kinds of delay and loss as the
    /// omnipaxos messages, drawn from `lease_rng`.
    fn send_lease(&mut self, from: u64, to: u64, msg: LeaseMsg) {
        let lost = match self.p.mode {
            NetMode::Fifo | NetMode::OneWay => false,
            NetMode::Chaos => self.lease_rng.chance(self.drop_pm),
        };
        if lost || !self.linked(from, to) {
            return;
        }
        let delay = if self.lease_rng.chance(self.spike_pm) {
            20 + self.lease_rng.below(60)
        } else {
            1 + self.lease_rng.below(self.p.max_delay)
        };
        let last = self.lease_last_at.entry((from, to)).or_insert(0);
        let at = (self.now + delay).max(*last);
        *last = at;
        self.sent += 1;
        let order = self.sent;
        self.lease_net.push(LeaseFlight {
            at,
            order,
            from,
            to,
            msg,
        });
    }

    /// No node holds a valid lease while it has not applied an entry that
    /// was decided more than lease + margin ago.
    fn check_leases(&mut self) {
        let now = self.now;
        for n in &self.nodes {
            if let Some(r) = &n.replica {
                while self.decided_at.len() < r.decided_index() {
                    self.decided_at.push(now);
                }
            }
        }
        for i in 0..self.nodes.len() {
            let local = self.local_ms(i);
            let n = &self.nodes[i];
            let (Some(r), Some(l)) = (&n.replica, &n.leases) else {
                continue;
            };
            if !l.is_valid(local) {
                continue;
            }
            self.stats.leased += 1;
            let applied = r.applied_index();
            if let Some(&t) = self.decided_at.get(applied) {
                if (now - t) * TICK_MS > LEASE_MS + l.margin_ms() {
                    self.fail(format!(
                        "node {} holds a lease (until {} on its clock, now {local}) without index {applied}, decided at t{t}",
                        n.pid,
                        l.valid_until()
                    ));
                }
            }
        }
    }

    /// After healing, every node gets a lease within a few lease periods.
    fn leases_come_back(&mut self) {
        let start = self.now;
        while !(0..self.nodes.len()).all(|i| {
            self.nodes[i]
                .leases
                .as_ref()
                .is_some_and(|l| l.is_valid(self.local_ms(i)))
        }) {
            if (self.now - start) * TICK_MS > 3 * LEASE_MS {
                self.fail("not every node holds a lease after healing");
            }
            self.step(false);
        }
    }

    fn send(&mut self, i: usize) {
        let Some(r) = self.nodes[i].replica.as_mut() else {
            return;
        };
        let from = r.pid();
        for msg in r.outgoing() {
            self.stats.messages += 1;
            let to = msg.get_receiver();
            let lost = match self.p.mode {
                NetMode::Fifo | NetMode::OneWay => false,
                NetMode::Chaos => self.rng.chance(self.drop_pm),
            };
            if lost || !self.linked(from, to) {
                self.stats.dropped += 1;
                continue;
            }
            let delay = if self.rng.chance(self.spike_pm) {
                20 + self.rng.below(60)
            } else {
                1 + self.rng.below(self.p.max_delay)
            };
            let mut at = self.now + delay;
            let order = match self.p.mode {
                NetMode::Fifo | NetMode::OneWay => {
                    // Never before the previous message on this link; ties
                    // go in sending order.
                    let last = self.last_at.entry((from, to)).or_insert(0);
                    at = at.max(*last);
                    *last = at;
                    self.sent += 1;
                    self.sent
                }
                NetMode::Chaos => self.rng.next(),
            };
            self.net.push(InFlight {
                at,
                order,
                from,
                to,
                msg,
            });
        }
    }

    fn apply(&mut self, i: usize) {
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
    fn jumped(&mut self, pid: u64, from: usize, to: usize) -> u64 {
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

/// One line per delivered protocol message (heartbeats left out), entries
/// counted rather than printed.
fn trace_message(now: u64, m: &InFlight) {
    let text = format!("{:?}", m.msg);
    if text.starts_with("BLE") {
        return;
    }
    let entries = text.matches("CatalogEntry").count();
    let text = text.replace("SequencePaxos(PaxosMessage { ", "");
    let cut = text.find("CatalogEntry").unwrap_or(text.len()).min(260);
    eprintln!(
        "t{now} {}->{} {} [{entries} entries]",
        m.from,
        m.to,
        &text[..cut]
    );
}

/// Extends `states` (the state after each index of `log`) up to `upto`
/// entries by applying the log to a separate state machine.
fn replay_states(log: &[(CatalogEntry, Outcome)], states: &mut Vec<StateMachine>, upto: usize) {
    let mut sm = states.last().cloned().unwrap_or_default();
    while states.len() < upto {
        let (entry, _) = &log[states.len()];
        sm.apply(entry);
        states.push(sm.clone());
    }
}

fn seed_catalog(pid: u64) -> CatalogSeed {
    const HALF: u64 = 1 << 63;
    CatalogSeed {
        shards: (0..2)
            .map(|s| ShardSpec {
                shard: format!("s{s}"),
                dsn: Dsn(format!("host=s{s} seeded_by={pid}")),
            })
            .collect(),
        home_shard: "s0".into(),
        sharded: vec![TableSpec {
            table: "t0".into(),
            key_column: "id".into(),
            key_type: KeyType::Int8,
            function: RoutingFunction::PgHash { seed: 0 },
        }],
        reference: Vec::new(),
        functions: Vec::new(),
        ranges: vec![
            RangeSpec {
                range: Span {
                    lo: 0,
                    hi: Some(HALF),
                },
                read_owner: "s0".into(),
                write_owner: "s0".into(),
            },
            RangeSpec {
                range: Span { lo: HALF, hi: None },
                read_owner: "s1".into(),
                write_owner: "s1".into(),
            },
        ],
    }
}

/// A random command, mostly sensible against `view` (the proposer's own,
/// possibly stale, catalog), sometimes not.
fn random_command(rng: &mut Rng, view: &Catalog) -> CatalogCommand {
    let shard = |rng: &mut Rng| format!("s{}", rng.below(6));
    let spans: Vec<Span> = view
        .snapshot()
        .map(|s| s.ranges().iter().map(|r| r.span()).collect())
        .unwrap_or_default();
    let span = |rng: &mut Rng| -> Span {
        if spans.is_empty() || rng.chance(50) {
            let lo = rng.next();
            Span {
                lo,
                hi: lo.checked_add(1 + rng.below(1000)),
            }
        } else {
            *rng.pick(&spans)
        }
    };
    match rng.below(100) {
        0..=7 => CatalogCommand::AddShard {
            shard: shard(rng),
            dsn: Dsn::from("host=x"),
        },
        8..=12 => CatalogCommand::RemoveShard { shard: shard(rng) },
        13..=17 => CatalogCommand::DeclareSharded(TableSpec {
            table: format!("t{}", rng.below(8)),
            key_column: "id".into(),
            key_type: *rng.pick(&KeyType::ALL),
            function: RoutingFunction::PgHash { seed: rng.below(3) },
        }),
        18..=20 => CatalogCommand::DeclareReference {
            table: format!("t{}", rng.below(8)),
        },
        21..=44 => {
            let range = span(rng);
            let at = if rng.chance(850) && range.len() > 1 {
                (u128::from(range.lo) + 1 + u128::from(rng.next()) % (range.len() - 1)) as u64
            } else {
                rng.next()
            };
            CatalogCommand::SplitRange { range, at }
        }
        45..=64 => CatalogCommand::AssignRange {
            range: span(rng),
            read_owner: shard(rng),
            write_owner: shard(rng),
        },
        65..=74 => CatalogCommand::FreezeRange {
            range: span(rng),
            freeze: FreezeId(rng.below(4)),
        },
        75..=84 => {
            let range = span(rng);
            let freeze = match view.freeze(range.lo) {
                Some(f) if rng.chance(800) => f.id,
                _ => FreezeId(rng.below(4)),
            };
            CatalogCommand::UnfreezeRange {
                range,
                freeze,
                operator: false,
            }
        }
        85..=89 if !spans.is_empty() => CatalogCommand::Bootstrap(seed_catalog(0)),
        _ => CatalogCommand::TxDecision {
            gid: format!("g{}", rng.below(40)),
            commit: rng.chance(500),
        },
    }
}

/// The seed stream of CI runs, and how many seeds a CI run checks at most
/// (all of them pass).
const CI_STREAM: u64 = 0x0dd5_eed5_0f0c_1a55;
const CI_SEEDS: u64 = 200;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

#[test]
fn simulated_cluster_agrees_and_makes_progress() {
    let started = Instant::now();
    // Unset: the fixed seeds with Fifo, then random seeds alternating
    // between Fifo and OneWay.
    let forced = match std::env::var("HOTREPART_SIM_NET").as_deref() {
        Err(_) => None,
        Ok("fifo") => Some(NetMode::Fifo),
        Ok("oneway") => Some(NetMode::OneWay),
        Ok("chaos") => Some(NetMode::Chaos),
        Ok(other) => panic!("HOTREPART_SIM_NET={other:?}: expected fifo, oneway or chaos"),
    };
    let mode = forced.unwrap_or(NetMode::Fifo);
    let mut total = Stats::default();
    let mut seeds = 0u64;
    let run = |seed: u64, mode: NetMode, total: &mut Stats| {
        // A panic inside omnipaxos does not know the seed: add it.
        let s = match std::panic::catch_unwind(|| Sim::new(seed, mode).run()) {
            Ok(s) => s,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let net = format!("{mode:?}").to_lowercase();
                panic!(
                    "seed {seed} ({mode:?} network) failed: {msg}\n  replay: HOTREPART_SIM_NET={net} HOTREPART_SIM_SEED={seed} cargo nextest run -p hotrepart-routing-paxos --test sim"
                );
            }
        };
        total.ticks += s.ticks;
        total.entries += s.entries;
        total.accepted += s.accepted;
        total.rejected += s.rejected;
        total.stale += s.stale;
        total.crashes += s.crashes;
        total.partitions += s.partitions;
        total.messages += s.messages;
        total.dropped += s.dropped;
        total.heal_ticks_max = total.heal_ticks_max.max(s.heal_ticks_max);
        total.leased += s.leased;
        total.lost += s.lost;
        total.snapshot_loads += s.snapshot_loads;
    };
    if let Some(seed) = env_u64("HOTREPART_SIM_SEED") {
        run(seed, mode, &mut total);
        seeds = 1;
    } else {
        // In CI (`CI=true`) the further seeds come from a fixed stream and
        // are capped, so every CI run checks the same seeds: a red CI means
        // a change broke something, not that a fresh seed met the known
        // liveness issue (module docs). Elsewhere they are random.
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let budget = Duration::from_secs(env_u64("HOTREPART_SIM_SECS").unwrap_or(20));
        let max_seeds =
            env_u64("HOTREPART_SIM_SEEDS").unwrap_or(if ci { CI_SEEDS } else { u64::MAX });
        for seed in FIXED_SEEDS {
            if seeds >= max_seeds {
                break;
            }
            run(seed, mode, &mut total);
            seeds += 1;
        }
        let mut gen = Rng(if ci {
            CI_STREAM
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        while started.elapsed() < budget && seeds < max_seeds {
            let mode = forced.unwrap_or([NetMode::Fifo, NetMode::OneWay][(seeds & 1) as usize]);
            run(gen.next(), mode, &mut total);
            seeds += 1;
        }
    }
    eprintln!(
        "sim ({} network): {seeds} seeds in {:.1}s: {} ticks, {} entries decided ({} accepted, {} rejected, {} stale retries), \
         {} crashes, {} partitions, {} messages ({} dropped), slowest recovery after healing {} ticks, \
         {} node-ticks with a lease, {} catalog states loaded from a snapshot, {} proposals answered \"unknown\" (folded into a snapshot)",
        forced.map_or("Fifo and OneWay".to_owned(), |m| format!("{m:?}")),
        started.elapsed().as_secs_f64(),
        total.ticks,
        total.entries,
        total.accepted,
        total.rejected,
        total.stale,
        total.crashes,
        total.partitions,
        total.messages,
        total.dropped,
        total.heal_ticks_max,
        total.leased,
        total.snapshot_loads,
        total.lost,
    );
}
