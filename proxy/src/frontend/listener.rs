//! The listener and the startup handshake: SSL/GSS negotiation,
//! CancelRequest, startup parameters, limits, authentication; a client that
//! logs in is handed to a [`Session`].
//!
//! Also the node's server life cycle: [`Node::serve`] / [`Node::start`]
//! (background tasks, then the accept loop) and [`Node::shutdown`] (the
//! node's cancellation token, then a bounded wait for every task it
//! started: [`crate::control::supervisor`]).
//!
//! Guarantees:
//! - one task per client connection, tracked by the node's supervisor and
//!   ended at shutdown; a failing or malicious client ends only its own
//!   task (malformed input gets an ErrorResponse and a close);
//! - at most `max_client_connections` clients past their startup packet
//!   exist; the next one gets SQLSTATE 53300 and is closed;
//! - at most `max_pending_logins` sockets are in the login handshake
//!   (accepted, not logged in); the next one gets 53300 at once and is
//!   closed, without the node waiting on it;
//! - the handshake (startup packet, SSL/GSSENC negotiation, TLS, the
//!   authentication exchange, the home shard's parameters) ends within
//!   `client_login_timeout`, else the socket is closed: silently before the
//!   startup packet (as PostgreSQL does), with FATAL 57014 "canceling
//!   authentication due to timeout" after it;
//! - SSLRequest and GSSENCRequest each come at most once (else 08P01);
//! - a CancelRequest carrying a session's key cancels the query that session
//!   is running on its current backend, whichever pooled backend that is,
//!   and only while that backend is the session's (`CancelGate`: a backend
//!   a cancel went to is closed at its release, never pooled, so a late
//!   signal cannot hit the next client).

use crate::backend::conn::{self};
use crate::backend::state::SessionState;
use crate::config::{AuthMethod, PoolMode};
use crate::error::sqlstate;
use crate::frontend::auth::{self, ScramServer, ScramVerifier};
use crate::node::*;
use crate::session::Session;
use crate::wire::startup::{CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST};
use crate::wire::{self, parse_startup, FrameReader, Severity, WireError};
use bytes::{BufMut, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The SASL mechanisms the node offers.
const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Largest message accepted before login (PostgreSQL: PG_MAX_AUTH_TOKEN_LENGTH).
const AUTH_MAX_MESSAGE: usize = 65_535;

impl Node {
    /// Binds the listener; returns it so callers learn the port before
    /// serving (port 0 picks a free one).
    pub async fn bind(&self) -> Result<TcpListener, NodeError> {
        TcpListener::bind(&self.cfg().listen)
            .await
            .map_err(|source| NodeError::Bind {
                addr: self.cfg().listen.clone(),
                source,
            })
    }

    /// Starts the node's long-running background tasks under its
    /// supervisor: the catalog follower (after publishing the current
    /// routing table), the 2PC resolver, the reshard job supervisor, the
    /// pool reaper ([`crate::backend::pool::Pool::reap`], idle while
    /// neither `server_lifetime` nor `server_idle_timeout` is set) and the
    /// stats period ([`crate::stats::Stats::roll`]). Each ends when the node shuts down ([`Node::shutdown`]).
    pub fn start_background(self: &Arc<Self>) {
        crate::control::cluster::publish_now(self, &self.catalog_handle);
        let node = self.clone();
        self.tasks.supervise("catalog_follower", move |stop| {
            crate::control::cluster::follow(node.clone(), node.catalog_handle.clone(), stop)
        });
        let node = self.clone();
        self.tasks.supervise("twopc_resolver", move |stop| {
            let node = node.clone();
            async move {
                crate::control::resolver::run_resolver(node, stop).await;
                Ok(())
            }
        });
        let node = self.clone();
        self.tasks.supervise("job_supervisor", move |stop| {
            crate::control::jobs::supervise(node.clone(), stop)
        });
        // Always running: a reload may turn the ages on; the interval
        // follows the configuration of the moment.
        let node = self.clone();
        self.tasks.supervise("pool_reaper", move |stop| {
            let node = node.clone();
            async move {
                loop {
                    let every = reap_interval(&node.cfg());
                    tokio::select! {
                        _ = tokio::time::sleep(every.unwrap_or(std::time::Duration::from_secs(1))) => {
                            if every.is_some() {
                                for (_, pool) in node.pools.all() {
                                    pool.reap();
                                }
                            }
                        }
                        () = stop.cancelled() => return Ok(()),
                    }
                }
            }
        });
        // SHOW STATS' averages: one stats period at a time.
        let node = self.clone();
        self.tasks.supervise("stats_period", move |stop| {
            let node = node.clone();
            async move {
                let mut tick = tokio::time::interval(crate::stats::PERIOD);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = tick.tick() => node.stats.roll(),
                        () = stop.cancelled() => return Ok(()),
                    }
                }
            }
        });
    }

    /// Starts the node's background tasks, then accepts clients until the
    /// node shuts down ([`Node::shutdown`]), each client in a task of its
    /// own (tracked by the node's supervisor, dropped at shutdown: the
    /// client sees its connection close).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.start_background();
        let stop = self.tasks.shutdown_token();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((sock, peer)) => {
                        let node = self.clone();
                        let span = tracing::info_span!("client", %peer);
                        self.tasks
                            .spawn_until_shutdown(tracing::Instrument::instrument(node.handle(sock), span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                () = stop.cancelled() => break,
            }
        }
    }

    /// [`Node::serve`] in a task of the node's own (tracked): returns at
    /// once; [`Node::shutdown`] ends it.
    pub fn start(self: &Arc<Self>, listener: TcpListener) {
        self.tasks.spawn(self.clone().serve(listener));
    }

    /// How long the binaries' shutdown (SIGTERM, Ctrl-C) waits for the
    /// node's tasks ([`Node::shutdown`]).
    pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

    /// Starts the node's shutdown without waiting for it (e.g. from a
    /// `Drop`): see [`Node::shutdown`].
    pub fn stop(&self) {
        self.tasks.stop();
    }

    /// Shuts the node down: stops accepting clients, closes every client
    /// connection, stops the background tasks and the admin API (which
    /// finishes the requests in flight), then waits until every task the
    /// node started has ended — at most `within`. Returns whether they
    /// all ended (a task still running is logged and left to the runtime).
    pub async fn shutdown(&self, within: std::time::Duration) -> bool {
        let done = self.tasks.shutdown(within).await;
        if !done {
            tracing::warn!(
                tasks = self.tasks.running(),
                within_ms = within.as_millis() as u64,
                "shutdown: tasks still running after the grace period"
            );
        }
        done
    }

    /// One client connection: the login handshake under
    /// `client_login_timeout` and `max_pending_logins`, then the session.
    async fn handle(self: Arc<Self>, sock: TcpStream) {
        let _ = sock.set_nodelay(true);
        let mut peer = Peer {
            addr: sock.peer_addr().ok(),
            local_addr: sock.local_addr().ok(),
            tls: String::new(),
            end_point: None,
        };
        let Some(pending) = PendingLogin::enter(&self) else {
            tracing::warn!(
                max_pending_logins = self.cfg().max_pending_logins,
                "refusing a connection: too many clients in the login handshake"
            );
            let m = format!(
                "too many connections are logging in at once (max_pending_logins = {}); try again",
                self.cfg().max_pending_logins
            );
            return refuse_and_close(sock, sqlstate::TOO_MANY_CONNECTIONS, &m).await;
        };
        let deadline = self
            .cfg()
            .client_login_timeout()
            .map(|t| tokio::time::Instant::now() + t);
        // Until the startup packet is in, PostgreSQL closes a timed-out
        // connection without a word (the client may be waiting for the one
        // byte that answers an SSLRequest, or for a TLS record); so do we.
        let negotiated = match within(deadline, self.negotiate(sock)).await {
            Some(n) => n,
            None => {
                tracing::info!(
                    timeout_ms = self.cfg().client_login_timeout_ms,
                    "client_login_timeout: no startup packet in time; connection closed"
                );
                return;
            }
        };
        match negotiated {
            Negotiated::Done => {}
            Negotiated::Plain(r, params) => self.login(r, params, peer, deadline, pending).await,
            Negotiated::Tls(r, params, end_point) => {
                peer.end_point = end_point;
                let conn = r.get_ref().get_ref().1;
                peer.tls = format!(
                    "{}/{}",
                    conn.protocol_version()
                        .and_then(|v| v.as_str())
                        .unwrap_or("TLS")
                        .replace("TLSv1_", "TLSv1."),
                    conn.negotiated_cipher_suite()
                        .and_then(|c| c.suite().as_str())
                        .unwrap_or("")
                );
                self.login(*r, params, peer, deadline, pending).await
            }
        }
    }

    /// SSLRequest / GSSENCRequest / CancelRequest, the TLS handshake and
    /// the startup packet. Each negotiation may come once: a second
    /// SSLRequest or GSSENCRequest is a protocol violation.
    async fn negotiate(&self, sock: TcpStream) -> Negotiated {
        // Before login a client gets no more than PostgreSQL allows for
        // authentication messages.
        let mut r = FrameReader::new(sock, AUTH_MAX_MESSAGE);
        let (mut ssl_done, mut gss_done) = (false, false);
        loop {
            let pkt = match r.next_startup().await {
                Ok(p) => p,
                Err(WireError::Protocol(m)) => {
                    refuse(
                        r.get_mut(),
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("invalid startup packet: {m}"),
                    )
                    .await;
                    return Negotiated::Done;
                }
                Err(_) => return Negotiated::Done,
            };
            let code = i32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
            let again = match code {
                SSL_REQUEST => std::mem::replace(&mut ssl_done, true).then_some("SSLRequest"),
                GSSENC_REQUEST => std::mem::replace(&mut gss_done, true).then_some("GSSENCRequest"),
                _ => None,
            };
            if let Some(what) = again {
                refuse(
                    r.get_mut(),
                    sqlstate::PROTOCOL_VIOLATION,
                    &format!(
                        "duplicate {what}: encryption was already negotiated on this connection"
                    ),
                )
                .await;
                return Negotiated::Done;
            }
            match code {
                SSL_REQUEST => {
                    if let Some(tls) = self.tls.load_full() {
                        if r.buffered() > 0 {
                            refuse(
                                r.get_mut(),
                                sqlstate::PROTOCOL_VIOLATION,
                                "data after SSLRequest",
                            )
                            .await;
                            return Negotiated::Done;
                        }
                        if r.get_mut().write_all(wire::startup::ACCEPT).await.is_err() {
                            return Negotiated::Done;
                        }
                        let (sock, _) = r.into_parts();
                        let stream = match tls.acceptor.accept(sock).await {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::info!(error = %e, "TLS handshake failed");
                                return Negotiated::Done;
                            }
                        };
                        let max = self.cfg().max_message_size;
                        let mut r = FrameReader::new(stream, AUTH_MAX_MESSAGE.min(max));
                        return match startup_after_tls(&mut r).await {
                            Some(p) => Negotiated::Tls(Box::new(r), p, tls.end_point.clone()),
                            None => Negotiated::Done,
                        };
                    }
                    if r.get_mut().write_all(wire::startup::REFUSE).await.is_err() {
                        return Negotiated::Done;
                    }
                }
                GSSENC_REQUEST => {
                    if r.get_mut().write_all(wire::startup::REFUSE).await.is_err() {
                        return Negotiated::Done;
                    }
                }
                CANCEL_REQUEST if pkt.len() == 16 => {
                    let pid = i32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
                    let secret = i32::from_be_bytes([pkt[12], pkt[13], pkt[14], pkt[15]]);
                    self.cancel(pid, secret).await;
                    return Negotiated::Done;
                }
                PROTOCOL_3_0 => match parse_startup(&pkt[8..]) {
                    Ok(p) => return Negotiated::Plain(r, p),
                    Err(m) => {
                        refuse(r.get_mut(), sqlstate::PROTOCOL_VIOLATION, &m).await;
                        return Negotiated::Done;
                    }
                },
                other => {
                    let m = format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0",
                        other >> 16,
                        other & 0xffff
                    );
                    refuse(r.get_mut(), sqlstate::FEATURE_NOT_SUPPORTED, &m).await;
                    return Negotiated::Done;
                }
            }
        }
    }

    async fn cancel(&self, pid: i32, secret: i32) {
        let slot = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned();
        // To every backend at once, each bounded: a stalled shard (its
        // server accepts the connection and never closes it) neither holds
        // this task for ever nor keeps the others from being cancelled.
        let within = self.cfg().connect_timeout() + std::time::Duration::from_secs(2);
        let sends = slot
            .map(|s| s.take_targets())
            .unwrap_or_default()
            .into_iter()
            .map(|t| async move {
                match tokio::time::timeout(within, conn::send_cancel(t.addr, t.pid, t.secret)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, addr = %t.addr, "cannot forward cancel request")
                    }
                    Err(_) => tracing::warn!(
                        addr = %t.addr,
                        within_ms = within.as_millis() as u64,
                        "cancel request not acknowledged by the shard in time (stalled?)"
                    ),
                }
            });
        futures_util::future::join_all(sends).await;
    }

    /// Authenticates a client that sent its startup packet (within the
    /// login deadline), then runs its session.
    async fn login<S: AsyncRead + AsyncWrite + Unpin + Send>(
        self: Arc<Self>,
        mut r: FrameReader<S>,
        params: Vec<(String, String)>,
        peer: Peer,
        deadline: Option<tokio::time::Instant>,
        pending: PendingLogin,
    ) {
        let a = match within(deadline, self.admit(&mut r, &params, peer)).await {
            Some(Some(a)) => a,
            Some(None) => return,
            None => {
                // PostgreSQL's words and SQLSTATE (it only logs them; the
                // client here is waiting for an authentication message, so
                // it may as well read why the connection ends).
                tracing::info!(
                    timeout_ms = self.cfg().client_login_timeout_ms,
                    "client_login_timeout: canceling authentication due to timeout"
                );
                let _ = tokio::time::timeout(
                    REFUSAL_WRITE_TIMEOUT,
                    refuse(
                        r.get_mut(),
                        sqlstate::QUERY_CANCELED,
                        "canceling authentication due to timeout",
                    ),
                )
                .await;
                return;
            }
        };
        drop(pending);
        r.set_max_len(self.cfg().max_message_size);
        let Admitted {
            user,
            database,
            state,
            server_params,
            session_mode,
            console,
            key,
            _count,
        } = a;
        if console {
            tracing::debug!(%user, "admin console session started");
            crate::control::console::run(self.clone(), r).await;
            drop(key);
            return;
        }
        tracing::debug!(%user, %database, "session started");
        // The session's span names it (the pid the client got in
        // BackendKeyData): a panic caught in `Session::run` is logged in it.
        let span = tracing::info_span!("session", id = key.pid, %user, %database);
        let end = tracing::Instrument::instrument(
            Session::new(
                self.clone(),
                r,
                database,
                session_mode,
                state,
                key.slot.clone(),
                user,
            )
            .with_server_params(&server_params)
            .run(),
            span,
        )
        .await;
        tracing::debug!(?end, "session ended");
        drop(key);
    }

    /// The limits, authentication, the home shard's parameters, and the
    /// messages that end the login (AuthenticationOk … ReadyForQuery).
    /// `None`: the client was refused (and told why) or went away.
    async fn admit<S: AsyncRead + AsyncWrite + Unpin + Send>(
        self: &Arc<Self>,
        r: &mut FrameReader<S>,
        params: &[(String, String)],
        peer: Peer,
    ) -> Option<Admitted> {
        let get = |k: &str| params.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let Some(user) = get("user") else {
            refuse(
                r.get_mut(),
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
            .await;
            return None;
        };
        let database = get("database").unwrap_or_else(|| user.clone());
        if get("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
            refuse(
                r.get_mut(),
                sqlstate::FEATURE_NOT_SUPPORTED,
                "replication connections are not supported by hotrepart",
            )
            .await;
            return None;
        }
        // As a PostgreSQL `hostssl`-only pg_hba: checked before any
        // password is asked for.
        if self.cfg().tls_required && peer.tls.is_empty() {
            tracing::info!(%user, "login refused: tls_required and the client did not use TLS");
            refuse(
                r.get_mut(),
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "this hotrepart node accepts only TLS connections (tls_required = true); connect with sslmode=require",
            )
            .await;
            return None;
        }
        // Counted from here (past the startup packet), not from accept: a
        // socket that never sends a startup packet takes a pending-login
        // slot, never a client slot.
        let n = self.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let count = CountGuard(self.clone());
        if n > self.cfg().max_client_connections {
            refuse(
                r.get_mut(),
                sqlstate::TOO_MANY_CONNECTIONS,
                &format!(
                    "sorry, too many clients already (max_client_connections = {})",
                    self.cfg().max_client_connections
                ),
            )
            .await;
            return None;
        }
        // A role the node does not know goes through a SCRAM exchange no
        // password passes, and gets the answer a wrong password gets.
        let known = self.cfg().user(&user).cloned();
        let ucfg = known.clone().unwrap_or_else(|| crate::config::UserConfig {
            name: user.clone(),
            auth: AuthMethod::ScramSha256,
            password_hash: Some(auth::doomed_verifier(&user)),
            server_user: None,
            server_password: None,
            pool_mode: None,
        });
        let cfg_delay = self.cfg().auth_failure_delay_ms;
        let end_point = peer.end_point.clone();
        if let Err(m) = authenticate(r, &ucfg, &user, end_point.as_deref()).await {
            if m.0 != sqlstate::CONNECTION_FAILURE && cfg_delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(cfg_delay)).await;
            }
            if known.is_none() {
                tracing::info!(%user, "login refused: no such role in the node's users");
            }
            refuse(r.get_mut(), m.0, &m.1).await;
            return None;
        }
        let Some(ucfg) = known else {
            // Unreachable in practice (no proof matches a doomed
            // verifier); refused as a wrong password all the same.
            refuse(
                r.get_mut(),
                sqlstate::INVALID_PASSWORD,
                &format!("password authentication failed for user \"{user}\""),
            )
            .await;
            return None;
        };
        if database == crate::control::console::DATABASE {
            if !self.cfg().admin_users.contains(&user) {
                refuse(
                    r.get_mut(),
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    &format!(
                        "role \"{user}\" may not use the admin console (it is not in admin_users)"
                    ),
                )
                .await;
                return None;
            }
            let mut out = BytesMut::new();
            wire::auth_request(&mut out, wire::auth::OK, &[]);
            for (k, v) in [
                ("server_version", "15.0 (hotrepart admin console)"),
                ("server_encoding", "UTF8"),
                ("client_encoding", "UTF8"),
                ("DateStyle", "ISO, MDY"),
                ("integer_datetimes", "on"),
                ("standard_conforming_strings", "on"),
                ("application_name", ""),
            ] {
                wire::parameter_status(&mut out, k, v);
            }
            let key = self.register_cancel();
            key.describe(&user, &database, peer, "");
            wire::backend_key_data(&mut out, key.pid, key.secret);
            wire::ready_for_query(&mut out, wire::tx::IDLE);
            if r.get_mut().write_all(&out).await.is_err() {
                return None;
            }
            return Some(Admitted {
                user,
                database,
                state: SessionState::default(),
                server_params: Vec::new(),
                session_mode: false,
                console: true,
                key,
                _count: count,
            });
        }
        let state = match SessionState::from_startup(params) {
            Ok(s) => s,
            Err((code, m)) => {
                refuse(r.get_mut(), code, &m).await;
                return None;
            }
        };
        let shard = self.routing.home_index();
        let pool = self.pool_for(shard, &database, &user);
        let wait = self.cfg().pool_timeout();
        let server_params = match pool.server_params(wait).await {
            Ok(p) => p,
            Err(crate::backend::pool::PoolError::Backend(
                crate::backend::conn::BackendError::Refused { code, message, .. },
            )) => {
                let code: &'static str = match code.as_str() {
                    sqlstate::INVALID_CATALOG_NAME => sqlstate::INVALID_CATALOG_NAME,
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION => {
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
                    }
                    sqlstate::INVALID_PASSWORD => sqlstate::INVALID_PASSWORD,
                    _ => sqlstate::CONNECTION_FAILURE,
                };
                refuse(r.get_mut(), code, &message).await;
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach shard at login");
                refuse(
                    r.get_mut(),
                    sqlstate::CONNECTION_FAILURE,
                    "cannot connect to the shard",
                )
                .await;
                return None;
            }
        };
        let mut out = BytesMut::new();
        wire::auth_request(&mut out, wire::auth::OK, &[]);
        for (k, v) in &server_params {
            let v = state.get(k).unwrap_or(v);
            wire::parameter_status(&mut out, k, v);
        }
        if let Some(app) = state.get("application_name") {
            if !server_params.iter().any(|(k, _)| k == "application_name") {
                wire::parameter_status(&mut out, "application_name", app);
            }
        }
        let key = self.register_cancel();
        key.describe(
            &user,
            &database,
            peer,
            state.get("application_name").unwrap_or(""),
        );
        wire::backend_key_data(&mut out, key.pid, key.secret);
        wire::ready_for_query(&mut out, wire::tx::IDLE);
        if r.get_mut().write_all(&out).await.is_err() {
            return None;
        }
        let session_mode = ucfg.pool_mode.unwrap_or(self.cfg().pool_mode) == PoolMode::Session;
        Some(Admitted {
            user,
            database,
            state,
            server_params,
            session_mode,
            console: false,
            key,
            _count: count,
        })
    }

    fn register_cancel(self: &Arc<Self>) -> CancelKey {
        let slot = Arc::new(CancelSlot::default());
        let mut m = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid: i32 = rand::random::<i32>() & 0x7fff_ffff;
            let secret: i32 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(v) = m.entry((pid, secret)) {
                v.insert(slot.clone());
                return CancelKey {
                    node: self.clone(),
                    pid,
                    secret,
                    slot,
                };
            }
        }
    }
}

/// What the handshake produced.
enum Negotiated {
    /// Refused, cancelled, or gone: nothing more to do.
    Done,
    Plain(FrameReader<TcpStream>, Vec<(String, String)>),
    /// With the channel binding data of the certificate presented.
    Tls(
        Box<FrameReader<tokio_rustls::server::TlsStream<TcpStream>>>,
        Vec<(String, String)>,
        Option<Arc<[u8]>>,
    ),
}

/// A client that logged in: what its session starts with.
struct Admitted {
    user: String,
    database: String,
    state: SessionState,
    server_params: Vec<(String, String)>,
    session_mode: bool,
    /// The admin console, not a session through the shards.
    console: bool,
    key: CancelKey,
    _count: CountGuard,
}

/// The client's socket, as SHOW CLIENTS shows it.
struct Peer {
    addr: Option<std::net::SocketAddr>,
    local_addr: Option<std::net::SocketAddr>,
    /// Protocol and cipher suite; empty without TLS.
    tls: String,
    /// Over TLS, the `tls-server-end-point` channel binding data of the
    /// certificate the node presented (`None`: no TLS, or no usable hash).
    end_point: Option<Arc<[u8]>>,
}

impl CancelKey {
    /// What SHOW CLIENTS shows of this client.
    fn describe(&self, user: &str, database: &str, peer: Peer, application_name: &str) {
        let _ = self.slot.info.set(crate::node::ClientInfo::new(
            user.to_string(),
            database.to_string(),
            peer.addr,
            peer.local_addr,
            peer.tls,
            application_name.to_string(),
            self.pid,
        ));
    }
}

/// A session's cancel key, registered until dropped.
struct CancelKey {
    node: Arc<Node>,
    pid: i32,
    secret: i32,
    slot: Arc<CancelSlot>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.node
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.pid, self.secret));
    }
}

/// A place among the `max_pending_logins` sockets in the handshake, held
/// from accept until login ends.
struct PendingLogin(Arc<Node>);

impl PendingLogin {
    fn enter(node: &Arc<Node>) -> Option<PendingLogin> {
        let n = node.pending_logins.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = PendingLogin(node.clone());
        (n <= node.cfg().max_pending_logins).then_some(guard)
    }
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.0.pending_logins.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `f`, unless `deadline` passes first (`None`).
async fn within<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    f: F,
) -> Option<F::Output> {
    match deadline {
        None => Some(f.await),
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
    }
}

/// How often the pool reaper looks for backends past `server_lifetime` or
/// `server_idle_timeout`: a quarter of the shorter, between 10 ms and 1 s;
/// `None` when both are off.
fn reap_interval(cfg: &crate::config::Config) -> Option<std::time::Duration> {
    let shortest = [cfg.server_lifetime(), cfg.server_idle_timeout()]
        .into_iter()
        .flatten()
        .min()?;
    Some((shortest / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    ))
}

/// The longest a FATAL sent at a login timeout may take to write.
const REFUSAL_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a refused socket's input is read (and discarded) after the
/// refusal, so that closing it does not reset the connection before the
/// client has read why.
const REFUSAL_DRAIN: std::time::Duration = std::time::Duration::from_millis(250);

/// Refuses a socket before reading anything from it: the FATAL if the
/// socket takes it at once (never waits on the client), our end closed,
/// then its input drained briefly.
async fn refuse_and_close(mut sock: TcpStream, code: &str, msg: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, Severity::Fatal, code, msg);
    let _ = sock.try_write(&out);
    let _ = sock.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        let mut total = 0usize;
        while total < 64 * 1024 {
            match tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

struct CountGuard(Arc<Node>);
impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, code: &str, msg: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, Severity::Fatal, code, msg);
    let _ = w.write_all(&out).await;
    let _ = w.flush().await;
}

/// The startup packet inside TLS (nothing else may come there).
async fn startup_after_tls<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut FrameReader<S>,
) -> Option<Vec<(String, String)>> {
    let pkt = r.next_startup().await.ok()?;
    let code = i32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
    if code != PROTOCOL_3_0 {
        refuse(
            r.get_mut(),
            sqlstate::PROTOCOL_VIOLATION,
            "expected a startup message after TLS",
        )
        .await;
        return None;
    }
    match parse_startup(&pkt[8..]) {
        Ok(p) => Some(p),
        Err(m) => {
            refuse(r.get_mut(), sqlstate::PROTOCOL_VIOLATION, &m).await;
            None
        }
    }
}

/// Runs the configured authentication exchange. Err: (SQLSTATE, message).
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut FrameReader<S>,
    ucfg: &crate::config::UserConfig,
    user: &str,
    end_point: Option<&[u8]>,
) -> Result<(), (&'static str, String)> {
    let failed = || {
        (
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let hash = ucfg.password_hash.clone().unwrap_or_default();
    let mut out = BytesMut::new();
    match ucfg.auth {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            wire::auth_request(&mut out, wire::auth::MD5_PASSWORD, &salt);
            send(r, &out).await?;
            let f = read_password(r).await?;
            let mut b = f.body();
            let resp = wire::get_cstr(&mut b).map_err(|_| failed())?;
            if auth::md5_check(&hash, salt, resp) {
                Ok(())
            } else {
                Err(failed())
            }
        }
        AuthMethod::ScramSha256 => {
            let v = ScramVerifier::parse(&hash).map_err(|_| failed())?;
            // PostgreSQL's order: PLUS first, when channel binding can be
            // offered (TLS, and a certificate with end-point data).
            let mut mechs = BytesMut::new();
            if end_point.is_some() {
                wire::put_cstr(&mut mechs, SCRAM_PLUS);
            }
            wire::put_cstr(&mut mechs, SCRAM);
            mechs.put_u8(0);
            wire::auth_request(&mut out, wire::auth::SASL, &mechs);
            send(r, &out).await?;
            let f = read_password(r).await?;
            let mut b = f.body();
            let mech = wire::get_cstr(&mut b).map_err(|_| failed())?;
            let binding = match (mech, end_point) {
                (SCRAM, None) => auth::Binding::NotOffered,
                (SCRAM, Some(data)) => auth::Binding::Offered { plus: false, data },
                (SCRAM_PLUS, Some(data)) => auth::Binding::Offered { plus: true, data },
                _ => {
                    return Err((
                        sqlstate::PROTOCOL_VIOLATION,
                        format!(
                            "client selected an invalid SASL authentication mechanism {mech:?}"
                        ),
                    ))
                }
            };
            let _len = wire::get_i32(&mut b).map_err(|_| failed())?;
            let first = std::str::from_utf8(b).map_err(|_| failed())?;
            let server = ScramServer::start(v, first, binding)
                .map_err(|e| (sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
            out.clear();
            wire::auth_request(
                &mut out,
                wire::auth::SASL_CONTINUE,
                server.server_first().as_bytes(),
            );
            send(r, &out).await?;
            let f = read_password(r).await?;
            let fin = std::str::from_utf8(f.body()).map_err(|_| failed())?;
            let sfinal = server.finish(fin).map_err(|e| match e {
                auth::AuthError::Failed => failed(),
                other => (sqlstate::PROTOCOL_VIOLATION, other.to_string()),
            })?;
            out.clear();
            wire::auth_request(&mut out, wire::auth::SASL_FINAL, sfinal.as_bytes());
            send(r, &out).await
        }
    }
}

async fn send<S: AsyncWrite + Unpin + AsyncRead>(
    r: &mut FrameReader<S>,
    out: &[u8],
) -> Result<(), (&'static str, String)> {
    r.get_mut()
        .write_all(out)
        .await
        .map_err(|_| (sqlstate::CONNECTION_FAILURE, "client went away".to_string()))
}

async fn read_password<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut FrameReader<S>,
) -> Result<wire::Frame, (&'static str, String)> {
    let f = r.next().await.map_err(|e| {
        (
            sqlstate::PROTOCOL_VIOLATION,
            format!("during authentication: {e}"),
        )
    })?;
    if f.tag() != wire::fe::PASSWORD {
        return Err((
            sqlstate::PROTOCOL_VIOLATION,
            "expected a password response".into(),
        ));
    }
    Ok(f)
}
