//! The ownership predicate (`route::hide_rows`): SQL in, the text a shard
//! that hides a range runs out, as a table of cases.

mod common;

use common::{pg_hash, shard as s};
use hotrepart_router::catalog::{
    FunctionId, KeyRange, KeyType, RoutingFunction, RoutingSnapshot, ShardedTable,
};
use hotrepart_router::route::{hide_node_transactions, hide_rows, Namespace};

/// 2 shards s0, s1; 2 ranges; the lower range [0, 2^63) is owned by s0 and
/// hidden on s1 (a reshard job copies it there). users(id int8),
/// events(tenant text), geo(id int8) placed by a WebAssembly function.
fn snapshot() -> RoutingSnapshot {
    let snap = common::builder(2)
        .sharded_table(pg_hash("users", "id", KeyType::Int8))
        .sharded_table(pg_hash("events", "tenant", KeyType::Text))
        .sharded_table(ShardedTable {
            name: "geo".into(),
            key_column: "id".into(),
            key_type: KeyType::Int8,
            function: RoutingFunction::Wasm {
                id: FunctionId([7; 32]),
            },
        })
        .reference_table("countries")
        .equal_ranges(2)
        .and_then(|b| b.build())
        .expect("snapshot");
    let ranges: Vec<KeyRange> = snap
        .ranges()
        .iter()
        .map(|r| {
            if r.lo == 0 {
                KeyRange {
                    hidden_on: Some(s("s1")),
                    ..r.clone()
                }
            } else {
                r.clone()
            }
        })
        .collect();
    snap.edit().ranges(ranges).build().expect("snapshot")
}

const U: &str = "(hashint8extended(\"id\", 0) >= 0) IS NOT TRUE";

fn check(cases: &[(&str, Option<&str>)]) {
    let snap = snapshot();
    let mut failures = Vec::new();
    for (sql, want) in cases {
        let got = hide_rows(&snap, &Namespace::default(), sql, &s("s1")).map_err(|e| e.to_string());
        let want = want.map(str::to_owned);
        if got != Ok(want.clone()) {
            failures.push(format!("{sql}\n   got: {got:?}\n  want: {want:?}"));
        }
        // Nothing is hidden on s0: never rewritten there.
        assert_eq!(
            hide_rows(&snap, &Namespace::default(), sql, &s("s0")),
            Ok(None),
            "{sql} on s0"
        );
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn reads_see_only_the_rows_the_shard_shows() {
    let scan = format!("SELECT * FROM (SELECT * FROM users WHERE {U}) AS users");
    check(&[
        ("SELECT * FROM users", Some(&scan)),
        (
            "SELECT count(*) FROM users u WHERE u.id > 5",
            Some(&format!(
                "SELECT count(*) FROM (SELECT * FROM users WHERE {U}) u WHERE u.id > 5"
            )),
        ),
        (
            "SELECT * FROM public.users",
            Some(&format!(
                "SELECT * FROM (SELECT * FROM public.users WHERE {U}) AS users"
            )),
        ),
        (
            "SELECT e.* FROM events AS e JOIN users ON users.id = 1",
            Some(&format!(
                "SELECT e.* FROM (SELECT * FROM events WHERE (hashtextextended(\"tenant\" COLLATE \"C\", 0) >= 0) IS NOT TRUE) AS e \
                 JOIN (SELECT * FROM users WHERE {U}) AS users ON users.id = 1"
            )),
        ),
        (
            "SELECT * FROM countries WHERE id IN (SELECT id FROM users)",
            Some(&format!(
                "SELECT * FROM countries WHERE id IN (SELECT id FROM (SELECT * FROM users WHERE {U}) AS users)"
            )),
        ),
        (
            "WITH x AS (SELECT id FROM users) SELECT count(*) FROM x",
            Some(&format!(
                "WITH x AS (SELECT id FROM (SELECT * FROM users WHERE {U}) AS users) SELECT count(*) FROM x"
            )),
        ),
        // Every branch of a UNION (merged over several shards).
        (
            "SELECT id FROM users UNION SELECT id FROM users u ORDER BY 1",
            Some(&format!(
                "SELECT id FROM (SELECT * FROM users WHERE {U}) AS users UNION SELECT id FROM (SELECT * FROM users WHERE {U}) u ORDER BY 1"
            )),
        ),
        // Tables that are not sharded, and statements without tables.
        ("SELECT * FROM countries", None),
        ("SELECT 1", None),
        ("SET search_path = public", None),
    ]);
}

#[test]
fn writes_filter_their_target() {
    check(&[
        (
            "UPDATE users SET name = 'x' WHERE name = 'y'",
            Some(
                "UPDATE users SET name = 'x' WHERE (name = 'y') AND (hashint8extended(users.\"id\", 0) >= 0) IS NOT TRUE",
            ),
        ),
        (
            "DELETE FROM users AS u",
            Some("DELETE FROM users AS u WHERE (hashint8extended(u.\"id\", 0) >= 0) IS NOT TRUE"),
        ),
        (
            "INSERT INTO countries SELECT id FROM users",
            Some(&format!(
                "INSERT INTO countries SELECT id FROM (SELECT * FROM users WHERE {U}) AS users"
            )),
        ),
    ]);
}

#[test]
fn copy_to_becomes_a_filtered_query() {
    check(&[
        (
            "COPY users TO STDOUT",
            Some(&format!("COPY (SELECT * FROM users WHERE {U}) TO STDOUT")),
        ),
        (
            "COPY users (id, name) TO STDOUT (FORMAT csv)",
            Some(&format!(
                "COPY (SELECT id, name FROM users WHERE {U}) TO STDOUT (FORMAT csv)"
            )),
        ),
        // COPY FROM splits rows by key: nothing to hide.
        ("COPY users FROM STDIN", None),
    ]);
}

#[test]
fn what_cannot_be_filtered_in_sql_is_refused() {
    let snap = snapshot();
    let e = hide_rows(
        &snap,
        &Namespace::default(),
        "SELECT count(*) FROM geo",
        &s("s1"),
    )
    .expect_err("wasm");
    assert_eq!(e.sqlstate, "55000");
    assert!(e.message.contains("WebAssembly"), "{}", e.message);
    let e = hide_rows(
        &snap,
        &Namespace::default(),
        "WITH users AS (SELECT 1 AS id) SELECT * FROM users",
        &s("s1"),
    )
    .expect_err("cte shadowing a sharded table");
    assert_eq!(e.sqlstate, "0A000");
}

/// The rewritten text parses again and rewrites to itself plus nothing
/// new only where tables were already wrapped (the function is not
/// idempotent by design, but its output must be valid SQL).
#[test]
fn rewritten_text_parses() {
    let snap = snapshot();
    for sql in [
        "SELECT a.id, b.tenant FROM users a LEFT JOIN events b ON a.id = b.id WHERE a.id > 3 ORDER BY 1 LIMIT 5",
        "SELECT * FROM ONLY users",
        "UPDATE users SET v = v + 1 FROM events WHERE events.id = users.id RETURNING users.id",
    ] {
        let out = hide_rows(&snap, &Namespace::default(), sql, &s("s1"))
            .expect("rewrite")
            .expect("changed");
        hotrepart_router::route::plan(&snap, &out).expect("rewritten text parses");
    }
}

#[test]
fn reads_of_pg_prepared_xacts_leave_the_nodes_own_out() {
    const V: &str = "(SELECT * FROM pg_catalog.pg_prepared_xacts WHERE SUBSTR(gid, 1, 3) IS DISTINCT FROM 'hr_')";
    let cases: &[(&str, Option<String>)] = &[
        (
            "SELECT gid, prepared, owner, database FROM pg_prepared_xacts",
            Some(format!(
                "SELECT gid, prepared, owner, database FROM {V} AS pg_prepared_xacts"
            )),
        ),
        (
            "SELECT p.gid FROM pg_catalog.pg_prepared_xacts p WHERE p.database = current_database()",
            Some(format!(
                "SELECT p.gid FROM {V} p WHERE p.database = current_database()"
            )),
        ),
        (
            "SELECT count(*) FROM (SELECT gid FROM PG_PREPARED_XACTS) x",
            Some(format!(
                "SELECT count(*) FROM (SELECT gid FROM {V} AS pg_prepared_xacts) x"
            )),
        ),
        // Not the view: a CTE of that name, another relation, a string.
        (
            "WITH pg_prepared_xacts AS (SELECT 'hr_1' AS gid) SELECT gid FROM pg_prepared_xacts",
            None,
        ),
        ("SELECT * FROM users WHERE name = 'pg_prepared_xacts'", None),
        ("SELECT * FROM other.pg_prepared_xacts", None),
        ("this is not SQL pg_prepared_xacts", None),
    ];
    let mut failures = Vec::new();
    for (sql, want) in cases {
        let got = hide_node_transactions(&Namespace::default(), sql).map_err(|e| e.to_string());
        if got != Ok(want.clone()) {
            failures.push(format!("{sql}\n   got: {got:?}\n  want: {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
