//! The simulated cluster: its knobs ([`Params`], drawn from the seed), its
//! nodes (replica, storage, lease state, clock rate), the messages in
//! flight, the log as first applied, and the counters; plus the small
//! helpers every part uses (start a replica, fail with the replay line).

use std::collections::{BTreeMap, BTreeSet};

use hotrepart_routing_paxos::{
    CatalogCommand, CatalogEntry, Leases, Outcome, Replica, ReplicaConfig, SharedStorage,
    StateMachine, Ticket,
};

use crate::env_u64;
use crate::network::{InFlight, LeaseFlight};
use crate::rng::Rng;

/// Ticks after healing within which a new proposal must be decided and all
/// replicas must have caught up.
pub(crate) const HEAL_BOUND: u64 = 500;
/// Virtual milliseconds per tick (the service's default tick).
pub(crate) const TICK_MS: u64 = 10;
/// Lease duration in the simulation (short, so leases come and go often).
pub(crate) const LEASE_MS: u64 = 600;

/// How the network treats one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetMode {
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
pub(crate) struct Params {
    pub(crate) mode: NetMode,
    pub(crate) nodes: u64,
    pub(crate) chaos_ticks: u64,
    /// Per-message drop probability, per mille (Chaos mode only).
    pub(crate) drop_pm: u64,
    /// Per-tick chance (per mille) that a link breaks for a while.
    pub(crate) break_pm: u64,
    /// Messages take 1..=max_delay ticks.
    pub(crate) max_delay: u64,
    /// Per-message chance (per mille) of a long delay (20–80 ticks).
    pub(crate) spike_pm: u64,
    /// Per-tick chance (per mille) of each fault kind.
    pub(crate) crash_pm: u64,
    pub(crate) restart_pm: u64,
    pub(crate) partition_pm: u64,
    pub(crate) heal_pm: u64,
    /// Per-tick, per-node chance (per mille) of a proposal.
    pub(crate) propose_pm: u64,
}

impl Params {
    pub(crate) fn draw(rng: &mut Rng, mode: NetMode) -> Params {
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

pub(crate) struct Node {
    pub(crate) pid: u64,
    pub(crate) storage: SharedStorage,
    pub(crate) replica: Option<Replica>,
    /// Partition group; nodes talk only within a group.
    pub(crate) group: u64,
    /// Epoch of the last applied entry in this life of the replica.
    pub(crate) epoch: u64,
    /// Decided index when it crashed.
    pub(crate) decided_at_crash: usize,
    /// This life's unanswered proposals.
    pub(crate) tickets: BTreeMap<Ticket, CatalogCommand>,
    pub(crate) answered: BTreeSet<Ticket>,
    /// This life's lease state (a restart starts without a lease).
    pub(crate) leases: Option<Leases>,
    /// The node's clock rate, per mille of virtual time.
    pub(crate) clock_pm: u64,
}

#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) ticks: u64,
    pub(crate) entries: u64,
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    pub(crate) stale: u64,
    pub(crate) crashes: u64,
    pub(crate) partitions: u64,
    pub(crate) messages: u64,
    pub(crate) dropped: u64,
    pub(crate) heal_ticks_max: u64,
    /// Node-ticks with a valid lease.
    pub(crate) leased: u64,
    /// Proposals whose outcome was folded into a snapshot.
    pub(crate) lost: u64,
    /// Catalog states loaded from a snapshot (not applied entry by entry).
    pub(crate) snapshot_loads: u64,
}

pub(crate) struct Sim {
    pub(crate) seed: u64,
    pub(crate) rng: Rng,
    pub(crate) p: Params,
    pub(crate) now: u64,
    pub(crate) nodes: Vec<Node>,
    pub(crate) net: Vec<InFlight>,
    /// The log as first applied by any replica: entry and outcome per index.
    pub(crate) log: Vec<(CatalogEntry, Outcome)>,
    /// State after applying index i, as first computed.
    pub(crate) states: Vec<StateMachine>,
    /// Drop probability now (0 after healing).
    pub(crate) drop_pm: u64,
    /// Delay-spike probability now (0 after healing).
    pub(crate) spike_pm: u64,
    /// Broken links (pid pair, smaller first) and the tick they come back.
    pub(crate) broken: BTreeMap<(u64, u64), u64>,
    /// Delivery time of the last message per directed link (Fifo mode).
    pub(crate) last_at: BTreeMap<(u64, u64), u64>,
    pub(crate) sent: u64,
    /// Print protocol messages and applied entries (HOTREPART_SIM_TRACE).
    pub(crate) trace: bool,
    pub(crate) stats: Stats,
    /// Randomness of the lease traffic, apart from `rng`.
    pub(crate) lease_rng: Rng,
    pub(crate) lease_net: Vec<LeaseFlight>,
    pub(crate) lease_last_at: BTreeMap<(u64, u64), u64>,
    /// Tick at which each log index was first seen decided.
    pub(crate) decided_at: Vec<u64>,
}

impl Sim {
    pub(crate) fn new(seed: u64, mode: NetMode) -> Sim {
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

    pub(crate) fn fail(&self, what: impl std::fmt::Display) -> ! {
        // The network mode is part of the replay: random seeds alternate
        // Fifo and OneWay, and an unset HOTREPART_SIM_NET means Fifo.
        let net = format!("{:?}", self.p.mode).to_lowercase();
        panic!(
            "seed {} tick {}: {what}\n  params {:?}\n  replay: HOTREPART_SIM_NET={net} HOTREPART_SIM_SEED={} cargo nextest run -p hotrepart-routing-paxos --test sim",
            self.seed, self.now, self.p, self.seed
        )
    }

    pub(crate) fn start(&self, pid: u64, storage: &SharedStorage) -> Replica {
        let pids: Vec<u64> = (1..=self.p.nodes).collect();
        let mut config = ReplicaConfig::new(pid, pids);
        config.compact_after = self.compact_after();
        Replica::new(config, storage.clone())
            .unwrap_or_else(|e| self.fail(format!("node {pid} does not start: {e}")))
    }

    /// The compaction threshold: small, so that every run compacts often
    /// and lagging or restarted replicas catch up from snapshots. Derived
    /// from the seed, not drawn (the draws stay as they were).
    pub(crate) fn compact_after(&self) -> usize {
        match env_u64("HOTREPART_SIM_COMPACT") {
            Some(n) => n as usize,
            None => 5 + (self.seed % 40) as usize,
        }
    }

    pub(crate) fn new_leases(&self, pid: u64) -> Leases {
        Leases::new((1..=self.p.nodes).filter(|p| *p != pid), LEASE_MS)
    }

    /// Node `i`'s clock, in its milliseconds.
    pub(crate) fn local_ms(&self, i: usize) -> u64 {
        self.now * TICK_MS * self.nodes[i].clock_pm / 1000
    }

    pub(crate) fn idx(&self, pid: u64) -> usize {
        (pid - 1) as usize
    }

    pub(crate) fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.replica.is_some())
            .map(|n| n.pid)
            .collect()
    }
}
