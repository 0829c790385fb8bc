//! Three real `hotrepart serve` processes sharing one replicated catalog,
//! in front of real PostgreSQL shards: the leader killed with SIGKILL while
//! clients write through the other nodes, restarted, a node cut off from the
//! others (fault-injecting transport), and the proxyctl metadata commands.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

/// Ranges as (lo, hi, write owner) from `proxyctl --json range list`.
async fn ranges(c: &ProcCluster, i: usize) -> Vec<(u64, Option<u64>, String)> {
    c.ranges(i).await
}

async fn epoch(c: &ProcCluster, i: usize) -> Option<u64> {
    let s = c.status(i).await?;
    if s["ready"] != serde_json::json!(true) {
        return None;
    }
    s["epoch"].as_u64()
}

/// Waits until every running node is ready at the same epoch; returns it.
async fn converged(c: &ProcCluster, timeout: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let mut epochs = BTreeSet::new();
        let mut all = true;
        for (i, n) in c.nodes.iter().enumerate() {
            if !n.running() {
                continue;
            }
            match epoch(c, i).await {
                Some(e) => {
                    epochs.insert(e);
                }
                None => all = false,
            }
        }
        if all && epochs.len() == 1 {
            return *epochs.iter().next().unwrap();
        }
        assert!(
            start.elapsed() < timeout,
            "nodes did not converge (epochs {epochs:?}); logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every row of `items` exactly once, on the shard owning its point.
async fn check_rows(c: &ProcCluster, acked: &BTreeSet<i64>) {
    let dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    check_rows_on(c, &dsns, acked).await;
}

/// Same, for shards `s0, s1, …` at `dsns`; rows per shard.
async fn check_rows_on(c: &ProcCluster, dsns: &[String], acked: &BTreeSet<i64>) -> Vec<usize> {
    let (seen, per_shard) = c.placed_rows(dsns, "SELECT id, 0 FROM items").await;
    let seen: BTreeSet<i64> = seen.into_keys().collect();
    let missing: Vec<_> = acked.difference(&seen).take(5).collect();
    assert!(missing.is_empty(), "acknowledged rows missing: {missing:?}");
    per_shard
}

/// Writers through the given nodes until `stop`: acknowledged ids and
/// client errors; `progress` counts the acknowledged inserts as they come.
fn start_writers(
    c: &ProcCluster,
    nodes: &[usize],
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<(Vec<i64>, Vec<String>)>> {
    nodes
        .iter()
        .map(|&i| {
            let dsn = c.nodes[i].dsn();
            let stop = stop.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let db = connect(&dsn).await.unwrap();
                let mut acked = Vec::new();
                let mut errors = Vec::new();
                let mut id = (i as i64 + 1) * 1_000_000_000;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    id += 1;
                    match db
                        .execute("INSERT INTO items (id, v) VALUES ($1, 'x')", &[&id])
                        .await
                    {
                        Ok(1) => {
                            acked.push(id);
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(n) => errors.push(format!("insert {id}: {n} rows")),
                        Err(e) => errors.push(format!("insert {id}: {e}")),
                    }
                }
                (acked, errors)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_while_clients_write_then_restarted() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1500").await;
    converged(&c, Duration::from_secs(20)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    // Which node leads.
    let leader = {
        let start = Instant::now();
        loop {
            if let Some(l) = c.leader(0).await {
                break l;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let li = (leader - 1) as usize;
    let others: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writers = start_writers(&c, &others, stop.clone(), progress.clone());
    // The leader dies while the clients write.
    let writing = |past: usize| {
        let progress = progress.clone();
        async move { progress.load(Ordering::Relaxed) > past }
    };
    wait_for("the writers' first rows", Duration::from_secs(20), || {
        writing(10)
    })
    .await;
    c.nodes[li].kill9();
    let killed = Instant::now();
    // A catalog change through a surviving node succeeds within seconds.
    let lo = ranges(&c, others[0]).await[0].0;
    let recovered = loop {
        let (ok, _, err) = c
            .proxyctl(others[0], &["range", "split", &lo.to_string()])
            .await;
        if ok {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no catalog change within 15 s of killing the leader: {err}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("catalog change committed {recovered:?} after kill -9 of leader {leader}");
    assert!(recovered < Duration::from_secs(10), "{recovered:?}");
    // The clients go on writing under the new leader before the killed
    // node returns.
    let now = progress.load(Ordering::Relaxed);
    wait_for(
        "rows written after the recovery",
        Duration::from_secs(20),
        || writing(now + 10),
    )
    .await;
    // The killed node comes back with its disk and catches up.
    tokio::task::block_in_place(|| c.nodes[li].start());
    let e = converged(&c, Duration::from_secs(20)).await;
    assert!(e >= 2, "epoch {e}");
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in writers {
        let (a, errors) = w.await.unwrap();
        assert!(
            errors.is_empty(),
            "clients saw errors: {:?}",
            &errors[..errors.len().min(5)]
        );
        assert!(a.len() > 10, "writers made no progress ({})", a.len());
        acked.extend(a);
    }
    // The restarted node routes by the new table too.
    let db = connect(&c.nodes[li].dsn()).await.unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, acked.len());
    check_rows(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_node_stops_routing_after_its_lease_and_rejoins() {
    let c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    converged(&c, Duration::from_secs(20)).await;
    let db0 = connect(&c.nodes[0].dsn()).await.unwrap();
    db0.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let db2 = connect(&c.nodes[2].dsn()).await.unwrap();
    db2.execute("INSERT INTO items (id, v) VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let (ok, _, err) = c.proxyctl(2, &["debug", "partition", "on"]).await;
    assert!(ok, "{err}");
    let cut = Instant::now();
    // Within the lease (+ margin), node 3 refuses to route, with a clear,
    // retryable error.
    let mut left_over = false;
    let refused = loop {
        match db2
            .execute("INSERT INTO items (id, v) VALUES (2, 'b')", &[])
            .await
        {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    cut.elapsed() < Duration::from_secs(3),
                    "node 3 still routes writes {:?} after being cut off",
                    cut.elapsed()
                );
                if let Err(e) = db2.execute("DELETE FROM items WHERE id = 2", &[]).await {
                    // The lease ran out between the two statements (a CI
                    // flake on a loaded machine): the row goes through the
                    // majority side below.
                    left_over = true;
                    break e;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let db_err = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "57P03", "{refused}");
    assert!(db_err.message().contains("lease"), "{}", db_err.message());
    if left_over {
        db0.execute("DELETE FROM items WHERE id = 2", &[])
            .await
            .unwrap();
    }
    // The majority side keeps writing and changing the catalog.
    db0.execute("INSERT INTO items (id, v) VALUES (3, 'c')", &[])
        .await
        .unwrap();
    let lo = ranges(&c, 0).await[0].0;
    let (ok, _, err) = c.proxyctl(0, &["range", "split", &lo.to_string()]).await;
    assert!(ok, "split on the majority side: {err}");
    let e_majority = epoch(&c, 0).await.unwrap();
    // Heal: node 3 catches up and routes again.
    let (ok, _, err) = c.proxyctl(2, &["debug", "partition", "off"]).await;
    assert!(ok, "{err}");
    wait_for("node 3 to catch up", Duration::from_secs(15), || async {
        epoch(&c, 2).await == Some(e_majority)
    })
    .await;
    let ok_again = Arc::new(Mutex::new(None));
    wait_for(
        "node 3 to route writes again",
        Duration::from_secs(10),
        || {
            let db2 = &db2;
            let ok_again = ok_again.clone();
            async move {
                let r = db2
                    .execute(
                        "INSERT INTO items (id, v) VALUES (4, 'd') ON CONFLICT DO NOTHING",
                        &[],
                    )
                    .await;
                *ok_again.lock().unwrap() = Some(r.is_ok());
                r.is_ok()
            }
        },
    )
    .await;
    let n: i64 = db2
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "rows 1, 3 and 4");
    check_rows(&c, &BTreeSet::from([1, 3, 4])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxyctl_changes_the_catalog_on_every_node() {
    let c = ProcCluster::start(3, 2, TABLES, "").await;
    let e0 = converged(&c, Duration::from_secs(20)).await;
    // A third PostgreSQL server becomes a shard, through node 2.
    let d = c.dir.0.join("s2");
    let extra = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let (ok, out, err) = c.proxyctl(1, &["shard", "add", "s2", &extra.dsn()]).await;
    assert!(ok, "shard add: {err}");
    assert!(out.contains("epoch"), "{out}");
    // An unreachable shard is refused before it enters the catalog.
    let (ok, _, err) = c
        .proxyctl(
            1,
            &["shard", "add", "bad", "host=127.0.0.1 port=1 user=postgres"],
        )
        .await;
    assert!(!ok && err.contains("cannot connect"), "{err}");
    let e1 = converged(&c, Duration::from_secs(10)).await;
    assert_eq!(e1, e0 + 1);
    let (ok, out, _) = c.proxyctl(2, &["shard", "list"]).await;
    assert!(ok && out.contains("s2"), "{out}");
    // Tables: declared on node 3, seen on node 1; a table holding rows
    // cannot become sharded.
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    for sql in [
        "CREATE TABLE items (id bigint PRIMARY KEY, v text)",
        "CREATE TABLE full_t (id int)",
        "INSERT INTO full_t VALUES (1)",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let (ok, _, err) = c
        .proxyctl(
            2,
            &["table", "shard", "full_t", "--key", "id", "--type", "int4"],
        )
        .await;
    assert!(!ok && err.contains("holds 1 row"), "{err}");
    // A unique index without the key would be enforced per shard only.
    db.batch_execute("CREATE TABLE mails (id bigint PRIMARY KEY, email text UNIQUE)")
        .await
        .unwrap();
    let (ok, _, err) = c
        .proxyctl(
            2,
            &["table", "shard", "mails", "--key", "id", "--type", "int8"],
        )
        .await;
    assert!(
        !ok && err.contains("mails_email_key") && err.contains("does not include its shard key"),
        "{err}"
    );
    db.batch_execute("ALTER TABLE mails DROP CONSTRAINT mails_email_key")
        .await
        .unwrap();
    let (ok, _, err) = c
        .proxyctl(
            2,
            &["table", "shard", "mails", "--key", "id", "--type", "int8"],
        )
        .await;
    assert!(ok, "{err}");
    let (ok, _, err) = c.proxyctl(2, &["table", "reference", "countries"]).await;
    assert!(ok, "{err}");
    converged(&c, Duration::from_secs(10)).await;
    let (ok, out, _) = c.proxyctl(0, &["table", "list"]).await;
    assert!(
        ok && out.contains("countries") && out.contains("reference"),
        "{out}"
    );
    // Split a range of s0's, give the empty half to s2.
    let rs = ranges(&c, 0).await;
    let (lo, _, _) = rs.iter().find(|r| r.2 == "s0").unwrap().clone();
    let (ok, _, err) = c.proxyctl(0, &["range", "split", &lo.to_string()]).await;
    assert!(ok, "{err}");
    let rs = ranges(&c, 0).await;
    let upper = rs.iter().find(|r| r.0 > lo && r.2 == "s0").unwrap().0;
    let (ok, _, err) = c
        .proxyctl(1, &["range", "assign", &upper.to_string(), "--to", "s2"])
        .await;
    assert!(ok, "assign of an empty range: {err}");
    converged(&c, Duration::from_secs(10)).await;
    // Rows inserted now land on s2 for that range, through every node (the
    // CREATE TABLE through the node ran on s2 as well: it was a shard by then).
    let mut acked = BTreeSet::new();
    for id in 0..60i64 {
        let db = connect(&c.nodes[(id % 3) as usize].dsn()).await.unwrap();
        db.execute("INSERT INTO items (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
        acked.insert(id);
    }
    let mut dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    dsns.push(extra.dsn());
    let seen = check_rows_on(&c, &dsns, &acked).await;
    assert!(seen[2] > 0, "no row landed on the new shard: {seen:?}");
    // A range holding rows cannot be assigned away.
    let rs = ranges(&c, 0).await;
    let busy = rs.iter().find(|r| r.2 == "s1").unwrap().0;
    let (ok, _, err) = c
        .proxyctl(0, &["range", "assign", &busy.to_string(), "--to", "s2"])
        .await;
    assert!(!ok && err.contains("row(s) of table items"), "{err}");
    // ...and stays writable (the freeze was lifted).
    let (ok, out, _) = c.proxyctl(0, &["range", "list"]).await;
    assert!(ok && !out.contains("frozen"), "{out}");
    // A shard that owns ranges cannot be removed.
    let (ok, _, err) = c.proxyctl(0, &["shard", "remove", "s1"]).await;
    assert!(!ok && err.contains("owns"), "{err}");
    // A wrong token is refused.
    let (ok, _, err) = run_cmd(
        procs_bin("proxyctl").as_str(),
        &[
            "--admin",
            &c.nodes[0].admin_url(),
            "--token",
            "wrong",
            "status",
        ],
        &[],
    )
    .await;
    assert!(!ok && err.contains("401"), "{err}");
    // Membership: bad changes are refused with the reason; node 3 is
    // removed, the other two keep changing the catalog, node 3 says it is
    // no longer a member.
    let (ok, _, err) = c
        .proxyctl(0, &["node", "add", "2", "--addr", "127.0.0.1:1"])
        .await;
    assert!(!ok && err.contains("already a member"), "{err}");
    let (ok, _, err) = c.proxyctl(0, &["node", "remove", "9"]).await;
    assert!(!ok && err.contains("not a member"), "{err}");
    let (ok, _, err) = c
        .proxyctl(0, &["node", "add", "7", "--addr", "no-port"])
        .await;
    assert!(!ok && err.contains("host:port"), "{err}");
    let (ok, out, err) = c.proxyctl(0, &["node", "remove", "3"]).await;
    assert!(ok, "node remove: {err}");
    assert!(out.contains("configuration 2"), "{out}");
    // The others learn it within a round trip.
    let start = std::time::Instant::now();
    loop {
        let (_, out3, _) = c.proxyctl(2, &["status"]).await;
        let (_, out2, _) = c.proxyctl(1, &["status"]).await;
        if out3.contains("is NOT a member")
            && out2.contains("members 1,2 ")
            && out2.contains("is a member")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node 3: {out3}\nnode 2: {out2}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, _, err) = c.proxyctl(1, &["table", "reference", "after_remove"]).await;
    assert!(ok, "a change after the removal: {err}");
    let (ok, _, err) = c.proxyctl(2, &["table", "reference", "on_removed"]).await;
    assert!(!ok && err.contains("not a member"), "{err}");
    // Two nodes are the minimum.
    let (ok, _, err) = c.proxyctl(0, &["node", "remove", "2"]).await;
    assert!(!ok && err.contains("at least 2"), "{err}");
    drop(extra);
}

/// `proxyctl node add`: a fourth process, started to join, is added
/// through node 1, gets the whole catalog, and a change made through it
/// reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyctl_adds_a_node() {
    let mut c = ProcCluster::start(3, 1, TABLES, "").await;
    converged(&c, Duration::from_secs(20)).await;
    let (ok, _, err) = c.proxyctl(0, &["table", "reference", "before_add"]).await;
    assert!(ok, "{err}");
    let i = c.start_joining_node();
    let (ok, out, _) = c.proxyctl(i, &["status"]).await;
    assert!(ok && out.contains("is NOT a member"), "{out}");
    let addr = format!("127.0.0.1:{}", c.nodes[i].peer_port);
    let admin = c.nodes[i].admin_url();
    let (ok, out, err) = c
        .proxyctl(0, &["node", "add", "4", "--addr", &addr, "--admin", &admin])
        .await;
    assert!(ok, "node add: {err}\n{}", c.logs());
    assert!(
        out.contains("configuration 2") && out.contains(&addr),
        "{out}"
    );
    let (ok, _, err) = c.proxyctl(1, &["node", "add", "4", "--addr", &addr]).await;
    assert!(!ok && err.contains("already a member"), "{err}");
    // Every member knows node 4's admin URL (the cut-over fences node 4's
    // statements in flight through it).
    for j in 0..3 {
        let (ok, out, err) = c.proxyctl(j, &["--json", "status"]).await;
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["cluster"]["admin"]["4"].as_str(),
            Some(admin.trim_end_matches('/')),
            "node {j}: {out}"
        );
    }
    let start = Instant::now();
    loop {
        let (_, out, _) = c.proxyctl(i, &["table", "list"]).await;
        let (_, st, _) = c.proxyctl(i, &["status"]).await;
        if out.contains("before_add") && st.contains("is a member") && st.contains("lease valid") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node 4 did not get the catalog: {out}\n{st}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, _, err) = c.proxyctl(i, &["table", "reference", "via_node4"]).await;
    assert!(ok, "a change through node 4: {err}");
    let start = Instant::now();
    loop {
        let mut all = true;
        for j in 0..3 {
            let (_, out, _) = c.proxyctl(j, &["table", "list"]).await;
            all &= out.contains("via_node4");
        }
        if all {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "via_node4 not everywhere"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Clients of node 4 are routed (it holds a lease).
    let db = connect(&c.nodes[i].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    db.batch_execute("INSERT INTO items VALUES (42, 'x')")
        .await
        .unwrap();
}

fn procs_bin(name: &str) -> String {
    hotrepart_tests::procs::bin(name).display().to_string()
}

/// A node that was down while a range changed owner gets its lease back
/// once it has caught up with the log; from then on it must route by the
/// new table — not by the one it kept from before the restart, which its
/// catalog follower replaces a moment later (failpoint
/// `catalog_publish_slow` makes that moment 2 s). Writes routed by the
/// old table in that moment went to the range's old owner, past every
/// fence and after the move's cleanup: stranded rows
/// (`reshard::job_survives_kill_of_its_node_during_copy_and_catch_up`
/// found one so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_routes_by_the_current_table_once_its_lease_is_valid() {
    let mut c = ProcCluster::start(3, 2, TABLES, "lease_ms = 1000").await;
    converged(&c, Duration::from_secs(20)).await;
    let db0 = connect(&c.nodes[0].dsn()).await.unwrap();
    db0.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (lo, hi, _) = ranges(&c, 0)
        .await
        .into_iter()
        .find(|r| r.2 == "s0")
        .unwrap();
    let keys: Vec<i64> = (1..)
        .filter(|&k| {
            let p = hotrepart_router::hash::hashint8extended(k, 0);
            p >= lo && hi.is_none_or(|h| p < h)
        })
        .take(1000)
        .collect();
    // Node 3 is down while the (empty) range moves from s0 to s1.
    c.nodes[2].kill9();
    let (ok, _, err) = c
        .proxyctl(0, &["range", "assign", &lo.to_string(), "--to", "s1"])
        .await;
    assert!(ok, "range assign: {err}");
    tokio::task::block_in_place(|| {
        c.nodes[2].start_with_env(&[("HOTREPART_FAILPOINT", "catalog_publish_slow")])
    });
    // Writes through node 3 from the moment it accepts them.
    let dsn = c.nodes[2].dsn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut written = Vec::new();
    let mut refused = 0;
    let mut keys = keys.into_iter();
    let mut db: Option<tokio_postgres::Client> = None;
    while written.len() < 50 {
        assert!(
            Instant::now() < deadline,
            "node 3 accepted {} writes in 30 s ({refused} refused); logs:\n{}",
            written.len(),
            c.logs()
        );
        let client = match db.take() {
            Some(client) => client,
            None => match connect(&dsn).await {
                Ok(client) => client,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let k = keys.next().unwrap();
        match client
            .execute("INSERT INTO items (id, v) VALUES ($1, 'x')", &[&k])
            .await
        {
            Ok(n) => {
                assert_eq!(n, 1);
                written.push(k);
                db = Some(client);
            }
            Err(e) => {
                let code = e.code().map(|c| c.code().to_owned());
                assert_eq!(code.as_deref(), Some("57P03"), "{e}");
                refused += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                db = Some(client);
            }
        }
    }
    // Every row is on s1, the range's owner; none on s0.
    for (si, want) in [(0, 0i64), (1, written.len() as i64)] {
        let s = connect(&c.shards[si].dsn()).await.unwrap();
        let n: i64 = s
            .query_one("SELECT count(*) FROM items WHERE id = ANY($1)", &[&written])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, want,
            "rows written through the restarted node on s{si} (range owned by s1)"
        );
    }
}

/// The answer of `sql` through `db`: its value, or the SQLSTATE it was
/// refused with.
async fn answer(db: &tokio_postgres::Client, sql: &str) -> Result<i64, String> {
    match db.query_one(sql, &[]).await {
        Ok(r) => Ok(r.get(0)),
        Err(e) => Err(e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// DDL through one node reaches what every other node learned of the
/// schema before the DDL's client sees it done: a view over a sharded
/// table, or a function whose body reads one, created through node 1 is
/// treated through nodes 2 and 3 — which looked the names up before they
/// existed — exactly as through node 1 (merged, or refused), never as an
/// undeclared table or a harmless function of the home shard (one shard's
/// rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_changes_through_one_node_reach_the_others_before_the_ddl_is_acknowledged() {
    let c = ProcCluster::start(3, 2, TABLES, "").await;
    converged(&c, Duration::from_secs(20)).await;
    let mut dbs = Vec::new();
    for n in &c.nodes {
        dbs.push(connect(&n.dsn()).await.unwrap());
    }
    dbs[0]
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, v text); \
             INSERT INTO items (id, v) SELECT g, 'x' FROM generate_series(1, 40) g",
        )
        .await
        .unwrap();
    // Both shards hold rows: one shard's count is not 40.
    for s in &c.shards {
        let n: i64 = connect(&s.dsn())
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n > 0 && n < 40, "rows per shard: {n}");
    }
    let mut ddl_ms = Vec::new();
    for round in 0..4 {
        let (view, func) = (format!("items_v{round}"), format!("nitems{round}"));
        let read_view = format!("SELECT count(*) FROM {view}");
        let call = format!("SELECT {func}()");
        // Nodes 2 and 3 look the names up while they do not exist yet.
        for db in &dbs[1..] {
            assert_eq!(answer(db, &read_view).await, Err("42P01".into()));
            assert_eq!(answer(db, &call).await, Err("42883".into()));
        }
        let t = Instant::now();
        dbs[0]
            .batch_execute(&format!("CREATE VIEW {view} AS SELECT * FROM items"))
            .await
            .unwrap();
        dbs[0]
            .batch_execute(&format!(
                "CREATE FUNCTION {func}() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM items'"
            ))
            .await
            .unwrap();
        ddl_ms.push(t.elapsed().as_millis() / 2);
        let want_view = answer(&dbs[0], &read_view).await;
        let want_call = answer(&dbs[0], &call).await;
        assert!(
            want_view == Ok(40) || want_view == Err("0A000".into()),
            "through the node that ran the DDL: {want_view:?}"
        );
        assert_eq!(
            want_call,
            Err("0A000".into()),
            "{func}() reads a sharded table"
        );
        for (i, db) in dbs.iter().enumerate().skip(1) {
            assert_eq!(
                answer(db, &read_view).await,
                want_view,
                "round {round}: the view read through node {} right after it was created through node 1",
                i + 1
            );
            assert_eq!(
                answer(db, &call).await,
                want_call,
                "round {round}: {func}() called through node {} right after it was created through node 1",
                i + 1
            );
        }
    }
    eprintln!("DDL through a 3-node cluster: {ddl_ms:?} ms per statement");
}

/// A raw protocol connection to a node as the trust user `t`, logged in
/// (its first ReadyForQuery read), with its read buffer.
async fn raw_login(port: u16) -> (tokio::net::TcpStream, bytes::BytesMut) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "t"), ("database", "postgres")],
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    next_ready(&mut s, &mut buf).await;
    (s, buf)
}

/// Reads a raw connection's messages up to the next ReadyForQuery (at
/// most 10 s).
async fn next_ready(s: &mut tokio::net::TcpStream, buf: &mut bytes::BytesMut) {
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < len + 1 {
                    break;
                }
                let tag = buf[0];
                buf.advance(len + 1);
                if tag == b'Z' {
                    return;
                }
            }
            assert!(s.read_buf(buf).await.unwrap() > 0, "connection closed");
        }
    })
    .await
    .expect("a ReadyForQuery within 10 s");
}

/// A client that sends DDL and Terminate in one write and closes the
/// socket without reading the answer: the DDL commits, and the node still
/// records the schema change (at the statement's ReadyForQuery, or — when
/// the session ends first — in the background), so node 2, which looked
/// the view's name up before it existed, reads it as node 1 does (not as
/// an undeclared table: the home shard's rows). (The background path
/// alone, a session ending between the commit and its ReadyForQuery, is a
/// window too narrow to hit from a test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ddl_of_a_client_gone_before_its_answer_reaches_the_other_nodes() {
    use bytes::BytesMut;
    use tokio::io::AsyncWriteExt;
    let tail =
        format!("{TABLES}[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n");
    let c = ProcCluster::start(3, 2, &tail, "").await;
    converged(&c, Duration::from_secs(20)).await;
    let db1 = connect(&c.nodes[0].dsn()).await.unwrap();
    db1.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text); \
         INSERT INTO items (id, v) SELECT g, 'x' FROM generate_series(1, 40) g",
    )
    .await
    .unwrap();
    let db2 = connect(&c.nodes[1].dsn()).await.unwrap();
    let read = "SELECT count(*) FROM items_gone";
    assert_eq!(answer(&db2, read).await, Err("42P01".into()));
    let (mut s, _) = raw_login(c.nodes[0].port).await;
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(
        "CREATE VIEW items_gone AS SELECT * FROM items",
        &mut out,
    )
    .unwrap();
    postgres_protocol::message::frontend::terminate(&mut out);
    s.write_all(&out).await.unwrap();
    drop(s);
    // Once the view is on the shards, node 2 reads it as node 1 does.
    let shard = connect(&c.shards[0].dsn()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let there: bool = shard
            .query_one("SELECT to_regclass('items_gone') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if there {
            break;
        }
        assert!(Instant::now() < deadline, "the DDL never committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = answer(&db1, read).await;
    assert!(want == Ok(40) || want == Err("0A000".into()), "{want:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = answer(&db2, read).await;
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 still answers {got:?} 5 s after the view was made (node 1: {want:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pipeline through node 1 whose first part is DDL and whose later part
/// is still running: the client reads the first part's ReadyForQuery
/// before the batch is over, and by then every node has forgotten the
/// schema as it was — node 2 describes the table with its new column, not
/// from the statement it had validated before (one shard: the whole
/// pipeline goes to one backend, the node forwards it as it comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ddl_in_a_pipeline_is_recorded_before_its_ready_for_query() {
    use bytes::BytesMut;
    use tokio::io::AsyncWriteExt;
    let tail =
        format!("{TABLES}[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n");
    let c = ProcCluster::start(3, 1, &tail, "").await;
    converged(&c, Duration::from_secs(20)).await;
    let db1 = connect(&c.nodes[0].dsn()).await.unwrap();
    db1.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let db2 = connect(&c.nodes[1].dsn()).await.unwrap();
    let before = db2.prepare("SELECT * FROM items").await.unwrap();
    assert_eq!(before.columns().len(), 2);
    // Raw protocol to node 1: both queries in one write.
    let (mut s, mut buf) = raw_login(c.nodes[0].port).await;
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query("ALTER TABLE items ADD COLUMN c int", &mut out)
        .unwrap();
    postgres_protocol::message::frontend::query("SELECT pg_sleep(2)", &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    next_ready(&mut s, &mut buf).await;
    let t = Instant::now();
    let after = db2.prepare("SELECT * FROM items").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the pipeline's second part was still running"
    );
    assert_eq!(
        after.columns().len(),
        3,
        "node 2 described the table as it was before the ALTER its client had seen done"
    );
    next_ready(&mut s, &mut buf).await;
}
