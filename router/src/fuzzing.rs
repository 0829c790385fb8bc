//! The bodies of the coverage-guided fuzz targets (`fuzz/fuzz_targets/`,
//! cargo-fuzz with libFuzzer), here so that the stable test suite replays
//! the kept corpora and every crash found through the same code
//! (`router/tests/fuzz_corpus.rs`). Each function takes the fuzzer's bytes
//! and panics only when a property the router promises is broken: no
//! input panics it, a keyed point statement routes where hashing says, a
//! statement's shape routes it as its own text does, and the COPY splitter
//! gives back the rows it was fed.
//!
//! Not part of the router's API (hidden from its docs).

use crate::catalog::{KeyType, KeyValue, RoutingFunction, RoutingSnapshot, ShardId, ShardedTable};
use crate::route::copy::Piece;
use crate::route::{plan_in, route, route_by_shape, Hints, Namespace, Param, RouteError, Target};

/// The snapshot every target routes by: 4 shards `s0`..`s3` with equal
/// ranges, home `s0`; `users(id int8)`, `orders(user_id int8)`,
/// `events(tenant text)`, `devices(uuid uuid)`, `items(id int4)` placed by
/// the built-in hash (seed 0); reference table `countries`.
pub fn snapshot() -> RoutingSnapshot {
    let shard = |n: &str| ShardId::new(n).unwrap_or_else(|_| unreachable!());
    let mut b = RoutingSnapshot::builder(1);
    for i in 0..4 {
        let id = shard(&format!("s{i}"));
        b = b.shard(id.clone(), format!("dbname={id}"));
    }
    b = b.home_shard(shard("s0"));
    for (name, col, ty) in [
        ("users", "id", KeyType::Int8),
        ("orders", "user_id", KeyType::Int8),
        ("events", "tenant", KeyType::Text),
        ("devices", "uuid", KeyType::Uuid),
        ("items", "id", KeyType::Int4),
    ] {
        b = b.sharded_table(ShardedTable {
            name: name.into(),
            key_column: col.into(),
            key_type: ty,
            function: RoutingFunction::PgHash { seed: 0 },
        });
    }
    b.reference_table("countries")
        .equal_ranges(4)
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("the fuzz snapshot: {e}"))
}

/// Target `route`: any text is planned and bound (with the first byte
/// choosing hints and up to two text parameters cut from the input) to a
/// route or an error, never a panic; when the statement has literals and
/// its shape's route is used, it equals the route of the text itself.
pub fn route_text(snap: &RoutingSnapshot, data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let hints = Hints {
        session_shard: (flags & 1 == 1)
            .then(|| ShardId::new("s2").unwrap_or_else(|_| unreachable!())),
        standard_conforming_strings: flags & 2 == 0,
    };
    let ns = Namespace::default();
    // Parameters: the text after the last NUL, split at the one before.
    let (sql, params): (&str, Vec<&str>) = match text.split_once('\0') {
        Some((sql, p)) => (sql, p.split('\0').take(2).collect()),
        None => (&text, Vec::new()),
    };
    let params: Vec<Param<'_>> = params.iter().map(|p| Param::text(p)).collect();
    if let Ok(plan) = plan_in(snap, sql, &ns) {
        let _ = plan.bind(snap, &params, &hints);
    }
    if params.is_empty() {
        if let Some(by_shape) = route_by_shape(snap, sql, &ns, &hints) {
            match route(snap, sql, &[], &hints) {
                Ok(own) => assert!(
                    by_shape.target == own.target
                        && by_shape.kind == own.kind
                        && by_shape.is_write == own.is_write
                        && by_shape.may_write == own.may_write
                        && by_shape.touches_frozen == own.touches_frozen,
                    "{sql:?}: the shape routes to {:?}, the text to {:?}",
                    by_shape.target,
                    own.target
                ),
                Err(e) => panic!(
                    "{sql:?}: refused ({} {}) but its shape routes it to {:?}",
                    e.sqlstate, e.message, by_shape.target
                ),
            }
        }
    }
}

/// Target `point`: a point statement on `users` (int8) and on `items`
/// (int4) keyed by a literal and by a parameter built from the input
/// routes to the shard owning the key's point, both ways.
pub fn keyed_point(snap: &RoutingSnapshot, data: &[u8]) {
    let mut k = [0u8; 8];
    for (i, b) in data.iter().take(8).enumerate() {
        k[i] = *b;
    }
    let key = i64::from_le_bytes(k);
    let owner = |table: &str, v: KeyValue| -> ShardId {
        let t = snap
            .sharded_tables()
            .find(|t| t.name == table)
            .unwrap_or_else(|| unreachable!());
        let p = snap
            .point(t, &v)
            .unwrap_or_else(|e| panic!("point of {v:?}: {e:?}"));
        snap.range_for_point(p).write_owner.clone()
    };
    let hints = Hints::default();
    let check = |sql: &str, params: &[Param<'_>], want: &ShardId| {
        let r = route(snap, sql, params, &hints)
            .unwrap_or_else(|e| panic!("{sql} {params:?}: refused: {} {}", e.sqlstate, e.message));
        assert_eq!(r.target, Target::One(want.clone()), "{sql} {params:?}");
    };
    let want = owner("users", KeyValue::Int8(key));
    check(&format!("SELECT * FROM users WHERE id = {key}"), &[], &want);
    check(
        &format!("UPDATE users SET v = 1 WHERE id = '{key}'"),
        &[],
        &want,
    );
    let text = key.to_string();
    check(
        "DELETE FROM users WHERE id = $1",
        &[Param::text(&text)],
        &want,
    );
    let be = key.to_be_bytes();
    check(
        "SELECT * FROM users WHERE id = $1",
        &[Param::binary(&be, Some(20))],
        &want,
    );
    let k4 = key as i32;
    let want4 = owner("items", KeyValue::Int4(k4));
    check(&format!("SELECT * FROM items WHERE id = {k4}"), &[], &want4);
    // An int4 key hashes as the same int8 value would (co-location).
    assert_eq!(want4, owner("users", KeyValue::Int8(i64::from(k4))));
}

/// Target `copy`: the COPY splitter (text, CSV or binary by the first
/// byte) fed the rest of the input in chunks cut where the second byte
/// says: every piece is a slice of what was fed, in order, pieces never
/// overlap, and an error is a `RouteError` — never a panic.
pub fn copy_split(snap: &RoutingSnapshot, data: &[u8]) {
    let (Some(&fmt), Some(&cut)) = (data.first(), data.get(1)) else {
        return;
    };
    let input = &data[2..];
    let sql = match fmt % 4 {
        0 => "COPY users (id, name) FROM STDIN",
        1 => "COPY users (id, name) FROM STDIN (FORMAT csv, HEADER true)",
        2 => "COPY events (tenant, v) FROM STDIN (FORMAT csv, DELIMITER ';', QUOTE '''', FORCE_NULL (tenant))",
        _ => "COPY users (id, name) FROM STDIN (FORMAT binary)",
    };
    let r = match route(snap, sql, &[], &Hints::default()) {
        Ok(r) => r,
        Err(e) => panic!("{sql}: {}", e.message),
    };
    let Some(copy) = r.copy else {
        panic!("{sql}: not planned as a COPY");
    };
    let columns: Vec<String> = if sql.contains("events") {
        vec!["tenant".into(), "v".into()]
    } else {
        vec!["id".into(), "name".into()]
    };
    let Ok(mut splitter) = copy.splitter(&columns, 1 << 16) else {
        panic!("{sql}: no splitter");
    };
    let step = usize::from(cut % 17) + 1;
    let emitted = std::cell::Cell::new(0usize);
    let mut sink = |p: Piece<'_>| -> Result<(), RouteError> {
        let n = match p {
            Piece::Header(h) => h.len(),
            Piece::Row { data, .. } => data.len(),
        };
        emitted.set(emitted.get() + n);
        Ok(())
    };
    let mut fed = 0usize;
    for chunk in input.chunks(step) {
        fed += chunk.len();
        if splitter.feed(chunk, &mut sink).is_err() {
            return;
        }
        assert!(
            emitted.get() <= fed,
            "{sql}: {} bytes emitted of {fed} fed",
            emitted.get()
        );
    }
    if splitter.finish(&mut sink).is_ok() {
        assert!(
            emitted.get() <= fed,
            "{sql}: {} bytes emitted of {fed} fed",
            emitted.get()
        );
    }
}
