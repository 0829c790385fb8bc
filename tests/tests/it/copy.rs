//! COPY through a node in front of 4 real PostgreSQL shards: rows copied in
//! text, CSV and binary land on the shard that owns their key (checked on
//! each shard directly, with PostgreSQL computing the hash), COPY TO returns
//! every shard's rows in one stream, bad rows and failures leave nothing
//! anywhere, transactions keep their one written shard, and reference
//! tables get every row on every shard. Clients: tokio-postgres (extended
//! protocol copy_in/copy_out) and psql `\copy` (simple protocol).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_tests::*;

const SEED: u64 = 7;

fn opts() -> Opts {
    Opts {
        shards: 4,
        extra: "pool_size = 4\nreference_tables = [\"countries\"]".into(),
        tail: format!(
            "\
             [[sharded_tables]]\nname = \"users\"\nkey = \"id\"\ntype = \"int8\"\nseed = {SEED}\n\
             [[sharded_tables]]\nname = \"events\"\nkey = \"tenant\"\ntype = \"text\"\nseed = {SEED}\n"
        ),
        ..Opts::default()
    }
}

/// For shard `name`: a predicate (computed by PostgreSQL from the key) that
/// is true exactly for the rows of `table` whose key it owns.
fn owned_predicate(snap: &RoutingSnapshot, name: &str, table: &str, column: &str) -> String {
    let t = snap.sharded_table(table).unwrap();
    let hash = t
        .function
        .sql_hash(t.key_type, column)
        .expect("a built-in hash");
    let parts: Vec<String> = snap
        .ranges()
        .iter()
        .filter(|r| r.write_owner.as_str() == name)
        .map(|r| format!("({})", r.sql_predicate(&hash)))
        .collect();
    if parts.is_empty() {
        "false".into()
    } else {
        parts.join(" OR ")
    }
}

/// Rows of `table` per shard; panics if a shard holds a row it does not own.
async fn rows_per_shard(c: &Cluster, table: &str, column: &str) -> Vec<i64> {
    let snap = c.node.routing.catalog.load_full();
    let mut out = Vec::new();
    for i in 0..c.shards.len() {
        let d = c.direct(i).await;
        let pred = owned_predicate(&snap, &format!("s{i}"), table, column);
        let (n, wrong): (i64, i64) = {
            let r = d
                .query_one(
                    &format!("SELECT count(*), count(*) FILTER (WHERE NOT ({pred})) FROM {table}"),
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(
            wrong, 0,
            "shard s{i} holds {wrong} rows of {table} it does not own"
        );
        out.push(n);
    }
    out
}

async fn copy_in(
    db: &tokio_postgres::Client,
    sql: &str,
    data: Vec<u8>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = db.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    // Several CopyData messages, cut anywhere: rows span messages.
    for chunk in data.chunks(777) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

async fn copy_out(db: &tokio_postgres::Client, sql: &str) -> Vec<u8> {
    let stream = db.copy_out(sql).await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    chunks.concat()
}

/// What COPY TO must return through the node: the shards' own outputs
/// concatenated in shard order (binary: one file header, one trailer).
async fn shards_concatenated(c: &Cluster, sql: &str, binary: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..c.shards.len() {
        let d = c.direct(i).await;
        let mut o = copy_out(&d, sql).await;
        if binary {
            o.truncate(o.len() - 2);
            if i > 0 {
                o.drain(..19);
            }
        }
        out.extend_from_slice(&o);
    }
    if binary {
        out.extend_from_slice(&[0xff, 0xff]);
    }
    out
}

fn binary_file(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
    let mut b = b"PGCOPY\n\xff\r\n\0".to_vec();
    b.extend_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    for r in rows {
        b.extend_from_slice(&(r.len() as i16).to_be_bytes());
        for f in r {
            match f {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
    }
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b
}

fn node_conninfo(c: &Cluster) -> String {
    format!(
        "host=127.0.0.1 port={} user={USER} dbname=postgres",
        c.addr.port()
    )
}

async fn psql(c: &Cluster, command: &str) -> (bool, String, String) {
    run_cmd(
        &pg_tool("psql"),
        &[
            "-X",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            command,
            &node_conninfo(c),
        ],
        &[("PGPASSWORD", PASSWORD), ("PGSSLMODE", "disable")],
    )
    .await
}

/// Runs `command` between BEGIN and COMMIT in one psql session (without
/// stopping at errors, as a script would).
async fn psql_in_tx(c: &Cluster, command: &str) -> (bool, String, String) {
    run_cmd(
        &pg_tool("psql"),
        &[
            "-X",
            "-w",
            "-c",
            "BEGIN",
            "-c",
            command,
            "-c",
            "COMMIT",
            &node_conninfo(c),
        ],
        &[("PGPASSWORD", PASSWORD), ("PGSSLMODE", "disable")],
    )
    .await
}

/// Text-format lines in PostgreSQL's own output form (so that COPY TO
/// gives them back byte for byte): escapes, NULLs, unicode.
fn text_rows(ids: impl Iterator<Item = i64>) -> Vec<String> {
    ids.map(|id| {
        let name = match id % 4 {
            0 => format!("tab\\there {id}"),
            1 => format!("new\\nline \\\\ back {id}"),
            2 => format!("ünïcødé 🐘 {id}"),
            _ => format!("plain {id}"),
        };
        let note = if id % 5 == 0 {
            "\\N".to_string()
        } else {
            format!("n{id}")
        };
        format!("{id}\t{name}\t{note}\n")
    })
    .collect()
}

fn sorted_lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8(b.to_vec())
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_round_trips_in_text_csv_and_binary() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, note text);
         CREATE TABLE events (tenant text, n int, payload bytea)",
    )
    .await
    .unwrap();

    // text, tokio-postgres (extended protocol), no column list: the key's
    // position comes from the shards' catalog
    let rows = text_rows(1..=1000);
    let n = copy_in(&db, "COPY users FROM STDIN", rows.concat().into_bytes())
        .await
        .unwrap();
    assert_eq!(n, 1000, "one COPY n with the total");
    let per = rows_per_shard(&c, "users", "id").await;
    assert_eq!(per.iter().sum::<i64>(), 1000, "{per:?}");
    assert!(per.iter().all(|&n| n > 150), "keys are not spread: {per:?}");
    // COPY TO: every row back, the shards' streams concatenated
    let out = copy_out(&db, "COPY users TO STDOUT").await;
    assert_eq!(
        out,
        shards_concatenated(&c, "COPY users TO STDOUT", false).await
    );
    let mut expected = rows.clone();
    expected.sort();
    assert_eq!(sorted_lines(&out), expected);

    // CSV through psql \copy (simple protocol): a header, quoted fields with
    // newlines, delimiters and quotes, a column list with the key last
    let dir = TestDir::new("copy-csv");
    let file = dir.0.join("in.csv");
    let mut csv = String::from("name,note,id\n");
    for id in 2001..=2500i64 {
        csv.push_str(&format!("\"multi\nline, \"\"{id}\"\"\",,{id}\n"));
    }
    std::fs::write(&file, &csv).unwrap();
    let (ok, out, err) = psql(
        &c,
        &format!(
            "\\copy users (name, note, id) from '{}' with (format csv, header)",
            file.display()
        ),
    )
    .await;
    assert!(ok, "psql \\copy from: {out} {err}");
    assert!(out.contains("COPY 500"), "{out}");
    let per = rows_per_shard(&c, "users", "id").await;
    assert_eq!(per.iter().sum::<i64>(), 1500, "{per:?}");
    let r = db
        .query_one("SELECT name, note FROM users WHERE id = 2222", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "multi\nline, \"2222\"");
    assert_eq!(
        r.get::<_, Option<String>>(1),
        None,
        "an unquoted empty CSV field is NULL"
    );
    let out_file = dir.0.join("out.csv");
    let (ok, out, err) = psql(
        &c,
        &format!(
            "\\copy users to '{}' with (format csv, header)",
            out_file.display()
        ),
    )
    .await;
    assert!(ok, "psql \\copy to: {out} {err}");
    assert!(out.contains("COPY 1500"), "{out}");
    let got = std::fs::read(&out_file).unwrap();
    let mut want = b"id,name,note\n".to_vec();
    want.extend(shards_concatenated(&c, "COPY users TO STDOUT (FORMAT csv)", false).await);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "one header line, then every shard's rows"
    );

    // binary, text shard key, tokio-postgres
    let tenants = ["acme", "globex", "initech", "umbrella", "ünï", "", "a\tb"];
    let mut rows = Vec::new();
    for i in 0..700i32 {
        let t = tenants[i as usize % tenants.len()];
        let payload = if i % 3 == 0 {
            None
        } else {
            Some(vec![0u8, 1, 2, 0xff, i as u8])
        };
        rows.push(vec![
            Some(format!("{t}{}", i % 50).into_bytes()),
            Some(i.to_be_bytes().to_vec()),
            payload,
        ]);
    }
    let n = copy_in(
        &db,
        "COPY events FROM STDIN (FORMAT binary)",
        binary_file(&rows),
    )
    .await
    .unwrap();
    assert_eq!(n, 700);
    let per = rows_per_shard(&c, "events", "tenant").await;
    assert_eq!(per.iter().sum::<i64>(), 700, "{per:?}");
    assert!(per.iter().filter(|&&n| n > 0).count() >= 3, "{per:?}");
    let out = copy_out(
        &db,
        "COPY events (tenant, n, payload) TO STDOUT (FORMAT binary)",
    )
    .await;
    assert_eq!(
        out,
        shards_concatenated(
            &c,
            "COPY events (tenant, n, payload) TO STDOUT (FORMAT binary)",
            true
        )
        .await,
        "one file header, every shard's tuples, one trailer"
    );
    // and it loads back: the node's binary output is a valid COPY file
    db.batch_execute("CREATE TABLE events2 (tenant text, n int, payload bytea)")
        .await
        .unwrap();
    // (events2 is undeclared: it lives on the home shard)
    let n = copy_in(&db, "COPY events2 FROM STDIN (FORMAT binary)", out)
        .await
        .unwrap();
    assert_eq!(n, 700);
    let r = db
        .query_one("SELECT count(*), sum(n), count(payload) FROM events2", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 700);
    assert_eq!(r.get::<_, i64>(1), (0..700i64).sum::<i64>());
    assert_eq!(
        r.get::<_, i64>(2),
        700 - (0..700).filter(|i| i % 3 == 0).count() as i64
    );

    // text format with the key in another column, CRLF lines, an explicit
    // end-of-data marker, through the simple protocol
    let mut data = String::new();
    for i in 0..200 {
        data.push_str(&format!("{i}\ttenant{}\t\\\\x00\r\n", i % 13));
    }
    data.push_str("\\.\r\n");
    std::fs::write(dir.0.join("in.txt"), &data).unwrap();
    let (ok, out, err) = psql(
        &c,
        &format!(
            "\\copy events (n, tenant, payload) from '{}'",
            dir.0.join("in.txt").display()
        ),
    )
    .await;
    assert!(ok, "{out} {err}");
    let per = rows_per_shard(&c, "events", "tenant").await;
    assert_eq!(per.iter().sum::<i64>(), 900, "{per:?}");
    // the session and the pool are fine afterwards
    let n: i64 = db
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&2222i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_and_failures_leave_nothing_anywhere() {
    let c = Cluster::start(opts()).await;
    let mut db = c.connect().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, note text);
         CREATE TABLE events (tenant text, n int, payload bytea);
         CREATE TABLE countries (code text PRIMARY KEY, name text)",
    )
    .await
    .unwrap();
    let good = text_rows(1..=300).concat();
    let code = |e: tokio_postgres::Error| {
        e.code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("{e:?}"))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "COPY users FROM STDIN",
            format!("{good}abc\tx\tx\n"),
            "22P02",
        ),
        (
            "COPY users FROM STDIN",
            format!("{good}\\N\tx\tx\n"),
            "23502",
        ),
        (
            "COPY users FROM STDIN",
            format!("{good}77\tonly two\n"),
            "22P04",
        ),
        (
            "COPY users FROM STDIN",
            format!("{good}99999999999999999999\tx\tx\n"),
            "22003",
        ),
        (
            "COPY users (id, name) FROM STDIN (FORMAT csv)",
            "1,a\n2,\"never closed\n".into(),
            "22P04",
        ),
        (
            "COPY users (id, name) FROM STDIN (FORMAT csv)",
            "1,a\n,b\n".into(),
            "23502",
        ),
        // the same key twice: the shard's own unique violation
        (
            "COPY users FROM STDIN",
            format!("{good}42\tdup\tdup\n"),
            "23505",
        ),
    ];
    for (sql, data, want) in cases {
        let e = copy_in(&db, sql, data.into_bytes()).await.unwrap_err();
        assert_eq!(code(e), want, "{sql}");
        assert_eq!(
            rows_per_shard(&c, "users", "id").await,
            [0, 0, 0, 0],
            "{sql}: rows landed"
        );
    }
    let e = copy_in(
        &db,
        "COPY users (id, name) FROM STDIN (FORMAT binary)",
        binary_file(&[
            vec![Some(5i64.to_be_bytes().to_vec()), Some(b"x".to_vec())],
            vec![None, Some(b"y".to_vec())],
        ]),
    )
    .await
    .unwrap_err();
    assert_eq!(code(e), "23502");
    assert_eq!(rows_per_shard(&c, "users", "id").await, [0, 0, 0, 0]);
    // a psql \copy with a bad row: one clear error, nothing lands
    let dir = TestDir::new("copy-bad");
    let file = dir.0.join("bad.txt");
    std::fs::write(&file, format!("{good}\\N\tnull key\tx\n")).unwrap();
    let (ok, _, err) = psql(&c, &format!("\\copy users from '{}'", file.display())).await;
    assert!(!ok);
    assert!(err.contains("null value in column \"id\""), "{err}");
    assert_eq!(err.matches("ERROR").count(), 1, "{err}");
    assert_eq!(rows_per_shard(&c, "users", "id").await, [0, 0, 0, 0]);
    // the client aborts its COPY (CopyFail): nothing lands
    {
        let sink = db
            .copy_in::<_, Bytes>("COPY users FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(good.clone())).await.unwrap();
        // dropped without finish(): tokio-postgres sends CopyFail
    }
    let n: i64 = db.query_one("SELECT 1::bigint", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "the session works after a failed COPY");
    assert_eq!(rows_per_shard(&c, "users", "id").await, [0, 0, 0, 0]);
    // a good COPY still works on the same session
    assert_eq!(
        copy_in(&db, "COPY users FROM STDIN", good.clone().into_bytes())
            .await
            .unwrap(),
        300
    );
    db.batch_execute("TRUNCATE users").await.unwrap();

    // inside a transaction: rows of one shard are fine ...
    let snap = c.node.routing.catalog.load_full();
    let owner = |id: i64| {
        snap.range_for_key("users", &hotrepart_router::catalog::KeyValue::Int8(id))
            .unwrap()
            .write_owner
            .clone()
    };
    let same: Vec<i64> = (1..2000)
        .filter(|&k| owner(k) == owner(1))
        .take(21)
        .collect();
    let (same, spare) = (&same[..20], same[20]);
    let other = (1..2000).find(|&k| owner(k) != owner(1)).unwrap();
    let tx = db.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO users (id, name) VALUES ($1, 'first')",
        &[&same[0]],
    )
    .await
    .unwrap();
    let n = copy_in(
        tx.client(),
        "COPY users FROM STDIN",
        text_rows(same[1..].iter().copied()).concat().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(n, 19);
    tx.commit().await.unwrap();
    assert_eq!(
        rows_per_shard(&c, "users", "id").await.iter().sum::<i64>(),
        20
    );
    // ... rows of two shards go to both, and a ROLLBACK undoes both
    let tx = db.transaction().await.unwrap();
    let n = copy_in(
        tx.client(),
        "COPY users FROM STDIN",
        text_rows([spare, other].into_iter()).concat().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let r = tx
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 22);
    tx.rollback().await.unwrap();
    assert_eq!(
        rows_per_shard(&c, "users", "id").await.iter().sum::<i64>(),
        20
    );
    // ... but rows for another shard than the one already written are
    // fine: the transaction writes two shards and commits with two-phase
    // commit
    let tx = db.transaction().await.unwrap();
    tx.execute("UPDATE users SET note = 'tx' WHERE id = $1", &[&same[0]])
        .await
        .unwrap();
    let n = copy_in(
        tx.client(),
        "COPY users FROM STDIN",
        text_rows(std::iter::once(other)).concat().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    tx.commit().await.unwrap();
    assert_eq!(
        rows_per_shard(&c, "users", "id").await.iter().sum::<i64>(),
        21
    );
    let r = db
        .query_one("SELECT note FROM users WHERE id = $1", &[&same[0]])
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("tx"));
    db.execute("DELETE FROM users WHERE id = $1", &[&other])
        .await
        .unwrap();
    db.execute("UPDATE users SET note = NULL WHERE id = $1", &[&same[0]])
        .await
        .unwrap();

    // the same through psql (simple protocol): one shard's rows commit,
    // and two shards' rows commit with two-phase commit
    let theirs: Vec<i64> = (5000..9000)
        .filter(|&k| owner(k) == owner(other))
        .take(10)
        .collect();
    let file = dir.0.join("one-shard.txt");
    std::fs::write(&file, text_rows(theirs.iter().copied()).concat()).unwrap();
    let (ok, out, err) = psql_in_tx(&c, &format!("\\copy users from '{}'", file.display())).await;
    assert!(ok, "{out} {err}");
    assert!(out.contains("COPY 10") && out.contains("COMMIT"), "{out}");
    assert_eq!(
        rows_per_shard(&c, "users", "id").await.iter().sum::<i64>(),
        30
    );
    let file = dir.0.join("two-shards.txt");
    std::fs::write(
        &file,
        text_rows([9001, (9002..).find(|&k| owner(k) != owner(9001)).unwrap()].into_iter())
            .concat(),
    )
    .unwrap();
    let (ok, out, err) = psql_in_tx(&c, &format!("\\copy users from '{}'", file.display())).await;
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("COPY 2") && out.contains("COMMIT"),
        "{out} {err}"
    );
    let per_shard = rows_per_shard(&c, "users", "id").await;
    assert_eq!(per_shard.iter().sum::<i64>(), 32);
    db.execute("DELETE FROM users WHERE id >= 9001", &[])
        .await
        .unwrap();
    // an error on one shard's COPY TO: one error, the others cancelled
    c.direct(2)
        .await
        .batch_execute("ALTER TABLE events RENAME TO events_gone")
        .await
        .unwrap();
    let e = db
        .copy_out("COPY events TO STDOUT")
        .await
        .err()
        .expect("a missing table on one shard is an error");
    assert_eq!(code(e), "42P01");
    c.direct(2)
        .await
        .batch_execute("ALTER TABLE events_gone RENAME TO events")
        .await
        .unwrap();
    assert!(copy_out(&db, "COPY events TO STDOUT").await.is_empty());

    // reference table: every row on every shard, COPY n counted once
    let n = copy_in(
        &db,
        "COPY countries FROM STDIN (FORMAT csv)",
        b"fr,France\nde,Germany\njp,\"Japan, \"\"Nihon\"\"\"\n".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(n, 3);
    for i in 0..4 {
        let n: i64 = c
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM countries", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3, "reference rows missing on s{i}");
    }
    // a failure on one shard rolls the reference COPY back everywhere
    c.direct(2)
        .await
        .batch_execute("INSERT INTO countries VALUES ('it', 'only on s2')")
        .await
        .unwrap();
    let e = copy_in(
        &db,
        "COPY countries FROM STDIN (FORMAT csv)",
        b"es,Spain\nit,Italy\n".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(code(e), "23505");
    for i in 0..4 {
        let n: i64 = c
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM countries WHERE code = 'es'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "s{i} kept part of a failed reference COPY");
    }
    let out = copy_out(&db, "COPY countries TO STDOUT").await;
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        3,
        "read from one shard"
    );

    // COPY (query) TO STDOUT: one shard is fine, several are refused
    copy_in(
        &db,
        "COPY users FROM STDIN",
        text_rows(std::iter::once(7)).concat().into_bytes(),
    )
    .await
    .unwrap();
    let out = copy_out(
        &db,
        "COPY (SELECT id, name FROM users WHERE id = 7) TO STDOUT",
    )
    .await;
    assert_eq!(String::from_utf8(out).unwrap(), "7\tplain 7\n");
    let e = db
        .copy_out("COPY (SELECT id FROM users) TO STDOUT")
        .await
        .err()
        .expect("multi-shard COPY (query) is refused");
    assert_eq!(code(e), "0A000");
    // no backend is left in a transaction
    for i in 0..4 {
        let n: i64 = c
            .direct(i)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "shard s{i} has an open transaction");
    }
}
