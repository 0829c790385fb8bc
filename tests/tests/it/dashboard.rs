//! The web dashboard (issue 16), in a real headless browser (Debian's
//! Chromium): the page at `/` of a node's admin port, given the token once
//! as `?token=…`, loads and shows the cluster's shards, ranges and nodes,
//! then follows a reshard job through its phases to its end. Chromium's
//! `--dump-dom` gives the DOM after the page's script ran (virtual time);
//! a screenshot is taken during the job (in the temp dir, path printed;
//! `docs/dashboard-reshard.png` is one).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::{ProcCluster, TOKEN};
use hotrepart_tests::*;
use std::time::{Duration, Instant};

const TABLES: &str = "[[sharded_tables]]\nname = \"items\"\nkey = \"id\"\ntype = \"int8\"\n";

/// The browser, or None (outside CI only: CI=true needs it).
fn chromium() -> Option<String> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| b.to_string())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the dashboard test needs Chromium (deploy/setup.sh installs it)"
        );
        eprintln!("SKIPPED: no chromium on this machine (deploy/setup.sh installs it)");
    }
    found
}

/// Runs headless Chromium on `url`; `extra` adds flags (`--dump-dom`,
/// `--screenshot=…`). Returns stdout.
async fn browse(bin: &str, url: &str, extra: &[String]) -> String {
    let profile = tempfile_dir();
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=4000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend(extra.iter().cloned());
    args.push(url.to_string());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish in 60 s")
    .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "hr-chromium-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Occurrences of `needle` in the rendered part of `dom` (the page's
/// script, which holds the templates, cut out).
fn count(dom: &str, needle: &str) -> usize {
    rendered(dom).matches(needle).count()
}

fn rendered(dom: &str) -> String {
    match (dom.find("<script>"), dom.find("</script>")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &dom[..a], &dom[b..]),
        _ => dom.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_cluster_and_follows_a_job_in_a_browser() {
    let Some(bin) = chromium() else { return };
    let c = ProcCluster::start_with_env(
        3,
        2,
        "",
        TABLES,
        "lease_ms = 1000",
        &[("HOTREPART_TEST_JOB_STEP_DELAY_MS", "1500")],
    )
    .await;
    c.wait_ready(Duration::from_secs(30)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let values: Vec<String> = (1..=300).map(|i| format!("({i}, 'x')")).collect();
    db.batch_execute(&format!(
        "INSERT INTO items (id, v) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let url = format!("{}/?token={TOKEN}", c.nodes[0].admin_url());
    let dump = vec!["--dump-dom".to_string()];

    // Without the token the page asks for it and shows no data.
    let dom = browse(&bin, &format!("{}/", c.nodes[0].admin_url()), &dump).await;
    assert!(dom.contains("id=\"login\""), "{dom}");
    assert_eq!(
        count(&dom, "class=\"range\""),
        0,
        "data shown without the token"
    );

    // With it: shards, every range, three nodes with one leader.
    let dom = browse(&bin, &url, &dump).await;
    assert!(
        dom.contains("data-loaded=\"yes\""),
        "the page did not load its data:\n{dom}"
    );
    let ranges = c.ranges(0).await;
    assert_eq!(count(&dom, "class=\"range\""), ranges.len(), "{dom}");
    for s in ["s0", "s1"] {
        assert!(
            dom.contains(&format!("data-shard=\"{s}\"")),
            "shard {s} not shown"
        );
    }
    assert_eq!(count(&dom, "class=\"nodeinfo\""), 3, "{dom}");
    assert_eq!(count(&dom, "<td>leader</td>"), 1, "{dom}");

    // A job, followed by the page to its end.
    let lo = ranges.iter().find(|r| r.2 == "s0").unwrap().0;
    let (ok, out, err) = c
        .proxyctl(
            0,
            &["--json", "reshard", "move", &lo.to_string(), "--to", "s1"],
        )
        .await;
    assert!(ok, "{err}");
    let job = serde_json::from_str::<serde_json::Value>(&out).unwrap()["job"]
        .as_str()
        .unwrap()
        .to_string();
    // Beside the test's other temporary files (the target dir may be
    // anywhere: CARGO_TARGET_DIR); its path is printed.
    let shot = std::env::temp_dir().join(format!(
        "hotrepart-dashboard-during-job-{}.png",
        std::process::id()
    ));
    let mut phases: Vec<String> = Vec::new();
    let start = Instant::now();
    loop {
        let dom = rendered(&browse(&bin, &url, &dump).await);
        let marker = format!("data-job=\"{job}\" data-phase=\"");
        if let Some(i) = dom.find(&marker) {
            let rest = &dom[i + marker.len()..];
            let phase = rest[..rest.find('"').unwrap()].to_string();
            if phases.last() != Some(&phase) {
                eprintln!(
                    "{:?}: the page shows job {job} in phase {phase}",
                    start.elapsed()
                );
                if phases.is_empty() {
                    browse(
                        &bin,
                        &url,
                        &[
                            format!("--screenshot={}", shot.display()),
                            "--window-size=1100,1000".into(),
                        ],
                    )
                    .await;
                }
                phases.push(phase.clone());
            }
            if phase == "done" {
                // The range is s1's now, on the page too.
                assert!(!dom.contains("class=\"seg moving\""), "{dom}");
                break;
            }
            assert!(
                phase != "failed" && phase != "aborted",
                "the job ended {phase}:\n{}",
                c.logs()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the page never showed job {job} done (phases seen: {phases:?})"
        );
    }
    assert!(
        phases.len() >= 2,
        "the page showed only {phases:?}: it did not follow the job"
    );
    let dom = browse(&bin, &url, &dump).await;
    assert_eq!(
        count(&dom, "data-shard=\"s0\""),
        0,
        "s0 still owns a range:\n{dom}"
    );
    assert!(shot.exists(), "no screenshot taken at {}", shot.display());
    eprintln!("screenshot during the job: {}", shot.display());
}
