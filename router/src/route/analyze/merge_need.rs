//! What concatenating the shards' answers to a query would get wrong, if
//! anything ([`merge_need`]): the check for statements that cannot use a
//! merge plan (`INSERT … SELECT`, `COPY (query) TO`), and the fallback of
//! [`super::merge_plan`] when no plan fits.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Distinct, Expr, FunctionArgumentClause, FunctionArguments, GroupByExpr, Query, Select, SetExpr,
    Visit, Visitor,
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
