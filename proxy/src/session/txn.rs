//! Transaction control at the node: a deferred BEGIN, COMMIT/ROLLBACK over
//! every shard the transaction used, two-phase commit when it wrote to
//! several ([`crate::exec::twopc`]).

use super::conn::*;
use crate::backend::conn::HiddenQueryError;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Decision, Kind};
use crate::wire::tx;
use crate::wire::{command_complete, rfq};
use bytes::BufMut;
use hotrepart_router::classify::SavepointOp;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// BEGIN/COMMIT/ROLLBACK and the failed-transaction rule. Returns true
    /// when the statement was answered here.
    pub(super) async fn transaction_control(
        &mut self,
        d: &Decision,
        simple: bool,
        target: Option<usize>,
    ) -> Result<bool, SessionError> {
        let ending = matches!(d.kind, Kind::Commit | Kind::Rollback);
        let refuse = |s: &mut Self, r: Refusal| {
            if simple {
                s.refuse_simple(r);
            } else {
                s.push_error(&r);
                s.skip_to_sync = true;
            }
        };
        // Transaction control mixed with other statements in one string or
        // batch cannot be split over several shards correctly.
        if d.statements > 1
            && d.has_tx_control
            && (self.be.attached_count() > 1
                || target.is_some_and(|t| self.txn.writes.iter().any(|&w| w != t)))
        {
            refuse(self, Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "BEGIN/COMMIT/ROLLBACK together with other statements in one query string are not supported in a transaction that spans several shards; send them separately".into(),
            ));
            return Ok(true);
        }
        if d.kind == Kind::Savepoint && d.statements == 1 && self.txn.open() {
            if let Some(r) = self.savepoint_on_every_shard(d, target).await? {
                refuse(self, r);
                return Ok(true);
            }
        }
        // A failed statement on one shard aborts the whole transaction.
        if !ending && self.txn.open() {
            let aborted_elsewhere = self.be.slots.iter().enumerate().any(|(i, sl)| {
                sl.conn.as_ref().is_some_and(|b| b.status == tx::FAILED)
                    && target.is_some_and(|t| t != i)
            });
            if aborted_elsewhere {
                self.txn.failed = true;
            }
        }
        if self.txn.failed && !ending {
            if self.node.routing.single_shard()
                && self.fail_on_backend(target.unwrap_or(self.be.cur)).await?
            {
                // PostgreSQL answers it, as after its own error.
                return Ok(false);
            }
            let r = Refusal::new(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block"
                    .into(),
            );
            refuse(self, r);
            return Ok(true);
        }
        if ending {
            // The client's COMMIT/ROLLBACK must reach a written shard.
            let primary = match (self.txn.writes.as_slice(), target) {
                (w, Some(t)) if w.iter().any(|&x| x != t) => {
                    let names: Vec<String> =
                        w.iter().map(|&x| self.node.routing.shard_name(x)).collect();
                    refuse(self, Refusal::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "this COMMIT/ROLLBACK comes with statements for shard {} but the transaction wrote to shard(s) {}; send COMMIT on its own",
                            self.node.routing.shard_name(t), names.join(", ")
                        ),
                    ));
                    return Ok(true);
                }
                ([w, ..], _) => *w,
                ([], Some(t)) => t,
                ([], None) => self.be.cur,
            };
            let aborted = self.txn.failed
                || self
                    .be
                    .slots
                    .iter()
                    .any(|sl| sl.conn.as_ref().is_some_and(|b| b.status == tx::FAILED));
            if aborted {
                // Before the shard that failed is released below: its
                // 'E' is what says the COMMIT must roll back.
                self.txn.failed = true;
            }
            if d.kind == Kind::Commit && self.txn.writes.len() > 1 && !aborted {
                return match self.two_phase_commit().await? {
                    Ok(()) => Ok(false),
                    Err(r) => {
                        refuse(self, r);
                        Ok(true)
                    }
                };
            }
            if self.be.attached_count() > 1
                || (self.be.attached() && self.be.slots[primary].conn.is_none())
            {
                // Shards other than the written one end first (they were
                // only read, or everything rolls back); the client's own
                // statement then goes to it.
                let keep = [primary];
                self.finish_shards_except(d.kind == Kind::Commit && !aborted, &keep)
                    .await?;
            }
            if self.txn.failed
                || self
                    .be
                    .slots
                    .iter()
                    .any(|sl| sl.conn.as_ref().is_some_and(|b| b.status == tx::FAILED))
            {
                self.txn.failed = true;
            }
        }
        if !simple || d.statements != 1 {
            return Ok(false);
        }
        match d.kind {
            // A BEGIN is held back until the first statement shows which
            // shard the transaction needs; that shard then begins it.
            Kind::Begin if !self.be.attached() && !self.txn.open() => {
                self.txn.begin = Some(d.sql_text.clone());
                self.txn.status = TxStatus::InTransaction;
                self.out.put_slice(&command_complete("BEGIN"));
                self.out.put_slice(&rfq(tx::IN_TRANSACTION));
                Ok(true)
            }
            // A BEGIN that goes to an attached backend (session pooling):
            // its words are what other shards join the transaction with.
            Kind::Begin if !self.txn.open() => {
                self.txn.begin = Some(d.sql_text.clone());
                Ok(false)
            }
            Kind::Commit | Kind::Rollback if !self.be.attached() && self.txn.open() => {
                let tag = if d.kind == Kind::Commit && !self.txn.failed {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                self.txn.reset();
                self.forget_portals();
                self.out.put_slice(&command_complete(tag));
                self.out.put_slice(&rfq(tx::IDLE));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A savepoint statement in a transaction: PostgreSQL's savepoints
    /// cover the whole transaction, so it runs on every shard the
    /// transaction holds — the shard the client's statement goes to (the
    /// current one, attached first if none is) answers it, the others run
    /// it before — and the session keeps the open savepoints, which a
    /// shard joining later takes after its BEGIN. `ROLLBACK TO` a
    /// savepoint thus undoes the writes made after it on every shard, and
    /// ends the failed state of the transaction as on PostgreSQL. Some:
    /// the error for the client (a shard refused it; the transaction is
    /// then failed).
    async fn savepoint_on_every_shard(
        &mut self,
        d: &Decision,
        target: Option<usize>,
    ) -> Result<Option<Refusal>, SessionError> {
        let Some(sp) = hotrepart_router::classify::savepoint(&d.sql_text) else {
            return Ok(None);
        };
        if sp.op != SavepointOp::RollbackTo && self.txn.failed {
            // PostgreSQL's 25P02, given below.
            return Ok(None);
        }
        // The shards in the transaction (in session pooling a backend may
        // stay attached outside it: it joins with the savepoints later).
        let attached: Vec<usize> = (0..self.be.slots.len())
            .filter(|&t| {
                self.be.slots[t]
                    .conn
                    .as_ref()
                    .is_some_and(|b| b.status != tx::IDLE)
            })
            .collect();
        if sp.op != SavepointOp::RollbackTo
            && attached.iter().any(|&t| {
                self.be.slots[t]
                    .conn
                    .as_ref()
                    .is_some_and(|b| b.status == tx::FAILED)
            })
        {
            self.txn.failed = true;
            return Ok(Some(Refusal::new(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block"
                    .into(),
            )));
        }
        // The shard the client's statement goes to answers it.
        let main = match target {
            Some(t) => t,
            None if attached.contains(&self.be.cur) => self.be.cur,
            None => attached
                .first()
                .copied()
                .unwrap_or_else(|| self.default_shard()),
        };
        if let Err(r) = self.switch_to(main).await? {
            return Ok(Some(r));
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        // The other shards take it as a hidden statement, so each must be
        // synced (`switch_to` ended the previous shard's Parse/Describe
        // sent with Flush: asyncpg prepares SAVEPOINT so). The shard that
        // answers may be mid-pipeline: the client's own messages follow
        // there. A savepoint is never taken or rolled back on some shards
        // only — that would keep writes the client rolled back.
        let unsynced = attached
            .iter()
            .any(|&t| t != main && self.be.slots[t].conn.as_ref().is_some_and(|b| b.unsynced));
        if unsynced {
            return Ok(Some(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "{}: messages sent with Flush but without Sync are still open on another shard of this transaction; send Sync before a savepoint statement",
                    d.sql_text.trim()
                ),
            )));
        }
        for t in attached.into_iter().filter(|&t| t != main) {
            // Its simple Query drops the backend's unnamed statement.
            self.unnamed_replaced_on(&[t]);
            let shard = self.node.routing.shard_name(t);
            let Some(b) = self.be.slots[t].conn.as_mut() else {
                continue;
            };
            match b.hidden_query(&d.sql_text).await {
                Ok(_) => {}
                Err(HiddenQueryError::Server { code, message }) => {
                    self.txn.failed = true;
                    return Ok(Some(Refusal::new(
                        sqlstate::intern(&code),
                        format!("{message} (on shard {shard})"),
                    )));
                }
                Err(HiddenQueryError::Wire(e)) => {
                    b.broken = true;
                    self.txn.failed = true;
                    return Ok(Some(Refusal::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "the connection to shard {shard} broke during {} ({e})",
                            d.sql_text.trim()
                        ),
                    )));
                }
            }
        }
        let at = self.txn.savepoints.iter().rposition(|(_, n)| *n == sp.name);
        match (sp.op, at) {
            (SavepointOp::Take, _) => self.txn.savepoints.push((sp.written, sp.name)),
            (SavepointOp::Release, Some(i)) => {
                self.txn.savepoints.truncate(i);
                self.cursors.released(i);
            }
            (SavepointOp::RollbackTo, Some(i)) => {
                self.txn.savepoints.truncate(i + 1);
                self.cursors.rolled_back_to(i);
                // DDL undone: a namespace read after it, for this
                // transaction only, is read again.
                if self.ns_private {
                    self.ns_under = None;
                }
                // The shards that failed are back (the current one once it
                // answers); a refusal of the node's is undone too.
                self.txn.failed = false;
            }
            // Unknown: the current shard answers PostgreSQL's 3B001.
            (_, None) => {}
        }
        Ok(None)
    }

    /// Before the client's COMMIT reaches a transaction the node failed,
    /// make PostgreSQL fail it too: COMMIT then rolls back and answers
    /// ROLLBACK, exactly as after an error of PostgreSQL's own.
    pub(super) async fn poison_if_failed(&mut self, d: &Decision, t: usize) {
        if d.kind == Kind::Commit {
            self.poison_if_failed_on(t).await;
        }
    }

    /// On one shard the node does not read transaction control: PostgreSQL
    /// keeps the transaction's state. A transaction the node failed (it
    /// refused a statement inside it) is therefore failed on the backend
    /// too, before what follows reaches it: PostgreSQL then answers 25P02,
    /// and ROLLBACK to a COMMIT or ROLLBACK, as after an error of its own.
    /// False when no backend holds the transaction.
    pub(super) async fn fail_on_backend(&mut self, t: usize) -> Result<bool, SessionError> {
        if !self.txn.failed || self.be.slots[t].conn.is_none() {
            return Ok(false);
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        self.poison_if_failed_on(t).await;
        self.txn.failed = false;
        Ok(true)
    }

    /// Makes PostgreSQL fail the transaction on shard `t` if the node
    /// failed it: what ends it there (COMMIT, PREPARE TRANSACTION) then
    /// rolls back and says ROLLBACK.
    pub(super) async fn poison_if_failed_on(&mut self, t: usize) {
        if self.txn.failed {
            if let Some(b) = self.be.slots[t].conn.as_mut() {
                let _ = b.hidden_query(POISON_SQL).await;
            }
        }
    }

    /// Ends the transaction on every attached shard but those in `keep`
    /// (they were only read in this transaction, or it is rolled back);
    /// the first of `keep` becomes the current shard.
    pub(super) async fn finish_shards_except(
        &mut self,
        commit: bool,
        keep: &[usize],
    ) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        for i in 0..self.be.slots.len() {
            if keep.contains(&i) || self.be.slots[i].conn.is_none() {
                continue;
            }
            if let Some(b) = self.be.slots[i].conn.as_mut() {
                if let Err(e) = b.hidden_query(sql).await {
                    tracing::warn!(error = %e, shard = i, "ending a read-only shard's transaction failed");
                    b.broken = true;
                }
            }
            if self.state_dirty[i] {
                self.refresh_state_from(i).await;
            }
            self.read_temp_due(i).await;
            self.read_cursors_due(i).await;
            self.let_go(i);
        }
        if let Some(&p) = keep.first() {
            self.be.cur = p;
        }
        self.be.update_cancel();
        Ok(())
    }

    /// COMMIT of a transaction that wrote to several shards: read-only
    /// shards commit first, then the written ones commit with two-phase
    /// commit ([`crate::exec::twopc::commit`]). Ok(Ok): committed; an empty
    /// transaction is then begun on a written shard's backend, and the
    /// client's own COMMIT goes there, so that PostgreSQL answers it in
    /// whichever protocol the client used. Ok(Err): the error for the
    /// client; the transaction is over (every backend outside a
    /// transaction).
    pub(super) async fn two_phase_commit(&mut self) -> Result<Result<(), Refusal>, SessionError> {
        if let Some(r) = self.temp_blocks_twopc() {
            // PREPARE would fail on the shard of the temporary objects:
            // everything rolls back, nothing is prepared.
            self.finish_shards_except(false, &[]).await?;
            self.end_of_transaction().await?;
            return Ok(Err(r));
        }
        let writes = self.txn.writes.clone();
        self.finish_shards_except(true, &writes).await?;
        if let Err(r) = crate::exec::twopc::commit(self, &writes).await {
            self.end_of_transaction().await?;
            return Ok(Err(r));
        }
        for &p in &writes {
            if let Some(b) = self.be.slots[p].conn.as_mut() {
                match b.hidden_query("BEGIN").await {
                    Ok(_) => {
                        self.be.cur = p;
                        return Ok(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, shard = p, "cannot begin the reply transaction after a commit");
                        b.broken = true;
                    }
                }
            }
        }
        self.end_of_transaction().await?;
        Ok(Err(Refusal::new(
            sqlstate::CONNECTION_FAILURE,
            "the transaction was committed on every shard, but the connections to the shards broke before the node could confirm it".into(),
        )))
    }
}
