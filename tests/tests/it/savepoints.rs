//! Savepoints in a transaction over several shards (issue 14, found with
//! Sequelize's nested transactions): `SAVEPOINT`, `RELEASE` and
//! `ROLLBACK TO SAVEPOINT` act on every shard of the transaction — those
//! it used before the savepoint and those that join it later — so a
//! rollback to a savepoint undoes the writes made after it on every
//! shard, as on PostgreSQL, and never only on the shard that happened to
//! receive the statement.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;
use tokio_postgres::SimpleQueryMessage;

async fn cluster() -> Cluster {
    Cluster::start(Opts {
        shards: 2,
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await
}

/// `n` keys owned by each shard: (keys on s0, keys on s1).
fn keys(c: &Cluster, n: usize) -> (Vec<i64>, Vec<i64>) {
    let snap = c.node.routing.catalog.load_full();
    let on = |k: i64, s: &str| {
        snap.range_for_key("users", &KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            == s
    };
    let a = (1..10_000).filter(|&k| on(k, "s0")).take(n).collect();
    let b = (1..10_000).filter(|&k| on(k, "s1")).take(n).collect();
    (a, b)
}

async fn values(db: &tokio_postgres::Client) -> Vec<String> {
    db.simple_query("SELECT id::text || '=' || v FROM users ORDER BY id")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_a_savepoint_undoes_the_writes_of_every_shard() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (a, b) = keys(&c, 2);
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({}, 'a'), ({}, 'a'), ({}, 'b'), ({}, 'b')",
        a[0], a[1], b[0], b[1]
    ))
    .await
    .unwrap();
    let want_before = values(&db).await;
    // 1. The savepoint taken on s0; then both shards written; rolled back.
    for sql in [
        "BEGIN".to_string(),
        format!("UPDATE users SET v = 'kept' WHERE id = {}", a[0]),
        "SAVEPOINT s".to_string(),
        format!("UPDATE users SET v = 'undone' WHERE id = {}", a[1]),
        format!("UPDATE users SET v = 'undone' WHERE id = {}", b[0]),
        // Back on s0, which alone held the savepoint before: the rollback
        // used to undo s0's writes only, and the COMMIT kept b[0]'s.
        format!("UPDATE users SET v = 'undone too' WHERE id = {}", a[1]),
        "ROLLBACK TO SAVEPOINT s".to_string(),
        format!("UPDATE users SET v = 'after' WHERE id = {}", b[1]),
        "COMMIT".to_string(),
    ] {
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let mut want: Vec<String> = want_before
        .iter()
        .map(|r| {
            let id: i64 = r.split('=').next().unwrap().parse().unwrap();
            if id == a[0] {
                format!("{id}=kept")
            } else if id == b[1] {
                format!("{id}=after")
            } else {
                r.clone()
            }
        })
        .collect();
    want.sort();
    let mut got = values(&db).await;
    got.sort();
    assert_eq!(got, want, "rolled back to s on both shards");
    // 2. Taken before any shard was used; nested; released; the inner one
    //    rolled back (Sequelize's nested transaction whose inner part
    //    fails with a duplicate key on the other shard).
    let before = values(&db).await;
    for sql in [
        "START TRANSACTION".to_string(),
        "SAVEPOINT \"outer-sp-1\"".to_string(),
        format!("UPDATE users SET v = 'o' WHERE id = {}", a[0]),
        "SAVEPOINT \"inner-sp-2\"".to_string(),
    ] {
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let e = db
        .batch_execute(&format!(
            "INSERT INTO users (id, v) VALUES ({}, 'dup')",
            b[0]
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "23505");
    for sql in [
        "ROLLBACK TO SAVEPOINT \"inner-sp-2\"".to_string(),
        format!("UPDATE users SET v = 'i' WHERE id = {}", b[1]),
        "RELEASE SAVEPOINT \"outer-sp-1\"".to_string(),
        "COMMIT".to_string(),
    ] {
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let got = values(&db).await;
    let want: Vec<String> = before
        .iter()
        .map(|r| {
            let id: i64 = r.split('=').next().unwrap().parse().unwrap();
            if id == a[0] {
                format!("{id}=o")
            } else if id == b[1] {
                format!("{id}=i")
            } else {
                r.clone()
            }
        })
        .collect();
    assert_eq!(got, want);
    // 3. Errors as PostgreSQL gives them.
    db.batch_execute("BEGIN").await.unwrap();
    let e = db
        .batch_execute("ROLLBACK TO SAVEPOINT nope")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3B001", "{e:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    let e = db.batch_execute("SAVEPOINT outside").await.unwrap_err();
    assert_eq!(code(&e), "25P01", "{e:?}");
    // Nothing left open: a transaction over both shards commits.
    db.batch_execute(&format!(
        "BEGIN; UPDATE users SET v = 'z' WHERE id = {}; UPDATE users SET v = 'z' WHERE id = {}; COMMIT",
        a[0], b[0]
    ))
    .await
    .unwrap();
}

/// `SET TRANSACTION …` after `BEGIN` (Sequelize's `isolationLevel`):
/// every shard the transaction reaches, also later, runs with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_transaction_reaches_the_shards_that_join_later() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (a, b) = keys(&c, 1);
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({}, 'a'), ({}, 'b')",
        a[0], b[0]
    ))
    .await
    .unwrap();
    let level = |k: i64| {
        format!("SELECT current_setting('transaction_isolation') || '/' || current_setting('transaction_read_only') FROM users WHERE id = {k}")
    };
    for (set, want) in [
        (
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;",
            "serializable/off",
        ),
        (
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "repeatable read/on",
        ),
    ] {
        for order in [[a[0], b[0]], [b[0], a[0]]] {
            db.batch_execute("START TRANSACTION;").await.unwrap();
            db.batch_execute(set).await.unwrap();
            for k in order {
                let r = db.query_one(level(k).as_str(), &[]).await;
                let got: String = r.unwrap_or_else(|e| panic!("{set} {k}: {e:?}")).get(0);
                assert_eq!(got, want, "{set}: key {k}");
            }
            db.batch_execute("COMMIT").await.unwrap();
        }
    }
    // The next transaction is back to the default on every shard.
    db.batch_execute("BEGIN").await.unwrap();
    for k in [a[0], b[0]] {
        let got: String = db.query_one(level(k).as_str(), &[]).await.unwrap().get(0);
        assert_eq!(got, "read committed/off");
    }
    db.batch_execute("COMMIT").await.unwrap();
}

/// The same in the extended protocol (tokio-postgres' `execute`: Parse,
/// Describe and Sync, then Bind, Execute and Sync), as drivers that send
/// every statement so do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_in_the_extended_protocol_cover_every_shard() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (a, b) = keys(&c, 2);
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({}, 'a'), ({}, 'a'), ({}, 'b'), ({}, 'b')",
        a[0], a[1], b[0], b[1]
    ))
    .await
    .unwrap();
    for sql in [
        "BEGIN".to_string(),
        format!("UPDATE users SET v = 'kept' WHERE id = {}", a[0]),
        "SAVEPOINT s".to_string(),
        format!("UPDATE users SET v = 'undone' WHERE id = {}", b[0]),
        format!("UPDATE users SET v = 'undone' WHERE id = {}", a[1]),
        "ROLLBACK TO SAVEPOINT s".to_string(),
        "RELEASE SAVEPOINT s".to_string(),
        "COMMIT".to_string(),
    ] {
        db.execute(sql.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let got = values(&db).await;
    assert!(got.contains(&format!("{}=kept", a[0])), "{got:?}");
    for k in [a[1], b[0], b[1]] {
        let v = if a.contains(&k) { "a" } else { "b" };
        assert!(got.contains(&format!("{k}={v}")), "{k}: {got:?}");
    }
}
