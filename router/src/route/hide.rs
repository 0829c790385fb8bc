//! Rows a shard holds but must not show: the ownership predicate.
//!
//! While a reshard job moves a range, two shards hold its rows: the target
//! receives the copy and the catch-up before the flip, and the source keeps
//! its rows after the flip until the cleanup has deleted them. The catalog
//! marks the shard that must not show them (`KeyRange::hidden_on`). A
//! statement that reaches that shard without being pinned to keys the shard
//! owns — a keyless read or write on several shards, a `COPY … TO`, a merge's
//! shard query — is rewritten for that shard by [`hide_rows`] so that it does
//! not see them:
//!
//! * every reference to a sharded table in a FROM list (joins, subqueries,
//!   CTEs, `INSERT … SELECT`) becomes a derived table
//!   `(SELECT * FROM t WHERE (<point of t.key in a hidden range>) IS NOT
//!   TRUE) AS t`, keeping the name or alias the statement uses;
//! * the target of an `UPDATE`/`DELETE` keeps its place and the statement's
//!   WHERE gets `AND (<…>) IS NOT TRUE`;
//! * `COPY t [(cols)] TO …` becomes `COPY (SELECT cols FROM t WHERE …) TO …`.
//!
//! `IS NOT TRUE` keeps rows whose key is NULL (they are in no range).
//! The predicate is the SQL form of the routing function
//! ([`RoutingFunction::sql_hash`]), so PostgreSQL evaluates it next to the
//! data. A table placed by a WebAssembly function has no SQL form: a
//! statement that would need to hide its rows is refused (`55000`) until
//! the job is over, never answered with the rows twice.
//!
//! Guarantee: with the rewrite, shard `s` shows exactly the rows of the
//! ranges it does not hide; since every range is hidden on at most one shard
//! and that shard is never its owner, a multi-shard statement sees each row
//! once — whichever side of a flip the routing table it was routed by is
//! on (the same snapshot decides the target shards and what each hides).

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, FromTable, Ident, ObjectName, Query, SetExpr, Statement, TableAlias,
    TableFactor, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::names::{norm, table_name};
use super::{Namespace, RouteError};
use crate::catalog::{RoutingSnapshot, ShardId, ShardedTable, Span, TablePlacement};

/// `sql` rewritten so that on `shard` it does not see the rows of the ranges
/// hidden there; `None` when it needs no change (nothing hidden on the
/// shard, or no sharded table in the statement). Statements other than
/// queries, INSERT, UPDATE, DELETE and COPY are left alone.
pub fn hide_rows(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
    shard: &ShardId,
) -> Result<Option<String>, RouteError> {
    let hidden = snapshot.hidden_spans(shard);
    if hidden.is_empty() {
        return Ok(None);
    }
    let dialect = PostgreSqlDialect {};
    let mut statements = Parser::parse_sql(&dialect, sql).map_err(|e| {
        RouteError::syntax(format!(
            "{e} (while adding the ownership filter of a reshard job)"
        ))
    })?;
    let mut hider = Hider {
        snap: snapshot,
        ns,
        hidden: &hidden,
        ctes: BTreeSet::new(),
        changed: false,
        error: None,
    };
    for st in &mut statements {
        hider.ctes = cte_names(st);
        hider.statement(st)?;
    }
    if !hider.changed {
        return Ok(None);
    }
    let text: Vec<String> = statements.iter().map(ToString::to_string).collect();
    Ok(Some(text.join("; ")))
}

struct Hider<'a> {
    snap: &'a RoutingSnapshot,
    /// How unqualified names resolve (the session's search path).
    ns: &'a Namespace,
    hidden: &'a [Span],
    /// Names of the statement's CTEs: a table reference with such a name may
    /// be the CTE, so a sharded table of that name is refused, not guessed.
    ctes: BTreeSet<String>,
    changed: bool,
    error: Option<RouteError>,
}

impl Hider<'_> {
    fn statement(&mut self, st: &mut Statement) -> Result<(), RouteError> {
        match st {
            Statement::Query(_) | Statement::Insert(_) => {
                self.visit(st);
            }
            Statement::Update(u) => {
                // The target keeps its place (a derived table cannot be
                // updated): its rows are filtered in WHERE.
                self.visit(&mut u.assignments);
                self.visit(&mut u.from);
                self.visit(&mut u.selection);
                self.visit(&mut u.returning);
                self.visit(&mut u.table.joins);
                let target = self.target_filter(&u.table.relation)?;
                add_filter(&mut u.selection, target);
            }
            Statement::Delete(d) => {
                self.visit(&mut d.using);
                self.visit(&mut d.selection);
                self.visit(&mut d.returning);
                let from = match &mut d.from {
                    FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) => v,
                };
                let mut filters = Vec::new();
                for twj in from.iter_mut() {
                    self.visit(&mut twj.joins);
                    filters.push(self.target_filter(&twj.relation)?);
                }
                for f in filters {
                    add_filter(&mut d.selection, f);
                }
            }
            Statement::Copy { source, to, .. } => match source {
                CopySource::Query(q) => self.visit(q),
                CopySource::Table {
                    table_name: name,
                    columns,
                } if *to => {
                    if let Some(t) = self.sharded(name)? {
                        let cols = if columns.is_empty() {
                            "*".to_owned()
                        } else {
                            columns
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        let filter = self.filter_sql(t, &quote(&t.key_column))?;
                        let q = parse_query(&format!(
                            "SELECT {cols} FROM {name} WHERE ({filter}) IS NOT TRUE"
                        ))?;
                        *source = CopySource::Query(Box::new(q));
                        self.changed = true;
                    }
                }
                CopySource::Table { .. } => {}
            },
            _ => {}
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn visit<V: VisitMut>(&mut self, node: &mut V) {
        if self.error.is_none() {
            let _ = node.visit(self);
        }
    }

    /// The sharded table `name` denotes, if it is one (refused when a CTE
    /// of the statement has its name).
    fn sharded(&self, name: &ObjectName) -> Result<Option<&ShardedTable>, RouteError> {
        let Ok(catalog_name) = table_name(self.ns, name) else {
            return Ok(None);
        };
        let TablePlacement::Sharded(t) = self.snap.placement(&catalog_name) else {
            return Ok(None);
        };
        if name.0.len() == 1 && self.ctes.contains(&catalog_name) {
            return Err(RouteError::unsupported(format!(
                "a CTE named like the sharded table \"{}\" while a range of it is being moved; rename the CTE",
                t.name
            )));
        }
        Ok(Some(t))
    }

    /// `<point of column in a hidden range>` for table `t`.
    fn filter_sql(&self, t: &ShardedTable, column: &str) -> Result<String, RouteError> {
        let Some(hash) = t.function.sql_hash(t.key_type, column) else {
            return Err(RouteError {
                sqlstate: "55000",
                message: format!(
                    "table \"{}\" is placed by a WebAssembly function and a range of it is being moved (on this shard: {}); \
                     a statement that reads or writes it without its shard key on several shards is refused until the reshard job ends — \
                     retry later, or use the shard key",
                    t.name,
                    self.hidden
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        let parts: Vec<String> = self
            .hidden
            .iter()
            .map(|sp| sp.sql_predicate(&hash))
            .collect();
        Ok(parts.join(" OR "))
    }

    /// The WHERE filter for the target of an UPDATE/DELETE, if it is a
    /// sharded table.
    fn target_filter(&mut self, f: &TableFactor) -> Result<Option<Expr>, RouteError> {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = f
        else {
            return Ok(None);
        };
        let Some(t) = self.sharded(name)? else {
            return Ok(None);
        };
        let qualifier = match alias {
            Some(a) => a.name.to_string(),
            None => name.to_string(),
        };
        let column = format!("{qualifier}.{}", quote(&t.key_column));
        let filter = self.filter_sql(t, &column)?;
        self.changed = true;
        parse_expr(&format!("({filter}) IS NOT TRUE")).map(Some)
    }

    /// A sharded table in a FROM list → the filtered derived table.
    fn wrap(&mut self, f: &mut TableFactor) -> Result<(), RouteError> {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = f
        else {
            return Ok(());
        };
        let Some(t) = self.sharded(name)? else {
            return Ok(());
        };
        let filter = self.filter_sql(t, &quote(&t.key_column))?;
        let alias = alias.take().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: name
                .0
                .last()
                .and_then(|p| p.as_ident())
                .cloned()
                .unwrap_or_else(|| Ident::new(&t.name)),
            columns: Vec::new(),
            at: None,
        });
        let mut inner = parse_query(&format!(
            "SELECT * FROM hotrepart_placeholder WHERE ({filter}) IS NOT TRUE"
        ))?;
        if let SetExpr::Select(sel) = inner.body.as_mut() {
            if let Some(from) = sel.from.first_mut() {
                // The original item (ONLY, TABLESAMPLE … kept), unaliased.
                from.relation = f.clone();
            }
        }
        *f = TableFactor::Derived {
            lateral: false,
            subquery: Box::new(inner),
            alias: Some(alias),
            sample: None,
        };
        self.changed = true;
        Ok(())
    }
}

impl VisitorMut for Hider<'_> {
    type Break = ();

    fn post_visit_table_factor(&mut self, f: &mut TableFactor) -> ControlFlow<()> {
        match self.wrap(f) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }
}

/// `sql` with each read of `pg_prepared_xacts` leaving out the node's own
/// prepared transactions (identifiers `hr_…`, its two-phase commit's: the
/// resolver finishes them, a client must not): the view becomes
/// `(SELECT * FROM pg_catalog.pg_prepared_xacts WHERE substr(gid, 1, 3) IS DISTINCT FROM 'hr_')`
/// under the name or alias the statement uses. `None` when the statement
/// does not read it (or cannot be parsed: then the router refused it).
pub fn hide_node_transactions(ns: &Namespace, sql: &str) -> Result<Option<String>, RouteError> {
    let dialect = PostgreSqlDialect {};
    let Ok(mut statements) = Parser::parse_sql(&dialect, sql) else {
        return Ok(None);
    };
    let mut v = NodeXacts {
        ns,
        ctes: BTreeSet::new(),
        changed: false,
        error: None,
    };
    for st in &mut statements {
        v.ctes = cte_names(st);
        let _ = st.visit(&mut v);
        if let Some(e) = v.error.take() {
            return Err(e);
        }
    }
    Ok(v.changed.then(|| {
        statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }))
}

/// The visitor of [`hide_node_transactions`].
struct NodeXacts<'a> {
    ns: &'a Namespace,
    ctes: BTreeSet<String>,
    changed: bool,
    error: Option<RouteError>,
}

impl VisitorMut for NodeXacts<'_> {
    type Break = ();

    fn post_visit_table_factor(&mut self, f: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = f
        else {
            return ControlFlow::Continue(());
        };
        let Ok(catalog_name) = table_name(self.ns, name) else {
            return ControlFlow::Continue(());
        };
        if !super::analyze::is_every_shard_view(&catalog_name)
            || (name.0.len() == 1 && self.ctes.contains(&catalog_name))
        {
            return ControlFlow::Continue(());
        }
        let alias = alias.take().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: Ident::new("pg_prepared_xacts"),
            columns: Vec::new(),
            at: None,
        });
        match parse_query(
            "SELECT * FROM pg_catalog.pg_prepared_xacts WHERE substr(gid, 1, 3) IS DISTINCT FROM 'hr_'",
        ) {
            Ok(inner) => {
                *f = TableFactor::Derived {
                    lateral: false,
                    subquery: Box::new(inner),
                    alias: Some(alias),
                    sample: None,
                };
                self.changed = true;
                ControlFlow::Continue(())
            }
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }
}

/// Appends `AND extra` to an optional WHERE.
fn add_filter(selection: &mut Option<Expr>, extra: Option<Expr>) {
    let Some(extra) = extra else { return };
    *selection = Some(match selection.take() {
        None => extra,
        Some(e) => Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(e))),
            op: sqlparser::ast::BinaryOperator::And,
            right: Box::new(extra),
        },
    });
}

/// Every CTE name of the statement (folded as PostgreSQL folds them).
fn cte_names(st: &Statement) -> BTreeSet<String> {
    struct Ctes(BTreeSet<String>);
    impl Visitor for Ctes {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(w) = &q.with {
                for c in &w.cte_tables {
                    self.0.insert(norm(&c.alias.name));
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = Ctes(BTreeSet::new());
    let _ = st.visit(&mut v);
    v.0
}

/// A column name as a quoted identifier.
fn quote(column: &str) -> String {
    format!("\"{}\"", column.replace('"', "\"\""))
}

fn parse_query(sql: &str) -> Result<Query, RouteError> {
    let dialect = PostgreSqlDialect {};
    let mut p = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| RouteError::syntax(e.to_string()))?;
    p.parse_query()
        .map(|q| *q)
        .map_err(|e| RouteError::syntax(e.to_string()))
}

fn parse_expr(sql: &str) -> Result<Expr, RouteError> {
    let dialect = PostgreSqlDialect {};
    let mut p = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| RouteError::syntax(e.to_string()))?;
    p.parse_expr()
        .map_err(|e| RouteError::syntax(e.to_string()))
}
