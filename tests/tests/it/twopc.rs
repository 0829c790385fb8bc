//! Two-phase commit of transactions that write to several shards: atomic
//! commit, rollback, a failing PREPARE, the resolver, and a node process
//! killed between PREPARE and the decision.
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::exec::decisions::{DecisionError, DecisionLog, LocalDecisions};
use hotrepart_router::catalog::{KeyValue, RoutingSnapshot};
use hotrepart_tests::*;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SEED: u64 = 7;

fn tail() -> String {
    format!("[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n")
}

async fn cluster(extra: &str) -> Cluster {
    Cluster::start(Opts {
        shards: 2,
        extra: format!("pool_size = 4\n{extra}"),
        users: String::new(),
        tail: tail(),
    })
    .await
}

/// Two keys owned by different shards: (key on s0, key on s1).
fn keys(snap: &RoutingSnapshot) -> (i64, i64) {
    let owner = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let a = (1..1000).find(|&k| owner(k) == "s0").unwrap();
    let b = (1..1000).find(|&k| owner(k) == "s1").unwrap();
    (a, b)
}

async fn setup(c: &Cluster) -> (tokio_postgres::Client, i64, i64) {
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (a, b) = keys(&c.node.routing.catalog.load_full());
    (db, a, b)
}

/// Rows of `users` with this id, read directly on shard `i`.
async fn on_shard(c: &Cluster, i: usize, id: i64) -> Option<String> {
    c.direct(i)
        .await
        .query_opt("SELECT v FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn prepared(c: &Cluster, i: usize) -> Vec<String> {
    c.direct(i)
        .await
        .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn nothing_prepared(c: &Cluster) {
    for i in 0..c.shards.len() {
        assert_eq!(prepared(c, i).await, Vec::<String>::new(), "shard s{i}");
    }
}

async fn no_open_transactions(c: &Cluster) {
    for i in 0..c.shards.len() {
        let d = c.direct(i).await;
        wait_for("no idle-in-transaction backend", Duration::from_secs(10), || async {
            let n: i64 = d
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'", &[])
                .await
                .unwrap()
                .get(0);
            n == 0
        })
        .await;
    }
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_writing_two_shards_commits_on_both() {
    let c = cluster("").await;
    let (mut db, a, b) = setup(&c).await;
    // simple protocol
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({a}, 'a1')"
    ))
    .await
    .unwrap();
    db.batch_execute(&format!("INSERT INTO users (id, v) VALUES ({b}, 'b1')"))
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a1"));
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b1"));
    nothing_prepared(&c).await;
    // extended protocol, COMMIT too (Parse/Bind/Execute/Sync)
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("UPDATE users SET v = 'a2' WHERE id = $1", &[&a])
        .await
        .unwrap();
    db.execute("UPDATE users SET v = 'b2' WHERE id = $1", &[&b])
        .await
        .unwrap();
    let n = db.execute("COMMIT", &[]).await.unwrap();
    assert_eq!(n, 0);
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a2"));
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b2"));
    // a keyless UPDATE inside a transaction writes every shard
    let tx = db.transaction().await.unwrap();
    let n = tx
        .execute("UPDATE users SET v = v || '+'", &[])
        .await
        .unwrap();
    assert_eq!(n, 2);
    tx.commit().await.unwrap();
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a2+"));
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b2+"));
    // outside a transaction block the keyless UPDATE commits atomically too
    let n = db
        .execute("UPDATE users SET v = v || '!'", &[])
        .await
        .unwrap();
    assert_eq!(n, 2);
    db.batch_execute("UPDATE users SET v = v || '?'")
        .await
        .unwrap();
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a2+!?"));
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b2+!?"));
    // the session goes on normally afterwards
    let r = db
        .query_one("SELECT v FROM users WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "b2+!?");
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_of_a_two_shard_transaction_leaves_nothing() {
    let c = cluster("").await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(on_shard(&c, 0, a).await, None);
    assert_eq!(on_shard(&c, 1, b).await, None);
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_prepare_rolls_back_every_shard() {
    let c = cluster("").await;
    let (db, a, b) = setup(&c).await;
    // On s1 only: a deferred check that fails at commit time (PREPARE
    // runs deferred triggers).
    c.direct(1)
        .await
        .batch_execute(
            "CREATE FUNCTION no_b() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'deferred check failed' USING ERRCODE = '23514'; END $$;
             CREATE CONSTRAINT TRIGGER no_b AFTER INSERT ON users DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_b();",
        )
        .await
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    let e = db.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), "23514", "{e:?}");
    let m = message(&e);
    assert!(m.contains("deferred check failed"), "{m}");
    assert!(m.contains("rolled back on every shard"), "{m}");
    assert_eq!(on_shard(&c, 0, a).await, None, "s0 committed");
    assert_eq!(on_shard(&c, 1, b).await, None);
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
    // the session is usable, outside a transaction
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_prepared_transactions_makes_the_commit_fail_cleanly() {
    let mut c = cluster("").await;
    let (db, a, b) = setup(&c).await;
    drop(db);
    tokio::task::block_in_place(|| {
        c.shards[1]
            .restart_with("-c max_prepared_transactions=0")
            .unwrap()
    });
    let db = c.connect().await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    let e = db.batch_execute("COMMIT").await.unwrap_err();
    let m = message(&e);
    assert_eq!(code(&e), "55000", "{e:?}");
    assert!(m.contains("prepared transactions are disabled"), "{m}");
    assert!(m.contains("s1") && m.contains("rolled back"), "{m}");
    assert_eq!(on_shard(&c, 0, a).await, None);
    assert_eq!(on_shard(&c, 1, b).await, None);
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
    // one-shard transactions and reads still work
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_finishes_prepared_transactions_left_behind() {
    let c = cluster("twopc_grace_ms = 300\ntwopc_resolver_interval_ms = 100").await;
    let (_db, a, b) = setup(&c).await;
    let (a2, b2) = (a + 1000, b + 1000);
    // Recorded before the transaction is prepared: the resolver commits it.
    let committed = "hr_1_00000000000000bb";
    assert!(c
        .node
        .decisions
        .decide(committed, true, None)
        .await
        .unwrap());
    let s0 = c.direct(0).await;
    s0.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({a}, 'orphan'); PREPARE TRANSACTION 'hr_1_00000000000000aa'"
    ))
    .await
    .unwrap();
    s0.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({a2}, 'decided'); PREPARE TRANSACTION '{committed}'"
    ))
    .await
    .unwrap();
    // Another node's transaction (its own resolver finishes it: decisions
    // are in memory, per node) and not ours at all: left alone.
    let s1 = c.direct(1).await;
    s1.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({b}, 'node 2'); PREPARE TRANSACTION 'hr_2_00000000000000cc'"
    ))
    .await
    .unwrap();
    s1.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({b2}, 'foreign'); PREPARE TRANSACTION 'not_hotrepart'"
    ))
    .await
    .unwrap();
    wait_for(
        "the resolver to finish both hr_ transactions",
        Duration::from_secs(20),
        || async { prepared(&c, 0).await.is_empty() },
    )
    .await;
    assert_eq!(on_shard(&c, 0, a).await, None, "no decision: rolled back");
    assert_eq!(on_shard(&c, 0, a2).await.as_deref(), Some("decided"));
    // The decision it found for the orphan is the one it recorded.
    assert_eq!(
        c.node.decisions.decision("hr_1_00000000000000aa"),
        Some(false)
    );
    assert_eq!(
        prepared(&c, 1).await,
        vec![
            "hr_2_00000000000000cc".to_string(),
            "not_hotrepart".to_string()
        ]
    );
    for gid in ["not_hotrepart", "hr_2_00000000000000cc"] {
        s1.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
            .await
            .unwrap();
    }
}

/// Not a test by itself: the node process the crash test starts (this test
/// binary run again with `HR_TWOPC_NODE_CONFIG` set). Without it, it returns.
#[test]
fn node_process() {
    let Ok(path) = std::env::var("HR_TWOPC_NODE_CONFIG") else {
        return;
    };
    let cfg = hotrepart_proxy::Config::load(std::path::Path::new(&path)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = hotrepart_proxy::Node::new(cfg).unwrap();
        let listener = node.bind().await.unwrap();
        node.serve(listener).await;
    });
}

/// A node process for the shards of `c`, on `port`.
fn spawn_node(
    c: &Cluster,
    port: u16,
    failpoint: Option<&str>,
    extra: &str,
) -> tokio::process::Child {
    let mut toml = format!("listen = \"127.0.0.1:{port}\"\n{extra}\n");
    for (i, s) in c.shards.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    toml.push_str("[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n");
    toml.push_str(&tail());
    let path = c.dir.0.join(format!("node-{port}.toml"));
    std::fs::write(&path, toml).unwrap();
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "twopc::node_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("HR_TWOPC_NODE_CONFIG", &path)
    .env_remove("HOTREPART_FAILPOINT")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true);
    if let Some(f) = failpoint {
        cmd.env("HOTREPART_FAILPOINT", f);
    }
    cmd.spawn().unwrap()
}

async fn connect_to(port: u16) -> tokio_postgres::Client {
    let dsn = format!("postgres://t@127.0.0.1:{port}/postgres");
    let mut last = None;
    for _ in 0..500 {
        match connect(&dsn).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node on port {port} did not come up: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_prepare_leaves_nothing_after_restart() {
    // The in-process node only creates the table; its resolver stays idle.
    let c = cluster("twopc_resolver_interval_ms = 3600000").await;
    let (_db, a, b) = setup(&c).await;
    for (round, fp) in ["twopc_after_prepare", "twopc_after_decision"]
        .into_iter()
        .enumerate()
    {
        let (a, b) = (a + 1000 * round as i64, b + 1000 * round as i64);
        let (a, b) = {
            // keys on s0 and s1 again
            let snap = c.node.routing.catalog.load_full();
            let owner = |k: i64| {
                snap.range_for_key("users", &KeyValue::Int8(k))
                    .unwrap()
                    .write_owner
                    .as_str()
                    .to_string()
            };
            (
                (a..).find(|&k| owner(k) == "s0").unwrap(),
                (b..).find(|&k| owner(k) == "s1").unwrap(),
            )
        };
        let port = hotrepart_proxy::tools::localpg::free_port().unwrap();
        let mut node = spawn_node(&c, port, Some(fp), "");
        let db = connect_to(port).await;
        db.batch_execute("BEGIN").await.unwrap();
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
            .await
            .unwrap();
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
            .await
            .unwrap();
        let e = db.batch_execute("COMMIT").await.unwrap_err();
        assert!(e.is_closed() || e.code().is_none(), "{fp}: {e:?}");
        let status = tokio::time::timeout(Duration::from_secs(20), node.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!status.success(), "{fp}: the node did not abort");
        // Both shards were left with the transaction prepared.
        for i in 0..2 {
            let p = prepared(&c, i).await;
            assert_eq!(p.len(), 1, "{fp}: s{i}: {p:?}");
            assert!(p[0].starts_with("hr_1_"), "{fp}: {p:?}");
        }
        assert_eq!(on_shard(&c, 0, a).await, None);
        // "Restart": a node with the same configuration (and a short grace
        // period) resolves it. The in-memory decision log did not survive,
        // so even after the decision the transaction is rolled back.
        let port = hotrepart_proxy::tools::localpg::free_port().unwrap();
        let _node = spawn_node(
            &c,
            port,
            None,
            "twopc_grace_ms = 200\ntwopc_resolver_interval_ms = 100",
        );
        wait_for(
            "the restarted node to resolve the transaction",
            Duration::from_secs(30),
            || async { prepared(&c, 0).await.is_empty() && prepared(&c, 1).await.is_empty() },
        )
        .await;
        assert_eq!(on_shard(&c, 0, a).await, None, "{fp}");
        assert_eq!(on_shard(&c, 1, b).await, None, "{fp}");
        // The restarted node serves 2PC commits.
        let db = connect_to(port).await;
        db.batch_execute("BEGIN").await.unwrap();
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
            .await
            .unwrap();
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
            .await
            .unwrap();
        db.batch_execute("COMMIT").await.unwrap();
        assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a"));
        assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_on_a_read_shard_makes_commit_roll_back_the_written_one() {
    let c = cluster("").await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    let e = db
        .query("SELECT * FROM users WHERE id = $1 AND 1/0 = 1", &[&b])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22012");
    let msgs = db.simple_query("COMMIT").await.unwrap();
    let tag = msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(
        on_shard(&c, 0, a).await,
        None,
        "the failed transaction committed"
    );
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
}

/// What a [`ScriptedLog`] does at its next `decide`.
enum Step {
    /// Never answers (the caller's timeout hits).
    Hang,
    /// Records this value first (as a resolver would have), then decides.
    RecordFirst(bool),
    /// Runs this, then decides normally.
    Before(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// A decision log whose next answers a test scripts; otherwise in memory.
#[derive(Default)]
struct ScriptedLog {
    inner: LocalDecisions,
    script: Mutex<VecDeque<Step>>,
    resolver: AtomicBool,
}

impl DecisionLog for ScriptedLog {
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
        since: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<bool, DecisionError>> + Send + 'a>> {
        let step = self.script.lock().unwrap().pop_front();
        Box::pin(async move {
            match step {
                Some(Step::Hang) => std::future::pending().await,
                Some(Step::RecordFirst(v)) => {
                    self.inner.decide(gid, v, None).await?;
                }
                Some(Step::Before(f)) => f.await,
                None => {}
            }
            self.inner.decide(gid, commit, since).await
        })
    }
    fn decision(&self, gid: &str) -> Option<bool> {
        self.inner.decision(gid)
    }
    fn is_resolver(&self) -> bool {
        self.resolver.load(Ordering::SeqCst)
    }
    fn finished(&self, gid: &str) {
        self.inner.finished(gid)
    }
}

async fn scripted_cluster(extra: &str) -> (Cluster, Arc<ScriptedLog>) {
    let log = Arc::new(ScriptedLog::default());
    let l = log.clone();
    let c = Cluster::start_with(
        Opts {
            shards: 2,
            extra: format!("pool_size = 4\n{extra}"),
            users: String::new(),
            tail: tail(),
        },
        move |n| n.decisions = l,
    )
    .await;
    (c, log)
}

async fn two_shard_insert(db: &tokio_postgres::Client, a: i64, b: i64) {
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_cannot_be_recorded_is_unknown_then_resolved() {
    let (c, log) = scripted_cluster(
        "twopc_decision_timeout_ms = 200\ntwopc_grace_ms = 200\ntwopc_resolver_interval_ms = 100",
    )
    .await;
    let (db, a, b) = setup(&c).await;
    two_shard_insert(&db, a, b).await;
    // Neither `commit` nor the fallback `rollback` gets recorded.
    log.script.lock().unwrap().extend([Step::Hang, Step::Hang]);
    let e = db.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), "08007", "{e:?}");
    assert!(message(&e).contains("outcome is unknown"), "{e:?}");
    for i in 0..2 {
        assert_eq!(prepared(&c, i).await.len(), 1, "s{i}");
    }
    assert_eq!(on_shard(&c, 0, a).await, None);
    // The session goes on.
    db.execute(
        "INSERT INTO users (id, v) VALUES ($1, 'later')",
        &[&(a + 7919)],
    )
    .await
    .unwrap();
    // Once a resolver runs, it records a rollback and applies it.
    log.resolver.store(true, Ordering::SeqCst);
    wait_for("the resolver", Duration::from_secs(20), || async {
        prepared(&c, 0).await.is_empty() && prepared(&c, 1).await.is_empty()
    })
    .await;
    assert_eq!(on_shard(&c, 0, a).await, None);
    assert_eq!(on_shard(&c, 1, b).await, None);
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_decided_first_wins_over_the_commit() {
    let (c, log) = scripted_cluster("").await;
    let (db, a, b) = setup(&c).await;
    two_shard_insert(&db, a, b).await;
    log.script
        .lock()
        .unwrap()
        .push_back(Step::RecordFirst(false));
    let e = db.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), "40001", "{e:?}");
    assert!(message(&e).contains("rolled back"), "{e:?}");
    assert_eq!(on_shard(&c, 0, a).await, None);
    assert_eq!(on_shard(&c, 1, b).await, None);
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_lost_after_the_decision_is_committed_by_the_resolver() {
    let (c, log) = scripted_cluster(
        "connect_timeout_ms = 300\npool_timeout_ms = 1000\ntwopc_grace_ms = 200\ntwopc_resolver_interval_ms = 100",
    )
    .await;
    let (db, a, b) = setup(&c).await;
    two_shard_insert(&db, a, b).await;
    // Between the decision and COMMIT PREPARED, s1 stops answering: its
    // sessions are terminated and its postmaster is frozen (SIGSTOP).
    let dsn = c.shards[1].dsn();
    let pidfile = c.shards[1].dir.join("data").join("postmaster.pid");
    let postmaster: String = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let pm = postmaster.clone();
    log.script
        .lock()
        .unwrap()
        .push_back(Step::Before(Box::pin(async move {
            let d = connect(&dsn).await.unwrap();
            d.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
                .await
                .unwrap();
            let ok = std::process::Command::new("kill")
                .args(["-STOP", &pm])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        })));
    let e = db.batch_execute("COMMIT").await;
    // Whatever happens below, wake the shard up again.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &postmaster])
        .status();
    let e = e.unwrap_err();
    assert_eq!(code(&e), "58000", "{e:?}");
    assert!(message(&e).contains("IS committed"), "{e:?}");
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("a"));
    log.resolver.store(true, Ordering::SeqCst);
    wait_for("the resolver", Duration::from_secs(30), || async {
        prepared(&c, 1).await.is_empty()
    })
    .await;
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("b"));
    nothing_prepared(&c).await;
}

async fn copy_rows(
    db: &tokio_postgres::Client,
    rows: String,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = db
        .copy_in::<_, bytes::Bytes>("COPY users (id, v) FROM STDIN")
        .await?;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from(rows)).await?;
    sink.as_mut().finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_into_two_shards_commits_all_or_nothing() {
    let c = cluster("").await;
    let (db, a, b) = setup(&c).await;
    let n = copy_rows(&db, format!("{a}\tca\n{b}\tcb\n")).await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(on_shard(&c, 0, a).await.as_deref(), Some("ca"));
    assert_eq!(on_shard(&c, 1, b).await.as_deref(), Some("cb"));
    nothing_prepared(&c).await;
    // a deferred check on s1 fails the PREPARE: nothing lands on s0 either
    c.direct(1)
        .await
        .batch_execute(
            "CREATE FUNCTION no_b() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'deferred check failed' USING ERRCODE = '23514'; END $$;
             CREATE CONSTRAINT TRIGGER no_b AFTER INSERT ON users DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_b();",
        )
        .await
        .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let owner = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let a2 = (a + 1..).find(|&k| owner(k) == "s0").unwrap();
    let b2 = (b + 1..).find(|&k| owner(k) == "s1").unwrap();
    let e = copy_rows(&db, format!("{a2}\tx\n{b2}\tx\n"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "23514", "{e:?}");
    assert!(message(&e).contains("rolled back on every shard"), "{e:?}");
    assert_eq!(on_shard(&c, 0, a2).await, None, "s0 kept its row");
    assert_eq!(on_shard(&c, 1, b2).await, None);
    nothing_prepared(&c).await;
    no_open_transactions(&c).await;
}

/// Issue 17, catalog growth: the decision of every finished multi-shard
/// commit is forgotten (its coordinator reports it, in batches), so the
/// decisions the catalog holds stay bounded by the transactions in flight
/// however many commit. Before, every commit left its decision forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_of_finished_transactions_are_forgotten() {
    const COMMITS: usize = 2_000;
    const WORKERS: usize = 4;
    let c = cluster("twopc_resolver_interval_ms = 100").await;
    let (db, _, _) = setup(&c).await;
    // A key on each shard per worker.
    let snap = c.node.routing.catalog.load_full();
    let on = |s: &str| {
        (1..10_000i64)
            .filter(|&k| {
                snap.range_for_key("users", &KeyValue::Int8(k))
                    .unwrap()
                    .write_owner
                    .as_str()
                    == s
            })
            .take(WORKERS)
            .collect::<Vec<_>>()
    };
    let (k0, k1) = (on("s0"), on("s1"));
    for k in k0.iter().chain(&k1) {
        db.execute("INSERT INTO users (id, v) VALUES ($1, '0')", &[k])
            .await
            .unwrap();
    }
    let horizon0 = c.node.decisions.horizon().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = c.connect().await;
        let done = done.clone();
        let (a, b) = (k0[w], k1[w]);
        workers.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < COMMITS && std::time::Instant::now() < deadline {
                // One statement per string: a string is routed whole.
                for sql in [
                    format!("BEGIN; UPDATE users SET v = v || 'x' WHERE id = {a}"),
                    format!("UPDATE users SET v = v || 'x' WHERE id = {b}"),
                    "COMMIT".to_string(),
                ] {
                    client.batch_execute(&sql).await.unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut most = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        most = most.max(c.node.catalog_handle.catalog().decision_count());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let n = done.load(Ordering::SeqCst);
    assert!(n >= COMMITS, "only {n} commits in the time allowed");
    assert_eq!(
        c.node.decisions.horizon().unwrap() - horizon0,
        n as u64,
        "one decision per commit"
    );
    eprintln!("{n} commits; at most {most} decisions held at once");
    // In flight plus a resolver tick's worth (the rate times the tick:
    // ~300 at 1,000 commits/s), not one per commit.
    assert!(most <= COMMITS / 4, "{most} decisions held at once");
    wait_for(
        "every decision to be forgotten",
        Duration::from_secs(10),
        || async { c.node.catalog_handle.catalog().decision_count() == 0 },
    )
    .await;
    assert_eq!(c.node.catalog_handle.status().decisions, 0);
    nothing_prepared(&c).await;
}

/// A prepared transaction whose decision is recorded keeps it until the
/// resolver has finished it on every shard, however many sweeps run
/// meanwhile: a forgotten commit decision would make the resolver roll it
/// back (no decision: rollback). The in-doubt transaction is prepared in a
/// database that refuses connections, so the resolver lists it (from
/// `pg_prepared_xacts`) but cannot finish it; an undecided one beside it
/// shows that sweeps ran (its rollback decision is recorded, then swept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_doubt_transaction_keeps_its_decision_until_it_is_resolved() {
    let c = cluster("twopc_grace_ms = 300\ntwopc_resolver_interval_ms = 100").await;
    let (_db, a, b) = setup(&c).await;
    let s0 = c.direct(0).await;
    s0.batch_execute("CREATE DATABASE otherdb").await.unwrap();
    let other_dsn = format!(
        "{}/otherdb",
        c.shards[0].dsn().strip_suffix("/postgres").unwrap()
    );
    let other = connect(&other_dsn).await.unwrap();
    let in_doubt = "hr_1_00000000000000dd";
    other
        .batch_execute(&format!(
            "CREATE TABLE users (id bigint PRIMARY KEY, v text); BEGIN; INSERT INTO users VALUES ({a}, 'in doubt'); PREPARE TRANSACTION '{in_doubt}'"
        ))
        .await
        .unwrap();
    // The coordinator's decision, recorded after its PREPARE; then it dies.
    let since = c.node.decisions.horizon();
    assert!(c
        .node
        .decisions
        .decide(in_doubt, true, since)
        .await
        .unwrap());
    drop(other);
    s0.batch_execute("ALTER DATABASE otherdb ALLOW_CONNECTIONS false")
        .await
        .unwrap();
    // An undecided orphan beside it: the resolver records a rollback.
    let orphan = "hr_1_00000000000000ee";
    let s1 = c.direct(1).await;
    s1.batch_execute(&format!(
        "BEGIN; INSERT INTO users VALUES ({b}, 'orphan'); PREPARE TRANSACTION '{orphan}'"
    ))
    .await
    .unwrap();
    wait_for(
        "the orphan's rollback to be recorded",
        Duration::from_secs(20),
        || async { c.node.decisions.decision(orphan) == Some(false) },
    )
    .await;
    // Swept after the grace period (the in-doubt decision, older, was due
    // too): a sweep ran while the in-doubt transaction was listed.
    wait_for(
        "the orphan's decision to be swept",
        Duration::from_secs(20),
        || async { c.node.decisions.decision(orphan).is_none() },
    )
    .await;
    assert_eq!(prepared(&c, 1).await, Vec::<String>::new());
    assert_eq!(prepared(&c, 0).await, vec![in_doubt.to_string()]);
    assert_eq!(c.node.decisions.decision(in_doubt), Some(true), "kept");
    // The database accepts connections again: the resolver commits it,
    // then forgets the decision.
    s0.batch_execute("ALTER DATABASE otherdb ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    wait_for(
        "the in-doubt transaction to be committed",
        Duration::from_secs(20),
        || async { prepared(&c, 0).await.is_empty() },
    )
    .await;
    let other = connect(&other_dsn).await.unwrap();
    let v: String = other
        .query_one("SELECT v FROM users WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "in doubt", "committed by its recorded decision");
    wait_for(
        "its decision to be forgotten",
        Duration::from_secs(20),
        || async { c.node.decisions.decision(in_doubt).is_none() },
    )
    .await;
}

/// Advisory locks holding `node_id`'s claim on a shard (read directly).
async fn claims_held(dsn: &str, node_id: i64) -> i64 {
    connect(dsn)
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = 2",
            &[
                &i64::from(hotrepart_proxy::control::resolver::CLAIM_CLASS),
                &node_id,
            ],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs `hotrepart serve` for `c`'s shards as standalone node `node_id`:
/// Err(its output) when it exits within 30 s, Ok(child) once it listens.
async fn serve_standalone(c: &Cluster, node_id: u64) -> Result<tokio::process::Child, String> {
    let port = hotrepart_proxy::tools::localpg::free_port().unwrap();
    let mut toml = format!("listen = \"127.0.0.1:{port}\"\nnode_id = {node_id}\n");
    for (i, s) in c.shards.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    toml.push_str("[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n");
    let path = c.dir.0.join(format!("standalone-{port}.toml"));
    std::fs::write(&path, toml).unwrap();
    let log = c.dir.0.join(format!("standalone-{port}.log"));
    let mut child = tokio::process::Command::new(hotrepart_tests::procs::bin("hotrepart"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let out = std::fs::read_to_string(&log).unwrap_or_default()
                + &std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            return Err(format!("exit {st}: {out}"));
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node_id {node_id} neither served nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 17: two standalone nodes with the same `node_id` in front of the
/// same shards would resolve each other's in-doubt transactions by the
/// wrong decisions. A standalone node's resolver holds a claim on every
/// shard (an advisory lock on its connection); `hotrepart serve` with a
/// node_id another node holds refuses to start and says who holds it and
/// what to do; another node_id starts; once the first node is gone, its
/// node_id is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_standalone_node_with_the_same_node_id_is_refused() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "node_id = 7\ntwopc_resolver_interval_ms = 100".into(),
        users: String::new(),
        tail: tail(),
    })
    .await;
    // The running node claims node_id 7 on both shards.
    let start = std::time::Instant::now();
    while claims_held(&c.shards[0].dsn(), 7).await != 1
        || claims_held(&c.shards[1].dsn(), 7).await != 1
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no claim taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Err(out) = serve_standalone(&c, 7).await else {
        panic!("a second node with node_id 7 must not serve");
    };
    assert!(
        out.contains("refusing to start")
            && out.contains("another hotrepart node with node_id 7 is in front of shard s0")
            && out.contains("backend pid")
            && out.contains("give each node its own node_id")
            && out.contains("pg_terminate_backend"),
        "{out}"
    );
    // Another node_id is welcome.
    let mut other = serve_standalone(&c, 8).await.expect("node_id 8 serves");
    assert_eq!(claims_held(&c.shards[0].dsn(), 7).await, 1);
    other.kill().await.unwrap();
    // The first node stops: node_id 7 is free.
    assert!(c.node.shutdown(Duration::from_secs(5)).await);
    let start = std::time::Instant::now();
    while claims_held(&c.shards[0].dsn(), 7).await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the claim outlived its node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = serve_standalone(&c, 7)
        .await
        .expect("node_id 7 serves once the first node is gone");
    again.kill().await.unwrap();
}
