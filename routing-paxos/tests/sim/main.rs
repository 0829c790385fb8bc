//! Deterministic simulation of the replicated catalog.
//!
//! 3–5 [`Replica`]s over a simulated network, in virtual time (ticks), all
//! randomness from one seed. The network (default: [`NetMode::Fifo`], the
//! model of one TCP connection per pair of nodes) delays every message by a
//! random number of ticks, with occasional long spikes, so messages on
//! different links arrive in any order; it breaks links for a while (all
//! messages in flight on them are lost; both ends are told when the link is
//! back), partitions the cluster into two groups (or cuts one node off) and
//! heals it. Replicas crash (everything in flight to them is lost) and
//! restart with their storage: the same [`SharedStorage`], i.e. "with their
//! disk" (omnipaxos recovers its promise and log from it, the catalog is
//! rebuilt by replaying the decided log). Random replicas propose random
//! catalog commands, valid and invalid, against their own (possibly stale)
//! view of the catalog; at the start every node proposes a bootstrap seed.
//! Then all faults end (links and partitions heal, crashed nodes restart,
//! no more delay spikes; ordinary delays stay) and the cluster must make
//! progress.
//!
//! Checks, at every step:
//! * every replica applies the same entry, with the same outcome, at each
//!   log index (also after a restart, when it replays its log);
//! * replicas at the same applied index hold equal state;
//! * within one replica life, every accepted routing change has epoch + 1
//!   and nothing else changes the epoch; a restarted replica gets back at
//!   least the decided prefix it had before the crash;
//! * every proposal (ticket) is answered at most once, with the command that
//!   was proposed; exactly one of the competing bootstrap seeds wins;
//! * after healing, a new proposal is decided, and all replicas catch up,
//!   within `HEAL_BOUND` ticks; every proposal of a live replica is answered.
//! * leases ([`Leases`], driven with virtual time: a tick is 10 ms, every
//!   node's clock runs at its own rate within ±1 %): no node holds a valid
//!   lease while it has not applied an entry that was decided more than
//!   lease + margin ago (decided: first seen decided by any replica); after
//!   healing, every node gets a lease within a few lease periods. Lease
//!   traffic has its own random stream and its own FIFO per link (the rule
//!   needs no ordering against omnipaxos messages), so adding it changed no
//!   seed's omnipaxos run.
//!
//! Environment:
//! * `HOTREPART_SIM_SEED=N` runs seed N only (replay a failure);
//! * `HOTREPART_SIM_SECS=S` wall-clock budget for random seeds after the
//!   fixed ones (default 20);
//! * `HOTREPART_SIM_SEEDS=K` at most K seeds in all;
//! * `HOTREPART_SIM_NET=fifo|oneway` runs every seed with that network
//!   (default: the fixed seeds with Fifo, then random seeds alternating
//!   Fifo and OneWay);
//! * `HOTREPART_SIM_NET=chaos` runs every seed with the Chaos network
//!   (messages reordered on one link, lost one by one). omnipaxos 0.2.4 does
//!   not tolerate that (a debug assertion in omnipaxos fires; with
//!   `--config 'profile.dev.package.omnipaxos.debug-assertions=false'` the
//!   logs can diverge and followers can get stuck), so it is an exploration
//!   mode, not part of the test: the default is Fifo, the model of the TCP
//!   transport;
//! * `HOTREPART_SIM_COMPACT=N` compacts the log every N entries (0:
//!   never; default: 5–44, from the seed);
//! * `HOTREPART_SIM_TRACE=1` prints every protocol message and applied entry
//!   (use with one seed).
//!
//! * `CI=true`: the seeds after the fixed ones come from a fixed stream,
//!   at most 200 (the same every CI run); otherwise they are random.
//!
//! Known issue (liveness only, found by random seeds, about one seed in
//! 700; the same on the commit before log compaction and membership
//! changes): a node restarted with a promise for its own higher ballot,
//! which never won a majority, is never moved past by the others, so the
//! check "all replicas catch up after healing" fails. omnipaxos 0.2.4's
//! ballot leader election does not raise the others' ballot above it.
//! Replay: `HOTREPART_SIM_NET=oneway HOTREPART_SIM_SEED=968891404810790783`,
//! `HOTREPART_SIM_NET=oneway HOTREPART_SIM_SEED=641761817930011128`,
//! `HOTREPART_SIM_NET=fifo HOTREPART_SIM_SEED=5546384697825125964`.
//!
//! Every failure message names the seed and the tick.
//!
//! # Layout
//!
//! One test binary (`--test sim`): this file holds the test, the seed
//! schedule and the environment; `world` the simulated cluster and its
//! knobs; `scenario` one seed's run and its tick ([`Sim::step`]);
//! `network` messages in flight, broken links and partitions; `faults`
//! crashes, restarts, breaks and partitions drawn per tick; `leases` the
//! lease traffic and the lease rule; `checks` the safety checks on what
//! replicas apply and at the end; `commands` the proposed commands;
//! `rng` the seeded generator.

mod checks;
mod commands;
mod faults;
mod leases;
mod network;
mod rng;
mod scenario;
mod world;

use std::time::{Duration, Instant};

use rng::Rng;
use world::{NetMode, Sim, Stats};

/// Seeds always run, before the time-bounded random ones.
const FIXED_SEEDS: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 42, 1234, 0xDEAD_BEEF, u64::MAX];

/// The seed stream of CI runs, and how many seeds a CI run checks at most
/// (all of them pass).
const CI_STREAM: u64 = 0x0dd5_eed5_0f0c_1a55;
const CI_SEEDS: u64 = 200;

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

#[test]
fn simulated_cluster_agrees_and_makes_progress() {
    let started = Instant::now();
    // Unset: the fixed seeds with Fifo, then random seeds alternating
    // between Fifo and OneWay.
    let forced = match std::env::var("HOTREPART_SIM_NET").as_deref() {
        Err(_) => None,
        Ok("fifo") => Some(NetMode::Fifo),
        Ok("oneway") => Some(NetMode::OneWay),
        Ok("chaos") => Some(NetMode::Chaos),
        Ok(other) => panic!("HOTREPART_SIM_NET={other:?}: expected fifo, oneway or chaos"),
    };
    let mode = forced.unwrap_or(NetMode::Fifo);
    let mut total = Stats::default();
    let mut seeds = 0u64;
    let run = |seed: u64, mode: NetMode, total: &mut Stats| {
        // A panic inside omnipaxos does not know the seed: add it.
        let s = match std::panic::catch_unwind(|| Sim::new(seed, mode).run()) {
            Ok(s) => s,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let net = format!("{mode:?}").to_lowercase();
                panic!(
                    "seed {seed} ({mode:?} network) failed: {msg}\n  replay: HOTREPART_SIM_NET={net} HOTREPART_SIM_SEED={seed} cargo nextest run -p hotrepart-routing-paxos --test sim"
                );
            }
        };
        total.ticks += s.ticks;
        total.entries += s.entries;
        total.accepted += s.accepted;
        total.rejected += s.rejected;
        total.stale += s.stale;
        total.crashes += s.crashes;
        total.partitions += s.partitions;
        total.messages += s.messages;
        total.dropped += s.dropped;
        total.heal_ticks_max = total.heal_ticks_max.max(s.heal_ticks_max);
        total.leased += s.leased;
        total.lost += s.lost;
        total.snapshot_loads += s.snapshot_loads;
    };
    if let Some(seed) = env_u64("HOTREPART_SIM_SEED") {
        run(seed, mode, &mut total);
        seeds = 1;
    } else {
        // In CI (`CI=true`) the further seeds come from a fixed stream and
        // are capped, so every CI run checks the same seeds: a red CI means
        // a change broke something, not that a fresh seed met the known
        // liveness issue (module docs). Elsewhere they are random.
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let budget = Duration::from_secs(env_u64("HOTREPART_SIM_SECS").unwrap_or(20));
        let max_seeds =
            env_u64("HOTREPART_SIM_SEEDS").unwrap_or(if ci { CI_SEEDS } else { u64::MAX });
        for seed in FIXED_SEEDS {
            if seeds >= max_seeds {
                break;
            }
            run(seed, mode, &mut total);
            seeds += 1;
        }
        let mut gen = Rng(if ci {
            CI_STREAM
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        while started.elapsed() < budget && seeds < max_seeds {
            let mode = forced.unwrap_or([NetMode::Fifo, NetMode::OneWay][(seeds & 1) as usize]);
            run(gen.next(), mode, &mut total);
            seeds += 1;
        }
    }
    eprintln!(
        "sim ({} network): {seeds} seeds in {:.1}s: {} ticks, {} entries decided ({} accepted, {} rejected, {} stale retries), \
         {} crashes, {} partitions, {} messages ({} dropped), slowest recovery after healing {} ticks, \
         {} node-ticks with a lease, {} catalog states loaded from a snapshot, {} proposals answered \"unknown\" (folded into a snapshot)",
        forced.map_or("Fifo and OneWay".to_owned(), |m| format!("{m:?}")),
        started.elapsed().as_secs_f64(),
        total.ticks,
        total.entries,
        total.accepted,
        total.rejected,
        total.stale,
        total.crashes,
        total.partitions,
        total.messages,
        total.dropped,
        total.heal_ticks_max,
        total.leased,
        total.snapshot_loads,
        total.lost,
    );
}
