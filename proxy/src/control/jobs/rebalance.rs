//! Plans of `reshard add-shard --rebalance` and `reshard drain`, balanced
//! by rows, and shown before they run (`--dry-run`).
//!
//! Rows per range ([`loads`]): for a table under the built-in hash, exact —
//! one scan of the table per database on each shard, grouped by range in
//! SQL with `width_bucket(hash # i64::MIN, <the ranges' lower bounds>)`
//! (the hash with its sign bit flipped sorts like the point). For a table
//! placed by a WebAssembly function, whose point PostgreSQL cannot
//! compute, an estimate: the table's rows on a shard (`count(*)`) spread
//! over the ranges that shard reads, in proportion to their share of the
//! key space. A row counts for the range's read owner only (a copy left
//! on a former owner until its cleanup does not count). When no shard
//! holds any row, the key space itself is balanced: a range weighs its
//! length.
//!
//! The plan ([`plan_onto`], pure): the new shard's share is `total /
//! shards`; it takes rows from the shard with the most rows above its own
//! share, again and again, until it holds its share within 5 %: a whole
//! range when one fits (within the tolerance), else the upper part of a
//! larger range — split at the point ([`split_point`]) above which that
//! many rows lie (quantiles of the points in SQL, `percentile_disc`; the
//! estimate's rows assumed uniform over the key space). A drain
//! ([`plan_drain`]) gives each range of the drained shard, largest first,
//! to the shard holding the fewest rows at that moment.

use super::JobError;
use crate::sql::{quote_ident, quote_table};
use hotrepart_router::catalog::{RangeStatus, RoutingSnapshot, Span};
use serde::Serialize;
use std::collections::BTreeMap;

/// One range as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Load {
    pub span: Span,
    /// Its read and write owner (a range whose owners differ is not moved).
    pub owner: String,
    /// Active and not in a job.
    pub movable: bool,
    /// Rows in it (or its weight when the cluster holds no row).
    pub rows: u64,
    /// Of `rows`, those estimated (tables placed by WebAssembly
    /// functions), assumed uniform over the range's points.
    pub estimated: u64,
}

/// A planned move: `rows` rows from range `range` of `from` to `to`, the
/// whole range or (`whole == false`) its upper part holding that many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Take {
    pub range: Span,
    pub from: String,
    pub to: String,
    pub rows: u64,
    pub whole: bool,
}

/// A move as it will run: the range `[lo, hi)` (cut from `split_of` when
/// that is set) goes from `from` to `to`; about `rows` rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Move {
    pub lo: u64,
    pub hi: Option<u64>,
    pub from: String,
    pub to: String,
    pub rows: u64,
    /// The range it is split from (`[lo, hi)` of the current table).
    pub split_of: Option<SpanJson>,
}

/// A span for JSON (`hi: null` is 2^64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct SpanJson {
    pub lo: u64,
    pub hi: Option<u64>,
}

impl Move {
    pub fn span(&self) -> Span {
        Span {
            lo: self.lo,
            hi: self.hi,
        }
    }
}

/// What the rows of a plan are: counted (and estimated), or key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Basis {
    /// Rows counted per range (tables under the built-in hash).
    Rows,
    /// Some rows estimated (tables placed by WebAssembly functions).
    RowsAndEstimates,
    /// No shard holds a row: ranges weigh their share of the key space.
    KeySpace,
}

/// The key-space weight of a span (its length in units of 2^32 points).
fn key_space(s: Span) -> u64 {
    u64::try_from(s.len() >> 32).unwrap_or(u64::MAX)
}

/// The point order as a signed value (the hash with its sign bit
/// flipped): what PostgreSQL can sort and compare.
fn ordered(p: u64) -> i64 {
    (p ^ (1 << 63)) as i64
}

fn point(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

const ORDERED_SQL: &str = "# (-9223372036854775807::int8 - 1)";

/// Rows of every range of `snap` (see the module docs), in the order of
/// `snap.ranges()`, and what they are based on.
pub(crate) async fn loads(snap: &RoutingSnapshot) -> Result<(Vec<Load>, Basis), JobError> {
    let ranges = snap.ranges();
    let mut rows = vec![0u64; ranges.len()];
    let mut estimated = vec![0u64; ranges.len()];
    let bounds: Vec<i64> = ranges.iter().map(|r| ordered(r.lo)).collect();
    let names: Vec<String> = snap.sharded_tables().map(|t| t.name.clone()).collect();
    for shard in snap.shards() {
        let name = shard.id.as_str();
        let fail = |e: String| JobError::Other(format!("shard {name}: {e}"));
        let dbs = crate::control::pg::databases_with(&shard.dsn, &names)
            .await
            .map_err(fail)?;
        for (db, client, present) in dbs {
            for t in snap.sharded_tables().filter(|t| present.contains(&t.name)) {
                let table = quote_table(&t.name);
                let key = quote_ident(&t.key_column);
                match t.function.sql_hash(t.key_type, &key) {
                    Some(hash) => {
                        let q = format!(
                            "SELECT width_bucket(({hash}) {ORDERED_SQL}, $1::int8[])::int8, count(*) \
                             FROM {table} WHERE {key} IS NOT NULL GROUP BY 1"
                        );
                        let got = client
                            .query(q.as_str(), &[&bounds])
                            .await
                            .map_err(|e| fail(format!("counting {} in {db}: {e}", t.name)))?;
                        for row in got {
                            let (b, n): (i64, i64) = (row.get(0), row.get(1));
                            let i = usize::try_from(b - 1).unwrap_or(usize::MAX);
                            if ranges.get(i).is_some_and(|r| r.read_owner.as_str() == name) {
                                rows[i] += u64::try_from(n).unwrap_or(0);
                            }
                        }
                    }
                    None => {
                        let q = format!("SELECT count(*) FROM {table}");
                        let n: i64 = client
                            .query_one(q.as_str(), &[])
                            .await
                            .map_err(|e| fail(format!("counting {} in {db}: {e}", t.name)))?
                            .get(0);
                        let n = u128::try_from(n).unwrap_or(0);
                        let mine: Vec<usize> = (0..ranges.len())
                            .filter(|&i| ranges[i].read_owner.as_str() == name)
                            .collect();
                        let space: u128 = mine.iter().map(|&i| ranges[i].span().len()).sum();
                        for &i in &mine {
                            let part = u64::try_from(n * ranges[i].span().len() / space.max(1))
                                .unwrap_or(u64::MAX);
                            rows[i] += part;
                            estimated[i] += part;
                        }
                    }
                }
            }
        }
    }
    let any_rows = rows.iter().any(|&n| n > 0);
    let basis = if !any_rows {
        Basis::KeySpace
    } else if estimated.iter().any(|&n| n > 0) {
        Basis::RowsAndEstimates
    } else {
        Basis::Rows
    };
    let loads = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| Load {
            span: r.span(),
            owner: r.write_owner.as_str().to_string(),
            movable: r.status == RangeStatus::Active && r.read_owner == r.write_owner,
            rows: if any_rows {
                rows[i]
            } else {
                key_space(r.span())
            },
            estimated: if any_rows { estimated[i] } else { 0 },
        })
        .collect();
    Ok((loads, basis))
}

/// Rows per shard (every shard of `shards`, 0 when it holds none).
pub(crate) fn per_shard(loads: &[Load], shards: &[String]) -> BTreeMap<String, u64> {
    let mut per: BTreeMap<String, u64> = shards.iter().map(|s| (s.clone(), 0)).collect();
    for l in loads {
        *per.entry(l.owner.clone()).or_default() += l.rows;
    }
    per
}

/// Moves onto `to` until it holds `total / shards.len()` rows within 5 %
/// (see the module docs). `shards` includes `to`.
pub(crate) fn plan_onto(loads: &[Load], shards: &[String], to: &str) -> Vec<Take> {
    let mut per = per_shard(loads, shards);
    let total: u64 = per.values().sum();
    let share = total / (shards.len().max(1) as u64);
    let tol = (share / 20).max(1);
    let mut need = share.saturating_sub(per.get(to).copied().unwrap_or(0));
    let mut used = vec![false; loads.len()];
    let mut takes = Vec::new();
    while need > tol {
        // The shard with the most rows above its share.
        let Some((donor, excess)) = per
            .iter()
            .filter(|(s, _)| s.as_str() != to)
            .map(|(s, &r)| (s.clone(), r.saturating_sub(share)))
            .filter(|(_, e)| *e > 0)
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        else {
            break;
        };
        let want = need.min(excess);
        if want <= tol {
            break;
        }
        let cands: Vec<usize> = (0..loads.len())
            .filter(|&i| {
                let l = &loads[i];
                l.owner == donor && l.movable && !used[i] && l.rows > 0
            })
            .collect();
        if cands.is_empty() {
            // Nothing movable there: the donor keeps what it has.
            per.insert(donor, share);
            continue;
        }
        let largest_fitting = cands
            .iter()
            .copied()
            .filter(|&i| loads[i].rows <= want + tol)
            .max_by_key(|&i| loads[i].rows);
        let smallest_larger = cands
            .iter()
            .copied()
            .filter(|&i| loads[i].rows > want + tol && loads[i].span.len() > 1)
            .min_by_key(|&i| loads[i].rows);
        let (i, rows, whole) = match (largest_fitting, smallest_larger) {
            (Some(i), _) if loads[i].rows + tol >= want => (i, loads[i].rows, true),
            (_, Some(i)) => (i, want, false),
            (Some(i), None) => (i, loads[i].rows, true),
            (None, None) => {
                per.insert(donor, share);
                continue;
            }
        };
        used[i] = true;
        takes.push(Take {
            range: loads[i].span,
            from: donor.clone(),
            to: to.to_string(),
            rows,
            whole,
        });
        if let Some(r) = per.get_mut(&donor) {
            *r = r.saturating_sub(rows);
        }
        *per.entry(to.to_string()).or_default() += rows;
        need = need.saturating_sub(rows);
    }
    takes
}

/// Every movable range of `from`, largest first, each to the other shard
/// holding the fewest rows at that moment.
pub(crate) fn plan_drain(loads: &[Load], shards: &[String], from: &str) -> Vec<Take> {
    let mut per = per_shard(loads, shards);
    per.remove(from);
    let mut mine: Vec<&Load> = loads
        .iter()
        .filter(|l| l.owner == from && l.movable)
        .collect();
    mine.sort_by(|a, b| b.rows.cmp(&a.rows).then(a.span.lo.cmp(&b.span.lo)));
    let mut takes = Vec::new();
    for l in mine {
        let Some(to) = per
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)))
            .map(|(s, _)| s.clone())
        else {
            break;
        };
        *per.entry(to.clone()).or_default() += l.rows;
        takes.push(Take {
            range: l.span,
            from: from.to_string(),
            to,
            rows: l.rows,
            whole: true,
        });
    }
    takes
}

/// The point `p` (strictly inside `range`) above which about `take` of the
/// range's rows lie on shard `dsn`: quantiles of the points of the tables
/// under the built-in hash, plus `load.estimated` rows spread uniformly.
/// Key-space plans split by length.
pub(crate) async fn split_point(
    snap: &RoutingSnapshot,
    dsn: &str,
    load: &Load,
    take: u64,
    basis: Basis,
) -> Result<u64, JobError> {
    let range = load.span;
    let (lo, end) = (u128::from(range.lo), range.end());
    let clamp = |p: u128| -> u64 { u64::try_from(p.clamp(lo + 1, end - 1)).unwrap_or(u64::MAX) };
    if basis == Basis::KeySpace || load.rows == 0 {
        let frac = take.min(load.rows.max(1)) as f64 / load.rows.max(1) as f64;
        let above = (range.len() as f64 * frac) as u128;
        return Ok(clamp(end - above));
    }
    // (count, quantile points) of every built-in table's rows in the range.
    const STEPS: usize = 64;
    let fractions: Vec<f64> = (1..STEPS).map(|k| k as f64 / STEPS as f64).collect();
    let lo_v = ordered(range.lo);
    let hi_v: Option<i64> = range.hi.map(ordered);
    let names: Vec<String> = snap.sharded_tables().map(|t| t.name.clone()).collect();
    let dbs = crate::control::pg::databases_with(dsn, &names)
        .await
        .map_err(JobError::Other)?;
    let mut tables: Vec<(u64, Vec<u64>)> = Vec::new();
    for (db, client, present) in dbs {
        for t in snap.sharded_tables().filter(|t| present.contains(&t.name)) {
            let key = quote_ident(&t.key_column);
            let Some(hash) = t.function.sql_hash(t.key_type, &key) else {
                continue;
            };
            let q = format!(
                "SELECT count(*), percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY v) \
                 FROM (SELECT ({hash}) {ORDERED_SQL} AS v FROM {} WHERE {key} IS NOT NULL) s \
                 WHERE v >= $1 AND ($2::int8 IS NULL OR v < $2)",
                quote_table(&t.name)
            );
            let row = client
                .query_one(q.as_str(), &[&lo_v, &hi_v, &fractions])
                .await
                .map_err(|e| JobError::Other(format!("quantiles of {} in {db}: {e}", t.name)))?;
            let n: i64 = row.get(0);
            let qs: Option<Vec<i64>> = row.get(1);
            let mut qs: Vec<u64> = qs.unwrap_or_default().into_iter().map(point).collect();
            qs.sort_unstable();
            tables.push((u64::try_from(n).unwrap_or(0), qs));
        }
    }
    // Rows at or above p (a decreasing step function of p).
    let above = |p: u128| -> f64 {
        let mut n = 0.0;
        for (count, qs) in &tables {
            let at_or_above = qs.iter().filter(|&&q| u128::from(q) >= p).count();
            n += *count as f64 * at_or_above as f64 / STEPS as f64;
        }
        n + load.estimated as f64 * (end - p) as f64 / range.len() as f64
    };
    // The highest p with at least `take` rows at or above it.
    let (mut a, mut b) = (lo + 1, end - 1);
    if above(a) < take as f64 {
        return Ok(clamp(a));
    }
    while a < b {
        let mid = a + (b - a).div_ceil(2);
        if above(mid) >= take as f64 {
            a = mid;
        } else {
            b = mid - 1;
        }
    }
    Ok(clamp(a))
}

/// Turns takes into moves: a partial take is split at its
/// [`split_point`] on the donor (read-only).
pub(crate) async fn resolve(
    snap: &RoutingSnapshot,
    loads: &[Load],
    takes: &[Take],
    basis: Basis,
) -> Result<Vec<Move>, JobError> {
    let mut out = Vec::new();
    for t in takes {
        if t.whole {
            out.push(Move {
                lo: t.range.lo,
                hi: t.range.hi,
                from: t.from.clone(),
                to: t.to.clone(),
                rows: t.rows,
                split_of: None,
            });
            continue;
        }
        let load = loads
            .iter()
            .find(|l| l.span == t.range)
            .ok_or_else(|| JobError::Other(format!("range {} is gone", t.range)))?;
        let dsn = snap
            .shards()
            .find(|s| s.id.as_str() == t.from)
            .map(|s| s.dsn.clone())
            .ok_or_else(|| JobError::Other(format!("shard {} is gone", t.from)))?;
        let at = split_point(snap, &dsn, load, t.rows, basis).await?;
        out.push(Move {
            lo: at,
            hi: t.range.hi,
            from: t.from.clone(),
            to: t.to.clone(),
            rows: t.rows,
            split_of: Some(SpanJson {
                lo: t.range.lo,
                hi: t.range.hi,
            }),
        });
    }
    Ok(out)
}

/// The names of the shards of `snap`.
pub(crate) fn shard_names(snap: &RoutingSnapshot) -> Vec<String> {
    snap.shards().map(|s| s.id.as_str().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(lo: u64, hi: Option<u64>, owner: &str, rows: u64) -> Load {
        Load {
            span: Span { lo, hi },
            owner: owner.into(),
            movable: true,
            rows,
            estimated: 0,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const T: u64 = 1 << 62;

    #[test]
    fn the_new_shard_takes_its_share_of_rows_from_the_fullest_shard() {
        // s0 holds 6000 rows, s1 and s2 1000 each: s3's share is 2000,
        // all of it from s0, as the upper part of s0's range.
        let loads = vec![
            load(0, Some(T), "s0", 6000),
            load(T, Some(2 * T), "s1", 1000),
            load(2 * T, None, "s2", 1000),
        ];
        let takes = plan_onto(&loads, &names(&["s0", "s1", "s2", "s3"]), "s3");
        assert_eq!(
            takes,
            vec![Take {
                range: Span { lo: 0, hi: Some(T) },
                from: "s0".into(),
                to: "s3".into(),
                rows: 2000,
                whole: false,
            }]
        );
        // A range that fits (within 5 %) moves whole; a shard at its share
        // gives nothing.
        let loads = vec![
            load(0, Some(T), "s0", 1950),
            load(T, Some(2 * T), "s0", 2000),
            load(2 * T, Some(3 * T), "s0", 100),
            load(3 * T, None, "s1", 1950),
        ];
        let takes = plan_onto(&loads, &names(&["s0", "s1", "s2"]), "s2");
        let moved: u64 = takes.iter().map(|t| t.rows).sum();
        assert!(takes.iter().all(|t| t.whole && t.from == "s0"), "{takes:?}");
        assert!((1900..=2100).contains(&moved), "{takes:?}");
    }

    #[test]
    fn nothing_moves_when_balanced_or_immovable() {
        let loads = vec![load(0, Some(T), "s0", 1000), load(T, None, "s1", 1000)];
        // Already holding its share.
        assert!(plan_onto(&loads, &names(&["s0", "s1"]), "s1").is_empty());
        // Moving ranges are not taken.
        let mut l = loads.clone();
        l.iter_mut().for_each(|x| x.movable = false);
        assert!(plan_onto(&l, &names(&["s0", "s1", "s2"]), "s2").is_empty());
    }

    #[test]
    fn a_drain_gives_each_range_to_the_emptiest_shard() {
        let loads = vec![
            load(0, Some(T), "s0", 500),
            load(T, Some(2 * T), "s0", 300),
            load(2 * T, Some(3 * T), "s1", 100),
            load(3 * T, None, "s2", 400),
        ];
        let takes = plan_drain(&loads, &names(&["s0", "s1", "s2"]), "s0");
        let to: Vec<(&str, u64)> = takes.iter().map(|t| (t.to.as_str(), t.rows)).collect();
        assert_eq!(to, vec![("s1", 500), ("s2", 300)]);
    }

    #[test]
    fn the_point_order_survives_the_sign_flip() {
        for (a, b) in [
            (0u64, 1u64),
            (1 << 63, (1 << 63) + 1),
            ((1 << 63) - 1, 1 << 63),
            (5, u64::MAX),
        ] {
            assert!(ordered(a) < ordered(b), "{a} {b}");
            assert_eq!(point(ordered(a)), a);
        }
    }
}
