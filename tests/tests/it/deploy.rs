//! The deployment files in `deploy/` (issue 16), checked by what runs
//! here: `systemd-analyze verify` of the unit (with the binary just
//! built), a YAML parse of the Kubernetes manifests (python3's PyYAML)
//! with the checks that matter (stable node ids, a headless Service, a
//! quorum-keeping PodDisruptionBudget, non-root), the node file the pods
//! generate accepted by the node's own validation, the Dockerfile's
//! stages and user, `proxyctl completions` (bash's own syntax check), and
//! the Grafana dashboard's metric names against a running node's
//! `/metrics` (those that need a running job or peers against the
//! exporter's registered names).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::bin;
use hotrepart_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_verifies() {
    let dir = TestDir::new("deploy-systemd");
    let unit = std::fs::read_to_string(deploy("systemd/hotrepart.service")).unwrap();
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("NoNewPrivileges=yes"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // verify checks that ExecStart's program exists: the one just built.
    let hotrepart = tokio::task::block_in_place(|| bin("hotrepart"));
    let unit = unit.replace("/usr/local/bin/hotrepart", hotrepart.to_str().unwrap());
    let path = dir.0.join("hotrepart.service");
    std::fs::write(&path, unit).unwrap();
    let (ok, out, err) = run_cmd("systemd-analyze", &["verify", path.to_str().unwrap()], &[]).await;
    assert!(ok, "systemd-analyze verify failed: {out}{err}");
    assert_eq!(err.trim(), "", "systemd-analyze verify warns");
}

/// The manifests as JSON values, one per YAML document.
async fn manifests() -> Vec<serde_json::Value> {
    let path = deploy("kubernetes/hotrepart.yaml");
    let (ok, out, err) = run_cmd(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            path.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(ok, "the manifests do not parse as YAML: {err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_parse_and_hold_together() {
    let docs = manifests().await;
    let kind =
        |k: &str| -> Vec<&serde_json::Value> { docs.iter().filter(|d| d["kind"] == k).collect() };
    for k in [
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    ] {
        assert!(!kind(k).is_empty(), "no {k}");
    }
    let sts = kind("StatefulSet")[0];
    let headless = kind("Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"] == "None")
        .expect("a headless Service");
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    let env = c["env"].as_array().unwrap();
    let replicas_env = env.iter().find(|e| e["name"] == "REPLICAS").unwrap();
    assert_eq!(replicas_env["value"], replicas.to_string());
    assert!(env
        .iter()
        .any(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
    assert!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data");
    let pdb = kind("PodDisruptionBudget")[0];
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "a quorum stays up");
    assert_eq!(
        pdb["spec"]["selector"], sts["spec"]["selector"],
        "the budget covers the nodes"
    );

    // start.sh run as pods 1 and 3 would run it (a fake `hotrepart` on
    // PATH prints the file it is given), the Secret's values in files:
    // the node's own validation accepts what it writes.
    let cm = kind("ConfigMap")[0];
    let secret = kind("Secret")[0];
    let dir = TestDir::new("deploy-k8s");
    let template = dir.0.join("node.toml.tpl");
    std::fs::write(&template, cm["data"]["node.toml.tpl"].as_str().unwrap()).unwrap();
    let script = dir.0.join("start.sh");
    std::fs::write(&script, cm["data"]["start.sh"].as_str().unwrap()).unwrap();
    let fake = dir.0.join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("hotrepart"), "#!/bin/sh\ncat \"$3\"\n").unwrap();
    run_cmd(
        "chmod",
        &["+x", fake.join("hotrepart").to_str().unwrap()],
        &[],
    )
    .await;
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let initial = env.iter().find(|e| e["name"] == "INITIAL_MEMBERS").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    for (pod, joins) in [(1u64, false), (replicas, true)] {
        let out_file = dir.0.join(format!("node{pod}.toml"));
        let pod_name = format!("hotrepart-{pod}");
        let pods = (replicas + 1).to_string();
        let (ok, text, err) = run_cmd(
            "sh",
            &[script.to_str().unwrap()],
            &[
                ("POD_NAME", &pod_name),
                ("POD_NAMESPACE", "default"),
                ("REPLICAS", &pods),
                ("INITIAL_MEMBERS", &initial),
                ("TEMPLATE", template.to_str().unwrap()),
                ("CONFIG", out_file.to_str().unwrap()),
                ("PATH", &path),
            ],
        )
        .await;
        assert!(ok, "start.sh as {pod_name}: {err}");
        let mut text = text;
        for (k, v) in secret["stringData"].as_object().unwrap() {
            let f = dir.0.join(k);
            std::fs::write(&f, v.as_str().unwrap()).unwrap();
            text = text.replace(&format!("/etc/hotrepart-secret/{k}"), f.to_str().unwrap());
        }
        let cfg = hotrepart_proxy::Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("{pod_name}'s file is refused: {e}\n{text}"));
        let cl = cfg.cluster.unwrap();
        assert_eq!(cl.node_id, pod + 1, "node id = ordinal + 1");
        assert_eq!(cl.peers.len() as u64, replicas, "every other pod");
        assert!(cl.peers.iter().all(|p| p.id != pod + 1));
        assert_eq!(cl.join, joins, "{pod_name}: join");
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_as_a_user() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].ends_with(" AS build"));
    assert!(text.contains("COPY --from=build"));
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(text.contains("--locked"), "the build uses Cargo.lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyctl_prints_shell_completions() {
    let proxyctl = tokio::task::block_in_place(|| bin("proxyctl"));
    let dir = TestDir::new("deploy-completions");
    for shell in ["bash", "zsh", "fish"] {
        // No admin token needed for this one.
        let (ok, out, err) = run_cmd(
            proxyctl.to_str().unwrap(),
            &["completions", shell],
            &[("HOTREPART_TOKEN", "")],
        )
        .await;
        assert!(ok, "{shell}: {err}");
        for word in ["reshard", "add-shard", "loadtest", "completions"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            let f = dir.0.join("proxyctl.bash");
            std::fs::write(&f, &out).unwrap();
            let (ok, _, err) = run_cmd("bash", &["-n", f.to_str().unwrap()], &[]).await;
            assert!(ok, "bash -n: {err}");
        }
    }
    // Every other command still wants the token (exit status 2).
    let (ok, _, err) = run_cmd(proxyctl.to_str().unwrap(), &["status"], &[]).await;
    assert!(!ok && err.contains("token"), "{err}");
}

/// Series a node alone exports only in situations this test does not make
/// (a reshard job running, catalog peers): each must still be a name the
/// exporter registers (its source names it), so a misspelt one fails.
fn situational(name: &str) -> bool {
    const SITUATIONAL: &[&str] = &[
        "hotrepart_reshard_job_rows_copied",
        "hotrepart_reshard_job_lag_bytes",
        "hotrepart_catalog_peer_connected",
    ];
    if !SITUATIONAL.contains(&name) {
        return false;
    }
    let source = include_str!("../../../proxy/src/control/admin/metrics.rs");
    let base = name
        .trim_start_matches("hotrepart_")
        .trim_end_matches("_total");
    assert!(
        source.contains(&format!("\"{base}\"")),
        "{name} is not registered by proxy/src/control/admin/metrics.rs"
    );
    true
}

/// Metric names an expression uses (`hotrepart_…`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("hotrepart_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    // A WebAssembly function and a quick 2PC resolver, so that their
    // series exist.
    let wat = deploy("examples/functions/tenant_prefix.wat")
        .canonicalize()
        .unwrap();
    let c = Cluster::start(Opts {
        shards: 2,
        extra: "twopc_resolver_interval_ms = 50".into(),
        tail: format!(
            "[[functions]]\nname = \"tenant\"\npath = \"{}\"\n\
             [[sharded_tables]]\nname = \"docs\"\nkey = \"k\"\ntype = \"text\"\nfunction = \"tenant\"\n",
            wat.display()
        ),
        ..Opts::default()
    })
    .await;
    let token = "dashboard-test-token-0123456789";
    let addr =
        hotrepart_proxy::control::admin::serve(c.node.clone(), "127.0.0.1:0", token.into(), false)
            .await
            .unwrap();
    // Some traffic, so that per-database series exist too.
    let db = c.connect().await;
    db.simple_query("SELECT 1").await.unwrap();
    let scrape = || {
        let url = format!("http://{addr}/metrics");
        tokio::task::spawn_blocking(move || {
            let agent = ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build(),
            );
            agent
                .get(&url)
                .header("Authorization", &format!("Bearer {token}"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        })
    };
    // Names as samples carry them: a counter's TYPE line names it without
    // `_total`.
    let names = |body: &str| {
        let mut exported = std::collections::BTreeSet::new();
        for l in body.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, ty) = (it.next().unwrap(), it.next().unwrap());
                exported.insert(if ty == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                });
            }
        }
        exported
    };
    // Polled with a deadline: the resolver's first pass adds its series.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exported = loop {
        let exported = names(&scrape().await.unwrap());
        if exported.contains("hotrepart_twopc_prepared") {
            break exported;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no resolver pass in /metrics: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for n in [
        "hotrepart_client_queries_total",
        "hotrepart_wasm_failed_calls_total",
        "hotrepart_reshard_jobs",
    ] {
        assert!(exported.contains(n), "{n} not in {exported:?}");
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/hotrepart-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut used = 0;
    let mut missing = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                if !exported.contains(&n) && !situational(&n) {
                    missing.push(format!("{} ({})", n, p["title"]));
                }
                used += 1;
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the node does not export: {missing:?}\nexported: {exported:?}"
    );
    assert!(used >= 20, "{used} metric uses");
    // The template variable's query too.
    let var = dash["templating"]["list"][1]["query"].as_str().unwrap();
    for n in metric_names(var) {
        assert!(exported.contains(&n), "{n}");
    }
}
