//! Issue 12 (D8): a node's `data_dir` belongs to one process. Two
//! `hotrepart serve` processes on one directory would each make Paxos
//! promises the other does not know of; the second one is refused at
//! start, naming the directory and the holder's pid. A node whose catalog
//! is in memory (no `data_dir`, no `[cluster]`) refuses reshard jobs,
//! whose progress a restart would forget. None of this needs a running
//! PostgreSQL: nodes do not connect to their shards at start.
#![allow(clippy::unwrap_used)]

use hotrepart_proxy::tools::localpg::free_port;
use hotrepart_tests::procs::{bin, ProcNode, SECRET, TOKEN};
use hotrepart_tests::*;
use std::path::Path;

/// A node's file: two shards nobody listens on, the admin API; `top`:
/// top-level keys, `tables`: TOML tables appended.
fn config(dir: &Path, name: &str, top: &str, tables: &str) -> (ProcNode, std::path::PathBuf) {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\n{top}\n\
         [[shards]]\nname = \"s0\"\ndsn = \"host=127.0.0.1 port=1 user=postgres dbname=postgres\"\n\
         [[shards]]\nname = \"s1\"\ndsn = \"host=127.0.0.1 port=2 user=postgres dbname=postgres\"\n\
         [[users]]\nname = \"{USER}\"\nauth = \"trust\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n{tables}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let node = ProcNode::from_config(
        path.clone(),
        dir.join(format!("{name}.log")),
        port,
        admin_port,
    );
    (node, path)
}

/// `hotrepart serve --config path`, expected to exit on its own: (status
/// ok, stderr).
async fn serve_once(path: &Path) -> (bool, String) {
    let (ok, out, err) = run_cmd(
        bin("hotrepart").to_str().unwrap(),
        &["serve", "--config", path.to_str().unwrap()],
        &[],
    )
    .await;
    (ok, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_data_dir_is_refused() {
    let dir = TestDir::new("datadir-lock");
    // A node alone, its catalog in data_dir.
    let data = dir.0.join("alone");
    let (mut first, path) = config(
        &dir.0,
        "alone",
        &format!("data_dir = \"{}\"", data.display()),
        "",
    );
    tokio::task::block_in_place(|| first.start());
    let pid = first.pid().unwrap();
    let (ok, text) = serve_once(&path).await;
    assert!(
        !ok,
        "a second process on {} started: {text}",
        data.display()
    );
    assert!(
        text.contains(&format!(
            "data_dir {} is in use by another hotrepart process (pid {pid})",
            data.display()
        )),
        "{text}"
    );
    // The first one still serves.
    assert!(std::net::TcpStream::connect(("127.0.0.1", first.admin_port)).is_ok());

    // A cluster node: the same for [cluster] data_dir (its peer need not
    // run for the node to start).
    let cdata = dir.0.join("member");
    let (mut member, path) = config(
        &dir.0,
        "member",
        "",
        &format!(
            "\n[cluster]\nnode_id = 1\nlisten = \"127.0.0.1:{}\"\nsecret = \"{SECRET}\"\ndata_dir = \"{}\"\n\
             [[cluster.peers]]\nid = 2\naddr = \"127.0.0.1:{}\"\n",
            free_port().unwrap(),
            cdata.display(),
            free_port().unwrap()
        ),
    );
    tokio::task::block_in_place(|| member.start());
    let pid = member.pid().unwrap();
    let (ok, text) = serve_once(&path).await;
    assert!(!ok, "a second cluster process started: {text}");
    assert!(
        text.contains(&format!(
            "data_dir {} is in use by another hotrepart process (pid {pid})",
            cdata.display()
        )),
        "{text}"
    );
    // Once the holder is gone (kill -9 included), the directory is free.
    let old = first.pid();
    first.kill9();
    tokio::task::block_in_place(|| first.start());
    assert!(first.pid().is_some() && first.pid() != old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_jobs_need_a_durable_catalog() {
    let dir = TestDir::new("datadir-none");
    let (mut node, _) = config(&dir.0, "memory", "", "");
    tokio::task::block_in_place(|| node.start());
    let url = node.admin_url();
    let ctl = |args: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut all = vec!["--admin", url.as_str(), "--token", TOKEN];
            all.extend_from_slice(args);
            run_cmd(bin("proxyctl").to_str().unwrap(), &all, &[]).await
        }
    };
    for args in [
        &["reshard", "move", "0", "--to", "s1"][..],
        &["reshard", "split", "0", "--to", "s1"][..],
        &["reshard", "drain", "s1"][..],
        &[
            "reshard",
            "add-shard",
            "s2",
            "--dsn",
            "host=127.0.0.1 port=3",
        ][..],
    ] {
        let (ok, _, err) = ctl(args).await;
        assert!(!ok, "{args:?} was accepted");
        assert!(
            err.contains("reshard jobs need a durable catalog")
                && err.contains("without data_dir")
                && err.contains("HTTP 409"),
            "{args:?}: {err}"
        );
    }
    // Nothing was started or changed.
    let (ok, out, err) = ctl(&["--json", "jobs", "list"]).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["jobs"], serde_json::json!([]), "{v}");
    let (ok, out, err) = ctl(&["--json", "range", "list"]).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ranges"].as_array().map(Vec::len), Some(2), "{v}");
}
