//! Live resharding of tables placed by a WebAssembly routing function,
//! end to end through the job runner: a 3-node cluster of real `hotrepart
//! serve` processes in front of 2 real PostgreSQL shards; the geo example
//! function (deploy/examples/functions/geo.wat) uploaded with `proxyctl
//! function upload`, tables declared with `--function geo` (an int8 and a
//! text key) next to a built-in-hashed one, rows written through the nodes
//! (also while the job runs), one range moved with `proxyctl reshard move
//! --wait`: the job ends Done, every row is exactly once on the shard owning
//! its point (computed here by calling the module directly), no replication
//! slot or publication is left.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CODES: [&str; 7] = ["xx", "eu", "us", "ap", "sa", "af", "me"];

async fn ctl_ok(c: &ProcCluster, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(i, args).await;
    assert!(ok, "proxyctl {args:?} on node {i}: {err}\n{}", c.logs());
    out
}

/// Waits until every node lists the tables `want` (so each has the
/// functions compiled and routes by them).
async fn tables_everywhere(c: &ProcCluster, want: &[&str]) {
    let start = Instant::now();
    loop {
        let mut all = true;
        for i in 0..c.nodes.len() {
            let (ok, out, _) = c.proxyctl(i, &["table", "list"]).await;
            all &= ok && want.iter().all(|t| out.lines().any(|l| l.starts_with(t)));
        }
        if all {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the nodes do not all know the tables {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No replication slot or publication left on any shard.
async fn nothing_left(dsns: &[String]) {
    for dsn in dsns {
        let db = connect(dsn).await.unwrap();
        for q in [
            "SELECT count(*) FROM pg_replication_slots",
            "SELECT count(*) FROM pg_publication",
        ] {
            let n: i64 = db.query_one(q, &[]).await.unwrap().get(0);
            assert_eq!(n, 0, "{q} on {dsn}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_a_range_of_wasm_placed_tables() {
    let c = ProcCluster::start(3, 2, "", "lease_ms = 1000").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let geo_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/functions/geo.wat")
        .display()
        .to_string();
    let geo = Function::compile(&std::fs::read(&geo_path).unwrap()).unwrap();
    let int8_point = |k: i64| geo.point(oid::INT8, &abi::encode_int8(k)).unwrap();
    let text_point = |k: &str| geo.point(oid::TEXT, k.as_bytes()).unwrap();

    ctl_ok(&c, 0, &["function", "upload", "geo", &geo_path]).await;
    for args in [
        &[
            "table",
            "shard",
            "places",
            "--key",
            "id",
            "--type",
            "int8",
            "--function",
            "geo",
        ][..],
        &[
            "table",
            "shard",
            "regions",
            "--key",
            "k",
            "--type",
            "text",
            "--function",
            "geo",
        ],
        &["table", "shard", "items", "--key", "id", "--type", "int8"],
    ] {
        ctl_ok(&c, 1, args).await;
    }
    tables_everywhere(&c, &["places", "regions", "items"]).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute(
        "CREATE TABLE places (id bigint PRIMARY KEY, n int NOT NULL);
         CREATE TABLE regions (k text PRIMARY KEY, n int NOT NULL);
         CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL);",
    )
    .await
    .unwrap();

    // geo puts region r (int8: the key's top byte; text: "rr:") at
    // [r << 56, (r+1) << 56), all in s0's first range: split it so that
    // regions 2 and 3 ("us", "ap") form one range, and move that to s1.
    for at in [2u64 << 56, 4 << 56] {
        let lo = c
            .ranges(0)
            .await
            .iter()
            .rfind(|r| r.0 < at)
            .unwrap()
            .0
            .to_string();
        ctl_ok(&c, 0, &["range", "split", &lo, "--at", &at.to_string()]).await;
    }
    let rs = c.ranges(0).await;
    let moving = rs.iter().find(|r| r.0 == 2 << 56).unwrap().clone();
    assert_eq!(moving.1, Some(4 << 56), "{rs:?}");
    assert_eq!(moving.2, "s0", "{rs:?}");

    // Rows through every node.
    let mut places = BTreeSet::new();
    let mut regions = BTreeSet::new();
    for i in 0..1400i64 {
        places.insert(((i % 7) << 56) | i);
        regions.insert(format!("{}:city-{i}", CODES[(i % 7) as usize]));
    }
    let values = |set: &BTreeSet<i64>| {
        set.iter()
            .map(|k| format!("({k}, 1)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, chunk) in places
        .iter()
        .copied()
        .collect::<Vec<_>>()
        .chunks(200)
        .enumerate()
    {
        let node = connect(&c.nodes[i % 3].dsn()).await.unwrap();
        let set: BTreeSet<i64> = chunk.iter().copied().collect();
        node.batch_execute(&format!(
            "INSERT INTO places (id, n) VALUES {}",
            values(&set)
        ))
        .await
        .unwrap();
        node.batch_execute(&format!(
            "INSERT INTO items (id, n) VALUES {}",
            values(&chunk.iter().map(|k| k & 0xffff_ffff).collect())
        ))
        .await
        .unwrap();
    }
    for (i, chunk) in regions
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .chunks(200)
        .enumerate()
    {
        let node = connect(&c.nodes[i % 3].dsn()).await.unwrap();
        let vals: Vec<String> = chunk.iter().map(|k| format!("('{k}', 1)")).collect();
        node.batch_execute(&format!(
            "INSERT INTO regions (k, n) VALUES {}",
            vals.join(", ")
        ))
        .await
        .unwrap();
    }
    let items: BTreeSet<i64> = places.iter().map(|k| k & 0xffff_ffff).collect();

    // A writer through node 1 while the job runs: new rows in the moving
    // regions and updates of existing ones (statements to a frozen range
    // wait; none may fail).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let dsn = c.nodes[1].dsn();
        let stop = stop.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let db = connect(&dsn).await.unwrap();
            let mut added = Vec::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = ((2 + n % 2) << 56) | (1_000_000 + n);
                db.execute("INSERT INTO places (id, n) VALUES ($1, 1)", &[&id])
                    .await
                    .unwrap();
                let k = format!("{}:new-{n}", CODES[(2 + n % 2) as usize]);
                db.execute("INSERT INTO regions (k, n) VALUES ($1, 1)", &[&k])
                    .await
                    .unwrap();
                db.execute(
                    "UPDATE places SET n = n + 1 WHERE id = $1",
                    &[&(((n % 7) << 56) | (n % 1400))],
                )
                .await
                .unwrap();
                added.push((id, k));
                written.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            added
        })
    };
    // The writer writes before, during and after the move.
    let writes_on = || {
        let now = written.load(Ordering::Relaxed);
        let written = written.clone();
        wait_for(
            "the writer's next rows",
            Duration::from_secs(30),
            move || {
                let written = written.clone();
                async move { written.load(Ordering::Relaxed) >= now + 5 }
            },
        )
    };
    writes_on().await;

    let out = ctl_ok(
        &c,
        2,
        &[
            "reshard",
            "move",
            &moving.0.to_string(),
            "--to",
            "s1",
            "--wait",
        ],
    )
    .await;
    writes_on().await;
    stop.store(true, Ordering::Relaxed);
    let added = writer.await.unwrap();
    assert!(added.len() > 10, "the writer hardly wrote: {out}");
    for (id, k) in &added {
        places.insert(*id);
        regions.insert(k.clone());
    }

    // The job is Done.
    let out = ctl_ok(&c, 0, &["--json", "jobs", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{v}");
    assert_eq!(jobs[0]["phase"], serde_json::json!("done"), "{v}");
    assert!(jobs[0]["rows_copied"].as_u64().unwrap() > 0, "{v}");
    let rs = c.ranges(0).await;
    assert_eq!(
        rs.iter().find(|r| r.0 == 2 << 56).unwrap().2,
        "s1",
        "{rs:?}"
    );

    // Every row exactly once, on the owner of its point.
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    let (seen, per) = c
        .placed_rows_with(&dsns, "SELECT id, n FROM places", |r| {
            let id: i64 = r.get(0);
            (id.to_string(), int8_point(id), id)
        })
        .await;
    assert_eq!(
        seen.into_values().collect::<BTreeSet<_>>(),
        places,
        "places: rows missing or unexpected"
    );
    assert!(per[1] > 300, "places: {per:?}");
    let (seen, per) = c
        .placed_rows_with(&dsns, "SELECT k FROM regions", |r| {
            let k: String = r.get(0);
            let p = text_point(&k);
            (k.clone(), p, k)
        })
        .await;
    assert_eq!(
        seen.into_values().collect::<BTreeSet<_>>(),
        regions,
        "regions: rows missing or unexpected"
    );
    assert!(per[1] > 300, "regions: {per:?}");
    // The built-in-hashed table moved its rows of the range too.
    let (seen, _) = c.placed_rows(&dsns, "SELECT id, n FROM items").await;
    assert_eq!(seen.into_keys().collect::<BTreeSet<_>>(), items);
    // The nodes route to the moved rows.
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    let moved = (2i64 << 56) | 2;
    assert!(places.contains(&moved));
    let n: i64 = db
        .query_one("SELECT count(*) FROM places WHERE id = $1", &[&moved])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    nothing_left(&dsns).await;
}
