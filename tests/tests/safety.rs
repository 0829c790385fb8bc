//! Issue 12, "no wrong answer and no lost write", through a node in front
//! of 2 real PostgreSQL shards: a statement is routed as PostgreSQL would
//! resolve and execute it, or refused with a real SQLSTATE — never sent
//! somewhere plausible. One test per defect: hints and ownership (D5),
//! search_path, views and partitions (D6), writes the router cannot see
//! (D7), input that used to panic the session (D9),
//! standard_conforming_strings (D10).
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::{KeyValue, RoutingSnapshot};
use hotrepart_tests::*;

const SEED: u64 = 7;

fn opts() -> Opts {
    Opts {
        shards: 2,
        extra: "pool_size = 4".into(),
        users: String::new(),
        tail: format!(
            "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n\
             [[sharded_tables]]\nname = \"names\"\nkey = \"k\"\ntype = \"text\"\nseed = {SEED}\n\
             [[sharded_tables]]\nname = \"app.orders\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    }
}

/// The shard (index) owning `key` of `table` for writes.
fn owner(snap: &RoutingSnapshot, table: &str, key: KeyValue) -> usize {
    let s = snap.range_for_key(table, &key).unwrap().write_owner.clone();
    s.as_str().trim_start_matches('s').parse().unwrap()
}

/// Two int8 keys owned by different shards: (on s0, on s1).
fn keys(snap: &RoutingSnapshot, table: &str) -> (i64, i64) {
    let a = (1..1000)
        .find(|&k| owner(snap, table, KeyValue::Int8(k)) == 0)
        .unwrap();
    let b = (1..1000)
        .find(|&k| owner(snap, table, KeyValue::Int8(k)) == 1)
        .unwrap();
    (a, b)
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

async fn count_on(c: &Cluster, i: usize, sql: &str) -> i64 {
    c.direct(i).await.query_one(sql, &[]).await.unwrap().get(0)
}

/// D9: a no-break space right after SELECT (bytes c2 a0 straddle byte 7,
/// where the EXPLAIN check used to slice the text) gets an answer, and the
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibyte_text_after_the_first_word_gets_an_answer() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    for sql in ["SELECT\u{a0}1", "SELECTé", "EXPLAIN\u{a0}SELECT 1", "é"] {
        // PostgreSQL reads these as one identifier: a syntax error, from
        // the shard or the router, but an answer.
        let r = db.simple_query(sql).await;
        let e = r.expect_err(sql);
        assert_eq!(code(&e), "42601", "{sql}: {e:?}");
    }
    let rows = db.simple_query("SELECT 1 AS one").await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let n: i32 = db.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}
