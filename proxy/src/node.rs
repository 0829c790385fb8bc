//! What every session and task of a node shares: the routing table (and
//! the shard indexes, pins and fences that go with it), the pools, the
//! caches of what the shards' catalogs say (collations, aggregates,
//! functions, namespaces), cancel keys, the replicated catalog's handle.
//! The listener and handshake are in `frontend`.

use crate::backend::conn::{BackendTarget, CancelGate};
use crate::backend::pool::{Pool, PoolSettings, Pools};
use crate::config::Config;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::routing::state::RoutingState;
use crate::routing::{self, BindParams, Decision};
use hotrepart_routing_paxos::CatalogHandle;
use std::collections::HashMap;

/// How long DDL's end waits to record its `SchemaChanged` in the
/// replicated catalog, and again for every node to apply it.
const SCHEMA_CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
/// of them (a multi-shard statement runs on several), each only while its
/// [`CancelGate`] says this session still holds it.
pub struct CancelSlot {
    /// The session's id in the gates of the backends it holds (never 0).
    id: u64,
    targets: Mutex<Vec<CancelTarget>>,
    /// What the admin console's SHOW CLIENTS shows of the session (set
    /// once at login).
    pub info: std::sync::OnceLock<ClientInfo>,
}

/// A logged-in client as SHOW CLIENTS shows it: fixed at login, except the
/// times the session updates (relaxed atomic stores).
#[derive(Debug)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    pub connect_time: std::time::SystemTime,
    /// e.g. `TLSv1.3/TLS13_AES_256_GCM_SHA384`; empty without TLS.
    pub tls: String,
    pub application_name: String,
    /// The pid the client got in BackendKeyData.
    pub pid: i32,
    /// Microseconds since the Unix epoch of the latest request.
    request_time_us: std::sync::atomic::AtomicU64,
    /// Since when (µs since the epoch) the session waits for a server
    /// connection; 0: it does not.
    wait_since_us: std::sync::atomic::AtomicU64,
}

fn epoch_us(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl ClientInfo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user: String,
        database: String,
        addr: Option<SocketAddr>,
        local_addr: Option<SocketAddr>,
        tls: String,
        application_name: String,
        pid: i32,
    ) -> ClientInfo {
        let now = std::time::SystemTime::now();
        ClientInfo {
            user,
            database,
            addr,
            local_addr,
            connect_time: now,
            tls,
            application_name,
            pid,
            request_time_us: std::sync::atomic::AtomicU64::new(epoch_us(now)),
            wait_since_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A request arrived.
    #[inline]
    pub fn requested(&self) {
        self.request_time_us.store(
            epoch_us(std::time::SystemTime::now()),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The session starts (true) or stops (false) waiting for a server
    /// connection.
    pub fn waiting(&self, yes: bool) {
        let v = if yes {
            epoch_us(std::time::SystemTime::now()).max(1)
        } else {
            0
        };
        self.wait_since_us
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn request_time(&self) -> std::time::SystemTime {
        let us = self
            .request_time_us
            .load(std::sync::atomic::Ordering::Relaxed);
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(us)
    }

    /// How long the session has been waiting for a server connection.
    pub fn wait(&self) -> Option<std::time::Duration> {
        let since = self
            .wait_since_us
            .load(std::sync::atomic::Ordering::Relaxed);
        (since > 0).then(|| {
            std::time::Duration::from_micros(
                epoch_us(std::time::SystemTime::now()).saturating_sub(since),
            )
        })
    }
}

/// One backend a cancel may go to.
#[derive(Clone)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    pub gate: Arc<CancelGate>,
}

impl Default for CancelSlot {
    fn default() -> Self {
        // Ids only tell live sessions apart in the gates; a process-wide
        // counter is enough.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        CancelSlot {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            targets: Mutex::default(),
            info: std::sync::OnceLock::new(),
        }
    }
}

impl CancelSlot {
    /// The session's id (SHOW SERVERS' `link`, SHOW CLIENTS' `ptr`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session holds `v` now: each backend's gate is claimed for it.
    /// The list is refilled in place (no allocation per transaction).
    pub fn set(&self, v: impl IntoIterator<Item = CancelTarget>) {
        let mut held = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        held.clear();
        for t in v {
            t.gate.claim(self.id);
            held.push(t);
        }
    }

    /// The backends a cancel of this session may go to now, each marked
    /// (closed at its release): those whose gate this session still holds.
    pub(crate) fn take_targets(&self) -> Vec<CancelTarget> {
        let all = self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        all.into_iter()
            .filter(|t| t.gate.try_mark(self.id))
            .collect()
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

impl Calls {
    /// Adds what pg_proc says of function `name` (the first volatile one
    /// and the first that reads a sharded table are kept).
    pub fn add(&mut self, name: &str, info: &FunctionInfo) {
        if info.volatile && self.volatile.is_none() {
            self.volatile = Some(name.to_string());
        }
        if let (Some(t), None) = (&info.reads, &self.reads) {
            self.reads = Some((name.to_string(), t.clone()));
        }
    }
}

/// How text compares in a shard's database, as the merge needs it (read by
/// `session::conn::CATALOG_PROBE`), each part with the reason it does not
/// hold, for the refusal.
#[derive(Debug, Clone)]
pub struct TextCollation {
    /// Whether the database's default collation orders text byte by byte;
    /// when not, the merge asks a shard to rank the values it orders.
    pub bytewise: Result<(), String>,
    /// Whether every user column and domain orders as the default does
    /// (else no merge can tell which collation a sorted column has).
    pub uniform: Result<(), String>,
    /// Whether byte equality is PostgreSQL's equality (every collation
    /// deterministic).
    pub equality: Result<(), String>,
    /// The default collation (provider, collation, locale, rules, version):
    /// shards that rank text for one merge must share it.
    pub identity: String,
}

pub struct Node {
    /// The configuration now: swapped whole by a reload
    /// ([`crate::control::reload`]); read it with [`Node::cfg`].
    cfg: arc_swap::ArcSwap<Config>,
    /// The file the configuration was read from (set by `hotrepart
    /// serve`): what `RELOAD` and SIGHUP read again.
    pub config_file: std::sync::OnceLock<std::path::PathBuf>,
    /// Sets the log filter (installed by the binary): a reload applies
    /// `log_level` through it.
    pub log_filter: std::sync::OnceLock<LogFilterHook>,
    /// Per-database traffic counters (`SHOW STATS`).
    pub stats: crate::stats::Stats,
    /// `PAUSE`/`RESUME` of the admin console.
    pub pause: crate::backend::pause::Pause,
    pub pools: Pools,
    /// The routing table, its shard indexes, plans and pins.
    pub routing: Arc<RoutingState>,
    /// The replicated catalog this node follows (`cluster::follow`).
    pub catalog_handle: CatalogHandle,
    /// Serialises publishing the catalog into `routing` (the follower and
    /// [`Node::decide`] both do), so a table never replaces a newer one.
    pub(crate) publish_lock: Mutex<()>,
    /// Reshard jobs this node is running.
    pub jobs: crate::control::jobs::running::Running,
    /// Tests only: when set, a reshard job stops before each phase's step
    /// until the test lets it go ([`crate::control::jobs::running::JobGate`]).
    pub job_gate: Option<Arc<crate::control::jobs::running::JobGate>>,
    /// Whether (shard, database) uses the C collation (learned on attach).
    /// Per shard and database: how text compares there (see
    /// `session::conn::CATALOG_PROBE`).
    collations: Mutex<HashMap<(usize, String), TextCollation>>,
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
    /// The column defaults of sharded tables the node fills in INSERTs
    /// (`session/key_default.rs`): by (database, declared table,
    /// namespace id, catalog generation).
    table_defaults:
        Mutex<HashMap<TableDefaultsKey, Arc<crate::session::key_default::TableDefaults>>>,
    /// Per (database, home shard, shard): its user type OIDs paired with
    /// the home shard's (`session/type_oids.rs`). Forgotten on DDL.
    pub(crate) type_oids: crate::session::type_oids::TypeOidCache,
    /// Bumped by [`Node::forget_catalog`]: sessions read their namespace
    /// again.
    pub(crate) catalog_generation: std::sync::atomic::AtomicU64,
    /// The replicated catalog's schema generation this node has acted on
    /// ([`Node::catch_up_schema`]).
    schema_seen: std::sync::atomic::AtomicU64,
    /// The lease was found invalid by [`Node::catch_up_schema`] (which
    /// forgot every catalog then) and not valid since.
    lease_lapsed: std::sync::atomic::AtomicBool,
    /// LISTEN/NOTIFY for sessions in transaction pooling.
    pub notifier: crate::backend::notify::Notifier,
    /// The TLS acceptor for new clients (a reload reads the certificate
    /// and key again).
    pub(crate) tls: arc_swap::ArcSwapOption<TlsServer>,
    /// Clients past the startup packet (`max_client_connections`).
    pub(crate) clients: AtomicUsize,
    /// Accepted sockets not yet logged in (`max_pending_logins`).
    pub(crate) pending_logins: AtomicUsize,
    /// What the 2PC resolver saw at its last pass ([`ResolverStats`]).
    pub resolver_stats: Mutex<ResolverStats>,
    pub(crate) cancels: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    /// Commit decisions of two-phase commits (the replicated catalog's
    /// `TxDecision` entries; see `cluster::CatalogDecisions`).
    pub decisions: Arc<dyn crate::exec::decisions::DecisionLog>,
    /// The node's background tasks (resolver, job supervisor, catalog
    /// follower), restarted when they fail; their state is in `/v1/status`.
    pub tasks: Arc<crate::control::supervisor::Supervisor>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

/// What the 2PC resolver (`control/resolver.rs`) saw, for `/metrics`; kept
/// only on the node that resolves (the catalog leader), emptied when it
/// stops resolving.
#[derive(Debug, Clone, Default)]
pub struct ResolverStats {
    /// Per shard name: prepared `hr_` transactions at the last pass (any
    /// age: younger than `twopc_grace_ms` ones may still be committed by
    /// their coordinator).
    pub prepared: std::collections::BTreeMap<String, usize>,
    /// Of those, older than `twopc_grace_ms` (in doubt: the resolver
    /// finishes them).
    pub in_doubt: std::collections::BTreeMap<String, usize>,
    /// Transactions the resolver committed / rolled back since start.
    pub committed: u64,
    pub rolled_back: u64,
}

/// Sets the process's log filter (an `EnvFilter` directive string).
pub type LogFilterHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// (database, client user, the client's `search_path` setting if it set one).
pub type NsKey = (String, String, Option<String>);

/// (database, declared sharded table, namespace id, catalog generation).
pub type TableDefaultsKey = (String, String, u64, u64);

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
            Some(s) => Arc::new(crate::routing::state::resolve_functions(
                &functions, s, &current,
            )),
            None => Arc::new(
                cfg.routing_snapshot(&functions)
                    .map_err(|e| NodeError::Config(e.to_string()))?,
            ),
        };
        let routing = Arc::new(RoutingState::new(
            snapshot,
            functions,
            ready,
            cfg.plan_cache_size,
            std::time::Duration::from_millis(cfg.freeze_wait_ms),
        ));
        Ok(Arc::new(Node {
            routing,
            catalog_handle: catalog,
            publish_lock: Mutex::new(()),
            jobs: Default::default(),
            job_gate: None,
            collations: Mutex::new(HashMap::new()),
            type_oids: Default::default(),
            aggregates: Mutex::new(HashMap::new()),
            volatile: Mutex::new(HashMap::new()),
            namespaces: Mutex::new(HashMap::new()),
            table_defaults: Mutex::new(HashMap::new()),
            catalog_generation: std::sync::atomic::AtomicU64::new(0),
            schema_seen: std::sync::atomic::AtomicU64::new(current.schema_generation()),
            lease_lapsed: std::sync::atomic::AtomicBool::new(false),
            notifier: Default::default(),
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            config_file: Default::default(),
            log_filter: Default::default(),
            stats: Default::default(),
            pause: Default::default(),
            pools: Pools::default(),
            tls: arc_swap::ArcSwapOption::new(tls.map(Arc::new)),
            clients: AtomicUsize::new(0),
            pending_logins: AtomicUsize::new(0),
            resolver_stats: Mutex::new(ResolverStats::default()),
            cancels: Mutex::new(HashMap::new()),
            decisions,
            tasks: Default::default(),
        }))
    }

    /// The configuration now (a reload may replace it: hold the guard
    /// briefly, never across an await).
    pub fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.cfg.load()
    }

    /// Replaces the configuration ([`crate::control::reload`] checks what
    /// may change first).
    pub fn set_cfg(&self, cfg: Config) {
        self.cfg.store(Arc::new(cfg));
    }

    /// The settings of a pool for `client_user` under configuration `cfg`.
    pub(crate) fn pool_settings(cfg: &Config) -> PoolSettings {
        PoolSettings {
            size: cfg.pool_size,
            connect_timeout: cfg.connect_timeout(),
            lifetime: cfg.server_lifetime(),
            idle_timeout: cfg.server_idle_timeout(),
        }
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Routes a statement against the current routing table. A node with a
    /// single shard sends everything there without parsing.
    pub fn decide(
        &self,
        sql: &str,
        params: Option<&BindParams>,
        ctx: &routing::RouteCtx<'_>,
    ) -> Result<Decision, Refusal> {
        if let Some(home) = self.single_shard_now()? {
            return Ok(Decision::single_on(home));
        }
        let shards = self.routing.shards.load();
        let snap = self.routing.catalog.load();
        routing::decide(
            &snap,
            &self.routing.plans,
            |id| shards.by_name.get(id.as_str()).copied(),
            sql,
            params,
            ctx,
            self.cfg().max_parse_bytes,
        )
    }

    /// Whether this node may route now (its routing table is the
    /// catalog's: received, under a valid lease, installed) and, if the
    /// table has one shard, that shard's index (its home: indices are not
    /// positions, a shard removed earlier keeps its own). Every statement
    /// passes here before it reaches a shard.
    pub fn single_shard_now(&self) -> Result<Option<usize>, Refusal> {
        if !self.routing.catalog_ready() {
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
        // The lease covers the catalog this node's replica applied; the
        // catalog follower publishes it into `routing` a moment later. A
        // node whose lease has just become valid — it caught up after a
        // restart or a partition — must not route by the older table it
        // kept meanwhile: a range that changed owner while it was away
        // would get writes on its old owner after the move's cleanup.
        // (`handle.epoch()` read after the lease is at least the epoch
        // the lease was granted on.) Running nodes are fenced by the
        // cut-over; this is the case no fence reaches.
        let covered = self.catalog_handle.epoch();
        if self.routing.catalog.load().epoch() < covered {
            crate::control::cluster::publish_now(self, &self.catalog_handle);
            if self.routing.catalog.load().epoch() < covered {
                return Err(Refusal::new(
                    sqlstate::CANNOT_CONNECT_NOW,
                    "this hotrepart node is still installing the current routing table; retry shortly".into(),
                ));
            }
        }
        let shards = self.routing.shards.load();
        Ok((shards.live == 1).then_some(shards.home))
    }

    /// Listening connections to the shards the routing table gained
    /// (see [`crate::backend::notify::Notifier::follow_shards`]).
    pub fn follow_listeners(&self) {
        self.notifier.follow_shards(
            |database, user| {
                self.routing
                    .live_shards()
                    .into_iter()
                    .map(|t| {
                        let p = self.pool_for(t, database, user);
                        (t, p.target.clone(), p.connect_timeout())
                    })
                    .collect()
            },
            |task| {
                self.tasks.spawn_until_shutdown(task);
            },
        );
    }

    /// How text compares on `shard` in `database`; None: not known yet.
    pub fn text_collation(&self, shard: usize, database: &str) -> Option<TextCollation> {
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(shard, database.to_string()))
            .cloned()
    }

    /// Whether how text compares on `shard` in `database` is known (no
    /// copy of it).
    pub fn knows_text_collation(&self, shard: usize, database: &str) -> bool {
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(shard, database.to_string()))
    }

    /// Records what a probe read under catalog generation `generation`
    /// (nothing when the catalog was forgotten since: the probe may have
    /// read the schema as it was).
    pub fn set_text_collation(
        &self,
        shard: usize,
        database: &str,
        c: TextCollation,
        generation: u64,
    ) {
        let mut m = self.collations.lock().unwrap_or_else(|e| e.into_inner());
        if self.current_generation(generation) {
            m.insert((shard, database.to_string()), c);
        }
    }

    /// Whether nothing was forgotten since `generation` was read. Called
    /// with a cache's lock held: [`Self::forget_catalogs`] bumps the
    /// generation before it clears the caches, so what a probe learned is
    /// either refused here or cleared there.
    fn current_generation(&self, generation: u64) -> bool {
        self.catalog_generation.load(Ordering::SeqCst) == generation
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

    pub fn learn_aggregates(
        &self,
        database: &str,
        names: &[String],
        aggregates: &[String],
        generation: u64,
    ) {
        let mut m = self.aggregates.lock().unwrap_or_else(|e| e.into_inner());
        if !self.current_generation(generation) {
            return;
        }
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
                Some(info) => calls.add(n, info),
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
        generation: u64,
    ) {
        let mut m = self.volatile.lock().unwrap_or_else(|e| e.into_inner());
        if !self.current_generation(generation) {
            return;
        }
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
        generation: u64,
    ) {
        let mut m = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if !self.current_generation(generation) {
            return;
        }
        if m.len() > 10_000 {
            m.clear();
        }
        m.insert(key, (fp, ns));
    }

    /// The column defaults of a sharded table, if read before under the
    /// same catalog generation.
    pub(crate) fn table_defaults(
        &self,
        key: &TableDefaultsKey,
    ) -> Option<Arc<crate::session::key_default::TableDefaults>> {
        let m = self
            .table_defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        m.get(key).cloned()
    }

    pub(crate) fn keep_table_defaults(
        &self,
        key: TableDefaultsKey,
        d: Arc<crate::session::key_default::TableDefaults>,
    ) {
        let mut m = self
            .table_defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Entries of older generations are never read again.
        if m.len() > 10_000 || m.keys().next().is_some_and(|k| k.3 != key.3) {
            m.retain(|k, _| k.3 == key.3);
            if m.len() > 10_000 {
                m.clear();
            }
        }
        m.insert(key, d);
    }

    /// Forgets what the node learned of `database`'s catalog (after DDL).
    pub fn forget_catalog(&self, database: &str) {
        self.forget_catalogs(|db| db == database);
    }

    /// Forgets what the node learned of the catalogs of the databases
    /// `which` selects, and bumps the catalog generation: sessions read
    /// their namespace again, statements validated before are parsed again.
    fn forget_catalogs(&self, which: impl Fn(&str) -> bool) {
        // First: a probe that learns after this point is refused
        // (`current_generation`), one that learned before is cleared below.
        self.catalog_generation.fetch_add(1, Ordering::SeqCst);
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !which(&k.0));
        self.type_oids.forget(&which);
        self.volatile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|db, _| !which(db));
        self.collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, db), _| !which(db));
        self.aggregates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|db, _| !which(db));
    }

    /// Before a client request is handled: forgets what the node learned
    /// of the databases whose schema changed through any node of the
    /// cluster since it last looked (`SchemaChanged` in the replicated
    /// catalog; see [`Self::schema_changed`]). Lock-free when nothing
    /// changed. A node whose lease lapsed forgets everything once (what a
    /// statement of the moment its lease comes back read before the DDL
    /// it missed): its statements are refused until the lease is back, and
    /// by then it has applied every `SchemaChanged` acknowledged meanwhile.
    pub fn catch_up_schema(&self) {
        if !self.catalog_handle.lease_valid() {
            if !self.lease_lapsed.swap(true, Ordering::SeqCst) {
                self.forget_catalogs(|_| true);
            }
            return;
        }
        if self.lease_lapsed.load(Ordering::Relaxed) {
            self.lease_lapsed.store(false, Ordering::SeqCst);
        }
        let seen = self.schema_seen.load(Ordering::SeqCst);
        if self.catalog_handle.schema_generation() <= seen {
            return;
        }
        let cat = self.catalog_handle.catalog();
        let changed: Vec<&str> = cat.schema_changed_since(seen).collect();
        self.forget_catalogs(|db| changed.contains(&db));
        self.schema_seen
            .fetch_max(cat.schema_generation(), Ordering::SeqCst);
    }

    /// DDL through this node has run on the shards and its transaction has
    /// ended: forgets what the node learned of `database`, and in a cluster
    /// records the change in the replicated catalog (`SchemaChanged`) and
    /// waits until every node with a lease has applied it — so that no
    /// node routes a statement the client sends after this one by the
    /// schema as it was. Err: the change could not be recorded in time (a
    /// task keeps trying; the caller warns its client).
    pub async fn schema_changed(self: &Arc<Self>, database: &str) -> Result<(), String> {
        self.forget_catalog(database);
        if self.cfg().cluster.is_none() {
            return Ok(());
        }
        match self.record_schema_change(database).await {
            Ok(()) => Ok(()),
            // Refused by the catalog (a database name PostgreSQL would
            // have truncated): trying again changes nothing.
            Err(e) if e.starts_with("refused: ") => Err(e),
            Err(e) => {
                let (node, db) = (self.clone(), database.to_string());
                tokio::spawn(async move {
                    // Bounded: after an hour the change is left to the
                    // log (`tracing::error!`).
                    for attempt in 0..720u32 {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        if node.record_schema_change(&db).await.is_ok() {
                            tracing::info!(database = %db, attempt, "schema change recorded in the catalog");
                            return;
                        }
                    }
                    tracing::error!(database = %db, "could not record a schema change in the catalog for an hour: other nodes may route by the old schema until their next restart or DDL");
                });
                Err(e)
            }
        }
    }

    async fn record_schema_change(&self, database: &str) -> Result<(), String> {
        let h = &self.catalog_handle;
        let cmd = hotrepart_routing_paxos::CatalogCommand::SchemaChanged {
            database: database.to_string(),
        };
        match h.propose(cmd, SCHEMA_CHANGE_TIMEOUT).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("refused: {e}")),
            Err(e) => return Err(e.to_string()),
        }
        let all = h.await_all_applied(h.applied_index());
        match tokio::time::timeout(SCHEMA_CHANGE_TIMEOUT, all).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out waiting for every node to apply it".into()),
        }
    }

    pub(crate) fn pool_for(&self, shard: usize, database: &str, client_user: &str) -> Arc<Pool> {
        let cfg = self.cfg();
        let ucfg = cfg.user(client_user);
        let info = self.routing.shards.load().list.get(shard).cloned();
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
        let tls = info
            .as_deref()
            .map(|i| crate::backend::conn::BackendTls {
                tls: i.tls.clone(),
                host: i.host.clone(),
                allow_cleartext_password: cfg.allow_cleartext_shard_password,
            })
            .unwrap_or_default();
        let user = ucfg
            .and_then(|u| u.server_user.clone())
            .or(dsn_user)
            .unwrap_or_else(|| client_user.to_string());
        let password = ucfg.and_then(|u| u.server_password.clone()).or(dsn_pw);
        let key = (shard, database.to_string(), client_user.to_string());
        self.pools.get_or_create(key, || {
            Pool::with_stats(
                BackendTarget {
                    shard: name,
                    addr,
                    user,
                    password,
                    database: database.to_string(),
                    tls,
                },
                Node::pool_settings(&cfg),
                Some(self.stats.db(database)),
            )
        })
    }
}

/// The node's TLS for clients: the acceptor, and the SCRAM channel
/// binding data of the certificate it presents (one value, so a reload
/// cannot pair a handshake with another certificate's hash).
pub(crate) struct TlsServer {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `tls-server-end-point` data of the node's certificate
    /// ([`crate::frontend::cbind`]); `None`: its signature algorithm names
    /// no usable hash, and SCRAM-SHA-256-PLUS is not offered.
    pub end_point: Option<Arc<[u8]>>,
}

pub(crate) fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsServer, NodeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| NodeError::Tls(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| NodeError::Tls(format!("bad certificate in {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| NodeError::Tls(format!("cannot read key {}: {e}", key.display())))?;
    let end_point = certs
        .first()
        .and_then(|c| crate::frontend::cbind::tls_server_end_point(c.as_ref()))
        .map(Arc::from);
    if end_point.is_none() {
        tracing::warn!(
            cert = %cert.display(),
            "the certificate's signature algorithm names no hash usable for channel binding (tls-server-end-point): SCRAM-SHA-256-PLUS is not offered"
        );
    }
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| NodeError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| NodeError::Tls(e.to_string()))?;
    Ok(TlsServer {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        end_point,
    })
}
