//! Soak (issue 17; ignored in normal runs, `bench/soak.sh` runs it): an
//! hour of `proxyctl loadtest` at 100 clients through three node
//! processes over two shards, with a live reshard every five minutes and a
//! node restart every ten (SIGTERM and kill -9 in turn). Every ten seconds
//! it samples each node's RSS, open file descriptors and threads, and each
//! shard's client backends. It passes when the verifying load generator
//! reports OK (nothing acknowledged lost, duplicated or stranded), every
//! reshard job finished, every restarted node came back, and RSS, file
//! descriptors and backends stay flat: the last quarter of the run may not
//! exceed the first quarter's peak by more than a fixed margin.
//!
//! Knobs (environment): `SOAK_SECS` (3600), `SOAK_CLIENTS` (100),
//! `SOAK_PAUSE_MS` (think time per operation, 50: about
//! 2,000 operations a second at most), `SOAK_RESHARD_SECS`
//! (300), `SOAK_RESTART_SECS` (600). Prints one `SOAK {json}` line and a
//! `SOAK-MD` markdown report (bench/soak.sh files both in bench/out/).
#![allow(clippy::unwrap_used)]

use hotrepart_tests::procs::ProcCluster;
use hotrepart_tests::*;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmRSS` (KiB), open file descriptors and threads of a process.
fn proc_stats(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, fds, field("Threads:")?))
}

/// One sample: seconds since the load started, per node `(rss KiB, fds,
/// threads)` (None while down), per shard client backends.
#[derive(Clone, Debug)]
struct Sample {
    t: u64,
    nodes: Vec<Option<(u64, u64, u64)>>,
    backends: Vec<i64>,
}

#[derive(Clone, Debug)]
struct Event {
    t: u64,
    what: String,
    seconds: f64,
}

/// Client backends on a shard, other than the asking one.
async fn backends(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(-1)
}

/// Moves the range starting at 0 to the shard that does not own it, via
/// node `via`; returns (what, seconds) once the job is done.
async fn reshard(c: &ProcCluster, via: usize) -> (String, f64) {
    let started = Instant::now();
    let ranges = c.ranges(via).await;
    let owner = ranges
        .iter()
        .find(|r| r.0 == 0)
        .map(|r| r.2.clone())
        .unwrap();
    let to = if owner == "s0" { "s1" } else { "s0" };
    let (ok, out, err) = c
        .proxyctl(via, &["--json", "reshard", "move", "0", "--to", to])
        .await;
    assert!(ok, "reshard move 0 --to {to} via node {}: {err}", via + 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["job"].as_str().unwrap().to_string();
    loop {
        if let Some(j) = c.admin_get(via, &format!("/v1/jobs/{id}")).await {
            let phase = j["phase"].as_str().unwrap_or_default();
            if ["done", "aborted", "failed"].contains(&phase) {
                assert_eq!(
                    phase, "done",
                    "job {id} (range 0 {owner} → {to}) ended otherwise: {j}"
                );
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "job {id} (range 0 {owner} → {to}) not done after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (
        format!(
            "reshard range 0 {owner} → {to} (job {id}, via node {})",
            via + 1
        ),
        started.elapsed().as_secs_f64(),
    )
}

/// Peak of `f` over the samples in `[from, to)` seconds, over every node
/// or shard.
fn peak(samples: &[Sample], from: u64, to: u64, f: impl Fn(&Sample) -> Vec<u64>) -> u64 {
    samples
        .iter()
        .filter(|s| s.t >= from && s.t < to)
        .flat_map(f)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: an hour; run by bench/soak.sh"]
async fn an_hour_at_100_clients_with_reshards_and_node_restarts() {
    let secs = env_u64("SOAK_SECS", 3600);
    let clients = env_u64("SOAK_CLIENTS", 100) as usize;
    let pause_ms = env_u64("SOAK_PAUSE_MS", 50);
    let reshard_every = env_u64("SOAK_RESHARD_SECS", 300);
    let restart_every = env_u64("SOAK_RESTART_SECS", 600);
    let mut c = ProcCluster::start(3, 2, "", "lease_ms = 1000").await;
    c.wait_ready(Duration::from_secs(60)).await;
    let (writers, updaters) = (clients / 2, clients / 4);
    let readers = clients - writers - updaters;
    let mut args: Vec<String> = vec!["--json".into(), "loadtest".into()];
    for n in &c.nodes {
        args.extend(["--node".into(), n.dsn()]);
    }
    for (i, s) in c.shards.iter().enumerate() {
        args.extend(["--shard".into(), format!("s{i}={}", s.dsn())]);
    }
    args.extend([
        "--setup".into(),
        "--quiet".into(),
        "--duration".into(),
        format!("{secs}s"),
        "--writers".into(),
        writers.to_string(),
        "--updaters".into(),
        updaters.to_string(),
        "--readers".into(),
        readers.to_string(),
        "--pause".into(),
        format!("{pause_ms}ms"),
    ]);
    let log = c.dir.0.join("loadtest.log");
    // The loadtest's admin API is node 1's: it is read at the setup and
    // at the final check, and node 1 is never restarted in the last
    // restart period.
    let mut child = c.spawn_proxyctl(0, &args, &log);
    let mut stdout = child.stdout.take().unwrap();
    let out_task = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        stdout.read_to_string(&mut s).await.unwrap();
        s
    });
    let mut monitors = Vec::new();
    for s in &c.shards {
        monitors.push(connect(&s.dsn()).await.unwrap());
    }
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let mut next_sample = 0u64;
    let mut next_reshard = reshard_every;
    // Restarts between reshards (half a reshard period after one), in
    // the order nodes 2, 3, 1, 2, …; kill -9 and SIGTERM in turn.
    let mut next_restart = restart_every.saturating_sub(reshard_every / 2).max(1);
    let (mut reshards, mut restarts) = (0usize, 0usize);
    // Events stop early enough for the last one to end before the load.
    let quiet_tail = (reshard_every / 2).clamp(30, 240);
    loop {
        let t = start.elapsed().as_secs();
        if t >= secs {
            break;
        }
        if t >= next_sample {
            let nodes = c
                .nodes
                .iter()
                .map(|n| n.pid().and_then(proc_stats))
                .collect();
            let mut b = Vec::new();
            for m in &monitors {
                b.push(backends(m).await);
            }
            samples.push(Sample {
                t,
                nodes,
                backends: b,
            });
            next_sample = t + 10;
        }
        if t >= next_reshard && t + quiet_tail < secs {
            let via = reshards % 3;
            let (what, took) = reshard(&c, via).await;
            events.push(Event {
                t,
                what,
                seconds: took,
            });
            reshards += 1;
            next_reshard += reshard_every;
        } else if t >= next_restart && t + quiet_tail < secs {
            let i = (restarts + 1) % 3;
            let began = Instant::now();
            let how = if restarts % 2 == 0 {
                c.nodes[i].kill9();
                "kill -9"
            } else {
                let n = &mut c.nodes[i];
                let by_itself =
                    tokio::task::block_in_place(|| n.terminate(Duration::from_secs(30)));
                assert!(
                    by_itself,
                    "node {} did not stop within 30 s of SIGTERM",
                    i + 1
                );
                "SIGTERM"
            };
            let n = &mut c.nodes[i];
            tokio::task::block_in_place(|| n.start());
            c.wait_ready(Duration::from_secs(60)).await;
            events.push(Event {
                t,
                what: format!("restart node {} ({how})", i + 1),
                seconds: began.elapsed().as_secs_f64(),
            });
            restarts += 1;
            next_restart += restart_every;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The load ends on its own; the check reads every row through a node
    // and directly on the shards.
    let status = tokio::time::timeout(Duration::from_secs(1800), child.wait())
        .await
        .expect("the load generator's check did not finish within 30 min")
        .unwrap();
    let out = out_task.await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "loadtest printed no JSON report ({e}; exit {status}):\n{out}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    // One more sample after the load: backends go back to the pools.
    let after: Vec<i64> = {
        let mut b = Vec::new();
        for m in &monitors {
            b.push(backends(m).await);
        }
        b
    };
    let rss = |s: &Sample| s.nodes.iter().flatten().map(|x| x.0).collect::<Vec<_>>();
    let fds = |s: &Sample| s.nodes.iter().flatten().map(|x| x.1).collect::<Vec<_>>();
    let bks = |s: &Sample| {
        s.backends
            .iter()
            .map(|&b| b.max(0) as u64)
            .collect::<Vec<_>>()
    };
    let q = secs / 4;
    let first = (
        peak(&samples, 0, q, rss),
        peak(&samples, 0, q, fds),
        peak(&samples, 0, q, bks),
    );
    let last = (
        peak(&samples, secs - q, secs, rss),
        peak(&samples, secs - q, secs, fds),
        peak(&samples, secs - q, secs, bks),
    );
    let overall_backends = peak(&samples, 0, secs, bks);
    let counts = &report["counts"];
    let summary = serde_json::json!({
        "seconds": secs,
        "clients": clients,
        "pause_ms": pause_ms,
        "ok": report["ok"],
        "violations": report["violation_count"],
        "hung_workers": report["hung_workers"],
        "counts": counts,
        "errors": report["errors"],
        "latency": report["latency"],
        "checked": report["checked"],
        "events": events.iter().map(|e| serde_json::json!([e.t, e.what, e.seconds])).collect::<Vec<_>>(),
        "rss_kib_peak_first_quarter": first.0,
        "rss_kib_peak_last_quarter": last.0,
        "fds_peak_first_quarter": first.1,
        "fds_peak_last_quarter": last.1,
        "backends_peak_first_quarter": first.2,
        "backends_peak_last_quarter": last.2,
        "backends_peak": overall_backends,
        "backends_after_load": after,
        "samples": samples
            .iter()
            .map(|s| serde_json::json!([s.t, s.nodes, s.backends]))
            .collect::<Vec<_>>(),
    });
    println!("SOAK {summary}");
    // The human report: one row a minute (of the 10 s samples).
    let mut md = format!(
        "# Soak {secs} s, {clients} clients ({writers} writers, {updaters} updaters, \
         {readers} readers, pause {pause_ms} ms), 3 nodes, 2 shards\n\n\
         - loadtest: ok = {}, violations = {}, inserts acked {}, updates acked {}, reads ok {}, \
         client errors {} ({})\n\
         - peaks first/last quarter: RSS {} / {} MiB, fds {} / {}, shard backends {} / {}\n\
         - backends after the load: {after:?}\n\n\
         | t (s) | RSS MiB n1/n2/n3 | fds n1/n2/n3 | backends s0/s1 |\n|---|---|---|---|\n",
        report["ok"],
        report["violation_count"],
        counts["inserts_acked"],
        counts["updates_acked"],
        counts["reads_ok"],
        report["errors"]["total"],
        report["errors"]["by_code"],
        first.0 / 1024,
        last.0 / 1024,
        first.1,
        last.1,
        first.2,
        last.2,
    );
    // One row a minute (the first sample of each minute: a reshard's
    // wait delays sampling).
    let mut minute = None;
    for s in &samples {
        if minute == Some(s.t / 60) {
            continue;
        }
        minute = Some(s.t / 60);
        let col = |k: usize| {
            s.nodes
                .iter()
                .map(|n| n.map_or("-".into(), |x| [x.0 / 1024, x.1, x.2][k].to_string()))
                .collect::<Vec<_>>()
                .join("/")
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:?} |\n",
            s.t,
            col(0),
            col(1),
            s.backends,
        ));
    }
    md.push_str("\n| t (s) | event | took (s) |\n|---|---|---|\n");
    for e in &events {
        md.push_str(&format!("| {} | {} | {:.1} |\n", e.t, e.what, e.seconds));
    }
    for l in md.lines() {
        println!("SOAK-MD {l}");
    }

    assert_eq!(report["ok"], serde_json::json!(true), "{summary}");
    assert_eq!(report["hung_workers"], serde_json::json!([]), "{summary}");
    assert!(
        counts["inserts_acked"].as_u64().unwrap() > secs,
        "too little load: {summary}"
    );
    let want_reshards = (secs.saturating_sub(quiet_tail) / reshard_every) as usize;
    assert!(reshards >= want_reshards.min(1), "reshards {reshards}");
    // Flat: the last quarter's peak within the first quarter's plus a
    // margin (RSS: half again plus 64 MiB; fds: the same plus 32; shard
    // backends: never above the pools' bound).
    assert!(
        last.0 <= first.0 + first.0 / 2 + 64 * 1024,
        "RSS grew: {} → {} KiB",
        first.0,
        last.0
    );
    assert!(last.1 <= first.1 + 32, "fds grew: {} → {}", first.1, last.1);
    // 3 nodes × pool_size 8, plus the reshard jobs' own connections.
    assert!(
        overall_backends <= 3 * 8 + 12,
        "backends per shard peaked at {overall_backends}"
    );
}
