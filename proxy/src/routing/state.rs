//! The routing state of a node: the routing table every statement is
//! routed by (published lock-free), the shard indexes that go with it, the
//! plan cache, and the pins of statements in flight by the epoch they were
//! routed by ([`RoutingState::pin`], [`RoutingState::fence`]).
//!
//! Guarantee: a new routing table is published only with its shards
//! indexed and its WebAssembly functions attached; a statement routed by
//! an epoch holds a pin until it is answered, so a fence waits for it.

use crate::error::Refusal;
use crate::routing::functions::FunctionCache;
use arc_swap::ArcSwap;
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_router::route::PlanCache;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The routing table and what goes with it (see the module docs).
pub struct RoutingState {
    /// The routing table; requests load it once, lock-free.
    pub catalog: ArcSwap<RoutingSnapshot>,
    /// The shards the routing table names, by stable index (see
    /// [`ShardTable`]); replaced together with `catalog`.
    pub(crate) shards: ArcSwap<ShardTable>,
    /// Compiled routing functions, by id.
    functions: FunctionCache,
    /// The epoch of the published routing table, for sessions waiting for
    /// the next one (a write to a frozen range).
    epoch_tx: watch::Sender<u64>,
    /// Set once `catalog` holds a snapshot of the replicated catalog (until
    /// then it holds the configuration's, used only to log clients in).
    ready: AtomicBool,
    /// Plans by statement text (the lock is held for lookups and inserts
    /// only; parsing happens outside it).
    pub(crate) plans: Mutex<PlanCache>,
    /// Statements in flight, by the epoch of the routing table they were
    /// routed by.
    pins: Mutex<std::collections::BTreeMap<u64, usize>>,
    unpinned: tokio::sync::Notify,
    /// `freeze_wait_ms` of the configuration.
    freeze_wait: std::time::Duration,
}

impl std::fmt::Debug for RoutingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingState")
            .field("epoch", &self.catalog.load().epoch())
            .finish_non_exhaustive()
    }
}

impl RoutingState {
    /// The state for `snapshot` (`ready`: it is the replicated catalog's).
    pub fn new(
        snapshot: Arc<RoutingSnapshot>,
        functions: FunctionCache,
        ready: bool,
        plan_cache_size: usize,
        freeze_wait: std::time::Duration,
    ) -> RoutingState {
        let shards = ShardTable::next(&ShardTable::default(), &snapshot);
        RoutingState {
            catalog: ArcSwap::new(snapshot),
            shards: ArcSwap::from_pointee(shards),
            functions,
            epoch_tx: watch::Sender::new(0),
            ready: AtomicBool::new(ready),
            plans: Mutex::new(PlanCache::new(plan_cache_size)),
            pins: Mutex::new(Default::default()),
            unpinned: tokio::sync::Notify::new(),
            freeze_wait,
        }
    }

    /// The function cache (compiles each module once per node).
    pub fn functions(&self) -> &FunctionCache {
        &self.functions
    }

    /// Makes the routing table of `catalog` current, with its WebAssembly
    /// routing functions compiled and attached (a function that cannot be
    /// is logged; only statements that need it fail, with 39000).
    pub fn publish_catalog(&self, catalog: &hotrepart_routing_paxos::Catalog) {
        if let Some(s) = catalog.snapshot() {
            self.publish(Arc::new(resolve_functions(&self.functions, s, catalog)));
        }
    }

    /// Makes `snapshot` the routing table. Shards it adds get new indices
    /// first, so a request that loads the new snapshot always finds them.
    pub fn publish(&self, snapshot: Arc<RoutingSnapshot>) {
        let shards = ShardTable::next(&self.shards.load(), &snapshot);
        self.shards.store(Arc::new(shards));
        let epoch = snapshot.epoch();
        self.catalog.store(snapshot);
        self.ready.store(true, Ordering::Release);
        self.epoch_tx.send_replace(epoch);
    }

    /// Starts waiting out cut-overs for one statement: create it before
    /// routing, then ask [`FreezeWait::retry`] about a refusal.
    pub fn freeze_wait(&self) -> FreezeWait {
        FreezeWait {
            deadline: tokio::time::Instant::now() + self.freeze_wait,
            epochs: self.epoch_tx.subscribe(),
        }
    }

    /// Whether the replicated catalog's routing table is published.
    pub fn catalog_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Name of shard `i` (any index a routing decision returned).
    pub fn shard_name(&self, i: usize) -> String {
        self.shards
            .load()
            .list
            .get(i)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("#{i}"))
    }

    /// DSN of shard `i`.
    pub fn shard_dsn(&self, i: usize) -> Option<String> {
        self.shards.load().list.get(i).map(|s| s.dsn.clone())
    }

    /// Indices of the shards in the current routing table.
    pub fn live_shards(&self) -> Vec<usize> {
        let snap = self.catalog.load();
        let shards = self.shards.load();
        snap.shards()
            .filter_map(|s| shards.by_name.get(s.id.as_str()).copied())
            .collect()
    }

    /// Index of the shard named `name` in the current routing table.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shards.load().by_name.get(name).copied()
    }

    /// Number of shard indices handed out so far (sessions size their
    /// backend slots by it).
    pub fn shard_slots(&self) -> usize {
        self.shards.load().list.len()
    }

    /// Whether the routing table has one shard only (nothing to route).
    pub fn single_shard(&self) -> bool {
        self.shards.load().live == 1
    }

    /// Index of the home shard (undeclared tables, keyless statements).
    pub fn home_index(&self) -> usize {
        self.shards.load().home
    }

    /// Marks statements about to be routed by the current routing table as
    /// in flight until the pin is dropped (when the session has their
    /// answers). Taken before the routing table is read, so a fence that
    /// saw a newer table published also sees every pin of an older one.
    pub fn pin(self: &Arc<Self>) -> EpochPin {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.catalog.load().epoch();
        *pins.entry(epoch).or_default() += 1;
        EpochPin {
            routing: self.clone(),
            epoch,
        }
    }

    /// Waits until this node routes by the routing table of `epoch` (or a
    /// later one) and no statement routed by an older table is still in
    /// flight. A cut-over fences every node after its freeze (no write
    /// routed before the freeze can reach the source after it) and after
    /// its flip (no read routed before the flip can reach the source after
    /// the cleanup). Statements waiting out a freeze do not count: they
    /// hold no pin while they wait, and route again afterwards.
    pub async fn fence(&self, epoch: u64, limit: std::time::Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut epochs = self.epoch_tx.subscribe();
        while self.catalog.load().epoch() < epoch {
            if tokio::time::timeout_at(deadline, epochs.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "node routes by epoch {} and has not published epoch {epoch} after {} ms",
                    self.catalog.load().epoch(),
                    limit.as_millis()
                ));
            }
        }
        loop {
            let notified = self.unpinned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let oldest = {
                let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
                pins.iter()
                    .next()
                    .filter(|(e, _)| **e < epoch)
                    .map(|(e, n)| (*e, *n))
            };
            let Some((old, n)) = oldest else {
                return Ok(());
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "{n} statement(s) routed by epoch {old} (before {epoch}) still running after {} ms",
                    limit.as_millis()
                ));
            }
        }
    }
}

/// A statement (or a batch of them) routed by the routing table of
/// `epoch` is in flight: routed, and not yet answered by its backends.
/// Dropping the pin ends it. See [`RoutingState::fence`].
#[derive(Debug)]
pub struct EpochPin {
    routing: Arc<RoutingState>,
    epoch: u64,
}

impl EpochPin {
    /// The epoch of the routing table in use when the pin was taken.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for EpochPin {
    fn drop(&mut self) {
        {
            let mut pins = self.routing.pins.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = pins.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&self.epoch);
                }
            }
        }
        self.routing.unpinned.notify_waiters();
    }
}

/// A statement writing to a range frozen for a cut-over waits for the next
/// routing table (the cut-over's end) and is routed again, until
/// `freeze_wait_ms` has passed; then the refusal (40001) stands.
pub struct FreezeWait {
    deadline: tokio::time::Instant,
    /// Subscribed before the first routing: a table published in between
    /// is not missed.
    epochs: watch::Receiver<u64>,
}

impl FreezeWait {
    /// Whether to route again after refusal `r`: only for a frozen range
    /// and before the deadline, after the next routing table (or the
    /// deadline).
    pub async fn retry(&mut self, r: &Refusal) -> bool {
        r.frozen() && self.next_table().await
    }

    /// Waits for the next routing table (or the deadline); false, at once,
    /// when the deadline has passed: the write's 40001 stands. For callers
    /// that find the frozen range themselves (a COPY's rows).
    pub async fn next_table(&mut self) -> bool {
        if tokio::time::Instant::now() >= self.deadline {
            return false;
        }
        let _ = tokio::time::timeout_at(self.deadline, self.epochs.changed()).await;
        true
    }
}

/// `snapshot` (of `catalog`) with the routing functions its tables use.
pub(crate) fn resolve_functions(
    cache: &crate::routing::functions::FunctionCache,
    snapshot: &RoutingSnapshot,
    catalog: &hotrepart_routing_paxos::Catalog,
) -> RoutingSnapshot {
    let (snap, errors) = cache.resolve_partial(snapshot.clone(), catalog.function_modules());
    for e in errors {
        tracing::error!(error = %e, "routing function not available; statements that need it fail");
    }
    snap
}

/// Where the node reaches one shard.
#[derive(Debug)]
pub struct ShardInfo {
    pub name: String,
    pub(crate) dsn: String,
    /// `Err`: the DSN could not be resolved (connecting fails with it).
    pub(crate) addr: Result<SocketAddr, String>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    /// TLS to the shard (the DSN's `sslmode`, `sslrootcert`).
    pub(crate) tls: crate::tls::ShardTls,
    /// The host name the DSN gives (TLS checks the certificate against it).
    pub(crate) host: String,
}

impl ShardInfo {
    fn new(name: &str, dsn: &str) -> ShardInfo {
        let mut info = ShardInfo {
            name: name.to_string(),
            dsn: dsn.to_string(),
            addr: Err(String::new()),
            user: None,
            password: None,
            tls: Default::default(),
            host: String::new(),
        };
        let (dsn, tls) = match crate::tls::split_shard_dsn(dsn) {
            Ok(x) => x,
            Err(e) => {
                info.addr = Err(format!("shard {name}: invalid DSN: {e}"));
                return info;
            }
        };
        info.tls = tls;
        let pc: tokio_postgres::Config = match dsn.parse() {
            Ok(pc) => pc,
            Err(e) => {
                info.addr = Err(format!("shard {name}: invalid DSN: {e}"));
                return info;
            }
        };
        let host = match pc.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let port = pc.get_ports().first().copied().unwrap_or(5432);
        info.host = host.clone();
        info.addr = format!("{host}:{port}").parse::<SocketAddr>().or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("shard {name}: cannot resolve {host}"))
        });
        info.user = pc.get_user().map(str::to_string);
        info.password = pc
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        info
    }
}

/// The shards of the routing table, by index. Indices are stable for the
/// life of the node: pools, sessions' backend slots and caches are keyed by
/// them, so a shard added to the catalog gets the next index and a removed
/// one keeps its index (never reused). A shard whose DSN changes gets a new
/// index too, so no pooled connection to the old address is ever reused.
#[derive(Debug, Default)]
pub struct ShardTable {
    pub(crate) list: Vec<Arc<ShardInfo>>,
    pub(crate) by_name: HashMap<String, usize>,
    /// Number of shards in the current routing table.
    pub(crate) live: usize,
    pub(crate) home: usize,
}

impl ShardTable {
    /// The table for `snapshot`, keeping the indices of `prev`.
    fn next(prev: &ShardTable, snapshot: &RoutingSnapshot) -> ShardTable {
        let mut list = prev.list.clone();
        let mut by_name = prev.by_name.clone();
        let mut live = 0;
        for s in snapshot.shards() {
            live += 1;
            let name = s.id.as_str();
            let same = by_name.get(name).is_some_and(|&i| list[i].dsn == s.dsn);
            if !same {
                list.push(Arc::new(ShardInfo::new(name, &s.dsn)));
                by_name.insert(name.to_string(), list.len() - 1);
            }
        }
        let home = by_name
            .get(snapshot.home_shard().as_str())
            .copied()
            .unwrap_or(0);
        ShardTable {
            list,
            by_name,
            live,
            home,
        }
    }
}
