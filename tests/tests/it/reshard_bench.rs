//! Reshard benchmark (ignored in normal runs; `bench/reshard.sh` runs it in
//! release): move a range holding ~1M rows between two shards while
//! writers run through three nodes. Prints one `RESHARD-BENCH` JSON line:
//! job duration, rows/s, write throughput before/during/after, and the
//! latency of writes into the moving range during the job (the freeze as
//! clients see it: p50/p99/max).
#![allow(clippy::unwrap_used)]

use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
#[ignore = "benchmark: run by bench/reshard.sh"]
async fn move_a_range_of_a_million_rows_under_load() {
    let rows: i64 = std::env::var("RESHARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let tail = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";
    let c = ProcCluster::start(3, 2, tail, "lease_ms = 1000").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, version int NOT NULL, pad text)")
        .await
        .unwrap();
    // Load directly on the shards (faster than through the node), each row
    // on its owner: two ranges, one per shard, split at 2^63.
    for (si, pg) in c.shards.iter().enumerate() {
        let s = connect(&pg.dsn()).await.unwrap();
        let pred = if si == 0 { "<" } else { ">=" };
        s.batch_execute(&format!(
            "INSERT INTO items SELECT g, 1, repeat('x', 60) FROM generate_series(1, {rows}) g \
             WHERE (hashint8extended(g, 0)::numeric + 18446744073709551616) % 18446744073709551616 {pred} 9223372036854775808"
        ))
        .await
        .unwrap();
        s.batch_execute("VACUUM ANALYZE items").await.unwrap();
    }
    let s0 = connect(&c.shards[0].dsn()).await.unwrap();
    let moving_rows: i64 = s0
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    // Writers: (start time, latency ms, into the moving range).
    let stop = Arc::new(AtomicBool::new(false));
    let t_zero = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let dsn = c.nodes[w % 3].dsn();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let db = connect(&dsn).await.unwrap();
            let mut out: Vec<(f64, f64, bool)> = Vec::new();
            let mut errors = 0;
            let mut id = rows + 1 + w as i64 * 100_000_000;
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                id += 1;
                let t0 = Instant::now();
                let r = db
                    .execute("INSERT INTO items (id, version) VALUES ($1, 1)", &[&id])
                    .await;
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                if r.is_err() {
                    errors += 1;
                }
                let moving = hashint8extended(id, 0) < 1 << 63;
                out.push(((t0 - t_zero).as_secs_f64(), ms, moving));
            }
            (out, errors)
        }));
    }
    // Not a wait for a condition: 5 s of load before the job is the
    // baseline the latencies during the job are compared with.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let job_start = t_zero.elapsed().as_secs_f64();
    let (ok, out, err) = c
        .proxyctl(1, &["--json", "reshard", "move", "0", "--to", "s1"])
        .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["job"].as_str().unwrap().to_string();
    let started = Instant::now();
    let mut phases: Vec<(String, f64)> = Vec::new();
    let note = loop {
        let (_, out, _) = c.proxyctl(0, &["--json", "jobs", "list"]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if let Some(j) = v["jobs"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["job"] == serde_json::json!(id)))
        {
            let phase = j["phase"].as_str().unwrap_or("").to_string();
            if phases.last().is_none_or(|(p, _)| *p != phase) {
                phases.push((phase.clone(), started.elapsed().as_secs_f64()));
            }
            if j["done"] == serde_json::json!(true) {
                assert_eq!(phase, "done", "{j}\n{}", c.logs());
                break j["note"].clone();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(900), "job too slow");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let job_end = t_zero.elapsed().as_secs_f64();
    let job_secs = job_end - job_start;
    // Not a wait for a condition: 5 s of load after the job, measured.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (o, e) = t.await.unwrap();
        all.extend(o);
        errors += e;
    }
    let tput = |a: f64, b: f64| {
        all.iter().filter(|x| x.0 >= a && x.0 < b).count() as f64 / (b - a).max(0.001)
    };
    let mut during_moving: Vec<f64> = all
        .iter()
        .filter(|x| x.0 >= job_start && x.0 < job_end && x.2)
        .map(|x| x.1)
        .collect();
    let mut before: Vec<f64> = all
        .iter()
        .filter(|x| x.0 < job_start)
        .map(|x| x.1)
        .collect();
    // Writes into the moving range issued from when the job was seen in
    // its cut-over phase (the comparison, then the freeze) until the flip
    // was seen plus the polling period: the writes the freeze can have
    // delayed.
    let at = |name: &str| {
        phases
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, t)| job_start + t)
    };
    let (cut_from, cut_to) = (
        at("cut_over").unwrap_or(job_start),
        at("flipped").or(at("done")).unwrap_or(job_end) + 0.25,
    );
    let mut cut_over_moving: Vec<f64> = all
        .iter()
        .filter(|x| x.0 >= cut_from && x.0 < cut_to && x.2)
        .map(|x| x.1)
        .collect();
    let line = serde_json::json!({
        "rows_moved": moving_rows,
        "job_seconds": job_secs,
        "rows_per_second": moving_rows as f64 / job_secs,
        "phases_at_seconds": phases,
        "job_note": note,
        "client_errors": errors,
        "writes_per_second_before": tput(0.0, job_start),
        "writes_per_second_during": tput(job_start, job_end),
        "writes_per_second_after": tput(job_end, job_end + 5.0),
        "latency_before_ms": { "p50": pct(&mut before, 0.5), "p99": pct(&mut before, 0.99) },
        "moving_range_writes_during_job_ms": {
            "n": during_moving.len(),
            "p50": pct(&mut during_moving, 0.5),
            "p99": pct(&mut during_moving, 0.99),
            "max": pct(&mut during_moving, 1.0),
        },
        "moving_range_writes_during_cut_over_ms": {
            "n": cut_over_moving.len(),
            "p50": pct(&mut cut_over_moving, 0.5),
            "p99": pct(&mut cut_over_moving, 0.99),
            "max": pct(&mut cut_over_moving, 1.0),
        },
    });
    println!("RESHARD-BENCH {line}");
    assert_eq!(errors, 0, "client errors during the move");
}
