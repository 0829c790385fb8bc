//! SQL-level `PREPARE` / `EXECUTE`, run as the protocol's named
//! statements: PostgreSQL keeps both in one namespace per session, and the
//! node already keeps the client's protocol statements and prepares them
//! under node-wide names on whichever backend serves the next Bind
//! (`session/extended.rs`). So `PREPARE name (types) AS stmt` becomes a
//! Parse of `name` (the type names turned into OIDs by the shard), and
//! `EXECUTE name (constants)` a Bind (the constants as text parameters),
//! Describe, Execute and Sync of it — routed by its parameters like any
//! Bind, to one shard or to several (concatenated or merged). The replies
//! are those of the simple protocol: CommandComplete `PREPARE` for the
//! ParseComplete, no BindComplete or NoData. `DEALLOCATE` of such a name
//! is answered by the node (`Session::deallocate`).
//!
//! Guarantees: under transaction pooling a statement prepared with SQL
//! runs on any backend and any shard, as a protocol one does; an error is
//! PostgreSQL's (a syntax error, an unknown type or table at PREPARE, an
//! unknown name at EXECUTE: 26000), followed by one ReadyForQuery.
//! `EXECUTE` whose argument is an expression, not a constant, is refused
//! (0A000): the node would have to evaluate it to route.

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::wire::{self, fe, Frame};
use bytes::{BufMut, BytesMut};
use hotrepart_router::classify::{Arg, SqlExecute, SqlPrepare};
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// `PREPARE`: a Parse of the client's name.
    pub(super) async fn sql_prepare(&mut self, p: SqlPrepare<'_>) -> Result<(), SessionError> {
        let oids = if p.types.is_empty() {
            Vec::new()
        } else {
            match self.type_oids(&p.types).await? {
                Ok(o) => o,
                Err(r) => {
                    self.refuse_simple(r);
                    return self.release_if_idle().await;
                }
            }
        };
        let parse = message(fe::PARSE, |o| {
            wire::put_cstr(o, &p.name);
            wire::put_cstr(o, p.body);
            o.put_i16(oids.len() as i16);
            for oid in &oids {
                o.put_u32(*oid);
            }
        });
        self.run_sql_batch(vec![parse, message(fe::SYNC, |_| {})], SqlReply::Prepare)
            .await
    }

    /// `EXECUTE`: Bind, Describe, Execute and Sync of the client's name.
    pub(super) async fn sql_execute(&mut self, e: SqlExecute<'_>) -> Result<(), SessionError> {
        if let Some(Arg::Expr(x)) = e.args.iter().find(|a| matches!(a, Arg::Expr(_))) {
            self.refuse_simple(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("EXECUTE with an argument that is not a constant ({x}) is not supported by hotrepart: it routes EXECUTE by the values of its arguments; pass constants (a string literal, a number, NULL, TRUE/FALSE), or bind the values with the extended protocol"),
            ));
            return Ok(());
        }
        if let Some(s) = self.stmts.get(&e.name) {
            // PostgreSQL checks the count before it runs anything (a failed
            // transaction's own error comes first).
            let declared = crate::exec::merge::exec::parse_body_types(&s.parse).len();
            let n = declared.max(hotrepart_router::classify::highest_parameter(&s.sql));
            if n != e.args.len() && self.txn.client_status() != TxStatus::Failed {
                self.refuse_simple(Refusal::new(
                    sqlstate::SYNTAX_ERROR,
                    format!(
                        "wrong number of parameters for prepared statement \"{}\"",
                        e.name
                    ),
                ));
                return Ok(());
            }
        }
        let bind = message(fe::BIND, |o| {
            wire::put_cstr(o, "");
            wire::put_cstr(o, &e.name);
            o.put_i16(0);
            o.put_i16(e.args.len() as i16);
            for a in &e.args {
                match a {
                    Arg::Value(v) => {
                        o.put_i32(v.len() as i32);
                        o.put_slice(v.as_bytes());
                    }
                    _ => o.put_i32(-1),
                }
            }
            o.put_i16(0);
        });
        let describe = message(fe::DESCRIBE, |o| {
            o.put_u8(wire::PORTAL);
            wire::put_cstr(o, "");
        });
        let execute = message(fe::EXECUTE, |o| {
            wire::put_cstr(o, "");
            o.put_i32(0);
        });
        let frames = vec![bind, describe, execute, message(fe::SYNC, |_| {})];
        self.run_sql_batch(frames, SqlReply::Execute).await
    }

    /// Runs `frames` (ended by Sync) as an extended-protocol batch of the
    /// client's, its replies shown as the simple protocol's (`reply`), and
    /// waits for them. Inside a query string run statement by statement
    /// (`session/script.rs`) its ReadyForQuery is not shown either, and an
    /// error counts as the string's.
    async fn run_sql_batch(
        &mut self,
        frames: Vec<Frame>,
        reply: SqlReply,
    ) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let outer = self.part.take();
        self.part = Some(Part {
            from: self.out.len(),
            keep_ready: outer.is_none(),
            sql_reply: Some(reply),
            ..Part::default()
        });
        self.batch = frames;
        let mut r = Box::pin(self.run_batch(true)).await;
        if r.is_ok() && !self.be.owed.is_empty() {
            r = self.drain_owed().await;
        }
        self.scan_part();
        let inner = self.part.take();
        if let Some(mut o) = outer {
            o.failed |= inner.is_some_and(|p| p.failed);
            o.from = o.from.min(self.out.len());
            self.part = Some(o);
        }
        r
    }

    /// The OIDs of the type names of a `PREPARE`, as the shard that runs
    /// the statements of no table reads them (the session's search_path).
    async fn type_oids(
        &mut self,
        types: &[&str],
    ) -> Result<Result<Vec<u32>, Refusal>, SessionError> {
        let t = self.default_shard();
        let cur = self.be.cur;
        let ran = self.be.slots[cur]
            .conn
            .as_ref()
            .is_some_and(|b| b.unsynced && b.unsynced_ran);
        if ran && !self.in_block_at_sync() {
            // The node's query would end the implicit transaction of the
            // statements sent before: failed with this error instead, as
            // PostgreSQL fails a pipeline.
            self.fail_pipeline(true);
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "PREPARE with parameter types right after statements sent with Flush but without Sync: hotrepart reads the types with a query of its own, which would end their implicit transaction; send Sync first".into(),
            )));
        }
        // What the client sent before (with Flush) is read and ended first,
        // also on the shard of the node's own query (`switch_to` leaves the
        // current one as it is); outside a transaction block that may let
        // its backend go.
        if let Err(r) = self.end_unsynced().await? {
            return Ok(Err(r));
        }
        if let Err(r) = self.switch_to(t).await? {
            return Ok(Err(r));
        }
        let cols: Vec<String> = types
            .iter()
            .map(|ty| {
                format!(
                    "{}::pg_catalog.regtype::pg_catalog.oid",
                    crate::sql::quote_literal(ty)
                )
            })
            .collect();
        let sql = format!("SELECT {}", cols.join(", "));
        let Some(b) = self.be.slots[t].conn.as_mut() else {
            return Ok(Err(lost()));
        };
        match b.hidden_query(&sql).await {
            Ok(rows) => {
                let oids: Option<Vec<u32>> = rows
                    .first()
                    .map(|r| {
                        r.iter()
                            .map(|v| v.as_deref().and_then(|v| v.parse().ok()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(oids.filter(|o| o.len() == types.len()).ok_or_else(lost))
            }
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                Ok(Err(Refusal::new(sqlstate::intern(&code), message)))
            }
            Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                b.broken = true;
                tracing::warn!(error = %e, "reading the types of a PREPARE failed");
                Ok(Err(lost()))
            }
        }
    }

    /// Outside a transaction, after a statement refused with a backend
    /// attached for it and nothing owed: the backends go back to the pool.
    async fn release_if_idle(&mut self) -> Result<(), SessionError> {
        if !self.txn.open() && self.be.owed.is_empty() && !self.be.mid_pipeline() {
            self.end_of_transaction().await?;
        }
        Ok(())
    }
}

fn lost() -> Refusal {
    Refusal::new(
        sqlstate::CONNECTION_FAILURE,
        "the connection to the shard broke while reading the parameter types of PREPARE".into(),
    )
}

/// One protocol message.
fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut b = BytesMut::new();
    wire::frame(&mut b, tag, body);
    Frame { raw: b.freeze() }
}
