//! `CREATE DATABASE` / `DROP DATABASE` on every shard.
//!
//! PostgreSQL runs neither inside a transaction block, so they cannot be
//! made atomic across shards with two-phase commit. The node runs the
//! client's statement, unchanged, on one shard after the other (in the
//! routing table's shard order) and stops at the first failure; the client
//! then gets PostgreSQL's SQLSTATE and message, with the shards where the
//! statement did and did not run.
//!
//! A retry finishes the job: `CREATE DATABASE` on a shard where the
//! database already exists (42P04), and `DROP DATABASE` on a shard where
//! it does not exist (3D000), count as done on that shard — but only when
//! the statement ran on some other shard, or the database is on some shards
//! and not on others: when it exists on every shard (CREATE) or on none
//! (DROP), nothing changed and the client gets PostgreSQL's own error, as
//! directly. A shard counted as done this way is named in a NOTICE. (Hence
//! a database created on a shard by hand, under the same name, is adopted
//! by a later CREATE DATABASE through the node.)
//!
//! Before `DROP DATABASE` the node closes its own idle pooled connections
//! to that database (PostgreSQL refuses to drop a database in use);
//! connections of other nodes or clients still in use make the shard
//! answer 55006, reported as any failure. Inside a transaction block the
//! statement goes to the shards as other DDL does, and PostgreSQL answers
//! (25001).

use crate::error::sqlstate;
use crate::error::SessionError;
use crate::session::conn::Session;
use crate::wire::{self, command_complete, rfq, Severity};
use bytes::BufMut;
use hotrepart_router::classify::DatabaseStatement;
use tokio::io::{AsyncRead, AsyncWrite};

/// Runs `sql` (a [`DatabaseStatement`] `db`) on `shards`, one at a time,
/// outside a transaction block.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    db: &DatabaseStatement,
    shards: &[usize],
    sql: &str,
) -> Result<(), SessionError> {
    let verb = if db.create {
        "CREATE DATABASE"
    } else {
        "DROP DATABASE"
    };
    if !db.create {
        for ((_, database, _), pool) in s.node.pools.all() {
            if database == db.name {
                pool.close_idle();
            }
        }
    }
    let names = |s: &Session<S>, ts: &[usize]| -> String {
        let v: Vec<String> = ts.iter().map(|&t| s.node.routing.shard_name(t)).collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    // Shards where it ran, where it was already done (see the module
    // docs), and PostgreSQL's answer there.
    let mut ran = Vec::new();
    let mut already: Vec<(usize, String, String)> = Vec::new();
    let mut failed: Option<(usize, String, String)> = None;
    for &t in shards {
        if let Err(r) = s.ensure_backend(t).await? {
            failed = Some((t, r.code.to_owned(), r.message));
            break;
        }
        s.note_sql(sql, t);
        let res = match s.be.slots[t].conn.as_mut() {
            Some(b) => b.hidden_query(sql).await,
            None => {
                failed = Some((
                    t,
                    sqlstate::CONNECTION_FAILURE.to_owned(),
                    "no connection to the shard".to_owned(),
                ));
                break;
            }
        };
        match res {
            Ok(_) => ran.push(t),
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                let done_there = if db.create {
                    code == sqlstate::DUPLICATE_DATABASE
                } else {
                    code == sqlstate::INVALID_CATALOG_NAME
                };
                if done_there {
                    already.push((t, code, message));
                } else {
                    failed = Some((t, code, message));
                    break;
                }
            }
            Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                if let Some(b) = s.be.slots[t].conn.as_mut() {
                    b.broken = true;
                }
                failed = Some((
                    t,
                    sqlstate::CONNECTION_FAILURE.to_owned(),
                    format!("the connection to the shard broke: {e}; whether the statement ran there is unknown"),
                ));
                break;
            }
        }
    }
    let done: Vec<usize> = ran
        .iter()
        .copied()
        .chain(already.iter().map(|a| a.0))
        .collect();
    if let Some((t, code, msg)) = failed {
        let rest: Vec<usize> = shards
            .iter()
            .copied()
            .filter(|x| *x != t && !done.contains(x))
            .collect();
        let m = format!(
            "{msg} (on shard {}); {verb} is done on shard(s) {} and not on shard(s) {} (it cannot run in a transaction, so it is not undone): run the statement again to finish",
            s.node.routing.shard_name(t),
            names(s, &done),
            names(s, &std::iter::once(t).chain(rest).collect::<Vec<_>>()),
        );
        wire::error_response(&mut s.out, Severity::Error, &code, &m);
    } else if ran.is_empty() && !already.is_empty() {
        // Already so on every shard: nothing changed; PostgreSQL's answer.
        let (_, code, msg) = &already[0];
        wire::error_response(&mut s.out, Severity::Error, code, msg);
    } else {
        if !already.is_empty() {
            let ts: Vec<usize> = already.iter().map(|a| a.0).collect();
            let how = if db.create {
                "already existed"
            } else {
                "did not exist"
            };
            let m = format!(
                "database \"{}\" {how} on shard(s) {}; {verb} ran on shard(s) {}",
                db.name,
                names(s, &ts),
                names(s, &ran)
            );
            wire::notice_response(&mut s.out, "00000", &m);
        }
        s.out.put_slice(&command_complete(verb));
    }
    if !db.create {
        // On every node: a database created again under this name is
        // another catalog.
        let node = s.node.clone();
        if let Err(e) = Box::pin(node.schema_changed(&db.name)).await {
            tracing::warn!(database = %db.name, error = %e, "could not record the dropped database in the replicated catalog; retrying in the background");
        }
    }
    let status = s.client_status();
    s.out.put_slice(&rfq(status));
    s.end_of_transaction().await?;
    Ok(())
}
