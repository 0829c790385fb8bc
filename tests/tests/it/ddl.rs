//! DDL on every shard: a schema change applies on all shards or none —
//! outside a transaction block (the node wraps it and commits with 2PC),
//! inside one (the client's COMMIT), with the simple and the extended
//! protocol — and what PostgreSQL cannot run inside a transaction (CREATE
//! INDEX CONCURRENTLY) still runs, its error naming where it applied.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use std::time::Duration;

async fn cluster() -> Cluster {
    Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 4".into(),
        users: String::new(),
        tail: String::new(),
    })
    .await
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

/// The columns of `table` on shard `i` (empty: no such table).
async fn columns(c: &Cluster, i: usize, table: &str) -> Vec<String> {
    c.direct(i)
        .await
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether index `name` exists (and is valid) on shard `i`.
async fn index_on(c: &Cluster, i: usize, name: &str) -> Option<bool> {
    c.direct(i)
        .await
        .query_opt(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// No transaction left prepared or open on any shard.
async fn nothing_left_open(c: &Cluster) {
    for i in 0..c.shards.len() {
        let d = c.direct(i).await;
        let n: i64 = d
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "prepared transactions on shard s{i}");
        wait_for(
            "no idle-in-transaction backend",
            Duration::from_secs(10),
            || async {
                let n: i64 = d
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                n == 0
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_table_that_fails_on_one_shard_creates_it_on_none() {
    let c = cluster().await;
    let db = c.connect().await;
    c.direct(1)
        .await
        .batch_execute("CREATE TABLE ddl_t (stray int)")
        .await
        .unwrap();
    let e = db
        .batch_execute("CREATE TABLE ddl_t (a int, b text)")
        .await
        .unwrap_err();
    let m = message(&e);
    assert_eq!(code(&e), "42P07", "{e:?}");
    assert!(
        m.contains("\"ddl_t\" already exists") && m.contains("s1"),
        "{m}"
    );
    assert!(!m.contains("did apply"), "nothing applied: {m}");
    assert_eq!(columns(&c, 0, "ddl_t").await, Vec::<String>::new());
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["stray"]);
    nothing_left_open(&c).await;
    // Without the stray table the same statement applies on both.
    c.direct(1)
        .await
        .batch_execute("DROP TABLE ddl_t")
        .await
        .unwrap();
    db.batch_execute("CREATE TABLE ddl_t (a int, b text)")
        .await
        .unwrap();
    for i in 0..2 {
        assert_eq!(columns(&c, i, "ddl_t").await, vec!["a", "b"], "shard s{i}");
    }
    nothing_left_open(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alter_table_that_fails_on_one_shard_changes_no_shard() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE ddl_t (a int)")
        .await
        .unwrap();
    // The column already exists on s1 only.
    c.direct(1)
        .await
        .batch_execute("ALTER TABLE ddl_t ADD COLUMN b int")
        .await
        .unwrap();
    let e = db
        .batch_execute("ALTER TABLE ddl_t ADD COLUMN b text, ADD COLUMN c int")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42701", "{e:?}");
    assert!(!message(&e).contains("did apply"), "{}", message(&e));
    assert_eq!(columns(&c, 0, "ddl_t").await, vec!["a"]);
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["a", "b"]);
    // A lock held on s1 by another session: the node's ALTER times out
    // there (lock_timeout set through the node) and is undone on s0.
    let holder = c.direct(1).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE ddl_t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    db.batch_execute("SET lock_timeout = '300ms'")
        .await
        .unwrap();
    let e = db
        .batch_execute("ALTER TABLE ddl_t ADD COLUMN d int")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55P03", "{e:?}");
    assert!(!message(&e).contains("did apply"), "{}", message(&e));
    assert_eq!(columns(&c, 0, "ddl_t").await, vec!["a"]);
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["a", "b"]);
    nothing_left_open(&c).await;
    db.batch_execute("ALTER TABLE ddl_t ADD COLUMN d int")
        .await
        .unwrap();
    assert_eq!(columns(&c, 0, "ddl_t").await, vec!["a", "d"]);
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["a", "b", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_in_a_transaction_block_commits_or_rolls_back_on_every_shard() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("BEGIN").await.unwrap();
    db.batch_execute("CREATE TABLE ddl_a (a int)")
        .await
        .unwrap();
    db.batch_execute("CREATE INDEX ddl_a_i ON ddl_a (a)")
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    for i in 0..2 {
        assert_eq!(columns(&c, i, "ddl_a").await, vec!["a"], "shard s{i}");
        assert_eq!(index_on(&c, i, "ddl_a_i").await, Some(true), "shard s{i}");
    }
    db.batch_execute("BEGIN").await.unwrap();
    db.batch_execute("CREATE TABLE ddl_b (a int); ALTER TABLE ddl_a ADD COLUMN b int")
        .await
        .unwrap();
    db.batch_execute("ROLLBACK").await.unwrap();
    for i in 0..2 {
        assert_eq!(
            columns(&c, i, "ddl_b").await,
            Vec::<String>::new(),
            "shard s{i}"
        );
        assert_eq!(columns(&c, i, "ddl_a").await, vec!["a"], "shard s{i}");
    }
    // An error on one shard fails the transaction: nothing applied, and
    // the error does not say otherwise.
    c.direct(1)
        .await
        .batch_execute("CREATE TABLE ddl_c (stray int)")
        .await
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    let e = db
        .batch_execute("CREATE TABLE ddl_c (a int)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P07", "{e:?}");
    assert!(!message(&e).contains("did apply"), "{}", message(&e));
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(columns(&c, 0, "ddl_c").await, Vec::<String>::new());
    nothing_left_open(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_index_concurrently_runs_outside_a_transaction_and_names_where_it_applied() {
    let c = cluster().await;
    let db = c.connect().await;
    db.batch_execute("CREATE TABLE ddl_t (a int, b int)")
        .await
        .unwrap();
    db.batch_execute("CREATE INDEX CONCURRENTLY ddl_t_a ON ddl_t (a)")
        .await
        .unwrap();
    for i in 0..2 {
        assert_eq!(index_on(&c, i, "ddl_t_a").await, Some(true), "shard s{i}");
    }
    // The name is taken on s1 only: it applies on s0, fails on s1, and
    // the error says so.
    c.direct(1)
        .await
        .batch_execute("CREATE INDEX ddl_t_b ON ddl_t (a)")
        .await
        .unwrap();
    let e = db
        .batch_execute("CREATE INDEX CONCURRENTLY ddl_t_b ON ddl_t (b)")
        .await
        .unwrap_err();
    let m = message(&e);
    assert_eq!(code(&e), "42P07", "{e:?}");
    assert!(
        m.contains("(on shard s1)")
            && m.contains("did apply on shard(s) s0 and not on shard(s) s1")
            && m.contains("run it again"),
        "{m}"
    );
    assert_eq!(index_on(&c, 0, "ddl_t_b").await, Some(true));
    // The same through the extended protocol.
    db.execute("DROP INDEX CONCURRENTLY ddl_t_a", &[])
        .await
        .unwrap();
    for i in 0..2 {
        assert_eq!(index_on(&c, i, "ddl_t_a").await, None, "shard s{i}");
    }
    // A temporary table (two-phase commit cannot prepare one) still runs.
    db.batch_execute("CREATE TEMP TABLE ddl_tmp (a int)")
        .await
        .unwrap();
    nothing_left_open(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_the_extended_protocol_is_atomic() {
    let c = cluster().await;
    let db = c.connect().await;
    c.direct(1)
        .await
        .batch_execute("CREATE TABLE ddl_t (stray int)")
        .await
        .unwrap();
    // No parameters: tokio-postgres still sends Parse/Bind/Execute/Sync.
    let e = db
        .execute("CREATE TABLE ddl_t (a int, b text)", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P07", "{e:?}");
    assert!(!message(&e).contains("did apply"), "{}", message(&e));
    assert_eq!(columns(&c, 0, "ddl_t").await, Vec::<String>::new());
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["stray"]);
    nothing_left_open(&c).await;
    c.direct(1)
        .await
        .batch_execute("DROP TABLE ddl_t")
        .await
        .unwrap();
    db.execute("CREATE TABLE ddl_t (a int, b text)", &[])
        .await
        .unwrap();
    c.direct(0)
        .await
        .batch_execute("ALTER TABLE ddl_t ADD COLUMN c int")
        .await
        .unwrap();
    let e = db
        .execute("ALTER TABLE ddl_t ADD COLUMN c int", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42701", "{e:?}");
    assert_eq!(columns(&c, 0, "ddl_t").await, vec!["a", "b", "c"]);
    assert_eq!(columns(&c, 1, "ddl_t").await, vec!["a", "b"]);
    nothing_left_open(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_a_shard_without_prepared_transactions_fails_cleanly() {
    let mut c = cluster().await;
    tokio::task::block_in_place(|| {
        c.shards[1]
            .restart_with("-c max_prepared_transactions=0")
            .unwrap()
    });
    let db = c.connect().await;
    let e = db
        .batch_execute("CREATE TABLE ddl_t (a int)")
        .await
        .unwrap_err();
    let m = message(&e);
    assert_eq!(code(&e), "55000", "{e:?}");
    assert!(
        m.contains("prepared transactions are disabled")
            && m.contains("s1")
            && m.contains("rolled back")
            && m.contains("max_prepared_transactions > 0"),
        "{m}"
    );
    for i in 0..2 {
        assert_eq!(
            columns(&c, i, "ddl_t").await,
            Vec::<String>::new(),
            "shard s{i}"
        );
    }
    nothing_left_open(&c).await;
}

/// DDL on a temporary table runs on the shard that holds it, the home
/// shard, alone (`router/src/route/analyze/temp.rs`). Before, `CREATE TEMP
/// TABLE` made it on every shard, and `DROP TABLE tmp` was wrapped for
/// two-phase commit, which PostgreSQL refuses for temporary objects (0A000,
/// "run it on each shard with SET hotrepart.shard").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_a_temporary_table_runs_on_its_shard() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_mode = \"session\"\npool_size = 4".into(),
        users: String::new(),
        tail: String::new(),
    })
    .await;
    let db = c.connect().await;
    db.batch_execute("CREATE TEMP TABLE ddl_tmp (a int)")
        .await
        .unwrap();
    let temp_tables = |i: usize| {
        let c = &c;
        async move {
            c.direct(i)
                .await
                .query_one(
                    "SELECT count(*) FROM pg_class WHERE relname = 'ddl_tmp' AND relpersistence = 't'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!((temp_tables(0).await, temp_tables(1).await), (1, 0));
    db.batch_execute("ALTER TABLE ddl_tmp ADD COLUMN b int; CREATE INDEX ON ddl_tmp (b)")
        .await
        .unwrap();
    db.batch_execute("DROP TABLE ddl_tmp").await.unwrap();
    assert_eq!((temp_tables(0).await, temp_tables(1).await), (0, 0));
    nothing_left_open(&c).await;
}

/// A unique index of a sharded table that leaves out the shard key would
/// be enforced by each shard on its own rows only (two shards holding the
/// same email; `ON CONFLICT (email)` missing the other shard's row): every
/// form that makes one is refused and rolled back on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_indexes_of_sharded_tables_must_include_the_key() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 4".into(),
        users: String::new(),
        tail: "[[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
    })
    .await;
    let db = c.connect().await;
    // CREATE TABLE of the declared table with a UNIQUE column: not created.
    let e = db
        .batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, email text UNIQUE)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let m = message(&e);
    assert!(
        m.contains("users_email_key") && m.contains("shard key \"id\""),
        "{m}"
    );
    for i in 0..2 {
        assert!(columns(&c, i, "users").await.is_empty(), "shard {i}");
    }
    db.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, email text, org int)")
        .await
        .unwrap();
    // Each form, outside and inside a transaction block, simple and
    // extended protocol.
    for (sql, index) in [
        ("CREATE UNIQUE INDEX u_email ON users (email)", "u_email"),
        (
            "CREATE UNIQUE INDEX u_lower ON users (lower(email))",
            "u_lower",
        ),
        (
            "CREATE UNIQUE INDEX u_incl ON users (email) INCLUDE (id)",
            "u_incl",
        ),
        (
            "ALTER TABLE users ADD CONSTRAINT u_c UNIQUE (email, org)",
            "u_c",
        ),
        (
            "ALTER TABLE users ADD COLUMN code text UNIQUE",
            "users_code_key",
        ),
        (
            "ALTER TABLE users ADD CONSTRAINT u_x EXCLUDE USING btree (org WITH =)",
            "u_x",
        ),
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(message(&e).contains(index), "{sql}: {}", message(&e));
        let e = db.execute(sql, &[]).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql} (extended): {e:?}");
        // In a block: refused at the statement (CREATE UNIQUE INDEX, read
        // by the router) or at COMMIT (the others, seen in the catalog).
        let e = match db.batch_execute(&format!("BEGIN; {sql}")).await {
            Err(e) => {
                db.batch_execute("ROLLBACK").await.unwrap();
                e
            }
            Ok(()) => db.batch_execute("COMMIT").await.unwrap_err(),
        };
        assert_eq!(code(&e), "0A000", "{sql} in a block: {e:?}");
        for i in 0..2 {
            assert_eq!(index_on(&c, i, index).await, None, "{sql} on shard {i}");
        }
    }
    // Outside a transaction (CONCURRENTLY runs shard by shard, not undone
    // by a rollback): refused before it runs. Beside a write in one string.
    for (sql, index) in [
        (
            "CREATE UNIQUE INDEX CONCURRENTLY u_conc ON users (email)",
            "u_conc",
        ),
        (
            "CREATE UNIQUE INDEX u_mix ON users (email); UPDATE users SET org = 1",
            "u_mix",
        ),
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        for i in 0..2 {
            assert_eq!(index_on(&c, i, index).await, None, "{sql} on shard {i}");
        }
    }
    // Another search_path (a table of the same name in another schema
    // first): the declared table, public.users, is the one checked.
    db.batch_execute(
        "CREATE SCHEMA other; CREATE TABLE other.users (id int, email text); SET search_path = other, public",
    )
    .await
    .unwrap();
    let e = db
        .batch_execute("ALTER TABLE public.users ADD CONSTRAINT u_sp UNIQUE (email)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    db.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(columns(&c, 0, "users").await, ["id", "email", "org"]);
    // With the key, or on an undeclared table, it is PostgreSQL's.
    db.batch_execute(
        "CREATE UNIQUE INDEX u_ok ON users (email, id); \
         ALTER TABLE users ADD CONSTRAINT u_ok2 UNIQUE (id, org); \
         CREATE TABLE plain (id int, email text UNIQUE)",
    )
    .await
    .unwrap();
    for i in 0..2 {
        assert_eq!(index_on(&c, i, "u_ok").await, Some(true), "shard {i}");
        assert_eq!(index_on(&c, i, "u_ok2").await, Some(true), "shard {i}");
    }
    nothing_left_open(&c).await;
}

/// Foreign keys are checked by each shard on its own rows: between
/// co-located sharded tables (the referencing rows sit with the rows they
/// reference) and towards a reference table (a copy on every shard) they
/// hold as on PostgreSQL; towards a sharded table from a table whose rows
/// live elsewhere (an undeclared table, a table sharded by another key)
/// the shard cannot see the referenced row: PostgreSQL's own 23503 there,
/// never a row that breaks the constraint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_hold_between_co_located_tables_and_towards_reference_tables() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "pool_size = 4\nreference_tables = [\"countries\"]".into(),
        users: String::new(),
        tail: "[[sharded_tables]]\nname = \"authors\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"books\"\nkey = \"author_id\"\ntype = \"int8\"\n"
            .into(),
    })
    .await;
    let db = c.connect().await;
    db.batch_execute(
        "CREATE TABLE countries (code text PRIMARY KEY); \
         CREATE TABLE authors (id bigint PRIMARY KEY, country text REFERENCES countries); \
         CREATE TABLE books (author_id bigint NOT NULL REFERENCES authors, n int, PRIMARY KEY (author_id, n)); \
         CREATE TABLE notes (book_author bigint REFERENCES authors, t text)",
    )
    .await
    .unwrap();
    db.batch_execute("INSERT INTO countries VALUES ('FR'), ('JP')")
        .await
        .unwrap();
    let snap = c.node.routing.catalog.load_full();
    let on = |k: i64| {
        snap.range_for_key("authors", &hotrepart_router::catalog::KeyValue::Int8(k))
            .unwrap()
            .write_owner
            .as_str()
            .to_owned()
    };
    let a0 = (1..1000).find(|&k| on(k) == "s0").unwrap();
    let a1 = (1..1000).find(|&k| on(k) == "s1").unwrap();
    db.batch_execute(&format!(
        "INSERT INTO authors VALUES ({a0}, 'FR'), ({a1}, 'JP'); \
         INSERT INTO books VALUES ({a0}, 1), ({a1}, 1), ({a1}, 2)"
    ))
    .await
    .unwrap();
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_owned());
    // Co-located and reference: PostgreSQL's checks, on every shard.
    for sql in [
        "INSERT INTO books VALUES (999999, 1)".to_string(),
        "INSERT INTO authors VALUES (424242, 'XX')".to_string(),
        format!("DELETE FROM authors WHERE id = {a1}"),
    ] {
        let e = db.batch_execute(&sql).await.unwrap_err();
        assert_eq!(code(e).as_deref(), Some("23503"), "{sql}");
    }
    // From an undeclared table (home shard s0): a row of s1 is not seen.
    db.batch_execute(&format!("INSERT INTO notes VALUES ({a0}, 'ok')"))
        .await
        .unwrap();
    let e = db
        .batch_execute(&format!("INSERT INTO notes VALUES ({a1}, 'elsewhere')"))
        .await
        .unwrap_err();
    assert_eq!(code(e).as_deref(), Some("23503"));
    let n: i64 = db
        .query_one("SELECT count(*) FROM books", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}
