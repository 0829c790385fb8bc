//! The admin console over the PostgreSQL protocol (issue 16): the virtual
//! database `hotrepart`, for `admin_users` only, answering SHOW commands
//! from the node's own state, with real clients (tokio-postgres, psql).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
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
    let e = admin.simple_query("SHOW STATS").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000", "{e}");
    let e = admin.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42601", "{e}");
    assert_eq!(show(&admin, "SHOW CLIENTS").await.len(), 1);
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
