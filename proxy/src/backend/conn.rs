//! Backend connections: the node's own logins to a shard.
//!
//! A [`BackendConn`] is a raw protocol connection (frames, not rows). The node
//! authenticates to the shard itself (SCRAM-SHA-256, md5, cleartext or trust),
//! independently of how the client authenticated to the node, so TLS between
//! client and node never breaks SCRAM channel binding. Over TLS when the
//! shard's DSN asks for it ([`crate::backend::stream`]).
//!
//! Guarantees: a connection returned by [`BackendConn::connect`] has
//! completed startup and sat at ReadyForQuery(idle) with nothing owed; a
//! cleartext password goes to a shard only over TLS, unless
//! `allow_cleartext_shard_password`.

use crate::wire::encoding::ClientEncoding;
use crate::wire::{self, auth, be, tx, Frame, FrameReader, WireError};
use bytes::BytesMut;
use hotrepart_wire::backend as decode;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use crate::backend::stream::{BackendRead, BackendTls, BackendWrite};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to shard {shard}: {source}")]
    Connect {
        shard: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to shard {0}")]
    Timeout(String),
    #[error("shard {shard} refused login: {code} {message}")]
    Refused {
        shard: String,
        code: String,
        message: String,
    },
    #[error(
        "shard {shard} asks for an authentication method the node does not support ({method})"
    )]
    UnsupportedAuth { shard: String, method: i32 },
    #[error("shard {0} asks for a password but none is configured")]
    NoPassword(String),
    #[error("wire error talking to shard: {0}")]
    Wire(#[from] WireError),
    #[error("SCRAM with shard failed: {0}")]
    Scram(std::io::Error),
    /// `sslmode=require` or stronger, and the shard answered the
    /// SSLRequest with 'N'.
    #[error("shard {shard} does not accept TLS connections, and its DSN has sslmode={mode}")]
    TlsRefused { shard: String, mode: String },
    #[error("TLS with shard {shard} failed (sslmode={mode}): {message}")]
    Tls {
        shard: String,
        mode: String,
        message: String,
    },
    #[error("shard {0} asks for a cleartext password over a connection without TLS; refused (set sslmode=require in its DSN, or allow_cleartext_shard_password = true)")]
    CleartextRefused(String),
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct BackendTarget {
    pub shard: String,
    /// `Err`: the shard's DSN could not be resolved (the reason).
    pub addr: Result<SocketAddr, String>,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// TLS to the shard and the cleartext-password policy.
    pub tls: BackendTls,
}

pub struct BackendConn {
    pub reader: FrameReader<BackendRead>,
    pub writer: BackendWrite,
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    /// Statement names the node has prepared on this connection, bounded
    /// by `server_prepared_statements` (the session closes the least
    /// recently used).
    pub prepared: crate::backend::stmts::StmtCache,
    /// Fingerprint of the session state (SET values) applied on this
    /// connection; see `session::SessionState`.
    pub state_fp: u64,
    /// Set when the connection may hold state nobody tracks; it is then
    /// closed instead of being returned to the pool.
    pub broken: bool,
    /// When the connection was opened (`server_lifetime`).
    pub created: std::time::Instant,
    /// When the connection last went idle in the pool.
    pub idle_since: std::time::Instant,
    /// Transaction status of the last ReadyForQuery ('I', 'T', 'E').
    pub status: u8,
    /// Extended-protocol messages were sent without a Sync yet (an implicit
    /// transaction may be open even though `status` is 'I').
    pub unsynced: bool,
    /// Of those unsynced messages, some made a portal or ran a statement
    /// (Bind, Execute): a Sync would end or commit work of the client's
    /// pipeline. Without them (only Parse, Describe, Close) the node may
    /// end the open part itself with a hidden Sync.
    pub unsynced_ran: bool,
    /// Which client's CancelRequest may reach this connection now.
    pub cancel_gate: Arc<CancelGate>,
    /// What the admin console's `SHOW SERVERS` shows of it (the pool keeps
    /// a weak reference; it lives as long as the connection).
    pub info: Arc<ServerInfo>,
    /// The connection's `client_encoding` as the server last reported it
    /// (ParameterStatus): what the node's text to it is written in
    /// ([`BackendConn::write_frames`]) and its text read with.
    pub enc: ClientEncoding,
}

/// A backend connection as `SHOW SERVERS` lists it: fixed at connect, but
/// for its state and last request time (atomics, written at checkout and
/// release).
#[derive(Debug)]
pub struct ServerInfo {
    /// The node's side of the socket.
    pub local_addr: Option<SocketAddr>,
    pub remote_pid: i32,
    pub connect_time: std::time::SystemTime,
    /// [`ServerInfo::IDLE`] or [`ServerInfo::ACTIVE`].
    state: std::sync::atomic::AtomicU8,
    /// Microseconds since the Unix epoch of the last checkout or release.
    request_time_us: std::sync::atomic::AtomicU64,
    /// The cancel gate's owner is the session that holds it (`link`).
    pub cancel_gate: Arc<CancelGate>,
}

impl ServerInfo {
    pub const IDLE: u8 = 0;
    pub const ACTIVE: u8 = 1;

    fn now_us() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    /// Checked out (`ACTIVE`) or back in the pool (`IDLE`).
    pub fn set_state(&self, state: u8) {
        use std::sync::atomic::Ordering::Relaxed;
        self.state.store(state, Relaxed);
        self.request_time_us.store(Self::now_us(), Relaxed);
    }

    pub fn state(&self) -> u8 {
        self.state.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last checkout or release.
    pub fn request_time(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + Duration::from_micros(
                self.request_time_us
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
    }

    /// The session holding the connection (0: none).
    pub fn link(&self) -> u64 {
        self.cancel_gate.owner()
    }
}

/// Which client may cancel what a backend runs. A CancelRequest reaches a
/// backend only while the backend is attached to the session whose key it
/// carries: the node checks the owner and marks the backend under this lock
/// ([`try_mark`](Self::try_mark)), and the release to the pool clears the
/// owner under the same lock ([`release`](Self::release)); a backend that a
/// cancel was forwarded to is closed instead of pooled, since the signal may
/// land after its statement ended, in another client's (PgBouncer's fix of
/// the same race keeps such a server out of the pool until the cancel is
/// done; closing it needs no wait).
#[derive(Debug, Default)]
pub struct CancelGate(Mutex<Gate>);

#[derive(Debug, Default)]
struct Gate {
    /// The session that may cancel (0: none, the backend is not attached).
    owner: u64,
    /// A cancel was forwarded while `owner` held it.
    hit: bool,
}

impl CancelGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session holding the backend (0: none).
    pub fn owner(&self) -> u64 {
        self.lock().owner
    }

    /// Session `owner` (never 0) holds the backend from now on.
    pub fn claim(&self, owner: u64) {
        self.lock().owner = owner;
    }

    /// Whether session `owner`'s cancel may go to the backend; if so, the
    /// backend is marked and will not be pooled again.
    pub fn try_mark(&self, owner: u64) -> bool {
        let mut g = self.lock();
        if owner != 0 && g.owner == owner {
            g.hit = true;
            true
        } else {
            false
        }
    }

    /// The backend leaves its session: no cancel may reach it from now on.
    /// Returns whether one was forwarded to it (then it must be closed).
    pub fn release(&self) -> bool {
        let mut g = self.lock();
        g.owner = 0;
        std::mem::take(&mut g.hit)
    }
}

impl BackendConn {
    pub async fn connect(
        t: &BackendTarget,
        timeout: Duration,
    ) -> Result<BackendConn, BackendError> {
        Self::connect_named(t, timeout, None).await
    }

    /// As [`BackendConn::connect`], with an `application_name` in the
    /// startup packet (the node's own connections that are never pooled).
    pub async fn connect_named(
        t: &BackendTarget,
        timeout: Duration,
        application_name: Option<&str>,
    ) -> Result<BackendConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(t, application_name)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(t.shard.clone())),
        }
    }

    async fn connect_inner(
        t: &BackendTarget,
        application_name: Option<&str>,
    ) -> Result<BackendConn, BackendError> {
        let addr = t.addr.clone().map_err(|m| BackendError::Connect {
            shard: t.shard.clone(),
            source: std::io::Error::other(m),
        })?;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| BackendError::Connect {
                shard: t.shard.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr().ok();
        let (r, mut w) = crate::backend::stream::open(stream, &t.shard, &t.tls).await?;
        let encrypted = t.tls.tls.required();
        let mut reader = FrameReader::new(r, 1 << 30);
        let mut out = BytesMut::new();
        // No application_name for pooled backends: RESET ALL must bring a
        // backend back to the defaults a direct connection would see.
        let mut startup = vec![("user", t.user.as_str()), ("database", t.database.as_str())];
        if let Some(app) = application_name {
            startup.push(("application_name", app));
        }
        frontend::startup_message(startup, &mut out)
            .map_err(|e| BackendError::Wire(WireError::Io(e)))?;
        w.write_all(&out).await.map_err(WireError::Io)?;
        let mut scram: Option<ScramSha256> = None;
        let mut params = Vec::new();
        let (mut pid, mut secret) = (0, 0);
        loop {
            let f = reader.next().await?;
            let body = f.body();
            match f.tag() {
                be::AUTHENTICATION => {
                    let (code, body) = decode::auth_request(body)?;
                    out.clear();
                    match code {
                        auth::OK => continue,
                        auth::CLEARTEXT_PASSWORD => {
                            if !encrypted && !t.tls.allow_cleartext_password {
                                return Err(BackendError::CleartextRefused(t.shard.clone()));
                            }
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword(t.shard.clone()))?;
                            frontend::password_message(pw.as_bytes(), &mut out)
                                .map_err(|e| BackendError::Wire(WireError::Io(e)))?;
                        }
                        auth::MD5_PASSWORD => {
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword(t.shard.clone()))?;
                            let salt = decode::md5_salt(body)?;
                            let h = postgres_protocol::authentication::md5_hash(
                                t.user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            frontend::password_message(h.as_bytes(), &mut out)
                                .map_err(|e| BackendError::Wire(WireError::Io(e)))?;
                        }
                        auth::SASL => {
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword(t.shard.clone()))?;
                            let has_scram =
                                decode::sasl_mechanisms(body).contains(&sasl::SCRAM_SHA_256);
                            if !has_scram {
                                return Err(BackendError::UnsupportedAuth {
                                    shard: t.shard.clone(),
                                    method: code,
                                });
                            }
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut out,
                            )
                            .map_err(|e| BackendError::Wire(WireError::Io(e)))?;
                            scram = Some(s);
                        }
                        auth::SASL_CONTINUE => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WireError::Protocol("unexpected SASL continue".into())
                            })?;
                            s.update(body).map_err(BackendError::Scram)?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| BackendError::Wire(WireError::Io(e)))?;
                        }
                        auth::SASL_FINAL => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WireError::Protocol("unexpected SASL final".into())
                            })?;
                            s.finish(body).map_err(BackendError::Scram)?;
                            continue;
                        }
                        other => {
                            return Err(BackendError::UnsupportedAuth {
                                shard: t.shard.clone(),
                                method: other,
                            })
                        }
                    }
                    w.write_all(&out).await.map_err(WireError::Io)?;
                }
                be::PARAMETER_STATUS => params.push(decode::parameter_status(body)?),
                be::BACKEND_KEY_DATA => (pid, secret) = decode::backend_key_data(body)?,
                be::ERROR_RESPONSE => {
                    let (code, message) = wire::parse_error_fields(f.body());
                    return Err(BackendError::Refused {
                        shard: t.shard.clone(),
                        code,
                        message,
                    });
                }
                be::NOTICE_RESPONSE => {}
                be::READY_FOR_QUERY => break,
                other => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message {:?} during backend startup",
                        other as char
                    ))
                    .into())
                }
            }
        }
        let cancel_gate: Arc<CancelGate> = Arc::default();
        let info = Arc::new(ServerInfo {
            local_addr,
            remote_pid: pid,
            connect_time: std::time::SystemTime::now(),
            state: std::sync::atomic::AtomicU8::new(ServerInfo::IDLE),
            request_time_us: std::sync::atomic::AtomicU64::new(ServerInfo::now_us()),
            cancel_gate: cancel_gate.clone(),
        });
        let enc = params
            .iter()
            .find(|(k, _)| k == "client_encoding")
            .map_or(ClientEncoding::Utf8, |(_, v)| ClientEncoding::for_name(v));
        Ok(BackendConn {
            reader,
            writer: w,
            addr,
            pid,
            secret,
            params,
            enc,
            prepared: Default::default(),
            state_fp: crate::backend::state::SessionState::default().fingerprint(),
            broken: false,
            created: std::time::Instant::now(),
            idle_since: std::time::Instant::now(),
            cancel_gate,
            info,
            status: tx::IDLE,
            unsynced: false,
            unsynced_ran: false,
        })
    }

    /// Whether an idle connection is still usable: the server has neither
    /// closed it nor sent anything (an idle backend only speaks to say it
    /// is going away, e.g. FATAL on shutdown or idle_session_timeout).
    /// One non-blocking recv; never waits.
    pub fn is_alive(&self) -> bool {
        if self.reader.buffered() > 0 {
            return false;
        }
        self.reader.get_ref().is_idle()
    }

    /// Whether the connection may go back to the pool: idle, synced, and
    /// not marked broken.
    pub fn reusable(&self) -> bool {
        !self.broken && self.status == tx::IDLE && !self.unsynced
    }

    /// Ends the connection politely: a Terminate if the socket takes it
    /// at once (never waits), then the close. PostgreSQL then ends the
    /// backend without logging an unexpected EOF.
    pub fn terminate(self) {
        self.writer.try_terminate();
    }

    /// Runs a simple query whose results the client never sees; returns the
    /// data rows as text columns. Used for session-state replay and refresh,
    /// and transaction control on shards that join or leave a transaction.
    /// Records the transaction status it ends in.
    pub async fn hidden_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, HiddenQueryError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| HiddenQueryError::Wire(WireError::Io(e)))?;
        self.write_frames(&out)
            .await
            .map_err(|e| HiddenQueryError::Wire(WireError::Io(e)))?;
        self.hidden_reply().await
    }

    /// Ranks `values` (text in the connection's encoding) as the database
    /// orders them under its default collation: one dense rank (1, 2, …;
    /// equal under the collation, equal rank) per value, in their order.
    /// `blank_padded`: as `character(n)` compares them (trailing spaces do
    /// not count). The merge orders text this way where bytes do not
    /// (`exec::merge`). A statement of its own on an idle connection, in
    /// whatever transaction the connection is in (it reads no table); it
    /// replaces the connection's unnamed statement and portal.
    pub async fn hidden_rank(
        &mut self,
        values: &[&[u8]],
        blank_padded: bool,
    ) -> Result<Vec<u64>, HiddenQueryError> {
        let sql = format!(
            "SELECT pg_catalog.dense_rank() OVER (ORDER BY u.v{}) FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u (v, o) ORDER BY u.o",
            if blank_padded { "::pg_catalog.bpchar" } else { "" }
        );
        let io = |e: std::io::Error| HiddenQueryError::Wire(WireError::Io(e));
        // text[] in binary: one dimension, no NULLs, element type text.
        let n = i32::try_from(values.len()).map_err(|_| {
            HiddenQueryError::Wire(WireError::Protocol("too many values to rank".into()))
        })?;
        let mut array = BytesMut::new();
        for v in [1, 0, 25, n, 1] {
            array.extend_from_slice(&i32::to_be_bytes(v));
        }
        for v in values {
            let len = i32::try_from(v.len()).map_err(|_| {
                HiddenQueryError::Wire(WireError::Protocol("a value too long to rank".into()))
            })?;
            array.extend_from_slice(&len.to_be_bytes());
            array.extend_from_slice(v);
        }
        let mut out = BytesMut::new();
        frontend::parse("", &sql, [1009], &mut out).map_err(io)?;
        wire::frame(&mut out, wire::fe::BIND, |o| {
            o.extend_from_slice(b"\0\0");
            o.extend_from_slice(&1i16.to_be_bytes());
            o.extend_from_slice(&1i16.to_be_bytes());
            o.extend_from_slice(&1i16.to_be_bytes());
            o.extend_from_slice(&(array.len() as i32).to_be_bytes());
            o.extend_from_slice(&array);
            o.extend_from_slice(&0i16.to_be_bytes());
        });
        frontend::execute("", 0, &mut out).map_err(io)?;
        frontend::sync(&mut out);
        self.write_frames(&out).await.map_err(io)?;
        let rows = self.hidden_reply().await?;
        let ranks: Option<Vec<u64>> = rows
            .iter()
            .map(|r| r.first().cloned().flatten().and_then(|v| v.parse().ok()))
            .collect();
        match ranks {
            Some(r) if r.len() == values.len() => Ok(r),
            _ => Err(HiddenQueryError::Wire(WireError::Protocol(format!(
                "the shard ranked {} values in {} rows",
                values.len(),
                rows.len()
            )))),
        }
    }

    /// The answer to a query the node sent of its own, to its
    /// ReadyForQuery: the data rows as text columns, or the error.
    async fn hidden_reply(&mut self) -> Result<Vec<Vec<Option<String>>>, HiddenQueryError> {
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f: Frame = self.reader.next().await.map_err(HiddenQueryError::Wire)?;
            match f.tag() {
                be::DATA_ROW if self.enc.is_utf8() => {
                    rows.push(decode::text_data_row(f.body()).map_err(HiddenQueryError::Wire)?)
                }
                be::DATA_ROW => {
                    let enc = self.enc;
                    let text = |v: &[u8]| {
                        enc.decode(v)
                            .map(|t| t.into_owned())
                            .map_err(|e| WireError::Protocol(e.message))
                    };
                    rows.push(
                        decode::text_data_row_in(f.body(), text).map_err(HiddenQueryError::Wire)?,
                    )
                }
                be::PARAMETER_STATUS => self.note_parameter_status(f.body()),
                be::ERROR_RESPONSE => err = Some(wire::parse_error_fields(f.body())),
                be::READY_FOR_QUERY => {
                    self.status = f.body().first().copied().unwrap_or(tx::IDLE);
                    break;
                }
                _ => {}
            }
        }
        match err {
            Some((code, message)) => Err(HiddenQueryError::Server { code, message }),
            None => Ok(rows),
        }
    }
}

impl BackendConn {
    /// Writes whole frontend frames the node built or forwards, their
    /// strings (query text, names) turned from UTF-8 into the connection's
    /// `client_encoding` (parameter values and COPY data are left as the
    /// client sent them: already in it). A character it cannot hold is an
    /// error (22P05's words), nothing written.
    pub async fn write_frames(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.enc.is_utf8() {
            return self.writer.write_all(buf).await;
        }
        let b = crate::wire::encoding::frames_from_utf8(self.enc, buf)
            .map_err(|e| std::io::Error::other(e.message))?;
        self.writer.write_all(&b).await
    }

    /// Follows the server's `client_encoding` (a ParameterStatus body).
    pub fn note_parameter_status(&mut self, body: &[u8]) {
        if let Ok((k, v)) = decode::parameter_status(body) {
            if k == "client_encoding" {
                self.enc = ClientEncoding::for_name(&v);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HiddenQueryError {
    #[error("{0}")]
    Wire(WireError),
    #[error("{code}: {message}")]
    Server { code: String, message: String },
}

/// Cancels what `b` runs, within `wait`, before the caller closes it (a
/// connection being closed: no other client can be running on it).
pub async fn cancel_before_close(b: &BackendConn, wait: Duration) {
    match tokio::time::timeout(wait, send_cancel(b.addr, b.pid, b.secret)).await {
        Ok(Ok(())) => tracing::debug!(pid = b.pid, "cancelled the statement of a client that left"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot cancel the statement of a client that left")
        }
        Err(_) => tracing::warn!("timed out cancelling the statement of a client that left"),
    }
}

/// Sends a CancelRequest for `pid`/`secret` to a backend.
pub async fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    s.write_all(&out).await?;
    // PostgreSQL closes the connection when done; wait for that so the
    // cancel has been delivered before we report success.
    let mut buf = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
    Ok(())
}
