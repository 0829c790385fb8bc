//! The admin console over the PostgreSQL protocol (issue 16): the virtual
//! database `hotrepart`, for `admin_users` only, answering SHOW commands
//! from the node's own state, with real clients (tokio-postgres, psql).
#![allow(clippy::unwrap_used)]

use hotrepart_routing_paxos::CatalogCommand;
use hotrepart_routing_paxos::{JobPhase, JobSpec};
use hotrepart_tests::*;
use std::time::Duration;
use tokio_postgres::SimpleQueryMessage;

/// Rows of a console command as (column → value) lists.
async fn show(db: &tokio_postgres::Client, cmd: &str) -> Vec<Vec<(String, String)>> {
    db.simple_query(cmd)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn get<'a>(row: &'a [(String, String)], col: &str) -> &'a str {
    &row.iter()
        .find(|(c, _)| c == col)
        .unwrap_or_else(|| panic!("no column {col}: {row:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_shows_pools_shards_and_ranges() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: format!("admin_users = [\"{USER}\"]\npool_size = 3"),
        users: "[[users]]\nname = \"t\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        ..Opts::default()
    })
    .await;
    // Some work through the node, so that a pool exists.
    let db = c.connect().await;
    db.simple_query("SELECT 1").await.unwrap();
    let console_dsn = format!(
        "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/hotrepart",
        c.addr.port()
    );
    let admin = connect(&console_dsn).await.unwrap();
    let v = show(&admin, "SHOW VERSION").await;
    assert!(get(&v[0], "version").starts_with("hotrepart "), "{v:?}");
    let pools = show(&admin, "show pools;").await;
    let p = pools
        .iter()
        .find(|r| get(r, "database") == "postgres")
        .unwrap_or_else(|| panic!("{pools:?}"));
    assert_eq!(get(p, "pool_size"), "3");
    assert!(get(p, "sv_idle").parse::<usize>().unwrap() >= 1, "{p:?}");
    assert_eq!(get(p, "pool_mode"), "transaction");
    let shards = show(&admin, "SHOW SHARDS").await;
    let names: Vec<&str> = shards.iter().map(|r| get(r, "name")).collect();
    assert_eq!(names, ["s0", "s1"]);
    let ranges = show(&admin, "SHOW RANGES").await;
    let owned: usize = shards
        .iter()
        .map(|r| get(r, "ranges_owned").parse::<usize>().unwrap())
        .sum();
    assert_eq!(
        owned,
        ranges.len(),
        "every range has one owner: {shards:?} {ranges:?}"
    );
    let cfg = show(&admin, "SHOW CONFIG").await;
    assert!(cfg
        .iter()
        .any(|r| get(r, "key") == "pool_size" && get(r, "value") == "3"));
    // Errors are clear and the console goes on.
    let e = admin.simple_query("SHOW NOTHING").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000", "{e}");
    let e = admin.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42601", "{e}");
    // The client through the shards and this console session.
    assert_eq!(show(&admin, "SHOW CLIENTS").await.len(), 2);
    // Not an admin user: refused at login.
    let e = connect(&format!(
        "postgres://t@127.0.0.1:{}/hotrepart",
        c.addr.port()
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501", "{e}");
    // psql, as a DBA would use it.
    let (ok, out, err) = run_cmd(
        &pg_tool("psql"),
        &[&console_dsn, "-X", "-c", "SHOW POOLS"],
        &[],
    )
    .await;
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("sv_idle") && out.contains("postgres"), "{out}");
}

fn console_dsn(c: &Cluster) -> String {
    format!(
        "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/hotrepart",
        c.addr.port()
    )
}

/// SHOW STATS' row of database `postgres` as numbers by column.
async fn stats_of(admin: &tokio_postgres::Client) -> std::collections::BTreeMap<String, u64> {
    let rows = show(admin, "SHOW STATS").await;
    let r = rows
        .iter()
        .find(|r| get(r, "database") == "postgres")
        .unwrap_or_else(|| panic!("no stats for postgres: {rows:?}"));
    r.iter()
        .filter(|(c, _)| c != "database")
        .map(|(c, v)| (c.clone(), v.parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_and_servers_follow_the_load() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: format!("admin_users = [\"{USER}\"]\npool_size = 1"),
        ..Opts::default()
    })
    .await;
    let admin = connect(&console_dsn(&c)).await.unwrap();
    // The PgBouncer 1.18 columns, in its order.
    let stats = show(&admin, "SHOW STATS").await;
    assert!(stats.is_empty(), "no client yet: {stats:?}");
    let a = c.connect().await;
    a.simple_query("SELECT 1").await.unwrap();
    let before = stats_of(&admin).await;
    let names: Vec<&String> = before.keys().collect();
    for col in [
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ] {
        assert!(before.contains_key(col), "{col} missing: {names:?}");
    }
    // 20 autocommit queries, then one transaction of three.
    for _ in 0..20 {
        a.simple_query("SELECT 1").await.unwrap();
    }
    a.simple_query("BEGIN").await.unwrap();
    let pid: i32 = a
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    // Inside the transaction: its server is active, held by the session.
    let servers = show(&admin, "SHOW SERVERS").await;
    let held = servers
        .iter()
        .find(|r| get(r, "remote_pid") == pid.to_string())
        .unwrap_or_else(|| panic!("backend {pid} not in SHOW SERVERS: {servers:?}"));
    assert_eq!(get(held, "type"), "S");
    assert_eq!(get(held, "state"), "active", "{held:?}");
    assert!(!get(held, "link").is_empty(), "{held:?}");
    assert_eq!(get(held, "database"), "postgres");
    assert_eq!(get(held, "user"), "postgres", "the shard login");
    assert_eq!(get(held, "addr"), "127.0.0.1");
    let shard_ports: Vec<String> = c.shards.iter().map(|s| s.port.to_string()).collect();
    assert!(
        shard_ports.contains(&get(held, "port").to_string()),
        "{held:?}"
    );
    assert!(get(held, "local_port").parse::<u16>().unwrap() > 0);
    assert!(get(held, "connect_time").ends_with(" UTC"), "{held:?}");
    // A second client waits for the pool's only connection (pool_size 1).
    let b = c.connect().await;
    let waiter = tokio::spawn(async move {
        b.simple_query("SELECT 1").await.unwrap();
        b
    });
    wait_for(
        "a client waiting in SHOW POOLS",
        Duration::from_secs(10),
        || async {
            show(&admin, "SHOW POOLS")
                .await
                .iter()
                .any(|r| get(r, "database") == "postgres" && get(r, "cl_waiting") == "1")
        },
    )
    .await;
    a.simple_query("COMMIT").await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiting client gets the connection after COMMIT")
        .unwrap();
    let after = stats_of(&admin).await;
    let d = |k: &str| after[k] - before[k];
    // 20 + BEGIN + SELECT + COMMIT from a, and b's SELECT.
    assert_eq!(d("total_query_count"), 24, "{before:?} -> {after:?}");
    assert_eq!(d("total_xact_count"), 22, "{before:?} -> {after:?}");
    assert!(d("total_received") > 24 * 5, "{before:?} -> {after:?}");
    assert!(
        d("total_sent") > d("total_received"),
        "{before:?} -> {after:?}"
    );
    assert!(d("total_query_time") > 0 && d("total_xact_time") >= d("total_query_time") / 2);
    assert!(
        d("total_wait_time") > 0,
        "b waited: {before:?} -> {after:?}"
    );
    // After the transaction the server is back in the pool.
    let servers = show(&admin, "SHOW SERVERS").await;
    let back = servers
        .iter()
        .find(|r| get(r, "remote_pid") == pid.to_string())
        .unwrap_or_else(|| panic!("{servers:?}"));
    assert_eq!(get(back, "state"), "idle", "{back:?}");
    assert_eq!(get(back, "link"), "", "{back:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_tables_functions_and_jobs_read_the_catalog() {
    let wat = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/functions/tenant_prefix.wat")
        .canonicalize()
        .unwrap();
    let (gate, mut reached) = hotrepart_proxy::control::jobs::JobGate::new();
    let c = Cluster::start_with(
        Opts {
            shards: 2,
            extra: format!("admin_users = [\"{USER}\"]\nreference_tables = [\"countries\"]"),
            tail: format!(
                "[[functions]]\nname = \"tenant\"\npath = \"{}\"\n\
                 [[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n\
                 [[sharded_tables]]\nname = \"docs\"\nkey = \"k\"\ntype = \"text\"\nfunction = \"tenant\"\n",
                wat.display()
            ),
            ..Opts::default()
        },
        |n| n.job_gate = Some(gate.clone()),
    )
    .await;
    let admin = connect(&console_dsn(&c)).await.unwrap();
    let tables = show(&admin, "SHOW TABLES").await;
    let row = |name: &str| {
        tables
            .iter()
            .find(|r| get(r, "name") == name)
            .unwrap_or_else(|| panic!("{name} not in {tables:?}"))
            .clone()
    };
    let items = row("items");
    assert_eq!(
        (
            get(&items, "kind"),
            get(&items, "key"),
            get(&items, "key_type")
        ),
        ("sharded", "id", "bigint")
    );
    assert_eq!(get(&items, "function"), "hash (seed 0)");
    assert!(get(&row("docs"), "function").starts_with("wasm tenant ("));
    assert_eq!(get(&row("countries"), "kind"), "reference");
    let functions = show(&admin, "SHOW FUNCTIONS").await;
    assert_eq!(functions.len(), 1, "{functions:?}");
    assert_eq!(get(&functions[0], "name"), "tenant");
    assert_eq!(get(&functions[0], "tables"), "docs");
    assert_eq!(get(&functions[0], "id").len(), 64);
    assert!(get(&functions[0], "size_bytes").parse::<usize>().unwrap() > 0);
    assert!(show(&admin, "SHOW JOBS").await.is_empty());
    // A job, held by the test before its first step.
    let snap = c.node.routing.catalog.load_full();
    let r = snap
        .ranges()
        .iter()
        .find(|r| r.write_owner.as_str() == "s0")
        .unwrap()
        .clone();
    c.propose(CatalogCommand::JobStart {
        job: "console_job".into(),
        spec: JobSpec {
            range: r.span(),
            from: "s0".into(),
            to: "s1".into(),
        },
    })
    .await;
    let (job, phase) = tokio::time::timeout(Duration::from_secs(30), reached.recv())
        .await
        .expect("the job starts")
        .unwrap();
    assert_eq!((job.as_str(), phase), ("console_job", JobPhase::Planned));
    let jobs = show(&admin, "SHOW JOBS").await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let j = &jobs[0];
    assert_eq!(
        (
            get(j, "id"),
            get(j, "phase"),
            get(j, "from_shard"),
            get(j, "to_shard")
        ),
        ("console_job", "planned", "s0", "s1")
    );
    assert_eq!(get(j, "lo"), r.lo.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: format!("admin_users = [\"{USER}\"]"),
        ..Opts::default()
    })
    .await;
    let admin = connect(&console_dsn(&c)).await.unwrap();
    let a = c.connect().await;
    let b = c.connect().await;
    b.simple_query("SELECT 1").await.unwrap();
    // a holds a server connection in a transaction.
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    let pauser = connect(&console_dsn(&c)).await.unwrap();
    let pause = tokio::spawn(async move { pauser.simple_query("PAUSE").await.map(|_| ()) });
    wait_for("SHOW STATE paused", Duration::from_secs(10), || async {
        show(&admin, "SHOW STATE")
            .await
            .iter()
            .any(|r| get(r, "key") == "paused" && get(r, "value") == "yes")
    })
    .await;
    // PAUSE waits for a's transaction.
    assert!(!pause.is_finished(), "PAUSE returned with a server in use");
    let mut query = tokio::spawn(async move {
        let rows = b.simple_query("SELECT 41 + 1").await.unwrap();
        let v = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        (b, v)
    });
    wait_for("b waiting for RESUME", Duration::from_secs(10), || async {
        show(&admin, "SHOW STATE")
            .await
            .iter()
            .any(|r| get(r, "key") == "waiting_clients" && get(r, "value") == "1")
    })
    .await;
    // b waits holding no routing pin: a catalog change's fence (what a
    // cut-over waits on) goes through while it waits.
    let epoch = c
        .propose(CatalogCommand::DeclareReference {
            table: "paused_ref".into(),
        })
        .await;
    c.node
        .routing
        .fence(epoch, Duration::from_secs(3))
        .await
        .expect("no statement held by PAUSE pins the old routing table");
    // a's transaction goes on to its end while paused.
    a.simple_query("SELECT 2").await.unwrap();
    a.simple_query("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE returns once every server is back")
        .unwrap()
        .unwrap();
    // Every server connection was closed, and b's query still waits.
    assert!(show(&admin, "SHOW SERVERS").await.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut query)
            .await
            .is_err(),
        "a new transaction ran while paused"
    );
    let e = admin.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "55000", "{e}");
    admin.simple_query("RESUME").await.unwrap();
    let (b, n) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the waiting query runs after RESUME")
        .unwrap();
    assert_eq!(n.as_deref(), Some("42"));
    let e = admin.simple_query("RESUME").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "55000", "{e}");
    // PAUSE of another database leaves this one alone.
    admin.simple_query("PAUSE otherdb").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), b.simple_query("SELECT 1"))
        .await
        .expect("postgres is not paused")
        .unwrap();
    let e = admin.simple_query("RESUME postgres").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "55000", "{e}");
    admin.simple_query("RESUME otherdb").await.unwrap();
    assert!(show(&admin, "SHOW STATE")
        .await
        .iter()
        .any(|r| get(r, "key") == "paused" && get(r, "value") == "no"));
}

/// Issue 16: SHOW CLIENTS lists each client with PgBouncer's columns: who,
/// from where, since when, waiting or not, and the backends it holds
/// (SHOW SERVERS' `link` is the client's `ptr`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_clients_lists_each_client_and_what_it_holds() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: format!("admin_users = [\"{USER}\"]\npool_size = 1"),
        ..Opts::default()
    })
    .await;
    let admin = connect(&console_dsn(&c)).await.unwrap();
    let a = connect(&format!("{}?application_name=app-a", c.dsn()))
        .await
        .unwrap();
    a.simple_query("BEGIN").await.unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // b waits for the home shard's only pooled connection.
    let b = connect(&format!("{}?application_name=app-b", c.dsn()))
        .await
        .unwrap();
    let waiter = tokio::spawn(async move {
        b.simple_query("SELECT 1").await.unwrap();
        b
    });
    let app = |rows: &[Vec<(String, String)>], name: &str| {
        rows.iter()
            .find(|r| get(r, "application_name") == name)
            .cloned()
            .unwrap_or_else(|| panic!("no client {name}: {rows:?}"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = show(&admin, "SHOW CLIENTS").await;
        if rows
            .iter()
            .any(|r| get(r, "application_name") == "app-b" && get(r, "state") == "waiting")
        {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "app-b never waiting in SHOW CLIENTS: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rows.len(), 3, "a, b and the console: {rows:?}");
    let ra = app(&rows, "app-a");
    let rb = app(&rows, "app-b");
    for r in [&ra, &rb] {
        assert_eq!(get(r, "type"), "C");
        assert_eq!(get(r, "user"), USER);
        assert_eq!(get(r, "database"), "postgres");
        assert_eq!(get(r, "addr"), "127.0.0.1");
        assert!(get(r, "port").parse::<u16>().unwrap() > 0, "{r:?}");
        assert_eq!(get(r, "local_port"), c.addr.port().to_string());
        assert!(get(r, "connect_time").ends_with(" UTC"), "{r:?}");
        assert!(get(r, "request_time").ends_with(" UTC"), "{r:?}");
        assert_eq!(get(r, "tls"), "");
        assert!(get(r, "pid").parse::<i32>().unwrap() > 0, "{r:?}");
    }
    assert_ne!(get(&ra, "port"), get(&rb, "port"));
    assert_eq!(get(&ra, "state"), "active", "{ra:?}");
    assert_eq!(get(&ra, "wait_us"), "0");
    assert_eq!(get(&ra, "shards"), "s0", "a holds its home shard's backend");
    assert_eq!(get(&rb, "link"), "", "b holds nothing yet: {rb:?}");
    // a's backend in SHOW SERVERS links to a, and a's link is that backend.
    let servers = show(&admin, "SHOW SERVERS").await;
    let held = servers
        .iter()
        .find(|r| get(r, "remote_pid") == pid.to_string())
        .unwrap_or_else(|| panic!("backend {pid} not in SHOW SERVERS: {servers:?}"));
    assert_eq!(get(held, "link"), get(&ra, "ptr"), "{held:?} {ra:?}");
    assert_eq!(get(&ra, "link"), get(held, "ptr"), "{held:?} {ra:?}");
    let console = rows
        .iter()
        .find(|r| get(r, "database") == "hotrepart")
        .unwrap_or_else(|| panic!("the console session: {rows:?}"));
    assert_eq!(get(console, "link"), "");
    // a ends its transaction: b gets the connection and is active again.
    a.simple_query("COMMIT").await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    let rows = show(&admin, "SHOW CLIENTS").await;
    let rb = app(&rows, "app-b");
    assert_eq!(get(&rb, "state"), "active", "{rb:?}");
    assert_eq!(get(&rb, "link"), "", "b released it: {rb:?}");
    drop((a, b));
    wait_for("only the console left", Duration::from_secs(10), || async {
        show(&admin, "SHOW CLIENTS").await.len() == 1
    })
    .await;
}

/// SHOW DATABASES, LISTS and HELP: columns and values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_databases_lists_and_help() {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: format!("admin_users = [\"{USER}\"]\npool_size = 3"),
        ..Opts::default()
    })
    .await;
    let db = c.connect().await;
    db.simple_query("SELECT 1").await.unwrap();
    let admin = connect(&console_dsn(&c)).await.unwrap();

    let dbs = show(&admin, "SHOW DATABASES").await;
    let cols: Vec<&str> = dbs[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cols, ["name", "host", "port", "pool_size", "pool_mode"]);
    assert_eq!(dbs.len(), 2, "{dbs:?}");
    for (i, r) in dbs.iter().enumerate() {
        assert_eq!(get(r, "name"), format!("s{i}"));
        assert_eq!(get(r, "host"), "127.0.0.1");
        assert_eq!(get(r, "port"), c.shards[i].port.to_string());
        assert_eq!(get(r, "pool_size"), "3");
        assert_eq!(get(r, "pool_mode"), "transaction");
    }

    let lists = show(&admin, "SHOW LISTS").await;
    let item = |name: &str| -> usize {
        let r = lists
            .iter()
            .find(|r| get(r, "list") == name)
            .unwrap_or_else(|| panic!("no {name}: {lists:?}"));
        get(r, "items").parse().unwrap()
    };
    assert_eq!(item("databases"), 2);
    assert_eq!(item("used_clients"), 2, "the client and this console");
    assert!(item("pools") >= 1);
    assert_eq!(item("ranges"), show(&admin, "SHOW RANGES").await.len());

    let help = show(&admin, "SHOW HELP").await;
    let commands: Vec<&str> = help.iter().map(|r| get(r, "command")).collect();
    for c in [
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW DATABASES",
        "SHOW NODES",
        "RELOAD",
        "PAUSE [db]",
        "RESUME [db]",
    ] {
        assert!(commands.contains(&c), "{c} not in SHOW HELP: {commands:?}");
    }
    // Every SHOW that HELP lists answers.
    for c in commands.iter().filter(|c| c.starts_with("SHOW ")) {
        admin
            .simple_query(c)
            .await
            .unwrap_or_else(|e| panic!("{c}: {e:?}"));
    }
}
