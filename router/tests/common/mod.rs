//! The routing snapshot the router's tests and benchmark are built on, in
//! one place: `n` shards `s0`..`s{n-1}` (DSN `dbname=sI`), home shard
//! `s0`, tables placed by `pg_hash` with seed 0, `n` equal ranges (range
//! `i` owned by `s{i}`). Each test names its own tables.
//!
//! Used by the integration tests (`mod common;`), the benchmark
//! (`#[path = "../tests/common/mod.rs"]`) and the crate's unit tests
//! (through `extern crate self as hotrepart_router` in `lib.rs`, under
//! `cfg(test)`), so it names the crate by its external name only.

// Each user takes what it needs.
#![allow(dead_code)]

use hotrepart_router::catalog::{
    KeyType, RoutingFunction, RoutingSnapshot, ShardId, ShardedTable, SnapshotBuilder,
};

/// Shard `name`.
pub fn shard(name: &str) -> ShardId {
    ShardId::new(name).expect("shard name")
}

/// Table `name` sharded on `key_column` of type `key_type` by `pg_hash`
/// with seed 0 (integer keys of any width hash alike: co-located).
pub fn pg_hash(name: &str, key_column: &str, key_type: KeyType) -> ShardedTable {
    ShardedTable {
        name: name.into(),
        key_column: key_column.into(),
        key_type,
        function: RoutingFunction::PgHash { seed: 0 },
    }
}

/// Shards `s0`..`s{shards-1}` with their DSNs and home shard `s0`; no
/// table, no range yet.
pub fn builder(shards: usize) -> SnapshotBuilder {
    let mut b = RoutingSnapshot::builder(1);
    for i in 0..shards {
        let id = shard(&format!("s{i}"));
        b = b.shard(id.clone(), format!("dbname={id}"));
    }
    b.home_shard(shard("s0"))
}

/// [`builder`] with the `pg_hash` tables `(name, key column, key type)`,
/// the reference tables, and `shards` equal ranges.
pub fn snapshot(
    shards: usize,
    tables: &[(&str, &str, KeyType)],
    references: &[&str],
) -> RoutingSnapshot {
    let mut b = builder(shards);
    for (name, col, ty) in tables {
        b = b.sharded_table(pg_hash(name, col, *ty));
    }
    for r in references {
        b = b.reference_table(*r);
    }
    b.equal_ranges(shards)
        .and_then(|b| b.build())
        .expect("test snapshot")
}

/// The snapshot of the routing cases (`cases.txt`): 4 shards, the tables
/// they name, reference table `countries`. Shared by `route_cases.rs` and
/// `shape_routes.rs`, which must route the same statements alike.
pub fn cases_snapshot() -> RoutingSnapshot {
    snapshot(
        4,
        &[
            ("users", "id", KeyType::Int8),
            ("orders", "user_id", KeyType::Int8),
            ("events", "tenant", KeyType::Text),
            ("devices", "uuid", KeyType::Uuid),
            ("items", "id", KeyType::Int4),
            ("Mixed", "Key", KeyType::Int8),
            ("app.accounts", "id", KeyType::Int8),
        ],
        &["countries"],
    )
}
