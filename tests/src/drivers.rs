//! Real client drivers for the driver tests (issue 14): a Python venv with
//! psycopg 3 and asyncpg, and a `node_modules` with node-postgres, both
//! pinned by files under `tests/drivers/` and prepared once per test run.
//!
//! Each environment lives under `target/driver-envs/<kind>-<hash>/`, the
//! hash taken over the pin files and the interpreter's version: a run with
//! the same pins reuses it, a changed pin builds a new one. Builders take an
//! exclusive file lock (`<dir>.lock`), so the parallel test processes of one
//! nextest run wait for one build instead of racing. A finished environment
//! carries a `READY` marker; a half-built one is removed and built again.
//!
//! When an environment cannot be built (no interpreter, a registry that does
//! not answer), [`require`] fails the test in CI (`CI=true`: the driver tests
//! must run there) and elsewhere prints why and skips. A failure is recorded
//! for the rest of the same nextest run (`NEXTEST_RUN_ID`), so the other
//! tests fail fast instead of asking the registry again.
//!
//! The scripts print one JSON line per scenario; [`run_scenario`] runs one
//! scenario in its own process, bounded in time, so a hang shows as that
//! scenario's failure and the others still run.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one install step (venv, pip, npm) may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// `tests/drivers/`: the scripts and the pin files.
pub fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

/// The workspace's target directory: the nearest ancestor of the test
/// binary holding cargo's `CACHEDIR.TAG` (else `CARGO_TARGET_DIR`, else
/// `<workspace>/target`).
fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for a in exe.ancestors().skip(1) {
            if a.join("CACHEDIR.TAG").is_file() {
                return a.to_path_buf();
            }
        }
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).join("target")
}

/// True in CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// FNV-1a, 64 bits: a stable hash for cache keys (std's hasher may change
/// between Rust releases).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Runs `cmd` with stdin closed and its output appended to `log`, killed
/// after `timeout`. Err carries the command and the end of the log.
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let _ = writeln!(f, "$ {what}");
    let out = f.try_clone().map_err(|e| e.to_string())?;
    let err = f.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not finish within {timeout:?}{}",
                    log_tail(log)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status}){}", log_tail(log)))
    }
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("; last lines of {}:\n{tail}", log.display())
}

/// The first line a command prints (`python3 --version`), or None when it
/// cannot run.
fn version_of(prog: &str, arg: &str) -> Option<String> {
    let out = Command::new(prog)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

/// Builds (once) or finds the environment `kind` keyed by `key_parts`;
/// `build` fills the given empty directory.
fn prepare(
    kind: &str,
    key_parts: &[&[u8]],
    build: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let root = target_dir().join("driver-envs");
    fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let dir = root.join(format!("{kind}-{:016x}", fnv(key_parts)));
    let ready = dir.join("READY");
    if ready.is_file() {
        return Ok(dir);
    }
    let lock_path = root.join(format!("{kind}-{:016x}.lock", fnv(key_parts)));
    let lock = File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    if ready.is_file() {
        return Ok(dir);
    }
    // A failure earlier in this nextest run: the same answer, at once.
    let failed = root.join(format!("{kind}-{:016x}.failed", fnv(key_parts)));
    let run_id = std::env::var("NEXTEST_RUN_ID").unwrap_or_default();
    if !run_id.is_empty() {
        if let Ok(text) = fs::read_to_string(&failed) {
            if let Some(reason) = text.strip_prefix(&format!("{run_id}\n")) {
                return Err(format!("(earlier in this run) {reason}"));
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let start = Instant::now();
    eprintln!("driver-envs: building {} (once per pin set)", dir.display());
    match build(&dir) {
        Ok(()) => {
            fs::write(&ready, "").map_err(|e| e.to_string())?;
            let _ = fs::remove_file(&failed);
            eprintln!("driver-envs: {kind} ready in {:?}", start.elapsed());
            Ok(dir)
        }
        Err(reason) => {
            let _ = fs::write(&failed, format!("{run_id}\n{reason}"));
            Err(reason)
        }
    }
    // The lock is released when `lock` is dropped.
}

/// The Python interpreter to make the venv with: `HOTREPART_TEST_PYTHON`,
/// else the first of python3.11, python3 that runs.
fn base_python() -> Result<(String, String), String> {
    let candidates: Vec<String> = match std::env::var("HOTREPART_TEST_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec!["python3.11".into(), "python3".into()],
    };
    for p in &candidates {
        if let Some(v) = version_of(p, "--version") {
            return Ok((p.clone(), v));
        }
    }
    Err(format!(
        "no Python interpreter found (tried {candidates:?})"
    ))
}

/// A venv with the pinned psycopg 3 and asyncpg: the path of its python.
pub fn python() -> Result<PathBuf, String> {
    python_env(
        "python",
        &drivers_dir().join("python/requirements.txt"),
        "import psycopg, asyncpg",
        "the pinned drivers",
    )
}

/// A venv with the pinned Kubernetes Python client and PyYAML, for the
/// schema check of the deployment manifests (`tests/deploy/`): the path
/// of its python.
pub fn k8s_schema_python() -> Result<PathBuf, String> {
    let req = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/requirements.txt");
    python_env(
        "k8s-schema",
        &req,
        "import yaml, kubernetes.client.models",
        "the Kubernetes Python client",
    )
}

/// A venv `kind` with the packages pinned in `req`, checked by running
/// `check` in it: the path of its python.
fn python_env(kind: &str, req: &Path, check: &str, what: &str) -> Result<PathBuf, String> {
    let (base, version) = base_python()?;
    let pins = fs::read(req).map_err(|e| format!("cannot read {}: {e}", req.display()))?;
    let dir = prepare(kind, &[&pins, version.as_bytes()], |dir| {
        let log = dir.join("build.log");
        let venv = dir.join("venv");
        let mut c = Command::new(&base);
        c.args(["-m", "venv"]).arg(&venv);
        run_logged(c, &log, INSTALL_TIMEOUT)?;
        let py = venv.join("bin/python");
        let mut c = Command::new(&py);
        c.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--timeout",
            "20",
            "--retries",
            "2",
            "-r",
        ])
        .arg(req);
        run_logged(c, &log, INSTALL_TIMEOUT)
            .map_err(|e| format!("pip could not install {what} (is PyPI reachable?): {e}"))?;
        let mut c = Command::new(&py);
        c.args(["-c", check]);
        run_logged(c, &log, Duration::from_secs(60))
    })?;
    Ok(dir.join("venv/bin/python"))
}

/// A `node_modules` with the pinned node-postgres (`npm ci` from
/// `tests/drivers/node/package-lock.json`): the path of that directory.
pub fn node_modules() -> Result<PathBuf, String> {
    let node = version_of("node", "--version").ok_or("node is not installed")?;
    let npm = version_of("npm", "--version").ok_or("npm is not installed")?;
    let src = drivers_dir().join("node");
    let manifest = fs::read(src.join("package.json")).map_err(|e| e.to_string())?;
    let lock = fs::read(src.join("package-lock.json")).map_err(|e| e.to_string())?;
    let dir = prepare(
        "node",
        &[&manifest, &lock, node.as_bytes(), npm.as_bytes()],
        |dir| {
            for f in ["package.json", "package-lock.json"] {
                fs::copy(src.join(f), dir.join(f)).map_err(|e| format!("copy {f}: {e}"))?;
            }
            let log = dir.join("build.log");
            let mut c = Command::new("npm");
            c.args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--fetch-timeout=20000",
                "--fetch-retries=2",
            ])
            .current_dir(dir);
            run_logged(c, &log, INSTALL_TIMEOUT).map_err(|e| {
                format!("npm could not install the pinned drivers (is the npm registry reachable?): {e}")
            })?;
            let mut c = Command::new("node");
            c.args(["-e", "require('pg')"])
                .env("NODE_PATH", dir.join("node_modules"));
            run_logged(c, &log, Duration::from_secs(60))
        },
    )?;
    Ok(dir.join("node_modules"))
}

/// The environment, or None after printing why the test is skipped; in CI
/// a missing environment fails the test.
pub fn require(what: &str, env: Result<PathBuf, String>) -> Option<PathBuf> {
    require_in(in_ci(), what, env)
}

/// [`require`] with CI said explicitly (tested both ways).
pub fn require_in(ci: bool, what: &str, env: Result<PathBuf, String>) -> Option<PathBuf> {
    match env {
        Ok(p) => Some(p),
        Err(reason) if ci => panic!(
            "{what} could not be prepared, and CI=true requires the driver tests to run: {reason}"
        ),
        Err(reason) => {
            eprintln!("SKIPPED: {what} could not be prepared (outside CI the driver tests skip): {reason}");
            None
        }
    }
}

/// One scenario's line from a driver script.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub detail: serde_json::Value,
}

/// Runs `scenario` of a driver script (`program script dsn scenario`) in a
/// process of its own, killed after `timeout`: a hang or a crash is that
/// scenario's failure (`ok: false`, saying so).
pub async fn run_scenario(
    program: &Path,
    script: &Path,
    env: &[(&str, &Path)],
    dsn: &str,
    scenario: &str,
    timeout: Duration,
) -> Outcome {
    let mut c = tokio::process::Command::new(program);
    c.arg(script)
        .arg(dsn)
        .arg(scenario)
        .current_dir(script.parent().unwrap())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let failed = |detail: String| Outcome {
        name: scenario.to_string(),
        ok: false,
        detail: serde_json::Value::String(detail),
    };
    let out = match tokio::time::timeout(timeout, c.output()).await {
        Err(_) => return failed(format!("hung: no answer within {timeout:?}")),
        Ok(Err(e)) => panic!("cannot run {}: {e}", program.display()),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Outcome> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some(Outcome {
                name: v.get("name")?.as_str()?.to_string(),
                ok: v.get("ok")?.as_bool()?,
                detail: v.get("detail")?.clone(),
            })
        })
        .collect();
    match lines.as_slice() {
        [one] if one.name == scenario && out.status.success() => one.clone(),
        _ => failed(format!(
            "script ended with {} and printed no single line for the scenario; stdout: {stdout}; stderr: {stderr}",
            out.status
        )),
    }
}
