//! INSERTs that leave columns the node must fill to their default (issue
//! 14): a sharded table's key (`INSERT INTO users (name) VALUES ($1)
//! RETURNING id`, what ORMs send for a `serial`, `bigserial`, identity or
//! `gen_random_uuid()` key, or `DEFAULT` in the key's place), and any other
//! column of a sharded table a sequence numbers (`orders.id bigserial` in a
//! table sharded by `user_id`).
//!
//! A row's shard is not known until its key exists; and a sequence default
//! evaluated by each shard numbers rows on each shard on its own — the same
//! `id` on two shards, where PostgreSQL gives every row its own. The node
//! reads the table's defaults on the home shard (kept node-wide until DDL
//! through the node), evaluates them there once per row, inside the
//! client's transaction (the sequences that number rows are the home
//! shard's; the other shards' copies stay unused), and writes the values
//! in:
//!
//! - simple protocol: as literals, then the statement runs as if the
//!   client had sent it so ([`Session::insert_filled`]);
//! - extended protocol: the statement the node runs has the values as
//!   parameters numbered after the client's (`$n+1` …), and each Bind gets
//!   them appended, evaluated for the whole batch before it is routed
//!   ([`Session::fill_key_defaults`]). The client's own statement is what
//!   it prepared (its Describe says what PostgreSQL says of it).
//!
//! Refused: a generated key column, a default that calls a function the
//! node does not know to read no table (0A000), explicit values beside
//! `DEFAULT` ones in an identity `ALWAYS` column without `OVERRIDING SYSTEM
//! VALUE` (PostgreSQL's 428C9). A key without a default keeps the router's
//! 23502. Not filled: `COPY`, `INSERT … SELECT` run on the shards, and
//! statements the router reads as other than one `INSERT … VALUES`.

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::wire::{self, fe, Frame};
use bytes::BytesMut;
use hotrepart_router::catalog::KeyType;
use hotrepart_router::route::{default_eval_sql, default_evaluable, ColumnFill};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// The defaults of a sharded table's columns the node fills: its key (any
/// default, or none) and every other column numbered by a sequence (a
/// `nextval` default, or identity). Read on the home shard.
#[derive(Debug)]
pub(crate) struct TableDefaults {
    cols: Vec<ColDefault>,
}

#[derive(Debug)]
struct ColDefault {
    name: String,
    /// The expression (`nextval('users_id_seq'::regclass)`); None: none.
    expr: Option<String>,
    /// `GENERATED ALWAYS AS IDENTITY`.
    always: bool,
    /// A generated column.
    generated: bool,
    key: bool,
}

impl TableDefaults {
    /// The columns the node fills when a statement leaves them out.
    fn columns(&self) -> Vec<&str> {
        self.cols.iter().map(|c| c.name.as_str()).collect()
    }
}

/// A statement's fill, checked: what each slot's values are.
struct Plan {
    fill: ColumnFill,
    /// Per slot of `fill`: the default, and the key's type for the key.
    exprs: Vec<(String, Option<KeyType>)>,
    /// `OVERRIDING SYSTEM VALUE` to add.
    overriding: bool,
}

/// What the node fills in an extended-protocol INSERT text (None:
/// nothing), planned under a namespace id and catalog generation: stale
/// (planned again) under others.
#[derive(Debug, Clone)]
pub(super) struct FillEntry {
    ns: u64,
    generation: u64,
    fill: Option<Arc<KeyFill>>,
}

/// An extended-protocol statement whose values the node fills.
#[derive(Debug)]
pub(super) struct KeyFill {
    /// What the node runs instead: the values as parameters after the
    /// client's.
    filled: Arc<str>,
    /// The client's parameter count.
    params: usize,
    /// Per slot: the default, the key's type for the key, values per
    /// execution.
    slots: Vec<(String, Option<KeyType>, usize)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The statement's key left to its default, when the router refused
    /// it for that reason (23502): the table it inserts into.
    pub(super) fn key_default_table(&self, sql: &str) -> Option<String> {
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::key_default(&snap, &self.ns, sql).map(|k| k.table)
    }

    /// Whether any of `tables` (declared sharded tables) has columns the
    /// node fills (read on the home shard when not known yet); the
    /// refusal when that cannot be read (the statement would otherwise
    /// leave them to each shard).
    pub(super) async fn tables_fill(
        &mut self,
        tables: &[String],
    ) -> Result<Result<bool, Refusal>, SessionError> {
        for t in tables {
            match self.table_defaults(t).await? {
                Ok(d) if !d.cols.is_empty() => return Ok(Ok(true)),
                Ok(_) => {}
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(false))
    }

    /// Simple protocol: `sql` (an INSERT into sharded table `table`) with
    /// the columns it leaves to their default filled, run as if the client
    /// had sent it so. `refused`: the router's refusal, answered when
    /// there is nothing to fill. False: nothing to fill and no refusal (the
    /// caller goes on with the statement).
    pub(super) async fn insert_filled(
        &mut self,
        sql: &str,
        table: &str,
        refused: Option<Refusal>,
    ) -> Result<bool, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let sql = match self.filled_insert(sql, table).await? {
            Ok(Some(sql)) => sql,
            Ok(None) => {
                return Ok(match refused {
                    Some(r) => {
                        self.refuse_simple(r);
                        true
                    }
                    None => false,
                })
            }
            Err(r) => {
                self.refuse_simple(r);
                return Ok(true);
            }
        };
        Box::pin(self.on_query(super::script::query_frame(&sql))).await?;
        Ok(true)
    }

    /// `sql` (an INSERT into sharded table `table`) with the columns it
    /// leaves to their default filled with values evaluated on the home
    /// shard; None: nothing to fill.
    pub(super) async fn filled_insert(
        &mut self,
        sql: &str,
        table: &str,
    ) -> Result<Result<Option<String>, Refusal>, SessionError> {
        let plan = match self.plan_fill(sql, table).await? {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Ok(None)),
            Err(r) => return Ok(Err(r)),
        };
        let mut values = Vec::with_capacity(plan.fill.values_needed());
        for (slot, (expr, ty)) in plan.fill.slots().iter().zip(&plan.exprs) {
            let n = slot.len();
            match self
                .evaluate_defaults(&default_eval_sql(expr, *ty, n), n)
                .await?
            {
                Ok(v) => values.extend(v),
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(Some(plan.fill.with_values(&values, plan.overriding))))
    }

    /// Sequelize's `findOrCreate` (router
    /// `classify::temp_function_insert`): a string creating a temporary
    /// function whose body inserts one row, calling and dropping it. Its
    /// INSERT is routed (its key filled first when left to its default)
    /// and the whole string, with that INSERT, runs on the shard that owns
    /// the row — where the function lives and dies. False: not that shape,
    /// or not on one shard (the caller's refusal stands).
    pub(super) async fn temp_function_insert(&mut self, sql: &str) -> Result<bool, SessionError> {
        let Some(tf) = hotrepart_router::classify::temp_function_insert(sql) else {
            return Ok(false);
        };
        if self.txn.failed || self.be.mid_pipeline() {
            return Ok(false);
        }
        let table = {
            let snap = self.node.routing.catalog.load();
            hotrepart_router::route::insert_table(&snap, &self.ns, &tf.insert)
        };
        let Some(table) = table else {
            return Ok(false);
        };
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let insert = match self.filled_insert(&tf.insert, &table).await? {
            Ok(Some(filled)) => filled,
            Ok(None) => tf.insert.clone(),
            Err(r) => {
                self.refuse_simple(r);
                return Ok(true);
            }
        };
        let mut d = match self.route_waiting(|s| s.decide_sql(&insert, None)).await {
            Ok(d) => d,
            Err(r) => {
                self.refuse_simple(r);
                return Ok(true);
            }
        };
        let crate::routing::Target::Shard(t) = d.target else {
            return Ok(false);
        };
        if self.temp.home.is_some_and(|h| h != t) {
            // The session's temporary objects live on another shard.
            return Ok(false);
        }
        // Functions the INSERT itself calls, as for any statement.
        if let Err(r) = self.settle_calls(&mut d, t).await? {
            self.refuse_simple(r);
            return Ok(true);
        }
        if self.txn.open() {
            // PostgreSQL cannot PREPARE a transaction that used a temporary
            // function: one that writes elsewhere too is refused now (later
            // writes elsewhere by the temporary-object rule).
            if let Some(&w) = self.txn.writes.iter().find(|&&w| w != t) {
                self.refuse_simple(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "this string creates a temporary function (Sequelize's findOrCreate) whose row belongs to shard {}, in a transaction that also wrote to shard {}: PostgreSQL cannot two-phase commit a transaction that used temporary objects; run it in a transaction of its own",
                        self.node.routing.shard_name(t),
                        self.node.routing.shard_name(w)
                    ),
                ));
                return Ok(true);
            }
            self.txn.temp_used_on = Some(t);
        }
        let text = format!("{}{insert}{}", &sql[..tf.at.start], &sql[tf.at.end..]);
        if let Err(r) = self.switch_to(t).await? {
            self.refuse_simple(r);
            return Ok(true);
        }
        if self.txn.open() {
            self.txn.note_write(t);
        }
        let f = super::script::query_frame(&text);
        self.pass_query(&f, hotrepart_router::classify::classify(&text), t);
        Ok(true)
    }

    /// What `sql` (an INSERT into sharded table `table`) leaves for the
    /// node to fill, checked; None: nothing.
    async fn plan_fill(
        &mut self,
        sql: &str,
        table: &str,
    ) -> Result<Result<Option<Plan>, Refusal>, SessionError> {
        let d = match self.table_defaults(table).await? {
            Ok(d) => d,
            Err(r) => return Ok(Err(r)),
        };
        if d.cols.is_empty() {
            return Ok(Ok(None));
        }
        let fill = {
            let snap = self.node.routing.catalog.load();
            hotrepart_router::route::column_fill(&snap, &self.ns, sql, &d.columns())
        };
        let Some(fill) = fill else {
            // Not a plain INSERT … VALUES: what it leaves to a default
            // would be evaluated by each shard.
            let left = {
                let snap = self.node.routing.catalog.load();
                hotrepart_router::route::omitted_by_select(&snap, &self.ns, sql, &d.columns())
            };
            if let Some(c) = left
                .as_ref()
                .and_then(|l| d.cols.iter().find(|c| l.contains(&c.name)))
            {
                return Ok(Err(left_to_shards("INSERT … SELECT", table, c)));
            }
            return Ok(Ok(None));
        };
        let mut exprs = Vec::with_capacity(fill.slots().len());
        let mut overriding = false;
        for slot in fill.slots() {
            let Some(c) = d.cols.iter().find(|c| c.name == slot.column) else {
                return Ok(Ok(None));
            };
            let (table, col) = (&fill.table_sql, &c.name);
            let what = if c.key { "shard key" } else { "column" };
            if c.generated {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "the shard key \"{col}\" of {table} is a generated column: hotrepart routes a row by its key before PostgreSQL computes it; make the key an ordinary column"
                    ),
                )));
            }
            let Some(expr) = c.expr.clone() else {
                // A key without a default: the router's refusal stands.
                return Ok(Ok(None));
            };
            if !default_evaluable(&expr) {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "the {what} \"{col}\" of {table} defaults to {expr}, which hotrepart cannot evaluate on the home shard (only sequences and built-in functions that read no table); give the value in the INSERT"
                    ),
                )));
            }
            if c.always && !fill.overriding {
                if !slot.all_rows {
                    // PostgreSQL's words for the explicit values.
                    return Ok(Err(Refusal::new(
                        sqlstate::intern("428C9"),
                        format!("cannot insert a non-DEFAULT value into column \"{col}\""),
                    )));
                }
                overriding = true;
            }
            exprs.push((expr, c.key.then_some(fill.key_type)));
        }
        Ok(Ok(Some(Plan {
            fill,
            exprs,
            overriding,
        })))
    }

    /// The defaults of sharded table `table` the node fills, from the
    /// node's cache or read on the home shard.
    async fn table_defaults(
        &mut self,
        table: &str,
    ) -> Result<Result<Arc<TableDefaults>, Refusal>, SessionError> {
        let cache = (
            self.database.clone(),
            table.to_owned(),
            self.ns.id(),
            self.generation(),
        );
        if let Some(d) = self.node.table_defaults(&cache) {
            return Ok(Ok(d));
        }
        let key = {
            let snap = self.node.routing.catalog.load();
            match snap.placement(table) {
                hotrepart_router::catalog::TablePlacement::Sharded(t) => t.key_column.clone(),
                _ => return Ok(Ok(Arc::new(TableDefaults { cols: Vec::new() }))),
            }
        };
        // The table as SQL reads it (`"Users"` keeps its case), as a literal.
        let (t, k) = (
            crate::sql::quote_literal(&crate::sql::quote_table(table)),
            crate::sql::quote_literal(&key),
        );
        let sql = format!(
            "SELECT a.attname, a.attidentity::pg_catalog.text, a.attgenerated::pg_catalog.text, \
             pg_catalog.pg_get_expr(d.adbin, d.adrelid), \
             CASE WHEN a.attidentity <> '' THEN pg_catalog.pg_get_serial_sequence({t}, a.attname) END \
             FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d \
             ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = pg_catalog.to_regclass({t}) AND a.attnum > 0 AND NOT a.attisdropped \
             AND (a.attname = {k} OR a.attidentity <> '' \
             OR (a.attgenerated = '' AND pg_catalog.strpos(pg_catalog.pg_get_expr(d.adbin, d.adrelid), 'nextval(') > 0)) \
             ORDER BY a.attname <> {k}, a.attnum"
        );
        let home = self.node.routing.home_index();
        let apart =
            self.be.mid_pipeline() || (self.txn.open() && self.be.slots[home].conn.is_none());
        // Read in the client's transaction: it may see DDL not committed
        // yet, which other sessions must not be told.
        let shared = apart || !self.txn.open();
        let rows = if apart {
            // A transaction that has not used the home shard: read apart
            // rather than pull it in (DDL through the node in this
            // transaction ran on the home shard too, so what is read
            // apart is all there is); or messages still open without Sync,
            // where no hidden query can run on the session's backends.
            match self.read_apart(&sql).await {
                Ok(rows) => rows,
                Err(e) => {
                    return Ok(Err(Refusal::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "cannot read the column defaults of {table} on the home shard: {e}"
                        ),
                    )))
                }
            }
        } else {
            if !self.be.owed.is_empty() {
                self.drain_owed().await?;
            }
            if let Err(r) = self.switch_to(home).await? {
                return Ok(Err(r));
            }
            match self
                .query_on(home, &sql, "reading the column defaults of a sharded table")
                .await
            {
                Ok(rows) => rows,
                Err(r) => return Ok(Err(r)),
            }
        };
        let cols = rows
            .into_iter()
            .filter_map(|row| {
                let col = |i: usize| row.get(i).cloned().flatten().filter(|s| !s.is_empty());
                let name = col(0)?;
                let identity = col(1);
                let expr = match (&identity, col(4)) {
                    (Some(_), Some(seq)) => Some(format!(
                        "pg_catalog.nextval({}::pg_catalog.regclass)",
                        crate::sql::quote_literal(&seq)
                    )),
                    _ => col(3),
                };
                Some(ColDefault {
                    key: name == key,
                    always: identity.as_deref() == Some("a"),
                    generated: col(2).is_some(),
                    expr,
                    name,
                })
            })
            // A key without a default and not generated: nothing to fill.
            .filter(|c| !c.key || c.expr.is_some() || c.generated)
            .collect();
        let d = Arc::new(TableDefaults { cols });
        if shared {
            self.node.keep_table_defaults(cache, d.clone());
        }
        Ok(Ok(d))
    }

    /// A `COPY … FROM` into sharded table `table` with column list
    /// `columns` (empty: every column) that leaves a column the node would
    /// fill to its default: refused, as each shard would evaluate it.
    pub(crate) async fn copy_refusal(
        &mut self,
        table: &str,
        columns: &[String],
    ) -> Result<Option<Refusal>, SessionError> {
        if columns.is_empty() {
            return Ok(None);
        }
        let d = match self.table_defaults(table).await? {
            Ok(d) => d,
            Err(r) => return Ok(Some(r)),
        };
        Ok(d.cols
            .iter()
            .find(|c| !columns.contains(&c.name))
            .map(|c| left_to_shards("COPY", table, c)))
    }

    /// `sql` on a connection of its own to the home shard, under the
    /// client's `search_path`.
    pub(super) async fn read_apart(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let home = self.node.routing.home_index();
        let hp = self.pool(home);
        let timeout = hp.connect_timeout();
        let path = self.state.get("search_path").map(crate::sql::quote_literal);
        let mut c = crate::backend::conn::BackendConn::connect_named(
            &hp.target,
            timeout,
            Some("hotrepart column defaults"),
        )
        .await
        .map_err(|e| e.to_string())?;
        let read = async {
            if let Some(p) = &path {
                c.hidden_query(&format!(
                    "SELECT pg_catalog.set_config('search_path', {p}, false)"
                ))
                .await
                .map_err(|e| e.to_string())?;
            }
            c.hidden_query(sql).await.map_err(|e| e.to_string())
        };
        let rows = tokio::time::timeout(timeout.max(std::time::Duration::from_secs(5)), read)
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r);
        c.terminate();
        rows
    }

    /// The text a Bind of a statement of text `sql` runs when the node
    /// fills its values (planned by [`Self::fill_key_defaults`] for the
    /// batch being routed).
    pub(super) fn filled_text(&self, sql: &str) -> Option<Arc<str>> {
        let e = self.key_fills.get(sql)?;
        if e.ns != self.ns.id() || e.generation != self.generation() {
            return None;
        }
        e.fill.as_ref().map(|kf| kf.filled.clone())
    }

    /// The text to run for the client's Bind `f`, when the node fills the
    /// values of its statement.
    pub(super) fn filled_bind_text(&self, f: &Frame) -> Option<Arc<str>> {
        let mut b = f.body();
        let _portal = wire::get_cstr(&mut b).ok()?;
        let stmt = wire::get_cstr(&mut b).ok()?;
        let sql = if stmt.is_empty() {
            self.unnamed.as_ref().and_then(Unnamed::sql)?
        } else {
            self.stmts.get(stmt)?.sql.clone()
        };
        self.filled_text(&sql)
    }

    /// The declared sharded table an INSERT's text writes (kept per text).
    fn insert_table_of(&mut self, sql: &str) -> Option<String> {
        let (ns, generation) = (self.ns.id(), self.generation());
        if let Some((n, g, t)) = self.insert_tables.get(sql) {
            if (*n, *g) == (ns, generation) {
                return t.clone();
            }
        }
        let t = {
            let snap = self.node.routing.catalog.load();
            hotrepart_router::route::insert_table(&snap, &self.ns, sql)
        };
        if self.insert_tables.len() >= 256 {
            self.insert_tables.clear();
        }
        self.insert_tables
            .insert(Arc::from(sql), (ns, generation, t.clone()));
        t
    }

    /// What the node fills in a Bind of INSERT text `sql` (whose Parse
    /// declared `declared` parameter types): planned now unless known
    /// under the current namespace and catalog generation.
    async fn fill_for(
        &mut self,
        sql: &Arc<str>,
        declared: usize,
    ) -> Result<Result<Option<Arc<KeyFill>>, Refusal>, SessionError> {
        let (ns, generation) = (self.ns.id(), self.generation());
        if let Some(e) = self.key_fills.get(&**sql) {
            if e.ns == ns && e.generation == generation {
                return Ok(Ok(e.fill.clone()));
            }
        }
        let fill = match self.insert_table_of(sql) {
            None => None,
            Some(table) => match self.plan_fill(sql, &table).await? {
                Err(r) => return Ok(Err(r)),
                Ok(None) => None,
                Ok(Some(plan)) => {
                    let params = plan.fill.max_param();
                    if declared > params {
                        return Ok(Err(Refusal::new(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!(
                                "an INSERT into {} whose values hotrepart fills must not declare more parameter types ({declared}) than it uses ({params})",
                                plan.fill.table_sql
                            ),
                        )));
                    }
                    Some(Arc::new(KeyFill {
                        filled: Arc::from(plan.fill.with_params(params + 1, plan.overriding)),
                        params,
                        slots: plan
                            .fill
                            .slots()
                            .iter()
                            .zip(plan.exprs)
                            .map(|(slot, (expr, ty))| (expr, ty, slot.len()))
                            .collect(),
                    }))
                }
            },
        };
        if self.key_fills.len() >= 256 {
            self.key_fills.clear();
        }
        self.key_fills.insert(
            sql.clone(),
            FillEntry {
                ns,
                generation,
                fill: fill.clone(),
            },
        );
        Ok(Ok(fill))
    }

    /// Extended protocol, before a batch is routed: each Bind of an INSERT
    /// that leaves values to the node gets them appended to its
    /// parameters (evaluated on the home shard, for the whole batch at
    /// once). An error is the batch's.
    pub(super) async fn fill_key_defaults(
        &mut self,
        frames: Vec<Frame>,
    ) -> Result<Result<Vec<Frame>, Refusal>, SessionError> {
        if !frames.iter().any(|f| {
            f.tag() == fe::BIND
                || (f.tag() == fe::PARSE && {
                    let mut b = f.body();
                    let _ = wire::get_cstr(&mut b);
                    wire::get_cstr(&mut b).is_ok_and(|sql| {
                        hotrepart_router::classify::first_keyword_is(sql, "insert")
                    })
                })
        }) {
            return Ok(Ok(frames));
        }
        // The statements of the batch (text, declared parameter types).
        let mut unnamed: Option<(Arc<str>, usize)> = None;
        let mut named: HashMap<String, (Arc<str>, usize)> = HashMap::new();
        let mut wants: Vec<(usize, Arc<KeyFill>)> = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).map_err(client_err)?;
                    let sql = wire::get_cstr(&mut b).map_err(client_err)?;
                    let declared = wire::get_i16(&mut b).unwrap_or(0).max(0) as usize;
                    if name.is_empty() {
                        unnamed = Some((Arc::from(sql), declared));
                    } else {
                        named.insert(name.to_owned(), (Arc::from(sql), declared));
                    }
                }
                fe::BIND => {
                    let _portal = wire::get_cstr(&mut b).map_err(client_err)?;
                    let stmt = wire::get_cstr(&mut b).map_err(client_err)?;
                    let here = if stmt.is_empty() {
                        unnamed.clone()
                    } else {
                        named.get(stmt).cloned()
                    };
                    let (sql, declared) = match here {
                        Some(x) => x,
                        None => match self.client_sql(stmt, &None, None) {
                            // (the declared types are read only for an INSERT)
                            Some(sql) => (sql, usize::MAX),
                            None => continue,
                        },
                    };
                    if !hotrepart_router::classify::first_keyword_is(&sql, "insert") {
                        continue;
                    }
                    let declared = if declared == usize::MAX {
                        self.param_types(stmt).len()
                    } else {
                        declared
                    };
                    if self.be.mid_pipeline() && self.txn.open() {
                        // asyncpg's Parse/Describe/Flush before its Bind,
                        // in a transaction block: ended with a hidden Sync
                        // so that the defaults are read in the client's own
                        // transaction (a column added in it), not apart.
                        // Outside a block what is read apart is all there
                        // is; when they ran a statement they stay open and
                        // the defaults are read apart, as before.
                        let _ = self.end_unsynced().await?;
                        if self.skip_to_sync {
                            // An error was owed: the batch is skipped to
                            // its Sync.
                            return Ok(Ok(frames));
                        }
                    }
                    match self.fill_for(&sql, declared).await? {
                        Ok(Some(kf)) => wants.push((i, kf)),
                        Ok(None) => {}
                        Err(r) => return Ok(Err(r)),
                    }
                }
                _ => {}
            }
        }
        if wants.is_empty() {
            return Ok(Ok(frames));
        }
        // Their values: one query per default, on the home shard.
        type Group<'a> = (&'a str, Option<KeyType>);
        let mut values: HashMap<Group<'_>, std::vec::IntoIter<String>> = HashMap::new();
        for (_, kf) in &wants {
            for (expr, ty, _) in &kf.slots {
                let group = (expr.as_str(), *ty);
                if values.contains_key(&group) {
                    continue;
                }
                let n: usize = wants
                    .iter()
                    .flat_map(|(_, k)| k.slots.iter())
                    .filter(|(e, t, _)| (e.as_str(), *t) == group)
                    .map(|(_, _, n)| n)
                    .sum();
                match self
                    .evaluate_defaults(&default_eval_sql(expr, *ty, n), n)
                    .await?
                {
                    Ok(v) => {
                        values.insert(group, v.into_iter());
                    }
                    Err(r) => return Ok(Err(r)),
                }
            }
        }
        let mut out = frames;
        for (i, kf) in &wants {
            let mut keys: Vec<String> = Vec::new();
            for (expr, ty, n) in &kf.slots {
                if let Some(v) = values.get_mut(&(expr.as_str(), *ty)) {
                    keys.extend(v.by_ref().take(*n));
                }
            }
            match bind_with_keys(&out[*i], kf.params, &keys) {
                Ok(f) => out[*i] = f,
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(out))
    }

    /// `n` values from `sql` on the home shard.
    async fn evaluate_defaults(
        &mut self,
        sql: &str,
        n: usize,
    ) -> Result<Result<Vec<String>, Refusal>, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let rows = if self.be.mid_pipeline() {
            // Messages still open without Sync (a batch the node cut at
            // its size limit): no hidden query can run on the session's
            // backends. Sequences and the functions a default may call are
            // not transactional: a connection of its own gives the same.
            match self.read_apart(sql).await {
                Ok(rows) => rows,
                Err(e) => {
                    return Ok(Err(Refusal::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!("cannot compute column defaults on the home shard: {e}"),
                    )))
                }
            }
        } else {
            let home = self.node.routing.home_index();
            if let Err(r) = self.switch_to(home).await? {
                return Ok(Err(r));
            }
            match self
                .query_on(home, sql, "computing the column defaults of an INSERT")
                .await
            {
                Ok(rows) => rows,
                Err(r) => return Ok(Err(r)),
            }
        };
        let mut values = Vec::with_capacity(n);
        for row in rows {
            match row.into_iter().next().flatten() {
                Some(v) => values.push(v),
                None => {
                    return Ok(Err(Refusal::new(
                        sqlstate::NOT_NULL_VIOLATION,
                        "a column default the node evaluates computed to NULL".into(),
                    )))
                }
            }
        }
        if values.len() != n {
            return Ok(Err(Refusal::new(
                sqlstate::INTERNAL_ERROR,
                "the column defaults of an INSERT computed to an unexpected number of rows".into(),
            )));
        }
        Ok(Ok(values))
    }
}

/// The refusal of a `what` into `table` that leaves column `c` to a
/// default each shard would evaluate on its own.
fn left_to_shards(what: &str, table: &str, c: &ColDefault) -> Refusal {
    let expr = c.expr.as_deref().unwrap_or("its default");
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "{what} into sharded table \"{table}\" leaves column \"{}\" to {expr}, which each shard would evaluate on its own (the same value on several shards); give the column's values, or use INSERT … VALUES (hotrepart numbers those rows on the home shard)",
            c.name
        ),
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
