//! Backend ages (issue 17): `server_lifetime` closes a backend when it
//! comes back to the pool past its age, never inside a transaction;
//! `server_idle_timeout` closes backends idle in the pool.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use std::time::Duration;

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Whether backend `pid` still exists on the shard.
async fn alive(shard: &tokio_postgres::Client, pid: i32) -> bool {
    shard
        .query_one(
            "select count(*) from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

/// Transaction pooling, one backend: the backend ages past its lifetime
/// inside a transaction and stays; it is closed when the transaction ends,
/// and the next statement runs on a new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_server_lifetime_replaces_old_backends_between_transactions() {
    let c = Cluster::start(Opts {
        extra: "pool_size = 1\nserver_lifetime_ms = 400\nserver_idle_timeout_ms = 0".into(),
        ..Default::default()
    })
    .await;
    let client = c.connect().await;
    let shard = c.direct(0).await;
    client.batch_execute("begin").await.unwrap();
    let inside = pid(&client).await;
    client.batch_execute("select pg_sleep(0.6)").await.unwrap();
    assert_eq!(
        pid(&client).await,
        inside,
        "backend replaced inside a transaction"
    );
    assert!(alive(&shard, inside).await);
    client.batch_execute("commit").await.unwrap();
    let after = pid(&client).await;
    assert_ne!(after, inside, "a backend past server_lifetime was reused");
    wait_for(
        "the old backend to end",
        Duration::from_secs(10),
        || async { !alive(&shard, inside).await },
    )
    .await;
}

/// A backend idle in the pool longer than `server_idle_timeout` is closed
/// (gone from the shard's pg_stat_activity) without any client activity;
/// the next statement gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_server_idle_timeout_closes_idle_backends() {
    let c = Cluster::start(Opts {
        extra: "server_idle_timeout_ms = 300".into(),
        ..Default::default()
    })
    .await;
    let client = c.connect().await;
    let shard = c.direct(0).await;
    let first = pid(&client).await;
    wait_for(
        "the idle backend to be closed",
        Duration::from_secs(10),
        || async { !alive(&shard, first).await },
    )
    .await;
    assert_ne!(pid(&client).await, first);
}
