//! INSERTs that leave a sharded table's key to its column default (issue
//! 14): `INSERT INTO users (name) VALUES ($1) RETURNING id`, what ORMs
//! send for a `serial`, `bigserial`, identity or `gen_random_uuid()` key,
//! and `DEFAULT` in the key's place.
//!
//! The row's shard is not known until its key exists. The node reads the
//! key's default on the home shard (kept per session until DDL through
//! the node), evaluates it there once per row, inside the client's
//! transaction (the sequences it numbers rows with are the home shard's;
//! the other shards' copies stay unused), and routes the row by the value:
//!
//! - simple protocol: the default expression is written into the
//!   statement, which is then a computed key (`session/computed.rs`);
//! - extended protocol: the statement the node runs has the keys as
//!   parameters numbered after the client's (`$n+1` …), and each Bind gets
//!   their values appended, evaluated for the whole batch before it is
//!   routed ([`Session::fill_key_defaults`]). The client's own statement
//!   is what it prepared (its Describe says what PostgreSQL says of it).
//!
//! Refused: a generated key column, a default that calls a function the
//! node does not know to read no table (0A000), explicit keys beside
//! `DEFAULT` ones in an identity `ALWAYS` column without `OVERRIDING SYSTEM
//! VALUE` (PostgreSQL's 428C9). A key without a default keeps the router's
//! 23502.

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::wire::{self, fe, Frame};
use bytes::BytesMut;
use hotrepart_router::catalog::KeyType;
use hotrepart_router::route::{default_eval_sql, default_evaluable, KeyDefault};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// What a sharded table's key defaults to, read on the home shard.
#[derive(Debug)]
pub(super) struct DefaultOf {
    /// The expression (`nextval('users_id_seq'::regclass)`); None: none.
    expr: Option<String>,
    /// `GENERATED ALWAYS AS IDENTITY`.
    always: bool,
    /// A generated column.
    generated: bool,
}

/// An extended-protocol statement whose keys the node fills.
#[derive(Debug)]
pub(super) struct KeyFill {
    /// The client's statement text.
    sql: Arc<str>,
    /// What the node runs instead: the keys as parameters after the
    /// client's.
    filled: Arc<str>,
    /// The client's parameter count.
    params: usize,
    /// Keys per execution.
    keys: usize,
    /// The default expression, and the key's type.
    expr: String,
    key_type: KeyType,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The key left to its default of a statement the router refused for
    /// that reason (23502), if that is the statement.
    pub(super) fn key_default_of(&self, sql: &str) -> Option<KeyDefault> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::key_default(&snap, &self.ns, sql)
    }

    /// Simple protocol: the statement with the default written in, run
    /// as a computed key; `refused` (the router's refusal) when the key
    /// has no default.
    pub(super) async fn insert_key_default(
        &mut self,
        kd: KeyDefault,
        refused: Refusal,
    ) -> Result<(), SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let (expr, overriding) = match self.usable_default(&kd).await? {
            Ok(Some(x)) => x,
            Ok(None) => {
                self.refuse_simple(refused);
                return Ok(());
            }
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        };
        let Some(sql) = kd.with_exprs(&expr, overriding) else {
            self.refuse_simple(refused);
            return Ok(());
        };
        if self.key_default_of(&sql).is_some() {
            // Never: every key is written in now. Refused rather than looped.
            self.refuse_simple(refused);
            return Ok(());
        }
        Box::pin(self.on_query(super::script::query_frame(&sql))).await
    }

    /// The default of `kd`'s key as an expression the home shard may
    /// evaluate, and whether the statement needs `OVERRIDING SYSTEM VALUE`
    /// added; None: the key has no default (the router's refusal stands).
    async fn usable_default(
        &mut self,
        kd: &KeyDefault,
    ) -> Result<Result<Option<(String, bool)>, Refusal>, SessionError> {
        let of = match self.default_of(kd).await? {
            Ok(of) => of,
            Err(r) => return Ok(Err(r)),
        };
        let (table, key) = (&kd.table_sql, &kd.key_column);
        if of.generated {
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "the shard key \"{key}\" of {table} is a generated column: hotrepart routes a row by its key before PostgreSQL computes it; make the key an ordinary column"
                ),
            )));
        }
        let Some(expr) = of.expr.clone() else {
            return Ok(Ok(None));
        };
        if !default_evaluable(&expr) {
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "the shard key \"{key}\" of {table} defaults to {expr}, which hotrepart cannot evaluate before routing the row (only sequences and built-in functions that read no table); give the key in the INSERT"
                ),
            )));
        }
        if of.always && !kd.all_rows && !kd.overriding {
            // PostgreSQL's words for the explicit keys.
            return Ok(Err(Refusal::new(
                sqlstate::intern("428C9"),
                format!("cannot insert a non-DEFAULT value into column \"{key}\""),
            )));
        }
        Ok(Ok(Some((expr, of.always && !kd.overriding))))
    }

    /// What the key of `kd`'s table defaults to, from the session's cache
    /// or read on the home shard.
    async fn default_of(
        &mut self,
        kd: &KeyDefault,
    ) -> Result<Result<Arc<DefaultOf>, Refusal>, SessionError> {
        let cache = (kd.table_sql.clone(), self.ns.id(), self.generation());
        if let Some(of) = self.key_defaults.get(&cache) {
            return Ok(Ok(of.clone()));
        }
        let home = self.node.routing.home_index();
        if let Err(r) = self.switch_to(home).await? {
            return Ok(Err(r));
        }
        let (table, key) = (
            crate::sql::quote_literal(&kd.table_sql),
            crate::sql::quote_literal(&kd.key_column),
        );
        let sql = format!(
            "SELECT a.attidentity::pg_catalog.text, a.attgenerated::pg_catalog.text, \
             pg_catalog.pg_get_expr(d.adbin, d.adrelid), \
             CASE WHEN a.attidentity <> '' THEN pg_catalog.pg_get_serial_sequence({table}, {key}) END \
             FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d \
             ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = {table}::pg_catalog.regclass AND a.attname = {key} AND NOT a.attisdropped"
        );
        let rows = match self
            .query_on(home, &sql, "reading the default of a shard key")
            .await
        {
            Ok(rows) => rows,
            Err(r) => return Ok(Err(r)),
        };
        let row = rows.into_iter().next().unwrap_or_default();
        let col = |i: usize| row.get(i).cloned().flatten().filter(|s| !s.is_empty());
        let identity = col(0);
        let sequence = col(3);
        let of = Arc::new(DefaultOf {
            expr: match (&identity, sequence) {
                (Some(_), Some(seq)) => Some(format!(
                    "pg_catalog.nextval({}::pg_catalog.regclass)",
                    crate::sql::quote_literal(&seq)
                )),
                _ => col(2),
            },
            always: identity.as_deref() == Some("a"),
            generated: col(1).is_some(),
        });
        if self.key_defaults.len() >= 64 {
            self.key_defaults.clear();
        }
        self.key_defaults.insert(cache, of.clone());
        Ok(Ok(of))
    }

    /// The statement text a Bind of `stmt` runs when the node fills its
    /// keys (`sql`: the client's text of it).
    pub(super) fn filled_text(&self, stmt: &str, sql: &Arc<str>) -> Option<Arc<str>> {
        let kf = self.key_fills.get(stmt)?;
        (*kf.sql == **sql).then(|| kf.filled.clone())
    }

    /// The text to run for the client's Bind `f`, when the node fills the
    /// keys of its statement.
    pub(super) fn filled_bind_text(&self, f: &Frame) -> Option<Arc<str>> {
        let mut b = f.body();
        let _portal = wire::get_cstr(&mut b).ok()?;
        let stmt = wire::get_cstr(&mut b).ok()?;
        let sql = if stmt.is_empty() {
            self.unnamed.as_ref().and_then(Unnamed::sql)?
        } else {
            self.stmts.get(stmt)?.sql.clone()
        };
        self.filled_text(stmt, &sql)
    }

    /// Extended protocol, before a batch is routed: each Parse of an
    /// INSERT that leaves its key to the default is noted, and each Bind
    /// of such a statement gets the keys' values appended to its
    /// parameters (evaluated on the home shard, for the whole batch at
    /// once). An error is the batch's.
    pub(super) async fn fill_key_defaults(
        &mut self,
        frames: Vec<Frame>,
    ) -> Result<Result<Vec<Frame>, Refusal>, SessionError> {
        // The batch's statements that leave their key to the default.
        for f in &frames {
            if f.tag() != fe::PARSE {
                continue;
            }
            let mut b = f.body();
            let name = wire::get_cstr(&mut b).map_err(client_err)?;
            let sql = wire::get_cstr(&mut b).map_err(client_err)?;
            let declared = wire::get_i16(&mut b).unwrap_or(0).max(0) as usize;
            if !hotrepart_router::classify::first_keyword_is(sql, "insert")
                || !matches!(self.decide_sql(sql, None),
                    Err(r) if r.code == sqlstate::NOT_NULL_VIOLATION)
            {
                continue;
            }
            let Some(kd) = self.key_default_of(sql) else {
                continue;
            };
            if !self.be.owed.is_empty() {
                self.drain_owed().await?;
            }
            if self.be.mid_pipeline() {
                return Ok(Err(unsynced()));
            }
            let (expr, overriding) = match self.usable_default(&kd).await? {
                Ok(Some(x)) => x,
                // No default: the router's refusal comes at the Bind.
                Ok(None) => continue,
                Err(r) => return Ok(Err(r)),
            };
            let params = kd.max_param().max(declared);
            let kf = KeyFill {
                sql: Arc::from(sql),
                filled: Arc::from(kd.with_params(params + 1, overriding)),
                params,
                keys: kd.len(),
                expr,
                key_type: kd.key_type,
            };
            let stmts = &self.stmts;
            self.key_fills
                .retain(|n, _| n.is_empty() || stmts.contains_key(n));
            self.key_fills.insert(name.to_owned(), Arc::new(kf));
        }
        if self.key_fills.is_empty() {
            return Ok(Ok(frames));
        }
        // The Binds of such statements.
        let mut unnamed: Option<Arc<str>> = None;
        let mut named: HashMap<&str, Arc<str>> = HashMap::new();
        let mut wants: Vec<(usize, Arc<KeyFill>)> = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).map_err(client_err)?;
                    let sql = wire::get_cstr(&mut b).map_err(client_err)?;
                    if name.is_empty() {
                        unnamed = Some(Arc::from(sql));
                    } else {
                        named.insert(name, Arc::from(sql));
                    }
                }
                fe::BIND => {
                    let _portal = wire::get_cstr(&mut b).map_err(client_err)?;
                    let stmt = wire::get_cstr(&mut b).map_err(client_err)?;
                    let Some(sql) = self.client_sql(stmt, &unnamed, named.get(stmt)) else {
                        continue;
                    };
                    if let Some(kf) = self.key_fills.get(stmt).filter(|kf| *kf.sql == *sql) {
                        wants.push((i, kf.clone()));
                    }
                }
                _ => {}
            }
        }
        if wants.is_empty() {
            return Ok(Ok(frames));
        }
        // Their values: one query per default, on the home shard.
        let mut values: HashMap<(&str, KeyType), std::vec::IntoIter<String>> = HashMap::new();
        for (_, kf) in &wants {
            let group = (kf.expr.as_str(), kf.key_type);
            if values.contains_key(&group) {
                continue;
            }
            let n: usize = wants
                .iter()
                .filter(|(_, k)| (k.expr.as_str(), k.key_type) == group)
                .map(|(_, k)| k.keys)
                .sum();
            let sql = default_eval_sql(&kf.expr, kf.key_type, n);
            match self.evaluate_defaults(&sql, n).await? {
                Ok(v) => {
                    values.insert(group, v.into_iter());
                }
                Err(r) => return Ok(Err(r)),
            }
        }
        let mut out = frames;
        for (i, kf) in &wants {
            let keys: Vec<String> = match values.get_mut(&(kf.expr.as_str(), kf.key_type)) {
                Some(v) => v.by_ref().take(kf.keys).collect(),
                None => Vec::new(),
            };
            match bind_with_keys(&out[*i], kf.params, &keys) {
                Ok(f) => out[*i] = f,
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(out))
    }

    /// `n` key values from `sql` on the home shard.
    async fn evaluate_defaults(
        &mut self,
        sql: &str,
        n: usize,
    ) -> Result<Result<Vec<String>, Refusal>, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        if self.be.mid_pipeline() {
            return Ok(Err(unsynced()));
        }
        let home = self.node.routing.home_index();
        if let Err(r) = self.switch_to(home).await? {
            return Ok(Err(r));
        }
        let rows = match self
            .query_on(home, sql, "computing the default shard keys of an INSERT")
            .await
        {
            Ok(rows) => rows,
            Err(r) => return Ok(Err(r)),
        };
        let mut values = Vec::with_capacity(n);
        for row in rows {
            match row.into_iter().next().flatten() {
                Some(v) => values.push(v),
                None => {
                    return Ok(Err(Refusal::new(
                        sqlstate::NOT_NULL_VIOLATION,
                        "the default of a shard key computed to NULL: a shard key must not be NULL"
                            .into(),
                    )))
                }
            }
        }
        if values.len() != n {
            return Ok(Err(Refusal::new(
                sqlstate::INTERNAL_ERROR,
                "the default shard keys of an INSERT computed to an unexpected number of rows"
                    .into(),
            )));
        }
        Ok(Ok(values))
    }
}

fn unsynced() -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "an INSERT that leaves its shard key to the column default needs the messages before it ended by Sync: hotrepart computes the key on the home shard first".into(),
    )
}

/// The client's Bind `f` (of a statement with `params` parameters) with
/// `keys` appended as text parameters.
fn bind_with_keys(f: &Frame, params: usize, keys: &[String]) -> Result<Frame, Refusal> {
    let mut b = f.body();
    let portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
    let stmt = wire::get_cstr(&mut b).map_err(proto_refusal)?;
    let v = wire::BindValues::parse(b).map_err(proto_refusal)?;
    let nv = v.values.len();
    if nv != params {
        // PostgreSQL's words.
        return Err(Refusal::new(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "bind message supplies {nv} parameters, but prepared statement \"{stmt}\" requires {params}"
            ),
        ));
    }
    let total = nv + keys.len();
    if total > i16::MAX as usize {
        return Err(Refusal::new(
            sqlstate::intern("54000"),
            "too many parameters once the shard keys are added".into(),
        ));
    }
    let formats: Vec<i16> = match v.formats.len() {
        0 => Vec::new(),
        1 if v.formats[0] == 0 => v.formats.clone(),
        _ => (0..nv)
            .map(|i| v.format(i))
            .chain(std::iter::repeat_n(0, keys.len()))
            .collect(),
    };
    let mut values = v.values.clone();
    values.extend(keys.iter().map(|k| Some(k.as_bytes())));
    let mut m =
        BytesMut::with_capacity(f.raw.len() + keys.iter().map(|k| k.len() + 6).sum::<usize>());
    wire::frame(&mut m, fe::BIND, |o| {
        wire::put_cstr(o, portal);
        wire::put_cstr(o, stmt);
        wire::BindValues::put(o, &formats, &values, v.results);
    });
    Ok(Frame { raw: m.freeze() })
}
