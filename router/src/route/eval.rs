//! Bind-time evaluation: parameter values + a statement plan → a target.
//!
//! Everything here works on a plan made against the same snapshot (the
//! caller re-plans on an epoch change), so table definitions copied into the
//! plan agree with the snapshot's ranges.

use std::collections::{BTreeMap, BTreeSet};

use super::analyze::{Body, InsertPlan, Shape, StmtPlan};
use super::keys::{KeyExpr, Src, TypedSrc};
use super::params::{decode_array, decode_key};
use super::{target_of, MergeNeed, Param, RouteError, SplitPart, StatementKind, Target};
use crate::catalog::{KeyValue, RangeStatus, RoutingSnapshot, ShardId, ShardedTable};

pub(super) use super::keys::colocated;

/// One statement's route, before combining the statements of a string.
#[derive(Debug)]
pub(super) struct StmtRoute {
    pub kind: StatementKind,
    pub target: Target,
    pub is_write: bool,
    pub merge: MergeNeed,
    pub touches_frozen: bool,
    /// See [`super::Route::may_write`].
    pub may_write: bool,
    /// A COPY the executor splits over every shard.
    pub copy: Option<std::sync::Arc<super::copy::CopyPlan>>,
    /// An `INSERT` into this sharded table.
    pub insert_into: Option<String>,
    /// See [`super::Route::key_move`].
    pub key_move: Option<super::KeyMove>,
    /// See [`super::Route::replicated`].
    pub replicated: bool,
}

/// What a hint forces (see the module docs of [`super`] for the rules).
#[derive(Debug, Clone)]
pub(crate) enum Forced {
    /// `/* hotrepart: shard=NAME */` or `SET hotrepart.shard`.
    Shard(ShardId),
    /// `/* hotrepart: key=VALUE */`: the index of the range holding the
    /// key in the snapshot the plan is bound against (reads go to its read
    /// owner, writes to its write owner).
    Key { range: usize },
}

/// Collects owners of keys.
struct Owners<'s> {
    snap: &'s RoutingSnapshot,
    write: bool,
    frozen: bool,
    /// An UPDATE over several shards sets the shard key: where its rows
    /// must be.
    key_move: Option<super::KeyMove>,
}

impl Owners<'_> {
    fn owner(&mut self, table: &ShardedTable, key: &KeyValue) -> Result<ShardId, RouteError> {
        let point = self
            .snap
            .point(table, key)
            .map_err(|e| RouteError::point(&table.name, e))?;
        let range = self.snap.range_for_point(point);
        Ok(if self.write {
            self.frozen |= range.status == RangeStatus::Frozen;
            range.write_owner.clone()
        } else {
            range.read_owner.clone()
        })
    }
}

/// The keys a source stands for (none for NULL).
fn keys_of(src: &TypedSrc, params: &[Param<'_>]) -> Result<Vec<KeyValue>, RouteError> {
    let param = |i: usize| {
        params.get(i).ok_or_else(|| {
            RouteError::protocol(format!(
                "statement uses parameter ${} but only {} were bound",
                i + 1,
                params.len()
            ))
        })
    };
    match &src.src {
        Src::Lit(v) => Ok(vec![v.clone()]),
        Src::Null => Ok(Vec::new()),
        Src::Param(i) => Ok(decode_key(param(*i)?, src.ty, *i)?.into_iter().collect()),
        Src::ParamArray(i) => Ok(decode_array(param(*i)?, src.ty, *i)?
            .into_iter()
            .flatten()
            .collect()),
    }
}

fn eval_keys(
    e: &KeyExpr,
    table: &ShardedTable,
    params: &[Param<'_>],
    owners: &mut Owners<'_>,
) -> Result<BTreeSet<ShardId>, RouteError> {
    match e {
        KeyExpr::Keys(srcs) => {
            let mut out = BTreeSet::new();
            for s in srcs {
                for k in keys_of(s, params)? {
                    out.insert(owners.owner(table, &k)?);
                }
            }
            Ok(out)
        }
        KeyExpr::And(a, b) => {
            let a = eval_keys(a, table, params, owners)?;
            let b = eval_keys(b, table, params, owners)?;
            Ok(a.intersection(&b).cloned().collect())
        }
        KeyExpr::Or(a, b) => {
            let mut a = eval_keys(a, table, params, owners)?;
            a.extend(eval_keys(b, table, params, owners)?);
            Ok(a)
        }
    }
}

fn all_shards(snap: &RoutingSnapshot) -> BTreeSet<ShardId> {
    snap.shards().map(|s| s.id.clone()).collect()
}

fn any_frozen(snap: &RoutingSnapshot) -> bool {
    snap.ranges()
        .iter()
        .any(|r| r.status == RangeStatus::Frozen)
}

/// Routes one statement.
pub(super) fn bind_stmt(
    stmt: &StmtPlan,
    snap: &RoutingSnapshot,
    params: &[Param<'_>],
    forced: Option<&Forced>,
) -> Result<StmtRoute, RouteError> {
    let mut owners = Owners {
        snap,
        write: stmt.is_write,
        frozen: false,
        key_move: None,
    };
    let forced = forced.filter(|_| stmt.hintable());
    let target = match (&stmt.body, forced) {
        (_, Some(f)) => {
            let shard = match f {
                Forced::Shard(id) => id.clone(),
                Forced::Key { range } => {
                    let r = snap.ranges().get(*range).ok_or_else(|| {
                        RouteError::unsupported("hotrepart key hint: the routing table changed")
                    })?;
                    if stmt.is_write {
                        owners.frozen |= r.status == RangeStatus::Frozen;
                        r.write_owner.clone()
                    } else {
                        r.read_owner.clone()
                    }
                }
            };
            forced_target(stmt, &shard, params, &mut owners)?
        }
        (Body::Any, None) => Target::Any,
        (Body::Home, None) => Target::One(snap.home_shard().clone()),
        (Body::All | Body::Copy(_), None) => {
            // A sharded COPY FROM is placed row by row by the executor,
            // which waits out a frozen range only for the rows in it
            // (`CopyPlan::range`); a reference COPY writes everywhere.
            let per_row = matches!(&stmt.body, Body::Copy(c) if c.sharded().is_some());
            owners.frozen |= stmt.is_write && !per_row && any_frozen(snap);
            Target::All
        }
        (Body::Shape(shape), None) => shape_target(stmt, shape, params, &mut owners)?,
        (Body::Insert(ins), None) => insert_target(ins, params, &mut owners)?,
    };
    if stmt.explain_analyze_write && target.is_multi_shard() {
        // Each shard would run the write and answer a plan: nothing checks
        // what it did there (the count, a key moved) or merges the answers.
        return Err(RouteError::unsupported(
            "EXPLAIN ANALYZE of a write to several shards is not supported (it would run the write)",
        ));
    }
    let merge = if target.is_multi_shard() && !stmt.is_write {
        stmt.merge.clone()
    } else {
        MergeNeed::None
    };
    let replicated = stmt.reference_write
        && matches!(
            stmt.kind,
            StatementKind::Insert | StatementKind::Update | StatementKind::Delete
        )
        && target.is_multi_shard();
    let copy = match (&stmt.body, &target) {
        (Body::Copy(c), Target::All) => Some(c.clone()),
        _ => None,
    };
    Ok(StmtRoute {
        kind: stmt.kind.clone(),
        target,
        is_write: stmt.is_write,
        merge,
        touches_frozen: owners.frozen,
        may_write: stmt.is_write || stmt.may_write,
        copy,
        insert_into: match &stmt.body {
            Body::Insert(ins) => Some(ins.table.name.clone()),
            Body::Shape(shape) => shape.insert_into.clone(),
            _ => None,
        },
        key_move: owners.key_move,
        replicated,
    })
}

/// A hint forces `shard`; refuse where obeying would misplace data or
/// write where the shard does not own the rows.
fn forced_target(
    stmt: &StmtPlan,
    shard: &ShardId,
    params: &[Param<'_>],
    owners: &mut Owners<'_>,
) -> Result<Target, RouteError> {
    if stmt.reference_write {
        return Err(RouteError::unsupported(
            "a write to a reference table cannot be limited to one shard by a hint",
        ));
    }
    let check = |table: &ShardedTable, src: &TypedSrc, owners: &mut Owners<'_>| {
        for k in keys_of(src, params)? {
            let owner = owners.owner(table, &k)?;
            if &owner != shard {
                return Err(RouteError::unsupported(format!(
                    "hint routes to shard {shard}, but key {k} of \"{}\" belongs to shard {owner}",
                    table.name
                )));
            }
        }
        Ok(())
    };
    match &stmt.body {
        Body::Insert(ins) => {
            for row in &ins.rows {
                check(&ins.table, row, owners)?;
            }
        }
        Body::Copy(c) if c.direction == super::CopyDirection::From => {
            return Err(RouteError::unsupported(format!(
                "COPY FROM of sharded table \"{}\" routes each row by its key; a shard hint cannot force it",
                c.table
            )));
        }
        Body::Shape(shape) => {
            if let Some((table, src)) = &shape.update_key {
                check(table, src, owners)?;
            }
            if shape.insert_select {
                return Err(RouteError::unsupported(
                    "INSERT … SELECT into a sharded table cannot be forced to one shard by a hint",
                ));
            }
            if stmt.writes_sharded {
                // The keys the write names must all belong to the hinted
                // shard (its write owner: a frozen range waits); without a
                // key on every table it is a keyless write.
                let mut keyed = true;
                for o in &shape.occs {
                    let Some((expr, table)) = &o.restriction else {
                        keyed = false;
                        continue;
                    };
                    if let Some(owner) = eval_keys(expr, table, params, owners)?
                        .into_iter()
                        .find(|s| s != shard)
                    {
                        return Err(RouteError::unsupported(format!(
                            "hint routes this write to shard {shard}, but the rows of \"{}\" it names by their shard key \"{}\" belong to shard {owner}",
                            o.table.name, o.table.key_column
                        )));
                    }
                }
                if !keyed {
                    keyless_hinted_write(shard, owners)?;
                }
            }
        }
        _ => {}
    }
    Ok(Target::One(shard.clone()))
}

/// A hinted write to a sharded table without a shard key on every table
/// touches whatever rows the shard holds. That is sound only while the
/// shard holds rows of the ranges it owns and nothing else: no range is
/// being moved (a reshard job's copy on its target, or the source's rows
/// after the flip until cleanup) and every range is read and written on one
/// shard. A frozen range waits, as every write does, and the rule is
/// checked again on the next routing table.
fn keyless_hinted_write(shard: &ShardId, owners: &mut Owners<'_>) -> Result<(), RouteError> {
    let ranges = owners.snap.ranges();
    if ranges.iter().any(|r| r.status == RangeStatus::Frozen) {
        owners.frozen = true;
        return Ok(());
    }
    if let Some(r) = ranges
        .iter()
        .find(|r| r.status == RangeStatus::Moving || r.read_owner != r.write_owner)
    {
        return Err(RouteError {
            sqlstate: "55000",
            message: format!(
                "a write forced to shard {shard} by a hint, without the shard key of every table it touches, cannot run while key range {} is being moved between shards (it could change rows that shard {shard} holds but does not own); name the shard key in the statement, or retry when the reshard job is done",
                r.span()
            ),
        });
    }
    Ok(())
}

fn shape_target(
    stmt: &StmtPlan,
    shape: &Shape,
    params: &[Param<'_>],
    owners: &mut Owners<'_>,
) -> Result<Target, RouteError> {
    let snap = owners.snap;
    let home = snap.home_shard();
    let mut all_restricted = true;
    let mut shards = BTreeSet::new();
    for o in &shape.occs {
        match &o.restriction {
            Some((expr, table)) => shards.extend(eval_keys(expr, table, params, owners)?),
            None => all_restricted = false,
        }
    }
    let single = all_restricted && shards.len() <= 1;
    let target = if single {
        target_of(snap, shards)
    } else {
        if let (Some(why), true) = (&shape.set_op, shape.components > 1 || !shape.anchored) {
            return Err(RouteError::unsupported(why.clone()));
        }
        if let Some(why) = &shape.per_shard_subquery {
            return Err(RouteError::unsupported(why.clone()));
        }
        if shape.components > 1 {
            let names: Vec<&str> = shape.occs.iter().map(|o| o.table.name.as_str()).collect();
            let why = match &shape.opaque_derived {
                Some(d) => format!(
                    ": the {d} (run that query first and pass its keys, or name the shard key so that one shard answers)"
                ),
                None => String::new(),
            };
            return Err(RouteError::unsupported(format!(
                "a statement over several shards that combines sharded tables not joined on their shard keys ({}){why}",
                names.join(", ")
            )));
        }
        if let (Some(cte), false) = (&shape.cte_named_twice, shape.anchored) {
            return Err(RouteError::unsupported(format!(
                "a statement over several shards that names CTE \"{cte}\" (plain rows of a sharded table) more than once: each shard would see only its own part of it in each place (a self-join or a subquery over it); name it once, or name the shard key so that one shard answers"
            )));
        }
        if !shape.anchored {
            return Err(RouteError::unsupported(
                "a statement over several shards whose sharded table is only read inside a subquery, derived table, CTE or the nullable side of an outer join, or with a UNION ALL branch that reads no sharded table in its own FROM (every shard would return its rows; under UNION only constants may: VALUES or a SELECT of literals)",
            ));
        }
        if all_restricted {
            target_of(snap, shards)
        } else {
            target_of(snap, all_shards(snap))
        }
    };
    if let Some(h) = &shape.home_table {
        if target != Target::One(home.clone()) {
            return Err(RouteError::unsupported(format!(
                "the statement mixes undeclared table \"{h}\" (home shard {home}) with sharded tables on {target}"
            )));
        }
    }
    if stmt.is_write {
        if let Target::All = target {
            owners.frozen |= any_frozen(snap);
        }
        if let Target::Shards(v) = &target {
            // Conservative: a multi-shard write may touch any range of these.
            owners.frozen |= snap
                .ranges()
                .iter()
                .any(|r| r.status == RangeStatus::Frozen && v.contains(&r.write_owner));
        }
    }
    if let Some((table, src)) = &shape.update_key {
        let keys = keys_of(src, params)?;
        let [key] = keys.as_slice() else {
            return Err(RouteError::not_null(format!(
                "shard key column \"{}\" of \"{}\" must not be set to NULL",
                table.key_column, table.name
            )));
        };
        let new_owner = owners.owner(table, key)?;
        match &target {
            Target::One(s) if *s == new_owner => {}
            // The rows it updates may all be on the new owner already
            // (Django and Hibernate set every column, the key to its own
            // value): the executor checks that no other shard updated one.
            Target::All | Target::Shards(_) => {
                owners.key_move = Some(super::KeyMove {
                    shard: new_owner,
                    table: table.name.clone(),
                    column: table.key_column.clone(),
                    key: key.to_string(),
                })
            }
            _ => {
                return Err(RouteError::unsupported(format!(
                    "UPDATE of shard key column \"{}\" of \"{}\" to {key} would move rows to shard {new_owner} (moving rows between shards is not supported)",
                    table.key_column, table.name
                )))
            }
        }
    }
    if shape.insert_select && target.is_multi_shard() {
        if let MergeNeed::Refuse(what) = &stmt.merge {
            return Err(RouteError::unsupported(format!(
                "INSERT … SELECT with {what} over several shards"
            )));
        }
    }
    Ok(target)
}

fn insert_target(
    ins: &InsertPlan,
    params: &[Param<'_>],
    owners: &mut Owners<'_>,
) -> Result<Target, RouteError> {
    let snap = owners.snap;
    // Rows grouped by owner, in row order within each shard.
    let mut by_shard: BTreeMap<ShardId, Vec<usize>> = BTreeMap::new();
    for (i, row) in ins.rows.iter().enumerate() {
        let owner = match &row.src {
            // The common case of a literal key: no copy of the key.
            Src::Lit(key) => owners.owner(&ins.table, key)?,
            _ => {
                let keys = keys_of(row, params)?;
                let [key] = keys.as_slice() else {
                    return Err(RouteError::not_null(format!(
                        "shard key column \"{}\" of \"{}\" must not be NULL",
                        ins.table.key_column, ins.table.name
                    )));
                };
                owners.owner(&ins.table, key)?
            }
        };
        by_shard.entry(owner).or_default().push(i);
    }
    if let Some(h) = &ins.home_table {
        let home = snap.home_shard();
        if by_shard.keys().any(|s| s != home) {
            return Err(RouteError::unsupported(format!(
                "INSERT reads undeclared table \"{h}\" (home shard {home}) but its rows belong to other shards"
            )));
        }
    }
    if by_shard.len() <= 1 {
        return Ok(target_of(snap, by_shard.into_keys().collect()));
    }
    let Some(split) = &ins.split else {
        return Err(RouteError::unsupported(
            "a multi-row INSERT whose rows belong to different shards could not be split (send one row per statement)",
        ));
    };
    debug_assert_eq!(split.len(), ins.rows.len());
    let numbered = ins.has_placeholders;
    let parts = by_shard
        .into_iter()
        .map(|(shard, rows)| {
            let (sql, params) = if numbered {
                let (sql, params) = split.render_numbered(&rows);
                (sql, Some(params))
            } else {
                (split.render(&rows), None)
            };
            SplitPart {
                shard,
                sql,
                rows,
                params,
            }
        })
        .collect();
    Ok(Target::Split(parts))
}
