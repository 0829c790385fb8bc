//! EXPLAIN through a node with several shards (simple query protocol).
//!
//! The statement after `EXPLAIN [options]` (split by the router's
//! classification, `hotrepart_router::classify::Explain`) is routed like
//! any other; the node then runs the same EXPLAIN on the shard(s) it goes
//! to and answers one `QUERY PLAN` result: first lines saying where the statement runs and
//! how the answers are merged, then each shard's plan, indented under its
//! name. A single-shard EXPLAIN in a non-text format is passed through
//! unchanged (no lines are added to JSON/XML/YAML); a multi-shard one is
//! refused in those formats, as is EXPLAIN ANALYZE of a write to several
//! shards (it would execute the write).

use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::Target;
use crate::session::conn::Session;
use crate::wire::{self, Severity};
use crate::wire::{command_complete, rfq};
use bytes::BufMut;
use hotrepart_router::classify::Explain;
use hotrepart_router::route::{Combined, MergePlan, ShardCol};
use tokio::io::{AsyncRead, AsyncWrite};

/// Answers an EXPLAIN (simple protocol).
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    ex: Explain<'_>,
) -> Result<(), SessionError> {
    let in_tx = s.txn.open();
    s.pin_routing();
    let d = match s.node.decide(ex.inner, None, &s.route_ctx()) {
        Ok(d) => d,
        Err(r) => return refuse(s, r, in_tx).await,
    };
    if d.statements != 1 {
        let r = Refusal::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "EXPLAIN of several statements".into(),
        );
        return refuse(s, r, in_tx).await;
    }
    let names = |s: &Session<S>, shards: &[usize]| -> String {
        shards
            .iter()
            .map(|&i| s.node.routing.shard_name(i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines: Vec<String> = Vec::new();
    // (shard, the EXPLAIN it runs)
    let mut runs: Vec<(usize, String)> = Vec::new();
    match &d.target {
        Target::Shard(_) | Target::Any => {
            let t = match d.target {
                Target::Shard(t) => t,
                _ => s.node.routing.home_index(),
            };
            if ex.analyze && d.write {
                if let Err(r) = s.check_write(&d, t) {
                    return refuse(s, r, in_tx).await;
                }
            }
            if ex.text {
                lines.push(format!(
                    "hotrepart: RUN ON ONE shard {}{}",
                    s.node.routing.shard_name(t),
                    if matches!(d.target, Target::Any) {
                        " (the statement reads no sharded table: any shard answers)"
                    } else {
                        ""
                    }
                ));
            }
            runs.push((t, format!("{} {}", ex.prefix, ex.inner)));
        }
        Target::Multi { shards, sqls } => {
            if !ex.text {
                let r = Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "EXPLAIN of a statement on several shards is available in FORMAT TEXT only"
                        .into(),
                );
                return refuse(s, r, in_tx).await;
            }
            if ex.analyze && d.write {
                let r = Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "EXPLAIN ANALYZE of a write to several shards is not supported (it would run the write)".into(),
                );
                return refuse(s, r, in_tx).await;
            }
            lines.push(format!(
                "hotrepart: RUN ON ALL: {} shards ({})",
                shards.len(),
                names(s, shards)
            ));
            match (&d.merge, sqls) {
                (Some(plan), _) => {
                    lines.extend(
                        describe(plan)
                            .into_iter()
                            .map(|l| format!("hotrepart: {l}")),
                    );
                    lines.push(format!("hotrepart: each shard runs: {}", plan.shard_sql));
                    for &t in shards {
                        runs.push((t, format!("{} {}", ex.prefix, plan.shard_sql)));
                    }
                }
                (None, Some(parts)) => {
                    lines.push(
                        "hotrepart: rows split by shard: each shard inserts its own rows".into(),
                    );
                    for (&t, sql) in shards.iter().zip(parts) {
                        runs.push((t, format!("{} {sql}", ex.prefix)));
                    }
                }
                (None, None) => {
                    lines.push("hotrepart: answers concatenated (no merge needed)".into());
                    for &t in shards {
                        runs.push((t, format!("{} {}", ex.prefix, ex.inner)));
                    }
                }
            }
        }
    }
    let multi = runs.len() > 1 || matches!(d.target, Target::Multi { .. });
    for (t, sql) in runs {
        if let Err(r) = s.ensure_backend(t).await? {
            return refuse(s, r, in_tx).await;
        }
        let res = match s.be.slots[t].conn.as_mut() {
            Some(b) => b.hidden_query(&sql).await,
            None => continue,
        };
        match res {
            Ok(rows) => {
                if multi {
                    lines.push(format!(
                        "hotrepart: shard {}:",
                        s.node.routing.shard_name(t)
                    ));
                }
                for r in rows {
                    let l = r.into_iter().next().flatten().unwrap_or_default();
                    // A multi-line value (JSON) stays one row.
                    lines.push(if multi { format!("  {l}") } else { l });
                }
            }
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                let m = format!("{message} (on shard {})", s.node.routing.shard_name(t));
                wire::error_response(&mut s.out, Severity::Error, &code, &m);
                if in_tx {
                    s.txn.failed = true;
                }
                return finish(s, in_tx).await;
            }
            Err(e) => {
                if let Some(b) = s.be.slots[t].conn.as_mut() {
                    b.broken = true;
                }
                let r = Refusal::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!("EXPLAIN failed on a shard: {e}"),
                );
                return refuse(s, r, in_tx).await;
            }
        }
    }
    wire::text_row_description(&mut s.out, &["QUERY PLAN"]);
    for l in &lines {
        // The shards' lines were read as UTF-8; the client reads its own
        // encoding.
        let l = s.enc.encode_lossy(l);
        wire::text_data_row(&mut s.out, &[Some(l)]);
    }
    s.out.put_slice(&command_complete("EXPLAIN"));
    finish(s, in_tx).await
}

/// How the answers of a merge plan are combined, one line per step.
fn describe(p: &MergePlan) -> Vec<String> {
    let mut v = Vec::new();
    match &p.aggregate {
        Some(a) => {
            let partials = a
                .shard_cols
                .iter()
                .filter(|c| matches!(c, ShardCol::Partial(_)))
                .count();
            let avgs = a
                .outputs
                .iter()
                .filter(|o| matches!(o, Combined::Avg { .. }))
                .count();
            v.push(format!(
                "merge: {partials} partial aggregate(s) from every shard combined {}{}",
                if a.group_by.is_empty() {
                    "into one row".to_string()
                } else {
                    format!("by group ({} key column(s))", a.group_by.len())
                },
                if avgs > 0 {
                    format!("; avg computed as sum / count ({avgs})")
                } else {
                    String::new()
                }
            ));
            if a.having.is_some() {
                v.push("merge: HAVING applied after combining".into());
            }
        }
        None if p.order_by.is_empty() => v.push("merge: rows concatenated".into()),
        None if p.shards_sorted => v.push(format!(
            "merge: k-way merge of the shards' sorted rows ({} sort key(s))",
            p.order_by.len()
        )),
        None => {}
    }
    if p.distinct {
        v.push("merge: DISTINCT applied after combining".into());
    }
    if !p.distinct_on.is_empty() {
        v.push(format!(
            "merge: DISTINCT ON ({} key column(s)): the first merged row of each group kept",
            p.distinct_on.len()
        ));
    }
    if !p.order_by.is_empty() && (p.aggregate.is_some() || !p.shards_sorted) {
        v.push(format!(
            "merge: sorted in the node ({} sort key(s))",
            p.order_by.len()
        ));
    }
    if p.hidden > 0 {
        v.push(format!(
            "merge: {} hidden column(s) for sorting, stripped",
            p.hidden
        ));
    }
    if p.limit.is_some() || p.offset.is_some() {
        v.push(format!(
            "merge: OFFSET {:?} LIMIT {:?} applied after the merge",
            p.offset, p.limit
        ));
    }
    v
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    r: Refusal,
    in_tx: bool,
) -> Result<(), SessionError> {
    s.push_error(&r);
    finish(s, in_tx).await
}

async fn finish<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    in_tx: bool,
) -> Result<(), SessionError> {
    let status = s.client_status();
    s.out.put_slice(&rfq(status));
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}
