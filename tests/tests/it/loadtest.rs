//! The verifying load generator (`hotrepart_proxy::tools::loadtest`, `proxyctl
//! loadtest`) against real PostgreSQL shards and a real node: a clean run
//! passes with no client error, a tampered table fails the check with the
//! right violations, and the CLI works end to end.
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::tools::loadtest::{self, Options, Violation};
use hotrepart_tests::procs::{ProcCluster, TOKEN};
use hotrepart_tests::*;
use std::time::Duration;

/// An in-process node over 2 shards, with its admin API.
struct Setup {
    c: Cluster,
    admin: String,
}

async fn setup() -> Setup {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 8".into(),
        ..Opts::default()
    })
    .await;
    // Stops with the node (when `c` is dropped).
    let addr =
        hotrepart_proxy::control::admin::serve(c.node.clone(), "127.0.0.1:0", TOKEN.into(), false)
            .await
            .unwrap();
    Setup {
        c,
        admin: format!("http://{addr}"),
    }
}

fn options(s: &Setup, secs: u64, w: usize, u: usize, r: usize) -> Options {
    let mut o = Options::new(vec![s.c.dsn(), s.c.dsn()], &s.admin, TOKEN);
    o.shards =
        s.c.shards
            .iter()
            .enumerate()
            .map(|(i, pg)| (format!("s{i}"), pg.dsn()))
            .collect();
    o.setup = true;
    o.duration = Duration::from_secs(secs);
    o.writers = w;
    o.updaters = u;
    o.readers = r;
    o.seed = Some(7);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_run_passes_with_no_errors() {
    let s = setup().await;
    let report = loadtest::run(&options(&s, 5, 2, 2, 2)).await.unwrap();
    let text = loadtest::summary(&report);
    eprintln!("{text}");
    assert!(report.ok, "{text}");
    assert_eq!(report.errors.total, 0, "{text}");
    assert!(report.hung_workers.is_empty(), "{text}");
    let c = &report.counts;
    assert!(c.inserts_acked >= 100, "{text}");
    assert!(c.updates_acked >= 50, "{text}");
    assert!(c.reads_ok >= 50, "{text}");
    assert_eq!((c.inserts_uncertain, c.ids_uncertain), (0, 0), "{text}");
    assert_eq!(report.checked.count_via_node, c.inserts_acked as i64);
    assert_eq!(report.checked.rows_via_node, c.inserts_acked);
    let per_shard: Vec<u64> = report.checked.rows_per_shard.values().copied().collect();
    assert_eq!(per_shard.len(), 2, "{text}");
    assert!(per_shard.iter().all(|&n| n > 0), "{text}");
    assert_eq!(per_shard.iter().sum::<u64>(), c.inserts_acked);
    assert!(report.windows.len() >= 4, "{text}");
    assert!(report.latency["insert"].p99_us >= report.latency["insert"].p50_us);
    // The report is JSON with the documented fields.
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["ok"], serde_json::json!(true));
    assert!(v["windows"][0]["p99_us"].is_u64());
    // The table holds the rows: a second run needs --setup to empty it.
    let mut again = options(&s, 1, 1, 0, 0);
    again.setup = false;
    let e = loadtest::run(&again).await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_finds_a_missing_row_and_a_row_on_the_wrong_shard() {
    let s = setup().await;
    let opts = options(&s, 2, 2, 1, 0);
    loadtest::setup(&opts).await.unwrap();
    let load = loadtest::load(&opts).await.unwrap();
    let ids = load.ledger.acked_ids().to_vec();
    assert!(ids.len() >= 10, "{} rows", ids.len());
    let shards = [s.c.direct(0).await, s.c.direct(1).await];
    // Delete one acknowledged row on its shard.
    let gone = ids[3];
    let mut deleted = 0;
    for db in &shards {
        deleted += db
            .execute("DELETE FROM hr_load WHERE id = $1", &[&gone])
            .await
            .unwrap();
    }
    assert_eq!(deleted, 1);
    // Copy another onto the shard that does not own it.
    let moved = ids[5];
    let mut home = None;
    for (i, db) in shards.iter().enumerate() {
        if !db
            .query("SELECT 1 FROM hr_load WHERE id = $1", &[&moved])
            .await
            .unwrap()
            .is_empty()
        {
            home = Some(i);
        }
    }
    let home = home.unwrap();
    let wrong = 1 - home;
    let row = shards[home]
        .query_one(
            "SELECT version, payload FROM hr_load WHERE id = $1",
            &[&moved],
        )
        .await
        .unwrap();
    let (version, payload): (i32, String) = (row.get(0), row.get(1));
    shards[wrong]
        .execute(
            "INSERT INTO hr_load (id, version, payload) VALUES ($1, $2, $3)",
            &[&moved, &version, &payload],
        )
        .await
        .unwrap();

    let (checked, violations) = loadtest::check(&opts, &load.ledger).await.unwrap();
    let has = |v: &Violation| violations.contains(v);
    assert!(
        has(&Violation::Missing {
            id: gone,
            via: "node".into()
        }),
        "{violations:#?}"
    );
    assert!(
        has(&Violation::Missing {
            id: gone,
            via: "shards".into()
        }),
        "{violations:#?}"
    );
    assert!(
        violations.iter().any(|v| matches!(v,
            Violation::WrongShard { id, shard, owner, .. }
                if *id == moved && *shard == format!("s{wrong}") && *owner == format!("s{home}"))),
        "{violations:#?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::Duplicate { id, copies: 2, .. } if *id == moved)),
        "{violations:#?}"
    );
    // Nothing else is wrong.
    for v in &violations {
        match v {
            Violation::Missing { id, .. } => assert_eq!(*id, gone),
            Violation::WrongShard { id, .. } | Violation::Duplicate { id, .. } => {
                assert_eq!(*id, moved)
            }
            Violation::Count { counted, .. } => {
                // One row fewer, one more (the scan sees both shards).
                assert_eq!(*counted, ids.len() as i64, "{violations:#?}")
            }
            other => panic!("unexpected violation {other:?}"),
        }
    }
    let report = loadtest::report(&opts, load, checked, violations);
    assert!(!report.ok);
    assert!(report.violation_count >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxyctl_loadtest_end_to_end() {
    let c = ProcCluster::start(2, 2, "", "").await;
    for i in 0..2 {
        wait_for(
            "a ready catalog and a valid lease",
            Duration::from_secs(30),
            || async {
                c.status(i).await.is_some_and(|s| {
                    s["ready"] == serde_json::json!(true)
                        && s["lease_valid"] == serde_json::json!(true)
                })
            },
        )
        .await;
    }
    let (n0, n1) = (c.nodes[0].dsn(), c.nodes[1].dsn());
    let s0 = format!("s0={}", c.shards[0].dsn());
    let s1 = format!("s1={}", c.shards[1].dsn());
    let (ok, out, err) = c
        .proxyctl(
            0,
            &[
                "--json",
                "loadtest",
                "--setup",
                "--node",
                &n0,
                "--node",
                &n1,
                "--shard",
                &s0,
                "--shard",
                &s1,
                "--duration",
                "3s",
                "--writers",
                "2",
                "--updaters",
                "1",
                "--readers",
                "1",
            ],
        )
        .await;
    assert!(ok, "proxyctl loadtest failed: {err}\n{out}\n{}", c.logs());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], serde_json::json!(true), "{out}");
    assert!(v["counts"]["inserts_acked"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(v["errors"]["total"], serde_json::json!(0), "{out}");
    assert!(err.contains("ops/s"), "no progress lines: {err}");
    // Without a shard's DSN the check cannot pass.
    let (ok, out, _) = c
        .proxyctl(
            1,
            &[
                "loadtest",
                "--setup",
                "--node",
                &n1,
                "--shard",
                &s0,
                "--duration",
                "1s",
                "--quiet",
            ],
        )
        .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED") && out.contains("shard_not_checked"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unanswered_writes_are_uncertain_and_bounded_in_time() {
    let s = setup().await;
    let mut opts = options(&s, 4, 2, 1, 1);
    opts.op_timeout = Duration::from_secs(1);
    loadtest::setup(&opts).await.unwrap();
    // Halfway through, shard 0 stops answering for the table: statements
    // there wait on a lock until after the load.
    let locker = s.c.direct(0).await;
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let fault = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        locker
            .batch_execute("BEGIN; LOCK TABLE hr_load IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let _ = locked_tx.send(());
        let _ = release_rx.await;
        locker.batch_execute("COMMIT").await.unwrap();
    });
    let started = std::time::Instant::now();
    let load = loadtest::load(&opts).await.unwrap();
    let elapsed = started.elapsed();
    locked_rx.await.unwrap();
    release_tx.send(()).unwrap();
    fault.await.unwrap();
    let (checked, violations) = loadtest::check(&opts, &load.ledger).await.unwrap();
    let report = loadtest::report(&opts, load, checked, violations);
    let text = loadtest::summary(&report);
    eprintln!("{text}");
    // Workers stop within the bound: the load's length plus 2 timeouts + 2 s.
    assert!(elapsed < Duration::from_secs(4 + 4 + 1), "{elapsed:?}");
    assert!(report.hung_workers.is_empty(), "{text}");
    assert!(
        report
            .errors
            .by_code
            .keys()
            .any(|k| k.ends_with(":timeout")),
        "{text}"
    );
    assert!(report.counts.inserts_uncertain > 0, "{text}");
    // Unanswered writes are not losses; the rows that were acknowledged are
    // all there.
    assert!(report.ok, "{text}");
    // The stall shows in the per-second windows.
    assert!(report.windows.iter().any(|w| w.max_us >= 900_000), "{text}");
}
