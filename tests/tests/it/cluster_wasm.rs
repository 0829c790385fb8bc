//! WebAssembly routing functions managed through the admin API of a
//! 3-process cluster (real `hotrepart serve` processes sharing one
//! replicated catalog, 3 real PostgreSQL shards): functions uploaded with
//! `proxyctl function upload` through one node, tables declared with
//! `proxyctl table shard … --function` through another, rows inserted
//! through every node land on the shard whose range holds the function's
//! point (computed here by calling the function directly); a failing
//! function fails only its statement; invalid modules never reach the
//! catalog; attaching to a table with rows and removing a function in use
//! are refused.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/examples/functions/{name}"))
}

fn bad(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("functions/{name}"))
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `proxyctl` against node `i`; asserts success, returns stdout.
async fn ctl_ok(c: &ProcCluster, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(i, args).await;
    assert!(ok, "proxyctl {args:?} on node {i}: {err}");
    out
}

/// Runs `proxyctl` against node `i`; asserts failure, returns stderr.
async fn ctl_err(c: &ProcCluster, i: usize, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(i, args).await;
    assert!(!ok, "proxyctl {args:?} on node {i} should fail: {out}");
    err
}

/// Function names node `i` knows.
async fn function_names(c: &ProcCluster, i: usize) -> BTreeSet<String> {
    let out = ctl_ok(c, i, &["--json", "function", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until every node knows exactly the functions `want`.
async fn functions_converged(c: &ProcCluster, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let start = Instant::now();
    loop {
        let mut all = true;
        for i in 0..c.nodes.len() {
            all &= function_names(c, i).await == want;
        }
        if all {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nodes do not all know the functions {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node is ready at the same epoch; returns it.
async fn converged(c: &ProcCluster) -> u64 {
    let start = Instant::now();
    loop {
        let mut epochs = BTreeSet::new();
        let mut all = true;
        for i in 0..c.nodes.len() {
            match c.status(i).await {
                Some(s) if s["ready"] == serde_json::json!(true) => {
                    epochs.insert(s["epoch"].as_u64().unwrap());
                }
                _ => all = false,
            }
        }
        if all && epochs.len() == 1 {
            return *epochs.iter().next().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nodes did not converge (epochs {epochs:?}); logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ranges as (lo, hi, write owner).
async fn ranges(c: &ProcCluster) -> Vec<(u64, Option<u64>, String)> {
    c.ranges(0).await
}

fn owner_of(rs: &[(u64, Option<u64>, String)], p: u64) -> &str {
    &rs.iter()
        .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
        .unwrap()
        .2
}

/// The point of a key of `table` (text keys for `docs`, `regions`; int8 for
/// `places`).
enum Key {
    Text(String),
    Int8(i64),
}

impl Key {
    fn point(&self, f: &Function) -> u64 {
        match self {
            Key::Text(k) => f.point(oid::TEXT, k.as_bytes()).unwrap(),
            Key::Int8(k) => f.point(oid::INT8, &abi::encode_int8(*k)).unwrap(),
        }
    }
}

/// Every key in `keys` exactly once in `table`, each on the shard owning
/// the point `f` gives it; returns rows per shard.
async fn check_placement(c: &ProcCluster, table: &str, f: &Function, keys: &[Key]) -> Vec<usize> {
    let rs = ranges(c).await;
    let mut seen = BTreeSet::new();
    let mut per_shard = vec![0; c.shards.len()];
    for (si, s) in c.shards.iter().enumerate() {
        let db = connect(&s.dsn()).await.unwrap();
        for row in db
            .query(&format!("SELECT k::text FROM {table}"), &[])
            .await
            .unwrap()
        {
            let k: String = row.get(0);
            let key = match keys.first() {
                Some(Key::Int8(_)) => Key::Int8(k.parse().unwrap()),
                _ => Key::Text(k.clone()),
            };
            assert!(seen.insert(k.clone()), "{table}: row {k} is stored twice");
            per_shard[si] += 1;
            let p = key.point(f);
            let owner = owner_of(&rs, p);
            assert_eq!(
                owner,
                format!("s{si}"),
                "{table}: row {k} (point {p:#018x}) is on s{si}, its range is owned by {owner}"
            );
        }
    }
    for k in keys {
        let k = match k {
            Key::Text(k) => k.clone(),
            Key::Int8(k) => k.to_string(),
        };
        assert!(seen.contains(&k), "{table}: row {k} is missing");
    }
    assert_eq!(seen.len(), keys.len(), "{table}: unexpected rows");
    per_shard
}

/// The error a statement gets when its table's function fails for a key.
fn assert_function_error(e: &tokio_postgres::Error, table: &str) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "38000", "{db:?}");
    let m = db.message();
    assert!(
        m.contains(&format!("\"{table}\"")) && m.contains("routing function"),
        "{table}: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_through_the_admin_api() {
    let c = ProcCluster::start(3, 3, "", "").await;
    converged(&c).await;

    // Upload through node 1: text and binary modules.
    let out = ctl_ok(
        &c,
        0,
        &[
            "function",
            "upload",
            "tenant",
            &path_str(&example("tenant_prefix.wat")),
        ],
    )
    .await;
    assert!(out.contains("stored function tenant"), "{out}");
    for (name, path) in [
        ("geo", example("geo.wat")),
        ("loop", bad("loop.wat")),
        ("trap", bad("trap.wat")),
        ("grow", bad("grow.wat")),
        ("spare", example("rust-hash.wasm")),
    ] {
        ctl_ok(&c, 0, &["function", "upload", name, &path_str(&path)]).await;
    }
    // The same module again changes nothing.
    let out = ctl_ok(
        &c,
        2,
        &["function", "upload", "geo", &path_str(&example("geo.wat"))],
    )
    .await;
    assert!(out.contains("unchanged"), "{out}");

    // Invalid modules are refused with a clear message, before the log.
    let invalid = [
        (
            "imports",
            "(module (import \"env\" \"now\" (func (result i64))) (memory (export \"memory\") 1))",
            "may not import",
        ),
        (
            "noexports",
            "(module (memory (export \"memory\") 1))",
            "does not export",
        ),
        (
            "garbage",
            "this is not WebAssembly",
            "invalid routing function",
        ),
    ];
    for (name, text, msg) in invalid {
        let path = c.dir.0.join(format!("{name}.wat"));
        std::fs::write(&path, text).unwrap();
        let err = ctl_err(&c, 1, &["function", "upload", name, &path_str(&path)]).await;
        assert!(
            err.contains("refused") && err.contains(msg) && err.contains("HTTP 400"),
            "{name}: {err}"
        );
    }
    let err = ctl_err(
        &c,
        1,
        &[
            "function",
            "upload",
            "bad name",
            &path_str(&example("geo.wat")),
        ],
    )
    .await;
    assert!(err.contains("invalid function name"), "{err}");
    // An upload bigger than axum's default 2 MB body once hex-encoded (text
    // padded with a 1.5 MiB comment; the binary, and so the log entry, is
    // small) is accepted.
    let big = c.dir.0.join("big.wat");
    std::fs::write(
        &big,
        format!(
            "(module (memory (export \"memory\") 1) ;; {}\n\
             (func (export \"hr_abi_version\") (result i32) (i32.const 1))\n\
             (func (export \"hr_alloc\") (param i32) (result i32) (i32.const 16))\n\
             (func (export \"hr_route\") (param i32 i32 i32) (result i64) (i64.const 7)))",
            "a".repeat(3 << 19)
        ),
    )
    .unwrap();
    let out = ctl_ok(&c, 1, &["function", "upload", "big", &path_str(&big)]).await;
    assert!(out.contains("stored function big"), "{out}");
    ctl_ok(&c, 1, &["function", "remove", "big"]).await;
    functions_converged(&c, &["geo", "grow", "loop", "spare", "tenant", "trap"]).await;

    // Tables declared through node 2.
    for (table, key, ty, function) in [
        ("docs", "k", "text", "tenant"),
        ("regions", "k", "text", "geo"),
        ("places", "k", "int8", "geo"),
        ("loops", "k", "int8", "loop"),
        ("traps", "k", "int8", "trap"),
        ("grows", "k", "int8", "grow"),
    ] {
        ctl_ok(
            &c,
            1,
            &[
                "table",
                "shard",
                table,
                "--key",
                key,
                "--type",
                ty,
                "--function",
                function,
            ],
        )
        .await;
    }
    ctl_ok(
        &c,
        1,
        &["table", "shard", "users", "--key", "k", "--type", "int8"],
    )
    .await;
    let err = ctl_err(
        &c,
        1,
        &[
            "table",
            "shard",
            "t1",
            "--key",
            "k",
            "--type",
            "int8",
            "--function",
            "nope",
        ],
    )
    .await;
    assert!(err.contains("unknown routing function"), "{err}");
    let err = ctl_err(
        &c,
        1,
        &[
            "table",
            "shard",
            "t1",
            "--key",
            "k",
            "--type",
            "int8",
            "--function",
            "geo",
            "--seed",
            "3",
        ],
    )
    .await;
    assert!(err.contains("cannot be used with"), "{err}");
    // geo puts region r at [r << 56, (r+1) << 56): regions 2, 3 go to s1 and
    // 4, 5 to s2 (the first of the 3 initial ranges covers regions 0..5).
    let rs = ranges(&c).await;
    assert_eq!(rs.len(), 3, "{rs:?}");
    assert!(rs[0].1.unwrap() > 6 << 56, "{rs:?}");
    for at in [2u64 << 56, 4 << 56] {
        let lo = ranges(&c)
            .await
            .iter()
            .rfind(|r| r.0 < at)
            .unwrap()
            .0
            .to_string();
        ctl_ok(&c, 0, &["range", "split", &lo, "--at", &at.to_string()]).await;
    }
    // node 3 must have applied the splits before it is asked
    converged(&c).await;
    ctl_ok(
        &c,
        2,
        &["range", "assign", &(2u64 << 56).to_string(), "--to", "s1"],
    )
    .await;
    ctl_ok(
        &c,
        2,
        &["range", "assign", &(4u64 << 56).to_string(), "--to", "s2"],
    )
    .await;
    converged(&c).await;
    let out = ctl_ok(&c, 2, &["table", "list"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("docs") && l.contains("tenant (wasm(")),
        "{out}"
    );
    let out = ctl_ok(&c, 0, &["function", "list"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("geo ") && l.contains("regions") && l.contains("places")),
        "{out}"
    );

    // DDL through a node goes to every shard.
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    for (t, ty) in [
        ("docs", "text"),
        ("regions", "text"),
        ("places", "bigint"),
        ("loops", "bigint"),
        ("traps", "bigint"),
        ("grows", "bigint"),
        ("users", "bigint"),
    ] {
        db.batch_execute(&format!("CREATE TABLE {t} (k {ty} PRIMARY KEY, v int)"))
            .await
            .unwrap();
    }

    // Rows through every node, simple and extended protocol.
    let mut docs = Vec::new();
    let mut regions = Vec::new();
    let mut places = Vec::new();
    let codes = ["eu", "us", "ap", "sa", "af", "me", "xx"];
    for i in 0..42i64 {
        let node = connect(&c.nodes[(i % 3) as usize].dsn()).await.unwrap();
        let doc = format!("tenant{}:{i}", i % 21);
        let region = format!("{}:city-{i}", codes[(i % 7) as usize]);
        let place = ((i % 6) << 56) | i;
        if i % 2 == 0 {
            for sql in [
                format!("INSERT INTO docs (k, v) VALUES ('{doc}', 1)"),
                format!("INSERT INTO regions (k, v) VALUES ('{region}', 1)"),
                format!("INSERT INTO places (k, v) VALUES ({place}, 1)"),
            ] {
                node.batch_execute(&sql).await.unwrap();
            }
        } else {
            node.execute("INSERT INTO docs (k, v) VALUES ($1, 1)", &[&doc])
                .await
                .unwrap();
            node.execute("INSERT INTO regions (k, v) VALUES ($1, 1)", &[&region])
                .await
                .unwrap();
            node.execute("INSERT INTO places (k, v) VALUES ($1, 1)", &[&place])
                .await
                .unwrap();
        }
        docs.push(Key::Text(doc));
        regions.push(Key::Text(region));
        places.push(Key::Int8(place));
    }
    let tenant = Function::compile(&std::fs::read(example("tenant_prefix.wat")).unwrap()).unwrap();
    let geo = Function::compile(&std::fs::read(example("geo.wat")).unwrap()).unwrap();
    let per = check_placement(&c, "docs", &tenant, &docs).await;
    assert!(per.iter().filter(|&&n| n > 0).count() >= 2, "docs: {per:?}");
    check_placement(&c, "regions", &geo, &regions).await;
    let per = check_placement(&c, "places", &geo, &places).await;
    assert!(per.iter().all(|&n| n > 0), "places: {per:?}");
    // Key lookups through each node find the rows.
    for i in 0..3 {
        let node = connect(&c.nodes[i].dsn()).await.unwrap();
        let n: i64 = node
            .query_one("SELECT count(*) FROM docs WHERE k = $1", &[&"tenant13:13"])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "lookup through node {i}");
    }

    // A failing function fails its statement only; the node and a
    // concurrent session on it go on.
    let dsn = c.nodes[2].dsn();
    let side = tokio::spawn(async move {
        let other = connect(&dsn).await.unwrap();
        for id in 1000..1060i64 {
            other
                .execute("INSERT INTO users (k, v) VALUES ($1, 0)", &[&id])
                .await
                .unwrap();
            let n: i64 = other
                .query_one("SELECT count(*) FROM users WHERE k = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1);
        }
    });
    let db = connect(&c.nodes[2].dsn()).await.unwrap();
    for table in ["traps", "loops", "grows"] {
        let e = db
            .batch_execute(&format!("INSERT INTO {table} (k, v) VALUES (13, 1)"))
            .await
            .unwrap_err();
        assert_function_error(&e, table);
        let e = db
            .execute(
                &format!("INSERT INTO {table} (k, v) VALUES ($1, 1)"),
                &[&13i64],
            )
            .await
            .unwrap_err();
        assert_function_error(&e, table);
        // the same session goes on with other keys
        db.execute(
            &format!("INSERT INTO {table} (k, v) VALUES ($1, 1)"),
            &[&200i64],
        )
        .await
        .unwrap();
    }
    side.await.unwrap();
    let fresh = connect(&c.nodes[2].dsn()).await.unwrap();
    let n: i64 = fresh
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 60);
    assert!(c.status(2).await.is_some(), "node 3 stopped answering");

    // Attaching a function to a table holding rows is refused; to an empty
    // one it works.
    let err = ctl_err(&c, 0, &["function", "attach", "docs", "geo"]).await;
    assert!(err.contains("holds") && err.contains("HTTP 409"), "{err}");
    let err = ctl_err(&c, 0, &["function", "attach", "users", "geo"]).await;
    assert!(err.contains("holds"), "{err}");
    db.batch_execute("CREATE TABLE later (k bigint PRIMARY KEY, v int)")
        .await
        .unwrap();
    ctl_ok(
        &c,
        1,
        &["table", "shard", "later", "--key", "k", "--type", "int8"],
    )
    .await;
    ctl_ok(&c, 1, &["function", "attach", "later", "spare"]).await;
    let err = ctl_err(&c, 1, &["function", "attach", "nosuch", "geo"]).await;
    assert!(err.contains("not a sharded table"), "{err}");
    converged(&c).await;
    let out = ctl_ok(&c, 0, &["--json", "table", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let later = v["sharded"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "later")
        .unwrap();
    assert_eq!(later["function_name"], "spare", "{later}");

    // Removing a function in use is refused; an unused one goes.
    for (node, name, table) in [(0, "tenant", "docs"), (1, "spare", "later")] {
        let err = ctl_err(&c, node, &["function", "remove", name]).await;
        assert!(
            err.contains("used by table") && err.contains(table),
            "{err}"
        );
    }
    ctl_ok(
        &c,
        2,
        &[
            "function",
            "upload",
            "unused",
            &path_str(&example("tenant_prefix.wat")),
        ],
    )
    .await;
    let out = ctl_ok(&c, 2, &["function", "remove", "unused"]).await;
    assert!(out.contains("removed function unused"), "{out}");
    let err = ctl_err(&c, 2, &["function", "remove", "unused"]).await;
    assert!(err.contains("unknown routing function"), "{err}");
    functions_converged(&c, &["geo", "grow", "loop", "spare", "tenant", "trap"]).await;
}
