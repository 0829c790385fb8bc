//! Merge cases that once differed from one PostgreSQL holding all rows,
//! each with the smallest query that showed it: every case must now give
//! PostgreSQL's answer or be refused with 0A000 (the test prints each
//! verdict). Found by the randomized test's tricky values
//! (`HOTREPART_RANDOM_TRICKY`).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::merge_data::{differential, rows, Rows};

const SCHEMA: &str = "CREATE TABLE p (id bigint PRIMARY KEY, n numeric, f float8, r real, \
    u uuid, b bytea, flag boolean, cat text, ts timestamptz)";

/// 200 rows: equal values printed two ways alternate with the id, so both
/// spellings are on every shard.
fn inserts() -> Vec<String> {
    let mut v = Vec::new();
    for id in 1..=200 {
        let n = if id % 2 == 0 { "1.5" } else { "1.50" };
        let f = if id % 2 == 0 { "0" } else { "'-0'" };
        let u = [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "00000000-0000-0000-0000-000000000001",
            "ffffffff-0000-0000-0000-000000000000",
        ][id % 3];
        let b = ["'abc'", "'\\x01'", "'\\x41'", "'\\x5c'", "'\\xff'"][id % 5];
        let flag = id % 3 == 0;
        let cat = ["a", "B", "b", "ä", "C"][id % 5];
        v.push(format!(
            "({id}, {n}, {f}, 0.1, '{u}', {b}, {flag}, '{cat}', \
             timestamptz '2024-05-31 20:00:00+00' + {id} * interval '1 minute')"
        ));
    }
    vec![format!(
        "INSERT INTO p (id, n, f, r, u, b, flag, cat, ts) VALUES {}",
        v.join(", ")
    )]
}

/// (what, session settings, query, output columns compared by value)
fn cases(icu: bool) -> Vec<(&'static str, &'static str, String)> {
    let mut c = vec![
        (
            "GROUP BY numeric: 1.5 and 1.50 are one group in PostgreSQL",
            "",
            "SELECT n = 1.5 AS is_1_5, count(*) FROM p GROUP BY n".to_string(),
        ),
        (
            "DISTINCT numeric: 1.5 and 1.50 are one value",
            "",
            "SELECT DISTINCT n FROM p".to_string(),
        ),
        (
            "GROUP BY float8: 0 and -0 are one group in PostgreSQL",
            "",
            "SELECT f = 0 AS is_zero, count(*) FROM p GROUP BY f".to_string(),
        ),
        (
            "avg(real): PostgreSQL accumulates float4 in float8; the shards' sum(real) rounds to float4",
            "",
            "SELECT avg(r) FROM p".to_string(),
        ),
        (
            "avg(float8) of -0 values: PostgreSQL's avg starts from +0 (0 + -0 = 0); the merger divides the shards' sum(f) = -0",
            "",
            "SELECT avg(f) FROM p WHERE id % 2 = 1".to_string(),
        ),
        (
            "sum(real) is real: the merger adds the shards' float4 sums as float8 and prints float8 digits",
            "",
            "SELECT sum(r) FROM p".to_string(),
        ),
        (
            "avg(float8) with extra_float_digits = 0: 15 significant digits",
            "SET extra_float_digits = 0",
            "SELECT avg(CASE WHEN id <= 2 THEN 1 ELSE 0 END::float8) FROM p WHERE id <= 3"
                .to_string(),
        ),
        (
            "HAVING timestamptz literal without offset: PostgreSQL reads it in the session TimeZone",
            "SET TimeZone = 'Asia/Tokyo'",
            "SELECT flag, count(*) FROM p GROUP BY flag HAVING max(ts) > '2024-06-01 06:00:00' ORDER BY flag"
                .to_string(),
        ),
        (
            "HAVING boolean = 'true' (a string literal of type bool)",
            "",
            "SELECT cat, count(*) FROM p GROUP BY cat HAVING bool_or(flag) = 'true' ORDER BY cat"
                .to_string(),
        ),
        (
            "HAVING uuid = literal in upper case without dashes",
            "",
            "SELECT u, count(*) FROM p GROUP BY u HAVING u = 'A0EEBC999C0B4EF8BB6D6BB9BD380A11' ORDER BY u"
                .to_string(),
        ),
        (
            "HAVING bytea = literal in escape form ('abc' is \\x616263)",
            "",
            "SELECT b, count(*) FROM p GROUP BY b HAVING b = 'abc' ORDER BY b".to_string(),
        ),
        (
            "ORDER BY bytea with bytea_output = 'escape': the text form does not order like the bytes",
            "SET bytea_output = 'escape'",
            "SELECT id, b FROM p ORDER BY b, id".to_string(),
        ),
        (
            "a user-defined aggregate without GROUP BY is concatenated (one row per shard)",
            "",
            "SELECT mysum(id::int4) FROM p".to_string(),
        ),
    ];
    if icu {
        c.push((
            "ORDER BY text COLLATE \"und-x-icu\" is merged bytewise",
            "",
            "SELECT id, cat FROM p ORDER BY cat COLLATE \"und-x-icu\", id".to_string(),
        ));
        c.push((
            "max(text COLLATE \"und-x-icu\") is combined bytewise (shards 0 and 1 hold 'b', 2 and 3 'B'; ICU: b < B)",
            "",
            "SELECT max((CASE WHEN hashint8extended(id, 0) >= 0 THEN 'b' ELSE 'B' END) COLLATE \"und-x-icu\") FROM p"
                .to_string(),
        ));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn former_merge_bugs_are_fixed_or_refused() {
    let (reference, node, c, _reference_pg) = differential("p").await;
    let agg = "CREATE AGGREGATE mysum(int4) (sfunc = int4pl, stype = int4)";
    for db in [&reference, &node] {
        db.batch_execute(SCHEMA).await.unwrap();
        for sql in inserts() {
            db.batch_execute(&sql).await.unwrap();
        }
    }
    // (the router refuses CREATE AGGREGATE: made on each shard directly)
    reference.batch_execute(agg).await.unwrap();
    for i in 0..4 {
        c.direct(i).await.batch_execute(agg).await.unwrap();
    }
    let icu = !rows(
        &reference,
        "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'",
    )
    .await
    .unwrap()
    .is_empty();
    let mut differ = Vec::new();
    for (what, set, sql) in cases(icu) {
        for db in [&reference, &node] {
            db.batch_execute(if set.is_empty() { "RESET ALL" } else { set })
                .await
                .unwrap();
        }
        let want = rows(&reference, &sql).await.unwrap();
        let got = rows(&node, &sql).await;
        // DISTINCT keeps one of the equal values 1.5 / 1.50: which one is
        // PostgreSQL's choice too (scan order), so compare by value.
        let by_value = |r: &Rows| -> Vec<Option<f64>> {
            r.iter()
                .map(|row| row[0].as_deref().and_then(|v| v.parse().ok()))
                .collect()
        };
        let verdict = match &got {
            Ok(g) if *g == want => "same",
            Ok(g) if what.starts_with("DISTINCT numeric") && by_value(g) == by_value(&want) => {
                "same value"
            }
            Err(e) if e.code().map(|s| s.code()) == Some("0A000") => "refused (0A000)",
            _ => "DIFFERENT",
        };
        let short = |r: &Rows| {
            let first = match &got {
                Ok(g) => g.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0),
                Err(_) => 0,
            };
            let from = first.saturating_sub(1);
            format!(
                "{} rows{}: {:?}",
                r.len(),
                if from > 0 {
                    format!(", from row {from}")
                } else {
                    String::new()
                },
                &r[from.min(r.len())..(from + 4).min(r.len())]
            )
        };
        let line = format!(
            "{verdict}: {what}\n    {}{sql}\n    PostgreSQL: {}\n    hotrepart:  {}",
            if set.is_empty() {
                String::new()
            } else {
                format!("{set}; ")
            },
            short(&want),
            match &got {
                Ok(g) => short(g),
                Err(e) => format!(
                    "{:?}",
                    e.as_db_error().map(|d| (d.code().code(), d.message()))
                ),
            }
        );
        eprintln!("{line}");
        if verdict == "DIFFERENT" {
            differ.push(line);
        }
    }
    // The extended protocol: a merge must be merged or refused, never
    // concatenated.
    let ext = node.query("SELECT count(*) FROM p", &[]).await;
    let line = format!(
        "extended protocol SELECT count(*): {:?}",
        ext.as_ref()
            .map(|r| r.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>())
            .map_err(|e| e.code().map(|s| s.code().to_string()))
    );
    eprintln!("{line}");
    match &ext {
        Ok(r) if r.len() == 1 && r[0].get::<_, i64>(0) == 200 => {}
        Err(e) if e.code().map(|s| s.code()) == Some("0A000") => {}
        _ => differ.push(line),
    }
    // Binary float8 results read from the shards' text under
    // extra_float_digits = 0 (15 digits): exact, or refused. A plan with
    // only a LIMIT (every row has the same value: f is 0 or -0).
    let sql = "SELECT f + 0.30000000000000004::float8 FROM p WHERE id > $1 LIMIT 1";
    for db in [&reference, &node] {
        db.batch_execute("SET extra_float_digits = 0")
            .await
            .unwrap();
    }
    let want: f64 = reference.query_one(sql, &[&0i64]).await.unwrap().get(0);
    let got = node.query_one(sql, &[&0i64]).await;
    let line = format!(
        "binary float8 with extra_float_digits = 0: PostgreSQL {want:?}, hotrepart {:?}",
        got.as_ref()
            .map(|r| r.get::<_, f64>(0))
            .map_err(|e| e.code().map(|s| s.code().to_string()))
    );
    eprintln!("{line}");
    match &got {
        Ok(r) if r.get::<_, f64>(0) == want => {}
        Err(e) if e.code().map(|s| s.code()) == Some("0A000") => {}
        _ => differ.push(line),
    }
    assert!(
        differ.is_empty(),
        "{} merged answers differ from PostgreSQL:\n{}",
        differ.len(),
        differ.join("\n")
    );
}
