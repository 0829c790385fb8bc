//! Criterion benchmarks of parse + route: a plan-cache miss (`plan` + `bind`)
//! and a hit (`PlanCache::get_or_plan` on a warm cache + `bind`), for a
//! point SELECT with a binary int8 parameter and a 10-row literal INSERT
//! (split over the shards), plus the simple-protocol case where the key is a
//! literal and the text differs on every call: every call misses a cache
//! keyed by text (`cache_miss`), and hits the cache of shapes (literals
//! made parameters, `shape_hit`), as the node routes such statements.
//!
//! Run: `cargo bench -p hotrepart-router --bench route -- --warm-up-time 1 --measurement-time 3`
//!
//! The `*/plan_only`, `*/bind_only` and `*/sqlparser_only` entries split the
//! miss into its parts (parse + analyse, bind, and sqlparser's own
//! tokenize + parse), to show where the time goes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
#[path = "../tests/common/mod.rs"]
mod common;

use hotrepart_router::catalog::{KeyType, RoutingSnapshot};
use hotrepart_router::route::{
    normalize_literals, plan, plan_shape, shape_route_usable, Hints, Namespace, Param, PlanCache,
    Target,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// PostgreSQL's type OID of int8, as a client sends it in Parse.
const INT8_OID: u32 = 20;

/// The proxy's default `plan_cache_size`.
const CACHE_SIZE: usize = 10_000;

const POINT_SELECT: &str = "SELECT name FROM users WHERE id = $1";

const INSERT_10: &str = "INSERT INTO users (id, name) VALUES \
    (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e'), \
    (6, 'f'), (7, 'g'), (8, 'h'), (9, 'i'), (10, 'j')";

/// The snapshot of `tests/route_cases.rs`: 4 shards s0..s3 with 4 equal
/// ranges, seed 0, several sharded tables (among them users(id int8)), a
/// reference table, home shard s0.
fn snapshot() -> RoutingSnapshot {
    common::snapshot(
        4,
        &[
            ("users", "id", KeyType::Int8),
            ("orders", "user_id", KeyType::Int8),
            ("events", "tenant", KeyType::Text),
            ("devices", "uuid", KeyType::Uuid),
            ("items", "id", KeyType::Int4),
        ],
        &["countries"],
    )
}

fn point_select(c: &mut Criterion) {
    let snap = snapshot();
    let hints = Hints::default();
    let key = 42i64.to_be_bytes();
    let params = [Param::binary(&key, Some(INT8_OID))];

    // The route is what the benchmark claims it is.
    let p = plan(&snap, POINT_SELECT).expect("plan");
    let r = p.bind(&snap, &params, &hints).expect("bind");
    assert!(matches!(r.target, Target::One(_)), "{:?}", r.target);

    let mut g = c.benchmark_group("point_select");
    g.bench_function("miss", |b| {
        b.iter(|| {
            let p = plan(&snap, black_box(POINT_SELECT)).expect("plan");
            p.bind(&snap, black_box(&params), &hints).expect("bind")
        })
    });
    let mut cache = PlanCache::new(CACHE_SIZE);
    cache.get_or_plan(&snap, POINT_SELECT).expect("warm");
    g.bench_function("hit", |b| {
        b.iter(|| {
            let p = cache
                .get_or_plan(&snap, black_box(POINT_SELECT))
                .expect("plan");
            p.bind(&snap, black_box(&params), &hints).expect("bind")
        })
    });
    // Parts of the above.
    g.bench_function("plan_only", |b| {
        b.iter(|| plan(&snap, black_box(POINT_SELECT)).expect("plan"))
    });
    g.bench_function("bind_only", |b| {
        b.iter(|| p.bind(&snap, black_box(&params), &hints).expect("bind"))
    });
    g.bench_function("cache_lookup_only", |b| {
        b.iter(|| {
            cache
                .get_or_plan(&snap, black_box(POINT_SELECT))
                .expect("plan")
        })
    });
    g.bench_function("sqlparser_only", |b| {
        b.iter(|| Parser::parse_sql(&PostgreSqlDialect {}, black_box(POINT_SELECT)).expect("parse"))
    });
    g.finish();
    assert_eq!(cache.stats().1, 1, "the hit benchmarks must not miss");
}

fn insert_10_rows(c: &mut Criterion) {
    let snap = snapshot();
    let hints = Hints::default();
    let params: [Param<'_>; 0] = [];

    let p = plan(&snap, INSERT_10).expect("plan");
    let r = p.bind(&snap, &params, &hints).expect("bind");
    match &r.target {
        Target::Split(parts) => assert!(parts.len() > 1, "{parts:?}"),
        other => panic!("expected a split INSERT, got {other:?}"),
    }

    let mut g = c.benchmark_group("insert_10_rows");
    g.bench_function("miss", |b| {
        b.iter(|| {
            let p = plan(&snap, black_box(INSERT_10)).expect("plan");
            p.bind(&snap, black_box(&params), &hints).expect("bind")
        })
    });
    let mut cache = PlanCache::new(CACHE_SIZE);
    cache.get_or_plan(&snap, INSERT_10).expect("warm");
    g.bench_function("hit", |b| {
        b.iter(|| {
            let p = cache
                .get_or_plan(&snap, black_box(INSERT_10))
                .expect("plan");
            p.bind(&snap, black_box(&params), &hints).expect("bind")
        })
    });
    g.bench_function("plan_only", |b| {
        b.iter(|| plan(&snap, black_box(INSERT_10)).expect("plan"))
    });
    g.bench_function("bind_only", |b| {
        b.iter(|| p.bind(&snap, black_box(&params), &hints).expect("bind"))
    });
    g.bench_function("cache_lookup_only", |b| {
        b.iter(|| {
            cache
                .get_or_plan(&snap, black_box(INSERT_10))
                .expect("plan")
        })
    });
    g.bench_function("sqlparser_only", |b| {
        b.iter(|| Parser::parse_sql(&PostgreSqlDialect {}, black_box(INSERT_10)).expect("parse"))
    });
    g.finish();
    assert_eq!(cache.stats().1, 1, "the hit benchmarks must not miss");
}

/// Simple protocol: the key is a literal, so the text differs per key and
/// the cache only ever misses (and, once full, evicts on every call). The
/// text is made outside the timed part.
fn simple_protocol_literal(c: &mut Criterion) {
    let snap = snapshot();
    let hints = Hints::default();
    let params: [Param<'_>; 0] = [];
    let text = |n: u64| format!("SELECT name FROM users WHERE id = {n}");

    let r = plan(&snap, &text(0))
        .expect("plan")
        .bind(&snap, &params, &hints)
        .expect("bind");
    assert!(matches!(r.target, Target::One(_)), "{:?}", r.target);

    let mut g = c.benchmark_group("simple_literal_select");
    // As the proxy does it: through its plan cache (default size).
    let mut cache = PlanCache::new(CACHE_SIZE);
    let mut n = 0u64;
    g.bench_function("cache_miss", |b| {
        b.iter_batched_ref(
            || {
                n += 1;
                text(n)
            },
            |sql: &mut String| {
                let p = cache.get_or_plan(&snap, sql.as_str()).expect("plan");
                p.bind(&snap, &params, &hints).expect("bind")
            },
            BatchSize::SmallInput,
        )
    });
    // Without a cache: plan + bind of a new text each time.
    let mut n = 0u64;
    g.bench_function("plan_bind", |b| {
        b.iter_batched_ref(
            || {
                n += 1;
                text(n)
            },
            |sql: &mut String| {
                plan(&snap, sql.as_str())
                    .expect("plan")
                    .bind(&snap, &params, &hints)
                    .expect("bind")
            },
            BatchSize::SmallInput,
        )
    });
    // As the node does it now: the statement's shape (`$1` for the
    // literal) is planned once and cached; each call normalises the text,
    // looks the shape up and binds the literal (proxy/src/routing/mod.rs
    // `shape_route`).
    let ns = Namespace::default();
    let mut shapes = PlanCache::new(CACHE_SIZE);
    let mut n = 0u64;
    g.bench_function("shape_hit", |b| {
        b.iter_batched_ref(
            || {
                n += 1;
                text(n)
            },
            |sql: &mut String| {
                let norm = normalize_literals(sql.as_str()).expect("a literal");
                let p = match shapes.get(&snap, &norm.text, &ns) {
                    Some(p) => p,
                    None => {
                        let p = std::sync::Arc::new(
                            plan_shape(&snap, &norm.text, &ns)
                                .expect("plan")
                                .expect("parsed"),
                        );
                        shapes.put(&snap, &norm.text, std::sync::Arc::clone(&p));
                        p
                    }
                };
                let r = p.bind(&snap, &norm.params(), &hints).expect("bind");
                assert!(shape_route_usable(&r));
                r
            },
            BatchSize::SmallInput,
        )
    });
    // The normalisation alone.
    let sql = text(123_456);
    g.bench_function("normalize_only", |b| {
        b.iter(|| normalize_literals(black_box(sql.as_str())).expect("a literal"))
    });
    g.finish();
    assert_eq!(cache.stats().0, 0, "every simple-protocol call must miss");
    assert_eq!(shapes.stats().1, 1, "the shape must be planned once");
}

criterion_group!(
    benches,
    point_select,
    insert_10_rows,
    simple_protocol_literal
);
criterion_main!(benches);
