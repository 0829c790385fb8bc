//! Issue 14: SQL cursors (`DECLARE`/`FETCH`/`MOVE`/`CLOSE`) through a node
//! (`proxy/src/session/cursor.rs`). A cursor whose query runs on one shard
//! is declared there and its statements follow it, in both protocols; a
//! `WITH HOLD` cursor keeps its backend under transaction pooling, and no
//! other client ever sees it. Before, every cursor statement was refused
//! on several shards (0A000), and on one shard a `WITH HOLD` cursor was
//! lost when its backend went back to the pool.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use std::time::Duration;

async fn cluster(shards: usize) -> Cluster {
    Cluster::start(Opts {
        shards,
        // Two connections per shard: with one kept for a cursor, the
        // others share the second.
        extra: "pool_size = 2\npool_timeout_ms = 500".into(),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"k\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await
}

/// (checked out, idle) connections of the client user's pool on `shard`.
fn pool_counts(c: &Cluster, shard: usize) -> (usize, usize) {
    c.node
        .pools
        .all()
        .into_iter()
        .filter(|((s, d, u), _)| *s == shard && d == "postgres" && u == USER)
        .fold((0, 0), |(b, i), (_, p)| {
            (b + p.busy_count(), i + p.idle_count())
        })
}

/// Waits until `busy` connections of the pool on `shard` are checked out.
async fn wait_busy(c: &Cluster, shard: usize, busy: usize, what: &str) {
    wait_for(what, Duration::from_secs(10), || async {
        pool_counts(c, shard).0 == busy
    })
    .await;
}

/// The SQLSTATE and message of a failed statement.
fn err(e: tokio_postgres::Error) -> (String, String) {
    let d = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (d.code().code().to_owned(), d.message().to_owned())
}

/// The first column of every row of a simple-protocol answer, as text.
async fn simple_col(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .collect()
}

/// The row count of a simple-protocol statement's command tag.
async fn count(c: &tokio_postgres::Client, sql: &str) -> u64 {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(n),
            _ => None,
        })
        .unwrap_or_default()
}

/// `items` with keys 1..=20, `n` rows each (n = 1..=5); returns one key
/// held by each shard.
async fn fill(c: &Cluster) -> Vec<i64> {
    let a = c.connect().await;
    a.batch_execute("DROP TABLE IF EXISTS items; CREATE TABLE items (k int8, n int4)")
        .await
        .unwrap();
    for k in 1..=20i64 {
        a.execute(
            "INSERT INTO items (k, n) SELECT $1, g FROM generate_series(1, 5) g",
            &[&k],
        )
        .await
        .unwrap();
    }
    let mut keys = Vec::new();
    for i in 0..c.shards.len() {
        let row = c
            .direct(i)
            .await
            .query_one("SELECT min(k) FROM items", &[])
            .await
            .unwrap();
        keys.push(row.get::<_, i64>(0));
    }
    keys
}

/// An enum value read in binary: its label.
struct Label(String);

impl<'a> tokio_postgres::types::FromSql<'a> for Label {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Label(std::str::from_utf8(raw)?.to_owned()))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(ty.kind(), tokio_postgres::types::Kind::Enum(_))
    }
}

/// Protocol portals executed in later batches than their Bind, a few
/// rows at a time (tokio-postgres's `bind` + `query_portal`, asyncpg's
/// `prepared.cursor()` + `fetch(n)`: Bind, Sync; Execute n, Sync; …): a
/// portal bound on one shard is executed there, several open at once on
/// different shards; a portal bound over several shards is a cursor the
/// node merges (it used to answer with one shard's rows only, then was
/// refused): fetched in parts, every row once, in the query's order;
/// one the node cannot merge in parts (an aggregate) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_executed_in_later_batches_over_two_shards() {
    let c = cluster(2).await;
    let keys = fill(&c).await;
    let mut a = c.connect().await;
    a.batch_execute(
        "DROP TYPE IF EXISTS mood; CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); \
         ALTER TABLE items ADD COLUMN mood mood",
    )
    .await
    .unwrap();
    a.batch_execute("UPDATE items SET mood = (ARRAY['sad', 'ok', 'happy']::mood[])[k % 3 + 1]")
        .await
        .unwrap();
    let tx = a.transaction().await.unwrap();
    let one = tx
        .prepare("SELECT n FROM items WHERE k = $1 ORDER BY n")
        .await
        .unwrap();
    let portals = [
        tx.bind(&one, &[&keys[0]]).await.unwrap(),
        tx.bind(&one, &[&keys[1]]).await.unwrap(),
    ];
    let mut got: [Vec<i32>; 2] = Default::default();
    // Interleaved: two rows of the second shard's portal, then the first's.
    for round in 0..4 {
        for i in [1, 0] {
            let rows = tx.query_portal(&portals[i], 2).await.unwrap();
            assert!(rows.len() <= 2, "round {round}");
            got[i].extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        }
    }
    assert_eq!(got, [vec![1, 2, 3, 4, 5], vec![1, 2, 3, 4, 5]]);
    tx.commit().await.unwrap();
    // Over several shards, unordered: 7 rows at a time, every row once.
    let tx = a.transaction().await.unwrap();
    let all = tx
        .prepare("SELECT k, n FROM items WHERE n > $1")
        .await
        .unwrap();
    let p = tx.bind(&all, &[&0i32]).await.unwrap();
    let mut rows: Vec<(i64, i32)> = Vec::new();
    loop {
        let part = tx.query_portal(&p, 7).await.unwrap();
        assert!(part.len() <= 7);
        rows.extend(
            part.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1))),
        );
        assert!(rows.len() <= 100, "more rows than the table holds");
        if part.len() < 7 {
            break;
        }
    }
    rows.sort_unstable();
    let want: Vec<(i64, i32)> = (1..=20)
        .flat_map(|k| (1..=5).map(move |n| (k, n)))
        .collect();
    assert_eq!(rows, want);
    // Ordered, 4 rows at a time, interleaved with a portal on one shard:
    // PostgreSQL's order across the shards.
    let ordered = tx
        .prepare("SELECT k, n FROM items WHERE n > $1 ORDER BY n DESC, k")
        .await
        .unwrap();
    let q = tx.bind(&ordered, &[&2i32]).await.unwrap();
    let single = tx.bind(&one, &[&keys[0]]).await.unwrap();
    let (mut got, mut got1) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let part = tx.query_portal(&q, 4).await.unwrap();
        got.extend(
            part.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1))),
        );
        let one_row = tx.query_portal(&single, 1).await.unwrap();
        got1.extend(one_row.iter().map(|r| r.get::<_, i32>(0)));
        if part.len() < 4 {
            break;
        }
    }
    let want: Vec<(i64, i32)> = (3..=5)
        .rev()
        .flat_map(|n| (1..=20).map(move |k| (k, n)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got1, [1, 2, 3, 4, 5]);
    // An enum column in binary (an enum's binary value is its label),
    // through a portal fetched in parts.
    let labels = tx
        .prepare("SELECT k, mood FROM items WHERE n = $1 ORDER BY k")
        .await
        .unwrap();
    let r = tx.bind(&labels, &[&1i32]).await.unwrap();
    let mut moods = Vec::new();
    loop {
        let part = tx.query_portal(&r, 6).await.unwrap();
        moods.extend(part.iter().map(|row| row.get::<_, Label>(1).0));
        if part.len() < 6 {
            break;
        }
    }
    let want: Vec<String> = (1..=20)
        .map(|k| ["sad", "ok", "happy"][k % 3].to_string())
        .collect();
    assert_eq!(moods, want);
    drop(r);
    // Dropped portals are closed (Close, Sync): on every shard for the
    // merged ones; the transaction goes on over both shards.
    drop((p, q, single));
    let n: i64 = tx
        .query_one("SELECT count(*) FROM items WHERE n > $1", &[&0i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    tx.commit().await.unwrap();
    // An aggregate over several shards cannot be merged in parts: refused
    // at its Bind (it runs only as Bind, Execute, Sync in one batch).
    let tx = a.transaction().await.unwrap();
    let agg = tx
        .prepare("SELECT n, count(*) FROM items WHERE n > $1 GROUP BY n")
        .await
        .unwrap();
    let Err(e) = tx.bind(&agg, &[&0i32]).await else {
        panic!("an aggregate portal over several shards was bound")
    };
    let (code, msg) = err(e);
    assert_eq!(code, "0A000", "{msg}");
    assert!(msg.contains("must come in the extended protocol"), "{msg}");
    tx.rollback().await.unwrap();
    // The portals ended with their transaction: a new one binds afresh,
    // and the whole answer in one batch still comes from every shard.
    let tx = a.transaction().await.unwrap();
    let n = tx.query(&all, &[&0i32]).await.unwrap().len();
    assert_eq!(n, 100);
    let p = tx.bind(&one, &[&keys[1]]).await.unwrap();
    assert_eq!(tx.query_portal(&p, 0).await.unwrap().len(), 5);
    tx.commit().await.unwrap();
}

/// Cursors on one shard each, in the simple protocol: declared where the
/// query runs, fetched and moved there, interleaved over two shards in one
/// transaction; names folded as PostgreSQL folds them.
async fn one_shard_cursors_simple(shards: usize) {
    let c = cluster(shards).await;
    let keys = fill(&c).await;
    let a = c.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let declare = format!(
        "DECLARE MyCur NO SCROLL CURSOR FOR SELECT n FROM items WHERE k = {} ORDER BY n",
        keys[0]
    );
    a.batch_execute(&declare).await.unwrap();
    let last = *keys.last().unwrap();
    a.batch_execute(&format!(
        "DECLARE \"Other\" CURSOR FOR SELECT k * 10 + n FROM items WHERE k = {last} ORDER BY n"
    ))
    .await
    .unwrap();
    assert_eq!(simple_col(&a, "FETCH 2 FROM mycur").await, ["1", "2"]);
    assert_eq!(
        simple_col(&a, "FETCH NEXT FROM \"Other\"").await,
        [format!("{}", last * 10 + 1)]
    );
    assert_eq!(count(&a, "MOVE FORWARD 1 IN MYCUR").await, 1);
    assert_eq!(simple_col(&a, "FETCH ALL FROM mycur").await, ["4", "5"]);
    assert_eq!(count(&a, "FETCH 3 FROM mycur").await, 0);
    a.batch_execute("CLOSE mycur").await.unwrap();
    assert_eq!(
        simple_col(&a, "FETCH FORWARD 10 FROM \"Other\"")
            .await
            .len(),
        4
    );
    a.batch_execute("COMMIT").await.unwrap();
    // A cursor over no table at all (psycopg's scenario).
    a.batch_execute("BEGIN; DECLARE g CURSOR FOR SELECT x FROM generate_series(1, 10) x")
        .await
        .unwrap();
    assert_eq!(simple_col(&a, "FETCH 3 g").await, ["1", "2", "3"]);
    assert_eq!(simple_col(&a, "FETCH ALL g").await.len(), 7);
    a.batch_execute("CLOSE g; COMMIT").await.unwrap();
    // Without hold, a cursor ends with its transaction.
    let (code, msg) = err(a.batch_execute("FETCH 1 FROM \"Other\"").await.unwrap_err());
    assert_eq!(code, "34000", "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_cursors_simple_protocol_one_shard() {
    one_shard_cursors_simple(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_cursors_simple_protocol_two_shards() {
    one_shard_cursors_simple(2).await;
}

/// The extended protocol: DECLARE with a parameter (the key), FETCH as
/// a prepared statement, on each shard of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_cursors_extended_protocol_two_shards() {
    let c = cluster(2).await;
    let keys = fill(&c).await;
    let a = c.connect().await;
    for &k in &keys {
        a.batch_execute("BEGIN").await.unwrap();
        a.execute(
            "DECLARE cx CURSOR FOR SELECT n FROM items WHERE k = $1 ORDER BY n",
            &[&k],
        )
        .await
        .unwrap();
        let rows = a.query("FETCH FORWARD 3 FROM cx", &[]).await.unwrap();
        let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(got, [1, 2, 3], "key {k}");
        let rows = a.query("FETCH ALL FROM cx", &[]).await.unwrap();
        let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(got, [4, 5], "key {k}");
        a.execute("CLOSE cx", &[]).await.unwrap();
        a.batch_execute("COMMIT").await.unwrap();
    }
}

/// How many cursors the backend serving `c` holds.
async fn cursors_here(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_catalog.pg_cursors WHERE name <> ''",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A WITH HOLD cursor under transaction pooling: its backend is kept
/// across the client's transactions while another client uses the pool
/// (and never sees the cursor); CLOSE gives the backend back; a client
/// that leaves with one open leaves no cursor behind.
async fn with_hold_kept(shards: usize) {
    let c = cluster(shards).await;
    let keys = fill(&c).await;
    // The cursor's shard: the last one (not the home shard on two).
    let (s, k) = (shards - 1, *keys.last().unwrap());
    let a = c.connect().await;
    // Outside a transaction block (its own implicit transaction).
    a.batch_execute(&format!(
        "DECLARE h CURSOR WITH HOLD FOR SELECT n FROM items WHERE k = {k} ORDER BY n"
    ))
    .await
    .unwrap();
    wait_busy(&c, s, 1, "the cursor's backend kept").await;
    // Another client, in a transaction, gets the other backend: no cursor.
    let b = c.connect().await;
    b.batch_execute(&format!("BEGIN; SELECT * FROM items WHERE k = {k}"))
        .await
        .unwrap();
    assert_eq!(cursors_here(&b).await, 0, "the other client's backend");
    // A third finds no free connection on that shard: the kept one is not
    // handed out.
    let third = c.connect().await;
    let (code, msg) = err(third
        .simple_query(&format!("SELECT * FROM items WHERE k = {k}"))
        .await
        .unwrap_err());
    assert_eq!(code, "53300", "{msg}");
    assert_eq!(simple_col(&a, "FETCH 2 FROM h").await, ["1", "2"]);
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(simple_col(&a, "FETCH 1 FROM h").await, ["3"]);
    a.batch_execute("COMMIT").await.unwrap();
    // A transaction that rolls back leaves the cursor where it was.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SELECT 1").await.unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    let rows = a.query("FETCH NEXT FROM h", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 4);
    b.batch_execute("COMMIT").await.unwrap();
    // Other clients, one after the other, never see it.
    for _ in 0..3 {
        let x = c.connect().await;
        let (code, _) = err(x
            .batch_execute(&format!(
                "SELECT * FROM items WHERE k = {k}; FETCH 1 FROM h"
            ))
            .await
            .unwrap_err());
        assert_eq!(code, "34000");
    }
    a.batch_execute("CLOSE h").await.unwrap();
    wait_busy(&c, s, 0, "the backend back in the pool after CLOSE").await;
    // CLOSE ALL, and a client that leaves with one open.
    a.batch_execute(&format!(
        "DECLARE h1 CURSOR WITH HOLD FOR SELECT n FROM items WHERE k = {k}"
    ))
    .await
    .unwrap();
    wait_busy(&c, s, 1, "kept again").await;
    a.batch_execute("CLOSE ALL").await.unwrap();
    wait_busy(&c, s, 0, "the backend back in the pool after CLOSE ALL").await;
    a.batch_execute(&format!(
        "DECLARE h2 CURSOR WITH HOLD FOR SELECT n FROM items WHERE k = {k}"
    ))
    .await
    .unwrap();
    wait_busy(&c, s, 1, "kept for h2").await;
    // DISCARD ALL closes it too (read back from PostgreSQL).
    a.batch_execute("DISCARD ALL").await.unwrap();
    wait_busy(&c, s, 0, "the backend back in the pool after DISCARD ALL").await;
    a.batch_execute(&format!(
        "DECLARE h2 CURSOR WITH HOLD FOR SELECT n FROM items WHERE k = {k}"
    ))
    .await
    .unwrap();
    wait_busy(&c, s, 1, "kept for h2").await;
    drop(a);
    wait_busy(
        &c,
        s,
        0,
        "the backend back in the pool when the client left",
    )
    .await;
    for _ in 0..2 {
        let x = c.connect().await;
        x.batch_execute("BEGIN").await.unwrap();
        let y = c.connect().await;
        x.batch_execute(&format!("SELECT * FROM items WHERE k = {k}"))
            .await
            .unwrap();
        y.batch_execute(&format!("SELECT * FROM items WHERE k = {k}"))
            .await
            .unwrap();
        assert_eq!(cursors_here(&x).await, 0);
        x.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hold_cursor_keeps_its_backend_one_shard() {
    with_hold_kept(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hold_cursor_keeps_its_backend_two_shards() {
    with_hold_kept(2).await;
}

/// Every row of a simple-protocol answer, its columns joined by `|`.
async fn simple_rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// A cursor over two shards with ORDER BY: read with several FETCH sizes
/// (and MOVE), every row comes exactly once and in the order of the same
/// query without a cursor (the node's merge, checked against the rows
/// both shards hold); after the end, FETCH gives nothing; CLOSE ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_cursor_with_order_by_over_two_shards() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    // A hidden sort key (k is not in the select list) and a descending one.
    for query in [
        "SELECT k, n FROM items ORDER BY n, k",
        "SELECT n, k * 100 + n AS x FROM items ORDER BY k DESC, n",
    ] {
        let want = simple_rows(&a, query).await;
        assert_eq!(want.len(), 100, "{query}");
        let mut all: Vec<String> = Vec::new();
        for d in 0..c.shards.len() {
            all.extend(simple_rows(&c.direct(d).await, query).await);
        }
        all.sort();
        let mut sorted = want.clone();
        sorted.sort();
        assert_eq!(sorted, all, "each row of both shards once: {query}");
        for sizes in [&[1u64, 3, 7, 50, 1000][..], &[100], &[2, 2, 2, 200]] {
            a.batch_execute("BEGIN").await.unwrap();
            a.batch_execute(&format!("DECLARE m CURSOR FOR {query}"))
                .await
                .unwrap();
            let mut got = Vec::new();
            for (i, &n) in sizes.iter().cycle().enumerate() {
                let rows = simple_rows(&a, &format!("FETCH {n} FROM m")).await;
                let last = (rows.len() as u64) < n;
                got.extend(rows);
                if last {
                    break;
                }
                assert!(i < 200, "the cursor never ends");
            }
            assert_eq!(got, want, "{query} in FETCH sizes {sizes:?}");
            assert_eq!(count(&a, "FETCH FORWARD 5 FROM m").await, 0);
            a.batch_execute("CLOSE m").await.unwrap();
            a.batch_execute("COMMIT").await.unwrap();
        }
        // MOVE skips, FETCH ALL and NEXT read the rest.
        a.batch_execute("BEGIN").await.unwrap();
        a.batch_execute(&format!("DECLARE m CURSOR FOR {query}"))
            .await
            .unwrap();
        assert_eq!(count(&a, "MOVE FORWARD 10 IN m").await, 10);
        assert_eq!(simple_rows(&a, "FETCH NEXT FROM m").await, want[10..11]);
        assert_eq!(simple_rows(&a, "FETCH ALL FROM m").await, want[11..]);
        assert_eq!(count(&a, "MOVE 3 m").await, 0);
        a.batch_execute("CLOSE m").await.unwrap();
        let (code, msg) = err(a.batch_execute("FETCH 1 FROM m").await.unwrap_err());
        assert_eq!(code, "34000", "{msg}");
        a.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// A WITH HOLD cursor whose query reads rows of several shards (Django's
/// `.iterator()` in autocommit, psycopg's `withhold=True`): declared on
/// each shard outside a transaction block, or inside one and kept after
/// its COMMIT; fetched in parts across the client's transactions, every
/// row once in the query's order, writes after the DECLARE not seen (as
/// on PostgreSQL, which keeps the rows at the commit); its backends are
/// kept by the session meanwhile, and given back at CLOSE and when the
/// client leaves; other clients never see it; a ROLLBACK of the block
/// that declared it drops it. It used to be refused (0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_with_hold_cursor_over_two_shards() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    let query = "SELECT k, n FROM items ORDER BY n DESC, k";
    let want = simple_rows(&a, query).await;
    assert_eq!(want.len(), 100);
    a.batch_execute(&format!("DECLARE h NO SCROLL CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    wait_busy(&c, 0, 1, "the cursor's backend kept on shard 0").await;
    wait_busy(&c, 1, 1, "the cursor's backend kept on shard 1").await;
    let mut got = simple_rows(&a, "FETCH 7 FROM h").await;
    // A write of the same client in between, on both shards.
    a.batch_execute("INSERT INTO items (k, n) VALUES (1, 99), (20, 99)")
        .await
        .unwrap();
    got.extend(simple_rows(&a, "FETCH FORWARD 50 FROM h").await);
    a.batch_execute("BEGIN").await.unwrap();
    got.extend(simple_rows(&a, "FETCH 10 FROM h").await);
    a.batch_execute("COMMIT").await.unwrap();
    // In the extended protocol too (tokio-postgres prepares a FETCH).
    let rows = a.query("FETCH 3 FROM h", &[]).await.unwrap();
    got.extend(
        rows.iter()
            .map(|r| format!("{}|{}", r.get::<_, i64>(0), r.get::<_, i32>(1))),
    );
    got.extend(simple_rows(&a, "FETCH ALL FROM h").await);
    assert_eq!(got, want, "every row once, in the query's order");
    assert!(simple_rows(&a, "FETCH 1 FROM h").await.is_empty());
    // Another client never sees it.
    let x = c.connect().await;
    let (code, _) = err(x.batch_execute("FETCH 1 FROM h").await.unwrap_err());
    assert_eq!(code, "34000");
    a.batch_execute("CLOSE h").await.unwrap();
    wait_busy(&c, 0, 0, "shard 0's backend back in the pool after CLOSE").await;
    wait_busy(&c, 1, 0, "shard 1's backend back in the pool after CLOSE").await;
    let (code, _) = err(a.batch_execute("FETCH 1 FROM h").await.unwrap_err());
    assert_eq!(code, "34000");
    // Declared inside a block: kept after COMMIT.
    let want = simple_rows(&a, query).await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute(&format!("DECLARE h2 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    let mut got = simple_rows(&a, "FETCH 3 FROM h2").await;
    a.batch_execute("COMMIT").await.unwrap();
    got.extend(simple_rows(&a, "FETCH 4 FROM h2").await);
    assert_eq!(got, want[..7], "fetched across the COMMIT");
    // A block that declares one and rolls back: gone, as on PostgreSQL.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute(&format!("DECLARE h3 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    let (code, _) = err(a.batch_execute("FETCH 1 FROM h3").await.unwrap_err());
    assert_eq!(code, "34000");
    // h2 is still open after that ROLLBACK.
    assert_eq!(simple_rows(&a, "FETCH 1 FROM h2").await, want[7..8]);
    // CLOSE ALL closes it on both shards; the name can be declared again.
    a.batch_execute("CLOSE ALL").await.unwrap();
    wait_busy(&c, 0, 0, "shard 0's backend back after CLOSE ALL").await;
    wait_busy(&c, 1, 0, "shard 1's backend back after CLOSE ALL").await;
    a.batch_execute(&format!("DECLARE h2 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    assert_eq!(simple_rows(&a, "FETCH 2 FROM h2").await, want[..2]);
    // One shard's backend dies: the cursor is lost for the client (an
    // error, never the other shard's rows alone), its part on the other
    // shard is closed there, and the name can be declared again.
    c.direct(1)
        .await
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (Rows the node read from both shards before are still its to give,
    // in order.)
    if let Ok(msgs) = a.simple_query("FETCH 5 FROM h2").await {
        let rows: Vec<String> = msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some(format!("{}|{}", r.get(0).unwrap(), r.get(1).unwrap()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(rows, want[2..7], "after shard 1's backend died");
    }
    let (code, msg) = err(a.batch_execute("FETCH 1 FROM h2").await.unwrap_err());
    assert_eq!(code, "34000", "{msg}");
    a.batch_execute("SELECT * FROM items").await.unwrap();
    wait_busy(&c, 0, 0, "shard 0's backend back once its part is closed").await;
    wait_busy(&c, 1, 0, "shard 1's backend back").await;
    a.batch_execute(&format!("DECLARE h2 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    assert_eq!(simple_rows(&a, "FETCH 2 FROM h2").await, want[..2]);
    // DISCARD ALL closes it on every shard.
    a.batch_execute("DISCARD ALL").await.unwrap();
    wait_busy(&c, 0, 0, "shard 0's backend back after DISCARD ALL").await;
    wait_busy(&c, 1, 0, "shard 1's backend back after DISCARD ALL").await;
    let (code, _) = err(a.batch_execute("FETCH 1 FROM h2").await.unwrap_err());
    assert_eq!(code, "34000");
    a.batch_execute(&format!("DECLARE h2 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    assert_eq!(simple_rows(&a, "FETCH 2 FROM h2").await, want[..2]);
    // Its name is taken while it is open: a DECLARE of it on one shard is
    // refused as PostgreSQL refuses it (and the cursor is untouched).
    let (code, _) = err(a
        .batch_execute("DECLARE h2 CURSOR WITH HOLD FOR SELECT k, n FROM items WHERE k = 1")
        .await
        .unwrap_err());
    assert_eq!(code, "42P03");
    assert_eq!(simple_rows(&a, "FETCH 1 FROM h2").await, want[2..3]);
    // Declared after a savepoint, it outlives that savepoint's
    // transaction: a ROLLBACK TO in a later one leaves it open.
    a.batch_execute("CLOSE h2").await.unwrap();
    a.batch_execute("BEGIN; SAVEPOINT s1").await.unwrap();
    a.batch_execute(&format!("DECLARE h4 CURSOR WITH HOLD FOR {query}"))
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("BEGIN; SAVEPOINT s2").await.unwrap();
    a.batch_execute("ROLLBACK TO s2").await.unwrap();
    assert_eq!(simple_rows(&a, "FETCH 3 FROM h4").await, want[..3]);
    a.batch_execute("COMMIT").await.unwrap();
    // A DECLARE that fails on the second shard: the part already made on
    // the first (committed on its own outside a block) is closed again.
    c.direct(0)
        .await
        .batch_execute(
            "CREATE FUNCTION only_here(int8) RETURNS int8 LANGUAGE sql IMMUTABLE AS 'SELECT $1'",
        )
        .await
        .unwrap();
    let (code, _) = err(a
        .batch_execute("DECLARE h5 CURSOR WITH HOLD FOR SELECT only_here(k) FROM items ORDER BY 1")
        .await
        .unwrap_err());
    assert_eq!(code, "42883");
    a.batch_execute("CLOSE h4").await.unwrap();
    wait_busy(&c, 0, 0, "shard 0's backend back after the failed DECLARE").await;
    let q = c.connect().await;
    q.batch_execute("BEGIN").await.unwrap();
    let q2 = c.connect().await;
    q2.batch_execute("BEGIN").await.unwrap();
    for cl in [&q, &q2] {
        // Both backends of shard 0 (the pool holds two).
        cl.batch_execute("SELECT 1 FROM items WHERE k = 1")
            .await
            .unwrap();
    }
    for cl in [&q, &q2] {
        let n: i64 = cl
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_cursors WHERE name = 'h5'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 0,
            "a part of the failed DECLARE left on a pooled backend"
        );
        cl.batch_execute("COMMIT").await.unwrap();
    }
    // The client leaves with it open: nothing stays behind.
    drop(a);
    wait_busy(&c, 0, 0, "shard 0's backend back when the client left").await;
    wait_busy(&c, 1, 0, "shard 1's backend back when the client left").await;
    for i in 0..2 {
        let n: i64 = c
            .direct(i)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "shard {i}");
    }
    let y = c.connect().await;
    y.batch_execute("BEGIN").await.unwrap();
    let z = c.connect().await;
    for cl in [&y, &z] {
        cl.batch_execute("SELECT * FROM items").await.unwrap();
        assert_eq!(cursors_here(cl).await, 0);
    }
    y.batch_execute("COMMIT").await.unwrap();
}

/// FETCH ALL of a large merged cursor: read in batches from each shard,
/// sent to the client as it goes, every row once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_cursor_fetch_all_of_many_rows() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    a.batch_execute(
        "BEGIN; DECLARE big CURSOR FOR SELECT k, g FROM items, generate_series(1, 600) g WHERE n = 1 ORDER BY g, k",
    )
    .await
    .unwrap();
    assert_eq!(count(&a, "MOVE 5 FROM big").await, 5);
    let rows = simple_rows(&a, "FETCH ALL FROM big").await;
    let want: Vec<String> = (1..=600)
        .flat_map(|g| (1..=20).map(move |k| format!("{k}|{g}")))
        .skip(5)
        .collect();
    assert_eq!(rows.len(), 11_995);
    assert_eq!(rows, want);
    a.batch_execute("COMMIT").await.unwrap();
}

/// Without ORDER BY, a cursor over two shards concatenates them: every
/// row once; two such cursors open at once; CLOSE ALL closes them on
/// every shard; the transaction's end forgets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_cursor_concatenates_without_order_by() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    let mut want = simple_rows(&a, "SELECT k, n FROM items").await;
    want.sort();
    assert_eq!(want.len(), 100);
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("DECLARE c1 CURSOR FOR SELECT k, n FROM items")
        .await
        .unwrap();
    a.batch_execute("DECLARE c2 CURSOR FOR SELECT k, n FROM items WHERE n = 1")
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let rows = simple_rows(&a, "FETCH 9 FROM c1").await;
        let n = rows.len();
        got.extend(rows);
        assert_eq!(
            simple_rows(&a, "FETCH 1 FROM c2").await.len(),
            usize::from(got.len() <= 9 * 20)
        );
        if n < 9 {
            break;
        }
    }
    got.sort();
    assert_eq!(got, want);
    a.batch_execute("CLOSE ALL").await.unwrap();
    for name in ["c1", "c2"] {
        a.batch_execute("SAVEPOINT s").await.unwrap();
        let (code, _) = err(a
            .batch_execute(&format!("FETCH 1 FROM {name}"))
            .await
            .unwrap_err());
        assert_eq!(code, "34000", "{name} closed");
        a.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    }
    // Closed on every shard (it used to be on the first only): the name
    // is declared again over both.
    a.batch_execute("DECLARE c1 CURSOR FOR SELECT k, n FROM items")
        .await
        .unwrap();
    assert_eq!(simple_rows(&a, "FETCH ALL FROM c1").await.len(), 100);
    a.batch_execute("CLOSE c1").await.unwrap();
    a.batch_execute("DECLARE c3 CURSOR FOR SELECT k FROM items")
        .await
        .unwrap();
    // In one query string with other statements: run one by one.
    assert_eq!(
        simple_rows(
            &a,
            "DECLARE c4 CURSOR FOR SELECT k FROM items ORDER BY k DESC; FETCH 3 FROM c4; CLOSE c4"
        )
        .await,
        ["20", "20", "20"]
    );
    a.batch_execute("COMMIT").await.unwrap();
    // Ended with its transaction: on every shard.
    for d in 0..c.shards.len() {
        let x = c.direct(d).await;
        let n: i64 = x
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_cursors WHERE name LIKE 'c_'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    let (code, _) = err(a.batch_execute("FETCH 1 FROM c3").await.unwrap_err());
    assert_eq!(code, "34000");
}

/// What a cursor over several shards cannot do is refused with 0A000 (or
/// PostgreSQL's own SQLSTATE) and words that say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_cursor_refusals() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    let refused = |sql: &'static str, code: &'static str, words: &'static str| {
        let a = &a;
        async move {
            a.batch_execute("BEGIN").await.unwrap();
            let (got, msg) = err(a.batch_execute(sql).await.unwrap_err());
            assert_eq!(got, code, "{sql}: {msg}");
            assert!(msg.contains(words), "{sql}: {msg}");
            a.batch_execute("ROLLBACK").await.unwrap();
        }
    };
    for (sql, words) in [
        (
            "DECLARE x CURSOR FOR SELECT count(*) FROM items",
            "aggregates or GROUP BY",
        ),
        (
            "DECLARE x CURSOR FOR SELECT n, count(*) FROM items GROUP BY n",
            "aggregates or GROUP BY",
        ),
        (
            "DECLARE x CURSOR FOR SELECT DISTINCT n FROM items",
            "DISTINCT",
        ),
        (
            "DECLARE x CURSOR FOR SELECT k FROM items ORDER BY k LIMIT 3",
            "LIMIT or OFFSET",
        ),
        (
            "DECLARE x CURSOR FOR SELECT k FROM items OFFSET 3",
            "LIMIT or OFFSET",
        ),
        ("DECLARE x SCROLL CURSOR FOR SELECT k FROM items", "SCROLL"),
        ("DECLARE x BINARY CURSOR FOR SELECT k FROM items", "BINARY"),
    ] {
        refused(sql, "0A000", words).await;
    }
    // Window functions: the merge refuses them whatever the cursor.
    a.batch_execute("BEGIN").await.unwrap();
    let (code, _) = err(a
        .batch_execute("DECLARE x CURSOR FOR SELECT k, row_number() OVER () FROM items")
        .await
        .unwrap_err());
    assert_eq!(code, "0A000");
    a.batch_execute("ROLLBACK").await.unwrap();
    // Outside a transaction block, as PostgreSQL says.
    let (code, _) = err(a
        .batch_execute("DECLARE x CURSOR FOR SELECT k FROM items")
        .await
        .unwrap_err());
    assert_eq!(code, "25P01");
    // WITH HOLD outside a block with what a merged cursor cannot serve.
    let (code, msg) = err(a
        .batch_execute("DECLARE x NO SCROLL CURSOR WITH HOLD FOR SELECT count(*) FROM items")
        .await
        .unwrap_err());
    assert_eq!(code, "0A000", "{msg}");
    assert!(msg.contains("aggregates or GROUP BY"), "{msg}");
    // Directions other than forward.
    for dir in [
        "BACKWARD 2",
        "PRIOR",
        "ABSOLUTE 3",
        "RELATIVE -1",
        "LAST",
        "FIRST",
    ] {
        a.batch_execute("BEGIN; DECLARE x CURSOR FOR SELECT k FROM items ORDER BY k")
            .await
            .unwrap();
        let (code, msg) = err(a
            .batch_execute(&format!("FETCH {dir} FROM x"))
            .await
            .unwrap_err());
        assert_eq!(code, "0A000", "{dir}: {msg}");
        assert!(msg.contains("read forward only"), "{msg}");
        a.batch_execute("ROLLBACK").await.unwrap();
    }
    // The session goes on.
    assert_eq!(simple_rows(&a, "SELECT count(*) FROM items").await, ["100"]);
}

/// psql's FETCH_COUNT (psql 15 and older read through a cursor,
/// `_psql_cursor`) over two shards: the same rows as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_fetch_count_over_two_shards() {
    let c = cluster(2).await;
    fill(&c).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={USER} dbname=postgres",
        c.addr.port()
    );
    let run = |fetch_count: &'static str| {
        let conninfo = conninfo.clone();
        async move {
            run_cmd(
                &pg_tool("psql"),
                &[
                    "-X",
                    "-w",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-v",
                    fetch_count,
                    "-c",
                    "SELECT k, n FROM items ORDER BY n DESC, k",
                    "-c",
                    "SELECT k, n FROM items WHERE n = 2",
                    &conninfo,
                ],
                &[("PGPASSWORD", PASSWORD), ("PGSSLMODE", "disable")],
            )
            .await
        }
    };
    let plain = run("FETCH_COUNT=0").await;
    let counted = run("FETCH_COUNT=3").await;
    assert!(plain.0 && counted.0, "{plain:?} {counted:?}");
    assert_eq!(plain.1.lines().count(), 120, "{}", plain.1);
    let (p, q): (Vec<&str>, Vec<&str>) = (plain.1.lines().collect(), counted.1.lines().collect());
    assert_eq!(p[..100], q[..100], "ordered rows in the same order");
    let (mut p2, mut q2) = (p[100..].to_vec(), q[100..].to_vec());
    p2.sort();
    q2.sort();
    assert_eq!(p2, q2, "concatenated rows");
}

/// The extended protocol: a DECLARE over two shards with a parameter
/// (Parse/Describe, then Bind/Execute: tokio-postgres' way; psycopg's is
/// the `server_cursor_sharded` driver scenario), its rows fetched as simple
/// queries; outside a transaction block, PostgreSQL's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_cursor_declared_in_the_extended_protocol() {
    let c = cluster(2).await;
    fill(&c).await;
    let a = c.connect().await;
    let query = "SELECT k, n FROM items WHERE n >= $1 ORDER BY k DESC, n";
    let want = simple_rows(&a, &query.replace("$1", "3")).await;
    assert_eq!(want.len(), 60);
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(&format!("DECLARE e CURSOR FOR {query}"), &[&3i32])
        .await
        .unwrap();
    let mut got = simple_rows(&a, "FETCH 7 FROM e").await;
    // FETCH, MOVE and CLOSE in the extended protocol too (binary rows).
    let typed = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter()
            .map(|r| format!("{}|{}", r.get::<_, i64>(0), r.get::<_, i32>(1)))
            .collect()
    };
    got.extend(typed(a.query("FETCH FORWARD 5 FROM e", &[]).await.unwrap()));
    assert_eq!(a.execute("MOVE 3 IN e", &[]).await.unwrap(), 3);
    got.extend(want[12..15].iter().cloned());
    let st = a.prepare("FETCH 4 FROM e").await.unwrap();
    assert_eq!(st.columns().len(), 2, "described without hidden columns");
    got.extend(typed(a.query(&st, &[]).await.unwrap()));
    got.extend(simple_rows(&a, "FETCH ALL FROM e").await);
    assert_eq!(got, want);
    assert!(a.query("FETCH 4 FROM e", &[]).await.unwrap().is_empty());
    a.execute("CLOSE e", &[]).await.unwrap();
    let (code, _) = err(a.query("FETCH 1 FROM e", &[]).await.unwrap_err());
    assert_eq!(code, "34000");
    a.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    // A refused direction, in the extended protocol.
    a.execute(&format!("DECLARE e CURSOR FOR {query}"), &[&3i32])
        .await
        .unwrap();
    let (code, msg) = err(a.query("FETCH PRIOR FROM e", &[]).await.unwrap_err());
    assert_eq!(code, "0A000", "{msg}");
    a.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    // A hidden sort key: the statement's description leaves it out.
    a.batch_execute("DECLARE h CURSOR FOR SELECT n FROM items ORDER BY k, n")
        .await
        .unwrap();
    let rows = a.query("FETCH 6 FROM h", &[]).await.unwrap();
    assert_eq!(rows[0].len(), 1);
    let ns: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ns, [1, 2, 3, 4, 5, 1]);
    a.batch_execute("COMMIT").await.unwrap();
    let (code, _) = err(a
        .execute(&format!("DECLARE e CURSOR FOR {query}"), &[&3i32])
        .await
        .unwrap_err());
    assert_eq!(code, "25P01");
}
