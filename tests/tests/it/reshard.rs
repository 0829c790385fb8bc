//! Live resharding through a 3-node cluster of real `hotrepart serve`
//! processes in front of real PostgreSQL shards: ranges moved while the
//! shipped verifying load generator (`proxyctl loadtest`, a child process)
//! writes, updates and reads through the nodes, its JSON report parsed and
//! checked; the node running the job killed; a job aborted.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::{interrupt, ProcCluster};
use hotrepart_tests::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// `proxyctl loadtest` — the shipped binary — as a child process: writers,
/// updaters and readers on table `hr_load` through the given nodes (and
/// the admin API of the first), until [`LoadTest::finish`] interrupts it
/// (SIGINT: the load stops, its check runs against the routing table and
/// shards of that moment). `--duration` only bounds it.
struct LoadTest {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

/// Upper bound of a load; the tests interrupt it long before.
const LOAD_MAX: &str = "150s";

impl LoadTest {
    /// Starts the load; returns once its rows arrive. `shards`: every shard
    /// (name, DSN) its final check reads directly.
    async fn start(c: &ProcCluster, nodes: &[usize], shards: &[(&str, String)]) -> LoadTest {
        let mut args: Vec<String> = [
            "--json",
            "loadtest",
            "--setup",
            "--duration",
            LOAD_MAX,
            "--writers",
            "3",
            "--updaters",
            "2",
            "--readers",
            "2",
            "--seed",
            "11",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        for &i in nodes {
            args.push("--node".into());
            args.push(c.nodes[i].dsn());
        }
        for (name, dsn) in shards {
            args.push("--shard".into());
            args.push(format!("{name}={dsn}"));
        }
        let log = c.dir.0.join("loadtest.stderr");
        let child = c.spawn_proxyctl(nodes[0], &args, &log);
        let dsn = c.nodes[nodes[0]].dsn();
        let db = connect(&dsn).await.unwrap();
        wait_for("the loadtest's first rows", Duration::from_secs(60), || {
            let db = &db;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                db.query_one("SELECT count(*) FROM hr_load", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) > 0)
            }
        })
        .await;
        LoadTest { child, log }
    }

    /// Interrupts the load and returns its JSON report.
    async fn finish(self) -> serde_json::Value {
        interrupt(&self.child);
        let out = tokio::time::timeout(Duration::from_secs(120), self.child.wait_with_output())
            .await
            .expect("proxyctl loadtest did not end after SIGINT")
            .unwrap();
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("loadtest report is not JSON ({e}): {stdout}\nstderr:\n{stderr}")
        });
        // Exit status 0 when the check passed, 2 when it found violations.
        let code = out.status.code();
        assert_eq!(
            code == Some(0),
            v["ok"] == serde_json::json!(true),
            "exit status {code:?} for report {v}"
        );
        eprintln!("{}", summary(&v));
        v
    }
}

/// The numbers of a loadtest report, for the test's output.
fn summary(v: &serde_json::Value) -> String {
    format!(
        "loadtest: {:.1} s, {} inserts, {} updates, {} reads acknowledged; {} errors {}; \
         insert p99 {} µs max {} µs; checked at epoch {}: {} rows via node, per shard {}",
        v["seconds"].as_f64().unwrap_or(0.0),
        v["counts"]["inserts_acked"],
        v["counts"]["updates_acked"],
        v["counts"]["reads_ok"],
        v["errors"]["total"],
        v["errors"]["by_code"],
        v["latency"]["insert"]["p99_us"],
        v["latency"]["insert"]["max_us"],
        v["checked"]["epoch"],
        v["checked"]["rows_via_node"],
        v["checked"]["rows_per_shard"],
    )
}

/// The report's verdict: the check ran to its end and found nothing (no
/// acknowledged row lost, none duplicated, none on a shard that does not
/// own its point, by the routing table current at the check), the load
/// progressed, no worker hung, and every client error's code is in
/// `retryable` (`op:code` keys end with one of them).
fn assert_clean(v: &serde_json::Value, retryable: &[&str]) {
    assert_eq!(v["ok"], serde_json::json!(true), "loadtest failed: {v:#}");
    assert!(v["check_error"].is_null(), "{v:#}");
    assert_eq!(v["violation_count"], serde_json::json!(0), "{v:#}");
    assert_eq!(v["stopped_early"], serde_json::json!(true), "{v:#}");
    assert_eq!(v["hung_workers"], serde_json::json!([]), "{v:#}");
    let n = |k: &str| v["counts"][k].as_u64().unwrap();
    assert!(n("inserts_acked") > 100, "the load made no progress: {v:#}");
    assert!(n("updates_acked") > 20, "{v:#}");
    assert!(n("reads_ok") > 20, "{v:#}");
    let mut fatal = 0;
    for (k, count) in v["errors"]["by_code"].as_object().unwrap() {
        let code = k.split_once(':').map_or(k.as_str(), |x| x.1);
        if !retryable.contains(&code) {
            fatal += count.as_u64().unwrap();
        }
    }
    assert_eq!(fatal, 0, "non-retryable client errors: {:#}", v["errors"]);
    if retryable.is_empty() {
        assert_eq!(
            v["errors"]["total"],
            serde_json::json!(0),
            "{:#}",
            v["errors"]
        );
        assert_eq!(v["counts"]["inserts_uncertain"], serde_json::json!(0));
        assert_eq!(v["counts"]["ids_uncertain"], serde_json::json!(0));
    }
    // Every shard owning a range was read directly (else: shard_not_checked).
    let per = v["checked"]["rows_per_shard"].as_object().unwrap();
    let total: u64 = per.values().map(|x| x.as_u64().unwrap()).sum();
    assert_eq!(
        total,
        v["checked"]["rows_via_node"].as_u64().unwrap(),
        "{v:#}"
    );
}

/// The routing epoch node `i` publishes.
async fn epoch(c: &ProcCluster, i: usize) -> u64 {
    let (ok, out, err) = c.proxyctl(i, &["--json", "range", "list"]).await;
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["epoch"]
        .as_u64()
        .unwrap()
}

/// The preloaded rows of `items` (ids 1..=rows, version 1), exactly once,
/// each on the shard owning its point and nothing else; returns rows per
/// shard.
async fn check(c: &ProcCluster, dsns: &[String], rows: i64) -> Vec<usize> {
    check_with(c, dsns, rows, &[]).await
}

/// [`check`], with `copied` (version 1) besides the preloaded rows.
async fn check_with(c: &ProcCluster, dsns: &[String], rows: i64, copied: &[i64]) -> Vec<usize> {
    let (seen, per) = c.placed_rows(dsns, "SELECT id, version FROM items").await;
    let mut want: BTreeMap<i64, i32> = (1..=rows).map(|i| (i, 1)).collect();
    want.extend(copied.iter().map(|&i| (i, 1)));
    assert_eq!(seen.len(), want.len(), "items: rows lost or added");
    assert!(seen == want, "items: rows differ from what was loaded");
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

/// Waits until the load has inserted more rows (counted through node `i`)
/// than when called: the load goes on after what the test just did.
async fn load_goes_on(c: &ProcCluster, i: usize) {
    let db = connect(&c.nodes[i].dsn()).await.unwrap();
    let rows = || async {
        db.query_one("SELECT count(*) FROM hr_load", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    };
    let before = rows().await.unwrap();
    wait_for("the load's next rows", Duration::from_secs(30), || async {
        rows().await.is_ok_and(|n| n > before + 20)
    })
    .await;
}

/// Sharded COPYs of `items` through one node, in a loop: 40 new rows
/// each, in 4 CopyData messages. A COPY into a frozen range waits and
/// goes on; one that already wrote to the frozen range's source fails with
/// 40001 (and its rows must be absent).
struct Copier {
    stop: Arc<AtomicBool>,
    /// Rows of acknowledged COPYs so far.
    progress: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Vec<i64>, Vec<i64>, Vec<String>)>,
}

impl Copier {
    fn start(dsn: String) -> Copier {
        use futures_util::SinkExt;
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        let (st, pr) = (stop.clone(), progress.clone());
        let task = tokio::spawn(async move {
            let db = connect(&dsn).await.unwrap();
            let (mut acked, mut refused, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            let mut next = 10_000_000i64;
            while !st.load(Ordering::Relaxed) {
                let ids: Vec<i64> = (next..next + 40).collect();
                next += 40;
                let r = async {
                    let sink = db
                        .copy_in::<_, bytes::Bytes>("COPY items (id, version) FROM STDIN")
                        .await?;
                    let mut sink = std::pin::pin!(sink);
                    for part in ids.chunks(10) {
                        let text: String = part.iter().map(|i| format!("{i}\t1\n")).collect();
                        sink.send(bytes::Bytes::from(text)).await?;
                    }
                    sink.as_mut().finish().await
                }
                .await;
                match r {
                    Ok(n) => {
                        assert_eq!(n, 40);
                        acked.extend(ids);
                        pr.fetch_add(40, Ordering::Relaxed);
                    }
                    Err(e) if e.code().is_some_and(|c| c.code() == "40001") => refused.extend(ids),
                    Err(e) => errors.push(format!("{e:?}")),
                }
            }
            (acked, refused, errors)
        });
        Copier {
            stop,
            progress,
            task,
        }
    }

    /// Waits for the next acknowledged COPY.
    async fn goes_on(&self) {
        let before = self.progress.load(Ordering::Relaxed);
        wait_for(
            "the copier's next COPY",
            Duration::from_secs(30),
            || async { self.progress.load(Ordering::Relaxed) > before },
        )
        .await;
    }

    /// Acknowledged ids, ids of COPYs refused with 40001.
    async fn finish(self) -> (Vec<i64>, Vec<i64>) {
        self.stop.store(true, Ordering::Relaxed);
        let (acked, refused, errors) = self.task.await.unwrap();
        assert!(errors.is_empty(), "COPY errors: {errors:?}");
        eprintln!(
            "copier: {} COPYs acknowledged, {} refused with 40001",
            acked.len() / 40,
            refused.len() / 40
        );
        assert!(acked.len() >= 400, "the COPYs made no progress");
        (acked, refused)
    }
}

/// Issue 7: 2 shards → a third added with rebalance, then a range split
/// and moved, while `proxyctl loadtest` writes, updates and reads through
/// all 3 nodes: no client error, and its final check — through the nodes
/// and directly on the 3 shards, by the routing table after the moves —
/// finds no acknowledged row lost, duplicated or misplaced. The preloaded
/// `items` rows move too and are all where they belong; no slot or
/// publication is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_and_split_under_load_through_three_nodes() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 20_000).await;
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
    // The third shard's server exists from the start (its DSN goes to the
    // loadtest's check); it joins the catalog under load.
    let d = c.dir.0.join("s2");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let shards = [
        ("s0", c.shards[0].dsn()),
        ("s1", c.shards[1].dsn()),
        ("s2", extra.dsn()),
    ];
    let load = LoadTest::start(&c, &[0, 1, 2], &shards).await;
    let copier = Copier::start(c.nodes[2].dsn());
    copier.goes_on().await;
    let epoch_before = epoch(&c, 0).await;
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
    // The load and the COPYs go on by the final routing table.
    load_goes_on(&c, 0).await;
    copier.goes_on().await;
    let final_ranges = ranges(&c, 0).await;
    let epoch_after = epoch(&c, 0).await;
    assert!(epoch_after > epoch_before);
    let report = load.finish().await;
    let (copied, refused) = copier.finish().await;
    assert_clean(&report, &[]);
    // The check used the routing table after the moves: 3 shards, the
    // split range.
    assert_eq!(
        report["checked"]["epoch"],
        serde_json::json!(epoch_after),
        "{report:#}"
    );
    assert_eq!(ranges(&c, 0).await, final_ranges);
    let per = report["checked"]["rows_per_shard"].as_object().unwrap();
    assert_eq!(per.len(), 3, "{report:#}");
    for (name, n) in per {
        assert!(
            n.as_u64().unwrap() > 0,
            "no loadtest row on {name}: {report:#}"
        );
    }
    let dsns: Vec<String> = shards.iter().map(|s| s.1.clone()).collect();
    // The preloaded rows and every acknowledged COPY's rows, each once on
    // its owner; none of a refused COPY's (the set must be exact).
    let per = check_with(&c, &dsns, 20_000, &copied).await;
    assert!(per[2] > 0, "nothing moved to s2: {per:?}");
    assert!(refused.iter().all(|id| !copied.contains(id)));
    nothing_left(&dsns).await;
    drop(extra);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_during_catch_up_leaves_the_source_as_it_was() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 5_000).await;
    let shards = [("s0", c.shards[0].dsn()), ("s1", c.shards[1].dsn())];
    let load = LoadTest::start(&c, &[0, 1], &shards).await;
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
    // Too late (flipped already) fails the test: it needs an abort before.
    assert!(ok, "abort refused: {err}");
    let j = wait_phase(&c, 0, &id, &["aborted", "failed"], Duration::from_secs(60)).await;
    assert_eq!(j["phase"], serde_json::json!("aborted"), "{j}");
    // The load goes on after the abort.
    load_goes_on(&c, 0).await;
    let report = load.finish().await;
    assert_clean(&report, &[]);
    let dsns: Vec<String> = shards.iter().map(|s| s.1.clone()).collect();
    // The range is still s0's, and s1 holds nothing of it.
    let rs2 = ranges(&c, 0).await;
    assert_eq!(rs, rs2, "the routing table changed");
    check(&c, &dsns, 5_000).await;
    nothing_left(&dsns).await;
}

/// Connection trouble a client of a killed (or just restarted) node sees:
/// the loadtest counts such writes as uncertain, never as lost.
const NODE_DOWN: &[&str] = &["connection", "connect", "57P01", "57P03", "08006", "08003"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_survives_kill_of_its_node_during_copy_and_catch_up() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 300_000).await;
    let leader = c.leader(0).await.expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i as u64 + 1 != leader).collect();
    let shards = [("s0", c.shards[0].dsn()), ("s1", c.shards[1].dsn())];
    let load = LoadTest::start(&c, &others, &shards).await;
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
    let alive = others[0];
    let j = wait_phase(
        &c,
        alive,
        &id,
        &["catch_up", "cut_over", "flipped", "done"],
        Duration::from_secs(60),
    )
    .await;
    let mut second_kill = None;
    if j["phase"] == serde_json::json!("catch_up") {
        let l2 = c.leader(alive).await.unwrap();
        let l2i = (l2 - 1) as usize;
        let back = (leader - 1) as usize;
        tokio::task::block_in_place(|| c.nodes[back].start());
        // The restarted node is back in the quorum (it holds a lease)
        // before the next kill, or two of three nodes would be down.
        wait_for(
            "the restarted node's lease",
            Duration::from_secs(30),
            || async {
                c.status(back).await.is_some_and(|s| {
                    s["ready"] == serde_json::json!(true)
                        && s["lease_valid"] == serde_json::json!(true)
                })
            },
        )
        .await;
        c.nodes[l2i].kill9();
        second_kill = Some(l2i);
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
    // The restarted nodes serve again before the check reads through them.
    c.wait_ready(Duration::from_secs(30)).await;
    wait_for("every node's lease", Duration::from_secs(30), || async {
        let mut all = true;
        for i in 0..3 {
            all &= c
                .status(i)
                .await
                .is_some_and(|s| s["lease_valid"] == serde_json::json!(true));
        }
        all
    })
    .await;
    let report = load.finish().await;
    // The first node killed carried no load. Clients of the second one
    // (when it was a loadtest node) see connection errors while it is down
    // — retryable, their writes uncertain; nothing else.
    let load_node_killed = second_kill.is_some_and(|k| others.contains(&k));
    assert_clean(&report, if load_node_killed { NODE_DOWN } else { &[] });
    let dsns: Vec<String> = shards.iter().map(|s| s.1.clone()).collect();
    check(&c, &dsns, 300_000).await;
    nothing_left(&dsns).await;
}

/// Restarts every node of `c` with `HOTREPART_FAILPOINT=fp` and waits
/// until they serve.
async fn restart_all_with(c: &mut ProcCluster, fp: &str) {
    tokio::task::block_in_place(|| {
        for n in &mut c.nodes {
            n.kill9();
        }
        for n in &mut c.nodes {
            n.start_with_env(&[("HOTREPART_FAILPOINT", fp)]);
        }
    });
    c.wait_ready(Duration::from_secs(30)).await;
}

/// Issue 12 (D3): the flip's proposal is decided, but the runner is told
/// it timed out — on the last attempt it is allowed before giving up
/// (failpoint `reshard_flip_lost`). It used to "undo" the job on the
/// stale phase it had read: delete the range on the target, which owned
/// it since the flip, and record Failed. Now giving up is a catalog
/// decision (Aborting) that the catalog refuses after the flip: the job
/// goes on from Flipped to Done, and the new owner keeps every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flip_reported_lost_on_the_last_attempt_keeps_the_new_owners_rows() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    restart_all_with(&mut c, "reshard_flip_lost").await;
    setup(&c, 3_000).await;
    let rs = ranges(&c, 0).await;
    let lo = rs.iter().find(|r| r.2 == "s0").unwrap().0;
    let id = start_job(&c, 0, &["reshard", "move", &lo.to_string(), "--to", "s1"]).await;
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "failed", "aborted"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}\n{}", c.logs());
    // The failpoint did fire: the flip was reported lost on the fourth
    // attempt, and the runner then refused to give the job up.
    let logs = c.logs();
    assert!(
        logs.contains("reporting it as timed out"),
        "the failpoint did not fire:\n{logs}"
    );
    // Every row once, on its owner — s1 for the moved range.
    let dsns = vec![c.shards[0].dsn(), c.shards[1].dsn()];
    let per = check(&c, &dsns, 3_000).await;
    assert!(per[1] > per[0], "the range did not move to s1: {per:?}");
    let db = connect(&c.nodes[1].dsn()).await.unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3_000, "rows lost as seen through a node");
    nothing_left(&dsns).await;
}

/// Issue 12 (D4): `proxyctl range unfreeze` of a range frozen by a live
/// reshard job is refused (409, naming the job) — the job lifts its own
/// freeze; lifting it under the job would let writes reach the source
/// between its verification and its flip. The job still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfreezing_a_range_frozen_by_a_live_job_is_refused() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    restart_all_with(&mut c, "reshard_hold_freeze").await;
    setup(&c, 1_000).await;
    let rs = ranges(&c, 0).await;
    let lo = rs.iter().find(|r| r.2 == "s0").unwrap().0;
    let id = start_job(&c, 0, &["reshard", "move", &lo.to_string(), "--to", "s1"]).await;
    // Wait for the cut-over's freeze (held 3 s by the failpoint).
    let start = Instant::now();
    loop {
        let (ok, out, err) = c.proxyctl(1, &["--json", "range", "list"]).await;
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let frozen = v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["lo"] == serde_json::json!(lo) && r["status"] == "frozen");
        if frozen {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the range was never frozen: {v}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, _, err) = c.proxyctl(1, &["range", "unfreeze", &lo.to_string()]).await;
    assert!(!ok, "the unfreeze of a live job's freeze was accepted");
    assert!(
        err.contains(&format!("frozen by reshard job {id}"))
            && err.contains("proxyctl jobs abort")
            && err.contains("HTTP 409"),
        "{err}"
    );
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "failed", "aborted"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}");
    let dsns = vec![c.shards[0].dsn(), c.shards[1].dsn()];
    check(&c, &dsns, 1_000).await;
}

/// Issue 17: a client that wrote to the source and then sits idle in its
/// transaction held every cut-over back (the job failed after four
/// attempts). Now it is ended `cutover_idle_grace_ms` (default 2 s) after
/// the freeze: the move finishes, the idle client's transaction is rolled
/// back and its next statement fails (its connection to the shard ended),
/// and the node says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_writer_on_the_source_does_not_hold_a_move_back() {
    // Job steps wait 1 s each, so that the second writer can start in the
    // catch-up, after the capture began.
    let c = ProcCluster::start_with_env(
        3,
        2,
        "",
        TABLES,
        "lease_ms = 1000",
        &[("HOTREPART_TEST_JOB_STEP_DELAY_MS", "1000")],
    )
    .await;
    setup(&c, 1_000).await;
    let rs = ranges(&c, 0).await;
    let (lo, hi) = rs.iter().find(|r| r.2 == "s0").map(|r| (r.0, r.1)).unwrap();
    let k = (1..=1_000i64)
        .find(|&k| {
            let p = hotrepart_router::hash::hashint8extended(k, 0);
            p >= lo && hi.is_none_or(|h| p < h)
        })
        .unwrap();
    // The idle writer, through node 2.
    let idle = connect(&c.nodes[1].dsn()).await.unwrap();
    idle.batch_execute(&format!(
        "BEGIN; UPDATE items SET version = 99 WHERE id = {k}"
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    let id = start_job(&c, 0, &["reshard", "move", &lo.to_string(), "--to", "s1"]).await;
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "aborted", "failed"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        j["phase"],
        serde_json::json!("done"),
        "the move did not finish past the idle writer: {j}\n{}",
        c.logs()
    );
    eprintln!("move done in {:?} past an idle writer", t0.elapsed());
    // The idle client's transaction is gone: its next statement fails,
    // and its update never happened.
    let e = idle
        .batch_execute(&format!("UPDATE items SET version = 100 WHERE id = {k}"))
        .await
        .unwrap_err();
    eprintln!("the idle client then got: {e:?}");
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    check(&c, &dsns, 1_000).await;
    assert!(
        c.logs()
            .contains("ended a session idle in a transaction that held the"),
        "the node did not log the ended session:\n{}",
        c.logs()
    );
    // A new connection works, and sees the row unchanged on its new owner.
    let db = connect(&c.nodes[1].dsn()).await.unwrap();
    let v: i32 = db
        .query_one("SELECT version FROM items WHERE id = $1", &[&k])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1);

    // The range back to s0, with a writer that goes idle in the catch-up
    // (after the capture started): the cut-over's wait ends it.
    let id = start_job(&c, 0, &["reshard", "move", &lo.to_string(), "--to", "s0"]).await;
    wait_phase(&c, 0, &id, &["catch_up"], Duration::from_secs(60)).await;
    let idle = connect(&c.nodes[2].dsn()).await.unwrap();
    idle.batch_execute(&format!(
        "BEGIN; UPDATE items SET version = 98 WHERE id = {k}"
    ))
    .await
    .unwrap();
    let j = wait_phase(
        &c,
        0,
        &id,
        &["done", "aborted", "failed"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}\n{}", c.logs());
    assert!(idle.batch_execute("SELECT 1").await.is_err());
    assert!(
        c.logs()
            .contains("ended a session idle in a transaction that held the cut-over back"),
        "the cut-over did not end the idle writer:\n{}",
        c.logs()
    );
    check(&c, &dsns, 1_000).await;
}

/// A write a node sent to the source just before it died goes on inside
/// PostgreSQL (a backend notices its client is gone only when it answers).
/// Here it waits for an advisory lock before it inserts (no transaction id
/// yet, so the wait for the transactions open at the freeze does not see
/// it), and the lock is let go once the job flipped or retried its
/// cut-over. The cut-over must not flip the range while a statement that
/// started on the source before the freeze still runs: else the row lands
/// on the old owner after the move (after its cleanup: stranded there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_statement_still_running_on_the_source_does_not_land_after_the_move() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    setup(&c, 100).await;
    let leader = c.leader(0).await.expect("a leader");
    let x = (0..3).find(|&i| i as u64 + 1 != leader).unwrap();
    let alive = (0..3).find(|&i| i != x).unwrap();
    let (lo, hi, _) = ranges(&c, 0)
        .await
        .into_iter()
        .find(|r| r.2 == "s0")
        .unwrap();
    let k: i64 = (1_000_000..)
        .find(|&k| {
            let p = hotrepart_router::hash::hashint8extended(k, 0);
            p >= lo && hi.is_none_or(|h| p < h)
        })
        .unwrap();
    // On s0 the test holds advisory lock 4242; through node x an INSERT
    // into the range waits for it.
    let s0 = connect(&c.shards[0].dsn()).await.unwrap();
    s0.execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    let db = connect(&c.nodes[x].dsn()).await.unwrap();
    let slow = tokio::spawn(async move {
        db.execute(
            "INSERT INTO items (id, version, pad) VALUES ($1, 1, (SELECT pg_advisory_lock(4242))::text)",
            &[&k],
        )
        .await
    });
    let waiting = || async {
        s0.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_advisory_lock(4242))::text%' \
             AND state = 'active' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    };
    wait_for("the blocked insert on s0", Duration::from_secs(10), waiting).await;
    c.nodes[x].kill9();
    assert!(slow.await.unwrap().is_err(), "its node died");
    let id = start_job(
        &c,
        alive,
        &["reshard", "move", &lo.to_string(), "--to", "s1"],
    )
    .await;
    // Let the insert go once the job flipped, or retried a cut-over
    // because of it.
    wait_for(
        "the flip or a retried cut-over",
        Duration::from_secs(60),
        || async {
            let j = job(&c, alive, &id).await;
            ["flipped", "done", "failed", "aborted"]
                .iter()
                .any(|p| j["phase"] == serde_json::json!(p))
                || j["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("cut-over retried"))
        },
    )
    .await;
    let note = job(&c, alive, &id).await["note"].clone();
    eprintln!("letting the insert go; the job's note: {note}");
    s0.execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    let j = wait_phase(
        &c,
        alive,
        &id,
        &["done", "failed", "aborted"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(j["phase"], serde_json::json!("done"), "{j}");
    wait_for("the insert to end", Duration::from_secs(30), || async {
        !waiting().await
    })
    .await;
    let on = |dsn: String| async move {
        connect(&dsn)
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM items WHERE id = $1", &[&k])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let (a, b) = (on(c.shards[0].dsn()).await, on(c.shards[1].dsn()).await);
    assert_eq!(
        (a, b),
        (0, 1),
        "the dead node's row (committed before the flip) on s0, the old owner, and on s1"
    );
    tokio::task::block_in_place(|| c.nodes[x].start());
}
