//! Catalog benchmark (ignored in normal runs; `bench/catalog.sh` runs it):
//! latency of catalog changes through the admin API on 3 local node
//! processes, and the time from kill -9 of the leader to the next
//! committed change (one JSON line starting with `CATALOG-BENCH`); and what
//! two-phase commit with its decision in the replicated catalog adds to a
//! transaction's latency (`TWOPC-BENCH`).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::{ProcCluster, TOKEN};
use std::time::{Duration, Instant};

fn post(url: &str, body: serde_json::Value) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut r = agent
        .post(url)
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(r.body_mut().read_to_string().unwrap_or_default())
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run by bench/catalog.sh"]
async fn catalog_change_latency_and_leader_failover() {
    let n: usize = std::env::var("CATALOG_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let failovers: usize = std::env::var("CATALOG_BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut c = ProcCluster::start(3, 1, "", "").await;
    // Wait for a leader.
    let start = Instant::now();
    let leader = loop {
        if let Some(l) = c.leader(0).await {
            break l;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Changes through a follower and through the leader.
    let follower = (0..3).find(|&i| i as u64 + 1 != leader).unwrap();
    let mut lat_follower = Vec::new();
    let mut lat_leader = Vec::new();
    for i in 0..n {
        let (node, out) = if i % 2 == 0 {
            (follower, &mut lat_follower)
        } else {
            ((leader - 1) as usize, &mut lat_leader)
        };
        let url = format!("{}/v1/tables", c.nodes[node].admin_url());
        let t0 = Instant::now();
        let body = serde_json::json!({ "table": format!("ref_{i}"), "kind": "reference" });
        tokio::task::spawn_blocking(move || post(&url, body))
            .await
            .unwrap()
            .unwrap();
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // Failover: kill -9 the leader, time until a change commits through a
    // survivor; restart it; repeat.
    let mut failover_ms = Vec::new();
    let mut k = 0;
    for _ in 0..failovers {
        let leader = loop {
            if let Some(l) = c.leader(follower).await {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let li = (leader - 1) as usize;
        let survivor = (0..3).find(|&i| i != li).unwrap();
        c.nodes[li].kill9();
        let t0 = Instant::now();
        loop {
            k += 1;
            let url = format!("{}/v1/tables", c.nodes[survivor].admin_url());
            let body = serde_json::json!({ "table": format!("fo_{k}"), "kind": "reference" });
            let ok = tokio::task::spawn_blocking(move || post(&url, body))
                .await
                .unwrap()
                .is_ok();
            if ok {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no failover");
        }
        failover_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::task::block_in_place(|| c.nodes[li].start());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let line = serde_json::json!({
        "changes": n,
        "follower_p50_ms": pct(&mut lat_follower, 0.5),
        "follower_p99_ms": pct(&mut lat_follower, 0.99),
        "leader_p50_ms": pct(&mut lat_leader, 0.5),
        "leader_p99_ms": pct(&mut lat_leader, 0.99),
        "failover_ms": failover_ms,
    });
    println!("CATALOG-BENCH {line}");
}

/// Latency of one transaction, in ms: (whole transaction, its COMMIT).
async fn timed_tx(db: &tokio_postgres::Client, a: i64, b: i64) -> (f64, f64) {
    let t0 = Instant::now();
    db.batch_execute("BEGIN").await.unwrap();
    db.batch_execute(&format!("UPDATE items SET n = n + 1 WHERE id = {a}"))
        .await
        .unwrap();
    db.batch_execute(&format!("UPDATE items SET n = n + 1 WHERE id = {b}"))
        .await
        .unwrap();
    let t1 = Instant::now();
    db.batch_execute("COMMIT").await.unwrap();
    let end = Instant::now();
    (
        (end - t0).as_secs_f64() * 1000.0,
        (end - t1).as_secs_f64() * 1000.0,
    )
}

/// Keys (on s0, on s1, on s0) under the cluster's current ranges.
async fn two_shard_keys(c: &ProcCluster) -> (i64, i64, i64) {
    let (ok, out, err) = c.proxyctl(0, &["--json", "range", "list"]).await;
    assert!(ok, "range list: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let owner = |id: i64| {
        let p = hotrepart_router::hash::hashint8extended(id, 0);
        v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| p >= r["lo"].as_u64().unwrap() && r["hi"].as_u64().is_none_or(|h| p < h))
            .unwrap()["write_owner"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let on = |s: &str| {
        (1..10_000i64)
            .filter(|&k| owner(k) == s)
            .take(2)
            .collect::<Vec<_>>()
    };
    let (s0, s1) = (on("s0"), on("s1"));
    (s0[0], s1[0], s0[1])
}

/// What two-phase commit with the decision in the replicated catalog adds:
/// a transaction updating one row on each of 2 shards vs one updating two
/// rows on one shard (same statements), through a follower and through the
/// leader of 3 node processes, one client, interleaved. Prints one JSON
/// line starting with `TWOPC-BENCH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run by bench/catalog.sh"]
async fn twopc_commit_latency_vs_one_shard() {
    let n: usize = std::env::var("TWOPC_BENCH_TXS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let tables = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";
    let c = ProcCluster::start(3, 2, tables, "").await;
    let start = Instant::now();
    let leader = loop {
        if let (Some(l), Some(s)) = (c.leader(0).await, c.status(0).await) {
            if s["lease_valid"] == serde_json::json!(true) {
                break l;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let li = (leader - 1) as usize;
    let follower = (0..3).find(|&i| i != li).unwrap();
    let db = hotrepart_tests::connect(&c.nodes[follower].dsn())
        .await
        .unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n bigint NOT NULL)")
        .await
        .unwrap();
    let (a, b, a2) = two_shard_keys(&c).await;
    for k in [a, b, a2] {
        db.batch_execute(&format!("INSERT INTO items (id, n) VALUES ({k}, 0)"))
            .await
            .unwrap();
    }
    let mut line = serde_json::Map::new();
    line.insert("transactions_per_kind".into(), n.into());
    for (name, node) in [("follower", follower), ("leader", li)] {
        let db = hotrepart_tests::connect(&c.nodes[node].dsn())
            .await
            .unwrap();
        // Warm up pools and plan caches.
        for _ in 0..20 {
            timed_tx(&db, a, a2).await;
            timed_tx(&db, a, b).await;
        }
        let (mut one_tx, mut one_commit, mut two_tx, mut two_commit) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let (t, cm) = timed_tx(&db, a, a2).await;
            one_tx.push(t);
            one_commit.push(cm);
            let (t, cm) = timed_tx(&db, a, b).await;
            two_tx.push(t);
            two_commit.push(cm);
        }
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("one_shard_tx", &mut one_tx),
            ("one_shard_commit", &mut one_commit),
            ("two_shard_tx", &mut two_tx),
            ("two_shard_commit", &mut two_commit),
        ] {
            m.insert(format!("{k}_p50_ms"), pct(v, 0.5).into());
            m.insert(format!("{k}_p99_ms"), pct(v, 0.99).into());
        }
        m.insert(
            "ratio_tx_p50".into(),
            (pct(&mut two_tx, 0.5) / pct(&mut one_tx, 0.5)).into(),
        );
        m.insert(
            "ratio_commit_p50".into(),
            (pct(&mut two_commit, 0.5) / pct(&mut one_commit, 0.5)).into(),
        );
        line.insert(name.into(), m.into());
    }
    // Every transaction committed.
    let mut v = 0i64;
    for k in [a, b, a2] {
        let r = db
            .query_one("SELECT n FROM items WHERE id = $1", &[&k])
            .await
            .unwrap();
        v += r.get::<_, i64>(0);
    }
    // 2 nodes × 2 kinds × (n + 20) transactions × 2 updates.
    assert_eq!(v as usize, 8 * (n + 20));
    println!("TWOPC-BENCH {}", serde_json::Value::Object(line));
}
