//! Keyless reads during a move (see the parent module): static data, one
//! range moved, every kind of keyless read through every node in every
//! phase, compared with the truth computed before the job.

use super::*;
use futures_util::StreamExt;
use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const ROWS: i64 = 30_000;
/// Each job step waits this long, so every phase gets its share of reads.
const READ_STEP_DELAY: &str = "2000";

fn balance_of(id: i64) -> i64 {
    (id * 7919) % 1009
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Count,
    Sum,
    OrderLimit,
    GroupBy,
    Copy,
    Scan,
}

const KINDS: [Kind; 6] = [
    Kind::Count,
    Kind::Sum,
    Kind::OrderLimit,
    Kind::GroupBy,
    Kind::Copy,
    Kind::Scan,
];

impl Kind {
    fn sql(self) -> &'static str {
        match self {
            Kind::Count => "SELECT count(*) FROM accounts",
            Kind::Sum => "SELECT sum(balance) FROM accounts",
            Kind::OrderLimit => "SELECT id, balance FROM accounts ORDER BY id LIMIT 10",
            Kind::GroupBy => "SELECT balance % 7, count(*) FROM accounts GROUP BY balance % 7",
            Kind::Copy => "COPY accounts TO STDOUT",
            Kind::Scan => "SELECT id, balance FROM accounts",
        }
    }
}

/// What the reads must return, computed from the loaded data.
struct Truth {
    sum: i128,
    first10: Vec<(i64, i64)>,
    groups: BTreeMap<i64, i64>,
}

impl Truth {
    fn new() -> Truth {
        let mut groups = BTreeMap::new();
        for id in 1..=ROWS {
            *groups.entry(balance_of(id) % 7).or_default() += 1;
        }
        Truth {
            sum: (1..=ROWS).map(|id| i128::from(balance_of(id))).sum(),
            first10: (1..=10).map(|id| (id, balance_of(id))).collect(),
            groups,
        }
    }
}

/// Checks a full row set (scan, COPY): each id once, every id, the right
/// balances; a description of what is wrong otherwise.
fn check_all_rows(rows: &[(i64, i64)]) -> Option<String> {
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for &(id, bal) in rows {
        *seen.entry(id).or_default() += 1;
        if bal != balance_of(id) && wrong.len() < 5 {
            wrong.push(format!("{id}:{bal}"));
        }
    }
    let dup: Vec<i64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let missing: Vec<i64> = (1..=ROWS).filter(|id| !seen.contains_key(id)).collect();
    let extra: Vec<i64> = seen
        .keys()
        .filter(|&&id| !(1..=ROWS).contains(&id))
        .copied()
        .collect();
    if rows.len() as i64 == ROWS
        && dup.is_empty()
        && missing.is_empty()
        && wrong.is_empty()
        && extra.is_empty()
    {
        return None;
    }
    Some(format!(
        "{} rows, want {ROWS}: {} ids twice (e.g. {:?}), {} missing (e.g. {:?}), {} unknown, wrong balances {:?}",
        rows.len(),
        dup.len(),
        &dup[..dup.len().min(5)],
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        wrong
    ))
}

fn parse_pairs(rows: Vec<Vec<String>>) -> Result<Vec<(i64, i64)>, String> {
    rows.into_iter()
        .map(|r| {
            Ok((
                r[0].parse().map_err(|e| format!("{r:?}: {e}"))?,
                r[1].parse().map_err(|e| format!("{r:?}: {e}"))?,
            ))
        })
        .collect()
}

/// One keyless read through `db` (node at `dsn`); None when it equals the
/// truth, else what was wrong.
async fn read_once(
    kind: Kind,
    simple: bool,
    db: &tokio_postgres::Client,
    dsn: &str,
    truth: &Truth,
) -> Option<String> {
    let r: Result<Option<String>, String> = async {
        let e = |e: tokio_postgres::Error| format!("error {}", db_error(&e));
        match (kind, simple) {
            (Kind::Copy, true) => {
                // psql: COPY in the simple protocol.
                let (ok, out, err) = run_cmd(
                    &pg_tool("psql"),
                    &[
                        "-X",
                        "-q",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-d",
                        dsn,
                        "-c",
                        kind.sql(),
                    ],
                    &[],
                )
                .await;
                if !ok {
                    return Err(format!("psql: {err}"));
                }
                let rows = parse_pairs(
                    out.lines()
                        .map(|l| l.split('\t').map(str::to_string).collect())
                        .collect(),
                )?;
                Ok(check_all_rows(&rows))
            }
            (Kind::Copy, false) => {
                let stream = db.copy_out(kind.sql()).await.map_err(e)?;
                let mut stream = std::pin::pin!(stream);
                let mut data = Vec::new();
                while let Some(chunk) = stream.next().await {
                    data.extend_from_slice(&chunk.map_err(e)?);
                }
                let text = String::from_utf8(data).map_err(|e| e.to_string())?;
                let rows = parse_pairs(
                    text.lines()
                        .map(|l| l.split('\t').map(str::to_string).collect())
                        .collect(),
                )?;
                Ok(check_all_rows(&rows))
            }
            (_, true) => {
                let rows = text_rows(&db.simple_query(kind.sql()).await.map_err(e)?);
                Ok(match kind {
                    Kind::Count => {
                        let got = rows.first().map(|r| r[0].clone()).unwrap_or_default();
                        (got != ROWS.to_string()).then(|| format!("count(*) = {got}, want {ROWS}"))
                    }
                    Kind::Sum => {
                        let got = rows.first().map(|r| r[0].clone()).unwrap_or_default();
                        (got != truth.sum.to_string())
                            .then(|| format!("sum(balance) = {got}, want {}", truth.sum))
                    }
                    Kind::OrderLimit => {
                        let got = parse_pairs(rows)?;
                        (got != truth.first10).then(|| {
                            format!("ORDER BY id LIMIT 10 = {got:?}, want {:?}", truth.first10)
                        })
                    }
                    Kind::GroupBy => {
                        let got: BTreeMap<i64, i64> = parse_pairs(rows)?.into_iter().collect();
                        (got != truth.groups).then(|| {
                            format!("GROUP BY balance % 7 = {got:?}, want {:?}", truth.groups)
                        })
                    }
                    Kind::Scan => check_all_rows(&parse_pairs(rows)?),
                    Kind::Copy => None,
                })
            }
            (_, false) => {
                let rows = db.query(kind.sql(), &[]).await.map_err(e)?;
                Ok(match kind {
                    Kind::Count => {
                        let got: i64 = rows[0].get(0);
                        (got != ROWS).then(|| format!("count(*) = {got}, want {ROWS}"))
                    }
                    Kind::Sum => {
                        let got: Numeric = rows[0].get(0);
                        (got.0 != truth.sum)
                            .then(|| format!("sum(balance) = {}, want {}", got.0, truth.sum))
                    }
                    Kind::OrderLimit => {
                        let got: Vec<(i64, i64)> =
                            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                        (got != truth.first10).then(|| {
                            format!("ORDER BY id LIMIT 10 = {got:?}, want {:?}", truth.first10)
                        })
                    }
                    Kind::GroupBy => {
                        let got: BTreeMap<i64, i64> =
                            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                        (got != truth.groups).then(|| {
                            format!("GROUP BY balance % 7 = {got:?}, want {:?}", truth.groups)
                        })
                    }
                    Kind::Scan => {
                        let got: Vec<(i64, i64)> =
                            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                        check_all_rows(&got)
                    }
                    Kind::Copy => None,
                })
            }
        }
    }
    .await;
    r.unwrap_or_else(Some)
}

/// The reads of one phase (or transition between two): how many, and the
/// wrong ones by kind and protocol (count, first example).
#[derive(Default)]
struct PhaseReads {
    reads: usize,
    wrong: BTreeMap<String, (usize, String)>,
}

struct Read {
    kind: Kind,
    simple: bool,
    node: usize,
    /// The job's phase as the reading node had it before and after.
    before: String,
    after: String,
    bad: Option<String>,
}

impl Read {
    fn phase(&self) -> String {
        if self.before == self.after {
            self.before.clone()
        } else {
            format!("{}→{}", self.before, self.after)
        }
    }
}

/// Issue 12: with static data, a range of many rows is moved while
/// keyless reads — count, sum, ORDER BY … LIMIT, GROUP BY, COPY TO STDOUT,
/// a plain scan; simple protocol (psql for the COPY) and extended — run
/// through every node in every phase of the job, each compared with the
/// truth: every row exactly once, at every moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_reads_see_each_row_once_in_every_phase_of_a_move() {
    let c = ProcCluster::start_with_env(
        3,
        2,
        "",
        "[[sharded_tables]]\nname = \"accounts\"\nkey = \"id\"\ntype = \"int8\"\n",
        CLUSTER,
        &[(STEP_DELAY, READ_STEP_DELAY)],
    )
    .await;
    c.wait_ready(Duration::from_secs(60)).await;
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        .await
        .unwrap();
    {
        use futures_util::SinkExt;
        let sink = db
            .copy_in::<_, bytes::Bytes>("COPY accounts (id, balance) FROM STDIN")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        let text: String = (1..=ROWS)
            .map(|id| format!("{id}\t{}\n", balance_of(id)))
            .collect();
        sink.send(bytes::Bytes::from(text)).await.unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), ROWS as u64);
    }
    let truth = Truth::new();
    let dsns: Vec<String> = c.nodes.iter().map(|n| n.dsn()).collect();
    let mut dbs = Vec::new();
    for d in &dsns {
        dbs.push(connect(d).await.unwrap());
    }
    // Before any job every read is right (else the truth or the merger is
    // wrong, not the job).
    for (i, db) in dbs.iter().enumerate() {
        for kind in KINDS {
            for simple in [true, false] {
                let r = read_once(kind, simple, db, &dsns[i], &truth).await;
                assert!(
                    r.is_none(),
                    "before the job, {kind:?} ({}) through node {}: {}",
                    if simple { "simple" } else { "extended" },
                    i + 1,
                    r.unwrap()
                );
            }
        }
    }
    // The range of s0 holding the most rows moves to s1.
    let rs = c.ranges(0).await;
    let mut per_range: BTreeMap<u64, i64> = BTreeMap::new();
    for id in 1..=ROWS {
        let p = hashint8extended(id, 0);
        if let Some(r) = rs
            .iter()
            .find(|(lo, hi, s)| s == "s0" && p >= *lo && hi.is_none_or(|h| p < h))
        {
            *per_range.entry(r.0).or_default() += 1;
        }
    }
    let (&lo, &moving) = per_range.iter().max_by_key(|(_, n)| **n).unwrap();
    let (ok, out, err) = c
        .proxyctl(
            0,
            &["--json", "reshard", "move", &lo.to_string(), "--to", "s1"],
        )
        .await;
    assert!(ok, "reshard move: {err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["job"]
        .as_str()
        .unwrap()
        .to_string();
    eprintln!("job {id} moves range {lo:#x} ({moving} of {ROWS} rows) from s0 to s1");

    let start = Instant::now();
    let mut reads: Vec<Read> = Vec::new();
    let mut done_reads = 0;
    let mut i = 0usize;
    while done_reads < 24 || reads.len() < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "job {id} did not end within 180 s (last phase {}); logs:\n{}",
            reads.last().map_or("?".into(), Read::phase),
            c.logs()
        );
        let node = i % 3;
        let kind = KINDS[(i / 2) % KINDS.len()];
        let simple = i.is_multiple_of(2);
        i += 1;
        let before = phase_of(&job(&c, node, &id).await);
        let bad = read_once(kind, simple, &dbs[node], &dsns[node], &truth).await;
        let after = phase_of(&job(&c, node, &id).await);
        if before == "done" && after == "done" {
            done_reads += 1;
        }
        reads.push(Read {
            kind,
            simple,
            node,
            before,
            after,
            bad,
        });
    }
    let j = wait_job_end(&c, 0, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(j["phase"], "done", "{j}");

    // Per phase: reads, wrong ones by kind and protocol (first example).
    let mut phases: BTreeMap<String, PhaseReads> = BTreeMap::new();
    let order = ["planned", "copy", "catch_up", "cut_over", "flipped", "done"];
    for r in &reads {
        let e = phases.entry(r.phase()).or_default();
        e.reads += 1;
        if let Some(b) = &r.bad {
            let key = format!(
                "{:?} ({})",
                r.kind,
                if r.simple { "simple" } else { "extended" }
            );
            let x = e
                .wrong
                .entry(key)
                .or_insert_with(|| (0, format!("node {}: {b}", r.node + 1)));
            x.0 += 1;
        }
    }
    let rank = |p: &str| {
        order
            .iter()
            .position(|o| p.starts_with(o))
            .unwrap_or(order.len())
    };
    let mut keys: Vec<&String> = phases.keys().collect();
    keys.sort_by_key(|p| (rank(p), p.len()));
    let mut report = Vec::new();
    let mut wrong = 0;
    for p in keys {
        let PhaseReads {
            reads: n,
            wrong: bad,
        } = &phases[p];
        let nbad: usize = bad.values().map(|x| x.0).sum();
        wrong += nbad;
        report.push(format!("phase {p}: {n} reads, {nbad} wrong"));
        for (k, (m, ex)) in bad {
            report.push(format!("  {k}: {m} wrong, e.g. {ex}"));
        }
    }
    if wrong == 0 {
        eprintln!(
            "{} keyless reads during job {id} ({}):\n{}",
            reads.len(),
            j["note"].as_str().unwrap_or(""),
            report.join("\n")
        );
    }
    // Coverage: the reads were spread over every phase.
    let mut missing = Vec::new();
    for p in ["copy", "catch_up", "cut_over", "flipped", "done"] {
        let n = phases.get(p).map_or(0, |x| x.reads);
        if n < 6 {
            missing.push(format!("{p} ({n} reads)"));
        }
    }
    // The rows end up once each, on their owner.
    let shard_dsns: Vec<String> = c.shards.iter().map(|s| s.dsn()).collect();
    let (seen, per_shard) = c
        .placed_rows(&shard_dsns, "SELECT id, balance::int FROM accounts")
        .await;
    assert_eq!(seen.len() as i64, ROWS, "rows per shard {per_shard:?}");
    assert!(
        wrong == 0,
        "{wrong} of {} keyless reads during job {id} did not see each row exactly once:\n{}",
        reads.len(),
        report.join("\n")
    );
    assert!(
        missing.is_empty(),
        "too few reads in phase(s) {missing:?} to check them:\n{}",
        report.join("\n")
    );
}
