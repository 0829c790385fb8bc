//! Computed shard keys of `INSERT … VALUES` (issue 14): a key written as
//! an expression (`1 + 1`, `'acme:' || 7`, `nextval('ids')`,
//! `gen_random_uuid()`) rather than a literal or a parameter.
//!
//! The router cannot route such a row itself. The node evaluates the
//! expressions once, on the home shard (where undeclared objects such as
//! sequences live), inside the client's transaction
//! ([`ComputedKeys::eval_sql`]), puts the values in their place as
//! literals ([`ComputedKeys::substitute`]) and routes the statement so
//! written, as if the client had sent it. Each row's other columns are
//! left as they were.
//!
//! Only expressions that read no table are evaluated there: literals,
//! operators, casts, and calls of built-in functions that read no table
//! (plus `nextval`/`currval` of a sequence). Column references,
//! subqueries, parameters and other functions (a user function might read
//! a sharded table, which the home shard holds only part of) keep the
//! refusal.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArguments, Insert, ObjectName, Query, SetExpr, Statement, TableObject, Value,
    Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::super::keys::{value_src, SrcError};
use super::super::names::{last_name, table_name};
use super::super::Namespace;
use super::functions::PURE_FUNCTIONS;
use crate::catalog::{KeyType, RoutingSnapshot, ShardedTable, TablePlacement};

/// Functions of [`PURE_FUNCTIONS`] a key must not be computed with: they
/// return sets, sleep, change settings, or start a transaction id on the
/// shard that evaluates them.
const NOT_FOR_KEYS: &[&str] = &[
    "generate_series",
    "unnest",
    "pg_sleep",
    "set_config",
    "txid_current",
    "pg_current_xact_id",
    "pg_backend_pid",
];

/// Functions that read no table besides a sequence, evaluated on the home
/// shard where the node's undeclared objects (sequences) live.
const SEQUENCE_FUNCTIONS: &[&str] = &["nextval", "currval"];

/// The one `INSERT` of `sql` into a sharded table, with that table and the
/// target's name as written; None for anything else.
fn insert_into_sharded(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
) -> Option<(Insert, ShardedTable, ObjectName)> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let Some(Statement::Insert(insert)) = stmts.pop() else {
        return None;
    };
    if !stmts.is_empty() {
        return None;
    }
    let TableObject::TableName(name) = &insert.table else {
        return None;
    };
    let name = name.clone();
    match snapshot.placement(&table_name(ns, &name).ok()?) {
        TablePlacement::Sharded(t) => {
            let t = t.clone();
            Some((insert, t, name))
        }
        _ => None,
    }
}

/// An `INSERT … VALUES` into a sharded table whose key is computed in some
/// rows.
#[derive(Debug, Clone)]
pub struct ComputedKeys {
    insert: Insert,
    key_idx: usize,
    /// The rows whose key is computed, in order.
    rows: Vec<usize>,
    /// The type of the table's shard key.
    pub key_type: KeyType,
}

/// The computed keys of `sql`, when it is one `INSERT … VALUES` into a
/// sharded table with an explicit column list whose shard key is, in at
/// least one row, an expression that reads no table (and in the others a
/// literal or a parameter-free constant). None otherwise.
pub fn computed_keys(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
) -> Option<ComputedKeys> {
    let (insert, table, _) = insert_into_sharded(snapshot, ns, sql)?;
    let key_idx = insert
        .columns
        .iter()
        .position(|c| last_name(c) == table.key_column)?;
    let source = insert.source.as_ref()?;
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return None;
    }
    let mut rows = Vec::new();
    for (i, row) in values.rows.iter().enumerate() {
        let e = row.content.get(key_idx)?;
        match value_src(e, table.key_type) {
            Ok(_) => {}
            Err(SrcError::NotValue) if evaluable(e) => rows.push(i),
            Err(_) => return None,
        }
    }
    if rows.is_empty() {
        return None;
    }
    Some(ComputedKeys {
        insert,
        key_idx,
        rows,
        key_type: table.key_type,
    })
}

impl ComputedKeys {
    /// The query that evaluates the computed keys: one row, a text column
    /// per computed key (in the key's type, as PostgreSQL would assign it).
    pub fn eval_sql(&self) -> String {
        let ty = key_type_sql(self.key_type);
        let cols: Vec<String> = self
            .key_exprs()
            .map(|e| format!("(({e})::{ty})::text"))
            .collect();
        format!("SELECT {}", cols.join(", "))
    }

    /// How many keys are computed.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no key is computed (never, for a value of this type).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn key_exprs(&self) -> impl Iterator<Item = &Expr> {
        let values = match self.insert.source.as_deref().map(|q| q.body.as_ref()) {
            Some(SetExpr::Values(v)) => Some(v),
            _ => None,
        };
        self.rows
            .iter()
            .filter_map(move |&r| values.and_then(|v| v.rows.get(r)?.content.get(self.key_idx)))
    }

    /// The statement with the computed keys replaced by `values` (as
    /// string literals, which PostgreSQL reads with the key column's type).
    pub fn substitute(&self, values: &[String]) -> String {
        let mut insert = self.insert.clone();
        if let Some(SetExpr::Values(v)) = insert.source.as_deref_mut().map(|q| q.body.as_mut()) {
            for (&r, value) in self.rows.iter().zip(values) {
                if let Some(slot) = v
                    .rows
                    .get_mut(r)
                    .and_then(|row| row.content.get_mut(self.key_idx))
                {
                    let lit = if value.contains('\\') {
                        Value::EscapedStringLiteral(value.clone())
                    } else {
                        Value::SingleQuotedString(value.clone())
                    };
                    *slot = Expr::value(lit);
                }
            }
        }
        Statement::Insert(insert).to_string()
    }
}

/// Whether `e` reads no table and takes no parameter: the home shard can
/// evaluate it for the client.
fn evaluable(e: &Expr) -> bool {
    struct Check(bool);
    impl Visitor for Check {
        type Break = ();
        fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
            self.0 = false;
            ControlFlow::Break(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            let ok = match e {
                Expr::Identifier(_)
                | Expr::CompoundIdentifier(_)
                | Expr::CompoundFieldAccess { .. }
                | Expr::Wildcard(_)
                | Expr::QualifiedWildcard(..) => false,
                Expr::Value(v) => !matches!(v.value, Value::Placeholder(_)),
                Expr::Function(f) => {
                    f.over.is_none()
                        && f.filter.is_none()
                        && f.within_group.is_empty()
                        && !matches!(f.args, FunctionArguments::Subquery(_))
                        && known(&f.name)
                }
                _ => true,
            };
            if ok {
                ControlFlow::Continue(())
            } else {
                self.0 = false;
                ControlFlow::Break(())
            }
        }
    }
    let mut c = Check(true);
    let _ = e.visit(&mut c);
    c.0
}

/// A function the home shard may evaluate for a key.
fn known(name: &ObjectName) -> bool {
    let n = last_name(name);
    let schema_ok = match name.0.len() {
        1 => true,
        2 => name.0[0]
            .as_ident()
            .is_some_and(|s| s.value.eq_ignore_ascii_case("pg_catalog")),
        _ => false,
    };
    schema_ok
        && ((PURE_FUNCTIONS.contains(&n.as_str()) && !NOT_FOR_KEYS.contains(&n.as_str()))
            || SEQUENCE_FUNCTIONS.contains(&n.as_str()))
}

/// An `INSERT INTO sharded (cols) SELECT …` whose rows the node computes
/// first (issue 14): the SELECT runs where it routes (one shard, inside the
/// client's transaction), and its rows are inserted as a multi-row
/// `INSERT … VALUES` ([`InsertSelect::values_sql`]), which the router
/// splits by key like any other.
#[derive(Debug, Clone)]
pub struct InsertSelect {
    insert: Insert,
    /// The target table as the statement names it (valid SQL).
    pub table_sql: String,
    /// The target columns, as the statement names them (valid SQL).
    pub columns_sql: Vec<String>,
    /// The source query.
    pub select_sql: String,
}

/// The `INSERT … SELECT` of `sql` into a sharded table, when it is one
/// statement with an explicit column list and a source that is not a plain
/// `VALUES` list. None otherwise.
pub fn insert_select(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
) -> Option<InsertSelect> {
    let (insert, _, name) = insert_into_sharded(snapshot, ns, sql)?;
    if insert.columns.is_empty() {
        return None;
    }
    let source = insert.source.as_ref()?;
    if matches!(source.body.as_ref(), SetExpr::Values(_)) && source.with.is_none() {
        return None;
    }
    let table_sql = name.to_string();
    let columns_sql: Vec<String> = insert.columns.iter().map(|c| c.to_string()).collect();
    let select_sql = typed_literals(source, &table_sql, &columns_sql).to_string();
    Some(InsertSelect {
        table_sql,
        columns_sql,
        select_sql,
        insert,
    })
}

/// `source` with each output that is a bare NULL or string literal given
/// its target column's type — `COALESCE(lit, (NULL::table).col)`. In the
/// INSERT PostgreSQL types such a literal by its column (`SELECT 1, NULL`
/// into a bigint, `'5'` into an integer); the node runs the SELECT on its
/// own, where it would come back as text, not assignable to the column.
///
/// Only in a plain SELECT list: where DISTINCT, GROUP BY, HAVING, ORDER BY
/// or a window may name the literal, PostgreSQL types it text first (and
/// refuses it for a bigint), and after a `*` the outputs no longer line up
/// with the columns.
fn typed_literals(source: &Query, table: &str, columns: &[String]) -> Query {
    let mut q = source.clone();
    let plain_tail = q.order_by.is_none() && q.with.is_none();
    let SetExpr::Select(sel) = q.body.as_mut() else {
        return q;
    };
    let plain = plain_tail
        && sel.distinct.is_none()
        && sel.having.is_none()
        && sel.named_window.is_empty()
        && matches!(&sel.group_by, sqlparser::ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty())
        && !super::merge_need::aggregates_in(&sel.projection);
    if !plain {
        return q;
    }
    for (item, col) in sel.projection.iter_mut().zip(columns) {
        let expr = match item {
            sqlparser::ast::SelectItem::UnnamedExpr(e)
            | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => e,
            // A `*` stands for any number of outputs: no more pairing.
            _ => break,
        };
        let literal = matches!(
            expr,
            Expr::Value(v) if matches!(
                v.value,
                Value::Null
                    | Value::SingleQuotedString(_)
                    | Value::EscapedStringLiteral(_)
                    | Value::DollarQuotedString(_)
            )
        );
        if !literal {
            continue;
        }
        let text = format!("COALESCE({expr}, (NULL::{table}).{col})");
        let dialect = PostgreSqlDialect {};
        if let Ok(e) = Parser::new(&dialect)
            .try_with_sql(&text)
            .and_then(|mut p| p.parse_expr())
        {
            *expr = e;
        }
    }
    q
}

impl InsertSelect {
    /// The statement with `rows` (text values, None for NULL) as its
    /// source, written as string literals that PostgreSQL reads with each
    /// column's type.
    pub fn values_sql(&self, rows: &[Vec<Option<String>>]) -> String {
        let lit = |v: &Option<String>| match v {
            None => Expr::value(Value::Null),
            Some(v) if v.contains('\\') => Expr::value(Value::EscapedStringLiteral(v.clone())),
            Some(v) => Expr::value(Value::SingleQuotedString(v.clone())),
        };
        let mut insert = self.insert.clone();
        let values = sqlparser::ast::Values {
            explicit_row: false,
            value_keyword: false,
            rows: rows
                .iter()
                .map(|r| sqlparser::ast::Parens::with_empty_span(r.iter().map(lit).collect()))
                .collect(),
        };
        if let Some(q) = insert.source.as_mut() {
            *q.body = SetExpr::Values(values);
            q.settings = None;
            q.format_clause = None;
            q.for_clause = None;
            q.pipe_operators.clear();
            q.with = None;
            q.order_by = None;
            q.limit_clause = None;
            q.fetch = None;
            q.locks.clear();
        }
        Statement::Insert(insert).to_string()
    }
}

/// An `INSERT … VALUES` into a sharded table that leaves columns the node
/// must fill to their default (issue 14): the shard key (not in the column
/// list, or `DEFAULT` in its place in some rows: `INSERT INTO users (name)
/// VALUES ($1) RETURNING id`, what ORMs send for a `serial`, identity or
/// `gen_random_uuid()` key), and other columns numbered by a sequence.
///
/// The router cannot route a row whose key does not exist yet, and a
/// sequence default evaluated by each shard would number rows on each
/// shard on its own: the same `id` on two shards, where PostgreSQL gives
/// every row its own. The node reads the defaults on the home shard
/// (where the sequences it numbers rows with live), evaluates them there
/// once per row, inside the client's transaction, and writes the values
/// in: as literals in the simple protocol ([`ColumnFill::with_values`]),
/// as parameters numbered after the client's in the extended protocol
/// ([`ColumnFill::with_params`]).
#[derive(Debug, Clone)]
pub struct ColumnFill {
    insert: Insert,
    slots: Vec<Slot>,
    /// Whether the statement says `OVERRIDING SYSTEM VALUE` itself.
    pub overriding: bool,
    /// The target table as the statement names it (valid SQL).
    pub table_sql: String,
    /// The declared sharded table.
    pub table: String,
    /// The shard key column (as the catalog names it).
    pub key_column: String,
    /// The type of the table's shard key.
    pub key_type: KeyType,
}

/// One column a [`ColumnFill`] fills.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The column (as the catalog names it).
    pub column: String,
    /// Its place in the column list; None: not in it.
    idx: Option<usize>,
    /// The rows whose value is the default, in order.
    rows: Vec<usize>,
    /// Whether every row's value is the default.
    pub all_rows: bool,
}

impl Slot {
    /// How many values it needs.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it needs none (never).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Those of `columns` an `INSERT … SELECT` (or other source than a plain
/// `VALUES` list) into a sharded table leaves to their default: the
/// columns not in its column list. None for anything else, or when it
/// leaves none.
pub fn omitted_by_select(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
    columns: &[&str],
) -> Option<Vec<String>> {
    let (insert, _, _) = insert_into_sharded(snapshot, ns, sql)?;
    let source = insert.source.as_ref()?;
    if matches!(source.body.as_ref(), SetExpr::Values(_)) && source.with.is_none() {
        return None;
    }
    if insert.columns.is_empty() {
        // Every column, in order (a SELECT of fewer leaves the last ones
        // to their default; not told here).
        return None;
    }
    let left: Vec<String> = columns
        .iter()
        .filter(|c| !insert.columns.iter().any(|x| last_name(x) == **c))
        .map(|c| c.to_string())
        .collect();
    (!left.is_empty()).then_some(left)
}

/// The declared sharded table `sql` inserts into, when it is one `INSERT`.
pub fn insert_table(snapshot: &RoutingSnapshot, ns: &Namespace, sql: &str) -> Option<String> {
    insert_into_sharded(snapshot, ns, sql).map(|(_, t, _)| t.name)
}

/// `sql` as a [`ColumnFill`] of its shard key alone, when it is one
/// `INSERT … VALUES` into a sharded table with an explicit column list,
/// rows as wide as it, that leaves its key to the default in some row.
/// None otherwise (and for `OVERRIDING USER VALUE`, which PostgreSQL reads
/// differently).
pub fn key_default(snapshot: &RoutingSnapshot, ns: &Namespace, sql: &str) -> Option<ColumnFill> {
    let (insert, table, name) = insert_into_sharded(snapshot, ns, sql)?;
    let key = table.key_column.clone();
    fill_of(insert, &table, name, &[key.as_str()])
}

/// `sql` as a [`ColumnFill`] of those of `columns` (catalog names; the
/// key among them or not) it leaves to their default, when it is one
/// `INSERT … VALUES` into a sharded table as [`key_default`] says. None
/// otherwise, or when it sets all of them.
pub fn column_fill(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
    columns: &[&str],
) -> Option<ColumnFill> {
    let (insert, table, name) = insert_into_sharded(snapshot, ns, sql)?;
    fill_of(insert, &table, name, columns)
}

fn fill_of(
    insert: Insert,
    table: &ShardedTable,
    name: ObjectName,
    columns: &[&str],
) -> Option<ColumnFill> {
    if insert.columns.is_empty()
        || matches!(
            insert.overriding,
            Some(sqlparser::ast::InsertOverriding::User)
        )
    {
        return None;
    }
    let source = insert.source.as_ref()?;
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return None;
    }
    let width = insert.columns.len();
    if values.rows.iter().any(|r| r.content.len() != width) {
        return None;
    }
    let mut slots = Vec::new();
    for &column in columns {
        let idx = insert.columns.iter().position(|c| last_name(c) == column);
        let rows: Vec<usize> = match idx {
            None => (0..values.rows.len()).collect(),
            Some(k) => values
                .rows
                .iter()
                .enumerate()
                .filter(|(_, r)| r.content.get(k).is_some_and(is_default))
                .map(|(i, _)| i)
                .collect(),
        };
        if !rows.is_empty() {
            slots.push(Slot {
                column: column.to_owned(),
                idx,
                all_rows: rows.len() == values.rows.len(),
                rows,
            });
        }
    }
    if slots.is_empty() {
        return None;
    }
    Some(ColumnFill {
        overriding: insert.overriding.is_some(),
        slots,
        table_sql: name.to_string(),
        table: table.name.clone(),
        key_column: table.key_column.clone(),
        key_type: table.key_type,
        insert,
    })
}

/// `DEFAULT` in a row of `VALUES`.
fn is_default(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(id) if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default"))
}

/// A column default the home shard may evaluate for a key (see
/// [`ComputedKeys`]): an expression that reads no table.
pub fn default_evaluable(expr: &str) -> bool {
    let dialect = PostgreSqlDialect {};
    let Ok(mut p) = Parser::new(&dialect).try_with_sql(expr) else {
        return false;
    };
    p.parse_expr().is_ok_and(|e| evaluable(&e))
}

/// `SELECT` of `n` rows, each the expression `expr` (a column default)
/// as text — in the key's type as PostgreSQL assigns it when `key_type`
/// is given.
pub fn default_eval_sql(expr: &str, key_type: Option<KeyType>, n: usize) -> String {
    let value = match key_type {
        Some(t) => format!("((({expr}))::{})", key_type_sql(t)),
        None => format!("(({expr}))"),
    };
    format!("SELECT {value}::pg_catalog.text FROM pg_catalog.generate_series(1, {n})")
}

fn key_type_sql(t: KeyType) -> &'static str {
    match t {
        KeyType::Int2 => "int2",
        KeyType::Int4 => "int4",
        KeyType::Int8 => "int8",
        KeyType::Text => "text",
        KeyType::Uuid => "uuid",
    }
}

impl ColumnFill {
    /// The columns it fills, in the order their values are taken.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// How many values it needs in all.
    pub fn values_needed(&self) -> usize {
        self.slots.iter().map(Slot::len).sum()
    }

    /// The highest parameter number (`$n`) the statement uses.
    pub fn max_param(&self) -> usize {
        struct Max(usize);
        impl Visitor for Max {
            type Break = ();
            fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
                if let Expr::Value(v) = e {
                    if let Value::Placeholder(p) = &v.value {
                        if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                            self.0 = self.0.max(n);
                        }
                    }
                }
                ControlFlow::Continue(())
            }
        }
        let mut m = Max(0);
        let _ = self.insert.visit(&mut m);
        m.0
    }

    /// The statement with the `i`-th missing value (slot by slot, row by
    /// row) written as `value(i)`, and `OVERRIDING SYSTEM VALUE` when
    /// `overriding`.
    fn with(&self, overriding: bool, value: impl Fn(usize) -> Expr) -> String {
        let mut insert = self.insert.clone();
        let mut at = 0;
        for slot in &self.slots {
            let idx =
                match slot.idx {
                    Some(i) => i,
                    None => {
                        insert.columns.push(ObjectName::from(vec![
                            sqlparser::ast::Ident::with_quote('"', slot.column.as_str()),
                        ]));
                        insert.columns.len() - 1
                    }
                };
            if let Some(SetExpr::Values(v)) = insert.source.as_deref_mut().map(|q| q.body.as_mut())
            {
                for &r in &slot.rows {
                    let Some(row) = v.rows.get_mut(r) else {
                        continue;
                    };
                    let e = value(at);
                    at += 1;
                    if slot.idx.is_none() {
                        row.content.push(e);
                    } else if let Some(place) = row.content.get_mut(idx) {
                        *place = e;
                    }
                }
            }
        }
        if overriding {
            insert.overriding = Some(sqlparser::ast::InsertOverriding::System);
        }
        Statement::Insert(insert).to_string()
    }

    /// The statement with the missing values as string literals (which
    /// PostgreSQL reads with each column's type), in slot-by-slot order
    /// (simple protocol).
    pub fn with_values(&self, values: &[String], overriding: bool) -> String {
        self.with(overriding, |i| {
            let v = values.get(i).cloned().unwrap_or_default();
            Expr::value(if v.contains('\\') {
                Value::EscapedStringLiteral(v)
            } else {
                Value::SingleQuotedString(v)
            })
        })
    }

    /// The statement with the missing values as parameters `$first`,
    /// `$first + 1` … (extended protocol).
    pub fn with_params(&self, first: usize, overriding: bool) -> String {
        self.with(overriding, |i| {
            Expr::value(Value::Placeholder(format!("${}", first + i)))
        })
    }
}

/// `INSERT INTO sharded (cols) SELECT e1, … FROM (VALUES …) AS a(x1, …)
/// [ORDER BY xk]` as the `INSERT … VALUES` it means, each row's values put
/// into the select list (issue 14): what SQLAlchemy 2's ORM sends to insert
/// several objects and get their keys back in order (`insertmanyvalues`
/// with a sentinel column). The router can then split the rows by key.
///
/// Only that shape, where the rewrite is exact: each select-list item a
/// column of the VALUES list, possibly cast (`p0::VARCHAR`); no other
/// table, filter, grouping, DISTINCT or LIMIT; `ORDER BY` one column of
/// integer literals (the rows are put in that order, as PostgreSQL would
/// insert them). None otherwise (the statement keeps its own path).
pub fn values_select(snapshot: &RoutingSnapshot, ns: &Namespace, sql: &str) -> Option<String> {
    let (mut insert, _, _) = insert_into_sharded(snapshot, ns, sql)?;
    if insert.columns.is_empty() {
        return None;
    }
    let source = insert.source.as_ref()?;
    if source.with.is_some()
        || source.limit_clause.is_some()
        || source.fetch.is_some()
        || !source.locks.is_empty()
    {
        return None;
    }
    let SetExpr::Select(select) = source.body.as_ref() else {
        return None;
    };
    let plain = select.distinct.is_none()
        && select.top.is_none()
        && select.into.is_none()
        && select.lateral_views.is_empty()
        && select.prewhere.is_none()
        && select.selection.is_none()
        && select.connect_by.is_empty()
        && matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        && select.cluster_by.is_empty()
        && select.distribute_by.is_empty()
        && select.sort_by.is_empty()
        && select.having.is_none()
        && select.named_window.is_empty()
        && select.qualify.is_none()
        && select.exclude.is_none();
    let [from] = select.from.as_slice() else {
        return None;
    };
    if !plain || !from.joins.is_empty() {
        return None;
    }
    let sqlparser::ast::TableFactor::Derived {
        lateral: false,
        subquery,
        alias: Some(alias),
        sample: None,
    } = &from.relation
    else {
        return None;
    };
    if subquery.with.is_some() || subquery.order_by.is_some() || subquery.limit_clause.is_some() {
        return None;
    }
    let SetExpr::Values(values) = subquery.body.as_ref() else {
        return None;
    };
    let names: Vec<&sqlparser::ast::Ident> = alias.columns.iter().map(|c| &c.name).collect();
    if names.is_empty() || values.rows.iter().any(|r| r.content.len() != names.len()) {
        return None;
    }
    // A column of the VALUES list, by name (folded as PostgreSQL folds it).
    let column = |e: &Expr| -> Option<usize> {
        let id = match e {
            Expr::Identifier(id) => id,
            Expr::CompoundIdentifier(ids) => match ids.as_slice() {
                [a, id] if same_ident(a, &alias.name) => id,
                _ => return None,
            },
            _ => return None,
        };
        let at = names.iter().position(|n| same_ident(n, id))?;
        // A name given twice is ambiguous to PostgreSQL.
        (names.iter().filter(|n| same_ident(n, id)).count() == 1).then_some(at)
    };
    // Each select-list item: (the column it reads, the item as written).
    let mut items: Vec<(usize, &Expr)> = Vec::with_capacity(select.projection.len());
    for item in &select.projection {
        let e = match item {
            sqlparser::ast::SelectItem::UnnamedExpr(e) => e,
            sqlparser::ast::SelectItem::ExprWithAlias { expr, .. } => expr,
            _ => return None,
        };
        let mut inner = e;
        loop {
            match inner {
                Expr::Cast {
                    expr, format: None, ..
                } => inner = expr,
                Expr::Nested(x) => inner = x,
                _ => break,
            }
        }
        items.push((column(inner)?, e));
    }
    if items.len() != insert.columns.len() {
        return None;
    }
    // A VALUES column neither selected nor sorted by would be dropped:
    // only a literal may be (a parameter would change the statement's
    // parameter count, a function call would not run).
    let sort_col = match &source.order_by {
        Some(ob) => match &ob.kind {
            sqlparser::ast::OrderByKind::Expressions(exprs) => match exprs.as_slice() {
                [key] => {
                    // PostgreSQL reads an ORDER BY name as an output
                    // column's alias first.
                    let alias_named = select.projection.iter().any(|item| {
                        matches!((item, &key.expr),
                            (sqlparser::ast::SelectItem::ExprWithAlias { alias, .. }, Expr::Identifier(id))
                                if same_ident(alias, id))
                    });
                    if alias_named {
                        return None;
                    }
                    Some(column(&key.expr)?)
                }
                _ => return None,
            },
            _ => return None,
        },
        None => None,
    };
    for j in 0..names.len() {
        let used = items.iter().any(|(c, _)| *c == j) || sort_col == Some(j);
        if !used
            && values
                .rows
                .iter()
                .any(|r| !matches!(&r.content[j], Expr::Value(v) if !matches!(v.value, Value::Placeholder(_))))
        {
            return None;
        }
    }
    // The rows, in the ORDER BY's order.
    let mut order: Vec<usize> = (0..values.rows.len()).collect();
    if let Some(ob) = &source.order_by {
        let sqlparser::ast::OrderByKind::Expressions(exprs) = &ob.kind else {
            return None;
        };
        let [key] = exprs.as_slice() else {
            return None;
        };
        if !matches!(
            key.options.sort,
            None | Some(sqlparser::ast::OrderBySort::Asc)
        ) || key.with_fill.is_some()
            || ob.interpolate.is_some()
        {
            return None;
        }
        let k = column(&key.expr)?;
        let mut keys = Vec::with_capacity(values.rows.len());
        for row in &values.rows {
            match &row.content[k] {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => keys.push(n.parse::<i64>().ok()?),
                    _ => return None,
                },
                _ => return None,
            }
        }
        order.sort_by_key(|&i| keys[i]);
    }
    // Each row's values put into the select list.
    fn put(e: &Expr, value: &Expr) -> Expr {
        match e {
            Expr::Cast {
                kind,
                expr,
                data_type,
                format,
            } => Expr::Cast {
                kind: kind.clone(),
                expr: Box::new(put(expr, value)),
                data_type: data_type.clone(),
                format: format.clone(),
            },
            Expr::Nested(x) => Expr::Nested(Box::new(put(x, value))),
            _ => Expr::Nested(Box::new(value.clone())),
        }
    }
    let rows: Vec<sqlparser::ast::Parens<Vec<Expr>>> = order
        .iter()
        .map(|&r| {
            let row = &values.rows[r].content;
            sqlparser::ast::Parens::with_empty_span(
                items.iter().map(|(j, e)| put(e, &row[*j])).collect(),
            )
        })
        .collect();
    let mut q = (**subquery).clone();
    if let SetExpr::Values(v) = q.body.as_mut() {
        v.rows = rows;
    }
    insert.source = Some(Box::new(q));
    Some(Statement::Insert(insert).to_string())
}

/// Whether two identifiers name the same thing (unquoted ones fold to
/// lower case).
fn same_ident(a: &sqlparser::ast::Ident, b: &sqlparser::ast::Ident) -> bool {
    let fold = |i: &sqlparser::ast::Ident| {
        if i.quote_style.is_some() {
            i.value.clone()
        } else {
            i.value.to_lowercase()
        }
    };
    fold(a) == fold(b)
}

/// An `INSERT INTO sharded VALUES …` without a column list (issue 14):
/// the router needs to know which value is the shard key, so the node
/// reads the table's columns (in order, from a shard) and writes them in
/// ([`NoColumnList::with_columns`]), as PostgreSQL reads such a statement.
#[derive(Debug, Clone)]
pub struct NoColumnList {
    insert: Insert,
    /// The target table as the statement names it (valid SQL).
    pub table_sql: String,
    /// How many values each row has.
    pub width: usize,
}

/// The `INSERT … VALUES` without a column list into a sharded table of
/// `sql` (one statement, rows of equal width), or None.
pub fn no_column_list(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
) -> Option<NoColumnList> {
    let (insert, _, name) = insert_into_sharded(snapshot, ns, sql)?;
    if !insert.columns.is_empty() {
        return None;
    }
    let SetExpr::Values(values) = insert.source.as_ref()?.body.as_ref() else {
        return None;
    };
    let width = values.rows.first()?.content.len();
    if width == 0 || values.rows.iter().any(|r| r.content.len() != width) {
        return None;
    }
    Some(NoColumnList {
        table_sql: name.to_string(),
        width,
        insert,
    })
}

impl NoColumnList {
    /// The statement with the first `width` of `columns` (the table's, in
    /// order) as its column list; None when the table has fewer columns
    /// than a row has values.
    pub fn with_columns(&self, columns: &[String]) -> Option<String> {
        let mut insert = self.insert.clone();
        insert.columns = columns
            .get(..self.width)?
            .iter()
            .map(|c| ObjectName::from(vec![sqlparser::ast::Ident::with_quote('"', c.as_str())]))
            .collect();
        Some(Statement::Insert(insert).to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn evaluable_sql(e: &str) -> bool {
        let sql = format!("SELECT {e}");
        let Statement::Query(q) = Parser::parse_sql(&PostgreSqlDialect {}, &sql)
            .unwrap()
            .remove(0)
        else {
            panic!()
        };
        let SetExpr::Select(s) = *q.body else {
            panic!()
        };
        let sqlparser::ast::SelectItem::UnnamedExpr(e) = &s.projection[0] else {
            panic!()
        };
        evaluable(e)
    }

    fn kd(sql: &str) -> Option<ColumnFill> {
        key_default(&crate::fuzzing::snapshot(), &Namespace::default(), sql)
    }

    #[test]
    fn columns_left_to_their_default_are_written_in() {
        let k = kd("INSERT INTO users (name) VALUES ($1), ($2) RETURNING id").unwrap();
        assert_eq!(
            (k.values_needed(), k.slots()[0].all_rows, k.max_param()),
            (2, true, 2)
        );
        assert_eq!(k.key_column, "id");
        assert_eq!(
            k.with_params(3, false),
            "INSERT INTO users (name, \"id\") VALUES ($1, $3), ($2, $4) RETURNING id"
        );
        assert_eq!(
            k.with_values(&["7".into(), "8".into()], true),
            "INSERT INTO users (name, \"id\") OVERRIDING SYSTEM VALUE VALUES ($1, '7'), ($2, '8') RETURNING id"
        );
        // DEFAULT in the key's place, in some rows only.
        let k = kd("INSERT INTO users (id, name) VALUES (DEFAULT, 'a'), (7, 'b'), (default, 'c')")
            .unwrap();
        assert_eq!(
            (k.values_needed(), k.slots()[0].all_rows, k.max_param()),
            (2, false, 0)
        );
        assert_eq!(
            k.with_params(1, false),
            "INSERT INTO users (id, name) VALUES ($1, 'a'), (7, 'b'), ($2, 'c')"
        );
        // Another column numbered by a sequence beside the key: slot by
        // slot, DEFAULT kept where a row sets the column itself.
        let snap = crate::fuzzing::snapshot();
        let f = column_fill(
            &snap,
            &Namespace::default(),
            "INSERT INTO orders (user_id, seq, note) VALUES (1, DEFAULT, 'a'), (2, 5, 'b')",
            &["user_id", "seq", "serial_no"],
        )
        .unwrap();
        let cols: Vec<&str> = f.slots().iter().map(|s| s.column.as_str()).collect();
        assert_eq!(cols, ["seq", "serial_no"]);
        assert_eq!(f.values_needed(), 3);
        assert_eq!(
            f.with_params(1, false),
            "INSERT INTO orders (user_id, seq, note, \"serial_no\") VALUES (1, $1, 'a', $2), (2, 5, 'b', $3)"
        );
        assert!(column_fill(
            &snap,
            &Namespace::default(),
            "INSERT INTO orders (user_id, seq) VALUES (1, 2)",
            &["seq"]
        )
        .is_none());
        // Not this case: the key given, no column list, a SELECT, USER VALUE.
        for no in [
            "INSERT INTO users (id, name) VALUES (1, 'a')",
            "INSERT INTO users VALUES (DEFAULT, 'a')",
            "INSERT INTO users (name) SELECT 'a'",
            "INSERT INTO users (id, name) OVERRIDING USER VALUE VALUES (DEFAULT, 'a')",
            "INSERT INTO other (name) VALUES ('a')",
            "INSERT INTO users (name, id) VALUES ('a')",
        ] {
            assert!(kd(no).is_none(), "{no}");
        }
        assert!(default_evaluable("nextval('users_id_seq'::regclass)"));
        assert!(default_evaluable("gen_random_uuid()"));
        assert!(!default_evaluable("my_next_id()"));
        assert!(!default_evaluable("nextval("));
        assert_eq!(
            default_eval_sql("gen_random_uuid()", Some(KeyType::Uuid), 3),
            "SELECT (((gen_random_uuid()))::uuid)::pg_catalog.text FROM pg_catalog.generate_series(1, 3)"
        );
        assert_eq!(
            default_eval_sql("nextval('s'::regclass)", None, 2),
            "SELECT ((nextval('s'::regclass)))::pg_catalog.text FROM pg_catalog.generate_series(1, 2)"
        );
    }

    #[test]
    fn a_select_from_values_is_the_values_it_means() {
        let vs = |sql: &str| values_select(&crate::fuzzing::snapshot(), &Namespace::default(), sql);
        // SQLAlchemy 2's insertmanyvalues with a sentinel (rows out of order
        // here, to show the ORDER BY is followed).
        assert_eq!(
            vs("INSERT INTO users (name, n) SELECT p0::VARCHAR, p1::INTEGER FROM \
                (VALUES ($1::VARCHAR, $2::INTEGER, 1), ($3::VARCHAR, $4::INTEGER, 0)) \
                AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING users.id, users.id AS id__1")
            .unwrap(),
            "INSERT INTO users (name, n) VALUES (($3::VARCHAR)::VARCHAR, ($4::INTEGER)::INTEGER), \
             (($1::VARCHAR)::VARCHAR, ($2::INTEGER)::INTEGER) RETURNING users.id, users.id AS id__1"
        );
        assert_eq!(
            vs("INSERT INTO users (id, name) SELECT v.a, b FROM (VALUES (1, 'x'), (2, 'y')) AS v (a, b)")
                .unwrap(),
            "INSERT INTO users (id, name) VALUES ((1), ('x')), ((2), ('y'))"
        );
        for no in [
            "INSERT INTO users (id) SELECT a + 1 FROM (VALUES (1)) AS v (a)",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1)) AS v (a) WHERE a > 0",
            "INSERT INTO users (id) SELECT DISTINCT a FROM (VALUES (1)) AS v (a)",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1)) AS v (a) LIMIT 1",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1)) AS v (a) ORDER BY a DESC",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1, $1)) AS v (a, s) ORDER BY s",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1)) AS v (a), other",
            "INSERT INTO users (id) SELECT a FROM (VALUES (1)) AS v (a, a)",
            "INSERT INTO users (id) SELECT a FROM other",
            "INSERT INTO users (id) SELECT count(a) FROM (VALUES (1)) AS v (a)",
            "INSERT INTO users (id, name) SELECT a FROM (VALUES (1)) AS v (a)",
            "INSERT INTO countries (id) SELECT a FROM (VALUES (1)) AS v (a)",
            // a parameter in a column that would be dropped
            "INSERT INTO users (id) SELECT a FROM (VALUES (1, $1)) AS v (a, b)",
            // ORDER BY an output alias (PostgreSQL reads it first)
            "INSERT INTO users (id, name) SELECT b AS a, a AS b FROM (VALUES (1, 2, 3)) AS v (a, b, s) ORDER BY a",
        ] {
            assert!(vs(no).is_none(), "{no}");
        }
    }

    #[test]
    fn what_the_home_shard_may_evaluate() {
        for yes in [
            "1 + 1",
            "-(2 * 3)",
            "'acme:' || 7",
            "nextval('ids')",
            "pg_catalog.nextval('s')::int8",
            "gen_random_uuid()",
            "lower('ABC') || md5('x')",
            "CAST('5' AS bigint) + 1",
        ] {
            assert!(evaluable_sql(yes), "{yes}");
        }
        for no in [
            "id + 1",
            "t.id",
            "$1 + 1",
            "(SELECT max(id) FROM t)",
            "my_func(1)",
            "other.nextval('s')",
            "generate_series(1, 3)",
            "pg_sleep(1)",
            "count(*) OVER ()",
        ] {
            assert!(!evaluable_sql(no), "{no}");
        }
    }
}
