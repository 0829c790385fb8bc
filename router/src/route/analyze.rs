//! Plan-time analysis of one parsed statement: which tables it touches, in
//! which scopes, which shard-key values restrict them, which are joined on
//! their keys, and what a multi-shard read would have to merge.
//!
//! The model (see the soundness notes on each rule):
//!
//! * Every appearance of a sharded table in a FROM list is an *occurrence*,
//!   living in a *scope* (one per SELECT / UPDATE / DELETE, chained to the
//!   enclosing scope for correlated references).
//! * A *pin* restricts the rows of an occurrence that can matter to the
//!   statement to a set of keys. Pins come only from conditions that filter
//!   that occurrence: its scope's WHERE, or the ON of a join in which it is
//!   not the preserved side of an outer join.
//! * An occurrence *inherits* the restriction of another through a filtering
//!   key equality (`a.k = b.k` in a's WHERE or filtering ON, or
//!   `a.k IN (SELECT b.k …)`), and only between co-located tables.
//! * *Edges* (any key equality between co-located occurrences that relates
//!   their rows) connect occurrences; a statement may be scattered only if all
//!   sharded occurrences form one connected component and one of them sits,
//!   not null-extended, in the outermost scope (the *anchor*): then every
//!   output row derives from rows of a single shard.
//!
//! Everything else — column references we cannot resolve, expressions that
//! are not plain literals or parameters — simply pins nothing, which can only
//! widen a route, never narrow it wrongly.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, BinaryOperator, Distinct, Expr, FunctionArgumentClause, FunctionArguments, GroupByExpr,
    Ident, InTarget, JoinConstraint, JoinOperator, ObjectName, Query, Select, SelectItem, SetExpr,
    Statement, TableFactor, TableWithJoins, Value, Visit, Visitor,
};

mod merge_plan;
mod stmt;

use merge_plan::merge_plan;

use super::keys::{array_src, colocated, value_src, KeyExpr, Src, SrcError, TypedSrc};
use super::split::SplitText;
use super::{CopyDirection, MergeNeed, Namespace, RouteError, StatementKind, TransactionKind};
use crate::catalog::{KeyType, RoutingSnapshot, ShardedTable, TablePlacement};

/// A sharded occurrence as the binder sees it.
#[derive(Debug, Clone)]
pub(super) struct ShapeOcc {
    pub table: ShardedTable,
    /// The keys its relevant rows can have, evaluated with the key type and
    /// function of the second field (the table the restriction came from).
    pub restriction: Option<(KeyExpr, ShardedTable)>,
}

/// The general case: routed from the occurrences.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    pub occs: Vec<ShapeOcc>,
    /// Number of connected components among `occs`.
    pub components: usize,
    /// Whether an occurrence in the outermost scope is not null-extended.
    pub anchored: bool,
    /// An undeclared table the statement uses (it must run on the home shard).
    pub home_table: Option<String>,
    /// `UPDATE … SET key = v`: the new key (must stay on the same shard).
    pub update_key: Option<(ShardedTable, TypedSrc)>,
    /// `INSERT … SELECT` into a sharded table (for messages).
    pub insert_select: bool,
}

/// `INSERT … VALUES` into a sharded table.
#[derive(Debug, Clone)]
pub(super) struct InsertPlan {
    pub table: ShardedTable,
    /// The key of each row.
    pub rows: Vec<TypedSrc>,
    /// An undeclared table read by a subquery (all rows must go home).
    pub home_table: Option<String>,
    /// The statement's text cut into rows, for rewriting when split (None:
    /// not splittable: a single row, `$n` placeholders, or under EXPLAIN).
    pub split: Option<SplitText>,
    /// Whether the statement text has `$n` placeholders.
    pub has_placeholders: bool,
}

/// What the binder does with a statement.
#[derive(Debug, Clone)]
pub(super) enum Body {
    /// No table: any shard.
    Any,
    /// The home shard.
    Home,
    /// Every shard.
    All,
    /// Routed by occurrences.
    Shape(Shape),
    /// Routed row by row.
    Insert(InsertPlan),
    /// `COPY` of a sharded table (or `COPY FROM` of a reference table): every
    /// shard; the executor splits the rows (see [`super::copy`]).
    Copy(std::sync::Arc<super::copy::CopyPlan>),
}

/// One statement's plan.
#[derive(Debug, Clone)]
pub(super) struct StmtPlan {
    pub kind: StatementKind,
    pub is_write: bool,
    pub body: Body,
    /// What a multi-shard execution of this read would have to merge.
    pub merge: MergeNeed,
    /// Sharded tables it touches (for `key=` hints).
    pub sharded_tables: Vec<ShardedTable>,
    /// It writes a reference table (a shard hint must not narrow it).
    pub reference_write: bool,
    /// It writes a sharded table (a shard hint must respect ownership and
    /// the freeze, see [`super::eval`]).
    pub writes_sharded: bool,
    /// It may write although it is no DML: `FOR UPDATE/SHARE` (row locks
    /// that must last to the commit). With [`StmtPlan::calls`], for commit
    /// purposes only (two-phase commit): routing still reads.
    pub may_write: bool,
    /// Functions it calls that the router does not know to be read-only
    /// (lower case, unqualified, deduplicated): the node treats the
    /// statement as a write when one of them is volatile.
    pub calls: Vec<String>,
}

impl StmtPlan {
    pub(super) fn fixed(kind: StatementKind, is_write: bool, body: Body) -> StmtPlan {
        StmtPlan {
            kind,
            is_write,
            body,
            merge: MergeNeed::None,
            sharded_tables: Vec::new(),
            reference_write: false,
            writes_sharded: false,
            may_write: false,
            calls: Vec::new(),
        }
    }

    /// Whether hints apply to this kind of statement.
    pub(super) fn hintable(&self) -> bool {
        !matches!(
            self.kind,
            StatementKind::Empty
                | StatementKind::Transaction(_)
                | StatementKind::Set
                | StatementKind::Reset
                | StatementKind::Show
        )
    }
}

fn unsupported(msg: impl Into<String>) -> RouteError {
    RouteError::unsupported(msg)
}

/// Folds an identifier as PostgreSQL does: unquoted → ASCII lower case.
pub(super) fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_ascii_lowercase()
    }
}

impl Analyzer<'_> {
    /// See [`table_name`].
    fn table_name(&self, name: &ObjectName) -> Result<String, RouteError> {
        table_name(self.ns, name)
    }
}

/// The catalog name of a relation: `public.t` → `t`, `s.t` → `s.t`, and
/// `t` as the session's search path resolves it ([`Namespace`]). A
/// relation that reaches a declared table without being declared itself (a
/// view over it, a partition …) is refused.
pub(super) fn table_name(ns: &Namespace, name: &ObjectName) -> Result<String, RouteError> {
    let mut parts = Vec::with_capacity(name.0.len());
    for p in &name.0 {
        match p.as_ident() {
            Some(id) => parts.push(norm(id)),
            None => return Err(unsupported(format!("table name {name}"))),
        }
    }
    let (schema, t) = match parts.as_slice() {
        [t] => match ns.resolve(t) {
            Some(s) => (s.to_owned(), t.clone()),
            None => return Ok(t.clone()),
        },
        [s, t] => (s.clone(), t.clone()),
        _ => {
            return Err(unsupported(format!(
                "table name {name} (database-qualified names are not supported)"
            )))
        }
    };
    if let Some(declared) = ns.reaching.get(&(schema.clone(), t.clone())) {
        return Err(unsupported(format!(
            "relation \"{schema}.{t}\" is not declared to hotrepart but reaches table \"{declared}\" (a view over it, or a partition or inheritance parent or child of it): on one shard it would see or change that shard's rows only; use \"{declared}\" itself, or declare the relation"
        )));
    }
    Ok(if schema == "public" {
        t
    } else {
        format!("{schema}.{t}")
    })
}

/// Functions that are known not to read tables (for table-less statements).
const PURE_FUNCTIONS: &[&str] = &[
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "version",
    "current_setting",
    "current_user",
    "session_user",
    "current_role",
    "user",
    "current_database",
    "current_catalog",
    "current_schema",
    "current_schemas",
    "pg_backend_pid",
    "random",
    "gen_random_uuid",
    "abs",
    "lower",
    "upper",
    "length",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "concat",
    "concat_ws",
    "format",
    "to_char",
    "to_timestamp",
    "to_date",
    "date_trunc",
    "extract",
    "date_part",
    "substring",
    "substr",
    "trim",
    "replace",
    "md5",
    "round",
    "floor",
    "ceil",
    "pg_sleep",
    "inet_server_addr",
    "inet_server_port",
    "txid_current",
    "pg_current_xact_id",
    "set_config",
    "array_length",
    "generate_series",
    "unnest",
    "cast",
];

/// Built-in functions that never write data (besides [`PURE_FUNCTIONS`] and
/// [`AGGREGATES`]): a statement calling only these is no write for commit
/// purposes. Any other call may write (a volatile function can run DML):
/// the node asks the shard's `pg_proc` whether the name is volatile.
const READ_ONLY: &[&str] = &[
    "position",
    "strpos",
    "left",
    "right",
    "lpad",
    "rpad",
    "ltrim",
    "rtrim",
    "btrim",
    "split_part",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "starts_with",
    "string_to_array",
    "array_to_string",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_position",
    "array_remove",
    "array_replace",
    "array_lower",
    "array_upper",
    "array_dims",
    "cardinality",
    "to_json",
    "to_jsonb",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_array_elements",
    "jsonb_each",
    "jsonb_each_text",
    "json_each",
    "jsonb_object_keys",
    "jsonb_typeof",
    "json_typeof",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_strip_nulls",
    "jsonb_pretty",
    "row_to_json",
    "row_number",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "ntile",
    "nth_value",
    "sign",
    "sqrt",
    "cbrt",
    "power",
    "pow",
    "exp",
    "ln",
    "log",
    "log10",
    "mod",
    "div",
    "trunc",
    "pi",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "width_bucket",
    "scale",
    "gcd",
    "lcm",
    "age",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "date_bin",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "isfinite",
    "to_number",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "encode",
    "decode",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "initcap",
    "repeat",
    "reverse",
    "translate",
    "ascii",
    "chr",
    "overlay",
    "hashtext",
    "hashtextextended",
    "hashint4extended",
    "hashint8extended",
    "uuid_hash_extended",
    "num_nonnulls",
    "num_nulls",
    "array_fill",
    "array_ndims",
    "string_to_table",
    "unistr",
    "normalize",
    "to_hex",
    "to_ascii",
    "convert_from",
    "convert_to",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
    "lower_inc",
    "upper_inc",
    "isempty",
    "host",
    "masklen",
    "family",
    "abbrev",
    "broadcast",
    "network",
    "setseed",
    "exists",
    "any",
    "all",
    "row",
    "array",
    "coalesce",
    "current_schema",
    "pg_typeof",
    "format_type",
    "pg_get_viewdef",
    "obj_description",
    "col_description",
    "has_table_privilege",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_database_size",
    "pg_column_size",
    "pg_postmaster_start_time",
    "pg_is_in_recovery",
    "inet_client_addr",
    "inet_client_port",
    "txid_current_if_assigned",
];

/// Aggregate functions of PostgreSQL 15 (built-in).
pub(super) const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "range_agg",
    "range_intersect_agg",
    "any_value",
    "grouping",
];

fn last_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(norm)
        .unwrap_or_default()
}

/// Where a FROM item's name points.
#[derive(Debug, Clone)]
struct Item {
    /// Name visible to column references (alias, or the table's own name).
    visible: String,
    /// `schema.table` when not aliased (for three-part column references).
    qualified: Option<String>,
    /// The sharded occurrence, if any.
    occ: Option<usize>,
    /// `AS a(x, y)`: columns renamed, the key column name is unreliable.
    col_aliases: bool,
}

#[derive(Debug, Default)]
struct Scope {
    parent: Option<usize>,
    items: Vec<Item>,
    /// CTE names visible from here (FROM lookups only).
    ctes: Vec<String>,
    /// Every row of this scope's FROM contains a row (not null-extended) of
    /// a sharded occurrence: its output rows are partitioned by shard.
    covered: bool,
}

#[derive(Debug)]
struct Occ {
    table: ShardedTable,
    scope: usize,
    nullable: bool,
}

/// One output column of a query, for `IN (SELECT …)` and `INSERT … SELECT`.
#[derive(Debug, Clone)]
enum OutCol {
    /// The key column of an occurrence of the query's own scope.
    Key(usize),
    /// A literal or parameter expression.
    Value(Box<Expr>),
    Other,
}

#[derive(Debug, Default)]
struct QueryInfo {
    /// The scope of the query's own SELECT (None for set operations etc.).
    root: Option<usize>,
    /// Output columns, when known (None with `*` or set operations).
    outputs: Option<Vec<OutCol>>,
}

struct Analyzer<'a> {
    snap: &'a RoutingSnapshot,
    ns: &'a Namespace,
    occs: Vec<Occ>,
    scopes: Vec<Scope>,
    pins: Vec<(usize, KeyExpr)>,
    /// (o, p): o inherits p's restriction.
    inherits: Vec<(usize, usize)>,
    edges: Vec<(usize, usize)>,
    home_tables: Vec<String>,
    reference_tables: Vec<String>,
    /// Calls a function not in [`PURE_FUNCTIONS`].
    impure_calls: bool,
    /// Calls of functions not known to be read-only ([`READ_ONLY`]).
    calls: Vec<String>,
    /// A query with FOR UPDATE/SHARE.
    locks: bool,
    placeholders: bool,
}

/// Plans one statement.
pub(super) fn plan_statement(
    snap: &RoutingSnapshot,
    ns: &Namespace,
    st: &Statement,
) -> Result<StmtPlan, RouteError> {
    let mut a = Analyzer::new(snap, ns);
    let mut p = plan_in(&mut a, st)?;
    p.may_write |= a.locks;
    for c in a.calls {
        if !p.calls.contains(&c) {
            p.calls.push(c);
        }
    }
    Ok(p)
}

fn plan_in(a: &mut Analyzer<'_>, st: &Statement) -> Result<StmtPlan, RouteError> {
    use StatementKind as K;
    let snap = a.snap;
    match st {
        Statement::Query(q) => a.select_statement(q, K::Select),
        Statement::Insert(ins) => a.insert(ins),
        Statement::Update(up) => a.update(up),
        Statement::Delete(del) => a.delete(del),
        Statement::StartTransaction { .. } => Ok(tx(TransactionKind::Begin)),
        Statement::Commit { .. } => Ok(tx(TransactionKind::Commit)),
        Statement::Rollback {
            savepoint: None, ..
        } => Ok(tx(TransactionKind::Rollback)),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => Ok(tx(TransactionKind::RollbackToSavepoint)),
        Statement::Savepoint { .. } => Ok(tx(TransactionKind::Savepoint)),
        Statement::ReleaseSavepoint { .. } => Ok(tx(TransactionKind::Release)),
        Statement::Set(_) => Ok(StmtPlan::fixed(K::Set, false, Body::Any)),
        Statement::Reset(_) | Statement::Discard { .. } => {
            Ok(StmtPlan::fixed(K::Reset, false, Body::Any))
        }
        Statement::ShowVariable { .. } => Ok(StmtPlan::fixed(K::Show, false, Body::Any)),
        Statement::Deallocate { .. } => Ok(StmtPlan::fixed(K::Utility, false, Body::Any)),
        // All sessions must meet on one server for notifications to arrive.
        Statement::LISTEN { .. } | Statement::UNLISTEN { .. } | Statement::NOTIFY { .. } => {
            Ok(StmtPlan::fixed(K::Utility, false, Body::Home))
        }
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            payload,
        } => {
            if payload.is_some() {
                return Err(unsupported(
                    "COPY … FROM STDIN with its data in the query string (send the data as CopyData)",
                ));
            }
            a.copy(source, *to, target, options, legacy_options)
        }
        Statement::Explain {
            statement, analyze, ..
        } => {
            let mut inner = plan_statement(snap, a.ns, statement)?;
            if !matches!(inner.kind, K::Select | K::Insert | K::Update | K::Delete) {
                return Err(unsupported(format!("EXPLAIN of {}", inner.kind_name())));
            }
            if !matches!(inner.merge, MergeNeed::Refuse(_)) {
                inner.merge = MergeNeed::Refuse("EXPLAIN".to_owned());
            }
            if let Body::Insert(p) = &mut inner.body {
                p.split = None;
            }
            inner.kind = K::Utility;
            inner.is_write = inner.is_write && *analyze;
            inner.writes_sharded = inner.writes_sharded && *analyze;
            if !*analyze {
                // Planned, not run: no function is called, no row locked.
                inner.may_write = false;
                inner.calls.clear();
            }
            Ok(inner)
        }
        Statement::Vacuum(v) => a.maintenance(v.table_name.as_ref()),
        Statement::Analyze(an) => a.maintenance(an.table_name.as_ref()),
        Statement::Truncate(t) => {
            let names: Vec<&ObjectName> = t.table_names.iter().map(|t| &t.name).collect();
            a.ddl_on_tables(&names, true)
        }
        Statement::Lock(l) => {
            let names: Vec<&ObjectName> = l.tables.iter().map(|t| &t.name).collect();
            let mut p = a.ddl_on_tables(&names, false)?;
            p.kind = K::Utility;
            Ok(p)
        }
        Statement::CreateTable(ct) => {
            if ct.query.is_some() {
                return Err(unsupported(
                    "CREATE TABLE … AS (the new table would hold different rows on each shard)",
                ));
            }
            Ok(ddl_all())
        }
        Statement::CreateView(v) => {
            if v.materialized {
                return Err(unsupported(
                    "CREATE MATERIALIZED VIEW (it would hold different rows on each shard)",
                ));
            }
            Ok(ddl_all())
        }
        Statement::RefreshMaterializedView(_) => Err(unsupported("REFRESH MATERIALIZED VIEW")),
        Statement::AlterTable(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView(_)
        | Statement::AlterSchema(_)
        | Statement::AlterType(_)
        | Statement::AlterFunction(_)
        | Statement::CreateIndex(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateExtension(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateRole(_)
        | Statement::Drop { .. }
        | Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropExtension(_)
        | Statement::DropTrigger(_)
        | Statement::DropPolicy(_)
        | Statement::Comment { .. }
        | Statement::Grant(_)
        | Statement::Revoke(_) => Ok(ddl_all()),
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => Err(
            unsupported("cursors (DECLARE/FETCH/CLOSE) are not supported through hotrepart yet"),
        ),
        Statement::Prepare { .. } | Statement::Execute { .. } => Err(unsupported(
            "SQL-level PREPARE/EXECUTE (use the extended protocol)",
        )),
        Statement::Call(_) => Err(unsupported(
            "CALL (the router cannot see which shard a procedure needs)",
        )),
        other => {
            let text = other.to_string();
            let word = text.split_whitespace().next().unwrap_or("statement");
            Err(unsupported(format!(
                "statement {word} is not supported by the router"
            )))
        }
    }
}

fn tx(k: TransactionKind) -> StmtPlan {
    StmtPlan::fixed(StatementKind::Transaction(k), false, Body::Any)
}

fn ddl_all() -> StmtPlan {
    StmtPlan::fixed(StatementKind::Ddl, true, Body::All)
}

impl StmtPlan {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            StatementKind::Ddl => "DDL",
            StatementKind::Copy { .. } => "COPY",
            StatementKind::Transaction(_) => "transaction control",
            StatementKind::Set | StatementKind::Reset => "SET/RESET",
            StatementKind::Show => "SHOW",
            _ => "this statement",
        }
    }
}

/// Splits `e` into its top-level AND conjuncts.
fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}

/// A visitor that analyses the subqueries directly inside an expression (in
/// scope `scope`) and notes function calls.
struct SubqueryWalker<'x, 'a> {
    a: &'x mut Analyzer<'a>,
    scope: usize,
    depth: usize,
}

impl Visitor for SubqueryWalker<'_, '_> {
    type Break = RouteError;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<RouteError> {
        if self.depth == 0 {
            if let Err(e) = self.a.query(q, Some(self.scope)) {
                return ControlFlow::Break(e);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<RouteError> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<RouteError> {
        match e {
            Expr::Function(f) => {
                let name = last_name(&f.name);
                if !PURE_FUNCTIONS.contains(&name.as_str()) {
                    self.a.impure_calls = true;
                }
                self.a.note_call(&name);
            }
            Expr::Value(v) if matches!(v.value, Value::Placeholder(_)) => {
                self.a.placeholders = true;
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Finds what a multi-shard read of a query would have to merge.
struct MergeWalker {
    depth: usize,
    found: Option<String>,
}

impl Visitor for MergeWalker {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 || self.found.is_some() {
            return ControlFlow::Continue(());
        }
        if let Expr::Function(f) = e {
            let name = last_name(&f.name);
            if f.over.is_some() {
                self.found = Some(format!("window function {name}()"));
            } else if AGGREGATES.contains(&name.as_str())
                || f.filter.is_some()
                || !f.within_group.is_empty()
                || matches!(&f.args, FunctionArguments::List(l)
                    if l.duplicate_treatment.is_some()
                        || l.clauses.iter().any(|c| matches!(c, FunctionArgumentClause::OrderBy(_))))
            {
                self.found = Some(format!("aggregate function {name}()"));
            }
        }
        ControlFlow::Continue(())
    }
}

/// What concatenating the shards' answers to `q` would get wrong, if anything
/// (for statements that cannot use a merge plan: `INSERT … SELECT`, `COPY`).
fn merge_need(q: &Query) -> MergeNeed {
    if q.order_by.is_some() {
        return MergeNeed::Refuse("ORDER BY".to_owned());
    }
    if q.limit_clause.is_some() {
        return MergeNeed::Refuse("LIMIT/OFFSET".to_owned());
    }
    if q.fetch.is_some() {
        return MergeNeed::Refuse("FETCH FIRST".to_owned());
    }
    set_expr_merge_need(&q.body)
}

fn set_expr_merge_need(body: &SetExpr) -> MergeNeed {
    match body {
        SetExpr::Select(s) => select_merge_need(s),
        SetExpr::Query(q) => merge_need(q),
        SetExpr::SetOperation { op, .. } => MergeNeed::Refuse(format!("{op}")),
        _ => MergeNeed::None,
    }
}

fn select_merge_need(s: &Select) -> MergeNeed {
    if let Some(d) = &s.distinct {
        match d {
            Distinct::All => {}
            Distinct::Distinct => return MergeNeed::Refuse("DISTINCT".to_owned()),
            Distinct::On(_) => return MergeNeed::Refuse("DISTINCT ON".to_owned()),
        }
    }
    let grouped = match &s.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(v, _) => !v.is_empty(),
    };
    if grouped {
        return MergeNeed::Refuse("GROUP BY".to_owned());
    }
    if s.having.is_some() {
        return MergeNeed::Refuse("HAVING".to_owned());
    }
    if !s.named_window.is_empty() {
        return MergeNeed::Refuse("WINDOW".to_owned());
    }
    let mut w = MergeWalker {
        depth: 0,
        found: None,
    };
    let _ = s.projection.visit(&mut w);
    match w.found {
        Some(what) => MergeNeed::Refuse(what),
        None => MergeNeed::None,
    }
}

impl<'a> Analyzer<'a> {
    fn new(snap: &'a RoutingSnapshot, ns: &'a Namespace) -> Self {
        Analyzer {
            snap,
            ns,
            occs: Vec::new(),
            scopes: Vec::new(),
            pins: Vec::new(),
            inherits: Vec::new(),
            edges: Vec::new(),
            home_tables: Vec::new(),
            reference_tables: Vec::new(),
            impure_calls: false,
            calls: Vec::new(),
            locks: false,
            placeholders: false,
        }
    }

    fn new_scope(&mut self, parent: Option<usize>) -> usize {
        self.scopes.push(Scope {
            parent,
            ..Scope::default()
        });
        self.scopes.len() - 1
    }

    fn walk<V: Visit + ?Sized>(&mut self, node: &V, scope: usize) -> Result<(), RouteError> {
        let mut w = SubqueryWalker {
            a: self,
            scope,
            depth: 0,
        };
        match node.visit(&mut w) {
            ControlFlow::Break(e) => Err(e),
            ControlFlow::Continue(()) => Ok(()),
        }
    }

    fn is_cte(&self, mut scope: Option<usize>, name: &str) -> bool {
        while let Some(s) = scope {
            if self.scopes[s].ctes.iter().any(|c| c == name) {
                return true;
            }
            scope = self.scopes[s].parent;
        }
        false
    }

    /// Registers a base table named in FROM (or as a DML target) in `scope`.
    fn table_item(
        &mut self,
        name: &ObjectName,
        alias: Option<&ast::TableAlias>,
        scope: usize,
    ) -> Result<Option<usize>, RouteError> {
        let visible = alias.map(|a| norm(&a.name));
        let col_aliases = alias.is_some_and(|a| !a.columns.is_empty());
        if name.0.len() == 1 {
            let simple = last_name(name);
            if self.is_cte(Some(scope), &simple) {
                self.scopes[scope].items.push(Item {
                    visible: visible.unwrap_or(simple),
                    qualified: None,
                    occ: None,
                    col_aliases,
                });
                return Ok(None);
            }
        }
        let catalog = self.table_name(name)?;
        let own = last_name(name);
        let qualified = if visible.is_some() {
            None
        } else if catalog.contains('.') {
            Some(catalog.clone())
        } else {
            Some(format!("public.{catalog}"))
        };
        let occ = match self.snap.placement(&catalog) {
            TablePlacement::Sharded(t) => {
                self.occs.push(Occ {
                    table: t.clone(),
                    scope,
                    nullable: false,
                });
                Some(self.occs.len() - 1)
            }
            TablePlacement::Reference => {
                self.reference_tables.push(catalog.clone());
                None
            }
            TablePlacement::Home(_) => {
                self.home_tables.push(catalog.clone());
                None
            }
        };
        self.scopes[scope].items.push(Item {
            visible: visible.unwrap_or(own),
            qualified,
            occ,
            col_aliases,
        });
        Ok(occ)
    }

    /// The occurrence whose key column `e` names, seen from `scope`.
    fn resolve(&self, e: &Expr, scope: usize) -> Option<usize> {
        match strip(e) {
            Expr::Identifier(id) => {
                let col = norm(id);
                let sc = &self.scopes[scope];
                // An unqualified name resolves in the innermost scope (we
                // do not know the other columns of tables, so never outward).
                if sc.items.iter().any(|i| i.col_aliases) {
                    return None;
                }
                let mut found = sc
                    .items
                    .iter()
                    .filter_map(|i| i.occ)
                    .filter(|&o| self.occs[o].table.key_column == col);
                let first = found.next()?;
                found.next().is_none().then_some(first)
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(norm).collect();
                // `q.col` matches an item by its visible name; `s.t.col`
                // matches an unaliased table by its qualified name.
                let (qualifier, by_visible, col) = match names.as_slice() {
                    [q, c] => (q.clone(), true, c),
                    [sch, t, c] => (format!("{sch}.{t}"), false, c),
                    _ => return None,
                };
                let qual = |i: &Item| {
                    if by_visible {
                        i.visible == qualifier
                    } else {
                        i.qualified.as_deref() == Some(qualifier.as_str())
                    }
                };
                let mut s = Some(scope);
                while let Some(cur) = s {
                    if let Some(item) = self.scopes[cur].items.iter().find(|i| qual(i)) {
                        let o = item.occ?;
                        return (!item.col_aliases && self.occs[o].table.key_column == *col)
                            .then_some(o);
                    }
                    s = self.scopes[cur].parent;
                }
                None
            }
            _ => None,
        }
    }

    /// The keys that rows of occurrence `o` must have for `e` to hold.
    fn pin_of(&self, e: &Expr, o: usize, scope: usize) -> Option<KeyExpr> {
        let ty = self.occs[o].table.key_type;
        match strip(e) {
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => {
                    match (self.pin_of(left, o, scope), self.pin_of(right, o, scope)) {
                        (Some(a), Some(b)) => Some(KeyExpr::And(Box::new(a), Box::new(b))),
                        (a, b) => a.or(b),
                    }
                }
                BinaryOperator::Or => {
                    let a = self.pin_of(left, o, scope)?;
                    let b = self.pin_of(right, o, scope)?;
                    Some(KeyExpr::Or(Box::new(a), Box::new(b)))
                }
                BinaryOperator::Eq => {
                    let (col, val) = if self.resolve(left, scope) == Some(o) {
                        (left, right)
                    } else if self.resolve(right, scope) == Some(o) {
                        (right, left)
                    } else {
                        return None;
                    };
                    let _ = col;
                    value_src(val, ty).ok().map(|s| KeyExpr::Keys(vec![s]))
                }
                _ => None,
            },
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } if self.resolve(expr, scope) == Some(o) => {
                let srcs: Option<Vec<TypedSrc>> =
                    list.iter().map(|v| value_src(v, ty).ok()).collect();
                srcs.map(KeyExpr::Keys)
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } if self.resolve(left, scope) == Some(o) => array_src(right, ty).map(KeyExpr::Keys),
            _ => None,
        }
    }

    /// A filtering condition `e` (WHERE, or a join's ON) in `scope`.
    /// `local`: occurrences the condition relates; `filtered`: those whose
    /// rows it filters.
    fn condition(
        &mut self,
        e: &Expr,
        scope: usize,
        local: &[usize],
        filtered: &[usize],
    ) -> Result<(), RouteError> {
        for &o in filtered {
            if let Some(k) = self.pin_of(e, o, scope) {
                self.pins.push((o, k));
            }
        }
        for c in conjuncts(e) {
            match c {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    if let (Some(a), Some(b)) =
                        (self.resolve(left, scope), self.resolve(right, scope))
                    {
                        self.key_equality(a, b, local, filtered);
                    }
                    self.walk(c, scope)?;
                }
                Expr::In {
                    expr,
                    target: InTarget::Subquery(q),
                    negated: false,
                    ..
                } => {
                    self.walk(expr.as_ref(), scope)?;
                    let info = self.query(q, Some(scope))?;
                    let a = self.resolve(expr, scope);
                    let b = match (&info.outputs, info.root) {
                        (Some(outs), Some(root)) if outs.len() == 1 => match outs[0] {
                            OutCol::Key(b)
                                if self.occs[b].scope == root && !self.occs[b].nullable =>
                            {
                                Some(b)
                            }
                            _ => None,
                        },
                        _ => None,
                    };
                    if let (Some(a), Some(b)) = (a, b) {
                        if filtered.contains(&a)
                            && colocated(&self.occs[a].table, &self.occs[b].table)
                        {
                            // A semi-join on the key: both sides' relevant
                            // rows have keys of the other side.
                            self.edges.push((a, b));
                            self.inherits.push((a, b));
                            self.inherits.push((b, a));
                        }
                    }
                }
                other => self.walk(other, scope)?,
            }
        }
        Ok(())
    }

    fn key_equality(&mut self, a: usize, b: usize, local: &[usize], filtered: &[usize]) {
        if a == b || !colocated(&self.occs[a].table, &self.occs[b].table) {
            return;
        }
        let fa = filtered.contains(&a);
        let fb = filtered.contains(&b);
        if fa || fb || (local.contains(&a) && local.contains(&b)) {
            self.edges.push((a, b));
        }
        if fa {
            self.inherits.push((a, b));
        }
        if fb {
            self.inherits.push((b, a));
        }
    }

    /// Analyses a query in a new scope under `parent`.
    fn query(&mut self, q: &Query, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        self.locks |= !q.locks.is_empty();
        let mut scope = parent;
        if let Some(with) = &q.with {
            let cs = self.new_scope(parent);
            if with.recursive {
                for cte in &with.cte_tables {
                    self.scopes[cs].ctes.push(norm(&cte.alias.name));
                }
            }
            for cte in &with.cte_tables {
                match cte.query.body.as_ref() {
                    SetExpr::Insert(_)
                    | SetExpr::Update(_)
                    | SetExpr::Delete(_)
                    | SetExpr::Merge(_) => {
                        return Err(unsupported("data-modifying statements in WITH"));
                    }
                    _ => {}
                }
                self.query(&cte.query, Some(cs))?;
                self.scopes[cs].ctes.push(norm(&cte.alias.name));
            }
            scope = Some(cs);
        }
        let info = self.set_expr(&q.body, scope)?;
        let tail_scope = match info.root.or(scope) {
            Some(s) => s,
            None => self.new_scope(None),
        };
        if let Some(ob) = &q.order_by {
            self.walk(ob, tail_scope)?;
        }
        if let Some(l) = &q.limit_clause {
            self.walk(l, tail_scope)?;
        }
        Ok(info)
    }

    fn set_expr(&mut self, body: &SetExpr, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        match body {
            SetExpr::Select(s) => self.select(s, parent),
            SetExpr::Query(q) => self.query(q, parent),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left, parent)?;
                self.set_expr(right, parent)?;
                Ok(QueryInfo::default())
            }
            SetExpr::Values(v) => {
                let s = self.new_scope(parent);
                for row in &v.rows {
                    self.walk(&row.content, s)?;
                }
                Ok(QueryInfo::default())
            }
            SetExpr::Table(t) => {
                let s = self.new_scope(parent);
                let name = match (&t.schema_name, &t.table_name) {
                    (Some(schema), Some(table)) => {
                        ObjectName::from(vec![schema.clone(), table.clone()])
                    }
                    (None, Some(table)) => ObjectName::from(vec![table.clone()]),
                    _ => return Err(unsupported("TABLE without a name")),
                };
                self.table_item(&name, None, s)?;
                Ok(QueryInfo {
                    root: Some(s),
                    outputs: None,
                })
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                Err(unsupported("data-modifying statement inside a query"))
            }
        }
    }

    fn select(&mut self, sel: &Select, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        if sel.into.is_some() {
            return Err(unsupported(
                "SELECT … INTO (the new table would hold different rows on each shard)",
            ));
        }
        let s = self.new_scope(parent);
        for twj in &sel.from {
            let (_, covered) = self.table_with_joins(twj, s)?;
            self.scopes[s].covered |= covered;
        }
        if let Some(w) = &sel.selection {
            let here: Vec<usize> = (0..self.occs.len())
                .filter(|&o| self.occs[o].scope == s)
                .collect();
            self.condition(w, s, &here, &here)?;
        }
        let mut outputs = Some(Vec::with_capacity(sel.projection.len()));
        for item in &sel.projection {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
                _ => None,
            };
            match (expr, outputs.as_mut()) {
                (Some(e), Some(outs)) => {
                    let col = match self.resolve(e, s) {
                        Some(o) if self.occs[o].scope == s => OutCol::Key(o),
                        _ if value_src(e, KeyType::Text).is_ok()
                            || value_src(e, KeyType::Int8).is_ok() =>
                        {
                            OutCol::Value(Box::new(e.clone()))
                        }
                        _ => OutCol::Other,
                    };
                    outs.push(col);
                }
                _ => outputs = None,
            }
            self.walk(item, s)?;
        }
        self.walk(&sel.group_by, s)?;
        if let Some(h) = &sel.having {
            self.walk(h, s)?;
        }
        if let Some(Distinct::On(v)) = &sel.distinct {
            self.walk(v, s)?;
        }
        self.walk(&sel.named_window, s)?;
        if let Some(q) = &sel.qualify {
            self.walk(q, s)?;
        }
        Ok(QueryInfo {
            root: Some(s),
            outputs,
        })
    }

    /// Registers a FROM entry with its joins; returns its occurrences.
    fn table_with_joins(
        &mut self,
        twj: &TableWithJoins,
        s: usize,
    ) -> Result<(Vec<usize>, bool), RouteError> {
        let (mut left, mut covered) = self.factor(&twj.relation, s)?;
        for j in &twj.joins {
            let (right, right_covered) = self.factor(&j.relation, s)?;
            #[derive(PartialEq)]
            enum J {
                Inner,
                Left,
                Right,
                Full,
                Cross,
            }
            let (kind, constraint) = match &j.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) => (J::Inner, Some(c)),
                JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (J::Left, Some(c)),
                JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (J::Right, Some(c)),
                JoinOperator::FullOuter(c) => (J::Full, Some(c)),
                JoinOperator::CrossJoin(_) => (J::Cross, None),
                other => return Err(unsupported(format!("join type {other:?}"))),
            };
            covered = match kind {
                J::Inner | J::Cross => covered || right_covered,
                J::Left => covered,
                J::Right => right_covered,
                J::Full => covered && right_covered,
            };
            if matches!(kind, J::Left | J::Full) {
                for &o in &right {
                    self.occs[o].nullable = true;
                }
            }
            if matches!(kind, J::Right | J::Full) {
                for &o in &left {
                    self.occs[o].nullable = true;
                }
            }
            let filtered: Vec<usize> = match kind {
                J::Inner => left.iter().chain(&right).copied().collect(),
                J::Left => right.clone(),
                J::Right => left.clone(),
                J::Full | J::Cross => Vec::new(),
            };
            let local: Vec<usize> = left.iter().chain(&right).copied().collect();
            match constraint {
                Some(JoinConstraint::On(e)) => self.condition(e, s, &local, &filtered)?,
                Some(JoinConstraint::Using(cols)) => {
                    for c in cols {
                        let col = last_name(c);
                        for &a in &left {
                            for &b in &right {
                                if self.occs[a].table.key_column == col
                                    && self.occs[b].table.key_column == col
                                {
                                    self.key_equality(a, b, &local, &filtered);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
            left.extend(right);
        }
        Ok((left, covered))
    }

    /// Registers one FROM item; returns its occurrences and whether it is
    /// covered (see [`Scope::covered`]).
    fn factor(&mut self, f: &TableFactor, s: usize) -> Result<(Vec<usize>, bool), RouteError> {
        match f {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                if let Some(args) = args {
                    // A set-returning function call in FROM.
                    self.walk(args, s)?;
                    self.impure_or_pure_call(name);
                    self.opaque_item(alias.as_ref(), last_name(name), s);
                    return Ok((Vec::new(), false));
                }
                let occ = self.table_item(name, alias.as_ref(), s)?;
                Ok((occ.into_iter().collect(), occ.is_some()))
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                self.query(subquery, Some(s))?;
                self.opaque_item(alias.as_ref(), String::new(), s);
                Ok((Vec::new(), false))
            }
            TableFactor::Function {
                name, args, alias, ..
            } => {
                self.walk(args, s)?;
                self.impure_or_pure_call(name);
                self.opaque_item(alias.as_ref(), last_name(name), s);
                Ok((Vec::new(), false))
            }
            TableFactor::UNNEST {
                array_exprs, alias, ..
            } => {
                self.walk(array_exprs, s)?;
                self.opaque_item(alias.as_ref(), "unnest".to_owned(), s);
                Ok((Vec::new(), false))
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let res = self.table_with_joins(table_with_joins, s)?;
                if alias.is_some() {
                    self.opaque_item(alias.as_ref(), String::new(), s);
                }
                Ok(res)
            }
            other => Err(unsupported(format!("FROM item {other}"))),
        }
    }

    fn impure_or_pure_call(&mut self, name: &ObjectName) {
        let n = last_name(name);
        if !PURE_FUNCTIONS.contains(&n.as_str()) {
            self.impure_calls = true;
        }
        self.note_call(&n);
    }

    /// Records a call of `name` unless it is known to be read-only.
    fn note_call(&mut self, name: &str) {
        if !READ_ONLY.contains(&name)
            && !PURE_FUNCTIONS.contains(&name)
            && !AGGREGATES.contains(&name)
            && !self.calls.iter().any(|c| c == name)
        {
            self.calls.push(name.to_owned());
        }
    }

    fn opaque_item(&mut self, alias: Option<&ast::TableAlias>, default: String, s: usize) {
        self.scopes[s].items.push(Item {
            visible: alias.map(|a| norm(&a.name)).unwrap_or(default),
            qualified: None,
            occ: None,
            col_aliases: alias.is_some_and(|a| !a.columns.is_empty()),
        });
    }

    /// Builds the shape from everything collected so far.
    fn shape(&self, root: Option<usize>) -> Shape {
        let n = self.occs.len();
        // Restrictions: direct pins, then inherited along filtering equalities.
        let mut restr: Vec<Option<(KeyExpr, usize)>> = vec![None; n];
        for (o, k) in &self.pins {
            restr[*o] = Some(match restr[*o].take() {
                None => (k.clone(), *o),
                Some((old, from)) if from == *o => {
                    (KeyExpr::And(Box::new(old), Box::new(k.clone())), *o)
                }
                Some(_) => (k.clone(), *o),
            });
        }
        loop {
            let mut changed = false;
            for &(o, p) in &self.inherits {
                if restr[o].is_none() {
                    if let Some(r) = restr[p].clone() {
                        restr[o] = Some(r);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // Components (union-find).
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while p[r] != r {
                r = p[r];
            }
            p[x] = r;
            r
        }
        for &(a, b) in &self.edges {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra] = rb;
        }
        let mut roots: Vec<usize> = (0..n).map(|x| find(&mut parent, x)).collect();
        roots.sort_unstable();
        roots.dedup();
        let anchored = root.is_some_and(|r| self.scopes[r].covered);
        Shape {
            occs: self
                .occs
                .iter()
                .zip(restr)
                .map(|(o, r)| ShapeOcc {
                    table: o.table.clone(),
                    restriction: r.map(|(k, from)| (k, self.occs[from].table.clone())),
                })
                .collect(),
            components: roots.len(),
            anchored,
            home_table: self.home_tables.first().cloned(),
            update_key: None,
            insert_select: false,
        }
    }

    fn sharded_tables(&self) -> Vec<ShardedTable> {
        let mut v: Vec<ShardedTable> = Vec::new();
        for o in &self.occs {
            if !v.iter().any(|t| t.name == o.table.name) {
                v.push(o.table.clone());
            }
        }
        v
    }

    /// The body for a statement that only reads (or writes a home table).
    fn read_body(&self, root: Option<usize>) -> Body {
        if !self.occs.is_empty() {
            Body::Shape(self.shape(root))
        } else if !self.home_tables.is_empty()
            || !self.reference_tables.is_empty()
            || self.impure_calls
        {
            Body::Home
        } else {
            Body::Any
        }
    }

    fn select_statement(&mut self, q: &Query, kind: StatementKind) -> Result<StmtPlan, RouteError> {
        let info = self.query(q, None)?;
        Ok(StmtPlan {
            kind,
            is_write: false,
            body: self.read_body(info.root),
            merge: merge_plan(q),
            sharded_tables: self.sharded_tables(),
            reference_write: false,
            writes_sharded: false,
            may_write: false,
            calls: Vec::new(),
        })
    }
}
