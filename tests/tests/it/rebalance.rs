//! Issue 12 (D12): `reshard add-shard --rebalance` balances rows, not
//! ranges. Three shards, one holding most rows (6000 / 1000 / 1000): the
//! new fourth shard must end with about a quarter of them — taken from the
//! full shard, whose range is split where the rows are — and `--dry-run`
//! shows that plan (as a table, and as JSON for scripts) without changing
//! anything. `drain --dry-run` likewise.
#![allow(clippy::unwrap_used)]

use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::time::{Duration, Instant};

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

async fn ctl(c: &ProcCluster, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(0, args).await;
    assert!(ok, "proxyctl {args:?}: {err}\nlogs:\n{}", c.logs());
    out
}

async fn ctl_json(c: &ProcCluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ctl(c, &all).await).unwrap()
}

/// What an operator can see of the cluster: ranges, shards, jobs.
async fn state(c: &ProcCluster) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    (
        ctl_json(c, &["range", "list"]).await["ranges"].clone(),
        ctl_json(c, &["shard", "list"]).await["shards"].clone(),
        ctl_json(c, &["jobs", "list"]).await["jobs"].clone(),
    )
}

fn sum_rows(plan: &serde_json::Value) -> u64 {
    plan["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rows"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_shard_rebalance_gives_the_new_shard_its_share_of_rows() {
    let c = ProcCluster::start(3, 3, TABLES, "lease_ms = 1000").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL)")
        .await
        .unwrap();
    // Skewed: 6000 rows on s0, 1000 on s1 and s2 (written on their owners).
    let ranges = c.ranges(0).await;
    let owner = |id: i64| {
        let p = hashint8extended(id, 0);
        let r = ranges
            .iter()
            .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
            .unwrap();
        r.2[1..].parse::<usize>().unwrap()
    };
    let want = [6000usize, 1000, 1000];
    let mut ids: Vec<Vec<i64>> = vec![Vec::new(); 3];
    let mut id = 0i64;
    while ids.iter().zip(want).any(|(v, w)| v.len() < w) {
        id += 1;
        let o = owner(id);
        if ids[o].len() < want[o] {
            ids[o].push(id);
        }
    }
    for (i, list) in ids.iter().enumerate() {
        let s = connect(&c.shards[i].dsn()).await.unwrap();
        s.execute("INSERT INTO items SELECT unnest($1::int8[]), 1", &[list])
            .await
            .unwrap();
    }
    let d = c.dir.0.join("s3");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let dsn = extra.dsn();

    // A unique index without the shard key, made on a shard directly
    // (through the node it is refused): enforced per shard, so adding a
    // shard is refused, the dry run too, until it is gone.
    let s0 = connect(&c.shards[0].dsn()).await.unwrap();
    s0.batch_execute("CREATE UNIQUE INDEX items_n_bad ON items (n) WHERE id < 0")
        .await
        .unwrap();
    for dry in [true, false] {
        let mut args = vec!["reshard", "add-shard", "s3", "--dsn", &dsn, "--rebalance"];
        if dry {
            args.push("--dry-run");
        }
        let (ok, out, err) = c.proxyctl(0, &args).await;
        assert!(!ok, "add-shard with a unique index without the key: {out}");
        assert!(
            err.contains("items_n_bad") && err.contains("does not include its shard key \"id\""),
            "{err}"
        );
    }
    let (ok, out, _) = c.proxyctl(0, &["shard", "list"]).await;
    assert!(ok && !out.contains("s3"), "{out}");
    s0.batch_execute("DROP INDEX items_n_bad").await.unwrap();

    // The plan, without changing anything.
    let before = state(&c).await;
    let plan = ctl_json(
        &c,
        &[
            "reshard",
            "add-shard",
            "s3",
            "--dsn",
            &dsn,
            "--rebalance",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["basis"], "rows", "{plan}");
    assert_eq!(plan["total_rows"], 8000, "{plan}");
    assert_eq!(plan["share"], 2000, "{plan}");
    assert_eq!(plan["rows"]["s0"], 6000, "{plan}");
    assert_eq!(plan["rows"]["s3"], 0, "{plan}");
    let moves = plan["moves"].as_array().unwrap();
    assert!(!moves.is_empty(), "{plan}");
    assert!(
        moves.iter().all(|m| m["from"] == "s0" && m["to"] == "s3"),
        "{plan}"
    );
    let planned = sum_rows(&plan);
    assert!((1800..=2200).contains(&planned), "{plan}");
    let text = ctl(
        &c,
        &[
            "reshard",
            "add-shard",
            "s3",
            "--dsn",
            &dsn,
            "--rebalance",
            "--dry-run",
        ],
    )
    .await;
    for word in [
        "RANGE",
        "FROM",
        "TO",
        "EST. ROWS",
        "s0",
        "s3",
        "split from",
        "nothing was changed",
    ] {
        assert!(text.contains(word), "{word:?} missing in:\n{text}");
    }
    assert_eq!(state(&c).await, before, "a dry run changed the cluster");
    let new = connect(&dsn).await.unwrap();
    let has: bool = new
        .query_one("SELECT to_regclass('items') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!has, "a dry run copied the schema to the new shard");

    // The real thing.
    let v = ctl_json(
        &c,
        &["reshard", "add-shard", "s3", "--dsn", &dsn, "--rebalance"],
    )
    .await;
    let jobs: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap().to_string())
        .collect();
    assert!(!jobs.is_empty(), "{v}");
    let start = Instant::now();
    loop {
        let list = ctl_json(&c, &["jobs", "list"]).await;
        let mine: Vec<&serde_json::Value> = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| jobs.iter().any(|id| j["job"] == id.as_str()))
            .collect();
        if mine.iter().all(|j| j["done"] == true) {
            for j in mine {
                assert_eq!(j["phase"], "done", "{j}");
            }
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "jobs not done: {list}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every row once, on its owner; the new shard holds about a quarter.
    let dsns: Vec<String> = c
        .shards
        .iter()
        .map(|s| s.dsn())
        .chain([dsn.clone()])
        .collect();
    let (rows, per) = c.placed_rows(&dsns, "SELECT id, n FROM items").await;
    assert_eq!(rows.len(), 8000, "{per:?}");
    assert!(
        (1700..=2300).contains(&per[3]),
        "the new shard holds {} of 8000 rows (share 2000): {per:?}",
        per[3]
    );
    assert_eq!(per[1], 1000);
    assert_eq!(per[2], 1000);
    eprintln!("planned {planned} rows for s3; rows per shard after: {per:?}");

    // A drain, planned only.
    let before = state(&c).await;
    let plan = ctl_json(&c, &["reshard", "drain", "s3", "--dry-run"]).await;
    assert_eq!(plan["dry_run"], true, "{plan}");
    let moves = plan["moves"].as_array().unwrap();
    assert!(
        !moves.is_empty() && moves.iter().all(|m| m["from"] == "s3"),
        "{plan}"
    );
    assert_eq!(sum_rows(&plan), per[3] as u64, "{plan}");
    assert_eq!(state(&c).await, before, "a dry run changed the cluster");
    drop(extra);
}

/// Sessions through node 0 holding every pooled backend of shard s0
/// (pool_size = 8) in an open transaction, and a task running `write`
/// through node 0, which must wait for one of them.
async fn hold_s0_and_write(
    c: &ProcCluster,
    write: String,
) -> (
    Vec<tokio_postgres::Client>,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let ranges = c.ranges(0).await;
    let on_s0: Vec<i64> = (1..)
        .filter(|&id| {
            let p = hashint8extended(id, 0);
            ranges
                .iter()
                .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
                .is_some_and(|r| r.2 == "s0")
        })
        .take(8)
        .collect();
    let mut holders = Vec::new();
    for id in &on_s0 {
        let h = connect(&c.nodes[0].dsn()).await.unwrap();
        h.batch_execute(&format!("BEGIN; SELECT * FROM items WHERE id = {id}"))
            .await
            .unwrap();
        holders.push(h);
    }
    let writer = connect(&c.nodes[0].dsn()).await.unwrap();
    let task = tokio::spawn(async move { writer.batch_execute(&write).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished(), "the write did not wait for a backend");
    (holders, task)
}

/// Once `proxyctl <list>` shows `name`, the holders commit (their
/// backends go back: the waiting write runs).
async fn release_when_listed(
    c: &ProcCluster,
    list: &[&str],
    name: &str,
    holders: &[tokio_postgres::Client],
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = c.proxyctl(0, list).await;
        if out.contains(name) {
            break;
        }
        assert!(Instant::now() < deadline, "{name} never listed: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for h in holders {
        h.batch_execute("COMMIT").await.unwrap();
    }
}

/// `reshard add-shard` copies the reference tables to the new shard once
/// no statement routed by the routing table without it is still in
/// flight (`jobs::settle`). A reference-table INSERT routed before — to
/// the old shards only — and still waiting for a pooled backend while the
/// shard was added landed after the copy: the new shard never got the
/// row, and reads served there missed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_shard_copies_reference_rows_written_by_statements_routed_before_it() {
    let c = ProcCluster::start_with(
        3,
        2,
        "reference_tables = [\"countries\"]",
        TABLES,
        "lease_ms = 1000",
    )
    .await;
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL); \
         CREATE TABLE countries (code text PRIMARY KEY)",
    )
    .await
    .unwrap();
    // Every pooled backend of s0 held; the reference write routed now
    // (to s0 and s1) waits for one.
    let (holders, insert) =
        hold_s0_and_write(&c, "INSERT INTO countries VALUES ('fr')".into()).await;
    let d = c.dir.0.join("s2");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let dsn = extra.dsn();
    // The held backends go back once the routing table has the new shard
    // (the write was routed by the one before it).
    let release = release_when_listed(&c, &["shard", "list"], "s2", &holders);
    let args = ["reshard", "add-shard", "s2", "--dsn", &dsn];
    let ((ok, out, err), ()) = tokio::join!(c.proxyctl(0, &args), release);
    assert!(ok, "add-shard: {out}\n{err}\nlogs:\n{}", c.logs());
    tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("the write ends")
        .unwrap()
        .unwrap();
    let s2 = connect(&dsn).await.unwrap();
    let n: i64 = s2
        .query_one("SELECT count(*) FROM countries WHERE code = 'fr'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the new shard has the reference row");
}

/// Declaring a table sharded checks that it is empty; a write routed to
/// the home shard while it was undeclared — waiting for a pooled backend —
/// landed after that check, and the declaration succeeded with the row
/// where reads by key do not look. The declaration now waits for such
/// writes (every node fenced, open transactions through a lock) and
/// looks again: the row found fails it loudly, naming the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declaring_a_table_sharded_finds_rows_written_while_it_was_declared() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL); \
         CREATE TABLE mails (id bigint PRIMARY KEY, body text)",
    )
    .await
    .unwrap();
    // Every pooled backend of the home shard s0 held; the write to the
    // still undeclared table, routed home, waits for one: a row whose key
    // s1 owns (misplaced once declared) and one whose key s0 owns (where
    // it belongs: not counted).
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
    let on_s1 = (1..).find(|&id| owner(id) == "s1").unwrap();
    let on_s0 = (1..).find(|&id| owner(id) == "s0").unwrap();
    let write = format!("INSERT INTO mails VALUES ({on_s1}, 'x'), ({on_s0}, 'y')");
    let (holders, insert) = hold_s0_and_write(&c, write).await;
    let release = release_when_listed(&c, &["table", "list"], "mails", &holders);
    let args = ["table", "shard", "mails", "--key", "id", "--type", "int8"];
    let ((ok, out, err), ()) = tokio::join!(c.proxyctl(0, &args), release);
    tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("the write ends")
        .unwrap()
        .unwrap();
    assert!(!ok, "declared silently over a row written meanwhile: {out}");
    assert!(
        err.contains("1 row(s) written to it on home shard s0"),
        "{err}"
    );
}
