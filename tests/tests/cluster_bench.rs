//! Catalog benchmark (ignored in normal runs; `bench/catalog.sh` runs it):
//! latency of catalog changes through the admin API on 3 local node
//! processes, and the time from kill -9 of the leader to the next
//! committed change. Prints one JSON line starting with `CATALOG-BENCH`.
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
