//! Per-database traffic counters for the admin console's `SHOW STATS`
//! (PgBouncer's columns) and `/metrics`: transactions, queries, bytes in
//! and out, time in transactions, in queries and waiting for a server.
//!
//! Cheap by construction: a session owns a [`Tracker`] (plain fields) and
//! adds to its database's [`DbStats`] with relaxed atomic adds — a few per
//! request/response round trip, no lock. The table of databases is locked
//! only when a session starts or a pool is made. A leaf: imports nothing
//! of the crate.
//!
//! What counts (as PgBouncer, in its terms): a *query* is one client
//! request answered by one ReadyForQuery (a simple Query, or an
//! extended-protocol batch up to its Sync); its time runs from the
//! request's arrival to that ReadyForQuery (pipelined requests: from the
//! previous answer). A *transaction* ends at a ReadyForQuery with status
//! idle (an autocommit statement is one); its time runs from its first
//! request. *Wait* is the time a client waited for a pooled server
//! connection (only when none was free at once).
//!
//! Node-wide, [`Requests`] keeps a latency histogram per route (the shard
//! of a one-shard request; all shards; a merge; answered by the node) and
//! the errors sent to clients by SQLSTATE class, also with atomic adds
//! only: each session notes the route of its current request
//! ([`Tracker::note_route`]) and the answer closes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Totals of one database since the node started.
#[derive(Debug, Default)]
pub struct DbStats {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    /// Bytes received from clients.
    pub received: AtomicU64,
    /// Bytes sent to clients.
    pub sent: AtomicU64,
    /// Microseconds.
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
}

/// A copy of [`DbStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
}

/// PgBouncer's `avg_*` columns over the last stats period: counts and
/// bytes per second, times in microseconds per transaction or query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

impl DbStats {
    pub fn totals(&self) -> Totals {
        Totals {
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            received: self.received.load(Relaxed),
            sent: self.sent.load(Relaxed),
            xact_time_us: self.xact_time_us.load(Relaxed),
            query_time_us: self.query_time_us.load(Relaxed),
            wait_time_us: self.wait_time_us.load(Relaxed),
        }
    }

    /// A client waited `d` for a server connection.
    pub fn add_wait(&self, d: Duration) {
        self.wait_time_us.fetch_add(micros(d), Relaxed);
    }
}

impl Averages {
    /// Between `old` and `new`, `secs` apart (PgBouncer's `stats_period`
    /// arithmetic; the wait is averaged per transaction, which in
    /// transaction pooling is one server assignment).
    pub fn between(old: &Totals, new: &Totals, period: Duration) -> Averages {
        let us = micros(period).max(1);
        let rate = |a: u64, b: u64| b.saturating_sub(a).saturating_mul(1_000_000) / us;
        let per = |ta: u64, tb: u64, na: u64, nb: u64| {
            tb.saturating_sub(ta)
                .checked_div(nb.saturating_sub(na))
                .unwrap_or(0)
        };
        Averages {
            xact_count: rate(old.xact_count, new.xact_count),
            query_count: rate(old.query_count, new.query_count),
            recv: rate(old.received, new.received),
            sent: rate(old.sent, new.sent),
            xact_time: per(
                old.xact_time_us,
                new.xact_time_us,
                old.xact_count,
                new.xact_count,
            ),
            query_time: per(
                old.query_time_us,
                new.query_time_us,
                old.query_count,
                new.query_count,
            ),
            wait_time: per(
                old.wait_time_us,
                new.wait_time_us,
                old.xact_count,
                new.xact_count,
            ),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Most databases tracked; beyond it, new ones share one entry (named
/// [`OTHER`]) so that a client trying many database names cannot grow
/// the table without bound.
const MAX_DATABASES: usize = 1_000;

/// The entry databases beyond [`MAX_DATABASES`] share.
pub const OTHER: &str = "(other)";

/// How often [`Stats::roll`] should run: PgBouncer's default
/// `stats_period` is 60 s; a shorter one shows load sooner.
pub const PERIOD: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
struct Entry {
    stats: Arc<DbStats>,
    /// Totals at the last roll, and when.
    last: Option<(Instant, Totals)>,
    avg: Averages,
}

/// The node's per-database counters.
#[derive(Debug, Default)]
pub struct Stats {
    dbs: Mutex<HashMap<String, Entry>>,
    /// Latency by route and errors by class, node-wide.
    pub requests: Arc<Requests>,
    /// How long the cut-overs of the reshard jobs this node ran paused
    /// writes to their range (freeze to flip), successful ones only.
    pub freezes: Histogram,
}

impl Stats {
    /// The counters of `database` (made on first use).
    pub fn db(&self, database: &str) -> Arc<DbStats> {
        let mut m = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get(database) {
            return e.stats.clone();
        }
        let key = if m.len() >= MAX_DATABASES {
            OTHER
        } else {
            database
        };
        m.entry(key.to_string()).or_default().stats.clone()
    }

    /// Closes a stats period: each database's averages become those
    /// since the previous roll.
    pub fn roll(&self) {
        let now = Instant::now();
        let mut m = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        for e in m.values_mut() {
            let t = e.stats.totals();
            if let Some((at, old)) = e.last {
                e.avg = Averages::between(&old, &t, now.duration_since(at));
            }
            e.last = Some((now, t));
        }
    }

    /// Every database's totals and last averages, by name.
    pub fn list(&self) -> Vec<(String, Totals, Averages)> {
        let m = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m
            .iter()
            .map(|(k, e)| (k.clone(), e.stats.totals(), e.avg))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Where a client request went, as the latency histograms label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// One shard (its index), or one shard each for statements of the same
    /// request that went to different shards (None).
    One(Option<usize>),
    /// Several shards, answers passed through (DDL, writes, keyless
    /// statements without a merge).
    All,
    /// Several shards, answers merged by the node.
    Merge,
    /// Answered by the node alone (a refusal, a local SET, an empty query).
    Node,
}

impl Route {
    /// One request's route when it held several statements: a merge wins,
    /// then all shards, then one shard (the same one, or several).
    fn join(self, other: Route) -> Route {
        use Route::*;
        match (self, other) {
            (Node, r) | (r, Node) => r,
            (Merge, _) | (_, Merge) => Merge,
            (All, _) | (_, All) => All,
            (One(a), One(b)) if a == b => One(a),
            (One(_), One(_)) => One(None),
        }
    }

    /// The `route` label.
    pub fn kind(self) -> &'static str {
        match self {
            Route::One(_) => "one",
            Route::All => "all",
            Route::Merge => "merge",
            Route::Node => "node",
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds (100 µs to 10 s;
/// above: the +Inf bucket).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram: counts per bucket (not cumulative; the last is
/// +Inf) and the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = micros(d);
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// (count per bucket, +Inf last; sum in microseconds).
    pub fn read(&self) -> (Vec<u64>, u64) {
        (
            self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            self.sum_us.load(Relaxed),
        )
    }
}

/// SQLSTATE classes are two characters of [0-9A-Z]: one counter each.
const CLASSES: usize = 36 * 36;

fn class_index(code: &[u8]) -> Option<usize> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(usize::from(c - b'0')),
        b'A'..=b'Z' => Some(usize::from(c - b'A') + 10),
        _ => None,
    };
    Some(digit(*code.first()?)? * 36 + digit(*code.get(1)?)?)
}

fn class_name(i: usize) -> String {
    let c = |d: usize| {
        char::from_digit(d as u32, 36)
            .unwrap_or('?')
            .to_ascii_uppercase()
    };
    [c(i / 36), c(i % 36)].iter().collect()
}

/// Node-wide request latency by route, and client errors by class.
#[derive(Debug)]
pub struct Requests {
    hists: Mutex<HashMap<Route, Arc<Histogram>>>,
    errors: Box<[AtomicU64]>,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            hists: Mutex::default(),
            errors: (0..CLASSES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Requests {
    /// The histogram of `route` (made on first use; sessions keep it).
    pub fn hist(&self, route: Route) -> Arc<Histogram> {
        self.hists
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route)
            .or_default()
            .clone()
    }

    /// Every route's histogram.
    pub fn hists(&self) -> Vec<(Route, Arc<Histogram>)> {
        let m = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(r, h)| (*r, h.clone())).collect()
    }

    /// Errors sent to clients by SQLSTATE class (e.g. "42"), classes
    /// seen only.
    pub fn errors(&self) -> Vec<(String, u64)> {
        self.errors
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Relaxed);
                (n > 0).then(|| (class_name(i), n))
            })
            .collect()
    }

    fn error(&self, code: &[u8]) {
        if let Some(i) = class_index(code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }
}

/// The SQLSTATE of an ErrorResponse body (its `C` field).
fn error_code(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if field == b'C' {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

/// A session's side of the counting: when its requests and transaction
/// began. Plain fields (the session owns it); only the adds to
/// [`DbStats`] are shared.
#[derive(Debug)]
pub struct Tracker {
    db: Arc<DbStats>,
    /// Bytes received and not yet added to `db` (added at the next
    /// write to the client: one shared add per round trip, not per frame).
    received: u64,
    /// Requests received and not yet answered by a ReadyForQuery.
    pending: u64,
    /// Since when the oldest pending request has been served.
    query_start: Option<Instant>,
    /// Since when the current transaction has run.
    xact_start: Option<Instant>,
    requests: Arc<Requests>,
    /// The route of each pending request, oldest first (None: not routed
    /// yet, or answered by the node).
    routes: std::collections::VecDeque<Option<Route>>,
    /// A route noted before its request arrived (a batch run on Flush,
    /// before its Sync).
    early: Option<Route>,
    /// Histograms this session used (a handful: no lock after the first).
    hists: Vec<(Route, Arc<Histogram>)>,
}

/// The ReadyForQuery tag ('Z').
const READY_FOR_QUERY: u8 = b'Z';
/// The ErrorResponse tag ('E').
const ERROR_RESPONSE: u8 = b'E';

impl Tracker {
    pub fn new(db: Arc<DbStats>, requests: Arc<Requests>) -> Tracker {
        Tracker {
            db,
            received: 0,
            pending: 0,
            query_start: None,
            xact_start: None,
            requests,
            routes: std::collections::VecDeque::new(),
            early: None,
            hists: Vec::new(),
        }
    }

    /// The request being served (the last one received) goes to `route`
    /// (joined with what it already went to: a batch of several
    /// statements).
    #[inline]
    pub fn note_route(&mut self, route: Route) {
        let slot = match self.routes.back_mut() {
            Some(r) => r,
            None => &mut self.early,
        };
        *slot = Some(slot.map_or(route, |r| r.join(route)));
    }

    /// A client message of `len` bytes arrived; `request`: one that a
    /// ReadyForQuery answers (Query, Sync, FunctionCall).
    #[inline]
    pub fn received(&mut self, len: usize, request: bool) {
        self.received += len as u64;
        if request {
            if self.pending == 0 {
                let now = Instant::now();
                self.query_start = Some(now);
                self.xact_start.get_or_insert(now);
            }
            self.pending += 1;
            self.routes.push_back(self.early.take());
        }
    }

    /// `out` (whole protocol messages) is about to go to the client:
    /// counts its bytes and, while requests are pending, the
    /// ReadyForQuery messages in it (frame headers only are read).
    #[inline]
    pub fn sending(&mut self, out: &[u8]) {
        self.publish_received();
        self.db.sent.fetch_add(out.len() as u64, Relaxed);
        if self.pending == 0 {
            return;
        }
        let mut i = 0usize;
        let mut now = None;
        while let Some(h) = out.get(i..i + 5) {
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
            if h[0] == READY_FOR_QUERY && len == 5 {
                let status = out.get(i + 5).copied().unwrap_or(b'I');
                self.answered(status, *now.get_or_insert_with(Instant::now));
            } else if h[0] == ERROR_RESPONSE {
                let body = out.get(i + 5..i.saturating_add(1 + len)).unwrap_or(&[]);
                if let Some(code) = error_code(body) {
                    self.requests.error(code);
                }
            }
            i = i.saturating_add(1 + len.max(4));
        }
    }

    fn publish_received(&mut self) {
        if self.received > 0 {
            self.db
                .received
                .fetch_add(std::mem::take(&mut self.received), Relaxed);
        }
    }

    /// Nothing is owed to the client any more: no request is pending
    /// (a request PostgreSQL never answers, a Sync sent in COPY mode, would
    /// else leave one pending and count idle time as query time).
    #[inline]
    pub fn settled(&mut self) {
        if self.pending > 0 {
            self.pending = 0;
            self.query_start = None;
            self.routes.clear();
        }
    }

    fn observe(&mut self, route: Route, d: Duration) {
        let h = match self.hists.iter().find(|(r, _)| *r == route) {
            Some((_, h)) => h,
            None => {
                self.hists.push((route, self.requests.hist(route)));
                match self.hists.last() {
                    Some((_, h)) => h,
                    None => return,
                }
            }
        };
        h.observe(d);
    }

    fn answered(&mut self, status: u8, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        self.db.query_count.fetch_add(1, Relaxed);
        let route = self.routes.pop_front().flatten().unwrap_or(Route::Node);
        if let Some(s) = self.query_start {
            let d = now.duration_since(s);
            self.db.query_time_us.fetch_add(micros(d), Relaxed);
            self.observe(route, d);
        }
        self.query_start = (self.pending > 0).then_some(now);
        if status == b'I' {
            self.db.xact_count.fetch_add(1, Relaxed);
            if let Some(s) = self.xact_start.take() {
                self.db
                    .xact_time_us
                    .fetch_add(micros(now.duration_since(s)), Relaxed);
            }
            if self.pending > 0 {
                self.xact_start = Some(now);
            }
        }
    }
}

impl Drop for Tracker {
    /// A session that ends between its last message and any answer still
    /// counts those bytes.
    fn drop(&mut self) {
        self.publish_received();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfq(status: u8) -> [u8; 6] {
        [b'Z', 0, 0, 0, 5, status]
    }

    #[test]
    fn counts_requests_answers_and_transactions() {
        let db = Arc::new(DbStats::default());
        let mut t = Tracker::new(db.clone(), Arc::default());
        // BEGIN; SELECT; COMMIT as three simple queries.
        t.received(11, true);
        t.sending(&rfq(b'T'));
        t.received(14, true);
        let mut out = vec![b'C', 0, 0, 0, 13];
        out.extend_from_slice(b"SELECT 1\0");
        out.extend_from_slice(&rfq(b'T'));
        t.sending(&out);
        t.received(12, true);
        t.sending(&rfq(b'I'));
        // Two pipelined autocommit requests answered in one write.
        t.received(20, true);
        t.received(20, true);
        let mut two = rfq(b'I').to_vec();
        two.extend_from_slice(&rfq(b'I'));
        t.sending(&two);
        // A notification while idle is bytes only.
        t.sending(&[b'A', 0, 0, 0, 4]);
        drop(t);
        let s = db.totals();
        assert_eq!(s.query_count, 5);
        assert_eq!(s.xact_count, 3);
        assert_eq!(s.received, 11 + 14 + 12 + 40);
        assert_eq!(s.sent, 6 + out.len() as u64 + 6 + 12 + 5);
    }

    #[test]
    fn a_truncated_buffer_is_not_misread() {
        let db = Arc::new(DbStats::default());
        let mut t = Tracker::new(db.clone(), Arc::default());
        t.received(5, true);
        t.sending(&[b'D', 0xff, 0xff, 0xff, 0xff, b'Z', 0, 0, 0, 5, b'I']);
        t.sending(&[b'Z', 0, 0]);
        assert_eq!(db.totals().query_count, 0);
    }

    #[test]
    fn averages_are_rates_and_means() {
        let old = Totals::default();
        let new = Totals {
            xact_count: 20,
            query_count: 40,
            received: 1000,
            sent: 3000,
            xact_time_us: 2000,
            query_time_us: 2000,
            wait_time_us: 200,
        };
        let a = Averages::between(&old, &new, Duration::from_secs(10));
        assert_eq!(
            a,
            Averages {
                xact_count: 2,
                query_count: 4,
                recv: 100,
                sent: 300,
                xact_time: 100,
                query_time: 50,
                wait_time: 10,
            }
        );
    }

    fn error(code: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend_from_slice(b"ERROR\0C");
        body.extend_from_slice(code.as_bytes());
        body.extend_from_slice(b"\0Mboom\0\0");
        let mut f = vec![b'E'];
        f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn requests_are_timed_by_their_route_and_errors_counted_by_class() {
        let db = Arc::new(DbStats::default());
        let req = Arc::new(Requests::default());
        let mut t = Tracker::new(db, req.clone());
        // Two pipelined requests: one shard, then a merge; answered in one
        // write, the second with an error.
        t.received(10, true);
        t.note_route(Route::One(Some(1)));
        t.received(10, true);
        t.note_route(Route::One(Some(0)));
        t.note_route(Route::Merge);
        let mut out = rfq(b'I').to_vec();
        out.extend_from_slice(&error("22012"));
        out.extend_from_slice(&rfq(b'I'));
        t.sending(&out);
        // A batch run on Flush before its Sync arrives: the route waits for
        // the request; statements on two shards make One(None).
        t.note_route(Route::One(Some(0)));
        t.received(10, true);
        t.note_route(Route::One(Some(1)));
        t.sending(&rfq(b'I'));
        // Not routed: answered by the node; a settled session forgets.
        t.received(10, true);
        t.sending(&error("0A000"));
        t.sending(&rfq(b'I'));
        t.received(10, true);
        t.note_route(Route::All);
        t.settled();
        let counts: HashMap<Route, u64> = req
            .hists()
            .into_iter()
            .map(|(r, h)| (r, h.read().0.iter().sum()))
            .collect();
        let want: HashMap<Route, u64> = [
            (Route::One(Some(1)), 1),
            (Route::Merge, 1),
            (Route::One(None), 1),
            (Route::Node, 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(counts, want);
        assert_eq!(
            req.errors(),
            vec![("0A".to_string(), 1), ("22".to_string(), 1)]
        );
    }

    #[test]
    fn routes_join_as_the_strongest() {
        use Route::*;
        assert_eq!(Node.join(One(Some(2))), One(Some(2)));
        assert_eq!(One(Some(2)).join(One(Some(2))), One(Some(2)));
        assert_eq!(One(Some(2)).join(One(Some(3))), One(None));
        assert_eq!(One(Some(2)).join(All), All);
        assert_eq!(All.join(Merge), Merge);
        assert_eq!(Merge.join(Node), Merge);
    }

    #[test]
    fn latency_lands_in_its_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(11));
        let (b, sum) = h.read();
        assert_eq!((b[0], b[1], b[LATENCY_BOUNDS_US.len()]), (1, 1, 1));
        assert_eq!(b.iter().sum::<u64>(), 3);
        assert_eq!(sum, 11_000_201);
        assert_eq!(class_index(b"0A").map(class_name).as_deref(), Some("0A"));
        assert_eq!(class_index(b"zz"), None);
    }

    #[test]
    fn the_table_of_databases_is_bounded() {
        let s = Stats::default();
        for i in 0..MAX_DATABASES + 10 {
            s.db(&format!("d{i}"));
        }
        let l = s.list();
        assert_eq!(l.len(), MAX_DATABASES + 1);
        assert!(l.iter().any(|(n, ..)| n == OTHER));
    }
}
