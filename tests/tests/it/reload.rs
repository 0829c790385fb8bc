//! Configuration reload on a real `hotrepart serve` process (issue 16):
//! `RELOAD` on the admin console and SIGHUP read the file again; a client
//! connected before keeps working, a user added to the file can log in,
//! a change that needs a restart (the listen address) is refused with
//! 55P02 and its old value kept, a file that does not parse changes
//! nothing (F0000).
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::frontend::auth::scram_verifier;
use hotrepart_proxy::tools::localpg::free_port;
use hotrepart_tests::procs::{ProcNode, TOKEN};
use hotrepart_tests::*;
use std::time::Duration;

/// The node's file: one shard, `app` (an admin user) and `extra_users`.
fn text(port: u16, admin_port: u16, shard_dsn: &str, top: &str, extra_users: &[&str]) -> String {
    let mut t = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_users = [\"{USER}\"]\n{top}\n\
         [[shards]]\nname = \"s0\"\ndsn = \"{shard_dsn}\"\n\
         [[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        scram_verifier(PASSWORD)
    );
    for u in extra_users {
        t.push_str(&format!(
            "[[users]]\nname = \"{u}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
            scram_verifier(&format!("{u}-pw"))
        ));
    }
    t.push_str(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n"
    ));
    t
}

async fn one(db: &tokio_postgres::Client, sql: &str) -> String {
    db.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}

async fn config_value(admin: &tokio_postgres::Client, key: &str) -> String {
    admin
        .simple_query("SHOW CONFIG")
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(key) => {
                r.get(1).map(str::to_string)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_sighup_apply_the_file_without_dropping_clients() {
    let dir = TestDir::new("reload");
    let d = dir.0.clone();
    let pg = tokio::task::spawn_blocking(move || start_pg(&d.join("s0")))
        .await
        .unwrap();
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let path = dir.0.join("node.toml");
    std::fs::write(
        &path,
        text(port, admin_port, &pg.dsn(), "pool_size = 2", &[]),
    )
    .unwrap();
    let mut node = ProcNode::from_config(path.clone(), dir.0.join("node.log"), port, admin_port);
    tokio::task::block_in_place(|| node.start());
    let dsn =
        |user: &str, pw: &str, db: &str| format!("postgres://{user}:{pw}@127.0.0.1:{port}/{db}");
    let client = connect(&dsn(USER, PASSWORD, "postgres")).await.unwrap();
    assert_eq!(one(&client, "SELECT 1").await, "1");
    let admin = connect(&dsn(USER, PASSWORD, "hotrepart")).await.unwrap();
    let e = connect(&dsn("newbie", "newbie-pw", "postgres"))
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "28P01", "{e}");

    // RELOAD: a new user and pool size apply; a new listen address is
    // refused (55P02) and the old one kept.
    let other_port = free_port().unwrap();
    std::fs::write(
        &path,
        text(
            other_port,
            admin_port,
            &pg.dsn(),
            "pool_size = 3\nlog_level = \"debug\"",
            &["newbie"],
        ),
    )
    .unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "55P02", "{e}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("listen") && msg.contains("pool_size: 2 -> 3"),
        "{msg}"
    );
    assert_eq!(config_value(&admin, "pool_size").await, "3");
    assert_eq!(
        config_value(&admin, "listen").await,
        format!("127.0.0.1:{port}")
    );
    let newbie = connect(&dsn("newbie", "newbie-pw", "postgres"))
        .await
        .expect("a user added to the file logs in after RELOAD");
    assert_eq!(one(&newbie, "SELECT 2").await, "2");
    assert_eq!(
        one(&client, "SELECT 3").await,
        "3",
        "the old client goes on"
    );
    // The existing pool grew in place.
    let pools = admin.simple_query("SHOW POOLS").await.unwrap();
    assert!(pools.iter().any(|m| matches!(m,
        tokio_postgres::SimpleQueryMessage::Row(r)
            if r.get(0) == Some("postgres") && r.get(1) == Some(USER) && r.get(5) == Some("3"))));

    // SIGHUP: the listen address back as it runs, another user added.
    std::fs::write(
        &path,
        text(
            port,
            admin_port,
            &pg.dsn(),
            "pool_size = 3",
            &["newbie", "second"],
        ),
    )
    .unwrap();
    let pid = node.pid().unwrap();
    let (ok, _, err) = run_cmd("kill", &["-HUP", &pid.to_string()], &[]).await;
    assert!(ok, "kill -HUP: {err}");
    let second = dsn("second", "second-pw", "postgres");
    wait_for(
        "the user added before SIGHUP logs in",
        Duration::from_secs(15),
        || {
            let second = second.clone();
            async move { connect(&second).await.is_ok() }
        },
    )
    .await;
    assert_eq!(
        one(&client, "SELECT 4").await,
        "4",
        "the old client goes on"
    );
    assert_eq!(one(&newbie, "SELECT 5").await, "5");

    // A file that does not parse changes nothing.
    std::fs::write(&path, "pool_size = \"many\"\n").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "F0000", "{e}");
    assert_eq!(config_value(&admin, "pool_size").await, "3");
    connect(&second)
        .await
        .expect("the configuration in use is kept");
    assert_eq!(one(&client, "SELECT 6").await, "6");

    let log = std::fs::read_to_string(dir.0.join("node.log")).unwrap();
    assert!(log.contains("users: newbie added"), "{log}");
    assert!(log.contains("needs a restart"), "{log}");
    assert!(log.contains("SIGHUP: reloading the configuration"), "{log}");
    // log_level = "debug" took effect (and SIGHUP's file left it unset).
    assert!(log.contains("log filter set to debug"), "{log}");
}
