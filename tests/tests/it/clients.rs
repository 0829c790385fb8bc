//! Real command-line clients (psql, pgbench, libpq TLS) against a real node
//! in front of real PostgreSQL: what a user sees through the node must be
//! what they see when talking to PostgreSQL directly.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use std::path::Path;
use std::time::Instant;

/// libpq key/value connection string to the node.
fn node_conninfo(c: &Cluster, dbname: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={USER} dbname={dbname} {extra}",
        c.addr.port()
    )
}

/// libpq key/value connection string straight to shard 0 (superuser).
fn shard_conninfo(c: &Cluster, dbname: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={dbname}",
        c.shards[0].port
    )
}

async fn psql(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    run_cmd(&pg_tool("psql"), args, env).await
}

/// A psql script touching what psql users do: DDL, NULLs, unicode, numeric,
/// timestamps with a session time zone, errors (with position and detail),
/// a failed transaction, savepoints, multi-statement queries, COPY FROM
/// STDIN inline (good and failing), COPY TO STDOUT, notices and warnings.
/// `<TAB>` stands for a tab character.
const SCRIPT: &str = r#"\set ON_ERROR_STOP 0
DROP TABLE IF EXISTS items;
CREATE TABLE items (
  id int PRIMARY KEY,
  name text,
  price numeric(14,4),
  qty bigint,
  created timestamptz,
  tags text[],
  meta jsonb
);
SET TimeZone = 'Asia/Kolkata';
INSERT INTO items VALUES
  (1, 'plain', 10.5, 3, '2024-01-02 03:04:05+00', '{a,b}', '{"k": 1}'),
  (2, NULL, NULL, NULL, NULL, NULL, NULL),
  (3, 'ünïcødé ✓ 日本語 🐘', 123456789.1234, -9223372036854775808, '1999-12-31 23:59:59.999999+05:30', '{"x y",NULL}', '{"nested": {"a": [1, 2, null]}}'),
  (4, 'tab<TAB>and ''quote''', -0.0001, 0, 'infinity', '{}', 'null');
SELECT * FROM items ORDER BY id;
SELECT id, name IS NULL AS name_null, price * 2 AS double_price, created AT TIME ZONE 'UTC' AS utc
  FROM items ORDER BY id DESC;
SELEC 1;
SELECT 1/0;
SELECT * FROM no_such_table;
BEGIN;
INSERT INTO items (id, name) VALUES (5, 'in tx');
INSERT INTO items (id, name) VALUES (1, 'duplicate');
SELECT count(*) FROM items;
ROLLBACK;
SELECT count(*) FROM items;
\set VERBOSITY verbose
BEGIN;
INSERT INTO items (id, name) VALUES (6, 'kept');
SAVEPOINT sp;
INSERT INTO items (id, name) VALUES (6, 'dup');
ROLLBACK TO SAVEPOINT sp;
INSERT INTO items (id, name) VALUES (7, 'also kept');
COMMIT;
\set VERBOSITY default
SELECT 1 AS a \; SELECT 2 AS b \; SELECT 3/0 AS c \; SELECT 4 AS d;
SELECT 5 AS after_multi;
COPY items (id, name, price, qty, created, tags, meta) FROM STDIN;
10<TAB>copied<TAB>1.5<TAB>7<TAB>2024-06-01 12:00:00+00<TAB>{c}<TAB>{"c": true}
11<TAB>\N<TAB>\N<TAB>\N<TAB>\N<TAB>\N<TAB>\N
12<TAB>ü ✓<TAB>0<TAB>1<TAB>2000-01-01 00:00:00+00<TAB>{}<TAB>[]
\.
SELECT * FROM items WHERE id >= 10 ORDER BY id;
COPY items (id, name) FROM STDIN;
20<TAB>ok
not_a_number<TAB>bad
21<TAB>after
\.
SELECT count(*) FROM items;
BEGIN;
COPY items (id, name) FROM STDIN;
30<TAB>in a transaction
\.
SELECT count(*) FROM items;
COMMIT;
COPY (SELECT id, name, price, created FROM items ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER);
DO $$ BEGIN RAISE NOTICE 'notice from %', 'plpgsql'; RAISE WARNING 'a warning'; END $$;
SHOW TimeZone;
SELECT string_agg(name, '|' ORDER BY id) FROM items;
\echo done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_same_output_as_direct() {
    let c = Cluster::start(Opts::default()).await;
    let admin = c.direct(0).await;
    for db in ["direct_db", "node_db"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
    }
    let dir = TestDir::new("psql-script");
    let script = dir.0.join("script.sql");
    std::fs::write(&script, SCRIPT.replace("<TAB>", "\t")).unwrap();
    let script = script.display().to_string();
    let run = |conninfo: String, password: &'static str| {
        let script = script.clone();
        async move {
            let start = Instant::now();
            let r = psql(
                &[
                    "-X",
                    "-w",
                    "-v",
                    "ON_ERROR_STOP=0",
                    "-f",
                    &script,
                    &conninfo,
                ],
                &[("PGPASSWORD", password), ("PGSSLMODE", "disable")],
            )
            .await;
            eprintln!("psql run took {:?}", start.elapsed());
            r
        }
    };
    let direct = run(shard_conninfo(&c, "direct_db"), PG_PASSWORD).await;
    let node = run(node_conninfo(&c, "node_db", ""), PASSWORD).await;
    // Only the database name could legitimately differ; the script never
    // prints it, but normalise anyway.
    let norm = |s: &str| s.replace("direct_db", "<db>").replace("node_db", "<db>");
    let (d_out, d_err) = (norm(&direct.1), norm(&direct.2));
    let (n_out, n_err) = (norm(&node.1), norm(&node.2));
    // Sanity: the script did what it should when run directly.
    assert!(d_out.contains("ünïcødé ✓ 日本語 🐘"), "{d_out}");
    assert!(d_out.contains("\ndone\n"), "{d_out}");
    assert!(d_out.contains("30,in a transaction"), "{d_out}");
    assert!(d_err.contains("ERROR:  division by zero"), "{d_err}");
    assert!(d_err.contains("duplicate key value"), "{d_err}");
    assert!(
        d_err.contains("invalid input syntax for type integer"),
        "{d_err}"
    );
    assert!(d_err.contains("NOTICE:  notice from plpgsql"), "{d_err}");
    assert_eq!(
        direct.0, node.0,
        "exit status differs\n--- direct stderr\n{d_err}\n--- node stderr\n{n_err}"
    );
    assert_eq!(
        d_out, n_out,
        "stdout differs\n--- direct\n{d_out}\n--- node\n{n_out}\n--- node stderr\n{n_err}"
    );
    assert_eq!(
        d_err, n_err,
        "stderr differs\n--- direct\n{d_err}\n--- node\n{n_err}"
    );
    // The node's copy really is in node_db and the direct one in direct_db.
    for db in ["direct_db", "node_db"] {
        let (ok, out, err) = psql(
            &[
                "-X",
                "-w",
                "-At",
                "-c",
                "SELECT count(*) FROM items",
                &shard_conninfo(&c, db),
            ],
            &[("PGPASSWORD", PG_PASSWORD), ("PGSSLMODE", "disable")],
        )
        .await;
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "10", "{db}");
    }
}

/// Runs pgbench through the node; returns its stdout after checking that it
/// succeeded without failed transactions.
async fn pgbench(c: &Cluster, args: &[&str]) -> String {
    let conninfo = node_conninfo(c, "postgres", "");
    let mut all: Vec<&str> = args.to_vec();
    all.push(&conninfo);
    let start = Instant::now();
    let (ok, out, err) = run_cmd(
        &pg_tool("pgbench"),
        &all,
        &[("PGPASSWORD", PASSWORD), ("PGSSLMODE", "disable")],
    )
    .await;
    eprintln!("pgbench {args:?} took {:?}", start.elapsed());
    assert!(
        ok,
        "pgbench {args:?} failed\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    out + &err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_all_modes_zero_failures() {
    let c = Cluster::start(Opts::default()).await;
    let init = pgbench(&c, &["-i", "-s", "1"]).await;
    assert!(init.contains("done in"), "{init}");
    // the data really is there, on the shard
    let direct = c.direct(0).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100_000);
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut args = vec!["-M", mode, "-c", "8", "-j", "2", "-T", "3"];
            if select_only {
                args.push("-S");
            }
            let out = pgbench(&c, &args).await;
            assert!(
                out.contains("number of failed transactions: 0 "),
                "{args:?}\n{out}"
            );
            assert!(out.contains("\ntps = "), "{args:?}\n{out}");
            let processed = out
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{args:?}: no processed count\n{out}"));
            assert!(processed > 0, "{args:?}\n{out}");
            assert!(
                out.contains(&format!("query mode: {mode}")),
                "{args:?}\n{out}"
            );
        }
    }
    // The TPC-B runs kept the invariant: sum of balances equal across tables
    // (pgbench_history is truncated by each run's initial vacuum step).
    let r = direct
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint,
                    (SELECT sum(tbalance) FROM pgbench_tellers)::bigint,
                    (SELECT sum(bbalance) FROM pgbench_branches)::bigint",
            &[],
        )
        .await
        .unwrap();
    let sums: Vec<i64> = (0..3).map(|i| r.get(i)).collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
}

/// pgbench -M prepared prepares each client's statements with a blocking
/// call in the thread that also drives its other clients. With more clients
/// than backends, the backends are held by that thread's clients inside
/// their transactions while it blocks: a Parse that waited for a backend
/// would deadlock until the pool timeout. The node answers a Parse of a
/// statement its pool has already validated without a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_more_clients_than_backends() {
    let c = Cluster::start(Opts {
        extra: "pool_size = 3\npool_timeout_ms = 3000\n".into(),
        ..Opts::default()
    })
    .await;
    pgbench(&c, &["-i", "-s", "1"]).await;
    for script in ["-N", "-S"] {
        let args = ["-M", "prepared", script, "-c", "24", "-j", "1", "-T", "4"];
        let out = pgbench(&c, &args).await;
        assert!(
            out.contains("number of failed transactions: 0 "),
            "{args:?}\n{out}"
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{args:?}: no processed count\n{out}"));
        assert!(processed >= 24, "{args:?}\n{out}");
    }
    // never more than the pool's backends on the shard
    // (the node's 2PC resolver has a connection of its own, not pooled)
    let direct = c.direct(0).await;
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> 'hotrepart resolver'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 3, "{n} backends for a pool of 3");
}

/// Generates a self-signed certificate for CN=localhost with the openssl CLI.
fn make_cert(dir: &Path) -> (String, String) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-subj", "/CN=localhost"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the openssl CLI ({e}); install it (deploy/setup.sh does)")
        });
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured_and_refused_otherwise() {
    let certs = TestDir::new("tls");
    let (cert, key) = make_cert(&certs.0);
    // `extra` goes before [[shards]]; a [tls] table is fine there as long as
    // it is the last thing in `extra`.
    let c = Cluster::start(Opts {
        extra: format!(
            "pool_size = 4\nadmin_users = [\"{USER}\"]\n[tls]\ncert = {cert:?}\nkey = {key:?}\n"
        ),
        ..Opts::default()
    })
    .await;
    let env = [("PGPASSWORD", PASSWORD)];
    let q = ["-X", "-w", "-At", "-c", "SELECT 42", "-c", "\\conninfo"];
    let with = |ci: String| {
        let mut v: Vec<String> = q.iter().map(|s| s.to_string()).collect();
        v.push(ci);
        v
    };
    // sslmode=require: TLS, and SCRAM over it.
    let args = with(node_conninfo(&c, "postgres", "sslmode=require"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = psql(&args, &env).await;
    assert!(ok, "sslmode=require through a TLS node failed: {err}");
    assert!(out.starts_with("42\n"), "{out}");
    assert!(out.contains("SSL connection (protocol: TLS"), "{out}");
    // verify-full with the certificate as root: the node presents it.
    let args = with(node_conninfo(
        &c,
        "postgres",
        &format!("sslmode=verify-full sslrootcert={cert} host=localhost hostaddr=127.0.0.1"),
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = psql(&args, &env).await;
    assert!(ok, "sslmode=verify-full through a TLS node failed: {err}");
    assert!(out.starts_with("42\n"), "{out}");
    assert!(out.contains("SSL connection"), "{out}");
    // The admin console's SHOW CLIENTS shows the TLS session's protocol
    // and cipher suite (its own row, here).
    let ci = node_conninfo(&c, "hotrepart", "sslmode=require");
    let (ok, out, err) = psql(&["-X", "-w", "-At", "-c", "SHOW CLIENTS", &ci], &env).await;
    assert!(ok, "SHOW CLIENTS over TLS failed: {err}");
    assert!(out.contains("|TLSv1.3/TLS13_"), "{out}");
    // sslmode=disable still works on a TLS node, in plain text.
    let args = with(node_conninfo(&c, "postgres", "sslmode=disable"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = psql(&args, &env).await;
    assert!(ok, "sslmode=disable through a TLS node failed: {err}");
    assert!(out.starts_with("42\n"), "{out}");
    assert!(!out.contains("SSL connection"), "{out}");
    // wrong password over TLS is still refused
    let args = with(node_conninfo(&c, "postgres", "sslmode=require"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = psql(&args, &[("PGPASSWORD", "wrong")]).await;
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
    drop(c);

    // A node without [tls]: require is refused, prefer falls back to plain.
    let plain = Cluster::start(Opts::default()).await;
    let args = with(node_conninfo(&plain, "postgres", "sslmode=require"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = psql(&args, &env).await;
    assert!(!ok, "sslmode=require succeeded without TLS: {out}");
    assert!(err.contains("server does not support SSL"), "{err}");
    let args = with(node_conninfo(&plain, "postgres", "sslmode=prefer"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = psql(&args, &env).await;
    assert!(ok, "sslmode=prefer without TLS failed: {err}");
    assert!(out.starts_with("42\n"), "{out}");
    assert!(!out.contains("SSL connection"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_through_psql() {
    let c = Cluster::start(Opts::default()).await;
    let ci = node_conninfo(&c, "postgres", "sslmode=disable");
    let args = ["-X", "-w", "-At", "-c", "SELECT current_user", &ci];
    // wrong password
    let (ok, out, err) = psql(&args, &[("PGPASSWORD", "not-the-password")]).await;
    assert!(!ok, "wrong password accepted: {out}");
    assert!(
        err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
    // no password at all (-w: never prompt)
    let (ok, _, err) = psql(&args, &[]).await;
    assert!(!ok);
    assert!(err.contains("no password supplied"), "{err}");
    // right password; the node logs in to the shard as its server_user
    let (ok, out, err) = psql(&args, &[("PGPASSWORD", PASSWORD)]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "postgres\n");
    // password in a URL works too
    let (ok, out, err) = psql(
        &["-X", "-w", "-At", "-c", "SELECT 1", &c.dsn()],
        &[("PGSSLMODE", "disable")],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "1\n");
    // unknown role
    let (ok, _, err) = psql(
        &[
            "-X",
            "-w",
            "-At",
            "-c",
            "SELECT 1",
            &c.dsn_for("nobody", "x"),
        ],
        &[("PGSSLMODE", "disable")],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("password authentication failed for user \"nobody\""),
        "{err}"
    );
}

/// pgbench's four tables sharded over two shards, each by its own key
/// (built-in hash, one seed: co-located by key value).
fn pgbench_sharded() -> Opts {
    let mut tail = String::new();
    for (table, key) in [
        ("pgbench_accounts", "aid"),
        ("pgbench_branches", "bid"),
        ("pgbench_tellers", "tid"),
        ("pgbench_history", "aid"),
    ] {
        tail.push_str(&format!(
            "[[sharded_tables]]\nname = \"{table}\"\nkey = \"{key}\"\ntype = \"int4\"\n"
        ));
    }
    Opts {
        shards: 2,
        tail,
        ..Opts::default()
    }
}

/// `pgbench -i` through a two-shard node (its `COPY … (FREEZE ON)`, and
/// whatever else the parser cannot read, reaches PostgreSQL), then the
/// select-only and the default TPC-B scripts run without a failed
/// transaction; every row is on the shard that owns its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_init_and_run_on_two_shards() {
    let c = Cluster::start(pgbench_sharded()).await;
    let init = pgbench(&c, &["-i", "-s", "1"]).await;
    assert!(init.contains("done in"), "{init}");
    let snap = c.node.routing.catalog.load();
    let mut total = 0;
    for (i, name) in ["s0", "s1"].into_iter().enumerate() {
        let direct = c.direct(i).await;
        // Every account on this shard is one it owns.
        let aids: Vec<i32> = direct
            .query("SELECT aid FROM pgbench_accounts", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!aids.is_empty(), "no account on {name}");
        for aid in &aids {
            let owner = snap
                .range_for_key(
                    "pgbench_accounts",
                    &hotrepart_router::catalog::KeyValue::Int4(*aid),
                )
                .unwrap()
                .write_owner
                .as_str()
                .to_owned();
            assert_eq!(owner, name, "account {aid}");
        }
        total += aids.len();
    }
    assert_eq!(total, 100_000);
    for args in [
        &["-S", "-c", "4", "-j", "2", "-T", "3"][..],
        &["-c", "4", "-j", "2", "-T", "3"][..],
    ] {
        let out = pgbench(&c, args).await;
        assert!(
            out.contains("number of failed transactions: 0 "),
            "{args:?}\n{out}"
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{args:?}: no processed count\n{out}"));
        assert!(processed > 0, "{args:?}\n{out}");
    }
    // TPC-B keeps the sums of balances equal across the three tables.
    let through = c.connect().await;
    let r = through
        .query_one("SELECT sum(abalance) FROM pgbench_accounts", &[])
        .await
        .unwrap();
    let a: i64 = r.get(0);
    let t: i64 = through
        .query_one("SELECT sum(tbalance) FROM pgbench_tellers", &[])
        .await
        .unwrap()
        .get(0);
    let b: i64 = through
        .query_one("SELECT sum(bbalance) FROM pgbench_branches", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((a, t), (b, b));
}

/// What the parser cannot read still reaches PostgreSQL through a
/// two-shard node when routing needs nothing from it: a syntax error comes
/// back in PostgreSQL's words (as directly), schema statements the parser
/// does not know run on every shard, and a statement naming a sharded table
/// that cannot be read is refused, naming the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsed_statements_reach_postgresql_on_two_shards() {
    let c = Cluster::start(pgbench_sharded()).await;
    let node = c.connect().await;
    let direct = c.direct(0).await;
    let db_err = |e: tokio_postgres::Error| {
        let d = e.as_db_error().cloned().expect("a server error");
        (d.code().code().to_owned(), d.message().to_owned())
    };
    for bad in [
        "SELEC 1",
        "SELECT * FROM nowhere WHERE",
        "SELECT 'unterminated",
        "CREATE TABEL t (a int)",
    ] {
        let through = db_err(node.simple_query(bad).await.unwrap_err());
        let want = db_err(direct.simple_query(bad).await.unwrap_err());
        assert_eq!(through.0, "42601", "{bad}");
        if bad.starts_with("CREATE") {
            // Every shard ran it; the node names the shard that answered.
            assert_eq!(through.0, want.0, "{bad}");
            assert!(through.1.starts_with(&want.1), "{bad}: {through:?}");
        } else {
            assert_eq!(through, want, "{bad}");
        }
    }
    node.batch_execute(
        "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, abalance int);
         CREATE TABLE notes (id int)",
    )
    .await
    .unwrap();
    // Schema statements the parser cannot read: every shard.
    for sql in [
        "COMMENT ON TABLE pgbench_accounts IS 'sharded by aid'",
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'mood') THEN CREATE TYPE mood AS ENUM ('ok'); END IF; END $$",
    ] {
        node.simple_query(sql).await.unwrap();
    }
    for i in 0..2 {
        let d = c.direct(i).await;
        let r = d
            .query_one(
                "SELECT obj_description('pgbench_accounts'::regclass), to_regtype('mood') IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            r.get::<_, Option<String>>(0).as_deref(),
            Some("sharded by aid"),
            "s{i}"
        );
        assert!(r.get::<_, bool>(1), "type on s{i}");
    }
    // Not naming a sharded table: the home shard runs it.
    node.simple_query("DO $$ BEGIN INSERT INTO notes VALUES (1); END $$")
        .await
        .unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Naming one: refused with the table's name, nothing runs.
    for sql in [
        "DO $$ BEGIN INSERT INTO pgbench_accounts VALUES (1, 0); END $$",
        "MERGE INTO public.pgbench_accounts a USING notes n ON a.aid = n.id WHEN NOT MATCHED THEN INSERT VALUES (n.id, 0)",
    ] {
        let (code, msg) = db_err(node.simple_query(sql).await.unwrap_err());
        assert_eq!(code, "0A000", "{sql}: {msg}");
        assert!(msg.contains("\"pgbench_accounts\"") && msg.contains("cannot route"), "{msg}");
    }
    let n: i64 = node
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// CREATE/DROP DATABASE through a two-shard node: on every shard, one at a
/// time; a failure names the shards where it ran and did not; a retry
/// finishes the job; what is already so everywhere gets PostgreSQL's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_drop_database_on_every_shard() {
    let c = Cluster::start(pgbench_sharded()).await;
    let node = c.connect().await;
    let exists = |name: &'static str| {
        let c = &c;
        async move {
            let mut v = Vec::new();
            for i in 0..2 {
                let n: i64 = c
                    .direct(i)
                    .await
                    .query_one(
                        "SELECT count(*) FROM pg_database WHERE datname = $1",
                        &[&name],
                    )
                    .await
                    .unwrap()
                    .get(0);
                v.push(n == 1);
            }
            v
        }
    };
    let db_err = |e: tokio_postgres::Error| {
        let d = e.as_db_error().cloned().expect("a server error");
        (d.code().code().to_owned(), d.message().to_owned())
    };
    node.simple_query("CREATE DATABASE shop").await.unwrap();
    assert_eq!(exists("shop").await, [true, true]);
    // A client of the new database through the node.
    {
        let dsn = c.dsn().replace("/postgres", "/shop");
        let shop = connect(&dsn).await.unwrap();
        shop.batch_execute("CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, abalance int)")
            .await
            .unwrap();
        shop.batch_execute(
            "INSERT INTO pgbench_accounts (aid, abalance) VALUES (1, 10), (2, 20), (3, 30), (4, 40)",
        )
        .await
        .unwrap();
        let n: i64 = shop
            .query_one("SELECT count(*) FROM pgbench_accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 4);
    }
    // Already on every shard: PostgreSQL's error, as directly.
    let through = db_err(node.simple_query("CREATE DATABASE shop").await.unwrap_err());
    let direct = db_err(
        c.direct(0)
            .await
            .simple_query("CREATE DATABASE shop")
            .await
            .unwrap_err(),
    );
    assert_eq!(through, direct);
    // A failure on the second shard: reported with where it ran; after the
    // cause is fixed, a retry finishes the job.
    c.direct(0)
        .await
        .batch_execute("CREATE DATABASE tpl")
        .await
        .unwrap();
    let (code, msg) = db_err(
        node.simple_query("CREATE DATABASE shop2 TEMPLATE tpl")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, "3D000", "{msg}");
    assert!(
        msg.contains("tpl") && msg.contains("on shard s1") && msg.contains("done on shard(s) s0"),
        "{msg}"
    );
    assert_eq!(exists("shop2").await, [true, false]);
    c.direct(1)
        .await
        .batch_execute("CREATE DATABASE tpl")
        .await
        .unwrap();
    node.simple_query("CREATE DATABASE shop2 TEMPLATE tpl")
        .await
        .unwrap();
    assert_eq!(exists("shop2").await, [true, true]);
    // DROP: the node's own pooled connections to it do not stand in the way.
    node.simple_query("DROP DATABASE shop").await.unwrap();
    assert_eq!(exists("shop").await, [false, false]);
    let through = db_err(node.simple_query("DROP DATABASE shop").await.unwrap_err());
    let direct = db_err(
        c.direct(0)
            .await
            .simple_query("DROP DATABASE shop")
            .await
            .unwrap_err(),
    );
    assert_eq!(through, direct);
    node.simple_query("DROP DATABASE IF EXISTS shop")
        .await
        .unwrap();
    // Dropped on one shard by hand: the node's DROP finishes the job.
    c.direct(0)
        .await
        .batch_execute("DROP DATABASE shop2")
        .await
        .unwrap();
    node.simple_query("DROP DATABASE shop2").await.unwrap();
    assert_eq!(exists("shop2").await, [false, false]);
    // Not in a transaction block, as PostgreSQL says.
    node.batch_execute("BEGIN").await.unwrap();
    let (code, _) = db_err(
        node.simple_query("CREATE DATABASE shop3")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, "25001");
    node.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(exists("shop3").await, [false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_a_rotated_tls_certificate() {
    let certs = TestDir::new("tls-reload");
    let first = certs.0.join("first");
    std::fs::create_dir_all(&first).unwrap();
    let (cert_a, _) = make_cert(&first);
    // The node's files are those at `cert`/`key`: first certificate A.
    let (cert, key) = (certs.0.join("cert.pem"), certs.0.join("key.pem"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(first.join("key.pem"), &key).unwrap();
    let c = Cluster::start(Opts {
        extra: format!(
            "admin_users = [\"{USER}\"]\n[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        ..Opts::default()
    })
    .await;
    // The same configuration, in a file the node reloads.
    let file = certs.0.join("node.toml");
    let mut text = String::from("listen = \"127.0.0.1:0\"\n");
    text.push_str(&format!(
        "admin_users = [\"{USER}\"]\n[tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    for (i, s) in c.shards.iter().enumerate() {
        text.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    text.push_str(&format!(
        "[[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD)
    ));
    std::fs::write(&file, text).unwrap();
    c.node.config_file.set(file).unwrap();
    let env = [("PGPASSWORD", PASSWORD)];
    let verify = |root: &Path| {
        node_conninfo(
            &c,
            "postgres",
            &format!(
                "sslmode=verify-full sslrootcert={} host=localhost hostaddr=127.0.0.1",
                root.display()
            ),
        )
    };
    let (ok, out, err) = psql(
        &[
            "-X",
            "-w",
            "-At",
            "-c",
            "SELECT 1",
            &verify(Path::new(&cert_a)),
        ],
        &env,
    )
    .await;
    assert!(ok && out.starts_with('1'), "certificate A: {err}");
    let before = c.connect().await;
    // Rotate: certificate B at the same paths, then RELOAD.
    let second = certs.0.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let (cert_b, _) = make_cert(&second);
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(second.join("key.pem"), &key).unwrap();
    let admin = connect(&format!(
        "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/hotrepart",
        c.addr.port()
    ))
    .await
    .unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    let (ok, out, err) = psql(
        &[
            "-X",
            "-w",
            "-At",
            "-c",
            "SELECT 2",
            &verify(Path::new(&cert_b)),
        ],
        &env,
    )
    .await;
    assert!(
        ok && out.starts_with('2'),
        "certificate B after RELOAD: {err}"
    );
    let (ok, _, err) = psql(
        &[
            "-X",
            "-w",
            "-At",
            "-c",
            "SELECT 3",
            &verify(Path::new(&cert_a)),
        ],
        &env,
    )
    .await;
    assert!(!ok, "the old certificate is still served");
    assert!(err.contains("certificate"), "{err}");
    before
        .simple_query("SELECT 4")
        .await
        .expect("a client from before goes on");
    // A key that does not load: RELOAD fails (F0000), B stays.
    std::fs::write(&key, "not a key").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "F0000", "{e}");
    let (ok, _, err) = psql(
        &[
            "-X",
            "-w",
            "-At",
            "-c",
            "SELECT 5",
            &verify(Path::new(&cert_b)),
        ],
        &env,
    )
    .await;
    assert!(ok, "the running certificate is kept: {err}");
}
