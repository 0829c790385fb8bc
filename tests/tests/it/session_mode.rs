//! Session pooling over several shards: a client keeps its backends
//! between transactions, and each transaction still covers every shard it
//! uses.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;

const SEED: u64 = 7;

/// Keys owned by shard s0 and s1, `n` of each, from `from` on.
fn keys(c: &Cluster, from: i64, n: usize) -> (Vec<i64>, Vec<i64>) {
    let snap = c.node.routing.catalog.load_full();
    let owner = |k: i64| {
        snap.range_for_key("items", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let of = |s: &str| {
        (from..from + 10_000)
            .filter(|&k| owner(k) == s)
            .take(n)
            .collect()
    };
    (of("s0"), of("s1"))
}

async fn count_on(c: &Cluster, shard: usize) -> i64 {
    c.direct(shard)
        .await
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0)
}

/// A backend kept attached from an earlier transaction joins the next
/// transaction when it is used there: ROLLBACK undoes the writes on every
/// shard, and a failed statement aborts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_backend_joins_the_next_transaction() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_mode = \"session\"\npool_size = 4".into(),
        users: "[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        tail: format!(
            "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let (a, b) = keys(&c, 1, 6);
    // Both shards used in autocommit: the session keeps a backend on each.
    for k in [a[0], b[0]] {
        db.batch_execute(&format!("INSERT INTO items (id) VALUES ({k})"))
            .await
            .unwrap();
    }
    // Statement by statement, in both orders.
    for (x, y) in [(a[1], b[1]), (b[2], a[2])] {
        db.batch_execute("BEGIN").await.unwrap();
        for k in [x, y] {
            db.batch_execute(&format!("INSERT INTO items (id) VALUES ({k})"))
                .await
                .unwrap();
        }
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(
            (count_on(&c, 0).await, count_on(&c, 1).await),
            (1, 1),
            "ROLLBACK after writes to keys {x} and {y} left rows behind"
        );
    }
    // A failed statement on one shard: COMMIT rolls back the other's write.
    db.batch_execute("BEGIN").await.unwrap();
    db.batch_execute(&format!("INSERT INTO items (id) VALUES ({})", b[3]))
        .await
        .unwrap();
    let dup = db
        .batch_execute(&format!("INSERT INTO items (id) VALUES ({})", a[0]))
        .await;
    assert!(dup.is_err());
    let _ = db.batch_execute("COMMIT").await;
    assert_eq!((count_on(&c, 0).await, count_on(&c, 1).await), (1, 1));
    // And a transaction that commits has its rows on both.
    db.batch_execute("BEGIN").await.unwrap();
    for k in [a[4], b[4]] {
        db.batch_execute(&format!("INSERT INTO items (id) VALUES ({k})"))
            .await
            .unwrap();
    }
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!((count_on(&c, 0).await, count_on(&c, 1).await), (2, 2));
    // The joining shard begins as the client's BEGIN said.
    db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    for k in [a[4], b[4], a[4]] {
        let iso: String = db
            .query_one(
                "SELECT current_setting('transaction_isolation') FROM items WHERE id = $1",
                &[&k],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(iso, "repeatable read", "key {k}");
    }
    db.batch_execute("COMMIT").await.unwrap();
}

/// A session that keeps its backend (session pooling) is closed after
/// `client_idle_timeout_ms` of silence outside a transaction, as a
/// transaction-pooled one is (it was never timed out before): FATAL 57P05,
/// and the node forgets the client; within a transaction the
/// idle-in-transaction limit applies instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_that_keeps_its_backend_is_timed_out() {
    let c = Cluster::start(Opts {
        extra: "pool_mode = \"session\"\npool_size = 4\nclient_idle_timeout_ms = 600\n\
                idle_in_transaction_timeout_ms = 5000"
            .into(),
        ..Opts::default()
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("SELECT 1").await.unwrap();
    // Inside a transaction the idle-session limit does not apply.
    db.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(c.node.client_count(), 1);
    // Outside one it does.
    wait_for(
        "the idle session to be closed",
        std::time::Duration::from_secs(5),
        || async { c.node.client_count() == 0 },
    )
    .await;
    let e = db.batch_execute("SELECT 1").await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("idle-session timeout") || e.is_closed(),
        "{text}"
    );
}
