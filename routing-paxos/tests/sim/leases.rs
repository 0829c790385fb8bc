//! Leases in virtual time: their own traffic (own random stream, own FIFO
//! per link), each node's clock at its own rate, and the lease rule
//! checked every tick: no valid lease without every entry decided more
//! than lease + margin ago.

use hotrepart_routing_paxos::LeaseMsg;

use crate::network::LeaseFlight;
use crate::world::{NetMode, Sim, LEASE_MS, TICK_MS};

impl Sim {
    pub(crate) fn deliver_leases(&mut self) {
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

    pub(crate) fn tick_leases(&mut self, i: usize) {
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
    pub(crate) fn send_lease(&mut self, from: u64, to: u64, msg: LeaseMsg) {
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
    pub(crate) fn check_leases(&mut self) {
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
    pub(crate) fn leases_come_back(&mut self) {
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
}
