//! The reshard engine with shard keys other than int8 (text, int2, int4,
//! uuid) and with tables placed by a WebAssembly routing function (the geo
//! example); the helpers are the parent module's.

use super::*;

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
