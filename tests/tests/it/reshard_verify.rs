//! The cut-over's two-part verification (`reshard::Session::compare` before
//! the freeze, `verify_keys` inside it) between two real PostgreSQL
//! servers: the comparison finds rows that differ or are missing, the
//! catch-up records exactly the shard keys it changes in the range, and
//! the recheck of `touched ∪ mismatched` catches a difference left behind
//! and one made after the comparison on a touched key.
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::control::reshard::{self, MoveSpec, Session, TableMove, Touched};
use hotrepart_router::catalog::{KeyRange, KeyType, RoutingFunction, ShardId, Span};
use hotrepart_tests::*;

const FUNC: RoutingFunction = RoutingFunction::PgHash { seed: 7 };
const RANGE: Span = Span {
    lo: 1 << 62,
    hi: Some(3 << 62),
};

fn table() -> TableMove {
    TableMove {
        name: "items".into(),
        key_column: "id".into(),
        key_type: KeyType::Int8,
        function: FUNC,
    }
}

fn pred() -> String {
    KeyRange::active(RANGE.lo, RANGE.hi, ShardId::new("x").unwrap())
        .sql_predicate(&FUNC.sql_hash(KeyType::Int8, "\"id\"").unwrap())
}

async fn ids(c: &tokio_postgres::Client, q: &str) -> Vec<i64> {
    c.query(q, &[])
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn drain(sess: &mut Session, keys: &mut Touched) {
    for _ in 0..100 {
        if sess.catch_up(1000, Some(&mut *keys)).await.unwrap().drained {
            return;
        }
    }
    panic!("the catch-up does not drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_then_recheck_touched_keys() {
    let dir = TestDir::new("reshard-verify");
    let a = start_pg(&dir.0.join("source"));
    let b = start_pg(&dir.0.join("target"));
    let src = connect(&a.dsn()).await.unwrap();
    let dst = connect(&b.dsn()).await.unwrap();
    src.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO items SELECT g, 'v' || g, g FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let spec = MoveSpec {
        job: "verify1".into(),
        source_dsn: a.dsn(),
        target_dsn: b.dsn(),
        database: "postgres".into(),
        tables: vec![table()],
        range: RANGE,
        functions: Default::default(),
        guard: reshard::OwnerGuard::new(|_| Ok(())),
    };
    reshard::check_preconditions(&spec).await.unwrap();
    reshard::start_capture(&spec).await.unwrap();
    reshard::copy(&spec, |_| {}).await.unwrap();

    let p = pred();
    let inside = ids(
        &src,
        &format!("SELECT id FROM items WHERE {p} ORDER BY id LIMIT 5"),
    )
    .await;
    let outside = ids(
        &src,
        &format!("SELECT id FROM items WHERE NOT {p} ORDER BY id LIMIT 1"),
    )
    .await;
    let fresh = ids(
        &src,
        &format!("SELECT id FROM (SELECT g::int8 AS id FROM generate_series(6000, 7000) g) s WHERE {p} LIMIT 1"),
    )
    .await;
    let in_range: i64 = src
        .query_one(&format!("SELECT count(*) FROM items WHERE {p}"), &[])
        .await
        .unwrap()
        .get(0);
    let (k1, k2, k4, k5, o1, new) = (
        inside[0], inside[1], inside[3], inside[4], outside[0], fresh[0],
    );

    // Differences made before the comparison: one row changed, one missing.
    dst.batch_execute(&format!(
        "UPDATE items SET v = 'bad' WHERE id = {k5}; DELETE FROM items WHERE id = {k4}"
    ))
    .await
    .unwrap();
    let mut sess = Session::open(&spec).await.unwrap();
    let mut touched = Touched::new(&spec);
    let base = sess.compare().await.unwrap();
    assert_eq!(base.source_rows, in_range as u64);
    assert_eq!(base.target_rows, in_range as u64 - 1);
    assert_eq!(base.mismatched.len(), 2, "{base:?}");

    // Writes on the source after the comparison: three in the range, one
    // outside; the catch-up records the three keys only.
    src.batch_execute(&format!(
        "UPDATE items SET n = -1 WHERE id = {k1}; DELETE FROM items WHERE id = {k2};
         INSERT INTO items (id, v, n) VALUES ({new}, 'new', 0); UPDATE items SET n = -1 WHERE id = {o1}"
    ))
    .await
    .unwrap();
    drain(&mut sess, &mut touched).await;
    assert_eq!(touched.len(), 3, "{touched:?}");

    let mut keys = touched.clone();
    keys.extend(&base.mismatched);
    let v = sess.verify_keys(&keys).await.unwrap();
    assert_eq!(v.keys, 5);
    assert_eq!(v.differing_count, 2, "{v:?}");
    assert!(!v.equal());
    let listed = v.differing.join(" ");
    assert!(
        listed.contains(&k4.to_string()) && listed.contains(&k5.to_string()),
        "{listed}"
    );
    // The next round rechecks exactly these (plus what is written meanwhile).
    assert_eq!(v.differing_keys.len(), 2);
    let again = sess.verify_keys(&v.differing_keys).await.unwrap();
    assert_eq!((again.keys, again.differing_count), (2, 2));

    // Repair the two rows: equal, and the full verification agrees.
    for k in [k4, k5] {
        let row = src
            .query_one("SELECT v, n FROM items WHERE id = $1", &[&k])
            .await
            .unwrap();
        let (v, n): (String, i32) = (row.get(0), row.get(1));
        dst.execute(
            "INSERT INTO items (id, v, n) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET v = $2, n = $3",
            &[&k, &v, &n],
        )
        .await
        .unwrap();
    }
    let v = sess.verify_keys(&keys).await.unwrap();
    assert!(v.equal(), "{v:?}");
    assert_eq!(v.source_rows, 4, "k2 was deleted: {v:?}");
    assert_eq!(v.target_rows, 4, "{v:?}");
    assert!(reshard::verify(&spec).await.unwrap().equal());

    // A wrong value on a touched key (as a catch-up bug would leave) is
    // caught by the recheck.
    dst.execute("UPDATE items SET n = 42 WHERE id = $1", &[&k1])
        .await
        .unwrap();
    let v = sess.verify_keys(&keys).await.unwrap();
    assert_eq!(v.differing_count, 1, "{v:?}");
    // Nothing recorded, nothing rechecked.
    let v = sess.verify_keys(&Touched::new(&spec)).await.unwrap();
    assert!(v.equal() && v.keys == 0);

    drop(sess);
    reshard::stop_capture(&spec).await.unwrap();
}
