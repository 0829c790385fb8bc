//! The catalog service over real TCP on 127.0.0.1: three nodes bootstrap
//! from a seed, replicate proposals, survive the leader's shutdown and a
//! restart from disk, refuse a node with the wrong secret, and keep the
//! lease rule under a partition. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hotrepart_router::catalog::{KeyType, RoutingFunction, Span};
use hotrepart_routing_paxos::command::{CatalogSeed, Dsn, RangeSpec, ShardSpec, TableSpec};
use hotrepart_routing_paxos::{
    CatalogCommand, CatalogHandle, ClusterSettings, ProposeError, ReconfigureError,
};

const LEASE: Duration = Duration::from_millis(1000);
/// The lease module's margin for this lease: 10 % + 50 ms.
const MARGIN: Duration = Duration::from_millis(150);

/// A directory removed on drop, also when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hotrepart-cluster-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// All log output of this test binary, for checking that refusals are
/// logged.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
    logs
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = logs().lock() {
            l.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().map(|l| l.clone()).unwrap_or_default()).into_owned()
}

/// A port for a node to listen on, free when chosen. Taken below the
/// kernel's ephemeral range (32768 and up here; where `bind(0)` and every
/// outgoing connection get their ports): a port from `bind(0)` could be
/// given to another test's outgoing connection before the node binds it
/// (one AddrInUse seen). Chosen at random in 20000–31999, never twice in
/// this process: test processes run side by side, and a fixed block per
/// process id let two of them (ids equal modulo the block count) hand
/// out the same ports, so that a node joined another test's cluster (CI:
/// `the_log_is_compacted_…` found a node compacted before it started).
fn free_port() -> u16 {
    use std::hash::BuildHasher;
    const LO: u64 = 20_000;
    const SPAN: u64 = 12_000;
    static HANDED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..10_000u64 {
        let r = std::collections::hash_map::RandomState::new().hash_one((
            std::process::id(),
            Instant::now(),
            i,
        ));
        let port = u16::try_from(LO + r % SPAN).expect("below 65536");
        if handed.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.push(port);
            return port;
        }
    }
    panic!("no free port in {LO}..{}", LO + SPAN);
}

fn seed(by: u64) -> CatalogSeed {
    const HALF: u64 = 1 << 63;
    CatalogSeed {
        shards: (0..2)
            .map(|s| ShardSpec {
                shard: format!("s{s}"),
                dsn: Dsn(format!("host=s{s} seeded_by={by}")),
            })
            .collect(),
        home_shard: "s0".into(),
        sharded: vec![TableSpec {
            table: "t0".into(),
            key_column: "id".into(),
            key_type: KeyType::Int8,
            function: RoutingFunction::PgHash { seed: 0 },
        }],
        reference: Vec::new(),
        functions: Vec::new(),
        ranges: vec![
            RangeSpec {
                range: Span {
                    lo: 0,
                    hi: Some(HALF),
                },
                read_owner: "s0".into(),
                write_owner: "s0".into(),
            },
            RangeSpec {
                range: Span { lo: HALF, hi: None },
                read_owner: "s1".into(),
                write_owner: "s1".into(),
            },
        ],
    }
}

/// Settings for nodes 1..=n on fresh ports; `secret(id)` per node.
fn cluster_settings(
    n: u64,
    dirs: &[TempDir],
    secret: impl Fn(u64) -> &'static str,
) -> Vec<ClusterSettings> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (1..=n)
        .map(|id| {
            let peers: BTreeMap<u64, String> = (1..=n)
                .filter(|p| *p != id)
                .map(|p| (p, format!("127.0.0.1:{}", ports[(p - 1) as usize])))
                .collect();
            let listen = format!("127.0.0.1:{}", ports[(id - 1) as usize])
                .parse()
                .expect("address");
            let mut s =
                ClusterSettings::new(id, listen, peers, secret(id), &dirs[(id - 1) as usize].0);
            s.lease = LEASE;
            s
        })
        .collect()
}

/// Waits until `cond` holds, for at most `limit`; panics with `what`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        // The polling interval of a deadline-bounded wait, not a guess at
        // how long the condition takes.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn same_catalog(a: &CatalogHandle, b: &CatalogHandle) -> bool {
    a.applied_index() == b.applied_index() && *a.catalog() == *b.catalog()
}

fn table(name: &str) -> CatalogCommand {
    CatalogCommand::DeclareReference { table: name.into() }
}

const PROPOSE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_restart_and_keep_leases() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("main")).collect();
    let settings = cluster_settings(3, &dirs, |_| "the cluster secret");
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(Some(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        ));
    }
    let node = |nodes: &[Option<CatalogHandle>], i: usize| -> CatalogHandle {
        nodes[i].clone().expect("node is running")
    };
    let all: Vec<CatalogHandle> = nodes.iter().flatten().cloned().collect();

    // Bootstrap: every node proposes its seed, exactly one wins.
    wait_for(
        "the seed is applied everywhere, equally",
        Duration::from_secs(10),
        || {
            all.iter().all(|h| h.catalog().snapshot().is_some())
                && all.windows(2).all(|w| same_catalog(&w[0], &w[1]))
        },
    )
    .await;
    let epoch = all[0].catalog().epoch();
    assert!(all.iter().all(|h| h.catalog().epoch() == epoch));
    wait_for("every node holds a lease", Duration::from_secs(5), || {
        all.iter().all(|h| h.lease_valid())
    })
    .await;

    // A proposal on a follower is applied everywhere.
    let leader = all[0].status().leader.expect("a leader is known");
    let follower = all
        .iter()
        .find(|h| h.node_id() != leader)
        .expect("a follower")
        .clone();
    let mut changes = follower.subscribe();
    changes.borrow_and_update();
    let applied = follower
        .propose(table("r1"), PROPOSE)
        .await
        .expect("answered");
    assert!(applied.is_ok(), "{applied:?}");
    assert!(changes.has_changed().expect("subscribed"));
    assert!(follower
        .catalog()
        .snapshot()
        .expect("catalog")
        .is_reference_table("r1"));
    wait_for("r1 is applied everywhere", Duration::from_secs(5), || {
        all.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    let index = follower.applied_index();
    let start = Instant::now();
    follower.await_all_applied(index).await.expect("await");
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "all connected: acks come with the next ping ({:?})",
        start.elapsed()
    );
    let st = follower.status();
    assert_eq!(st.applied, index);
    assert!(st.lease.valid);
    assert!(st.peers.iter().all(|p| p.connected), "{st:?}");
    serde_json::to_string(&st).expect("status serialises");

    // Partition a follower: it loses its lease within lease + margin; the
    // others keep theirs and keep committing.
    let cut = follower.clone();
    let rest: Vec<CatalogHandle> = all
        .iter()
        .filter(|h| h.node_id() != cut.node_id())
        .cloned()
        .collect();
    cut.set_partitioned(true);
    let lost = wait_for(
        "the partitioned node loses its lease",
        LEASE + MARGIN + Duration::from_millis(500),
        || !cut.lease_valid(),
    )
    .await;
    assert!(
        lost <= LEASE + MARGIN + Duration::from_millis(100),
        "{lost:?}"
    );
    assert!(rest.iter().all(|h| h.lease_valid()));
    let outcome = rest[0]
        .propose(table("r2"), PROPOSE)
        .await
        .expect("answered");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(rest.iter().all(|h| h.lease_valid()));
    // With one node silent, await_all_applied waits out the lease.
    let index = rest[0].applied_index();
    let start = Instant::now();
    rest[0].await_all_applied(index).await.expect("await");
    let waited = start.elapsed();
    assert!(
        waited >= LEASE - Duration::from_millis(200)
            && waited <= LEASE + MARGIN + Duration::from_secs(1),
        "waited {waited:?}"
    );
    assert!(!cut.lease_valid());
    assert!(cut
        .catalog()
        .snapshot()
        .is_some_and(|s| !s.is_reference_table("r2")));

    // Heal: it catches up and gets its lease back.
    cut.set_partitioned(false);
    wait_for("the healed node catches up", Duration::from_secs(5), || {
        same_catalog(&cut, &rest[0]) && cut.lease_valid()
    })
    .await;

    // Shut the leader down: the others elect another and commit.
    let leader = rest[0].status().leader.expect("a leader is known");
    let li = (leader - 1) as usize;
    node(&nodes, li).shutdown().await;
    nodes[li] = None;
    let survivor = nodes.iter().flatten().next().expect("a survivor").clone();
    let start = Instant::now();
    let outcome = survivor
        .propose(table("r3"), PROPOSE)
        .await
        .expect("answered after fail-over");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // Restart it from its data directory: it catches up.
    let restarted = CatalogHandle::start(settings[li].clone(), Some(seed(leader)))
        .await
        .expect("restart");
    nodes[li] = Some(restarted.clone());
    wait_for(
        "the restarted node catches up",
        Duration::from_secs(10),
        || same_catalog(&restarted, &survivor),
    )
    .await;
    assert!(restarted
        .catalog()
        .snapshot()
        .is_some_and(|s| s.is_reference_table("r3")));
    assert_eq!(restarted.catalog().epoch(), survivor.catalog().epoch());
    for h in nodes.iter().flatten() {
        h.shutdown().await;
    }
    let outcome = survivor.propose(table("r4"), PROPOSE).await;
    assert_eq!(outcome, Err(ProposeError::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restarts_from_disk() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("restart")).collect();
    let settings = cluster_settings(3, &dirs, |_| "the secret");
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("bootstrap", Duration::from_secs(10), || {
        nodes.iter().all(|h| h.catalog().snapshot().is_some())
    })
    .await;
    let outcome = nodes[1].propose(table("kept"), PROPOSE).await;
    assert!(matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    wait_for("all applied", Duration::from_secs(5), || {
        nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    let before = nodes[0].catalog();
    let applied = nodes[0].applied_index();
    for h in &nodes {
        h.shutdown().await;
    }
    // Everyone restarts, with other seeds: the catalog comes from the logs.
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(10 + s.node_id)))
                .await
                .expect("node restarts"),
        );
    }
    wait_for(
        "everyone is back with the old catalog",
        Duration::from_secs(10),
        || {
            nodes
                .iter()
                .all(|h| h.applied_index() >= applied && h.lease_valid())
        },
    )
    .await;
    for h in &nodes {
        assert_eq!(*h.catalog(), *before);
    }
    let outcome = nodes[2].propose(table("after"), PROPOSE).await;
    assert!(matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    assert_eq!(nodes[2].catalog().epoch(), before.epoch() + 1);
    for h in &nodes {
        h.shutdown().await;
    }
}

fn decision(i: u64) -> CatalogCommand {
    CatalogCommand::TxDecision {
        gid: format!("hotrepart_{i}"),
        commit: !i.is_multiple_of(3),
        since: None,
    }
}

/// Log compaction with catalog snapshots, over TCP: (a) with a small
/// `compact_after`, the stored log stays bounded on every node and all
/// nodes hold the same catalog; (b) a node stopped before the others
/// compacted past its log catches up, from a snapshot, after it restarts;
/// (c) the whole cluster restarts from its compacted disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_into_snapshots_and_survives_restarts() {
    const COMPACT: usize = 10;
    let _ = logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("compact")).collect();
    let mut settings = cluster_settings(3, &dirs, |_| "the secret");
    for s in &mut settings {
        s.compact_after = COMPACT;
    }
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("bootstrap everywhere", Duration::from_secs(10), || {
        nodes.iter().all(|h| h.catalog().snapshot().is_some())
            && nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;

    // (b) Node 3 stops before anything is compacted (the bootstrap entry
    // itself may have reached it as a snapshot: CI saw `compacted: 1`
    // once, with `decided: 1`).
    let st = nodes[2].status();
    assert!(st.compacted <= 1, "{st:?}");
    let old_end = st.decided;
    nodes[2].shutdown().await;
    let mut i = 0;
    for _ in 0..6 * COMPACT {
        i += 1;
        let out = nodes[(i % 2) as usize].propose(decision(i), PROPOSE).await;
        assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    }
    wait_for("nodes 1 and 2 agree", Duration::from_secs(5), || {
        same_catalog(&nodes[0], &nodes[1])
    })
    .await;
    for h in &nodes[..2] {
        let st = h.status();
        assert!(st.compacted >= 4 * COMPACT, "{st:?}");
        assert!(st.log_len <= COMPACT + 1, "{st:?}");
    }
    // Node 3 comes back: its log ends where the others compacted long ago.
    nodes[2] = CatalogHandle::start(settings[2].clone(), Some(seed(3)))
        .await
        .expect("node 3 restarts");
    wait_for("node 3 catches up", Duration::from_secs(10), || {
        nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    // It did so from a snapshot: its log now starts past its old end.
    wait_for("node 3 holds a snapshot", Duration::from_secs(5), || {
        nodes[2].status().compacted > old_end
    })
    .await;
    assert_eq!(nodes[2].catalog().decisions().count(), 6 * COMPACT);

    // (a) All three go on; every node's stored log stays bounded.
    for _ in 0..6 * COMPACT {
        i += 1;
        let out = nodes[(i % 3) as usize].propose(decision(i), PROPOSE).await;
        assert!(matches!(out, Ok(Ok(_))), "{out:?}");
        for h in &nodes {
            let st = h.status();
            assert!(st.log_len <= COMPACT + 3, "{st:?}");
        }
    }
    wait_for("all agree", Duration::from_secs(5), || {
        nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    let applied = nodes[0].applied_index();
    for h in &nodes {
        // The status is refreshed every tick.
        wait_for("the status is refreshed", Duration::from_secs(2), || {
            let st = h.status();
            st.compacted + st.log_len == st.decided
        })
        .await;
        let st = h.status();
        assert!(st.compacted >= applied - COMPACT - 1, "{st:?}");
        let json = serde_json::to_value(&st).expect("status serialises");
        assert!(json.get("compacted").is_some() && json.get("log_len").is_some());
    }
    let before = nodes[0].catalog();
    assert_eq!(before.decisions().count(), 12 * COMPACT);

    // (c) The whole cluster restarts from its compacted disks.
    for h in &nodes {
        h.shutdown().await;
    }
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(10 + s.node_id)))
                .await
                .expect("node restarts"),
        );
    }
    for h in &nodes {
        // Loaded from the snapshot and the log after it, before any peer
        // is heard.
        assert!(h.applied_index() >= applied - COMPACT - 1);
        assert!(h.status().compacted > 0);
    }
    wait_for("everyone is back", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|h| h.applied_index() >= applied && h.lease_valid())
    })
    .await;
    for h in &nodes {
        assert_eq!(*h.catalog(), *before);
    }
    let out = nodes[1].propose(table("after"), PROPOSE).await;
    assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    for h in &nodes {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_cannot_join() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("secret")).collect();
    let settings = cluster_settings(3, &dirs, |id| {
        if id == 3 {
            "not the secret"
        } else {
            "the secret"
        }
    });
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("nodes 1 and 2 bootstrap", Duration::from_secs(10), || {
        nodes[..2].iter().all(|h| h.catalog().snapshot().is_some())
            && same_catalog(&nodes[0], &nodes[1])
    })
    .await;
    // Never answered: running into the timeout is what this checks (not a
    // wait for something to happen).
    let outcome = nodes[2]
        .propose(table("intruder"), Duration::from_millis(1500))
        .await;
    assert_eq!(outcome, Err(ProposeError::Timeout));
    let outcome = nodes[0].propose(table("member"), PROPOSE).await;
    assert!(matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    assert_eq!(nodes[2].applied_index(), 0);
    assert!(nodes[2].catalog().snapshot().is_none());
    assert!(!nodes[2].lease_valid());
    assert!(nodes[2].status().peers.iter().all(|p| !p.connected));
    assert!(!nodes[0]
        .catalog()
        .snapshot()
        .is_some_and(|s| s.is_reference_table("intruder")));
    wait_for("the refusal is logged", Duration::from_secs(3), || {
        let logs = log_text();
        logs.lines().any(|l| {
            l.contains("refused a catalog connection")
                && l.contains("node=1")
                && l.contains("node 3 failed authentication")
        })
    })
    .await;
    for h in &nodes {
        h.shutdown().await;
    }
}

#[test]
fn a_local_catalog_persists_its_commands() {
    let dir = TempDir::new("local");
    let h = CatalogHandle::local(Some(seed(1)), Some(&dir.0)).expect("local");
    assert!(h.lease_valid());
    assert_eq!(h.applied_index(), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = rt.block_on(h.propose(table("r1"), PROPOSE));
    assert!(matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    let again = rt.block_on(h.propose(CatalogCommand::Bootstrap(seed(2)), PROPOSE));
    assert!(
        matches!(again, Ok(Err(_))),
        "a second bootstrap is rejected"
    );
    rt.block_on(h.await_all_applied(h.applied_index()))
        .expect("await");
    let before = h.catalog();
    drop(h);
    let h = CatalogHandle::local(Some(seed(3)), Some(&dir.0)).expect("reopen");
    assert_eq!(h.applied_index(), 3);
    assert_eq!(*h.catalog(), *before);
    let mem = CatalogHandle::local(None, None).expect("in memory");
    assert!(mem.catalog().snapshot().is_none());
    let arc: Arc<_> = mem.catalog();
    assert_eq!(arc.epoch(), 0);
}

/// The handle and its futures can cross threads (`tokio::spawn`).
#[test]
fn handles_and_their_futures_are_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let h = CatalogHandle::local(None, None).expect("in memory");
    send_sync(&h);
    send(h.propose(table("x"), PROPOSE));
    send(h.await_all_applied(0));
    send(h.shutdown());
    send(CatalogHandle::start(
        ClusterSettings::new(
            1,
            "127.0.0.1:0".parse().expect("address"),
            BTreeMap::new(),
            "s",
            "/nonexistent",
        ),
        None,
    ));
}

/// Membership changes over TCP: three nodes; a fourth, started empty to
/// join, is added and gets the whole catalog, and a proposal through it is
/// applied everywhere; one of the original three is removed, the remaining
/// three keep committing and the removed node cannot get anything
/// committed. Bad changes get clear errors. A restart resumes in the new
/// configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_added_and_removed() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new("members")).collect();
    let mut settings = cluster_settings(4, &dirs, |_| "the secret");
    for s in &mut settings[..3] {
        s.peers.remove(&4);
        s.compact_after = 8;
    }
    settings[3].join = true;
    let addr4 = settings[0].listen.to_string().replace(
        &settings[0].listen.port().to_string(),
        &settings[3].listen.port().to_string(),
    );
    let mut nodes = Vec::new();
    for s in &settings[..3] {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("bootstrap", Duration::from_secs(10), || {
        nodes.iter().all(|h| h.catalog().snapshot().is_some())
            && nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    for i in 0..20 {
        let out = nodes[i % 3].propose(decision(i as u64), PROPOSE).await;
        assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    }
    let st = nodes[0].status();
    assert_eq!(
        (st.config_id, st.members.clone(), st.member),
        (1, vec![1, 2, 3], true)
    );

    // Clear errors for bad changes.
    let e = nodes[0]
        .add_node(2, &addr4, PROPOSE)
        .await
        .expect_err("member");
    assert!(e.to_string().contains("already a member"), "{e}");
    let e = nodes[0].remove_node(9, PROPOSE).await.expect_err("unknown");
    assert!(e.to_string().contains("not a member"), "{e}");
    let two_away: BTreeMap<u64, String> = [(1, String::new())].into();
    let e = nodes[0]
        .reconfigure(two_away, PROPOSE)
        .await
        .expect_err("two");
    assert!(e.to_string().contains("one node at a time"), "{e}");

    // Node 4 starts empty, waiting to be added.
    let n4 = CatalogHandle::start(settings[3].clone(), None)
        .await
        .expect("node 4 starts");
    // What nodes 1 and 4 publish through the join never goes back.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let seen = [record(&nodes[0], stopped.clone()), record(&n4, stopped)];
    let st = n4.status();
    assert!(!st.member && st.config_id == 0, "{st:?}");
    assert_eq!(
        n4.propose(table("x"), Duration::from_secs(1)).await,
        Err(ProposeError::NotMember)
    );
    let m = nodes[1]
        .add_node_with_admin(4, &addr4, Some("http://127.0.0.1:7434"), PROPOSE)
        .await
        .expect("node 4 added");
    assert_eq!(m.config_id, 2);
    assert_eq!(
        m.admin.get(&4).map(String::as_str),
        Some("http://127.0.0.1:7434")
    );
    assert_eq!(m.members.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    nodes.push(n4);
    wait_for(
        "node 4 has the whole catalog",
        Duration::from_secs(10),
        || {
            nodes[3].status().member
                && nodes[3].catalog().decision_count() == 20
                && *nodes[3].catalog() == *nodes[0].catalog()
        },
    )
    .await;
    assert_eq!(nodes[3].catalog().decisions().count(), 20);
    let out = nodes[3].propose(table("via4"), PROPOSE).await;
    assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    wait_for("via4 everywhere", Duration::from_secs(5), || {
        nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    let _ = stop.send(true);
    for (id, seen) in [1, 4].into_iter().zip(&seen) {
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert!(
            seen.windows(2)
                .all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1),
            "node {id} published an older catalog: (epoch, decisions) in order: {seen:?}"
        );
    }
    for h in &nodes {
        let st = h.status();
        assert_eq!(
            (st.config_id, st.members.clone()),
            (2, vec![1, 2, 3, 4]),
            "{st:?}"
        );
        // Every member learned the admin URL from the decided change.
        assert_eq!(
            st.admin.get(&4).map(String::as_str),
            Some("http://127.0.0.1:7434"),
            "{st:?}"
        );
    }

    // Remove node 1.
    let m = nodes[2]
        .remove_node(1, PROPOSE)
        .await
        .expect("node 1 removed");
    assert_eq!(m.members.keys().copied().collect::<Vec<_>>(), [2, 3, 4]);
    wait_for(
        "node 1 knows it was removed",
        Duration::from_secs(5),
        || {
            let st = nodes[0].status();
            !st.member && st.config_id == 3
        },
    )
    .await;
    for i in 0..10 {
        let out = nodes[1 + i % 3]
            .propose(decision(100 + i as u64), PROPOSE)
            .await;
        assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    }
    wait_for("2, 3, 4 agree", Duration::from_secs(5), || {
        nodes[1..].windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    let out = nodes[0]
        .propose(table("from1"), Duration::from_secs(2))
        .await;
    assert_eq!(out, Err(ProposeError::NotMember));
    wait_for("node 1 loses its lease", Duration::from_secs(5), || {
        !nodes[0].lease_valid()
    })
    .await;
    assert!(nodes[1..].iter().all(|h| !h
        .catalog()
        .snapshot()
        .expect("catalog")
        .is_reference_table("from1")));

    // Restarts resume in the current configuration.
    let before = nodes[1].catalog();
    for h in &nodes {
        h.shutdown().await;
    }
    let mut again = Vec::new();
    for s in &settings {
        again.push(
            CatalogHandle::start(s.clone(), None)
                .await
                .expect("restart"),
        );
    }
    wait_for("2, 3, 4 back", Duration::from_secs(10), || {
        again[1..]
            .iter()
            .all(|h| h.lease_valid() && *h.catalog() == *before)
    })
    .await;
    assert!(!again[0].status().member);
    // The admin URL of node 4 survived node 1's removal and the restart.
    for h in &again[1..] {
        let st = h.status();
        assert_eq!(
            st.admin.get(&4).map(String::as_str),
            Some("http://127.0.0.1:7434"),
            "{st:?}"
        );
    }
    let out = again[3].propose(table("after"), PROPOSE).await;
    assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    for h in &again {
        h.shutdown().await;
    }
}

/// Changes the membership through `via` to `members`, configuration
/// `config_id`. An answer that did not come in time (the change may still
/// happen) is waited for, and the change proposed again if `via` is still
/// in the configuration before: what this is used for checks what nodes
/// publish through changes, not how fast a change is decided.
async fn change(via: &CatalogHandle, members: BTreeMap<u64, String>, config_id: u32) {
    for _ in 0..3 {
        match via.reconfigure(members.clone(), PROPOSE).await {
            Ok(m) => {
                assert_eq!(m.config_id, config_id);
                return;
            }
            Err(ReconfigureError::Timeout | ReconfigureError::InProgress) => {}
            Err(e) => panic!(
                "membership change to {config_id} via {}: {e}",
                via.node_id()
            ),
        }
        let start = Instant::now();
        while via.status().config_id < config_id && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if via.status().config_id >= config_id {
            return;
        }
    }
    panic!(
        "membership change to {config_id} via {} not decided",
        via.node_id()
    );
}

/// Waits until every node of `nodes` is a member of `config_id`.
async fn in_config(nodes: &[CatalogHandle], config_id: u32) {
    wait_for(
        "the members are in the new configuration",
        Duration::from_secs(20),
        || {
            nodes.iter().all(|h| {
                let st = h.status();
                st.member && st.config_id == config_id
            })
        },
    )
    .await;
}

/// What a subscriber of one node saw, in order: (epoch, 2PC decisions).
type Seen = Arc<Mutex<Vec<(u64, usize)>>>;

/// Records every catalog `h` publishes until `stop` is set.
fn record(h: &CatalogHandle, mut stop: tokio::sync::watch::Receiver<bool>) -> Seen {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let mut rx = h.subscribe();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            {
                let c = rx.borrow_and_update();
                if let Ok(mut s) = out.lock() {
                    s.push((c.epoch(), c.decision_count()));
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = stop.changed() => break,
            }
        }
    });
    seen
}

/// What a node published never goes back through membership changes
/// (neither the routing epoch nor the 2PC decisions decrease, as its
/// subscribers — the proxy routes by them — see them). Node 4 is cut off
/// while three membership changes happen, so no peer runs its configuration's
/// replica any more (a node keeps the last two ended ones) and it can only
/// learn the current configuration from an announcement. It then starts
/// that configuration's replica empty and gets the catalog from the
/// members; meanwhile it keeps publishing the catalog it had. It used to
/// publish the empty replica's (epoch 0, no decisions); a member that
/// hears the announcement before its replica decided the StopSign did the
/// same, which is how `nodes_are_added_and_removed` once saw node 4 (and
/// node 1) with no decisions right after the wait for the whole catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_changes_keeps_its_catalog_until_it_has_the_new_one() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..6).map(|_| TempDir::new("missed")).collect();
    let mut settings = cluster_settings(6, &dirs, |_| "the secret");
    for s in &mut settings[..4] {
        s.peers.remove(&5);
        s.peers.remove(&6);
        s.compact_after = 8;
    }
    settings[4].join = true;
    settings[5].join = true;
    settings[4].compact_after = 8;
    settings[5].compact_after = 8;
    let mut nodes = Vec::new();
    for s in &settings[..4] {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    for s in &settings[4..] {
        nodes.push(
            CatalogHandle::start(s.clone(), None)
                .await
                .expect("joining node starts"),
        );
    }
    wait_for("bootstrap", Duration::from_secs(10), || {
        nodes[..4].iter().all(|h| h.catalog().snapshot().is_some())
            && nodes[..4].windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;
    for i in 0..10 {
        let out = nodes[i % 4].propose(decision(i as u64), PROPOSE).await;
        assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    }
    wait_for(
        "node 4 has the 10 decisions",
        Duration::from_secs(10),
        || nodes[3].catalog().decision_count() == 10 && same_catalog(&nodes[3], &nodes[0]),
    )
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let seen4 = record(&nodes[3], stopped.clone());
    let before = (nodes[3].catalog().epoch(), nodes[3].applied_index());
    nodes[3].set_partitioned(true);
    let addr = |id: usize| settings[id - 1].listen.to_string();
    let members = |ids: &[usize]| -> BTreeMap<u64, String> {
        ids.iter().map(|id| (*id as u64, addr(*id))).collect()
    };
    // Each change through the leader of the running members (a StopSign
    // forwarded to the cut-off node would be lost).
    let leader = async |ids: &[u64]| -> usize {
        let mut found = 0;
        wait_for(
            "a leader among the reachable members",
            Duration::from_secs(10),
            || {
                let leaders: Vec<Option<u64>> = ids
                    .iter()
                    .map(|id| nodes[*id as usize - 1].status().leader)
                    .collect();
                match leaders[0] {
                    Some(l) if ids.contains(&l) && leaders.iter().all(|x| *x == Some(l)) => {
                        found = l as usize - 1;
                        true
                    }
                    _ => false,
                }
            },
        )
        .await;
        found
    };
    let l = leader(&[1, 2, 3]).await;
    change(&nodes[l], members(&[1, 2, 3, 4, 5]), 2).await;
    in_config(&[&nodes[..3], &nodes[4..5]].concat(), 2).await;
    let l = leader(&[1, 2, 3, 5]).await;
    change(&nodes[l], members(&[1, 2, 3, 4, 5, 6]), 3).await;
    in_config(&[&nodes[..3], &nodes[4..]].concat(), 3).await;
    // Removes 5 or 6, not the leader.
    let l = leader(&[1, 2, 3, 5, 6]).await;
    let stays = if l == 4 { 5 } else { 6 };
    change(&nodes[l], members(&[1, 2, 3, 4, stays]), 4).await;
    in_config(&[&nodes[..3], &nodes[stays - 1..stays]].concat(), 4).await;
    let out = nodes[stays - 1].propose(decision(10), PROPOSE).await;
    assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    // Cut off, node 4 still shows what it had.
    assert_eq!(nodes[3].status().config_id, 1);
    assert_eq!(nodes[3].catalog().decision_count(), 10);
    assert_eq!(
        (nodes[3].catalog().epoch(), nodes[3].applied_index()),
        before
    );
    nodes[3].set_partitioned(false);
    wait_for("node 4 catches up", Duration::from_secs(20), || {
        let st = nodes[3].status();
        st.member && st.config_id == 4 && same_catalog(&nodes[3], &nodes[0])
    })
    .await;
    assert_eq!(nodes[3].catalog().decision_count(), 11);
    wait_for(
        "node 4's subscriber sees it",
        Duration::from_secs(5),
        || {
            seen4
                .lock()
                .map(|s| s.last().map(|l| l.1) == Some(11))
                .unwrap_or(false)
        },
    )
    .await;
    let _ = stop.send(true);
    let seen = seen4.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        seen.windows(2)
            .all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1),
        "node 4 published an older catalog: (epoch, decisions) in order: {seen:?}"
    );
    for h in &nodes {
        tokio::time::timeout(Duration::from_secs(20), h.shutdown())
            .await
            .unwrap_or_else(|_| panic!("node {} did not shut down", h.node_id()));
    }
}

#[test]
fn a_local_catalog_directory_is_opened_by_one_handle_at_a_time() {
    let dir = TempDir::new("local-lock");
    let h = CatalogHandle::local(Some(seed(1)), Some(&dir.0)).expect("local");
    assert!(h.is_durable());
    let e = CatalogHandle::local(Some(seed(1)), Some(&dir.0)).expect_err("second handle");
    assert!(
        e.to_string()
            .contains("in use by another hotrepart process"),
        "{e}"
    );
    drop(h);
    let h = CatalogHandle::local(None, Some(&dir.0)).expect("reopened after the first closed");
    assert_eq!(h.applied_index(), 1);
    assert!(!CatalogHandle::local(None, None)
        .expect("memory")
        .is_durable());
}

/// Unmounts (lazily) when dropped, also when the test fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Issue 17, a full disk: a node whose catalog store cannot be written
/// (ENOSPC) stops taking part — its lease lapses, so it stops serving a
/// catalog it can no longer keep up to date, and its proposals fail — while
/// the other two go on deciding; once space is freed, it catches up and
/// takes part again by itself. How it stops: omnipaxos panics on
/// the failed write (`Error writing to storage … No space left on
/// device`); the node's catalog driver ends, withdraws the lease at once
/// and says why in its status (`stopped`, also in `/v1/status`); its
/// supervisor opens it again from the directory after growing pauses, so
/// once space is freed it takes part again by itself. Needs a small tmpfs of its own for that
/// node's directory (root); skipped with a message where mounting is not
/// allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_stops_safely_and_comes_back_by_itself() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("fulldisk")).collect();
    std::fs::create_dir_all(&dirs[2].0).expect("mkdir");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&dirs[2].0)
        .output();
    let _mounted = match mount {
        Ok(o) if o.status.success() => Mounted(dirs[2].0.clone()),
        other => {
            eprintln!(
                "SKIPPED: cannot mount a small tmpfs for a full disk (needs root): {other:?}"
            );
            return;
        }
    };
    let settings = cluster_settings(3, &dirs, |_| "the secret");
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("bootstrap everywhere", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|h| h.catalog().snapshot().is_some() && h.lease_valid())
            && nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;

    // Node 3's disk fills up.
    let filler = dirs[2].0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).and_then(|()| f.flush()).is_ok() {}
        let _ = f.sync_all();
    }
    // The others go on deciding.
    for i in 0..20 {
        let outcome = nodes[0].propose(table(&format!("full{i}")), PROPOSE).await;
        assert!(matches!(outcome, Ok(Ok(_))), "full{i}: {outcome:?}");
    }
    wait_for(
        "node 2 applies every table",
        Duration::from_secs(10),
        || same_catalog(&nodes[0], &nodes[1]),
    )
    .await;
    // Node 3 cannot keep its store: its lease lapses and stays lapsed,
    // and it does not take proposals.
    wait_for("node 3's lease lapses", LEASE * 10, || {
        !nodes[2].lease_valid()
    })
    .await;
    wait_for("node 3 says why it stopped", LEASE * 10, || {
        nodes[2]
            .status()
            .stopped
            .is_some_and(|why| why.contains("No space left on device"))
    })
    .await;
    let outcome = nodes[2]
        .propose(table("from-a-full-disk"), Duration::from_secs(2))
        .await;
    assert!(!matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    tokio::time::sleep(LEASE * 2).await;
    assert!(
        !nodes[2].lease_valid(),
        "a node that cannot write got a lease"
    );
    assert!(!nodes[0]
        .catalog()
        .snapshot()
        .is_some_and(|s| s.is_reference_table("from-a-full-disk")));

    // Space again: the node's driver, started again from its directory
    // by itself (its pauses are at most 30 s), catches up and takes part
    // again, without a restart of the node.
    std::fs::remove_file(&filler).expect("remove filler");
    let t0 = std::time::Instant::now();
    wait_for(
        "node 3 runs again and catches up by itself",
        Duration::from_secs(45),
        || {
            nodes[2].status().stopped.is_none()
                && same_catalog(&nodes[0], &nodes[2])
                && nodes[2].lease_valid()
        },
    )
    .await;
    eprintln!(
        "node 3 back {:.1} s after the space was freed",
        t0.elapsed().as_secs_f64()
    );
    assert!(nodes[2]
        .catalog()
        .snapshot()
        .is_some_and(|s| s.is_reference_table("full19")));
    // It proposes again, and the others apply what it proposed.
    let outcome = nodes[2].propose(table("after-the-disk"), PROPOSE).await;
    assert!(matches!(outcome, Ok(Ok(_))), "{outcome:?}");
    wait_for("everyone applies it", Duration::from_secs(10), || {
        nodes.iter().all(|h| {
            h.catalog()
                .snapshot()
                .is_some_and(|s| s.is_reference_table("after-the-disk"))
        })
    })
    .await;
    // And a node whose driver failed and came back still shuts down, and
    // restarts on its directory as usual.
    let old = nodes.pop().expect("node 3");
    tokio::time::timeout(Duration::from_secs(10), old.shutdown())
        .await
        .expect("a node whose driver came back still shuts down");
    let back = CatalogHandle::start(settings[2].clone(), Some(seed(3)))
        .await
        .expect("node 3 restarts on its directory");
    wait_for("node 3 catches up", Duration::from_secs(15), || {
        same_catalog(&nodes[0], &back) && back.lease_valid()
    })
    .await;
    back.shutdown().await;
    for h in &nodes {
        h.shutdown().await;
    }
}

/// The index of the leader that every one of `nodes` (by index) follows.
async fn common_leader(nodes: &[CatalogHandle], among: &[usize]) -> usize {
    let mut found = 0;
    wait_for(
        "one leader that the nodes agree on",
        Duration::from_secs(10),
        || {
            let leaders: Vec<Option<u64>> =
                among.iter().map(|i| nodes[*i].status().leader).collect();
            match leaders[0] {
                Some(l) if leaders.iter().all(|x| *x == Some(l)) => {
                    found = l as usize - 1;
                    among.contains(&found)
                }
                _ => false,
            }
        },
    )
    .await;
    found
}

/// A membership change whose caller timed out no longer blocks the next
/// one on that node (every later change answered InProgress until a
/// restart), and a change forwarded to a leader that was cut off at that
/// moment is proposed again until it is accepted (omnipaxos forwards a
/// StopSign once: it was lost, and the change timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_that_timed_out_or_was_lost_is_proposed_again() {
    let _ = logs();
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new("retry")).collect();
    let settings = cluster_settings(4, &dirs, |_| "the secret");
    let mut nodes = Vec::new();
    for s in &settings {
        nodes.push(
            CatalogHandle::start(s.clone(), Some(seed(s.node_id)))
                .await
                .expect("node starts"),
        );
    }
    wait_for("bootstrap", Duration::from_secs(10), || {
        nodes.iter().all(|h| h.catalog().snapshot().is_some())
            && nodes.windows(2).all(|w| same_catalog(&w[0], &w[1]))
    })
    .await;

    // Through a node cut off from everyone: the change times out.
    let l = common_leader(&nodes, &[0, 1, 2, 3]).await;
    let mut others = (0..4).filter(|i| *i != l);
    let (f, gone) = (
        others.next().expect("a follower"),
        others.next().expect("another"),
    );
    nodes[f].set_partitioned(true);
    let e = nodes[f]
        .remove_node(gone as u64 + 1, Duration::from_millis(500))
        .await
        .expect_err("no quorum reachable");
    assert_eq!(e, ReconfigureError::Timeout);
    nodes[f].set_partitioned(false);
    // The same node takes the next request (it answered InProgress).
    let m = nodes[f]
        .remove_node(gone as u64 + 1, PROPOSE)
        .await
        .expect("removed once the node is reachable again");
    assert_eq!(m.config_id, 2);
    let left: Vec<usize> = (0..4).filter(|i| *i != gone).collect();
    in_config(
        &left.iter().map(|i| nodes[*i].clone()).collect::<Vec<_>>(),
        2,
    )
    .await;

    // A StopSign forwarded to a leader that is cut off right then.
    let l = common_leader(&nodes, &left).await;
    let via = *left.iter().find(|i| **i != l).expect("a follower");
    nodes[l].set_partitioned(true);
    let m = nodes[via]
        .remove_node(l as u64 + 1, PROPOSE)
        .await
        .expect("the cut-off leader removed by the other two");
    assert_eq!(m.config_id, 3);
    let rest: Vec<CatalogHandle> = left
        .iter()
        .filter(|i| **i != l)
        .map(|i| nodes[*i].clone())
        .collect();
    in_config(&rest, 3).await;
    let out = rest[0].propose(table("after"), PROPOSE).await;
    assert!(matches!(out, Ok(Ok(_))), "{out:?}");
    for h in &nodes {
        tokio::time::timeout(Duration::from_secs(20), h.shutdown())
            .await
            .unwrap_or_else(|_| panic!("node {} did not shut down", h.node_id()));
    }
}
