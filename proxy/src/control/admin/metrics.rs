//! `GET /metrics`: the node in the Prometheus/OpenMetrics text format,
//! behind the admin token like every other endpoint (Prometheus sends it
//! with `authorization: {credentials_file: …}` in its scrape config).
//!
//! Every value is read when scraped, from state the node keeps anyway
//! (pools, clients, the catalog and its jobs, the 2PC resolver's last
//! pass, the routing functions' failure counters, the per-database
//! traffic counters of `crate::stats`). On the request path only
//! atomic adds: the per-route latency histograms and the error classes of
//! `crate::stats::Requests`, read here into prometheus-client's histogram
//! encoding. A fresh registry per scrape, so nodes that share a
//! process (`hotrepart demo`) never mix their numbers.

use super::{Api, ApiError};
use crate::stats::{Route, LATENCY_BOUNDS_US};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hotrepart_routing_paxos::JobPhase;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

type Labels = Vec<(&'static str, String)>;

/// Content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn family(reg: &mut Registry, name: &str, help: &str, values: Vec<(Labels, i64)>) {
    let f = Family::<Labels, Gauge>::default();
    for (labels, v) in values {
        f.get_or_create(&labels).set(v);
    }
    reg.register(name, help, f);
}

/// Counters kept elsewhere, reported as counters (`_total`).
fn counters(reg: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>) {
    let f = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        f.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, f);
}

/// The `shard` label of a route: the shard's name, `*` for several.
fn route_shard(node: &crate::node::Node, r: Route) -> String {
    match r {
        Route::One(Some(t)) => node.routing.shard_name(t),
        Route::One(None) | Route::All | Route::Merge => "*".to_string(),
        Route::Node => String::new(),
    }
}

/// A histogram read from [`crate::stats::Histogram`] when scraped
/// (prometheus-client's own takes a lock per observation; ours are
/// atomic adds, kept by the sessions).
#[derive(Debug, Default)]
struct Snapshot(std::sync::OnceLock<SnapshotData>);

#[derive(Debug)]
struct SnapshotData {
    sum: f64,
    count: u64,
    /// (upper bound in seconds, count in this bucket), +Inf last.
    buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    fn data(counts: &[u64], sum_us: u64) -> SnapshotData {
        let bounds = LATENCY_BOUNDS_US
            .iter()
            .map(|b| *b as f64 / 1e6)
            .chain([f64::INFINITY]);
        SnapshotData {
            sum: sum_us as f64 / 1e6,
            count: counts.iter().sum(),
            buckets: bounds.zip(counts.iter().copied()).collect(),
        }
    }
}

impl TypedMetric for Snapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.0.get() {
            Some(d) => encoder.encode_histogram::<NoLabelSet>(d.sum, d.count, &d.buckets, None),
            None => encoder.encode_histogram::<NoLabelSet>(0.0, 0, &[], None),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The registry of this node's values now.
pub(crate) fn registry(api: &Api) -> Registry {
    let node = &api.node;
    let mut reg = Registry::with_prefix("hotrepart");

    // Clients and pools.
    gauge(
        &mut reg,
        "clients_connected",
        "Client connections logged in to this node",
        int(node.client_count()),
    );
    let mut size = Vec::new();
    let mut in_use = Vec::new();
    let mut idle = Vec::new();
    let mut waiting = Vec::new();
    let mut pools = node.pools.all();
    pools.sort_by(|a, b| a.0.cmp(&b.0));
    for ((_, database, user), pool) in pools {
        // Internal logins (the 2PC resolver's) are not client pools.
        if user.starts_with('\u{0}') {
            continue;
        }
        let labels: Labels = vec![
            ("shard", pool.target.shard.clone()),
            ("database", database),
            ("user", user),
        ];
        size.push((labels.clone(), int(pool.size())));
        in_use.push((labels.clone(), int(pool.busy_count())));
        idle.push((labels.clone(), int(pool.idle_count())));
        waiting.push((labels, int(pool.waiting_count())));
    }
    family(
        &mut reg,
        "pool_size",
        "Most backend connections of the pool (pool_size)",
        size,
    );
    family(
        &mut reg,
        "pool_in_use",
        "Backend connections checked out by clients (or connecting)",
        in_use,
    );
    family(
        &mut reg,
        "pool_idle",
        "Open backend connections waiting for a client",
        idle,
    );
    family(
        &mut reg,
        "pool_waiting",
        "Clients waiting for a backend connection",
        waiting,
    );

    // Client traffic per database (the admin console's SHOW STATS).
    let mut xacts = Vec::new();
    let mut queries = Vec::new();
    let mut received = Vec::new();
    let mut sent = Vec::new();
    let mut query_us = Vec::new();
    let mut xact_us = Vec::new();
    let mut wait_us = Vec::new();
    for (database, t, _) in node.stats.list() {
        let labels: Labels = vec![("database", database)];
        xacts.push((labels.clone(), t.xact_count));
        queries.push((labels.clone(), t.query_count));
        received.push((labels.clone(), t.received));
        sent.push((labels.clone(), t.sent));
        query_us.push((labels.clone(), t.query_time_us));
        xact_us.push((labels.clone(), t.xact_time_us));
        wait_us.push((labels, t.wait_time_us));
    }
    counters(
        &mut reg,
        "client_transactions",
        "Client transactions ended (a ReadyForQuery with status idle)",
        xacts,
    );
    counters(
        &mut reg,
        "client_queries",
        "Client requests answered (a simple Query, or an extended batch up to Sync)",
        queries,
    );
    counters(
        &mut reg,
        "client_received_bytes",
        "Bytes received from clients",
        received,
    );
    counters(&mut reg, "client_sent_bytes", "Bytes sent to clients", sent);
    counters(
        &mut reg,
        "client_query_time_microseconds",
        "Time from a client request to its ReadyForQuery",
        query_us,
    );
    counters(
        &mut reg,
        "client_transaction_time_microseconds",
        "Time from a transaction's first request to its end",
        xact_us,
    );
    counters(
        &mut reg,
        "client_wait_time_microseconds",
        "Time clients waited for a server connection",
        wait_us,
    );

    // Requests by route: latency histograms (their counts are the number
    // of requests per shard and route kind), and errors by class.
    let hists = Family::<Labels, Snapshot>::default();
    let mut routes = node.stats.requests.hists();
    routes.sort_by_key(|(r, _)| (r.kind(), route_shard(node, *r)));
    for (route, h) in routes {
        let labels: Labels = vec![
            ("route", route.kind().to_string()),
            ("shard", route_shard(node, route)),
        ];
        let (counts, sum_us) = h.read();
        let _ = hists
            .get_or_create(&labels)
            .0
            .set(Snapshot::data(&counts, sum_us));
    }
    reg.register(
        "request_duration_seconds",
        "Client requests (a Query, or an extended-protocol batch up to its Sync) from arrival to ReadyForQuery, by route: one (shard: the shard; * when the request's statements went to different shards), all (several shards), merge (several shards, merged by the node), node (answered by the node alone)",
        hists,
    );
    counters(
        &mut reg,
        "client_errors",
        "ErrorResponses sent to clients in answer to requests, by SQLSTATE class",
        node.stats
            .requests
            .errors()
            .into_iter()
            .map(|(class, n)| (vec![("class", class)], n))
            .collect(),
    );

    // The catalog.
    let ready = node.routing.catalog_ready();
    let snap = node.routing.catalog.load_full();
    let st = node.catalog_handle.status();
    gauge(
        &mut reg,
        "catalog_ready",
        "1 once this node routes by the replicated catalog",
        i64::from(ready),
    );
    gauge(
        &mut reg,
        "catalog_epoch",
        "Epoch of the routing table this node routes by",
        if ready { int(snap.epoch()) } else { 0 },
    );
    gauge(
        &mut reg,
        "catalog_lease_valid",
        "1 while this node holds its catalog lease (may route)",
        i64::from(node.catalog_handle.lease_valid()),
    );
    gauge(
        &mut reg,
        "catalog_lease_remaining_ms",
        "Time left on this node's lease",
        int(st.lease.remaining_ms),
    );
    gauge(
        &mut reg,
        "catalog_leader",
        "Node id of the catalog leader this node follows (0: none known)",
        int(st.leader.unwrap_or(0)),
    );
    gauge(
        &mut reg,
        "catalog_is_leader",
        "1 on the catalog leader",
        i64::from(st.leader == Some(st.node_id)),
    );
    gauge(
        &mut reg,
        "catalog_decided_index",
        "Catalog log entries decided (known here)",
        int(st.decided),
    );
    gauge(
        &mut reg,
        "catalog_applied_index",
        "Catalog log entries applied on this node",
        int(st.applied),
    );
    gauge(
        &mut reg,
        "catalog_members",
        "Members of the catalog configuration",
        int(st.members.len()),
    );
    family(
        &mut reg,
        "catalog_peer_connected",
        "1 while the link to the peer is up both ways",
        st.peers
            .iter()
            .map(|p| (vec![("peer", p.id.to_string())], i64::from(p.connected)))
            .collect(),
    );
    gauge(
        &mut reg,
        "shards",
        "Shards in the routing table",
        int(snap.shards().count()),
    );
    gauge(
        &mut reg,
        "ranges",
        "Key ranges in the routing table",
        int(snap.ranges().len()),
    );

    // Reshard jobs.
    let catalog = node.catalog_handle.catalog();
    // Every phase, 0 when no job is in it: the series exist before the
    // first job (dashboards and alerts need no special case).
    let mut by_phase: BTreeMap<&'static str, i64> = [
        JobPhase::Planned,
        JobPhase::Copy,
        JobPhase::CatchUp,
        JobPhase::CutOver,
        JobPhase::Flipped,
        JobPhase::Aborting,
        JobPhase::Done,
        JobPhase::Aborted,
        JobPhase::Failed,
    ]
    .into_iter()
    .map(|p| (p.name(), 0))
    .collect();
    let mut phase = Vec::new();
    let mut rows = Vec::new();
    let mut lag = Vec::new();
    for (id, j) in catalog.jobs() {
        *by_phase.entry(j.phase.name()).or_default() += 1;
        if j.phase.is_final() {
            continue;
        }
        let labels: Labels = vec![
            ("job", id.to_string()),
            ("from", j.spec.from.to_string()),
            ("to", j.spec.to.to_string()),
        ];
        let mut with_phase = labels.clone();
        with_phase.push(("phase", j.phase.name().to_string()));
        phase.push((with_phase, 1));
        rows.push((labels.clone(), int(j.rows_copied)));
        lag.push((labels, int(j.lag_bytes)));
    }
    family(
        &mut reg,
        "reshard_jobs",
        "Reshard jobs in the catalog by phase (done, failed and aborted ones included)",
        by_phase
            .into_iter()
            .map(|(p, n)| (vec![("phase", p.to_string())], n))
            .collect(),
    );
    family(
        &mut reg,
        "reshard_job_phase",
        "1 for the current phase of each running reshard job",
        phase,
    );
    family(
        &mut reg,
        "reshard_job_rows_copied",
        "Rows a running reshard job has copied",
        rows,
    );
    family(
        &mut reg,
        "reshard_job_lag_bytes",
        "Catch-up lag of a running reshard job at its last update",
        lag,
    );

    let (counts, sum_us) = node.stats.freezes.read();
    let freezes = Snapshot::default();
    let _ = freezes.0.set(Snapshot::data(&counts, sum_us));
    reg.register(
        "reshard_freeze_seconds",
        "How long the cut-overs of reshard jobs run by this node paused writes to the moving range (freeze to flip)",
        freezes,
    );

    // WebAssembly routing functions (a successful call: two relaxed adds).
    let mut calls = Vec::new();
    let mut fuel_used = Vec::new();
    let mut instances = Vec::new();
    let mut failed = Vec::new();
    let mut fuel = Vec::new();
    for (id, st) in node.routing.functions().stats() {
        let names = catalog.function_names(id);
        let labels: Labels = vec![
            ("function", names.join(",")),
            (
                "id",
                id.to_string().get(..16).unwrap_or_default().to_string(),
            ),
        ];
        calls.push((labels.clone(), st.calls));
        fuel_used.push((labels.clone(), st.fuel_used));
        instances.push((labels.clone(), st.instances_created));
        failed.push((labels.clone(), st.failed_calls));
        fuel.push((labels, st.out_of_fuel));
    }
    counters(
        &mut reg,
        "wasm_calls",
        "Calls of a routing function on this node (successful or not)",
        calls,
    );
    counters(
        &mut reg,
        "wasm_fuel_used",
        "Fuel (wasmtime units, about one per instruction) used by the successful calls of a routing function",
        fuel_used,
    );
    counters(
        &mut reg,
        "wasm_instances_created",
        "Instances of a routing function created on this node",
        instances,
    );
    counters(&mut reg, "wasm_failed_calls", "Calls of a routing function that failed (trap, fuel, memory, bad return): the statement failed", failed);
    counters(
        &mut reg,
        "wasm_out_of_fuel",
        "Calls of a routing function that ran out of fuel",
        fuel,
    );

    // Two-phase commit: what the resolver saw at its last pass (only the
    // node that resolves, the catalog leader, has these series).
    let st = node
        .resolver_stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let per_shard = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(s, n)| (vec![("shard", s.clone())], int(*n)))
            .collect()
    };
    family(
        &mut reg,
        "twopc_prepared",
        "Prepared hr_ transactions on the shard at the resolver's last pass",
        per_shard(&st.prepared),
    );
    family(
        &mut reg,
        "twopc_in_doubt",
        "Of those, older than twopc_grace_ms: in doubt, being finished by the resolver",
        per_shard(&st.in_doubt),
    );
    counters(
        &mut reg,
        "twopc_resolved",
        "In-doubt transactions the resolver finished on this node, by outcome",
        vec![
            (vec![("outcome", "commit".to_string())], st.committed),
            (vec![("outcome", "rollback".to_string())], st.rolled_back),
        ],
    );
    gauge(
        &mut reg,
        "twopc_decisions_recorded",
        "Commit decisions of two-phase transactions kept in the catalog",
        int(catalog.decisions().count()),
    );
    reg
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let reg = registry(&api);
    let mut body = String::new();
    encode(&mut body, &reg)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response())
}
