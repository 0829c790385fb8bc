//! `GET /metrics` on the admin port of real node processes: behind the
//! token, in the OpenMetrics text format (parsed here), and its values move
//! with what happens (clients, pools with waiters, catalog, a reshard job).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::connect;
use hotrepart_tests::procs::{ProcCluster, TOKEN};
use std::collections::BTreeMap;
use std::time::Duration;

/// `pool_size` of the test cluster's nodes (`ProcCluster`).
const POOL: usize = 8;

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

/// A routing function whose point is the key's first byte (top 8 bits)
/// and that traps for a key starting with 'x'.
const POISON_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "hr_abi_version") (result i32) (i32.const 1))
  (func (export "hr_alloc") (param i32) (result i32) (i32.const 16))
  (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 120)) (then unreachable))
    (i64.shl (i64.extend_i32_u (i32.load8_u (local.get $p))) (i64.const 56))))"#;

/// One sample: metric name and labels (sorted) to value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the text format: `name{k="v",…} value` lines; `#` lines are
/// metadata. Panics on a line it cannot read.
fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
        };
        out.insert((name, labels), value);
    }
    out
}

/// GET /metrics of node `i`: (status, body).
async fn scrape_raw(c: &ProcCluster, i: usize, token: Option<&str>) -> (u16, String) {
    let url = format!("{}/metrics", c.nodes[i].admin_url());
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build(),
        );
        let mut req = agent.get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut res = req.call().unwrap();
        let status = res.status().as_u16();
        let ct = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let body = res.body_mut().read_to_string().unwrap();
        if status == 200 {
            assert!(
                ct.as_deref()
                    .is_some_and(|c| c.starts_with("application/openmetrics-text")),
                "{ct:?}"
            );
        }
        (status, body)
    })
    .await
    .unwrap()
}

async fn scrape(c: &ProcCluster, i: usize) -> Samples {
    let (status, body) = scrape_raw(c, i, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), labels)).copied()
}

/// Polls node `i`'s metrics until `cond` holds (a deadline, no sleeps).
async fn until(c: &ProcCluster, i: usize, what: &str, cond: impl Fn(&Samples) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(c, i).await;
        if cond(&s) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An id of `items` whose row lives on shard `shard` (by node 0's ranges).
async fn id_on(c: &ProcCluster, shard: &str, skip: usize) -> i64 {
    let rs = c.ranges(0).await;
    (1..)
        .filter(|&id: &i64| {
            let p = hotrepart_router::hash::hashint8extended(id, 0);
            rs.iter()
                .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
                .unwrap()
                .2
                == shard
        })
        .nth(skip)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_behind_the_token_and_move_with_the_node() {
    let c = ProcCluster::start_with_env(
        2,
        2,
        "pool_timeout_ms = 30000",
        TABLES,
        "",
        &[("HOTREPART_TEST_JOB_STEP_DELAY_MS", "300")],
    )
    .await;
    c.wait_ready(Duration::from_secs(60)).await;

    // The token, as for every admin endpoint.
    assert_eq!(scrape_raw(&c, 0, None).await.0, 401);
    assert_eq!(
        scrape_raw(&c, 0, Some("wrong-token-0123456789")).await.0,
        401
    );

    // The catalog, as each node sees it: one leader, both ready.
    let mut leaders = 0.0;
    for i in 0..2 {
        let s = scrape(&c, i).await;
        assert_eq!(get(&s, "hotrepart_catalog_ready", &[]), Some(1.0));
        assert!(get(&s, "hotrepart_catalog_epoch", &[]).unwrap() >= 1.0);
        assert_eq!(get(&s, "hotrepart_catalog_lease_valid", &[]), Some(1.0));
        assert!(get(&s, "hotrepart_catalog_applied_index", &[]).unwrap() >= 1.0);
        assert_eq!(get(&s, "hotrepart_catalog_members", &[]), Some(2.0));
        assert_eq!(get(&s, "hotrepart_shards", &[]), Some(2.0));
        let leader = get(&s, "hotrepart_catalog_leader", &[]).unwrap();
        assert!(leader == 1.0 || leader == 2.0, "{s:?}");
        leaders += get(&s, "hotrepart_catalog_is_leader", &[]).unwrap();
    }
    assert_eq!(leaders, 1.0);
    let before = scrape(&c, 0).await;
    let epoch = get(&before, "hotrepart_catalog_epoch", &[]).unwrap();
    assert_eq!(get(&before, "hotrepart_clients_connected", &[]), Some(0.0));

    // Clients and a pool: transactions hold every connection of s0's
    // pool, one more client waits for one.
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n int)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=300).map(|i| format!("({i}, {i})")).collect();
    db.batch_execute(&format!(
        "INSERT INTO items (id, n) VALUES {}",
        values.join(",")
    ))
    .await
    .unwrap();
    let pool = [("shard", "s0"), ("database", "postgres"), ("user", "app")];
    let mut holders = Vec::new();
    for k in 0..POOL {
        let h = connect(&c.nodes[0].dsn()).await.unwrap();
        let id = id_on(&c, "s0", k).await;
        h.batch_execute(&format!("BEGIN; SELECT n FROM items WHERE id = {id}"))
            .await
            .unwrap();
        holders.push(h);
    }
    let waiter = connect(&c.nodes[0].dsn()).await.unwrap();
    let id = id_on(&c, "s0", POOL).await;
    let waited = tokio::spawn(async move {
        waiter
            .query_one("SELECT n FROM items WHERE id = $1", &[&id])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    until(&c, 0, "a client waiting for s0's pool", |s| {
        get(s, "hotrepart_pool_waiting", &pool) == Some(1.0)
            && get(s, "hotrepart_pool_in_use", &pool) == Some(POOL as f64)
            && get(s, "hotrepart_pool_size", &pool) == Some(POOL as f64)
            && get(s, "hotrepart_clients_connected", &[]) == Some(POOL as f64 + 2.0)
    })
    .await;
    holders[0].batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), waited)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        i32::try_from(id).unwrap()
    );
    for h in &holders[1..] {
        h.batch_execute("COMMIT").await.unwrap();
    }
    until(&c, 0, "the pool idle again", |s| {
        get(s, "hotrepart_pool_waiting", &pool) == Some(0.0)
            && get(s, "hotrepart_pool_in_use", &pool) == Some(0.0)
            && get(s, "hotrepart_pool_idle", &pool).is_some_and(|n| n >= 1.0)
    })
    .await;
    drop(holders);
    drop(db);
    until(&c, 0, "no client left", |s| {
        get(s, "hotrepart_clients_connected", &[]) == Some(0.0)
    })
    .await;

    // A WebAssembly routing function that traps for keys starting with
    // 'x': the failed call and the instance made after it are counted.
    let wat = c.dir.0.join("poison.wat");
    std::fs::write(&wat, POISON_WAT).unwrap();
    for args in [
        vec!["function", "upload", "poison", wat.to_str().unwrap()],
        vec![
            "table",
            "shard",
            "docs",
            "--key",
            "k",
            "--type",
            "text",
            "--function",
            "poison",
        ],
    ] {
        let (ok, _, err) = c.proxyctl(0, &args).await;
        assert!(ok, "proxyctl {args:?}: {err}");
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE docs (k text PRIMARY KEY, v int)")
        .await
        .unwrap();
    let err = db
        .batch_execute("INSERT INTO docs (k, v) VALUES ('x-ray', 1)")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("38000"), "{err:?}");
    db.batch_execute("INSERT INTO docs (k, v) VALUES ('alpha', 1)")
        .await
        .unwrap();
    let wasm = |name: &str, s: &Samples| {
        s.iter()
            .find(|((n, l), _)| {
                n == name && l.get("function").map(String::as_str) == Some("poison")
            })
            .map(|(_, v)| *v)
    };
    let s = scrape(&c, 0).await;
    assert_eq!(
        wasm("hotrepart_wasm_failed_calls_total", &s),
        Some(1.0),
        "{s:?}"
    );
    assert_eq!(
        wasm("hotrepart_wasm_out_of_fuel_total", &s),
        Some(0.0),
        "{s:?}"
    );
    assert_eq!(
        wasm("hotrepart_wasm_instances_created_total", &s),
        Some(1.0),
        "{s:?}"
    );
    // Both inserts called it (one trapped); the successful call used fuel.
    assert!(
        wasm("hotrepart_wasm_calls_total", &s).is_some_and(|n| n >= 2.0),
        "{s:?}"
    );
    assert!(
        wasm("hotrepart_wasm_fuel_used_total", &s).is_some_and(|n| n > 0.0),
        "{s:?}"
    );
    drop(db);

    // A reshard job: its phase and rows while it runs, then counted done;
    // the epoch moved on every node.
    let (lo, _, _) = c.ranges(0).await.into_iter().find(|r| r.2 == "s0").unwrap();
    let (ok, out, err) = c
        .proxyctl(1, &["reshard", "move", &lo.to_string(), "--to", "s1"])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("started"), "{out}");
    for i in 0..2 {
        until(&c, i, "the running job's phase", |s| {
            s.keys().any(|(n, l)| {
                n == "hotrepart_reshard_job_phase" && l["from"] == "s0" && l["to"] == "s1"
            })
        })
        .await;
    }
    until(&c, 0, "rows copied by the running job", |s| {
        s.iter()
            .any(|((n, _), v)| n == "hotrepart_reshard_job_rows_copied" && *v > 0.0)
    })
    .await;
    for i in 0..2 {
        until(&c, i, "the job done", |s| {
            get(s, "hotrepart_reshard_jobs", &[("phase", "done")]) == Some(1.0)
                && !s.keys().any(|(n, _)| n == "hotrepart_reshard_job_phase")
                && get(s, "hotrepart_catalog_epoch", &[]).unwrap() > epoch
        })
        .await;
    }
    // The node that ran the job timed its cut-over's write pause.
    let (mut freezes, mut paused) = (0.0, 0.0);
    for i in 0..2 {
        let s = scrape(&c, i).await;
        freezes += get(&s, "hotrepart_reshard_freeze_seconds_count", &[]).unwrap();
        paused += get(&s, "hotrepart_reshard_freeze_seconds_sum", &[]).unwrap();
    }
    assert_eq!(freezes, 1.0);
    assert!(paused > 0.0 && paused < 60.0, "{paused}");
}

/// The sum of a series over every node (the resolver runs on the leader,
/// which may change), polled until `cond` holds.
async fn until_sum(
    c: &ProcCluster,
    what: &str,
    series: &[(&str, &[(&str, &str)])],
    cond: impl Fn(&[f64]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut sums = vec![0.0; series.len()];
        for i in 0..c.nodes.len() {
            let s = scrape(c, i).await;
            for (k, (name, labels)) in series.iter().enumerate() {
                sums[k] += get(&s, name, labels).unwrap_or(0.0);
            }
        }
        if cond(&sums) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed {what}: {series:?} = {sums:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_transactions_are_counted_by_the_resolver() {
    let c = ProcCluster::start_with(
        2,
        1,
        "twopc_grace_ms = 1500\ntwopc_resolver_interval_ms = 100",
        "",
        "",
    )
    .await;
    c.wait_ready(Duration::from_secs(60)).await;
    let s0: &[(&str, &str)] = &[("shard", "s0")];
    let prepared = ("hotrepart_twopc_prepared", s0);
    let in_doubt = ("hotrepart_twopc_in_doubt", s0);
    let rollback = (
        "hotrepart_twopc_resolved_total",
        &[("outcome", "rollback")][..],
    );
    let commit = (
        "hotrepart_twopc_resolved_total",
        &[("outcome", "commit")][..],
    );

    // A prepared transaction as a coordinator that crashed leaves it.
    let shard = connect(&c.shards[0].dsn()).await.unwrap();
    shard
        .batch_execute(
            "CREATE TABLE t (i int);
             BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'hr_9_00000000deadbeef'",
        )
        .await
        .unwrap();
    until_sum(&c, "the prepared transaction", &[prepared], |v| v[0] >= 1.0).await;
    // No decision was recorded: after the grace the resolver rolls it back.
    until_sum(&c, "the resolver's rollback", &[rollback, commit], |v| {
        v == [1.0, 0.0]
    })
    .await;
    until_sum(
        &c,
        "nothing prepared any more",
        &[prepared, in_doubt],
        |v| v == [0.0, 0.0],
    )
    .await;
    let left = shard
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(left, 0);
}

/// The count of `hotrepart_request_duration_seconds` for a route and
/// shard (0 when the series does not exist yet).
fn requests(s: &Samples, route: &str, shard: &str) -> f64 {
    get(
        s,
        "hotrepart_request_duration_seconds_count",
        &[("route", route), ("shard", shard)],
    )
    .unwrap_or(0.0)
}

fn errors(s: &Samples, class: &str) -> f64 {
    get(s, "hotrepart_client_errors_total", &[("class", class)]).unwrap_or(0.0)
}

/// Issue 16: request latency per shard and route kind (one, all, merge,
/// node) as Prometheus histograms, and the errors clients get by SQLSTATE
/// class.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_timed_by_route_and_errors_counted_by_class() {
    let c = ProcCluster::start(2, 2, TABLES, "").await;
    c.wait_ready(Duration::from_secs(60)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    let before = scrape(&c, 0).await;

    // all: DDL on every shard.
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n int)")
        .await
        .unwrap();
    // one: a keyed write to each shard, three to s1.
    let on0 = id_on(&c, "s0", 0).await;
    db.batch_execute(&format!("INSERT INTO items (id, n) VALUES ({on0}, 1)"))
        .await
        .unwrap();
    for k in 0..3 {
        let on1 = id_on(&c, "s1", k).await;
        db.batch_execute(&format!("INSERT INTO items (id, n) VALUES ({on1}, 1)"))
            .await
            .unwrap();
    }
    // merge: a count over both shards, twice.
    for _ in 0..2 {
        let n: i64 = db
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 4);
    }
    // Errors: class 22 (division by zero) twice, 23 (unique violation) once.
    for _ in 0..2 {
        let e = db.batch_execute("SELECT 1/0").await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e:?}");
    }
    let e = db
        .batch_execute(&format!("INSERT INTO items (id, n) VALUES ({on0}, 2)"))
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{e:?}");

    let after = scrape(&c, 0).await;
    let delta =
        |route: &str, shard: &str| requests(&after, route, shard) - requests(&before, route, shard);
    assert_eq!(delta("all", "*"), 1.0, "{after:?}");
    // The count(*) prepared (Parse/Describe/Sync, one shard) then run
    // (Bind/Execute/Sync, merged): two requests each time.
    assert_eq!(delta("merge", "*"), 2.0, "{after:?}");
    // The failed insert went to s0 too.
    assert!(delta("one", "s1") >= 3.0, "{after:?}");
    assert!(delta("one", "s0") >= 2.0, "{after:?}");
    assert_eq!(
        errors(&after, "22") - errors(&before, "22"),
        2.0,
        "{after:?}"
    );
    assert_eq!(
        errors(&after, "23") - errors(&before, "23"),
        1.0,
        "{after:?}"
    );

    // Each histogram is whole: its +Inf bucket holds every request, its
    // buckets never decrease, its sum is positive and below a minute per
    // request.
    for (route, shard) in [("all", "*"), ("merge", "*"), ("one", "s0"), ("one", "s1")] {
        let count = requests(&after, route, shard);
        let bucket = |le: &str| {
            get(
                &after,
                "hotrepart_request_duration_seconds_bucket",
                &[("le", le), ("route", route), ("shard", shard)],
            )
            .unwrap_or_else(|| panic!("no bucket {le} for {route}/{shard}: {after:?}"))
        };
        assert_eq!(bucket("+Inf"), count, "{route}/{shard}");
        let mut last = 0.0;
        for le in ["0.0001", "0.001", "0.01", "0.1", "1.0", "10.0", "+Inf"] {
            let b = bucket(le);
            assert!(b >= last, "{route}/{shard}: bucket {le} = {b} < {last}");
            last = b;
        }
        let sum = get(
            &after,
            "hotrepart_request_duration_seconds_sum",
            &[("route", route), ("shard", shard)],
        )
        .unwrap();
        assert!(
            sum > 0.0 && sum < 60.0 * count,
            "{route}/{shard}: sum {sum}, count {count}"
        );
    }
}
