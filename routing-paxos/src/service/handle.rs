//! [`CatalogHandle`]: the cloneable handle the rest of the node holds on
//! its catalog, in either mode: a cluster node (requests go to the driver
//! task, [`super::driver`]) or a single node ([`super::local`]). Reads
//! (catalog, applied index, lease) never wait for the driver.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::driver;
use super::error::{ProposeError, ReconfigureError, ServiceError};
use super::fault::PartitionSwitch;
use super::local::LocalState;
use super::settings::ClusterSettings;
use super::shared::{Request, Shared};
use super::status::{ClusterStatus, LeaseStatus};
use crate::catalog::{Applied, Catalog, Rejected};
use crate::command::{CatalogCommand, CatalogSeed};
use crate::membership::Membership;

/// How this node keeps its catalog.
/// How long [`CatalogHandle::shutdown`] waits for the driver before it
/// aborts it.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

enum Mode {
    /// A single node: the state machine itself, applied under this lock.
    Local(Mutex<LocalState>),
    /// A cluster node: requests to the driver task.
    Cluster {
        requests: mpsc::Sender<Request>,
        partition: PartitionSwitch,
        /// The driver task, owned here: [`CatalogHandle::shutdown`] takes
        /// and awaits it. Dropped without it (the last handle dropped),
        /// the task is detached but ends by itself, its request channel
        /// being closed.
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
        let (shared, local) = LocalState::open(seed, data_dir)?;
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
        settings.validate()?;
        let (shared, running) = driver::spawn(settings, seed).await?;
        Ok(CatalogHandle {
            inner: Arc::new(HandleInner {
                shared,
                mode: Mode::Cluster {
                    requests: running.requests,
                    partition: running.partition,
                    driver: tokio::sync::Mutex::new(Some(running.task)),
                },
            }),
        })
    }

    /// The catalog as of the last applied entry (lock-free).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.shared.catalog.load_full()
    }

    /// The routing epoch of the catalog as of the last applied entry
    /// (lock-free). Read after [`lease_valid`](Self::lease_valid), it is at
    /// least the epoch of the catalog the lease was granted on: the driver
    /// publishes what it applied before it extends the lease.
    pub fn epoch(&self) -> u64 {
        self.inner.shared.catalog.load().epoch()
    }

    /// The catalog's [`schema_generation`](Catalog::schema_generation) as
    /// of the last applied entry (lock-free). Read after
    /// [`lease_valid`](Self::lease_valid), it counts every `SchemaChanged`
    /// the lease was granted on.
    pub fn schema_generation(&self) -> u64 {
        self.inner.shared.catalog.load().schema_generation()
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
                local.propose(cmd, &self.inner.shared)
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
        s.decisions = self.catalog().decision_count();
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
        // The membership read above may be older than the driver's: a
        // change decided meanwhile already added the node.
        self.reconfigure_with_admin(members, admin, timeout)
            .await
            .map_err(|e| unchanged_as(e, || format!("node {id} is already a member")))
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
        self.reconfigure(members, timeout)
            .await
            .map_err(|e| unchanged_as(e, || format!("node {id} is not a member")))
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
        if let Mode::Cluster { partition, .. } = &self.inner.mode {
            partition.set(on);
        }
    }

    /// Stops the driver and the transport and waits for them (the listening
    /// port is free when this returns). Pending proposals get
    /// [`ProposeError::Shutdown`]. Idempotent. Bounded: a driver that has
    /// not stopped [`SHUTDOWN_LIMIT`] after the request is aborted (with
    /// its transport), and an error is logged.
    pub async fn shutdown(&self) {
        if let Mode::Cluster {
            requests, driver, ..
        } = &self.inner.mode
        {
            let deadline = tokio::time::Instant::now() + SHUTDOWN_LIMIT;
            let _ = tokio::time::timeout_at(deadline, requests.send(Request::Shutdown)).await;
            if let Some(mut task) = driver.lock().await.take() {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    tracing::error!(
                        node = self.inner.shared.node_id,
                        limit_s = SHUTDOWN_LIMIT.as_secs(),
                        "the catalog driver did not stop in time after the shutdown request; it is aborted"
                    );
                    task.abort();
                    let _ = task.await;
                }
            }
        }
    }

    /// Whether the catalog survives a restart of this process: a cluster
    /// replica always keeps it in its data directory; a local handle only
    /// when it was opened with one.
    pub fn is_durable(&self) -> bool {
        match &self.inner.mode {
            Mode::Local(l) => l.lock().unwrap_or_else(|e| e.into_inner()).is_durable(),
            Mode::Cluster { .. } => true,
        }
    }

    /// This node's id (1 for a local handle).
    pub fn node_id(&self) -> u64 {
        self.inner.shared.node_id
    }
}

/// A change found empty by the driver (whose membership may be newer than
/// the one the caller read) reported in the caller's words.
fn unchanged_as(e: ReconfigureError, words: impl FnOnce() -> String) -> ReconfigureError {
    match e {
        ReconfigureError::Invalid(m) if m.contains("would not change") => {
            ReconfigureError::Invalid(words())
        }
        e => e,
    }
}

#[cfg(test)]
mod unchanged_tests {
    use super::*;

    /// `proxyctl node add` through a node that had not yet learnt of the
    /// change that added the node got "the membership would not change"
    /// (seen in CI); it must say what the caller asked about.
    #[test]
    fn an_empty_change_is_told_in_the_callers_words() {
        let e = unchanged_as(
            ReconfigureError::Invalid("the membership would not change".into()),
            || "node 4 is already a member".into(),
        );
        assert!(matches!(e, ReconfigureError::Invalid(m) if m == "node 4 is already a member"));
        let e = unchanged_as(ReconfigureError::InProgress, || unreachable!());
        assert!(matches!(e, ReconfigureError::InProgress));
    }
}
