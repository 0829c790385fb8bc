//! What the handles and the driver share: the published state
//! ([`Shared`]: catalog, applied index, lease end, status) and the
//! requests a handle sends to the driver ([`Request`]).
//!
//! The driver (or, in local mode, the handle itself under its lock) is the
//! only writer of [`Shared`]; handles read it without a lock (atomics and
//! an `ArcSwap`), except the status snapshot behind a mutex.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};

use super::error::{ProposeError, ReconfigureError};
use super::status::{ClusterStatus, LeaseStatus};
use crate::catalog::{Applied, Catalog, Rejected};
use crate::command::CatalogCommand;
use crate::membership::Membership;

/// What the handles and the driver share.
pub(super) struct Shared {
    pub(super) node_id: u64,
    /// The base of the lease clock.
    pub(super) clock: Instant,
    /// Lease end, in ms since `clock` (u64::MAX: always valid).
    pub(super) lease_until: AtomicU64,
    pub(super) applied: AtomicUsize,
    pub(super) catalog: ArcSwap<Catalog>,
    pub(super) watch: watch::Sender<Arc<Catalog>>,
    pub(super) status: Mutex<ClusterStatus>,
}

impl Shared {
    pub(super) fn new(node_id: u64, catalog: Catalog) -> Shared {
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
                decisions: 0,
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
                stopped: None,
            }),
        }
    }

    /// Milliseconds on the lease clock.
    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Publishes `catalog` as of `applied` entries to readers and
    /// subscribers, unless what is published already stands for more
    /// entries: what a node published never goes back (an older routing
    /// epoch, forgotten 2PC decisions).
    ///
    /// Applied indexes count the entries of one history across
    /// configurations (the next configuration's log starts at the index
    /// of the previous one's StopSign), so more entries is newer. A
    /// replica can be behind what its node published: a node that joins
    /// the next configuration from a member's announcement (before its
    /// own replica of the old one decided the StopSign) starts that
    /// configuration's replica empty and gets the catalog from the
    /// members; until it has, the node keeps showing the catalog of the
    /// old configuration.
    ///
    /// Only the driver (or the local handle under its lock) publishes, so
    /// the check and the store do not race.
    pub(super) fn publish(&self, catalog: &Catalog, applied: usize) {
        if applied < self.applied.load(Ordering::Acquire) {
            return;
        }
        let catalog = Arc::new(catalog.clone());
        self.catalog.store(catalog.clone());
        self.applied.store(applied, Ordering::Release);
        self.watch.send_replace(catalog);
    }
}

/// Where a proposal's answer goes.
pub(super) type Answer = oneshot::Sender<Result<Result<Applied, Rejected>, ProposeError>>;

/// What a handle asks of the driver (cluster mode).
pub(super) enum Request {
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
