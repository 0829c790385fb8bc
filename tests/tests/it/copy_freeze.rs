//! `COPY … FROM STDIN` into a key range frozen for a cut-over, through an
//! in-process node over real PostgreSQL shards (tokio-postgres clients):
//! the rows wait — the node's `FreezeWait`, as a statement's write does —
//! and go to the owner the next routing table names (a shard this COPY had
//! not started: it is started then); a COPY whose transaction already wrote
//! to the frozen range's source fails at once with 40001 (the cut-over
//! waits for that transaction to end) and leaves no transaction holding a
//! transaction id there; a freeze that outlasts `freeze_wait_ms` fails the
//! COPY with 40001. Nothing of a failed COPY lands anywhere.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures_util::SinkExt;
use hotrepart_router::catalog::{KeyRange, KeyValue, RangeStatus};
use hotrepart_routing_paxos::command::Dsn;
use hotrepart_routing_paxos::{CatalogCommand, FreezeId};
use hotrepart_tests::*;
use std::time::{Duration, Instant};

const FREEZE: FreezeId = FreezeId(42);

fn opts(freeze_wait_ms: u64) -> Opts {
    Opts {
        shards: 2,
        extra: format!("pool_size = 4\ninitial_ranges = 4\nfreeze_wait_ms = {freeze_wait_ms}"),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    }
}

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL)";

async fn start(freeze_wait_ms: u64) -> Cluster {
    let c = Cluster::start(opts(freeze_wait_ms)).await;
    c.connect().await.batch_execute(TABLE).await.unwrap();
    c
}

fn range_of(c: &Cluster, id: i64) -> KeyRange {
    let snap = c.node.routing.catalog.load();
    let t = snap.sharded_table("items").unwrap();
    let p = snap.point(t, &KeyValue::Int8(id)).unwrap();
    snap.range_for_point(p).clone()
}

/// `n` ids whose range satisfies `f`.
fn ids(c: &Cluster, n: usize, f: impl Fn(&KeyRange) -> bool) -> Vec<i64> {
    (1..100_000i64)
        .filter(|&id| f(&range_of(c, id)))
        .take(n)
        .collect()
}

fn rows(ids: &[i64]) -> String {
    ids.iter().map(|id| format!("{id}\tv{id}\n")).collect()
}

/// A COPY through the node, its rows in CopyData messages of a few rows.
async fn copy(db: &tokio_postgres::Client, data: String) -> Result<u64, tokio_postgres::Error> {
    let sink = db
        .copy_in::<_, Bytes>("COPY items (id, v) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(100) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

async fn ids_on(db: &tokio_postgres::Client) -> Vec<i64> {
    db.query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// A range of s0's, and the freeze of it in the node's routing table.
async fn freeze_a_range_of_s0(c: &Cluster) -> KeyRange {
    let r = c
        .node
        .routing
        .catalog
        .load()
        .ranges()
        .iter()
        .find(|r| r.write_owner.as_str() == "s0")
        .unwrap()
        .clone();
    c.propose(CatalogCommand::FreezeRange {
        range: r.span(),
        freeze: FREEZE,
    })
    .await;
    assert_eq!(range_of_lo(c, r.lo).status, RangeStatus::Frozen);
    r
}

fn range_of_lo(c: &Cluster, lo: u64) -> KeyRange {
    c.node
        .routing
        .catalog
        .load()
        .ranges()
        .iter()
        .find(|r| r.lo == lo)
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_into_a_frozen_range_waits_and_goes_to_the_new_owner() {
    let c = start(10_000).await;
    // A third server: the frozen range is handed to it during the COPY.
    let extra = {
        let d = c.dir.0.join("s2");
        tokio::task::spawn_blocking(move || start_pg(&d))
            .await
            .unwrap()
    };
    let s2 = connect(&extra.dsn()).await.unwrap();
    s2.batch_execute(TABLE).await.unwrap();
    let r = freeze_a_range_of_s0(&c).await;
    let to_s1 = ids(&c, 40, |x| x.write_owner.as_str() == "s1");
    let frozen = ids(&c, 60, |x| x.lo == r.lo);
    // The rows of s1 first, then the frozen range's.
    let data = rows(&to_s1) + &rows(&frozen);
    let db = c.connect().await;
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let n = copy(&db, data).await;
        (n, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!task.is_finished(), "the COPY did not wait for the freeze");
    // Its COPY on the source (s0) is open but holds no transaction id:
    // the cut-over does not wait for it.
    let s0 = c.direct(0).await;
    let (copying, xids): (i64, i64) = {
        let r = s0
            .query_one(
                "SELECT count(*) FILTER (WHERE query LIKE 'COPY items%'), \
                        count(*) FILTER (WHERE backend_xid IS NOT NULL) \
                 FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((copying, xids), (1, 0));
    // The cut-over: a new shard, the range assigned to it (still frozen:
    // the COPY waits on), then the thaw.
    c.propose(CatalogCommand::AddShard {
        shard: "s2".into(),
        dsn: Dsn(extra.dsn()),
    })
    .await;
    c.propose(CatalogCommand::AssignRange {
        range: r.span(),
        read_owner: "s2".into(),
        write_owner: "s2".into(),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "the COPY went on while the range was frozen"
    );
    c.propose(CatalogCommand::UnfreezeRange {
        range: r.span(),
        freeze: FREEZE,
        operator: false,
    })
    .await;
    let (n, took) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the COPY did not end after the thaw")
        .unwrap();
    assert_eq!(n.unwrap(), 100);
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    // Every row on the shard its range names now, exactly once.
    assert_eq!(ids_on(&s2).await, sorted(frozen.clone()));
    assert_eq!(ids_on(&c.direct(1).await).await, sorted(to_s1));
    assert_eq!(ids_on(&s0).await, Vec::<i64>::new());
    let through: i64 = c
        .connect()
        .await
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(through, 100);
    // The two-phase commit over s1 and s2 left nothing prepared.
    for db in [&s2, &c.direct(1).await] {
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
}

/// No session holds a transaction id on the shard: what the cut-over waits
/// for (`jobs::wait_open_transactions`).
async fn no_xid_holder(db: &tokio_postgres::Client) {
    wait_for("no transaction id held", Duration::from_secs(5), || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_that_wrote_to_the_source_fails_at_once() {
    let c = start(10_000).await;
    let r = freeze_a_range_of_s0(&c).await;
    let other_s0 = ids(&c, 30, |x| x.write_owner.as_str() == "s0" && x.lo != r.lo);
    assert_eq!(other_s0.len(), 30, "s0 needs a second range");
    let frozen = ids(&c, 30, |x| x.lo == r.lo);
    let s0 = c.direct(0).await;
    let db = c.connect().await;
    // Outside a transaction block: rows for s0 (another range), then one
    // for the frozen range of s0.
    let t0 = Instant::now();
    let e = copy(&db, rows(&other_s0) + &rows(&frozen))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_eq!(code(&e), "40001", "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("wrote to its source shard s0"), "{msg}");
    assert!(took < Duration::from_secs(3), "it waited: {took:?}");
    // Rolled back everywhere: nothing landed, and nothing on s0 holds up
    // the cut-over.
    no_xid_holder(&s0).await;
    assert_eq!(ids_on(&s0).await, Vec::<i64>::new());
    assert_eq!(ids_on(&c.direct(1).await).await, Vec::<i64>::new());

    // Inside a transaction block that wrote to s0 before.
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(
        "INSERT INTO items (id, v) VALUES ($1, 'tx')",
        &[&other_s0[0]],
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let e = copy(&db, rows(&frozen)).await.unwrap_err();
    assert_eq!(code(&e), "40001", "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The transaction is failed; its rollback frees the source.
    let e = db.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{e:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    no_xid_holder(&s0).await;
    assert_eq!(ids_on(&s0).await, Vec::<i64>::new());

    // A COPY that has written nothing to s0 waits instead; after the thaw
    // the retried COPY goes through (the range stayed s0's).
    let db2 = c.connect().await;
    let retry = tokio::spawn(async move { copy(&db2, rows(&frozen)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!retry.is_finished(), "the COPY did not wait");
    c.propose(CatalogCommand::UnfreezeRange {
        range: r.span(),
        freeze: FREEZE,
        operator: false,
    })
    .await;
    assert_eq!(retry.await.unwrap().unwrap(), 30);
    assert_eq!(ids_on(&s0).await.len(), 30);
    // And the first COPY, retried, too.
    assert_eq!(copy(&db, rows(&other_s0)).await.unwrap(), 30);
    assert_eq!(ids_on(&s0).await.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_into_a_range_frozen_too_long_fails_with_40001() {
    let c = start(400).await;
    let r = freeze_a_range_of_s0(&c).await;
    let to_s1 = ids(&c, 20, |x| x.write_owner.as_str() == "s1");
    let frozen = ids(&c, 20, |x| x.lo == r.lo);
    let db = c.connect().await;
    let t0 = Instant::now();
    let e = copy(&db, rows(&to_s1) + &rows(&frozen)).await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(code(&e), "40001", "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("did not end in time"), "{msg}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(ids_on(&c.direct(0).await).await, Vec::<i64>::new());
    assert_eq!(ids_on(&c.direct(1).await).await, Vec::<i64>::new());
    // The session goes on.
    assert_eq!(copy(&db, rows(&to_s1)).await.unwrap(), 20);
}

/// Inside a transaction block, the rows a CopyData message routed before a
/// row of a frozen range reach their shard before the COPY waits out the
/// freeze: their shard's COPY is started and running (a statement of a
/// transaction older than any later freeze, which a cut-over of their own
/// range waits for: `jobs::wait_open_transactions`). They stayed queued,
/// unsent, while the wait dropped the COPY's pin: a cut-over of their
/// range in that time saw nothing of them, and they landed on its old
/// owner after the flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_routed_before_a_wait_reach_their_shard_before_it() {
    let c = start(10_000).await;
    let r = freeze_a_range_of_s0(&c).await;
    let to_s1 = ids(&c, 20, |x| x.write_owner.as_str() == "s1");
    let frozen = ids(&c, 5, |x| x.lo == r.lo);
    let data = rows(&to_s1) + &rows(&frozen);
    let db = c.connect().await;
    let task = tokio::spawn(async move {
        db.batch_execute("BEGIN").await?;
        let sink = db
            .copy_in::<_, Bytes>("COPY items (id, v) FROM STDIN")
            .await?;
        futures_util::pin_mut!(sink);
        // One message: s1's rows, then the frozen range's.
        sink.send(Bytes::from(data)).await?;
        let n = sink.finish().await?;
        db.batch_execute("COMMIT").await?;
        Ok::<u64, tokio_postgres::Error>(n)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!task.is_finished(), "the COPY did not wait for the freeze");
    let copying: i64 = c
        .direct(1)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE 'COPY items%' AND state = 'active' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        copying, 1,
        "s1's rows are in its running COPY while it waits"
    );
    c.propose(CatalogCommand::UnfreezeRange {
        range: r.span(),
        freeze: FREEZE,
        operator: false,
    })
    .await;
    let n = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the COPY did not end after the thaw")
        .unwrap()
        .unwrap();
    assert_eq!(n, 25);
    assert_eq!(ids_on(&c.direct(1).await).await, sorted(to_s1));
    assert_eq!(ids_on(&c.direct(0).await).await, sorted(frozen));
}
