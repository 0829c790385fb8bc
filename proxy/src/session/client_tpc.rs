//! A client's own two-phase commit (issue 14): `PREPARE TRANSACTION`,
//! `COMMIT PREPARED`, `ROLLBACK PREPARED`, in the simple and the extended
//! protocol (in a batch, as its only statement run: [`Session::two_phase_batch`]).
//!
//! - `PREPARE TRANSACTION` goes to the one shard the transaction wrote to
//!   (or, when it wrote nowhere, the shard it used, else the home shard),
//!   after the shards it only read have committed — as the client's
//!   COMMIT does. A transaction that wrote to several shards is refused
//!   (0A000) and rolled back, as PostgreSQL rolls back a transaction it
//!   cannot prepare: hotrepart commits those with its own two-phase
//!   commit, and a prepared transaction must live on one server.
//! - `COMMIT PREPARED`/`ROLLBACK PREPARED` go to the shard that holds the
//!   identifier in this database (`pg_prepared_xacts`, asked on every
//!   shard); none: PostgreSQL's 42704; several: refused, as the node
//!   cannot tell which one the client means.
//! - Identifiers beginning with `hr_` are the node's own (its 2PC and the
//!   resolver that finishes them): refused (42602) for clients.
//!
//! Moves stay safe: a prepared transaction is an open transaction to a
//! reshard's cut-over, which waits for it (and fails the job, not the
//! data, if it stays prepared too long).

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::wire::{self, fe, Frame};
use hotrepart_router::classify::{Class, TwoPhase, TwoPhaseOp};
use tokio::io::{AsyncRead, AsyncWrite};

/// The prefix of the node's own prepared transactions.
const NODE_GID_PREFIX: &str = "hr_";

/// `s` as an SQL string literal, read the same whatever
/// `standard_conforming_strings` is (as PostgreSQL's `quote_literal`).
fn literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// The refusal of a client's use of the node's own identifiers.
fn reserved(gid: &str) -> Option<Refusal> {
    gid.starts_with(NODE_GID_PREFIX).then(|| {
        Refusal::new(
            sqlstate::INVALID_NAME,
            format!(
                "transaction identifier \"{gid}\" is reserved: hotrepart names its own prepared transactions {NODE_GID_PREFIX}…; choose another identifier"
            ),
        )
    })
}

/// For a query string that holds a two-phase statement among others
/// (passed on as it is where the node need not split it): the refusal
/// when one of them names the node's own identifiers.
pub(super) fn reserved_in(sql: &str) -> Option<Refusal> {
    hotrepart_router::classify::split_statements(sql)?
        .into_iter()
        .filter_map(hotrepart_router::classify::two_phase)
        .find_map(|tp| tp.gid.as_deref().and_then(reserved))
}

/// How a refusal reaches the client: after a Query (the error, then
/// ReadyForQuery), or in an extended-protocol batch (the error, then the
/// rest skipped up to the Sync).
#[derive(Clone, Copy)]
pub(super) enum Via {
    Query,
    Batch { synced: bool },
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn refuse_via(&mut self, via: Via, r: Refusal) {
        match via {
            Via::Query => self.refuse_simple(r),
            Via::Batch { synced } => self.batch_error(&r, synced),
        }
    }

    pub(super) async fn client_two_phase(
        &mut self,
        f: &Frame,
        class: Class<'_>,
        tp: TwoPhase,
    ) -> Result<(), SessionError> {
        let Some(t) = self.two_phase_target(tp, Via::Query).await? else {
            return Ok(());
        };
        match self.switch_to(t).await? {
            Ok(()) => {}
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        }
        self.pass_query(f, class, t);
        Ok(())
    }

    /// The two-phase statement an extended-protocol batch runs (a Bind of
    /// it), if any. Refused when the batch runs other statements too:
    /// where such a statement goes depends on the session's transaction,
    /// which the statements before it change.
    pub(super) fn two_phase_batch(&self, frames: &[Frame]) -> Result<Option<TwoPhase>, Refusal> {
        let mut unnamed: Option<&str> = None;
        let mut named: Vec<(&str, &str)> = Vec::new();
        let mut found: Option<TwoPhase> = None;
        let mut others = false;
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let sql = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    if name.is_empty() {
                        unnamed = Some(sql);
                    } else {
                        named.push((name, sql));
                    }
                }
                fe::BIND => {
                    let _portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let stmt = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let in_batch = if stmt.is_empty() {
                        unnamed
                    } else {
                        named
                            .iter()
                            .rev()
                            .find(|(n, _)| *n == stmt)
                            .map(|(_, s)| *s)
                    };
                    let tp = match in_batch {
                        Some(sql) => hotrepart_router::classify::two_phase(sql),
                        None if stmt.is_empty() => self
                            .unnamed
                            .as_ref()
                            .and_then(Unnamed::sql)
                            .and_then(|sql| hotrepart_router::classify::two_phase(&sql)),
                        None => self
                            .stmts
                            .get(stmt)
                            .and_then(|s| hotrepart_router::classify::two_phase(&s.sql)),
                    };
                    match tp {
                        Some(tp) if found.is_none() => found = Some(tp),
                        _ => others = true,
                    }
                }
                _ => {}
            }
        }
        match found {
            Some(tp) if others => Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "{} must be the only statement of its batch through hotrepart; send a Sync after it",
                    tp.op.name()
                ),
            )),
            found => Ok(found),
        }
    }

    /// The shard a two-phase statement goes to; None when it was answered
    /// here (refused).
    pub(super) async fn two_phase_target(
        &mut self,
        tp: TwoPhase,
        via: Via,
    ) -> Result<Option<usize>, SessionError> {
        let Some(gid) = tp.gid else {
            self.refuse_via(
                via,
                Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "{} through hotrepart needs the transaction identifier as a plain string literal ('…')",
                        tp.op.name()
                    ),
                ),
            );
            return Ok(None);
        };
        if let Some(r) = reserved(&gid) {
            self.refuse_via(via, r);
            return Ok(None);
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        Ok(match tp.op {
            TwoPhaseOp::Prepare => self.prepare_target(via).await?,
            TwoPhaseOp::Commit | TwoPhaseOp::Rollback => {
                if self.txn.open() {
                    self.refuse_via(
                        via,
                        Refusal::new(
                            sqlstate::ACTIVE_SQL_TRANSACTION,
                            format!("{} cannot run inside a transaction block", tp.op.name()),
                        ),
                    );
                    return Ok(None);
                }
                match self.holder_of(&gid).await? {
                    Ok(t) => Some(t),
                    Err(r) => {
                        self.refuse_via(via, r);
                        None
                    }
                }
            }
        })
    }

    /// Where a `PREPARE TRANSACTION` goes; None when it was answered here
    /// (refused: the transaction wrote to several shards).
    async fn prepare_target(&mut self, via: Via) -> Result<Option<usize>, SessionError> {
        if !self.txn.open() {
            // PostgreSQL answers it (a warning: no transaction in progress).
            return Ok(Some(self.default_shard()));
        }
        let writes = self.txn.writes.clone();
        if writes.len() > 1 {
            let names: Vec<String> = writes
                .iter()
                .map(|&w| self.node.routing.shard_name(w))
                .collect();
            self.end_of_transaction().await?;
            self.refuse_via(via, Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot PREPARE a transaction that wrote to several shards ({}): hotrepart commits such a transaction with its own two-phase commit; the transaction was rolled back",
                    names.join(", ")
                ),
            ));
            return Ok(None);
        }
        let primary = writes
            .first()
            .copied()
            .unwrap_or_else(|| self.default_shard());
        if self.be.attached_count() > 1
            || (self.be.attached() && self.be.slots[primary].conn.is_none())
        {
            // The shards only read end first, as for the client's COMMIT.
            let failed = self.txn.failed;
            self.finish_shards_except(!failed, &[primary]).await?;
        }
        // A transaction the node failed: PostgreSQL must see it failed
        // too, so that PREPARE rolls it back (and says ROLLBACK).
        self.poison_if_failed_on(primary).await;
        Ok(Some(primary))
    }

    /// The shard holding prepared transaction `gid` in this database.
    async fn holder_of(&mut self, gid: &str) -> Result<Result<usize, Refusal>, SessionError> {
        let sql = format!(
            "SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE gid = {} AND database = current_database()",
            literal(gid)
        );
        let mut found = Vec::new();
        for t in self.node.routing.live_shards() {
            if let Err(r) = self.ensure_backend(t).await? {
                return Ok(Err(r));
            }
            let Some(b) = self.be.slots[t].conn.as_mut() else {
                continue;
            };
            match b.hidden_query(&sql).await {
                Ok(rows) if !rows.is_empty() => found.push(t),
                Ok(_) => {}
                Err(e) => {
                    b.broken = true;
                    return Ok(Err(Refusal::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "cannot look up prepared transaction \"{gid}\" on shard {}: {e}",
                            self.node.routing.shard_name(t)
                        ),
                    )));
                }
            }
        }
        Ok(match found.as_slice() {
            [t] => Ok(*t),
            [] => Err(Refusal::new(
                sqlstate::UNDEFINED_OBJECT,
                format!("prepared transaction with identifier \"{gid}\" does not exist"),
            )),
            several => Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "prepared transaction identifier \"{gid}\" exists on several shards ({}); finish it on each shard directly",
                    several
                        .iter()
                        .map(|&t| self.node.routing.shard_name(t))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn literals_read_back_whatever_the_setting() {
        assert_eq!(super::literal("a1"), "'a1'");
        assert_eq!(super::literal("it's"), "'it''s'");
        assert_eq!(super::literal("a\\b'"), "E'a\\\\b'''");
    }
}
