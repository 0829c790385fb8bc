//! The simulated network: messages in flight with their delivery tick,
//! links that break (a pair, or one direction in [`NetMode::OneWay`]) and
//! partitions, what is lost when a link goes down, and the sending of the
//! replicas' outgoing messages with random delays (FIFO per link, except
//! in [`NetMode::Chaos`]).

use hotrepart_routing_paxos::{LeaseMsg, Message};

use crate::world::{NetMode, Sim};

/// A lease message on its way.
pub(crate) struct LeaseFlight {
    pub(crate) at: u64,
    pub(crate) order: u64,
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) msg: LeaseMsg,
}

pub(crate) struct InFlight {
    pub(crate) at: u64,
    /// Random tie-break among messages due at the same tick.
    pub(crate) order: u64,
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) msg: Message,
}

impl Sim {
    /// The key of the link from `a` to `b` in `broken`: the pair, or the
    /// direction (OneWay).
    pub(crate) fn link_key(&self, a: u64, b: u64) -> (u64, u64) {
        if self.p.mode == NetMode::OneWay {
            (a, b)
        } else {
            (a.min(b), a.max(b))
        }
    }

    pub(crate) fn linked(&self, a: u64, b: u64) -> bool {
        self.nodes[self.idx(a)].group == self.nodes[self.idx(b)].group
            && !self.broken.contains_key(&self.link_key(a, b))
    }

    /// Both ends of a link that came back learn of it (a new connection).
    pub(crate) fn reconnect(&mut self, a: u64, b: u64) {
        for (x, y) in [(a, b), (b, a)] {
            let i = self.idx(x);
            if let Some(r) = self.nodes[i].replica.as_mut() {
                r.reconnected(y);
            }
        }
    }

    /// Loses everything in flight on links that are down now.
    pub(crate) fn purge(&mut self) {
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

    pub(crate) fn send(&mut self, i: usize) {
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
}

/// One line per delivered protocol message (heartbeats left out), entries
/// counted rather than printed.
pub(crate) fn trace_message(now: u64, m: &InFlight) {
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
