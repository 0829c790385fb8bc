//! WebAssembly routing functions through a node in front of 4 real
//! PostgreSQL shards: rows placed by `tenant_prefix.wat` and `geo.wat`
//! (docs/WASM_ABI.md) land on the shard whose range holds the function's
//! point (computed here by calling the function directly, not through the
//! node), whatever the protocol (simple, extended, multi-row INSERT, COPY);
//! a key lookup runs on one shard; and a function that traps, loops or
//! grows without bound fails only the statement that needed it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::SinkExt;
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_tests::*;
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/examples/functions/{name}"))
}

fn bad(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("functions/{name}"))
}

/// 4 shards, 256 equal ranges (range i = `[i << 56, (i+1) << 56)`, owned by
/// `s{i % 4}`): a geo region `r` is range `r`, so on shard `s{r % 4}`; a
/// tenant's slice of 2^32 points never spans two ranges.
fn opts() -> Opts {
    let mut tail = String::new();
    for (name, path) in [
        ("tenant", example("tenant_prefix.wat")),
        ("geo", example("geo.wat")),
        ("loop", bad("loop.wat")),
        ("trap", bad("trap.wat")),
        ("grow", bad("grow.wat")),
    ] {
        tail.push_str(&format!(
            "[[functions]]\nname = \"{name}\"\npath = \"{}\"\n",
            path.display()
        ));
    }
    for (table, key, ty, function) in [
        ("docs", "k", "text", Some("tenant")),
        ("notes", "k", "text", Some("tenant")),
        ("places", "id", "int8", Some("geo")),
        ("regions", "k", "text", Some("geo")),
        ("loops", "id", "int8", Some("loop")),
        ("traps", "id", "int8", Some("trap")),
        ("grows", "id", "int8", Some("grow")),
        ("users", "id", "int8", None),
    ] {
        tail.push_str(&format!(
            "[[sharded_tables]]\nname = \"{table}\"\nkey = \"{key}\"\ntype = \"{ty}\"\n"
        ));
        if let Some(f) = function {
            tail.push_str(&format!("function = \"{f}\"\n"));
        }
    }
    Opts {
        shards: 4,
        extra: "pool_size = 4\ninitial_ranges = 256".into(),
        tail,
        ..Opts::default()
    }
}

fn compile(path: &Path) -> Function {
    Function::compile(&std::fs::read(path).unwrap()).unwrap()
}

fn text_point(f: &Function, k: &str) -> u64 {
    f.point(oid::TEXT, k.as_bytes()).unwrap()
}

fn int8_point(f: &Function, k: i64) -> u64 {
    f.point(oid::INT8, &abi::encode_int8(k)).unwrap()
}

fn owner(snap: &RoutingSnapshot, point: u64) -> String {
    snap.range_for_point(point).write_owner.to_string()
}

async fn copy_in(
    db: &tokio_postgres::Client,
    sql: &str,
    data: Vec<u8>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = db.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(100) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

/// Inserts `rows` (SQL literals for (key, v)) into `table` four ways: simple
/// protocol one by one, extended protocol (through `ext`, one parameter per
/// row for the key), one multi-row INSERT, and COPY.
async fn insert_four_ways(
    db: &tokio_postgres::Client,
    table: &str,
    key: &str,
    rows: &[(String, i32)],
    ext: impl AsyncFn(&tokio_postgres::Client, &str, i32),
) {
    let mut multi = Vec::new();
    let mut copy = String::new();
    for (i, (k, v)) in rows.iter().enumerate() {
        let lit = format!("'{k}'");
        match i % 4 {
            0 => db
                .batch_execute(&format!(
                    "INSERT INTO {table} ({key}, v) VALUES ({lit}, {v})"
                ))
                .await
                .unwrap(),
            1 => ext(db, k, *v).await,
            2 => multi.push(format!("({lit}, {v})")),
            _ => copy.push_str(&format!("{k}\t{v}\n")),
        }
    }
    db.batch_execute(&format!(
        "INSERT INTO {table} ({key}, v) VALUES {}",
        multi.join(", ")
    ))
    .await
    .unwrap();
    let n = copy_in(
        db,
        &format!("COPY {table} ({key}, v) FROM STDIN"),
        copy.into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(n as usize, rows.len() / 4, "COPY into {table}");
}

/// Every row of `table` on each shard directly: the shard must be the
/// owner of the point `point` computes from the row's key. Returns the
/// shard of each key.
async fn placement(
    c: &Cluster,
    snap: &RoutingSnapshot,
    table: &str,
    key: &str,
    point: impl Fn(&tokio_postgres::Row) -> (String, u64),
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..4 {
        let d = c.direct(i).await;
        for row in d
            .query(&format!("SELECT {key} FROM {table}"), &[])
            .await
            .unwrap()
        {
            let (k, p) = point(&row);
            let shard = format!("s{i}");
            assert_eq!(
                owner(snap, p),
                shard,
                "{table} key {k} (point {p:#018x}) is on the wrong shard"
            );
            out.push((k, shard));
        }
    }
    out
}

/// The rows of a simple-protocol query, first column as text.
async fn lines(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    db.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_where_the_function_puts_them() {
    let c = Cluster::start(opts()).await;
    let snap = c.node.routing.catalog.load_full();
    assert!(snap.unresolved_functions().is_empty());
    let tenant = compile(&example("tenant_prefix.wat"));
    let geo = compile(&example("geo.wat"));
    let db = c.connect().await;
    for ddl in [
        "CREATE TABLE docs (k text PRIMARY KEY, v int)",
        "CREATE TABLE notes (k text PRIMARY KEY, v int)",
        "CREATE TABLE places (id bigint PRIMARY KEY, v int)",
        "CREATE TABLE regions (k text PRIMARY KEY, v int)",
    ] {
        db.batch_execute(ddl).await.unwrap();
    }

    // docs: 8 tenants × 12 keys "tenant:i"
    let tenants = [
        "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
    ];
    let docs: Vec<(String, i32)> = tenants
        .iter()
        .flat_map(|t| (0..12).map(move |i| (format!("{t}:{i}"), i)))
        .collect();
    let ins = db
        .prepare("INSERT INTO docs (k, v) VALUES ($1, $2)")
        .await
        .unwrap();
    insert_four_ways(&db, "docs", "k", &docs, async |db, k, v| {
        db.execute(&ins, &[&k, &v]).await.unwrap();
    })
    .await;
    let placed = placement(&c, &snap, "docs", "k", |r| {
        let k: String = r.get(0);
        let p = text_point(&tenant, &k);
        (k, p)
    })
    .await;
    assert_eq!(placed.len(), docs.len());
    // a tenant lives on one shard
    let mut shards_used = std::collections::BTreeSet::new();
    for t in tenants {
        let shards: std::collections::BTreeSet<&String> = placed
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{t}:")))
            .map(|(_, s)| s)
            .collect();
        assert_eq!(shards.len(), 1, "tenant {t} spans {shards:?}");
        shards_used.extend(shards);
    }
    assert!(shards_used.len() > 1, "all tenants on one shard");

    // places: int8 keys whose top byte is the region (0..=6)
    let places: Vec<(i64, i32)> = (0..=6i64)
        .flat_map(|r| (0..8).map(move |i| ((r << 56) | (i * 1_000_003), i as i32)))
        .collect();
    let rows: Vec<(String, i32)> = places.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let ins = db
        .prepare("INSERT INTO places (id, v) VALUES ($1, $2)")
        .await
        .unwrap();
    insert_four_ways(&db, "places", "id", &rows, async |db, k, v| {
        let k: i64 = k.parse().unwrap();
        db.execute(&ins, &[&k, &v]).await.unwrap();
    })
    .await;
    let placed = placement(&c, &snap, "places", "id", |r| {
        let k: i64 = r.get(0);
        (k.to_string(), int8_point(&geo, k))
    })
    .await;
    assert_eq!(placed.len(), places.len());
    for (k, shard) in &placed {
        let region = k.parse::<i64>().unwrap() >> 56;
        assert_eq!(*shard, format!("s{}", region % 4), "place {k}");
    }

    // regions: text keys "rr:city-i"
    let codes = ["eu", "us", "ap", "sa", "af", "me", "xx"];
    let regions: Vec<(String, i32)> = codes
        .iter()
        .flat_map(|c| (0..4).map(move |i| (format!("{c}:city-{i}"), i)))
        .collect();
    let ins = db
        .prepare("INSERT INTO regions (k, v) VALUES ($1, $2)")
        .await
        .unwrap();
    insert_four_ways(&db, "regions", "k", &regions, async |db, k, v| {
        db.execute(&ins, &[&k, &v]).await.unwrap();
    })
    .await;
    let placed = placement(&c, &snap, "regions", "k", |r| {
        let k: String = r.get(0);
        let p = text_point(&geo, &k);
        (k, p)
    })
    .await;
    assert_eq!(placed.len(), regions.len());
    for (k, shard) in &placed {
        let region = codes.iter().position(|c| k.starts_with(c)).unwrap() + 1;
        let region = if region == 7 { 0 } else { region };
        assert_eq!(*shard, format!("s{}", region % 4), "region key {k}");
    }

    // through the node: every row is found by key, on one shard
    for (k, v) in &docs {
        let row = db
            .query_one("SELECT v FROM docs WHERE k = $1", &[k])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), *v, "docs {k}");
    }
    for (k, v) in &places {
        let got = lines(&db, &format!("SELECT v FROM places WHERE id = {k}")).await;
        assert_eq!(got, vec![v.to_string()], "places {k}");
    }
    let n = lines(&db, "SELECT count(*) FROM regions").await;
    assert_eq!(n, vec![regions.len().to_string()]);
    let want = owner(&snap, text_point(&tenant, "acme:3"));
    let plan = lines(&db, "EXPLAIN SELECT * FROM docs WHERE k = 'acme:3'").await;
    assert_eq!(
        plan[0],
        format!("hotrepart: RUN ON ONE shard {want}"),
        "{plan:#?}"
    );
    let want = owner(&snap, int8_point(&geo, 3 << 56));
    let plan = lines(
        &db,
        &format!("EXPLAIN SELECT * FROM places WHERE id = {}", 3i64 << 56),
    )
    .await;
    assert_eq!(
        plan[0],
        format!("hotrepart: RUN ON ONE shard {want}"),
        "{plan:#?}"
    );
    // co-located (same function, same key type): a join on the key is local
    db.execute("INSERT INTO notes (k, v) VALUES ($1, 7)", &[&"acme:3"])
        .await
        .unwrap();
    let joined = lines(
        &db,
        "SELECT n.v FROM docs d JOIN notes n ON d.k = n.k WHERE d.k = 'acme:3'",
    )
    .await;
    assert_eq!(joined, vec!["7".to_string()]);
}

/// The error a statement gets when its table's function fails for a key.
fn assert_function_error(e: &tokio_postgres::Error, table: &str, reason: &str) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "38000", "{db:?}");
    let m = db.message();
    assert!(
        m.contains(&format!("\"{table}\"")) && m.contains("routing function") && m.contains(reason),
        "{table}: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_function_fails_only_its_statement() {
    let c = Cluster::start(opts()).await;
    let db = c.connect().await;
    for t in ["loops", "traps", "grows", "users"] {
        db.batch_execute(&format!("CREATE TABLE {t} (id bigint PRIMARY KEY, v int)"))
            .await
            .unwrap();
    }
    // another session works on the side the whole time
    let other = c.connect().await;
    let side = tokio::spawn(async move {
        let ins = other
            .prepare("INSERT INTO users (id, v) VALUES ($1, 0)")
            .await
            .unwrap();
        for id in 1000..1100i64 {
            other.execute(&ins, &[&id]).await.unwrap();
            let n = other
                .query_one("SELECT count(*) FROM users WHERE id = $1", &[&id])
                .await
                .unwrap();
            assert_eq!(n.get::<_, i64>(0), 1);
        }
    });
    let mut next_user = 0i64;
    for (table, reason) in [
        ("traps", "trap: "),
        ("loops", "fuel exhausted"),
        ("grows", "memory limit exceeded"),
    ] {
        // simple protocol, single and multi-row
        let e = db
            .batch_execute(&format!("INSERT INTO {table} (id, v) VALUES (13, 1)"))
            .await
            .unwrap_err();
        assert_function_error(&e, table, reason);
        let e = db
            .batch_execute(&format!(
                "INSERT INTO {table} (id, v) VALUES (1, 1), (13, 1), (200, 1)"
            ))
            .await
            .unwrap_err();
        assert_function_error(&e, table, reason);
        // extended protocol
        let e = db
            .execute(
                &format!("INSERT INTO {table} (id, v) VALUES ($1, 1)"),
                &[&13i64],
            )
            .await
            .unwrap_err();
        assert_function_error(&e, table, reason);
        let e = db
            .query(&format!("SELECT * FROM {table} WHERE id = $1"), &[&13i64])
            .await
            .unwrap_err();
        assert_function_error(&e, table, reason);
        // COPY: a bad row fails the whole COPY, nothing lands
        let e = copy_in(
            &db,
            &format!("COPY {table} (id, v) FROM STDIN"),
            b"1\t1\n13\t1\n2\t1\n".to_vec(),
        )
        .await
        .unwrap_err();
        assert_function_error(&e, table, reason);
        let n = lines(&db, &format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(n, vec!["0".to_string()], "{table} after the failed COPY");
        // the same session goes on: other keys of the table, other tables
        db.batch_execute(&format!(
            "INSERT INTO {table} (id, v) VALUES (1, 1), (200, 2)"
        ))
        .await
        .unwrap();
        let got = lines(&db, &format!("SELECT v FROM {table} WHERE id = 200")).await;
        assert_eq!(got, vec!["2".to_string()]);
        next_user += 1;
        db.execute("INSERT INTO users (id, v) VALUES ($1, 0)", &[&next_user])
            .await
            .unwrap();
        // a read without a key needs no call
        let n = lines(&db, &format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(n, vec!["2".to_string()]);
    }
    // inside a transaction the failure fails the transaction, as any error
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("INSERT INTO users (id, v) VALUES (-1, 0)", &[])
        .await
        .unwrap();
    let e = db
        .execute("INSERT INTO traps (id, v) VALUES ($1, 0)", &[&13i64])
        .await
        .unwrap_err();
    assert_function_error(&e, "traps", "trap: ");
    let e = db
        .batch_execute("SELECT count(*) FROM users WHERE id = -1")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e:?}");
    db.batch_execute("COMMIT").await.unwrap();
    let n = lines(&db, "SELECT count(*) FROM users WHERE id = -1").await;
    assert_eq!(n, vec!["0".to_string()], "the failed transaction committed");
    side.await.unwrap();
    let n = lines(&db, "SELECT count(*) FROM users").await;
    assert_eq!(n, vec![(100 + next_user).to_string()]);
    // the node still accepts new sessions
    let fresh = c.connect().await;
    assert_eq!(lines(&fresh, "SELECT 1").await, vec!["1".to_string()]);
}

#[test]
fn an_invalid_module_stops_the_node_at_start() {
    let dir = TestDir::new("wasm-invalid");
    let path = dir.0.join("empty.wat");
    std::fs::write(&path, "(module)").unwrap();
    let cfg = hotrepart_proxy::Config::from_toml(&format!(
        "[[shards]]\nname = \"s0\"\ndsn = \"host=127.0.0.1 port=1\"\n\
         [[functions]]\nname = \"empty\"\npath = \"{}\"\n\
         [[sharded_tables]]\nname = \"t\"\nkey = \"id\"\ntype = \"int8\"\nfunction = \"empty\"\n",
        path.display()
    ))
    .unwrap();
    let e = hotrepart_proxy::Node::new(cfg).expect_err("refused");
    let m = e.to_string();
    assert!(
        m.contains("routing function") && m.contains("memory"),
        "{m}"
    );
}
