//! The verifying load generator (`proxyctl loadtest`, issue 7): evidence
//! that no acknowledged write is lost, duplicated or stranded while key
//! ranges move under load.
//!
//! Writers insert rows with random 63-bit ids (distinct per writer) and a
//! payload that is a pure function of `(id, version)` ([`payload`]);
//! updaters bump the version of acknowledged ids (the new payload is
//! computed by PostgreSQL with the same function); readers read
//! acknowledged ids back. Every operation is bounded by a timeout, timed,
//! and its error (if any) counted by SQLSTATE. At the end [`check`] reads the
//! table through hotrepart and directly on every shard and compares it with
//! the [`Ledger`] of acknowledged writes, against the routing table read
//! from the admin API.
//!
//! Guarantees of the check:
//! - an acknowledged insert must be present exactly once, through the node
//!   and on exactly one shard, the write owner of its point's range (the
//!   point computed in Rust with the router's own hash);
//! - its version must be exactly `1 + acknowledged updates`, or — when some
//!   update's outcome is unknown (timeout, broken connection) — between that
//!   and `1 + acknowledged + unknown` (such ids are "uncertain", reported,
//!   not counted as loss);
//! - an insert whose outcome is unknown may be present (version 1) or not;
//!   any other row is a violation, as is a row on a shard that does not
//!   own its point;
//! - a worker that does not stop within its timeout is aborted and reported,
//!   never waited for.

use crate::error::sqlstate;
use crate::sql::quote_ident;
use md5::{Digest, Md5};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

mod check;
mod cli;

pub use check::check;
use check::{admin_get, admin_post};
pub use cli::{cli, parse_duration, summary, Args};

/// How many violations and error messages a report keeps (the counts are
/// complete).
const KEEP_VIOLATIONS: usize = 1000;
const KEEP_ERROR_MESSAGES: usize = 20;
/// Point reads through the node in the final check (a sample when more
/// ids were acknowledged; the full scan covers every row).
const CHECK_POINT_READS: usize = 2000;

/// A callback for each second of load.
pub type Progress = Arc<dyn Fn(&Window) + Send + Sync>;

/// What to run.
#[derive(Clone)]
pub struct Options {
    /// Client DSNs of hotrepart nodes; workers are spread round-robin.
    pub nodes: Vec<String>,
    /// Direct DSNs of the shards, by catalog name, for the final check.
    pub shards: Vec<(String, String)>,
    /// Admin API base URL (`http://host:port`) and token.
    pub admin: String,
    pub token: String,
    /// Table (`id bigint PRIMARY KEY, version int, payload text`).
    pub table: String,
    /// Declare and create the table, and empty it.
    pub setup: bool,
    pub duration: Duration,
    pub writers: usize,
    pub updaters: usize,
    pub readers: usize,
    /// Bound of one operation (connect, statement); a timed-out write is
    /// uncertain.
    pub op_timeout: Duration,
    /// Seed of the ids; random when `None`.
    pub seed: Option<u64>,
    /// Think time of a worker after each operation (zero: none): with
    /// many clients, a pace like an application's instead of a flood.
    pub pause: Duration,
    /// Called once per second of load with that second's numbers.
    pub progress: Option<Progress>,
    /// Ends the load before `duration` when notified (`proxyctl loadtest`:
    /// SIGINT); the check runs as usual.
    pub stop: Option<Arc<tokio::sync::Notify>>,
}

impl Options {
    /// Defaults: table `hr_load`, 30 s, 4 writers, 2 updaters, 2 readers,
    /// 10 s per operation.
    pub fn new(nodes: Vec<String>, admin: &str, token: &str) -> Options {
        Options {
            nodes,
            shards: Vec::new(),
            admin: admin.to_owned(),
            token: token.to_owned(),
            table: "hr_load".into(),
            setup: false,
            duration: Duration::from_secs(30),
            writers: 4,
            updaters: 2,
            readers: 2,
            op_timeout: Duration::from_secs(10),
            seed: None,
            pause: Duration::ZERO,
            progress: None,
            stop: None,
        }
    }
}

/// Errors that stop a load test (a failed check is a [`Report`] with
/// `ok: false`, not an error).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad options: {0}")]
    Options(String),
    #[error("admin API {path}: {msg}")]
    Admin { path: String, msg: String },
    #[error("{what}: {msg}")]
    Sql { what: String, msg: String },
    #[error("table {table}: {msg}")]
    Table { table: String, msg: String },
    #[error("{0} did not finish within its time bound")]
    Timeout(String),
}

fn sql_err(what: impl Into<String>, e: tokio_postgres::Error) -> Error {
    Error::Sql {
        what: what.into(),
        msg: pg_message(&e),
    }
}

/// A PostgreSQL error as `SQLSTATE: message` (tokio-postgres' own text is
/// only "db error").
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The payload of row `id` at `version`: `md5('<id>:<version>')`, the same
/// in SQL ([`payload_sql`]).
pub fn payload(id: i64, version: i32) -> String {
    let d = Md5::digest(format!("{id}:{version}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`payload`] in SQL, for the row's next version.
fn payload_sql() -> &'static str {
    "md5(id::text || ':' || (version + 1)::text)"
}

/// The operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Read,
}

/// One timed operation.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Milliseconds since the start of the load when it ended.
    end_ms: u32,
    micros: u32,
    op: Op,
    ok: bool,
}

/// What is known of one acknowledged id.
#[derive(Debug, Clone, Copy, Default)]
struct IdState {
    acked_updates: u32,
    unknown_updates: u32,
    /// Highest version an update returned.
    max_acked: i32,
}

impl IdState {
    /// The versions the row may have now.
    fn expected(&self) -> (i32, i32) {
        let lo = (1 + self.acked_updates as i32).max(self.max_acked);
        (lo, 1 + (self.acked_updates + self.unknown_updates) as i32)
    }
}

/// The acknowledged writes of a run: what the check compares against.
#[derive(Debug, Default)]
pub struct Ledger {
    ids: Vec<i64>,
    state: HashMap<i64, IdState>,
    /// Inserts whose outcome is unknown.
    maybe_inserted: HashSet<i64>,
}

impl Ledger {
    /// Acknowledged ids, in the order they were acknowledged.
    pub fn acked_ids(&self) -> &[i64] {
        &self.ids
    }
    /// The versions an acknowledged id may have, `None` when not
    /// acknowledged.
    pub fn expected_versions(&self, id: i64) -> Option<(i32, i32)> {
        self.state.get(&id).map(IdState::expected)
    }
    /// Acknowledged ids with an update of unknown outcome.
    pub fn uncertain_ids(&self) -> usize {
        self.state
            .values()
            .filter(|s| s.unknown_updates > 0)
            .count()
    }
    /// Inserts whose outcome is unknown.
    pub fn maybe_inserted(&self) -> usize {
        self.maybe_inserted.len()
    }
}

/// A broken promise found by the check (or by a reader during the run).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// An acknowledged row is absent (`via`: `node`, `node N point read`,
    /// `reader`, `updater` or `shards`).
    Missing { id: i64, via: String },
    /// A row's version is outside what the acknowledged updates allow.
    WrongVersion {
        id: i64,
        via: String,
        found: i32,
        expected_min: i32,
        expected_max: i32,
    },
    /// The payload is not `payload(id, version)`.
    BadPayload { id: i64, via: String, version: i32 },
    /// The id is stored more than once (`via` node: the node returned it
    /// twice; shards: the shards holding it).
    Duplicate { id: i64, via: String, copies: usize },
    /// A row sits on a shard that is not the write owner of its point.
    WrongShard {
        id: i64,
        shard: String,
        owner: String,
        point: u64,
    },
    /// A row this run never wrote.
    Unexpected { id: i64, via: String },
    /// `count(*)` through the node is not the number of acknowledged rows
    /// (plus, at most, the inserts of unknown outcome).
    Count {
        counted: i64,
        expected_min: i64,
        expected_max: i64,
    },
    /// A shard owns ranges but no `--shard` DSN was given: its rows were
    /// not checked.
    ShardNotChecked { shard: String },
    /// The routing table changed while the check ran: placement results
    /// are not conclusive.
    RoutingChanged { before: u64, after: u64 },
}

/// Latency summary, microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub errors: u64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

fn latency(samples: &mut [u32], errors: u64) -> Latency {
    samples.sort_unstable();
    let n = samples.len();
    let at = |q: usize| {
        if n == 0 {
            0
        } else {
            samples[(n * q).div_ceil(100).clamp(1, n) - 1]
        }
    };
    Latency {
        count: n as u64,
        errors,
        p50_us: at(50),
        p99_us: at(99),
        max_us: samples.last().copied().unwrap_or(0),
    }
}

/// One second of load (operations that ended in it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// Seconds since the start of the load.
    pub second: u32,
    /// Operations ended in this second (also failed ones).
    pub ops: u64,
    pub errors: u64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

/// Client errors: counts by operation and SQLSTATE (`timeout`,
/// `connection` when there was none), and the first messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Errors {
    pub total: u64,
    pub by_code: BTreeMap<String, u64>,
    pub first: Vec<String>,
}

/// Counts of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub inserts_acked: u64,
    pub updates_acked: u64,
    pub reads_ok: u64,
    /// Inserts of unknown outcome (the row may or may not exist).
    pub inserts_uncertain: u64,
    /// Acknowledged ids with an update of unknown outcome.
    pub ids_uncertain: u64,
}

/// What the final check looked at.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checked {
    /// Routing epoch the placement was checked against.
    pub epoch: u64,
    pub rows_via_node: u64,
    pub count_via_node: i64,
    pub point_reads: u64,
    pub rows_per_shard: BTreeMap<String, u64>,
}

/// The outcome of a load test.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// No violation, and the check ran to its end (client errors alone do
    /// not make a run fail).
    pub ok: bool,
    /// Why the final check could not finish (`ok` is then false).
    pub check_error: Option<String>,
    pub table: String,
    pub seconds: f64,
    /// The load was ended before its duration ([`Options::stop`]).
    pub stopped_early: bool,
    pub writers: usize,
    pub updaters: usize,
    pub readers: usize,
    pub counts: Counts,
    pub errors: Errors,
    /// Workers that had to be aborted (did not stop within their bound).
    pub hung_workers: Vec<String>,
    /// Latency over the whole run, per operation.
    pub latency: BTreeMap<String, Latency>,
    /// Throughput and latency per second of load.
    pub windows: Vec<Window>,
    pub checked: Checked,
    pub violation_count: usize,
    /// The first violations (at most 1000).
    pub violations: Vec<Violation>,
}

/// The outcome of the load phase: the ledger and the measurements.
#[derive(Debug, Default)]
pub struct Load {
    pub ledger: Ledger,
    samples: Vec<Sample>,
    errors: Errors,
    hung_workers: Vec<String>,
    /// Found by readers and updaters during the run (the first ones) and
    /// how many there were.
    violations: Vec<Violation>,
    violations_found: usize,
    seconds: f64,
    stopped_early: bool,
    reads_ok: u64,
}

/// Declares `opts.table` sharded by `id` (unless the catalog has it),
/// creates it through the first node if absent, and empties it.
pub async fn setup(opts: &Options) -> Result<(), Error> {
    let tables = admin_get(opts, "/v1/tables").await?;
    let declared = tables["sharded"]
        .as_array()
        .is_some_and(|a| a.iter().any(|t| t["table"] == opts.table.as_str()));
    if !declared {
        admin_post(
            opts,
            "/v1/tables",
            serde_json::json!({"table": opts.table, "kind": "sharded",
                               "key_column": "id", "key_type": "int8"}),
        )
        .await?;
    }
    let db = connect(opts, 0).await?;
    let t = quote_ident(&opts.table);
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {t} (id bigint PRIMARY KEY, version int NOT NULL, payload text NOT NULL)"
    );
    // A node that just started (or just declared the table) may still be
    // waiting for its routing lease (57P03): retry for a while.
    let deadline = Instant::now() + opts.op_timeout * 3;
    loop {
        match tokio::time::timeout(opts.op_timeout, db.client.batch_execute(&ddl)).await {
            Ok(Ok(())) => break,
            Ok(Err(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => return Err(sql_err("CREATE TABLE", e)),
            Err(_) => return Err(Error::Timeout("CREATE TABLE".into())),
        }
    }
    bounded(
        opts.op_timeout * 6,
        "TRUNCATE",
        db.client.batch_execute(&format!("TRUNCATE {t}")),
    )
    .await?;
    Ok(())
}

/// Setup (if asked), load, check.
pub async fn run(opts: &Options) -> Result<Report, Error> {
    if opts.setup {
        setup(opts).await?;
    }
    let load = load(opts).await?;
    // A check that cannot finish still yields the load's numbers.
    let (checked, violations, error) = match check(opts, &load.ledger).await {
        Ok((c, v)) => (c, v, None),
        Err(e) => (Checked::default(), Vec::new(), Some(e.to_string())),
    };
    let mut r = report(opts, load, checked, violations);
    r.ok &= error.is_none();
    r.check_error = error;
    Ok(r)
}

/// Turns a load and its check into the report.
pub fn report(
    opts: &Options,
    load: Load,
    checked: Checked,
    mut violations: Vec<Violation>,
) -> Report {
    let violation_count = load.violations_found + violations.len();
    let mut all = load.violations;
    all.append(&mut violations);
    let mut per_op: BTreeMap<Op, (Vec<u32>, u64)> = BTreeMap::new();
    let mut per_sec: BTreeMap<u32, (Vec<u32>, u64)> = BTreeMap::new();
    let mut counts = Counts::default();
    for s in &load.samples {
        let e = per_op.entry(s.op).or_default();
        let w = per_sec.entry(s.end_ms / 1000).or_default();
        w.0.push(s.micros);
        if s.ok {
            e.0.push(s.micros);
            match s.op {
                Op::Insert => counts.inserts_acked += 1,
                Op::Update => counts.updates_acked += 1,
                Op::Read => {}
            }
        } else {
            e.1 += 1;
            w.1 += 1;
        }
    }
    counts.reads_ok = load.reads_ok;
    counts.inserts_uncertain = load.ledger.maybe_inserted() as u64;
    counts.ids_uncertain = load.ledger.uncertain_ids() as u64;
    let latency_map = per_op
        .into_iter()
        .map(|(op, (mut v, errs))| {
            let name = serde_json::to_value(op)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            (name, latency(&mut v, errs))
        })
        .collect();
    let windows = per_sec
        .into_iter()
        .map(|(second, (mut v, errors))| {
            let l = latency(&mut v, 0);
            Window {
                second,
                ops: l.count,
                errors,
                p50_us: l.p50_us,
                p99_us: l.p99_us,
                max_us: l.max_us,
            }
        })
        .collect();
    all.truncate(KEEP_VIOLATIONS);
    Report {
        ok: violation_count == 0,
        check_error: None,
        table: opts.table.clone(),
        seconds: load.seconds,
        stopped_early: load.stopped_early,
        writers: opts.writers,
        updaters: opts.updaters,
        readers: opts.readers,
        counts,
        errors: load.errors,
        hung_workers: load.hung_workers,
        latency: latency_map,
        windows,
        checked,
        violation_count,
        violations: all,
    }
}

// ---------------------------------------------------------------- clients

/// A connection to a node, remade after a timeout or a broken connection
/// (a timed-out statement may still be running on it).
struct Conn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect_dsn(dsn: &str, timeout: Duration, what: &str) -> Result<Conn, Error> {
    let (client, conn) = tokio::time::timeout(timeout, tokio_postgres::connect(dsn, NoTls))
        .await
        .map_err(|_| Error::Timeout(format!("connecting to {what}")))?
        .map_err(|e| sql_err(format!("connecting to {what}"), e))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { client, task })
}

async fn connect(opts: &Options, i: usize) -> Result<Conn, Error> {
    let n = opts.nodes.len().max(1);
    let dsn = opts
        .nodes
        .get(i % n)
        .ok_or_else(|| Error::Options("no node DSN (--node)".into()))?;
    connect_dsn(dsn, opts.op_timeout, &format!("node {}", i % n + 1)).await
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Error::Timeout(what.to_owned()))?
        .map_err(|e| sql_err(what, e))
}

/// How an operation failed.
enum Failure {
    /// The server (or the node) answered with an error: nothing was done,
    /// unless the SQLSTATE says the outcome is unknown.
    Sql(tokio_postgres::Error),
    Timeout,
}

impl Failure {
    fn code(&self) -> String {
        match self {
            Failure::Sql(e) => e
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_else(|| "connection".into()),
            Failure::Timeout => "timeout".into(),
        }
    }
    /// Whether a write that failed so may nevertheless have committed:
    /// no answer, a broken connection, or a SQLSTATE of connection trouble
    /// (08), operator intervention (57, but not a cancel: the statement
    /// was rolled back), system error (58), internal error (XX), or
    /// "statement completion unknown" (40003).
    fn uncertain(&self) -> bool {
        let c = self.code();
        c == "timeout"
            || c == "connection"
            || c == sqlstate::STATEMENT_COMPLETION_UNKNOWN
            || c.starts_with("08")
            || (c.starts_with("57") && c != sqlstate::QUERY_CANCELED)
            || c.starts_with("58")
            || c.starts_with("XX")
    }
    /// Whether the connection must be remade.
    fn reconnect(&self, client: &Client) -> bool {
        client.is_closed() || self.uncertain()
    }
    fn message(&self) -> String {
        match self {
            Failure::Sql(e) => pg_message(e),
            Failure::Timeout => "no answer within the operation timeout".into(),
        }
    }
}

/// State shared by the workers.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
    errors: Mutex<Errors>,
    /// The first violations found during the run, and their number.
    violations: Mutex<(Vec<Violation>, usize)>,
    /// Progress of the current second: ops, errors, max latency (µs).
    sec_ops: AtomicU64,
    sec_errors: AtomicU64,
    sec_max: AtomicU64,
    reads_ok: AtomicU64,
}

impl Shared {
    fn lock_ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn violation(&self, v: Violation) {
        let mut g = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        g.1 += 1;
        if g.0.len() < KEEP_VIOLATIONS {
            g.0.push(v);
        }
    }
    fn error(&self, op: Op, f: &Failure) {
        let mut g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        g.total += 1;
        let key = format!("{}:{}", op_name(op), f.code());
        *g.by_code.entry(key).or_default() += 1;
        if g.first.len() < KEEP_ERROR_MESSAGES {
            g.first.push(format!("{}: {}", op_name(op), f.message()));
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Read => "read",
    }
}

/// One worker: its connection, statements, samples.
struct Worker {
    index: usize,
    op: Op,
    shared: Arc<Shared>,
    opts: Arc<Options>,
    rng: rand::rngs::StdRng,
    samples: Vec<Sample>,
}

impl Worker {
    fn record(&mut self, began: Instant, ok: bool) {
        let micros = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let end_ms = self
            .shared
            .start
            .elapsed()
            .as_millis()
            .min(u128::from(u32::MAX)) as u32;
        self.samples.push(Sample {
            end_ms,
            micros,
            op: self.op,
            ok,
        });
        self.shared.sec_ops.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.shared.sec_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.shared
            .sec_max
            .fetch_max(u64::from(micros), Ordering::Relaxed);
    }

    /// A fresh connection and its prepared statement; `None` (after
    /// recording the failure and pausing a little) when it cannot be had.
    async fn open(&mut self, sql: &str) -> Option<(Conn, tokio_postgres::Statement)> {
        let began = Instant::now();
        let limit = self.opts.op_timeout;
        let r = async {
            let conn = connect(&self.opts, self.index).await?;
            let st = bounded(limit, "prepare", conn.client.prepare(sql)).await?;
            Ok::<_, Error>((conn, st))
        }
        .await;
        match r {
            Ok(x) => Some(x),
            Err(e) => {
                self.record(began, false);
                {
                    let mut g = self.shared.errors.lock().unwrap_or_else(|p| p.into_inner());
                    g.total += 1;
                    *g.by_code
                        .entry(format!("{}:connect", op_name(self.op)))
                        .or_default() += 1;
                    if g.first.len() < KEEP_ERROR_MESSAGES {
                        g.first.push(format!("{}: {e}", op_name(self.op)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        }
    }

    fn pick(&mut self) -> Option<(i64, IdState)> {
        let l = self.shared.lock_ledger();
        if l.ids.is_empty() {
            return None;
        }
        let id = l.ids[self.rng.random_range(0..l.ids.len())];
        l.state.get(&id).map(|s| (id, *s))
    }

    async fn run(mut self) -> Vec<Sample> {
        let t = quote_ident(&self.opts.table);
        let sql = match self.op {
            Op::Insert => format!("INSERT INTO {t} (id, version, payload) VALUES ($1, 1, $2)"),
            Op::Update => format!(
                "UPDATE {t} SET version = version + 1, payload = {} WHERE id = $1 RETURNING version",
                payload_sql()
            ),
            Op::Read => format!("SELECT version, payload FROM {t} WHERE id = $1"),
        };
        let mut conn: Option<(Conn, tokio_postgres::Statement)> = None;
        let mut tried = HashSet::new();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let (c, st) = match conn.take() {
                Some(x) => x,
                None => match self.open(&sql).await {
                    Some(x) => x,
                    None => continue,
                },
            };
            let keep = match self.op {
                Op::Insert => self.insert(&c.client, &st, &mut tried).await,
                Op::Update => self.update(&c.client, &st).await,
                Op::Read => self.read(&c.client, &st).await,
            };
            if keep {
                conn = Some((c, st));
            }
            if !self.opts.pause.is_zero() {
                tokio::time::sleep(self.opts.pause).await;
            }
        }
        self.samples
    }

    /// Returns whether the connection may be kept.
    async fn insert(
        &mut self,
        client: &Client,
        st: &tokio_postgres::Statement,
        tried: &mut HashSet<i64>,
    ) -> bool {
        // 63-bit ids whose low 10 bits are the writer's number: distinct
        // across writers; `tried` keeps them distinct within one.
        let id = loop {
            let r = (self.rng.random::<u64>() >> 1) as i64;
            let id = (r & !0x3ff) | (self.index as i64 & 0x3ff);
            if tried.insert(id) {
                break id;
            }
        };
        let p = payload(id, 1);
        let began = Instant::now();
        let r = tokio::time::timeout(self.opts.op_timeout, client.execute(st, &[&id, &p])).await;
        match r {
            Ok(Ok(1)) => {
                self.record(began, true);
                let mut l = self.shared.lock_ledger();
                l.ids.push(id);
                l.state.insert(
                    id,
                    IdState {
                        max_acked: 1,
                        ..IdState::default()
                    },
                );
                true
            }
            Ok(Ok(n)) => {
                self.record(began, false);
                self.shared.violation(Violation::Duplicate {
                    id,
                    via: format!("insert reported {n} rows"),
                    copies: n as usize,
                });
                true
            }
            Ok(Err(e)) => self.failed(began, Failure::Sql(e), client, |l| {
                l.maybe_inserted.insert(id);
            }),
            Err(_) => self.failed(began, Failure::Timeout, client, |l| {
                l.maybe_inserted.insert(id);
            }),
        }
    }

    fn failed(
        &mut self,
        began: Instant,
        f: Failure,
        client: &Client,
        if_uncertain: impl FnOnce(&mut Ledger),
    ) -> bool {
        self.record(began, false);
        self.shared.error(self.op, &f);
        if f.uncertain() {
            if_uncertain(&mut self.shared.lock_ledger());
        }
        !f.reconnect(client)
    }

    async fn update(&mut self, client: &Client, st: &tokio_postgres::Statement) -> bool {
        let Some((id, _)) = self.pick() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return true;
        };
        let began = Instant::now();
        let r = tokio::time::timeout(self.opts.op_timeout, client.query(st, &[&id])).await;
        match r {
            Ok(Ok(rows)) => {
                self.record(began, true);
                match rows.first().map(|r| r.try_get::<_, i32>(0)) {
                    Some(Ok(v)) => {
                        let mut l = self.shared.lock_ledger();
                        if let Some(s) = l.state.get_mut(&id) {
                            s.acked_updates += 1;
                            s.max_acked = s.max_acked.max(v);
                        }
                    }
                    Some(Err(_)) | None => self.shared.violation(Violation::Missing {
                        id,
                        via: "updater".into(),
                    }),
                }
                true
            }
            Ok(Err(e)) => self.failed(began, Failure::Sql(e), client, |l| {
                if let Some(s) = l.state.get_mut(&id) {
                    s.unknown_updates += 1;
                }
            }),
            Err(_) => self.failed(began, Failure::Timeout, client, |l| {
                if let Some(s) = l.state.get_mut(&id) {
                    s.unknown_updates += 1;
                }
            }),
        }
    }

    async fn read(&mut self, client: &Client, st: &tokio_postgres::Statement) -> bool {
        let Some((id, before)) = self.pick() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return true;
        };
        let began = Instant::now();
        let r = tokio::time::timeout(self.opts.op_timeout, client.query(st, &[&id])).await;
        match r {
            Ok(Ok(rows)) => {
                self.record(began, true);
                self.shared.reads_ok.fetch_add(1, Ordering::Relaxed);
                let via = "reader".to_string();
                match rows
                    .first()
                    .map(|r| (r.try_get::<_, i32>(0), r.try_get::<_, String>(1)))
                {
                    None => self.shared.violation(Violation::Missing { id, via }),
                    Some((Ok(v), Ok(p))) => {
                        // Updates acknowledged before the read was sent must
                        // be visible; later ones may be.
                        let (lo, _) = before.expected();
                        if v < lo {
                            self.shared.violation(Violation::WrongVersion {
                                id,
                                via: via.clone(),
                                found: v,
                                expected_min: lo,
                                expected_max: i32::MAX,
                            });
                        }
                        if p != payload(id, v) {
                            self.shared.violation(Violation::BadPayload {
                                id,
                                via,
                                version: v,
                            });
                        }
                    }
                    Some(_) => self.shared.violation(Violation::BadPayload {
                        id,
                        via,
                        version: -1,
                    }),
                }
                true
            }
            Ok(Err(e)) => self.failed(began, Failure::Sql(e), client, |_| {}),
            Err(_) => self.failed(began, Failure::Timeout, client, |_| {}),
        }
    }
}

/// Runs the workers for `opts.duration` and returns what they saw. The
/// table must exist and be empty (see [`setup`]).
pub async fn load(opts: &Options) -> Result<Load, Error> {
    if opts.nodes.is_empty() {
        return Err(Error::Options("at least one node DSN is needed".into()));
    }
    if opts.writers == 0 {
        return Err(Error::Options("at least one writer is needed".into()));
    }
    if opts.writers > 1024 {
        return Err(Error::Options("at most 1024 writers".into()));
    }
    {
        let db = connect(opts, 0).await?;
        let t = quote_ident(&opts.table);
        let row = bounded(
            opts.op_timeout * 6,
            "count(*) before the load",
            db.client
                .query_one(&format!("SELECT count(*) FROM {t}"), &[]),
        )
        .await?;
        let n: i64 = row.try_get(0).map_err(|e| sql_err("count(*)", e))?;
        if n != 0 {
            return Err(Error::Table {
                table: opts.table.clone(),
                msg: format!("holds {n} row(s); the load test needs it empty (--setup empties it)"),
            });
        }
    }
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        ledger: Mutex::new(Ledger::default()),
        errors: Mutex::new(Errors::default()),
        violations: Mutex::new((Vec::new(), 0)),
        sec_ops: AtomicU64::new(0),
        sec_errors: AtomicU64::new(0),
        sec_max: AtomicU64::new(0),
        reads_ok: AtomicU64::new(0),
    });
    let seed = opts.seed.unwrap_or_else(rand::random);
    let aopts = Arc::new(opts.clone());
    let mut handles = Vec::new();
    let kinds = [
        (Op::Insert, opts.writers),
        (Op::Update, opts.updaters),
        (Op::Read, opts.readers),
    ];
    let mut index = 0usize;
    for (op, n) in kinds {
        for k in 0..n {
            let w = Worker {
                // Writers are numbered 0.. (their ids carry it); every
                // worker gets its own node round-robin.
                index,
                op,
                shared: shared.clone(),
                opts: aopts.clone(),
                rng: rand::rngs::StdRng::seed_from_u64(
                    seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ),
                samples: Vec::new(),
            };
            let name = format!("{} {}", op_name(op), k + 1);
            handles.push((name, tokio::spawn(w.run())));
            index += 1;
        }
    }
    // Progress, once per second, until the end of the load.
    let ticker = {
        let shared = shared.clone();
        let progress = opts.progress.clone();
        tokio::spawn(async move {
            let mut second = 0u32;
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::from_std(shared.start) + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let w = Window {
                    second,
                    ops: shared.sec_ops.swap(0, Ordering::Relaxed),
                    errors: shared.sec_errors.swap(0, Ordering::Relaxed),
                    max_us: shared.sec_max.swap(0, Ordering::Relaxed) as u32,
                    ..Window::default()
                };
                if let Some(p) = &progress {
                    p(&w);
                }
                second += 1;
            }
        })
    };
    let stopped_early = match &opts.stop {
        Some(stop) => tokio::select! {
            _ = tokio::time::sleep(opts.duration) => false,
            _ = stop.notified() => true,
        },
        None => {
            tokio::time::sleep(opts.duration).await;
            false
        }
    };
    shared.stop.store(true, Ordering::Relaxed);
    // A worker ends its current operation (bounded by op_timeout, plus a
    // reconnect) and stops; one that does not is aborted and reported.
    let grace = opts.op_timeout * 2 + Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + grace;
    let mut samples = Vec::new();
    let mut hung = Vec::new();
    for (name, mut h) in handles {
        match tokio::time::timeout_at(deadline, &mut h).await {
            Ok(Ok(mut s)) => samples.append(&mut s),
            Ok(Err(e)) => hung.push(format!("{name}: {e}")),
            Err(_) => {
                h.abort();
                hung.push(format!("{name}: did not stop within {grace:?}"));
            }
        }
    }
    ticker.abort();
    let seconds = shared.start.elapsed().as_secs_f64();
    let ledger = std::mem::take(&mut *shared.lock_ledger());
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap_or_else(|p| p.into_inner()));
    let (violations, violations_found) =
        std::mem::take(&mut *shared.violations.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Load {
        ledger,
        samples,
        errors,
        hung_workers: hung,
        violations,
        violations_found,
        seconds,
        stopped_early,
        reads_ok: shared.reads_ok.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_md5_of_id_and_version() {
        // md5('1:1') as PostgreSQL computes it.
        // SELECT md5('1:1') in PostgreSQL.
        assert_eq!(payload(1, 1), "d0bd571dc19c083d82f023c9666c5574");
        assert_eq!(payload(42, 3).len(), 32);
        assert_ne!(payload(42, 3), payload(42, 4));
    }

    #[test]
    fn expected_versions() {
        let s = IdState {
            acked_updates: 2,
            unknown_updates: 1,
            max_acked: 3,
        };
        assert_eq!(s.expected(), (3, 4));
        let s = IdState {
            acked_updates: 2,
            unknown_updates: 1,
            max_acked: 4,
        };
        assert_eq!(s.expected(), (4, 4));
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=100).collect();
        let l = latency(&mut v, 0);
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (50, 99, 100));
        let mut one = vec![7];
        assert_eq!(latency(&mut one, 0).p99_us, 7);
    }
}
