//! Issue 14: SQL-level PREPARE / EXECUTE / DEALLOCATE work through the node
//! as on PostgreSQL, under transaction pooling (a statement prepared on one
//! backend runs on another) and over several shards (EXECUTE routed by its
//! arguments like a Bind of the same statement, to one shard or merged
//! over all). Before, they were refused on several shards ("SQL-level
//! PREPARE/EXECUTE (use the extended protocol)") and, on one shard, EXECUTE
//! failed with 26000 on a backend that had not prepared the statement.
//! The same steps run through the node and directly on PostgreSQL; the
//! replies must be the same.
#![allow(clippy::unwrap_used)]

use crate::scripts::transcript;
use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;

async fn cluster(shards: usize) -> Cluster {
    Cluster::start(Opts {
        shards,
        extra: "pool_size = 2".into(),
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await
}

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, v text)";

/// Two keys on different shards (any two keys on one shard).
fn keys(c: &Cluster) -> (i64, i64) {
    let snap = c.node.routing.catalog.load_full();
    let owner = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let a = 1;
    let b = (2..1000).find(|&k| owner(k) != owner(a)).unwrap_or(2);
    (a, b)
}

async fn check(shards: usize) {
    let c = cluster(shards).await;
    let node = c.connect().await;
    node.batch_execute(SCHEMA).await.unwrap();
    c.direct(0)
        .await
        .batch_execute("CREATE DATABASE prep_ref")
        .await
        .unwrap();
    let dsn = c.shards[0].dsn();
    let direct = connect(&format!("{}/prep_ref", dsn.rsplit_once('/').unwrap().0))
        .await
        .unwrap();
    direct.batch_execute(SCHEMA).await.unwrap();
    let (a, b) = keys(&c);
    let steps = [
        "PREPARE ins (bigint, text) AS INSERT INTO users (id, v) VALUES ($1, $2)".to_string(),
        format!("EXECUTE ins ({a}, 'x')"),
        format!("EXECUTE ins ('{b}', 'it''s')"),
        "PREPARE sel (int8) AS SELECT id, v FROM users WHERE id = $1".into(),
        format!("EXECUTE sel ({a})"),
        format!("execute SEL ({b});"),
        "PREPARE allrows AS SELECT v FROM users ORDER BY v".into(),
        "EXECUTE allrows".into(),
        "PREPARE cnt (text) AS SELECT count(*), max(id) FROM users WHERE v <> $1".into(),
        "EXECUTE cnt ('x')".into(),
        "EXECUTE cnt (NULL)".into(),
        // PostgreSQL's errors, then the session goes on.
        "EXECUTE nosuch (1)".into(),
        "PREPARE ins AS SELECT 1".into(),
        "PREPARE bad (nosuchtype) AS SELECT $1".into(),
        "PREPARE bad AS SELECT * FROM nosuchtable".into(),
        "EXECUTE sel ('not a number')".into(),
        "EXECUTE sel (1, 2)".into(),
        // In a transaction block: rolled back on every shard.
        "BEGIN".into(),
        format!("EXECUTE ins ({}, 'r')", a + 1000),
        format!("EXECUTE ins ({}, 'r')", b + 1000),
        "EXECUTE cnt ('')".into(),
        "ROLLBACK".into(),
        // A failed transaction refuses EXECUTE as PostgreSQL does.
        "BEGIN".into(),
        "SELECT 1/0".into(),
        format!("EXECUTE sel ({a})"),
        "ROLLBACK".into(),
        "EXECUTE cnt ('')".into(),
        "DEALLOCATE sel".into(),
        format!("EXECUTE sel ({a})"),
        "DEALLOCATE ALL".into(),
        format!("EXECUTE ins ({}, 'z')", a + 2000),
        "PREPARE ins (bigint, text) AS INSERT INTO users (id, v) VALUES ($1, $2) RETURNING id"
            .into(),
        format!("EXECUTE ins ({}, 'z')", b + 2000),
    ];
    for sql in &steps {
        let want = transcript(&direct, sql).await;
        let got = transcript(&node, sql).await;
        assert_eq!(got, want, "{shards} shard(s): {sql}");
    }
    // A statement prepared on one backend runs on another: another client
    // holds a backend in a transaction while this one executes.
    let other = c.connect().await;
    node.batch_execute("PREPARE pid AS SELECT pg_backend_pid()")
        .await
        .unwrap();
    let mut pids = std::collections::BTreeSet::new();
    for hold in [false, true, false, true] {
        if hold {
            other.batch_execute("BEGIN; SELECT 1").await.unwrap();
        }
        let got = transcript(&node, "EXECUTE pid").await;
        assert_eq!(got.len(), 3, "{got:?}");
        pids.insert(got[1].clone());
        if hold {
            other.batch_execute("COMMIT").await.unwrap();
        }
    }
    assert_eq!(pids.len(), 2, "EXECUTE ran on one backend only: {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_execute_deallocate_on_one_shard() {
    check(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_execute_deallocate_on_two_shards() {
    check(2).await;
}

/// An EXECUTE argument the node would have to evaluate to route is
/// refused with 0A000, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_with_an_expression_is_refused_clearly() {
    let c = cluster(2).await;
    let node = c.connect().await;
    node.batch_execute(SCHEMA).await.unwrap();
    node.batch_execute("PREPARE sel (int8) AS SELECT v FROM users WHERE id = $1")
        .await
        .unwrap();
    let got = transcript(&node, "EXECUTE sel (1 + 1)").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("E 0A000 EXECUTE with an argument that is not a constant (1 + 1)"),
        "{got:?}"
    );
    assert_eq!(transcript(&node, "EXECUTE sel (2)").await, ["T v", "C 0"]);
}

fn code(e: tokio_postgres::Error) -> String {
    e.as_db_error()
        .unwrap_or_else(|| panic!("{e}"))
        .code()
        .code()
        .to_string()
}

/// On one shard the node leaves transaction control to PostgreSQL. A
/// statement the node itself refuses inside a transaction (here a second
/// `PREPARE q`, answered by the node under transaction pooling) must fail
/// the transaction as PostgreSQL's own error would: what follows gets
/// 25P02, ROLLBACK ends it, COMMIT rolls it back. Before, the node failed
/// it only in its own books and, not reading ROLLBACK on one shard,
/// answered 25P02 to ROLLBACK and COMMIT too: the session could never
/// leave the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_transaction_on_one_shard_fails_it_as_postgresql_does() {
    let c = cluster(1).await;
    let db = c.connect().await;
    db.batch_execute(SCHEMA).await.unwrap();
    for end in ["ROLLBACK", "COMMIT"] {
        db.batch_execute("BEGIN; INSERT INTO users (id) VALUES (1)")
            .await
            .unwrap();
        db.batch_execute("PREPARE q AS SELECT 1").await.unwrap();
        let e = db.batch_execute("PREPARE q AS SELECT 2").await.unwrap_err();
        assert_eq!(code(e), "42P05", "{end}");
        let e = db.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(e), "25P02", "simple protocol, before {end}");
        let e = db.query("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(code(e), "25P02", "extended protocol, before {end}");
        let tag = db.simple_query(end).await.unwrap();
        assert!(
            matches!(
                tag.last(),
                Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))
            ),
            "{end}"
        );
        let n: i64 = db
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the failed transaction's row is gone after {end}");
        db.batch_execute("DEALLOCATE ALL").await.unwrap();
    }
}
