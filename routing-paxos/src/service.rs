//! The catalog service: a tokio driver task that owns a [`Replica`], its
//! timers, the transport ([`crate::net`]), the disk ([`SharedStorage`]) and
//! the lease state ([`crate::lease`]), behind a cloneable [`CatalogHandle`].
//!
//! # What a handle guarantees
//!
//! * [`CatalogHandle::catalog`] is the catalog as of this node's applied
//!   prefix of the log, read without a lock; [`CatalogHandle::subscribe`]
//!   sees every change.
//! * [`CatalogHandle::propose`] answers once the command is decided *and
//!   applied here*, so a caller reads its own write. A timeout leaves the
//!   answer unknown (the command may still be applied later, at most once).
//! * [`CatalogHandle::lease_valid`]: while true, this node has applied every
//!   entry decided more than `lease` + margin ago ([`crate::lease`] has the
//!   argument). The data path checks it per statement.
//! * [`CatalogHandle::await_all_applied`]: when it returns, every node that
//!   holds a valid lease has applied the index.
//!
//! The driver reacts to one input at a time (a tick, a frame, a request);
//! after each it applies what was decided, answers proposals, publishes the
//! catalog and sends what the replica produced. Storage writes (fsync) run
//! on the driver task: catalog traffic is small and rare.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use omnipaxos::storage::Storage;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::catalog::{Applied, Catalog, Rejected};
use crate::command::{CatalogCommand, CatalogSeed};
use crate::entry::{CatalogEntry, CatalogSnapshot, Outcome, ProposalId, StateMachine};
use crate::lease::Leases;
use crate::net::{Net, NetConfig, NetEvent, Wire};
use crate::replica::{Replica, ReplicaConfig, ReplicaError, Ticket};
use crate::storage::{DirLock, SharedStorage, StorageError};

/// How one node joins the catalog cluster. `Debug` does not print the
/// secret.
#[derive(Clone)]
pub struct ClusterSettings {
    /// This node's id: non-zero, unique, not among `peers`.
    pub node_id: u64,
    /// Address to listen on for peers.
    pub listen: SocketAddr,
    /// The other nodes: id → "host:port".
    pub peers: BTreeMap<u64, String>,
    /// The shared cluster secret authenticating the links.
    pub secret: String,
    /// Where the replica's log is kept.
    pub data_dir: PathBuf,
    /// The replica's tick (default 10 ms): leader election, resends and
    /// proposal retries count in ticks.
    pub tick: Duration,
    /// Lease duration (default 2 s).
    pub lease: Duration,
    /// Compact the log into a catalog snapshot once more than this many
    /// decided entries follow the last snapshot (default 1000; 0: never).
    pub compact_after: usize,
    /// Start as a node that is not a member yet: it waits until a
    /// reconfiguration adds it ([`CatalogHandle::add_node`] on a member),
    /// then gets the whole catalog from the members. `peers` names the
    /// members to contact. Ignored once the node has a membership on disk.
    pub join: bool,
}

/// A catalog configuration: its omnipaxos configuration id and its members
/// with their node-to-node addresses. Persisted in `membership.json` in
/// the data directory whenever it changes, before the node acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The configuration id (1: the seed configuration from the settings).
    pub config_id: u32,
    /// Members: id → address ("host:port").
    pub members: BTreeMap<u64, String>,
    /// Admin API base URLs of members, where given (`node add --admin`);
    /// the proxy fences in-flight statements through them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub admin: BTreeMap<u64, String>,
}

/// What `membership.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MembershipFile {
    membership: Membership,
    /// This node is not a member of `membership` (it was removed).
    removed: bool,
}

const MEMBERSHIP_FILE: &str = "membership.json";

fn config_dir(data_dir: &Path, config_id: u32) -> PathBuf {
    if config_id <= 1 {
        data_dir.to_owned()
    } else {
        data_dir.join(format!("config-{config_id}"))
    }
}

fn read_membership(data_dir: &Path) -> Result<Option<MembershipFile>, ServiceError> {
    let path = data_dir.join(MEMBERSHIP_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ServiceError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServiceError::Config(format!("{}: {e}", path.display()))),
    }
}

/// Writes `membership.json` atomically (temporary file, fsync, rename,
/// directory fsync).
fn write_membership(data_dir: &Path, file: &MembershipFile) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join("membership.json.tmp");
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(MEMBERSHIP_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// A membership change was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigureError {
    /// The requested change is not valid (unknown id, already a member,
    /// more than one node changed, too few nodes left…).
    #[error("invalid membership change: {0}")]
    Invalid(String),
    /// This node is not a member of the current configuration.
    #[error("this node is not a member of the catalog cluster")]
    NotMember,
    /// A reconfiguration is already under way.
    #[error("a membership change is already under way")]
    InProgress,
    /// No answer in time; the change may still happen.
    #[error("no answer from the catalog cluster in time (the membership change may still happen)")]
    Timeout,
    /// The service stopped.
    #[error("the catalog service is shut down")]
    Shutdown,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("data_dir", &self.data_dir)
            .field("tick", &self.tick)
            .field("lease", &self.lease)
            .field("compact_after", &self.compact_after)
            .field("join", &self.join)
            .finish()
    }
}

impl ClusterSettings {
    /// Settings with the default tick (10 ms), lease (2 s) and
    /// compaction threshold (1000 entries).
    pub fn new(
        node_id: u64,
        listen: SocketAddr,
        peers: BTreeMap<u64, String>,
        secret: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> ClusterSettings {
        ClusterSettings {
            node_id,
            listen,
            peers,
            secret: secret.into(),
            data_dir: data_dir.into(),
            tick: Duration::from_millis(10),
            lease: Duration::from_secs(2),
            compact_after: crate::replica::COMPACT_AFTER,
            join: false,
        }
    }
}

/// The service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The settings are invalid.
    #[error("invalid catalog cluster settings: {0}")]
    Config(String),
    /// The log store could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The replica could not be built.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A proposal or wait got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No answer within the timeout; the command may still be applied.
    /// (Also the answer when the entry was folded into a catalog snapshot
    /// from a peer before this node applied it: it was applied at most
    /// once, and the catalog shows whether.)
    #[error("no answer from the catalog cluster in time (the command may still be applied)")]
    Timeout,
    /// The service stopped (shut down, or stopped by a storage failure:
    /// a write that cannot be made durable stops the node, it is not
    /// retried).
    #[error("the catalog service is shut down")]
    Shutdown,
    /// This node is not a member of the catalog cluster (removed, or
    /// started to join and not added yet).
    #[error("this node is not a member of the catalog cluster")]
    NotMember,
}

/// This node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: u64,
    /// The leader it follows, if known.
    pub leader: Option<u64>,
    /// Catalog epoch.
    pub epoch: u64,
    /// Log entries decided (known to this node).
    pub decided: usize,
    /// Log entries applied here.
    pub applied: usize,
    /// Log entries replaced by this node's catalog snapshot (the
    /// snapshot's index; 0: none yet).
    pub compacted: usize,
    /// Log entries stored after the snapshot (accepted, decided or not).
    pub log_len: usize,
    /// This node's lease.
    pub lease: LeaseStatus,
    /// The peers.
    pub peers: Vec<PeerStatus>,
    /// The omnipaxos configuration id (0: none yet, a joining node).
    pub config_id: u32,
    /// The members of that configuration.
    pub members: Vec<u64>,
    /// Admin API URLs of members, where the configuration change gave one.
    pub admin: BTreeMap<u64, String>,
    /// Whether this node is a member of it (false: removed, or joining).
    pub member: bool,
}

/// A node's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// Whether it may route writes.
    pub valid: bool,
    /// Time left (0 if not valid).
    pub remaining_ms: u64,
}

/// One peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    /// Its node id.
    pub id: u64,
    /// Its address.
    pub addr: String,
    /// Whether both directions of the link are up.
    pub connected: bool,
    /// The applied index it last reported.
    pub applied: Option<usize>,
}

/// What the handles and the driver share.
struct Shared {
    node_id: u64,
    /// The base of the lease clock.
    clock: Instant,
    /// Lease end, in ms since `clock` (u64::MAX: always valid).
    lease_until: AtomicU64,
    applied: AtomicUsize,
    catalog: ArcSwap<Catalog>,
    watch: watch::Sender<Arc<Catalog>>,
    status: Mutex<ClusterStatus>,
}

impl Shared {
    fn new(node_id: u64, catalog: Catalog) -> Shared {
        let catalog = Arc::new(catalog);
        let (watch, _) = watch::channel(catalog.clone());
        Shared {
            node_id,
            clock: Instant::now(),
            lease_until: AtomicU64::new(0),
            applied: AtomicUsize::new(0),
            catalog: ArcSwap::new(catalog.clone()),
            watch,
            status: Mutex::new(ClusterStatus {
                node_id,
                leader: None,
                epoch: catalog.epoch(),
                decided: 0,
                applied: 0,
                compacted: 0,
                log_len: 0,
                lease: LeaseStatus {
                    valid: false,
                    remaining_ms: 0,
                },
                peers: Vec::new(),
                config_id: 0,
                members: Vec::new(),
                admin: BTreeMap::new(),
                member: false,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn publish(&self, catalog: &Catalog, applied: usize) {
        let catalog = Arc::new(catalog.clone());
        self.catalog.store(catalog.clone());
        self.applied.store(applied, Ordering::Release);
        self.watch.send_replace(catalog);
    }
}

/// Where a proposal's answer goes.
type Answer = oneshot::Sender<Result<Result<Applied, Rejected>, ProposeError>>;

enum Request {
    Propose {
        cmd: CatalogCommand,
        reply: Answer,
    },
    AwaitApplied {
        index: usize,
        reply: oneshot::Sender<()>,
    },
    Reconfigure {
        members: BTreeMap<u64, String>,
        admin: BTreeMap<u64, String>,
        reply: oneshot::Sender<Result<Membership, ReconfigureError>>,
    },
    Shutdown,
}

/// A single node's catalog without replication.
struct LocalState {
    state: StateMachine,
    /// The data directory's lock, held as long as the catalog is open.
    _lock: Option<DirLock>,
    storage: Option<SharedStorage>,
    incarnation: u64,
    next_seq: u64,
    /// A write failed: no more proposals.
    failed: bool,
}

enum Mode {
    Local(Mutex<LocalState>),
    Cluster {
        requests: mpsc::Sender<Request>,
        partitioned: watch::Sender<bool>,
        driver: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    },
}

struct HandleInner {
    shared: Arc<Shared>,
    mode: Mode,
}

/// A cloneable handle on this node's replicated catalog. The driver stops
/// at [`CatalogHandle::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct CatalogHandle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for CatalogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.inner.mode {
            Mode::Local(_) => "local",
            Mode::Cluster { .. } => "cluster",
        };
        f.debug_struct("CatalogHandle")
            .field("node_id", &self.inner.shared.node_id)
            .field("mode", &mode)
            .field("applied", &self.applied_index())
            .finish()
    }
}

impl CatalogHandle {
    /// One node, no peers: commands apply directly (the same
    /// [`Catalog::apply`] and at-most-once bookkeeping), in memory; with a
    /// `data_dir`, every applied command is persisted (appended and
    /// fsynced) before it is applied and answered, and replayed on start.
    /// If the catalog is empty and `seed` is given, it is bootstrapped from
    /// the seed. The lease is always valid. Needs no runtime.
    pub fn local(
        seed: Option<CatalogSeed>,
        data_dir: Option<&Path>,
    ) -> Result<CatalogHandle, ServiceError> {
        // Locked before anything is read: a second process must not even
        // replay a journal the first one is writing.
        let lock = data_dir.map(DirLock::acquire).transpose()?;
        let storage = data_dir.map(SharedStorage::open).transpose()?;
        let mut state = StateMachine::new();
        let mut incarnation = 1;
        if let Some(s) = &storage {
            incarnation = s.next_incarnation()?;
            let decided = s.get_decided_idx().map_err(storage_text)?;
            let compacted = s.get_compacted_idx().map_err(storage_text)?;
            if let Some(snap) = s.get_snapshot().map_err(storage_text)? {
                if snap.len() != compacted {
                    return Err(ServiceError::Config(format!(
                        "catalog storage: the snapshot stands for {} entries, the log was compacted at {compacted}",
                        snap.len()
                    )));
                }
                state = snap.state();
            } else if compacted > 0 {
                return Err(ServiceError::Config(format!(
                    "catalog storage: log trimmed at {compacted} without a snapshot"
                )));
            }
            for e in s.get_entries(compacted, decided).map_err(storage_text)? {
                state.apply(&e);
            }
        }
        let applied = storage
            .as_ref()
            .map(|s| s.get_decided_idx().unwrap_or(0))
            .unwrap_or(0);
        let shared = Arc::new(Shared::new(1, state.catalog().clone()));
        shared.lease_until.store(u64::MAX, Ordering::Release);
        let mut local = LocalState {
            state,
            _lock: lock,
            storage,
            incarnation,
            next_seq: 1,
            failed: false,
        };
        let mut applied = applied;
        if let Some(seed) = seed {
            if local.state.catalog().snapshot().is_none() {
                if let Err(r) = local.apply(CatalogCommand::Bootstrap(seed), &mut applied)? {
                    tracing::warn!(reason = %r, "the catalog seed was rejected");
                }
            }
        }
        shared.publish(local.state.catalog(), applied);
        Ok(CatalogHandle {
            inner: Arc::new(HandleInner {
                shared,
                mode: Mode::Local(Mutex::new(local)),
            }),
        })
    }

    /// Binds `settings.listen`, opens `settings.data_dir`, and spawns the
    /// driver and the transport. Once this node has caught up (it follows
    /// a leader in its accept phase and applied all it knows decided) and
    /// the catalog is still empty, it proposes `Bootstrap(seed)`: the first
    /// bootstrap in the log wins, later ones are rejected harmlessly.
    pub async fn start(
        settings: ClusterSettings,
        seed: Option<CatalogSeed>,
    ) -> Result<CatalogHandle, ServiceError> {
        let me = settings.node_id;
        if me == 0 {
            return Err(ServiceError::Config("node_id must not be 0".into()));
        }
        if settings.peers.is_empty() {
            return Err(ServiceError::Config(
                "a cluster needs peers (use CatalogHandle::local for a single node)".into(),
            ));
        }
        if settings.peers.contains_key(&me) || settings.peers.contains_key(&0) {
            return Err(ServiceError::Config(
                "peers must not include this node or node 0".into(),
            ));
        }
        if settings.secret.is_empty() {
            return Err(ServiceError::Config("the cluster secret is empty".into()));
        }
        if settings.tick.is_zero() || settings.lease < settings.tick * 8 {
            return Err(ServiceError::Config(
                "tick must be positive and lease at least 8 ticks".into(),
            ));
        }
        // The data directory is this process's for as long as the driver
        // runs (see `DirLock`).
        let lock = DirLock::acquire(&settings.data_dir)?;
        // The configuration: from disk once there is one, else the seed
        // membership from the settings (or none yet, for a joining node).
        let saved = read_membership(&settings.data_dir)?;
        let (membership, removed) = match saved {
            Some(f) => (Some(f.membership), f.removed),
            None if settings.join => (None, false),
            None => {
                let mut members = settings.peers.clone();
                members.insert(me, settings.listen.to_string());
                (
                    Some(Membership {
                        config_id: 1,
                        members,
                        admin: BTreeMap::new(),
                    }),
                    false,
                )
            }
        };
        let replica = match (&membership, removed) {
            (Some(m), false) => {
                let storage = SharedStorage::open(&config_dir(&settings.data_dir, m.config_id))?;
                let mut config = ReplicaConfig::new(me, m.members.keys().copied().collect());
                config.config_id = m.config_id;
                config.compact_after = settings.compact_after;
                let mut replica = Replica::new(config, storage)?;
                // Replay the decided prefix before anything else happens.
                replica.apply_decided()?;
                Some(replica)
            }
            _ => None,
        };
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServiceError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let catalog = replica
            .as_ref()
            .map(|r| r.catalog().clone())
            .unwrap_or_default();
        let applied = replica.as_ref().map_or(0, Replica::applied_index);
        let shared = Arc::new(Shared::new(me, catalog.clone()));
        shared.publish(&catalog, applied);
        let mut peers = settings.peers.clone();
        if let Some(m) = &membership {
            for (id, addr) in &m.members {
                if *id != me {
                    peers.entry(*id).or_insert_with(|| addr.clone());
                }
            }
        }
        let (requests, requests_rx) = mpsc::channel(1024);
        let (partitioned, partitioned_rx) = watch::channel(false);
        let (events_tx, events) = mpsc::channel(4096);
        let net = Net::start(
            NetConfig {
                me,
                peers: std::sync::RwLock::new(peers.clone()),
                secret: settings.secret.as_bytes().to_vec(),
            },
            listener,
            events_tx,
            partitioned_rx.clone(),
        );
        let lease_ms = u64::try_from(settings.lease.as_millis()).unwrap_or(u64::MAX);
        let member_peers: Vec<u64> = membership
            .as_ref()
            .map(|m| m.members.keys().copied().filter(|id| *id != me).collect())
            .unwrap_or_default();
        let mut leases = Leases::new(member_peers, lease_ms);
        leases.set_applied(shared.now_ms(), applied);
        let mut driver = Driver {
            _lock: lock,
            shared: shared.clone(),
            replica,
            retired: Vec::new(),
            membership,
            removed,
            data_dir: settings.data_dir.clone(),
            listen: settings.listen.to_string(),
            compact_after: settings.compact_after,
            lease_ms,
            net: Some(net),
            reconfig: None,
            ticks: 0,
            acks_count_from: 0,
            leases,
            peers,
            out: BTreeMap::new(),
            inbound: BTreeMap::new(),
            proposals: BTreeMap::new(),
            waits: Vec::new(),
            seed,
            seed_proposed: false,
            partitioned: false,
        };
        driver.update_status();
        let task = tokio::spawn(driver.run(settings.tick, requests_rx, events, partitioned_rx));
        Ok(CatalogHandle {
            inner: Arc::new(HandleInner {
                shared,
                mode: Mode::Cluster {
                    requests,
                    partitioned,
                    driver: tokio::sync::Mutex::new(Some(task)),
                },
            }),
        })
    }

    /// The catalog as of the last applied entry (lock-free).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.shared.catalog.load_full()
    }

    /// A receiver that sees the catalog change whenever a command applied.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.inner.shared.watch.subscribe()
    }

    /// Proposes `cmd` and waits until it is decided and applied here:
    /// `Ok(Ok(applied))` or `Ok(Err(rejected))`. A follower's proposal is
    /// forwarded to the leader by omnipaxos. `Err(Timeout)` after
    /// `timeout`: the answer is unknown (the command may still be applied,
    /// at most once). Cancel-safe (dropping the future abandons the wait,
    /// not the proposal).
    pub async fn propose(
        &self,
        cmd: CatalogCommand,
        timeout: Duration,
    ) -> Result<Result<Applied, Rejected>, ProposeError> {
        match &self.inner.mode {
            Mode::Local(local) => {
                let mut local = local.lock().map_err(|_| ProposeError::Shutdown)?;
                if local.failed {
                    return Err(ProposeError::Shutdown);
                }
                let mut applied = self.applied_index();
                let outcome = match local.apply(cmd, &mut applied) {
                    Ok(o) => o,
                    Err(e) => {
                        // fsync failures are not retried (the page cache may
                        // have dropped the data): the catalog stops here.
                        tracing::error!(error = %e, "local catalog: cannot persist a command; stopping");
                        local.failed = true;
                        return Err(ProposeError::Shutdown);
                    }
                };
                self.inner.shared.publish(local.state.catalog(), applied);
                Ok(outcome)
            }
            Mode::Cluster { requests, .. } => {
                let (reply, rx) = oneshot::channel();
                let ask = async {
                    requests
                        .send(Request::Propose { cmd, reply })
                        .await
                        .map_err(|_| ProposeError::Shutdown)?;
                    rx.await.map_err(|_| ProposeError::Shutdown)?
                };
                tokio::time::timeout(timeout, ask)
                    .await
                    .unwrap_or(Err(ProposeError::Timeout))
            }
        }
    }

    /// The number of log entries applied here: one past the index of the
    /// last applied entry. Pass it to
    /// [`await_all_applied`](Self::await_all_applied) after a proposal.
    pub fn applied_index(&self) -> usize {
        self.inner.shared.applied.load(Ordering::Acquire)
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let mut s = self
            .inner
            .shared
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let until = self.inner.shared.lease_until.load(Ordering::Acquire);
        let now = self.inner.shared.now_ms();
        s.lease = LeaseStatus {
            valid: now < until,
            remaining_ms: until.saturating_sub(now),
        };
        // The snapshot is refreshed every tick; the applied index is live.
        s.applied = s.applied.max(self.applied_index());
        s.decided = s.decided.max(s.applied);
        s
    }

    /// Whether this node holds a valid lease and may route writes.
    /// Lock-free: one atomic load and a monotonic clock read.
    pub fn lease_valid(&self) -> bool {
        let until = self.inner.shared.lease_until.load(Ordering::Acquire);
        until == u64::MAX || self.inner.shared.now_ms() < until
    }

    /// Resolves when every node has reported `applied >= index` or when
    /// `lease` + margin (10 % + 50 ms) has passed since this node applied
    /// `index` entries: after either, no node can hold a lease without
    /// having applied them. `index` counts entries, as
    /// [`applied_index`](Self::applied_index) does. Waits for this node to
    /// apply them first. Cancel-safe.
    pub async fn await_all_applied(&self, index: usize) -> Result<(), ProposeError> {
        match &self.inner.mode {
            Mode::Local(_) => Ok(()),
            Mode::Cluster { requests, .. } => {
                let (reply, rx) = oneshot::channel();
                requests
                    .send(Request::AwaitApplied { index, reply })
                    .await
                    .map_err(|_| ProposeError::Shutdown)?;
                rx.await.map_err(|_| ProposeError::Shutdown)
            }
        }
    }

    /// Changes the membership to `members` (id → node-to-node address;
    /// an empty address means "as known"), which must differ from the
    /// current one by exactly one node. Proposed as an omnipaxos StopSign;
    /// answers with the new configuration once it started on this node
    /// (or this node, removed, stopped taking part). A node added must be
    /// running with [`ClusterSettings::join`]: it gets the whole catalog
    /// from the members. A timeout leaves the outcome unknown.
    pub async fn reconfigure(
        &self,
        members: BTreeMap<u64, String>,
        timeout: Duration,
    ) -> Result<Membership, ReconfigureError> {
        self.reconfigure_with_admin(members, BTreeMap::new(), timeout)
            .await
    }

    /// [`reconfigure`](Self::reconfigure), recording admin API URLs of
    /// members (kept in the configuration; those of remaining members
    /// carry over).
    pub async fn reconfigure_with_admin(
        &self,
        members: BTreeMap<u64, String>,
        admin: BTreeMap<u64, String>,
        timeout: Duration,
    ) -> Result<Membership, ReconfigureError> {
        let Mode::Cluster { requests, .. } = &self.inner.mode else {
            return Err(ReconfigureError::Invalid(
                "a single node without [cluster] has no membership to change".into(),
            ));
        };
        let (reply, rx) = oneshot::channel();
        let ask = async {
            requests
                .send(Request::Reconfigure {
                    members,
                    admin,
                    reply,
                })
                .await
                .map_err(|_| ReconfigureError::Shutdown)?;
            rx.await.map_err(|_| ReconfigureError::Shutdown)?
        };
        tokio::time::timeout(timeout, ask)
            .await
            .unwrap_or(Err(ReconfigureError::Timeout))
    }

    /// Adds node `id` at `addr` (see [`reconfigure`](Self::reconfigure)).
    pub async fn add_node(
        &self,
        id: u64,
        addr: &str,
        timeout: Duration,
    ) -> Result<Membership, ReconfigureError> {
        self.add_node_with_admin(id, addr, None, timeout).await
    }

    /// [`add_node`](Self::add_node), recording the node's admin API URL.
    pub async fn add_node_with_admin(
        &self,
        id: u64,
        addr: &str,
        admin: Option<&str>,
        timeout: Duration,
    ) -> Result<Membership, ReconfigureError> {
        self.check_cluster()?;
        let current = self.membership().ok_or(ReconfigureError::NotMember)?;
        if current.members.contains_key(&id) {
            return Err(ReconfigureError::Invalid(format!(
                "node {id} is already a member"
            )));
        }
        if addr.trim().is_empty() {
            return Err(ReconfigureError::Invalid(format!(
                "node {id} needs an address"
            )));
        }
        let mut members = current.members;
        members.insert(id, addr.to_owned());
        let admin = admin.map(|a| (id, a.to_owned())).into_iter().collect();
        self.reconfigure_with_admin(members, admin, timeout).await
    }

    /// Removes node `id` (see [`reconfigure`](Self::reconfigure)).
    pub async fn remove_node(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<Membership, ReconfigureError> {
        self.check_cluster()?;
        let current = self.membership().ok_or(ReconfigureError::NotMember)?;
        if !current.members.contains_key(&id) {
            return Err(ReconfigureError::Invalid(format!(
                "node {id} is not a member (members: {:?})",
                current.members.keys().collect::<Vec<_>>()
            )));
        }
        let mut members = current.members;
        members.remove(&id);
        self.reconfigure(members, timeout).await
    }

    fn check_cluster(&self) -> Result<(), ReconfigureError> {
        match self.inner.mode {
            Mode::Local(_) => Err(ReconfigureError::Invalid(
                "a single node without [cluster] has no membership to change".into(),
            )),
            Mode::Cluster { .. } => Ok(()),
        }
    }

    /// The current configuration as this node knows it (`None`: a joining
    /// node not added yet, or a single node).
    pub fn membership(&self) -> Option<Membership> {
        let st = self.status();
        if st.config_id == 0 {
            return None;
        }
        let addrs: BTreeMap<u64, String> =
            st.peers.iter().map(|p| (p.id, p.addr.clone())).collect();
        Some(Membership {
            config_id: st.config_id,
            admin: st.admin.clone(),
            members: st
                .members
                .iter()
                .map(|id| (*id, addrs.get(id).cloned().unwrap_or_default()))
                .collect(),
        })
    }

    /// **Test-only fault injection.** While on, the node drops all traffic
    /// to and from its peers: its connections are closed and new ones are
    /// refused. Setting it back to false reconnects.
    pub fn set_partitioned(&self, on: bool) {
        if let Mode::Cluster { partitioned, .. } = &self.inner.mode {
            partitioned.send_replace(on);
        }
    }

    /// Stops the driver and the transport and waits for them (the listening
    /// port is free when this returns). Pending proposals get
    /// [`ProposeError::Shutdown`]. Idempotent.
    pub async fn shutdown(&self) {
        if let Mode::Cluster {
            requests, driver, ..
        } = &self.inner.mode
        {
            let _ = requests.send(Request::Shutdown).await;
            if let Some(task) = driver.lock().await.take() {
                let _ = task.await;
            }
        }
    }

    /// Whether the catalog survives a restart of this process: a cluster
    /// replica always keeps it in its data directory; a local handle only
    /// when it was opened with one.
    pub fn is_durable(&self) -> bool {
        match &self.inner.mode {
            Mode::Local(l) => l
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .storage
                .is_some(),
            Mode::Cluster { .. } => true,
        }
    }

    /// This node's id (1 for a local handle).
    pub fn node_id(&self) -> u64 {
        self.inner.shared.node_id
    }
}

fn storage_text(e: Box<dyn std::error::Error>) -> ServiceError {
    ServiceError::Config(format!("catalog storage: {e}"))
}

impl LocalState {
    fn apply(
        &mut self,
        cmd: CatalogCommand,
        applied: &mut usize,
    ) -> Result<Result<Applied, Rejected>, ServiceError> {
        let entry = CatalogEntry {
            id: ProposalId {
                node: 1,
                incarnation: self.incarnation,
                seq: self.next_seq,
            },
            cmd,
        };
        self.next_seq += 1;
        if let Some(s) = self.storage.as_mut() {
            use omnipaxos::storage::StorageOp;
            s.write_atomically(vec![
                StorageOp::AppendEntry(entry.clone()),
                StorageOp::SetDecidedIndex(*applied + 1),
            ])
            .map_err(storage_text)?;
        }
        *applied += 1;
        let outcome = self.state.apply(&entry);
        if let Some(s) = self.storage.as_mut() {
            // Same rule as a replica: compact once more than
            // COMPACT_AFTER entries follow the snapshot. A failure leaves
            // the log as it is (the entry above is durable).
            let compacted = s.get_compacted_idx().unwrap_or(0);
            if *applied - compacted > crate::replica::COMPACT_AFTER {
                use omnipaxos::storage::StorageOp;
                let snap = CatalogSnapshot::of_state(self.state.clone(), *applied);
                if let Err(e) = s.write_atomically(vec![
                    StorageOp::Trim(*applied),
                    StorageOp::SetCompactedIdx(*applied),
                    StorageOp::SetSnapshot(Some(snap)),
                ]) {
                    tracing::error!(error = %e, "cannot compact the local catalog log");
                }
            }
        }
        Ok(match outcome {
            Outcome::Applied(a) => Ok(a),
            Outcome::Rejected(r) => Err(r),
            // Fresh ids only: a local entry is never stale.
            Outcome::Stale => {
                return Err(ServiceError::Config(
                    "a local catalog entry came out stale (incarnation counter reset?)".into(),
                ))
            }
        })
    }
}

/// The driver task's state.
struct Driver {
    /// The data directory's lock: released when the driver ends.
    _lock: DirLock,
    shared: Arc<Shared>,
    /// The replica of the current configuration; `None` while joining or
    /// once removed.
    replica: Option<Replica>,
    /// Replicas of ended configurations, still run so that peers that have
    /// not learned the end (the decided StopSign) learn it from us.
    retired: Vec<Replica>,
    membership: Option<Membership>,
    /// Not a member of `membership` (removed).
    removed: bool,
    data_dir: PathBuf,
    /// Our node-to-node address, as the settings give it.
    listen: String,
    compact_after: usize,
    lease_ms: u64,
    net: Option<Net>,
    /// A reconfiguration proposed here: the configuration id it makes, and
    /// who waits for it.
    reconfig: Option<(u32, oneshot::Sender<Result<Membership, ReconfigureError>>)>,
    ticks: u64,
    /// Until then (ms on the lease clock), `await_all_applied` does not
    /// take "every member acknowledged" as enough: a node that left the
    /// configuration may still hold a lease from the old one (granted by
    /// peers that had not switched yet), and it is not among the members
    /// that acknowledge. Only `lease + margin` after the switch is that
    /// lease surely over.
    acks_count_from: u64,
    leases: Leases,
    peers: BTreeMap<u64, String>,
    /// Sending side of the current outgoing link per peer.
    out: BTreeMap<u64, (u64, mpsc::Sender<Wire>)>,
    /// Current incoming link per peer: its generation, and the stop signal.
    inbound: BTreeMap<u64, (u64, oneshot::Sender<()>)>,
    proposals: BTreeMap<Ticket, Answer>,
    waits: Vec<(usize, oneshot::Sender<()>)>,
    seed: Option<CatalogSeed>,
    seed_proposed: bool,
    /// Fault injection: drop every link.
    partitioned: bool,
}

/// Ticks between two announcements of a configuration to its members.
const ANNOUNCE_TICKS: u64 = 50;

impl Driver {
    async fn run(
        mut self,
        tick: Duration,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::Receiver<NetEvent>,
        mut partitioned: watch::Receiver<bool>,
    ) {
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Every branch is cancel-safe (interval tick, mpsc recv, watch
            // changed).
            tokio::select! {
                _ = timer.tick() => self.on_tick(),
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                req = requests.recv() => match req {
                    Some(Request::Propose { cmd, reply }) => self.on_propose(cmd, reply),
                    Some(Request::AwaitApplied { index, reply }) => {
                        self.waits.push((index, reply));
                        self.check_waits();
                    }
                    Some(Request::Reconfigure { members, admin, reply }) => {
                        self.on_reconfigure(members, admin, reply);
                    }
                    Some(Request::Shutdown) | None => break,
                },
                changed = partitioned.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.partitioned = *partitioned.borrow_and_update();
                    if self.partitioned {
                        tracing::info!(node = self.shared.node_id, "catalog links partitioned (fault injection)");
                        self.out.clear();
                        self.inbound.clear();
                    }
                }
            }
            self.after_input();
        }
        // Pending proposals and waits see their senders dropped: Shutdown.
        self.out.clear();
        self.inbound.clear();
        self.proposals.clear();
        self.waits.clear();
        self.reconfig = None;
        drop(events);
        if let Some(net) = self.net.take() {
            net.stop().await;
        }
        self.shared.lease_until.store(0, Ordering::Release);
        tracing::debug!(node = self.shared.node_id, "catalog driver stopped");
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        for r in &mut self.retired {
            let _ = r.tick();
        }
        if let Some(r) = self.replica.as_mut() {
            if let Err(e) = r.tick() {
                tracing::error!(node = self.shared.node_id, error = %e, "catalog replica tick failed");
            }
            let now = self.shared.now_ms();
            let pings = self.leases.tick(now, r.applied_index(), r.log_len());
            for (peer, msg) in pings {
                self.send(peer, Wire::Lease(msg));
            }
        }
        // A configuration made by a reconfiguration is announced to its
        // members: a node it added has no log to learn it from.
        if self.ticks.is_multiple_of(ANNOUNCE_TICKS) && !self.removed {
            if let Some(m) = self.membership.clone().filter(|m| m.config_id > 1) {
                let me = self.shared.node_id;
                for id in m.members.keys().copied().filter(|id| *id != me) {
                    self.send(id, Wire::Config(m.clone()));
                }
            }
        }
        self.maybe_bootstrap();
        self.check_waits();
        self.update_status();
    }

    fn maybe_bootstrap(&mut self) {
        if self.seed_proposed || self.seed.is_none() {
            return;
        }
        let Some(r) = self.replica.as_mut() else {
            return;
        };
        let st = r.status();
        let caught_up = st.leader.is_some() && st.accepting && st.decided == st.applied;
        if !caught_up {
            return;
        }
        self.seed_proposed = true;
        if r.catalog().snapshot().is_some() {
            return;
        }
        if let Some(seed) = self.seed.take() {
            tracing::info!(
                node = self.shared.node_id,
                "catalog is empty: proposing the bootstrap seed"
            );
            if let Err(e) = r.propose(CatalogCommand::Bootstrap(seed)) {
                tracing::error!(node = self.shared.node_id, error = %e, "cannot propose the bootstrap seed");
            }
        }
    }

    fn on_propose(&mut self, cmd: CatalogCommand, reply: Answer) {
        let Some(r) = self.replica.as_mut() else {
            let _ = reply.send(Err(ProposeError::NotMember));
            return;
        };
        match r.propose(cmd) {
            Ok(ticket) => {
                self.proposals.insert(ticket, reply);
            }
            Err(ReplicaError::Reconfiguring) => {
                // Answered when the next configuration starts here (the
                // caller may retry then); a timeout is the usual answer.
                let _ = reply.send(Err(ProposeError::Timeout));
            }
            Err(e) => {
                tracing::error!(node = self.shared.node_id, error = %e, "cannot propose a catalog command");
                let _ = reply.send(Err(ProposeError::Shutdown));
            }
        }
    }

    /// Checks a membership change against the current configuration and
    /// proposes it (a StopSign naming the next configuration, with the
    /// members' addresses as metadata).
    fn on_reconfigure(
        &mut self,
        members: BTreeMap<u64, String>,
        admin: BTreeMap<u64, String>,
        reply: oneshot::Sender<Result<Membership, ReconfigureError>>,
    ) {
        let me = self.shared.node_id;
        let (Some(r), Some(current)) = (self.replica.as_mut(), self.membership.as_ref()) else {
            let _ = reply.send(Err(ReconfigureError::NotMember));
            return;
        };
        if self.reconfig.is_some() || r.stopping() {
            let _ = reply.send(Err(ReconfigureError::InProgress));
            return;
        }
        if let Err(e) = check_change(&current.members, &members) {
            let _ = reply.send(Err(ReconfigureError::Invalid(e)));
            return;
        }
        // Addresses: given for a new node; known ones for the others.
        let mut next = BTreeMap::new();
        for (id, addr) in &members {
            let known = if *id == me {
                current
                    .members
                    .get(id)
                    .cloned()
                    .or_else(|| Some(self.listen.clone()))
            } else {
                current
                    .members
                    .get(id)
                    .cloned()
                    .or_else(|| self.peers.get(id).cloned())
            };
            let addr = if addr.is_empty() {
                known.unwrap_or_default()
            } else {
                addr.clone()
            };
            next.insert(*id, addr);
        }
        let mut admin_next = current.admin.clone();
        admin_next.extend(admin);
        admin_next.retain(|id, _| next.contains_key(id));
        let target = Membership {
            config_id: current.config_id + 1,
            members: next,
            admin: admin_next,
        };
        let metadata = match serde_json::to_vec(&target) {
            Ok(m) => m,
            Err(e) => {
                let _ = reply.send(Err(ReconfigureError::Invalid(e.to_string())));
                return;
            }
        };
        // The new node must be reachable before the change is decided.
        for (id, addr) in &target.members {
            if *id != me && !addr.is_empty() {
                self.peers.entry(*id).or_insert_with(|| addr.clone());
                if let Some(net) = self.net.as_mut() {
                    net.add_peer(*id, addr.clone());
                }
            }
        }
        match r.reconfigure(target.members.keys().copied().collect(), metadata) {
            Ok(()) => {
                tracing::info!(node = me, config = target.config_id, members = ?target.members.keys().collect::<Vec<_>>(), "catalog membership change proposed");
                self.reconfig = Some((target.config_id, reply));
            }
            Err(ReplicaError::Reconfiguring) => {
                let _ = reply.send(Err(ReconfigureError::InProgress));
            }
            Err(e) => {
                let _ = reply.send(Err(ReconfigureError::Invalid(e.to_string())));
            }
        }
    }

    /// Once the current configuration's StopSign is decided and everything
    /// before it applied: starts the next configuration (or stops
    /// participating, if this node is not in it).
    fn check_stopped(&mut self) {
        let Some(r) = self.replica.as_ref() else {
            return;
        };
        let Some(ss) = r.stopped() else {
            return;
        };
        // The StopSign is the last decided entry; everything before it
        // must be applied: its state is the next configuration's start.
        if r.applied_index() + 1 != r.decided_index() {
            return;
        }
        let next = ss
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_slice::<Membership>(m).ok())
            .filter(|m| m.config_id == ss.next_config.configuration_id)
            .unwrap_or_else(|| Membership {
                config_id: ss.next_config.configuration_id,
                members: ss
                    .next_config
                    .nodes
                    .iter()
                    .map(|id| (*id, self.peers.get(id).cloned().unwrap_or_default()))
                    .collect(),
                admin: BTreeMap::new(),
            });
        let start = (r.state().clone(), r.applied_index());
        self.switch(next, Some(start));
    }

    /// Moves to configuration `next`: persists it, learns the new peers,
    /// retires the current replica and, if this node is a member, starts
    /// the next one over a fresh log that begins with `start` (the state
    /// as of the StopSign and its length; `None`: a node that learned the
    /// configuration from an announcement and gets the catalog from the
    /// members).
    fn switch(&mut self, next: Membership, start: Option<(StateMachine, usize)>) {
        let me = self.shared.node_id;
        let removed = !next.members.contains_key(&me);
        // The next configuration's log, with the catalog as of the
        // StopSign, is made durable before the membership that points to
        // it: a crash in between restarts in the old configuration, which
        // sees the same StopSign and finds the new log ready.
        let storage = if removed {
            None
        } else {
            let opened = (|| -> Result<SharedStorage, ServiceError> {
                let storage = SharedStorage::open(&config_dir(&self.data_dir, next.config_id))?;
                if let Some((state, len)) = start {
                    if storage.get_decided_idx().unwrap_or(0) == 0
                        && storage.get_compacted_idx().unwrap_or(0) == 0
                    {
                        storage.preload(state, len)?;
                    }
                }
                Ok(storage)
            })();
            match opened {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(node = me, error = %e, "cannot prepare the next catalog configuration's log; retrying");
                    return;
                }
            }
        };
        let file = MembershipFile {
            membership: next.clone(),
            removed,
        };
        // Then the membership: a restart must come back in this
        // configuration.
        if let Err(e) = write_membership(&self.data_dir, &file) {
            tracing::error!(node = me, error = %e, "cannot persist the catalog membership; retrying");
            return;
        }
        for (id, addr) in &next.members {
            if *id != me && !addr.is_empty() {
                self.peers.entry(*id).or_insert_with(|| addr.clone());
                if let Some(net) = self.net.as_mut() {
                    net.add_peer(*id, addr.clone());
                }
            }
        }
        // The old replica's tickets mean nothing to the next one; what was
        // still pending was not decided before the StopSign and never will
        // be in that configuration.
        for (_, reply) in std::mem::take(&mut self.proposals) {
            let _ = reply.send(Err(ProposeError::Timeout));
        }
        if let Some(old) = self.replica.take() {
            self.retired.push(old);
            if self.retired.len() > 2 {
                self.retired.remove(0);
            }
        }
        self.membership = Some(next.clone());
        self.removed = removed;
        if removed {
            tracing::warn!(
                node = me,
                config = next.config_id,
                "this node was removed from the catalog cluster; it no longer takes part"
            );
            self.answer_reconfig(&next);
            return;
        }
        let Some(storage) = storage else {
            return;
        };
        let started = (|| -> Result<Replica, ServiceError> {
            let mut config = ReplicaConfig::new(me, next.members.keys().copied().collect());
            config.config_id = next.config_id;
            config.compact_after = self.compact_after;
            let mut replica = Replica::new(config, storage)?;
            replica.apply_decided()?;
            Ok(replica)
        })();
        match started {
            Ok(mut replica) => {
                for peer in next.members.keys().copied().filter(|p| *p != me) {
                    if self.out.contains_key(&peer) || self.inbound.contains_key(&peer) {
                        replica.reconnected(peer);
                    }
                }
                tracing::info!(node = me, config = next.config_id, members = ?next.members.keys().collect::<Vec<_>>(), applied = replica.applied_index(), "catalog configuration started");
                let peers: Vec<u64> = next.members.keys().copied().filter(|p| *p != me).collect();
                self.leases = Leases::new(peers, self.lease_ms);
                self.acks_count_from =
                    self.shared.now_ms() + self.lease_ms + self.leases.margin_ms();
                self.leases
                    .set_applied(self.shared.now_ms(), replica.applied_index());
                self.shared
                    .publish(replica.catalog(), replica.applied_index());
                self.replica = Some(replica);
                self.answer_reconfig(&next);
            }
            Err(e) => {
                // Safety over liveness: the node stops taking part rather
                // than guess; a restart retries from membership.json.
                tracing::error!(node = me, error = %e, "cannot start the next catalog configuration");
            }
        }
        self.update_status();
    }

    fn answer_reconfig(&mut self, next: &Membership) {
        if self
            .reconfig
            .as_ref()
            .is_some_and(|(id, _)| *id <= next.config_id)
        {
            if let Some((_, reply)) = self.reconfig.take() {
                let _ = reply.send(Ok(next.clone()));
            }
        }
    }

    fn on_event(&mut self, ev: NetEvent) {
        let me = self.shared.node_id;
        match ev {
            NetEvent::OutUp { peer, gen, tx } => {
                if self.partitioned {
                    return; // dropping tx closes it
                }
                // Before anything is sent on the new link.
                self.reconnected(peer);
                self.out.insert(peer, (gen, tx));
            }
            NetEvent::OutDown { peer, gen } => {
                if self.out.get(&peer).is_some_and(|(g, _)| *g == gen) {
                    self.out.remove(&peer);
                }
            }
            NetEvent::InUp { peer, gen, stop } => {
                if self.partitioned {
                    return;
                }
                // Before anything is delivered from the new link; replacing
                // the entry drops the old link's stop, closing it.
                self.reconnected(peer);
                self.inbound.insert(peer, (gen, stop));
            }
            NetEvent::InDown { peer, gen } => {
                if self.inbound.get(&peer).is_some_and(|(g, _)| *g == gen) {
                    self.inbound.remove(&peer);
                }
            }
            NetEvent::In { peer, gen, wire } => {
                if self.inbound.get(&peer).is_none_or(|(g, _)| *g != gen) {
                    return; // a superseded or closed link
                }
                match wire {
                    Wire::Paxos { cfg, msg } => {
                        if msg.get_sender() != peer || msg.get_receiver() != me {
                            tracing::warn!(
                                node = me,
                                peer,
                                "dropping a catalog message with a forged sender or receiver"
                            );
                            return;
                        }
                        // To the replica of that configuration, if the
                        // sender is one of its members (omnipaxos indexes
                        // its peers by id).
                        let target = self
                            .replica
                            .iter_mut()
                            .chain(self.retired.iter_mut())
                            .find(|r| r.config_id() == cfg);
                        if let Some(r) = target {
                            if r.nodes().contains(&peer) {
                                r.handle(*msg);
                            }
                        }
                    }
                    Wire::Config(m) => {
                        let newer = self
                            .membership
                            .as_ref()
                            .is_none_or(|cur| m.config_id > cur.config_id);
                        if newer && m.members.contains_key(&peer) && m.members.contains_key(&me) {
                            tracing::info!(
                                node = me,
                                peer,
                                config = m.config_id,
                                "joining the catalog configuration a member announced"
                            );
                            self.switch(m, None);
                        }
                    }
                    Wire::Lease(msg) => {
                        let Some(r) = self.replica.as_ref() else {
                            return;
                        };
                        if !r.nodes().contains(&peer) {
                            return;
                        }
                        // Apply first, so a pong reports what we applied.
                        self.apply();
                        let Some(r) = self.replica.as_ref() else {
                            return;
                        };
                        let now = self.shared.now_ms();
                        let reply =
                            self.leases
                                .handle(now, peer, msg, r.applied_index(), r.log_len());
                        if let Some(reply) = reply {
                            self.send(peer, Wire::Lease(reply));
                        }
                    }
                }
            }
        }
    }

    fn reconnected(&mut self, peer: u64) {
        for r in self.replica.iter_mut().chain(self.retired.iter_mut()) {
            if r.nodes().contains(&peer) {
                r.reconnected(peer);
            }
        }
    }

    /// Sends on the current link to `peer`, if any. A full queue counts as
    /// a broken link: dropping the sender closes the connection (after
    /// what is queued), the transport dials again, and both ends call
    /// `reconnected` on the new link.
    fn send(&mut self, peer: u64, wire: Wire) {
        let Some((_, tx)) = self.out.get(&peer) else {
            return; // no link: lost, as on a broken connection
        };
        if tx.try_send(wire).is_err() {
            tracing::warn!(
                node = self.shared.node_id,
                peer,
                "catalog link to peer is backed up: reconnecting"
            );
            self.out.remove(&peer);
        }
    }

    fn after_input(&mut self) {
        self.apply();
        self.check_stopped();
        let mut out = Vec::new();
        for r in self.retired.iter_mut().chain(self.replica.iter_mut()) {
            let cfg = r.config_id();
            out.extend(r.outgoing().into_iter().map(|m| (cfg, m)));
        }
        for (cfg, m) in out {
            let to = m.get_receiver();
            self.send(
                to,
                Wire::Paxos {
                    cfg,
                    msg: Box::new(m),
                },
            );
        }
        let until = if self.replica.is_some() {
            self.leases.valid_until()
        } else {
            0
        };
        self.shared.lease_until.store(until, Ordering::Release);
    }

    /// Applies what was decided, answers proposals, publishes the catalog.
    fn apply(&mut self) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let decided = match replica.apply_decided() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(node = self.shared.node_id, error = %e, "catalog replica cannot apply the log");
                return;
            }
        };
        for ticket in replica.take_lost() {
            if let Some(reply) = self.proposals.remove(&ticket) {
                tracing::warn!(
                    node = self.shared.node_id,
                    "a proposal's outcome was compacted into a snapshot before this node applied it"
                );
                let _ = reply.send(Err(ProposeError::Timeout));
            }
        }
        let applied = replica.applied_index();
        if decided.is_empty() && self.shared.applied.load(Ordering::Acquire) == applied {
            return;
        }
        // Publish before answering: a proposer reads its own write (and
        // the applied index that includes it).
        self.shared.publish(replica.catalog(), applied);
        self.leases.set_applied(self.shared.now_ms(), applied);
        for d in &decided {
            let Some(ticket) = d.ticket else { continue };
            let Some(reply) = self.proposals.remove(&ticket) else {
                continue; // the bootstrap seed, or an abandoned wait
            };
            let answer = match &d.outcome {
                Outcome::Applied(a) => Ok(a.clone()),
                Outcome::Rejected(r) => Err(r.clone()),
                // The replica re-proposes a stale proposal itself and never
                // answers a ticket with Stale.
                Outcome::Stale => continue,
            };
            let _ = reply.send(Ok(answer));
        }
        self.check_waits();
    }

    fn check_waits(&mut self) {
        if self.waits.is_empty() {
            return;
        }
        let now = self.shared.now_ms();
        let leases = &self.leases;
        let acks_count = now >= self.acks_count_from;
        let mut keep = Vec::new();
        for (index, reply) in self.waits.drain(..) {
            let done = (acks_count && leases.all_applied(index))
                || leases.safe_after(index).is_some_and(|t| now >= t);
            if done {
                let _ = reply.send(());
            } else if !reply.is_closed() {
                keep.push((index, reply));
            }
        }
        self.waits = keep;
    }

    fn update_status(&mut self) {
        let me = self.shared.node_id;
        let (config_id, members, admin) = self
            .membership
            .as_ref()
            .map(|m| {
                (
                    m.config_id,
                    m.members.keys().copied().collect::<Vec<_>>(),
                    m.admin.clone(),
                )
            })
            .unwrap_or_default();
        let peers = self
            .peers
            .iter()
            .filter(|(id, _)| members.is_empty() || members.contains(id))
            .map(|(&id, addr)| PeerStatus {
                id,
                addr: addr.clone(),
                connected: self.out.contains_key(&id) && self.inbound.contains_key(&id),
                applied: self.leases.peer_applied(id),
            })
            .collect();
        let st = self.replica.as_ref().map(Replica::status);
        let status = ClusterStatus {
            node_id: me,
            leader: st.as_ref().and_then(|s| s.leader),
            epoch: self.shared.catalog.load().epoch(),
            decided: st
                .as_ref()
                .map_or(self.shared.applied.load(Ordering::Acquire), |s| s.decided),
            applied: st
                .as_ref()
                .map_or(self.shared.applied.load(Ordering::Acquire), |s| s.applied),
            compacted: st.as_ref().map_or(0, |s| s.compacted),
            log_len: st.as_ref().map_or(0, |s| s.log_len),
            lease: LeaseStatus {
                valid: false,
                remaining_ms: 0,
            },
            peers,
            config_id,
            member: self.replica.is_some() && members.contains(&me),
            members,
            admin,
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = status;
        }
    }
}

/// Checks that `next` differs from `current` by exactly one node: one
/// added (a new, non-zero id with an address) or one removed (keeping at
/// least two nodes).
fn check_change(
    current: &BTreeMap<u64, String>,
    next: &BTreeMap<u64, String>,
) -> Result<(), String> {
    if next.contains_key(&0) {
        return Err("node id 0 is not valid".into());
    }
    let added: Vec<u64> = next
        .keys()
        .copied()
        .filter(|id| !current.contains_key(id))
        .collect();
    let removed: Vec<u64> = current
        .keys()
        .copied()
        .filter(|id| !next.contains_key(id))
        .collect();
    match (added.as_slice(), removed.as_slice()) {
        ([], []) => Err("the membership would not change".into()),
        ([id], []) => {
            if next.get(id).is_none_or(|a| a.is_empty()) {
                Err(format!("node {id} needs an address"))
            } else {
                Ok(())
            }
        }
        ([], [_]) if next.len() < 2 => Err(format!(
            "the cluster would have {} node(s) left; a replicated catalog needs at least 2",
            next.len()
        )),
        ([], [_]) => Ok(()),
        _ => Err(format!(
            "add or remove one node at a time (adding {added:?}, removing {removed:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[u64]) -> BTreeMap<u64, String> {
        ids.iter().map(|id| (*id, format!("h{id}:1"))).collect()
    }

    #[test]
    fn membership_changes_are_one_node_at_a_time_and_keep_two() {
        let three = members(&[1, 2, 3]);
        assert_eq!(check_change(&three, &members(&[1, 2, 3, 4])), Ok(()));
        assert_eq!(check_change(&three, &members(&[1, 2])), Ok(()));
        let err = |next: &[u64]| check_change(&three, &members(next)).expect_err("refused");
        assert!(err(&[1, 2, 3]).contains("would not change"));
        assert!(err(&[1]).contains("one node at a time"));
        assert!(err(&[1, 2, 4]).contains("one node at a time"));
        assert!(err(&[1, 2, 3, 4, 5]).contains("one node at a time"));
        assert!(err(&[0, 1, 2, 3]).contains("id 0"));
        let two = members(&[1, 2]);
        let e = check_change(&two, &members(&[1])).expect_err("last but one");
        assert!(e.contains("at least 2"), "{e}");
        let mut no_addr = three.clone();
        no_addr.insert(4, String::new());
        let e = check_change(&three, &no_addr).expect_err("address");
        assert!(e.contains("needs an address"), "{e}");
    }

    #[test]
    fn the_membership_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("hotrepart-membership-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(read_membership(&dir).expect("no file").is_none());
        let file = MembershipFile {
            membership: Membership {
                config_id: 3,
                members: members(&[2, 3, 4]),
                admin: [(4, "http://127.0.0.1:7434".to_owned())]
                    .into_iter()
                    .collect(),
            },
            removed: false,
        };
        write_membership(&dir, &file).expect("write");
        let back = read_membership(&dir).expect("read").expect("a file");
        assert_eq!(back.membership, file.membership);
        assert!(!back.removed);
        assert_eq!(config_dir(&dir, 1), dir);
        assert_eq!(config_dir(&dir, 3), dir.join("config-3"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
