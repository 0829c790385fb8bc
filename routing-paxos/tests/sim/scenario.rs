//! One seed's run: every node proposes a bootstrap seed, then the chaos
//! phase (faults, random proposals), then healing, after which a marker
//! proposal must be decided and everyone must catch up within
//! [`HEAL_BOUND`] ticks and get a lease back; [`Sim::step`] is one tick of
//! delivery, replica ticks, proposals, applies and sends.

use hotrepart_routing_paxos::{CatalogCommand, Replica, Ticket};

use crate::commands::{random_command, seed_catalog};
use crate::network::trace_message;
use crate::world::{NetMode, Sim, Stats, HEAL_BOUND};

impl Sim {
    pub(crate) fn run(mut self) -> Stats {
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
            since: None,
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

    pub(crate) fn propose(&mut self, i: usize, cmd: CatalogCommand) -> Ticket {
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

    pub(crate) fn step(&mut self, chaos: bool) {
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
}
