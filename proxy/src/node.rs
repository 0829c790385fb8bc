//! What every session and task of a node shares: the routing table (and
//! the shard indexes, pins and fences that go with it), the pools, the
//! caches of what the shards' catalogs say (collations, aggregates,
//! functions, namespaces), cancel keys, the replicated catalog's handle.
//! The listener and handshake are in `frontend`.

use crate::backend::conn::BackendTarget;
use crate::backend::pool::{Pool, Pools};
use crate::config::Config;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::routing::{self, BindParams, Decision};
use arc_swap::ArcSwap;
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_router::route::PlanCache;
use hotrepart_routing_paxos::CatalogHandle;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("routing catalog: {0}")]
    Catalog(String),
}

/// The backends a session holds, for CancelRequest: a cancel goes to all
/// of them (a multi-shard statement runs on several).
#[derive(Default)]
pub struct CancelSlot(Mutex<Vec<(SocketAddr, i32, i32)>>);

impl CancelSlot {
    pub fn set(&self, v: Vec<(SocketAddr, i32, i32)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
    pub(crate) fn get(&self) -> Vec<(SocketAddr, i32, i32)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What pg_proc says of the functions of one name (every overload and
/// schema counts).
#[derive(Debug, Clone, Default)]
pub struct FunctionInfo {
    /// One of them is volatile: a call may write.
    pub volatile: bool,
    /// The sharded table one of their bodies names, if any: such a
    /// function reads or writes rows the router cannot place.
    pub reads: Option<String>,
}

/// What is known of the functions a statement calls.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    /// A volatile function called.
    pub volatile: Option<String>,
    /// A function called whose body names a sharded table: (function, table).
    pub reads: Option<(String, String)>,
}

pub struct Node {
    pub cfg: Config,
    pub pools: Pools,
    /// The routing table; requests load it once, lock-free.
    pub catalog: ArcSwap<RoutingSnapshot>,
    /// The replicated catalog this node follows (`cluster::follow`).
    pub catalog_handle: CatalogHandle,
    /// Compiled routing functions, by id.
    functions: crate::routing::functions::FunctionCache,
    /// The epoch of the published routing table, for sessions waiting for
    /// the next one (a write to a frozen range).
    epoch_tx: watch::Sender<u64>,
    /// Reshard jobs this node is running.
    pub jobs: crate::control::jobs::running::Running,
    /// Tests only: when set, a reshard job stops before each phase's step
    /// until the test lets it go ([`crate::control::jobs::running::JobGate`]).
    pub job_gate: Option<Arc<crate::control::jobs::running::JobGate>>,
    /// Set once `catalog` holds a snapshot of the replicated catalog (until
    /// then it holds the configuration's, used only to log clients in).
    ready: AtomicBool,
    plans: Mutex<PlanCache>,
    /// The shards the routing table names, by stable index (see
    /// [`ShardTable`]); replaced together with `catalog`.
    shards: ArcSwap<ShardTable>,
    /// Whether (shard, database) uses the C collation (learned on attach).
    collations: Mutex<HashMap<(usize, String), bool>>,
    /// Per database: function names seen called in multi-shard statements,
    /// and whether each is an aggregate (pg_proc), learned on first sight.
    aggregates: Mutex<HashMap<String, HashMap<String, bool>>>,
    /// Per database: function names statements call that the router does
    /// not know to be read-only, and what pg_proc says of them
    /// ([`FunctionInfo`]). Forgotten on DDL.
    volatile: Mutex<HashMap<String, HashMap<String, FunctionInfo>>>,
    /// Per (database, user, search_path setting): the namespace routing
    /// resolves names in, with the declared-tables fingerprint it was
    /// read under ([`crate::routing::names`]).
    namespaces: Mutex<HashMap<NsKey, (u64, Arc<hotrepart_router::route::Namespace>)>>,
    /// Bumped by [`Node::forget_catalog`]: sessions read their namespace
    /// again.
    pub(crate) catalog_generation: std::sync::atomic::AtomicU64,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) clients: AtomicUsize,
    pub(crate) cancels: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    /// Commit decisions of two-phase commits (the replicated catalog's
    /// `TxDecision` entries; see `cluster::CatalogDecisions`).
    pub decisions: Arc<dyn crate::exec::decisions::DecisionLog>,
    /// Statements in flight, by the epoch of the routing table they were
    /// routed by ([`Node::pin`], [`Node::fence`]).
    pins: Mutex<std::collections::BTreeMap<u64, usize>>,
    unpinned: tokio::sync::Notify,
    /// The node's background tasks (resolver, job supervisor, catalog
    /// follower), restarted when they fail; their state is in `/v1/status`.
    pub tasks: Arc<crate::control::supervisor::Supervisor>,
}

/// A statement (or a batch of them) routed by the routing table of
/// `epoch` is in flight: routed, and not yet answered by its backends.
/// Dropping the pin ends it. See [`Node::fence`].
#[derive(Debug)]
pub struct EpochPin {
    node: Arc<Node>,
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
            let mut pins = self.node.pins.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = pins.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&self.epoch);
                }
            }
        }
        self.node.unpinned.notify_waiters();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
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
fn resolve_functions(
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
    dsn: String,
    /// `Err`: the DSN could not be resolved (connecting fails with it).
    addr: Result<SocketAddr, String>,
    user: Option<String>,
    password: Option<String>,
}

impl ShardInfo {
    fn new(name: &str, dsn: &str) -> ShardInfo {
        let mut info = ShardInfo {
            name: name.to_string(),
            dsn: dsn.to_string(),
            addr: Err(String::new()),
            user: None,
            password: None,
        };
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
    list: Vec<Arc<ShardInfo>>,
    by_name: HashMap<String, usize>,
    /// Indices of the shards in the current routing table.
    live: usize,
    home: usize,
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

/// (database, client user, the client's `search_path` setting if it set one).
pub type NsKey = (String, String, Option<String>);

impl Node {
    /// A node following `catalog`, recording 2PC decisions in
    /// `decisions` (see `control::cluster` for the constructors a node
    /// normally uses: `Node::new`, `Node::with_catalog`).
    pub fn with_parts(
        cfg: Config,
        catalog: CatalogHandle,
        decisions: Arc<dyn crate::exec::decisions::DecisionLog>,
    ) -> Result<Arc<Node>, NodeError> {
        let tls = match &cfg.tls {
            Some(t) => Some(load_tls(&t.cert, &t.key)?),
            None => None,
        };
        // Until the catalog has a routing table (a new cluster electing its
        // first leader), the configuration's serves to log clients in.
        let functions = crate::routing::functions::FunctionCache::new(Default::default());
        let current = catalog.catalog();
        let ready = current.snapshot().is_some();
        let snapshot = match current.snapshot() {
            Some(s) => Arc::new(resolve_functions(&functions, s, &current)),
            None => Arc::new(
                cfg.routing_snapshot(&functions)
                    .map_err(|e| NodeError::Config(e.to_string()))?,
            ),
        };
        let shards = ShardTable::next(&ShardTable::default(), &snapshot);
        let plans = Mutex::new(PlanCache::new(cfg.plan_cache_size));
        Ok(Arc::new(Node {
            catalog: ArcSwap::new(snapshot),
            catalog_handle: catalog,
            functions,
            epoch_tx: watch::Sender::new(0),
            jobs: Default::default(),
            job_gate: None,
            ready: AtomicBool::new(ready),
            shards: ArcSwap::from_pointee(shards),
            plans,
            collations: Mutex::new(HashMap::new()),
            aggregates: Mutex::new(HashMap::new()),
            volatile: Mutex::new(HashMap::new()),
            namespaces: Mutex::new(HashMap::new()),
            catalog_generation: std::sync::atomic::AtomicU64::new(0),
            cfg,
            pools: Pools::default(),
            tls,
            clients: AtomicUsize::new(0),
            cancels: Mutex::new(HashMap::new()),
            decisions,
            pins: Mutex::new(Default::default()),
            unpinned: tokio::sync::Notify::new(),
            tasks: Default::default(),
        }))
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
            deadline: tokio::time::Instant::now()
                + std::time::Duration::from_millis(self.cfg.freeze_wait_ms),
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

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
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
            node: self.clone(),
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

    /// Routes a statement against the current routing table. A node with a
    /// single shard sends everything there without parsing.
    pub fn decide(
        &self,
        sql: &str,
        params: Option<&BindParams>,
        ctx: &routing::RouteCtx<'_>,
    ) -> Result<Decision, Refusal> {
        if !self.catalog_ready() {
            return Err(Refusal::new(
                sqlstate::CANNOT_CONNECT_NOW,
                "this hotrepart node has not received the routing catalog yet (the cluster may still be electing a leader); retry shortly".into(),
            ));
        }
        if !self.catalog_handle.lease_valid() {
            return Err(Refusal::new(
                sqlstate::CANNOT_CONNECT_NOW,
                "this hotrepart node is cut off from the catalog quorum (its routing lease expired), so it cannot be sure its routing table is current; retry, or connect to another node".into(),
            ));
        }
        let shards = self.shards.load();
        if shards.live == 1 {
            return Ok(Decision::single_on(shards.home));
        }
        let snap = self.catalog.load();
        routing::decide(
            &snap,
            &self.plans,
            |id| shards.by_name.get(id.as_str()).copied(),
            sql,
            params,
            ctx,
        )
    }

    pub fn collation_is_c(&self, shard: usize, database: &str) -> Option<bool> {
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(shard, database.to_string()))
            .copied()
    }

    pub fn set_collation_is_c(&self, shard: usize, database: &str, c: bool) {
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((shard, database.to_string()), c);
    }

    /// Of `names`, those not yet known for `database` (None) or the first
    /// known aggregate (Some).
    pub fn known_aggregates(
        &self,
        database: &str,
        names: &[String],
    ) -> (Vec<String>, Option<String>) {
        let m = self.aggregates.lock().unwrap_or_else(|e| e.into_inner());
        let known = m.get(database);
        let mut unknown = Vec::new();
        for n in names {
            match known.and_then(|k| k.get(n)) {
                Some(true) => return (Vec::new(), Some(n.clone())),
                Some(false) => {}
                None => unknown.push(n.clone()),
            }
        }
        (unknown, None)
    }

    pub fn learn_aggregates(&self, database: &str, names: &[String], aggregates: &[String]) {
        let mut m = self.aggregates.lock().unwrap_or_else(|e| e.into_inner());
        let k = m.entry(database.to_string()).or_default();
        if k.len() > 10_000 {
            k.clear();
        }
        for n in names {
            k.insert(n.clone(), aggregates.contains(n));
        }
    }

    /// Of `names`, those not looked up yet for `database`, and what is
    /// known of the others (merged: the first volatile one, the first that
    /// reads a sharded table).
    pub fn known_functions(&self, database: &str, names: &[String]) -> (Vec<String>, Calls) {
        let m = self.volatile.lock().unwrap_or_else(|e| e.into_inner());
        let known = m.get(database);
        let mut unknown = Vec::new();
        let mut calls = Calls::default();
        for n in names {
            match known.and_then(|k| k.get(n)) {
                Some(info) => {
                    if info.volatile && calls.volatile.is_none() {
                        calls.volatile = Some(n.clone());
                    }
                    if let (Some(t), None) = (&info.reads, &calls.reads) {
                        calls.reads = Some((n.clone(), t.clone()));
                    }
                }
                None => unknown.push(n.clone()),
            }
        }
        (unknown, calls)
    }

    /// Records what pg_proc says of `names` in `database` (a name missing
    /// from `found` is no function there: nothing to fear of it).
    pub fn learn_functions(
        &self,
        database: &str,
        names: &[String],
        found: &HashMap<String, FunctionInfo>,
    ) {
        let mut m = self.volatile.lock().unwrap_or_else(|e| e.into_inner());
        let k = m.entry(database.to_string()).or_default();
        if k.len() > 10_000 {
            k.clear();
        }
        for n in names {
            k.insert(n.clone(), found.get(n).cloned().unwrap_or_default());
        }
    }

    /// After DDL through the node: collations, aggregates and function
    /// volatility are learned again when next needed.
    pub fn namespace(
        &self,
        key: &NsKey,
        fp: u64,
    ) -> Option<Arc<hotrepart_router::route::Namespace>> {
        let m = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key)
            .filter(|(f, _)| *f == fp)
            .map(|(_, ns)| ns.clone())
    }

    pub fn learn_namespace(
        &self,
        key: NsKey,
        fp: u64,
        ns: Arc<hotrepart_router::route::Namespace>,
    ) {
        let mut m = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        m.insert(key, (fp, ns));
    }

    pub fn forget_catalog(&self, database: &str) {
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| k.0 != database);
        self.catalog_generation.fetch_add(1, Ordering::SeqCst);
        self.volatile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(database);
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, db), _| db != database);
        self.aggregates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(database);
    }

    pub(crate) fn pool_for(&self, shard: usize, database: &str, client_user: &str) -> Arc<Pool> {
        let ucfg = self.cfg.user(client_user);
        let info = self.shards.load().list.get(shard).cloned();
        let (addr, dsn_user, dsn_pw, name) = match info.as_deref() {
            Some(i) => (
                i.addr.clone(),
                i.user.clone(),
                i.password.clone(),
                i.name.clone(),
            ),
            None => (
                Err(format!("no shard #{shard}")),
                None,
                None,
                format!("#{shard}"),
            ),
        };
        let user = ucfg
            .and_then(|u| u.server_user.clone())
            .or(dsn_user)
            .unwrap_or_else(|| client_user.to_string());
        let password = ucfg.and_then(|u| u.server_password.clone()).or(dsn_pw);
        let key = (shard, database.to_string(), client_user.to_string());
        self.pools.get_or_create(key, || {
            Pool::new(
                BackendTarget {
                    shard: name,
                    addr,
                    user,
                    password,
                    database: database.to_string(),
                },
                self.cfg.pool_size,
                self.cfg.connect_timeout(),
            )
        })
    }
}

pub(crate) fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, NodeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| NodeError::Tls(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| NodeError::Tls(format!("bad certificate in {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| NodeError::Tls(format!("cannot read key {}: {e}", key.display())))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| NodeError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| NodeError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
