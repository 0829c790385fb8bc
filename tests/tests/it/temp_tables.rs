//! Issue 14: temporary tables under transaction pooling. A client that
//! made a temporary object keeps the backend that holds it for the rest of
//! its session (`proxy/src/session/temp.rs`), on one shard or several (the
//! objects live on the home shard); the pin ends with DISCARD ALL/TEMP or
//! when the client leaves, and the backend goes back to the pool without
//! them. Before, the backend went back to the pool at the end of each
//! transaction: with another client holding it, the next statement ran on
//! another backend and failed with 42P01 (`relation "tt" does not exist`);
//! on two shards the temporary table was made on every shard.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;
use std::time::Duration;

async fn cluster(shards: usize) -> Cluster {
    Cluster::start(Opts {
        shards,
        // Two connections per shard: with one kept for the temporary table,
        // the others share the second.
        extra: "pool_size = 2\npool_timeout_ms = 500".into(),
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
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

async fn wait_counts(c: &Cluster, shard: usize, want: (usize, usize), what: &str) {
    wait_for(what, Duration::from_secs(10), || async {
        pool_counts(c, shard) == want
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

/// How many temporary objects the backend serving `c` holds.
async fn temp_objects(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Temporary tables named `name` on shard `i`, whichever backend has them.
async fn temp_tables_on(c: &Cluster, i: usize, name: &str) -> i64 {
    c.direct(i)
        .await
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_class WHERE relname = $1 AND relpersistence = 't'",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// A temporary table is used across transactions while another client
/// holds the backend it was made on (before: that client got it, and the
/// next statement ran elsewhere: 42P01); the others share the rest of the
/// pool and never see it.
async fn kept_across_transactions(shards: usize) {
    let c = cluster(shards).await;
    let a = c.connect().await;
    // The node's own login and probes used one backend of the home shard.
    a.batch_execute("CREATE TEMP TABLE tt (a int)")
        .await
        .unwrap();
    wait_counts(&c, 0, (1, 0), "the temporary table's backend kept").await;
    if shards > 1 {
        assert_eq!(temp_tables_on(&c, 0, "tt").await, 1);
        assert_eq!(
            temp_tables_on(&c, 1, "tt").await,
            0,
            "made on the home shard only"
        );
    }
    // Another client holds a transaction open: it gets the other backend.
    let b = c.connect().await;
    b.batch_execute("BEGIN").await.unwrap();
    assert_eq!(temp_objects(&b).await, 0, "the other client's backend");
    // A third one finds no free connection (pool_size 2): the kept one is
    // not handed out.
    let third = c.connect().await;
    let (code, msg) = err(third.simple_query("SELECT 1").await.unwrap_err());
    assert_eq!(code, "53300", "{msg}");
    for i in 1..=5 {
        a.execute("INSERT INTO tt VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    a.batch_execute("BEGIN; INSERT INTO tt VALUES (10); COMMIT")
        .await
        .unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO tt VALUES (100)", &[]).await.unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    let row = a
        .query_one("SELECT count(*), sum(a)::int8 FROM tt", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (6, 25));
    b.batch_execute("COMMIT").await.unwrap();
    // Other clients, one after the other, run on the second backend.
    for _ in 0..5 {
        let x = c.connect().await;
        assert_eq!(temp_objects(&x).await, 0);
        let (code, _) = err(x.query("SELECT * FROM tt", &[]).await.unwrap_err());
        assert_eq!(code, "42P01");
    }
    assert_eq!(temp_objects(&a).await, 1);
    // DDL on it runs where it is (before, on two shards: on every shard).
    a.batch_execute("CREATE INDEX tt_a ON tt (a); ALTER TABLE tt ADD COLUMN b text")
        .await
        .unwrap();
    a.batch_execute("DROP TABLE tt").await.unwrap();
    assert_eq!(temp_objects(&a).await, 0);
    // Nothing temporary left: the backend goes back to the pool.
    wait_counts(&c, 0, (0, 2), "the backend back in the pool").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_table_is_kept_across_transactions_on_one_shard() {
    kept_across_transactions(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_table_is_kept_across_transactions_on_two_shards() {
    kept_across_transactions(2).await;
}

/// DISCARD TEMP and DISCARD ALL end the pin: the backend goes back to the
/// pool at once, without the objects; disconnecting ends it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_and_disconnect_return_the_backend_to_the_pool() {
    let c = cluster(2).await;
    let a = c.connect().await;
    for discard in ["DISCARD TEMP", "DISCARD ALL"] {
        a.batch_execute("CREATE TEMP TABLE tt (a int); INSERT INTO tt VALUES (1)")
            .await
            .unwrap();
        wait_counts(&c, 0, (1, 0), "kept after CREATE TEMP TABLE").await;
        a.batch_execute("SET application_name = 'kept'")
            .await
            .unwrap();
        a.batch_execute(discard).await.unwrap();
        wait_counts(&c, 0, (0, 1), discard).await;
        let (code, _) = err(a.query("SELECT * FROM tt", &[]).await.unwrap_err());
        assert_eq!(code, "42P01", "after {discard}");
        assert_eq!(temp_tables_on(&c, 0, "tt").await, 0, "after {discard}");
    }
    // DISCARD ALL reset the session too.
    let name: String = a
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "");
    // A client that leaves: its backend goes back to the pool, emptied.
    a.batch_execute("CREATE TEMP SEQUENCE ts; CREATE TEMP VIEW tv AS SELECT 1 AS one")
        .await
        .unwrap();
    let kept_pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    wait_counts(&c, 0, (1, 0), "kept after CREATE TEMP SEQUENCE").await;
    drop(a);
    wait_counts(&c, 0, (0, 1), "the backend back after the client left").await;
    let x = c.connect().await;
    let pid: i32 = x
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, kept_pid, "the backend is reused, not closed");
    assert_eq!(temp_objects(&x).await, 0, "its temporary objects are gone");
}

/// A key of `users` on each of the two shards: (home shard s0, s1).
fn keys(c: &Cluster) -> (i64, i64) {
    let snap = c.node.routing.catalog.load_full();
    let owner = |k: i64| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_string()
    };
    let home = (1..1000).find(|&k| owner(k) == "s0").unwrap();
    let other = (1..1000).find(|&k| owner(k) == "s1").unwrap();
    (home, other)
}

/// On two shards: what would combine the temporary table (on the home
/// shard) with another shard is refused with 0A000 before anything runs
/// — a transaction that used it and would need two-phase commit above all
/// (before: PREPARE TRANSACTION failed at COMMIT) — and what stays on the
/// home shard runs. Nothing is left half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_would_need_two_shards_with_a_temporary_table_is_refused() {
    let c = cluster(2).await;
    let a = c.connect().await;
    a.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (home, other) = keys(&c);
    a.batch_execute("CREATE TEMP TABLE tt (a int8)")
        .await
        .unwrap();
    let refused = |r: Result<(), tokio_postgres::Error>, what: &str, words: &str| {
        let (code, msg) = err(r.unwrap_err());
        assert_eq!(code, "0A000", "{what}: {msg}");
        assert!(msg.contains(words), "{what}: {msg}");
    };
    // Written on the home shard with the temporary table, then elsewhere.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO tt VALUES (1)", &[]).await.unwrap();
    refused(
        a.execute("INSERT INTO users (id) VALUES ($1)", &[&other])
            .await
            .map(drop),
        "a write to the other shard after the temporary table",
        "two-phase commit",
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    // The other way round.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO users (id) VALUES ($1)", &[&other])
        .await
        .unwrap();
    refused(
        a.batch_execute("INSERT INTO tt VALUES (2)").await,
        "the temporary table after a write to the other shard",
        "two-phase commit",
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    // Several statements in one string (the node's implicit transaction).
    refused(
        a.batch_execute(&format!(
            "INSERT INTO tt VALUES (3); INSERT INTO users (id) VALUES ({other})"
        ))
        .await,
        "one string writing both",
        "two-phase commit",
    );
    // Statements that read the temporary table and rows of other shards.
    for sql in [
        "SELECT * FROM tt, users".to_string(),
        format!("SELECT * FROM tt JOIN users ON users.id = tt.a WHERE users.id = {other}"),
        "INSERT INTO users (id) SELECT a FROM tt".into(),
        "/* hotrepart: shard=s1 */ SELECT * FROM tt".into(),
    ] {
        let (code, msg) = err(a.simple_query(&sql).await.unwrap_err());
        assert_eq!(code, "0A000", "{sql}: {msg}");
    }
    // A temporary table may not hide a declared one.
    refused(
        a.batch_execute("CREATE TEMP TABLE users (a int)").await,
        "a temporary table named like a declared one",
        "declared table",
    );
    refused(
        a.batch_execute("CREATE TEMP TABLE t2 AS SELECT id FROM users")
            .await,
        "CREATE TEMP TABLE … AS over a sharded table",
        "sharded table",
    );
    // What runs: the temporary table only read beside a write elsewhere
    // (its shard only reads: no two-phase commit there), on the home
    // shard with a key of the home shard, one shard at a time.
    a.batch_execute("BEGIN").await.unwrap();
    a.query("SELECT count(*) FROM tt", &[]).await.unwrap();
    a.execute("INSERT INTO users (id) VALUES ($1)", &[&other])
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    a.batch_execute(&format!(
        "BEGIN; INSERT INTO tt VALUES ({home}); INSERT INTO users (id) VALUES ({home}); COMMIT"
    ))
    .await
    .unwrap();
    a.batch_execute("CREATE TEMP TABLE t3 AS SELECT 7 AS x; SELECT x INTO TEMP t4 FROM t3")
        .await
        .unwrap();
    let n: i64 = a
        .query_one(
            &format!(
                "SELECT count(*) FROM tt JOIN users ON users.id = tt.a WHERE users.id = {home}"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let x: i32 = a.query_one("SELECT x FROM t4", &[]).await.unwrap().get(0);
    assert_eq!(x, 7);
    // Only what was committed is there, and nothing is left prepared.
    let mut ids: Vec<i64> = Vec::new();
    for i in 0..2 {
        let d = c.direct(i).await;
        for r in d.query("SELECT id FROM users", &[]).await.unwrap() {
            ids.push(r.get(0));
        }
        let prepared: i64 = d
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(prepared, 0, "shard s{i}");
    }
    ids.sort();
    let mut want = vec![home, other];
    want.sort();
    assert_eq!(ids, want);
}

/// A named statement prepared in one transaction and run in a later one
/// (the extended protocol's Bind) pins as the same text sent again would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_making_a_temporary_table_pins_when_it_runs() {
    let c = cluster(1).await;
    let a = c.connect().await;
    let make = a.prepare("CREATE TEMP TABLE tp (a int)").await.unwrap();
    wait_counts(&c, 0, (0, 1), "nothing kept after the Parse").await;
    a.execute(&make, &[]).await.unwrap();
    wait_counts(&c, 0, (1, 0), "kept once it ran").await;
    let b = c.connect().await;
    b.batch_execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO tp VALUES (1)", &[]).await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
}

/// Session pooling: the backend a client leaves goes back to the pool
/// without its temporary objects (before: the next client found them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_drops_the_temporary_objects_of_a_client_that_leaves() {
    let c = Cluster::start(Opts {
        shards: 1,
        extra: "pool_size = 1\npool_mode = \"session\"".into(),
        ..Opts::default()
    })
    .await;
    let a = c.connect().await;
    a.batch_execute("CREATE TEMP TABLE ts (a int); INSERT INTO ts VALUES (1)")
        .await
        .unwrap();
    drop(a);
    wait_counts(&c, 0, (0, 1), "the backend back in the pool").await;
    let b = c.connect().await;
    assert_eq!(temp_objects(&b).await, 0);
}
