//! Statements without a shard key during a reshard job, through an
//! in-process node over real PostgreSQL shards: the job is stopped before
//! each of its phases (`Node::job_gate`) and every kind of keyless
//! statement — count, sum, scan, merge (ORDER BY/LIMIT, GROUP BY), the
//! extended protocol, `COPY … TO`, an IN list over both shards, a keyless
//! UPDATE — must see each row exactly once, although the moving range's
//! rows are on both shards from the copy until the cleanup.
//!
//! And the cut-over's deadlock with a writer: a transaction that wrote to
//! the source of a frozen range fails at once with 40001 when it touches
//! the frozen range (the cut-over waits for it), while a transaction that
//! did not write there waits out the freeze.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hotrepart_proxy::control::jobs::JobGate;
use hotrepart_router::catalog::{KeyRange, KeyValue, RangeStatus};
use hotrepart_routing_paxos::{CatalogCommand, FreezeId, JobPhase, JobSpec};
use hotrepart_tests::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const ROWS: i64 = 3000;

fn opts(freeze_wait_ms: u64) -> Opts {
    Opts {
        shards: 2,
        extra: format!("pool_size = 4\ninitial_ranges = 4\nfreeze_wait_ms = {freeze_wait_ms}"),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    }
}

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)";

fn range_of(c: &Cluster, id: i64) -> KeyRange {
    let snap = c.node.routing.catalog.load();
    let t = snap.sharded_table("items").unwrap();
    let p = snap.point(t, &KeyValue::Int8(id)).unwrap();
    snap.range_for_point(p).clone()
}

async fn fill(c: &Cluster) {
    let db = c.connect().await;
    db.batch_execute(TABLE).await.unwrap();
    let data: String = (1..=ROWS).map(|i| format!("{i}\t{}\n", i % 100)).collect();
    let sink = db
        .copy_in::<_, Bytes>("COPY items (id, v) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), ROWS as u64);
}

fn simple_rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn simple_tag(msgs: &[tokio_postgres::SimpleQueryMessage]) -> u64 {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap()
}

/// Every keyless statement kind through the node; panics naming the phase
/// and the statement on a wrong answer.
async fn check_reads(db: &tokio_postgres::Client, phase: &str) {
    let sum: i64 = (1..=ROWS).map(|i| i % 100).sum();
    let q = |sql: &'static str| async move {
        simple_rows(
            &db.simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{phase}: {sql}: {e}")),
        )
    };
    assert_eq!(
        q("SELECT count(*) FROM items").await,
        vec![vec![ROWS.to_string()]],
        "{phase}: count(*)"
    );
    assert_eq!(
        q("SELECT sum(v) FROM items").await,
        vec![vec![sum.to_string()]],
        "{phase}: sum"
    );
    let scan = q("SELECT id FROM items").await;
    let ids: BTreeSet<&str> = scan.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        (scan.len(), ids.len()),
        (ROWS as usize, ROWS as usize),
        "{phase}: scan"
    );
    assert_eq!(
        q("SELECT id FROM items ORDER BY id LIMIT 3 OFFSET 10").await,
        vec![vec!["11".to_string()], vec!["12".into()], vec!["13".into()]],
        "{phase}: ORDER BY LIMIT"
    );
    let groups = q("SELECT v % 7, count(*) FROM items GROUP BY 1 ORDER BY 1").await;
    let total: i64 = groups.iter().map(|r| r[1].parse::<i64>().unwrap()).sum();
    assert_eq!((groups.len(), total), (7, ROWS), "{phase}: GROUP BY");
    // The extended protocol (binary results): a scan and a merge.
    let rows = db
        .query("SELECT id, v FROM items WHERE v >= $1", &[&0i32])
        .await
        .unwrap_or_else(|e| panic!("{phase}: extended scan: {e}"));
    assert_eq!(rows.len(), ROWS as usize, "{phase}: extended scan");
    let n: i64 = db
        .query_one("SELECT count(*) FROM items WHERE v >= $1", &[&0i32])
        .await
        .unwrap_or_else(|e| panic!("{phase}: extended count: {e}"))
        .get(0);
    assert_eq!(n, ROWS, "{phase}: extended count");
    // An IN list over both shards (a Shards route, not All).
    let some: Vec<i64> = (1..=ROWS).step_by(3).collect();
    let n: i64 = db
        .query_one("SELECT count(*) FROM items WHERE id = ANY($1)", &[&some])
        .await
        .unwrap_or_else(|e| panic!("{phase}: IN list: {e}"))
        .get(0);
    assert_eq!(n, some.len() as i64, "{phase}: IN list");
    // A cursor over both shards (merged by the node, issue 14): each row
    // once, in order.
    db.batch_execute("BEGIN; DECLARE rc CURSOR FOR SELECT id FROM items ORDER BY id")
        .await
        .unwrap_or_else(|e| panic!("{phase}: DECLARE: {e}"));
    let mut seen: Vec<i64> = Vec::new();
    loop {
        let rows = q("FETCH 700 FROM rc").await;
        let n = rows.len();
        seen.extend(rows.iter().map(|r| r[0].parse::<i64>().unwrap()));
        if n < 700 {
            break;
        }
    }
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(seen, (1..=ROWS).collect::<Vec<_>>(), "{phase}: cursor");
    // COPY … TO.
    let out = db
        .copy_out("COPY items TO STDOUT")
        .await
        .unwrap_or_else(|e| panic!("{phase}: COPY TO: {e}"));
    futures_util::pin_mut!(out);
    let mut lines = 0;
    while let Some(chunk) = out.next().await {
        lines += chunk.unwrap().iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(lines, ROWS as usize, "{phase}: COPY TO");
    // Keyless writes count each row once too (and change nothing here).
    let msgs = db
        .simple_query("UPDATE items SET v = v WHERE v >= 0")
        .await
        .unwrap_or_else(|e| panic!("{phase}: keyless UPDATE: {e}"));
    assert_eq!(simple_tag(&msgs), ROWS as u64, "{phase}: keyless UPDATE");
    let n = db
        .execute("UPDATE items SET v = v WHERE v >= $1", &[&0i32])
        .await
        .unwrap_or_else(|e| panic!("{phase}: extended keyless UPDATE: {e}"));
    assert_eq!(n, ROWS as u64, "{phase}: extended keyless UPDATE");
}

async fn rows_on(c: &Cluster, i: usize) -> i64 {
    c.direct(i)
        .await
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_statements_see_each_row_once_in_every_phase_of_a_job() {
    let (gate, mut reached) = JobGate::new();
    let c = Cluster::start_with(opts(10_000), |n| n.job_gate = Some(gate.clone())).await;
    fill(&c).await;
    let db = c.connect().await;
    check_reads(&db, "before the job").await;
    // A range of s0 that holds rows.
    let r = range_of(&c, 1);
    let r = if r.write_owner.as_str() == "s0" {
        r
    } else {
        (1..ROWS)
            .map(|i| range_of(&c, i))
            .find(|r| r.write_owner.as_str() == "s0")
            .unwrap()
    };
    c.propose(CatalogCommand::JobStart {
        job: "reads".into(),
        spec: JobSpec {
            range: r.span(),
            from: "s0".into(),
            to: "s1".into(),
        },
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    let mut doubled = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (job, phase) = tokio::time::timeout(left, reached.recv())
            .await
            .expect("the job reaches its next phase in time")
            .expect("gate");
        assert_eq!(job, "reads");
        let name = phase.name();
        let on = (rows_on(&c, 0).await, rows_on(&c, 1).await);
        if on.0 + on.1 > ROWS {
            doubled.push(name);
        }
        check_reads(&db, name).await;
        seen.push(name);
        gate.release();
        if phase == JobPhase::Flipped {
            break;
        }
    }
    wait_for("the job to end", Duration::from_secs(60), || async {
        c.node
            .catalog_handle
            .catalog()
            .job("reads")
            .is_some_and(|j| j.phase == JobPhase::Done)
    })
    .await;
    check_reads(&db, "after the job").await;
    for p in ["copy", "catch_up", "cut_over", "flipped"] {
        assert!(seen.contains(&p), "phase {p} was looked at: {seen:?}");
    }
    // The hazard was there: both shards held the range's rows.
    for p in ["catch_up", "cut_over", "flipped"] {
        assert!(
            doubled.contains(&p),
            "in phase {p} both shards hold the range's rows: {doubled:?}"
        );
    }
    assert_eq!(rows_on(&c, 0).await + rows_on(&c, 1).await, ROWS);
    assert_eq!(range_of(&c, 1).hidden_on, None);
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_of_the_source_fails_at_once_on_a_frozen_range_others_wait() {
    let c = Cluster::start(opts(8_000)).await;
    c.connect().await.batch_execute(TABLE).await.unwrap();
    let frozen = c
        .node
        .routing
        .catalog
        .load()
        .ranges()
        .iter()
        .find(|r| r.write_owner.as_str() == "s0")
        .unwrap()
        .clone();
    let id_where =
        |f: &dyn Fn(&KeyRange) -> bool| (1..100_000i64).find(|&i| f(&range_of(&c, i))).unwrap();
    let in_frozen = id_where(&|r| r.lo == frozen.lo);
    let other_s0 = id_where(&|r| r.write_owner.as_str() == "s0" && r.lo != frozen.lo);
    let on_s1 = id_where(&|r| r.write_owner.as_str() == "s1");
    c.propose(CatalogCommand::FreezeRange {
        range: frozen.span(),
        freeze: FreezeId(7),
    })
    .await;
    assert_eq!(range_of(&c, in_frozen).status, RangeStatus::Frozen);

    // Wrote to s0, the frozen range's source: 40001 at once.
    let db = c.connect().await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO items (id, v) VALUES ($1, 1)", &[&other_s0])
        .await
        .unwrap();
    let t0 = Instant::now();
    let e = db
        .execute("INSERT INTO items (id, v) VALUES ($1, 1)", &[&in_frozen])
        .await
        .expect_err("refused");
    let waited = t0.elapsed();
    assert_eq!(code(&e), "40001", "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("concurrent cut-over"),
        "the message says why: {msg}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "failed at once, not after freeze_wait_ms: {waited:?}"
    );
    db.batch_execute("ROLLBACK").await.unwrap();

    // Wrote only to s1: it waits for the freeze to end, then goes on.
    let db2 = c.connect().await;
    db2.batch_execute("BEGIN").await.unwrap();
    db2.execute("INSERT INTO items (id, v) VALUES ($1, 2)", &[&on_s1])
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = db2
            .execute("INSERT INTO items (id, v) VALUES ($1, 2)", &[&in_frozen])
            .await;
        db2.batch_execute("COMMIT").await.unwrap();
        (r.map_err(|e| e.to_string()), t0.elapsed())
    });
    // The sleep is the subject: the writer is still held 500 ms later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writer.is_finished(), "the writer waits out the freeze");
    c.propose(CatalogCommand::UnfreezeRange {
        range: frozen.span(),
        freeze: FreezeId(7),
        operator: true,
    })
    .await;
    let (r, waited) = writer.await.unwrap();
    assert_eq!(r, Ok(1));
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let n: i64 = c
        .connect()
        .await
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the second transaction's rows, not the first's");
}

/// A REPEATABLE READ transaction that began before a range changed owner
/// gets 40001 at its next statement (its snapshot on the new owner could
/// predate the range's rows there); a READ COMMITTED one goes on and sees
/// every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_transaction_does_not_outlive_a_flip() {
    let (gate, mut reached) = JobGate::new();
    let c = Cluster::start_with(opts(10_000), |n| n.job_gate = Some(gate.clone())).await;
    fill(&c).await;
    let r = (1..ROWS)
        .map(|i| range_of(&c, i))
        .find(|r| r.write_owner.as_str() == "s0")
        .unwrap();
    c.propose(CatalogCommand::JobStart {
        job: "rr".into(),
        spec: JobSpec {
            range: r.span(),
            from: "s0".into(),
            to: "s1".into(),
        },
    })
    .await;
    let rr = c.connect().await;
    let rc = c.connect().await;
    // The same through a merged cursor and through an INSERT … SELECT
    // whose rows the node reads first (a key of the moving range).
    let rr_cursor = c.connect().await;
    let rr_insert = c.connect().await;
    let moving = (1..ROWS)
        .find(|&i| range_of(&c, i).span() == r.span())
        .unwrap();
    let count = "SELECT count(*) FROM items";
    loop {
        let (_, phase) = tokio::time::timeout(Duration::from_secs(120), reached.recv())
            .await
            .expect("the job goes on")
            .expect("gate");
        if phase == JobPhase::Copy {
            // Before the copy: the snapshot on s1 will not hold the rows.
            rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .await
                .unwrap();
            rc.batch_execute("BEGIN").await.unwrap();
            for db in [&rr_cursor, &rr_insert] {
                db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                    .await
                    .unwrap();
            }
            for db in [&rr, &rc, &rr_cursor, &rr_insert] {
                let n: i64 = db.query_one(count, &[]).await.unwrap().get(0);
                assert_eq!(n, ROWS);
            }
        }
        if phase == JobPhase::Flipped {
            // The owner changed (this gate is after the flip's entry).
            let e = rr.query_one(count, &[]).await.expect_err("40001");
            assert_eq!(code(&e), "40001", "{e:?}");
            rr.batch_execute("ROLLBACK").await.unwrap();
            let e = rr_cursor
                .batch_execute("DECLARE c CURSOR FOR SELECT id FROM items ORDER BY id")
                .await
                .expect_err("40001 for the merged cursor");
            assert_eq!(code(&e), "40001", "{e:?}");
            // (its snapshot on the new owner holds no row of the range: the
            // INSERT would have copied none)
            let e = rr_insert
                .batch_execute(&format!(
                    "INSERT INTO items (id, v) SELECT id + 1000000, v FROM items WHERE id = {moving}"
                ))
                .await
                .expect_err("40001 for the INSERT … SELECT");
            assert_eq!(code(&e), "40001", "{e:?}");
            for db in [&rr_cursor, &rr_insert] {
                db.batch_execute("ROLLBACK").await.unwrap();
            }
            let n: i64 = rc.query_one(count, &[]).await.unwrap().get(0);
            assert_eq!(n, ROWS, "READ COMMITTED goes on");
            rc.batch_execute("COMMIT").await.unwrap();
            gate.release();
            break;
        }
        gate.release();
    }
    // A new REPEATABLE READ transaction after the flip is fine.
    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let n: i64 = rr.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!(n, ROWS);
    rr.batch_execute("COMMIT").await.unwrap();
}
