//! Rows the node computes before it can route them (issue 14), simple
//! protocol, one statement, several shards only (on one shard the
//! statement goes through unread):
//!
//! - computed shard keys of `INSERT … VALUES`: the home shard evaluates
//!   the key expressions once, inside the client's transaction, and the
//!   statement is routed with their values written in as literals
//!   (`hotrepart_router::route::computed_keys` says what may be evaluated);
//! - `INSERT INTO sharded (cols) SELECT …`: the SELECT runs on the one
//!   shard it routes to, inside the client's transaction, and its rows are
//!   inserted as a multi-row `INSERT … VALUES`, split by key with
//!   two-phase commit like any other. Each column's value goes through
//!   its type's text form: only where that is exactly PostgreSQL's
//!   assignment (the same type, a widening such as integer → bigint, or
//!   any type to text);
//!   any other pair of types is refused (42804, PostgreSQL's words), as
//!   is a source reading several shards (0A000) or more rows than
//!   `max_merge_rows` (54000). A SELECT returning no rows inserts none
//!   without checking the types;
//! - `INSERT INTO sharded VALUES …` without a column list: the table's
//!   columns are read in order (`pg_attribute`, on the home shard, kept
//!   per session until DDL through the node) and written in — also into
//!   an extended-protocol Parse ([`Session::complete_column_lists`]).

use super::conn::*;
use crate::backend::conn::HiddenQueryError;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::Target;
use crate::wire::{self, fe, Frame};
use hotrepart_router::route::{ComputedKeys, InsertSelect, NoColumnList};
use std::sync::Arc;
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

    /// `sql` on shard `t`'s backend (already attached): its rows, or the
    /// refusal the client gets — PostgreSQL's error (which fails an open
    /// transaction, as it failed it on the shard) or a lost connection
    /// (`what` says what the node was doing).
    pub(super) async fn query_on(
        &mut self,
        t: usize,
        sql: &str,
        what: &str,
    ) -> Result<Vec<Vec<Option<String>>>, Refusal> {
        let lost = |e: String| {
            Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                format!("lost a shard's connection while {what}{e}"),
            )
        };
        // A simple Query drops the backend's unnamed statement (the
        // client's, when its Parse came before with Flush): parsed again.
        self.unnamed_replaced_on(&[t]);
        let Some(b) = self.be.slots[t].conn.as_mut() else {
            return Err(lost(String::new()));
        };
        match b.hidden_query(sql).await {
            Ok(rows) => Ok(rows),
            Err(HiddenQueryError::Server { code, message }) => {
                if self.txn.open() {
                    self.txn.failed = true;
                }
                Err(Refusal::new(sqlstate::intern(&code), message))
            }
            Err(HiddenQueryError::Wire(e)) => {
                b.broken = true;
                tracing::warn!(error = %e, "{what} failed");
                Err(lost(format!(": {e}")))
            }
        }
    }

    async fn evaluate_keys(
        &mut self,
        ck: &ComputedKeys,
        home: usize,
    ) -> Result<Result<Vec<String>, Refusal>, SessionError> {
        if let Err(r) = self.switch_to(home).await? {
            return Ok(Err(r));
        }
        let rows = match self
            .query_on(
                home,
                &ck.eval_sql(),
                "computing the shard keys of an INSERT",
            )
            .await
        {
            Ok(rows) => rows,
            Err(r) => return Ok(Err(r)),
        };
        let row = rows.into_iter().next().unwrap_or_default();
        if row.len() != ck.len() {
            return Ok(Err(Refusal::new(
                sqlstate::INTERNAL_ERROR,
                "the shard keys of an INSERT computed to an unexpected row".into(),
            )));
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

    /// The `INSERT … SELECT` into a sharded table of a refused statement.
    pub(super) fn insert_select_of(&self, sql: &str) -> Option<InsertSelect> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::insert_select(&snap, &self.ns, sql)
    }

    /// Runs the SELECT, then its rows as an `INSERT … VALUES`.
    pub(super) async fn insert_selected(&mut self, is: InsertSelect) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let rows = match self.selected_rows(&is).await? {
            Ok(rows) => rows,
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        };
        if rows.is_empty() {
            self.push_synthetic(crate::wire::command_complete("INSERT 0 0"));
            let status = self.client_status();
            self.push_synthetic(crate::wire::rfq(status));
            return Ok(());
        }
        let sql = is.values_sql(&rows);
        Box::pin(self.on_query(super::script::query_frame(&sql))).await
    }

    async fn selected_rows(
        &mut self,
        is: &InsertSelect,
    ) -> Result<Result<Vec<Vec<Option<String>>>, Refusal>, SessionError> {
        let table = is.table_sql.as_str();
        let mut source = match self.node.decide(&is.select_sql, None, &self.route_ctx()) {
            Ok(d) => d,
            Err(r) => return Ok(Err(r)),
        };
        // A REPEATABLE READ transaction whose snapshot predates a range's
        // move must not read it on the new owner (as any read).
        if let Err(r) = self.check_owner_change(&source) {
            return Ok(Err(r));
        }
        // Functions the SELECT calls, as for any read (one whose body names
        // a sharded table would see one shard's rows).
        let first = self.first_shard(&source);
        if let Err(r) = self.settle_calls(&mut source, first).await? {
            return Ok(Err(r));
        }
        if source.temp {
            // Its rows would come from the backend holding the session's
            // temporary objects, and the write may need two-phase commit,
            // which PostgreSQL refuses after temporary objects were used.
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "INSERT INTO {table} … SELECT from a temporary table is not supported through hotrepart over several shards; insert the rows with VALUES or COPY"
                ),
            )));
        }
        // Where the SELECT runs: one shard, or several whose rows are
        // concatenated (a read that needs no merge; each shard's text hides
        // the rows of a range it holds without owning).
        let parts: Vec<(usize, String)> = match &source.target {
            Target::Shard(t) => vec![(*t, is.select_sql.clone())],
            Target::Any => vec![(self.default_shard(), is.select_sql.clone())],
            Target::Multi { shards, sqls } if source.merge.is_none() => shards
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let text = sqls
                        .as_ref()
                        .and_then(|v| v.get(i).cloned())
                        .unwrap_or_else(|| is.select_sql.clone());
                    (t, text)
                })
                .collect(),
            Target::Multi { .. } => {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "INSERT INTO {table} … SELECT whose SELECT merges rows of several shards (ORDER BY, LIMIT, DISTINCT, aggregates) is not supported through hotrepart; insert from a query the shards can answer row by row, from one shard, or use COPY"
                    ),
                )))
            }
        };
        let n = is.columns_sql.len();
        let max = self.node.cfg().max_merge_rows;
        let names: Vec<String> = (1..=n).map(|i| format!("hr_c{i}")).collect();
        let mut cols = vec!["hr_s.*".to_string()];
        for c in &names {
            cols.push(format!("pg_catalog.pg_typeof(hr_s.{c})::pg_catalog.text"));
        }
        for c in &is.columns_sql {
            cols.push(format!(
                "pg_catalog.pg_typeof((NULL::{table}).{c})::pg_catalog.text"
            ));
        }
        let limit = if max > 0 {
            format!(" LIMIT {}", max + 1)
        } else {
            String::new()
        };
        let mut rows = Vec::new();
        for (t, select) in parts {
            if let Err(r) = self.switch_to(t).await? {
                return Ok(Err(r));
            }
            let sql = format!(
                "SELECT {} FROM ({select}) AS hr_s({}){limit}",
                cols.join(", "),
                names.join(", ")
            );
            match self
                .query_on(t, &sql, "computing the rows of an INSERT … SELECT")
                .await
            {
                Ok(r) => rows.extend(r),
                Err(r) => return Ok(Err(r)),
            }
            if max > 0 && rows.len() > max {
                return Ok(Err(Refusal::new(
                    sqlstate::OUT_OF_MEMORY,
                    format!(
                        "INSERT INTO {table} … SELECT through hotrepart computes its rows in the node: more than {max} rows (max_merge_rows); insert in smaller parts, or use COPY"
                    ),
                )));
            }
        }
        let Some(first) = rows.first() else {
            return Ok(Ok(Vec::new()));
        };
        if first.len() != 3 * n {
            return Ok(Err(Refusal::new(
                sqlstate::intern("42601"),
                "INSERT has more expressions than target columns".into(),
            )));
        }
        for i in 0..n {
            let (src, dst) = (first[n + i].as_deref(), first[2 * n + i].as_deref());
            if let (Some(src), Some(dst)) = (src, dst) {
                if !assignable(src, dst) {
                    return Ok(Err(Refusal::new(
                        sqlstate::intern("42804"),
                        format!(
                            "column {} is of type {dst} but expression is of type {src}: through hotrepart an INSERT … SELECT into a sharded table needs the same type or a widening (integer to bigint …); cast the expression in the SELECT",
                            is.columns_sql[i]
                        ),
                    )));
                }
            }
        }
        Ok(Ok(rows
            .into_iter()
            .map(|mut r| {
                r.truncate(n);
                r
            })
            .collect()))
    }

    /// The `INSERT … VALUES` without a column list into a sharded table of
    /// a refused statement.
    pub(super) fn no_column_list_of(&self, sql: &str) -> Option<NoColumnList> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::no_column_list(&snap, &self.ns, sql)
    }

    /// Writes the table's columns into the statement and runs it.
    pub(super) async fn insert_with_columns(
        &mut self,
        nc: NoColumnList,
    ) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let columns = match self.columns_of(&nc.table_sql).await? {
            Ok(c) => c,
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        };
        let Some(sql) = nc.with_columns(&columns) else {
            self.refuse_simple(Refusal::new(
                sqlstate::intern("42601"),
                "INSERT has more expressions than target columns".into(),
            ));
            return Ok(());
        };
        Box::pin(self.on_query(super::script::query_frame(&sql))).await
    }

    /// The columns of `table` (as written), in order, without dropped ones.
    async fn columns_of(
        &mut self,
        table: &str,
    ) -> Result<Result<Arc<[String]>, Refusal>, SessionError> {
        let key = (table.to_owned(), self.ns.id(), self.generation());
        if let Some(c) = self.table_columns.get(&key) {
            return Ok(Ok(c.clone()));
        }
        let home = self.node.routing.home_index();
        if let Err(r) = self.switch_to(home).await? {
            return Ok(Err(r));
        }
        let sql = format!(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = {}::pg_catalog.regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            crate::sql::quote_literal(table)
        );
        let rows = match self.query_on(home, &sql, "reading a table's columns").await {
            Ok(rows) => rows,
            Err(r) => return Ok(Err(r)),
        };
        let cols: Arc<[String]> = rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        if self.table_columns.len() >= 64 {
            self.table_columns.clear();
        }
        self.table_columns.insert(key, cols.clone());
        Ok(Ok(cols))
    }

    /// `INSERT … SELECT … FROM (VALUES …)` into a sharded table, as the
    /// `INSERT … VALUES` it means (SQLAlchemy's insertmanyvalues), when the
    /// router cannot route it as written.
    pub(super) fn values_select_of(&self, sql: &str) -> Option<String> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::values_select(&snap, &self.ns, sql)
    }

    /// The extended protocol's [`Self::values_select_of`]: each Parse of
    /// such a statement gets the `INSERT … VALUES` text (its parameters
    /// keep their numbers, its result columns stay), before the batch is
    /// routed.
    pub(super) fn flatten_values_selects(&self, frames: Vec<Frame>) -> Vec<Frame> {
        let wanted = |f: &Frame| -> Option<(String, String, bytes::Bytes)> {
            if f.tag() != fe::PARSE {
                return None;
            }
            let mut b = f.body();
            let name = wire::get_cstr(&mut b).ok()?;
            let sql = wire::get_cstr(&mut b).ok()?;
            if !hotrepart_router::classify::first_keyword_is(sql, "insert")
                || self.decide_sql(sql, None).is_ok()
            {
                return None;
            }
            let flat = self.values_select_of(sql)?;
            Some((name.to_owned(), flat, bytes::Bytes::copy_from_slice(b)))
        };
        frames
            .into_iter()
            .map(|f| match wanted(&f) {
                Some((name, sql, rest)) => parse_frame(&name, &sql, &rest),
                None => f,
            })
            .collect()
    }

    /// The extended protocol's INSERTs without a column list: each Parse of
    /// one into a sharded table gets the table's columns written in (its
    /// parameters keep their numbers), before the batch is routed.
    pub(super) async fn complete_column_lists(
        &mut self,
        frames: Vec<Frame>,
    ) -> Result<Result<Vec<Frame>, Refusal>, SessionError> {
        if !frames.iter().any(|f| {
            f.tag() == fe::PARSE && {
                let mut b = f.body();
                let _ = wire::get_cstr(&mut b);
                wire::get_cstr(&mut b)
                    .is_ok_and(hotrepart_router::classify::insert_without_column_list)
            }
        }) {
            return Ok(Ok(frames));
        }
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            let rewritten = if f.tag() == fe::PARSE {
                let mut b = f.body();
                let name = wire::get_cstr(&mut b).map_err(client_err)?.to_owned();
                let sql = wire::get_cstr(&mut b).map_err(client_err)?;
                let rest = bytes::Bytes::copy_from_slice(b);
                match hotrepart_router::classify::insert_without_column_list(sql)
                    .then(|| self.no_column_list_of(sql))
                    .flatten()
                {
                    Some(nc) => {
                        if !self.be.owed.is_empty() {
                            self.drain_owed().await?;
                        }
                        let columns = match self.columns_of(&nc.table_sql).await? {
                            Ok(c) => c,
                            Err(r) => return Ok(Err(r)),
                        };
                        let Some(sql) = nc.with_columns(&columns) else {
                            return Ok(Err(Refusal::new(
                                sqlstate::intern("42601"),
                                "INSERT has more expressions than target columns".into(),
                            )));
                        };
                        Some(parse_frame(&name, &sql, &rest))
                    }
                    None => None,
                }
            } else {
                None
            };
            out.push(rewritten.unwrap_or(f));
        }
        Ok(Ok(out))
    }
}

/// A Parse of statement `name` with text `sql`, the rest of the client's
/// Parse (its parameter types) kept: parameters keep their numbers.
fn parse_frame(name: &str, sql: &str, rest: &[u8]) -> Frame {
    let mut m = bytes::BytesMut::with_capacity(sql.len() + name.len() + rest.len() + 8);
    wire::frame(&mut m, fe::PARSE, |o| {
        wire::put_cstr(o, name);
        wire::put_cstr(o, sql);
        bytes::BufMut::put_slice(o, rest);
    });
    Frame { raw: m.freeze() }
}

/// Whether a value of type `src` (as `regtype` names it) written as text
/// and read as `dst` is exactly what PostgreSQL's assignment of `src` to a
/// `dst` column gives.
fn assignable(src: &str, dst: &str) -> bool {
    const WIDENING: &[(&str, &[&str])] = &[
        (
            "smallint",
            &["integer", "bigint", "numeric", "double precision"],
        ),
        ("integer", &["bigint", "numeric", "double precision"]),
        ("bigint", &["numeric", "double precision"]),
        ("numeric", &["double precision"]),
        ("text", &["character varying"]),
        ("character varying", &["text"]),
        ("name", &["text", "character varying"]),
        (
            "date",
            &["timestamp without time zone", "timestamp with time zone"],
        ),
        ("timestamp without time zone", &["timestamp with time zone"]),
    ];
    // To a string type PostgreSQL assigns any type through its text form
    // (an I/O conversion), except `character`, whose cast trims.
    let to_string = matches!(dst, "text" | "character varying") && src != "character";
    src == dst
        || to_string
        || WIDENING
            .iter()
            .any(|(s, ds)| *s == src && ds.contains(&dst))
}
