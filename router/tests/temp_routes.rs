//! Routing of statements on a session's temporary objects: they live on
//! the home shard only (`route/analyze/temp.rs`). One table of cases (SQL
//! → expected route and temp mark) under a namespace whose temporary
//! schema holds `tmp`, `tmp_idx` and `tmp_seq`, as the node reads it back.

mod common;

use hotrepart_router::route::{plan_in, Hints, Namespace, Target};

/// What a case expects: the target (`s0` the home shard, `ALL`, `s3` …)
/// and the temp mark, or a refusal with its SQLSTATE.
#[derive(Debug, PartialEq)]
enum Want {
    Route(&'static str, bool),
    Refuse(&'static str),
}
use Want::*;

fn target(t: &Target) -> String {
    match t {
        Target::One(s) => s.to_string(),
        Target::All => "ALL".into(),
        Target::Any => "ANY".into(),
        other => format!("{other:?}"),
    }
}

fn ns(temp: &[&str], explicit: bool) -> Namespace {
    Namespace {
        temp: temp.iter().map(|s| s.to_string()).collect(),
        temp_explicit: explicit,
        ..Namespace::default()
    }
}

fn check(ns: &Namespace, cases: &[(&str, Want)]) {
    let snap = common::cases_snapshot();
    let mut bad = Vec::new();
    for (sql, want) in cases {
        let got = match plan_in(&snap, sql, ns).and_then(|p| p.bind(&snap, &[], &Hints::default()))
        {
            Ok(r) => Route(Box::leak(target(&r.target).into_boxed_str()), r.temp),
            Err(e) => Refuse(e.sqlstate),
        };
        if &got != want {
            bad.push(format!("{sql}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn temporary_objects_live_on_the_home_shard() {
    let with_tmp = ns(&["tmp", "tmp_idx", "tmp_seq"], false);
    check(
        &with_tmp,
        &[
            // Creation: the home shard alone.
            ("CREATE TEMP TABLE t2 (a int)", Route("s0", true)),
            (
                "CREATE TEMPORARY TABLE t2 (a int) ON COMMIT DROP",
                Route("s0", true),
            ),
            ("CREATE TABLE pg_temp.t2 (a int)", Route("s0", true)),
            ("CREATE TEMP VIEW v AS SELECT 1", Route("s0", true)),
            ("CREATE TEMP SEQUENCE s2", Route("s0", true)),
            ("CREATE TEMP TABLE t2 AS SELECT 1 AS a", Route("s0", true)),
            (
                "CREATE TEMP TABLE t2 AS SELECT * FROM countries",
                Route("s0", true),
            ),
            ("SELECT 1 AS a INTO TEMP t2", Route("s0", true)),
            ("SELECT * INTO TEMP t2 FROM tmp", Route("s0", true)),
            // A view over a temporary table is temporary.
            ("CREATE VIEW v AS SELECT * FROM tmp", Route("s0", true)),
            (
                "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                Route("s0", true),
            ),
            // Refused: a name of a declared table, rows of sharded tables.
            ("CREATE TEMP TABLE users (a int)", Refuse("0A000")),
            ("CREATE TABLE pg_temp.countries (a int)", Refuse("0A000")),
            (
                "CREATE TEMP TABLE t2 AS SELECT * FROM users",
                Refuse("0A000"),
            ),
            ("SELECT * INTO TEMP t2 FROM users", Refuse("0A000")),
            ("CREATE TEMP VIEW v AS SELECT * FROM users", Refuse("0A000")),
            ("CREATE TABLE t2 AS SELECT 1", Refuse("0A000")),
            ("SELECT 1 INTO t2", Refuse("0A000")),
            // Use, change and drop of the session's temporary relations.
            ("SELECT * FROM tmp", Route("s0", true)),
            ("SELECT * FROM pg_temp.tmp", Route("s0", true)),
            ("SELECT * FROM pg_temp_7.tmp", Route("s0", true)),
            ("INSERT INTO tmp VALUES (1)", Route("s0", true)),
            ("UPDATE tmp SET a = 2", Route("s0", true)),
            ("TRUNCATE tmp", Route("s0", true)),
            ("SELECT nextval('tmp_seq')", Route("s0", false)),
            ("SELECT pg_temp.f()", Route("s0", true)),
            ("DROP TABLE tmp", Route("s0", true)),
            ("DROP TABLE IF EXISTS pg_temp.tmp", Route("s0", true)),
            ("DROP INDEX tmp_idx", Route("s0", true)),
            ("DROP SEQUENCE tmp_seq", Route("s0", true)),
            ("ALTER TABLE tmp ADD COLUMN b int", Route("s0", true)),
            ("ALTER TABLE tmp RENAME TO tmp2", Route("s0", true)),
            ("CREATE INDEX ON tmp (a)", Route("s0", true)),
            ("DROP TABLE tmp, other", Refuse("0A000")),
            // With a sharded table: the router's rules for undeclared
            // tables hold (all of it on the home shard, or refused).
            (
                "SELECT * FROM tmp JOIN users ON users.id = tmp.a WHERE users.id = 2",
                Route("s0", true),
            ),
            (
                "SELECT * FROM tmp JOIN users ON users.id = tmp.a WHERE users.id = 1",
                Refuse("0A000"),
            ),
            ("INSERT INTO users (id) SELECT a FROM tmp", Refuse("0A000")),
            // Other DDL: every shard, as before.
            ("CREATE TABLE t2 (temp int)", Route("ALL", false)),
            ("DROP TABLE other", Route("ALL", false)),
            ("CREATE INDEX ON other (a)", Route("ALL", false)),
            ("ALTER TABLE users ADD COLUMN b int", Route("ALL", false)),
            ("CREATE VIEW v AS SELECT * FROM other", Route("ALL", false)),
            ("SELECT * FROM other", Route("s0", false)),
            ("SELECT temp FROM other", Route("s0", false)),
        ],
    );
}

/// A temporary table named like a declared table (renamed into that name
/// after it was created) hides the declared one, as in PostgreSQL.
#[test]
fn a_temporary_table_hides_a_declared_one_of_its_name() {
    check(
        &ns(&["users"], false),
        &[
            ("SELECT * FROM users WHERE id = 1", Route("s0", true)),
            (
                "SELECT * FROM public.users WHERE id = 1",
                Route("s3", false),
            ),
            ("DROP TABLE users", Route("s0", true)),
        ],
    );
    // A temporary view over a sharded table (made where the node could not
    // refuse it) would see the home shard's rows only.
    let mut over = ns(&["v"], false);
    over.reaching
        .insert(("pg_temp".into(), "v".into()), "users".into());
    check(&over, &[("SELECT * FROM v", Refuse("0A000"))]);
    // Where search_path places pg_temp itself, the node cannot tell.
    check(
        &ns(&["tmp"], true),
        &[
            ("SELECT * FROM tmp", Refuse("0A000")),
            ("SELECT * FROM pg_temp.tmp", Route("s0", true)),
        ],
    );
}

/// Without temporary relations nothing changes for their names.
#[test]
fn names_route_as_before_without_temporary_relations() {
    check(
        &Namespace::default(),
        &[
            ("SELECT * FROM tmp", Route("s0", false)),
            ("DROP TABLE tmp", Route("ALL", false)),
            ("CREATE TEMP TABLE tmp (a int)", Route("s0", true)),
            ("DROP TABLE pg_temp.tmp", Route("s0", true)),
        ],
    );
}
