//! Membership changes, on the driver: checking and proposing one (an
//! omnipaxos StopSign whose metadata is the next [`Membership`]), and
//! moving to the next configuration once the StopSign is decided and
//! everything before it applied, or when a member announces it.
//!
//! A change waits in [`Pending`] while its caller does: proposed again
//! every [`RECONFIG_RETRY_TICKS`] until this node accepted the StopSign,
//! forgotten once the caller gave up (a later request for the same change
//! then waits for the StopSign already accepted here; another change is
//! refused as in progress until it is decided).
//!
//! Order on disk, for crash safety: the next configuration's log (with the
//! catalog as of the StopSign) is made durable before `membership.json`
//! points to it, so a crash in between restarts in the old configuration,
//! which sees the same StopSign and finds the new log ready.

use std::collections::BTreeMap;

use omnipaxos::storage::Storage;
use tokio::sync::oneshot;

use super::Driver;
use crate::entry::StateMachine;
use crate::lease::Leases;
use crate::membership::{check_change, config_dir, write_membership, Membership, MembershipFile};
use crate::replica::{Replica, ReplicaConfig, ReplicaError};
use crate::service::error::{ProposeError, ReconfigureError, ServiceError};
use crate::storage::SharedStorage;

/// Ticks between two proposals of the same StopSign while it is not
/// accepted here (with the default 10 ms tick: every half second).
const RECONFIG_RETRY_TICKS: u64 = 50;

/// A membership change proposed on this node, and who waits for it.
pub(super) struct Pending {
    /// The configuration it makes.
    config_id: u32,
    /// Its members and the StopSign's metadata, to propose it again.
    nodes: Vec<u64>,
    metadata: Vec<u8>,
    /// When it was last proposed (driver ticks).
    proposed_at: u64,
    reply: oneshot::Sender<Result<Membership, ReconfigureError>>,
}

impl Driver {
    /// A pending membership change whose caller gave up (its timeout
    /// passed) is forgotten: the StopSign may still be decided (then the
    /// node moves on as for any decided change), but it no longer blocks
    /// the next request. One that is still awaited and not accepted here
    /// is proposed again every [`RECONFIG_RETRY_TICKS`]: omnipaxos forwards
    /// a follower's StopSign to the leader once, and a leader that was cut
    /// off at that moment loses it.
    pub(super) fn retry_reconfig(&mut self) {
        if self.reconfig.as_ref().is_some_and(|p| p.reply.is_closed()) {
            self.reconfig = None;
        }
        let (Some(p), Some(r)) = (self.reconfig.as_mut(), self.replica.as_mut()) else {
            return;
        };
        if r.stopping() || self.ticks.saturating_sub(p.proposed_at) < RECONFIG_RETRY_TICKS {
            return;
        }
        p.proposed_at = self.ticks;
        match r.reconfigure(p.nodes.clone(), p.metadata.clone()) {
            Ok(()) | Err(ReplicaError::Reconfiguring) => {
                tracing::debug!(
                    node = self.shared.node_id,
                    config = p.config_id,
                    "catalog membership change proposed again (not accepted here yet)"
                );
            }
            Err(e) => {
                tracing::warn!(node = self.shared.node_id, config = p.config_id, error = %e, "catalog membership change cannot be proposed again");
            }
        }
    }

    /// Checks a membership change against the current configuration and
    /// proposes it (a StopSign naming the next configuration, with the
    /// members' addresses as metadata).
    pub(super) fn on_reconfigure(
        &mut self,
        members: BTreeMap<u64, String>,
        admin: BTreeMap<u64, String>,
        reply: oneshot::Sender<Result<Membership, ReconfigureError>>,
    ) {
        let me = self.shared.node_id;
        let (Some(r), Some(current)) = (self.replica.as_mut(), self.membership.as_ref()) else {
            let _ = reply.send(Err(ReconfigureError::NotMember));
            return;
        };
        if self.reconfig.as_ref().is_some_and(|p| p.reply.is_closed()) {
            self.reconfig = None;
        }
        if self.reconfig.is_some() {
            let _ = reply.send(Err(ReconfigureError::InProgress));
            return;
        }
        if let Err(e) = check_change(&current.members, &members) {
            let _ = reply.send(Err(ReconfigureError::Invalid(e)));
            return;
        }
        // Addresses: given for a new node; known ones for the others.
        let mut next = BTreeMap::new();
        for (id, addr) in &members {
            let known = if *id == me {
                current
                    .members
                    .get(id)
                    .cloned()
                    .or_else(|| Some(self.listen.clone()))
            } else {
                current
                    .members
                    .get(id)
                    .cloned()
                    .or_else(|| self.peers.get(id).cloned())
            };
            let addr = if addr.is_empty() {
                known.unwrap_or_default()
            } else {
                addr.clone()
            };
            next.insert(*id, addr);
        }
        let mut admin_next = current.admin.clone();
        admin_next.extend(admin);
        admin_next.retain(|id, _| next.contains_key(id));
        let target = Membership {
            config_id: current.config_id + 1,
            members: next,
            admin: admin_next,
        };
        // A StopSign accepted here (an earlier request's, whose caller gave
        // up): the configuration cannot change otherwise. The same change
        // is waited for; another one is refused until it is decided.
        if let Some(ss) = r.pending_stopsign() {
            let mut nodes = ss.next_config.nodes.clone();
            nodes.sort_unstable();
            let same = ss.next_config.configuration_id == target.config_id
                && nodes.iter().eq(target.members.keys());
            if same {
                self.reconfig = Some(Pending {
                    config_id: target.config_id,
                    nodes,
                    metadata: ss.metadata.unwrap_or_default(),
                    proposed_at: self.ticks,
                    reply,
                });
            } else {
                let _ = reply.send(Err(ReconfigureError::InProgress));
            }
            return;
        }
        let metadata = match serde_json::to_vec(&target) {
            Ok(m) => m,
            Err(e) => {
                let _ = reply.send(Err(ReconfigureError::Invalid(e.to_string())));
                return;
            }
        };
        // The new node must be reachable before the change is decided.
        for (id, addr) in &target.members {
            if *id != me && !addr.is_empty() {
                self.peers.entry(*id).or_insert_with(|| addr.clone());
                if let Some(net) = self.net.as_mut() {
                    net.add_peer(*id, addr.clone());
                }
            }
        }
        let nodes: Vec<u64> = target.members.keys().copied().collect();
        match r.reconfigure(nodes.clone(), metadata.clone()) {
            Ok(()) => {
                tracing::info!(node = me, config = target.config_id, members = ?target.members.keys().collect::<Vec<_>>(), "catalog membership change proposed");
                self.reconfig = Some(Pending {
                    config_id: target.config_id,
                    nodes,
                    metadata,
                    proposed_at: self.ticks,
                    reply,
                });
            }
            Err(ReplicaError::Reconfiguring) => {
                let _ = reply.send(Err(ReconfigureError::InProgress));
            }
            Err(e) => {
                let _ = reply.send(Err(ReconfigureError::Invalid(e.to_string())));
            }
        }
    }

    /// Once the current configuration's StopSign is decided and everything
    /// before it applied: starts the next configuration (or stops
    /// participating, if this node is not in it).
    pub(super) fn check_stopped(&mut self) {
        let Some(r) = self.replica.as_ref() else {
            return;
        };
        let Some(ss) = r.stopped() else {
            return;
        };
        // The StopSign is the last decided entry; everything before it
        // must be applied: its state is the next configuration's start.
        if r.applied_index() + 1 != r.decided_index() {
            return;
        }
        let next = ss
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_slice::<Membership>(m).ok())
            .filter(|m| m.config_id == ss.next_config.configuration_id)
            .unwrap_or_else(|| Membership {
                config_id: ss.next_config.configuration_id,
                members: ss
                    .next_config
                    .nodes
                    .iter()
                    .map(|id| (*id, self.peers.get(id).cloned().unwrap_or_default()))
                    .collect(),
                admin: BTreeMap::new(),
            });
        let start = (r.state().clone(), r.applied_index());
        self.switch(next, Some(start));
    }

    /// Moves to configuration `next`: persists it, learns the new peers,
    /// retires the current replica and, if this node is a member, starts
    /// the next one over a fresh log that begins with `start` (the state
    /// as of the StopSign and its length; `None`: a node that learned the
    /// configuration from an announcement and gets the catalog from the
    /// members).
    pub(super) fn switch(&mut self, next: Membership, start: Option<(StateMachine, usize)>) {
        let me = self.shared.node_id;
        let removed = !next.members.contains_key(&me);
        // The next configuration's log, with the catalog as of the
        // StopSign, is made durable before the membership that points to
        // it: a crash in between restarts in the old configuration, which
        // sees the same StopSign and finds the new log ready.
        let storage = if removed {
            None
        } else {
            let opened = (|| -> Result<SharedStorage, ServiceError> {
                let storage = SharedStorage::open(&config_dir(&self.data_dir, next.config_id))?;
                if let Some((state, len)) = start {
                    if storage.get_decided_idx().unwrap_or(0) == 0
                        && storage.get_compacted_idx().unwrap_or(0) == 0
                    {
                        storage.preload(state, len)?;
                    }
                }
                Ok(storage)
            })();
            match opened {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(node = me, error = %e, "cannot prepare the next catalog configuration's log; retrying");
                    return;
                }
            }
        };
        let file = MembershipFile {
            membership: next.clone(),
            removed,
        };
        // Then the membership: a restart must come back in this
        // configuration.
        if let Err(e) = write_membership(&self.data_dir, &file) {
            tracing::error!(node = me, error = %e, "cannot persist the catalog membership; retrying");
            return;
        }
        for (id, addr) in &next.members {
            if *id != me && !addr.is_empty() {
                self.peers.entry(*id).or_insert_with(|| addr.clone());
                if let Some(net) = self.net.as_mut() {
                    net.add_peer(*id, addr.clone());
                }
            }
        }
        // The old replica's tickets mean nothing to the next one; what was
        // still pending was not decided before the StopSign and never will
        // be in that configuration.
        for (_, reply) in std::mem::take(&mut self.proposals) {
            let _ = reply.send(Err(ProposeError::Timeout));
        }
        if let Some(old) = self.replica.take() {
            self.retired.push(old);
            if self.retired.len() > 2 {
                self.retired.remove(0);
            }
        }
        self.membership = Some(next.clone());
        self.removed = removed;
        if removed {
            tracing::warn!(
                node = me,
                config = next.config_id,
                "this node was removed from the catalog cluster; it no longer takes part"
            );
            self.answer_reconfig(&next);
            return;
        }
        let Some(storage) = storage else {
            return;
        };
        let started = (|| -> Result<Replica, ServiceError> {
            let mut config = ReplicaConfig::new(me, next.members.keys().copied().collect());
            config.config_id = next.config_id;
            config.compact_after = self.compact_after;
            let mut replica = Replica::new(config, storage)?;
            replica.apply_decided()?;
            Ok(replica)
        })();
        match started {
            Ok(mut replica) => {
                for peer in next.members.keys().copied().filter(|p| *p != me) {
                    if self.out.contains_key(&peer) || self.inbound.contains_key(&peer) {
                        replica.reconnected(peer);
                    }
                }
                tracing::info!(node = me, config = next.config_id, members = ?next.members.keys().collect::<Vec<_>>(), applied = replica.applied_index(), "catalog configuration started");
                let peers: Vec<u64> = next.members.keys().copied().filter(|p| *p != me).collect();
                self.leases = Leases::new(peers, self.lease_ms);
                self.acks_count_from =
                    self.shared.now_ms() + self.lease_ms + self.leases.margin_ms();
                self.leases
                    .set_applied(self.shared.now_ms(), replica.applied_index());
                // Not published while behind what the node published in
                // the old configuration (a node that joined from an
                // announcement starts empty): see `Shared::publish`.
                self.shared
                    .publish(replica.catalog(), replica.applied_index());
                self.replica = Some(replica);
                self.answer_reconfig(&next);
            }
            Err(e) => {
                // Safety over liveness: the node stops taking part rather
                // than guess; a restart retries from membership.json.
                tracing::error!(node = me, error = %e, "cannot start the next catalog configuration");
            }
        }
        self.update_status();
    }

    fn answer_reconfig(&mut self, next: &Membership) {
        if self
            .reconfig
            .as_ref()
            .is_some_and(|p| p.config_id <= next.config_id)
        {
            if let Some(p) = self.reconfig.take() {
                let _ = p.reply.send(Ok(next.clone()));
            }
        }
    }
}
