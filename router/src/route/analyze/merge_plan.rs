//! Merge planning of a multi-shard SELECT: the [`MergePlan`] (see
//! `route/merge.rs` for its meaning) or the construct that stays refused.
//!
//! Shard SQL rewrite rules:
//!
//! * Hidden columns (sort keys, group keys and HAVING operands the select
//!   list lacks, the `count` of an `avg`) are put *first* in the shard's
//!   select list; the client's items follow, unchanged except that
//!   `avg(x) [AS a]` becomes `sum(x) AS a` (`AS avg` without an alias) with
//!   a hidden `count(x)` (FILTER kept on both).
//! * Aggregated queries: GROUP BY becomes positions of shard columns,
//!   HAVING and DISTINCT are removed (applied after combining).
//! * ORDER BY becomes positions of shard columns (with the original
//!   ASC/DESC/NULLS) when the shards can sort usefully: always without
//!   aggregation, and with GROUP BY only when the order is exactly the group
//!   key. Otherwise it is dropped.
//! * LIMIT/OFFSET/FETCH become `LIMIT offset+limit` (`$a::int8 + $b::int8`
//!   with parameters) when that is correct: without aggregation, or with
//!   GROUP BY ordered by exactly the group key, no HAVING and no DISTINCT.
//!   Otherwise they are dropped. OFFSET alone is never pushed.
//! * A column is reused instead of adding a hidden one when an equal
//!   expression (same aggregate, same plain expression) is already there.
//!
//! Sort keys resolve as PostgreSQL does: a number is an output position, a
//! bare name an output column name (explicit or implicit), anything else an
//! expression (matched against the select list, else a hidden column).

use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    BinaryOperator, DataType, Distinct, DuplicateTreatment, Expr, Function, FunctionArg,
    FunctionArgExpr, FunctionArgumentClause, FunctionArguments, GroupByExpr, Ident, LimitClause,
    NamedWindowDefinition, NamedWindowExpr, ObjectNamePart, OrderBy, OrderByExpr, OrderByKind,
    OrderByOptions, OrderBySort, Query, SelectItem, SetExpr, UnaryOperator, Value, Visit, Visitor,
    WindowType,
};

use super::super::names::{last_name, norm};
use super::super::MergeNeed;
use super::expr::strip;
use super::functions::{AGGREGATES, PURE_FUNCTIONS};
use super::merge_need::merge_need;
use crate::route::merge::{
    AggregatePlan, Combined, CompareOp, CountCast, HavingExpr, LimitSpec, Literal, MergePlan,
    Operand, Partial, ShardCol, SortKey,
};

/// Internal ids of hidden columns start here (visible ones are their output
/// position); both are turned into shard positions at the end. PostgreSQL
/// allows at most 1664 result columns.
const HIDDEN: usize = 1 << 20;

/// Whether an expression names the shard key of a sharded table the query
/// reads at its top level (not from the nullable side of an outer join):
/// rows with equal values of it are all on one shard.
pub(super) type IsKey<'a> = &'a dyn Fn(&Expr) -> bool;

/// The merge need of a SELECT read from several shards.
///
/// With `is_key`, two constructs that are otherwise refused are merged,
/// since the rows they combine never span shards: window functions
/// partitioned by the shard key (computed by each shard, in a query without
/// aggregates), and `count`/`sum`/`avg(DISTINCT key)` (each key value is on
/// one shard, so the shards' distinct sets are disjoint: their counts and
/// sums add up).
pub(super) fn merge_plan(q: &Query, is_key: IsKey<'_>) -> MergeNeed {
    match plan_query(q, is_key) {
        Ok(None) => MergeNeed::None,
        Ok(Some(p)) => MergeNeed::Merge(Arc::new(p)),
        Err(what) => MergeNeed::Refuse(what),
    }
}

/// `q` with `GROUP BY n` (Django's form on PostgreSQL) written as the
/// `n`-th output expression, which it means: a key grouped so is then seen
/// as one, and the shards' statement keeps grouping right when hidden
/// columns go before the outputs. None: no position, or one that cannot be
/// resolved (after a `*`, out of range).
fn group_positions_resolved(q: &Query, sel: &sqlparser::ast::Select) -> Option<Query> {
    let GroupByExpr::Expressions(exprs, mods) = &sel.group_by else {
        return None;
    };
    let position = |e: &Expr| match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok(),
            _ => None,
        },
        _ => None,
    };
    if !exprs.iter().any(|e| position(e).is_some()) {
        return None;
    }
    let mut resolved = Vec::with_capacity(exprs.len());
    let mut changed = false;
    for e in exprs {
        match position(e) {
            None => resolved.push(e.clone()),
            Some(n) => {
                let item = sel.projection.get(n.checked_sub(1)?)?;
                if sel.projection[..n].iter().any(|i| {
                    matches!(
                        i,
                        SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
                    )
                }) {
                    return None;
                }
                match item {
                    // (A position of an aggregate or window: PostgreSQL's
                    // error, refused as before.)
                    // A position naming a literal stays (PostgreSQL reads a
                    // number there as a position again, refuses a string).
                    SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. }
                        if match strip(x) {
                            Expr::Value(_) => true,
                            Expr::UnaryOp { expr, .. } => matches!(strip(expr), Expr::Value(_)),
                            _ => false,
                        } =>
                    {
                        resolved.push(e.clone())
                    }
                    SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. }
                        if !super::merge_need::aggregates_in(x) =>
                    {
                        changed = true;
                        resolved.push(x.clone())
                    }
                    _ => return None,
                }
            }
        }
    }
    if !changed {
        return None;
    }
    let mut q = q.clone();
    let SetExpr::Select(s) = q.body.as_mut() else {
        return None;
    };
    s.group_by = GroupByExpr::Expressions(resolved, mods.clone());
    Some(q)
}

/// `Ok(None)`: concatenation is correct; `Err`: the construct refused.
fn plan_query(q: &Query, is_key: IsKey<'_>) -> Result<Option<MergePlan>, String> {
    if let Some(what) = super::merge_need::outer_aggregate(q) {
        return Err(what);
    }
    let sel = match q.body.as_ref() {
        SetExpr::Select(s) => s.as_ref(),
        SetExpr::Query(inner)
            if q.with.is_none()
                && q.order_by.is_none()
                && q.limit_clause.is_none()
                && q.fetch.is_none()
                && q.locks.is_empty() =>
        {
            return plan_query(inner, is_key)
        }
        SetExpr::SetOperation { .. } => return super::merge_union::plan_union(q),
        _ => {
            return match merge_need(q) {
                MergeNeed::Refuse(what) => Err(what),
                _ => Ok(None),
            }
        }
    };
    if let Some(q) = group_positions_resolved(q, sel) {
        return plan_query(&q, is_key);
    }
    if let Some((_, negated)) = super::scope::lone_exists(sel) {
        return exists_plan(q, negated).map(Some);
    }
    if super::scope::exists_filter(sel).is_some() {
        return exists_filter_plan(q).map(Some);
    }
    let mut finder = Finder {
        keyed: Some((is_key, &sel.named_window)),
        ..Finder::default()
    };
    let _ = sel.projection.visit(&mut finder);
    let _ = q.order_by.visit(&mut finder);
    let _ = sel.having.visit(&mut finder);
    if let Some(w) = finder.window {
        return Err(w);
    }
    if sel.named_window.iter().any(|d| {
        !window_by_key(
            &WindowType::NamedWindow(d.0.clone()),
            &sel.named_window,
            is_key,
        )
    }) {
        return Err("WINDOW (not partitioned by the shard key)".to_owned());
    }
    let (distinct, distinct_on) = match &sel.distinct {
        None | Some(Distinct::All) => (false, None),
        Some(Distinct::Distinct) => (true, None),
        Some(Distinct::On(v)) => (false, Some(v)),
    };
    let group_exprs: &[Expr] = match &sel.group_by {
        GroupByExpr::All(_) => return Err("GROUP BY ALL".to_owned()),
        GroupByExpr::Expressions(_, mods) if !mods.is_empty() => {
            return Err("GROUP BY … WITH ROLLUP/CUBE/TOTALS".to_owned())
        }
        GroupByExpr::Expressions(v, _) => v,
    };
    let aggregated = !group_exprs.is_empty() || sel.having.is_some() || finder.aggregate.is_some();
    if let (Some(w), true) = (&finder.keyed_window, aggregated) {
        return Err(format!(
            "window function {w}() in a query with aggregates or GROUP BY"
        ));
    }
    // Grouped by a shard key (an expression naming it, not a position or
    // an output name): the rows of a group are all on one shard, which
    // computes the group whole — any aggregate, HAVING, expressions over
    // aggregates. The shards' rows are then final rows, merged as rows
    // without aggregation are (ORDER BY, LIMIT, DISTINCT).
    let whole_groups = !group_exprs.is_empty()
        && group_exprs.iter().any(is_key)
        // (a position inside them would shift with hidden columns)
        && !group_exprs.iter().any(|e| {
            matches!(
                strip(e),
                Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)
            )
        })
        && !group_exprs
            .iter()
            .any(|e| matches!(strip(e), Expr::Value(v) if matches!(v.value, Value::Number(..))));
    let aggregated = aggregated && !whole_groups;
    // DISTINCT rows that show a shard key: equal rows have one key, so
    // they are on one shard, which drops the duplicates itself.
    let distinct = distinct
        && (aggregated
            || !sel.projection.iter().any(|i| match i {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => is_key(e),
                _ => false,
            }));
    if aggregated && distinct_on.is_some() {
        return Err("DISTINCT ON in a query with aggregates or GROUP BY".to_owned());
    }
    let (limit, offset) = limit_offset(q)?;
    if !aggregated
        && !distinct
        && distinct_on.is_none()
        && q.order_by.is_none()
        && limit.is_none()
        && offset.is_none()
    {
        return Ok(None);
    }
    // With ORDER BY/LIMIT/OFFSET only, each shard locks the rows it
    // returns (up to LIMIT + OFFSET): more rows than PostgreSQL would lock
    // when the node keeps fewer, never fewer (Django's `update_or_create`
    // sends `… WHERE email = $1 LIMIT 21 FOR UPDATE`). With aggregates or
    // DISTINCT PostgreSQL refuses FOR UPDATE itself.
    if !q.locks.is_empty() && (aggregated || distinct || distinct_on.is_some()) {
        return Err("FOR UPDATE/FOR SHARE".to_owned());
    }
    if q.settings.is_some()
        || q.format_clause.is_some()
        || q.for_clause.is_some()
        || !q.pipe_operators.is_empty()
        || sel.top.is_some()
        || sel.qualify.is_some()
        || sel.prewhere.is_some()
        || sel.exclude.is_some()
        || !sel.lateral_views.is_empty()
        || !sel.connect_by.is_empty()
        || !sel.cluster_by.is_empty()
        || !sel.distribute_by.is_empty()
        || !sel.sort_by.is_empty()
    {
        return Err("a non-PostgreSQL SELECT clause".to_owned());
    }

    if sel.projection.len() >= HIDDEN {
        return Err("a select list this long".to_owned());
    }
    let mut b = Builder::new(aggregated, is_key);
    b.select_list(&sel.projection)?;
    if aggregated {
        for e in group_exprs {
            let id = b.group_key(e, &sel.projection)?;
            if !b.group_by.contains(&id) {
                b.group_by.push(id);
            }
        }
        if group_exprs.is_empty() && finder.aggregate.is_none() {
            // HAVING without aggregates: one group even over no rows, which
            // the shards cannot tell us.
            return Err("HAVING without an aggregate function".to_owned());
        }
    }
    // (Grouped by the key, HAVING stays in the shards' statement.)
    let having = match &sel.having {
        Some(h) if aggregated => Some(b.having(h)?),
        _ => None,
    };
    let mut order = Vec::new();
    let mut shard_order_opts = Vec::new();
    for (k, desc) in order_keys(q)? {
        let value = b.sort_value(&k.expr, &sel.projection)?;
        order.push(SortKey {
            value,
            desc,
            nulls_first: k.options.nulls_first.unwrap_or(desc),
        });
        shard_order_opts.push(k.options.clone());
    }
    // DISTINCT ON: its expressions resolve as ORDER BY keys do. PostgreSQL
    // requires them to lead the ORDER BY (in any order); those it lacks
    // are sorted by after it (ascending), as PostgreSQL does — so the
    // rows of one DISTINCT ON group are next to each other in every
    // shard's sorted answer and in their k-way merge, the first of them
    // the one PostgreSQL keeps.
    let mut on = Vec::new();
    if let Some(exprs) = distinct_on {
        for e in exprs {
            let v = b.sort_value(e, &sel.projection)?;
            if !on.contains(&v) {
                on.push(v);
            }
        }
        let mismatch = || {
            "DISTINCT ON whose expressions are not the leading ORDER BY keys (PostgreSQL requires them to be)".to_owned()
        };
        let mut skipped = false;
        for k in &order {
            if on.contains(&k.value) {
                if skipped {
                    return Err(mismatch());
                }
            } else {
                skipped = true;
            }
        }
        for &v in &on {
            if !order.iter().any(|k| k.value == v) {
                if skipped {
                    return Err(mismatch());
                }
                order.push(SortKey {
                    value: v,
                    desc: false,
                    nulls_first: false,
                });
                shard_order_opts.push(OrderByOptions {
                    sort: None,
                    nulls_first: None,
                });
            }
        }
    }
    if aggregated {
        b.check_plain()?;
        // Without GROUP BY the shards group by the distinct values and an
        // empty input gives no row: the node answers it, but cannot compute
        // a plain value for it.
        // The shards then group more finely: partial aggregates of DISTINCT
        // shard keys no longer add up (a key is in several of a group's
        // rows) — `count(DISTINCT key)` is counted by the node as well,
        // `sum`/`avg(DISTINCT key)` refused.
        if b.visible
            .iter()
            .chain(&b.hidden)
            .any(|c| c.kind == ShardCol::Distinct)
        {
            for c in b.visible.iter_mut().chain(b.hidden.iter_mut()) {
                let ShardCol::Partial(p) = c.kind else {
                    continue;
                };
                let Expr::Function(f) = strip(&c.expr) else {
                    continue;
                };
                let FunctionArguments::List(list) = &f.args else {
                    continue;
                };
                if list.duplicate_treatment != Some(DuplicateTreatment::Distinct) {
                    continue;
                }
                match (p, list.args.as_slice()) {
                    (Partial::Count, [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))]) => {
                        let x = distinct_value(x, f.filter.as_deref());
                        if c.alias.is_none() {
                            c.alias = Some(Ident::new("count"));
                        }
                        c.expr = x;
                        c.kind = ShardCol::Distinct;
                    }
                    (Partial::Min | Partial::Max | Partial::BoolAnd | Partial::BoolOr, _) => {}
                    _ => {
                        return Err(format!(
                            "{}(DISTINCT …) beside count(DISTINCT …) of another column",
                            last_name(&f.name)
                        ))
                    }
                }
            }
        }
        let cols = || b.visible.iter().chain(&b.hidden);
        if b.group_by.is_empty()
            && cols().any(|c| c.kind == ShardCol::Distinct)
            && cols().any(|c| c.kind == ShardCol::Plain)
        {
            return Err(
                "count(DISTINCT …) beside a value that is not an aggregate, without GROUP BY"
                    .to_owned(),
            );
        }
        // The row the node makes up for an empty input there has a NULL
        // sum, where `coalesce(sum(x), 0)` is 0.
        if b.group_by.is_empty()
            && cols().any(|c| c.kind == ShardCol::Distinct)
            && cols().any(|c| {
                c.kind == ShardCol::Partial(Partial::Sum)
                    && matches!(strip(&c.expr), Expr::Function(f) if last_name(&f.name) == "coalesce")
            })
        {
            return Err(
                "coalesce(sum(…), 0) beside count(DISTINCT …) of another column, without GROUP BY"
                    .to_owned(),
            );
        }
    }

    // Can the shards sort, and can the limit go down?
    let by_group_key = aggregated
        && !b.group_by.is_empty()
        && order
            .iter()
            .all(|k| matches!(k.value, Combined::Col(c) if b.group_by.contains(&c)))
        && b.group_by
            .iter()
            .all(|g| order.iter().any(|k| k.value == Combined::Col(*g)));
    let shards_sorted = !order.is_empty() && (!aggregated || by_group_key);
    // (Shards grouping by counted DISTINCT values too send several rows
    // per group: a limit there would cut groups.)
    let finer = b
        .visible
        .iter()
        .chain(&b.hidden)
        .any(|c| c.kind == ShardCol::Distinct);
    let push_limit = !aggregated || (by_group_key && having.is_none() && !distinct && !finer);
    let pushed = if push_limit {
        pushed_limit(limit, offset)
    } else {
        None
    };

    // Positions in the shard row.
    let h = b.hidden.len();
    let pos = |id: usize| if id >= HIDDEN { id - HIDDEN } else { h + id };
    let map_combined = |c: Combined| match c {
        Combined::Col(i) => Combined::Col(pos(i)),
        Combined::Avg { sum, count } => Combined::Avg {
            sum: pos(sum),
            count: pos(count),
        },
        Combined::CountAs { col, to } => Combined::CountAs { col: pos(col), to },
    };
    let order_by: Vec<SortKey> = order
        .iter()
        .map(|k| SortKey {
            value: map_combined(k.value),
            ..*k
        })
        .collect();

    // The shard statement.
    let mut sq = q.clone();
    sq.order_by = None;
    sq.limit_clause = None;
    sq.fetch = None;
    let SetExpr::Select(ss) = sq.body.as_mut() else {
        return Err("this query shape".to_owned());
    };
    let mut projection: Vec<SelectItem> = b.hidden.iter().map(Col::item).collect();
    if aggregated {
        projection.extend(b.visible.iter().map(Col::item));
        ss.having = None;
        ss.distinct = None;
        // The shards also group by the values counted DISTINCT.
        let distinct_cols = b
            .hidden
            .iter()
            .enumerate()
            .map(|(j, c)| (HIDDEN + j, c))
            .chain(b.visible.iter().enumerate())
            .filter(|(_, c)| c.kind == ShardCol::Distinct)
            .map(|(id, _)| id);
        ss.group_by = GroupByExpr::Expressions(
            b.group_by
                .iter()
                .copied()
                .chain(distinct_cols)
                .map(|g| number(pos(g) + 1))
                .collect(),
            Vec::new(),
        );
    } else {
        projection.extend(sel.projection.iter().cloned());
        if distinct_on.is_some() {
            ss.distinct = Some(Distinct::On(
                on.iter()
                    .map(|&v| match map_combined(v) {
                        Combined::Col(c) | Combined::CountAs { col: c, .. } => number(c + 1),
                        Combined::Avg { sum, .. } => number(sum + 1),
                    })
                    .collect(),
            ));
        }
    }
    ss.projection = projection;
    if shards_sorted {
        let keys = order_by
            .iter()
            .zip(shard_order_opts)
            .map(|(k, options)| OrderByExpr {
                expr: number(match k.value {
                    Combined::Col(c) | Combined::CountAs { col: c, .. } => c + 1,
                    Combined::Avg { sum, .. } => sum + 1,
                }),
                options,
                with_fill: None,
            })
            .collect();
        sq.order_by = Some(OrderBy {
            kind: OrderByKind::Expressions(keys),
            interpolate: None,
        });
    }
    let mut shard_sql = sq.to_string();
    if let Some(l) = pushed {
        shard_sql.push_str(" LIMIT ");
        shard_sql.push_str(&l);
    }

    let aggregate = if aggregated {
        let mut shard_cols: Vec<ShardCol> = b.hidden.iter().map(|c| c.kind).collect();
        shard_cols.extend(b.visible.iter().map(|c| c.kind));
        Some(AggregatePlan {
            shard_cols,
            group_by: b.group_by.iter().map(|&g| pos(g)).collect(),
            outputs: b.outputs.iter().map(|&c| map_combined(c)).collect(),
            having: having.map(|e| remap_having(e, &pos)),
            separators: b
                .separators
                .iter()
                .map(|(id, sep)| (pos(*id), sep.clone()))
                .collect(),
        })
    } else {
        None
    };
    Ok(Some(MergePlan {
        shard_sql,
        hidden: h,
        aggregate,
        zero_params: b.zero_params.clone(),
        distinct,
        distinct_on: on
            .iter()
            .map(|&v| match map_combined(v) {
                Combined::Col(c) | Combined::CountAs { col: c, .. } => c,
                Combined::Avg { sum, .. } => sum,
            })
            .collect(),
        order_by,
        shards_sorted,
        limit,
        offset,
    }))
}

/// `SELECT [NOT] EXISTS (subquery)` over several shards: every shard
/// answers one row, for its own rows; the answer is their bool_or (with
/// NOT: their bool_and — no shard has a row). LIMIT/OFFSET apply to that
/// one row.
fn exists_plan(q: &Query, negated: bool) -> Result<MergePlan, String> {
    if q.with.is_some() || !q.locks.is_empty() || q.order_by.is_some() {
        return Err("SELECT EXISTS (…) with WITH, ORDER BY or FOR UPDATE".to_owned());
    }
    let (limit, offset) = limit_offset(q)?;
    let mut sq = q.clone();
    sq.order_by = None;
    sq.limit_clause = None;
    sq.fetch = None;
    Ok(MergePlan {
        shard_sql: sq.to_string(),
        hidden: 0,
        aggregate: Some(AggregatePlan {
            shard_cols: vec![ShardCol::Partial(if negated {
                Partial::BoolAnd
            } else {
                Partial::BoolOr
            })],
            group_by: Vec::new(),
            outputs: vec![Combined::Col(0)],
            having: None,
            separators: Vec::new(),
        }),
        zero_params: Vec::new(),
        distinct: false,
        distinct_on: Vec::new(),
        order_by: Vec::new(),
        shards_sorted: false,
        limit,
        offset,
    })
}

/// `SELECT constants [FROM (SELECT constants) d] WHERE EXISTS (…)`
/// (`scope::exists_filter`): each shard answers with the same row or with
/// none; the merge keeps one (DISTINCT), then LIMIT/OFFSET. ORDER BY of
/// one row changes nothing and is left to the shards.
fn exists_filter_plan(q: &Query) -> Result<MergePlan, String> {
    if q.with.is_some() || !q.locks.is_empty() {
        return Err("SELECT … WHERE EXISTS (…) with WITH or FOR UPDATE".to_owned());
    }
    let (limit, offset) = limit_offset(q)?;
    let mut sq = q.clone();
    sq.limit_clause = None;
    sq.fetch = None;
    Ok(MergePlan {
        shard_sql: sq.to_string(),
        hidden: 0,
        aggregate: None,
        zero_params: Vec::new(),
        distinct: true,
        distinct_on: Vec::new(),
        order_by: Vec::new(),
        shards_sorted: false,
        limit,
        offset,
    })
}

/// The ORDER BY keys of `q` with whether each is descending; the
/// clauses no merge can follow refused.
pub(super) fn order_keys(q: &Query) -> Result<Vec<(&OrderByExpr, bool)>, String> {
    let Some(ob) = &q.order_by else {
        return Ok(Vec::new());
    };
    let OrderByKind::Expressions(keys) = &ob.kind else {
        return Err("ORDER BY ALL".to_owned());
    };
    if ob.interpolate.is_some() {
        return Err("ORDER BY … INTERPOLATE".to_owned());
    }
    keys.iter()
        .map(|k| {
            if k.with_fill.is_some() {
                return Err("ORDER BY … WITH FILL".to_owned());
            }
            match &k.options.sort {
                None | Some(OrderBySort::Asc) => Ok((k, false)),
                Some(OrderBySort::Desc) => Ok((k, true)),
                Some(OrderBySort::Using(_)) => Err("ORDER BY … USING".to_owned()),
            }
        })
        .collect()
}

/// The text of the pushed-down `LIMIT offset+limit`, if any.
pub(super) fn pushed_limit(limit: Option<LimitSpec>, offset: Option<LimitSpec>) -> Option<String> {
    let param = |i: usize| format!("${}::int8", i + 1);
    match (limit?, offset) {
        (LimitSpec::Count(l), None) => Some(l.to_string()),
        (LimitSpec::Param(i), None) => Some(format!("${}", i + 1)),
        (LimitSpec::Count(l), Some(LimitSpec::Count(o))) => l
            .checked_add(o)
            .filter(|&n| i64::try_from(n).is_ok())
            .map(|n| n.to_string()),
        (LimitSpec::Count(l), Some(LimitSpec::Param(o))) => Some(format!("{} + {l}", param(o))),
        (LimitSpec::Param(l), Some(LimitSpec::Count(o))) => Some(format!("{} + {o}", param(l))),
        (LimitSpec::Param(l), Some(LimitSpec::Param(o))) => {
            Some(format!("{} + {}", param(o), param(l)))
        }
    }
}

/// LIMIT/OFFSET/FETCH FIRST as numbers or parameters (`None`: no limit,
/// which `LIMIT ALL` and `LIMIT NULL` also mean).
pub(super) fn limit_offset(q: &Query) -> Result<(Option<LimitSpec>, Option<LimitSpec>), String> {
    let mut limit = None;
    let mut offset = None;
    match &q.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit: l,
            offset: o,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err("LIMIT … BY".to_owned());
            }
            if let Some(l) = l {
                limit = limit_spec(l, "LIMIT")?;
            }
            if let Some(o) = o {
                offset = limit_spec(&o.value, "OFFSET")?;
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => {
            return Err("LIMIT offset, count".to_owned());
        }
    }
    if let Some(f) = &q.fetch {
        if f.with_ties {
            return Err("FETCH FIRST … WITH TIES".to_owned());
        }
        if f.percent {
            return Err("FETCH FIRST … PERCENT".to_owned());
        }
        if limit.is_some() {
            return Err("LIMIT together with FETCH FIRST".to_owned());
        }
        limit = match &f.quantity {
            None => Some(LimitSpec::Count(1)),
            Some(e) => limit_spec(e, "FETCH FIRST")?,
        };
    }
    Ok((limit, offset))
}

fn limit_spec(e: &Expr, what: &str) -> Result<Option<LimitSpec>, String> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<u64>()
                .ok()
                .filter(|&n| i64::try_from(n).is_ok())
                .map(|n| Some(LimitSpec::Count(n)))
                .ok_or_else(|| format!("{what} {n} (only whole numbers or parameters)")),
            Value::Null => Ok(None),
            Value::Placeholder(p) => match crate::route::keys::placeholder(p) {
                Some(i) => Ok(Some(LimitSpec::Param(i))),
                None => Err(format!("{what} {p}")),
            },
            _ => Err(format!("{what} {e} (only whole numbers or parameters)")),
        },
        Expr::Cast { expr, .. } => limit_spec(expr, what),
        _ => Err(format!("{what} {e} (only whole numbers or parameters)")),
    }
}

pub(super) fn number(n: usize) -> Expr {
    Expr::value(Value::Number(n.to_string(), false))
}

fn remap_having(e: HavingExpr, pos: &impl Fn(usize) -> usize) -> HavingExpr {
    let op = |o: Operand| match o {
        Operand::Value(Combined::Col(i)) => Operand::Value(Combined::Col(pos(i))),
        Operand::Value(Combined::Avg { sum, count }) => Operand::Value(Combined::Avg {
            sum: pos(sum),
            count: pos(count),
        }),
        Operand::Value(Combined::CountAs { col, to }) => {
            Operand::Value(Combined::CountAs { col: pos(col), to })
        }
        other => other,
    };
    match e {
        HavingExpr::And(a, b) => HavingExpr::And(
            Box::new(remap_having(*a, pos)),
            Box::new(remap_having(*b, pos)),
        ),
        HavingExpr::Or(a, b) => HavingExpr::Or(
            Box::new(remap_having(*a, pos)),
            Box::new(remap_having(*b, pos)),
        ),
        HavingExpr::Not(a) => HavingExpr::Not(Box::new(remap_having(*a, pos))),
        HavingExpr::Compare { left, op: o, right } => HavingExpr::Compare {
            left: op(left),
            op: o,
            right: op(right),
        },
        HavingExpr::IsNull { operand, negated } => HavingExpr::IsNull {
            operand: op(operand),
            negated,
        },
    }
}

/// A shard column being built.
#[derive(Debug, Clone)]
struct Col {
    /// The expression the shard computes (parentheses stripped for
    /// aggregates and hidden columns).
    expr: Expr,
    alias: Option<Ident>,
    kind: ShardCol,
}

impl Col {
    fn item(&self) -> SelectItem {
        match &self.alias {
            Some(a) => SelectItem::ExprWithAlias {
                expr: self.expr.clone(),
                alias: a.clone(),
            },
            None => SelectItem::UnnamedExpr(self.expr.clone()),
        }
    }
}

/// A supported aggregate call.
enum Agg {
    Simple(Partial),
    /// `string_agg(x, 'sep')`: the separator.
    Joined(String),
    /// `count(DISTINCT x)`, `x` not the shard key: the value `x`.
    CountDistinct(Box<Expr>),
    /// `avg(x)`: the `sum(x)` and `count(x)` calls to send.
    Avg {
        sum: Box<Expr>,
        count: Box<Expr>,
    },
}

struct Builder<'k> {
    aggregated: bool,
    is_key: IsKey<'k>,
    /// Known columns of the client's select list, by output position (with
    /// a `*`, only those before it).
    visible: Vec<Col>,
    hidden: Vec<Col>,
    /// Aggregated plans: the client's columns (internal ids).
    outputs: Vec<Combined>,
    group_by: Vec<usize>,
    /// Parameters written as the 0 of `coalesce(sum(x), $n)`.
    zero_params: Vec<usize>,
    /// The separators of `string_agg` columns (internal ids).
    separators: Vec<(usize, String)>,
}

impl<'k> Builder<'k> {
    fn new(aggregated: bool, is_key: IsKey<'k>) -> Self {
        Builder {
            aggregated,
            is_key,
            visible: Vec::new(),
            hidden: Vec::new(),
            outputs: Vec::new(),
            group_by: Vec::new(),
            zero_params: Vec::new(),
            separators: Vec::new(),
        }
    }

    fn col_mut(&mut self, id: usize) -> &mut Col {
        if id >= HIDDEN {
            &mut self.hidden[id - HIDDEN]
        } else {
            &mut self.visible[id]
        }
    }

    fn find(&self, pred: impl Fn(&Col) -> bool) -> Option<usize> {
        self.visible
            .iter()
            .position(&pred)
            .or_else(|| self.hidden.iter().position(&pred).map(|j| HIDDEN + j))
    }

    fn add_hidden(&mut self, expr: Expr, kind: ShardCol) -> usize {
        self.hidden.push(Col {
            expr,
            alias: None,
            kind,
        });
        HIDDEN + self.hidden.len() - 1
    }

    /// The column of a partial aggregate (reused, else hidden).
    fn partial(&mut self, p: Partial, expr: Expr) -> usize {
        let kind = ShardCol::Partial(p);
        self.find(|c| c.kind == kind && c.expr == expr)
            .unwrap_or_else(|| self.add_hidden(expr, kind))
    }

    /// The column of `count(DISTINCT x)` (reused, else hidden).
    fn distinct(&mut self, x: Expr) -> usize {
        self.find(|c| c.kind == ShardCol::Distinct && c.expr == x)
            .unwrap_or_else(|| self.add_hidden(x, ShardCol::Distinct))
    }

    /// The column of an aggregate-free expression (reused, else hidden).
    fn value(&mut self, e: &Expr) -> usize {
        let e = strip(e);
        self.find(|c| {
            !matches!(c.kind, ShardCol::Partial(_) | ShardCol::Distinct) && strip(&c.expr) == e
        })
        .unwrap_or_else(|| self.add_hidden(e.clone(), ShardCol::Plain))
    }

    /// An expression of an aggregated query as a combined value.
    fn agg_value(&mut self, e: &Expr, context: &str) -> Result<Combined, String> {
        match agg_call(e, self.is_key)? {
            Some(Agg::Simple(p)) => Ok(Combined::Col(self.partial(p, strip(e).clone()))),
            Some(Agg::Joined(sep)) => {
                let id = self.partial(Partial::StringAgg, strip(e).clone());
                if !self.separators.iter().any(|(i, _)| *i == id) {
                    self.separators.push((id, sep));
                }
                Ok(Combined::Col(id))
            }
            Some(Agg::Avg { sum, count }) => Ok(Combined::Avg {
                sum: self.partial(Partial::Sum, *sum),
                count: self.partial(Partial::Count, *count),
            }),
            Some(Agg::CountDistinct(x)) => Ok(Combined::Col(self.distinct(*x))),
            None => {
                if let Some(name) = first_aggregate(e) {
                    return Err(format!(
                        "{context} over aggregate function {name}() (only bare aggregates can be combined)"
                    ));
                }
                Ok(Combined::Col(self.value(e)))
            }
        }
    }

    fn select_list(&mut self, items: &[SelectItem]) -> Result<(), String> {
        // The counts of `avg`s, resolved after the list so that they reuse a
        // `count(x)` the client selected anyway.
        let mut avg_counts = Vec::new();
        for item in items {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.clone())),
                SelectItem::ExprWithAliases { .. } => {
                    return Err("a select item with several aliases".to_owned())
                }
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    if self.aggregated {
                        return Err("SELECT * with aggregates or GROUP BY".to_owned());
                    }
                    // Positions after it are unknown.
                    break;
                }
            };
            if !self.aggregated {
                self.visible.push(Col {
                    expr: expr.clone(),
                    alias,
                    kind: ShardCol::Plain,
                });
                continue;
            }
            let id = self.visible.len();
            match agg_call(expr, self.is_key)? {
                Some(Agg::Simple(p)) => {
                    self.visible.push(Col {
                        expr: strip(expr).clone(),
                        alias,
                        kind: ShardCol::Partial(p),
                    });
                    self.outputs.push(Combined::Col(id));
                }
                Some(Agg::Joined(sep)) => {
                    self.visible.push(Col {
                        expr: strip(expr).clone(),
                        alias,
                        kind: ShardCol::Partial(Partial::StringAgg),
                    });
                    self.separators.push((id, sep));
                    self.outputs.push(Combined::Col(id));
                }
                Some(Agg::CountDistinct(x)) => {
                    // PostgreSQL names the column `count`.
                    self.visible.push(Col {
                        expr: *x,
                        alias: Some(alias.unwrap_or_else(|| Ident::new("count"))),
                        kind: ShardCol::Distinct,
                    });
                    self.outputs.push(Combined::Col(id));
                }
                Some(Agg::Avg { sum, count }) => {
                    let name = alias.unwrap_or_else(|| Ident::new("avg"));
                    self.visible.push(Col {
                        expr: *sum,
                        alias: Some(name),
                        kind: ShardCol::Partial(Partial::Sum),
                    });
                    avg_counts.push((self.outputs.len(), *count));
                    self.outputs.push(Combined::Avg { sum: id, count: id });
                }
                None => {
                    if let Some((p, param)) = zero_coalesced(expr, self.is_key)? {
                        self.zero_params.extend(param);
                        // Each shard's `coalesce(sum(x), 0)`: the sum of
                        // the partials (0 for a shard without rows) is the
                        // sum, 0 when every shard had none.
                        self.visible.push(Col {
                            expr: strip(expr).clone(),
                            alias,
                            kind: ShardCol::Partial(p),
                        });
                        self.outputs.push(Combined::Col(id));
                        continue;
                    }
                    if let Some((count, to)) = count_cast(expr, self.is_key)? {
                        self.visible.push(Col {
                            expr: count,
                            alias,
                            kind: ShardCol::Partial(Partial::Count),
                        });
                        self.outputs.push(Combined::CountAs { col: id, to });
                        continue;
                    }
                    if let Some(name) = first_aggregate(expr) {
                        return Err(format!(
                            "an expression over aggregate function {name}() (only bare aggregates can be combined)"
                        ));
                    }
                    self.visible.push(Col {
                        expr: expr.clone(),
                        alias,
                        kind: ShardCol::Plain,
                    });
                    self.outputs.push(Combined::Col(id));
                }
            }
        }
        for (out, expr) in avg_counts {
            let c = self.partial(Partial::Count, expr);
            if let Combined::Avg { count, .. } = &mut self.outputs[out] {
                *count = c;
            }
        }
        Ok(())
    }

    /// The column of one GROUP BY expression (marked as a group key).
    fn group_key(&mut self, e: &Expr, items: &[SelectItem]) -> Result<usize, String> {
        let id = match strip(e) {
            Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_) => {
                return Err("GROUPING SETS/CUBE/ROLLUP".to_owned())
            }
            Expr::Value(v) if matches!(v.value, Value::Number(..)) => {
                let n = position(e)
                    .filter(|&n| n < self.visible.len())
                    .ok_or_else(|| format!("GROUP BY position {e} is not in the select list"))?;
                if matches!(
                    self.visible[n].kind,
                    ShardCol::Partial(_) | ShardCol::Distinct
                ) {
                    return Err(format!("GROUP BY position {e} of an aggregate"));
                }
                n
            }
            Expr::Identifier(id)
                if items.iter().any(|i| {
                    matches!(i, SelectItem::ExprWithAlias { expr, alias }
                        if norm(alias) == norm(id) && strip(expr) != strip(e))
                }) =>
            {
                // PostgreSQL prefers an input column of that name, which the
                // router cannot see.
                return Err(format!(
                    "GROUP BY {e}, an output column alias (repeat the expression or use its position)"
                ));
            }
            other => {
                if let Some(name) = first_aggregate(other) {
                    return Err(format!("aggregate function {name}() in GROUP BY"));
                }
                self.value(other)
            }
        };
        self.col_mut(id).kind = ShardCol::GroupKey;
        Ok(id)
    }

    /// Checks the plain (per-group) columns of an aggregated plan: a
    /// function the router does not know might be an aggregate.
    fn check_plain(&self) -> Result<(), String> {
        for c in self.visible.iter().chain(&self.hidden) {
            if c.kind != ShardCol::Plain {
                continue;
            }
            let mut f = Finder::default();
            let _ = c.expr.visit(&mut f);
            if let Some(name) = f.opaque {
                return Err(format!(
                    "function {name}() outside an aggregate in a query with aggregates or GROUP BY (the router cannot tell whether it is an aggregate)"
                ));
            }
        }
        Ok(())
    }

    /// The value an ORDER BY key sorts by.
    fn sort_value(&mut self, e: &Expr, items: &[SelectItem]) -> Result<Combined, String> {
        let output = |b: &Self, n: usize| {
            if b.aggregated {
                b.outputs[n]
            } else {
                Combined::Col(n)
            }
        };
        let known = self.visible.len();
        let wildcard = items.len() > known;
        if let Expr::Value(v) = strip(e) {
            if matches!(v.value, Value::Number(..)) {
                let n = position(e).ok_or_else(|| format!("ORDER BY position {e}"))?;
                if n >= known && !wildcard {
                    return Err(format!("ORDER BY position {e} is not in the select list"));
                }
                // With a `*`, position n is still shard column hidden + n.
                return Ok(if n < known {
                    output(self, n)
                } else {
                    Combined::Col(n)
                });
            }
        }
        if let Expr::Identifier(id) = strip(e) {
            let name = norm(id);
            let mut matches = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let (expr, item_name) = match item {
                    SelectItem::UnnamedExpr(x) => (x, implicit_name(x)),
                    SelectItem::ExprWithAlias { expr, alias } => (expr, Some(norm(alias))),
                    _ => continue,
                };
                if item_name.as_deref() == Some(name.as_str()) {
                    if i >= known {
                        return Err(format!(
                            "ORDER BY {name}, a column after * in the select list"
                        ));
                    }
                    matches.push((i, expr));
                }
            }
            if let Some((first, expr)) = matches.first() {
                if matches.iter().any(|(_, x)| strip(x) != strip(expr)) {
                    return Err(format!("ORDER BY \"{name}\", which is ambiguous"));
                }
                return Ok(output(self, *first));
            }
        }
        let stripped = strip(e);
        if let Some(n) = items.iter().take(known).position(|i| match i {
            SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. } => {
                strip(x) == stripped
            }
            _ => false,
        }) {
            return Ok(output(self, n));
        }
        if self.aggregated {
            self.agg_value(e, "ORDER BY")
        } else {
            Ok(Combined::Col(self.value(e)))
        }
    }

    fn having(&mut self, e: &Expr) -> Result<HavingExpr, String> {
        let cmp = |op: &BinaryOperator| match op {
            BinaryOperator::Eq => Some(CompareOp::Eq),
            BinaryOperator::NotEq => Some(CompareOp::NotEq),
            BinaryOperator::Lt => Some(CompareOp::Lt),
            BinaryOperator::LtEq => Some(CompareOp::LtEq),
            BinaryOperator::Gt => Some(CompareOp::Gt),
            BinaryOperator::GtEq => Some(CompareOp::GtEq),
            _ => None,
        };
        match strip(e) {
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => Ok(HavingExpr::And(
                    Box::new(self.having(left)?),
                    Box::new(self.having(right)?),
                )),
                BinaryOperator::Or => Ok(HavingExpr::Or(
                    Box::new(self.having(left)?),
                    Box::new(self.having(right)?),
                )),
                op => match cmp(op) {
                    Some(op) => Ok(HavingExpr::Compare {
                        left: self.operand(left)?,
                        op,
                        right: self.operand(right)?,
                    }),
                    None => Err(format!("HAVING with operator {op}")),
                },
            },
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => Ok(HavingExpr::Not(Box::new(self.having(expr)?))),
            Expr::IsNull(x) => Ok(HavingExpr::IsNull {
                operand: self.operand(x)?,
                negated: false,
            }),
            Expr::IsNotNull(x) => Ok(HavingExpr::IsNull {
                operand: self.operand(x)?,
                negated: true,
            }),
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let both = HavingExpr::And(
                    Box::new(HavingExpr::Compare {
                        left: self.operand(expr)?,
                        op: CompareOp::GtEq,
                        right: self.operand(low)?,
                    }),
                    Box::new(HavingExpr::Compare {
                        left: self.operand(expr)?,
                        op: CompareOp::LtEq,
                        right: self.operand(high)?,
                    }),
                );
                Ok(if *negated {
                    HavingExpr::Not(Box::new(both))
                } else {
                    both
                })
            }
            other => Err(format!(
                "HAVING condition {other} (only comparisons, IS [NOT] NULL, BETWEEN, AND, OR, NOT)"
            )),
        }
    }

    fn operand(&mut self, e: &Expr) -> Result<Operand, String> {
        match strip(e) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => return Ok(Operand::Literal(Literal::Number(n.clone()))),
                Value::SingleQuotedString(s)
                | Value::EscapedStringLiteral(s)
                | Value::NationalStringLiteral(s) => {
                    return Ok(Operand::Literal(Literal::String(s.clone())))
                }
                Value::DollarQuotedString(s) => {
                    return Ok(Operand::Literal(Literal::String(s.value.clone())))
                }
                Value::Boolean(b) => return Ok(Operand::Literal(Literal::Bool(*b))),
                Value::Null => return Ok(Operand::Literal(Literal::Null)),
                Value::Placeholder(p) => {
                    if let Some(i) = crate::route::keys::placeholder(p) {
                        return Ok(Operand::Param(i));
                    }
                }
                _ => {}
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => {
                if let Expr::Value(v) = strip(expr) {
                    if let Value::Number(n, _) = &v.value {
                        return Ok(Operand::Literal(Literal::Number(format!("-{n}"))));
                    }
                }
            }
            _ => {}
        }
        // Anything else is computed by the shards (aggregate-free) or
        // combined (an aggregate).
        self.agg_value(e, "HAVING").map(Operand::Value)
    }
}

/// A 0-based position from an ORDER BY / GROUP BY number.
pub(super) fn position(e: &Expr) -> Option<usize> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok()?.checked_sub(1),
            _ => None,
        },
        _ => None,
    }
}

/// The name PostgreSQL gives an unaliased output column, where it matters
/// for ORDER BY (column references and function calls).
pub(super) fn implicit_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(norm(id)),
        Expr::CompoundIdentifier(parts) => parts.last().map(norm),
        Expr::Function(f) => Some(last_name(&f.name)),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => implicit_name(expr),
        _ => None,
    }
}

fn is_aggregate(f: &Function) -> bool {
    AGGREGATES.contains(&last_name(&f.name).as_str())
        || f.filter.is_some()
        || !f.within_group.is_empty()
        || matches!(&f.args, FunctionArguments::List(l)
            if l.duplicate_treatment.is_some()
                || l.clauses.iter().any(|c| matches!(c, FunctionArgumentClause::OrderBy(_))))
}

/// The supported aggregate `e` is, `None` if it is no aggregate call, or the
/// unsupported construct.
/// `count(…)::T` (or `CAST(count(…) AS T)`) with `T` one of
/// [`CountCast`]'s types: the count and the type.
fn count_cast(e: &Expr, is_key: IsKey<'_>) -> Result<Option<(Expr, CountCast)>, String> {
    use sqlparser::ast::{DataType, ExactNumberInfo};
    let Expr::Cast {
        expr,
        data_type,
        format: None,
        kind,
        ..
    } = strip(e)
    else {
        return Ok(None);
    };
    if matches!(
        kind,
        sqlparser::ast::CastKind::TryCast | sqlparser::ast::CastKind::SafeCast
    ) {
        return Ok(None);
    }
    if !matches!(agg_call(expr, is_key)?, Some(Agg::Simple(Partial::Count))) {
        return Ok(None);
    }
    let to = match data_type {
        DataType::SmallInt(None) | DataType::Int2(None) => CountCast::Int2,
        DataType::Int(None) | DataType::Integer(None) | DataType::Int4(None) => CountCast::Int4,
        DataType::BigInt(None) | DataType::Int8(None) => CountCast::Int8,
        DataType::Numeric(ExactNumberInfo::None) | DataType::Decimal(ExactNumberInfo::None) => {
            CountCast::Numeric
        }
        DataType::DoublePrecision | DataType::Float8 => CountCast::Float8,
        DataType::Text => CountCast::Text,
        _ => return Ok(None),
    };
    Ok(Some((strip(expr).clone(), to)))
}

/// `coalesce(sum(x), 0)` or `coalesce(count(x), 0)` (Django's
/// `Coalesce(Sum(…), 0)`): the partial it adds up as. Only an integer `0`:
/// a shard whose sum is NULL answers that literal, which adds nothing to
/// the others' sums and keeps their scale (`0.0` would add a decimal
/// place to a sum that PostgreSQL prints without one).
/// The 0 may be a parameter (SQLAlchemy sends `coalesce(sum(x),
/// $1::INTEGER)`): its index is returned, and the executor refuses any
/// value but 0 ([`MergePlan::zero_params`]).
fn zero_coalesced(e: &Expr, is_key: IsKey<'_>) -> Result<Option<(Partial, Option<usize>)>, String> {
    let Expr::Function(f) = strip(e) else {
        return Ok(None);
    };
    if last_name(&f.name) != "coalesce" || f.over.is_some() || f.filter.is_some() {
        return Ok(None);
    }
    let FunctionArguments::List(list) = &f.args else {
        return Ok(None);
    };
    let [FunctionArg::Unnamed(FunctionArgExpr::Expr(agg)), FunctionArg::Unnamed(FunctionArgExpr::Expr(zero))] =
        list.args.as_slice()
    else {
        return Ok(None);
    };
    let placeholder = |e: &Expr| match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => crate::route::keys::placeholder(p),
            _ => None,
        },
        _ => None,
    };
    let param = match strip(zero) {
        Expr::Cast { expr, .. } => placeholder(expr),
        other => placeholder(other),
    };
    let is_zero = param.is_some()
        || matches!(strip(zero), Expr::Value(v) if matches!(&v.value, Value::Number(n, _) if n == "0"));
    if !is_zero || !list.clauses.is_empty() || list.duplicate_treatment.is_some() {
        return Ok(None);
    }
    // Not over DISTINCT: `count(DISTINCT y)` beside it makes the shards
    // group finer, where partials of DISTINCT no longer add up (the plan
    // checks bare ones only).
    let distinct = matches!(strip(agg), Expr::Function(g)
        if matches!(&g.args, FunctionArguments::List(l) if l.duplicate_treatment.is_some()));
    if distinct {
        return Ok(None);
    }
    Ok(match agg_call(agg, is_key)? {
        Some(Agg::Simple(p @ (Partial::Sum | Partial::Count))) => Some((p, param)),
        _ => None,
    })
}

/// The text of a plain ASCII string literal (`','`, `', '::text`) without
/// backslashes (whose meaning depends on `standard_conforming_strings`
/// and, for bytea, on the input format).
fn string_literal(e: &Expr) -> Option<String> {
    let e = match strip(e) {
        Expr::Cast {
            expr,
            data_type: DataType::Text | DataType::Varchar(None) | DataType::Bytea,
            ..
        } => expr.as_ref(),
        other => other,
    };
    match strip(e) {
        Expr::Value(v) => match &v.value {
            // ASCII: the same bytes in every client encoding.
            Value::SingleQuotedString(s) if !s.contains('\\') && s.is_ascii() => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn agg_call(e: &Expr, is_key: IsKey<'_>) -> Result<Option<Agg>, String> {
    let Expr::Function(f) = strip(e) else {
        return Ok(None);
    };
    if !is_aggregate(f) || f.over.is_some() {
        return Ok(None);
    }
    let name = last_name(&f.name);
    let partial = match name.as_str() {
        "count" => Some(Partial::Count),
        "sum" => Some(Partial::Sum),
        "min" => Some(Partial::Min),
        "max" => Some(Partial::Max),
        "bool_and" | "every" => Some(Partial::BoolAnd),
        "bool_or" => Some(Partial::BoolOr),
        "array_agg" => Some(Partial::ArrayAgg),
        "jsonb_agg" => Some(Partial::JsonbAgg),
        "string_agg" => Some(Partial::StringAgg),
        "avg" => None,
        _ => return Err(format!("aggregate function {name}()")),
    };
    if !f.within_group.is_empty() {
        return Err(format!("aggregate function {name}() WITHIN GROUP"));
    }
    let FunctionArguments::List(list) = &f.args else {
        return Err(format!("aggregate function {name}()"));
    };
    if !list.clauses.is_empty() {
        return Err(format!(
            "aggregate function {name}() with ORDER BY in its arguments"
        ));
    }
    if f.null_treatment.is_some() || !matches!(f.parameters, FunctionArguments::None) {
        return Err(format!("aggregate function {name}()"));
    }
    let concat = matches!(
        partial,
        Some(Partial::ArrayAgg | Partial::JsonbAgg | Partial::StringAgg)
    );
    if concat && list.duplicate_treatment == Some(DuplicateTreatment::Distinct) {
        // PostgreSQL sorts to remove duplicates: its answer is in order.
        return Err(format!("aggregate function {name}(DISTINCT …)"));
    }
    let mut separator = None;
    let arg_ok = match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(_))] => partial != Some(Partial::StringAgg),
        [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] => name == "count",
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(_)), FunctionArg::Unnamed(FunctionArgExpr::Expr(sep))]
            if partial == Some(Partial::StringAgg) =>
        {
            separator = Some(string_literal(sep).ok_or_else(|| {
                "string_agg() whose separator is not a string literal (the node joins the shards' strings with it)".to_owned()
            })?);
            true
        }
        _ => false,
    };
    if !arg_ok {
        return Err(format!("aggregate function {name}() with these arguments"));
    }
    if let Some(sep) = separator {
        return Ok(Some(Agg::Joined(sep)));
    }
    let idempotent = matches!(
        partial,
        Some(Partial::Min | Partial::Max | Partial::BoolAnd | Partial::BoolOr)
    );
    // Distinct values of the shard key are disjoint across shards.
    let of_key = matches!(list.args.as_slice(),
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(a))] if is_key(a));
    if list.duplicate_treatment == Some(DuplicateTreatment::Distinct) && !idempotent && !of_key {
        if let (Some(Partial::Count), [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))]) =
            (partial, list.args.as_slice())
        {
            if first_aggregate(x).is_none()
                && f.filter
                    .as_deref()
                    .is_none_or(|c| first_aggregate(c).is_none())
            {
                return Ok(Some(Agg::CountDistinct(Box::new(distinct_value(
                    x,
                    f.filter.as_deref(),
                )))));
            }
        }
        return Err(format!("aggregate function {name}(DISTINCT …)"));
    }
    Ok(Some(match partial {
        Some(p) => Agg::Simple(p),
        None => Agg::Avg {
            sum: Box::new(renamed(f, "sum")),
            count: Box::new(renamed(f, "count")),
        },
    }))
}

/// The value whose distinct non-NULL values `count(DISTINCT x) [FILTER
/// (WHERE c)]` counts: `x`, or `CASE WHEN c THEN x END` (NULL, so not
/// counted, where `c` is not true).
fn distinct_value(x: &Expr, filter: Option<&Expr>) -> Expr {
    let x = strip(x).clone();
    match filter {
        None => x,
        Some(c) => Expr::Case {
            case_token: sqlparser::ast::helpers::attached_token::AttachedToken::empty(),
            end_token: sqlparser::ast::helpers::attached_token::AttachedToken::empty(),
            operand: None,
            conditions: vec![sqlparser::ast::CaseWhen {
                condition: Expr::Nested(Box::new(c.clone())),
                result: x,
            }],
            else_result: None,
        },
    }
}

/// `f` under another name (same arguments, FILTER, schema).
fn renamed(f: &Function, name: &str) -> Expr {
    let mut g = f.clone();
    if let Some(last) = g.name.0.last_mut() {
        *last = ObjectNamePart::Identifier(Ident::new(name));
    }
    Expr::Function(g)
}

fn first_aggregate(e: &Expr) -> Option<String> {
    let mut f = Finder::default();
    let _ = e.visit(&mut f);
    f.aggregate
}

/// Whether window `w` (of a SELECT whose named windows are `named`) is
/// partitioned by the shard key: its PARTITION BY, or that of the window it
/// copies, names it.
fn window_by_key(w: &WindowType, named: &[NamedWindowDefinition], is_key: IsKey<'_>) -> bool {
    let mut w = w.clone();
    // Each step follows a name to an earlier definition: bounded.
    for _ in 0..=named.len() {
        let next = match &w {
            WindowType::WindowSpec(spec) if !spec.partition_by.is_empty() => {
                return spec.partition_by.iter().any(is_key);
            }
            WindowType::WindowSpec(spec) => match &spec.window_name {
                Some(name) => name.clone(),
                None => return false,
            },
            WindowType::NamedWindow(name) => name.clone(),
        };
        let Some(def) = named.iter().find(|d| norm(&d.0) == norm(&next)) else {
            return false;
        };
        w = match &def.1 {
            NamedWindowExpr::NamedWindow(n) => WindowType::NamedWindow(n.clone()),
            NamedWindowExpr::WindowSpec(spec) => WindowType::WindowSpec(spec.clone()),
        };
    }
    false
}

/// Window functions, aggregates and unknown functions outside subqueries.
#[derive(Default)]
struct Finder<'a> {
    depth: usize,
    /// With the shard-key test and the SELECT's named windows: windows
    /// partitioned by the key are allowed (noted in `keyed_window`).
    keyed: Option<(IsKey<'a>, &'a [NamedWindowDefinition])>,
    /// A window function partitioned by the shard key.
    keyed_window: Option<String>,
    window: Option<String>,
    aggregate: Option<String>,
    /// A function that is neither a known aggregate nor known to be pure.
    opaque: Option<String>,
}

impl Visitor for Finder<'_> {
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
        if let Expr::Function(f) = e {
            let name = last_name(&f.name);
            if let Some(over) = &f.over {
                match self.keyed {
                    Some((is_key, named)) if window_by_key(over, named, is_key) => {
                        self.keyed_window.get_or_insert(name);
                    }
                    Some(_) => {
                        self.window.get_or_insert_with(|| {
                            format!("window function {name}() not partitioned by the shard key")
                        });
                    }
                    None => {
                        self.window
                            .get_or_insert_with(|| format!("window function {name}()"));
                    }
                }
            } else if is_aggregate(f) {
                self.aggregate.get_or_insert(name);
            } else if !PURE_FUNCTIONS.contains(&name.as_str()) {
                self.opaque.get_or_insert(name);
            }
        }
        ControlFlow::Continue(())
    }
}
