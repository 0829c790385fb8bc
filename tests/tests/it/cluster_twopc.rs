//! Two-phase commit with the decisions in the replicated catalog, across
//! real `hotrepart serve` processes: 3 nodes, 2 PostgreSQL shards. A node
//! started with `HOTREPART_FAILPOINT` aborts in the middle of a commit; the
//! cluster's leader (another node) finishes the in-doubt transaction by the
//! decision in the log — commit when one was recorded, rollback when none
//! was — and leaves no prepared transaction behind. A normal multi-shard
//! commit records one decision (a log entry) and leaves the epoch alone.
#![allow(clippy::unwrap_used)]

use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::time::{Duration, Instant};

/// Top-level keys: a prepared transaction is in doubt after 3 s (long
/// enough to see it prepared after the crash, short enough for the test),
/// and the resolver looks every 100 ms.
const HEAD: &str = "twopc_grace_ms = 3000\ntwopc_resolver_interval_ms = 100\n";
const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";
/// How long the resolver may take once the grace period is over.
const RESOLVE_BOUND: Duration = Duration::from_secs(20);

/// `proxyctl --json status` of node `i`, retried until it answers.
async fn status(c: &ProcCluster, i: usize) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = c.status(i).await {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node {} does not answer status; logs:\n{}",
            i + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log entries applied on node `i`.
async fn applied(c: &ProcCluster, i: usize) -> u64 {
    status(c, i).await["cluster"]["applied"].as_u64().unwrap()
}

/// Waits until node `i`'s catalog holds no 2PC decision (every one
/// forgotten).
async fn forgotten(c: &ProcCluster, i: usize) {
    wait_for(
        "every 2PC decision to be forgotten",
        Duration::from_secs(10),
        || async { status(c, i).await["cluster"]["decisions"].as_u64() == Some(0) },
    )
    .await;
}

/// Waits until node `i` has the catalog and a valid lease (it routes).
async fn routes(c: &ProcCluster, i: usize) {
    let start = Instant::now();
    loop {
        if let Some(s) = c.status(i).await {
            if s["ready"] == serde_json::json!(true) && s["lease_valid"] == serde_json::json!(true)
            {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node {} does not route; logs:\n{}",
            i + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader as node `i` sees it, waiting for one.
async fn leader(c: &ProcCluster, i: usize) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(l) = c.leader(i).await {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no leader; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` keys owned by each shard: (keys on s0, keys on s1).
async fn keys(c: &ProcCluster, n: usize) -> (Vec<i64>, Vec<i64>) {
    let ranges = c.ranges(0).await;
    let owner = |id: i64| {
        let p = hashint8extended(id, 0);
        ranges
            .iter()
            .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
            .unwrap()
            .2
            .clone()
    };
    let pick = |s: &str| {
        (1..100_000i64)
            .filter(|&k| owner(k) == s)
            .take(n)
            .collect::<Vec<_>>()
    };
    (pick("s0"), pick("s1"))
}

/// The `hr_` transactions prepared on each shard.
async fn prepared(c: &ProcCluster) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for s in &c.shards {
        let db = connect(&s.dsn()).await.unwrap();
        all.push(
            db.query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'hr\\_%' ORDER BY gid",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
        );
    }
    all
}

/// Whether row `id` is committed on shard `i` (read directly).
async fn on_shard(c: &ProcCluster, i: usize, id: i64) -> bool {
    let db = connect(&c.shards[i].dsn()).await.unwrap();
    db.query_opt("SELECT 1 FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .is_some()
}

/// A transaction through node `i` writing `a` (on s0) and `b` (on s1).
async fn two_shard_tx(c: &ProcCluster, i: usize, a: i64, b: i64) -> Result<(), String> {
    let db = connect(&c.nodes[i].dsn()).await.map_err(|e| say(&e))?;
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO items (id, v) VALUES ({a}, 'a')"
    ))
    .await
    .map_err(|e| say(&e))?;
    db.batch_execute(&format!("INSERT INTO items (id, v) VALUES ({b}, 'b')"))
        .await
        .map_err(|e| say(&e))?;
    db.batch_execute("COMMIT").await.map_err(|e| say(&e))
}

/// An error as the test reports it: SQLSTATE and message for a server's.
fn say(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_finishes_in_doubt_transactions_by_the_replicated_decision() {
    let mut c = ProcCluster::start_with(3, 2, HEAD, TABLES, "").await;
    for i in 0..3 {
        routes(&c, i).await;
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (k0, k1) = keys(&c, 8).await;

    // A normal multi-shard transaction through a follower: committed on
    // both shards, with exactly one new log entry (its decision) on every
    // node, and the same epoch (a decision is not a routing change).
    let l = leader(&c, 0).await;
    let f = (0..3).find(|&i| i as u64 + 1 != l).unwrap();
    let epoch0 = status(&c, f).await["epoch"].as_u64().unwrap();
    // The CREATE TABLE above was itself a two-shard transaction (atomic
    // DDL): its forget entry must be in before counting.
    forgotten(&c, f).await;
    let before = applied(&c, f).await;
    two_shard_tx(&c, f, k0[0], k1[0]).await.unwrap();
    assert!(on_shard(&c, 0, k0[0]).await && on_shard(&c, 1, k1[0]).await);
    assert_eq!(prepared(&c).await, vec![Vec::<String>::new(); 2]);
    // The decision, then (at the node's next resolver tick) the entry that
    // forgets it: the coordinator finished it on both shards.
    forgotten(&c, f).await;
    let after = applied(&c, f).await;
    assert_eq!(after, before + 2, "a decision entry and a forget entry");
    for i in 0..3 {
        let cr = &c;
        wait_for(
            "every node to apply the decision",
            Duration::from_secs(10),
            || async move { applied(cr, i).await >= after },
        )
        .await;
        assert_eq!(status(&c, i).await["epoch"].as_u64(), Some(epoch0));
    }
    // A one-shard transaction commits without a decision.
    let db_f = connect(&c.nodes[f].dsn()).await.unwrap();
    db_f.batch_execute(&format!(
        "BEGIN; INSERT INTO items (id, v) VALUES ({}, 'x'); INSERT INTO items (id, v) VALUES ({}, 'y'); COMMIT",
        k0[1], k0[2]
    ))
    .await
    .unwrap();
    assert_eq!(applied(&c, f).await, after, "no log entry for one shard");
    // The same through the leader.
    let li = (l - 1) as usize;
    let before = applied(&c, li).await;
    two_shard_tx(&c, li, k0[3], k1[3]).await.unwrap();
    assert!(on_shard(&c, 0, k0[3]).await && on_shard(&c, 1, k1[3]).await);
    forgotten(&c, li).await;
    assert_eq!(applied(&c, li).await, before + 2);

    // The crashes: (failpoint, committed in the end?, shards with a
    // prepared transaction right after the crash).
    let cases = [
        ("twopc_after_decision", true, 2),
        ("twopc_after_first_commit", true, 1),
        ("twopc_after_prepare", false, 2),
    ];
    for (n, &(fp, commit, in_doubt)) in cases.iter().enumerate() {
        let (a, b) = (k0[4 + n], k1[4 + n]);
        // Node A: not the leader, restarted with the failpoint.
        let l = leader(&c, 0).await;
        let ai = (0..3).find(|&i| i as u64 + 1 != l).unwrap();
        let a_id = ai as u64 + 1;
        tokio::task::block_in_place(|| {
            c.nodes[ai].kill9();
            c.nodes[ai].start_with_env(&[("HOTREPART_FAILPOINT", fp)]);
        });
        routes(&c, ai).await;
        let r = two_shard_tx(&c, ai, a, b).await;
        assert!(r.is_err(), "{fp}: the COMMIT through node {a_id} succeeded");
        let start = Instant::now();
        while !c.nodes[ai].exited() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{fp}: node {a_id} did not abort"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let crashed = Instant::now();
        // In doubt now: prepared under node A's gid (the grace period has
        // not passed yet).
        let p = prepared(&c).await;
        let gids: Vec<String> = p.iter().flatten().cloned().collect();
        assert_eq!(
            gids.len(),
            in_doubt,
            "{fp}: prepared after the crash: {p:?}"
        );
        assert!(
            gids.iter().all(|g| g.starts_with(&format!("hr_{a_id}_"))),
            "{fp}: {gids:?}"
        );
        if in_doubt == 1 {
            // One shard committed already, the other is prepared.
            let committed = [on_shard(&c, 0, a).await, on_shard(&c, 1, b).await];
            assert_eq!(
                committed.iter().filter(|&&x| x).count(),
                1,
                "{fp}: {committed:?}"
            );
        }
        // The leader (another node) finishes it by the log's decision.
        let start = Instant::now();
        loop {
            let p = prepared(&c).await;
            if p.iter().all(Vec::is_empty) {
                break;
            }
            assert!(
                start.elapsed() < RESOLVE_BOUND,
                "{fp}: still prepared after {:?}: {p:?}; logs:\n{}",
                start.elapsed(),
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...finished by another node's resolver (the leader's). It logs
        // once its COMMIT/ROLLBACK PREPARED has returned, which may be a
        // moment after the shards show the transaction gone: the logs are
        // read until the line is there (at most 5 s).
        let finished_by = || -> Vec<u64> {
            c.nodes
                .iter()
                .filter(|n| {
                    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                    log.lines().any(|l| {
                        l.contains("finished an in-doubt transaction")
                            && l.contains(gids[0].as_str())
                    })
                })
                .map(|n| n.id)
                .collect()
        };
        let logged = Instant::now();
        let mut by = finished_by();
        while by.is_empty() && logged.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            by = finished_by();
        }
        assert!(
            !by.is_empty() && !by.contains(&a_id),
            "{fp}: {} finished by nodes {by:?}",
            gids[0]
        );
        eprintln!(
            "{fp}: node {a_id} crashed (leader {l}); node(s) {by:?} resolved it {:?} after the crash (grace 3 s)",
            crashed.elapsed()
        );
        assert_eq!(
            [on_shard(&c, 0, a).await, on_shard(&c, 1, b).await],
            [commit, commit],
            "{fp}: rows after resolution"
        );
        // Through the cluster too.
        let other = (0..3).find(|&i| i != ai).unwrap();
        let db = connect(&c.nodes[other].dsn()).await.unwrap();
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM items WHERE id = ANY($1)",
                &[&vec![a, b]],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, if commit { 2 } else { 0 }, "{fp}");
        // A comes back without the failpoint.
        tokio::task::block_in_place(|| c.nodes[ai].start());
        routes(&c, ai).await;
    }
    // Epoch untouched by all of it; the crashed coordinators' decisions
    // are swept by the leader once no shard holds their transaction.
    for i in 0..3 {
        assert_eq!(status(&c, i).await["epoch"].as_u64(), Some(epoch0));
        forgotten(&c, i).await;
    }
    // The nodes' files agree with the catalog they seeded: no warning.
    let logs = c.logs();
    assert!(
        !logs.contains("differ from the replicated catalog"),
        "spurious seed warning:\n{logs}"
    );
}

/// `n` keys whose point the routing table (as node 0 has it) gives to
/// `shard`.
async fn keys_on(c: &ProcCluster, n: usize, shard: &str) -> Vec<i64> {
    let ranges = c.ranges(0).await;
    (1..200_000i64)
        .filter(|&k| {
            let p = hashint8extended(k, 0);
            ranges
                .iter()
                .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
                .is_some_and(|r| r.2 == shard)
        })
        .take(n)
        .collect()
}

/// Runs `proxyctl` on node `i` and expects success; returns stdout.
async fn ctl(c: &ProcCluster, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(i, args).await;
    assert!(ok, "proxyctl {args:?}: {err}\nlogs:\n{}", c.logs());
    out
}

/// Issue 12 (D2): a shard added at run time (`reshard add-shard`) has a
/// catalog shard index past the configuration file's list. The resolver
/// indexed the file's list with it and panicked on every leader — silently
/// (a bare `tokio::spawn`) — leaving a transaction committed on two shards
/// and prepared on the third. Now it finishes a transaction in doubt on all
/// three shards, and `status` shows it running without restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_resolver_finishes_in_doubt_transactions_on_a_shard_added_at_run_time() {
    let mut c = ProcCluster::start_with(3, 2, HEAD, TABLES, "").await;
    for i in 0..3 {
        routes(&c, i).await;
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    // A third PostgreSQL joins the catalog at run time and gets half of
    // s1's range (empty: a metadata-only assignment).
    let d = c.dir.0.join("s2");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    ctl(
        &c,
        0,
        &["reshard", "add-shard", "s2", "--dsn", &extra.dsn()],
    )
    .await;
    let lo = c.ranges(0).await.iter().find(|r| r.2 == "s1").unwrap().0;
    ctl(&c, 0, &["range", "split", &lo.to_string()]).await;
    let upper = c
        .ranges(0)
        .await
        .iter()
        .filter(|r| r.2 == "s1")
        .map(|r| r.0)
        .max()
        .unwrap();
    ctl(
        &c,
        0,
        &["range", "assign", &upper.to_string(), "--to", "s2"],
    )
    .await;
    let want_epoch = status(&c, 0).await["epoch"].as_u64().unwrap();
    for i in 0..3 {
        let cr = &c;
        wait_for(
            "every node to route by the new table",
            Duration::from_secs(10),
            || async move { status(cr, i).await["epoch"].as_u64() >= Some(want_epoch) },
        )
        .await;
    }
    let (a, b, e) = (
        keys_on(&c, 1, "s0").await[0],
        keys_on(&c, 1, "s1").await[0],
        keys_on(&c, 1, "s2").await[0],
    );

    // A non-leader node records the commit decision and dies before any
    // COMMIT PREPARED: the transaction is in doubt on all three shards.
    let l = leader(&c, 0).await;
    let ai = (0..3).find(|&i| i as u64 + 1 != l).unwrap();
    tokio::task::block_in_place(|| {
        c.nodes[ai].kill9();
        c.nodes[ai].start_with_env(&[("HOTREPART_FAILPOINT", "twopc_after_decision")]);
    });
    routes(&c, ai).await;
    let r = async {
        let db = connect(&c.nodes[ai].dsn())
            .await
            .map_err(|e| e.to_string())?;
        db.batch_execute("BEGIN").await.map_err(|e| e.to_string())?;
        for (k, v) in [(a, "a"), (b, "b"), (e, "e")] {
            db.batch_execute(&format!("INSERT INTO items (id, v) VALUES ({k}, '{v}')"))
                .await
                .map_err(|e| e.to_string())?;
        }
        db.batch_execute("COMMIT").await.map_err(|e| e.to_string())
    }
    .await;
    assert!(
        r.is_err(),
        "the COMMIT through the failpoint node succeeded"
    );
    let start = Instant::now();
    while !c.nodes[ai].exited() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the node did not abort ({r:?}); logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let extra_db = connect(&extra.dsn()).await.unwrap();
    let on_new: i64 = extra_db
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'hr\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_new, 1, "in doubt on the new shard");

    // The leader's resolver commits it on every shard, the new one included.
    let start = Instant::now();
    loop {
        let mut left = prepared(&c).await.into_iter().flatten().count() as i64;
        left += extra_db
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'hr\\_%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < RESOLVE_BOUND,
            "{left} prepared transaction(s) left after {:?}; logs:\n{}",
            start.elapsed(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(on_shard(&c, 0, a).await && on_shard(&c, 1, b).await);
    let n: i64 = extra_db
        .query_one("SELECT count(*) FROM items WHERE id = $1", &[&e])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the row on the added shard is committed");
    // Every running node's resolver is up and never had to be restarted.
    for i in (0..3).filter(|&i| i != ai) {
        let tasks = status(&c, i).await["tasks"].clone();
        let resolver = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "twopc_resolver")
            .cloned()
            .unwrap_or_else(|| panic!("no resolver task in {tasks}"));
        assert_eq!(resolver["state"], "running", "{resolver}");
        assert_eq!(resolver["restarts"], 0, "{resolver}");
    }
    let (_, table, _) = c.proxyctl((ai + 1) % 3, &["status"]).await;
    assert!(
        table.contains("twopc_resolver") && table.contains("RUNNING"),
        "{table}"
    );
    drop(extra);
}

/// Issue 17, catalog growth: 2,000 multi-shard commits through three nodes
/// leave no decision behind (each coordinator forgets its own, in
/// batches), the number held at once stays bounded, and a node added
/// afterwards catches up from the compacted catalog (the log is compacted
/// every 1,000 entries) and commits across shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_stay_bounded_over_many_commits_and_a_new_node_catches_up() {
    const COMMITS: usize = 2_000;
    const WORKERS: usize = 6;
    let mut c = ProcCluster::start_with(3, 2, HEAD, TABLES, "").await;
    for i in 0..3 {
        routes(&c, i).await;
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (k0, k1) = keys(&c, WORKERS + 1).await;
    for k in k0[..WORKERS].iter().chain(&k1[..WORKERS]) {
        db.execute("INSERT INTO items (id, v) VALUES ($1, '')", &[k])
            .await
            .unwrap();
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = connect(&c.nodes[w % 3].dsn()).await.unwrap();
        let done = done.clone();
        let (a, b) = (k0[w], k1[w]);
        workers.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            while done.load(SeqCst) < COMMITS && Instant::now() < deadline {
                // One statement per string: a string is routed whole.
                for sql in [
                    format!("BEGIN; UPDATE items SET v = 'x' WHERE id = {a}"),
                    format!("UPDATE items SET v = 'y' WHERE id = {b}"),
                    "COMMIT".to_string(),
                ] {
                    client.batch_execute(&sql).await.unwrap();
                }
                done.fetch_add(1, SeqCst);
            }
        }));
    }
    let mut most = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        for i in 0..3 {
            if let Some(s) = c.status(i).await {
                most = most.max(s["cluster"]["decisions"].as_u64().unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let n = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n >= COMMITS, "only {n} commits in the time allowed");
    eprintln!("{n} commits; at most {most} decisions held at once on a node");
    // In flight plus a resolver tick's worth, not one per commit.
    assert!(
        most <= (COMMITS / 4) as u64,
        "{most} decisions held at once after {n} commits"
    );
    for i in 0..3 {
        forgotten(&c, i).await;
    }
    assert!(
        applied(&c, 0).await as usize > COMMITS,
        "one entry per commit at least"
    );
    assert_eq!(prepared(&c).await, vec![Vec::<String>::new(); 2]);

    // A fourth node joins and catches up.
    let j = c.start_joining_node();
    let addr = format!("127.0.0.1:{}", c.nodes[j].peer_port);
    let admin = c.nodes[j].admin_url();
    let (ok, _, err) = c
        .proxyctl(0, &["node", "add", "4", "--addr", &addr, "--admin", &admin])
        .await;
    assert!(ok, "node add: {err}\n{}", c.logs());
    routes(&c, j).await;
    let target = applied(&c, 0).await;
    let cr = &c;
    wait_for(
        "node 4 to apply the whole log",
        Duration::from_secs(30),
        || async move { applied(cr, j).await >= target },
    )
    .await;
    let st = status(&c, j).await;
    assert_eq!(st["cluster"]["decisions"].as_u64(), Some(0), "{st}");
    assert!(
        st["cluster"]["compacted"].as_u64().unwrap_or(0) > 0,
        "node 4 loaded a compacted catalog: {st}"
    );
    // It routes and commits across shards; its decision is forgotten too.
    two_shard_tx(&c, j, k0[WORKERS], k1[WORKERS]).await.unwrap();
    assert!(on_shard(&c, 0, k0[WORKERS]).await && on_shard(&c, 1, k1[WORKERS]).await);
    forgotten(&c, j).await;
}

/// The job of `reshard` call `out` (`--json`), waited for until it ends
/// (asked on node `i`); returns its final record.
async fn job_end(c: &ProcCluster, i: usize, id: &str, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(j) = c.admin_get(i, &format!("/v1/jobs/{id}")).await {
            let phase = j["phase"].as_str().unwrap_or_default().to_string();
            if ["done", "aborted", "failed"].contains(&phase.as_str()) {
                return j;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "job {id} did not end in {timeout:?}; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Job `id`'s phase as node `i` has it ("" while it does not answer).
async fn job_phase(c: &ProcCluster, i: usize, id: &str) -> String {
    c.admin_get(i, &format!("/v1/jobs/{id}"))
        .await
        .and_then(|j| j["phase"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The open safety question of the session of 2026-12-05: a transfer
/// acknowledged as committed was found on one shard only, its rows on the
/// other in a range that was moving. This forces that shape: a 2PC
/// transaction whose coordinator crashed (in doubt, finished later by
/// the resolver) holds a write to a moving range on its source — prepared
/// before the job starts (the capture's slot must wait for it), and
/// prepared during the catch-up (the cut-over must wait for it: a prepared
/// transaction is open on the source). Whatever the decision, the moved
/// range ends on the target exactly as the decision says, nothing is left
/// on the source, and nothing stays prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_doubt_transaction_on_a_moving_range_moves_with_its_decision() {
    // Every job step waits 1.5 s, so the catch-up lasts long enough to
    // crash a coordinator in it.
    let mut c = ProcCluster::start_with_env(
        3,
        2,
        HEAD,
        TABLES,
        "lease_ms = 1000",
        &[("HOTREPART_TEST_JOB_STEP_DELAY_MS", "1500")],
    )
    .await;
    for i in 0..3 {
        routes(&c, i).await;
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=400).map(|i| format!("({i}, 'pre')")).collect();
    db.batch_execute(&format!(
        "INSERT INTO items (id, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    let mut expected: std::collections::BTreeMap<String, String> = (1..=400)
        .map(|i| (i.to_string(), "pre".to_string()))
        .collect();
    // (failpoint, committed in the end, crash during the job's catch-up
    // rather than before the job)
    let cases = [
        ("twopc_after_decision", true, true),
        ("twopc_after_prepare", false, true),
        ("twopc_after_decision", true, false),
        ("twopc_after_first_commit", true, true),
    ];
    // Keys written by the cases (each case writes fresh ones).
    let mut used: Vec<i64> = Vec::new();
    for &(fp, commit, during) in &cases {
        // `a`: a key of s0 whose point starts a range of its own (split
        // off s0's range at the point), moved to s1; `b` on s1.
        let a = keys_on(&c, 1000, "s0")
            .await
            .into_iter()
            .find(|k| *k > 400 && !used.contains(k))
            .unwrap();
        let b = keys_on(&c, 1000, "s1")
            .await
            .into_iter()
            .find(|k| *k > 400 && !used.contains(k))
            .unwrap();
        used.extend([a, b]);
        let p = hashint8extended(a, 0);
        let l = leader(&c, 0).await;
        let li = (l - 1) as usize;
        let rs = c.ranges(li).await;
        let lo = rs
            .iter()
            .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
            .unwrap()
            .0;
        if lo != p {
            ctl(
                &c,
                li,
                &["range", "split", &lo.to_string(), "--at", &p.to_string()],
            )
            .await;
        }
        let ai = (0..3).find(|&i| i != li).unwrap();
        tokio::task::block_in_place(|| {
            c.nodes[ai].kill9();
            c.nodes[ai].start_with_env(&[("HOTREPART_FAILPOINT", fp)]);
        });
        routes(&c, ai).await;
        let mut job = None;
        if during {
            let id = start_move(&c, li, p).await;
            // Crash the coordinator while the job catches up.
            let t0 = Instant::now();
            loop {
                let ph = job_phase(&c, li, &id).await;
                if ph == "catch_up" {
                    break;
                }
                assert!(
                    ph != "cut_over" && ph != "done" && t0.elapsed() < Duration::from_secs(60),
                    "{fp}: the job is {ph:?}, the test missed its catch-up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            job = Some(id);
        }
        let r = two_shard_tx(&c, ai, a, b).await;
        assert!(
            r.is_err(),
            "{fp}: the COMMIT through node {} succeeded",
            ai + 1
        );
        let t0 = Instant::now();
        while !c.nodes[ai].exited() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{fp}: node {} did not abort; the transaction said {r:?}",
                ai + 1
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let in_doubt: usize = prepared(&c).await.iter().map(Vec::len).sum();
        assert!(in_doubt >= 1, "{fp}: nothing prepared after the crash");
        if during {
            assert_eq!(
                job_phase(&c, li, job.as_deref().unwrap()).await,
                "catch_up",
                "{fp}: the crash came too late to be in the catch-up"
            );
        }
        let id = match job {
            Some(id) => id,
            None => start_move(&c, li, p).await,
        };
        let j = job_end(&c, li, &id, Duration::from_secs(120)).await;
        assert_eq!(
            j["phase"],
            serde_json::json!("done"),
            "{fp}: {j}\nlogs:\n{}",
            c.logs()
        );
        wait_for("no transaction left prepared", RESOLVE_BOUND, || async {
            prepared(&c).await.iter().all(Vec::is_empty)
        })
        .await;
        // The crashed node back (the checks read node 1's routing table).
        tokio::task::block_in_place(|| {
            c.nodes[ai].kill9();
            c.nodes[ai].start();
        });
        routes(&c, ai).await;
        if commit {
            expected.insert(a.to_string(), "a".into());
            expected.insert(b.to_string(), "b".into());
        }
        // Every row once, on its owner (placed_rows_with panics otherwise),
        // and exactly the expected ones: `a` on s1 now, as decided.
        let (seen, _) = c
            .placed_rows_with(&dsns, "SELECT id, v FROM items", |row| {
                let id: i64 = row.get(0);
                let v: String = row.get(1);
                (id.to_string(), hashint8extended(id, 0), v)
            })
            .await;
        assert_eq!(
            on_shard(&c, 1, a).await,
            commit,
            "{fp} (during the job: {during}): row {a} on the range's new owner"
        );
        assert!(
            !on_shard(&c, 0, a).await,
            "{fp}: row {a} left on the source"
        );
        assert!(
            seen == expected,
            "{fp} (during the job: {during}): rows differ from the decisions: missing {:?}, extra {:?}",
            expected.keys().filter(|k| !seen.contains_key(*k)).collect::<Vec<_>>(),
            seen.iter().filter(|(k, v)| expected.get(*k) != Some(v)).collect::<Vec<_>>()
        );
        eprintln!("{fp} (during the job: {during}): job {id} done, the row moved as decided (committed: {commit})");
    }
}

/// Starts moving the range that begins at point `lo` to s1 through node
/// `i`; returns the job id.
async fn start_move(c: &ProcCluster, i: usize, lo: u64) -> String {
    let out = ctl(
        c,
        i,
        &["--json", "reshard", "move", &lo.to_string(), "--to", "s1"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["job"].as_str().unwrap().to_string()
}
