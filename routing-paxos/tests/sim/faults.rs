//! Faults, drawn each tick while the chaos phase lasts: crashes and
//! restarts "with the disk", broken links, partitions and their healing;
//! and [`Sim::heal`], which ends them all.

use hotrepart_routing_paxos::Replica;

use crate::world::Sim;

impl Sim {
    pub(crate) fn faults(&mut self) {
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

    pub(crate) fn crash(&mut self, pid: u64) {
        self.stats.crashes += 1;
        if self.trace {
            eprintln!("t{} node {pid} crashes", self.now);
        }
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

    pub(crate) fn restart(&mut self, pid: u64) {
        let i = self.idx(pid);
        let storage = self.nodes[i].storage.clone();
        let replica = self.start(pid, &storage);
        if self.trace {
            eprintln!("t{} node {pid} restarts: {:?}", self.now, replica.status());
        }
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

    pub(crate) fn heal_partition(&mut self) {
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
    pub(crate) fn heal(&mut self) {
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
}
