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
//!
//! # Parts
//!
//! * [`plan_statement`] (here): the entry point, which dispatches on the
//!   statement and plans transaction control, settings and DDL itself.
//! * `scope`: the FROM/scope analyzer (occurrences, pins, edges) and the
//!   read planner.
//! * `stmt`: the write and utility planners (INSERT, UPDATE, DELETE, COPY,
//!   VACUUM/ANALYZE, TRUNCATE/LOCK).
//! * `merge_plan` and `merge_need`: what a multi-shard read must merge.
//! * `temp`: statements on the session's temporary objects (the home
//!   shard only).
//! * `functions`: the built-in functions known by name.
//! * `plan`: the result types; `expr`: small shared helpers.

use sqlparser::ast::{Expr, ObjectName, Statement};

pub(crate) mod computed;
mod expr;
pub(crate) mod first;
mod functions;
mod merge_need;
mod merge_plan;
mod merge_union;
mod plan;
mod scope;
mod stmt;
mod temp;

pub(super) use functions::AGGREGATES;
pub(super) use plan::{Body, InsertPlan, Shape, StmtPlan};
pub(super) use scope::is_every_shard_view;
pub(super) use temp::mark_by_words;

use super::{MergeNeed, Namespace, RouteError, StatementKind, TransactionKind};
use crate::catalog::{RoutingSnapshot, TablePlacement};
use expr::unsupported;
use plan::{ddl_all, tx};
use scope::Analyzer;

/// Plans one statement; None for a kind of statement the analyzer does
/// not plan (the router then routes the string by the lexer, see
/// `route::plan_unparsed`).
pub(super) fn plan_statement(
    snap: &RoutingSnapshot,
    ns: &Namespace,
    st: &Statement,
) -> Result<Option<StmtPlan>, RouteError> {
    let mut a = Analyzer::new(snap, ns);
    let Some(mut p) = plan_in(&mut a, st)? else {
        return Ok(None);
    };
    p.may_write |= a.locks;
    p.temp |= a.temp.get();
    for c in a.calls {
        if !p.calls.contains(&c) {
            p.calls.push(c);
        }
    }
    Ok(Some(p))
}

fn plan_in(a: &mut Analyzer<'_>, st: &Statement) -> Result<Option<StmtPlan>, RouteError> {
    let snap = a.snap;
    match plan_known(a, st, snap) {
        Err(e) if e.message == NOT_PLANNED => Ok(None),
        other => other.map(Some),
    }
}

/// A cursor statement that reaches the router: one among others in a
/// query string (the node routes one sent alone by its cursor).
pub(super) const CURSOR_WITH_OTHERS: &str = "a cursor statement (DECLARE/FETCH/MOVE/CLOSE) together with other statements in one query string; send it as a statement of its own";

/// The marker of a statement [`plan_known`] does not plan (never sent).
const NOT_PLANNED: &str = "statement not planned by the analyzer";

fn plan_known(
    a: &mut Analyzer<'_>,
    st: &Statement,
    snap: &RoutingSnapshot,
) -> Result<StmtPlan, RouteError> {
    use StatementKind as K;
    match st {
        Statement::Query(q) => {
            let read = a.select_statement(q, K::Select)?;
            if a.into_temp {
                return temp::select_into_temp(read);
            }
            Ok(read)
        }
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
            let Some(mut inner) = plan_statement(snap, a.ns, statement)? else {
                return Err(unsupported("EXPLAIN of this statement"));
            };
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
            inner.explain_analyze_write = inner.is_write && *analyze;
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
            temp::create_table(a, ct.temporary, &ct.name, ct.query.as_deref())
        }
        Statement::CreateView(v) => {
            if v.materialized {
                return Err(unsupported(
                    "CREATE MATERIALIZED VIEW (it would hold different rows on each shard)",
                ));
            }
            temp::create_view(a, v.temporary, &v.name, &v.query)
        }
        Statement::CreateSequence {
            temporary, name, ..
        } => temp::create_sequence(a, *temporary, name),
        Statement::CreateIndex(ci) => {
            unique_index_has_key(a, ci)?;
            Ok(temp::on_relation(a, &ci.table_name))
        }
        Statement::AlterTable(at) => Ok(temp::on_relation(a, &at.name)),
        Statement::AlterIndex { name, .. } => Ok(temp::on_relation(a, name)),
        Statement::AlterView(av) => Ok(temp::on_relation(a, &av.name)),
        Statement::Drop {
            object_type, names, ..
        } => temp::drop(a, object_type, names),
        Statement::RefreshMaterializedView(_) => Err(unsupported("REFRESH MATERIALIZED VIEW")),
        Statement::AlterSchema(_)
        | Statement::AlterType(_)
        | Statement::AlterFunction(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateExtension(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateRole(_)
        | Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropExtension(_)
        | Statement::DropTrigger(_)
        | Statement::DropPolicy(_)
        | Statement::Comment { .. }
        | Statement::Grant(_)
        | Statement::Revoke(_) => Ok(ddl_all()),
        // The node routes a cursor statement sent alone by its cursor
        // (`classify::cursor_command`, `proxy/src/session/cursor.rs`).
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => {
            Err(unsupported(CURSOR_WITH_OTHERS))
        }
        Statement::Prepare { .. } | Statement::Execute { .. } => Err(unsupported(
            "SQL-level PREPARE/EXECUTE (use the extended protocol)",
        )),
        Statement::Call(_) => Err(unsupported(
            "CALL (the router cannot see which shard a procedure needs)",
        )),
        // Routed by the lexer (`route::plan_unparsed`); CREATE/DROP
        // DATABASE too (the parser reads them, the analyzer has nothing to
        // add).
        _ => Err(unsupported(NOT_PLANNED)),
    }
}

/// `CREATE UNIQUE INDEX … ON sharded (…)` must list the shard key as one of
/// its columns (not only in INCLUDE, not inside an expression): each shard
/// would enforce it on its own rows only. Refused before it runs — also
/// `CONCURRENTLY`, which runs shard by shard outside a transaction, where
/// the check before two-phase commit (`proxy/src/exec/unique.rs`) cannot
/// undo it.
fn unique_index_has_key(
    a: &Analyzer<'_>,
    ci: &sqlparser::ast::CreateIndex,
) -> Result<(), RouteError> {
    if !ci.unique {
        return Ok(());
    }
    let Ok(name) = a.table_name(&ci.table_name) else {
        return Ok(());
    };
    let TablePlacement::Sharded(t) = a.snap.placement(&name) else {
        return Ok(());
    };
    let has_key = ci.columns.iter().any(|c| {
        matches!(&c.column.expr, Expr::Identifier(id) if super::names::norm(id) == t.key_column)
    });
    if has_key {
        return Ok(());
    }
    let index = ci
        .name
        .as_ref()
        .map(|n| format!("index \"{n}\""))
        .unwrap_or_else(|| "an index".to_owned());
    Err(unsupported(format!(
        "unique {index} on sharded table \"{}\" does not include its shard key \"{}\" among its columns: each shard would enforce it on its own rows only, so two shards could hold the same value; add \"{}\" to the index",
        t.name, t.key_column, t.key_column
    )))
}
