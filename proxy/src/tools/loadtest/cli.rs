//! `proxyctl loadtest`: arguments, the blocking entry point and the human
//! summary of a [`Report`].

use super::{run, Options, Report, Window};
use std::sync::Arc;
use std::time::Duration;

/// `proxyctl loadtest` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Client DSN of a hotrepart node (repeatable; workers are spread
    /// round-robin over the nodes).
    #[arg(long = "node", value_name = "DSN", required = true)]
    pub nodes: Vec<String>,
    /// NAME=DSN of a shard, for the final check directly on the shards
    /// (repeatable; every shard that owns a range is needed).
    #[arg(long = "shard", value_name = "NAME=DSN", value_parser = parse_shard)]
    pub shards: Vec<(String, String)>,
    /// Table to load (`id bigint PRIMARY KEY, version int, payload text`).
    #[arg(long, default_value = "hr_load")]
    pub table: String,
    /// Declare the table sharded (unless it is), create it, empty it.
    #[arg(long)]
    pub setup: bool,
    /// Length of the load: seconds, or with a unit (`90s`, `5m`).
    /// SIGINT (Ctrl-C) ends the load earlier; the check runs all the same.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    #[arg(long, default_value_t = 2)]
    pub updaters: usize,
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Bound of one operation; a write without an answer by then is
    /// counted as uncertain.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub op_timeout: Duration,
    /// Seed of the random ids.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Think time of each worker after each operation (`20ms`): many
    /// clients at an application's pace rather than flat out.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub pause: Duration,
    /// Print no progress line per second on stderr.
    #[arg(long, default_value_t = false, action = clap::ArgAction::SetTrue)]
    pub quiet: bool,
}

fn parse_shard(s: &str) -> Result<(String, String), String> {
    let (n, d) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=DSN"))?;
    if n.is_empty() || d.is_empty() {
        return Err(format!("{s:?}: expected NAME=DSN"));
    }
    Ok((n.to_owned(), d.to_owned()))
}

/// `30`, `30s`, `500ms`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 5m, 500ms"))?;
    Ok(Duration::from_millis(n.saturating_mul(mult_ms)))
}

impl Args {
    /// The options, with the admin API of `proxyctl`'s global flags.
    pub fn options(self, admin: &str, token: &str) -> Options {
        let mut o = Options::new(self.nodes, admin, token);
        o.shards = self.shards;
        o.table = self.table;
        o.setup = self.setup;
        o.duration = self.duration;
        o.writers = self.writers;
        o.updaters = self.updaters;
        o.readers = self.readers;
        o.op_timeout = self.op_timeout;
        o.seed = self.seed;
        o.pause = self.pause;
        if !self.quiet {
            o.progress = Some(Arc::new(|w: &Window| {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "loadtest: {:>4}s  {:>7} ops/s  {:>5} errors  max {:>9.1} ms",
                    w.second + 1,
                    w.ops,
                    w.errors,
                    f64::from(w.max_us) / 1000.0
                );
            }));
        }
        o
    }
}

/// `proxyctl loadtest`: runs the load test on its own runtime and writes
/// the report (JSON, or a summary) to `out`. Returns whether the check
/// passed.
pub fn cli(
    args: Args,
    admin: &str,
    token: &str,
    json: bool,
    out: &mut dyn std::io::Write,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let mut opts = args.options(admin, token);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // SIGINT ends the load early (the check still runs); a second one quits.
    // The handler is installed before the load starts.
    let stop = Arc::new(tokio::sync::Notify::new());
    opts.stop = Some(stop.clone());
    let mut sigint = {
        let _rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
    };
    rt.spawn(async move {
        if sigint.recv().await.is_some() {
            eprintln!(
                "loadtest: interrupted: the load stops and the check runs (interrupt again to quit)"
            );
            stop.notify_one();
            if sigint.recv().await.is_some() {
                std::process::exit(130);
            }
        }
    });
    let report = rt.block_on(run(&opts))?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "{}", summary(&report))?;
    }
    Ok(report.ok)
}

/// A human summary of a report.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "{} — table {}, {:.1} s{}, {} writers, {} updaters, {} readers\n",
        if r.ok { "OK" } else { "FAILED" },
        r.table,
        r.seconds,
        if r.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        r.writers,
        r.updaters,
        r.readers
    );
    let c = &r.counts;
    s.push_str(&format!(
        "acknowledged: {} inserts, {} updates, {} reads; uncertain: {} inserts, {} ids\n",
        c.inserts_acked, c.updates_acked, c.reads_ok, c.inserts_uncertain, c.ids_uncertain
    ));
    for (op, l) in &r.latency {
        s.push_str(&format!(
            "{op:>6}: {} ok, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            l.count,
            l.errors,
            f64::from(l.p50_us) / 1000.0,
            f64::from(l.p99_us) / 1000.0,
            f64::from(l.max_us) / 1000.0
        ));
    }
    s.push_str("second    ops  errors   p50 ms   p99 ms   max ms\n");
    for w in &r.windows {
        s.push_str(&format!(
            "{:>6} {:>6} {:>7} {:>8.2} {:>8.2} {:>8.2}\n",
            w.second,
            w.ops,
            w.errors,
            f64::from(w.p50_us) / 1000.0,
            f64::from(w.p99_us) / 1000.0,
            f64::from(w.max_us) / 1000.0
        ));
    }
    if r.errors.total > 0 {
        s.push_str(&format!("client errors: {}\n", r.errors.total));
        for (k, n) in &r.errors.by_code {
            s.push_str(&format!("  {k}: {n}\n"));
        }
        for m in &r.errors.first {
            s.push_str(&format!("  e.g. {m}\n"));
        }
    }
    for h in &r.hung_workers {
        s.push_str(&format!("hung worker: {h}\n"));
    }
    let k = &r.checked;
    s.push_str(&format!(
        "checked at epoch {}: {} rows via node (count {}), {} point reads, per shard {:?}\n",
        k.epoch, k.rows_via_node, k.count_via_node, k.point_reads, k.rows_per_shard
    ));
    if let Some(e) = &r.check_error {
        s.push_str(&format!("the check could not finish: {e}\n"));
    }
    if r.violation_count > 0 {
        s.push_str(&format!("{} violation(s):\n", r.violation_count));
        for v in r.violations.iter().take(50) {
            s.push_str(&format!(
                "  {}\n",
                serde_json::to_string(v).unwrap_or_default()
            ));
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("x").is_err());
    }
}
