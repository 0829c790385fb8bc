//! `RoutingState::fence` (`node.routing.fence`: what a cut-over calls on
//! every node after its freeze and after its flip), through an in-process node over real PostgreSQL shards:
//! it waits for a statement routed by an older routing table that is still
//! running, and fails with a clear message when that outlasts its limit;
//! a session waiting out a freeze and a session idle in a transaction do
//! not hold it up.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::{KeyRange, KeyValue};
use hotrepart_routing_paxos::{CatalogCommand, FreezeId};
use hotrepart_tests::*;
use std::time::{Duration, Instant};

fn range_of(c: &Cluster, id: i64) -> KeyRange {
    let snap = c.node.routing.catalog.load();
    let t = snap.sharded_table("items").unwrap();
    let p = snap.point(t, &KeyValue::Int8(id)).unwrap();
    snap.range_for_point(p).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_waits_for_statements_routed_by_an_older_table() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 4\ninitial_ranges = 4\nfreeze_wait_ms = 10000".into(),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    db.execute("INSERT INTO items (id, v) VALUES (1, 'a')", &[])
        .await
        .unwrap();

    // A statement in flight: routed by the current table, running 1.5 s.
    let slow = c.connect().await;
    let started = Instant::now();
    let task = tokio::spawn(async move {
        slow.query_one("SELECT pg_sleep(1.5), v FROM items WHERE id = 1", &[])
            .await
            .unwrap();
        started.elapsed()
    });
    // It runs on its shard (so the node routed it, by the current table).
    wait_for("the slow statement on its shard", Duration::from_secs(10), || async {
        let mut running = false;
        for i in 0..2 {
            running |= c
                .direct(i)
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(1.5)%'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0;
        }
        running
    })
    .await;
    // A newer routing table (a freeze of another range, then its thaw).
    let other = (2..10_000i64)
        .map(|id| range_of(&c, id))
        .find(|r| r.lo != range_of(&c, 1).lo)
        .unwrap();
    c.propose(CatalogCommand::FreezeRange {
        range: other.span(),
        freeze: FreezeId(7),
    })
    .await;
    let epoch = c
        .propose(CatalogCommand::UnfreezeRange {
            range: other.span(),
            freeze: FreezeId(7),
            operator: false,
        })
        .await;
    let e = c
        .node
        .routing
        .fence(epoch, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(e.contains("still running"), "{e}");
    assert!(!task.is_finished());
    c.node
        .routing
        .fence(epoch, Duration::from_secs(10))
        .await
        .unwrap();
    // Not before the statement ended on the server (the client may see
    // its answer a moment after the node let go of the pin).
    assert!(
        started.elapsed() >= Duration::from_millis(1450),
        "the fence passed while the statement ran ({:?})",
        started.elapsed()
    );
    assert!(task.await.unwrap() >= Duration::from_millis(1400));
    // Nothing in flight now: at once. A later epoch not yet published:
    // a clear error.
    c.node
        .routing
        .fence(epoch, Duration::from_millis(100))
        .await
        .unwrap();
    let e = c
        .node
        .routing
        .fence(epoch + 100, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(e.contains("has not published"), "{e}");

    // A session idle in a transaction that wrote holds nothing up (its
    // transaction is open on the shard: the cut-over waits for it there).
    let idle = c.connect().await;
    idle.batch_execute("BEGIN; INSERT INTO items (id, v) VALUES (2, 'b')")
        .await
        .unwrap();
    // A writer waiting out a freeze holds nothing up either.
    let frozen = range_of(&c, 3);
    let epoch = c
        .propose(CatalogCommand::FreezeRange {
            range: frozen.span(),
            freeze: FreezeId(8),
        })
        .await;
    let writer = c.connect().await;
    let waiting = tokio::spawn(async move {
        writer
            .execute("INSERT INTO items (id, v) VALUES (3, 'c')", &[])
            .await
    });
    // The sleep is the subject: the write is still held 300 ms later
    // (it waits out the freeze); the fence below must not wait for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the write did not wait for the freeze"
    );
    let t = Instant::now();
    c.node
        .routing
        .fence(epoch, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    c.propose(CatalogCommand::UnfreezeRange {
        range: frozen.span(),
        freeze: FreezeId(8),
        operator: false,
    })
    .await;
    assert_eq!(waiting.await.unwrap().unwrap(), 1);
    idle.batch_execute("COMMIT").await.unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}
