//! The HTTP admin API (JSON over HTTP/1.1, one per node; `proxyctl` is its
//! client).
//!
//! Every request carries `Authorization: Bearer <token>` (`[admin] token`);
//! anything else gets 401 — one middleware (`require_token`) checks it
//! before any handler runs or any body is read; no endpoint is public. Catalog changes are proposed to the replicated
//! catalog from whichever node received them (omnipaxos forwards a
//! follower's proposal to the leader) and answered once decided and applied
//! on this node. Answers: 200 with JSON; errors as `{"error": "…"}` with
//! 400 (bad request), 401, 404 (unknown range), 409 (the catalog refused the
//! change, or the data forbids it), 503 (no catalog quorum), 504 (no answer
//! in time: the change may still be applied).
//!
//! Guarantees:
//! - metadata-only range changes never strand rows: assigning a range to
//!   another shard freezes it, waits until every node applied the freeze
//!   (or its lease ran out), checks that no sharded table holds a row of the
//!   range on the old owners, and only then flips the owner (moving rows is
//!   `proxyctl reshard`);
//! - declaring a table sharded is refused while any shard holds rows of it
//!   (they would be stranded on the home shard);
//! - routing functions are validated before they enter the log, and
//!   attached only to empty tables ([`functions`]).
//!
//! Endpoints: `GET /metrics` (Prometheus, [`metrics`]), `GET /v1/status`, `GET|POST /v1/shards`,
//! `DELETE /v1/shards/{name}`, `GET|POST /v1/tables`,
//! `POST /v1/tables/{table}/function`, `GET|POST /v1/functions`,
//! `DELETE /v1/functions/{name}`, `GET /v1/ranges`,
//! `POST /v1/ranges/split`, `POST /v1/ranges/assign`,
//! `POST /v1/ranges/unfreeze`, `POST /v1/nodes`, `DELETE /v1/nodes/{id}`,
//! `POST /v1/fence` (what a cut-over calls on every node), the reshard and
//! job endpoints of `admin/jobs.rs` (`/v1/reshard/…`, `/v1/jobs…`), and
//! `POST /v1/debug/partition`, refused unless
//! `[cluster] allow_fault_injection` is set (tests).

mod functions;
mod jobs;
mod metrics;

use crate::control::pg::{connect, databases_with};
use crate::node::Node;
use crate::sql::{quote_ident, quote_table};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hotrepart_router::catalog::{KeyRange, KeyType, RangeStatus, RoutingFunction};
use hotrepart_routing_paxos::command::{Dsn, TableSpec};
use hotrepart_routing_paxos::{
    Applied, CatalogCommand, FreezeId, Membership, ProposeError, ReconfigureError,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a catalog change may take before the API answers 504.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) node: Arc<Node>,
    token: Arc<str>,
    allow_fault_injection: bool,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

/// Binds the admin listener and serves it in a task of the node's
/// supervisor until the node shuts down (requests in flight then finish;
/// [`Node::shutdown`] waits for them, within its bound). Returns the
/// address it listens on. Plain HTTP: see [`serve_tls`] for HTTPS.
pub async fn serve(
    node: Arc<Node>,
    listen: &str,
    token: String,
    allow_fault_injection: bool,
) -> std::io::Result<SocketAddr> {
    serve_tls(node, listen, token, allow_fault_injection, None).await
}

/// As [`serve`]; with `tls` (`[admin] tls_cert` and `tls_key`: PEM
/// certificate chain and key) the port speaks HTTPS only: a plain HTTP
/// request fails its TLS handshake and gets no answer.
pub async fn serve_tls(
    node: Arc<Node>,
    listen: &str,
    token: String,
    allow_fault_injection: bool,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> std::io::Result<SocketAddr> {
    let acceptor = match tls {
        Some((cert, key)) => Some(
            crate::node::load_tls(cert, key)
                .map_err(|e| std::io::Error::other(format!("[admin] tls_cert/tls_key: {e}")))?
                .acceptor,
        ),
        None => None,
    };
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let stop = node.tasks.shutdown_token();
    let tasks = node.tasks.clone();
    let app = router(Api {
        node,
        token: token.into(),
        allow_fault_injection,
    });
    match acceptor {
        None => {
            tasks.spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::warn!(error = %e, "admin API stopped");
                }
            });
        }
        Some(acceptor) => {
            let tls = TlsListener::start(&tasks, listener, acceptor, addr);
            tasks.spawn(async move {
                if let Err(e) = axum::serve(tls, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::warn!(error = %e, "admin API stopped");
                }
            });
        }
    }
    Ok(addr)
}

/// The admin port's HTTPS listener for `axum::serve`: each TLS handshake
/// runs in a task of its own (a slow or silent client holds up no other),
/// at most [`TlsListener::HANDSHAKES`] at once, each within
/// [`TlsListener::HANDSHAKE_TIMEOUT`]; finished ones are handed to axum.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    addr: SocketAddr,
}

impl TlsListener {
    const HANDSHAKES: usize = 64;
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    fn start(
        tasks: &Arc<crate::control::supervisor::Supervisor>,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        addr: SocketAddr,
    ) -> TlsListener {
        let (tx, rx) = tokio::sync::mpsc::channel(Self::HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(Self::HANDSHAKES));
        let stop = tasks.shutdown_token();
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin API: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stop.cancelled() => return,
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                handshakes.spawn_until_shutdown(async move {
                    match tokio::time::timeout(Self::HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await
                    {
                        Ok(Ok(s)) => {
                            drop(slot);
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin API: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor ended (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Every endpoint, behind the token check ([`require_token`]). No endpoint
/// is public (the dashboard's page at `/` holds no data: its script calls
/// the endpoints with the token); a path that names none is 404 with or
/// without a token.
fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/shards", get(shards).post(add_shard))
        .route("/v1/shards/{name}", delete(remove_shard))
        .route("/v1/tables", get(tables).post(declare_table))
        .route("/v1/tables/{table}/function", post(functions::attach))
        .route(
            "/v1/functions",
            get(functions::list)
                .post(functions::upload)
                .layer(DefaultBodyLimit::max(functions::MAX_UPLOAD_BODY)),
        )
        .route("/v1/functions/{name}", delete(functions::remove))
        .route("/v1/ranges", get(ranges))
        .route("/v1/ranges/split", post(split_range))
        .route("/v1/ranges/assign", post(assign_range))
        .route("/v1/ranges/unfreeze", post(unfreeze_range))
        .route("/v1/nodes", post(add_node))
        .route("/v1/nodes/{id}", delete(remove_node))
        .route("/v1/debug/partition", post(partition))
        .route("/v1/fence", post(fence))
        .merge(jobs::routes())
        // Last: it wraps every route above (and only routes: an unknown
        // path stays 404).
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        // The dashboard's page: static, no data in it (its script asks
        // for the token and calls the endpoints above with it).
        .route("/", get(dashboard))
        .with_state(api)
}

/// `GET /`: the web dashboard, one page shipped inside the binary (no CDN,
/// no asset elsewhere): the key space per shard, jobs with their progress,
/// nodes with leader and lease, throughput and latency, refreshed every
/// second from `/v1/status`, `/v1/ranges`, `/v1/jobs` and `/metrics`. The
/// token is typed once or given once as `/?token=…`, then kept in a
/// cookie (SameSite=Strict) and sent as the Bearer token of every call.
async fn dashboard() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
        ],
        include_str!("admin/dashboard.html"),
    )
        .into_response()
}

/// The admin token check, in front of every endpoint: it runs before the
/// handler and its extractors, so a request without the token is answered
/// 401 before its body is read — never 400, 413 or 415 for a body nobody
/// may send.
async fn require_token(State(api): State<Api>, req: Request, next: Next) -> Response {
    match authorize(&api, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn authorize(api: &Api, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison: the token is a password.
    let a = given.as_bytes();
    let b = api.token.as_bytes();
    let mut diff = a.len() ^ b.len();
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= usize::from(x ^ y);
    }
    if diff != 0 || a.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer …)",
        ));
    }
    Ok(())
}

impl Api {
    /// Proposes `cmd` and waits until it is applied here.
    pub(crate) async fn propose(&self, cmd: CatalogCommand) -> Result<Applied, ApiError> {
        let kind = cmd.kind();
        match self
            .node
            .catalog_handle
            .propose(cmd, PROPOSE_TIMEOUT)
            .await
        {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(rejected)) => Err(ApiError::conflict(format!(
                "the catalog refused {kind}: {rejected}"
            ))),
            Err(ProposeError::Timeout) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{kind}: no decision from the catalog quorum within {} s; the change may still be applied (check `proxyctl status`)",
                    PROPOSE_TIMEOUT.as_secs()
                ),
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{kind}: {e}"),
            )),
        }
    }

    pub(crate) fn snapshot(
        &self,
    ) -> Result<Arc<hotrepart_router::catalog::RoutingSnapshot>, ApiError> {
        // The catalog as applied here, not the node's published copy: a
        // change this request (or the previous one) proposed is in it as
        // soon as `propose` returned, while publishing follows a moment
        // later.
        self.node
            .catalog_handle
            .catalog()
            .snapshot()
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this node has no routing catalog yet",
                )
            })
    }

    pub(crate) fn range_at(&self, lo: u64) -> Result<KeyRange, ApiError> {
        let snap = self.snapshot()?;
        snap.ranges()
            .iter()
            .find(|r| r.lo == lo)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no key range starts at {lo} (see `proxyctl range list`)"),
                )
            })
    }
}

pub(crate) fn epoch_json(applied: &Applied) -> Value {
    match applied {
        Applied::Routing(s) => json!({ "epoch": s.epoch() }),
        other => json!({ "applied": format!("{other:?}") }),
    }
}

#[derive(Deserialize)]
struct FenceReq {
    epoch: u64,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// `POST /v1/fence {epoch, timeout_ms}`: answers once this node routes by
/// the routing table of `epoch` (or later) and no statement routed by an
/// older table is in flight (`RoutingState::fence`); 409 when that takes longer
/// than `timeout_ms` (default 5 s, at most 60 s). A cut-over calls it on
/// every node after its freeze and after its flip.
async fn fence(State(api): State<Api>, Json(req): Json<FenceReq>) -> ApiResult {
    let limit = Duration::from_millis(req.timeout_ms.unwrap_or(5_000).min(60_000));
    api.node
        .routing
        .fence(req.epoch, limit)
        .await
        .map_err(ApiError::conflict)?;
    Ok(Json(
        json!({ "epoch": api.node.routing.catalog.load().epoch() }),
    ))
}

async fn status(State(api): State<Api>) -> ApiResult {
    let node = &api.node;
    let snap = node.routing.catalog.load_full();
    let cluster = serde_json::to_value(node.catalog_handle.status())
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    Ok(Json(json!({
        "ready": node.routing.catalog_ready(),
        "epoch": if node.routing.catalog_ready() { snap.epoch() } else { 0 },
        "lease_valid": node.catalog_handle.lease_valid(),
        "clients": node.client_count(),
        "shards": snap.shards().count(),
        "ranges": snap.ranges().len(),
        "cluster": cluster,
        "tasks": node.tasks.status(),
    })))
}

#[derive(Deserialize)]
struct AddNode {
    id: u64,
    /// Its `[cluster] listen` address ("host:port").
    addr: String,
    /// Its admin API base URL (recorded in the membership: the cut-over fences that node through it).
    #[serde(default)]
    admin: Option<String>,
}

fn membership_json(m: &Membership) -> Value {
    json!({
        "config_id": m.config_id,
        "members": m.members.iter().map(|(id, addr)| json!({ "id": id, "addr": addr, "admin": m.admin.get(id) })).collect::<Vec<_>>(),
    })
}

fn reconfigure_error(e: ReconfigureError) -> ApiError {
    let status = match e {
        ReconfigureError::Invalid(_) => StatusCode::BAD_REQUEST,
        ReconfigureError::InProgress => StatusCode::CONFLICT,
        ReconfigureError::NotMember | ReconfigureError::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        ReconfigureError::Timeout => StatusCode::GATEWAY_TIMEOUT,
    };
    let hint = match e {
        ReconfigureError::NotMember => " (ask a node that is a member: see `proxyctl status`)",
        ReconfigureError::Timeout => " (check `proxyctl status` for the configuration)",
        _ => "",
    };
    ApiError::new(status, format!("{e}{hint}"))
}

/// Adds a catalog node (it must be running with `[cluster] join = true`).
async fn add_node(State(api): State<Api>, Json(req): Json<AddNode>) -> ApiResult {
    if req.id == 0 {
        return Err(ApiError::bad("node id 0 is not valid"));
    }
    let addr = req.addr.trim();
    if addr
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(ApiError::bad(format!(
            "node {}: address {addr:?} is not host:port",
            req.id
        )));
    }
    if let Some(admin) = &req.admin {
        if !(admin.starts_with("http://") || admin.starts_with("https://")) {
            return Err(ApiError::bad(format!(
                "node {}: admin URL {admin:?} must start with http:// or https://",
                req.id
            )));
        }
    }
    let m = api
        .node
        .catalog_handle
        .add_node_with_admin(
            req.id,
            addr,
            req.admin.as_deref().map(|a| a.trim_end_matches('/')),
            PROPOSE_TIMEOUT,
        )
        .await
        .map_err(reconfigure_error)?;
    Ok(Json(membership_json(&m)))
}

/// Removes a catalog node.
async fn remove_node(State(api): State<Api>, Path(id): Path<u64>) -> ApiResult {
    let m = api
        .node
        .catalog_handle
        .remove_node(id, PROPOSE_TIMEOUT)
        .await
        .map_err(reconfigure_error)?;
    Ok(Json(membership_json(&m)))
}

fn status_name(s: RangeStatus) -> &'static str {
    match s {
        RangeStatus::Active => "active",
        RangeStatus::Frozen => "frozen",
        RangeStatus::Moving => "moving",
    }
}

async fn shards(State(api): State<Api>) -> ApiResult {
    let snap = api.snapshot()?;
    let list: Vec<Value> = snap
        .shards()
        .map(|s| {
            let reads = snap
                .ranges()
                .iter()
                .filter(|r| r.read_owner == s.id)
                .count();
            let writes = snap
                .ranges()
                .iter()
                .filter(|r| r.write_owner == s.id)
                .count();
            json!({
                "name": s.id.as_str(),
                "dsn": redact_dsn(&s.dsn),
                "home": snap.home_shard() == &s.id,
                "read_ranges": reads,
                "write_ranges": writes,
            })
        })
        .collect();
    Ok(Json(json!({ "epoch": snap.epoch(), "shards": list })))
}

/// A DSN with its password replaced by `***`.
fn redact_dsn(dsn: &str) -> String {
    let tls = crate::tls::split_shard_dsn(dsn);
    let parsed = match &tls {
        Ok((d, _)) => d
            .parse::<tokio_postgres::Config>()
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    match parsed {
        Ok(c) => {
            let host = match c.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "?".into(),
            };
            let port = c.get_ports().first().copied().unwrap_or(5432);
            let mut out = format!("host={host} port={port}");
            if let Some(u) = c.get_user() {
                out.push_str(&format!(" user={u}"));
            }
            if let Some(d) = c.get_dbname() {
                out.push_str(&format!(" dbname={d}"));
            }
            if c.get_password().is_some() {
                out.push_str(" password=***");
            }
            if let Ok((_, t)) = &tls {
                if t.mode != "prefer" {
                    out.push_str(&format!(" sslmode={}", t.mode));
                }
            }
            out
        }
        Err(_) => "<unparsable>".into(),
    }
}

#[derive(Deserialize)]
struct AddShard {
    name: String,
    dsn: String,
}

async fn add_shard(State(api): State<Api>, Json(req): Json<AddShard>) -> ApiResult {
    // Refuse a shard the nodes could not reach before it enters the log.
    connect(&req.dsn, None)
        .await
        .map_err(|e| ApiError::bad(format!("shard {}: {e}", req.name)))?;
    let a = api
        .propose(CatalogCommand::AddShard {
            shard: req.name,
            dsn: Dsn(req.dsn),
        })
        .await?;
    Ok(Json(epoch_json(&a)))
}

async fn remove_shard(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    let a = api
        .propose(CatalogCommand::RemoveShard { shard: name })
        .await?;
    Ok(Json(epoch_json(&a)))
}

async fn tables(State(api): State<Api>) -> ApiResult {
    let snap = api.snapshot()?;
    let catalog = api.node.catalog_handle.catalog();
    let sharded: Vec<Value> = snap
        .sharded_tables()
        .map(|t| {
            // A WebAssembly function is shown by its name(s) when it has one.
            let names = t
                .function
                .wasm_id()
                .map(|id| catalog.function_names(id).join(","))
                .filter(|n| !n.is_empty());
            json!({
                "table": t.name,
                "key_column": t.key_column,
                "key_type": format!("{:?}", t.key_type).to_lowercase(),
                "function": t.function.to_string(),
                "function_name": names,
            })
        })
        .collect();
    let reference: Vec<&str> = snap.reference_tables().collect();
    Ok(Json(json!({
        "epoch": snap.epoch(),
        "home_shard": snap.home_shard().as_str(),
        "sharded": sharded,
        "reference": reference,
    })))
}

#[derive(Deserialize)]
struct DeclareTable {
    table: String,
    /// "sharded" or "reference".
    kind: String,
    #[serde(default)]
    key_column: Option<String>,
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    /// Name of an uploaded WebAssembly routing function (instead of the
    /// PostgreSQL hash with `seed`).
    #[serde(default)]
    function: Option<String>,
}

async fn declare_table(State(api): State<Api>, Json(req): Json<DeclareTable>) -> ApiResult {
    let snap = api.snapshot()?;
    let sharded = (req.kind == "sharded").then(|| req.table.clone());
    let cmd = match req.kind.as_str() {
        "sharded" => {
            let key_column = req
                .key_column
                .ok_or_else(|| ApiError::bad("a sharded table needs key_column"))?;
            let key_type: KeyType = req
                .key_type
                .as_deref()
                .ok_or_else(|| ApiError::bad("a sharded table needs key_type"))?
                .parse()
                .map_err(|e| ApiError::bad(format!("key_type: {e}")))?;
            let function = match (req.function.as_deref(), req.seed) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::bad(
                        "give either a routing function or a hash seed, not both",
                    ))
                }
                (Some(name), None) => RoutingFunction::Wasm {
                    id: functions::function_id(&api.node.catalog_handle.catalog(), name)?,
                },
                (None, seed) => RoutingFunction::PgHash {
                    seed: seed.unwrap_or(0),
                },
            };
            // Rows already in the table sit on the home shard (it was
            // undeclared): declaring it sharded would strand them.
            let counts = count_rows(&snap, &req.table, None).await?;
            if let Some((shard, db, n)) = counts.iter().find(|c| c.2 > 0) {
                return Err(ApiError::conflict(format!(
                    "table {} holds {n} row(s) on shard {shard} (database {db}); declaring it sharded would strand them — declare it while it is empty",
                    req.table
                )));
            }
            // A unique index without the key would be enforced per shard.
            let keys = [(req.table.clone(), key_column.clone())];
            let found = unique_outside_key(&snap, &keys).await?;
            if !found.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{}; table {} was not declared",
                    crate::exec::unique::explain(&found, &keys),
                    req.table
                )));
            }
            CatalogCommand::DeclareSharded(TableSpec {
                table: req.table,
                key_column,
                key_type,
                function,
            })
        }
        "reference" if req.function.is_some() || req.seed.is_some() => {
            return Err(ApiError::bad(
                "a reference table has no routing function or seed",
            ))
        }
        "reference" => CatalogCommand::DeclareReference { table: req.table },
        other => {
            return Err(ApiError::bad(format!(
                "kind must be \"sharded\" or \"reference\", not {other:?}"
            )))
        }
    };
    let a = api.propose(cmd).await?;
    if let Some(table) = sharded {
        rows_written_while_declared(&api, &table).await?;
    }
    Ok(Json(epoch_json(&a)))
}

/// After a table was declared sharded: a write routed to the home shard
/// while it was undeclared — still in flight, or done in a transaction
/// still open — lands after the emptiness check, where reads by key do
/// not look. Waits for them (every node fenced, then each transaction
/// through a SHARE lock on the table) and looks again: rows found fail
/// the declaration loudly (it stays: the catalog cannot take it back).
async fn rows_written_while_declared(api: &Api, table: &str) -> Result<(), ApiError> {
    let unchecked = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "table {table} was declared sharded, but whether rows were written to it on the home shard while it was being declared could not be checked ({e}); check with SELECT count(*) FROM {table} on the home shard"
            ),
        )
    };
    crate::control::jobs::settle_retrying(&api.node, 4)
        .await
        .map_err(|e| unchecked(e.to_string()))?;
    let snap = api.snapshot()?;
    let home = snap.home_shard().clone();
    let dsn = snap
        .shard(&home)
        .map(|s| s.dsn.clone())
        .ok_or_else(|| unchecked("no home shard".into()))?;
    // Only rows whose key another shard owns are misplaced (rows written
    // since, by key, are where they belong). A WebAssembly function has no
    // SQL form: every row counts then.
    let misplaced = snap.sharded_table(table).and_then(|t| {
        let hash = t
            .function
            .sql_hash(t.key_type, &quote_ident(&t.key_column))?;
        let elsewhere: Vec<String> = snap
            .ranges()
            .iter()
            .filter(|r| r.write_owner != home || r.read_owner != home)
            .map(|r| r.sql_predicate(&hash))
            .collect();
        Some(elsewhere)
    });
    let filter = match &misplaced {
        Some(v) if v.is_empty() => return Ok(()),
        Some(v) => format!(" WHERE {}", v.join(" OR ")),
        None => String::new(),
    };
    let q = quote_table(table);
    for (db, mut c, _) in databases_with(&dsn, &[table.to_string()])
        .await
        .map_err(unchecked)?
    {
        let tx = c
            .transaction()
            .await
            .map_err(|e| unchecked(e.to_string()))?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '10s'; LOCK TABLE {q} IN SHARE MODE"
        ))
        .await
        .map_err(|e| unchecked(e.to_string()))?;
        let n: i64 = tx
            .query_one(format!("SELECT count(*) FROM {q}{filter}").as_str(), &[])
            .await
            .map_err(|e| unchecked(e.to_string()))?
            .get(0);
        drop(tx);
        if n > 0 {
            return Err(ApiError::conflict(format!(
                "table {table} was declared sharded (catalog epoch {}), but {n} row(s) written to it on home shard {home} (database {db}) while it was being declared have keys other shards own: reads by key do not find them there — copy them out and delete them on shard {home}, then insert them again through a node",
                snap.epoch()
            )));
        }
    }
    Ok(())
}

async fn ranges(State(api): State<Api>) -> ApiResult {
    let snap = api.snapshot()?;
    let list: Vec<Value> = snap
        .ranges()
        .iter()
        .map(|r| {
            json!({
                "lo": r.lo,
                "hi": r.hi,
                "read_owner": r.read_owner.as_str(),
                "write_owner": r.write_owner.as_str(),
                "status": status_name(r.status),
                "hidden_on": r.hidden_on.as_ref().map(|s| s.as_str()),
            })
        })
        .collect();
    Ok(Json(json!({ "epoch": snap.epoch(), "ranges": list })))
}

#[derive(Deserialize)]
struct SplitRange {
    lo: u64,
    /// First point of the upper half (default: the middle).
    #[serde(default)]
    at: Option<u64>,
}

async fn split_range(State(api): State<Api>, Json(req): Json<SplitRange>) -> ApiResult {
    let (_, _, a) = split(&api, req.lo, req.at).await?;
    Ok(Json(epoch_json(&a)))
}

/// The middle of `span` (the first point of its upper half).
pub(crate) fn midpoint(span: hotrepart_router::catalog::Span) -> Result<u64, ApiError> {
    u64::try_from(u128::from(span.lo) + span.len() / 2)
        .map_err(|_| ApiError::bad("range too small to split"))
}

/// Splits the range starting at `lo` at `at` (default: its middle);
/// returns the range as it was, the split point and what was applied.
pub(crate) async fn split(
    api: &Api,
    lo: u64,
    at: Option<u64>,
) -> Result<(KeyRange, u64, Applied), ApiError> {
    let r = api.range_at(lo)?;
    let at = match at {
        Some(at) => at,
        None => midpoint(r.span())?,
    };
    let a = api
        .propose(CatalogCommand::SplitRange {
            range: r.span(),
            at,
        })
        .await?;
    Ok((r, at, a))
}

#[derive(Deserialize)]
struct AssignRange {
    lo: u64,
    /// New owner for reads and writes.
    to: String,
}

async fn assign_range(State(api): State<Api>, Json(req): Json<AssignRange>) -> ApiResult {
    let r = api.range_at(req.lo)?;
    let snap = api.snapshot()?;
    if snap.shards().all(|s| s.id.as_str() != req.to.as_str()) {
        return Err(ApiError::bad(format!("unknown shard {:?}", req.to)));
    }
    if r.read_owner.as_str() == req.to && r.write_owner.as_str() == req.to {
        return Ok(Json(json!({ "epoch": snap.epoch(), "unchanged": true })));
    }
    if r.status != RangeStatus::Active {
        return Err(ApiError::conflict(format!(
            "range {} is {}; only an active range can be assigned",
            r.span(),
            status_name(r.status)
        )));
    }
    let span = r.span();
    let freeze = FreezeId(rand::random::<u64>());
    api.propose(CatalogCommand::FreezeRange {
        range: span,
        freeze,
    })
    .await?;
    let result = assign_frozen(&api, &r, &req.to).await;
    // Whatever happened, the range is thawed again (with the new owner if
    // the assignment went through).
    let thaw = api
        .propose(CatalogCommand::UnfreezeRange {
            range: span,
            freeze,
            operator: false,
        })
        .await;
    let a = result?;
    thaw.map_err(|e| {
        ApiError::new(
            e.status,
            format!(
                "the range was assigned but could not be unfrozen ({}); run `proxyctl range unfreeze {}`",
                e.message, span.lo
            ),
        )
    })?;
    Ok(Json(epoch_json(&a)))
}

/// With the range frozen: wait until no node can still write to it by an
/// older routing table, check it is empty, assign it.
async fn assign_frozen(api: &Api, r: &KeyRange, to: &str) -> Result<Applied, ApiError> {
    crate::control::jobs::settle(&api.node)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let snap = api.snapshot()?;
    for t in snap.sharded_tables() {
        let col = quote_ident(&t.key_column);
        // A WebAssembly function has no SQL form: then the table must be
        // empty on the owners altogether.
        let pred = t
            .function
            .sql_hash(t.key_type, &col)
            .map(|h| r.sql_predicate(&h));
        for owner in [&r.read_owner, &r.write_owner] {
            let counts = count_rows_on(&snap, owner.as_str(), &t.name, pred.as_deref()).await?;
            if let Some((db, n)) = counts.iter().find(|c| c.1 > 0) {
                return Err(ApiError::conflict(format!(
                    "range {} holds {n} row(s) of table {} on shard {owner} (database {db}); assigning it would strand them — moving rows is `proxyctl reshard move`",
                    r.span(),
                    t.name
                )));
            }
        }
    }
    api.propose(CatalogCommand::AssignRange {
        range: r.span(),
        read_owner: to.to_string(),
        write_owner: to.to_string(),
    })
    .await
}

#[derive(Deserialize)]
struct UnfreezeRange {
    lo: u64,
}

/// Operator escape hatch: thaws a range left frozen by an admin request
/// whose node died. The freeze of a reshard job that has not ended is
/// refused (409, naming the job): lifting it would let writes reach the
/// source while the job verifies and flips; the job's runner lifts it
/// itself, and aborting the job (`proxyctl jobs abort`) ends it.
async fn unfreeze_range(State(api): State<Api>, Json(req): Json<UnfreezeRange>) -> ApiResult {
    let r = api.range_at(req.lo)?;
    let catalog = api.node.catalog_handle.catalog();
    let Some(f) = catalog.freeze(r.lo) else {
        return Err(ApiError::conflict(format!(
            "range {} is not frozen",
            r.span()
        )));
    };
    if let Some(job) = catalog.live_job_freezing(r.span(), f.id) {
        let phase = catalog.job(job).map_or("?", |j| j.phase.name());
        return Err(ApiError::conflict(format!(
            "range {} is frozen by reshard job {job} (phase {phase}), which lifts its freeze itself; unfreezing it now would let writes reach the source while the job verifies and flips — to end the freeze, abort the job: `proxyctl jobs abort {job}`",
            r.span()
        )));
    }
    let a = api
        .propose(CatalogCommand::UnfreezeRange {
            range: r.span(),
            freeze: f.id,
            operator: true,
        })
        .await?;
    Ok(Json(epoch_json(&a)))
}

#[derive(Deserialize)]
struct Partition {
    on: bool,
}

async fn partition(State(api): State<Api>, Json(req): Json<Partition>) -> ApiResult {
    if !api.allow_fault_injection {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "fault injection is disabled ([cluster] allow_fault_injection)",
        ));
    }
    api.node.catalog_handle.set_partitioned(req.on);
    Ok(Json(json!({ "partitioned": req.on })))
}

/// Rows of `table` matching `pred` on every shard: (shard, database, n).
async fn count_rows(
    snap: &hotrepart_router::catalog::RoutingSnapshot,
    table: &str,
    pred: Option<&str>,
) -> Result<Vec<(String, String, i64)>, ApiError> {
    let mut out = Vec::new();
    for s in snap.shards() {
        for (db, n) in count_rows_on(snap, s.id.as_str(), table, pred).await? {
            out.push((s.id.as_str().to_string(), db, n));
        }
    }
    Ok(out)
}

/// The unique indexes of `keys`' tables that leave out their key column
/// ([`crate::exec::unique`]), on every shard and database that has the
/// table.
async fn unique_outside_key(
    snap: &hotrepart_router::catalog::RoutingSnapshot,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, String)>, ApiError> {
    let Some(sql) = crate::exec::unique::check_sql(keys) else {
        return Ok(Vec::new());
    };
    let tables: Vec<String> = keys.iter().map(|(t, _)| t.clone()).collect();
    let mut out: Vec<(String, String, String)> = Vec::new();
    for shard in snap.shards() {
        let shard_err = |e: String| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("shard {}: {e}", shard.id.as_str()),
            )
        };
        for (_, c, _) in databases_with(&shard.dsn, &tables)
            .await
            .map_err(shard_err)?
        {
            for r in c
                .query(sql.as_str(), &[])
                .await
                .map_err(|e| shard_err(format!("{e}")))?
            {
                let row: (String, String, String) = (r.get(0), r.get(1), r.get(2));
                if !out.contains(&row) {
                    out.push(row);
                }
            }
        }
    }
    Ok(out)
}

/// Rows of `table` matching `pred` on `shard`, in each of its databases
/// that has the table: (database, n).
async fn count_rows_on(
    snap: &hotrepart_router::catalog::RoutingSnapshot,
    shard: &str,
    table: &str,
    pred: Option<&str>,
) -> Result<Vec<(String, i64)>, ApiError> {
    let shard_err = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shard {shard}: {e}"),
        )
    };
    let dsn = snap
        .shards()
        .find(|s| s.id.as_str() == shard)
        .map(|s| s.dsn.clone())
        .ok_or_else(|| ApiError::bad(format!("unknown shard {shard}")))?;
    let mut out = Vec::new();
    let dbs = databases_with(&dsn, &[table.to_string()])
        .await
        .map_err(shard_err)?;
    for (db, c, _) in dbs {
        let sql = format!(
            "SELECT count(*) FROM {}{}",
            quote_table(table),
            pred.map(|p| format!(" WHERE {p}")).unwrap_or_default()
        );
        let n: i64 = c
            .query_one(sql.as_str(), &[])
            .await
            .map_err(|e| shard_err(format!("{sql}: {e}")))?
            .get(0);
        out.push((db, n));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, Method};
    use tower::ServiceExt;

    const TOKEN: &str = "s3cret-token";

    /// The admin router of a node alone, with its catalog in memory (no
    /// shard is contacted by the requests below).
    fn app() -> Router {
        let cfg = crate::Config::from_toml(
            r#"
            [[shards]]
            name = "s0"
            dsn = "postgres://u:p@127.0.0.1:1/db"
            [[users]]
            name = "app"
            auth = "trust"
            "#,
        )
        .expect("config");
        let node = Node::new(cfg).expect("node");
        router(Api {
            node,
            token: TOKEN.into(),
            allow_fault_injection: false,
        })
    }

    async fn call(
        app: &Router,
        method: Method,
        path: &str,
        auth: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let res = app
            .clone()
            .oneshot(req.body(body.into()).expect("request"))
            .await
            .expect("the router answers");
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("answer body");
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "text": String::from_utf8_lossy(&bytes) }));
        (status, json)
    }

    fn is_401(status: StatusCode, body: &Value) -> bool {
        status == StatusCode::UNAUTHORIZED
            && body["error"]
                .as_str()
                .is_some_and(|e| e.contains("missing or wrong admin token"))
    }

    /// The token is checked before the body is read or parsed: without
    /// it, a malformed, huge or untyped body is 401 — not 400, 413 or 415
    /// (as when each handler checked the token after its `Json`
    /// extractor had run).
    #[tokio::test]
    async fn the_token_is_checked_before_the_body() {
        let app = app();
        let json = Some("application/json");
        let bearer = format!("Bearer {TOKEN}");
        // Malformed JSON.
        for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
            let (st, body) = call(&app, Method::POST, "/v1/shards", auth, json, "{not json").await;
            assert!(is_401(st, &body), "{auth:?}: {st} {body}");
        }
        // Larger than any body limit (2 MiB by default, the function upload's
        // own on /v1/functions).
        let huge = vec![b'x'; 3 * functions::MAX_UPLOAD_BODY];
        for path in [
            "/v1/shards",
            "/v1/functions",
            "/v1/reshard/move",
            "/v1/fence",
        ] {
            let (st, body) = call(&app, Method::POST, path, None, json, huge.clone()).await;
            assert!(is_401(st, &body), "{path}: {st} {body}");
        }
        // No content type.
        let (st, body) = call(&app, Method::POST, "/v1/ranges/split", None, None, "{}").await;
        assert!(is_401(st, &body), "{st} {body}");
        // With the token the same bodies reach the handler's extractor.
        let (st, _) = call(
            &app,
            Method::POST,
            "/v1/shards",
            Some(&bearer),
            json,
            "{not json",
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _) = call(&app, Method::POST, "/v1/shards", Some(&bearer), json, huge).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
        let (st, _) = call(
            &app,
            Method::POST,
            "/v1/ranges/split",
            Some(&bearer),
            None,
            "{}",
        )
        .await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    /// Every endpoint needs the token; with it they answer as before.
    #[tokio::test]
    async fn every_endpoint_needs_the_token() {
        let app = app();
        let bearer = format!("Bearer {TOKEN}");
        let endpoints = [
            (Method::GET, "/metrics"),
            (Method::GET, "/v1/status"),
            (Method::GET, "/v1/shards"),
            (Method::POST, "/v1/shards"),
            (Method::DELETE, "/v1/shards/s0"),
            (Method::GET, "/v1/tables"),
            (Method::POST, "/v1/tables"),
            (Method::POST, "/v1/tables/t/function"),
            (Method::GET, "/v1/functions"),
            (Method::POST, "/v1/functions"),
            (Method::DELETE, "/v1/functions/f"),
            (Method::GET, "/v1/ranges"),
            (Method::POST, "/v1/ranges/split"),
            (Method::POST, "/v1/ranges/assign"),
            (Method::POST, "/v1/ranges/unfreeze"),
            (Method::POST, "/v1/nodes"),
            (Method::DELETE, "/v1/nodes/2"),
            (Method::POST, "/v1/debug/partition"),
            (Method::POST, "/v1/fence"),
            (Method::POST, "/v1/reshard/move"),
            (Method::POST, "/v1/reshard/split"),
            (Method::GET, "/v1/jobs"),
            (Method::GET, "/v1/jobs/j1"),
            (Method::POST, "/v1/jobs/j1/abort"),
            (Method::POST, "/v1/reshard/add-shard"),
            (Method::POST, "/v1/reshard/drain"),
        ];
        let wrong = [
            None,
            Some(""),
            Some("Bearer "),
            Some("Bearer wrong"),
            Some(TOKEN),
            Some("bearer s3cret-token"),
            Some("Bearer s3cret-token2"),
            Some("Bearer s3cret-toke"),
        ];
        for (method, path) in &endpoints {
            for auth in wrong {
                let (st, body) = call(
                    &app,
                    method.clone(),
                    path,
                    auth,
                    Some("application/json"),
                    "{}",
                )
                .await;
                assert!(is_401(st, &body), "{method} {path} {auth:?}: {st} {body}");
            }
        }
        // With the token: a read answers 200, a bad request its own error.
        let (st, body) = call(&app, Method::GET, "/v1/status", Some(&bearer), None, "").await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(body["shards"], 1, "{body}");
        let (st, body) = call(&app, Method::GET, "/v1/ranges", Some(&bearer), None, "").await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let (st, body) = call(
            &app,
            Method::POST,
            "/v1/ranges/split",
            Some(&bearer),
            Some("application/json"),
            r#"{"lo": 12345}"#,
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("12345")),
            "{body}"
        );
        // A path that names no endpoint is 404, token or not.
        for auth in [None, Some(bearer.as_str())] {
            let (st, _) = call(&app, Method::GET, "/v1/nope", auth, None, "").await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{auth:?}");
        }
    }
}
