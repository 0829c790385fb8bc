//! Transactions and protocol corner cases across shards: each test is a
//! reproduction of a bug found in review, kept as a regression test.
#![allow(clippy::unwrap_used)]

use bytes::{Buf, BytesMut};
use hotrepart_router::catalog::{KeyValue, RoutingSnapshot};
use hotrepart_tests::*;
use postgres_protocol::message::frontend;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEED: u64 = 7;

async fn cluster() -> Cluster {
    Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 2".into(),
        users: "[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        tail: format!(
            "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    })
    .await
}

/// Two keys owned by different shards: (key on s0, key on s1).
fn keys(snap: &RoutingSnapshot) -> (i64, i64) {
    keys_from(snap, 1)
}

/// The first keys from `start` on that shards s0 and s1 own.
fn keys_from(snap: &RoutingSnapshot, start: i64) -> (i64, i64) {
    let owner = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let a = (start..start + 1000).find(|&k| owner(k) == "s0").unwrap();
    let b = (start..start + 1000).find(|&k| owner(k) == "s1").unwrap();
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

async fn count(db: &tokio_postgres::Client, id: i64) -> i64 {
    db.query_one("SELECT count(*) FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_in_the_same_string_still_counts_the_written_shard() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({a}, 'a')"
    ))
    .await
    .unwrap();
    // The second shard's write joins the transaction: both shards are
    // written, so COMMIT is a two-phase commit over both.
    db.batch_execute(&format!("INSERT INTO users (id, v) VALUES ({b}, 'b')"))
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&db, a).await, 1, "the first write is lost");
    assert_eq!(count(&db, b).await, 1);
    no_open_transactions(&c).await;
}

/// COMMIT with another statement in one string, in a transaction that
/// wrote one shard and read another: as on PostgreSQL, COMMIT ends the
/// transaction and the next statement runs after it (this was refused,
/// 0A000, before issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_mixed_into_a_string_on_a_multi_shard_transaction_commits() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, v) VALUES ({a}, 'a')"
    ))
    .await
    .unwrap();
    db.query("SELECT * FROM users WHERE id = $1", &[&b])
        .await
        .unwrap();
    let m = db.simple_query("COMMIT; SELECT 1").await.unwrap();
    let rows = m
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 1, "{m:?}");
    assert_eq!(count(&db, a).await, 1);
    // The session is outside a transaction: ROLLBACK only warns.
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&db, a).await, 1);
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_on_one_shard_aborts_the_whole_transaction() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("BEGIN").await.unwrap();
    db.query("SELECT * FROM users WHERE id = $1", &[&a])
        .await
        .unwrap();
    let e = db.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    let e = db
        .batch_execute(&format!("INSERT INTO users (id, v) VALUES ({b}, 'b')"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25P02");
    let msgs = db.simple_query("COMMIT").await.unwrap();
    let tag = msgs
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_)));
    assert!(tag);
    assert_eq!(count(&db, b).await, 0);
    no_open_transactions(&c).await;
}

/// BEGIN and a write to every shard in one string: the transaction stays
/// open over both shards (refused with 0A000 before issue 14); ROLLBACK
/// undoes the write everywhere, COMMIT commits it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_write_with_begin_in_the_string_stays_in_the_transaction() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({a}, 'x'), ({b}, 'x')"
    ))
    .await
    .unwrap();
    let changed = |v: &'static str| {
        let db = &db;
        async move {
            db.query_one("SELECT count(*) FROM users WHERE v = $1", &[&v])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    for (end, n) in [("ROLLBACK", 0), ("COMMIT", 2)] {
        db.batch_execute("BEGIN; UPDATE users SET v = 'changed'")
            .await
            .unwrap();
        db.batch_execute(end).await.unwrap();
        assert_eq!(changed("changed").await, n, "after {end}");
    }
    no_open_transactions(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_reads_ignore_differing_table_oids() {
    let c = cluster().await;
    // shift OIDs on one shard
    c.direct(1)
        .await
        .batch_execute("CREATE TABLE shift_oids (x int); DROP TABLE shift_oids")
        .await
        .unwrap();
    let (db, a, b) = setup(&c).await;
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({a}, 'a'), ({b}, 'b')"
    ))
    .await
    .unwrap();
    let rows = db.simple_query("SELECT * FROM users").await.unwrap();
    let n = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_inside_a_multi_shard_transaction_does_not_leak() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 1".into(),
        tail: format!(
            "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
        ..Opts::default()
    })
    .await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("BEGIN").await.unwrap();
    db.query("SELECT * FROM users WHERE id = $1", &[&a])
        .await
        .unwrap();
    db.batch_execute("SET work_mem = '7777kB'").await.unwrap();
    db.query("SELECT * FROM users WHERE id = $1", &[&b])
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    let other = c.connect().await;
    for id in [a, b] {
        // pin each shard's (only) backend with a keyed read in a transaction
        other.batch_execute("BEGIN").await.unwrap();
        other
            .query("SELECT * FROM users WHERE id = $1", &[&id])
            .await
            .unwrap();
        let wm: String = other.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(wm, "4MB", "another client's SET leaked (shard of key {id})");
        other.batch_execute("COMMIT").await.unwrap();
        db.batch_execute("BEGIN").await.unwrap();
        db.query("SELECT * FROM users WHERE id = $1", &[&id])
            .await
            .unwrap();
        let wm: String = db.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(
            wm, "7777kB",
            "the client lost its own SET (shard of key {id})"
        );
        db.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_reuse_pooled_backends() {
    let c = cluster().await;
    let (db, a, _) = setup(&c).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..5 {
        db.batch_execute("BEGIN").await.unwrap();
        db.query("SELECT * FROM users WHERE id = $1", &[&a])
            .await
            .unwrap();
        // no table: runs on the shard the transaction is on
        let p: i32 = db
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        pids.insert(p);
        db.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(
        pids.len(),
        1,
        "each transaction got a new backend: {pids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_error_in_the_extended_protocol_keeps_the_session_in_sync() {
    let c = cluster().await;
    let (db, _, _) = setup(&c).await;
    db.batch_execute("CREATE TABLE h (a int)").await.unwrap();
    let sink = db.copy_in("COPY h FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    let _ = sink
        .send(bytes::Bytes::from_static(b"not a number\n"))
        .await;
    assert!(sink.finish().await.is_err());
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.batch_execute("CREATE TABLE h2 (a int)").await.unwrap();
    })
    .await;
    assert!(r.is_ok(), "session hung after a failed COPY");
    no_open_transactions(&c).await;
}

/// A minimal raw protocol client (trust user `t`) for message sequences
/// drivers do not produce.
struct Raw {
    s: tokio::net::TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(c: &Cluster) -> Raw {
        let mut s = tokio::net::TcpStream::connect(c.addr).await.unwrap();
        let mut out = BytesMut::new();
        frontend::startup_message([("user", "t"), ("database", "postgres")], &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        r.until_ready().await;
        r
    }

    async fn send(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        f(&mut out);
        self.s.write_all(&out).await.unwrap();
    }

    /// Reads messages until ReadyForQuery; fails the test after 10 s.
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.until(b'Z').await
    }

    /// Reads the next message; fails the test after 10 s.
    async fn next(&mut self) -> (u8, Vec<u8>) {
        let mut m = self.until_with(|_| true).await;
        m.pop().unwrap()
    }

    /// Reads messages until one tagged `end`; fails the test after 10 s.
    async fn until(&mut self, end: u8) -> Vec<(u8, Vec<u8>)> {
        self.until_with(|t| t == end).await
    }

    /// Reads messages up to the first whose tag `last` accepts; fails the
    /// test after 10 s.
    async fn until_with(&mut self, last: impl Fn(u8) -> bool) -> Vec<(u8, Vec<u8>)> {
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut msgs = Vec::new();
            loop {
                while self.buf.len() >= 5 {
                    let len =
                        u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                            as usize;
                    if self.buf.len() < len + 1 {
                        break;
                    }
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    msgs.push((tag, body));
                    if last(tag) {
                        return msgs;
                    }
                }
                let n = self.s.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "connection closed; got {msgs:?}");
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!("the awaited message did not come within 10 s: the session hangs")
        })
    }
}

fn tags(m: &[(u8, Vec<u8>)]) -> String {
    m.iter().map(|(t, _)| *t as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_statement_name_then_the_session_goes_on() {
    let c = cluster().await;
    let mut r = Raw::connect(&c).await;
    for _ in 0..2 {
        r.send(|o| {
            frontend::parse("s1", "SELECT 1", std::iter::empty(), o).unwrap();
            frontend::sync(o);
        })
        .await;
    }
    assert_eq!(tags(&r.until_ready().await), "1Z");
    let second = r.until_ready().await;
    assert_eq!(tags(&second), "EZ", "{second:?}");
    r.send(|o| frontend::query("SELECT 2", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_pipeline_never_reaches_another_client() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    let ins = |id: i64| format!("INSERT INTO users (id, v) VALUES ({id}, 'raw')");
    // shard of a: Parse/Bind/Execute + Flush, no Sync
    let qa = ins(a);
    r.send(|o| {
        frontend::parse("", &qa, std::iter::empty(), o).unwrap();
        // Bind: unnamed portal and statement, no parameters, no formats
        o.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
        frontend::execute("", 0, o).unwrap();
        frontend::flush(o);
    })
    .await;
    // then a statement for the other shard, with Sync: refused
    let qb = ins(b);
    r.send(|o| {
        frontend::query(&qb, o).unwrap();
    })
    .await;
    let m = r.until_ready().await;
    assert!(tags(&m).contains('E'), "{m:?}");
    // the client goes away without ever syncing: nothing of it stays
    drop(r);
    no_open_transactions(&c).await;
    assert_eq!(count(&db, b).await, 0);
    let _ = a;
}

/// One statement of a pipeline as libpq's pipeline mode sends it (psycopg
/// 3): Parse, Bind, Describe portal, Execute, Flush — no Sync.
fn pipelined(o: &mut BytesMut, sql: &str) {
    frontend::parse("", sql, std::iter::empty(), o).unwrap();
    o.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::describe(b'P', "", o).unwrap();
    frontend::execute("", 0, o).unwrap();
    frontend::flush(o);
}

/// Issue 14: psycopg 3's async pipeline in autocommit hung through a
/// 2-shard node. An error skips to the next Sync exactly as PostgreSQL
/// does (there: `12TDC` for a good statement, `E` for the failing one,
/// nothing for what follows it up to Sync, then `Z`), whichever shards
/// the statements went to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_a_pipeline_skips_to_sync_whichever_shards_the_statements_go_to() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    for k in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&k])
            .await
            .unwrap();
    }
    let on = |k: i64| format!("SELECT v FROM users WHERE id = {k}");
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "psycopg's sequence",
            vec![
                "select 1".into(),
                "select * from doesnotexist".into(),
                "select 'aborted'".into(),
            ],
        ),
        (
            "error on the other shard",
            vec![
                on(a),
                format!("SELECT v::int FROM users WHERE id = {b}"),
                on(a),
            ],
        ),
        (
            "error on the first shard after the other",
            vec![
                on(b),
                format!("SELECT v::int FROM users WHERE id = {a}"),
                on(b),
            ],
        ),
        (
            "error then a keyless read",
            vec![
                on(a),
                "select * from doesnotexist".into(),
                "SELECT count(*) FROM users".into(),
            ],
        ),
    ];
    for (what, stmts) in cases {
        let mut r = Raw::connect(&c).await;
        let first = stmts[0].clone();
        r.send(|o| {
            for s in &stmts {
                pipelined(o, s);
            }
            frontend::sync(o);
            pipelined(o, "select 2");
            frontend::sync(o);
        })
        .await;
        let m1 = r.until_ready().await;
        assert_eq!(tags(&m1), "12TDCEZ", "{what} ({first}): {m1:?}");
        let m2 = r.until_ready().await;
        assert_eq!(tags(&m2), "12TDCZ", "{what}: after the Sync: {m2:?}");
        // and the session goes on
        r.send(|o| frontend::query("SELECT 3", o).unwrap()).await;
        assert_eq!(tags(&r.until_ready().await), "TDCZ", "{what}");
        // The same with the error read before the rest is sent.
        let mut r = Raw::connect(&c).await;
        r.send(|o| {
            pipelined(o, &stmts[0]);
            pipelined(o, &stmts[1]);
        })
        .await;
        let m = r.until(b'E').await;
        assert_eq!(tags(&m), "12TDCE", "{what}, error first: {m:?}");
        r.send(|o| {
            pipelined(o, &stmts[2]);
            frontend::sync(o);
            pipelined(o, "select 2");
            frontend::sync(o);
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "Z", "{what}, error first: {m:?}");
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "12TDCZ", "{what}, error first: {m:?}");
    }
    no_open_transactions(&c).await;
}

/// Bind (text parameters), Execute and Sync of the prepared statement
/// `stmt`, as asyncpg runs a statement it prepared before.
fn bind_execute_sync(o: &mut BytesMut, stmt: &str, params: &[&str]) {
    frontend::bind(
        "",
        stmt,
        std::iter::empty(),
        params.iter().map(|p| p.as_bytes()),
        |p, o| {
            o.extend_from_slice(p);
            Ok(postgres_protocol::IsNull::No)
        },
        std::iter::empty(),
        o,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, o).unwrap();
    frontend::sync(o);
}

/// asyncpg's prepare: Parse and Describe of a named statement, then Flush.
async fn prepare_with_flush(r: &mut Raw, stmt: &str, sql: &str) {
    r.send(|o| {
        frontend::parse(stmt, sql, std::iter::empty(), o).unwrap();
        frontend::describe(b'S', stmt, o).unwrap();
        frontend::flush(o);
    })
    .await;
    // ParseComplete, ParameterDescription, then RowDescription or NoData
    let m = [r.next().await, r.next().await, r.next().await];
    assert!(tags(&m) == "1tT" || tags(&m) == "1tn", "{stmt}: {m:?}");
}

/// Rows of `users` with key `id` directly on shard `i`.
async fn count_on(c: &Cluster, i: usize, id: i64) -> i64 {
    c.direct(i)
        .await
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Issue 14: asyncpg prepares a statement with Parse/Describe/Flush (no
/// key yet: it goes to some shard) and runs it later with Bind/Execute/
/// Sync, whose key may route to another shard. As on PostgreSQL it runs
/// there: the node ends the prepared-only part with a hidden Sync and
/// prepares the statement again where the Bind goes; inside a transaction
/// block both shards stay in the transaction (ROLLBACK undoes both, COMMIT
/// commits both). Through a 2-shard node this was refused (0A000
/// "messages sent with Flush but without Sync are still open").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_with_flush_runs_on_the_shard_of_its_key() {
    let c = cluster().await;
    let (_db, a, b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    prepare_with_flush(&mut r, "ins", "INSERT INTO users (id, v) VALUES ($1, $2)").await;
    for k in [b, a] {
        let id = k.to_string();
        r.send(|o| bind_execute_sync(o, "ins", &[&id, "x"])).await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "2CZ", "insert {k}: {m:?}");
        assert_eq!(m.last().unwrap().1, b"I");
    }
    assert_eq!((count_on(&c, 0, a).await, count_on(&c, 1, a).await), (1, 0));
    assert_eq!((count_on(&c, 0, b).await, count_on(&c, 1, b).await), (0, 1));
    // A read prepared the same way answers from the key's shard.
    prepare_with_flush(&mut r, "sel", "SELECT id FROM users WHERE id = $1").await;
    for k in [b, a] {
        let id = k.to_string();
        r.send(|o| bind_execute_sync(o, "sel", &[&id])).await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "2DCZ", "select {k}: {m:?}");
        assert!(m[1].1.ends_with(id.as_bytes()), "{k}: {m:?}");
    }
    // In a transaction block: prepared before any shard is used, then
    // run on both shards; ROLLBACK, then COMMIT.
    let snap = c.node.routing.catalog.load_full();
    let on_s0 = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            == "s0"
    };
    let a2 = (1000..2000).find(|&k| on_s0(k)).unwrap();
    let b2 = (1000..2000).find(|&k| !on_s0(k)).unwrap();
    for (end, rows) in [("ROLLBACK", 0), ("COMMIT", 1)] {
        r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
        assert_eq!(tags(&r.until_ready().await), "CZ");
        let stmt = format!("ins_{end}");
        prepare_with_flush(&mut r, &stmt, "INSERT INTO users (id, v) VALUES ($1, $2)").await;
        for k in [b2, a2] {
            let id = k.to_string();
            r.send(|o| bind_execute_sync(o, &stmt, &[&id, "t"])).await;
            let m = r.until_ready().await;
            assert_eq!(tags(&m), "2CZ", "{end}: insert {k}: {m:?}");
            assert_eq!(m.last().unwrap().1, b"T", "{end}: {m:?}");
        }
        // prepared on the shard written last (a2's), run on the other:
        // the hidden Sync there leaves its write in the transaction
        prepare_with_flush(
            &mut r,
            &format!("sel_{end}"),
            "SELECT v FROM users WHERE id = $1",
        )
        .await;
        let id = b2.to_string();
        r.send(|o| bind_execute_sync(o, &format!("sel_{end}"), &[&id]))
            .await;
        assert_eq!(tags(&r.until_ready().await), "2DCZ", "{end}");
        r.send(|o| frontend::query(end, o).unwrap()).await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "CZ", "{end}: {m:?}");
        assert_eq!(m.last().unwrap().1, b"I");
        assert_eq!(count_on(&c, 0, a2).await, rows, "{end}: key {a2}");
        assert_eq!(count_on(&c, 1, b2).await, rows, "{end}: key {b2}");
    }
    no_open_transactions(&c).await;
}

/// One statement of a pipeline without a Flush after it (psycopg's
/// pipeline when it does not wait for results): Parse, Bind, Describe
/// portal, Execute.
fn unflushed(o: &mut BytesMut, sql: &str) {
    frontend::parse("", sql, std::iter::empty(), o).unwrap();
    o.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::describe(b'P', "", o).unwrap();
    frontend::execute("", 0, o).unwrap();
}

/// Issue 14: a pipelined batch holding a multi-shard statement (DDL, a
/// merged read) beside other statements, as psycopg's pipeline sends it,
/// was refused ("must hold only that statement"). The node cuts it at
/// the multi-shard statement and runs the parts in order; the client sees
/// the replies PostgreSQL gives, one ReadyForQuery at its Sync, and after
/// an error nothing more up to that Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_with_a_multi_shard_statement_runs_in_parts() {
    let c = cluster().await;
    let (_db, a, b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    let one = |sql: String| {
        move |o: &mut BytesMut| {
            unflushed(o, &sql);
            frontend::sync(o);
        }
    };
    r.send(one(format!("INSERT INTO users (id, v) VALUES ({b}, 'x')")))
        .await;
    assert_eq!(tags(&r.until_ready().await), "12nCZ");
    // DDL, a keyed write, a merged read, a keyed read, in one Sync
    r.send(|o| {
        unflushed(o, "CREATE TABLE pm (id int)");
        unflushed(o, &format!("INSERT INTO users (id, v) VALUES ({a}, 'y')"));
        unflushed(o, "SELECT count(*) FROM users");
        unflushed(o, &format!("SELECT v FROM users WHERE id = {b}"));
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12nC12nC12TDC12TDCZ", "{m:?}");
    let rows: Vec<&Vec<u8>> = m
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| b)
        .collect();
    assert!(rows[0].ends_with(b"\x012"), "count: {m:?}");
    assert!(rows[1].ends_with(b"\x01x"), "read: {m:?}");
    assert_eq!(m.last().unwrap().1, b"I");
    for i in 0..2 {
        c.direct(i)
            .await
            .query("SELECT * FROM pm", &[])
            .await
            .unwrap();
    }
    assert_eq!((count_on(&c, 0, a).await, count_on(&c, 1, a).await), (1, 0));
    // an error before the multi-shard statement: nothing after it runs
    r.send(|o| {
        unflushed(o, "SELECT * FROM doesnotexist");
        unflushed(o, "SELECT count(*) FROM users");
        unflushed(o, "CREATE TABLE pm2 (id int)");
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    // an error in the multi-shard statement: the same
    r.send(|o| {
        unflushed(o, "SELECT 1");
        unflushed(o, "SELECT v::int FROM users");
        unflushed(o, "CREATE TABLE pm2 (id int)");
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    let t = tags(&m);
    assert!(t.starts_with("12TDC12") && t.ends_with("EZ"), "{m:?}");
    assert_eq!(t.matches('C').count(), 1, "{m:?}");
    for i in 0..2 {
        let e = c.direct(i).await.query("SELECT * FROM pm2", &[]).await;
        assert!(e.is_err(), "pm2 was created on shard {i}");
    }
    // the session goes on
    r.send(one("SELECT 3".into())).await;
    assert_eq!(tags(&r.until_ready().await), "12TDCZ");
    // In a transaction block the parts stay in the transaction: its
    // ROLLBACK undoes them on every shard.
    r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    let (a2, b2) = (a + 100_000, b + 100_000);
    r.send(|o| {
        unflushed(o, &format!("INSERT INTO users (id, v) VALUES ({a2}, 't')"));
        unflushed(o, "SELECT count(*) FROM users");
        unflushed(o, &format!("INSERT INTO users (id, v) VALUES ({b2}, 't')"));
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12nC12TDC12nCZ", "{m:?}");
    assert!(
        m[7].1.ends_with(b"\x013"),
        "count in the transaction: {m:?}"
    );
    assert_eq!(m.last().unwrap().1, b"T");
    r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    for i in 0..2 {
        assert_eq!(count_on(&c, i, a2).await + count_on(&c, i, b2).await, 0);
    }
    no_open_transactions(&c).await;
}

/// Issue 14: a pipelined batch whose statements go to different shards
/// (psycopg's `executemany`, a driver's batch) was refused ("send a Sync
/// between them"). Ended by Sync it runs cut where the shard changes, and
/// outside a transaction block as PostgreSQL runs such a batch: one
/// implicit transaction, all or nothing (two-phase commit over the shards
/// that wrote). Ended by Flush it is still refused, in words that say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_over_several_shards_is_one_implicit_transaction() {
    let c = cluster().await;
    let (_db, a, b) = setup(&c).await;
    let snap = c.node.routing.catalog.load_full();
    let mut r = Raw::connect(&c).await;
    let insert = |k: i64| format!("INSERT INTO users (id, v) VALUES ({k}, 'p')");
    // All good: both rows committed, one ReadyForQuery, idle.
    r.send(|o| {
        unflushed(o, &insert(a));
        unflushed(o, &insert(b));
        unflushed(o, &format!("SELECT v FROM users WHERE id = {a}"));
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12nC12nC12TDCZ", "{m:?}");
    assert_eq!(m.last().unwrap().1, b"I");
    assert_eq!((count_on(&c, 0, a).await, count_on(&c, 1, b).await), (1, 1));
    no_open_transactions(&c).await;
    // A duplicate key in the third statement: PostgreSQL's error, and
    // neither of the two rows before it is kept.
    let (a2, b2) = keys_from(&snap, 100_000);
    r.send(|o| {
        unflushed(o, &insert(a2));
        unflushed(o, &insert(b2));
        unflushed(o, &insert(a2));
        unflushed(o, "SELECT 'skipped'");
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12nC12nC12nEZ", "{m:?}");
    assert!(
        String::from_utf8_lossy(&m[m.len() - 2].1).contains("23505"),
        "{m:?}"
    );
    assert_eq!(m.last().unwrap().1, b"I");
    assert_eq!(
        (count_on(&c, 0, a2).await, count_on(&c, 1, b2).await),
        (0, 0)
    );
    no_open_transactions(&c).await;
    // Inside a transaction block the parts join it: COMMIT keeps both.
    let (a3, b3) = keys_from(&snap, 200_000);
    r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        unflushed(o, &insert(a3));
        unflushed(o, &insert(b3));
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12nC12nCZ", "{m:?}");
    assert_eq!(m.last().unwrap().1, b"T");
    r.send(|o| frontend::query("COMMIT", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    assert_eq!(
        (count_on(&c, 0, a3).await, count_on(&c, 1, b3).await),
        (1, 1)
    );
    // Ended by Flush: refused before anything runs.
    let (a4, b4) = keys_from(&snap, 300_000);
    r.send(|o| {
        unflushed(o, &insert(a4));
        unflushed(o, &insert(b4));
        frontend::flush(o);
    })
    .await;
    let e = r.until(b'E').await;
    let text = String::from_utf8_lossy(&e.last().unwrap().1).into_owned();
    assert!(text.contains("end it with Sync, not Flush"), "{text}");
    r.send(frontend::sync).await;
    assert_eq!(tags(&r.until_ready().await), "Z");
    assert_eq!(count_on(&c, 0, a4).await + count_on(&c, 1, b4).await, 0);
    no_open_transactions(&c).await;
}

/// Issue 14 (DDL on every shard is not atomic): a pipelined batch cut into
/// parts runs its DDL part like any multi-shard write, in a transaction on
/// every shard: when it fails on one shard it is rolled back on all, and so
/// is the part before it (a keyed INSERT): outside a transaction block the
/// batch up to Sync is one implicit transaction, as on PostgreSQL (the
/// INSERT stayed committed before the node ran cut batches in a
/// transaction of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ddl_part_of_a_pipeline_that_fails_on_one_shard_applies_on_none() {
    let c = cluster().await;
    let (_db, a, _b) = setup(&c).await;
    c.direct(1)
        .await
        .batch_execute("CREATE TABLE pd (stray int)")
        .await
        .unwrap();
    let mut r = Raw::connect(&c).await;
    r.send(|o| {
        unflushed(o, &format!("INSERT INTO users (id, v) VALUES ({a}, 'p')"));
        unflushed(o, "CREATE TABLE pd (id int)");
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    let t = tags(&m);
    assert!(t.starts_with("12nC") && t.ends_with("EZ"), "{m:?}");
    let e = m.iter().find(|(t, _)| *t == b'E').unwrap();
    let text = String::from_utf8_lossy(&e.1);
    assert!(
        text.contains("42P07") && !text.contains("did apply"),
        "{text}"
    );
    assert_eq!(m.last().unwrap().1, b"I");
    let on_s0 = c
        .direct(0)
        .await
        .query_one("SELECT to_regclass('pd') IS NOT NULL", &[])
        .await
        .unwrap()
        .get::<_, bool>(0);
    assert!(!on_s0, "pd was created on shard s0");
    assert_eq!(
        count_on(&c, 0, a).await,
        0,
        "the INSERT is rolled back with the batch"
    );
    no_open_transactions(&c).await;
}

/// LISTEN in the extended protocol, as psycopg 3 sends it (unnamed Parse,
/// Bind, Describe, Execute, Sync) and as asyncpg's `add_listener` does (a
/// named statement: Parse/Describe/Flush, then Bind/Execute/Sync; issue
/// 14, refused before): answered by the node as PostgreSQL would, and the
/// notifications arrive until UNLISTEN (prepared the same way). A named
/// LISTEN beside another statement in one batch is refused (it would run
/// on a pooled backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_in_the_extended_protocol() {
    let c = cluster().await;
    let db = c.connect().await;
    let mut r = Raw::connect(&c).await;
    r.send(|o| {
        pipelined(o, "LISTEN ext");
        frontend::sync(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "12nCZ");
    db.batch_execute("NOTIFY ext, 'hi'").await.unwrap();
    let m = r.until(b'A').await;
    let (_, body) = m.last().unwrap();
    assert!(body.ends_with(b"ext\0hi\0"), "{m:?}");
    // asyncpg: a named statement, prepared and described with Flush
    prepare_with_flush(&mut r, "l", "LISTEN ext2").await;
    r.send(|o| bind_execute_sync(o, "l", &[])).await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "2CZ", "{m:?}");
    assert!(m[1].1.starts_with(b"LISTEN\0"), "{m:?}");
    db.batch_execute("NOTIFY ext2, 'named'").await.unwrap();
    let m = r.until(b'A').await;
    assert!(m.last().unwrap().1.ends_with(b"ext2\0named\0"), "{m:?}");
    // run again from the statement cache: still one listener, no error
    r.send(|o| bind_execute_sync(o, "l", &[])).await;
    assert_eq!(tags(&r.until_ready().await), "2CZ");
    // the name is taken, as for any statement
    r.send(|o| {
        frontend::parse("l", "LISTEN ext3", std::iter::empty(), o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    assert!(String::from_utf8_lossy(&m[0].1).contains("C42P05"), "{m:?}");
    // beside another statement: refused, and nothing of the batch runs
    r.send(|o| {
        frontend::bind(
            "",
            "l",
            [],
            std::iter::empty::<&[u8]>(),
            |_, _| Ok(postgres_protocol::IsNull::No),
            [],
            o,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::execute("", 0, o).unwrap();
        pipelined(o, "SELECT 1");
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    assert!(String::from_utf8_lossy(&m[0].1).contains("C0A000"), "{m:?}");
    r.send(|o| {
        frontend::parse("l2", "LISTEN ext3", std::iter::empty(), o).unwrap();
        pipelined(o, "SELECT 1");
        frontend::sync(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "EZ");
    // UNLISTEN prepared the same way; the statement is closed as any other
    prepare_with_flush(&mut r, "u", "UNLISTEN ext2").await;
    r.send(|o| {
        bind_execute_sync(o, "u", &[]);
        frontend::close(b'S', "l", o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "2CZ", "{m:?}");
    assert!(m[1].1.starts_with(b"UNLISTEN\0"), "{m:?}");
    assert_eq!(tags(&r.until_ready().await), "3Z");
    // ext2 is no longer delivered; ext still is (after it, in order)
    db.batch_execute("NOTIFY ext2, 'gone'; NOTIFY ext, 'still'")
        .await
        .unwrap();
    let m = r.until(b'A').await;
    assert!(m.last().unwrap().1.ends_with(b"ext\0still\0"), "{m:?}");
    // the closed name is free again
    prepare_with_flush(&mut r, "l", "LISTEN ext2").await;
    r.send(frontend::sync).await;
    assert_eq!(tags(&r.until_ready().await), "Z");
}

/// The ParameterStatus a client sees carries PostgreSQL's name of its
/// encoding (`UTF8` for `utf-8`), and a name PostgreSQL does not know is
/// refused at login as PostgreSQL refuses it (22023).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoding_is_reported_under_its_postgresql_name() {
    let c = cluster().await;
    for (given, want) in [
        ("utf-8", Some("UTF8")),
        ("Unicode", Some("UTF8")),
        ("klingon", None),
    ] {
        let mut s = tokio::net::TcpStream::connect(c.addr).await.unwrap();
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", "t"),
                ("database", "postgres"),
                ("client_encoding", given),
            ],
            &mut out,
        )
        .unwrap();
        s.write_all(&out).await.unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        match want {
            Some(want) => {
                let m = r.until_ready().await;
                let status: Vec<String> = m
                    .iter()
                    .filter(|(t, _)| *t == b'S')
                    .map(|(_, b)| String::from_utf8_lossy(b).replace('\0', "="))
                    .collect();
                assert!(
                    status.contains(&format!("client_encoding={want}=")),
                    "{given}: {status:?}"
                );
            }
            None => {
                let m = r.until(b'E').await;
                let (_, body) = m.last().unwrap();
                let text = String::from_utf8_lossy(body);
                assert!(text.contains("C22023"), "{given}: {text}");
            }
        }
    }
}

/// A Bind with text parameters (one format code: text), no result formats.
fn bind_text(o: &mut BytesMut, stmt: &str, params: &[&str]) {
    let mut body = BytesMut::new();
    body.extend_from_slice(b"\0");
    body.extend_from_slice(stmt.as_bytes());
    body.extend_from_slice(b"\0");
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    o.extend_from_slice(b"B");
    o.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    o.extend_from_slice(&body);
}

/// Issue 14: a sequence-numbered column the node fills, in batches that
/// prepare two such statements together (pgx's batch prepare) and that
/// hold two unnamed ones (psycopg's pipeline): every statement of the
/// batch gets its values, every number once over the shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_columns_are_filled_for_every_statement_of_a_batch() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text, n bigserial)")
        .await
        .unwrap();
    let (a, b) = keys(&c.node.routing.catalog.load_full());
    let (a2, b2) = keys_from(&c.node.routing.catalog.load_full(), a.max(b) + 1);
    let two = "INSERT INTO users (id, v) VALUES ($1, $2)";
    let one = "INSERT INTO users (id) VALUES ($1)";
    let mut r = Raw::connect(&c).await;
    // Two named statements prepared in one batch, run in the next.
    r.send(|o| {
        frontend::parse("a", two, std::iter::empty(), o).unwrap();
        frontend::parse("b", one, std::iter::empty(), o).unwrap();
        frontend::sync(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "11Z");
    let (sa, sb) = (a.to_string(), b.to_string());
    r.send(|o| {
        bind_text(o, "a", &[&sa, "x"]);
        frontend::execute("", 0, o).unwrap();
        bind_text(o, "b", &[&sb]);
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "2C2CZ", "{m:?}");
    // Two unnamed statements in one batch.
    let (sa2, sb2) = (a2.to_string(), b2.to_string());
    r.send(|o| {
        frontend::parse("", two, std::iter::empty(), o).unwrap();
        bind_text(o, "", &[&sa2, "y"]);
        frontend::execute("", 0, o).unwrap();
        frontend::parse("", one, std::iter::empty(), o).unwrap();
        bind_text(o, "", &[&sb2]);
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12C12CZ", "{m:?}");
    let ns: Vec<i64> = db
        .query("SELECT n FROM users ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ns,
        vec![1, 2, 3, 4],
        "each number once, from the home shard"
    );
}

/// A savepoint statement runs on every shard of the transaction
/// (`savepoints::`); a batch routed as one cannot do that beside other
/// statements: refused in words, as PostgreSQL's errors skip to Sync, and
/// the transaction is failed as after any error (nothing half-applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_beside_other_statements_in_a_batch_is_refused() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    for k in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&k])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    for sql in [
        "BEGIN".to_string(),
        "SAVEPOINT s".to_string(),
        format!("UPDATE users SET v = 'y' WHERE id = {a}"),
        format!("UPDATE users SET v = 'y' WHERE id = {b}"),
    ] {
        r.send(|o| frontend::query(&sql, o).unwrap()).await;
        let m = r.until_ready().await;
        assert!(!tags(&m).contains('E'), "{sql}: {m:?}");
    }
    // ROLLBACK TO beside a write, in one batch.
    let rb = "ROLLBACK TO SAVEPOINT s".to_string();
    let up = format!("UPDATE users SET v = 'z' WHERE id = {b}");
    r.send(|o| {
        unflushed(o, &rb);
        unflushed(o, &up);
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    let err = String::from_utf8_lossy(&m[0].1).to_string();
    assert!(err.contains("0A000") && err.contains("savepoint"), "{err}");
    r.send(|o| frontend::query("COMMIT", o).unwrap()).await;
    let m = r.until_ready().await;
    assert!(tags(&m).contains('C'), "{m:?}");
    // The COMMIT of a failed transaction rolled it back: nothing changed.
    for k in [a, b] {
        let v: String = db
            .query_one("SELECT v FROM users WHERE id = $1", &[&k])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "x", "{k}");
    }
}

/// A Bind of the unnamed statement to `portal`: no parameters, text results.
fn bind_portal(o: &mut BytesMut, portal: &str) {
    let mut body = Vec::new();
    body.extend_from_slice(portal.as_bytes());
    body.extend_from_slice(&[0, 0]); // portal, "" statement
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // formats, values, result formats
    o.extend_from_slice(b"B");
    o.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    o.extend_from_slice(&body);
}

/// A named portal over two shards fetched in parts (the merged cursor of
/// `session/cursor.rs`), as PgJDBC uses one with a fetch size: the tags of
/// every reply as PostgreSQL sends them; its Close sent in the pipeline of
/// the next statement (PgJDBC's dead-portal cleanup) does not stop that
/// statement; a ROLLBACK TO a savepoint taken before a portal was bound
/// closes it, as PostgreSQL does (34000 at its next Execute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_portal_over_two_shards_in_parts_as_pgjdbc_uses_it() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    for id in [a, b, a + 1000, b + 1000] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        frontend::parse(
            "",
            "SELECT id FROM users ORDER BY id",
            std::iter::empty(),
            o,
        )
        .unwrap();
        bind_portal(o, "C_1");
        frontend::execute("C_1", 3, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "12DDDsZ", "{m:?}");
    let mut ids: Vec<i64> = m
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, d)| std::str::from_utf8(&d[6..]).unwrap().parse().unwrap())
        .collect();
    r.send(|o| {
        frontend::execute("C_1", 3, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "DCZ", "{m:?}");
    assert!(m[1].1.starts_with(b"SELECT 1"), "{m:?}");
    ids.extend(std::str::from_utf8(&m[0].1[6..]).unwrap().parse::<i64>());
    let mut want = vec![a, b, a + 1000, b + 1000];
    want.sort_unstable();
    assert_eq!(ids, want);
    // Close of the finished portal, then the next statement, one Sync.
    r.send(|o| {
        frontend::close(b'P', "C_1", o).unwrap();
        frontend::parse("", "SELECT 7", std::iter::empty(), o).unwrap();
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "312DCZ", "{m:?}");
    // A portal bound after a savepoint is closed by ROLLBACK TO it.
    r.send(|o| frontend::query("SAVEPOINT s1", o).unwrap())
        .await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        frontend::parse(
            "",
            "SELECT id FROM users ORDER BY id",
            std::iter::empty(),
            o,
        )
        .unwrap();
        bind_portal(o, "C_2");
        frontend::execute("C_2", 1, o).unwrap();
        frontend::sync(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "12DsZ");
    r.send(|o| frontend::query("ROLLBACK TO s1", o).unwrap())
        .await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        frontend::execute("C_2", 1, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    assert!(String::from_utf8_lossy(&m[0].1).contains("34000"), "{m:?}");
    r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    no_open_transactions(&c).await;
}

/// asyncpg's way with a new statement — Parse, Describe, Flush, then Bind,
/// Execute, Sync — calling a function whose body reads a sharded table:
/// refused (0A000) as in one batch; it used to run unchecked on one shard
/// (the function's lookup skipped mid-pipeline), answering with that
/// shard's rows only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_over_a_sharded_table_is_checked_after_parse_describe_flush() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute(
        "CREATE FUNCTION nusers() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM users';
         CREATE FUNCTION twice(i int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT i * 2';
         CREATE FUNCTION thrice(i int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT i * 3'",
    )
    .await
    .unwrap();
    for id in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    for begin in [false, true] {
        if begin {
            r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
            assert_eq!(tags(&r.until_ready().await), "CZ");
        }
        // A function that reads no sharded table runs (first: the refusal
        // below fails the transaction); the unnamed statement, which the
        // lookup's query dropped on its backend, is parsed again there.
        let sql = if begin {
            "SELECT thrice(14)"
        } else {
            "SELECT twice(4)"
        };
        r.send(|o| {
            frontend::parse("", sql, std::iter::empty(), o).unwrap();
            frontend::describe(b'S', "", o).unwrap();
            frontend::flush(o);
        })
        .await;
        assert_eq!(tags(&r.until(b'T').await), "1tT");
        r.send(|o| {
            bind_portal(o, "");
            frontend::execute("", 0, o).unwrap();
            frontend::sync(o);
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "2DCZ", "{m:?}");
        let want: &[u8] = if begin { b"42" } else { b"8" };
        assert!(m[1].1.ends_with(want), "{m:?}");
        r.send(|o| {
            frontend::parse("", "SELECT nusers()", std::iter::empty(), o).unwrap();
            frontend::describe(b'S', "", o).unwrap();
            frontend::flush(o);
        })
        .await;
        assert_eq!(tags(&r.until(b'T').await), "1tT");
        r.send(|o| {
            bind_portal(o, "");
            frontend::execute("", 0, o).unwrap();
            frontend::sync(o);
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "EZ", "{m:?}");
        let e = String::from_utf8_lossy(&m[0].1).to_string();
        assert!(e.contains("0A000") && e.contains("nusers"), "{e}");
    }
    r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    no_open_transactions(&c).await;
}

/// A column a sequence numbers, added in the open transaction, then
/// asyncpg-style INSERTs (Parse, Describe, Flush; Bind, Execute, Sync) on
/// both shards: the node fills it from the home shard's sequence, read in
/// the client's transaction (it used to be read on a connection apart,
/// which does not see the new column: each shard numbered it itself, and
/// the two rows got the same number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_column_added_in_the_transaction_is_filled_after_parse_describe_flush() {
    let c = cluster().await;
    let (_db, a, b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    r.send(|o| frontend::query("BEGIN; ALTER TABLE users ADD COLUMN n bigserial", o).unwrap())
        .await;
    let m = r.until_ready().await;
    assert!(tags(&m).ends_with('Z') && !tags(&m).contains('E'), "{m:?}");
    let mut got = Vec::new();
    for id in [a, b] {
        r.send(|o| {
            frontend::parse(
                "",
                "INSERT INTO users (id, v) VALUES ($1, 'x') RETURNING n",
                [20u32],
                o,
            )
            .unwrap();
            frontend::describe(b'S', "", o).unwrap();
            frontend::flush(o);
        })
        .await;
        assert_eq!(tags(&r.until(b'T').await), "1tT");
        let key = id.to_string();
        r.send(|o| {
            bind_text(o, "", &[&key]);
            frontend::execute("", 0, o).unwrap();
            frontend::sync(o);
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "2DCZ", "{m:?}");
        got.push(String::from_utf8_lossy(&m[1].1[6..]).to_string());
    }
    assert_ne!(got[0], got[1], "both rows numbered {got:?}");
    r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
}

/// An error of a Flush-ended Parse, read while the node ends that pipeline
/// for its own lookups (a function not looked up yet, an INSERT's key
/// defaults), with Bind, Execute and Sync sent in the same write: the rest
/// is skipped to the Sync and answered as PostgreSQL does (`EZ`); the
/// session goes on. (The Sync alone used to be cut again and again: the
/// session spun.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owed_error_found_while_ending_a_flushed_pipeline_skips_to_sync() {
    let c = cluster().await;
    let (_db, _a, _b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    for sql in [
        "SELECT nosuchfn(1)",
        "INSERT INTO users (id, v) VALUES (1, nosuchfn(2))",
    ] {
        r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
        assert_eq!(tags(&r.until_ready().await), "CZ");
        r.send(|o| {
            frontend::parse("", sql, std::iter::empty(), o).unwrap();
            frontend::describe(b'S', "", o).unwrap();
            frontend::flush(o);
            bind_portal(o, "");
            frontend::execute("", 0, o).unwrap();
            frontend::sync(o);
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "EZ", "{sql}: {m:?}");
        assert_eq!(m[1].1, b"E", "{sql}: a failed transaction");
        r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
        assert_eq!(tags(&r.until_ready().await), "CZ");
    }
    r.send(|o| frontend::query("SELECT 1", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "TDCZ");
}

/// The text of the first column of the first DataRow in `m`.
fn first_value(m: &[(u8, Vec<u8>)]) -> String {
    let (_, d) = m.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    String::from_utf8_lossy(&d[6..]).to_string()
}

/// A statement sent with Flush that changes what names resolve to (`SET
/// search_path`, `set_config`), then the next statement before Sync: it
/// is routed under the names PostgreSQL will use. Inside a transaction
/// block the node ends the pipeline with a hidden Sync and reads them
/// back; outside one it refuses (0A000) and the pipeline fails as
/// PostgreSQL's would (the SET undone). The next statement used to be
/// routed under the old search_path: a count of one shard's rows (1
/// instead of 2). (A temporary table that would hide a declared one is
/// refused when it is created.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_changed_before_a_flush_route_the_next_statement_under_them() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("CREATE SCHEMA s2; CREATE TABLE s2.users (id bigint, v text)")
        .await
        .unwrap();
    for id in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    let count_users = |o: &mut BytesMut| {
        frontend::parse("", "SELECT count(*) FROM users", std::iter::empty(), o).unwrap();
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    };
    // `users` is s2.users (not sharded: the home shard), empty.
    r.send(|o| frontend::query("SET search_path = s2, public", o).unwrap())
        .await;
    assert!(tags(&r.until_ready().await).ends_with("CZ"));
    // (the change, in a transaction block, its BEGIN in the pipeline as
    // psycopg 3 sends it, the count PostgreSQL gives)
    for (change, in_block, begin_pipelined, want) in [
        ("SET search_path = public", true, false, "2"),
        ("SET search_path = public", false, false, ""),
        (
            "SELECT set_config('search_path', 'public', false)",
            true,
            false,
            "2",
        ),
        ("SET search_path = public", true, true, "2"),
    ] {
        if in_block && begin_pipelined {
            r.send(|o| pipelined(o, "BEGIN")).await;
            assert_eq!(tags(&r.until(b'C').await), "12nC");
        } else if in_block {
            r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
            assert_eq!(tags(&r.until_ready().await), "CZ");
        }
        r.send(|o| pipelined(o, change)).await;
        let m = r.until(b'C').await;
        assert!(tags(&m) == "12nC" || tags(&m) == "12TDC", "{change}: {m:?}");
        r.send(count_users).await;
        let m = r.until_ready().await;
        if in_block {
            assert_eq!(tags(&m), "12DCZ", "{change}: {m:?}");
            assert_eq!(
                first_value(&m),
                want,
                "{change}: counted under the old names"
            );
            r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
            assert_eq!(tags(&r.until_ready().await), "CZ");
        } else {
            assert!(
                tags(&m).ends_with("EZ") && !tags(&m).contains('D'),
                "{change}: {m:?}"
            );
            let e = String::from_utf8_lossy(&m[m.len() - 2].1).to_string();
            assert!(e.contains("0A000") && e.contains("Sync"), "{e}");
            assert_eq!(m.last().unwrap().1, b"I", "{change}: {m:?}");
            // Refused once: the next statement prepared with Flush (as
            // asyncpg does) and run runs, under the path PostgreSQL has.
            r.send(|o| {
                frontend::parse("", "SELECT count(*) FROM users", std::iter::empty(), o).unwrap();
                frontend::describe(b'S', "", o).unwrap();
                frontend::flush(o);
            })
            .await;
            assert_eq!(tags(&r.until(b'T').await), "1tT");
            r.send(|o| {
                bind_portal(o, "");
                frontend::execute("", 0, o).unwrap();
                frontend::sync(o);
            })
            .await;
            let m = r.until_ready().await;
            assert_eq!(tags(&m), "2DCZ", "{m:?}");
            assert_eq!(first_value(&m), "0", "{m:?}");
        }
        // Undone either way (ROLLBACK, or the failed pipeline): the names
        // are as before the change.
        r.send(|o| frontend::query("SHOW search_path", o).unwrap())
            .await;
        let m = r.until_ready().await;
        let path = first_value(&m);
        r.send(count_users).await;
        let m = r.until_ready().await;
        let n = first_value(&m);
        assert_eq!((path.as_str(), n.as_str()), ("s2, public", "0"), "{change}");
        r.send(|o| frontend::query("SET search_path = s2, public", o).unwrap())
            .await;
        assert!(tags(&r.until_ready().await).ends_with("CZ"));
    }
    no_open_transactions(&c).await;
}

/// A COMMIT as asyncpg's `fetch("COMMIT")` sends it (Parse, Describe,
/// Flush; then Bind, Execute, Sync) ending a transaction that wrote to
/// both shards: the node ends the Flush-ended messages and commits with
/// two-phase commit, as a COMMIT by simple query. (It used to refuse with
/// 0A000 "messages sent with Flush but without Sync are still open" and
/// roll the transaction back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_prepared_with_flush_commits_a_two_shard_transaction() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    let sql = format!("BEGIN; INSERT INTO users (id, v) VALUES ({a}, 'x')");
    r.send(|o| frontend::query(&sql, o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CCZ");
    let sql = format!("INSERT INTO users (id, v) VALUES ({b}, 'x')");
    r.send(|o| frontend::query(&sql, o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        frontend::parse("", "COMMIT", std::iter::empty(), o).unwrap();
        frontend::describe(b'S', "", o).unwrap();
        frontend::flush(o);
    })
    .await;
    assert_eq!(tags(&r.until(b'n').await), "1tn");
    r.send(|o| {
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "2CZ", "{m:?}");
    assert_eq!(m.last().unwrap().1, b"I");
    assert_eq!((count(&db, a).await, count(&db, b).await), (1, 1));
    no_open_transactions(&c).await;
}

/// A SQL `PREPARE` with parameter types (the node reads their OIDs on the
/// shard with a query of its own) right after Parse, Describe and Flush
/// in the same write: the replies of those come first and the node's
/// query does not read them as its own; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_prepare_after_parse_describe_flush_reads_its_types_apart() {
    let c = cluster().await;
    let (_db, _a, _b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    for begin in [false, true] {
        if begin {
            r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
            assert_eq!(tags(&r.until_ready().await), "CZ");
        }
        r.send(|o| {
            frontend::parse("", "SELECT 41 + 1", std::iter::empty(), o).unwrap();
            frontend::describe(b'S', "", o).unwrap();
            frontend::flush(o);
            frontend::query("PREPARE p(int, text) AS SELECT $1 + 1, $2", o).unwrap();
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "1tTCZ", "{m:?}");
        r.send(|o| frontend::query("EXECUTE p(1, 'x')", o).unwrap())
            .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "TDCZ", "{m:?}");
        assert_eq!(first_value(&m).as_bytes()[..1], *b"2", "{m:?}");
        r.send(|o| frontend::query("DEALLOCATE p", o).unwrap())
            .await;
        assert_eq!(tags(&r.until_ready().await), "CZ");
    }
    r.send(|o| frontend::query("COMMIT", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    no_open_transactions(&c).await;
}

/// The unnamed statement bound again without a new Parse runs again: a
/// `SET search_path` bound that way changes the session's names as its
/// first run did (the node reads them back, and the backend is not
/// pooled as if it had the old path). Counted under the path PostgreSQL
/// uses: s2.users, empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_set_bound_again_changes_the_path_again() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute("CREATE SCHEMA s2; CREATE TABLE s2.users (id bigint, v text)")
        .await
        .unwrap();
    for id in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    let run = |o: &mut BytesMut| {
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    };
    r.send(|o| {
        frontend::parse("", "SET search_path = s2, public", std::iter::empty(), o).unwrap();
        run(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "12CZ");
    r.send(|o| {
        frontend::parse("back", "SET search_path = public", std::iter::empty(), o).unwrap();
        bind_text(o, "back", &[]);
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "12CZ");
    r.send(run).await;
    assert_eq!(tags(&r.until_ready().await), "2CZ");
    for _ in 0..3 {
        r.send(|o| frontend::query("SHOW search_path", o).unwrap())
            .await;
        let m = r.until_ready().await;
        assert_eq!(first_value(&m), "s2, public");
        r.send(|o| frontend::query("SELECT count(*) FROM users", o).unwrap())
            .await;
        let m = r.until_ready().await;
        assert_eq!(first_value(&m), "0", "counted under the old path: {m:?}");
    }
}

/// An error in statements sent with Flush (one that changes search_path
/// among them), then a simple Query before the Sync: as on PostgreSQL the
/// Query is ignored up to the Sync, which ends the failed transaction
/// block's pipeline (`ZE`: the error, then ReadyForQuery 'E' at the
/// Sync); the session goes on. (The node used to send the Query to a
/// backend that was skipping to Sync, and wait for its answer forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_an_error_in_a_flushed_pipeline_waits_for_sync() {
    let c = cluster().await;
    let (_db, _a, _b) = setup(&c).await;
    let mut r = Raw::connect(&c).await;
    r.send(|o| frontend::query("BEGIN", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| {
        pipelined(
            o,
            "SELECT set_config('search_path', 'public', false), 1 / 0",
        );
        frontend::query("SELECT 1", o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    // PostgreSQL folds `1 / 0` when it plans the statement, at Bind.
    assert_eq!(tags(&m), "1EZ", "{m:?}");
    assert_eq!(m.last().unwrap().1, b"E");
    r.send(|o| frontend::query("ROLLBACK", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| frontend::query("SELECT 2", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "TDCZ");
}

/// The check of a called function (does its body read a sharded table?
/// then it would see one shard's rows) is never skipped: when the node
/// cannot read the function's definition it refuses the call (0A000)
/// instead of running it unchecked; and the lookup calls only
/// `pg_catalog`'s functions, so a `lower(name)` of the session's own on
/// its search_path cannot make it fail. (Both used to answer with one
/// shard's count: 1 instead of 2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_cannot_be_looked_up_is_refused_not_run_unchecked() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    db.batch_execute(
        "CREATE FUNCTION nusers() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM users';
         CREATE FUNCTION nusers2() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM users';
         CREATE SCHEMA evil;
         CREATE FUNCTION evil.lower(name) RETURNS text LANGUAGE sql AS 'SELECT (1 / 0)::text'",
    )
    .await
    .unwrap();
    for id in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    r.send(|o| frontend::query("SET search_path = evil, public", o).unwrap())
        .await;
    assert!(tags(&r.until_ready().await).ends_with("CZ"));
    r.send(|o| frontend::query("SELECT nusers()", o).unwrap())
        .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    let e = String::from_utf8_lossy(&m[0].1).to_string();
    assert!(e.contains("0A000") && e.contains("nusers"), "{e}");
    r.send(|o| frontend::query("RESET search_path", o).unwrap())
        .await;
    assert!(tags(&r.until_ready().await).ends_with("CZ"));
    // Prepared with Flush outside a transaction block, the definition is
    // read on a connection of its own: none can be had.
    r.send(|o| {
        frontend::parse("", "SELECT nusers2()", std::iter::empty(), o).unwrap();
        frontend::describe(b'S', "", o).unwrap();
        frontend::flush(o);
    })
    .await;
    assert_eq!(tags(&r.until(b'T').await), "1tT");
    // (From another database: not the one being closed to connections.)
    let dsn = c.shards[c.node.routing.home_index()].dsn();
    let dsn = format!("{}/template1", &dsn[..dsn.rfind('/').unwrap()]);
    let home = connect(&dsn).await.unwrap();
    home.batch_execute("ALTER DATABASE postgres WITH ALLOW_CONNECTIONS false")
        .await
        .unwrap();
    r.send(|o| {
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    home.batch_execute("ALTER DATABASE postgres WITH ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    assert_eq!(tags(&m), "EZ", "{m:?}");
    let e = String::from_utf8_lossy(&m[0].1).to_string();
    assert!(e.contains("0A000") && e.contains("nusers2"), "{e}");
    // Once it can be read, it is checked as ever.
    r.send(|o| frontend::query("SELECT nusers2()", o).unwrap())
        .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "{m:?}");
    // A SQL-standard body (`RETURN …`, `BEGIN ATOMIC`) is kept apart from
    // the function's source text in the catalog: read too.
    r.send(|o| {
        frontend::query(
            "CREATE FUNCTION nusers3() RETURNS bigint LANGUAGE sql STABLE RETURN (SELECT count(*) FROM users)",
            o,
        )
        .unwrap()
    })
    .await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(|o| frontend::query("SELECT nusers3()", o).unwrap())
        .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "EZ", "counted one shard's rows: {m:?}");
    let e = String::from_utf8_lossy(&m[0].1).to_string();
    assert!(e.contains("0A000") && e.contains("nusers3"), "{e}");
    r.send(|o| frontend::query("SELECT 1", o).unwrap()).await;
    assert_eq!(tags(&r.until_ready().await), "TDCZ");
}

/// pg-cursor (node-postgres's `pg-query-stream`, Knex's and TypeORM's
/// `.stream()`) outside a transaction block: Parse, Bind, Describe,
/// Execute with a row limit, Flush. Over several shards that is refused
/// (0A000); after the client's Sync, and after a Sync-less error the
/// client then follows with its next statement, the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flushed_multi_shard_read_leaves_the_session_usable() {
    let c = cluster().await;
    let (db, a, b) = setup(&c).await;
    for id in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    // (pg-cursor binds a named portal and executes it only once described;
    // an aggregate over several shards is no portal the node can serve in
    // parts.)
    for (sql, portal, execute) in [
        ("SELECT id FROM users", "", true),
        ("SELECT id FROM users ORDER BY id", "", true),
        ("SELECT v, count(*) FROM users GROUP BY v", "C_1", false),
        ("SELECT v, count(*) FROM users GROUP BY v", "", true),
    ] {
        r.send(|o| {
            frontend::parse("", sql, std::iter::empty(), o).unwrap();
            bind_portal(o, portal);
            frontend::describe(b'P', portal, o).unwrap();
            if execute {
                frontend::execute(portal, 100, o).unwrap();
            }
            frontend::flush(o);
        })
        .await;
        let m = r.until(b'E').await;
        let e = String::from_utf8_lossy(&m.last().unwrap().1).to_string();
        assert!(e.contains("0A000"), "{sql}: {m:?}");
        r.send(frontend::sync).await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "Z", "{sql}: {m:?}");
        // pg-cursor then closes its portal without a Sync of its own; the
        // client's next query follows.
        r.send(|o| {
            frontend::close(b'P', portal, o).unwrap();
            frontend::query("SELECT count(*) FROM users", o).unwrap();
        })
        .await;
        let m = r.until_ready().await;
        assert_eq!(tags(&m), "3TDCZ", "{sql}: {m:?}");
        assert_eq!(first_value(&m), "2");
    }
}

/// pg-cursor (node-postgres's `pg-query-stream`: Knex's and TypeORM's
/// `.stream()`) outside a transaction block over two shards: Parse, Bind
/// of a named portal, Describe, Flush; Execute n, Flush, … ; Close, Sync.
/// The portal lives in the client's implicit transaction — a transaction
/// of the node's on the shards until the Sync — and is read in parts,
/// every row once in the query's order; ReadyForQuery is idle and no
/// shard stays in a transaction. A simple Query ends it as PostgreSQL's
/// does. (It was refused: "must be followed by Sync, not Flush".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_streamed_with_flush_outside_a_block_over_two_shards() {
    let c = cluster().await;
    let (db, _a, _b) = setup(&c).await;
    for id in 1..=10i64 {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    let mut r = Raw::connect(&c).await;
    let open = |o: &mut BytesMut| {
        frontend::parse(
            "",
            "SELECT id FROM users ORDER BY id",
            std::iter::empty(),
            o,
        )
        .unwrap();
        bind_portal(o, "C_1");
        frontend::describe(b'P', "C_1", o).unwrap();
        frontend::flush(o);
    };
    r.send(open).await;
    assert_eq!(tags(&r.until(b'T').await), "12T");
    let mut got = Vec::new();
    loop {
        r.send(|o| {
            frontend::execute("C_1", 3, o).unwrap();
            frontend::flush(o);
        })
        .await;
        let m = r.until_with(|t| t == b's' || t == b'C' || t == b'E').await;
        let last = m.last().unwrap().0;
        assert_ne!(last, b'E', "{m:?}");
        for (t, body) in &m {
            if *t == b'D' {
                got.push(String::from_utf8_lossy(&body[6..]).parse::<i64>().unwrap());
            }
        }
        if last == b'C' {
            break;
        }
        assert!(got.len() <= 10, "the portal never ends");
    }
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    r.send(|o| {
        frontend::close(b'P', "C_1", o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "3Z", "{m:?}");
    assert_eq!(m.last().unwrap().1, b"I");
    no_open_transactions(&c).await;
    // A simple Query in the middle ends the implicit transaction (and the
    // portal with it), as on PostgreSQL.
    r.send(open).await;
    assert_eq!(tags(&r.until(b'T').await), "12T");
    r.send(|o| {
        frontend::execute("C_1", 2, o).unwrap();
        frontend::flush(o);
    })
    .await;
    assert_eq!(tags(&r.until(b's').await), "DDs");
    r.send(|o| frontend::query("SELECT count(*) FROM users", o).unwrap())
        .await;
    let m = r.until_ready().await;
    assert_eq!(tags(&m), "TDCZ", "{m:?}");
    assert_eq!(first_value(&m), "10");
    assert_eq!(m.last().unwrap().1, b"I");
    no_open_transactions(&c).await;
    r.send(|o| {
        frontend::execute("C_1", 2, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let m = r.until_ready().await;
    assert_eq!(
        tags(&m),
        "EZ",
        "the portal ended with its transaction: {m:?}"
    );
    assert!(String::from_utf8_lossy(&m[0].1).contains("34000"), "{m:?}");
}

/// The first value of `sql`'s answer in the simple protocol, or the
/// SQLSTATE it was refused with.
async fn simple_answer(db: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    match db.simple_query(sql).await {
        Ok(m) => Ok(m
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default()),
        Err(e) => Err(e.code().map(|c| c.code().to_string()).unwrap_or_default()),
    }
}

/// PostgreSQL resolves a name by the latest committed catalog, whatever
/// the transaction's snapshot: a REPEATABLE READ transaction whose
/// snapshot predates a view over a sharded table reads that view merged
/// (or refused) as any session does — the node reads the namespace apart,
/// not in the old snapshot where `pg_class` has no such view (which routed
/// it to the home shard as an undeclared table: one shard's rows, and
/// taught every other session of the node the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_a_view_does_not_hide_it_from_routing() {
    let c = cluster().await;
    let a = connect(&c.dsn()).await.unwrap();
    a.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text); \
         INSERT INTO users (id, name) SELECT g, 'x' FROM generate_series(1, 40) g",
    )
    .await
    .unwrap();
    let b = connect(&c.dsn()).await.unwrap();
    b.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM users")
        .await
        .unwrap();
    a.batch_execute("CREATE VIEW users_v AS SELECT * FROM users")
        .await
        .unwrap();
    let in_snapshot = simple_answer(&b, "SELECT count(*) FROM users_v").await;
    b.batch_execute("ROLLBACK").await.ok();
    let fresh = simple_answer(
        &connect(&c.dsn()).await.unwrap(),
        "SELECT count(*) FROM users_v",
    )
    .await;
    assert!(
        fresh == Ok("40".into()) || fresh == Err("0A000".into()),
        "a new session: {fresh:?}"
    );
    assert_eq!(in_snapshot, fresh, "inside the older snapshot");
}

/// A namespace read after DDL in the client's own transaction is that
/// transaction's; a `ROLLBACK TO` a savepoint before the DDL undoes it,
/// and the namespace is read again: a view dropped after the savepoint and
/// back after the `ROLLBACK TO` is read as any session reads it (it was
/// taken for an undeclared table: the home shard's rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_before_ddl_reads_the_namespace_again() {
    let c = cluster().await;
    let a = connect(&c.dsn()).await.unwrap();
    a.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text); \
         INSERT INTO users (id, name) SELECT g, 'x' FROM generate_series(1, 40) g; \
         CREATE VIEW users_v AS SELECT * FROM users",
    )
    .await
    .unwrap();
    let want = simple_answer(&a, "SELECT count(*) FROM users_v").await;
    assert!(
        want == Ok("40".into()) || want == Err("0A000".into()),
        "{want:?}"
    );
    let b = connect(&c.dsn()).await.unwrap();
    b.batch_execute("BEGIN; SAVEPOINT s; DROP VIEW users_v")
        .await
        .unwrap();
    // Routed under the transaction's own namespace (no users_v).
    b.batch_execute("SELECT count(*) FROM users").await.unwrap();
    b.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    assert_eq!(
        simple_answer(&b, "SELECT count(*) FROM users_v").await,
        want,
        "after the ROLLBACK TO"
    );
    b.batch_execute("COMMIT").await.ok();
}

/// A statement pipelined behind another (no Sync between) after the
/// schema changed, while the session's backend owes the client replies:
/// a table created since in a schema ahead of `public` on the search path
/// (`app.users`, undeclared: the home shard's) hides the sharded
/// `public.users` — PostgreSQL answers 3, not the 40 rows merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_statement_sees_a_table_created_since_the_last_read() {
    let c = cluster().await;
    let a = connect(&c.dsn()).await.unwrap();
    a.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text); \
         INSERT INTO users (id, name) SELECT g, 'x' FROM generate_series(1, 40) g; \
         CREATE SCHEMA app",
    )
    .await
    .unwrap();
    let mut r = Raw::connect(&c).await;
    // The namespace read once: `users` is public.users.
    r.send(|o| {
        frontend::query(
            "SET search_path TO app, public; SELECT count(*) FROM users",
            o,
        )
        .unwrap()
    })
    .await;
    r.until_ready().await;
    // (No session of the node reads the namespace in between.)
    a.batch_execute(
        "CREATE TABLE app.users (id bigint, name text); \
         INSERT INTO app.users VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    )
    .await
    .unwrap();
    r.send(|o| {
        frontend::parse("", "SELECT pg_sleep(0.3)", std::iter::empty(), o).unwrap();
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::flush(o);
        frontend::parse("", "SELECT count(*) FROM users", std::iter::empty(), o).unwrap();
        bind_portal(o, "");
        frontend::execute("", 0, o).unwrap();
        frontend::sync(o);
    })
    .await;
    let msgs = r.until_ready().await;
    assert!(!msgs.iter().any(|m| m.0 == b'E'), "{msgs:?}");
    // The second statement's row: one column (i16 count, i32 length, text).
    let last = msgs.iter().rfind(|m| m.0 == b'D').unwrap();
    let got = String::from_utf8(last.1[6..].to_vec()).unwrap();
    assert_eq!(got, "3", "pipelined after app.users was created: {msgs:?}");
}
