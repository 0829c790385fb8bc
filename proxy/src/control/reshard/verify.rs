//! Verification of a moved range that keeps the write freeze short: a full
//! row-by-row comparison BEFORE the freeze, and inside the freeze only the
//! rows whose shard key a change touched since then.
//!
//! The argument. Let A be the moment a [`Touched`] set starts recording the
//! shard keys of every change the catch-up applies to the target, and let
//! [`compare`] read the source (as of its snapshot ts) and the target (as of
//! tt), both after A, and record in `mismatched` the shard key of every row
//! that differs (missing on one side, or different). Inside the freeze, after
//! the last change was applied, [`verify_keys`] compares all rows whose shard
//! key is in `touched ∪ mismatched`. Every other row is equal at the end:
//! - on the target, only the catch-up writes the range before the flip, so a
//!   row not touched after A is as it was at tt;
//! - on the source, a change committed after ts has a commit position above
//!   everything the catch-up had applied before A (ts is after A), so it is
//!   applied after A and its key is in `touched`; a row whose key is not
//!   there is as it was at ts;
//! - a row not in `mismatched` was equal at ts / tt.
//!
//! The same argument repeats: starting a new recording at A', rechecking
//! `touched ∪ mismatched` after A' and keeping the keys that still differ
//! leaves, for the next step, only the keys touched after A' plus those.
//! The cut-over does such rounds before the freeze until the set is small,
//! so the freeze rechecks only what was written during the last round and
//! the freeze itself.
//!
//! So the whole range is equal on both sides, checked row by row — not
//! only by count and checksum — while the freeze pays for the few keys
//! written during the cut-over. Keys are shard-key values, not primary keys:
//! the shard key is always in a replicated row (the replica identity must
//! contain it) and rows sharing one are checked together; the recheck uses
//! an index on the shard key when the table has one.
//!
//! Rows are placed in the range by [`MoveSpec::contains`] (the router's
//! code), never only by SQL; the SQL predicate only pre-filters. Both sides
//! are read ordered by the text of the row's unique key under `COLLATE "C"`
//! (byte order, the same as Rust's `str` order), so the comparison streams
//! with constant memory whatever the range's size.

use super::schema::TableInfo;
use super::{sql, MoveSpec, ReshardError, Side, TableMove};
use crate::sql::quote_ident;
use futures_util::TryStreamExt;
use hotrepart_router::catalog::KeyValue;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

/// Shard-key values (as PostgreSQL prints them) per table of a spec, in the
/// order of `MoveSpec::tables`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched(Vec<HashSet<String>>);

impl Touched {
    /// An empty set for the tables of `spec`.
    pub fn new(spec: &MoveSpec) -> Touched {
        Touched(vec![HashSet::new(); spec.tables.len()])
    }

    /// Records a key of table `table` (index in `MoveSpec::tables`).
    pub(crate) fn add(&mut self, table: usize, key: &str) {
        if let Some(set) = self.0.get_mut(table) {
            if !set.contains(key) {
                set.insert(key.to_owned());
            }
        }
    }

    /// Adds every key of `other`.
    pub fn extend(&mut self, other: &Touched) {
        for (i, set) in other.0.iter().enumerate() {
            for k in set {
                self.add(i, k);
            }
        }
    }

    /// Number of keys over all tables.
    pub fn len(&self) -> usize {
        self.0.iter().map(HashSet::len).sum()
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Result of [`compare`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baseline {
    /// Rows of the range read on the source / on the target.
    pub source_rows: u64,
    pub target_rows: u64,
    /// Shard keys of the rows that differed.
    pub mismatched: Touched,
}

/// Result of [`verify_keys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCheck {
    /// Keys checked.
    pub keys: u64,
    /// Rows of the range with those keys on the source / on the target.
    pub source_rows: u64,
    pub target_rows: u64,
    /// `table: key` of the keys whose rows differ (at most 10 listed).
    pub differing: Vec<String>,
    /// Number of differing keys.
    pub differing_count: u64,
    /// All differing keys.
    pub differing_keys: Touched,
}

impl KeyCheck {
    /// Whether every checked key has the same rows on both sides.
    pub fn equal(&self) -> bool {
        self.differing_count == 0
    }
}

/// One row as read for the comparison.
struct Item {
    /// Text of the unique key, the sort order.
    id: String,
    key: String,
    hash: i64,
}

/// Columns of the comparison queries: unique-key text, shard key text, row
/// hash.
fn select_list(info: &TableInfo) -> String {
    let conflict: Vec<String> = info.conflict.iter().map(|c| quote_ident(c)).collect();
    let cols: Vec<String> = info.copy_columns().map(|c| quote_ident(&c.name)).collect();
    format!(
        "(ROW({})::text) COLLATE \"C\", {}::text, hashtextextended(ROW({})::text, 0)",
        conflict.join(", "),
        quote_ident(&info.key_column),
        cols.join(", ")
    )
}

/// Reads `row` as an [`Item`] if its shard key lies in the range.
fn item(spec: &MoveSpec, t: &TableMove, row: &Row) -> Result<Option<Item>, ReshardError> {
    let id: String = row.get(0);
    let key: Option<String> = row.get(1);
    let hash: i64 = row.get(2);
    // A NULL key has no point: it is in no range.
    let Some(key) = key else { return Ok(None) };
    let value = KeyValue::parse(t.key_type, &key).map_err(|e| ReshardError::Table {
        table: t.name.clone(),
        problem: format!("shard key value {key:?}: {e}"),
    })?;
    Ok(spec.contains(t, &value)?.then_some(Item { id, key, hash }))
}

/// Compares the range of every table row by row (see the module docs);
/// runs outside the freeze, while the application writes.
pub(crate) async fn compare(
    spec: &MoveSpec,
    src: &Client,
    dst: &Client,
    infos: &[TableInfo],
) -> Result<Baseline, ReshardError> {
    let mut out = Baseline {
        mismatched: Touched::new(spec),
        ..Baseline::default()
    };
    for (ti, t) in spec.tables.iter().enumerate() {
        let info = &infos[ti];
        let q = format!(
            "SELECT {} FROM {}{} ORDER BY 1",
            select_list(info),
            info.qualified,
            spec.where_prefilter(t)
        );
        let none: [&(dyn ToSql + Sync); 0] = [];
        let (a, b) = tokio::join!(src.query_raw(&q, none), dst.query_raw(&q, none));
        let a = a.map_err(sql(Side::Source, format!("reading {} to compare", t.name)))?;
        let b = b.map_err(sql(Side::Target, format!("reading {} to compare", t.name)))?;
        futures_util::pin_mut!(a);
        futures_util::pin_mut!(b);
        let next = |side: Side| {
            move |r: Result<Option<Row>, tokio_postgres::Error>| {
                r.map_err(sql(side, format!("reading {} to compare", t.name)))
            }
        };
        let mut x = None;
        let mut y = None;
        let mut a_done = false;
        let mut b_done = false;
        loop {
            while x.is_none() && !a_done {
                match next(Side::Source)(a.try_next().await)? {
                    Some(row) => x = item(spec, t, &row)?,
                    None => a_done = true,
                }
            }
            while y.is_none() && !b_done {
                match next(Side::Target)(b.try_next().await)? {
                    Some(row) => y = item(spec, t, &row)?,
                    None => b_done = true,
                }
            }
            let order = match (&x, &y) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(p), Some(q)) => p.id.as_str().cmp(q.id.as_str()),
            };
            match order {
                Ordering::Less => {
                    let p = x.take().expect("present");
                    out.source_rows += 1;
                    out.mismatched.add(ti, &p.key);
                }
                Ordering::Greater => {
                    let q = y.take().expect("present");
                    out.target_rows += 1;
                    out.mismatched.add(ti, &q.key);
                }
                Ordering::Equal => {
                    let (p, q) = (x.take().expect("present"), y.take().expect("present"));
                    out.source_rows += 1;
                    out.target_rows += 1;
                    if p.hash != q.hash {
                        out.mismatched.add(ti, &p.key);
                        out.mismatched.add(ti, &q.key);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Compares the rows of the given shard keys on both sides (inside the
/// freeze, after the last change was applied).
pub(crate) async fn verify_keys(
    spec: &MoveSpec,
    src: &Client,
    dst: &Client,
    infos: &[TableInfo],
    keys: &Touched,
) -> Result<KeyCheck, ReshardError> {
    let mut out = KeyCheck {
        differing_keys: Touched::new(spec),
        ..KeyCheck::default()
    };
    for (ti, t) in spec.tables.iter().enumerate() {
        let Some(set) = keys.0.get(ti).filter(|s| !s.is_empty()) else {
            continue;
        };
        let info = &infos[ti];
        let key_type = info
            .columns
            .iter()
            .find(|c| c.name == info.key_column)
            .map(|c| c.type_sql.clone())
            .ok_or_else(|| ReshardError::Table {
                table: t.name.clone(),
                problem: format!("no column {:?}", info.key_column),
            })?;
        let list: Vec<&str> = set.iter().map(String::as_str).collect();
        out.keys += list.len() as u64;
        let q = format!(
            "SELECT {} FROM {} WHERE {} = ANY($1::text[]::{key_type}[])",
            select_list(info),
            info.qualified,
            quote_ident(&info.key_column),
        );
        let params: [&(dyn ToSql + Sync); 1] = [&list];
        let (a, b) = tokio::join!(src.query(&q, &params), dst.query(&q, &params));
        let a = a.map_err(sql(Side::Source, format!("rechecking {}", t.name)))?;
        let b = b.map_err(sql(Side::Target, format!("rechecking {}", t.name)))?;
        // key → sorted (unique key, hash) of its rows in the range.
        type Rows = BTreeMap<String, Vec<(String, i64)>>;
        let group = |rows: &[Row], n: &mut u64| -> Result<Rows, ReshardError> {
            let mut m = Rows::new();
            for row in rows {
                if let Some(it) = item(spec, t, row)? {
                    *n += 1;
                    m.entry(it.key).or_default().push((it.id, it.hash));
                }
            }
            for v in m.values_mut() {
                v.sort();
            }
            Ok(m)
        };
        let sa = group(&a, &mut out.source_rows)?;
        let sb = group(&b, &mut out.target_rows)?;
        for k in &list {
            if sa.get(*k) != sb.get(*k) {
                out.differing_count += 1;
                out.differing_keys.add(ti, k);
                if out.differing.len() < 10 {
                    out.differing.push(format!("{}: {k}", t.name));
                }
            }
        }
    }
    Ok(out)
}
