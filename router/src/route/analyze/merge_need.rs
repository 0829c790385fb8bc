//! What concatenating the shards' answers to a query would get wrong, if
//! anything ([`merge_need`]): the check for statements that cannot use a
//! merge plan (`INSERT … SELECT`, `COPY (query) TO`), and the fallback of
//! [`super::merge_plan`] when no plan fits.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Distinct, Expr, FunctionArgumentClause, FunctionArguments, GroupByExpr, Query, Select, SetExpr,
    TableFactor, Visit, Visitor,
};

use super::super::names::last_name;
use super::super::MergeNeed;
use super::functions::AGGREGATES;

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

/// Finds a subquery whose select list aggregates the rows of an outer
/// query: PostgreSQL makes `(SELECT max(u.age))` or `(SELECT max(u.age)
/// FROM orders o …)` — an aggregate whose arguments name only outer
/// columns — an aggregate of the outer query, one row in all, where the
/// shards would each answer their own.
struct OuterAggregate {
    depth: usize,
    found: Option<String>,
}

impl Visitor for OuterAggregate {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        if self.depth < 2 || self.found.is_some() {
            return ControlFlow::Continue(());
        }
        let SetExpr::Select(s) = q.body.as_ref() else {
            return ControlFlow::Continue(());
        };
        // Names of the subquery's own FROM items.
        let mut own: Vec<String> = Vec::new();
        for twj in &s.from {
            for f in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
                match f {
                    TableFactor::Table { name, alias, .. } => {
                        own.push(match alias {
                            Some(a) => a.name.value.to_lowercase(),
                            None => last_name(name),
                        });
                    }
                    TableFactor::Derived { alias: Some(a), .. }
                    | TableFactor::Function { alias: Some(a), .. } => {
                        own.push(a.name.value.to_lowercase())
                    }
                    _ => own.push(String::new()),
                }
            }
        }
        let mut aggs = AggArgs::default();
        let _ = s.projection.visit(&mut aggs);
        for quals in aggs.calls {
            let outer = if s.from.is_empty() {
                true
            } else {
                !quals.is_empty() && quals.iter().all(|q| !own.contains(q))
            };
            if outer {
                self.found = Some(
                    "an aggregate in a subquery over columns of the outer query (PostgreSQL aggregates the outer rows)"
                        .to_owned(),
                );
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// The aggregate calls of a select list (not inside its subqueries): per
/// call, the qualifiers of the column names in its arguments (lower case).
#[derive(Default)]
struct AggArgs {
    depth: usize,
    calls: Vec<Vec<String>>,
    inside: Option<usize>,
}

impl Visitor for AggArgs {
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
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Function(f)
                if self.inside.is_none()
                    && f.over.is_none()
                    && AGGREGATES.contains(&last_name(&f.name).as_str()) =>
            {
                self.calls.push(Vec::new());
                self.inside = Some(self.calls.len() - 1);
            }
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                if let Some(i) = self.inside {
                    self.calls[i].push(parts[parts.len() - 2].value.to_lowercase());
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth == 0
            && matches!(e, Expr::Function(f) if f.over.is_none() && AGGREGATES.contains(&last_name(&f.name).as_str()))
        {
            self.inside = None;
        }
        ControlFlow::Continue(())
    }
}

/// A subquery of `q` that aggregates the rows of an outer query, named.
pub(super) fn outer_aggregate(q: &Query) -> Option<String> {
    let mut w = OuterAggregate {
        depth: 0,
        found: None,
    };
    let _ = q.visit(&mut w);
    w.found
}

/// Whether `node` holds an aggregate or window function (not inside a
/// subquery of it).
pub(super) fn aggregates_in<V: Visit>(node: &V) -> bool {
    let mut w = MergeWalker {
        depth: 0,
        found: None,
    };
    let _ = node.visit(&mut w);
    w.found.is_some()
}

/// What concatenating the shards' answers to `q` would get wrong, if anything
/// (for statements that cannot use a merge plan: `INSERT … SELECT`, `COPY`).
pub(super) fn merge_need(q: &Query) -> MergeNeed {
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

pub(super) fn select_merge_need(s: &Select) -> MergeNeed {
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
