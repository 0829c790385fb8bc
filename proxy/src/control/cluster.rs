//! The node's side of the replicated catalog: starting the catalog replica
//! (alone, or one of a `[cluster]`), seeding it from the configuration file,
//! and publishing every new routing snapshot into the node.
//!
//! Guarantees:
//! - the configuration's shards, tables and ranges seed the catalog only
//!   when it is empty (a new cluster); afterwards the replicated catalog is
//!   the truth and the file's routing sections are ignored (a warning says
//!   so when they differ);
//! - the data plane never waits for the catalog: it routes with the last
//!   published snapshot, and refuses (57P03, retryable) when this node holds
//!   no catalog lease (cut off from the quorum) or has no catalog yet.

use crate::config::Config;
use crate::exec::decisions::{DecisionError, DecisionLog, LogFuture};
use crate::node::{Node, NodeError};
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_routing_paxos::command::MAX_FORGET;
use hotrepart_routing_paxos::command::{
    CatalogSeed, Dsn, FunctionSpec, RangeSpec, ShardSpec, TableSpec, WasmModule,
};
use hotrepart_routing_paxos::{CatalogCommand, CatalogHandle, ClusterSettings};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The catalog seed the configuration file describes.
pub fn seed(cfg: &Config) -> anyhow::Result<CatalogSeed> {
    // Compiling the functions validates them (no imports, the ABI's
    // exports, a trial call) before they can enter the catalog.
    let cache = crate::routing::functions::FunctionCache::new(Default::default());
    let snap = cfg.routing_snapshot(&cache)?;
    let mut seed = seed_of(&snap);
    seed.functions = cfg
        .function_modules()?
        .into_iter()
        .map(|(name, wasm)| FunctionSpec {
            name,
            wasm: WasmModule(wasm),
        })
        .collect();
    Ok(seed)
}

/// A seed that recreates `snap` (epoch aside; without the modules of its
/// routing functions).
pub fn seed_of(snap: &RoutingSnapshot) -> CatalogSeed {
    CatalogSeed {
        shards: snap
            .shards()
            .map(|s| ShardSpec {
                shard: s.id.as_str().to_string(),
                dsn: Dsn(s.dsn.clone()),
            })
            .collect(),
        home_shard: snap.home_shard().as_str().to_string(),
        sharded: snap
            .sharded_tables()
            .map(|t| TableSpec {
                table: t.name.clone(),
                key_column: t.key_column.clone(),
                key_type: t.key_type,
                function: t.function,
            })
            .collect(),
        reference: snap.reference_tables().map(str::to_string).collect(),
        ranges: snap
            .ranges()
            .iter()
            .map(|r| RangeSpec {
                range: r.span(),
                read_owner: r.read_owner.as_str().to_string(),
                write_owner: r.write_owner.as_str().to_string(),
            })
            .collect(),
        functions: Vec::new(),
    }
}

/// Starts this node's catalog replica as the configuration says.
pub async fn start_catalog(cfg: &Config) -> anyhow::Result<CatalogHandle> {
    let seed = seed(cfg)?;
    match &cfg.cluster {
        None => Ok(CatalogHandle::local(Some(seed), cfg.data_dir.as_deref())?),
        Some(c) => {
            let settings = ClusterSettings {
                node_id: c.node_id,
                listen: c.listen.parse()?,
                peers: c
                    .peers
                    .iter()
                    .map(|p| (p.id, p.addr.clone()))
                    .collect::<BTreeMap<_, _>>(),
                secret: c.secret()?,
                data_dir: c.data_dir.clone(),
                tick: Duration::from_millis(c.tick_ms.max(1)),
                lease: Duration::from_millis(c.lease_ms),
                compact_after: c.compact_after,
                join: c.join,
            };
            Ok(CatalogHandle::start(settings, Some(seed)).await?)
        }
    }
}

/// Publishes the catalog's snapshots into `node` until `shutdown` is
/// cancelled; the current one first. Err when the catalog stops while the node
/// runs (the supervisor logs it and starts the follower again).
pub async fn follow(
    node: Arc<Node>,
    catalog: CatalogHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut rx = catalog.subscribe();
    let first = rx.borrow_and_update().clone();
    publish_current(&node, &first);
    let mut compared = compare_with_file(&node, &first);
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return Err("the replicated catalog stopped publishing".into());
            },
            () = shutdown.cancelled() => return Ok(()),
        }
        if crate::failpoint::active(crate::failpoint::Failpoint::PublishSlow) {
            tracing::warn!(
                "failpoint catalog_publish_slow: publishing the catalog change 2 s late"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let c = rx.borrow_and_update().clone();
        publish_current(&node, &c);
        if !compared {
            compared = compare_with_file(&node, &c);
        }
    }
}

/// Publishes the catalog's current routing table into `node` now.
pub fn publish_now(node: &Node, catalog: &CatalogHandle) {
    publish_current(node, &catalog.catalog());
}

/// Once the catalog has a routing table: warns when the configuration
/// file's shards, tables or ranges differ from it (the catalog wins; the
/// file only seeded a new cluster). Returns whether the comparison was made.
fn compare_with_file(node: &Node, c: &hotrepart_routing_paxos::Catalog) -> bool {
    let Some(snap) = c.snapshot() else {
        return false;
    };
    // Without the modules: the seed compares the tables' function ids.
    let file = node.cfg().snapshot().map(|s| seed_of(&s));
    if file.as_ref().ok() != Some(&seed_of(snap)) {
        tracing::warn!(
            epoch = snap.epoch(),
            "the configuration file's shards, tables or ranges differ from the replicated catalog; the catalog is used (the file only seeds a new cluster: change the catalog with proxyctl)"
        );
    }
    true
}

/// Publishes `c`'s routing table into `node` unless the node routes by a
/// newer one already: the follower and [`Node::decide`] (a node whose
/// lease has just become valid) both publish, under the node's
/// `publish_lock`, so an older table never replaces a newer one.
fn publish_current(node: &Node, c: &hotrepart_routing_paxos::Catalog) {
    if let Some(snap) = c.snapshot() {
        let _serial = node.publish_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cur = node.routing.catalog.load();
        // Function uploads do not change the epoch, but may resolve a
        // function a table names.
        if snap.epoch() > cur.epoch()
            || !node.routing.catalog_ready()
            || (snap.epoch() == cur.epoch() && !cur.unresolved_functions().is_empty())
        {
            tracing::info!(epoch = snap.epoch(), "routing table published");
            node.routing.publish_catalog(c);
            node.follow_listeners();
        }
    }
}

/// Two-phase-commit decisions recorded in the catalog
/// ([`CatalogCommand::TxDecision`](hotrepart_routing_paxos::CatalogCommand)):
/// durable before any COMMIT PREPARED, the first decision for a gid final,
/// and, in a cluster, seen by every node — so the leader's resolver can
/// finish any node's transaction. A node alone (no `[cluster]`) keeps them
/// in `data_dir` (durable) or in memory (lost at exit: then its resolver
/// rolls back what it had not finished, see docs/design/twopc.md), and
/// resolves only its own transactions: other nodes in front of the same
/// shards have their own logs. Finished and swept decisions are forgotten
/// with `CatalogCommand::ForgetDecisions` (docs/design/twopc.md).
pub struct CatalogDecisions {
    handle: CatalogHandle,
    /// `hr_<node_id>_` when the log is private to this node.
    own_prefix: Option<String>,
    timeout: Duration,
    /// Gids this node's coordinators finished, forgotten at the next
    /// [`flush`](crate::exec::decisions::DecisionLog::flush) in
    /// batches of [`MAX_FORGET`]. At most [`MAX_UNFLUSHED`]: beyond that
    /// (the catalog unavailable for long) a gid is left to the resolver's
    /// sweep.
    finished: std::sync::Mutex<Vec<String>>,
}

/// Most finished gids a node holds for its next flush.
const MAX_UNFLUSHED: usize = 64 * MAX_FORGET;

impl CatalogDecisions {
    pub fn new(cfg: &Config, handle: CatalogHandle) -> CatalogDecisions {
        let own_prefix = match cfg.cluster {
            Some(_) => None,
            None => Some(format!("hr_{}_", cfg.effective_node_id())),
        };
        CatalogDecisions {
            handle,
            own_prefix,
            timeout: Duration::from_millis(cfg.twopc_decision_timeout_ms.max(1)),
            finished: std::sync::Mutex::default(),
        }
    }

    fn finished_list(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Proposes `ForgetDecisions` for `gids`, in batches; the gids of a
    /// batch that could not be proposed are returned.
    async fn forget(&self, gids: &[String], swept: bool) -> Vec<String> {
        for (i, batch) in gids.chunks(MAX_FORGET).enumerate() {
            let cmd = CatalogCommand::ForgetDecisions {
                gids: batch.to_vec(),
                swept,
            };
            match self.handle.propose(cmd, self.timeout).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the catalog refused to forget 2PC decisions")
                }
                Err(e) => {
                    // The catalog is slow or away: the rest waits for the
                    // next tick (one timeout per tick at most).
                    tracing::debug!(error = %e, "cannot forget 2PC decisions now; retrying later");
                    return gids[i * MAX_FORGET..].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl DecisionLog for CatalogDecisions {
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
        since: Option<u64>,
    ) -> LogFuture<'a, Result<bool, DecisionError>> {
        Box::pin(async move {
            if let Some(d) = self.handle.catalog().decision(gid) {
                return Ok(d);
            }
            let cmd = CatalogCommand::TxDecision {
                gid: gid.to_string(),
                commit,
                since,
            };
            match self.handle.propose(cmd, self.timeout).await {
                Ok(Err(hotrepart_routing_paxos::Rejected::DecisionTooLate { .. })) => {
                    Err(DecisionError::TooLate)
                }
                // Applied here, or refused because a decision exists: either
                // way the catalog now holds the final one.
                Ok(_) => self.handle.catalog().decision(gid).ok_or_else(|| {
                    DecisionError::Unavailable(format!(
                        "the catalog did not record a decision for {gid}"
                    ))
                }),
                Err(hotrepart_routing_paxos::ProposeError::Timeout) => Err(DecisionError::Timeout),
                Err(e) => Err(DecisionError::Unavailable(e.to_string())),
            }
        })
    }

    fn decision(&self, gid: &str) -> Option<bool> {
        self.handle.catalog().decision(gid)
    }

    fn horizon(&self) -> Option<u64> {
        Some(self.handle.catalog().decision_horizon())
    }

    fn is_resolver(&self) -> bool {
        match &self.own_prefix {
            Some(_) => true,
            None => {
                let st = self.handle.status();
                st.leader == Some(st.node_id)
            }
        }
    }

    fn may_resolve(&self, gid: &str) -> bool {
        self.own_prefix.as_ref().is_none_or(|p| gid.starts_with(p))
    }

    fn finished(&self, gid: &str) {
        let mut l = self.finished_list();
        if l.len() < MAX_UNFLUSHED {
            l.push(gid.to_string());
        }
    }

    fn flush(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            let gids = std::mem::take(&mut *self.finished_list());
            if gids.is_empty() {
                return;
            }
            let left = self.forget(&gids, false).await;
            let mut l = self.finished_list();
            let room = MAX_UNFLUSHED.saturating_sub(l.len());
            l.extend(left.into_iter().take(room));
        })
    }

    fn held(&self) -> (u64, Vec<String>) {
        let c = self.handle.catalog();
        (
            c.epoch(),
            c.decisions().map(|(g, _)| g.to_string()).collect(),
        )
    }

    fn sweep<'a>(&'a self, gids: &'a [String]) -> LogFuture<'a, ()> {
        Box::pin(async move {
            // Not retried: the next pass finds them again.
            self.forget(gids, true).await;
        })
    }
}

impl Node {
    /// A node alone, its catalog seeded from `cfg` (in memory, or in
    /// `cfg.data_dir`). Must run inside a tokio runtime.
    pub fn new(cfg: Config) -> Result<Arc<Node>, NodeError> {
        let seed = seed(&cfg).map_err(|e| NodeError::Catalog(e.to_string()))?;
        let handle = CatalogHandle::local(Some(seed), cfg.data_dir.as_deref())
            .map_err(|e| NodeError::Catalog(e.to_string()))?;
        Node::with_catalog(cfg, handle)
    }

    /// A node following `catalog`: it routes by the catalog's current
    /// snapshot, follows its changes once serving, and records 2PC
    /// decisions in it ([`CatalogDecisions`]).
    pub fn with_catalog(cfg: Config, catalog: CatalogHandle) -> Result<Arc<Node>, NodeError> {
        let decisions = Arc::new(CatalogDecisions::new(&cfg, catalog.clone()));
        Node::with_parts(cfg, catalog, decisions)
    }
}
