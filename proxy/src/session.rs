//! The client session after login: forwards frames between one client and
//! the backend it currently holds, under transaction (or session) pooling.
//!
//! States: idle (no backend) ⇄ attached (a backend is held, replies owed or a
//! transaction open) → closed. A backend is attached by the first message
//! that needs one and released at the ReadyForQuery(idle) that leaves
//! nothing owed.
//!
//! Frames are forwarded as raw bytes. The session looks inside only:
//! - Parse/Bind/Describe/Close of *named* statements, which it renames to
//!   node-wide names (`hr_<hash of query and types>`) so that a client's
//!   statements work on whichever backend serves it; a statement missing on
//!   the current backend is prepared there first, its ParseComplete hidden;
//! - the tag of each backend reply, to know which client message it answers
//!   (the `owed` queue), where to splice replies the node makes itself
//!   (ParseComplete for a statement the backend already has, CloseComplete),
//!   and when the transaction ends.
//!
//! Invariants:
//! - Invariant: a backend goes back to the pool only at ReadyForQuery('I')
//!   with an empty `owed` queue; otherwise it is closed.
//! - Invariant: replies reach the client in the order of the client's
//!   messages, as PostgreSQL itself would send them, including after an
//!   error (everything up to the next Sync is skipped, synthetic replies too).

use crate::backend::BackendConn;
use crate::node::{CancelSlot, Node};
use crate::pool::{Pool, PoolError, Pooled};
use crate::state::{self, SessionState};
use crate::wire::{self, Frame, FrameReader, Severity, WireError};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A reply the backend (or the node) owes the client, in order.
#[derive(Debug)]
enum Owed {
    /// ParseComplete. `hidden`: injected by the node, not shown to the
    /// client. `internal`: node name prepared by it (dropped on error).
    Parse {
        hidden: bool,
        internal: Option<String>,
    },
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
    /// A reply the node makes itself, sent when everything before it is done.
    Synthetic(Bytes),
}

/// A client's named prepared statement.
struct Stmt {
    internal: String,
    /// Body of a Parse message under the internal name.
    parse: Bytes,
}

pub struct Session<S> {
    node: Arc<Node>,
    client: FrameReader<S>,
    out: BytesMut,
    to_backend: BytesMut,
    pool: Arc<Pool>,
    backend: Option<Pooled>,
    session_mode: bool,
    owed: VecDeque<Owed>,
    stmts: HashMap<String, Stmt>,
    state: SessionState,
    state_fp: u64,
    /// The current transaction may have changed session state.
    state_dirty: bool,
    /// ... or dropped prepared statements (DISCARD/DEALLOCATE).
    prepared_dirty: bool,
    /// After an error the node raised itself in an extended-protocol batch,
    /// client messages are skipped until Sync.
    skip_to_sync: bool,
    tx_status: u8,
    cancel: Arc<CancelSlot>,
    user: String,
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// Terminate, or the client closed the connection.
    ClientGone,
    /// The node sent a FATAL error and closed.
    Fatal,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: Arc<Node>,
        client: FrameReader<S>,
        pool: Arc<Pool>,
        session_mode: bool,
        state: SessionState,
        cancel: Arc<CancelSlot>,
        user: String,
    ) -> Self {
        let state_fp = state.fingerprint();
        Session {
            node,
            client,
            out: BytesMut::with_capacity(8192),
            to_backend: BytesMut::with_capacity(8192),
            pool,
            backend: None,
            session_mode,
            owed: VecDeque::new(),
            stmts: HashMap::new(),
            state,
            state_fp,
            state_dirty: false,
            prepared_dirty: false,
            skip_to_sync: false,
            tx_status: b'I',
            cancel,
            user,
        }
    }

    /// Runs until the client leaves or a fatal error. Never leaves an open
    /// transaction behind: a backend not cleanly idle is closed on exit.
    pub async fn run(mut self) -> End {
        let end = self.run_inner().await;
        self.cancel.set(None);
        if let Some(b) = self.backend.take() {
            // Clean only if idle with nothing owed; otherwise the guard's
            // drop closes the connection (and PostgreSQL rolls back).
            if self.owed.is_empty() && self.tx_status == b'I' && !self.state_dirty {
                b.release();
            }
        }
        end
    }

    async fn run_inner(&mut self) -> End {
        loop {
            let res = if self.backend.is_some() {
                self.step_attached().await
            } else {
                self.step_idle().await
            };
            match res {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) => return self.fail(e).await,
            }
        }
    }

    async fn fail(&mut self, e: SessionError) -> End {
        match e {
            SessionError::ClientGone => End::ClientGone,
            SessionError::Fatal { code, msg } => {
                tracing::info!(user = %self.user, %code, %msg, "closing client session");
                wire::error_response(&mut self.out, Severity::Fatal, code, &msg);
                let _ = self.flush_client().await;
                End::Fatal
            }
        }
    }

    /// No backend held: wait for the client, bounded by the idle timeout.
    async fn step_idle(&mut self) -> Result<Option<End>, SessionError> {
        let t = self.node.cfg.client_idle_timeout_ms;
        let f = if t > 0 {
            match tokio::time::timeout(Duration::from_millis(t), self.client.next()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(SessionError::Fatal {
                        code: "57P05",
                        msg: "terminating connection due to idle-session timeout".into(),
                    })
                }
            }
        } else {
            self.client.next().await
        };
        let f = f.map_err(client_err)?;
        if let Some(end) = self.on_client_batch(f).await? {
            return Ok(Some(end));
        }
        Ok(None)
    }

    async fn step_attached(&mut self) -> Result<Option<End>, SessionError> {
        let idle_in_tx = self.node.cfg.idle_in_transaction_timeout_ms;
        let timer_on = idle_in_tx > 0 && self.owed.is_empty() && self.tx_status != b'I';
        let sleep = tokio::time::sleep(Duration::from_millis(if timer_on {
            idle_in_tx
        } else {
            86_400_000
        }));
        let Some(backend) = self.backend.as_mut() else {
            return Ok(None);
        };
        // Both `next()` calls are cancel-safe (partial frames stay buffered).
        tokio::select! {
            f = self.client.next() => {
                let f = f.map_err(client_err)?;
                self.on_client_batch(f).await
            }
            f = backend.reader.next() => {
                match f {
                    Ok(f) => { self.on_backend_batch(f).await?; Ok(None) }
                    Err(e) => Err(self.backend_lost(e)),
                }
            }
            _ = sleep, if timer_on => Err(SessionError::Fatal {
                code: "25P03",
                msg: "terminating connection due to idle-in-transaction timeout".into(),
            }),
        }
    }

    fn backend_lost(&mut self, e: WireError) -> SessionError {
        tracing::warn!(error = %e, "backend connection lost");
        self.backend = None;
        self.cancel.set(None);
        SessionError::Fatal {
            code: "08006",
            msg: "server connection lost; the transaction, if any, was rolled back".into(),
        }
    }

    /// Handles one client frame and every further frame already buffered,
    /// then writes to backend and client once.
    async fn on_client_batch(&mut self, first: Frame) -> Result<Option<End>, SessionError> {
        let mut f = Some(first);
        while let Some(frame) = f.take() {
            if let Some(end) = self.on_client_frame(frame).await? {
                self.flush_backend().await?;
                self.flush_client().await?;
                return Ok(Some(end));
            }
            if self.client.has_frame() {
                f = self.client.try_frame().map_err(client_err)?;
            }
        }
        self.flush_backend().await?;
        self.flush_client().await?;
        Ok(None)
    }

    async fn on_backend_batch(&mut self, first: Frame) -> Result<(), SessionError> {
        self.on_backend_frame(first).await?;
        while let Some(b) = self.backend.as_mut() {
            if !b.reader.has_frame() {
                break;
            }
            match b.reader.try_frame() {
                Ok(Some(f)) => self.on_backend_frame(f).await?,
                Ok(None) => break,
                Err(e) => return Err(self.backend_lost(e)),
            }
        }
        self.flush_client().await
    }

    async fn flush_client(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            let w = self.client.get_mut();
            w.write_all(&self.out)
                .await
                .map_err(|_| SessionError::ClientGone)?;
            w.flush().await.map_err(|_| SessionError::ClientGone)?;
            self.out.clear();
        }
        Ok(())
    }

    async fn flush_backend(&mut self) -> Result<(), SessionError> {
        if self.to_backend.is_empty() {
            return Ok(());
        }
        let Some(b) = self.backend.as_mut() else {
            self.to_backend.clear();
            return Ok(());
        };
        if let Err(e) = b.writer.write_all(&self.to_backend).await {
            self.to_backend.clear();
            return Err(self.backend_lost(WireError::Io(e)));
        }
        self.to_backend.clear();
        Ok(())
    }

    /// Makes sure a backend is held and carries this client's state.
    async fn ensure_backend(&mut self) -> Result<(), SessionError> {
        if self.backend.is_some() {
            return Ok(());
        }
        let mut b = match self.pool.get(self.state_fp, self.node.cfg.pool_timeout()).await {
            Ok(b) => b,
            Err(PoolError::Timeout { shard, waited_ms, size }) => {
                return Err(SessionError::Fatal {
                    code: "53300",
                    msg: format!(
                        "no server connection to shard {shard} became free within {waited_ms} ms (pool size {size})"
                    ),
                })
            }
            Err(PoolError::Backend(e)) => {
                tracing::warn!(error = %e, "cannot open backend connection");
                return Err(SessionError::Fatal {
                    code: "08006",
                    msg: "cannot connect to the shard".into(),
                });
            }
        };
        if b.state_fp != self.state_fp {
            let sql = self.state.replay_sql();
            if let Err(e) = b.hidden_query(&sql).await {
                b.broken = true;
                return Err(SessionError::Fatal {
                    code: "08P01",
                    msg: format!("cannot restore session state on a server connection: {e}"),
                });
            }
            b.state_fp = self.state_fp;
        }
        self.cancel.set(Some((b.addr, b.pid, b.secret)));
        self.backend = Some(b);
        Ok(())
    }

    fn backend_mut(&mut self) -> &mut BackendConn {
        // Called only after ensure_backend.
        self.backend
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!())
    }

    /// Queues a reply the node makes itself, after everything owed before it.
    fn push_synthetic(&mut self, f: Bytes) {
        if self.owed.is_empty() {
            self.out.put_slice(&f);
        } else {
            self.owed.push_back(Owed::Synthetic(f));
        }
    }

    /// Makes sure the backend has the client's statement `name` prepared;
    /// returns the internal name, or None if the client never prepared it.
    fn prepare_on_backend(&mut self, name: &str) -> Option<String> {
        let (internal, parse) = {
            let s = self.stmts.get(name)?;
            (s.internal.clone(), s.parse.clone())
        };
        if !self.backend_mut().prepared.contains(&internal) {
            self.backend_mut().prepared.insert(internal.clone());
            wire::frame(&mut self.to_backend, b'P', |o| o.put_slice(&parse));
            self.owed.push_back(Owed::Parse {
                hidden: true,
                internal: Some(internal.clone()),
            });
        }
        Some(internal)
    }

    async fn on_client_frame(&mut self, f: Frame) -> Result<Option<End>, SessionError> {
        let tag = f.tag();
        if self.skip_to_sync && tag != b'S' {
            return Ok(None);
        }
        match tag {
            b'Q' => {
                let mut b = f.body();
                let sql = wire::get_cstr(&mut b).map_err(client_err)?;
                self.note_sql(sql)?;
                self.ensure_backend().await?;
                self.to_backend.put_slice(&f.raw);
                self.owed.push_back(Owed::Query);
            }
            b'P' => self.on_parse(f).await?,
            b'B' => {
                let mut b = f.body();
                let portal = wire::get_cstr(&mut b).map_err(client_err)?;
                let stmt = wire::get_cstr(&mut b).map_err(client_err)?;
                self.ensure_backend().await?;
                if stmt.is_empty() {
                    self.to_backend.put_slice(&f.raw);
                } else {
                    let (portal, stmt, rest) = (
                        portal.to_string(),
                        stmt.to_string(),
                        Bytes::copy_from_slice(b),
                    );
                    match self.prepare_on_backend(&stmt) {
                        Some(internal) => wire::frame(&mut self.to_backend, b'B', |o| {
                            wire::put_cstr(o, &portal);
                            wire::put_cstr(o, &internal);
                            o.put_slice(&rest);
                        }),
                        // Unknown to us: let PostgreSQL raise its own error.
                        None => self.to_backend.put_slice(&f.raw),
                    }
                }
                self.owed.push_back(Owed::Bind);
            }
            b'D' => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Describe"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                self.ensure_backend().await?;
                if kind == b'S' && !name.is_empty() {
                    match self.prepare_on_backend(&name) {
                        Some(internal) => wire::frame(&mut self.to_backend, b'D', |o| {
                            o.put_u8(b'S');
                            wire::put_cstr(o, &internal);
                        }),
                        None => self.to_backend.put_slice(&f.raw),
                    }
                } else {
                    self.to_backend.put_slice(&f.raw);
                }
                self.owed.push_back(Owed::Describe);
            }
            b'E' => {
                self.ensure_backend().await?;
                self.to_backend.put_slice(&f.raw);
                self.owed.push_back(Owed::Execute);
            }
            b'C' => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Close"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?;
                if kind == b'S' && !name.is_empty() {
                    // Node-named statements stay prepared on the backends
                    // (other clients may share them); the client's name goes.
                    self.stmts.remove(name);
                    self.push_synthetic(wire::close_complete());
                } else {
                    self.ensure_backend().await?;
                    self.to_backend.put_slice(&f.raw);
                    self.owed.push_back(Owed::Close);
                }
            }
            b'S' => {
                self.skip_to_sync = false;
                if self.backend.is_some() {
                    self.to_backend.put_slice(&f.raw);
                    self.owed.push_back(Owed::Sync);
                } else {
                    wire::ready_for_query(&mut self.out, b'I');
                }
            }
            b'H' => {
                if self.backend.is_some() {
                    self.to_backend.put_slice(&f.raw);
                }
            }
            b'F' => {
                self.ensure_backend().await?;
                self.to_backend.put_slice(&f.raw);
                self.owed.push_back(Owed::FunctionCall);
            }
            b'd' => {
                if self.backend.is_some() {
                    self.to_backend.put_slice(&f.raw);
                }
            }
            b'c' | b'f' => {
                if self.backend.is_some() {
                    self.to_backend.put_slice(&f.raw);
                    // PostgreSQL ignores Sync received in copy-in mode, and
                    // drivers do send one right after the Execute that starts
                    // COPY (tokio-postgres does): nothing is owed for them.
                    if matches!(self.owed.front(), Some(Owed::Execute | Owed::Query)) {
                        let mut first = true;
                        self.owed
                            .retain(|o| std::mem::take(&mut first) || !matches!(o, Owed::Sync));
                    }
                }
            }
            b'X' => return Ok(Some(End::ClientGone)),
            other => {
                return Err(proto_fatal(format!(
                    "unexpected message type {:?} from client",
                    other as char
                )))
            }
        }
        Ok(None)
    }

    async fn on_parse(&mut self, f: Frame) -> Result<(), SessionError> {
        let mut b = f.body();
        let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
        let rest = b; // query \0, int16 n, n × int32 types
        let mut q = rest;
        let sql = wire::get_cstr(&mut q).map_err(client_err)?;
        self.note_sql(sql)?;
        self.ensure_backend().await?;
        if name.is_empty() {
            self.to_backend.put_slice(&f.raw);
            self.owed.push_back(Owed::Parse {
                hidden: false,
                internal: None,
            });
            return Ok(());
        }
        if self.stmts.contains_key(&name) {
            let mut e = BytesMut::new();
            wire::error_response(
                &mut e,
                Severity::Error,
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            self.push_synthetic(e.freeze());
            self.skip_to_sync = true;
            return Ok(());
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rest.hash(&mut h);
        let internal = format!("hr_{:016x}", h.finish());
        let mut parse = BytesMut::with_capacity(rest.len() + 20);
        wire::put_cstr(&mut parse, &internal);
        parse.put_slice(rest);
        self.stmts.insert(
            name.clone(),
            Stmt {
                internal: internal.clone(),
                parse: parse.freeze(),
            },
        );
        if self.backend_mut().prepared.contains(&internal) {
            self.push_synthetic(wire::parse_complete());
        } else {
            self.prepare_on_backend(&name);
            // This ParseComplete answers the client's own Parse.
            if let Some(Owed::Parse { hidden, .. }) = self.owed.back_mut() {
                *hidden = false;
            }
        }
        Ok(())
    }

    fn note_sql(&mut self, sql: &str) -> Result<(), SessionError> {
        if state::may_change_state(sql) {
            self.state_dirty = true;
        }
        if state::may_drop_prepared(sql) {
            self.prepared_dirty = true;
        }
        if !self.session_mode && starts_with_ci(sql.trim_start(), "listen") {
            return Err(SessionError::Fatal {
                code: "0A000",
                msg: "LISTEN is not supported in transaction pooling mode; use pool_mode = \"session\" for this user".into(),
            });
        }
        Ok(())
    }

    async fn on_backend_frame(&mut self, f: Frame) -> Result<(), SessionError> {
        let tag = f.tag();
        let mut forward = true;
        match tag {
            b'1' => {
                if let Some(Owed::Parse { hidden, .. }) = self.owed.front() {
                    forward = !*hidden;
                    self.owed.pop_front();
                }
            }
            b'2' => self.pop_if(|o| matches!(o, Owed::Bind)),
            b'3' => self.pop_if(|o| matches!(o, Owed::Close)),
            b'T' | b'n' => self.pop_if(|o| matches!(o, Owed::Describe)),
            b'C' | b'I' | b's' => self.pop_if(|o| matches!(o, Owed::Execute)),
            b'E' => self.on_backend_error(),
            b'Z' => {
                self.pop_if(|o| matches!(o, Owed::Sync | Owed::Query | Owed::FunctionCall));
                self.tx_status = f.body().first().copied().unwrap_or(b'I');
            }
            _ => {}
        }
        if forward {
            self.out.put_slice(&f.raw);
        }
        self.emit_synthetic();
        if tag == b'Z' && self.owed.is_empty() && self.tx_status == b'I' {
            self.end_of_transaction().await?;
        }
        Ok(())
    }

    fn pop_if(&mut self, p: impl Fn(&Owed) -> bool) {
        if self.owed.front().is_some_and(p) {
            self.owed.pop_front();
        }
    }

    /// PostgreSQL skips everything up to Sync after an error in the
    /// extended protocol; so does the owed queue (synthetic replies too).
    fn on_backend_error(&mut self) {
        match self.owed.front() {
            Some(Owed::Query | Owed::FunctionCall | Owed::Sync) | None => {}
            Some(_) => {
                while let Some(o) = self.owed.front() {
                    if matches!(o, Owed::Sync) {
                        break;
                    }
                    if let Some(Owed::Parse {
                        internal: Some(name),
                        ..
                    }) = self.owed.pop_front()
                    {
                        if let Some(b) = self.backend.as_mut() {
                            b.prepared.remove(&name);
                        }
                        self.stmts.retain(|_, s| s.internal != name);
                    }
                }
            }
        }
    }

    fn emit_synthetic(&mut self) {
        while let Some(Owed::Synthetic(_)) = self.owed.front() {
            if let Some(Owed::Synthetic(f)) = self.owed.pop_front() {
                self.out.put_slice(&f);
            }
        }
    }

    /// ReadyForQuery(idle) with nothing owed: read back session state if it
    /// may have changed, then return the backend (transaction mode).
    async fn end_of_transaction(&mut self) -> Result<(), SessionError> {
        let Some(b) = self.backend.as_mut() else {
            return Ok(());
        };
        if self.state_dirty {
            match b.hidden_query(state::READ_STATE_SQL).await {
                Ok(rows) => {
                    let pairs = rows
                        .into_iter()
                        .filter_map(|r| match (r.first(), r.get(1)) {
                            (Some(Some(k)), Some(Some(v))) => Some((k.clone(), v.clone())),
                            _ => None,
                        })
                        .collect();
                    self.state = SessionState::from_pairs(pairs);
                    self.state_fp = self.state.fingerprint();
                    b.state_fp = self.state_fp;
                    self.state_dirty = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read session state back");
                    b.broken = true;
                }
            }
        }
        if self.prepared_dirty {
            match b
                .hidden_query("SELECT name FROM pg_catalog.pg_prepared_statements")
                .await
            {
                Ok(rows) => {
                    b.prepared = rows
                        .into_iter()
                        .filter_map(|r| r.into_iter().next().flatten())
                        .collect();
                    self.prepared_dirty = false;
                }
                Err(_) => b.broken = true,
            }
        }
        if !self.session_mode {
            if let Some(b) = self.backend.take() {
                self.cancel.set(None);
                if b.broken {
                    drop(b);
                } else {
                    b.release();
                }
            }
        }
        Ok(())
    }
}

fn starts_with_ci(s: &str, p: &str) -> bool {
    s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
}

#[derive(Debug)]
pub enum SessionError {
    ClientGone,
    Fatal { code: &'static str, msg: String },
}

fn client_err(e: WireError) -> SessionError {
    match e {
        WireError::Closed | WireError::Io(_) => SessionError::ClientGone,
        WireError::Protocol(m) => proto_fatal(m),
    }
}

fn proto(m: &str) -> SessionError {
    proto_fatal(m.to_string())
}

fn proto_fatal(msg: String) -> SessionError {
    SessionError::Fatal {
        code: "08P01",
        msg: format!("protocol violation: {msg}"),
    }
}
