//! The bank test (see the parent module): transfers between accounts
//! through every node while shards are added and ranges moved, nodes and
//! job runners killed; every invariant checked at the end.

use super::*;
use hotrepart_router::hash::hashint8extended;
use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

const ACCOUNTS: i64 = 200;
const INITIAL: i64 = 1_000;
const CLIENTS: usize = 6;
/// Client-side bound of every statement.
const STMT_TIMEOUT: Duration = Duration::from_secs(30);
/// No statement may take longer, whatever happened (writers wait for a
/// freeze at most `freeze_wait_ms` = 10 s, a 2PC decision at most 5 s; a
/// killed node's clients see their connection close at once).
const LATENCY_BOUND: Duration = Duration::from_secs(20);
/// In-doubt after 3 s, resolver every 200 ms.
const BANK_HEAD: &str = "twopc_grace_ms = 3000\ntwopc_resolver_interval_ms = 200\n";
const BANK_TABLES: &str =
    "[[sharded_tables]]\nname = \"accounts\"\nkey = \"id\"\ntype = \"int8\"\n\
     [[sharded_tables]]\nname = \"transfers\"\nkey = \"id\"\ntype = \"int8\"\n";

#[derive(Clone, Copy, Debug)]
struct Transfer {
    id: i64,
    from: i64,
    to: i64,
    amount: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// COMMIT returned OK.
    Acked,
    /// Known not committed: an error before COMMIT was sent, or a COMMIT
    /// error of class 40 (rolled back; not 40003).
    Failed,
    /// No answer to COMMIT, or an error that does not say.
    Uncertain,
}

struct Record {
    t: Transfer,
    outcome: Outcome,
    /// Node (index) and protocol, and the error for a failed or uncertain one.
    via: String,
    why: String,
    /// When it began (`Shared::at`).
    started: String,
}

#[derive(Default)]
struct ClientLog {
    records: Vec<Record>,
    /// `stage:sqlstate` → count.
    errors: BTreeMap<String, u64>,
    timeouts: Vec<String>,
    max_latency: Duration,
    max_latency_what: String,
    statements: u64,
    /// Answers that are wrong in themselves (an UPDATE of an account that
    /// matched no row).
    anomalies: Vec<String>,
}

/// Shared between the clients, the reader and the test.
struct Shared {
    stop: AtomicBool,
    /// Acknowledged transfers per node (index).
    acked_via: [AtomicU64; 3],
    t0: Instant,
}

impl Shared {
    fn acked(&self, via: &[usize]) -> u64 {
        via.iter()
            .map(|&i| self.acked_via[i].load(Ordering::Relaxed))
            .sum()
    }

    fn at(&self) -> String {
        format!("+{:.1}s", self.t0.elapsed().as_secs_f64())
    }
}

/// Waits until `n` more transfers are acknowledged through `via`.
async fn progress(sh: &Shared, via: &[usize], n: u64, timeout: Duration) -> Result<(), String> {
    let base = sh.acked(via);
    let start = Instant::now();
    while sh.acked(via) < base + n {
        if start.elapsed() > timeout {
            return Err(format!(
                "{}: the load made no progress through node(s) {:?} for {timeout:?} ({} of {n} transfers acknowledged)",
                sh.at(),
                via.iter().map(|i| i + 1).collect::<Vec<_>>(),
                sh.acked(via) - base
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

enum StmtErr {
    Timeout,
    Db(tokio_postgres::Error),
}

impl StmtErr {
    fn code(&self) -> String {
        match self {
            StmtErr::Timeout => "timeout".into(),
            StmtErr::Db(e) => match e.code() {
                Some(c) => c.code().to_string(),
                None if e.is_closed() => "closed".into(),
                None => "io".into(),
            },
        }
    }

    /// The connection cannot be used any more.
    fn broken(&self) -> bool {
        match self {
            StmtErr::Timeout => true,
            StmtErr::Db(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08") || c == "57P01" || c == "57P02"
                    })
            }
        }
    }

    fn text(&self) -> String {
        match self {
            StmtErr::Timeout => format!("no answer within {STMT_TIMEOUT:?}"),
            StmtErr::Db(e) => db_error(e),
        }
    }
}

/// One client of the bank: transfers until told to stop, through its home
/// node (`k % 3`) or, while that one is down, the next one up.
async fn bank_client(
    k: usize,
    dsns: Vec<String>,
    ranges: Arc<Ranges>,
    sh: Arc<Shared>,
    hard_stop: Instant,
) -> ClientLog {
    let simple = k.is_multiple_of(2);
    let proto = if simple { "simple" } else { "extended" };
    let home = k % dsns.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xba2c + k as u64);
    let mut log = ClientLog::default();
    let mut conn: Option<(tokio_postgres::Client, usize)> = None;
    let mut last_home_try = Instant::now();
    let mut seq = 0i64;
    let owner = |id: i64| owner_of(&ranges, id);
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
        // Back home as soon as the home node is up again.
        if conn.as_ref().is_some_and(|(_, n)| *n != home)
            && last_home_try.elapsed() > Duration::from_millis(500)
        {
            last_home_try = Instant::now();
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(5), connect(&dsns[home])).await
            {
                conn = Some((c, home));
            }
        }
        if conn.is_none() {
            for off in 0..dsns.len() {
                let n = (home + off) % dsns.len();
                if let Ok(Ok(c)) =
                    tokio::time::timeout(Duration::from_secs(5), connect(&dsns[n])).await
                {
                    conn = Some((c, n));
                    break;
                }
            }
            if conn.is_none() {
                *log.errors.entry("connect".into()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        // a and b on different shards (by the initial routing table) most
        // of the time; the transfer's own row on the shard of one of them.
        let a = rng.random_range(1..=ACCOUNTS);
        let cross = rng.random_bool(0.8);
        let b = loop {
            let b = rng.random_range(1..=ACCOUNTS);
            if b != a && (owner(b) != owner(a)) == cross {
                break b;
            }
        };
        let id = loop {
            seq += 1;
            let id = (k as i64 + 1) * 1_000_000_000 + seq;
            let o = owner(id);
            if o == owner(a) || o == owner(b) {
                break id;
            }
        };
        let t = Transfer {
            id,
            from: a,
            to: b,
            amount: rng.random_range(1..=100),
        };
        let (db, node) = conn.as_ref().unwrap();
        let node = *node;
        let via = format!("node {} ({proto})", node + 1);
        let started = sh.at();
        let (outcome, err) = transfer(db, simple, &t, node, &sh, &mut log).await;
        let why = err
            .as_ref()
            .map(|(stage, e)| format!("{stage}: {}", e.text()));
        if let Some((stage, e)) = &err {
            *log.errors
                .entry(format!("{stage}:{}", e.code()))
                .or_default() += 1;
        }
        log.records.push(Record {
            t,
            outcome,
            via,
            why: why.unwrap_or_default(),
            started,
        });
        match (outcome, err) {
            (Outcome::Acked, _) => {
                sh.acked_via[node].fetch_add(1, Ordering::Relaxed);
            }
            (_, Some((_, e))) if e.broken() => conn = None,
            _ => {
                // End whatever is left of the transaction (a WARNING when
                // there is none).
                let r = tokio::time::timeout(STMT_TIMEOUT, db.batch_execute("ROLLBACK")).await;
                if !matches!(r, Ok(Ok(()))) {
                    conn = None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    log
}

/// Runs one statement with the client-side timeout, timing it.
async fn timed<T>(
    log: &mut ClientLog,
    what: String,
    sh: &Shared,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StmtErr> {
    let start = Instant::now();
    let at = sh.at();
    let r = tokio::time::timeout(STMT_TIMEOUT, fut).await;
    let took = start.elapsed();
    log.statements += 1;
    if took > log.max_latency {
        log.max_latency = took;
        log.max_latency_what = format!("{what}, started at {at}");
    }
    match r {
        Err(_) => {
            log.timeouts.push(format!("{what}, started at {at}"));
            Err(StmtErr::Timeout)
        }
        Ok(Err(e)) => Err(StmtErr::Db(e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// One statement in the client's protocol: the simple one with literal
/// SQL, or the extended one with parameters. Returns the row count.
async fn exec(
    db: &tokio_postgres::Client,
    simple: bool,
    sql: &str,
    params: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    if simple {
        let mut text = sql.to_string();
        // $4 before $1 so that $1 does not eat $1x.
        for (i, p) in params.iter().enumerate().rev() {
            text = text.replace(&format!("${}", i + 1), &p.to_string());
        }
        let msgs = db.simple_query(&text).await?;
        Ok(msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(0))
    } else {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        db.execute(sql, &refs).await
    }
}

/// BEGIN; UPDATE the lower account id; UPDATE the other; INSERT the
/// transfer's row; COMMIT. Accounts are locked in id order, so two
/// transfers never wait for each other in a cycle across shards.
async fn transfer(
    db: &tokio_postgres::Client,
    simple: bool,
    t: &Transfer,
    node: usize,
    sh: &Shared,
    log: &mut ClientLog,
) -> (Outcome, Option<(&'static str, StmtErr)>) {
    let proto = if simple { "simple" } else { "extended" };
    let what = |s: &str| format!("transfer {} {s} through node {} ({proto})", t.id, node + 1);
    let delta = |id: i64| if id == t.from { -t.amount } else { t.amount };
    let (lo, hi) = (t.from.min(t.to), t.from.max(t.to));
    if let Err(e) = timed(log, what("BEGIN"), sh, exec(db, simple, "BEGIN", &[])).await {
        return (Outcome::Failed, Some(("begin", e)));
    }
    for acc in [lo, hi] {
        match timed(
            log,
            what(&format!("UPDATE of account {acc}")),
            sh,
            exec(
                db,
                simple,
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                &[delta(acc), acc],
            ),
        )
        .await
        {
            Ok(1) => {}
            Ok(n) => {
                log.anomalies.push(format!(
                    "{}: {} matched {n} rows (every account exists exactly once)",
                    sh.at(),
                    what(&format!("UPDATE of account {acc}"))
                ));
                return (Outcome::Failed, None);
            }
            Err(e) => return (Outcome::Failed, Some(("update", e))),
        }
    }
    match timed(
        log,
        what("INSERT"),
        sh,
        exec(
            db,
            simple,
            "INSERT INTO transfers (id, from_id, to_id, amount) VALUES ($1, $2, $3, $4)",
            &[t.id, t.from, t.to, t.amount],
        ),
    )
    .await
    {
        Ok(1) => {}
        Ok(n) => {
            log.anomalies
                .push(format!("{}: {} inserted {n} rows", sh.at(), what("INSERT")));
            return (Outcome::Failed, None);
        }
        Err(e) => return (Outcome::Failed, Some(("insert", e))),
    }
    match timed(log, what("COMMIT"), sh, exec(db, simple, "COMMIT", &[])).await {
        Ok(_) => (Outcome::Acked, None),
        Err(e) => {
            let code = e.code();
            if code.starts_with("40") && code != "40003" {
                (Outcome::Failed, Some(("commit", e)))
            } else {
                (Outcome::Uncertain, Some(("commit", e)))
            }
        }
    }
}

/// Consecutive keyless reads that returned the same wrong answer.
struct WrongRun {
    value: String,
    first: String,
    last: String,
    nodes: std::collections::BTreeSet<usize>,
    reads: u64,
}

/// (f): `count(*)` of the accounts through the nodes in turn, until stop.
/// Returns (reads, violations, errors).
async fn count_reader(
    dsns: Vec<String>,
    sh: Arc<Shared>,
    hard_stop: Instant,
) -> (u64, Vec<String>, u64) {
    let (mut reads, mut bad, mut errors) = (0u64, Vec::new(), 0u64);
    let mut conns: Vec<Option<tokio_postgres::Client>> = dsns.iter().map(|_| None).collect();
    // The current run of one wrong answer.
    let mut run: Option<WrongRun> = None;
    let end_run = |run: &mut Option<WrongRun>, bad: &mut Vec<String>| {
        if let Some(r) = run.take() {
            bad.push(format!(
                "{} keyless reads from {} to {} through node(s) {:?}: \
                 SELECT count(*) FROM accounts = {}, want {ACCOUNTS}",
                r.reads, r.first, r.last, r.nodes, r.value
            ));
        }
    };
    let mut i = 0usize;
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
        i += 1;
        let n = i % dsns.len();
        if conns[n].is_none() {
            conns[n] = tokio::time::timeout(Duration::from_secs(5), connect(&dsns[n]))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(db) = &conns[n] {
            match tokio::time::timeout(
                STMT_TIMEOUT,
                db.simple_query("SELECT count(*) FROM accounts"),
            )
            .await
            {
                Ok(Ok(m)) => {
                    reads += 1;
                    let got = first_value(&m, 0).unwrap_or_default();
                    if got == ACCOUNTS.to_string() {
                        end_run(&mut run, &mut bad);
                    } else {
                        if run.as_ref().is_some_and(|r| r.value != got) {
                            end_run(&mut run, &mut bad);
                        }
                        let r = run.get_or_insert_with(|| WrongRun {
                            value: got.clone(),
                            first: sh.at(),
                            last: String::new(),
                            nodes: Default::default(),
                            reads: 0,
                        });
                        r.last = sh.at();
                        r.nodes.insert(n + 1);
                        r.reads += 1;
                    }
                }
                Ok(Err(e)) => {
                    errors += 1;
                    if e.is_closed() || e.code().is_none() {
                        conns[n] = None;
                    }
                }
                Err(_) => {
                    errors += 1;
                    bad.push(format!(
                        "{}: SELECT count(*) through node {} got no answer within {STMT_TIMEOUT:?}",
                        sh.at(),
                        n + 1
                    ));
                    conns[n] = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    end_run(&mut run, &mut bad);
    (reads, bad, errors)
}

/// Rows of `sql` (id first) read directly on every shard; a shard that
/// cannot answer is reported unless it owns no range.
async fn direct_rows(
    shards: &[(String, String)],
    ranges: &Ranges,
    sql: &str,
    v: &mut Vec<String>,
) -> Vec<(String, Vec<Vec<i64>>)> {
    let mut out = Vec::new();
    for (name, dsn) in shards {
        let owns = ranges.iter().any(|r| &r.2 == name);
        let rows = match connect(dsn).await {
            Ok(db) => db.query(sql, &[]).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match rows {
            Ok(rows) => out.push((
                name.clone(),
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| r.get::<_, i64>(i)).collect())
                    .collect(),
            )),
            Err(e) if owns => v.push(format!("{sql} directly on {name}: {e}")),
            Err(_) => {}
        }
    }
    out
}

/// (c) for one table: every row once, on its owner. Returns the rows by id
/// (the owner's copy when there is one).
fn placement(
    table: &str,
    found: &[(String, Vec<Vec<i64>>)],
    ranges: &Ranges,
    v: &mut Vec<String>,
) -> BTreeMap<i64, Vec<i64>> {
    let mut by_id: BTreeMap<i64, Vec<(String, Vec<i64>)>> = BTreeMap::new();
    for (shard, rows) in found {
        for r in rows {
            by_id
                .entry(r[0])
                .or_default()
                .push((shard.clone(), r.clone()));
        }
    }
    let mut out = BTreeMap::new();
    for (id, copies) in by_id {
        let owner = owner_of(ranges, id);
        if copies.len() > 1 {
            v.push(format!(
                "(c) {table} row {id} is stored {} times: {}; its range is owned by {owner}",
                copies.len(),
                copies
                    .iter()
                    .map(|(s, r)| format!("{s} {r:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let on_owner = copies.iter().find(|(s, _)| *s == owner);
        match on_owner {
            Some((_, r)) => {
                out.insert(id, r.clone());
            }
            None => {
                v.push(format!(
                    "(c) {table} row {id} (point {:#018x}) is on {}, its range is owned by {owner}",
                    hashint8extended(id, 0),
                    copies
                        .iter()
                        .map(|(s, _)| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.insert(id, copies[0].1.clone());
            }
        }
    }
    out
}

/// Issue 12: the bank test. See the module documentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_transfers_stay_exact_through_reshards_and_kills() {
    let mut c = ProcCluster::start_with_env(
        3,
        3,
        BANK_HEAD,
        BANK_TABLES,
        CLUSTER,
        &[(STEP_DELAY, "300")],
    )
    .await;
    c.wait_ready(Duration::from_secs(60)).await;
    let d = c.dir.0.join("s3");
    let spare = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let shards: Vec<(String, String)> = c
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("s{i}"), s.dsn()))
        .chain([("s3".to_string(), spare.dsn())])
        .collect();
    // Every shard logs its statements with their session and transaction
    // id: a violation is traced to the statements behind it (the logs
    // are kept when the test fails).
    for (_, dsn) in &shards {
        let s = connect(dsn).await.unwrap();
        for sql in [
            "ALTER SYSTEM SET log_statement = 'all'",
            "ALTER SYSTEM SET log_line_prefix = '%m [%p] x%x %a: '",
            "SELECT pg_reload_conf()",
        ] {
            s.batch_execute(sql).await.unwrap();
        }
    }
    let db = connect(&c.nodes[0].dsn()).await.unwrap();
    db.batch_execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        .await
        .unwrap();
    db.batch_execute(
        "CREATE TABLE transfers (id bigint PRIMARY KEY, from_id bigint NOT NULL, \
         to_id bigint NOT NULL, amount bigint NOT NULL)",
    )
    .await
    .unwrap();
    let values: Vec<String> = (1..=ACCOUNTS)
        .map(|i| format!("({i}, {INITIAL})"))
        .collect();
    db.batch_execute(&format!(
        "INSERT INTO accounts (id, balance) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let initial_ranges = Arc::new(c.ranges(0).await);
    let per_shard: BTreeMap<String, usize> = (1..=ACCOUNTS).fold(BTreeMap::new(), |mut m, id| {
        *m.entry(owner_of(&initial_ranges, id)).or_default() += 1;
        m
    });
    eprintln!("accounts per shard at the start: {per_shard:?}");

    // The load.
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        acked_via: Default::default(),
        t0: Instant::now(),
    });
    let hard_stop = Instant::now() + Duration::from_secs(240);
    let dsns: Vec<String> = c.nodes.iter().map(|n| n.dsn()).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            tokio::spawn(bank_client(
                k,
                dsns.clone(),
                initial_ranges.clone(),
                sh.clone(),
                hard_stop,
            ))
        })
        .collect();
    let reader = tokio::spawn(count_reader(dsns.clone(), sh.clone(), hard_stop));
    let mut v: Vec<String> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let all = [0usize, 1, 2];
    if let Err(e) = progress(&sh, &all, 30, Duration::from_secs(60)).await {
        v.push(e);
    }

    // 1. add the spare shard with rebalance.
    let (ok, out, err) = proxyctl_wait(
        &c,
        0,
        &[
            "reshard",
            "add-shard",
            "s3",
            "--dsn",
            &spare.dsn(),
            "--rebalance",
            "--wait",
        ],
    )
    .await;
    events.push(format!(
        "{}: add-shard s3 --rebalance ended (ok: {ok})",
        sh.at()
    ));
    if !ok {
        v.push(format!(
            "reshard add-shard s3 --rebalance --wait failed: {err}{out}"
        ));
    }
    if let Err(e) = progress(&sh, &all, 20, Duration::from_secs(60)).await {
        v.push(e);
    }

    // 2. kill -9 of a node (not the leader) while transfers commit through
    // it; the others go on. It comes back with a failpoint that makes it
    // die in its first two-phase commit after the commit decision (an
    // in-doubt transaction for certain, which the leader's resolver must
    // commit on every shard, the new one included), then for good.
    let l = leader(&c, 0).await;
    let k1 = (0..3).rev().find(|&i| i as u64 + 1 != l).unwrap();
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != k1).collect();
    if let Err(e) = progress(&sh, &[k1], 10, Duration::from_secs(60)).await {
        v.push(e);
    }
    c.nodes[k1].kill9();
    events.push(format!(
        "{}: killed node {} (kill -9) under load",
        sh.at(),
        k1 + 1
    ));
    if let Err(e) = progress(&sh, &others, 100, Duration::from_secs(60)).await {
        v.push(e);
    }
    tokio::task::block_in_place(|| {
        c.nodes[k1].start_with_env(&[("HOTREPART_FAILPOINT", "twopc_after_decision")])
    });
    let start = Instant::now();
    while !c.nodes[k1].exited() && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if c.nodes[k1].running() {
        v.push(format!(
            "node {} (failpoint twopc_after_decision) made no two-phase commit within 60 s",
            k1 + 1
        ));
        c.nodes[k1].kill9();
    } else {
        events.push(format!(
            "{}: node {} restarted with failpoint twopc_after_decision, died in a commit",
            sh.at(),
            k1 + 1
        ));
    }
    tokio::task::block_in_place(|| c.nodes[k1].start());
    if !routes(&c, k1, Duration::from_secs(60)).await {
        v.push(format!("node {} does not route after its restart", k1 + 1));
    }
    events.push(format!("{}: node {} restarted and routes", sh.at(), k1 + 1));
    if let Err(e) = progress(&sh, &[k1], 10, Duration::from_secs(60)).await {
        v.push(e);
    }

    // 3. split the range holding the most accounts, moving its upper half
    // to the shard holding the fewest.
    let rs = c.ranges(0).await;
    let (lo, owner, to) = busiest_range(&rs);
    let (ok, out, err) = proxyctl_wait(
        &c,
        1,
        &["reshard", "split", &lo.to_string(), "--to", &to, "--wait"],
    )
    .await;
    events.push(format!(
        "{}: split of range {lo:#x} ({owner}), upper half to {to}, ended (ok: {ok})",
        sh.at()
    ));
    let split_ended = !err.contains("did not end within");
    if !ok {
        v.push(format!(
            "reshard split {lo} --to {to} --wait failed: {err}{out}"
        ));
    }
    if let Err(e) = progress(&sh, &all, 20, Duration::from_secs(60)).await {
        v.push(e);
    }

    // 4. move a range; kill -9 the node running the job mid-job (inside
    // the cut-over's freeze when it is seen, else after the flip), restart
    // it; the job resumes on the next leader and ends. Skipped when the
    // split did not end: a move would hang the same way.
    if split_ended {
        move_killing_its_runner(&mut c, &sh, &mut v, &mut events).await;
    } else {
        v.push(
            "the move whose runner is killed was skipped: the split before it did not end".into(),
        );
    }

    // The load stops.
    sh.stop.store(true, Ordering::Relaxed);
    let load_secs = sh.t0.elapsed().as_secs_f64();
    let mut logs = Vec::new();
    for (k, h) in clients.into_iter().enumerate() {
        match tokio::time::timeout(STMT_TIMEOUT * 3, h).await {
            Ok(l) => logs.push(l.unwrap()),
            Err(_) => panic!("client {k} did not stop within {:?}", STMT_TIMEOUT * 3),
        }
    }
    let (reads, read_bad, read_errors) = tokio::time::timeout(STMT_TIMEOUT * 2, reader)
        .await
        .expect("the reader did not stop")
        .unwrap();
    events.push(format!("{}: load stopped", sh.at()));

    // Every node serves the same routing table; every job ended.
    for i in 0..3 {
        if !routes(&c, i, Duration::from_secs(30)).await {
            v.push(format!("node {} does not route at the end", i + 1));
        }
    }
    let ranges = c.ranges(0).await;
    for i in 1..3 {
        let r = c.ranges(i).await;
        if r != ranges {
            v.push(format!(
                "node {} lists other ranges than node 1: {r:?} vs {ranges:?}",
                i + 1
            ));
        }
    }
    let jobs = c.admin_get(0, "/v1/jobs").await.unwrap();
    for j in jobs["jobs"].as_array().unwrap() {
        events.push(format!(
            "job {} {:#x}..{:?} {}→{}: {} ({})",
            j["job"].as_str().unwrap_or("?"),
            j["lo"].as_u64().unwrap_or(0),
            j["hi"].as_u64(),
            j["from"].as_str().unwrap_or("?"),
            j["to"].as_str().unwrap_or("?"),
            j["phase"],
            j["note"].as_str().unwrap_or("")
        ));
        if j["phase"] != "done" {
            v.push(format!("job did not end done: {j}"));
        }
    }

    // (b) the resolver finishes every in-doubt transaction.
    let start = Instant::now();
    let mut left = prepared(&shards).await;
    while left.iter().any(|(_, g)| !g.is_empty()) && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = prepared(&shards).await;
    }
    for (name, gids) in &left {
        if !gids.is_empty() {
            v.push(format!(
                "(b) {} prepared transaction(s) left on {name} {:?} after the load: {gids:?}",
                gids.len(),
                start.elapsed()
            ));
        }
    }

    // (c) placement of every account and transfer.
    let acc_found = direct_rows(&shards, &ranges, "SELECT id, balance FROM accounts", &mut v).await;
    let accounts = placement("accounts", &acc_found, &ranges, &mut v);
    for id in 1..=ACCOUNTS {
        if !accounts.contains_key(&id) {
            v.push(format!(
                "(c) account {id} is on no shard (its range is owned by {})",
                owner_of(&ranges, id)
            ));
        }
    }
    let tr_found = direct_rows(
        &shards,
        &ranges,
        "SELECT id, from_id, to_id, amount FROM transfers",
        &mut v,
    )
    .await;
    let committed = placement("transfers", &tr_found, &ranges, &mut v);
    let direct_total: i64 = accounts.values().map(|r| r[1]).sum();

    // (a) the total through every node, and each balance through one.
    for i in 0..3 {
        let db = connect(&c.nodes[i].dsn()).await.unwrap();
        let m = db
            .simple_query("SELECT count(*), sum(balance) FROM accounts")
            .await;
        match m {
            Ok(m) => {
                let (n, sum) = (first_value(&m, 0), first_value(&m, 1));
                let want = (ACCOUNTS * INITIAL).to_string();
                if n.as_deref() != Some(&ACCOUNTS.to_string()) || sum.as_deref() != Some(&want) {
                    v.push(format!(
                        "(a) through node {}: count(*) = {n:?}, sum(balance) = {sum:?}; want {ACCOUNTS} accounts holding {want}; the shards' owners hold {direct_total}",
                        i + 1
                    ));
                }
            }
            Err(e) => v.push(format!(
                "(a) SELECT count(*), sum(balance) FROM accounts through node {} failed: {}",
                i + 1,
                db_error(&e)
            )),
        }
    }
    if direct_total != ACCOUNTS * INITIAL {
        v.push(format!(
            "(a) the accounts on their owners hold {direct_total} in total, not {}",
            ACCOUNTS * INITIAL
        ));
    }
    let via_node = match connect(&c.nodes[0].dsn())
        .await
        .unwrap()
        .simple_query("SELECT id, balance FROM accounts")
        .await
    {
        Ok(m) => text_rows(&m),
        Err(e) => {
            v.push(format!(
                "(a) SELECT id, balance FROM accounts through node 1 failed: {}",
                db_error(&e)
            ));
            Vec::new()
        }
    };
    let mut seen = BTreeMap::new();
    for r in &via_node {
        let (id, bal): (i64, i64) = (r[0].parse().unwrap(), r[1].parse().unwrap());
        if seen.insert(id, bal).is_some() {
            v.push(format!(
                "(a) account {id} is returned twice by a scan through node 1"
            ));
        }
        match accounts.get(&id) {
            Some(d) if d[1] == bal => {}
            other => v.push(format!(
                "(a) account {id}: balance {bal} through node 1, {:?} on its owner {}",
                other.map(|d| d[1]),
                owner_of(&ranges, id)
            )),
        }
    }
    if seen.len() as i64 != ACCOUNTS {
        v.push(format!(
            "(a) a scan through node 1 returns {} distinct accounts, not {ACCOUNTS}",
            seen.len()
        ));
    }

    // (d) the ledger.
    let records: HashMap<i64, &Record> = logs
        .iter()
        .flat_map(|l| l.records.iter())
        .map(|r| (r.t.id, r))
        .collect();
    let mut ledger: BTreeMap<i64, (i64, usize)> = BTreeMap::new();
    for (id, row) in &committed {
        let (from, to, amount) = (row[1], row[2], row[3]);
        for (acc, d) in [(from, -amount), (to, amount)] {
            let e = ledger.entry(acc).or_insert((INITIAL, 0));
            e.0 += d;
            e.1 += 1;
        }
        match records.get(id) {
            None => v.push(format!(
                "(d) transfer {id} ({from}→{to}, {amount}) is committed but no client ran it"
            )),
            Some(r) => {
                if (r.t.from, r.t.to, r.t.amount) != (from, to, amount) {
                    v.push(format!(
                        "(d) transfer {id} is stored as {from}→{to} {amount}, the client sent {}→{} {}",
                        r.t.from, r.t.to, r.t.amount
                    ));
                }
                if r.outcome == Outcome::Failed {
                    v.push(format!(
                        "(d) transfer {id} ({from}→{to}, {amount}) through {} failed cleanly ({}) but is committed",
                        r.via, r.why
                    ));
                }
            }
        }
    }
    for r in records.values() {
        if r.outcome == Outcome::Acked && !committed.contains_key(&r.t.id) {
            v.push(format!(
                "(d) acknowledged transfer {} ({}→{}, {}) through {} is not committed (its row is on no shard; its range is owned by {})",
                r.t.id,
                r.t.from,
                r.t.to,
                r.t.amount,
                r.via,
                owner_of(&ranges, r.t.id)
            ));
        }
    }
    for id in 1..=ACCOUNTS {
        let (want, n) = ledger.get(&id).copied().unwrap_or((INITIAL, 0));
        match accounts.get(&id) {
            Some(row) if row[1] == want => {}
            Some(row) => {
                // The transfers of this account whose amount is the
                // difference: one of them is half applied (its row in the
                // ledger or not), to look up in the shards' logs.
                let diff = (row[1] - want).abs();
                let suspects: Vec<String> = records
                    .values()
                    .filter(|r| (r.t.from == id || r.t.to == id) && r.t.amount == diff)
                    .map(|r| {
                        let ledger = if committed.contains_key(&r.t.id) {
                            "in"
                        } else {
                            "not in"
                        };
                        format!(
                            "transfer {} ({}→{}, {}) {:?}, {ledger} the ledger, through {} started {}: {}",
                            r.t.id, r.t.from, r.t.to, r.t.amount, r.outcome, r.via, r.started, r.why
                        )
                    })
                    .collect();
                v.push(format!(
                    "(d) account {id} on {}: balance {}, but {INITIAL} plus its {n} committed transfers make {want}; \
                     its transfers of {diff}: {suspects:?}",
                    owner_of(&ranges, id),
                    row[1]
                ))
            }
            None => {}
        }
    }

    // (e) no statement hit the client's timeout or waited past the bound;
    // the clients' answers themselves.
    let mut max = (Duration::ZERO, String::new());
    for l in &logs {
        for t in &l.timeouts {
            v.push(format!("(e) {t}: no answer within {STMT_TIMEOUT:?}"));
        }
        if l.max_latency > max.0 {
            max = (l.max_latency, l.max_latency_what.clone());
        }
        v.extend(l.anomalies.iter().map(|a| format!("(d) {a}")));
    }
    if max.0 > LATENCY_BOUND {
        v.push(format!(
            "(e) the slowest statement took {:?} (bound {LATENCY_BOUND:?}): {}",
            max.0, max.1
        ));
    }
    // (f) keyless count(*) during the load.
    v.extend(read_bad.iter().map(|b| format!("(f) {b}")));

    // The summary, then the verdict.
    let count = |o: Outcome| records.values().filter(|r| r.outcome == o).count();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for l in &logs {
        for (k, n) in &l.errors {
            *errors.entry(k.clone()).or_default() += n;
        }
    }
    let statements: u64 = logs.iter().map(|l| l.statements).sum();
    let uncertain_committed = records
        .values()
        .filter(|r| r.outcome == Outcome::Uncertain && committed.contains_key(&r.t.id))
        .count();
    eprintln!(
        "bank: {load_secs:.1} s of load, {statements} statements; transfers: {} acknowledged, {} failed cleanly, {} uncertain ({uncertain_committed} of them committed); {} committed rows; errors {errors:?}; slowest statement {:?}: {}; count(*) reads during the load: {reads} ({read_errors} errors)\nevents:\n  {}",
        count(Outcome::Acked),
        count(Outcome::Failed),
        count(Outcome::Uncertain),
        committed.len(),
        max.0,
        max.1,
        events.join("\n  ")
    );
    for proto in ["(simple)", "(extended)"] {
        let n = records
            .values()
            .filter(|r| r.outcome == Outcome::Acked && r.via.ends_with(proto))
            .count();
        assert!(
            n >= 100,
            "only {n} transfers {proto} were acknowledged: too few for the test to mean anything; violations: {v:#?}"
        );
    }
    let kept = if v.is_empty() {
        String::new()
    } else {
        keep_logs(&c, &[&spare])
    };
    assert!(
        v.is_empty(),
        "{} violation(s) of the bank's invariants:\n{}\n(events:\n  {})\nnode log lines with ERROR or panicked:\n{}\n{kept}",
        v.len(),
        v.join("\n"),
        events.join("\n  "),
        notable_log_lines(&c)
    );
    drop(spare);
}

/// Step 4 of the bank test: a move whose runner (the leader) is killed
/// inside the cut-over's freeze (else after the flip) and restarted; the
/// job must resume on the next leader and end done.
async fn move_killing_its_runner(
    c: &mut ProcCluster,
    sh: &Shared,
    v: &mut Vec<String>,
    events: &mut Vec<String>,
) {
    let all = [0usize, 1, 2];
    let rs = c.ranges(0).await;
    let (lo, owner, to) = busiest_range(&rs);
    let l = leader(c, 0).await;
    let via = (0..3).find(|&i| i as u64 + 1 != l).unwrap();
    let (ok, out, err) = c
        .proxyctl(
            via,
            &["--json", "reshard", "move", &lo.to_string(), "--to", &to],
        )
        .await;
    assert!(ok, "reshard move {lo} --to {to}: {err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["job"]
        .as_str()
        .unwrap()
        .to_string();
    events.push(format!(
        "{}: job {id} moves range {lo:#x} from {owner} to {to}",
        sh.at()
    ));
    let start = Instant::now();
    let mut killed = None;
    while killed.is_none() && start.elapsed() < JOB_TIMEOUT {
        let j = job(c, via, &id).await;
        let ph = phase_of(&j);
        if j.as_ref()
            .is_some_and(|j| j["done"] == serde_json::json!(true))
        {
            v.push(format!(
                "job {id} ended ({ph}) before its node could be killed: {j:?}"
            ));
            break;
        }
        let frozen = c.admin_get(via, "/v1/ranges").await.is_some_and(|r| {
            r["ranges"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["lo"].as_u64() == Some(lo) && r["status"] == "frozen")
        });
        if frozen || ph == "flipped" {
            let runner = j
                .as_ref()
                .and_then(|j| j["owner"].as_u64())
                .filter(|&o| o != 0)
                .unwrap_or(l);
            let ri = (runner - 1) as usize;
            c.nodes[ri].kill9();
            let when = if frozen {
                "during the cut-over's freeze"
            } else {
                "after the flip"
            };
            events.push(format!(
                "{}: killed node {runner}, which ran job {id}, {when} (phase {ph})",
                sh.at()
            ));
            killed = Some(ri);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    match killed {
        Some(ri) => {
            let watcher = (0..3).find(|&i| i != ri).unwrap();
            match wait_job_end(c, watcher, &id, JOB_TIMEOUT).await {
                Ok(j) => events.push(format!("{}: job {id} ended {}", sh.at(), j["phase"])),
                Err(e) => v.push(e),
            }
            tokio::task::block_in_place(|| c.nodes[ri].start());
            if !routes(c, ri, Duration::from_secs(60)).await {
                v.push(format!("node {} does not route after its restart", ri + 1));
            }
            events.push(format!("{}: node {} restarted and routes", sh.at(), ri + 1));
            if let Err(e) = progress(sh, &all, 20, Duration::from_secs(60)).await {
                v.push(e);
            }
        }
        None => v.push(format!(
            "job {id} was not seen frozen or flipped within {JOB_TIMEOUT:?} (last phase {}): its node was not killed",
            phase_of(&job(c, via, &id).await)
        )),
    }
}

/// The range holding the most accounts: (lo, owner, the shard holding the
/// fewest accounts other than the owner).
fn busiest_range(rs: &Ranges) -> (u64, String, String) {
    let mut per_range: BTreeMap<u64, usize> = BTreeMap::new();
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for r in rs {
        per_shard.entry(r.2.clone()).or_default();
    }
    for id in 1..=ACCOUNTS {
        let p = hashint8extended(id, 0);
        let r = rs
            .iter()
            .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
            .unwrap();
        *per_range.entry(r.0).or_default() += 1;
        *per_shard.entry(r.2.clone()).or_default() += 1;
    }
    let (&lo, _) = per_range.iter().max_by_key(|(_, n)| **n).unwrap();
    let owner = rs.iter().find(|r| r.0 == lo).unwrap().2.clone();
    let to = per_shard
        .iter()
        .filter(|(s, _)| **s != owner)
        .min_by_key(|(_, n)| **n)
        .unwrap()
        .0
        .clone();
    (lo, owner, to)
}
