//! `hotrepart demo` as a user runs it: the real binary, its printed lines
//! parsed and used (every node's DSN, the sample tables through every node,
//! placement on the shards, `proxyctl` with the printed environment), then
//! stopped by a signal, leaving no PostgreSQL server behind.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::bin;
use hotrepart_tests::{connect, run_cmd, TestDir};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The lines a demo printed, parsed.
struct Printed {
    ready: String,
    nodes: Vec<String>,
    admin: String,
    token: String,
    commands: Vec<String>,
    /// NAME=DSN of every server (shards and spares), from the loadtest line.
    servers: BTreeMap<String, String>,
}

fn quoted(line: &str) -> Vec<String> {
    line.split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn parse(lines: &[String]) -> Printed {
    let ready = lines
        .iter()
        .find_map(|l| l.strip_prefix("ready: "))
        .expect("a ready line")
        .to_string();
    let nodes: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("psql '"))
        .map(|l| quoted(l).remove(0))
        .collect();
    let export = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("export {k}=")))
            .unwrap_or_else(|| panic!("no export {k} line in {lines:?}"))
            .to_string()
    };
    let commands: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("proxyctl "))
        .cloned()
        .collect();
    let servers = commands
        .iter()
        .find(|c| c.starts_with("proxyctl loadtest"))
        .map(|c| {
            quoted(c)
                .into_iter()
                .filter_map(|q| {
                    let (n, d) = q.split_once('=')?;
                    n.starts_with("shard")
                        .then(|| (n.to_string(), d.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Printed {
        ready,
        nodes,
        admin: export("HOTREPART_ADMIN"),
        token: export("HOTREPART_TOKEN"),
        commands,
        servers,
    }
}

/// A running demo process (killed on drop).
struct Demo {
    child: tokio::process::Child,
    lines: Vec<String>,
    data_dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Demo {
    /// Starts `hotrepart demo ARGS` on free ports and reads its stdout up to
    /// the last line it prints.
    async fn start(dir: &TestDir, args: &[&str]) -> Demo {
        let data_dir = dir.0.join("demo");
        let log = dir.0.join("demo.log");
        let mut child = tokio::process::Command::new(bin("hotrepart"))
            .arg("demo")
            .args(["--port", "0", "--admin-port", "0", "--data-dir"])
            .arg(&data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn hotrepart demo");
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, out.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the demo did not finish its lines in time: {lines:?}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })
                .unwrap();
            let Some(line) = line else {
                panic!(
                    "the demo ended before printing all its lines: {lines:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            };
            let last = line.starts_with("# Ctrl-C");
            lines.push(line);
            if last {
                break;
            }
        }
        Demo {
            child,
            lines,
            data_dir,
            log,
        }
    }

    /// PIDs of the postmasters of the demo's servers.
    fn postmasters(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir(&self.data_dir).unwrap().flatten() {
            let f = e.path().join("data/postmaster.pid");
            if let Ok(text) = std::fs::read_to_string(&f) {
                pids.push(text.lines().next().unwrap().trim().parse().unwrap());
            }
        }
        pids
    }

    /// Sends `signal`, waits for a clean exit and for every server to be gone.
    async fn stop(mut self, signal: &str) {
        let pids = self.postmasters();
        assert!(!pids.is_empty(), "no server of the demo found running");
        let pid = self.child.id().unwrap();
        let (ok, _, err) = run_cmd("kill", &[signal, &pid.to_string()], &[]).await;
        assert!(ok, "kill {signal}: {err}");
        let st = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the demo did not stop within 60 s of {signal}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            })
            .unwrap();
        assert!(
            st.success(),
            "the demo exited with {st} after {signal}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        // The demo stopped its servers before it exited (`pg_ctl -w stop`):
        // each is gone or a zombie left for its reaper (init in a
        // container may not reap at once).
        let alive = |p: u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
                == Some(false)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in pids {
            assert!(!alive(p), "PostgreSQL server {p} outlived the demo");
        }
    }
}

impl Drop for Demo {
    /// A test that failed half-way still lets the demo stop its servers.
    fn drop(&mut self) {
        if let (Some(pid), Ok(None)) = (self.child.id(), self.child.try_wait()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_cluster_with_sample_tables_and_stops_cleanly() {
    let dir = TestDir::new("demo");
    let demo = Demo::start(&dir, &[]).await;
    let p = parse(&demo.lines);
    assert_eq!(p.nodes.len(), 3, "a psql line per node: {:?}", demo.lines);
    assert_eq!(p.ready, p.nodes[0]);
    assert!(p.admin.starts_with("http://127.0.0.1:"), "{}", p.admin);
    assert!(p.token.len() >= 16, "token {:?}", p.token);
    assert!(p.commands.iter().any(|c| c == "proxyctl range list"));
    // The admin console line works: the demo's user is an admin user.
    let console = demo
        .lines
        .iter()
        .find(|l| l.starts_with("# admin console"))
        .map(|l| quoted(l).remove(0))
        .unwrap_or_else(|| panic!("no admin console line: {:?}", demo.lines));
    let admin = connect(&console)
        .await
        .expect("connect to the admin console");
    let shards = admin.simple_query("SHOW SHARDS").await.unwrap();
    let rows = shards
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 2, "the demo's two shards in SHOW SHARDS");
    assert!(
        p.commands.iter().any(
            |c| c.starts_with("proxyctl reshard add-shard shard2 --dsn ")
                && c.ends_with("--rebalance --wait")
        ),
        "{:?}",
        p.commands
    );
    assert!(p
        .commands
        .iter()
        .any(|c| c.starts_with("proxyctl loadtest")));
    assert_eq!(
        p.servers.keys().cloned().collect::<Vec<_>>(),
        ["shard0", "shard1", "shard2"],
        "two shards and a spare"
    );

    // Both sample tables answer through every node.
    for dsn in &p.nodes {
        let db = connect(dsn).await.unwrap();
        assert_eq!(count(&db, "SELECT count(*) FROM accounts").await, 1000);
        assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 200);
        assert_eq!(
            count(&db, "SELECT count(*) FROM orders WHERE tenant = 'acme'").await,
            40
        );
        let owner: String = db
            .query_one("SELECT owner FROM accounts WHERE id = 7", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(owner, "owner-7");
        let amount: i32 = db
            .query_one("SELECT amount FROM orders WHERE id = 'globex:3'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(amount, 30);
    }

    // On the shards: accounts spread by hash, each tenant's orders on one
    // shard (the WebAssembly function), nothing on the spare yet.
    let mut accounts = Vec::new();
    let mut tenants: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in ["shard0", "shard1"] {
        let db = connect(&p.servers[name]).await.unwrap();
        accounts.push(count(&db, "SELECT count(*) FROM accounts").await);
        for r in db
            .query("SELECT DISTINCT tenant FROM orders", &[])
            .await
            .unwrap()
        {
            tenants
                .entry(r.get(0))
                .or_default()
                .insert(name.to_string());
        }
    }
    assert_eq!(accounts.iter().sum::<i64>(), 1000);
    assert!(
        accounts.iter().all(|&n| n > 0),
        "accounts per shard {accounts:?}"
    );
    assert_eq!(tenants.len(), 5, "{tenants:?}");
    assert!(
        tenants.values().all(|s| s.len() == 1),
        "a tenant's orders on one shard: {tenants:?}"
    );
    let spare = connect(&p.servers["shard2"]).await.unwrap();
    assert_eq!(
        count(
            &spare,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('accounts', 'orders')"
        )
        .await,
        0
    );

    // proxyctl with the printed environment.
    let env = [
        ("HOTREPART_ADMIN", p.admin.as_str()),
        ("HOTREPART_TOKEN", p.token.as_str()),
    ];
    let proxyctl = bin("proxyctl");
    let proxyctl = proxyctl.to_str().unwrap();
    let (ok, out, err) = run_cmd(proxyctl, &["range", "list"], &env).await;
    assert!(ok, "proxyctl range list: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("epoch "), "{out}");
    assert!(lines[1].starts_with("LO"), "{out}");
    let owners: BTreeSet<&str> = lines[2..]
        .iter()
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(owners, BTreeSet::from(["shard0", "shard1"]), "{out}");
    let (ok, out, err) = run_cmd(proxyctl, &["--json", "status"], &env).await;
    assert!(ok, "proxyctl status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["cluster"]["leader"].is_u64(), "{v}");
    assert_eq!(v["cluster"]["members"].as_array().map(Vec::len), Some(3));

    demo.stop("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_one_node_and_no_spare() {
    let dir = TestDir::new("demo1");
    let demo = Demo::start(&dir, &["--nodes", "1", "--shards", "1", "--spare", "0"]).await;
    let p = parse(&demo.lines);
    assert_eq!(p.nodes, std::slice::from_ref(&p.ready));
    assert!(
        !p.commands.iter().any(|c| c.contains("add-shard")),
        "no spare, no add-shard: {:?}",
        p.commands
    );
    let db = connect(&p.ready).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM accounts").await, 1000);
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 200);
    let (ok, out, err) = run_cmd(
        bin("proxyctl").to_str().unwrap(),
        &["range", "list"],
        &[
            ("HOTREPART_ADMIN", p.admin.as_str()),
            ("HOTREPART_TOKEN", p.token.as_str()),
        ],
    )
    .await;
    assert!(ok, "proxyctl range list: {err}");
    assert_eq!(out.lines().count(), 3, "one range: {out}");
    demo.stop("-INT").await;
}
