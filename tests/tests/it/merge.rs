//! Differential tests of RUN ON ALL merging: the same rows in one plain
//! PostgreSQL database and, through hotrepart, spread over 4 shards; every
//! query must give the same answer both ways (in order where it orders), or
//! be refused with the documented SQLSTATE.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::merge_data::{differential, insert_sql, rows, Rows, SCHEMA};
use hotrepart_tests::*;
use tokio_postgres::types::{FromSql, Type};

/// A value's binary form, whatever its type.
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

type BinaryRows = (Vec<Type>, Vec<Vec<Option<Raw>>>);

/// Column types and binary values of a query in the extended protocol
/// (tokio-postgres asks for binary results).
async fn binary_rows(
    db: &tokio_postgres::Client,
    sql: &str,
) -> Result<BinaryRows, tokio_postgres::Error> {
    let st = db.prepare(sql).await?;
    let types = st.columns().iter().map(|c| c.type_().clone()).collect();
    let rows = db.query(&st, &[]).await?;
    Ok((
        types,
        rows.iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Option<Raw>>(i)).collect())
            .collect(),
    ))
}

/// `sql` answers rows through the node, the same as through the reference
/// PostgreSQL, and some.
async fn same_answer(reference: &tokio_postgres::Client, node: &tokio_postgres::Client, sql: &str) {
    let want = rows(reference, sql)
        .await
        .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
    let got = rows(node, sql)
        .await
        .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
    assert!(!want.is_empty(), "{sql}");
    assert_eq!(got, want, "{sql}");
}

/// [`same_answer`] in the extended protocol: prepared under a name, then
/// bound (tokio-postgres), values compared in binary.
async fn same_answer_extended(
    reference: &tokio_postgres::Client,
    node: &tokio_postgres::Client,
    sql: &str,
) {
    let want = binary_rows(reference, sql)
        .await
        .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
    let got = binary_rows(node, sql)
        .await
        .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
    assert!(!want.1.is_empty(), "{sql}");
    assert_eq!(got, want, "{sql}");
}

/// The read queries, each either answered identically or refused.
fn queries() -> (Vec<String>, Vec<(String, &'static str)>) {
    let mut q = Vec::new();
    let aggs = [
        "count(*)",
        "count(qty)",
        "sum(qty)",
        "sum(price)",
        "min(price)",
        "max(price)",
        "avg(qty)",
        "avg(price)",
        "min(cat)",
        "max(cat)",
        "bool_and(flag)",
        "bool_or(flag)",
        "min(ts)",
        "max(d)",
        "sum(id)",
        "avg(id)",
        "max(ts)",
        "sum(f)",
        "avg(f)",
        "max(f)",
    ];
    for a in aggs {
        q.push(format!("SELECT {a} FROM items"));
        q.push(format!(
            "SELECT grp, {a} FROM items GROUP BY grp ORDER BY grp"
        ));
        q.push(format!(
            "SELECT cat, {a} FROM items GROUP BY cat ORDER BY cat DESC NULLS LAST"
        ));
        q.push(format!(
            "SELECT grp, flag, {a} FROM items GROUP BY grp, flag ORDER BY grp NULLS FIRST, flag"
        ));
    }
    for a in [
        "count(*)",
        "sum(qty)",
        "avg(price)",
        "max(price)",
        "min(cat)",
    ] {
        q.push(format!(
            "SELECT grp, {a} AS v FROM items GROUP BY grp ORDER BY v DESC, grp LIMIT 4"
        ));
        q.push(format!(
            "SELECT grp, {a} FROM items WHERE qty > 5 GROUP BY grp ORDER BY grp OFFSET 2"
        ));
    }
    for h in [
        "count(*) > 40",
        "sum(qty) >= 400",
        "avg(price) < 240",
        "max(price) > 490 AND min(qty) = 0",
        "NOT (count(*) < 45)",
        "sum(qty) IS NOT NULL OR count(*) = 0",
        "max(cat) = 'fig'",
        "bool_or(flag) = true",
    ] {
        q.push(format!(
            "SELECT grp, count(*) FROM items GROUP BY grp HAVING {h} ORDER BY grp"
        ));
    }
    q.push("SELECT grp FROM items GROUP BY grp HAVING sum(qty) > 300 ORDER BY grp".into());
    for col in ["grp", "cat", "price", "qty", "f", "ts", "d", "u", "flag"] {
        for dir in ["", " DESC", " NULLS FIRST", " DESC NULLS LAST"] {
            q.push(format!(
                "SELECT id, {col} FROM items ORDER BY {col}{dir}, id"
            ));
        }
        q.push(format!(
            "SELECT id, {col} FROM items ORDER BY {col} DESC, id LIMIT 7 OFFSET 3"
        ));
    }
    q.push("SELECT id FROM items ORDER BY price, qty DESC, id LIMIT 10".into());
    q.push("SELECT cat FROM items ORDER BY price DESC NULLS LAST, id LIMIT 5".into());
    q.push("SELECT * FROM items ORDER BY id LIMIT 20".into());
    q.push("SELECT id, qty * 2 AS dbl FROM items ORDER BY dbl DESC, id LIMIT 15".into());
    q.push("SELECT id FROM items ORDER BY id OFFSET 990".into());
    q.push("SELECT DISTINCT grp FROM items ORDER BY grp".into());
    q.push("SELECT DISTINCT cat, flag FROM items ORDER BY cat, flag".into());
    q.push("SELECT DISTINCT qty FROM items WHERE qty < 5 ORDER BY qty DESC".into());
    q.push("SELECT DISTINCT grp FROM items ORDER BY grp LIMIT 3".into());
    q.push("SELECT id, cat FROM items WHERE grp = 3 ORDER BY id".into());
    q.push("SELECT count(*) FROM items WHERE cat IS NULL".into());
    q.push(
        "SELECT count(*), sum(qty), avg(qty), min(price), max(price) FROM items WHERE grp > 2"
            .into(),
    );
    q.push("SELECT count(*) FROM items WHERE id < 0".into());
    q.push("SELECT sum(qty), avg(price) FROM items WHERE id < 0".into());
    q.push("SELECT count(DISTINCT qty) FROM items".into());
    q.push("SELECT grp, count(DISTINCT cat), count(DISTINCT price) FROM items GROUP BY grp ORDER BY grp".into());
    q.push("SELECT grp FROM items UNION SELECT qty FROM items ORDER BY 1".into());
    let refused = vec![
        ("SELECT sum(DISTINCT qty) FROM items".to_string(), "0A000"),
        (
            "SELECT id, rank() OVER (ORDER BY qty) FROM items".to_string(),
            "0A000",
        ),
        (
            "SELECT grp FROM items INTERSECT SELECT qty FROM items".to_string(),
            "0A000",
        ),
        (
            "SELECT string_agg(cat, ',' ORDER BY cat) FROM items".to_string(),
            "0A000",
        ),
        ("SELECT max(id) + 1 FROM items".to_string(), "0A000"),
    ];
    (q, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_answers_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("items").await;
    reference.batch_execute(SCHEMA).await.unwrap();
    node.batch_execute(SCHEMA).await.unwrap();
    for sql in insert_sql(42, 1000) {
        reference.batch_execute(&sql).await.unwrap();
        node.batch_execute(&sql).await.unwrap();
    }
    let (queries, refused) = queries();
    assert!(
        queries.len() + refused.len() >= 150,
        "{} queries",
        queries.len() + refused.len()
    );
    let mut failures = Vec::new();
    for sql in &queries {
        let want = rows(&reference, sql)
            .await
            .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
        match rows(&node, sql).await {
            Ok(got) if got == want => {}
            Ok(mut got) => {
                // Without ORDER BY only the multiset matters.
                let mut want = want.clone();
                if !sql.contains("ORDER BY") {
                    got.sort();
                    want.sort();
                    if got == want {
                        continue;
                    }
                }
                let first = got.iter().zip(&want).position(|(a, b)| a != b);
                failures.push(format!(
                    "{sql}\n  got {} rows, want {}; first difference at {first:?}: got {:?} want {:?}",
                    got.len(),
                    want.len(),
                    first.and_then(|i| got.get(i)),
                    first.and_then(|i| want.get(i))
                ));
            }
            Err(e) => failures.push(format!(
                "{sql}\n  refused: {:?}",
                e.as_db_error().map(|d| (d.code().code(), d.message()))
            )),
        }
    }
    // The same queries in the extended protocol with binary results (what
    // tokio-postgres asks for): the merged values converted to binary must
    // be PostgreSQL's own binary values.
    for sql in &queries {
        let want = binary_rows(&reference, sql)
            .await
            .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
        match binary_rows(&node, sql).await {
            Ok(got) if got == want => {}
            Ok((types, mut got)) => {
                let (want_types, mut want) = want;
                if !sql.contains("ORDER BY") && types == want_types {
                    got.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
                    want.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
                    if got == want {
                        continue;
                    }
                }
                let first = got.iter().zip(&want).position(|(a, b)| a != b);
                failures.push(format!(
                    "extended: {sql}\n  types {types:?} want {want_types:?}; got {} rows, want {}; first difference at {first:?}: got {:?} want {:?}",
                    got.len(),
                    want.len(),
                    first.and_then(|i| got.get(i)),
                    first.and_then(|i| want.get(i))
                ));
            }
            Err(e) => failures.push(format!(
                "extended: {sql}\n  refused: {:?}",
                e.as_db_error().map(|d| (d.code().code(), d.message()))
            )),
        }
    }
    for (sql, code) in &refused {
        match binary_rows(&node, sql).await {
            Err(e) if e.code().map(|c| c.code()) == Some(code) => {}
            other => failures.push(format!(
                "extended: {sql}\n  expected refusal {code}, got {:?}",
                other.map(|r| r.1.len())
            )),
        }
        match rows(&node, sql).await {
            Err(e) if e.code().map(|c| c.code()) == Some(code) => {}
            other => failures.push(format!(
                "{sql}\n  expected refusal {code}, got {:?}",
                other.map(|r| r.len())
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries differ:\n{}",
        failures.len(),
        queries.len() + refused.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_groups_is_an_error_not_unbounded_memory() {
    let (_c, db) = items_cluster(2, "max_merge_rows = 50", 7, 300).await;
    let e = rows(
        &db,
        "SELECT id + 0 AS k, count(*) FROM items GROUP BY id + 0 ORDER BY 1",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "54000", "{e:?}");
    // grouped by the shard key the groups are whole on the shards: the
    // rows stream through the k-way merge
    let r = rows(
        &db,
        "SELECT id, count(*) FROM items GROUP BY id ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(r.len(), 300);
    // a streaming ORDER BY … LIMIT needs no such memory
    let r = rows(&db, "SELECT id FROM items ORDER BY id DESC LIMIT 5")
        .await
        .unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(r[0][0].as_deref(), Some("300"));
    // the session is fine afterwards
    assert_eq!(
        rows(&db, "SELECT count(*) FROM items").await.unwrap()[0][0].as_deref(),
        Some("300")
    );
}

/// Issue 17: a merge holding more than `max_merge_bytes` of values fails
/// with 53200 (out of memory) before growing further; under the limit the
/// same merge answers; the session and the node go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_bytes_is_an_error_not_unbounded_memory() {
    let (_c, db) = items_cluster(2, "max_merge_bytes = 20000", 7, 300).await;
    // DISTINCT over wide values: 300 rows of ~200 bytes held to deduplicate
    // (not by the key itself: DISTINCT rows showing it are each shard's).
    let e = rows(
        &db,
        "SELECT DISTINCT id + 0, repeat('x', 200) FROM items ORDER BY 1",
    )
    .await
    .unwrap_err();
    let d = e.as_db_error().unwrap();
    assert_eq!(d.code().code(), "53200", "{e:?}");
    assert!(
        d.message().contains("max_merge_bytes = 20000"),
        "{}",
        d.message()
    );
    // Narrow values fit: the same shape answers exactly.
    let r = rows(&db, "SELECT DISTINCT id % 10 FROM items ORDER BY 1")
        .await
        .unwrap();
    assert_eq!(r.len(), 10);
    assert_eq!(
        rows(&db, "SELECT count(*) FROM items").await.unwrap()[0][0].as_deref(),
        Some("300")
    );
}

/// Extended protocol: LIMIT/OFFSET as parameters, HAVING parameters and a
/// negative LIMIT refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_limit_offset_parameters() {
    let (_c, db) = items_cluster(4, "", 9, 400).await;
    let ids: Vec<i64> = step(
        "LIMIT/OFFSET parameters",
        db.query(
            "SELECT id FROM items WHERE id > $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
            &[&100i64, &5i64, &3i64],
        ),
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert_eq!(ids, [397, 396, 395, 394, 393]);
    // A parameter in HAVING: as the same query with the value written in.
    let got: Vec<(i32, i64)> = step(
        "HAVING parameter",
        db.query(
            "SELECT grp, count(*) FROM items GROUP BY grp HAVING count(*) > $1 ORDER BY grp",
            &[&40i64],
        ),
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let want: Vec<(i32, i64)> = db
        .query(
            "SELECT grp, count(*) FROM items GROUP BY grp HAVING count(*) > 40 ORDER BY grp",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);
    let e = step(
        "negative LIMIT",
        db.query("SELECT id FROM items ORDER BY id LIMIT $1", &[&-1i64]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22023", "{e:?}");
}

/// An error on one shard cancels the statement on the others (which would
/// sleep 10 s per row) and reaches the client once, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_on_one_shard_cancels_the_others() {
    let (c, db) = items_cluster(4, "", 9, 400).await;
    // Shard 0 fails at its first row; the others would sleep 10 s per row.
    let p0 = c.shards[0].port;
    let sql = format!(
        "SELECT count(*) FROM items WHERE \
         1 / (CASE WHEN current_setting('port') = '{p0}' THEN 0 ELSE 1 END) = 1 \
         AND pg_sleep(CASE WHEN current_setting('port') = '{p0}' THEN 0 ELSE 10 END) IS NOT NULL"
    );
    // The same filter without the aggregate: concatenated, not merged.
    let concat = sql.replace("SELECT count(*) FROM", "SELECT id FROM");
    for round in 0..12 {
        let start = std::time::Instant::now();
        let e = match round % 4 {
            3 => step(
                "error on one shard (concatenation, extended)",
                db.query(&concat, &[]),
            )
            .await
            .map(|_| ())
            .unwrap_err(),
            0 => step("error on one shard (merge, extended)", db.query(&sql, &[]))
                .await
                .map(|_| ())
                .unwrap_err(),
            1 => step("error on one shard (merge, simple)", db.simple_query(&sql))
                .await
                .map(|_| ())
                .unwrap_err(),
            _ => step(
                "error on one shard (concatenation, simple)",
                db.simple_query(&concat),
            )
            .await
            .map(|_| ())
            .unwrap_err(),
        };
        let took = start.elapsed();
        assert_eq!(e.code().unwrap().code(), "22012", "{e:?}");
        assert!(
            took < std::time::Duration::from_secs(5),
            "the other shards were not cancelled: {took:?}"
        );
        // the session goes on, and no shard still runs the statement
        let r = step(
            "count after the error",
            rows(&db, "SELECT count(*) FROM items"),
        )
        .await
        .unwrap();
        assert_eq!(r[0][0].as_deref(), Some("400"));
        for i in 0..4 {
            let d = c.direct(i).await;
            let busy: i64 = d
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' AND state = 'active' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(busy, 0, "shard {i} still runs the statement");
        }
    }
}

/// EXPLAIN says where a statement runs and how it is merged, then shows
/// each shard's own plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_shards_and_merge() {
    let (c, db) = items_cluster(4, "", 3, 100).await;
    let plan = |r: Rows| -> Vec<String> { r.into_iter().map(|l| l[0].clone().unwrap()).collect() };
    // one shard: the owner of id 5 (the one whose rows include it)
    let mut owner = None;
    for i in 0..4 {
        let n: i64 = c
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM items WHERE id = 5", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            owner = Some(i);
        }
    }
    let owner = owner.expect("id 5 is on some shard");
    let p = plan(
        rows(&db, "EXPLAIN SELECT * FROM items WHERE id = 5")
            .await
            .unwrap(),
    );
    assert_eq!(
        p[0],
        format!("hotrepart: RUN ON ONE shard s{owner}"),
        "{p:#?}"
    );
    assert!(p[1].contains("Scan"), "{p:#?}");
    // several shards, merged
    let p = plan(
        rows(
            &db,
            "EXPLAIN (COSTS OFF) SELECT grp, count(*), avg(qty) FROM items GROUP BY grp ORDER BY grp LIMIT 3",
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        p[0], "hotrepart: RUN ON ALL: 4 shards (s0, s1, s2, s3)",
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.contains("partial aggregate(s) from every shard combined by group")),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|l| l.contains("avg computed as sum / count")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("hotrepart: each shard runs: SELECT")),
        "{p:#?}"
    );
    for i in 0..4 {
        let at = p
            .iter()
            .position(|l| *l == format!("hotrepart: shard s{i}:"))
            .unwrap_or_else(|| panic!("no plan of s{i}: {p:#?}"));
        assert!(p[at + 1].starts_with("  "), "{p:#?}");
    }
    // concatenation, and EXPLAIN ANALYZE of a read
    let p = plan(
        rows(&db, "EXPLAIN ANALYZE SELECT id FROM items WHERE qty > 0")
            .await
            .unwrap(),
    );
    assert!(
        p.iter()
            .any(|l| l == "hotrepart: answers concatenated (no merge needed)"),
        "{p:#?}"
    );
    assert!(p.iter().any(|l| l.contains("actual time")), "{p:#?}");
    // refused: other formats across shards, ANALYZE of a multi-shard write
    for sql in [
        "EXPLAIN (FORMAT JSON) SELECT * FROM items",
        "EXPLAIN ANALYZE UPDATE items SET qty = 1",
    ] {
        let e = rows(&db, sql).await.unwrap_err();
        assert_eq!(e.code().unwrap().code(), "0A000", "{sql}: {e:?}");
    }
    // a single-shard JSON plan passes through untouched
    let p = plan(
        rows(
            &db,
            "EXPLAIN (FORMAT JSON) SELECT * FROM items WHERE id = 5",
        )
        .await
        .unwrap(),
    );
    assert!(p[0].trim_start().starts_with('['), "{p:#?}");
    // an error from the shard reaches the client; the session goes on
    let e = rows(&db, "EXPLAIN SELECT nope FROM items")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42703", "{e:?}");
    let r = rows(&db, "SELECT count(*) FROM items").await.unwrap();
    assert_eq!(r[0][0].as_deref(), Some("100"));
    // the UPDATE was not run
    let r = rows(&db, "SELECT count(*) FROM items WHERE qty = 1")
        .await
        .unwrap();
    let before: i64 = r[0][0].as_deref().unwrap().parse().unwrap();
    assert!(before < 100);
}

/// `shards` shards and a node (extra config lines `extra`) holding `items`
/// sharded by `id`, with `n` rows of `insert_sql(seed, n)`.
async fn items_cluster(
    shards: usize,
    extra: &str,
    seed: u64,
    n: usize,
) -> (Cluster, tokio_postgres::Client) {
    let c = Cluster::start(Opts {
        shards,
        extra: extra.into(),
        tail: "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    let db = c.connect().await;
    db.batch_execute(SCHEMA).await.unwrap();
    for sql in insert_sql(seed, n) {
        db.batch_execute(&sql).await.unwrap();
    }
    (c, db)
}

/// Awaits `f` for at most 30 s: a hang fails the test with its name.
async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 30 s"))
}

/// `count(DISTINCT x)` of a column that is not the shard key (Django's
/// `Count(…, distinct=True)`, Sequelize's `count({distinct: true, col})`)
/// over 4 shards: the shards group by `x` too, the node counts each
/// group's distinct values as GROUP BY compares them — the same answers
/// as one PostgreSQL, with or without GROUP BY, HAVING, ORDER BY, LIMIT,
/// beside other aggregates, NULLs left out, numerics equal by value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_counts_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int)";
    reference.batch_execute(schema).await.unwrap();
    reference
        .batch_execute(
            "INSERT INTO events SELECT i % 37, i, (i * 7919) % 23 FROM generate_series(1, 600) i",
        )
        .await
        .unwrap();
    node.batch_execute(schema).await.unwrap();
    let values: Vec<String> = (1..=600)
        .map(|i: i64| format!("({}, {i}, {})", i % 37, (i * 7919) % 23))
        .collect();
    node.batch_execute(&format!(
        "INSERT INTO events (id, seq, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let queries = [
        "SELECT count(DISTINCT v) FROM events",
        "SELECT count(DISTINCT v) FROM events WHERE id < 0",
        "SELECT count(DISTINCT v), count(DISTINCT seq % 10), count(*), sum(seq) FROM events",
        "SELECT id % 5 AS g, count(DISTINCT v), count(*), sum(seq), avg(seq), max(v) FROM events GROUP BY 1 ORDER BY 1",
        "SELECT v, count(DISTINCT id % 7) AS n FROM events GROUP BY v HAVING count(DISTINCT id % 7) > 3 ORDER BY n DESC, v LIMIT 5",
        "SELECT count(DISTINCT NULLIF(v, 3)), count(DISTINCT 't' || v) FROM events",
        "SELECT count(DISTINCT CASE WHEN seq % 2 = 0 THEN 1.0 ELSE 1.00 END) FROM events",
        "SELECT v % 3 AS k, count(DISTINCT id) AS ids, count(DISTINCT seq / 100) FROM events GROUP BY 1 ORDER BY 2 DESC, 1",
        // FILTER: counted where the condition is true (not NULL, not false).
        "SELECT count(DISTINCT v) FILTER (WHERE seq % 2 = 0), count(DISTINCT v) FILTER (WHERE v > 10 OR NULL), count(*) FROM events",
        "SELECT id % 4 AS g, count(DISTINCT v) FILTER (WHERE seq > 300) AS late, count(DISTINCT id) FILTER (WHERE v < 5) FROM events GROUP BY 1 ORDER BY 1",
        "SELECT count(DISTINCT v) FILTER (WHERE seq < 0) FROM events",
    ];
    for sql in queries {
        same_answer(&reference, &node, sql).await;
        let (ws, gs) = (
            reference.prepare(sql).await.unwrap(),
            node.prepare(sql).await.unwrap(),
        );
        let cols = |s: &tokio_postgres::Statement| {
            s.columns()
                .iter()
                .map(|c| (c.name().to_owned(), c.type_().clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(cols(&gs), cols(&ws), "{sql}");
    }
    // Binary results (tokio-postgres asks for them).
    let n: i64 = node
        .query_one(
            "SELECT count(DISTINCT v) FROM events WHERE seq > $1",
            &[&100i32],
        )
        .await
        .unwrap()
        .get(0);
    let want: i64 = reference
        .query_one(
            "SELECT count(DISTINCT v) FROM events WHERE seq > $1",
            &[&100i32],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, want);
}

/// `count(…)` cast to a type (`count(*)::int`, which node-postgres users
/// write so that a count is a number, not a string) over 4 shards: the
/// same values and column types as one PostgreSQL, in text and binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_cast_to_a_type_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int)";
    reference.batch_execute(schema).await.unwrap();
    reference
        .batch_execute(
            "INSERT INTO events SELECT i % 37, i, (i * 7919) % 23 FROM generate_series(1, 600) i",
        )
        .await
        .unwrap();
    node.batch_execute(schema).await.unwrap();
    let values: Vec<String> = (1..=600)
        .map(|i: i64| format!("({}, {i}, {})", i % 37, (i * 7919) % 23))
        .collect();
    node.batch_execute(&format!(
        "INSERT INTO events (id, seq, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let queries = [
        "SELECT count(*)::int FROM events",
        "SELECT count(*)::int AS total FROM events WHERE id < 0",
        "SELECT v, count(*)::int AS n, count(id)::numeric, count(*)::float8, count(*)::text, CAST(count(*) AS smallint), count(*)::bigint FROM events GROUP BY v ORDER BY v",
        "SELECT v, count(*)::integer AS n FROM events GROUP BY v HAVING count(*) > 25 ORDER BY n DESC, v LIMIT 5",
        // Django's Coalesce(Sum(…), 0): 0 from the shards without rows.
        "SELECT coalesce(sum(v), 0), COALESCE(SUM(seq::numeric / 4), 0) AS q, coalesce(count(v), 0) FROM events",
        "SELECT coalesce(sum(v), 0) AS total, coalesce(sum(v * 1.5), 0) FROM events WHERE id < 0",
        "SELECT id % 3 AS g, coalesce(sum(v), 0) AS total FROM events WHERE id < 9 OR v IS NULL GROUP BY 1 ORDER BY total DESC",
    ];
    for sql in queries {
        same_answer(&reference, &node, sql).await;
        // The extended protocol: the column types PostgreSQL gives, values
        // in binary where tokio-postgres asks for it.
        let (ws, gs) = (
            reference.prepare(sql).await.unwrap(),
            node.prepare(sql).await.unwrap(),
        );
        let types = |s: &tokio_postgres::Statement| {
            s.columns()
                .iter()
                .map(|c| c.type_().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(types(&gs), types(&ws), "{sql}");
    }
    let n: i32 = node
        .query_one("SELECT count(*)::int FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 600);
    let r = node
        .query_one(
            "SELECT count(*)::smallint, count(*)::float8, count(*)::text FROM events WHERE v = 3",
            &[],
        )
        .await
        .unwrap();
    let want = reference
        .query_one(
            "SELECT count(*)::smallint, count(*)::float8, count(*)::text FROM events WHERE v = 3",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i16>(0), want.get::<_, i16>(0));
    assert_eq!(r.get::<_, f64>(1), want.get::<_, f64>(1));
    assert_eq!(r.get::<_, String>(2), want.get::<_, String>(2));
}

/// Window functions partitioned by the shard key and `count`/`sum`/`avg`
/// of `DISTINCT` key values over 4 shards: the same answers as one
/// PostgreSQL (a key value's rows are all on one shard, which computes its
/// partitions; the shards' distinct key sets are disjoint). Other windows
/// and DISTINCT aggregates stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_by_the_key_and_distinct_keys_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int)";
    let data =
        "INSERT INTO events SELECT i % 37, i, (i * 7919) % 23 FROM generate_series(1, 600) i";
    reference.batch_execute(schema).await.unwrap();
    reference.batch_execute(data).await.unwrap();
    node.batch_execute(schema).await.unwrap();
    // The node cannot split INSERT … SELECT: the same rows by VALUES.
    let values: Vec<String> = (1..=600)
        .map(|i: i64| format!("({}, {i}, {})", i % 37, (i * 7919) % 23))
        .collect();
    node.batch_execute(&format!(
        "INSERT INTO events (id, seq, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let queries = [
        "SELECT id, seq, row_number() OVER (PARTITION BY id ORDER BY seq DESC), sum(v) OVER (PARTITION BY id) FROM events ORDER BY id, seq",
        "SELECT id, seq, lag(v) OVER (w ORDER BY seq), rank() OVER (w ORDER BY v, seq) AS r FROM events WINDOW w AS (PARTITION BY id) ORDER BY r DESC, id, seq LIMIT 7",
        "SELECT id, seq, first_value(v) OVER (PARTITION BY v, id ORDER BY seq) FROM events WHERE seq > 550 ORDER BY seq",
        "SELECT count(DISTINCT id), sum(DISTINCT id), avg(DISTINCT id) FROM events WHERE v > 3",
        "SELECT v, count(DISTINCT id), count(*) FROM events GROUP BY v ORDER BY v",
        "SELECT v, count(DISTINCT id) AS n FROM events GROUP BY v ORDER BY n DESC, v LIMIT 4",
        "SELECT count(DISTINCT id) FROM events WHERE id < 0",
    ];
    for sql in queries {
        same_answer(&reference, &node, sql).await;
    }
    for sql in [
        "SELECT id, row_number() OVER (PARTITION BY v) FROM events",
        "SELECT sum(DISTINCT v) FROM events",
        "SELECT id, count(*), rank() OVER (PARTITION BY id) FROM events GROUP BY id",
    ] {
        let e = rows(&node, sql).await.unwrap_err();
        let code = e.as_db_error().map(|d| d.code().code().to_string());
        assert_eq!(code.as_deref(), Some("0A000"), "{sql}: {e:?}");
    }
}

/// The reference PostgreSQL and a 4-shard node, each holding `events`
/// (sharded by `id`) with the same 600 rows: id = seq % 37, v = seq * 7919
/// % 23.
async fn events_600() -> (
    tokio_postgres::Client,
    tokio_postgres::Client,
    Cluster,
    hotrepart_tests::merge_data::ReferencePg,
) {
    let (reference, node, c, reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int)";
    let values: Vec<String> = (1..=600)
        .map(|i: i64| format!("({}, {i}, {})", i % 37, (i * 7919) % 23))
        .collect();
    let insert = format!(
        "INSERT INTO events (id, seq, v) VALUES {}",
        values.join(", ")
    );
    for db in [&reference, &node] {
        db.batch_execute(schema).await.unwrap();
        db.batch_execute(&insert).await.unwrap();
    }
    (reference, node, c, reference_pg)
}

/// Aggregates and sorts over a derived table of plain rows of a sharded
/// table — Peewee's `.count()` (`SELECT COUNT(1) FROM (SELECT 1 FROM t) AS
/// "_wrapped" LIMIT $1`), SQLAlchemy's legacy `query.count()`: the derived
/// rows are partitioned by shard as the table's are, so the outer query is
/// merged as if it read the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_over_derived_tables_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    let ordered = [
        "SELECT COUNT(1) FROM (SELECT 1 FROM \"events\" AS \"t1\" WHERE \"t1\".\"v\" > 3) AS \"_wrapped\" LIMIT 1",
        "SELECT count(*) AS count_1 FROM (SELECT events.id AS events_id, events.seq AS events_seq FROM events) AS anon_1",
        "SELECT max(x), min(x), sum(x), count(*) FROM (SELECT v * 2 AS x FROM events WHERE seq > 10) s",
        "SELECT s.v, count(*), avg(s.seq) FROM (SELECT v, seq FROM events WHERE id < 30) s GROUP BY s.v ORDER BY 1",
        "SELECT s.id, s.seq FROM (SELECT id, seq, v FROM events WHERE v = 3) s ORDER BY s.seq DESC LIMIT 5",
        "SELECT count(*) FROM (SELECT id FROM events WHERE id = 5) s",
    ];
    for sql in ordered {
        same_answer(&reference, &node, sql).await;
    }
    // The extended protocol, as Peewee's count() through psycopg's
    // server-side binding would send it.
    let sql =
        "SELECT COUNT(1) FROM (SELECT 1 FROM events AS t1 WHERE t1.seq > $1) AS _wrapped LIMIT $2";
    let got: i64 = node.query_one(sql, &[&100i32, &1i64]).await.unwrap().get(0);
    let want: i64 = reference
        .query_one(sql, &[&100i32, &1i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, want);
    assert_eq!(got, 500);
    // Parameters in HAVING of a merged GROUP BY (SQLAlchemy's
    // `.having(func.count() > 5)` with server-side binding), binary
    // integers and text.
    let pairs = |rs: Vec<tokio_postgres::Row>| -> Vec<(String, i64)> {
        rs.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    for (sql, a, b) in [
        (
            "SELECT v::text, count(*) FROM events GROUP BY v HAVING count(*) > $1 AND $2::int4 < max(seq) ORDER BY v",
            26i64,
            590i32,
        ),
        (
            "SELECT v::text, sum(seq) FROM events GROUP BY v HAVING sum(seq) >= $1 OR max(seq) < $2 ORDER BY 1",
            8000i64,
            560i32,
        ),
    ] {
        let got = pairs(node.query(sql, &[&a, &b]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        let want = pairs(reference.query(sql, &[&a, &b]).await.unwrap());
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(got, want, "{sql}");
    }
    // A string compared with a number (a literal, or a parameter of no
    // type, as node-postgres sends them): read as the number's type reads
    // it where the node can do so exactly; what PostgreSQL would refuse
    // (out of the type's range, not a number) stays an error.
    for sql in [
        "SELECT v::text, count(*) FROM events GROUP BY v HAVING count(*) > ' 26 ' ORDER BY v",
        "SELECT v::text, sum(seq) FROM events GROUP BY v HAVING sum(seq) >= '8000' ORDER BY 1",
        "SELECT v::text, avg(seq) FROM events GROUP BY v HAVING avg(seq) < '+300.5' ORDER BY 1",
    ] {
        let want = rows(&reference, sql).await.unwrap();
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(rows(&node, sql).await.unwrap(), want, "{sql}");
    }
    for sql in [
        "SELECT v::text FROM events GROUP BY v HAVING max(seq) < '99999999999'",
        "SELECT v::text FROM events GROUP BY v HAVING count(*) > '2.5'",
        "SELECT v::text FROM events GROUP BY v HAVING count(*) > 'many'",
    ] {
        assert!(rows(&reference, sql).await.is_err(), "{sql}");
        assert!(
            rows(&node, sql).await.is_err(),
            "{sql} answered where PostgreSQL refuses"
        );
    }
    // A real (float4) aggregate against a number: PostgreSQL compares it
    // in float4 or float8 depending on the other side's type ('0.30000001'
    // equals 0.3::real), which its text does not show: refused rather
    // than answered otherwise.
    let sql = "SELECT v::text FROM events GROUP BY v HAVING max((seq % 10)::real) = '9.0000001'";
    assert!(!rows(&reference, sql).await.unwrap().is_empty(), "{sql}");
    let e = rows(&node, sql).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{sql}: {e:?}");
    let sql =
        "SELECT v::text AS t, count(*) FROM events GROUP BY v::text HAVING v::text > $1 ORDER BY 1";
    let got = pairs(node.query(sql, &[&"17"]).await.unwrap());
    let want = pairs(reference.query(sql, &[&"17"]).await.unwrap());
    assert!(!want.is_empty(), "{sql}");
    assert_eq!(got, want, "{sql}");
    // `coalesce(sum(x), $1::INTEGER)` as SQLAlchemy binds its 0: a
    // partial sum when the value is 0 (also over no rows); another value
    // is refused.
    let sql = "SELECT v::text, coalesce(sum(seq), $1::INTEGER) FROM events WHERE seq > $2 GROUP BY v ORDER BY v";
    for cut in [100i32, 10_000] {
        let got = pairs(
            node.query(sql, &[&0i32, &cut])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}")),
        );
        let want = pairs(reference.query(sql, &[&0i32, &cut]).await.unwrap());
        assert_eq!(got, want, "{sql} with {cut}");
    }
    let sql = "SELECT coalesce(sum(seq), $1::INTEGER) FROM events WHERE seq > $2";
    let got: i64 = node
        .query_one(sql, &[&0i32, &10_000i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, 0);
    let e = node.query_one(sql, &[&5i32, &10_000i32]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
    // SELECT EXISTS (…) alone (SQLAlchemy's exists(), Peewee's .exists()):
    // true when some shard's rows make it true.
    for sql in [
        "SELECT EXISTS (SELECT * FROM events WHERE events.v = 3 AND events.seq > 590) AS anon_1",
        "SELECT EXISTS (SELECT * FROM events WHERE events.v = 3 AND events.seq > 1000) AS anon_1",
        "SELECT EXISTS(SELECT 1 FROM \"events\" AS \"t1\" WHERE (\"t1\".\"seq\" = 77)) LIMIT 1",
        // NOT EXISTS (Knex's `whereNotExists` as a value): true when no
        // shard has a row.
        "SELECT NOT EXISTS (SELECT * FROM events WHERE events.v = 3 AND events.seq > 590) AS e",
        "SELECT NOT EXISTS (SELECT * FROM events WHERE events.v = 3 AND events.seq > 1000) AS e",
        "SELECT NOT EXISTS (SELECT 1 FROM events)",
        // One constant row kept when EXISTS holds (TypeORM's `exists()`):
        // one row when some shard has a match, none otherwise — never one
        // per shard.
        "SELECT 1 AS \"row_exists\" FROM (SELECT 1 AS dummy_column) \"dummy_table\" WHERE EXISTS (SELECT 1 FROM \"events\" \"E\" WHERE \"E\".\"v\" = 3) LIMIT 1",
        "SELECT 1 AS \"row_exists\" FROM (SELECT 1 AS dummy_column) \"dummy_table\" WHERE EXISTS (SELECT 1 FROM \"events\" \"E\" WHERE \"E\".\"seq\" > 1000) LIMIT 1",
        "SELECT 'yes' WHERE EXISTS (SELECT 1 FROM events WHERE v > 1)",
    ] {
        let want = rows(&reference, sql).await.unwrap();
        let got = rows(&node, sql)
            .await
            .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
        assert_eq!(got, want, "{sql}");
    }
    for (seq, want) in [(77i32, true), (7000, false)] {
        let sql = "SELECT EXISTS (SELECT 1 FROM events AS t1 WHERE t1.seq = $1) LIMIT $2";
        let got: bool = node.query_one(sql, &[&seq, &1i64]).await.unwrap().get(0);
        assert_eq!(got, want, "{sql} with {seq}");
    }
    let sql = "SELECT 1 AS \"row_exists\" FROM (SELECT 1 AS dummy_column) \"dummy_table\" WHERE EXISTS (SELECT 1 FROM \"events\" \"E\" WHERE \"E\".\"seq\" > $1) LIMIT 1";
    for (cut, want) in [(10i32, 1usize), (600, 0)] {
        let got = node.query(sql, &[&cut]).await.unwrap();
        assert_eq!(got.len(), want, "{sql} with {cut}");
        assert_eq!(reference.query(sql, &[&cut]).await.unwrap().len(), want);
    }
    // Derived tables that combine rows (each shard would combine only its
    // own) are run first (`subqueries_run_first_equal_one_postgresql`).
    for sql in [
        "SELECT count(*) FROM (SELECT DISTINCT v FROM events) s",
        "SELECT count(*) FROM (SELECT v FROM events LIMIT 5) s",
        "SELECT count(*) FROM (SELECT v, count(*) FROM events GROUP BY v) s",
    ] {
        same_answer(&reference, &node, sql).await;
        same_answer_extended(&reference, &node, sql).await;
    }
}

/// A CTE of plain rows of a sharded table, named once (what query builders
/// and hand-written reports send: `WITH recent AS (SELECT … WHERE …) SELECT
/// count(*) FROM recent`): its rows are partitioned by shard as a derived
/// table's are, so the outer query is merged as if it read the table. A
/// CTE named twice (a self-join, a subquery over it) or that combines rows
/// is refused: each shard would see only its own part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_over_ctes_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    for sql in [
        "WITH x AS (SELECT * FROM events WHERE v > 3) SELECT count(*) FROM x",
        "WITH x AS MATERIALIZED (SELECT v, seq FROM events WHERE id < 30) SELECT x.v, count(*), sum(x.seq), max(x.seq) FROM x GROUP BY x.v ORDER BY 1",
        "WITH x AS (SELECT id, seq FROM events WHERE v = 3) SELECT * FROM x ORDER BY seq DESC LIMIT 5",
        "WITH x AS (SELECT v * 2 AS w, seq FROM events), y AS (SELECT w FROM x WHERE seq > 100) SELECT w, count(*) FROM y GROUP BY w ORDER BY w",
        "WITH x AS (SELECT id FROM events WHERE id = 5) SELECT count(*) FROM x",
    ] {
        same_answer(&reference, &node, sql).await;
    }
    let sql = "WITH x AS (SELECT seq FROM events WHERE seq > $1) SELECT count(*) FROM x";
    let got: i64 = node.query_one(sql, &[&100i32]).await.unwrap().get(0);
    assert_eq!(got, 500);
    for sql in [
        "WITH x AS (SELECT * FROM events) SELECT count(*) FROM x a JOIN x b ON a.v = b.v",
        "WITH x AS (SELECT * FROM events) SELECT count(*) FROM x WHERE seq > (SELECT avg(seq) FROM x)",
    ] {
        // Named twice: the CTE is run first (`session/first.rs`).
        same_answer(&reference, &node, sql).await;
        same_answer_extended(&reference, &node, sql).await;
    }
    for sql in [
        "WITH x AS (SELECT v FROM events LIMIT 5) SELECT count(*) FROM x",
        "WITH x AS (SELECT DISTINCT v FROM events) SELECT count(*) FROM x",
        "WITH x AS (SELECT v, count(*) FROM events GROUP BY v) SELECT count(*) FROM x",
    ] {
        // Each of these reads rows of other shards together: PostgreSQL's
        // answer needs them all. The CTE is run first (`session/first.rs`).
        same_answer(&reference, &node, sql).await;
        same_answer_extended(&reference, &node, sql).await;
    }
    // A CTE named twice, run first.
    same_answer(
        &reference,
        &node,
        "WITH x AS (SELECT * FROM events) SELECT count(*) FROM x a JOIN x b ON a.v = b.v",
    )
    .await;
}

/// Grouped by the shard key (Django's `.annotate()` per parent row,
/// SQLAlchemy's `group_by(Parent.id)`): every group is on one shard, which
/// computes it whole — aggregates the node cannot combine (`array_agg`,
/// `string_agg`, `percentile_cont`), expressions over aggregates, HAVING —
/// and the node merges the shards' rows by ORDER BY, LIMIT, DISTINCT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_by_the_key_equals_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    let ordered = [
        "SELECT id, array_agg(seq ORDER BY seq), string_agg(v::text, ',' ORDER BY seq DESC) FROM events GROUP BY id ORDER BY id",
        "SELECT id, count(*) * 2 AS c, round(avg(v), 2), max(v) - min(v) FROM events GROUP BY id HAVING count(*) > 16 ORDER BY c DESC, id LIMIT 5 OFFSET 1",
        "SELECT id, percentile_cont(0.5) WITHIN GROUP (ORDER BY v), stddev_samp(v::numeric) FROM events WHERE seq > 100 GROUP BY id ORDER BY 2, 1",
        "SELECT events.id, coalesce(max(v), 1) + 1 AS m FROM events GROUP BY events.id, v % 2 ORDER BY m DESC, 1 LIMIT 7",
        "SELECT id, count(*) FROM events GROUP BY id HAVING bool_and(v < 22) ORDER BY sum(v) DESC, id",
    ];
    for sql in ordered {
        same_answer(&reference, &node, sql).await;
    }
    for sql in [
        "SELECT DISTINCT count(*) FROM events GROUP BY id",
        "SELECT id, array_agg(DISTINCT v % 3) FROM events GROUP BY id",
    ] {
        let mut want = rows(&reference, sql).await.unwrap();
        let mut got = rows(&node, sql)
            .await
            .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
        want.sort();
        got.sort();
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(got, want, "{sql}");
    }
    // The extended protocol, a parameter in HAVING (it stays on the shards).
    let sql = "SELECT id, string_agg(v::text, '-' ORDER BY seq) FROM events GROUP BY id HAVING count(*) > $1 ORDER BY id LIMIT $2";
    let pick = |rs: Vec<tokio_postgres::Row>| -> Vec<(i64, String)> {
        rs.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let got = pick(node.query(sql, &[&16i64, &4i64]).await.unwrap());
    let want = pick(reference.query(sql, &[&16i64, &4i64]).await.unwrap());
    assert_eq!(got.len(), 4);
    assert_eq!(got, want);
    // Not grouped by the key: still refused.
    let e = rows(
        &node,
        "SELECT v, array_agg(id ORDER BY id) FROM events GROUP BY v",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
}

/// `SELECT DISTINCT ON (…)` over several shards (Django's
/// `.order_by("v", "-seq").distinct("v")`, "the latest row of each"): every
/// shard keeps the first row of each group in the ORDER BY, the node merges
/// the shards' sorted rows and keeps the first of each group — the rows one
/// PostgreSQL keeps. The orders are total (they end with the unique `seq`)
/// so that PostgreSQL's choice within a group is unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_on_equals_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int, n numeric)";
    reference.batch_execute(schema).await.unwrap();
    node.batch_execute(schema).await.unwrap();
    // v: 0..22 and NULL; n: v as numeric, at two scales (3 and 3.00 are
    // one DISTINCT ON group, shown as its first row has it).
    let values: Vec<String> = (1..=600)
        .map(|i: i64| {
            let v = (i * 7919) % 23;
            let v = if i % 41 == 0 {
                "NULL".to_owned()
            } else {
                v.to_string()
            };
            let n = if i % 2 == 0 {
                format!("{v}::numeric")
            } else {
                format!("round({v}::numeric, 2)")
            };
            format!("({}, {i}, {v}, {n})", i % 37)
        })
        .collect();
    let insert = format!(
        "INSERT INTO events (id, seq, v, n) VALUES {}",
        values.join(", ")
    );
    reference.batch_execute(&insert).await.unwrap();
    node.batch_execute(&insert).await.unwrap();
    let ordered = [
        // By a column that is not the shard key: groups span the shards.
        "SELECT DISTINCT ON (v) v, seq, id FROM events ORDER BY v, seq DESC",
        "SELECT DISTINCT ON (v) seq, id FROM events ORDER BY v DESC NULLS LAST, seq LIMIT 5 OFFSET 2",
        "SELECT DISTINCT ON (v % 4, id % 3) v % 4 AS a, id % 3 AS b, seq FROM events ORDER BY a, b, seq DESC",
        // DISTINCT ON keys the ORDER BY leaves out: sorted by after it.
        "SELECT DISTINCT ON (v % 3, id % 2) v % 3, id % 2 FROM events ORDER BY v % 3",
        // By the shard key: each group on one shard.
        "SELECT DISTINCT ON (id) id, seq, v FROM events ORDER BY id, seq DESC",
        // Numerics equal at different scales are one group.
        "SELECT DISTINCT ON (n) n, seq FROM events ORDER BY n NULLS FIRST, seq",
        // Text, ordered bytewise under the C collation.
        "SELECT DISTINCT ON (v::text) v::text AS t, seq FROM events ORDER BY v::text, seq DESC LIMIT 7",
        "SELECT DISTINCT ON (v) v, seq FROM events WHERE id < 0 ORDER BY v, seq",
    ];
    for sql in ordered {
        let want = rows(&reference, sql)
            .await
            .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
        let got = rows(&node, sql)
            .await
            .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
        assert_eq!(got, want, "{sql}");
    }
    // Without ORDER BY PostgreSQL keeps any row of a group: the same keys.
    let sql = "SELECT DISTINCT ON (v % 5) v % 5 FROM events";
    let mut want = rows(&reference, sql).await.unwrap();
    let mut got = rows(&node, sql).await.unwrap();
    want.sort();
    got.sort();
    assert_eq!(want.len(), 6, "{sql}: {want:?}");
    assert_eq!(got, want, "{sql}");
    // The extended protocol: parameters in WHERE and LIMIT.
    let sql = "SELECT DISTINCT ON (v) v, seq FROM events WHERE seq > $1 ORDER BY v NULLS FIRST, seq LIMIT $2";
    let pick = |rs: Vec<tokio_postgres::Row>| -> Vec<(Option<i32>, i32)> {
        rs.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let got = pick(node.query(sql, &[&100i32, &6i64]).await.unwrap());
    let want = pick(reference.query(sql, &[&100i32, &6i64]).await.unwrap());
    assert_eq!(got.len(), 6);
    assert_eq!(got, want);
    // EXPLAIN says what the node does.
    let plan = rows(
        &node,
        "EXPLAIN SELECT DISTINCT ON (v) v, seq FROM events ORDER BY v, seq",
    )
    .await
    .unwrap();
    let plan: Vec<String> = plan.into_iter().filter_map(|r| r[0].clone()).collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("DISTINCT ON (1 key column(s))")),
        "{plan:#?}"
    );
    // Refused, in words: an ORDER BY PostgreSQL rejects, a merged cursor.
    for (sql, words) in [
        (
            "SELECT DISTINCT ON (v) v, seq FROM events ORDER BY seq, v",
            "DISTINCT ON whose expressions are not the leading ORDER BY keys",
        ),
        (
            "SELECT DISTINCT ON (v) v, count(*) FROM events GROUP BY v",
            "DISTINCT ON in a query with aggregates or GROUP BY",
        ),
    ] {
        let e = rows(&node, sql).await.unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!(db.code().code(), "0A000", "{sql}");
        assert!(db.message().contains(words), "{sql}: {}", db.message());
    }
    node.batch_execute("BEGIN").await.unwrap();
    let e = node
        .batch_execute(
            "DECLARE c CURSOR FOR SELECT DISTINCT ON (v) v, seq FROM events ORDER BY v, seq",
        )
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "0A000");
    assert!(db.message().contains("DISTINCT ON"), "{}", db.message());
    node.batch_execute("ROLLBACK").await.unwrap();
}

/// UNION and UNION ALL over 4 shards (Django's `qs1.union(qs2)`, with
/// `all=True`): the shards run the whole UNION, the node concatenates or
/// removes the rows several shards returned, sorts by result columns and
/// applies LIMIT/OFFSET — the same rows as one PostgreSQL. What the shards'
/// answers together cannot give is refused in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unions_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = differential("events").await;
    let schema = "CREATE TABLE events (id bigint NOT NULL, seq int NOT NULL, v int)";
    reference.batch_execute(schema).await.unwrap();
    reference
        .batch_execute(
            "INSERT INTO events SELECT i % 37, i, (i * 7919) % 23 FROM generate_series(1, 600) i",
        )
        .await
        .unwrap();
    node.batch_execute(schema).await.unwrap();
    let values: Vec<String> = (1..=600)
        .map(|i: i64| format!("({}, {i}, {})", i % 37, (i * 7919) % 23))
        .collect();
    node.batch_execute(&format!(
        "INSERT INTO events (id, seq, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let ordered = [
        // Rows of different shards that are equal: one row each.
        "SELECT v FROM events UNION SELECT v + 1 FROM events WHERE seq > 500 ORDER BY 1",
        "SELECT v % 5 AS r, id % 2 AS p FROM events UNION SELECT seq % 5, 1 FROM events WHERE v = 3 ORDER BY p DESC, r",
        "SELECT v FROM events UNION ALL SELECT seq FROM events WHERE v = 3 ORDER BY v DESC LIMIT 10 OFFSET 5",
        "(SELECT id, v FROM events WHERE seq < 40) UNION ALL (SELECT id, v FROM events WHERE seq > 590) ORDER BY 1, 2",
        "SELECT v FROM events WHERE id < 3 UNION SELECT seq FROM events WHERE seq < 4 UNION VALUES (100), (1) ORDER BY 1 LIMIT 8",
        "SELECT id FROM events WHERE id = 5 UNION ALL SELECT id FROM events WHERE id = 6 ORDER BY 1",
        "SELECT v FROM events WHERE id < 0 UNION SELECT v FROM events WHERE id < 0",
    ];
    for sql in ordered {
        let want = rows(&reference, sql)
            .await
            .unwrap_or_else(|e| panic!("reference failed {sql}: {e:?}"));
        let got = rows(&node, sql)
            .await
            .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
        assert_eq!(got, want, "{sql}");
    }
    // Without ORDER BY: the same rows in some order.
    for sql in [
        "SELECT v FROM events UNION SELECT v * 2 FROM events",
        "SELECT id, v FROM events WHERE seq % 7 = 0 UNION ALL SELECT id, seq FROM events WHERE v = 1",
    ] {
        let mut want = rows(&reference, sql).await.unwrap();
        let mut got = rows(&node, sql)
            .await
            .unwrap_or_else(|e| panic!("node failed {sql}: {e:?}"));
        want.sort();
        got.sort();
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(got, want, "{sql}");
    }
    // The extended protocol, a parameter in the LIMIT.
    let sql =
        "SELECT v FROM events UNION SELECT seq FROM events WHERE seq < 30 ORDER BY 1 DESC LIMIT $1";
    let got: Vec<i32> = node
        .query(sql, &[&4i64])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<i32> = reference
        .query(sql, &[&4i64])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got, want);
    // Django's `qs1.union(qs2).count()`: the UNION in a derived table, run
    // first.
    let sql = "SELECT count(*) FROM (SELECT v FROM events UNION SELECT seq FROM events) s";
    same_answer(&reference, &node, sql).await;
    same_answer_extended(&reference, &node, sql).await;
    // Refused, in words: rows every shard would return, mixed operators,
    // aggregates per branch.
    for (sql, words) in [
        (
            "SELECT v FROM events UNION ALL SELECT 1",
            "UNION ALL branch that reads no sharded table",
        ),
        // One row per shard on its own, different on each.
        (
            "SELECT v FROM events UNION SELECT pg_backend_pid()",
            "only constants",
        ),
        (
            "SELECT v FROM events UNION ALL SELECT v FROM events UNION SELECT seq FROM events",
            "UNION mixed with UNION ALL",
        ),
        (
            "SELECT count(*) FROM events UNION ALL SELECT max(v) FROM events",
            "aggregate function count() in a UNION branch",
        ),
        (
            "SELECT v FROM events INTERSECT SELECT seq FROM events",
            "INTERSECT over several shards",
        ),
    ] {
        let e = rows(&node, sql).await.expect_err(sql);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!(db.code().code(), "0A000", "{sql}: {db:?}");
        assert!(db.message().contains(words), "{sql}: {}", db.message());
    }
}

/// A value of a concatenating aggregate with its elements sorted: the
/// shards' parts come in an order PostgreSQL could have fed the rows in,
/// not necessarily the one it did.
fn elements_sorted(v: &str) -> String {
    let sorted = |parts: Vec<String>| {
        let mut parts = parts;
        parts.sort();
        parts.join("|")
    };
    if let Some(inner) = v.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
        sorted(inner.split(',').map(str::to_string).collect())
    } else if let Some(inner) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        sorted(inner.split(", ").map(str::to_string).collect())
    } else if let Some(hex) = v.strip_prefix("\\x") {
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        sorted(
            bytes
                .split(|&b| b == b';')
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
        )
    } else {
        sorted(v.split(", ").map(str::to_string).collect())
    }
}

/// `array_agg`, `jsonb_agg` and `string_agg` (a literal separator, no
/// DISTINCT or ORDER BY inside) over 4 shards: the same elements as one
/// PostgreSQL gives, group by group (their order is unspecified there
/// too); with DISTINCT or ORDER BY inside, a separator that is not a
/// literal, or `json_agg`: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concatenating_aggregates_hold_the_elements_one_postgresql_gives() {
    let (reference, node, _c, _reference_pg) = differential("items").await;
    reference.batch_execute(SCHEMA).await.unwrap();
    node.batch_execute(SCHEMA).await.unwrap();
    for sql in insert_sql(7, 600) {
        reference.batch_execute(&sql).await.unwrap();
        node.batch_execute(&sql).await.unwrap();
    }
    let queries = [
        "SELECT array_agg(qty) FROM items",
        "SELECT grp, array_agg(qty) FROM items GROUP BY grp ORDER BY grp",
        "SELECT grp, array_agg(cat), count(*) FROM items GROUP BY grp ORDER BY grp",
        "SELECT flag, array_agg(price) FILTER (WHERE qty > 5) FROM items GROUP BY flag ORDER BY flag",
        "SELECT grp, jsonb_agg(price) FROM items GROUP BY grp ORDER BY grp",
        "SELECT jsonb_agg(cat) FROM items WHERE grp = 2",
        "SELECT grp, string_agg(cat, ', ') FROM items GROUP BY grp ORDER BY grp",
        "SELECT string_agg(cat, ', ') FROM items WHERE qty < 3",
        "SELECT flag, string_agg(cat::bytea, ';'::bytea) FROM items GROUP BY flag ORDER BY flag",
        "SELECT grp, count(DISTINCT cat), array_agg(qty) FROM items GROUP BY grp ORDER BY grp",
        "SELECT grp, string_agg(cat, ', ') FROM items GROUP BY grp HAVING count(*) > 50 ORDER BY grp",
        // No rows: NULL, as one PostgreSQL answers.
        "SELECT array_agg(qty), jsonb_agg(qty), string_agg(cat, ', ') FROM items WHERE id < 0",
    ];
    let mut failures = Vec::new();
    for sql in queries {
        let norm = |r: Rows| -> Rows {
            r.into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(|v| v.map(|v| elements_sorted(&v)))
                        .collect()
                })
                .collect()
        };
        let want = norm(rows(&reference, sql).await.unwrap());
        match rows(&node, sql).await {
            Ok(got) if norm(got.clone()) == want => {}
            other => failures.push(format!("{sql}\n  got {other:?}\n  want {want:?}")),
        }
    }
    // An aggregate whose parts are equal everywhere needs no sorting.
    let sql = "SELECT grp, count(*) FROM items GROUP BY grp HAVING string_agg(cat, ',') IS NOT NULL ORDER BY grp";
    assert_eq!(
        rows(&node, sql).await.unwrap(),
        rows(&reference, sql).await.unwrap()
    );
    // Binary results (tokio-postgres): text and jsonb convert; arrays are
    // refused (binary arrays are not built by the node yet).
    let binary = async |db: &tokio_postgres::Client| -> Vec<String> {
        db.query(
            "SELECT string_agg(cat, ', ') FROM items GROUP BY grp ORDER BY grp",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| elements_sorted(r.get(0)))
        .collect()
    };
    assert_eq!(binary(&node).await, binary(&reference).await);
    for (sql, code) in [
        ("SELECT array_agg(qty) FROM items", "0A000"),
        ("SELECT array_agg(DISTINCT qty) FROM items", "0A000"),
        (
            "SELECT string_agg(cat, ',' ORDER BY cat) FROM items",
            "0A000",
        ),
        ("SELECT string_agg(cat, cat) FROM items", "0A000"),
        ("SELECT json_agg(cat) FROM items", "0A000"),
    ] {
        let e = node.query(sql, &[]).await.err();
        assert_eq!(
            e.as_ref().and_then(|e| e.code()).map(|c| c.code()),
            Some(code),
            "{sql}: {e:?}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `sql` through `db` is refused with 0A000 naming `cause`.
async fn refused_naming(db: &tokio_postgres::Client, sql: &str, cause: &str) {
    let e = db.query(sql, &[]).await.unwrap_err();
    let e = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
    assert_eq!(e.code().code(), "0A000", "{sql}: {e:?}");
    assert!(e.message().contains(cause), "{sql}: {}", e.message());
}

/// The node's DSN for database `db`.
fn dsn_of(c: &Cluster, db: &str) -> String {
    format!("{}/{db}", c.dsn().strip_suffix("/postgres").unwrap())
}

/// Text is merged bytewise, which is PostgreSQL's order only under the C
/// collation. A database whose default collation comes from ICU reports
/// `datcollate` C (`CREATE DATABASE … LOCALE_PROVIDER icu ICU_LOCALE 'en'
/// LC_COLLATE 'C'`) while PostgreSQL orders its text by ICU ('a' before
/// 'B'): the node took it for C and merged 'B' before 'a', an order
/// PostgreSQL never gives. Ordered by ICU now (or refused, naming the
/// cause); a C database still merges bytewise, until a column with another
/// collation is added (named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_order_follows_the_collation_provider_of_the_database() {
    let c = Cluster::start(Opts {
        shards: 2,
        tail: "[[sharded_tables]]\nname = \"words\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"names\"\nkey = \"id\"\ntype = \"int8\"\n"
            .into(),
        ..Opts::default()
    })
    .await;
    let direct = c.direct(0).await;
    let version: i32 = direct
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let icu = !direct
        .query(
            "SELECT 1 FROM pg_collation WHERE collname = 'en-x-icu'",
            &[],
        )
        .await
        .unwrap()
        .is_empty();
    assert!(
        version >= 150000 && icu,
        "this test needs PostgreSQL 15 or later built with ICU"
    );
    let node = c.connect().await;
    node.batch_execute(
        "CREATE DATABASE icu1 LOCALE_PROVIDER icu ICU_LOCALE 'en' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await
    .unwrap();
    let words = ["a", "B", "b", "A", "c", "C", "d", "D"];
    let values: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("({}, '{w}')", i + 1))
        .collect();
    let fill = format!("INSERT INTO words (id, w) VALUES {}", values.join(", "));
    let icu_db = connect(&dsn_of(&c, "icu1")).await.unwrap();
    icu_db
        .batch_execute("CREATE TABLE words (id bigint PRIMARY KEY, w text)")
        .await
        .unwrap();
    icu_db.batch_execute(&fill).await.unwrap();
    // What PostgreSQL answers there (one shard's database holds the same
    // collation): ICU's order.
    let on_shard: Vec<String> = connect(&format!(
        "{}/icu1",
        c.shards[0].dsn().strip_suffix("/postgres").unwrap()
    ))
    .await
    .unwrap()
    .query(
        "SELECT w FROM (VALUES ('a'), ('B'), ('A'), ('b')) v (w) ORDER BY w",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert_eq!(on_shard, ["a", "A", "b", "B"]);
    // Ordered as there: a shard ranks the values (see
    // `text_ranked_by_a_shard_orders_as_one_postgresql_of_that_collation`).
    let merged: Vec<String> = icu_db
        .query("SELECT w FROM words ORDER BY w", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(merged, ["a", "A", "b", "B", "c", "C", "d", "D"]);
    let max: String = icu_db
        .query_one("SELECT max(w) FROM words", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "D");
    let cause = "database icu1 uses the ICU collation provider (locale en)";
    refused_naming(
        &icu_db,
        "SELECT w FROM words GROUP BY w HAVING w > 'b'",
        cause,
    )
    .await;
    // Ordering by something else than text is merged there.
    let ids: Vec<i64> = icu_db
        .query("SELECT id FROM words ORDER BY id DESC LIMIT 3", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [8, 7, 6]);
    // A C database: bytewise is PostgreSQL's order.
    node.batch_execute("CREATE TABLE words (id bigint PRIMARY KEY, w text)")
        .await
        .unwrap();
    node.batch_execute(&fill).await.unwrap();
    let sorted: Vec<String> = node
        .query("SELECT w FROM words ORDER BY w", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sorted, ["A", "B", "C", "D", "a", "b", "c", "d"]);
    node.batch_execute("ALTER TABLE words ADD COLUMN x text COLLATE \"en-x-icu\"")
        .await
        .unwrap();
    let cause = "column x of words uses collation \"en-x-icu\"";
    refused_naming(&node, "SELECT w FROM words ORDER BY w", cause).await;
    // Grouping compares text for equality only: bytes tell equal text
    // under deterministic collations, as "en-x-icu" is.
    let groups = node
        .query("SELECT w, count(*) FROM words GROUP BY w", &[])
        .await
        .unwrap();
    assert_eq!(groups.len(), 8);
    // Under a nondeterministic (case-insensitive) collation 'x' = 'X':
    // PostgreSQL makes one group of them, bytes would make two.
    node.batch_execute(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false); \
         CREATE TABLE names (id bigint PRIMARY KEY, name text COLLATE ci); \
         INSERT INTO names VALUES (1, 'x'), (2, 'X'), (3, 'x'), (4, 'X'), (5, 'x'), (6, 'X'), (7, 'x'), (8, 'X')",
    )
    .await
    .unwrap();
    let on_one: i64 = c
        .direct(0)
        .await
        .query_one(
            "SELECT count(DISTINCT v) FROM (VALUES ('x' COLLATE ci), ('X')) t (v)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_one, 1);
    for sql in [
        "SELECT name, count(*) FROM names GROUP BY name",
        "SELECT DISTINCT name FROM names",
        "SELECT count(DISTINCT name) FROM names",
    ] {
        let cause = "column name of names uses nondeterministic collation ci";
        refused_naming(&node, sql, cause).await;
    }
    // A domain with a collation: a cast to it takes it, with no column
    // of that collation anywhere (a database of its own).
    node.batch_execute("CREATE DATABASE dom").await.unwrap();
    let dom = connect(&dsn_of(&c, "dom")).await.unwrap();
    dom.batch_execute(
        "CREATE TABLE words (id bigint PRIMARY KEY, w text); \
         INSERT INTO words VALUES (1, 'x'), (2, 'X'), (3, 'x'), (4, 'X'); \
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false); \
         CREATE DOMAIN ci_text AS text COLLATE ci",
    )
    .await
    .unwrap();
    let cause = "domain ci_text uses nondeterministic collation ci";
    refused_naming(&dom, "SELECT DISTINCT w::ci_text FROM words", cause).await;
}

/// An ICU database with locale `locale` on the node (every shard) and the
/// same directly on shard 0's server (`reference`), each with `words`.
async fn icu_databases(
    c: &Cluster,
    locale: &str,
) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let create = |db: &str| {
        format!(
            "CREATE DATABASE {db} LOCALE_PROVIDER icu ICU_LOCALE '{locale}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    };
    c.connect()
        .await
        .batch_execute(&create(&format!("rank_{locale}")))
        .await
        .unwrap();
    c.direct(0)
        .await
        .batch_execute(&create(&format!("ref_{locale}")))
        .await
        .unwrap();
    let node = connect(&dsn_of(c, &format!("rank_{locale}")))
        .await
        .unwrap();
    let reference = connect(&format!(
        "{}/ref_{locale}",
        c.shards[0].dsn().strip_suffix("/postgres").unwrap()
    ))
    .await
    .unwrap();
    (node, reference)
}

/// Text in a database whose collation does not order bytewise (ICU here:
/// most production databases are ICU or en_US) is merged in PostgreSQL's
/// own order: once the rows are in, one shard ranks their distinct sort
/// values (`SELECT dense_rank() OVER (ORDER BY v) FROM unnest($1)`). Each
/// query answers as one PostgreSQL database of that collation holding every
/// row — in two locales that order 'ä' differently ('en': after 'a';
/// 'sv': after 'z'). What still needs bytes is refused, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_ranked_by_a_shard_orders_as_one_postgresql_of_that_collation() {
    let c = Cluster::start(Opts {
        shards: 2,
        tail: "[[sharded_tables]]\nname = \"words\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    let icu = !c
        .direct(0)
        .await
        .query(
            "SELECT 1 FROM pg_collation WHERE collname = 'sv-x-icu'",
            &[],
        )
        .await
        .unwrap()
        .is_empty();
    assert!(icu, "this test needs PostgreSQL 15 or later built with ICU");
    let words = [
        "a", "B", "b", "A", "ä", "å", "z", "Z", "o", "ö", "Ö", "é", "e", "E", "f", "co-op", "coop",
        "Coop", "co op", " x", "_y", "10", "9", "ß", "ss", "SS", "a", "b", "z", "ä", "", "ﬁ", "fi",
    ];
    let mut values: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let id = i + 1;
            format!("({id}, '{w}', '{w}', '{w}', {})", id % 3)
        })
        .collect();
    values.push("(100, NULL, NULL, NULL, 0)".into());
    values.push("(101, NULL, 'a', 'a', 1)".into());
    let fill = format!(
        "INSERT INTO words (id, w, v, c, n) VALUES {}",
        values.join(", ")
    );
    let queries = [
        "SELECT w, id FROM words ORDER BY w, id",
        "SELECT id, w FROM words ORDER BY w DESC, id LIMIT 7",
        "SELECT w, id FROM words ORDER BY w NULLS FIRST, id LIMIT 5 OFFSET 3",
        "SELECT v, c, id FROM words ORDER BY c, v, id",
        "SELECT c, id FROM words ORDER BY c DESC, id DESC",
        "SELECT w, count(*) FROM words GROUP BY w ORDER BY w",
        "SELECT n, count(*) FROM words GROUP BY n ORDER BY n",
        "SELECT DISTINCT lower(w) AS l FROM words ORDER BY l",
        "SELECT upper(w) AS u, id FROM words ORDER BY 1, 2 LIMIT 10",
        "SELECT w || '!' AS x, id FROM words WHERE n = 1 ORDER BY x DESC NULLS LAST, id",
        // A cast to name takes the database's collation (a name column's is C).
        "SELECT w::name AS x, id FROM words ORDER BY x, id",
        // min/max: every shard's rows ranked, then combined.
        "SELECT max(w), min(w), max(c), min(v), count(*) FROM words",
        "SELECT n, min(w), max(c) FROM words GROUP BY n ORDER BY n",
        "SELECT n, max(w) AS m FROM words GROUP BY n ORDER BY m DESC, n",
        "SELECT max(w) FROM words WHERE id > 1000",
        // DISTINCT ON: all rows ranked and sorted, then the first of each.
        "SELECT DISTINCT ON (w) w, id FROM words ORDER BY w, id DESC",
        "SELECT DISTINCT ON (n) n, w, id FROM words ORDER BY n, w DESC NULLS LAST, id LIMIT 2",
        "SELECT DISTINCT ON (lower(w)) lower(w) AS l, id FROM words ORDER BY lower(w), id OFFSET 3 LIMIT 5",
    ];
    for locale in ["en", "sv"] {
        let (node, reference) = icu_databases(&c, locale).await;
        for db in [&node, &reference] {
            db.batch_execute(
                "CREATE TABLE words (id bigint PRIMARY KEY, w text, v varchar(20), c char(6), n int)",
            )
            .await
            .unwrap();
            db.batch_execute(&fill).await.unwrap();
        }
        for sql in queries {
            same_answer(&reference, &node, sql).await;
        }
        // The extended protocol, parameters in LIMIT.
        let sql = "SELECT w FROM words WHERE id > $1 ORDER BY w LIMIT $2";
        let mut answers = Vec::new();
        for db in [&node, &reference] {
            let a: Vec<Option<String>> = db
                .query(sql, &[&3i64, &12i64])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            answers.push(a);
        }
        assert_eq!(answers[0], answers[1], "{locale}");
        let first: Vec<String> = rows(
            &node,
            "SELECT w FROM words WHERE w IN ('ä', 'z') ORDER BY w",
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
        let expected = if locale == "en" {
            ["ä", "ä", "z", "z"]
        } else {
            ["z", "z", "ä", "ä"]
        };
        assert_eq!(first, expected, "{locale}");
        let cause = format!("uses the ICU collation provider (locale {locale})");
        for (sql, what) in [
            // Evaluated by the node: bytewise.
            (
                "SELECT w, count(*) FROM words GROUP BY w HAVING w > 'b'",
                "HAVING comparing text by order",
            ),
            (
                "SELECT n FROM words GROUP BY n HAVING string_agg(w, '') >= 'b'",
                "HAVING comparing text by order",
            ),
        ] {
            refused_naming(&node, sql, what).await;
            refused_naming(&node, sql, &cause).await;
        }
        refused_naming(
            &node,
            "SELECT w FROM words ORDER BY w COLLATE \"C\"",
            "COLLATE \"C\"",
        )
        .await;
        node.batch_execute("BEGIN").await.unwrap();
        let e = node
            .batch_execute("DECLARE k CURSOR FOR SELECT w FROM words ORDER BY w")
            .await
            .and(node.batch_execute("FETCH 1 FROM k").await)
            .unwrap_err();
        let e = e.as_db_error().unwrap();
        assert_eq!(e.code().code(), "0A000", "{e:?}");
        assert!(e.message().contains("a cursor"), "{}", e.message());
        node.batch_execute("ROLLBACK").await.unwrap();
        // DDL in a transaction block makes the node forget what it read of
        // the shards' catalogs, collations included, while the block keeps
        // its backends: read again before the next merge (it was refused,
        // "not known yet", until the block ended).
        node.batch_execute("BEGIN").await.unwrap();
        let first = rows(
            &node,
            "SELECT w FROM words WHERE w IS NOT NULL ORDER BY w LIMIT 1",
        )
        .await
        .unwrap();
        node.batch_execute("CREATE INDEX ON words (n)")
            .await
            .unwrap();
        assert_eq!(
            rows(
                &node,
                "SELECT w FROM words WHERE w IS NOT NULL ORDER BY w LIMIT 1"
            )
            .await
            .unwrap(),
            first
        );
        node.batch_execute("ROLLBACK").await.unwrap();
        // A column of another collation: which one a merged column has is
        // not known.
        node.batch_execute("ALTER TABLE words ADD COLUMN x text COLLATE \"C\"")
            .await
            .unwrap();
        let cause = "column x of words uses collation \"C\"";
        refused_naming(&node, "SELECT w FROM words ORDER BY w", cause).await;
    }
    // Shards whose databases' collations differ rank differently: refused.
    for (i, locale) in ["en", "sv"].iter().enumerate() {
        c.direct(i)
            .await
            .batch_execute(&format!(
                "CREATE DATABASE mixed LOCALE_PROVIDER icu ICU_LOCALE '{locale}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            ))
            .await
            .unwrap();
    }
    let mixed = connect(&dsn_of(&c, "mixed")).await.unwrap();
    mixed
        .batch_execute("CREATE TABLE words (id bigint PRIMARY KEY, w text); INSERT INTO words VALUES (1, 'a'), (2, 'ä'), (3, 'z')")
        .await
        .unwrap();
    refused_naming(
        &mixed,
        "SELECT w FROM words ORDER BY w",
        "share one collation",
    )
    .await;
}

/// jsonb compares numbers by value (`'2.0'::jsonb = '2'::jsonb`) but prints
/// the scale it was given: grouping or counting distinct jsonb over several
/// shards keyed the printed text — two groups where PostgreSQL makes one
/// (Django's `values('meta__key').annotate(Count(…))`). Keyed by value now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonb_groups_compare_numbers_by_value() {
    let (reference, node, _c, _reference_pg) = differential("jdocs").await;
    let values: Vec<String> = (1..=40)
        .map(|i: i64| {
            let p = ["2.0", "2", "2.00", "3", "3.10", "3.1"][(i % 6) as usize];
            format!("({i}, '{{\"p\": {p}, \"q\": [1.50, \"2.0\"]}}')")
        })
        .collect();
    for db in [&reference, &node] {
        db.batch_execute("CREATE TABLE jdocs (id bigint PRIMARY KEY, meta jsonb)")
            .await
            .unwrap();
        db.batch_execute(&format!("INSERT INTO jdocs VALUES {}", values.join(", ")))
            .await
            .unwrap();
    }
    for sql in [
        "SELECT count(*) FROM jdocs GROUP BY meta->'p' ORDER BY 1",
        "SELECT count(DISTINCT meta->'p'), count(DISTINCT meta) FROM jdocs",
        "SELECT count(*) FROM jdocs GROUP BY meta ORDER BY 1",
    ] {
        same_answer(&reference, &node, sql).await;
    }
    // Not ordered across shards; the refusal names the type (it gave its
    // OID).
    refused_naming(
        &node,
        "SELECT id FROM jdocs ORDER BY meta->'p' LIMIT 3",
        "values of type jsonb",
    )
    .await;
}

/// Django groups by position on PostgreSQL (`GROUP BY 1`): a key grouped so
/// was not seen as the key, and what only whole groups allow (an expression
/// over an aggregate, `array_agg(… ORDER BY …)`) was refused. The position
/// is read as the output expression it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouping_by_position_equals_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    for sql in [
        "SELECT id, round(avg(seq), 2) AS a FROM events GROUP BY 1 ORDER BY 1",
        "SELECT \"events\".\"id\", array_agg(seq ORDER BY seq) FROM events GROUP BY 1 ORDER BY 1 LIMIT 5",
        "SELECT v, count(*), sum(seq) FROM events GROUP BY 1 ORDER BY 1",
        "SELECT v, id, max(seq) FROM events GROUP BY 1, 2 ORDER BY 2, 1 LIMIT 20",
        "SELECT id % 3 AS m, count(*) FROM events GROUP BY 1 ORDER BY 1",
        // A position naming a constant stays a position (it recursed
        // forever: the node's stack overflowed — found by review).
        "SELECT 1 AS k, count(*) FROM events GROUP BY 1",
        "SELECT 5 AS k, v, count(*) FROM events GROUP BY 2, 1 ORDER BY 2",
        "SELECT 1 GROUP BY 1",
    ] {
        same_answer(&reference, &node, sql).await;
    }
}

/// Django counts an annotated or `distinct()` queryset (its `Paginator`
/// does) as `SELECT COUNT(*) FROM (SELECT … GROUP BY pk) subquery`: a
/// derived table of groups or DISTINCT rows by the shard key is partitioned
/// by shard as the table is, so it is merged as if the outer query read the
/// table (it was refused). Groups or DISTINCT rows of another column still
/// need all shards' rows: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_tables_grouped_by_the_key_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    for sql in [
        "SELECT count(*) FROM (SELECT id, count(*) FROM events GROUP BY id) s",
        "SELECT COUNT(*) FROM (SELECT \"events\".\"id\" AS \"col1\", COUNT(\"events\".\"seq\") AS \"n\" FROM \"events\" GROUP BY 1) subquery",
        "SELECT count(*) FROM (SELECT DISTINCT id FROM events) s",
        "SELECT count(*) FROM (SELECT DISTINCT id, v FROM events WHERE v > 3) s",
        "SELECT max(n), sum(n), min(n) FROM (SELECT id, count(*) AS n FROM events GROUP BY id) s",
        "SELECT s.id, s.n FROM (SELECT id, count(*) AS n FROM events GROUP BY id) s ORDER BY s.n DESC, s.id LIMIT 5",
        "SELECT DISTINCT id, v FROM events WHERE seq < 50 ORDER BY id, v",
    ] {
        same_answer(&reference, &node, sql).await;
    }
    // Groups of another column need all shards' rows: the derived table
    // is run first (`subqueries_run_first_equal_one_postgresql`).
    for sql in [
        "SELECT count(*) FROM (SELECT DISTINCT v FROM events) s",
        "SELECT count(*) FROM (SELECT v, count(*) FROM events GROUP BY v) s",
    ] {
        same_answer(&reference, &node, sql).await;
        same_answer_extended(&reference, &node, sql).await;
    }
}

/// A subquery that needs every shard's rows at once — an average to
/// compare with, a count of DISTINCT values of another column, the rows of
/// an `IN (… LIMIT n)` — was refused over several shards. In the simple
/// protocol the node runs it on its own first (merged), writes its answer
/// into the statement as typed VALUES and runs the rest: the same answers
/// as one PostgreSQL, its errors included (21000 for a scalar subquery of
/// several rows, 22012 …); a correlated subquery keeps the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subqueries_run_first_equal_one_postgresql() {
    let (reference, node, _c, _reference_pg) = events_600().await;
    for db in [&reference, &node] {
        db.batch_execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
            .await
            .unwrap();
    }
    for sql in [
        "SELECT count(*) FROM events WHERE v > (SELECT avg(v) FROM events)",
        "SELECT id, seq FROM events WHERE v = (SELECT max(v) FROM events) ORDER BY seq",
        "SELECT count(*) FROM (SELECT DISTINCT v FROM events) s",
        "SELECT max(n), min(n), sum(n) FROM (SELECT v, count(*) AS n FROM events GROUP BY v) s",
        "SELECT s.v, s.n FROM (SELECT v, count(*) AS n FROM events GROUP BY v) AS s(v, n) WHERE s.n > 25 ORDER BY s.n DESC, s.v",
        "SELECT seq FROM events WHERE seq IN (SELECT seq FROM events ORDER BY v DESC, seq LIMIT 5) ORDER BY seq",
        "SELECT count(*) FROM events WHERE seq NOT IN (SELECT NULLIF(v, 3) FROM events GROUP BY v)",
        "SELECT count(*) FROM events WHERE v NOT IN (SELECT v FROM events GROUP BY v HAVING count(*) > 26)",
        "WITH g AS (SELECT v, count(*) AS n FROM events GROUP BY v) SELECT sum(n), count(*) FROM g",
        "SELECT (SELECT count(DISTINCT v) FROM events), (SELECT max(seq) FROM events) AS top",
        "SELECT count(*) FROM events WHERE v > (SELECT max(v) FROM events WHERE v > 100)",
        "SELECT count(*) FROM events WHERE 'x' || v::text IN (SELECT DISTINCT 'x' || v::text FROM events WHERE v > 10)",
        // A user type (named by the home shard), a CTE read twice.
        "WITH x AS (SELECT seq, (ARRAY['sad','ok','happy'])[v % 3 + 1]::mood AS m FROM events) SELECT m, count(*) FROM x WHERE seq > (SELECT avg(seq) FROM x) GROUP BY m ORDER BY m",
        "SELECT count(*) FROM (SELECT DISTINCT NULLIF(v, 3) AS w FROM events) s WHERE w IS NULL",
        "SELECT * FROM (SELECT v, v FROM events GROUP BY v) s ORDER BY 1 LIMIT 3",
        "SELECT count(*) FROM events WHERE v = (SELECT v FROM events WHERE seq = 7 GROUP BY v)",
        // A type modifier kept (`bit` alone is bit(1): '101' cut to '1').
        "WITH x AS (SELECT seq, (v % 8)::bit(3) AS b FROM events) SELECT count(*) FROM x WHERE b = B'101' AND seq > (SELECT avg(seq) FROM x)",
        // A subquery run first inside one run first, answering more than
        // the 64 KiB the node sends on at once.
        "SELECT count(*), sum(length(t)) FROM (SELECT DISTINCT repeat(md5(seq::text), 10) AS t FROM events WHERE v > (SELECT avg(v) FROM events)) s",
        // Text of quotes and backslashes, as the subquery gives it.
        r"SELECT count(*) FROM events WHERE v::text || E'\\''' IN (SELECT DISTINCT v::text || E'\\''' FROM events)",
    ] {
        same_answer(&reference, &node, sql).await;
    }
    // The extended protocol: a statement prepared under a name and bound
    // (tokio-postgres, psycopg 3 past its prepare threshold), values in
    // binary; Parsed unnamed in the batch that binds it: the
    // `subqueries_first` scenarios of `drivers.rs` (psycopg, node-postgres).
    for sql in [
        "SELECT count(*) FROM events WHERE v > (SELECT avg(v) FROM events)",
        "SELECT id, seq FROM events WHERE v = (SELECT max(v) FROM events) ORDER BY seq",
        "SELECT s.v, s.n FROM (SELECT v, count(*) AS n FROM events GROUP BY v) AS s(v, n) WHERE s.n > 25 ORDER BY s.n DESC, s.v",
    ] {
        same_answer_extended(&reference, &node, sql).await;
        // Twice: the statement is its own again, and runs first again.
        same_answer_extended(&reference, &node, sql).await;
    }
    // With a parameter in the rest of the statement.
    let st = "SELECT count(*) FROM events WHERE v > (SELECT avg(v) FROM events) AND seq > $1";
    for cut in [10i32, 300] {
        let want: i64 = reference.query_one(st, &[&cut]).await.unwrap().get(0);
        let got: i64 = node.query_one(st, &[&cut]).await.unwrap().get(0);
        assert_eq!(got, want, "{st} with {cut}");
    }
    // A parameter the client left untyped, bound in binary by its
    // description (tokio-postgres, asyncpg), in a LIMIT the merge applies.
    let st =
        "SELECT seq FROM events WHERE v > (SELECT avg(v) FROM events) ORDER BY seq LIMIT $1::int4";
    let seqs = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<i32>>()
    };
    let want = seqs(reference.query(st, &[&3i32]).await.unwrap());
    assert_eq!(seqs(node.query(st, &[&3i32]).await.unwrap()), want, "{st}");
    // Two such statements pipelined on one connection (the second's batch
    // arrives while the first's replies are owed).
    let a = "SELECT count(*) FROM events WHERE v > (SELECT avg(v) FROM events)";
    let b = "SELECT count(*) FROM (SELECT DISTINCT v FROM events) s";
    let (ra, rb) = tokio::join!(node.query_one(a, &[]), node.query_one(b, &[]));
    let pa = node.prepare(a).await.unwrap();
    let pb = node.prepare(b).await.unwrap();
    let (qa, qb) = tokio::join!(node.query_one(&pa, &[]), node.query_one(&pb, &[]));
    let (wa, wb) = tokio::join!(reference.query_one(a, &[]), reference.query_one(b, &[]));
    let (wa, wb) = (wa.unwrap().get::<_, i64>(0), wb.unwrap().get::<_, i64>(0));
    assert_eq!(ra.unwrap().get::<_, i64>(0), wa);
    assert_eq!(rb.unwrap().get::<_, i64>(0), wb);
    assert_eq!(qa.unwrap().get::<_, i64>(0), wa);
    assert_eq!(qb.unwrap().get::<_, i64>(0), wb);
    // A subquery taking a parameter is not run first: refused.
    let st = "SELECT count(*) FROM events WHERE v > (SELECT avg(v) FROM events WHERE seq > $1)";
    reference.query_one(st, &[&10i32]).await.unwrap();
    let e = node.query_one(st, &[&10i32]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{st}: {e:?}");
    // A step's error, and the session after it.
    let st = "SELECT count(*) FROM events WHERE v > (SELECT max(v / 0) FROM events) AND seq > $1";
    let e = node.query_one(st, &[&1i32]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{st}: {e:?}");
    // Inside a transaction block, with what the block wrote.
    for db in [&reference, &node] {
        db.batch_execute("BEGIN; INSERT INTO events (id, seq, v) VALUES (3, 1000, 500)")
            .await
            .unwrap();
    }
    same_answer(
        &reference,
        &node,
        "SELECT id, seq FROM events WHERE v = (SELECT max(v) FROM events)",
    )
    .await;
    for db in [&reference, &node] {
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    // PostgreSQL's errors, as PostgreSQL gives them.
    for (sql, code) in [
        (
            "SELECT seq FROM events WHERE v = (SELECT v FROM events GROUP BY v)",
            "21000",
        ),
        (
            "SELECT count(*) FROM events WHERE v > (SELECT max(v / 0) FROM events)",
            "22012",
        ),
    ] {
        let want = rows(&reference, sql).await.unwrap_err();
        let got = rows(&node, sql).await.unwrap_err();
        assert_eq!(want.code().map(|c| c.code()), Some(code), "{sql}: {want:?}");
        assert_eq!(got.code().map(|c| c.code()), Some(code), "{sql}: {got:?}");
    }
    // A correlated subquery cannot run on its own: the refusal stays.
    let sql =
        "SELECT count(*) FROM events e WHERE v > (SELECT avg(v) FROM events f WHERE f.seq < e.seq)";
    assert!(!rows(&reference, sql).await.unwrap().is_empty());
    let e = rows(&node, sql).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{sql}: {e:?}");
    // Floats written rounded would not read back as the same value.
    let sql = "SELECT count(*) FROM events WHERE v / 7.0::float8 > (SELECT avg(v / 7.0::float8) FROM events)";
    same_answer(&reference, &node, sql).await;
    node.batch_execute("SET extra_float_digits = 0")
        .await
        .unwrap();
    let e = rows(&node, sql).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{sql}: {e:?}");
    node.batch_execute("RESET extra_float_digits")
        .await
        .unwrap();
    // Zones written as abbreviations may read back as other zones.
    let sql = "WITH x AS (SELECT seq, timestamptz '2024-01-01 00:00+00' + seq * interval '1 hour' AS t FROM events) SELECT count(*) FROM x WHERE t < '2024-01-05 00:00+00' AND seq > (SELECT avg(seq) FROM x)";
    same_answer(&reference, &node, sql).await;
    node.batch_execute("SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap();
    let e = rows(&node, sql).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{sql}: {e:?}");
    node.batch_execute("RESET DateStyle").await.unwrap();
    // Text takes the default collation in VALUES: refused once a column
    // of the database has another (the node cannot tell the answer's).
    let sql = "WITH x AS (SELECT seq, v::text AS t FROM events) SELECT count(*) FROM x WHERE t < '5' AND seq > (SELECT avg(seq) FROM x)";
    same_answer(&reference, &node, sql).await;
    node.batch_execute("CREATE TABLE labels (id bigint, t text COLLATE \"en-x-icu\")")
        .await
        .unwrap();
    let e = rows(&node, sql).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{sql}: {e:?}");
    let m = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(m.contains("collation"), "{m}");
    // The session is fine after all of it.
    same_answer(&reference, &node, "SELECT count(*) FROM events").await;
}
