//! A client's own two-phase commit (issue 14): `PREPARE TRANSACTION`,
//! `COMMIT PREPARED`, `ROLLBACK PREPARED` pass through when the
//! transaction used one shard, and are refused clearly otherwise. The
//! shard that holds a prepared transaction is found by its identifier.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;

const SEED: u64 = 7;

async fn cluster(shards: usize) -> Cluster {
    Cluster::start(Opts {
        shards,
        extra: "pool_size = 2".into(),
        users: "[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        tail: format!(
            "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    })
    .await
}

/// A key owned by each shard, in shard order (the first from `from` on).
fn keys(c: &Cluster, from: i64) -> Vec<i64> {
    let snap = c.node.routing.catalog.load_full();
    (0..c.shards.len())
        .map(|s| {
            let name = format!("s{s}");
            (from..from + 10_000)
                .find(|&k| {
                    snap.range_for_key("items", &KeyValue::Int8(k))
                        .unwrap()
                        .write_owner
                        .as_str()
                        == name
                })
                .unwrap()
        })
        .collect()
}

async fn err_of(db: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let e = db.batch_execute(sql).await.unwrap_err();
    let e = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
    (e.code().code().to_string(), e.message().to_string())
}

async fn rows_on(c: &Cluster, shard: usize, id: i64) -> i64 {
    c.direct(shard)
        .await
        .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn prepared_on(c: &Cluster, shard: usize, gid: &str) -> bool {
    c.direct(shard)
        .await
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1",
            &[&gid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

async fn one_shard_transactions_prepare_and_finish(shards: usize) {
    let c = cluster(shards).await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let ks = keys(&c, 1);
    let last = shards - 1;
    let k = ks[last];
    // Prepared, then committed from another connection.
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO items (id, v) VALUES ({k}, 'a'); PREPARE TRANSACTION 'app_commit'"
    ))
    .await
    .unwrap();
    assert!(prepared_on(&c, last, "app_commit").await);
    assert_eq!(
        rows_on(&c, last, k).await,
        0,
        "not visible before COMMIT PREPARED"
    );
    // The session is outside a transaction again and goes on working.
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let other = c.connect().await;
    other
        .batch_execute("COMMIT PREPARED 'app_commit'")
        .await
        .unwrap();
    assert!(!prepared_on(&c, last, "app_commit").await);
    assert_eq!(rows_on(&c, last, k).await, 1);
    // Prepared, then rolled back.
    db.batch_execute(&format!(
        "BEGIN; UPDATE items SET v = 'b' WHERE id = {k}; PREPARE TRANSACTION 'app_rollback'"
    ))
    .await
    .unwrap();
    other
        .batch_execute("ROLLBACK PREPARED 'app_rollback'")
        .await
        .unwrap();
    let v: String = db
        .query_one("SELECT v FROM items WHERE id = $1", &[&k])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "a");
    // Statement by statement, after a read of every shard: the shards only
    // read end first, the written one holds the prepared transaction.
    let k2 = keys(&c, 10_000)[last];
    db.batch_execute("BEGIN").await.unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    db.batch_execute(&format!("INSERT INTO items (id, v) VALUES ({k2}, 'c')"))
        .await
        .unwrap();
    db.batch_execute("PREPARE TRANSACTION 'app_after_read'")
        .await
        .unwrap();
    assert!(prepared_on(&c, last, "app_after_read").await);
    for s in 0..last {
        assert!(!prepared_on(&c, s, "app_after_read").await);
    }
    other
        .batch_execute("COMMIT PREPARED 'app_after_read'")
        .await
        .unwrap();
    assert_eq!(rows_on(&c, last, k2).await, 1);
    // What PostgreSQL says for an unknown identifier and inside a block.
    assert_eq!(
        err_of(&other, "COMMIT PREPARED 'nope'").await,
        (
            "42704".into(),
            "prepared transaction with identifier \"nope\" does not exist".into()
        )
    );
    assert_eq!(
        err_of(&other, "BEGIN; ROLLBACK PREPARED 'nope'").await.0,
        "25001"
    );
    other.batch_execute("ROLLBACK").await.unwrap();
    // The node's own identifiers are not the client's to use.
    let ks = keys(&c, 20_000);
    let (code, msg) = err_of(
        &db,
        &format!(
            "BEGIN; INSERT INTO items (id) VALUES ({}); PREPARE TRANSACTION 'hr_1_2'",
            ks[0]
        ),
    )
    .await;
    assert_eq!(code, "42602", "{msg}");
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows_on(&c, 0, ks[0]).await, 0);
    let (code, msg) = err_of(&other, "COMMIT PREPARED 'hr_1_2'").await;
    assert_eq!(code, "42602", "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shard_transaction_prepares_and_commits_on_one_shard() {
    one_shard_transactions_prepare_and_finish(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shard_transaction_prepares_and_commits_on_two_shards() {
    one_shard_transactions_prepare_and_finish(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_two_shards_is_not_prepared() {
    let c = cluster(2).await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let ks = keys(&c, 1);
    db.batch_execute(&format!("BEGIN; INSERT INTO items (id) VALUES ({})", ks[0]))
        .await
        .unwrap();
    db.batch_execute(&format!("INSERT INTO items (id) VALUES ({})", ks[1]))
        .await
        .unwrap();
    let (code, msg) = err_of(&db, "PREPARE TRANSACTION 'app_two'").await;
    assert_eq!(code, "0A000", "{msg}");
    assert!(msg.contains("s0") && msg.contains("s1"), "{msg}");
    // As when PostgreSQL cannot prepare: the transaction is rolled back.
    let n: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    for s in 0..2 {
        assert!(!prepared_on(&c, s, "app_two").await);
    }
    // Nothing left open on the shards; the session works on.
    db.batch_execute(&format!("INSERT INTO items (id) VALUES ({})", ks[1]))
        .await
        .unwrap();
    assert_eq!(rows_on(&c, 1, ks[1]).await, 1);
}

/// `pg_prepared_xacts` through a node of two shards lists the prepared
/// transactions of every shard (a transaction manager's recovery reads it
/// to finish what a crash left prepared), without the node's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shards_prepared_transactions_are_listed() {
    let c = Cluster::start(Opts {
        shards: 2,
        // The resolver leaves the fake node transaction below alone.
        extra: "pool_size = 2\ntwopc_grace_ms = 600000".into(),
        users: "[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        tail: format!(
            "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let ks = keys(&c, 1);
    for (s, k) in ks.iter().enumerate() {
        db.batch_execute(&format!(
            "BEGIN; INSERT INTO items (id) VALUES ({k}); PREPARE TRANSACTION 'app_on_{s}'"
        ))
        .await
        .unwrap();
        assert!(prepared_on(&c, s, &format!("app_on_{s}")).await);
    }
    // One of the node's own, as its two-phase commit leaves one in doubt.
    let direct = c.direct(1).await;
    direct
        .batch_execute("BEGIN; CREATE TABLE hr_fake (x int); PREPARE TRANSACTION 'hr_9_1'")
        .await
        .unwrap();
    let want = vec!["app_on_0".to_owned(), "app_on_1".to_owned()];
    let other = c.connect().await;
    // psycopg's tpc_recover(), pgjdbc's XAResource.recover(), by hand.
    for sql in [
        "SELECT gid, prepared, owner, database FROM pg_prepared_xacts",
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
        "SELECT p.gid FROM pg_catalog.pg_prepared_xacts AS p ORDER BY 1",
    ] {
        let mut got: Vec<String> = other
            .simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "{sql} (simple protocol)");
        let mut got: Vec<String> = other
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        got.sort();
        assert_eq!(got, want, "{sql} (extended protocol)");
    }
    let n: i64 = other
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // Beside another relation it is refused, not answered from one shard.
    let (code, msg) = err_of(
        &other,
        "SELECT i.id FROM items i JOIN pg_prepared_xacts p ON p.gid = i.v",
    )
    .await;
    assert_eq!(code, "0A000", "{msg}");
    assert!(msg.contains("pg_prepared_xacts"), "{msg}");
    // The recovery finishes them by identifier, wherever they are.
    for sql in ["COMMIT PREPARED 'app_on_0'", "ROLLBACK PREPARED 'app_on_1'"] {
        other.batch_execute(sql).await.unwrap();
    }
    let n: i64 = other
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert!(prepared_on(&c, 1, "hr_9_1").await, "the node's own stays");
    direct
        .batch_execute("ROLLBACK PREPARED 'hr_9_1'")
        .await
        .unwrap();
    assert_eq!(rows_on(&c, 0, ks[0]).await, 1);
    assert_eq!(rows_on(&c, 1, ks[1]).await, 0);
}

async fn ext_err(db: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let e = db.execute(sql, &[]).await.unwrap_err();
    let e = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
    (e.code().code().to_string(), e.message().to_string())
}

/// The same statements in the extended protocol (tokio-postgres'
/// `execute`, as JDBC's XA and other drivers send them): Parse, Describe
/// and Sync, then Bind and Execute of the named statement.
async fn two_phase_in_the_extended_protocol(shards: usize) {
    let c = cluster(shards).await;
    let db = c.connect().await;
    let other = c.connect().await;
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let last = shards - 1;
    let ks = keys(&c, 1);
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO items (id, v) VALUES ($1, 'x')", &[&ks[last]])
        .await
        .unwrap();
    assert_eq!(
        db.execute("PREPARE TRANSACTION 'ext_commit'", &[])
            .await
            .unwrap(),
        0
    );
    assert!(prepared_on(&c, last, "ext_commit").await);
    assert_eq!(rows_on(&c, last, ks[last]).await, 0);
    other
        .execute("COMMIT PREPARED 'ext_commit'", &[])
        .await
        .unwrap();
    assert_eq!(rows_on(&c, last, ks[last]).await, 1);
    // A named statement prepared first, run later.
    let ks2 = keys(&c, 10_000);
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("DELETE FROM items WHERE id = $1", &[&ks[last]])
        .await
        .unwrap();
    db.execute("INSERT INTO items (id) VALUES ($1)", &[&ks2[last]])
        .await
        .unwrap();
    let prepare = db
        .prepare("PREPARE TRANSACTION 'ext_rollback'")
        .await
        .unwrap();
    db.execute(&prepare, &[]).await.unwrap();
    let rollback = other
        .prepare("ROLLBACK PREPARED 'ext_rollback'")
        .await
        .unwrap();
    other.execute(&rollback, &[]).await.unwrap();
    assert_eq!(rows_on(&c, last, ks[last]).await, 1);
    assert_eq!(rows_on(&c, last, ks2[last]).await, 0);
    // PostgreSQL's words for an unknown identifier and inside a block; the
    // node's own identifiers are refused.
    assert_eq!(
        ext_err(&other, "COMMIT PREPARED 'nope'").await,
        (
            "42704".into(),
            "prepared transaction with identifier \"nope\" does not exist".into()
        )
    );
    other.batch_execute("BEGIN").await.unwrap();
    assert_eq!(ext_err(&other, "COMMIT PREPARED 'nope'").await.0, "25001");
    other.batch_execute("ROLLBACK").await.unwrap();
    let (code, msg) = ext_err(&other, "ROLLBACK PREPARED 'hr_9_9'").await;
    assert_eq!(code, "42602", "{msg}");
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("UPDATE items SET v = 'y' WHERE id = $1", &[&ks[last]])
        .await
        .unwrap();
    let (code, msg) = ext_err(&db, "PREPARE TRANSACTION 'hr_1_1'").await;
    assert_eq!(code, "42602", "{msg}");
    db.batch_execute("ROLLBACK").await.unwrap();
    if shards > 1 {
        // Over two written shards: refused, rolled back.
        db.batch_execute("BEGIN").await.unwrap();
        for k in &ks2 {
            db.execute("INSERT INTO items (id) VALUES ($1)", &[k])
                .await
                .unwrap();
        }
        let (code, msg) = ext_err(&db, "PREPARE TRANSACTION 'ext_two'").await;
        assert_eq!(code, "0A000", "{msg}");
        for (s, k) in ks2.iter().enumerate() {
            assert_eq!(rows_on(&c, s, *k).await, 0);
            assert!(!prepared_on(&c, s, "ext_two").await);
        }
    }
    // The session goes on.
    let v: String = db
        .query_one("SELECT v FROM items WHERE id = $1", &[&ks[last]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_statements_in_the_extended_protocol_on_one_shard() {
    two_phase_in_the_extended_protocol(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_statements_in_the_extended_protocol_on_two_shards() {
    two_phase_in_the_extended_protocol(2).await;
}
