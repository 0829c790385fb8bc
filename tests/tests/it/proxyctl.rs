//! `proxyctl` and the node binary as scripts see them: stdout a pipe, not
//! a terminal. Following a job prints lines (JSON lines with `--json`); a
//! closed stdout is no error; node logs carry no colour codes off a
//! terminal and are JSON with `HOTREPART_LOG_FORMAT=json`.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::{bin, ProcCluster, TOKEN};
use hotrepart_tests::{connect, run_cmd};
use std::process::Stdio;
use std::time::Duration;

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

async fn ctl_ok(c: &ProcCluster, args: &[&str]) -> String {
    let (ok, out, err) = c.proxyctl(0, args).await;
    assert!(ok, "proxyctl {args:?}: {err}\n{}", c.logs());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_a_job_prints_lines_when_stdout_is_a_pipe() {
    let c = ProcCluster::start(2, 2, TABLES, "").await;
    c.wait_ready(Duration::from_secs(60)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    let values: Vec<String> = (1..=500).map(|i| format!("({i}, {i})")).collect();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, n int)")
        .await
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO items (id, n) VALUES {}",
        values.join(",")
    ))
    .await
    .unwrap();
    let ranges = c.ranges(0).await;
    let (lo, _, owner) = ranges.iter().find(|r| r.2 == "s0").unwrap().clone();
    assert_eq!(owner, "s0");

    // Text: a line per change, the last one `done`.
    let out = ctl_ok(
        &c,
        &["reshard", "move", &lo.to_string(), "--to", "s1", "--wait"],
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "no progress line on a pipe");
    assert!(
        lines.iter().all(|l| l.starts_with("job ")),
        "progress lines: {out}"
    );
    let last = lines.last().unwrap();
    assert!(last.contains(": done "), "last line {last:?} of {out}");
    let id = last
        .strip_prefix("job ")
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_string();

    // JSON lines: each an object with the job's phase, the last `done`.
    let out = ctl_ok(
        &c,
        &[
            "--json",
            "reshard",
            "move",
            &lo.to_string(),
            "--to",
            "s0",
            "--wait",
        ],
    )
    .await;
    let jobs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!jobs.is_empty(), "no JSON line on a pipe");
    assert!(jobs.iter().all(|j| j["phase"].is_string()), "{out}");
    let last = jobs.last().unwrap();
    assert_eq!(last["phase"], "done", "{out}");
    assert_eq!(last["done"], true, "{out}");
    assert!(last["rows_copied"].as_u64().unwrap() > 0, "{out}");

    // Watching a finished job prints its end once.
    let out = ctl_ok(&c, &["jobs", "watch", &id]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(": done "), "{out}");

    // The node's log (stderr, a file): no colour codes.
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_is_no_error() {
    let c = ProcCluster::start(2, 1, "", "").await;
    c.wait_ready(Duration::from_secs(60)).await;
    for _ in 0..3 {
        let mut child = tokio::process::Command::new(bin("proxyctl"))
            .args(["--admin", &c.nodes[0].admin_url(), "--token", TOKEN])
            .args(["range", "list"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The reader goes away before proxyctl has its answer to print.
        drop(child.stdout.take());
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("proxyctl ends")
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    }
    // And as a shell runs it.
    let script = format!(
        "{} --admin {} --token {TOKEN} range list | head -1",
        bin("proxyctl").display(),
        c.nodes[0].admin_url()
    );
    let (ok, out, err) = run_cmd("sh", &["-c", &script], &[]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("epoch "), "{out}");
    assert_eq!(err, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_on_request() {
    let c =
        ProcCluster::start_with_env(2, 1, "", "", "", &[("HOTREPART_LOG_FORMAT", "json")]).await;
    c.wait_ready(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "listening" && l["level"] == "INFO"),
        "{log}"
    );
    assert!(lines.iter().all(|l| l["timestamp"].is_string()), "{log}");

    // A format it does not know stops the node at once with a clear error.
    let (ok, _, err) = run_cmd(
        bin("hotrepart").to_str().unwrap(),
        &["serve", "--config", c.nodes[0].config.to_str().unwrap()],
        &[("HOTREPART_LOG_FORMAT", "yaml")],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("HOTREPART_LOG_FORMAT"), "{err}");
}
