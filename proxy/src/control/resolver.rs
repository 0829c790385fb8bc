//! The 2PC resolver: a background task of the node (supervised) that
//! finishes in-doubt transactions — prepared `hr_…` transactions left by a
//! coordinator that crashed — by the recorded decision (rollback when none
//! was recorded: it is recorded first, so a late coordinator cannot commit).
//! Runs on the node whose `DecisionLog` says it is the resolver (the
//! catalog's leader in a cluster), on every shard of the routing table.
//! The same task, on every node, forgets the decisions its coordinators
//! finished (`DecisionLog::flush`); the resolver also sweeps decisions
//! that no shard holds prepared after the grace period
//! (docs/design/twopc.md, "Forgetting decisions").

use crate::backend::conn::{BackendConn, BackendTarget, HiddenQueryError};
use crate::error::sqlstate;
use crate::exec::twopc::{is_hotrepart_gid, record};
use crate::node::Node;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Pool key user under which the resolver finds its login (no client has
/// it); the resolver makes its own connections from that pool's target.
const RESOLVER: &str = "\u{0}hotrepart-resolver";

/// `application_name` of the resolver's connections: they are not part of
/// any pool, and an operator (or a test counting a pool's backends) can
/// tell them apart.
pub const RESOLVER_APPLICATION_NAME: &str = "hotrepart resolver";

/// The resolver: every `twopc_resolver_interval_ms`, while this node is the
/// resolver, finishes the prepared `hr_` transactions older than
/// `twopc_grace_ms` on every shard (any node's with a shared decision log:
/// a crashed node cannot; see [`DecisionLog::may_resolve`]). Keeps one
/// connection per shard. Started by [`Node::serve`] under the node's
/// supervisor (restarted if it fails); ends when `shutdown` is cancelled.
pub async fn run_resolver(node: Arc<Node>, shutdown: CancellationToken) {
    let every = Duration::from_millis(node.cfg().twopc_resolver_interval_ms.max(10));
    let grace = Duration::from_millis(node.cfg().twopc_grace_ms);
    let mut conns: Vec<Option<BackendConn>> = Vec::new();
    // Decisions held by the catalog, with when this resolver first saw
    // them (the sweep waits a grace period: their coordinators report
    // them finished first, without moving the horizon).
    let mut seen: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        // Every node forgets what its own coordinators finished.
        node.decisions.flush().await;
        if !node.decisions.is_resolver() {
            conns.iter_mut().for_each(|c| *c = None);
            let mut st = node
                .resolver_stats
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            st.prepared.clear();
            st.in_doubt.clear();
            seen.clear();
            continue;
        }
        // Read before listing the shards: a decision recorded after this
        // is not swept in this pass.
        let (held_epoch, held) = node.decisions.held();
        let now = Instant::now();
        let held: HashSet<String> = held.into_iter().collect();
        seen.retain(|g, _| held.contains(g));
        for g in held {
            seen.entry(g).or_insert(now);
        }
        // Shards of the current routing table (a removed shard keeps its
        // index but is not visited; its connection is dropped).
        conns.resize_with(node.routing.shard_slots(), || None);
        let live = node.routing.live_shards();
        // The sweep needs every shard a held decision's transaction was
        // prepared on listed: those of a routing table at least as new as
        // the catalog the decisions were read from (the coordinator
        // routed by a table no newer than its decision's entry).
        let mut complete = node.routing.catalog.load().epoch() >= held_epoch;
        let mut prepared: HashSet<String> = HashSet::new();
        for (t, conn) in conns.iter_mut().enumerate() {
            if !live.contains(&t) {
                *conn = None;
                let name = node.routing.shard_name(t);
                let mut st = node
                    .resolver_stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                st.prepared.remove(&name);
                st.in_doubt.remove(&name);
                continue;
            }
            match resolve_shard(&node, t, conn).await {
                Ok(pass) => prepared.extend(pass.prepared),
                Err(ResolveError::Claimed(why)) => {
                    tracing::error!(error = %why, "2PC resolver: this node does not resolve on the shard");
                    *conn = None;
                    complete = false;
                }
                Err(e) => {
                    tracing::warn!(shard = %node.routing.shard_name(t), error = %e, "2PC resolver cannot check the shard");
                    *conn = None;
                    complete = false;
                }
            }
        }
        if complete {
            let sweep: Vec<String> = seen
                .iter()
                .filter(|(g, first)| now.duration_since(**first) >= grace && !prepared.contains(*g))
                .map(|(g, _)| g.clone())
                .collect();
            if !sweep.is_empty() {
                tracing::info!(
                    count = sweep.len(),
                    "2PC resolver forgets decisions that no shard holds prepared any more"
                );
                node.decisions.sweep(&sweep).await;
            }
        }
    }
}

/// Where the resolver logs in for `database` on shard `t`: as the shard
/// DSN's user (with the DSN's password), or, when the DSN names no user, as
/// the first configured user's server login. Finishing another role's
/// prepared transaction needs a superuser (or that role).
fn resolver_target(node: &Node, t: usize, database: &str) -> BackendTarget {
    let dsn_user = node
        .routing
        .shard_dsn(t)
        .and_then(|d| crate::control::pg::parse_dsn(&d).ok())
        .map(|(c, _)| c)
        .and_then(|c| c.get_user().map(str::to_string));
    let who = match (dsn_user, node.cfg().users.first()) {
        (None, Some(u)) => u.name.clone(),
        _ => RESOLVER.to_string(),
    };
    // The pool is never used for connections: only its login is.
    node.pool_for(t, database, &who).target.clone()
}

async fn resolver_connect(
    node: &Node,
    t: usize,
    database: &str,
) -> Result<BackendConn, crate::backend::conn::BackendError> {
    let wait = node.cfg().connect_timeout();
    BackendConn::connect_named(
        &resolver_target(node, t, database),
        wait,
        Some(RESOLVER_APPLICATION_NAME),
    )
    .await
}

/// Error of one resolver pass over a shard.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Connect(#[from] crate::backend::conn::BackendError),
    #[error(transparent)]
    Query(#[from] HiddenQueryError),
    /// Another session holds this standalone node's claim on the shard.
    #[error("{0}")]
    Claimed(String),
}

/// First key of the advisory lock by which a standalone node claims its
/// `node_id` on a shard (`pg_advisory_lock(CLAIM_CLASS, node_id)`, "hrnd").
///
/// Why: a standalone node resolves the in-doubt transactions named
/// `hr_<its node_id>_…` by its own decisions, which live only in its
/// memory/data directory. A second standalone node with the same
/// `node_id` in front of the same shards would take the first one's
/// in-doubt transactions for its own and roll back ones the first decided
/// to commit: half-committed transactions. So the resolver's connection
/// to each shard holds this lock for as long as it is open, a resolver
/// that cannot take it does not resolve on that shard, and `hotrepart
/// serve` refuses to start when another node holds it
/// ([`check_claims`]). Nodes of a cluster share their decisions in the
/// catalog and need no claim.
pub const CLAIM_CLASS: i32 = 0x6872_6e64;

/// Whether this node claims its `node_id` on the shards (standalone).
fn claims(node: &Node) -> bool {
    node.cfg().cluster.is_none()
}

/// Takes this node's claim on shard `t` with `b` (held while `b` is
/// open). The server ends the session of a node that vanished without
/// closing it (a host lost) within about 30 s (TCP keepalives set here),
/// which gives the claim back.
async fn claim(node: &Node, t: usize, b: &mut BackendConn) -> Result<(), ResolveError> {
    let id = node.cfg().effective_node_id();
    let key = i32::try_from(id).unwrap_or(i32::MAX);
    let rows = b
        .hidden_query(&format!(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
             SET tcp_keepalives_count = 3; \
             SELECT pg_catalog.pg_try_advisory_lock({CLAIM_CLASS}, {key})::text"
        ))
        .await?;
    if matches!(rows.last().and_then(|r| r.first()), Some(Some(v)) if v == "true") {
        return Ok(());
    }
    let holder = b
        .hidden_query(&format!(
            "SELECT a.pid::text, coalesce(host(a.client_addr), 'a local socket'), \
             a.application_name, to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') \
             FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {CLAIM_CLASS}::oid \
             AND l.objid = {key}::oid AND l.objsubid = 2 LIMIT 1"
        ))
        .await
        .unwrap_or_default();
    let who = match holder.first().map(|r| r.as_slice()) {
        Some([Some(pid), Some(from), app, Some(since)]) => format!(
            "backend pid {pid} from {from} ({}), connected since {since}",
            app.as_deref().unwrap_or("")
        ),
        _ => "a session that has just ended or is not visible to this login".into(),
    };
    Err(ResolveError::Claimed(format!(
        "another hotrepart node with node_id {id} is in front of shard {} (it holds the claim: {who}). \
         Two standalone nodes with the same node_id would resolve each other's two-phase \
         transactions wrongly: give each node its own node_id, or join them in a cluster. \
         If that node is gone, end its session on the shard (SELECT pg_terminate_backend(<pid>))",
        node.routing.shard_name(t)
    )))
}

/// Checks, before a standalone node serves, that no other node holds its
/// claim on a shard (see [`CLAIM_CLASS`]): Err with the reason when one
/// does. A shard that cannot be reached is skipped (logged): the
/// resolver's connection claims it once it is back, and does not resolve
/// there while another node holds it.
pub async fn check_claims(node: &Node) -> Result<(), String> {
    if !claims(node) {
        return Ok(());
    }
    for t in node.routing.live_shards() {
        let mut conn = None;
        match connect_and_claim(node, t, &mut conn).await {
            Ok(_) => {}
            Err(ResolveError::Claimed(why)) => return Err(why),
            Err(e) => tracing::warn!(
                shard = %node.routing.shard_name(t),
                error = %e,
                "cannot check this node's claim on the shard now; its 2PC resolver claims it once it is reachable"
            ),
        }
        // Dropping the connection gives the claim back; the resolver takes
        // it again on its own connection.
    }
    Ok(())
}

/// The database shard `t`'s DSN names (`postgres` when none).
fn home_db(node: &Node, t: usize) -> String {
    node.routing
        .shard_dsn(t)
        .and_then(|d| crate::control::pg::parse_dsn(&d).ok())
        .map(|(c, _)| c)
        .and_then(|c| c.get_dbname().map(str::to_string))
        .unwrap_or_else(|| "postgres".into())
}

/// The resolver's connection to shard `t`'s home database (made, and
/// claimed for a standalone node, when `conn` is None).
async fn connect_and_claim<'a>(
    node: &Node,
    t: usize,
    conn: &'a mut Option<BackendConn>,
) -> Result<&'a mut BackendConn, ResolveError> {
    if conn.is_none() {
        let mut b = resolver_connect(node, t, &home_db(node, t)).await?;
        if claims(node) {
            claim(node, t, &mut b).await?;
        }
        *conn = Some(b);
    }
    conn.as_mut()
        .ok_or_else(|| ResolveError::Claimed("no connection".into()))
}

/// What one resolver pass saw on a shard.
#[derive(Debug, Default)]
pub struct ShardPass {
    /// The gids it finished.
    pub done: Vec<String>,
    /// Every `hr_` gid prepared there when it listed them (older than the
    /// grace period or not, finished in this pass or not).
    pub prepared: Vec<String>,
}

/// One resolver pass over shard `t`, listing with `conn` (connected to the
/// DSN's database when None).
pub async fn resolve_shard(
    node: &Node,
    t: usize,
    conn: &mut Option<BackendConn>,
) -> Result<ShardPass, ResolveError> {
    let home_db = home_db(node, t);
    let b = connect_and_claim(node, t, conn).await?;
    // pg_prepared_xacts lists every database's prepared transactions; all
    // are listed (the sweep must not forget a young one's decision), the
    // old ones resolved.
    let q = format!(
        "SELECT gid, database, (prepared < now() - interval '{} milliseconds')::text FROM pg_catalog.pg_prepared_xacts WHERE left(gid, 3) = 'hr_' ORDER BY prepared",
        node.cfg().twopc_grace_ms
    );
    let rows = b.hidden_query(&q).await?;
    let mut pass = ShardPass::default();
    // `t` is an index of the node's shard table (the catalog's shards,
    // which grow at run time), never of the configuration file's list.
    let shard = node.routing.shard_name(t);
    let old_row = |row: &Vec<Option<String>>| matches!(row.get(2), Some(Some(v)) if v == "true");
    {
        let mut st = node
            .resolver_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        st.prepared.insert(shard.clone(), rows.len());
        st.in_doubt
            .insert(shard.clone(), rows.iter().filter(|r| old_row(r)).count());
    }
    for row in rows {
        let (Some(Some(gid)), Some(Some(db))) = (row.first(), row.get(1)) else {
            continue;
        };
        pass.prepared.push(gid.clone());
        let old = matches!(row.get(2), Some(Some(v)) if v == "true");
        if !old || !is_hotrepart_gid(gid) || !node.decisions.may_resolve(gid) {
            continue;
        }
        // No decision: none was ever recorded (rolling back is what any
        // later one will say: a coordinator records only after this
        // `false`, and is told `false`), or it was forgotten, which
        // happens only once no shard holds the gid prepared (a PREPARE
        // that lands after a sweep belongs to a rollback).
        let commit = match node.decisions.decision(gid) {
            Some(c) => c,
            None => match record(node, gid, false, None).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%gid, error = %e, "2PC resolver cannot record a rollback decision");
                    continue;
                }
            },
        };
        let sql = if commit {
            format!("COMMIT PREPARED '{gid}'")
        } else {
            format!("ROLLBACK PREPARED '{gid}'")
        };
        // A prepared transaction belongs to its database: finish it there.
        let r = if *db == home_db {
            b.hidden_query(&sql).await
        } else {
            match resolver_connect(node, t, db).await {
                Ok(mut other) => other.hidden_query(&sql).await,
                Err(e) => {
                    tracing::warn!(%shard, %gid, database = %db, error = %e, "2PC resolver cannot connect");
                    continue;
                }
            }
        };
        match r {
            // 42704: finished meanwhile (the decision is final).
            Ok(_) => {
                tracing::info!(%shard, %gid, database = %db, commit, "2PC resolver finished an in-doubt transaction");
                {
                    let mut st = node
                        .resolver_stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if commit {
                        st.committed += 1;
                    } else {
                        st.rolled_back += 1;
                    }
                }
                pass.done.push(gid.clone());
            }
            Err(HiddenQueryError::Server { code, .. }) if code == sqlstate::UNDEFINED_OBJECT => {}
            Err(e) => {
                tracing::warn!(%shard, %gid, database = %db, commit, error = %e, "2PC resolver could not finish an in-doubt transaction");
                if matches!(e, HiddenQueryError::Wire(_)) && *db == home_db {
                    return Err(e.into());
                }
            }
        }
    }
    Ok(pass)
}
