//! The catalog model: shards, tables, key ranges, and the immutable
//! [`RoutingSnapshot`] that requests route against.
//!
//! # The point space
//!
//! A routing function maps a shard key to a *point*, a `u64`. The whole space
//! `0..=u64::MAX` is cut into [`KeyRange`]s `[lo, hi)`; `hi` is exclusive and
//! `hi: None` stands for 2^64, the end of the space (so the last range can
//! include `u64::MAX`). Each range has a read owner, a write owner and a
//! status. There is one point space per catalog: every sharded table maps its
//! keys into it, so tables with the same routing function and key type are
//! co-located (equal keys, same point, same range, same shard).
//!
//! # The point of a key under [`RoutingFunction::PgHash`]
//!
//! The point is PostgreSQL's extended hash of the key, its signed `bigint`
//! result reinterpreted as `u64` (same 64 bits): `point = hash as u64`. For a
//! `bigint` key `k` and seed `s` (passed to SQL as `s as i64`) the point,
//! computed inside PostgreSQL, is
//!
//! ```sql
//! (hashint8extended(k, s)::numeric + 18446744073709551616) % 18446744073709551616
//! ```
//!
//! (`hashint4extended`, `hashint2extended`, `hashtextextended(k COLLATE "C", s)`
//! and `uuid_hash_extended` for the other key types; see
//! [`RoutingFunction::sql_point`]). To select the rows of a range with plain,
//! index-friendly `bigint` comparisons on the hash instead, use
//! [`KeyRange::sql_predicate`]: points below 2^63 are the non-negative hashes
//! and points from 2^63 up are the negative ones, so a range is at most two
//! `bigint` intervals.
//!
//! # WebAssembly routing functions
//!
//! [`RoutingFunction::Wasm`] names a user-supplied function by the SHA-256
//! of its module ([`FunctionId`]). The router does not run WebAssembly: the
//! node compiles the modules the catalog names and attaches them to the
//! snapshot ([`RoutingSnapshot::with_functions`]) before publishing it. The
//! point of a key under such a function is therefore fallible
//! ([`PointError`]): the function may be missing on this node or fail for
//! one key (trap, fuel, memory); that fails the statement needing the point,
//! nothing else. PostgreSQL cannot compute such a point
//! ([`RoutingFunction::sql_hash`] is `None`). Tables are co-located when
//! they use the same function id and the same key type (the function gets
//! the key encoded as the column's type, so `int4` and `int8` keys may land
//! apart, unlike under the built-in hash).
//!
//! # Guarantees
//!
//! A [`RoutingSnapshot`] exists only if [`SnapshotBuilder::build`] validated
//! it: the ranges are sorted and cover the whole point space exactly once (no
//! gap, no overlap, none empty), every shard named anywhere exists, shard and
//! table names are unique and well formed, every sharded table's routing
//! function supports its key type, and there is a home shard. Lookups on a
//! snapshot therefore cannot fail for a point; they fail for a key only when
//! the table is not sharded, the key has the wrong type, or the table's
//! WebAssembly function is missing or fails. A snapshot never
//! changes; a catalog change builds a new one with a larger epoch
//! ([`RoutingSnapshot::edit`]).

mod function;
mod key;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

pub use function::{FunctionId, Functions, PointError, PointFunction};
pub use key::{KeyParseError, KeyType, KeyValue, UnknownKeyType};

use crate::hash;

/// The name of a shard, which is also its identity in the catalog.
///
/// 1 to 63 bytes of ASCII letters, digits, `_` and `-` (so it can appear in
/// logs, metrics labels, replication slot names and file names unquoted).
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(Arc<str>);

impl ShardId {
    /// Longest accepted name, PostgreSQL's identifier limit.
    pub const MAX_LEN: usize = 63;

    /// Validates `name` and makes it a shard id.
    pub fn new(name: &str) -> Result<ShardId, CatalogError> {
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > Self::MAX_LEN {
            Some("it is longer than 63 bytes")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("only ASCII letters, digits, '_' and '-' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(CatalogError::InvalidShardName {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(ShardId(Arc::from(name))),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for ShardId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A shard: one PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub struct Shard {
    /// Its name.
    pub id: ShardId,
    /// Connection string (libpq key/value or URI). Opaque to the router. It may
    /// hold a password, so `Debug` does not print it.
    pub dsn: String,
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("dsn", &"<redacted>")
            .finish()
    }
}

/// Maps a shard key to a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoutingFunction {
    /// PostgreSQL's extended hash of the key with this seed:
    /// `point = hash…extended(key, seed as i64) as u64`.
    PgHash {
        /// The seed, with the bits of PostgreSQL's `bigint` seed argument.
        seed: u64,
    },
    /// A user-supplied WebAssembly function (docs/WASM_ABI.md), by content
    /// hash. Its implementation is attached to the snapshot by the node
    /// ([`RoutingSnapshot::with_functions`]); the key reaches it encoded
    /// as the table's key type.
    Wasm {
        /// SHA-256 of the binary module.
        id: FunctionId,
    },
}

impl RoutingFunction {
    /// Whether this function can place keys of type `ty`. A WebAssembly
    /// function is accepted for every type: which types it handles is only
    /// known by calling it (an unsupported key traps, per statement).
    pub fn supports(&self, ty: KeyType) -> bool {
        match self {
            RoutingFunction::PgHash { .. } | RoutingFunction::Wasm { .. } => {
                KeyType::ALL.contains(&ty)
            }
        }
    }

    /// The point of `key` under a built-in function, `None` for a
    /// WebAssembly function. Integer keys hash alike whatever their width
    /// (as in PostgreSQL), so `Int2(5)`, `Int4(5)` and `Int8(5)` have one
    /// point.
    pub fn builtin_point(&self, key: &KeyValue) -> Option<u64> {
        match *self {
            RoutingFunction::PgHash { seed } => Some(match key {
                KeyValue::Int2(v) => hash::hashint2extended(*v, seed),
                KeyValue::Int4(v) => hash::hashint4extended(*v, seed),
                KeyValue::Int8(v) => hash::hashint8extended(*v, seed),
                KeyValue::Text(s) => hash::hashtextextended(s, seed),
                KeyValue::Uuid(u) => hash::uuid_hash_extended(u, seed),
            }),
            RoutingFunction::Wasm { .. } => None,
        }
    }

    /// The point of `key`, a key of a column of type `key_type`, with
    /// `functions` providing the implementations of WebAssembly functions.
    /// Fails only for a WebAssembly function: not attached, or the call
    /// failed (the error concerns this key only).
    pub fn point(
        &self,
        key_type: KeyType,
        key: &KeyValue,
        functions: &Functions,
    ) -> Result<u64, PointError> {
        match self {
            RoutingFunction::PgHash { .. } => Ok(self.builtin_point(key).unwrap_or_default()),
            RoutingFunction::Wasm { id } => {
                let f = functions.get(id).ok_or(PointError::Unresolved(*id))?;
                f.point(key_type, key).map_err(|reason| {
                    // A text key may be long: its start is enough to tell.
                    let mut key = key.to_string();
                    if let Some((cut, _)) = key.char_indices().nth(80) {
                        key.truncate(cut);
                        key.push('…');
                    }
                    PointError::Call {
                        function: *id,
                        key,
                        reason,
                    }
                })
            }
        }
    }

    /// SQL computing the hash of `column` (an already-quoted column name or
    /// expression of type `ty`) as PostgreSQL's signed `bigint`; its bits are
    /// the point. Text is hashed under `COLLATE "C"` so the result is the byte
    /// hash whatever the column's collation. `None` for a WebAssembly
    /// function, which PostgreSQL cannot run.
    pub fn sql_hash(&self, ty: KeyType, column: &str) -> Option<String> {
        match *self {
            RoutingFunction::PgHash { seed } => {
                let collate = if ty == KeyType::Text {
                    " COLLATE \"C\""
                } else {
                    ""
                };
                Some(format!(
                    "{}({column}{collate}, {})",
                    ty.pg_hash_function(),
                    seed as i64
                ))
            }
            RoutingFunction::Wasm { .. } => None,
        }
    }

    /// SQL computing the point of `column` as a `numeric` in `0..2^64`;
    /// `None` for a WebAssembly function.
    pub fn sql_point(&self, ty: KeyType, column: &str) -> Option<String> {
        self.sql_hash(ty, column)
            .map(|h| format!("(({h})::numeric + 18446744073709551616) % 18446744073709551616"))
    }

    /// Whether keys of type `a` under this function and keys of type `b`
    /// under `other` land on the same point when equal, i.e. tables sharded
    /// that way are co-located. The built-in hash hashes integers alike
    /// whatever their width; a WebAssembly function gets the key encoded as
    /// the column's type, so only the same type is safe.
    pub fn colocated(&self, a: KeyType, other: &RoutingFunction, b: KeyType) -> bool {
        self == other
            && match self {
                RoutingFunction::PgHash { .. } => a == b || (a.is_integer() && b.is_integer()),
                RoutingFunction::Wasm { .. } => a == b,
            }
    }

    /// The WebAssembly function's id, if this is one.
    pub fn wasm_id(&self) -> Option<FunctionId> {
        match self {
            RoutingFunction::Wasm { id } => Some(*id),
            RoutingFunction::PgHash { .. } => None,
        }
    }
}

impl fmt::Display for RoutingFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoutingFunction::PgHash { seed } => write!(f, "pg_hash(seed={seed})"),
            RoutingFunction::Wasm { id } => write!(f, "wasm({})", id.short()),
        }
    }
}

/// A table whose rows are spread over the shards by a key column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedTable {
    /// Table name, as normalised by the SQL layer (the catalog compares names
    /// exactly; it does not fold case or resolve schemas).
    pub name: String,
    /// Name of the shard-key column.
    pub key_column: String,
    /// Type of the shard-key column.
    pub key_type: KeyType,
    /// How keys map to points.
    pub function: RoutingFunction,
}

/// Where a table lives, as far as routing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablePlacement<'a> {
    /// Spread over the ranges by its key.
    Sharded(&'a ShardedTable),
    /// A full copy on every shard.
    Reference,
    /// Not declared: entirely on the home shard.
    Home(&'a ShardId),
}

/// The state of a key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeStatus {
    /// Normal operation: reads go to the read owner, writes to the write
    /// owner.
    Active,
    /// Writes must wait (a cut-over is in progress); reads still go to the read
    /// owner.
    Frozen,
    /// Being copied to another shard; writes still go to the write owner (and
    /// are caught up from there).
    Moving,
}

/// A half-open interval `[lo, hi)` of points; `hi: None` is 2^64 (the end of
/// the space). Used in errors and for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    /// First point in the span.
    pub lo: u64,
    /// One past the last point, `None` for 2^64.
    pub hi: Option<u64>,
}

impl Span {
    /// One past the last point, as a `u128` (2^64 for `hi: None`).
    pub fn end(&self) -> u128 {
        self.hi.map_or(1u128 << 64, u128::from)
    }

    /// Whether `p` is in the span.
    pub fn contains(&self, p: u64) -> bool {
        p >= self.lo && u128::from(p) < self.end()
    }

    /// Number of points in the span (up to 2^64).
    pub fn len(&self) -> u128 {
        self.end().saturating_sub(u128::from(self.lo))
    }

    /// Whether the span holds no point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The range as at most two intervals of PostgreSQL's signed hash value
    /// `h = point as i64`: each `(lo, hi)` means `lo <= h < hi`, with
    /// `hi: None` meaning no upper bound. Points below 2^63 are non-negative
    /// hashes in the same order; points from 2^63 are the negative hashes, also
    /// in order; so a range that crosses 2^63 becomes two intervals.
    pub fn signed_intervals(&self) -> Vec<(i64, Option<i64>)> {
        const MID: u128 = 1 << 63;
        let (lo, end) = (u128::from(self.lo), self.end());
        let mut out = Vec::with_capacity(2);
        if lo < MID {
            // Non-negative part: [lo, min(end, 2^63)).
            let hi = (end < MID).then_some(end as i64);
            out.push((lo as i64, hi));
        }
        if end > MID {
            // Negative part: [max(lo, 2^63), end) shifted down by 2^64; the
            // end of the space, 2^64, becomes 0.
            let start = lo.max(MID) as u64 as i64;
            out.push((start, Some(end as u64 as i64)));
        }
        out
    }

    /// A SQL boolean expression that is true exactly when the signed `bigint`
    /// hash expression `hash_sql` (e.g. from [`RoutingFunction::sql_hash`])
    /// denotes a point in this range. Uses only `bigint` comparisons, so an
    /// expression index on the hash can serve it.
    pub fn sql_predicate(&self, hash_sql: &str) -> String {
        if self.len() == 1 << 64 {
            return "true".to_owned();
        }
        let parts: Vec<String> = self
            .signed_intervals()
            .into_iter()
            .map(|(lo, hi)| {
                let mut conds = Vec::with_capacity(2);
                if lo != i64::MIN {
                    conds.push(format!("{hash_sql} >= {lo}"));
                }
                if let Some(hi) = hi {
                    conds.push(format!("{hash_sql} < {hi}"));
                }
                match conds.len() {
                    0 => "true".to_owned(),
                    1 => conds.concat(),
                    _ => format!("({})", conds.join(" AND ")),
                }
            })
            .collect();
        match parts.as_slice() {
            [one] => one.clone(),
            _ => format!("({})", parts.join(" OR ")),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hi {
            Some(hi) => write!(f, "[{}, {hi})", self.lo),
            None => write!(f, "[{}, 2^64)", self.lo),
        }
    }
}

/// A range of points and who serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// First point in the range.
    pub lo: u64,
    /// One past the last point; `None` means 2^64, i.e. the range runs to
    /// `u64::MAX` inclusive.
    pub hi: Option<u64>,
    /// Shard that serves reads.
    pub read_owner: ShardId,
    /// Shard that receives writes.
    pub write_owner: ShardId,
    /// Whether writes may proceed.
    pub status: RangeStatus,
    /// A shard that holds rows of this range without owning it — a reshard
    /// job's copy on its target before the flip, the source's leftover after
    /// it until the cleanup has deleted them. Statements that read or write a
    /// sharded table without a key on that shard must not see those rows
    /// ([`crate::route::hide_rows`]). Never the read or write owner.
    pub hidden_on: Option<ShardId>,
}

impl KeyRange {
    /// An active range served (reads and writes) by `owner`.
    pub fn active(lo: u64, hi: Option<u64>, owner: ShardId) -> KeyRange {
        KeyRange {
            lo,
            hi,
            read_owner: owner.clone(),
            write_owner: owner,
            status: RangeStatus::Active,
            hidden_on: None,
        }
    }

    /// The range's bounds.
    pub fn span(&self) -> Span {
        Span {
            lo: self.lo,
            hi: self.hi,
        }
    }

    /// Whether `p` is in the range.
    pub fn contains(&self, p: u64) -> bool {
        self.span().contains(p)
    }

    /// See [`Span::signed_intervals`].
    pub fn signed_intervals(&self) -> Vec<(i64, Option<i64>)> {
        self.span().signed_intervals()
    }

    /// See [`Span::sql_predicate`].
    pub fn sql_predicate(&self, hash_sql: &str) -> String {
        self.span().sql_predicate(hash_sql)
    }
}

/// `n` equal ranges covering the whole point space, owned round-robin by
/// `shards` (range `i` by `shards[i % shards.len()]`), all active.
///
/// Range `i` is `[i * 2^64 / n, (i + 1) * 2^64 / n)` (integer division), so
/// sizes differ by at most one point.
pub fn equal_ranges(n: usize, shards: &[ShardId]) -> Result<Vec<KeyRange>, CatalogError> {
    if n == 0 {
        return Err(CatalogError::ZeroRanges);
    }
    if shards.is_empty() {
        return Err(CatalogError::NoShards);
    }
    let space: u128 = 1 << 64;
    let count = n as u128;
    let bound = |i: u128| -> Option<u64> {
        let b = i * space / count;
        // Only the end of the last range reaches 2^64.
        u64::try_from(b).ok()
    };
    Ok((0..n)
        .zip(shards.iter().cycle())
        .map(|(i, owner)| {
            let i = i as u128;
            KeyRange::active(bound(i).unwrap_or(0), bound(i + 1), owner.clone())
        })
        .collect())
}

/// A catalog could not be built because it is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// A shard name breaks the naming rules.
    #[error("invalid shard name {name:?}: {reason}")]
    InvalidShardName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The catalog has no shard.
    #[error("the catalog has no shards")]
    NoShards,
    /// Two shards with one name.
    #[error("shard {0} is declared twice")]
    DuplicateShard(ShardId),
    /// No home shard was set.
    #[error("no home shard is set for undeclared tables")]
    NoHomeShard,
    /// Something names a shard that is not in the catalog.
    #[error("{what} refers to unknown shard {shard}")]
    UnknownShard {
        /// The missing shard.
        shard: ShardId,
        /// What referred to it (e.g. "range [0, 100)").
        what: String,
    },
    /// A table name is empty.
    #[error("table name must not be empty")]
    EmptyTableName,
    /// A table is declared twice (as sharded, reference, or both).
    #[error("table {0:?} is declared twice")]
    DuplicateTable(String),
    /// A sharded table without a key column name.
    #[error("sharded table {0:?} has an empty key column name")]
    EmptyKeyColumn(String),
    /// The routing function cannot place keys of the table's key type.
    #[error("routing function {function} does not support key type {key_type} (table {table:?})")]
    UnsupportedKeyType {
        /// The table.
        table: String,
        /// Its key type.
        key_type: KeyType,
        /// Its routing function.
        function: RoutingFunction,
    },
    /// Asked for zero equal ranges.
    #[error("the number of ranges must be at least 1")]
    ZeroRanges,
    /// The catalog has no range.
    #[error("the catalog has no key ranges")]
    NoRanges,
    /// A range with `hi <= lo`.
    #[error("key range {0} is empty")]
    EmptyRange(Span),
    /// The lowest range does not start at point 0.
    #[error("no key range covers {0}")]
    Gap(Span),
    /// Two ranges share points.
    #[error("key ranges {0} and {1} overlap")]
    Overlap(Span, Span),
    /// The epoch cannot be incremented.
    #[error("catalog epoch overflow")]
    EpochOverflow,
    /// A range's rows are hidden on the shard that owns it.
    #[error("key range {range} cannot be hidden on {shard}, which serves it")]
    HiddenOnOwner {
        /// The range.
        range: Span,
        /// Its owner.
        shard: ShardId,
    },
}

/// A lookup by key failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The table is not a sharded table of this snapshot.
    #[error("table {0:?} is not sharded")]
    NotSharded(String),
    /// The key's type does not match the table's key type.
    #[error("shard key of table {table:?} has type {expected}, got a value of type {got}")]
    KeyTypeMismatch {
        /// The table.
        table: String,
        /// Its key type.
        expected: KeyType,
        /// The value's type.
        got: KeyType,
    },
    /// The table's routing function could not place the key.
    #[error("table {table:?}: {error}")]
    Function {
        /// The table.
        table: String,
        /// Why.
        error: PointError,
    },
}

/// An immutable, validated routing table. Build one with
/// [`RoutingSnapshot::builder`]; change one with [`RoutingSnapshot::edit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingSnapshot {
    epoch: u64,
    shards: BTreeMap<ShardId, Shard>,
    home_shard: ShardId,
    sharded: BTreeMap<String, ShardedTable>,
    reference: BTreeSet<String>,
    /// Sorted by `lo`, contiguous, covering the whole point space.
    ranges: Vec<KeyRange>,
    /// Implementations of the WebAssembly functions, attached by the node.
    functions: Functions,
}

impl RoutingSnapshot {
    /// A builder for a snapshot with this epoch.
    pub fn builder(epoch: u64) -> SnapshotBuilder {
        SnapshotBuilder {
            epoch: Some(epoch),
            ..SnapshotBuilder::default()
        }
    }

    /// A builder holding this snapshot's contents and the next epoch, for a
    /// catalog change. (Building it fails with
    /// [`CatalogError::EpochOverflow`] at `u64::MAX`.)
    pub fn edit(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            epoch: self.epoch.checked_add(1),
            shards: self.shards.values().cloned().collect(),
            home_shard: Some(self.home_shard.clone()),
            sharded: self.sharded.values().cloned().collect(),
            reference: self.reference.iter().cloned().collect(),
            ranges: self.ranges.clone(),
            functions: self.functions.clone(),
        }
    }

    /// This snapshot with `functions` attached (added to, or replacing,
    /// those it has), same epoch. The node calls this after compiling the
    /// modules the catalog names, before publishing the snapshot.
    pub fn with_functions(
        mut self,
        functions: impl IntoIterator<Item = (FunctionId, Arc<dyn PointFunction>)>,
    ) -> RoutingSnapshot {
        for (id, f) in functions {
            self.functions.insert(id, f);
        }
        self
    }

    /// The attached function implementations.
    pub fn functions(&self) -> &Functions {
        &self.functions
    }

    /// The ids of the WebAssembly functions the sharded tables use.
    pub fn wasm_function_ids(&self) -> BTreeSet<FunctionId> {
        self.sharded
            .values()
            .filter_map(|t| t.function.wasm_id())
            .collect()
    }

    /// The WebAssembly functions some table uses that have no implementation
    /// attached (statements needing them fail).
    pub fn unresolved_functions(&self) -> Vec<FunctionId> {
        self.wasm_function_ids()
            .into_iter()
            .filter(|id| self.functions.get(id).is_none())
            .collect()
    }

    /// The point of `key` in sharded table `table` (a table of this
    /// snapshot, or a copy of one), with this snapshot's functions.
    pub fn point(&self, table: &ShardedTable, key: &KeyValue) -> Result<u64, PointError> {
        table.function.point(table.key_type, key, &self.functions)
    }

    /// The epoch; a later catalog state has a larger one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// All shards, ordered by name.
    pub fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.values()
    }

    /// The shard named `id`.
    pub fn shard(&self, id: &ShardId) -> Option<&Shard> {
        self.shards.get(id)
    }

    /// The shard holding undeclared tables.
    pub fn home_shard(&self) -> &ShardId {
        &self.home_shard
    }

    /// All sharded tables, ordered by name.
    pub fn sharded_tables(&self) -> impl Iterator<Item = &ShardedTable> {
        self.sharded.values()
    }

    /// The sharded table `name`.
    pub fn sharded_table(&self, name: &str) -> Option<&ShardedTable> {
        self.sharded.get(name)
    }

    /// All reference tables, ordered by name.
    pub fn reference_tables(&self) -> impl Iterator<Item = &str> {
        self.reference.iter().map(String::as_str)
    }

    /// Whether `name` is a reference table.
    pub fn is_reference_table(&self, name: &str) -> bool {
        self.reference.contains(name)
    }

    /// Where table `name` lives.
    pub fn placement(&self, name: &str) -> TablePlacement<'_> {
        if let Some(t) = self.sharded.get(name) {
            TablePlacement::Sharded(t)
        } else if self.reference.contains(name) {
            TablePlacement::Reference
        } else {
            TablePlacement::Home(&self.home_shard)
        }
    }

    /// All ranges, sorted by `lo`; they cover the point space exactly once.
    pub fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    /// The ranges whose rows shard `shard` holds but must not show
    /// (`KeyRange::hidden_on`), as spans sorted by `lo`.
    pub fn hidden_spans(&self, shard: &ShardId) -> Vec<Span> {
        self.ranges
            .iter()
            .filter(|r| r.hidden_on.as_ref() == Some(shard))
            .map(KeyRange::span)
            .collect()
    }

    /// Whether some shard holds rows it must not show (a reshard job is
    /// copying or cleaning up).
    pub fn has_hidden(&self) -> bool {
        self.ranges.iter().any(|r| r.hidden_on.is_some())
    }

    /// Index in [`ranges`](Self::ranges) of the range holding point `p`.
    pub fn range_index_for_point(&self, p: u64) -> usize {
        // The first range starts at 0, so at least one range has lo <= p.
        self.ranges.partition_point(|r| r.lo <= p).saturating_sub(1)
    }

    /// The range holding point `p` (binary search; always exists).
    pub fn range_for_point(&self, p: u64) -> &KeyRange {
        &self.ranges[self.range_index_for_point(p)]
    }

    /// The point of `key` in sharded table `table`. Integer keys are accepted
    /// for any integer key type (they hash alike); text and uuid keys must
    /// match the key type exactly.
    pub fn point_for_key(&self, table: &str, key: &KeyValue) -> Result<u64, LookupError> {
        let t = self
            .sharded
            .get(table)
            .ok_or_else(|| LookupError::NotSharded(table.to_owned()))?;
        let got = key.key_type();
        if got != t.key_type && !(got.is_integer() && t.key_type.is_integer()) {
            return Err(LookupError::KeyTypeMismatch {
                table: table.to_owned(),
                expected: t.key_type,
                got,
            });
        }
        self.point(t, key).map_err(|error| LookupError::Function {
            table: table.to_owned(),
            error,
        })
    }

    /// The range holding `key` of sharded table `table`.
    pub fn range_for_key(&self, table: &str, key: &KeyValue) -> Result<&KeyRange, LookupError> {
        Ok(self.range_for_point(self.point_for_key(table, key)?))
    }
}

/// Collects the parts of a [`RoutingSnapshot`] and validates them in
/// [`build`](Self::build). Methods only record; all checks happen in `build`,
/// which reports the first problem found.
#[derive(Debug, Clone, Default)]
pub struct SnapshotBuilder {
    /// `None` when the epoch overflowed in [`RoutingSnapshot::edit`].
    epoch: Option<u64>,
    shards: Vec<Shard>,
    home_shard: Option<ShardId>,
    sharded: Vec<ShardedTable>,
    reference: Vec<String>,
    ranges: Vec<KeyRange>,
    functions: Functions,
}

impl SnapshotBuilder {
    /// Attaches the implementation of WebAssembly function `id` (see
    /// [`RoutingSnapshot::with_functions`]).
    pub fn function(mut self, id: FunctionId, f: Arc<dyn PointFunction>) -> Self {
        self.functions.insert(id, f);
        self
    }

    /// Adds a shard.
    pub fn shard(mut self, id: ShardId, dsn: impl Into<String>) -> Self {
        self.shards.push(Shard {
            id,
            dsn: dsn.into(),
        });
        self
    }

    /// Sets the home shard for undeclared tables.
    pub fn home_shard(mut self, id: ShardId) -> Self {
        self.home_shard = Some(id);
        self
    }

    /// Declares a sharded table.
    pub fn sharded_table(mut self, table: ShardedTable) -> Self {
        self.sharded.push(table);
        self
    }

    /// Declares a reference table.
    pub fn reference_table(mut self, name: impl Into<String>) -> Self {
        self.reference.push(name.into());
        self
    }

    /// Adds one range.
    pub fn range(mut self, range: KeyRange) -> Self {
        self.ranges.push(range);
        self
    }

    /// Replaces all ranges.
    pub fn ranges(mut self, ranges: Vec<KeyRange>) -> Self {
        self.ranges = ranges;
        self
    }

    /// Replaces all ranges by `n` equal ranges owned round-robin by the shards
    /// added so far, in the order they were added (see [`equal_ranges`]).
    pub fn equal_ranges(mut self, n: usize) -> Result<Self, CatalogError> {
        let ids: Vec<ShardId> = self.shards.iter().map(|s| s.id.clone()).collect();
        self.ranges = equal_ranges(n, &ids)?;
        Ok(self)
    }

    /// Validates everything and freezes it into a snapshot.
    pub fn build(self) -> Result<RoutingSnapshot, CatalogError> {
        let epoch = self.epoch.ok_or(CatalogError::EpochOverflow)?;

        if self.shards.is_empty() {
            return Err(CatalogError::NoShards);
        }
        let mut shards = BTreeMap::new();
        for s in self.shards {
            if let Some(dup) = shards.insert(s.id.clone(), s) {
                return Err(CatalogError::DuplicateShard(dup.id));
            }
        }
        let known = |id: &ShardId, what: &dyn Fn() -> String| {
            if shards.contains_key(id) {
                Ok(())
            } else {
                Err(CatalogError::UnknownShard {
                    shard: id.clone(),
                    what: what(),
                })
            }
        };

        let home_shard = self.home_shard.ok_or(CatalogError::NoHomeShard)?;
        known(&home_shard, &|| "the home shard".to_owned())?;

        let mut names = BTreeSet::new();
        let mut declare = |name: &str| {
            if name.is_empty() {
                Err(CatalogError::EmptyTableName)
            } else if !names.insert(name.to_owned()) {
                Err(CatalogError::DuplicateTable(name.to_owned()))
            } else {
                Ok(())
            }
        };
        let mut sharded = BTreeMap::new();
        for t in self.sharded {
            declare(&t.name)?;
            if t.key_column.is_empty() {
                return Err(CatalogError::EmptyKeyColumn(t.name));
            }
            if !t.function.supports(t.key_type) {
                return Err(CatalogError::UnsupportedKeyType {
                    table: t.name,
                    key_type: t.key_type,
                    function: t.function,
                });
            }
            sharded.insert(t.name.clone(), t);
        }
        let mut reference = BTreeSet::new();
        for name in self.reference {
            declare(&name)?;
            reference.insert(name);
        }

        let mut ranges = self.ranges;
        ranges.sort_by_key(|r| (r.lo, r.span().end()));
        check_cover(&ranges)?;
        for r in &ranges {
            let what = || format!("key range {}", r.span());
            known(&r.read_owner, &what)?;
            known(&r.write_owner, &what)?;
            if let Some(h) = &r.hidden_on {
                known(h, &what)?;
                if *h == r.read_owner || *h == r.write_owner {
                    return Err(CatalogError::HiddenOnOwner {
                        range: r.span(),
                        shard: h.clone(),
                    });
                }
            }
        }

        Ok(RoutingSnapshot {
            epoch,
            shards,
            home_shard,
            sharded,
            reference,
            ranges,
            functions: self.functions,
        })
    }
}

/// Checks that `ranges`, sorted by `lo`, tile `[0, 2^64)` exactly.
fn check_cover(ranges: &[KeyRange]) -> Result<(), CatalogError> {
    if ranges.is_empty() {
        return Err(CatalogError::NoRanges);
    }
    // `covered` is the end of the space covered so far, as u128 so that 2^64
    // (the end of a `hi: None` range) is representable.
    let mut covered: u128 = 0;
    let mut prev: Option<Span> = None;
    for r in ranges {
        let span = r.span();
        if span.is_empty() {
            return Err(CatalogError::EmptyRange(span));
        }
        let lo = u128::from(span.lo);
        if lo > covered {
            return Err(CatalogError::Gap(Span {
                lo: covered as u64,
                hi: Some(span.lo),
            }));
        }
        if lo < covered {
            // Only possible after a previous range.
            if let Some(p) = prev {
                return Err(CatalogError::Overlap(p, span));
            }
        }
        covered = span.end();
        prev = Some(span);
    }
    if covered < 1 << 64 {
        return Err(CatalogError::Gap(Span {
            lo: covered as u64,
            hi: None,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
