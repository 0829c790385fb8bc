//! Live resharding through a 3-node cluster of real `hotrepart serve`
//! processes in front of real PostgreSQL shards: ranges moved while clients
//! write through every node; the node running the job killed; a job aborted.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

async fn ranges(c: &ProcCluster, i: usize) -> Vec<(u64, Option<u64>, String)> {
    c.ranges(i).await
}

async fn job(c: &ProcCluster, i: usize, id: &str) -> serde_json::Value {
    let (ok, out, err) = c.proxyctl(i, &["--json", "jobs", "list"]).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == serde_json::json!(id))
        .cloned()
        .unwrap_or_else(|| panic!("no job {id} in {v}"))
}

/// Waits for job `id` to reach one of `phases` (asked on node `i`).
async fn wait_phase(
    c: &ProcCluster,
    i: usize,
    id: &str,
    phases: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let j = job(c, i, id).await;
        if phases.iter().any(|p| j["phase"] == serde_json::json!(p)) {
            return j;
        }
        assert!(
            start.elapsed() < timeout,
            "job {id} is {} after {timeout:?}, not {phases:?}: {j}\n{}",
            j["phase"],
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_job(c: &ProcCluster, i: usize, args: &[&str]) -> String {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = c.proxyctl(i, &all).await;
    assert!(ok, "{args:?}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["job"].as_str().unwrap().to_string()
}

/// Writers through the given nodes: inserts of new ids and updates of a
/// version column; returns the acknowledged (id → version) and every
/// client error.
/// Acknowledged id → version (negative: an update of that id failed with
/// an unknown outcome, so its version may be higher), errors, worst latency.
type LoadResult = (BTreeMap<i64, i32>, Vec<String>, Duration);

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
}

impl Load {
    fn start(c: &ProcCluster, nodes: &[usize]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = nodes
            .iter()
            .enumerate()
            .map(|(w, &i)| {
                let dsn = c.nodes[i].dsn();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let db = connect(&dsn).await.unwrap();
                    let mut acked = BTreeMap::new();
                    let mut errors = Vec::new();
                    let mut worst = Duration::ZERO;
                    let mut n = 0i64;
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        n += 1;
                        let t0 = Instant::now();
                        // Every third operation updates an earlier row.
                        let mut updating = None;
                        let r = if n % 3 == 0 && !acked.is_empty() {
                            let id = *acked.keys().nth((n as usize * 7) % acked.len()).unwrap();
                            updating = Some(id);
                            db.query_one(
                                "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
                                &[&id],
                            )
                            .await
                            .map(|row| (id, row.get::<_, i32>(0)))
                        } else {
                            let id = (w as i64 + 1) * 10_000_000 + n;
                            db.execute("INSERT INTO items (id, version) VALUES ($1, 1)", &[&id])
                                .await
                                .map(|_| (id, 1))
                        };
                        worst = worst.max(t0.elapsed());
                        match r {
                            Ok((id, v)) => {
                                acked.insert(id, v);
                            }
                            Err(e) => {
                                if let Some(id) = updating {
                                    if let Some(v) = acked.get_mut(&id) {
                                        *v = -v.abs();
                                    }
                                }
                                errors.push(e.to_string());
                            }
                        }
                    }
                    (acked, errors, worst)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = BTreeMap::new();
        let mut errors = Vec::new();
        let mut worst = Duration::ZERO;
        for t in self.tasks {
            let (a, e, w) = t.await.unwrap();
            all.extend(a);
            errors.extend(e);
            worst = worst.max(w);
        }
        (all, errors, worst)
    }
}

/// Every acknowledged row exactly once, with its version, on the shard
/// owning its point; returns rows per shard.
async fn check(c: &ProcCluster, dsns: &[String], acked: &BTreeMap<i64, i32>) -> Vec<usize> {
    let (seen, per) = c.placed_rows(dsns, "SELECT id, version FROM items").await;
    for (id, &v) in acked {
        match seen.get(id) {
            None => panic!("acknowledged row {id} is missing"),
            // An update with an unknown outcome may have applied.
            Some(&got) if v < 0 => {
                assert!(got >= -v, "row {id}: version {got}, acknowledged {}", -v)
            }
            Some(&got) => assert_eq!(got, v, "row {id}: version {got}, acknowledged {v}"),
        }
    }
    per
}

/// No replication slot or publication left on any shard.
async fn nothing_left(dsns: &[String]) {
    for dsn in dsns {
        let db = connect(dsn).await.unwrap();
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "a replication slot was left on {dsn}");
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_publication", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "a publication was left on {dsn}");
    }
}

async fn setup(c: &ProcCluster, rows: i64) {
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, version int NOT NULL, pad text)")
        .await
        .unwrap();
    if rows > 0 {
        // Sharded COPY through the node.
        use futures_util::SinkExt;
        let sink = db
            .copy_in::<_, bytes::Bytes>("COPY items (id, version, pad) FROM STDIN")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        let pad = "x".repeat(100);
        let mut buf = String::new();
        for i in 1..=rows {
            buf.push_str(&format!("{i}\t1\t{pad}\n"));
            if buf.len() > 1 << 20 {
                sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                    .await
                    .unwrap();
            }
        }
        sink.send(bytes::Bytes::from(buf)).await.unwrap();
        let n = sink.as_mut().finish().await.unwrap();
        assert_eq!(n, rows as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_and_split_under_load_through_three_nodes() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 20_000).await;
    let pre: BTreeMap<i64, i32> = (1..=20_000).map(|i| (i, 1)).collect();
    // A reference table, to be copied to the new shard.
    let (ok, _, err) = c.proxyctl(0, &["table", "reference", "countries"]).await;
    assert!(ok, "{err}");
    let db = connect(&c.nodes[1].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
        .await
        .unwrap();
    db.batch_execute(
        "INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany'), ('jp', 'Japan')",
    )
    .await
    .unwrap();
    let load = Load::start(&c, &[0, 1, 2]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A third shard, with rebalance: ranges move onto it.
    let d = c.dir.0.join("s2");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let (ok, out, err) = c
        .proxyctl(
            1,
            &[
                "--json",
                "reshard",
                "add-shard",
                "s2",
                "--dsn",
                &extra.dsn(),
                "--rebalance",
            ],
        )
        .await;
    assert!(ok, "add-shard: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap().to_string())
        .collect();
    assert!(!jobs.is_empty(), "rebalance started no job: {v}");
    assert_eq!(
        v["reference_copied"][0]["rows"],
        serde_json::json!(3),
        "{v}"
    );
    for id in &jobs {
        let j = wait_phase(
            &c,
            2,
            id,
            &["done", "failed", "aborted"],
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(j["phase"], serde_json::json!("done"), "{j}");
    }
    // Split a range of s0 and move its upper half to s1.
    let rs = ranges(&c, 0).await;
    let lo = rs.iter().find(|r| r.2 == "s0").unwrap().0;
    let id = start_job(&c, 2, &["reshard", "split", &lo.to_string(), "--to", "s1"]).await;
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "failed", "aborted"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}");
    // The reference table reads the same from the new shard.
    let s2 = connect(&extra.dsn()).await.unwrap();
    let n: i64 = s2
        .query_one("SELECT count(*) FROM countries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, errors, worst) = load.finish().await;
    eprintln!(
        "{} acknowledged writes, worst latency {worst:?}",
        acked.len()
    );
    assert!(
        errors.is_empty(),
        "client errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(acked.len() > 50, "the load made no progress");
    let mut all = pre;
    all.extend(acked);
    let mut dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    dsns.push(extra.dsn());
    let per = check(&c, &dsns, &all).await;
    assert!(per[2] > 0, "nothing moved to s2: {per:?}");
    nothing_left(&dsns).await;
    drop(extra);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_during_catch_up_leaves_the_source_as_it_was() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 5_000).await;
    let load = Load::start(&c, &[0, 1]);
    let rs = ranges(&c, 0).await;
    let lo = rs.iter().find(|r| r.2 == "s0").unwrap().0;
    let id = start_job(&c, 0, &["reshard", "move", &lo.to_string(), "--to", "s1"]).await;
    wait_phase(
        &c,
        0,
        &id,
        &["catch_up", "cut_over", "done"],
        Duration::from_secs(60),
    )
    .await;
    let (ok, _, err) = c.proxyctl(1, &["jobs", "abort", &id]).await;
    let j = if ok {
        wait_phase(&c, 0, &id, &["aborted", "failed"], Duration::from_secs(60)).await
    } else {
        // Too late: it flipped already. The test needs an abort before.
        panic!("abort refused: {err}");
    };
    assert_eq!(j["phase"], serde_json::json!("aborted"), "{j}");
    let (acked, errors, _) = load.finish().await;
    assert!(
        errors.is_empty(),
        "client errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    let mut all: BTreeMap<i64, i32> = (1..=5_000).map(|i| (i, 1)).collect();
    all.extend(acked);
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    // The range is still s0's, and s1 holds nothing of it.
    let rs2 = ranges(&c, 0).await;
    assert_eq!(rs, rs2, "the routing table changed");
    check(&c, &dsns, &all).await;
    nothing_left(&dsns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_survives_kill_of_its_node_during_copy_and_catch_up() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 300_000).await;
    let pre: BTreeMap<i64, i32> = (1..=300_000).map(|i| (i, 1)).collect();
    let leader = c.leader(0).await.expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i as u64 + 1 != leader).collect();
    let load = Load::start(&c, &others);
    let rs = ranges(&c, 0).await;
    let lo = rs.iter().find(|r| r.2 == "s0").unwrap().0;
    let id = start_job(
        &c,
        others[0],
        &["reshard", "move", &lo.to_string(), "--to", "s1"],
    )
    .await;
    // Kill the job's node (the leader) while it copies.
    wait_phase(
        &c,
        others[0],
        &id,
        &["copy", "catch_up"],
        Duration::from_secs(30),
    )
    .await;
    c.nodes[(leader - 1) as usize].kill9();
    let killed_in = job(&c, others[0], &id).await["phase"].clone();
    eprintln!("killed the job's node during {killed_in}");
    // The next leader resumes it; kill that one during catch-up.
    let j = wait_phase(
        &c,
        others[0],
        &id,
        &["catch_up", "cut_over", "flipped", "done"],
        Duration::from_secs(60),
    )
    .await;
    if j["phase"] == serde_json::json!("catch_up") {
        let l2 = c.leader(others[0]).await.unwrap();
        let l2i = (l2 - 1) as usize;
        tokio::task::block_in_place(|| c.nodes[(leader - 1) as usize].start());
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.nodes[l2i].kill9();
        eprintln!("killed node {l2} during catch_up");
        let alive = (0..3).find(|&i| c.nodes[i].running()).unwrap();
        wait_phase(
            &c,
            alive,
            &id,
            &["done", "failed", "aborted"],
            Duration::from_secs(120),
        )
        .await;
        tokio::task::block_in_place(|| c.nodes[l2i].start());
    } else {
        tokio::task::block_in_place(|| c.nodes[(leader - 1) as usize].start());
    }
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "failed", "aborted"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}");
    let (acked, errors, _) = load.finish().await;
    // Clients of the surviving nodes see no error (the killed nodes' own
    // clients were not in the load).
    let real: Vec<&String> = errors
        .iter()
        .filter(|e| !e.contains("connection closed"))
        .collect();
    assert!(
        real.is_empty(),
        "client errors: {:?}",
        &real[..real.len().min(5)]
    );
    let mut all = pre;
    all.extend(acked);
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    check(&c, &dsns, &all).await;
    nothing_left(&dsns).await;
}
