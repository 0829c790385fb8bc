//! Consistency under faults (issue 12, "Safety"), in the spirit of
//! Jepsen's bank test, through real `hotrepart serve` processes in front of
//! real PostgreSQL shards.
//!
//! - [`bank::bank_transfers_stay_exact_through_reshards_and_kills`] — 3
//!   nodes, 3 shards and a spare; clients move money between accounts in
//!   explicit transactions (two-phase commit when the accounts are on
//!   different shards), each transfer also inserting its own row into `transfers`,
//!   while the spare shard is added with rebalance, a range is split and
//!   moved, a node is killed (kill -9) in the middle of commits and
//!   restarted, and the node running a reshard job is killed mid-job and
//!   restarted. Afterwards: (a) the total through every node is exact and
//!   equals the sum on the shards' owners; (b) no prepared transaction is
//!   left; (c) every account and transfer is stored exactly once, on the
//!   shard owning its point; (d) every acknowledged transfer is committed,
//!   none that failed cleanly is, and every balance is the initial one plus
//!   the committed transfers; (e) no statement waited past a bound; (f)
//!   `count(*)` of the accounts read through the nodes during the load is
//!   always the number of accounts (keyless reads see each row once).
//! - [`keyless_reads::keyless_reads_see_each_row_once_in_every_phase_of_a_move`]
//!   — static data, one range moved; keyless reads of every kind, in both
//!   protocols, through every node, in every phase of the job, each compared with the
//!   truth computed before the job.
//!
//! Both tests slow reshard jobs down with the test-only
//! `HOTREPART_TEST_JOB_STEP_DELAY_MS` (a wait before each job step), so
//! that each phase lasts long enough to act in it. Both collect every
//! violation they find (which account, which shard, which phase) and fail
//! with all of them at the end.
//!
//! This module holds what both share (job and node status, logs, shard
//! queries, simple-protocol rows, NUMERIC decoding).
#![allow(clippy::unwrap_used)]

mod bank;
mod keyless_reads;

use hotrepart_proxy::tools::localpg::LocalPg;
use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::SimpleQueryMessage;

/// The test-only knob of `proxy/src/control/jobs.rs`.
const STEP_DELAY: &str = "HOTREPART_TEST_JOB_STEP_DELAY_MS";
const CLUSTER: &str = "lease_ms = 1000";

type Ranges = Vec<(u64, Option<u64>, String)>;

/// The shard owning `id`'s point (built-in hash, seed 0) by `ranges`.
fn owner_of(ranges: &Ranges, id: i64) -> String {
    let p = hashint8extended(id, 0);
    ranges
        .iter()
        .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
        .map_or_else(|| "<no range>".to_string(), |r| r.2.clone())
}

/// Job `id` as node `i` has it (admin API), None when it does not answer.
async fn job(c: &ProcCluster, i: usize, id: &str) -> Option<Value> {
    c.admin_get(i, &format!("/v1/jobs/{id}")).await
}

fn phase_of(j: &Option<Value>) -> String {
    j.as_ref()
        .and_then(|j| j["phase"].as_str())
        .unwrap_or("?")
        .to_string()
}

/// Waits until job `id` ends (asked on node `i`); Err when it does not
/// within `timeout`.
async fn wait_job_end(
    c: &ProcCluster,
    i: usize,
    id: &str,
    timeout: Duration,
) -> Result<Value, String> {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(j) = job(c, i, id).await {
            if j["done"] == serde_json::json!(true) {
                return Ok(j);
            }
            last = Some(j);
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "job {id} did not end within {timeout:?} (last seen on node {}: {last:?})",
                i + 1
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether node `i` routes (catalog ready, lease valid), waiting up to
/// `timeout`.
async fn routes(c: &ProcCluster, i: usize, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Some(s) = c.admin_get(i, "/v1/status").await {
            if s["ready"] == serde_json::json!(true) && s["lease_valid"] == serde_json::json!(true)
            {
                return true;
            }
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The catalog leader as node `i` sees it, waiting for one.
async fn leader(c: &ProcCluster, i: usize) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(l) = c
            .admin_get(i, "/v1/status")
            .await
            .and_then(|s| s["cluster"]["leader"].as_u64())
        {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no leader seen by node {}; logs:\n{}",
            i + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `line` without terminal colour sequences (ESC [ … m).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Lines of the nodes' logs that name a panic or an error (at most 40),
/// for failure messages: the full logs are long.
fn notable_log_lines(c: &ProcCluster) -> String {
    let mut out = Vec::new();
    for n in &c.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        let mut lines = log.lines();
        while let Some(l) = lines.next() {
            if l.contains("panicked") || l.contains("ERROR") {
                out.push(format!("node {}: {}", n.id, strip_ansi(l)));
            }
            if l.contains("panicked") {
                // The panic's message.
                if let Some(m) = lines.next() {
                    out.push(format!("node {}: {}", n.id, strip_ansi(m)));
                }
            }
        }
    }
    let total = out.len();
    out.truncate(40);
    if total > out.len() {
        out.push(format!("… {} more", total - out.len()));
    }
    out.join("\n")
}

/// How long a `proxyctl reshard … --wait` may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// `proxyctl <args>` (with `--wait`: following its jobs) against node
/// `i`, bounded by [`JOB_TIMEOUT`]: (ok, stdout, stderr). A job that does
/// not end in time is an error the test reports (with the jobs as the
/// node lists them), not a hang.
async fn proxyctl_wait(c: &ProcCluster, i: usize, args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let log = c
        .dir
        .0
        .join(format!("proxyctl-{}.stderr", rand::random::<u32>()));
    let child = c.spawn_proxyctl(i, &args, &log);
    let r = tokio::time::timeout(JOB_TIMEOUT, child.wait_with_output()).await;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    match r {
        Ok(Ok(out)) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        ),
        Ok(Err(e)) => (false, String::new(), format!("cannot run proxyctl: {e}")),
        Err(_) => {
            let jobs = c.admin_get(i, "/v1/jobs").await;
            (
                false,
                String::new(),
                format!(
                    "{stderr}did not end within {JOB_TIMEOUT:?}; jobs: {}",
                    jobs.map_or("<no answer>".into(), |j| j.to_string())
                ),
            )
        }
    }
}

/// Copies the nodes' logs out of the test directory (removed at the end)
/// into the temporary directory; returns where, for the failure message.
fn keep_logs(c: &ProcCluster, extra_shards: &[&LocalPg]) -> String {
    let dir = std::env::temp_dir().join(format!("hotrepart-consistency-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return String::new();
    }
    for n in &c.nodes {
        let _ = std::fs::copy(&n.log, dir.join(format!("node{}.log", n.id)));
    }
    // The shards' own logs (their statements, when the test turned
    // statement logging on).
    for (i, s) in c
        .shards
        .iter()
        .chain(extra_shards.iter().copied())
        .enumerate()
    {
        let _ = std::fs::copy(
            s.dir.join("postgres.log"),
            dir.join(format!("s{i}.postgres.log")),
        );
    }
    format!("node and shard logs kept in {}", dir.display())
}

/// The transactions prepared on each shard (name, gids).
async fn prepared(shards: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    let mut all = Vec::new();
    for (name, dsn) in shards {
        let gids = match connect(dsn).await {
            Ok(db) => match db
                .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
                .await
            {
                Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
                Err(e) => vec![format!("<cannot list: {e}>")],
            },
            Err(e) => vec![format!("<cannot connect: {e}>")],
        };
        all.push((name.clone(), gids));
    }
    all
}

/// An error as a DBA reads it: SQLSTATE, message, detail.
fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} {}{}",
            d.code().code(),
            d.message(),
            d.detail().map_or(String::new(), |x| format!(" ({x})"))
        ),
        None => e.to_string(),
    }
}

/// The first value of the first row of a simple-protocol answer.
fn first_value(msgs: &[SimpleQueryMessage], col: usize) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(col).unwrap_or("NULL").to_string()),
        _ => None,
    })
}

/// Rows of a simple-protocol answer as text.
fn text_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// An integral `numeric` in binary form (what `sum(bigint)` returns), for
/// the extended protocol.
struct Numeric(i128);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<Numeric, Box<dyn std::error::Error + Sync + Send>> {
        let word = |i: usize| -> Result<i16, String> {
            raw.get(2 * i..2 * i + 2)
                .map(|b| i16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(|| format!("numeric too short: {raw:?}"))
        };
        let ndigits = usize::try_from(word(0)?)?;
        let weight = i32::from(word(1)?);
        let sign = word(2)? as u16;
        if sign == 0xC000 {
            return Err("numeric NaN".into());
        }
        let mut v: i128 = 0;
        for k in 0..ndigits {
            let d = i128::from(word(4 + k)?);
            let pos = weight - k as i32;
            if pos < 0 {
                if d != 0 {
                    return Err(format!("numeric not integral: {raw:?}").into());
                }
                continue;
            }
            v += d * 10_000i128.pow(pos as u32);
        }
        Ok(Numeric(if sign == 0x4000 { -v } else { v }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}
