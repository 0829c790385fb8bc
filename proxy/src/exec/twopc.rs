//! Two-phase commit for transactions that wrote to several shards: the
//! coordinator a session runs at COMMIT (`commit`). The decision log it
//! records in is [`crate::exec::decisions::DecisionLog`]; the resolver that
//! finishes transactions a coordinator left prepared (it crashed, a shard
//! was unreachable) is [`crate::control::resolver`], which uses the helpers
//! here (`record`, `is_hotrepart_gid`).
//!
//! A commit runs in this order, and the order is what makes it atomic:
//! 1. `PREPARE TRANSACTION 'hr_<node_id>_<random>'` on every written shard
//!    (all at once).
//!    A failure anywhere rolls back everywhere (`ROLLBACK PREPARED` where
//!    it had prepared) and the client gets that shard's error.
//! 2. The decision `commit = true` is recorded through the node's
//!    `DecisionLog`; the first decision recorded for a gid is final, so a
//!    resolver that meanwhile recorded `false` wins and the transaction is
//!    rolled back.
//! 3. `COMMIT PREPARED` (or `ROLLBACK PREPARED`) on every prepared shard
//!    (all at once), retried on a fresh backend; the client sees COMMIT
//!    only when every shard committed.
//!
//! Guarantees:
//! - no shard commits before the commit decision is recorded; every shard
//!   ends the way the final decision says — by the coordinator, or by the
//!   resolver of whichever node runs it;
//! - a prepared `hr_` transaction older than `twopc_grace_ms` with no
//!   decision is rolled back (the resolver records `false` first, so a late
//!   coordinator cannot commit it afterwards).
//!
//! Crash safety needs a decision log that survives the node. The node's is
//! `control::cluster::CatalogDecisions` (`CatalogCommand::TxDecision`
//! entries in the catalog): in a cluster a decision is on a quorum's disk
//! before any COMMIT PREPARED and every node sees it, so the leader's
//! resolver finishes whatever a crashed coordinator left
//! (`tests/tests/it/cluster_twopc.rs`). `LocalDecisions` (in memory, for
//! tests) and a node alone without `data_dir` lose decisions at exit: a
//! crash between the first and the last COMMIT PREPARED then leaves the
//! transaction half committed (the resolver rolls back the shards not yet
//! committed). Design: `docs/design/twopc.md`.

use crate::backend::conn::HiddenQueryError;
use crate::backend::pool::Pool;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::exec::decisions::DecisionError;
use crate::failpoint::{self, abort_at, Failpoint};
use crate::node::Node;
use crate::session::conn::Session;
use crate::wire::tx;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A new transaction id: `hr_<node_id>_<16 hex digits>` (well under
/// PostgreSQL's 199 bytes).
pub fn new_gid(node_id: u64) -> String {
    format!("hr_{node_id}_{:016x}", rand::random::<u64>())
}

/// Whether `gid` has the shape of a transaction id made by [`new_gid`].
pub fn is_hotrepart_gid(gid: &str) -> bool {
    let Some(rest) = gid.strip_prefix("hr_") else {
        return false;
    };
    let Some((node, rnd)) = rest.split_once('_') else {
        return false;
    };
    !node.is_empty()
        && node.bytes().all(|c| c.is_ascii_digit())
        && rnd.len() == 16
        && rnd.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Records `commit` for `gid` within the configured timeout (`since`: see
/// [`crate::exec::decisions::DecisionLog::decide`]).
pub(crate) async fn record(
    node: &Node,
    gid: &str,
    commit: bool,
    since: Option<u64>,
) -> Result<bool, DecisionError> {
    let t = Duration::from_millis(node.cfg().twopc_decision_timeout_ms);
    match tokio::time::timeout(t, node.decisions.decide(gid, commit, since)).await {
        Ok(r) => r,
        Err(_) => Err(DecisionError::Timeout),
    }
}

/// A transaction that changed the schema, before it is prepared: the
/// refusal when a sharded table now has a unique index that does not
/// include its shard key ([`crate::exec::unique`]), read on shard `t`
/// inside the transaction.
async fn unique_outside_key<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
) -> Option<Refusal> {
    let keys = crate::exec::unique::sharded_keys(&s.node.routing.catalog.load());
    let sql = crate::exec::unique::check_sql(&keys)?;
    let b = s.be.slots[t].conn.as_mut()?;
    match b.hidden_query(&sql).await {
        Ok(rows) => {
            let found: Vec<(String, String, String)> = rows
                .into_iter()
                .filter_map(|r| {
                    let mut r = r.into_iter();
                    Some((r.next()??, r.next()??, r.next()??))
                })
                .collect();
            (!found.is_empty()).then(|| {
                Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "{}; the transaction was rolled back on every shard",
                        crate::exec::unique::explain(&found, &keys)
                    ),
                )
            })
        }
        Err(HiddenQueryError::Server { code, message }) => Some(Refusal::new(
            sqlstate::intern(&code),
            format!("{message} (checking the unique indexes of sharded tables on shard {}); the transaction was rolled back on every shard", s.node.routing.shard_name(t)),
        )),
        Err(HiddenQueryError::Wire(e)) => {
            b.broken = true;
            Some(Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                format!("the connection to shard {} was lost before the commit ({e}); the transaction was rolled back", s.node.routing.shard_name(t)),
            ))
        }
    }
}

/// Commits atomically the transactions open on `shards` (each attached to
/// `s` and inside a transaction block, nothing owed). On return every
/// backend of `shards` is outside a transaction (or marked broken).
///
/// Err: what the client is told — the shard's own error when a PREPARE
/// failed (everything rolled back), 40001 when the final decision was to
/// roll back, 58000 when the commit is decided but some shard could not be
/// committed yet (the resolver completes it), 08007 when the decision could
/// not be recorded and its outcome is unknown.
///
/// Not cancel-safe (it is never raced in `select!`).
pub(crate) async fn commit<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    shards: &[usize],
) -> Result<(), Refusal> {
    let node = s.node.clone();
    let name = |t: usize| node.routing.shard_name(t);
    let gid = new_gid(node.cfg().effective_node_id());
    let prepare = format!("PREPARE TRANSACTION '{gid}'");
    // Read before the first PREPARE: a decision for gid cannot have been
    // recorded (and forgotten) before this point.
    let since = node.decisions.horizon();

    // Phase 1, on every written shard at once. Only a backend known to be
    // inside a transaction that has not failed is prepared: PostgreSQL
    // answers PREPARE in an aborted transaction with ROLLBACK and no error.
    let mut failure: Option<Refusal> = None;
    for &t in shards {
        let status = s.be.slots[t].conn.as_ref().map(|b| (b.status, b.unsynced));
        let r = match status {
            None => Some(Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                format!("the connection to shard {} was lost before the commit; the transaction was rolled back on every shard", name(t)),
            )),
            Some((tx::IN_TRANSACTION, false)) => None,
            Some((_, true)) => Some(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("messages sent with Flush but without Sync are still open on shard {}; the transaction was rolled back on every shard (send Sync before COMMIT)", name(t)),
            )),
            Some(_) => Some(Refusal::new(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                format!("the transaction failed on shard {}; it was rolled back on every shard", name(t)),
            )),
        };
        if failure.is_none() {
            failure = r;
        }
    }
    if failure.is_none() && s.txn.schema_changed {
        failure = unique_outside_key(s, shards[0]).await;
    }
    let mut prepared: Vec<usize> = Vec::new();
    if failure.is_none() {
        for (t, r) in run_all(s, shards, &prepare).await {
            match r {
                Ok(()) => prepared.push(t),
                Err(HiddenQueryError::Server { code, message }) => {
                    // PostgreSQL rolled this shard's transaction back itself.
                    let hint = if code == sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE
                        && message.contains("prepared transactions are disabled")
                    {
                        "; hotrepart commits a transaction that writes to several shards, and a schema change (DDL) on several shards, with two-phase commit, which needs max_prepared_transactions > 0 on every shard: set it (e.g. to max_connections) in the shard's postgresql.conf and restart it"
                    } else {
                        ""
                    };
                    failure.get_or_insert_with(|| Refusal::new(
                        sqlstate::intern(&code),
                        format!(
                            "{message} (preparing the commit on shard {}); the transaction was rolled back on every shard{hint}",
                            name(t)
                        ),
                    ));
                }
                Err(HiddenQueryError::Wire(e)) => {
                    tracing::warn!(error = %e, shard = t, %gid, "connection lost during PREPARE TRANSACTION");
                    failure.get_or_insert_with(|| Refusal::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "the connection to shard {} was lost while preparing the commit; the transaction was rolled back (if it was prepared there, the resolver rolls it back)",
                            name(t)
                        ),
                    ));
                }
            }
        }
    }
    if let Some(r) = failure {
        let sql = format!("ROLLBACK PREPARED '{gid}'");
        for &t in &prepared {
            if !finish_on(s, t, &sql).await {
                tracing::warn!(shard = t, %gid, "cannot roll back a prepared transaction; the resolver will");
            }
        }
        // Shards never prepared (or not reached) roll back.
        for &t in shards {
            if let Some(b) = s.be.slots[t].conn.as_mut() {
                if b.unsynced {
                    // Never pooled: closing it rolls back.
                    b.broken = true;
                } else if b.status != tx::IDLE {
                    if let Err(e) = b.hidden_query("ROLLBACK").await {
                        tracing::warn!(error = %e, shard = t, "rolling back after a failed PREPARE");
                        b.broken = true;
                    }
                }
            }
        }
        return Err(r);
    }
    abort_at(Failpoint::AfterPrepare);

    // The decision: the commit point.
    let commit = match record(&node, &gid, true, since).await {
        Ok(c) => c,
        // Nothing recorded and no commit recordable for gid: either a
        // resolver decided rollback (then swept it) or nobody decided;
        // rolling back agrees with both.
        Err(DecisionError::TooLate) => {
            tracing::warn!(%gid, "the commit decision came after the resolver's grace period; rolling back");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, %gid, "cannot record the commit decision; trying to record a rollback");
            match record(&node, &gid, false, since).await {
                Ok(c) => c,
                Err(e2) => match node.decisions.decision(&gid) {
                    Some(c) => c,
                    None => {
                        tracing::error!(error = %e2, %gid, "2PC decision unknown; the resolver will finish the transaction");
                        let names: Vec<String> = prepared.iter().map(|&t| name(t)).collect();
                        return Err(Refusal::new(
                            sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
                            format!(
                                "the commit decision could not be recorded ({e}); the transaction {gid} stays prepared on shard(s) {} and the resolver will commit or roll it back: its outcome is unknown now",
                                names.join(", ")
                            ),
                        ));
                    }
                },
            }
        }
    };
    abort_at(Failpoint::AfterDecision);

    // Phase 2.
    let sql = if commit {
        format!("COMMIT PREPARED '{gid}'")
    } else {
        format!("ROLLBACK PREPARED '{gid}'")
    };
    let mut pending = Vec::new();
    if failpoint::active(Failpoint::AfterFirstCommit) {
        // One shard after the other, so that exactly one has committed when
        // the failpoint fires.
        for (i, &t) in prepared.iter().enumerate() {
            if !finish_on(s, t, &sql).await {
                pending.push(name(t));
            } else if commit && i == 0 {
                abort_at(Failpoint::AfterFirstCommit);
            }
        }
    } else {
        // Every shard at once; a shard that failed is retried on a fresh
        // backend.
        for (t, r) in run_all(s, &prepared, &sql).await {
            let done = match r {
                Ok(()) => true,
                Err(HiddenQueryError::Server { code, .. })
                    if code == sqlstate::UNDEFINED_OBJECT =>
                {
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, shard = t, "{sql} failed; retrying on a fresh connection");
                    let pool = s.pool(t);
                    let wait = node.cfg().pool_timeout();
                    finish_with_pool(&pool, t, &sql, wait).await
                }
            };
            if !done {
                pending.push(name(t));
            }
        }
    }
    if pending.is_empty() {
        node.decisions.finished(&gid);
    } else {
        tracing::warn!(%gid, commit, shards = ?pending, "2PC outcome not applied everywhere; the resolver will finish it");
    }
    match (commit, pending.is_empty()) {
        (true, true) => Ok(()),
        // Not class 40 (the transaction is not rolled back, and retrying it
        // would apply it twice), not 08 (the client's connection is fine)
        // and not 08007 (the outcome is known): a failure of a system
        // outside the client's database session, which the node repairs.
        (true, false) => Err(Refusal::new(
            sqlstate::SYSTEM_ERROR,
            format!(
                "the transaction IS committed (decision recorded for {gid}), but COMMIT PREPARED could not be completed yet on shard(s) {}; the resolver completes it, so its rows appear there shortly — do not retry the transaction",
                pending.join(", ")
            ),
        )),
        (false, _) => Err(Refusal::new(
            sqlstate::SERIALIZATION_FAILURE,
            format!("the transaction was rolled back on every shard: a rollback was recorded for it ({gid}) before its commit could be (a resolver found it in doubt, or the decision log failed); it is safe to retry"),
        )),
    }
}

/// Runs `sql` on the session's backends of `shards` at once (those
/// attached), and returns each shard's result in the order of `shards`. A
/// backend whose connection broke is marked broken.
///
/// Not cancel-safe: a query cut short leaves its backend owing replies.
async fn run_all<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    shards: &[usize],
    sql: &str,
) -> Vec<(usize, Result<(), HiddenQueryError>)> {
    let futs: Vec<_> =
        s.be.slots
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| shards.contains(i))
            .filter_map(|(i, sl)| sl.conn.as_mut().map(|b| (i, b)))
            .map(|(i, b)| async move {
                let r = b.hidden_query(sql).await.map(|_| ());
                if matches!(r, Err(HiddenQueryError::Wire(_))) {
                    b.broken = true;
                }
                (i, r)
            })
            .collect();
    let mut out = join_all(futs).await;
    out.sort_by_key(|(i, _)| shards.iter().position(|t| t == i));
    out
}

/// Polls every future until all are ready (the crate has no `futures`
/// dependency); outputs in the order given.
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Runs `sql` (COMMIT/ROLLBACK PREPARED) for shard `t`: on the session's
/// backend, then up to three times on a fresh backend. A gid already gone
/// (42704: the resolver ended it the same way — the decision is final)
/// counts as done.
async fn finish_on<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
    sql: &str,
) -> bool {
    if let Some(b) = s.be.slots[t].conn.as_mut() {
        match b.hidden_query(sql).await {
            Ok(_) => return true,
            Err(HiddenQueryError::Server { code, .. }) if code == sqlstate::UNDEFINED_OBJECT => {
                return true
            }
            Err(e) => {
                tracing::warn!(error = %e, shard = t, "{sql} failed; retrying on a fresh connection");
                if matches!(e, HiddenQueryError::Wire(_)) {
                    b.broken = true;
                }
            }
        }
    }
    let pool = s.pool(t);
    let wait = s.node.cfg().pool_timeout();
    finish_with_pool(&pool, t, sql, wait).await
}

async fn finish_with_pool(pool: &Arc<Pool>, t: usize, sql: &str, wait: Duration) -> bool {
    let fp = crate::backend::state::SessionState::default().fingerprint();
    for attempt in 0..3u32 {
        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        let mut b = match pool.get(fp, wait).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, shard = t, "no connection to finish a prepared transaction");
                continue;
            }
        };
        match b.hidden_query(sql).await {
            Ok(_) => {
                b.release();
                return true;
            }
            Err(HiddenQueryError::Server { code, .. }) if code == sqlstate::UNDEFINED_OBJECT => {
                b.release();
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, shard = t, attempt, "{sql} failed");
                if matches!(e, HiddenQueryError::Wire(_)) {
                    b.broken = true;
                }
                b.release();
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_have_the_documented_shape() {
        let g = new_gid(42);
        assert!(g.starts_with("hr_42_"), "{g}");
        assert!(g.len() <= 199);
        assert!(is_hotrepart_gid(&g));
        assert!(!is_hotrepart_gid("hr_x_0123456789abcdef"));
        assert!(!is_hotrepart_gid("hr_1_0123"));
        assert!(!is_hotrepart_gid("other_1_0123456789abcdef"));
    }

    #[test]
    fn the_first_decision_is_final() {
        use crate::exec::decisions::{DecisionLog, LocalDecisions};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let d = LocalDecisions::default();
        assert_eq!(d.decision("g"), None);
        assert!(!rt.block_on(d.decide("g", false, None)).unwrap_or(true));
        assert!(!rt.block_on(d.decide("g", true, Some(0))).unwrap_or(true));
        assert_eq!(d.decision("g"), Some(false));
        d.finished("g");
        assert_eq!(d.decision("g"), None);
        let own = LocalDecisions::for_node(3);
        assert!(own.may_resolve(&new_gid(3)));
        assert!(!own.may_resolve(&new_gid(31)));
        assert!(d.may_resolve(&new_gid(31)));
    }

    #[test]
    fn sqlstates_are_interned_and_checked() {
        assert_eq!(sqlstate::intern("23505"), "23505");
        assert!(std::ptr::eq(
            sqlstate::intern("23505"),
            sqlstate::intern("23505")
        ));
        assert_eq!(sqlstate::intern("bad"), "XX000");
    }
}
