//! Failing shards (issue 17). A shard restarted under load: clean
//! SQLSTATEs for its statements only, served again at once, nothing
//! acknowledged lost, no backend leaked. A shard whose processes are stopped
//! (SIGSTOP: a hung host, a stalled disk) does not hold the node or the
//! other shards' clients, and with `server_silence_timeout_ms` its own
//! clients get a clear error instead of waiting for ever; once it runs
//! again, everything works without restarting the node. A slow or dead
//! network link to a shard (`hotrepart_tests::netfault`, a TCP proxy that
//! delays or holds bytes) slows or fails only that shard's statements.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use std::time::{Duration, Instant};

/// The shard's PostgreSQL processes: the postmaster (first line of
/// `postmaster.pid`) and its children.
fn pg_processes(dir: &std::path::Path) -> Vec<String> {
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster.to_string()];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid.to_string());
        }
    }
    pids
}

/// Stops a shard's processes; lets them run again when dropped (also
/// when the test fails, so that the harness can stop the server).
struct Stopped(Vec<String>);

impl Stopped {
    fn new(dir: &std::path::Path) -> Stopped {
        let pids = pg_processes(dir);
        signal("-STOP", &pids);
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

/// Sends `sig` to each of `pids` (the shell's own `kill`: no procps
/// needed); one that has exited meanwhile (a backend ending as it was
/// listed) is skipped.
fn signal(sig: &str, pids: &[String]) {
    for pid in pids {
        let _ = std::process::Command::new("sh")
            .args(["-c", "kill \"$0\" \"$1\"", sig, pid])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Two shards, `extra` config lines, and table `items` (sharded by `id`)
/// holding ids 1..=`rows` (n = id).
async fn items_cluster(extra: &str, rows: i64) -> Cluster {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: extra.into(),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    fill_items(&c, rows).await;
    c
}

/// Creates table `items` through the node, holding ids 1..=`rows` (n = id).
async fn fill_items(c: &Cluster, rows: i64) {
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n int)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=rows).map(|i| format!("({i}, {i})")).collect();
    db.batch_execute(&format!(
        "INSERT INTO items (id, n) VALUES {}",
        values.join(",")
    ))
    .await
    .unwrap();
}

async fn min_id(dsn: &str) -> i64 {
    connect(dsn)
        .await
        .unwrap()
        .query_one("SELECT min(id) FROM items", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shard_holds_only_its_own_clients_and_they_get_a_clear_error() {
    let c = items_cluster(
        "server_silence_timeout_ms = 1500\nconnect_timeout_ms = 1500",
        100,
    )
    .await;
    let (on0, on1) = (
        min_id(&c.shards[0].dsn()).await,
        min_id(&c.shards[1].dsn()).await,
    );
    let read = "SELECT n FROM items WHERE id = $1";
    // A client that has used s1 (its backend is attached while in a
    // transaction), and one that will use s0.
    let a = c.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let n: i32 = a.query_one(read, &[&on1]).await.unwrap().get(0);
    assert_eq!(i64::from(n), on1);
    let b = c.connect().await;

    let stopped = Stopped::new(&c.shards[1].dir);
    // a's next statement on s1: no answer comes; after the silence limit
    // a clear error, not a hang.
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), a.query_one(read, &[&on1]))
        .await
        .expect("the client must not wait for ever on a stalled shard")
        .unwrap_err();
    let waited = t.elapsed();
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db_err.code().code(), "08006", "{e:?}");
    assert!(
        db_err.message().contains("shard s1")
            && db_err.message().contains("server_silence_timeout_ms"),
        "{}",
        db_err.message()
    );
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    // s0 answers meanwhile, at once.
    let t = Instant::now();
    let n: i32 = b.query_one(read, &[&on0]).await.unwrap().get(0);
    assert_eq!(i64::from(n), on0);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // A statement over both shards: a clear error too.
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        b.query_one("SELECT count(*) FROM items", &[]),
    )
    .await
    .expect("a multi-shard statement must not wait for ever on a stalled shard")
    .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e:?}");

    // A new client needing a new connection to s1: refused in time.
    let d = c.connect().await;
    let e = tokio::time::timeout(Duration::from_secs(20), d.query_one(read, &[&on1]))
        .await
        .expect("a login to a stalled shard must not wait for ever")
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e:?}");
    let m = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        m.as_deref().is_some_and(|m| m.contains("shard s1")),
        "{e:?}"
    );

    // The node is up: s0 still works from a new client.
    let f = c.connect().await;
    let n: i32 = f.query_one(read, &[&on0]).await.unwrap().get(0);
    assert_eq!(i64::from(n), on0);

    // s1 runs again: its clients work again, without a node restart.
    drop(stopped);
    let g = c.connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match g.query_one(read, &[&on1]).await {
            Ok(r) => {
                assert_eq!(i64::from(r.get::<_, i32>(0)), on1);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "s1 never answered again: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let n: i64 = g
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
}

/// Counts statements running `pg_sleep(30)` on a shard, read directly.
async fn sleeping(dsn: &str) -> i64 {
    connect(dsn)
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A client's cancel reaches every shard its statement runs on, also when
/// one of them is stalled (its server accepts the cancel's connection and
/// never answers): the node sends to all at once, each bounded in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_other_shards_when_one_is_stalled() {
    let c = items_cluster(
        "server_silence_timeout_ms = 3000\nconnect_timeout_ms = 1500",
        20,
    )
    .await;
    let a = c.connect().await;
    let cancel = a.cancel_token();
    let running = tokio::spawn(async move {
        a.query_one(
            "SELECT count(*) FROM items WHERE pg_sleep(30) IS NOT NULL",
            &[],
        )
        .await
    });
    let (d0, d1) = (c.shards[0].dsn(), c.shards[1].dsn());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping(&d0).await == 0 || sleeping(&d1).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the statement never ran on both shards"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // s0 stalls (the first shard a cancel goes to); the client cancels.
    let stopped = Stopped::new(&c.shards[0].dir);
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let t = Instant::now();
    while sleeping(&d1).await > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "s1's part was not cancelled while s0 is stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client gets an answer in bounded time (s0 never answers: the
    // silence limit ends the session).
    let e = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the cancelled client must not wait for ever")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(e.code().map(|c| c.code()), Some("57014" | "08006")),
        "{e:?}"
    );
    drop(stopped);
}

/// A shard restarted under load (issue 17): while it is down, only the
/// statements that need it fail, each with a clean SQLSTATE and at once;
/// the other shard's go on; within a second of its return it serves
/// again; no write acknowledged to a client is lost; no backend is left
/// checked out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_restarted_under_load_fails_cleanly_and_comes_back_at_once() {
    // Which shard owns which id: ask the shards after a first insert.
    let mut c = items_cluster(
        "pool_size = 4\nconnect_timeout_ms = 1500\npool_timeout_ms = 5000",
        200,
    )
    .await;
    let db = c.connect().await;
    let on1: std::collections::HashSet<i64> = connect(&c.shards[1].dsn())
        .await
        .unwrap()
        .query("SELECT id FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.batch_execute("DELETE FROM items").await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8i64 {
        let dsn = c.dsn();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            // (id, acknowledged, shard 1?, SQLSTATE of a failure)
            let mut log: Vec<(i64, bool, Option<String>)> = Vec::new();
            let mut client = connect(&dsn).await.unwrap();
            let mut id = 1000 + w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.execute("INSERT INTO items (id, n) VALUES ($1, 1)", &[&id]),
                )
                .await
                .expect("a statement must not hang while a shard restarts");
                match r {
                    Ok(_) => log.push((id, true, None)),
                    Err(e) => {
                        // A statement sent on a session the node had just
                        // ended (its FATAL came with the previous one)
                        // fails as closed, without a code.
                        let code = match e.code() {
                            Some(c) => c.code().to_string(),
                            None if e.is_closed() => "closed".to_string(),
                            None => format!("no SQLSTATE: {e:?}"),
                        };
                        log.push((id, false, Some(code)));
                        if client.is_closed() {
                            client = connect(&dsn).await.unwrap();
                        }
                    }
                }
                id += 8;
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // s1 stops (fast: its sessions are terminated) and starts again.
    tokio::task::block_in_place(|| c.shards[1].restart_with("")).unwrap();
    let back_at = Instant::now();
    // Back within a second: a statement on s1 succeeds.
    let probe = c.connect().await;
    let s1_id = *on1.iter().next().unwrap();
    loop {
        match probe
            .query_opt("SELECT n FROM items WHERE id = $1", &[&s1_id])
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(
                back_at.elapsed() < Duration::from_secs(1),
                "s1 not served again within 1 s of its return: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = back_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.unwrap());
    }
    let failed: Vec<_> = log.iter().filter(|(_, ok, _)| !ok).collect();
    let acked: Vec<i64> = log
        .iter()
        .filter(|(_, ok, _)| *ok)
        .map(|(id, _, _)| *id)
        .collect();
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, _, code) in &failed {
        *codes.entry(code.clone().unwrap_or_default()).or_default() += 1;
    }
    eprintln!(
        "{} inserts, {} acknowledged, {} failed {codes:?}, s1 served again {recovered:?} after its return",
        log.len(),
        acked.len(),
        failed.len()
    );
    // Every failure has a clean SQLSTATE of a lost or refused connection.
    for (id, _, code) in &failed {
        assert!(
            matches!(
                code.as_deref(),
                Some("08006" | "08001" | "08003" | "57P01" | "57P02" | "57P03" | "closed")
            ),
            "insert {id} failed with {code:?}"
        );
    }
    assert!(!failed.is_empty(), "the restart was not seen by any client");
    // Only s1's statements failed.
    let mut ids: std::collections::HashMap<i64, bool> = std::collections::HashMap::new();
    for (shard, pg) in c.shards.iter().enumerate() {
        for r in connect(&pg.dsn())
            .await
            .unwrap()
            .query("SELECT id FROM items", &[])
            .await
            .unwrap()
        {
            ids.insert(r.get(0), shard == 1);
        }
    }
    for (id, _, _) in &failed {
        if let Some(false) = ids.get(id) {
            panic!("insert {id} failed but is on s0, which never stopped");
        }
    }
    // Nothing acknowledged is lost.
    for id in &acked {
        assert!(ids.contains_key(id), "acknowledged insert {id} is lost");
    }
    // No backend left checked out.
    for (_, p) in c.node.pools.all() {
        assert_eq!(
            p.busy_count(),
            0,
            "a backend of {} is still checked out",
            p.target.shard
        );
    }
}

/// Median of `v` (sorted in place).
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A slow network to one shard (a TCP proxy in the harness that delays
/// each chunk 100 ms each way): its statements are slower and right, the
/// other shard's are not slowed, multi-shard reads and writes (2PC) stay
/// right. A link that delivers nothing (held) gets its clients a clear
/// error after `server_silence_timeout_ms` while the other shard answers at
/// once; once it heals, the shard is served again without a node restart
/// and no backend is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_to_a_shard_slows_only_its_statements_and_a_dead_one_fails_clearly() {
    use hotrepart_tests::netfault::{FaultProxy, LinkMode};
    let dir = TestDir::new("netfault");
    let d = dir.0.clone();
    let shards = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|i| start_pg(&d.join(format!("s{i}"))))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let link = FaultProxy::start(([127, 0, 0, 1], shards[1].port).into()).await;
    let s1_via_link = shards[1].dsn().replace(
        &format!(":{}/", shards[1].port),
        &format!(":{}/", link.addr.port()),
    );
    assert_ne!(s1_via_link, shards[1].dsn());
    let toml = format!(
        "listen = \"127.0.0.1:0\"\npool_size = 4\nserver_silence_timeout_ms = 1500\n\
         connect_timeout_ms = 5000\n\
         [[shards]]\nname = \"s0\"\ndsn = \"{}\"\n[[shards]]\nname = \"s1\"\ndsn = \"{s1_via_link}\"\n\
         [[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n\
         [[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n",
        shards[0].dsn(),
        hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD),
    );
    let cfg = hotrepart_proxy::config::Config::from_toml(&toml).unwrap();
    let c = Cluster::with_config(cfg, shards, dir).await;
    fill_items(&c, 100).await;
    let (on0, on1) = (
        min_id(&c.shards[0].dsn()).await,
        min_id(&c.shards[1].dsn()).await,
    );
    let read = "SELECT n FROM items WHERE id = $1";
    // `n` reads of `id` (which holds `id + plus`): the client back and
    // the median time.
    let timed = |db: tokio_postgres::Client, id: i64, plus: i64, n: usize| async move {
        let mut took = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let v: i32 = db.query_one(read, &[&id]).await.unwrap().get(0);
            took.push(t.elapsed());
            assert_eq!(i64::from(v), id + plus);
        }
        (db, median(&mut took))
    };
    let (a, base1) = timed(c.connect().await, on1, 0, 10).await;
    let (b, base0) = timed(c.connect().await, on0, 0, 10).await;

    // Slow: 100 ms each way to s1.
    link.set(LinkMode::Delay(Duration::from_millis(100)));
    let slow = tokio::spawn(timed(a, on1, 0, 5));
    let (b, fast0) = timed(b, on0, 0, 20).await;
    let (a, slow1) = slow.await.unwrap();
    assert!(
        slow1 >= Duration::from_millis(200),
        "s1 read over a 2×100 ms link took {slow1:?}"
    );
    assert!(slow1 < Duration::from_millis(1400), "{slow1:?}");
    assert!(
        fast0 < Duration::from_millis(100),
        "s0 reads slowed by s1's link: median {fast0:?} (before {base0:?}; s1 before {base1:?})"
    );
    // Over both shards: right answers, at the slow shard's pace.
    let t = Instant::now();
    let n: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    // A write on both shards, committed by 2PC over the slow link.
    for sql in [
        "BEGIN".to_string(),
        format!("UPDATE items SET n = n + 1000 WHERE id = {on0}"),
        format!("UPDATE items SET n = n + 1000 WHERE id = {on1}"),
        "COMMIT".to_string(),
    ] {
        b.batch_execute(&sql).await.unwrap();
    }
    for (i, id) in [(0, on0), (1, on1)] {
        let v: i32 = c
            .direct(i)
            .await
            .query_one(read, &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(i64::from(v), id + 1000, "shard s{i}");
    }

    // Dead: nothing gets through to s1.
    link.set(LinkMode::Hold);
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), a.query_one(read, &[&on1]))
        .await
        .expect("a client must not wait for ever on a dead link")
        .unwrap_err();
    let waited = t.elapsed();
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db_err.code().code(), "08006", "{e:?}");
    assert!(
        db_err.message().contains("shard s1"),
        "{}",
        db_err.message()
    );
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let (b, dead0) = timed(b, on0, 1000, 10).await;
    assert!(
        dead0 < Duration::from_millis(100),
        "s0 while s1's link is dead: {dead0:?}"
    );

    // Healed: s1 is served again (the node drops what it had given up on).
    link.set(LinkMode::Pass);
    let healed = Instant::now();
    let g = c.connect().await;
    loop {
        match g.query_one(read, &[&on1]).await {
            Ok(r) => {
                assert_eq!(i64::from(r.get::<_, i32>(0)), on1 + 1000);
                break;
            }
            Err(e) => {
                assert!(
                    healed.elapsed() < Duration::from_secs(10),
                    "s1 never answered again: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "link healed: s1 served again after {:?}; medians: s1 {base1:?} → {slow1:?} (2×100 ms), s0 {base0:?} → {fast0:?} → {dead0:?}",
        healed.elapsed()
    );
    let n: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    // No backend left behind: the node's connections to s1 stay within
    // its pool (the given-up one closed).
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.open_connections() > 4 {
        assert!(
            Instant::now() < deadline,
            "{} connections to s1 through the link, pool_size 4",
            link.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
