//! Cancel requests (issue 17). A CancelRequest reaches only the statement
//! of the client that sent it: a relay in front of the shard holds the
//! node's forwarded cancels until the test lets them go, so a cancel looked
//! up while client A's statement ran lands after A's backend went back to
//! the pool and client B's statement runs there — it must not cancel B's.
//! And a client that leaves mid-statement has its statement cancelled on
//! the shard (PostgreSQL would notice the closed connection only when it
//! writes, after the statement).
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::config::Config;
use hotrepart_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// PostgreSQL's CancelRequest code.
const CANCEL_CODE: u32 = 80_877_102;

/// A TCP relay to a PostgreSQL server that holds every CancelRequest while
/// `hold` is true.
struct Relay {
    port: u16,
    hold: watch::Sender<bool>,
    /// CancelRequests received (held or not).
    cancels: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (hold, rx) = watch::channel(true);
        let cancels = Arc::new(AtomicUsize::new(0));
        let n = cancels.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut rx = rx.clone();
                let n = n.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 8];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                    if len == 16 && code == CANCEL_CODE {
                        n.fetch_add(1, Ordering::SeqCst);
                        let _ = rx.wait_for(|h| !*h).await;
                    }
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    if up.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                });
            }
        });
        Relay {
            port,
            hold,
            cancels,
        }
    }
}

/// Active statements with this text on the shard, by backend pid.
async fn running(direct: &tokio_postgres::Client, sql: &str) -> Vec<i32> {
    direct
        .query(
            "SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
            &[&sql],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_does_not_hit_the_next_client_of_the_backend() {
    let dir = TestDir::new("cancel");
    let d = dir.0.clone();
    let pg = tokio::task::spawn_blocking(move || start_pg(&d.join("s0")))
        .await
        .unwrap();
    let relay = Relay::start(pg.port).await;
    // One backend: B gets the backend A had, if the pool keeps it.
    let toml = format!(
        "listen = \"127.0.0.1:0\"\npool_size = 1\n[[shards]]\nname = \"s0\"\ndsn = \"postgres://{}:{}@127.0.0.1:{}/postgres\"\n[[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        pg.superuser,
        pg.password,
        relay.port,
        hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD)
    );
    let c = Cluster::with_config(Config::from_toml(&toml).unwrap(), vec![pg], dir).await;
    let direct = c.direct(0).await;

    // A's statement runs; A's cancel is looked up now, and held on its way.
    let a = c.connect().await;
    let token_a = a.cancel_token();
    let qa = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(2)").await.map(|_| ()) });
    wait_for("A's statement to run", Duration::from_secs(10), || async {
        running(&direct, "SELECT pg_sleep(2)").await.len() == 1
    })
    .await;
    let cancel_a = tokio::spawn(async move { token_a.cancel_query(tokio_postgres::NoTls).await });
    let n = relay.cancels.clone();
    wait_for(
        "A's cancel to be forwarded",
        Duration::from_secs(10),
        || async { n.load(Ordering::SeqCst) == 1 },
    )
    .await;
    // A's statement ends (the cancel has not landed); its backend leaves A.
    qa.await.unwrap().unwrap();

    // B's statement runs on the shard through the single pool slot.
    let b = c.connect().await;
    let qb = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(3)").await.map(|_| ()) });
    wait_for("B's statement to run", Duration::from_secs(10), || async {
        running(&direct, "SELECT pg_sleep(3)").await.len() == 1
    })
    .await;
    // A's cancel lands now.
    relay.hold.send(false).unwrap();
    cancel_a.await.unwrap().unwrap();
    match qb.await.unwrap() {
        Ok(()) => {}
        Err(e) => panic!(
            "B's statement was cancelled by A's cancel request: {:?} {e}",
            e.code()
        ),
    }

    // A client's own cancel still works.
    let cl = c.connect().await;
    let token = cl.cancel_token();
    let q = tokio::spawn(async move { cl.simple_query("SELECT pg_sleep(30)").await });
    wait_for("the statement to run", Duration::from_secs(10), || async {
        running(&direct, "SELECT pg_sleep(30)").await.len() == 1
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = q.await.unwrap().unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_statement_has_it_cancelled() {
    let c = Cluster::start(Opts {
        extra: "pool_size = 2".into(),
        ..Opts::default()
    })
    .await;
    let direct = c.direct(0).await;
    let (client, conn) = tokio_postgres::connect(&c.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let q = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    wait_for("the statement to run", Duration::from_secs(10), || async {
        running(&direct, "SELECT pg_sleep(30)").await.len() == 1
    })
    .await;
    // The client goes away: its socket closes.
    conn.abort();
    q.abort();
    wait_for(
        "the statement to be cancelled on the shard",
        Duration::from_secs(5),
        || async { running(&direct, "SELECT pg_sleep(30)").await.is_empty() },
    )
    .await;
    // The pool serves the next client.
    let db = c.connect().await;
    db.simple_query("SELECT 1").await.unwrap();
}
