//! Issue 12, "no wrong answer and no lost write", through a node in front
//! of 2 real PostgreSQL shards: a statement is routed as PostgreSQL would
//! resolve and execute it, or refused with a real SQLSTATE — never sent
//! somewhere plausible. One test per defect: hints and ownership (D5),
//! search_path, views and partitions (D6), writes the router cannot see
//! (D7), input that used to panic the session (D9),
//! standard_conforming_strings (D10).
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::{KeyValue, RoutingSnapshot};
use hotrepart_routing_paxos::{CatalogCommand, FreezeId};
use hotrepart_tests::*;
use std::time::Duration;

const SEED: u64 = 7;

fn opts() -> Opts {
    Opts {
        shards: 2,
        extra: "pool_size = 4".into(),
        users: String::new(),
        tail: format!(
            "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n\
             [[sharded_tables]]\nname = \"names\"\nkey = \"k\"\ntype = \"text\"\nseed = {SEED}\n\
             [[sharded_tables]]\nname = \"app.orders\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n"
        ),
    }
}

/// The shard (index) owning `key` of `table` for writes.
fn owner(snap: &RoutingSnapshot, table: &str, key: KeyValue) -> usize {
    let s = snap.range_for_key(table, &key).unwrap().write_owner.clone();
    s.as_str().trim_start_matches('s').parse().unwrap()
}

/// Two int8 keys owned by different shards: (on s0, on s1).
fn keys(snap: &RoutingSnapshot, table: &str) -> (i64, i64) {
    let a = (1..1000)
        .find(|&k| owner(snap, table, KeyValue::Int8(k)) == 0)
        .unwrap();
    let b = (1..1000)
        .find(|&k| owner(snap, table, KeyValue::Int8(k)) == 1)
        .unwrap();
    (a, b)
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

async fn count_on(c: &Cluster, i: usize, sql: &str) -> i64 {
    c.direct(i).await.query_one(sql, &[]).await.unwrap().get(0)
}

/// D9: a no-break space right after SELECT (bytes c2 a0 straddle byte 7,
/// where the EXPLAIN check used to slice the text) gets an answer, and the
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibyte_text_after_the_first_word_gets_an_answer() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    for sql in ["SELECT\u{a0}1", "SELECTé", "EXPLAIN\u{a0}SELECT 1", "é"] {
        // PostgreSQL reads these as one identifier: a syntax error, from
        // the shard or the router, but an answer.
        let r = db.simple_query(sql).await;
        let e = r.expect_err(sql);
        assert_eq!(code(&e), "42601", "{sql}: {e:?}");
    }
    let rows = db.simple_query("SELECT 1 AS one").await.unwrap();
    let n = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 1, "{rows:?}");
    let n: i32 = db.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// D5: a hinted write obeys the freeze and ownership. An UPDATE forced to
/// the owner of its key waits while the key's range is frozen for a
/// cut-over; after the flip it is refused (the old owner's copy is deleted
/// by the cleanup: acknowledging it there would lose the write) and
/// nothing changed on either shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hinted_write_waits_for_the_cut_over_and_never_writes_the_old_owner() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let (a, b) = keys(&snap, "users");
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'old')", &[&a])
        .await
        .unwrap();
    // A hint naming a shard that does not own the key: refused.
    let e = db
        .batch_execute(&format!(
            "UPDATE users SET v = 'x' WHERE id = {a} /* hotrepart: shard=s1 */"
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(
        message(&e).contains("belong to shard s0"),
        "{}",
        message(&e)
    );
    // A keyless hinted write while nothing moves: that shard's rows only.
    db.execute("INSERT INTO users (id, v) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    db.batch_execute("UPDATE users SET v = v || '!' /* hotrepart: shard=s1 */")
        .await
        .unwrap();
    let vs = |i: usize, id: i64| {
        let c = &c;
        async move {
            c.direct(i)
                .await
                .query_opt("SELECT v FROM users WHERE id = $1", &[&id])
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    };
    assert_eq!(vs(1, b).await.as_deref(), Some("b!"));
    assert_eq!(vs(0, a).await.as_deref(), Some("old"));
    // The cut-over of a's range from s0 to s1.
    let range = snap
        .range_for_key("users", &KeyValue::Int8(a))
        .unwrap()
        .clone();
    let freeze = FreezeId(12);
    c.propose(CatalogCommand::FreezeRange {
        range: range.span(),
        freeze,
    })
    .await;
    let hinted = tokio::spawn({
        let db = c.connect().await;
        async move {
            db.batch_execute(&format!(
                "UPDATE users SET v = 'lost?' WHERE id = {a} /* hotrepart: shard=s0 */"
            ))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !hinted.is_finished(),
        "the hinted write did not wait for the freeze"
    );
    assert_eq!(vs(0, a).await.as_deref(), Some("old"));
    // The engine's copy, the flip, the thaw.
    c.direct(1)
        .await
        .execute("INSERT INTO users (id, v) VALUES ($1, 'old')", &[&a])
        .await
        .unwrap();
    c.propose(CatalogCommand::AssignRange {
        range: range.span(),
        read_owner: "s1".into(),
        write_owner: "s1".into(),
    })
    .await;
    c.propose(CatalogCommand::UnfreezeRange {
        range: range.span(),
        freeze,
        operator: true,
    })
    .await;
    let e = tokio::time::timeout(Duration::from_secs(10), hinted)
        .await
        .expect("the hinted write did not end after the thaw")
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(
        message(&e).contains("belong to shard s1"),
        "{}",
        message(&e)
    );
    assert_eq!(vs(0, a).await.as_deref(), Some("old"));
    assert_eq!(vs(1, a).await.as_deref(), Some("old"));
    // Unhinted, the write goes to the new owner.
    db.batch_execute(&format!("UPDATE users SET v = 'new' WHERE id = {a}"))
        .await
        .unwrap();
    assert_eq!(vs(1, a).await.as_deref(), Some("new"));
}

/// D10: with standard_conforming_strings off, PostgreSQL reads backslashes
/// in '…' as escapes. Such a literal is refused (the router would have read
/// the key as written: `'a\' OR …` is one string for the server); E'…'
/// literals are read as the server reads them and land on the shard the
/// server-read key's hash names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backslash_literals_under_standard_conforming_strings_off() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE names (k text PRIMARY KEY, v int)")
        .await
        .unwrap();
    let snap = c.node.routing.catalog.load_full();
    db.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    for sql in [
        r"INSERT INTO names (k, v) VALUES ('a\\b', 1)",
        r"SELECT * FROM names WHERE k = 'a\' OR true --'",
        r"DELETE FROM names WHERE k = 'x\'' OR k = 'y'",
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(
            message(&e).contains("standard_conforming_strings"),
            "{sql}: {}",
            message(&e)
        );
    }
    // E'…' reads the same under both settings: the server's key is a\b.
    db.batch_execute(r"INSERT INTO names (k, v) VALUES (E'a\\b', 2)")
        .await
        .unwrap();
    let key = r"a\b".to_string();
    let home = owner(&snap, "names", KeyValue::Text(key.clone()));
    for i in 0..2 {
        let n = c
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM names WHERE k = $1", &[&key])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(n, i64::from(i == home), "shard s{i}");
    }
    let rows = db
        .simple_query(r"SELECT v FROM names WHERE k = E'a\\b'")
        .await
        .unwrap();
    let n = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 1, "{rows:?}");
    // Inside a transaction: SET LOCAL is seen before the next statement.
    db.batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    db.batch_execute(r"SELECT 'a\b'").await.unwrap();
    db.batch_execute("BEGIN; SET LOCAL standard_conforming_strings = off")
        .await
        .unwrap();
    let e = db.batch_execute(r"SELECT 'a\b'").await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    db.batch_execute(r"SELECT 'a\b'").await.unwrap();
}

/// D7: a transaction whose writes the router cannot see (a SELECT calling
/// a volatile plpgsql function that inserts) on two shards commits with
/// two-phase commit: a deferred check failing at PREPARE on one shard rolls
/// back the other as well. A merged multi-shard read calling such a
/// function outside a transaction block is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_inside_functions_on_two_shards_commit_atomically() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, v text);
         CREATE TABLE fn_log (id bigint, note text);
         CREATE FUNCTION add_log(k bigint) RETURNS bigint LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO fn_log VALUES (k, 'called'); RETURN k; END $$;",
    )
    .await
    .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let (a, b) = keys(&snap, "users");
    for k in [a, b] {
        db.execute("INSERT INTO users (id, v) VALUES ($1, 'u')", &[&k])
            .await
            .unwrap();
    }
    // On s1 only: a check that fails when the transaction commits
    // (PREPARE TRANSACTION runs deferred triggers).
    c.direct(1)
        .await
        .batch_execute(
            "CREATE FUNCTION no_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'deferred check failed' USING ERRCODE = '23514'; END $$;
             CREATE CONSTRAINT TRIGGER no_log AFTER INSERT ON fn_log DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_log();",
        )
        .await
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    db.query("SELECT add_log(id) FROM users WHERE id = $1", &[&a])
        .await
        .unwrap();
    db.batch_execute(&format!("SELECT add_log(id) FROM users WHERE id = {b}"))
        .await
        .unwrap();
    let e = db.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), "23514", "{e:?}");
    assert!(
        message(&e).contains("rolled back on every shard"),
        "{}",
        message(&e)
    );
    for i in 0..2 {
        assert_eq!(
            count_on(&c, i, "SELECT count(*) FROM fn_log").await,
            0,
            "s{i}"
        );
    }
    // A merged read that may write, outside a transaction block: refused.
    let e = db
        .batch_execute("SELECT add_log(id) FROM users ORDER BY id")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(message(&e).contains("add_log"), "{}", message(&e));
    // Without the failing check, both shards commit, with 2PC.
    c.direct(1)
        .await
        .batch_execute("DROP TRIGGER no_log ON fn_log")
        .await
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    let rows = db
        .query("SELECT add_log(id) FROM users ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    db.batch_execute("COMMIT").await.unwrap();
    for i in 0..2 {
        assert_eq!(
            count_on(&c, i, "SELECT count(*) FROM fn_log").await,
            1,
            "s{i}"
        );
    }
}

/// D6: unqualified names resolve through the session's search_path as
/// PostgreSQL resolves them (`orders` is the sharded `app.orders` under
/// `search_path = app, public`, so rows land on their owners), and
/// undeclared views, inheritance children or partitions of a sharded table
/// are refused instead of being read or written on the home shard alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_search_path_and_views_are_refused() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.orders (id bigint PRIMARY KEY, v text);
         CREATE TABLE users (id bigint PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let (a, b) = keys(&snap, "app.orders");
    db.batch_execute("SET search_path = app, public")
        .await
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO orders (id, v) VALUES ({a}, 'a'), ({b}, 'b')"
    ))
    .await
    .unwrap();
    db.execute("UPDATE orders SET v = 'b2' WHERE id = $1", &[&b])
        .await
        .unwrap();
    for (i, k) in [(0, a), (1, b)] {
        let sql = format!("SELECT count(*) FROM app.orders WHERE id = {k}");
        assert_eq!(count_on(&c, i, &sql).await, 1, "s{i} lacks {k}");
    }
    let n: i64 = db
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // Inside a transaction, SET LOCAL is seen by the next statement.
    db.batch_execute("BEGIN; SET LOCAL search_path = public")
        .await
        .unwrap();
    let e = db
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01", "{e:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    // With search_path and another statement in one string: run statement
    // by statement, the SELECT routed under the new search_path (refused
    // before issue 14), so PostgreSQL's own answer.
    let e = db
        .batch_execute("SET search_path = public; SELECT count(*) FROM orders")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01", "{e:?}");
    // Views and inheritance children of a sharded table.
    db.batch_execute("SELECT set_config('search_path', 'public', false)")
        .await
        .unwrap();
    db.batch_execute(
        "CREATE VIEW users_v AS SELECT * FROM users;
         CREATE VIEW users_vv AS SELECT id FROM users_v;
         CREATE TABLE users_child () INHERITS (users);",
    )
    .await
    .unwrap();
    for sql in [
        "SELECT * FROM users_v",
        "SELECT * FROM users_vv WHERE id = 1",
        "INSERT INTO users_v (id, v) VALUES (1, 'x')",
        "SELECT * FROM public.users_child",
        "DELETE FROM users_child",
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(message(&e).contains("\"users\""), "{sql}: {}", message(&e));
    }
    let e = db.batch_execute("SELECT * FROM orders").await.unwrap_err();
    assert_eq!(code(&e), "42P01", "{e:?}");
    db.batch_execute(&format!("SELECT * FROM users WHERE id = {a}"))
        .await
        .unwrap();
}

/// A function whose body names a sharded table reads or writes rows the
/// router cannot place: a statement calling it is refused (it would run on
/// the home shard, or on its key's shard, and see that shard's rows only),
/// unless a hint names the shard. Other functions run as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_over_sharded_tables_are_refused_unless_hinted() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, v text);
         CREATE FUNCTION users_named(n text) RETURNS SETOF users LANGUAGE sql STABLE
             AS $$ SELECT * FROM Users WHERE v = n $$;
         CREATE FUNCTION bump(i bigint) RETURNS void LANGUAGE plpgsql
             AS $$ BEGIN UPDATE public.users SET v = v || '+' WHERE id = i; END $$;
         CREATE FUNCTION twice(i bigint) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$ SELECT i * 2 $$;",
    )
    .await
    .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let (a, b) = keys(&snap, "users");
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({a}, 'x'), ({b}, 'x')"
    ))
    .await
    .unwrap();
    for sql in [
        "SELECT count(*) FROM users_named('x')".to_string(),
        format!("SELECT bump({b})"),
        format!("SELECT bump(id) FROM users WHERE id = {a}"),
    ] {
        let e = db.simple_query(&sql).await.expect_err(&sql);
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(
            message(&e).contains("names sharded table"),
            "{sql}: {}",
            message(&e)
        );
        // The extended protocol too.
        let e = db.query(&sql, &[]).await.expect_err(&sql);
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
    }
    // Created and called in one string: the body is not in pg_proc yet
    // when the string is routed; it used to run on the home shard. (The
    // shape Sequelize's findOrCreate sends, one INSERT in a temporary
    // function, runs on its row's shard instead:
    // `routing::sequelize_find_or_create_runs_on_the_rows_shard`.)
    for (name, sql) in [
        (
            "ins",
            format!(
                "CREATE FUNCTION pg_temp.ins() RETURNS void LANGUAGE sql AS $f$ INSERT INTO users (id, v) VALUES ({b}, 'z') $f$; SELECT pg_temp.ins(); DROP FUNCTION pg_temp.ins()"
            ),
        ),
        (
            "Put",
            format!(
                "CREATE FUNCTION \"Put\"() RETURNS void LANGUAGE sql AS $$ INSERT INTO users (id, v) VALUES ({a}, 'z') $$; SELECT \"Put\"()"
            ),
        ),
    ] {
        let e = db.simple_query(&sql).await.expect_err(&sql);
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        let m = message(&e);
        assert!(m.contains("names sharded table") && m.contains(name), "{sql}: {m}");
    }
    // Nothing ran: no row was bumped or added anywhere.
    for i in 0..2 {
        assert_eq!(
            count_on(&c, i, "SELECT count(*) FROM users WHERE v = 'x'").await,
            1
        );
        assert_eq!(count_on(&c, i, "SELECT count(*) FROM users").await, 1);
    }
    // With a hint the user names the shard: it runs there.
    let s = owner(&snap, "users", KeyValue::Int8(b));
    db.batch_execute(&format!("/* hotrepart: shard=s{s} */ SELECT bump({b})"))
        .await
        .unwrap();
    assert_eq!(
        count_on(
            &c,
            s,
            &format!("SELECT count(*) FROM users WHERE id = {b} AND v = 'x+'")
        )
        .await,
        1
    );
    // A function that names no sharded table is fine.
    let n: i64 = db
        .query_one("SELECT twice($1)", &[&21i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 42);
}

/// Keywords are read as PostgreSQL lexes them: `RETURNING` in a literal
/// or a comment does not make two writes on several shards "return rows"
/// (the old text check refused them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_are_lexed_not_searched_in_the_text() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let (a, b) = keys(&snap, "users");
    db.batch_execute(&format!(
        "INSERT INTO users (id, v) VALUES ({a}, 'x'), ({b}, 'y')"
    ))
    .await
    .unwrap();
    db.batch_execute(
        "UPDATE users SET v = 'returning'; UPDATE users SET v = v || '!' /* RETURNING */",
    )
    .await
    .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM users WHERE v = 'returning!'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // A real RETURNING in such a string runs statement by statement (it
    // was refused before issue 14): its rows come back, as on PostgreSQL.
    let m = db
        .simple_query("UPDATE users SET v = v RETURNING id; UPDATE users SET v = v")
        .await
        .unwrap();
    let rows = m
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 2, "{m:?}");
}
