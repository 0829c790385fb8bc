//! The deployment files in `deploy/` (issue 16), checked by what runs
//! here: `systemd-analyze verify` of the unit (with the binary just
//! built), a YAML parse of the Kubernetes manifests and of the Helm chart
//! rendered by a small renderer of the constructs it uses (python3's PyYAML),
//! both checked against the Kubernetes API schema (unknown fields, types,
//! required fields: `tests/deploy/k8s_schema.py`, with the models of the
//! pinned official Python client), with the checks that matter (stable node ids, a headless Service, a
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

/// YAML documents (`---` separated) as JSON values, parsed by PyYAML.
async fn yaml_docs(file: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = run_cmd(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
            file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(ok, "{} does not parse as YAML: {err}", file.display());
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_parse_and_hold_together() {
    let file = deploy("kubernetes/hotrepart.yaml");
    let docs = yaml_docs(&file).await;
    check_manifests(&docs, "hotrepart").await;
    if let Some(out) = schema_check(&file).await {
        assert_eq!(out.lines().count(), docs.len(), "{out}");
    }
}

/// `tests/deploy/k8s_schema.py` over `file`: its report (one `ok` line per
/// document), or None when the venv cannot be built outside CI (skipped).
/// Fails the test on any schema error.
async fn schema_check(file: &Path) -> Option<String> {
    let py = tokio::task::block_in_place(|| {
        hotrepart_tests::drivers::require(
            "the Kubernetes schema check",
            hotrepart_tests::drivers::k8s_schema_python(),
        )
    })?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s_schema.py");
    let (ok, out, err) = run_cmd(
        py.to_str().unwrap(),
        &[script.to_str().unwrap(), file.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(
        ok,
        "{} does not match the Kubernetes API schema:\n{out}{err}",
        file.display()
    );
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
    Some(out)
}

/// The schema check finds what it should: a misspelt field, a number
/// given as a string, a missing required field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_check_catches_what_kubernetes_would_refuse() {
    let Some(py) = tokio::task::block_in_place(|| {
        hotrepart_tests::drivers::require(
            "the Kubernetes schema check",
            hotrepart_tests::drivers::k8s_schema_python(),
        )
    }) else {
        return;
    };
    let good = std::fs::read_to_string(deploy("kubernetes/hotrepart.yaml")).unwrap();
    let dir = TestDir::new("deploy-schema");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s_schema.py");
    for (from, to, expected) in [
        (
            "serviceName:",
            "servicename:",
            "spec.servicename: no such field in V1StatefulSetSpec",
        ),
        (
            "replicas: 3",
            "replicas: \"3\"",
            "spec.replicas: expected int, found str '3'",
        ),
        (
            "containerPort: 6432",
            "containerPort: x6432",
            "containerPort: expected int",
        ),
        (
            "maxUnavailable: 1",
            "maxUnavailabel: 1",
            "spec.maxUnavailabel: no such field",
        ),
    ] {
        assert!(good.contains(from), "{from:?} not in the manifests");
        let bad = dir.0.join("bad.yaml");
        std::fs::write(&bad, good.replacen(from, to, 1)).unwrap();
        let (ok, out, err) = run_cmd(
            py.to_str().unwrap(),
            &[script.to_str().unwrap(), bad.to_str().unwrap()],
            &[],
        )
        .await;
        assert!(!ok, "{to:?} passed: {out}{err}");
        assert!(out.contains(expected), "{to:?}: {out}{err}");
    }
    // A container without its required name.
    let bad = dir.0.join("noname.yaml");
    let without = good.replacen("- name: hotrepart\n          image:", "- image:", 1);
    assert_ne!(without, good, "the container's name line moved");
    std::fs::write(&bad, without).unwrap();
    let (ok, out, _) = run_cmd(
        py.to_str().unwrap(),
        &[script.to_str().unwrap(), bad.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(
        !ok && out.contains("containers[0].name: required in V1Container"),
        "{out}"
    );
}

/// Renders a template of the chart the way helm would for the constructs
/// the chart allows itself: `{{ .Values.a.b }}`, `{{ .Release.Name }}`,
/// `{{ .Release.Namespace }}`, the pipes `quote` and `nindent N`, and `{{-`
/// trimming. Anything else fails the test (so the chart stays checkable
/// without helm).
fn render(template: &str, values: &serde_json::Value, release: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find("}}").expect("unclosed {{");
        let mut expr = after[..end].trim();
        if let Some(e) = expr.strip_prefix('-') {
            let kept = out.trim_end_matches([' ', '\t', '\n']).len();
            out.truncate(kept);
            expr = e.trim();
        }
        let mut parts = expr.split('|').map(str::trim);
        let head = parts.next().unwrap();
        let mut v = match head {
            ".Release.Name" => release.to_string(),
            ".Release.Namespace" => "default".to_string(),
            h => {
                let path = h
                    .strip_prefix(".Values.")
                    .unwrap_or_else(|| panic!("unsupported template expression {h:?}"));
                let mut x = values;
                for k in path.split('.') {
                    x = &x[k];
                }
                match x {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    other => panic!("{h} is not a scalar: {other:?}"),
                }
            }
        };
        for pipe in parts {
            v = match pipe.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["quote"] => serde_json::Value::String(v).to_string(),
                ["nindent", n] => {
                    let pad = " ".repeat(n.parse().unwrap());
                    let lines: Vec<String> = v
                        .trim_end_matches('\n')
                        .lines()
                        .map(|l| {
                            if l.is_empty() {
                                String::new()
                            } else {
                                format!("{pad}{l}")
                            }
                        })
                        .collect();
                    format!("\n{}", lines.join("\n"))
                }
                other => panic!("unsupported template pipe {other:?}"),
            };
        }
        out.push_str(&v);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_renders_to_the_same_shape() {
    let chart = deploy("helm/hotrepart");
    let dir = TestDir::new("deploy-helm");
    let meta = yaml_docs(&chart.join("Chart.yaml")).await;
    assert_eq!(meta[0]["apiVersion"], "v2");
    assert_eq!(meta[0]["name"], "hotrepart");
    let values = yaml_docs(&chart.join("values.yaml")).await.remove(0);
    let mut all = String::new();
    let mut files: Vec<_> = std::fs::read_dir(chart.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        all.push_str("---\n");
        all.push_str(&render(&text, &values, "hr"));
        all.push('\n');
    }
    let rendered = dir.0.join("rendered.yaml");
    std::fs::write(&rendered, &all).unwrap();
    let docs = yaml_docs(&rendered).await;
    check_manifests(&docs, "hr").await;
    if let Some(out) = schema_check(&rendered).await {
        assert_eq!(out.lines().count(), docs.len(), "{out}");
    }
}

/// What both the plain manifests and the chart must hold: stable node ids
/// from the StatefulSet's ordinals, a headless Service it names, a
/// PodDisruptionBudget over its pods, non-root, and a start script that
/// writes node files the node's own validation accepts (run here, with a
/// fake `hotrepart` on PATH that prints the file it is given).
async fn check_manifests(docs: &[serde_json::Value], sts_name: &str) {
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
    assert_eq!(sts["metadata"]["name"], sts_name);
    let headless = kind("Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"] == "None")
        .expect("a headless Service");
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(headless["metadata"]["name"], format!("{sts_name}-peers"));
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    let env = c["env"].as_array().unwrap();
    let env_value = |name: &str| -> Option<String> {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_string))
    };
    assert_eq!(env_value("REPLICAS"), Some(replicas.to_string()));
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
    assert_eq!(
        headless["spec"]["selector"],
        sts["spec"]["selector"]["matchLabels"]
    );

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
    let initial = env_value("INITIAL_MEMBERS").unwrap();
    let sts_env = env_value("STS").unwrap_or_default();
    // Pod 1, and a pod added by a scale-up (it joins).
    for (pod, joins) in [(1u64, false), (replicas, true)] {
        let out_file = dir.0.join(format!("node{pod}.toml"));
        let pod_name = format!("{sts_name}-{pod}");
        let pods = (replicas + 1).to_string();
        let mut vars = vec![
            ("POD_NAME", pod_name.as_str()),
            ("POD_NAMESPACE", "default"),
            ("REPLICAS", pods.as_str()),
            ("INITIAL_MEMBERS", initial.as_str()),
            ("TEMPLATE", template.to_str().unwrap()),
            ("CONFIG", out_file.to_str().unwrap()),
            ("PATH", path.as_str()),
        ];
        if !sts_env.is_empty() {
            vars.push(("STS", sts_env.as_str()));
        }
        let (ok, text, err) = run_cmd("sh", &[script.to_str().unwrap()], &vars).await;
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
        assert!(
            cl.peers
                .iter()
                .all(|p| p.addr.starts_with(&format!("{sts_name}-"))
                    && p.addr.contains(&format!(".{sts_name}-peers."))),
            "peers are the StatefulSet's pods: {:?}",
            cl.peers
        );
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
    // And an error, so that the errors by class exist.
    db.simple_query("SELECT 1/0").await.unwrap_err();
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
                match ty {
                    "counter" => {
                        exported.insert(format!("{name}_total"));
                    }
                    "histogram" => {
                        for part in ["bucket", "count", "sum"] {
                            exported.insert(format!("{name}_{part}"));
                        }
                    }
                    _ => {
                        exported.insert(name.to_string());
                    }
                }
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
        "hotrepart_request_duration_seconds_bucket",
        "hotrepart_client_errors_total",
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
