//! Merge planning of a UNION read from several shards.
//!
//! Each shard runs the whole UNION over its rows. With `UNION ALL` the
//! client's rows are the shards' rows together (each branch reads its
//! sharded tables in its own FROM: every row comes from one shard — the
//! routing's `union_shape` checks that); with `UNION` the node also removes
//! the rows that several shards returned (a row of one branch on one shard
//! may equal a row of another branch on another shard). The outer ORDER BY
//! names result columns (PostgreSQL allows nothing else there): the shards
//! sort by position and the node merges; LIMIT `offset + limit` goes down,
//! as for a plain SELECT DISTINCT.
//!
//! Refused: INTERSECT and EXCEPT (rows of different shards must meet),
//! `UNION` mixed with `UNION ALL`, branches with aggregates, GROUP BY,
//! window functions, LIMIT or ORDER BY of their own (their answer over the
//! whole table is not the shards' answers together).

use sqlparser::ast::{
    Distinct, Expr, OrderBy, OrderByExpr, OrderByKind, Query, SelectItem, SetExpr, SetOperator,
    SetQuantifier, Value,
};

use super::super::names::norm;
use super::super::MergeNeed;
use super::expr::strip;
use super::merge_need::select_merge_need;
use super::merge_plan::{implicit_name, limit_offset, number, order_keys, position, pushed_limit};
use crate::route::merge::{Combined, MergePlan, SortKey};

/// The plan of `q`, whose body is a set operation.
pub(super) fn plan_union(q: &Query) -> Result<Option<MergePlan>, String> {
    let mut u = Branches::default();
    u.collect(&q.body)?;
    let distinct = match (u.all, u.distinct) {
        (true, true) => return Err("UNION mixed with UNION ALL".to_owned()),
        (_, d) => d,
    };
    if !q.locks.is_empty() {
        return Err("FOR UPDATE/FOR SHARE".to_owned());
    }
    if q.settings.is_some()
        || q.format_clause.is_some()
        || q.for_clause.is_some()
        || !q.pipe_operators.is_empty()
    {
        return Err("a non-PostgreSQL query clause".to_owned());
    }
    let (limit, offset) = limit_offset(q)?;
    let first = u.first.as_deref().unwrap_or(&[]);
    let mut order_by = Vec::new();
    let mut shard_keys = Vec::new();
    for (k, desc) in order_keys(q)? {
        let col = result_column(&k.expr, first)?;
        order_by.push(SortKey {
            value: Combined::Col(col),
            desc,
            nulls_first: k.options.nulls_first.unwrap_or(desc),
        });
        shard_keys.push(OrderByExpr {
            expr: number(col + 1),
            options: k.options.clone(),
            with_fill: None,
        });
    }
    if !distinct && order_by.is_empty() && limit.is_none() && offset.is_none() {
        return Ok(None);
    }
    let mut sq = q.clone();
    sq.limit_clause = None;
    sq.fetch = None;
    sq.order_by = (!shard_keys.is_empty()).then_some(OrderBy {
        kind: OrderByKind::Expressions(shard_keys),
        interpolate: None,
    });
    let mut shard_sql = sq.to_string();
    if let Some(l) = pushed_limit(limit, offset) {
        shard_sql.push_str(" LIMIT ");
        shard_sql.push_str(&l);
    }
    Ok(Some(MergePlan {
        shard_sql,
        hidden: 0,
        aggregate: None,
        distinct,
        distinct_on: Vec::new(),
        zero_params: Vec::new(),
        shards_sorted: !order_by.is_empty(),
        order_by,
        limit,
        offset,
    }))
}

/// What the branches of a UNION are.
#[derive(Default)]
struct Branches {
    /// Some operator is UNION ALL.
    all: bool,
    /// Some operator is UNION (DISTINCT).
    distinct: bool,
    /// The select list of the first branch (it names the result columns).
    first: Option<Vec<SelectItem>>,
}

impl Branches {
    fn collect(&mut self, body: &SetExpr) -> Result<(), String> {
        match body {
            SetExpr::SetOperation {
                op,
                set_quantifier,
                left,
                right,
            } => {
                if *op != SetOperator::Union {
                    return Err(format!("{op}"));
                }
                match set_quantifier {
                    SetQuantifier::All => self.all = true,
                    SetQuantifier::Distinct | SetQuantifier::None => self.distinct = true,
                    q => return Err(format!("UNION {q}")),
                }
                self.collect(left)?;
                self.collect(right)
            }
            SetExpr::Query(inner) => {
                if inner.with.is_some()
                    || inner.order_by.is_some()
                    || inner.limit_clause.is_some()
                    || inner.fetch.is_some()
                    || !inner.locks.is_empty()
                {
                    return Err(
                        "a UNION branch with its own WITH, ORDER BY, LIMIT or FOR UPDATE"
                            .to_owned(),
                    );
                }
                self.collect(&inner.body)
            }
            SetExpr::Select(s) => {
                // Its shards' answers are one row each, to be combined.
                if super::scope::lone_exists(s).is_some() {
                    return Err("a UNION branch that is SELECT EXISTS (…)".to_owned());
                }
                // One row per shard that has a match: the statement's
                // DISTINCT merge (`exists_filter_plan`) is not a branch's.
                if super::scope::exists_filter(s).is_some() {
                    return Err("a UNION branch that is SELECT … WHERE EXISTS (…)".to_owned());
                }
                if self.first.is_none() {
                    self.first = Some(s.projection.clone());
                }
                // DISTINCT inside a branch changes nothing when the UNION
                // removes duplicates itself; checked once every operator
                // is known (`plan_union` refuses a mix).
                let mut plain = s.as_ref().clone();
                if plain.distinct == Some(Distinct::Distinct) && !self.all {
                    plain.distinct = None;
                }
                match select_merge_need(&plain) {
                    MergeNeed::Refuse(what) => Err(format!("{what} in a UNION branch")),
                    _ => Ok(()),
                }
            }
            SetExpr::Values(_) => {
                if self.first.is_none() {
                    // VALUES names its columns column1, column2, …
                    self.first = Some(Vec::new());
                }
                Ok(())
            }
            other => Err(format!("a UNION branch {other}")),
        }
    }
}

/// The 0-based result column an ORDER BY key of a UNION names: a position,
/// or a name of the first branch's select list.
fn result_column(e: &Expr, first: &[SelectItem]) -> Result<usize, String> {
    if let Expr::Value(v) = strip(e) {
        if matches!(v.value, Value::Number(..)) {
            return position(e).ok_or_else(|| format!("ORDER BY position {e}"));
        }
    }
    let Expr::Identifier(id) = strip(e) else {
        return Err(format!(
            "ORDER BY {e} over a UNION (only result column names or positions)"
        ));
    };
    let name = norm(id);
    let mut found = None;
    for (i, item) in first.iter().enumerate() {
        let item_name = match item {
            SelectItem::UnnamedExpr(x) => implicit_name(x),
            SelectItem::ExprWithAlias { alias, .. } => Some(norm(alias)),
            _ => {
                return Err(format!(
                    "ORDER BY {name} over a UNION whose first select list has *"
                ))
            }
        };
        if item_name.as_deref() == Some(name.as_str()) {
            if found.is_some() {
                return Err(format!("ORDER BY \"{name}\", which is ambiguous"));
            }
            found = Some(i);
        }
    }
    found.ok_or_else(|| format!("ORDER BY {name}, not a result column of the UNION"))
}
