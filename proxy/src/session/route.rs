//! Routing a statement under a pin of the routing table: waiting out a
//! freeze, and the checks that depend on the open transaction (a writer
//! of a frozen range's source; a snapshot transaction that outlived a
//! change of owner).

use super::conn::*;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::routing::{Decision, Kind};
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Routes and sends an extended-protocol batch. `synced`: it ends with
    /// Sync (else with Flush, or a Query follows).
    /// Routes with `route` under a pin of the current routing table. A
    /// refusal for a frozen range waits (without the pin, when nothing is
    /// owed) for the next routing table and routes again, until
    /// `freeze_wait_ms` has passed; writers wait out a cut-over and the
    /// client sees a pause.
    pub(super) async fn route_waiting<T>(
        &mut self,
        route: impl Fn(&Self) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut wait = self.node.routing.freeze_wait();
        loop {
            self.pin_routing();
            let routed = route(self);
            if let Err(r) = &routed {
                if r.frozen() {
                    if let Some(source) = self.wrote_to_frozen_source() {
                        // The cut-over waits for this transaction to end: waiting
                        // here would hold both up until the cut-over gives up.
                        return Err(Refusal::new(
                            sqlstate::SERIALIZATION_FAILURE,
                            format!(
                                "could not serialize access due to a concurrent cut-over: this transaction wrote to shard {source}, \
                                 the source of a key range frozen for a cut-over that waits for this transaction to end; roll back and retry"
                            ),
                        ));
                    }
                    self.park();
                }
                if wait.retry(r).await {
                    continue;
                }
            }
            return routed;
        }
    }

    /// Inside a REPEATABLE READ or SERIALIZABLE transaction, after a key
    /// range changed owner since its first statement: 40001. Its snapshot
    /// on the new owner may have been taken before the range's rows were
    /// there (a read would miss them); PostgreSQL's own answer to a
    /// conflicting concurrent change at these levels is the same error.
    /// READ COMMITTED takes a snapshot per statement: nothing to do.
    pub(super) fn check_owner_change(&mut self, d: &Decision) -> Result<(), Refusal> {
        // Transaction control (ROLLBACK above all) is never refused here.
        if !self.txn.open() || d.kind != Kind::Other {
            return Ok(());
        }
        let now = self.node.routing.catalog.load_full();
        let Some(first) = &self.txn.routing else {
            self.txn.routing = Some(now);
            return Ok(());
        };
        if first.epoch() == now.epoch() || !self.snapshot_isolation() {
            return Ok(());
        }
        let moved = now.ranges().iter().find(|r| {
            let before = first.range_for_point(r.lo);
            before.read_owner != r.read_owner || before.write_owner != r.write_owner
        });
        match moved {
            None => Ok(()),
            Some(r) => Err(Refusal::new(
                sqlstate::SERIALIZATION_FAILURE,
                format!(
                    "could not serialize access due to a concurrent reshard: key range {} moved to shard {} \
                     during this REPEATABLE READ or SERIALIZABLE transaction; retry the transaction",
                    r.span(),
                    r.read_owner
                ),
            )),
        }
    }

    /// Whether the open transaction runs at REPEATABLE READ or SERIALIZABLE
    /// (as far as the node can tell: its BEGIN, a SET TRANSACTION in it, or
    /// the session's default).
    pub(super) fn snapshot_isolation(&self) -> bool {
        self.txn.snapshot_isolation
            || self
                .txn
                .begin
                .as_deref()
                .is_some_and(hotrepart_router::classify::asks_snapshot_isolation)
            || self
                .state
                .get("default_transaction_isolation")
                // A setting's value as PostgreSQL reports it.
                .is_some_and(|v| v == "repeatable read" || v == "serializable")
    }

    /// The name of a shard this open transaction wrote to that is the
    /// source (write owner) of a range frozen for a cut-over, if any.
    pub(super) fn wrote_to_frozen_source(&self) -> Option<String> {
        if !self.txn.open() || self.txn.writes.is_empty() {
            return None;
        }
        let snap = self.node.routing.catalog.load();
        snap.ranges()
            .iter()
            .filter(|r| r.status == hotrepart_router::catalog::RangeStatus::Frozen)
            .find(|r| {
                self.node
                    .routing
                    .shard_index(r.write_owner.as_str())
                    .is_some_and(|t| self.txn.writes.contains(&t))
            })
            .map(|r| r.write_owner.to_string())
    }

    /// Pins the current routing table before routing (unless a pin of
    /// this session is held already: it covers what is still in flight).
    pub(crate) fn pin_routing(&mut self) {
        if self.be.pin.is_none() {
            self.be.pin = Some(self.node.routing.pin());
        }
    }

    /// Before waiting out a freeze: with nothing owed nothing of this
    /// session is in flight, so it lets go of its pin — a fence must not
    /// wait for a session that itself waits for the fence's cut-over. It
    /// pins again (a newer table) when it routes after the wait.
    pub(crate) fn park(&mut self) {
        if self.be.owed.is_empty() {
            self.be.pin = None;
        }
    }
}
