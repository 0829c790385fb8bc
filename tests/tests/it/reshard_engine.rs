//! The reshard data-movement engine (`hotrepart_proxy::control::reshard`) between two
//! real PostgreSQL servers: a range of `items` moves while a writer keeps
//! inserting, updating (also the key, also leaving a TOASTed value
//! unchanged) and deleting on the source; the target ends with exactly the
//! source's rows of the range, checked row by row and with the router's own
//! hash in Rust. Also: resuming after crashes (dropped clients) mid-copy and
//! mid-catch-up, abort, preconditions, text, int2, int4 and uuid shard keys,
//! and tables placed by a WebAssembly routing function.
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::control::reshard::{
    self, MoveSpec, OwnerGuard, ReshardError, Side, TableMove,
};
use hotrepart_proxy::routing::functions::WasmPoint;
use hotrepart_router::catalog::{
    FunctionId, Functions, KeyRange, KeyType, KeyValue, RoutingFunction, ShardId, Span,
};
use hotrepart_tests::*;
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FUNC: RoutingFunction = RoutingFunction::PgHash { seed: 7 };
/// About half the point space, crossing 2^63 (two signed intervals).
const RANGE: Span = Span {
    lo: 1 << 62,
    hi: Some(3 << 62),
};

fn items(key_type: KeyType) -> TableMove {
    TableMove {
        name: "items".into(),
        key_column: "id".into(),
        key_type,
        function: FUNC,
    }
}

fn spec(src: &LocalPg2, dst: &LocalPg2, job: &str, tables: Vec<TableMove>) -> MoveSpec {
    MoveSpec {
        job: job.into(),
        source_dsn: src.dsn.clone(),
        target_dsn: dst.dsn.clone(),
        database: "postgres".into(),
        tables,
        range: RANGE,
        functions: Default::default(),
        // No catalog here: every server may be written (the node's jobs
        // answer from the routing table).
        guard: OwnerGuard::new(|_| Ok(())),
    }
}

/// The predicate the tests use to look at the range inside PostgreSQL.
fn pred(t: &TableMove) -> String {
    KeyRange::active(RANGE.lo, RANGE.hi, ShardId::new("x").unwrap()).sql_predicate(
        &t.function
            .sql_hash(t.key_type, &format!("\"{}\"", t.key_column))
            .unwrap(),
    )
}

struct LocalPg2 {
    _pg: hotrepart_proxy::tools::localpg::LocalPg,
    dsn: String,
}

fn two_servers(dir: &TestDir) -> (LocalPg2, LocalPg2) {
    let a = start_pg(&dir.0.join("source"));
    let b = start_pg(&dir.0.join("target"));
    (
        LocalPg2 {
            dsn: a.dsn(),
            _pg: a,
        },
        LocalPg2 {
            dsn: b.dsn(),
            _pg: b,
        },
    )
}

/// Rows as text, sorted.
async fn rows(c: &tokio_postgres::Client, q: &str) -> Vec<String> {
    let mut out: Vec<String> = c
        .query(q, &[])
        .await
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    out.sort();
    out
}

async fn count(c: &tokio_postgres::Client, q: &str) -> i64 {
    c.query_one(q, &[]).await.unwrap().get(0)
}

/// Catch up until everything committed on the source before the call is on
/// the target (`drained`: what the cut-over waits for once writes are
/// frozen; the lag in bytes also counts unrelated WAL).
async fn drain(spec: &MoveSpec) {
    let start = Instant::now();
    loop {
        let r = reshard::catch_up(spec, 5000).await.unwrap();
        if r.drained {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "catch-up does not drain: {r:?}"
        );
    }
}

async fn no_capture_left(src: &tokio_postgres::Client) {
    assert_eq!(
        count(src, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(count(src, "SELECT count(*) FROM pg_publication").await, 0);
}

const ITEMS_DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text, n int)";

/// 20,000 rows; ids 1..=2000 carry a ~9.6 kB incompressible value (stored
/// out of line, so an UPDATE that leaves it alone does not send it).
async fn fill_items(src: &tokio_postgres::Client) {
    src.batch_execute(ITEMS_DDL).await.unwrap();
    src.batch_execute(
        "INSERT INTO items SELECT g, 'v' || g, g FROM generate_series(1, 20000) g;
         UPDATE items SET v = array_to_string(ARRAY(SELECT md5(random()::text || g || items.id) FROM generate_series(1, 300) g), '') WHERE id <= 2000;",
    )
    .await
    .unwrap();
}

/// Random writes on the source until `stop`: inserts, updates of v, updates
/// of n only (the TOASTed v unchanged), key changes, deletes, some in
/// multi-statement transactions.
async fn writer(dsn: String, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let c = connect(&dsn).await.unwrap();
    let mut next_id = 100_000i64;
    while !stop.load(Ordering::Relaxed) {
        let (kind, id, hot) = {
            let mut r = rand::rng();
            (
                r.random_range(0..6u8),
                r.random_range(1..=25_000i64),
                r.random_range(1..=2000i64),
            )
        };
        let q = match kind {
            0 => {
                next_id += 1;
                format!("INSERT INTO items VALUES ({next_id}, 'new{next_id}', 0) ON CONFLICT DO NOTHING")
            }
            1 => format!("UPDATE items SET v = 'upd' || n, n = n + 1 WHERE id = {id}"),
            2 => format!("UPDATE items SET n = n + 1 WHERE id = {hot}"),
            3 => format!(
                "UPDATE items SET id = id + 1000000 WHERE id = {} AND NOT EXISTS (SELECT 1 FROM items WHERE id = {} + 1000000)",
                if id % 2 == 0 { hot } else { id },
                if id % 2 == 0 { hot } else { id }
            ),
            4 => format!("DELETE FROM items WHERE id = {id}"),
            _ => format!(
                "BEGIN; UPDATE items SET n = -n WHERE id = {id}; DELETE FROM items WHERE id = {};
                 INSERT INTO items VALUES ({id}, 'again', 1) ON CONFLICT (id) DO UPDATE SET v = 'again'; COMMIT",
                id + 1
            ),
        };
        c.batch_execute(&q).await.unwrap();
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

async fn assert_moved(spec: &MoveSpec, src: &tokio_postgres::Client, dst: &tokio_postgres::Client) {
    let v = reshard::verify(spec).await.unwrap();
    assert!(v.equal(), "verify: {v:?}");
    let t = &spec.tables[0];
    let p = pred(t);
    let on_source = rows(
        src,
        &format!("SELECT ROW(items.*)::text FROM items WHERE {p}"),
    )
    .await;
    let on_target = rows(dst, "SELECT ROW(items.*)::text FROM items").await;
    assert!(!on_target.is_empty());
    assert_eq!(on_source.len(), on_target.len(), "row counts differ");
    assert!(
        on_source == on_target,
        "target differs from the source's range"
    );
    // Independently of SQL: every key on the target is in the range by the
    // router's hash.
    let keys = rows(
        dst,
        &format!("SELECT \"{}\"::text FROM items", t.key_column),
    )
    .await;
    for k in keys {
        let p = t
            .function
            .builtin_point(&KeyValue::parse(t.key_type, &k).unwrap())
            .unwrap();
        assert!(RANGE.contains(p), "key {k} (point {p}) is not in the range");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_a_range_under_concurrent_writes() {
    let dir = TestDir::new("reshard-move");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    fill_items(&src).await;
    let spec = spec(&a, &b, "move1", vec![items(KeyType::Int8)]);
    let p = pred(&spec.tables[0]);
    let outside_before = count(&src, &format!("SELECT count(*) FROM items WHERE NOT {p}")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let w = tokio::spawn(writer(a.dsn.clone(), stop.clone(), ops.clone()));
    let started = Instant::now();

    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap(); // idempotent
    let progress = AtomicU64::new(0);
    let copied = reshard::copy(&spec, |n| progress.store(n, Ordering::Relaxed))
        .await
        .unwrap();
    assert!(copied > 5000, "copied only {copied}");
    assert_eq!(progress.load(Ordering::Relaxed), copied);
    let mut applied = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let r = reshard::catch_up(&spec, 500).await.unwrap();
        applied += r.applied;
    }
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    drain(&spec).await;
    assert!(ops.load(Ordering::Relaxed) > 100, "the writer hardly wrote");
    assert!(applied > 0, "nothing caught up while the writer ran");
    assert_moved(&spec, &src, &dst).await;

    // Cleanup is refused while the slot exists.
    assert!(matches!(
        reshard::cleanup_source(&spec, 1000).await,
        Err(ReshardError::CaptureActive(_))
    ));
    reshard::stop_capture(&spec).await.unwrap();
    reshard::stop_capture(&spec).await.unwrap(); // idempotent
    no_capture_left(&src).await;
    let in_range = count(&src, &format!("SELECT count(*) FROM items WHERE {p}")).await;
    let outside = count(&src, &format!("SELECT count(*) FROM items WHERE NOT {p}")).await;
    assert_eq!(
        reshard::cleanup_source(&spec, 1000).await.unwrap(),
        in_range as u64
    );
    assert_eq!(reshard::cleanup_source(&spec, 1000).await.unwrap(), 0);
    assert_eq!(
        count(&src, &format!("SELECT count(*) FROM items WHERE {p}")).await,
        0
    );
    assert_eq!(count(&src, "SELECT count(*) FROM items").await, outside);
    assert!(outside > outside_before / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_crashes() {
    let dir = TestDir::new("reshard-resume");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    fill_items(&src).await;
    let spec = spec(&a, &b, "resume", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();

    // A crash mid-copy: the copy is dropped at its first progress report
    // (1,000 rows streamed): its connections vanish and the target's
    // transaction rolls back, leaving nothing of the range.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    tokio::select! {
        r = reshard::copy(&spec, |n| { let _ = tx.send(n); }) => panic!("the copy ended before its first progress report: {r:?}"),
        n = rx.recv() => assert!(n.unwrap() > 0),
    }
    let p = pred(&spec.tables[0]);
    assert_eq!(
        count(&dst, &format!("SELECT count(*) FROM items WHERE {p}")).await,
        0
    );
    // And one at a moment picked by the clock.
    let _ = tokio::time::timeout(Duration::from_millis(50), reshard::copy(&spec, |_| {})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let w = tokio::spawn(writer(a.dsn.clone(), stop.clone(), ops.clone()));
    reshard::copy(&spec, |_| {}).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    // Crashes at assorted points of catch-up (before, during, after the
    // target's commit, before the slot moved), while the writer runs.
    for ms in [1u64, 3, 10, 30, 60, 100, 200, 400] {
        let _ =
            tokio::time::timeout(Duration::from_millis(ms), reshard::catch_up(&spec, 300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    for ms in [5u64, 20, 50] {
        let _ =
            tokio::time::timeout(Duration::from_millis(ms), reshard::catch_up(&spec, 300)).await;
    }
    drain(&spec).await;
    assert_moved(&spec, &src, &dst).await;
    // A copy after the catch-up (a resumed job redoing its copy) and another
    // drain still end equal.
    reshard::copy(&spec, |_| {}).await.unwrap();
    drain(&spec).await;
    assert_moved(&spec, &src, &dst).await;
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_leaves_the_source_untouched() {
    let dir = TestDir::new("reshard-abort");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    fill_items(&src).await;
    let spec = spec(&a, &b, "abort", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    // The target holds rows of other ranges already: abort must keep them.
    dst.batch_execute(
        "INSERT INTO items SELECT g, 'other', 0 FROM generate_series(1000000, 1002000) g",
    )
    .await
    .unwrap();
    let p = pred(&spec.tables[0]);
    let others = rows(
        &dst,
        &format!("SELECT ROW(items.*)::text FROM items WHERE NOT {p}"),
    )
    .await;
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute(
        "UPDATE items SET n = n + 1 WHERE id % 7 = 0; DELETE FROM items WHERE id % 11 = 0",
    )
    .await
    .unwrap();
    drain(&spec).await;
    let before = rows(&src, "SELECT ROW(items.*)::text FROM items").await;
    assert!(count(&dst, &format!("SELECT count(*) FROM items WHERE {p}")).await > 0);

    assert!(reshard::abort_target(&spec).await.unwrap() > 0);
    assert_eq!(reshard::abort_target(&spec).await.unwrap(), 0);
    reshard::stop_capture(&spec).await.unwrap();
    assert_eq!(
        rows(&src, "SELECT ROW(items.*)::text FROM items").await,
        before
    );
    assert_eq!(
        count(&dst, &format!("SELECT count(*) FROM items WHERE {p}")).await,
        0
    );
    assert_eq!(
        rows(&dst, "SELECT ROW(items.*)::text FROM items").await,
        others
    );
    no_capture_left(&src).await;
}

/// Issue 12 (D3): whatever the caller believes, the engine deletes (or
/// overwrites) no row of the range on a server its guard says owns the
/// range now: cleanup, abort, the copy's clearing and catch-up are refused
/// with an error naming the range, and leave the rows as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_deletes_the_range_on_its_owner() {
    let dir = TestDir::new("reshard-owner");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    fill_items(&src).await;
    let mut spec = spec(&a, &b, "owner", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    let p = pred(&spec.tables[0]);
    let in_range = format!("SELECT count(*) FROM items WHERE {p}");
    let (on_src, on_dst) = (count(&src, &in_range).await, count(&dst, &in_range).await);
    assert!(on_src > 0 && on_src == on_dst);
    // The target owns the range (the flip happened): no abort, no copy,
    // no catch-up may touch it.
    spec.guard = OwnerGuard::new(|side| match side {
        Side::Target => Err("shard b owns it in the routing table of epoch 9".into()),
        Side::Source => Ok(()),
    });
    src.batch_execute("DELETE FROM items WHERE id % 3 = 0")
        .await
        .unwrap();
    for (what, e) in [
        ("abort", reshard::abort_target(&spec).await.unwrap_err()),
        ("copy", reshard::copy(&spec, |_| {}).await.unwrap_err()),
        (
            "catch-up",
            reshard::catch_up(&spec, 1000).await.unwrap_err(),
        ),
    ] {
        assert!(
            matches!(
                e,
                ReshardError::Owner {
                    side: Side::Target,
                    ..
                }
            ),
            "{what}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("refusing to delete or overwrite rows of range")
                && msg.contains("target")
                && msg.contains("epoch 9"),
            "{what}: {msg}"
        );
    }
    assert_eq!(count(&dst, &in_range).await, on_dst, "the owner lost rows");
    // The source owns it (no flip): the cleanup is refused.
    reshard::stop_capture(&spec).await.unwrap();
    spec.guard = OwnerGuard::new(|side| match side {
        Side::Source => Err("shard a owns it".into()),
        Side::Target => Ok(()),
    });
    let before = count(&src, &in_range).await;
    let e = reshard::cleanup_source(&spec, 100).await.unwrap_err();
    assert!(
        matches!(
            e,
            ReshardError::Owner {
                side: Side::Source,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(count(&src, &in_range).await, before);
    // And with the right answer it goes through.
    spec.guard = OwnerGuard::new(|_| Ok(()));
    assert_eq!(
        reshard::cleanup_source(&spec, 100).await.unwrap(),
        before as u64
    );
    no_capture_left(&src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions() {
    let dir = TestDir::new("reshard-pre");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    src.batch_execute(
        "CREATE TABLE nopk (id bigint, v text);
         CREATE TABLE keyless_identity (id bigint, seq int PRIMARY KEY, v text);
         CREATE SCHEMA app;
         CREATE TABLE app.orders (id bigint NOT NULL, line int NOT NULL DEFAULT 1,
             amount numeric(10,2), note varchar(20) DEFAULT 'none',
             total numeric GENERATED ALWAYS AS (amount * 2) STORED,
             serial_no bigserial, PRIMARY KEY (id, line));
         INSERT INTO app.orders (id, amount) SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let table = |name: &str| TableMove {
        name: name.into(),
        key_column: "id".into(),
        key_type: KeyType::Int8,
        function: FUNC,
    };

    let s = spec(&a, &b, "pre", vec![table("nopk")]);
    let e = reshard::check_preconditions(&s)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nopk") && e.contains("primary key"), "{e}");
    // Publishing it would break the application's UPDATEs: refused too.
    assert!(reshard::start_capture(&s).await.is_err());
    no_capture_left(&src).await;

    let s = spec(&a, &b, "pre", vec![table("keyless_identity")]);
    let e = reshard::check_preconditions(&s)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keyless_identity") && e.contains("replica identity"),
        "{e}"
    );
    // REPLICA IDENTITY FULL makes it movable.
    src.batch_execute("ALTER TABLE keyless_identity REPLICA IDENTITY FULL")
        .await
        .unwrap();
    reshard::check_preconditions(&s).await.unwrap();
    // ... and moves: the old row ('O') tells where a row whose shard key
    // (not in the primary key) changed was.
    src.batch_execute(
        "INSERT INTO keyless_identity SELECT g, g, 'v' FROM generate_series(1, 2000) g",
    )
    .await
    .unwrap();
    reshard::start_capture(&s).await.unwrap();
    reshard::copy(&s, |_| {}).await.unwrap();
    src.batch_execute(
        "UPDATE keyless_identity SET id = id + 100000 WHERE seq % 3 = 0;
         UPDATE keyless_identity SET v = 'w' WHERE seq % 5 = 0;
         DELETE FROM keyless_identity WHERE seq % 7 = 0;",
    )
    .await
    .unwrap();
    drain(&s).await;
    assert!(reshard::verify(&s).await.unwrap().equal());
    let p = pred(&s.tables[0]);
    let moved = rows(&dst, "SELECT ROW(t.*)::text FROM keyless_identity t").await;
    assert!(moved.len() > 500, "{}", moved.len());
    let q = format!("SELECT ROW(t.*)::text FROM keyless_identity t WHERE {p}");
    assert_eq!(rows(&src, &q).await, moved);
    reshard::stop_capture(&s).await.unwrap();
    no_capture_left(&src).await;

    let s = spec(&a, &b, "pre", vec![table("missing")]);
    let e = reshard::check_preconditions(&s)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains("does not exist"), "{e}");

    let mut wrong = table("app.orders");
    wrong.key_type = KeyType::Text;
    let e = reshard::check_preconditions(&spec(&a, &b, "pre", vec![wrong]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bigint") && e.contains("text"), "{e}");

    // Absent on the target: created from the source's definition.
    let s = spec(&a, &b, "pre", vec![table("app.orders")]);
    reshard::check_preconditions(&s).await.unwrap();
    reshard::check_preconditions(&s).await.unwrap(); // idempotent
    let cols = rows(
        &dst,
        "SELECT attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull::text || ' ' || attgenerated::text \
         FROM pg_attribute WHERE attrelid = 'app.orders'::regclass AND attnum > 0 AND NOT attisdropped",
    )
    .await;
    assert_eq!(
        cols,
        [
            "amount numeric(10,2) false ",
            "id bigint true ",
            "line integer true ",
            "note character varying(20) false ",
            "serial_no bigint true ",
            "total numeric false s",
        ]
    );
    let pk = rows(
        &dst,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'app.orders'::regclass AND contype = 'p'",
    )
    .await;
    assert_eq!(pk, ["PRIMARY KEY (id, line)"]);
    // And the move works, generated column included.
    reshard::start_capture(&s).await.unwrap();
    reshard::copy(&s, |_| {}).await.unwrap();
    src.batch_execute("UPDATE app.orders SET amount = amount + 1 WHERE id % 3 = 0")
        .await
        .unwrap();
    drain(&s).await;
    assert!(reshard::verify(&s).await.unwrap().equal());
    let p = pred(&s.tables[0]);
    assert_eq!(
        rows(
            &src,
            &format!("SELECT ROW(o.*)::text FROM app.orders o WHERE {p}")
        )
        .await,
        rows(&dst, "SELECT ROW(o.*)::text FROM app.orders o").await
    );
    reshard::stop_capture(&s).await.unwrap();
    no_capture_left(&src).await;

    // A target whose table differs is refused, naming the column.
    src.batch_execute("CREATE TABLE t2 (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    dst.batch_execute("CREATE TABLE t2 (id bigint PRIMARY KEY, v varchar(5))")
        .await
        .unwrap();
    let e = reshard::check_preconditions(&spec(&a, &b, "pre", vec![table("t2")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("t2") && e.contains("\"v\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys() {
    let dir = TestDir::new("reshard-text");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    src.batch_execute(
        "CREATE TABLE items (id text, seq int, v text, PRIMARY KEY (id, seq));
         INSERT INTO items SELECT 'tenant-' || (g % 500) || 'ü', g, 'p' || g FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let spec = spec(&a, &b, "text_keys", vec![items(KeyType::Text)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    src.batch_execute(
        "UPDATE items SET v = 'before-copy' WHERE seq % 5 = 0;
         INSERT INTO items SELECT 'late-' || g, g, 'x' FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute(
        "UPDATE items SET v = 'after-copy' WHERE seq % 7 = 0;
         UPDATE items SET id = id || '-moved' WHERE seq % 13 = 0;
         DELETE FROM items WHERE seq % 17 = 0;
         INSERT INTO items SELECT 'new-' || g, g, 'y' FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    drain(&spec).await;
    assert_moved(&spec, &src, &dst).await;
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}

/// Deterministic coverage of the paths a random writer may miss: updates
/// that leave a TOASTed value out (applied in place), key changes of such
/// rows into and out of the range (the row is read back from the source),
/// a key change inside one transaction followed by a delete, and a row
/// inserted and deleted between two batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasted_values_and_key_moves() {
    let dir = TestDir::new("reshard-toast");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    fill_items(&src).await;
    let spec = spec(&a, &b, "toast", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute(
        "UPDATE items SET n = n + 100 WHERE id <= 2000;
         UPDATE items SET id = id + 5000000 WHERE id BETWEEN 1 AND 600;
         UPDATE items SET n = -1 WHERE id BETWEEN 5000001 AND 5000100;
         BEGIN; UPDATE items SET id = id + 7000000 WHERE id BETWEEN 601 AND 700;
                DELETE FROM items WHERE id BETWEEN 7000601 AND 7000650; COMMIT;
         INSERT INTO items VALUES (9000000, 'short-lived', 0);",
    )
    .await
    .unwrap();
    let r = reshard::catch_up(&spec, 100_000).await.unwrap();
    assert!(r.applied > 1000 && r.skipped > 1000, "{r:?}");
    src.batch_execute(
        "DELETE FROM items WHERE id = 9000000; UPDATE items SET v = 'changed' WHERE id = 5000001",
    )
    .await
    .unwrap();
    drain(&spec).await;
    assert_moved(&spec, &src, &dst).await;
    // The TOASTed values survived on the target.
    let p = pred(&spec.tables[0]);
    let big = count(&dst, "SELECT count(*) FROM items WHERE length(v) = 9600").await;
    assert_eq!(
        big,
        count(
            &src,
            &format!("SELECT count(*) FROM items WHERE length(v) = 9600 AND {p}")
        )
        .await
    );
    assert!(big > 500, "only {big} toasted rows in the range");
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}

/// Co-located tables move together in one job (one slot, one publication),
/// each with its own key column name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_one_job() {
    let dir = TestDir::new("reshard-two");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    src.batch_execute(&format!(
        "{ITEMS_DDL}; INSERT INTO items SELECT g, 'v' || g, g FROM generate_series(1, 3000) g;
         CREATE TABLE item_events (item bigint, at int, what text, PRIMARY KEY (item, at));
         INSERT INTO item_events SELECT g % 3000, g, 'e' || g FROM generate_series(1, 9000) g;"
    ))
    .await
    .unwrap();
    let events = TableMove {
        name: "item_events".into(),
        key_column: "item".into(),
        key_type: KeyType::Int8,
        function: FUNC,
    };
    let spec = spec(&a, &b, "two", vec![items(KeyType::Int8), events.clone()]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    let copied = reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute(
        "BEGIN; UPDATE items SET n = 0 WHERE id % 4 = 0; DELETE FROM item_events WHERE at % 4 = 0;
         INSERT INTO item_events SELECT g, 100000 + g, 'late' FROM generate_series(1, 500) g; COMMIT;
         DELETE FROM items WHERE id % 9 = 0;",
    )
    .await
    .unwrap();
    drain(&spec).await;
    let v = reshard::verify(&spec).await.unwrap();
    assert!(v.equal() && v.tables.len() == 2, "{v:?}");
    let counts: i64 = v.tables.iter().map(|t| t.target_count).sum();
    assert!(counts > 3000 && copied > 3000, "{v:?}");
    let p = pred(&events);
    assert_eq!(
        rows(
            &src,
            &format!("SELECT ROW(e.*)::text FROM item_events e WHERE {p}")
        )
        .await,
        rows(&dst, "SELECT ROW(e.*)::text FROM item_events e").await
    );
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_refuses_the_job() {
    let dir = TestDir::new("reshard-trunc");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    src.batch_execute(&format!(
        "{ITEMS_DDL}; INSERT INTO items SELECT g, 'v', 1 FROM generate_series(1, 100) g"
    ))
    .await
    .unwrap();
    let spec = spec(&a, &b, "trunc", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute("TRUNCATE items").await.unwrap();
    let e = reshard::catch_up(&spec, 100).await.unwrap_err();
    assert!(
        matches!(&e, ReshardError::Truncated { table } if table == "items"),
        "{e}"
    );
    reshard::abort_target(&spec).await.unwrap();
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The benchmark of `bench/reshard-copy.sh` (run with `--release
/// --ignored --nocapture`): moves the range (about half the keyspace) of an
/// `items` table of `HR_BENCH_ROWS` rows (default 2,000,000), then catches
/// up `HR_BENCH_CHANGES` updates (default 200,000; half of them in the
/// range) made after the copy, in transactions of 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/reshard-copy.sh"]
async fn bench_move_range() {
    let total = env_or("HR_BENCH_ROWS", 2_000_000) as i64;
    let changes = env_or("HR_BENCH_CHANGES", 200_000) as i64;
    let batch = env_or("HR_BENCH_MAX_CHANGES", 50_000) as usize;
    let dir = TestDir::new("reshard-bench");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let t0 = Instant::now();
    src.batch_execute(&format!(
        "{ITEMS_DDL}; INSERT INTO items SELECT g, 'value-' || g, g FROM generate_series(1, {total}) g"
    ))
    .await
    .unwrap();
    src.batch_execute("VACUUM ANALYZE items").await.unwrap();
    let load = t0.elapsed();
    let spec = spec(&a, &b, "bench", vec![items(KeyType::Int8)]);
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();

    let t = Instant::now();
    let copied = reshard::copy(&spec, |_| {}).await.unwrap();
    let copy_time = t.elapsed();

    let t = Instant::now();
    let mut lo = 1i64;
    while lo <= changes {
        let hi = (lo + 999).min(changes);
        src.batch_execute(&format!(
            "UPDATE items SET n = n + 1 WHERE id BETWEEN {lo} AND {hi}"
        ))
        .await
        .unwrap();
        lo = hi + 1;
    }
    let write_time = t.elapsed();

    let t = Instant::now();
    let (mut applied, mut skipped, mut calls) = (0, 0, 0);
    loop {
        let r = reshard::catch_up(&spec, batch).await.unwrap();
        applied += r.applied;
        skipped += r.skipped;
        calls += 1;
        if r.drained {
            break;
        }
    }
    let catch_time = t.elapsed();

    let t = Instant::now();
    let v = reshard::verify(&spec).await.unwrap();
    let verify_time = t.elapsed();
    assert!(v.equal(), "{v:?}");
    reshard::stop_capture(&spec).await.unwrap();
    let t = Instant::now();
    let cleaned = reshard::cleanup_source(&spec, 10_000).await.unwrap();
    let cleanup_time = t.elapsed();
    assert_eq!(cleaned, copied);

    let secs = |d: Duration| d.as_secs_f64();
    println!("| step | rows or changes | seconds | per second |");
    println!("|---|---|---|---|");
    println!(
        "| load source ({total} rows, not the engine) | {total} | {:.2} | {:.0} |",
        secs(load),
        total as f64 / secs(load)
    );
    println!(
        "| copy (range rows) | {copied} | {:.2} | {:.0} |",
        secs(copy_time),
        copied as f64 / secs(copy_time)
    );
    println!(
        "| source writes after the copy (not the engine) | {changes} | {:.2} | {:.0} |",
        secs(write_time),
        changes as f64 / secs(write_time)
    );
    println!(
        "| catch-up ({calls} calls of up to {batch}; applied {applied}, skipped {skipped}) | {} | {:.2} | {:.0} decoded, {:.0} applied |",
        applied + skipped,
        secs(catch_time),
        (applied + skipped) as f64 / secs(catch_time),
        applied as f64 / secs(catch_time)
    );
    println!(
        "| verify (count + checksum, both sides) | {copied} | {:.2} | {:.0} |",
        secs(verify_time),
        copied as f64 / secs(verify_time)
    );
    println!(
        "| cleanup_source (batches of 10,000) | {cleaned} | {:.2} | {:.0} |",
        secs(cleanup_time),
        cleaned as f64 / secs(cleanup_time)
    );
}

/// The geo example function (deploy/examples/functions/geo.wat), compiled as
/// the node compiles it, and the `Functions` holding it.
fn geo() -> (Arc<Function>, RoutingFunction, Functions) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/functions/geo.wat");
    let f = Arc::new(Function::compile(&std::fs::read(path).unwrap()).unwrap());
    let id = FunctionId(f.id());
    let mut functions = Functions::new();
    functions.insert(id, Arc::new(WasmPoint::new(f.clone())));
    (f, RoutingFunction::Wasm { id }, functions)
}

/// The second half of region 1 ("eu:…" keys; int8 keys with top byte 1)
/// and all of region 2 ("us:…"; top byte 2) under geo.
const GEO_RANGE: Span = Span {
    lo: (1 << 56) + (1 << 55),
    hi: Some(3 << 56),
};

/// Point of a key given as text, computed by calling the module directly.
fn geo_point(f: &Function, key_type: KeyType, key: &str) -> u64 {
    match key_type {
        KeyType::Int8 => f
            .point(oid::INT8, &abi::encode_int8(key.parse().unwrap()))
            .unwrap(),
        _ => f.point(oid::TEXT, key.as_bytes()).unwrap(),
    }
}

/// `(key as text or NULL, whole row as text)` of every row.
async fn keyed_rows(
    c: &tokio_postgres::Client,
    table: &str,
    key: &str,
) -> Vec<(Option<String>, String)> {
    let mut out: Vec<(Option<String>, String)> = c
        .query(
            &format!("SELECT {key}::text, ROW(t.*)::text FROM {table} t"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    out.sort();
    out
}

/// Rows of `rows` whose key's geo point is (or is not) in GEO_RANGE. NULL
/// keys are in no range.
fn geo_filter(
    f: &Function,
    key_type: KeyType,
    rows: &[(Option<String>, String)],
    inside: bool,
) -> Vec<(Option<String>, String)> {
    rows.iter()
        .filter(|(k, _)| match k {
            Some(k) => GEO_RANGE.contains(geo_point(f, key_type, k)) == inside,
            None => !inside,
        })
        .cloned()
        .collect()
}

/// Random writes to the geo tables until `stop`: inserts in every region,
/// updates, key changes across regions (in and out of the range, to and from
/// NULL) and deletes.
async fn geo_writer(dsn: String, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let c = connect(&dsn).await.unwrap();
    let mut next = 100_000i64;
    while !stop.load(Ordering::Relaxed) {
        let (kind, seq, region) = {
            let mut r = rand::rng();
            (
                r.random_range(0..8u8),
                r.random_range(1..=4000i64),
                r.random_range(0..7i64),
            )
        };
        next += 1;
        let q = match kind {
            0 => format!(
                "INSERT INTO places VALUES (({region}::int8 << 56) | {next}, {next}, 'new')"
            ),
            1 => format!("UPDATE places SET v = v || '+' WHERE seq = {seq}"),
            2 => format!(
                "UPDATE places SET id = ({region}::int8 << 56) | (id & 16777215) WHERE seq = {seq}"
            ),
            3 => format!("UPDATE places SET id = NULL WHERE seq = {seq}"),
            4 => format!("DELETE FROM places WHERE seq = {seq}"),
            5 => format!(
                "INSERT INTO regions VALUES ('{}:w{next}', 1, 'new') ON CONFLICT DO NOTHING",
                ["xx", "eu", "us", "ap", "sa", "af", "me"][region as usize]
            ),
            6 => format!("UPDATE regions SET v = 'upd' || seq WHERE seq = {}", seq % 5),
            _ => format!(
                "UPDATE regions SET k = '{}:' || k WHERE k = (SELECT k FROM regions ORDER BY k OFFSET {seq} LIMIT 1)",
                ["xx", "eu", "us", "ap"][(region % 4) as usize]
            ),
        };
        c.batch_execute(&q).await.unwrap();
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tables placed by a WebAssembly routing function (which PostgreSQL cannot
/// evaluate: every step decides membership in Rust) move like any other: an
/// int8 key with NULLs and a REPLICA IDENTITY FULL table (no pre-filter, key
/// not in the primary key) and a text key; writes during the copy and the
/// catch-up; the target's rows of other ranges are kept by the copy's
/// clearing and by abort; verify; cleanup. Every row's point is computed by
/// calling the module directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_placed_tables() {
    let dir = TestDir::new("reshard-wasm");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    let (f, function, functions) = geo();
    // int8 keys: region (top byte) r, 7 regions; every 50th key NULL.
    src.batch_execute(
        "CREATE TABLE places (id bigint, seq int PRIMARY KEY, v text);
         ALTER TABLE places REPLICA IDENTITY FULL;
         INSERT INTO places SELECT CASE WHEN g % 50 = 0 THEN NULL ELSE ((g % 7)::int8 << 56) | g END, g, 'p' || g
           FROM generate_series(1, 4000) g;
         CREATE TABLE regions (k text, seq int, v text, PRIMARY KEY (k, seq));
         INSERT INTO regions SELECT (ARRAY['xx','eu','us','ap','sa','af','me'])[1 + g % 7] || ':city-' || (g % 900), g, 'r' || g
           FROM generate_series(1, 6000) g;",
    )
    .await
    .unwrap();
    let table = |name: &str, key: &str, key_type| TableMove {
        name: name.into(),
        key_column: key.into(),
        key_type,
        function,
    };
    let tables = vec![
        table("places", "id", KeyType::Int8),
        table("regions", "k", KeyType::Text),
    ];
    let mut spec = spec(&a, &b, "wasm", tables.clone());
    spec.range = GEO_RANGE;
    // Without the implementation: refused, naming the table and function.
    let mut unloaded = spec.clone();
    unloaded.functions = Functions::new();
    let e = reshard::check_preconditions(&unloaded)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("places") && e.contains("not loaded"), "{e}");
    spec.functions = functions;

    reshard::check_preconditions(&spec).await.unwrap();
    // The target holds rows of other ranges (region 3, "ap:"): kept.
    dst.batch_execute(
        "INSERT INTO places SELECT (3::int8 << 56) | g, 5000000 + g, 'theirs' FROM generate_series(1, 300) g;
         INSERT INTO regions SELECT 'ap:theirs-' || g, g, 'theirs' FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    let theirs = [
        keyed_rows(&dst, "places", "id").await,
        keyed_rows(&dst, "regions", "k").await,
    ];
    reshard::start_capture(&spec).await.unwrap();

    // A first copy, then an abort: only the range leaves the target.
    let first = reshard::copy(&spec, |_| {}).await.unwrap();
    assert!(first > 1000, "copied {first}");
    assert_eq!(reshard::abort_target(&spec).await.unwrap(), first);
    assert_eq!(reshard::abort_target(&spec).await.unwrap(), 0);
    assert_eq!(keyed_rows(&dst, "places", "id").await, theirs[0]);
    assert_eq!(keyed_rows(&dst, "regions", "k").await, theirs[1]);

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let w = tokio::spawn(geo_writer(a.dsn.clone(), stop.clone(), ops.clone()));
    let copied = reshard::copy(&spec, |_| {}).await.unwrap();
    // Again (a resumed job): clears its first copy on the target first.
    let copied_again = reshard::copy(&spec, |_| {}).await.unwrap();
    assert!(
        copied > 1000 && copied_again > 1000,
        "{copied} {copied_again}"
    );
    let started = Instant::now();
    let mut applied = 0;
    while started.elapsed() < Duration::from_secs(2) {
        applied += reshard::catch_up(&spec, 500).await.unwrap().applied;
    }
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    drain(&spec).await;
    assert!(ops.load(Ordering::Relaxed) > 100, "the writer hardly wrote");
    assert!(applied > 0, "nothing caught up while the writer ran");

    let v = reshard::verify(&spec).await.unwrap();
    assert!(v.equal() && v.tables.len() == 2, "{v:?}");
    let mut source_before = Vec::new();
    for (i, (t, kt)) in [("places", KeyType::Int8), ("regions", KeyType::Text)]
        .into_iter()
        .enumerate()
    {
        let key = &tables[i].key_column;
        let on_source = keyed_rows(&src, t, key).await;
        let on_target = keyed_rows(&dst, t, key).await;
        let moved = geo_filter(&f, kt, &on_source, true);
        assert!(
            moved.len() > 500,
            "{t}: only {} rows in the range",
            moved.len()
        );
        assert_eq!(v.tables[i].source_count, moved.len() as i64, "{t}");
        // The target: exactly the source's rows of the range, plus its own
        // rows of other ranges, untouched.
        let mut want = moved.clone();
        want.extend(theirs[i].iter().cloned());
        want.sort();
        assert!(
            on_target == want,
            "{t}: the target differs from the source's range"
        );
        // Nothing outside the range moved (NULL keys included).
        let outside = geo_filter(&f, kt, &on_target, false);
        assert_eq!(outside, theirs[i], "{t}: rows outside the range moved");
        source_before.push(on_source);
    }
    assert!(
        source_before[0].iter().any(|(k, _)| k.is_none()),
        "no NULL key left on the source"
    );

    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
    let in_range: usize = (0..2)
        .map(|i| {
            let kt = tables[i].key_type;
            geo_filter(&f, kt, &source_before[i], true).len()
        })
        .sum();
    assert_eq!(
        reshard::cleanup_source(&spec, 100).await.unwrap(),
        in_range as u64
    );
    assert_eq!(reshard::cleanup_source(&spec, 100).await.unwrap(), 0);
    for (i, t) in ["places", "regions"].into_iter().enumerate() {
        let kt = tables[i].key_type;
        let left = keyed_rows(&src, t, &tables[i].key_column).await;
        assert_eq!(
            left,
            geo_filter(&f, kt, &source_before[i], false),
            "{t}: the source kept exactly the rows outside the range"
        );
    }
}

/// The copy decodes binary keys of every key type: int2, int4 and uuid
/// keys (built-in hashing, with the SQL pre-filter) move exactly the
/// range's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_key_types() {
    let dir = TestDir::new("reshard-keytypes");
    let (a, b) = two_servers(&dir);
    let src = connect(&a.dsn).await.unwrap();
    let dst = connect(&b.dsn).await.unwrap();
    src.batch_execute(
        "CREATE TABLE k2 (id smallint PRIMARY KEY, v text);
         INSERT INTO k2 SELECT g, 'v' || g FROM generate_series(-3000, 3000) g;
         CREATE TABLE k4 (id integer PRIMARY KEY, v text);
         INSERT INTO k4 SELECT g * 7919, 'v' || g FROM generate_series(-3000, 3000) g;
         CREATE TABLE ku (id uuid PRIMARY KEY, v text);
         INSERT INTO ku SELECT md5(g::text)::uuid, 'v' || g FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    let t = |name: &str, key_type| TableMove {
        name: name.into(),
        key_column: "id".into(),
        key_type,
        function: FUNC,
    };
    let tables = vec![
        t("k2", KeyType::Int2),
        t("k4", KeyType::Int4),
        t("ku", KeyType::Uuid),
    ];
    let spec = spec(&a, &b, "keytypes", tables.clone());
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();
    src.batch_execute(
        "UPDATE k2 SET v = 'w' WHERE id % 3 = 0; DELETE FROM k4 WHERE id % 5 = 0;
         UPDATE ku SET id = md5(id::text)::uuid WHERE v LIKE '%7';",
    )
    .await
    .unwrap();
    drain(&spec).await;
    let v = reshard::verify(&spec).await.unwrap();
    assert!(v.equal(), "{v:?}");
    for t in &tables {
        let p = pred(t);
        let q = format!("SELECT ROW(t.*)::text FROM {} t", t.name);
        let moved = rows(&dst, &q).await;
        assert!(moved.len() > 500, "{}: {}", t.name, moved.len());
        assert_eq!(
            rows(&src, &format!("{q} WHERE {p}")).await,
            moved,
            "{}",
            t.name
        );
        for k in rows(&dst, &format!("SELECT id::text FROM {}", t.name)).await {
            let key = KeyValue::parse(t.key_type, &k).unwrap();
            assert!(spec.contains(t, &key).unwrap(), "{}: {k}", t.name);
        }
    }
    reshard::stop_capture(&spec).await.unwrap();
    no_capture_left(&src).await;
}
