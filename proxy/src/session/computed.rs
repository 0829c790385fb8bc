//! Computed shard keys of `INSERT … VALUES` (issue 14): the home shard
//! evaluates the key expressions once, inside the client's transaction,
//! and the statement is routed with their values written in as literals
//! (`hotrepart_router::route::computed_keys`, which says what may be
//! evaluated). Simple protocol, one statement; several shards only (on one
//! shard the statement goes through unread).

use super::conn::*;
use crate::backend::conn::HiddenQueryError;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use hotrepart_router::route::ComputedKeys;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The computed keys of a refused statement, if that is why it was
    /// refused.
    pub(super) fn computed_keys_of(&self, sql: &str) -> Option<ComputedKeys> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::computed_keys(&snap, &self.ns, sql)
    }

    /// Evaluates the keys on the home shard and runs the statement with
    /// their values, as if the client had sent it so.
    pub(super) async fn insert_computed(&mut self, ck: ComputedKeys) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let home = self.node.routing.home_index();
        let values = match self.evaluate_keys(&ck, home).await? {
            Ok(v) => v,
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        };
        let sql = ck.substitute(&values);
        if self.computed_keys_of(&sql).is_some() {
            // Never: the keys are literals now. Refused rather than looped.
            self.refuse_simple(Refusal::new(
                sqlstate::INTERNAL_ERROR,
                "the computed shard keys of this INSERT could not be written in".into(),
            ));
            return Ok(());
        }
        Box::pin(self.on_query(super::script::query_frame(&sql))).await
    }

    async fn evaluate_keys(
        &mut self,
        ck: &ComputedKeys,
        home: usize,
    ) -> Result<Result<Vec<String>, Refusal>, SessionError> {
        if let Err(r) = self.switch_to(home).await? {
            return Ok(Err(r));
        }
        let lost = || {
            Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                "lost the home shard's connection while computing the shard keys of an INSERT"
                    .into(),
            )
        };
        let Some(b) = self.be.slots[home].conn.as_mut() else {
            return Ok(Err(lost()));
        };
        let rows = match b.hidden_query(&ck.eval_sql()).await {
            Ok(rows) => rows,
            Err(HiddenQueryError::Server { code, message }) => {
                if self.txn.open() {
                    self.txn.failed = true;
                }
                return Ok(Err(Refusal::new(sqlstate::intern(&code), message)));
            }
            Err(HiddenQueryError::Wire(e)) => {
                b.broken = true;
                tracing::warn!(error = %e, "computing the shard keys of an INSERT failed");
                return Ok(Err(lost()));
            }
        };
        let row = rows.into_iter().next().unwrap_or_default();
        if row.len() != ck.len() {
            return Ok(Err(lost()));
        }
        let mut values = Vec::with_capacity(row.len());
        for v in row {
            match v {
                Some(v) => values.push(v),
                None => return Ok(Err(Refusal::new(
                    sqlstate::NOT_NULL_VIOLATION,
                    "the shard key of an INSERT row computed to NULL: a shard key must not be NULL"
                        .into(),
                ))),
            }
        }
        Ok(Ok(values))
    }
}
