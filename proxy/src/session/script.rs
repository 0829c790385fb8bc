//! A simple-Query string whose statements go to different shards, run
//! statement by statement as PostgreSQL runs a multi-statement string.
//!
//! PostgreSQL runs the statements of one simple Query in an *implicit
//! transaction block*: all of them commit at the end of the string, or
//! none if one fails; `BEGIN` inside the string turns the block into an
//! explicit one (the statements before it belong to it), `COMMIT` ends it
//! and what follows starts a new implicit block. The node does the same
//! with its own transaction machinery: the implicit block is a transaction
//! of the node's (a deferred `BEGIN` on each shard the statements reach),
//! each statement is routed and run on its own, in order, as if the client
//! had sent it alone, and the block ends with the node's `COMMIT` — two-phase
//! commit when several shards wrote ([`crate::exec::twopc`]) — or
//! `ROLLBACK` after an error.
//!
//! Guarantees:
//! - the client sees each statement's replies in order (RowDescription,
//!   DataRow, CommandComplete, notices), then one ReadyForQuery; after an
//!   error the rest of the string is skipped, the implicit block rolled
//!   back on every shard, and the client sees the ErrorResponse and
//!   ReadyForQuery — as from PostgreSQL;
//! - the node's own `BEGIN`/`COMMIT`/`ROLLBACK` around the block show no
//!   reply; a failed commit shows its error;
//! - transaction control inside the implicit block answers as PostgreSQL's
//!   does (`COMMIT` warns 25P01 and commits the statements before it,
//!   savepoints are refused with 25P01, `AND CHAIN` too); statements
//!   PostgreSQL refuses in a transaction block (`VACUUM`, `CREATE INDEX
//!   CONCURRENTLY` …) reach the shards inside the block and get
//!   PostgreSQL's own 25001, as they do directly in a multi-statement
//!   string.
//!
//! Not cut (refused as before): strings with a `COPY` (its data would
//! follow the whole string) and `BEGIN ATOMIC` bodies.

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Decision, Target};
use crate::wire::{self, be, fe, Frame};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, BytesMut};
use hotrepart_router::classify::{split_statements, transaction_statement, TxStatement};
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The statements of a simple-Query string the node should run one by
    /// one ([`Session::run_script`]): several, none of them COPY, on a
    /// node with several shards, not already inside such a run.
    pub(super) fn script_of(&self, sql: &str) -> Option<Vec<String>> {
        if self.part.is_some() || self.node.routing.single_shard() {
            return None;
        }
        let stmts = split_statements(sql)?;
        if stmts.len() < 2
            || stmts
                .iter()
                .any(|s| hotrepart_router::classify::first_keyword_is(s, "copy"))
        {
            return None;
        }
        Some(stmts.into_iter().map(str::to_owned).collect())
    }

    /// Whether a string routed whole (`d`, to `target`) must still run
    /// statement by statement: its statements return rows from several
    /// shards, or mix transaction control with statements on several
    /// shards (or on a shard other than the one the transaction wrote).
    pub(super) fn script_wanted(&self, d: &Decision, target: Option<usize>) -> bool {
        if d.statements < 2 {
            return false;
        }
        let multi = matches!(&d.target, Target::Multi { shards, .. } if shards.len() > 1);
        (multi && (d.returns_rows || d.has_tx_control))
            || (d.has_tx_control
                && (self.be.attached_count() > 1
                    || target.is_some_and(|t| self.txn.writes.iter().any(|&w| w != t))))
    }

    /// Runs the statements of one simple Query one by one, inside the
    /// implicit transaction block PostgreSQL gives such a string (see the
    /// module docs), and answers with one ReadyForQuery.
    pub(super) async fn run_script(&mut self, stmts: Vec<String>) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        self.part = Some(Part {
            from: self.out.len(),
            ..Part::default()
        });
        let r = self.run_script_statements(&stmts).await;
        // The statements' own ReadyForQuery are dropped; the string's is
        // the client's only one.
        self.scan_part();
        self.part = None;
        r?;
        let status = self.client_status();
        self.push_synthetic(rfq(status));
        Ok(())
    }

    async fn run_script_statements(&mut self, stmts: &[String]) -> Result<(), SessionError> {
        // The node opened the current transaction as an implicit block.
        let mut implicit = false;
        let mut failed = false;
        for sql in stmts {
            if !self.txn.open() {
                self.txn.begin = Some("BEGIN".into());
                self.txn.status = TxStatus::InTransaction;
                implicit = true;
            }
            let tx = transaction_statement(sql);
            if implicit {
                let refused = match tx {
                    TxStatement::Begin { options } => {
                        if options && self.be.attached() {
                            Some(Refusal::new(
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "BEGIN with transaction modes (isolation level, read only) after other statements of the same query string is not supported by hotrepart when the statements go to different shards; put BEGIN first".into(),
                            ))
                        } else {
                            if options {
                                self.txn.begin = Some(sql.clone());
                            }
                            // The implicit block becomes the client's
                            // transaction, the statements before it included.
                            implicit = false;
                            self.out.put_slice(&command_complete("BEGIN"));
                            continue;
                        }
                    }
                    TxStatement::Commit { chain: true } | TxStatement::Rollback { chain: true } => {
                        let what = if matches!(tx, TxStatement::Commit { .. }) {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        Some(Refusal::new(
                            sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                            format!("{what} AND CHAIN can only be used in transaction blocks"),
                        ))
                    }
                    TxStatement::Commit { .. } | TxStatement::Rollback { .. } => {
                        // PostgreSQL warns and ends the implicit block.
                        warning(
                            &mut self.out,
                            sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                            "there is no transaction in progress",
                        );
                        let commit = matches!(tx, TxStatement::Commit { .. });
                        implicit = false;
                        if !self.end_implicit(commit).await? {
                            failed = true;
                            break;
                        }
                        let tag = if commit { "COMMIT" } else { "ROLLBACK" };
                        self.out.put_slice(&command_complete(tag));
                        continue;
                    }
                    TxStatement::Savepoint(what) => Some(Refusal::new(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        format!("{what} can only be used in transaction blocks"),
                    )),
                    TxStatement::TwoPhase | TxStatement::Other => None,
                };
                if let Some(r) = refused {
                    let mut e = BytesMut::new();
                    wire::error_response(&mut e, wire::Severity::Error, r.code, &r.message);
                    self.out.put_slice(&e);
                    failed = true;
                    break;
                }
            }
            Box::pin(self.on_query(query_frame(sql))).await?;
            if !self.be.owed.is_empty() {
                self.drain_owed().await?;
            }
            self.scan_part();
            if self.part.as_ref().is_some_and(|p| p.failed) {
                failed = true;
                break;
            }
        }
        if failed && self.txn.open() && !implicit {
            // An explicit block stays open, failed, as on PostgreSQL.
            self.txn.failed = true;
        }
        if implicit && self.txn.open() {
            self.end_implicit(!failed).await?;
        }
        Ok(())
    }

    /// Ends the node's implicit block: COMMIT (two-phase when several
    /// shards wrote) or ROLLBACK, its CommandComplete not shown. False:
    /// it failed (its error is queued for the client).
    pub(super) async fn end_implicit(&mut self, commit: bool) -> Result<bool, SessionError> {
        self.scan_part();
        if let Some(p) = self.part.as_mut() {
            p.failed = false;
            p.hide_complete = true;
        }
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        let r = Box::pin(self.on_query(query_frame(sql))).await;
        let r = match r {
            Ok(()) if !self.be.owed.is_empty() => self.drain_owed().await,
            other => other,
        };
        self.scan_part();
        let ok = match self.part.as_mut() {
            Some(p) => {
                p.hide_complete = false;
                !std::mem::take(&mut p.failed)
            }
            None => true,
        };
        r?;
        Ok(ok)
    }
}

/// A simple Query message carrying `sql`.
pub(super) fn query_frame(sql: &str) -> Frame {
    let mut b = BytesMut::with_capacity(sql.len() + 6);
    wire::frame(&mut b, fe::QUERY, |o| wire::put_cstr(o, sql));
    Frame { raw: b.freeze() }
}

/// A NoticeResponse of severity WARNING, as PostgreSQL sends one.
fn warning(out: &mut BytesMut, code: &str, msg: &str) {
    wire::frame(out, be::NOTICE_RESPONSE, |o| {
        for (field, value) in [
            (wire::field::SEVERITY, "WARNING"),
            (wire::field::SEVERITY_NONLOCALIZED, "WARNING"),
            (wire::field::CODE, code),
            (wire::field::MESSAGE, msg),
        ] {
            o.put_u8(field);
            wire::put_cstr(o, value);
        }
        o.put_u8(0);
    });
}
