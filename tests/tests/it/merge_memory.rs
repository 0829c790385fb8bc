//! The node's memory stays bounded while it streams big multi-shard
//! results: 4 shards × ~1M rows of `big(k int8 primary key, v text)`
//! sharded by `k`, read through the in-process node by
//! - `SELECT * FROM big ORDER BY k LIMIT 10` (k-way merge, limit pushed
//!   down),
//! - `SELECT * FROM big` (concatenation; extended protocol, `query_raw`),
//! - `SELECT * FROM big ORDER BY k` (streaming k-way merge of 4M rows;
//!   simple protocol, `simple_query_raw`),
//!
//! the last two by a slow client (it sleeps 10 ms every 20,000 rows). The
//! whole test process's RSS (`/proc/self/statm`: the node, the client and
//! the runtime) is sampled every 50 ms by a thread during each query; peak
//! minus the value just before the query must stay under 64 MiB.
//!
//! The test would fail if the node buffered one shard's result: a shard
//! holds ~1M rows of ~118 bytes each as DataRow frames (8-byte text key,
//! 96-byte value), ~118 MB on the wire, more in memory — checked below
//! before any query runs, and the sampler is calibrated by holding that many
//! bytes in the test process (it must see them). `HOTREPART_BIG_ROWS` (rows per shard, default
//! 1,000,000, at least 250,000) scales the table down; the value is widened
//! so that a shard stays above 80 MB.
#![allow(clippy::unwrap_used)]

use futures_util::{pin_mut, StreamExt};
use hotrepart_tests::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::SimpleQueryMessage;

const SHARDS: usize = 4;
const LIMIT_BYTES: u64 = 64 << 20;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // The page size is 4 KiB on the Linux targets this runs on; statm has no
    // unit, and reading sysconf would need libc (unsafe is denied here).
    pages * page_size()
}

fn page_size() -> u64 {
    // /proc/self/smaps "KernelPageSize" of the first mapping.
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("KernelPageSize:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4096)
}

/// Samples RSS every 50 ms on its own thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    baseline: u64,
}

impl Sampler {
    fn start() -> Sampler {
        let baseline = rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(baseline));
        let samples = Arc::new(AtomicU64::new(0));
        let (s, p, n) = (stop.clone(), peak.clone(), samples.clone());
        let page = page_size();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
                if let Some(pages) = statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u64>().ok())
                {
                    p.fetch_max(pages * page, Ordering::Relaxed);
                    n.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            stop,
            peak,
            samples,
            thread: Some(thread),
            baseline,
        }
    }

    /// (baseline, peak, samples)
    fn finish(mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The reading at the end counts as a sample too: a query faster than
        // the sampling interval may end before the thread's first reading.
        let peak = self.peak.load(Ordering::Relaxed).max(rss_bytes());
        (
            self.baseline,
            peak,
            self.samples.load(Ordering::Relaxed) + 1,
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Checks and prints one measurement.
fn report(what: &str, (base, peak, samples): (u64, u64, u64), elapsed: Duration) -> String {
    let growth = peak.saturating_sub(base);
    let line = format!(
        "{what}: {:.1} s, RSS before {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB ({samples} samples)",
        elapsed.as_secs_f64(),
        mib(base),
        mib(peak),
        mib(growth)
    );
    eprintln!("merge_memory: {line}");
    assert!(samples >= 1, "{what}: no RSS sample taken");
    assert!(
        growth < LIMIT_BYTES,
        "{line}: the node's memory grew by more than 64 MiB"
    );
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_results_stream_in_bounded_memory() {
    let t0 = Instant::now();
    let per_shard: i64 = std::env::var("HOTREPART_BIG_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
        .max(250_000);
    let total = per_shard * SHARDS as i64;
    // 32 hex chars per md5; keep a shard's wire size above 80 MB.
    let reps = (80_000_000 / (per_shard * 32) + 1).max(3);
    let v_len = 32 * reps as usize;
    let c = Cluster::start(Opts {
        shards: SHARDS,
        extra: "pool_size = 4".into(),
        tail: "[[sharded_tables]]\nname = \"big\"\nkey = \"k\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    // Load each shard directly with the rows it owns (PostgreSQL computes
    // the hash; the predicate comes from the node's routing table).
    let snap = c.node.routing.catalog.load_full();
    let mut loads = Vec::new();
    for i in 0..SHARDS {
        let name = format!("s{i}");
        let parts: Vec<String> = snap
            .ranges()
            .iter()
            .filter(|r| r.write_owner.as_str() == name)
            .map(|r| format!("({})", r.sql_predicate("hashint8extended(k, 0)")))
            .collect();
        assert!(!parts.is_empty(), "shard {name} owns no range");
        let owned = parts.join(" OR ");
        let db = c.direct(i).await;
        loads.push(async move {
            db.batch_execute(&format!(
                "CREATE UNLOGGED TABLE big (k int8, v text);
                 INSERT INTO big SELECT k, repeat(md5(k::text), {reps}) FROM generate_series(1, {total}) k WHERE {owned};
                 ALTER TABLE big ADD PRIMARY KEY (k);
                 ANALYZE big;"
            ))
            .await
            .unwrap();
            let r = db
                .query_one("SELECT count(*) FROM big", &[])
                .await
                .unwrap();
            r.get::<_, i64>(0)
        });
    }
    let counts = futures_util::future::join_all(loads).await;
    eprintln!(
        "merge_memory: loaded {total} rows ({counts:?} per shard, v {v_len} chars) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(counts.iter().sum::<i64>(), total);
    // A DataRow of this table: tag, length, column count, two lengths, the
    // key's text, the value.
    let row_bytes = |k: i64| 1 + 4 + 2 + 4 + k.to_string().len() as u64 + 4 + v_len as u64;
    let smallest = *counts.iter().min().unwrap() as u64;
    let shard_bytes = smallest * row_bytes(total / 2);
    eprintln!(
        "merge_memory: the smallest shard's answer is ~{:.0} MiB on the wire (limit {} MiB)",
        mib(shard_bytes),
        LIMIT_BYTES >> 20
    );
    assert!(
        shard_bytes > LIMIT_BYTES + (16 << 20),
        "one shard's answer ({shard_bytes} bytes) must exceed the limit, or buffering it would go unnoticed"
    );

    // The measurement itself: holding one shard's answer in this process
    // (what a buffering node would do) shows as growth beyond the limit.
    let s = Sampler::start();
    let held: Vec<u8> = vec![1; shard_bytes as usize];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (base, peak, _) = s.finish();
    assert_eq!(held.iter().map(|&b| b as u64).sum::<u64>(), shard_bytes);
    drop(held);
    eprintln!(
        "merge_memory: calibration: holding {:.0} MiB in this process shows as {:.1} MiB of RSS growth",
        mib(shard_bytes),
        mib(peak.saturating_sub(base))
    );
    assert!(
        peak.saturating_sub(base) >= LIMIT_BYTES,
        "RSS sampling does not see a shard-sized buffer"
    );

    let node = c.connect().await;
    let shard0 = c.direct(0).await;
    // Warm up the pools and the plan cache outside the measurements.
    node.simple_query("SELECT count(*) FROM big").await.unwrap();
    node.query("SELECT k FROM big WHERE k = 1", &[])
        .await
        .unwrap();

    // 1. ORDER BY … LIMIT 10
    let s = Sampler::start();
    let t = Instant::now();
    let got: Vec<(String, String)> = node
        .simple_query("SELECT * FROM big ORDER BY k LIMIT 10")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
            }
            _ => None,
        })
        .collect();
    let m1 = report("ORDER BY k LIMIT 10", s.finish(), t.elapsed());
    let want: Vec<(String, String)> = shard0
        .simple_query(&format!(
            "SELECT k, repeat(md5(k::text), {reps}) FROM generate_series(1, 10) k"
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(got, want);

    // 2. SELECT * by a slow client (extended protocol: concatenation).
    let s = Sampler::start();
    let t = Instant::now();
    let stream = node
        .query_raw("SELECT * FROM big", std::iter::empty::<i64>())
        .await
        .unwrap();
    pin_mut!(stream);
    let (mut n, mut sum) = (0i64, 0i128);
    while let Some(row) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("no row from the node for 60 s")
    {
        let row = row.unwrap();
        sum += row.get::<_, i64>(0) as i128;
        let v: &str = row.get(1);
        assert_eq!(v.len(), v_len);
        n += 1;
        if n % 20_000 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let m2 = report("SELECT * (slow client)", s.finish(), t.elapsed());
    assert_eq!(n, total, "rows read");
    assert_eq!(
        sum,
        (total as i128) * (total as i128 + 1) / 2,
        "sum of keys"
    );

    // 3. SELECT * ORDER BY k by a slow client (simple protocol: k-way merge).
    let s = Sampler::start();
    let t = Instant::now();
    let stream = node
        .simple_query_raw("SELECT * FROM big ORDER BY k")
        .await
        .unwrap();
    pin_mut!(stream);
    let mut next = 1i64;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("no row from the node for 60 s")
    {
        if let SimpleQueryMessage::Row(r) = m.unwrap() {
            let k: i64 = r.get(0).unwrap().parse().unwrap();
            assert_eq!(k, next, "rows out of order");
            assert_eq!(r.get(1).map(str::len), Some(v_len));
            next += 1;
            if next % 20_000 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let m3 = report("SELECT * ORDER BY k (slow client)", s.finish(), t.elapsed());
    assert_eq!(next - 1, total, "rows read");
    eprintln!(
        "merge_memory: {SHARDS} shards x ~{per_shard} rows; total {:.1} s\n  {m1}\n  {m2}\n  {m3}",
        t0.elapsed().as_secs_f64()
    );
}
