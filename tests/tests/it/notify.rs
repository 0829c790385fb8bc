//! LISTEN/NOTIFY under transaction pooling (issue 14): the node listens for
//! its clients on every shard and fans notifications out; NOTIFY and
//! `pg_notify` reach listeners whichever shard they run on; UNLISTEN and
//! disconnects clean up.
#![allow(clippy::unwrap_used)]

use futures_util::StreamExt;
use hotrepart_tests::*;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// A client whose notifications arrive on the returned channel.
async fn listener(
    c: &Cluster,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut conn) = tokio_postgres::connect(&c.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no notification within 10 s")
        .expect("connection ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_listeners_through_a_two_shard_node() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 2".into(),
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let (a, mut a_rx) = listener(&c).await;
    a.batch_execute("LISTEN ch").await.unwrap();
    // The backend a's LISTEN would have gone to is pooled: another client
    // on it must not get a's notifications, and a gets them anyway.
    let (other, mut other_rx) = listener(&c).await;
    other.batch_execute("SELECT 1").await.unwrap();
    db.batch_execute("NOTIFY ch, 'one'").await.unwrap();
    assert_eq!(next(&mut a_rx).await, ("ch".into(), "one".into()));
    // NOTIFY in transactions on each shard: delivered at commit.
    for id in 1..=20i64 {
        db.batch_execute("BEGIN").await.unwrap();
        db.execute("INSERT INTO users (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
        // NOTIFY runs where the transaction runs: on the key's shard.
        db.batch_execute(&format!("NOTIFY ch, 'tx{id}'"))
            .await
            .unwrap();
        db.batch_execute("COMMIT").await.unwrap();
    }
    let mut got: Vec<String> = Vec::new();
    for _ in 1..=20 {
        got.push(next(&mut a_rx).await.1);
    }
    got.sort();
    let mut want: Vec<String> = (1..=20).map(|i| format!("tx{i}")).collect();
    want.sort();
    assert_eq!(got, want, "one notification per committed transaction");
    // Rolled back: none.
    db.batch_execute("BEGIN; SELECT pg_notify('ch', 'rolled back'); ROLLBACK")
        .await
        .unwrap();
    // pg_notify outside a transaction block.
    db.execute("SELECT pg_notify('ch', $1)", &[&"fn"])
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("ch".into(), "fn".into()));
    // A quoted channel name is kept as written.
    a.batch_execute("LISTEN \"Mixed Case\"").await.unwrap();
    db.batch_execute("NOTIFY \"Mixed Case\", 'two'")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("Mixed Case".into(), "two".into()));
    // UNLISTEN: nothing more on ch (the marker on another channel comes
    // after anything sent on ch before it).
    a.batch_execute("UNLISTEN ch").await.unwrap();
    db.batch_execute("NOTIFY ch, 'after unlisten'; NOTIFY \"Mixed Case\", 'marker'")
        .await
        .unwrap();
    assert_eq!(
        next(&mut a_rx).await,
        ("Mixed Case".into(), "marker".into())
    );
    assert!(
        other_rx.try_recv().is_err(),
        "a client that never listened got a notification"
    );
    // Disconnect: the node forgets the session.
    drop(a);
    wait_for(
        "the listener to be forgotten",
        Duration::from_secs(10),
        || async { c.node.notifier.listeners("postgres", "Mixed Case") == 0 },
    )
    .await;
}

/// A shard the routing table gains while clients listen: the node listens
/// there too, on the channels listened on then, so a notification sent on
/// the new shard (a trigger's `pg_notify` on its rows) reaches them. (The
/// node listened only on the shards of its first LISTEN: such
/// notifications were never delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_hear_a_shard_added_after_their_listen() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 2".into(),
        ..Opts::default()
    })
    .await;
    let (a, mut a_rx) = listener(&c).await;
    a.batch_execute("LISTEN ch").await.unwrap();
    let extra = {
        let d = c.dir.0.join("s2");
        tokio::task::spawn_blocking(move || start_pg(&d))
            .await
            .unwrap()
    };
    c.propose(hotrepart_routing_paxos::CatalogCommand::AddShard {
        shard: "s2".into(),
        dsn: hotrepart_routing_paxos::command::Dsn(extra.dsn()),
    })
    .await;
    let s2 = connect(&extra.dsn()).await.unwrap();
    // The new shard's listening connection comes up in the background:
    // notify until one arrives (at most 10 s), then every later one does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        s2.batch_execute("NOTIFY ch, 'from s2'").await.unwrap();
        match tokio::time::timeout(Duration::from_millis(200), a_rx.recv()).await {
            Ok(Some(n)) => break n,
            Ok(None) => panic!("the listener's connection ended"),
            Err(_) if std::time::Instant::now() < deadline => continue,
            Err(_) => panic!("no notification from the added shard within 10 s"),
        }
    };
    assert_eq!(first, ("ch".into(), "from s2".into()));
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), a_rx.recv()).await {}
    s2.batch_execute("NOTIFY ch, 'again'").await.unwrap();
    assert_eq!(next(&mut a_rx).await, ("ch".into(), "again".into()));
    // A channel listened on after the shard was added reaches it too.
    a.batch_execute("LISTEN other").await.unwrap();
    s2.batch_execute("NOTIFY other, 'x'").await.unwrap();
    assert_eq!(next(&mut a_rx).await, ("other".into(), "x".into()));
    // UNLISTEN: nothing more from it.
    a.batch_execute("UNLISTEN ch").await.unwrap();
    s2.batch_execute("NOTIFY ch, 'late'; NOTIFY other, 'y'")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("other".into(), "y".into()));
    // The shard taken out again and its server stopped: the node stops
    // listening there, and a new LISTEN does not wait for it.
    c.propose(hotrepart_routing_paxos::CatalogCommand::RemoveShard { shard: "s2".into() })
        .await;
    drop(s2);
    drop(extra);
    a.batch_execute("LISTEN third").await.unwrap();
    c.connect()
        .await
        .batch_execute("NOTIFY third, 'z'")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("third".into(), "z".into()));
}
