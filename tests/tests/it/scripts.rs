//! Issue 14: a simple-Query string whose statements go to different
//! shards (psql scripts, migration tools: `CREATE TABLE …; INSERT …`) runs
//! statement by statement inside the implicit transaction PostgreSQL gives
//! such a string — all or nothing, two-phase commit when several shards
//! wrote — and answers exactly as PostgreSQL does. Each string runs through
//! a 2-shard node and directly on a PostgreSQL database with the same
//! schema; the replies and the rows left must be the same. Before, these
//! strings were refused (0A000 "… go to different shards …; send them
//! separately").
#![allow(clippy::unwrap_used)]

use futures_util::TryStreamExt;
use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;
use std::time::Duration;
use tokio_postgres::SimpleQueryMessage;

async fn cluster() -> Cluster {
    Cluster::start(Opts {
        shards: 2,
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await
}

const SCHEMA: &str =
    "CREATE TABLE users (id bigint PRIMARY KEY, v text); CREATE TABLE notes (a int PRIMARY KEY)";

/// `n` keys owned by each shard: (keys on s0, keys on s1).
fn keys(c: &Cluster, n: usize) -> (Vec<i64>, Vec<i64>) {
    let snap = c.node.routing.catalog.load_full();
    let on = |k: i64, s: &str| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            == s
    };
    let a = (1..10_000).filter(|&k| on(k, "s0")).take(n).collect();
    let b = (1..10_000).filter(|&k| on(k, "s1")).take(n).collect();
    (a, b)
}

/// What the client sees of a query string: row descriptions, rows and
/// command tags in order, then the error (code and message, without the
/// node's "(on shard …)" suffix) if one ends it.
pub(crate) async fn transcript(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let stream = match db.simple_query_raw(sql).await {
        Ok(s) => s,
        Err(e) => {
            out.push(error_line(&e));
            return out;
        }
    };
    futures_util::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(None) => break,
            Ok(Some(SimpleQueryMessage::RowDescription(cols))) => {
                let names: Vec<&str> = cols.iter().map(|c| c.name()).collect();
                out.push(format!("T {}", names.join(",")));
            }
            Ok(Some(SimpleQueryMessage::Row(r))) => {
                let vals: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect();
                out.push(format!("D {}", vals.join(",")));
            }
            Ok(Some(SimpleQueryMessage::CommandComplete(n))) => out.push(format!("C {n}")),
            Ok(Some(_)) => out.push("?".into()),
            Err(e) => {
                out.push(error_line(&e));
                break;
            }
        }
    }
    out
}

fn error_line(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let msg = d.message();
            let msg = msg.split(" (on shard ").next().unwrap_or(msg);
            format!("E {} {msg}", d.code().code())
        }
        None => format!("E {e}"),
    }
}

/// The rows of both tables.
async fn contents(db: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for q in [
        "SELECT id::text || ':' || v FROM users ORDER BY id",
        "SELECT a::text FROM notes ORDER BY a",
    ] {
        for r in db.query(q, &[]).await.unwrap() {
            out.push(r.get::<_, String>(0));
        }
        out.push("--".into());
    }
    out
}

/// A database on shard 0's server beside the shards' own: the reference
/// (two sessions: one runs the strings, one reads what is committed).
async fn direct_reference(c: &Cluster) -> (tokio_postgres::Client, tokio_postgres::Client) {
    c.direct(0)
        .await
        .batch_execute("CREATE DATABASE script_ref")
        .await
        .unwrap();
    let dsn = c.shards[0].dsn();
    let dsn = format!("{}/script_ref", dsn.rsplit_once('/').unwrap().0);
    let d = connect(&dsn).await.unwrap();
    d.batch_execute(SCHEMA).await.unwrap();
    (d, connect(&dsn).await.unwrap())
}

async fn no_open_or_prepared_transactions(c: &Cluster) {
    for i in 0..c.shards.len() {
        let d = c.direct(i).await;
        wait_for(
            "no open or prepared transaction",
            Duration::from_secs(10),
            || async {
                let n: i64 = d
                    .query_one(
                        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%') \
                         + (SELECT count(*) FROM pg_prepared_xacts)",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                n == 0
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_mixing_shards_run_as_on_postgresql() {
    let c = cluster().await;
    let node = c.connect().await;
    node.batch_execute(SCHEMA).await.unwrap();
    let (direct, direct_seen) = direct_reference(&c).await;
    let node_seen = c.connect().await;
    let (a, b) = keys(&c, 8);
    let strings = [
        // Writes to the home shard and both shards, then reads of each.
        format!(
            "INSERT INTO notes VALUES (1); INSERT INTO users (id, v) VALUES ({}, 'a0'); \
             INSERT INTO users (id, v) VALUES ({}, 'b0'), ({}, 'a1')",
            a[0], b[0], a[1]
        ),
        "SELECT count(*) FROM users; SELECT a FROM notes ORDER BY a; SELECT id FROM users ORDER BY id".into(),
        // An error in the third statement: the first two are rolled back.
        format!(
            "INSERT INTO notes VALUES (2); INSERT INTO users (id, v) VALUES ({}, 'b1'); INSERT INTO notes VALUES (1)",
            b[1]
        ),
        // BEGIN … COMMIT in the string: committed by two-phase commit.
        format!(
            "BEGIN; INSERT INTO users (id, v) VALUES ({}, 'a2'); INSERT INTO users (id, v) VALUES ({}, 'b3'); COMMIT",
            a[2], b[3]
        ),
        // The statements before BEGIN belong to its transaction; it stays
        // open after the string, and a ROLLBACK undoes all of it.
        format!(
            "INSERT INTO users (id, v) VALUES ({}, 'a3'); BEGIN; INSERT INTO users (id, v) VALUES ({}, 'b4')",
            a[3], b[4]
        ),
        "ROLLBACK".into(),
        // COMMIT in the implicit block commits what came before (with a
        // warning); what follows is a new block, rolled back by its error.
        format!(
            "INSERT INTO notes VALUES (5); INSERT INTO users (id, v) VALUES ({}, 'b5'); COMMIT; \
             INSERT INTO users (id, v) VALUES ({}, 'a4'); SELECT 1/0",
            b[5], a[4]
        ),
        // Savepoints need a transaction block.
        format!(
            "INSERT INTO users (id, v) VALUES ({}, 'a5'); INSERT INTO users (id, v) VALUES ({}, 'b6'); SAVEPOINT s",
            a[5], b[6]
        ),
        // A statement PostgreSQL refuses in a transaction block.
        format!(
            "INSERT INTO users (id, v) VALUES ({}, 'a6'); INSERT INTO notes VALUES (6); VACUUM users",
            a[6]
        ),
        // DDL on every shard and a write on one, the migration pattern.
        "CREATE TABLE notes2 (x int); INSERT INTO notes2 VALUES (7), (8); DROP TABLE notes2; INSERT INTO notes VALUES (7)".into(),
        // An error inside an explicit block opened by the string leaves it
        // failed; ROLLBACK ends it.
        format!(
            "BEGIN; INSERT INTO users (id, v) VALUES ({}, 'a7'); INSERT INTO users (id, v) VALUES ({}, 'b7'); SELECT 1/0; INSERT INTO notes VALUES (9)",
            a[7], b[7]
        ),
        "SELECT 1".into(),
        "ROLLBACK".into(),
    ];
    // A statement the node refuses in the middle (PostgreSQL itself would
    // run it): the replies before it, its error, nothing left behind.
    let refused = format!(
        "INSERT INTO users (id, v) VALUES ({}, 'b2'); SELECT sum(DISTINCT length(v)) FROM users; INSERT INTO notes VALUES (3)",
        b[2]
    );
    let got = transcript(&node, &refused).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "C 1");
    assert!(
        got[1].starts_with("E 0A000 aggregate function sum(DISTINCT"),
        "{got:?}"
    );
    assert_eq!(
        contents(&node_seen).await,
        contents(&direct_seen).await,
        "after {refused}"
    );
    for sql in &strings {
        let want = transcript(&direct, sql).await;
        let got = transcript(&node, sql).await;
        assert_eq!(got, want, "{sql}");
        assert_eq!(
            contents(&node_seen).await,
            contents(&direct_seen).await,
            "after {sql}"
        );
    }
    no_open_or_prepared_transactions(&c).await;
    // The rows are on the shards that own them.
    let on_s1: i64 = c
        .direct(1)
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_s1, 3, "b0, b3 and b5 on s1");
}

/// The wire messages of such a string, one ReadyForQuery at the end:
/// COMMIT inside an implicit block warns (25P01) as PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ready_for_query_and_postgresqls_warning() {
    let c = cluster().await;
    let node = c.connect().await;
    node.batch_execute(SCHEMA).await.unwrap();
    let (a, b) = keys(&c, 1);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (client, mut conn) = tokio_postgres::connect(&c.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(futures_util::stream::poll_fn(move |cx| {
            conn.poll_message(cx)
        }));
        while let Some(m) = conn.try_next().await.ok().flatten() {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(format!(
                    "{} {} {}",
                    n.severity(),
                    n.code().code(),
                    n.message()
                ));
            }
        }
    });
    let got = transcript(
        &client,
        &format!(
            "INSERT INTO users (id, v) VALUES ({}, 'a'); COMMIT; INSERT INTO users (id, v) VALUES ({}, 'b'); SELECT v FROM users ORDER BY v",
            a[0], b[0]
        ),
    )
    .await;
    assert_eq!(got, ["C 1", "C 0", "C 1", "T v", "D a", "D b", "C 2"]);
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notice, "WARNING 25P01 there is no transaction in progress");
    // The session is idle and goes on.
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    no_open_or_prepared_transactions(&c).await;
}
