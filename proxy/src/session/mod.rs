//! The client session after login: routes each statement to its shard and
//! forwards frames between the client and the backends it holds, under
//! transaction (or session) pooling.
//!
//! States: idle (no backend) ⇄ attached (backends held: replies owed or a
//! transaction open) → closed. A backend is attached by the first statement
//! routed to its shard and every backend is released at the ReadyForQuery
//! that ends the transaction with nothing owed.
//!
//! Statements are routed once per statement: a simple Query when it
//! arrives, an extended-protocol batch (Parse/Bind/Describe/Execute/Close)
//! when its Sync or Flush arrives — by then every Bind's parameter values
//! are known. A batch goes to one shard; statements that touch several
//! shards run through [`crate::exec::scatter`] (simple protocol).
//!
//! Frames are forwarded as raw bytes. The session looks inside only:
//! - Parse/Bind/Describe/Close of *named* statements, which it renames to
//!   node-wide names (`hr_<hash of query and types>`) so that a client's
//!   statements work on whichever backend serves it; a statement missing on
//!   the current backend is prepared there first, its ParseComplete hidden;
//! - the tag of each backend reply, to know which client message it answers
//!   (the `owed` queue), where to splice replies the node makes itself, and
//!   when the transaction ends.
//!
//! Invariants:
//! - Invariant: a backend goes back to the pool only at ReadyForQuery('I')
//!   with an empty `owed` queue; otherwise it is closed.
//! - Invariant: replies reach the client in the order of the client's
//!   messages, as PostgreSQL itself would send them, including after an
//!   error (everything up to the next Sync is skipped, synthetic replies too).
//! - Invariant: a transaction that wrote to one shard commits there with
//!   the client's own COMMIT (read-only shards end first); one that wrote to
//!   several shards commits with two-phase commit ([`crate::exec::twopc`]): the
//!   client sees COMMIT only after every written shard prepared, the commit
//!   decision was recorded, and every shard ran COMMIT PREPARED. Its ROLLBACK
//!   (or a COMMIT of a failed transaction) rolls back every shard.

use crate::backend::conn::BackendConn;
use crate::backend::pool::{Pool, PoolError, Pooled};
use crate::backend::state::{self, SessionState};
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::node::{CancelSlot, Node};
use crate::routing::{BindParams, Decision, Kind, Target};
use crate::wire::{self, Frame, FrameReader, Severity, WireError};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A reply the backend (or the node) owes the client, in order.
#[derive(Debug)]
pub(crate) enum Owed {
    /// ParseComplete. `hidden`: injected by the node, not shown to the
    /// client. `internal`: node name prepared by it (dropped on error).
    /// `client`: the client's statement name this Parse creates.
    Parse {
        hidden: bool,
        internal: Option<String>,
        client: Option<String>,
    },
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
    /// A reply the node makes itself, sent when everything before it is done.
    /// `forget`: a client statement name to drop when the reply is sent
    /// (Close), or when an error skips it (Parse), as PostgreSQL would.
    Synthetic {
        frame: Bytes,
        forget: Forget,
    },
}

/// When a synthetic reply drops a client statement name.
#[derive(Debug, Clone)]
pub(crate) enum Forget {
    Nothing,
    OnSend(String),
    OnSkip(String),
}

/// A client's named prepared statement.
struct Stmt {
    internal: String,
    /// Body of a Parse message under the internal name.
    parse: Bytes,
    sql: Arc<str>,
    /// Running it may change session state / drop prepared statements.
    changes_state: bool,
    drops_prepared: bool,
}

/// The client's unnamed statement: kept so that it can be prepared again on
/// another shard's backend when a later Bind goes there.
struct Unnamed {
    /// The Parse message as the client sent it.
    raw: Bytes,
    /// Shard whose current backend has it.
    on: Option<usize>,
}

impl Unnamed {
    /// Its SQL text (read from the Parse message when routing needs it).
    fn sql(&self) -> Option<Arc<str>> {
        let mut b = self.raw.get(5..)?;
        let _name = wire::get_cstr(&mut b).ok()?;
        wire::get_cstr(&mut b).ok().map(Arc::from)
    }
}

/// One shard's side of the session.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) pool: Option<Arc<Pool>>,
    pub(crate) conn: Option<Pooled>,
}

/// Backend slots a session keeps beyond the shards the node knows of; see
/// `Session::ensure_slots`.
const SLOT_HEADROOM: usize = 8;

pub struct Session<S> {
    pub(crate) node: Arc<Node>,
    pub(crate) client: FrameReader<S>,
    pub(crate) out: BytesMut,
    pub(crate) to_backend: BytesMut,
    pub(crate) slots: Vec<Slot>,
    /// Shard whose backend receives forwarded frames and owes the replies.
    pub(crate) cur: usize,
    database: String,
    session_mode: bool,
    pub(crate) owed: VecDeque<Owed>,
    /// Held from routing until the session has the answers of what it
    /// routed (`owed` empty after a batch): see [`Node::pin`].
    pub(crate) pin: Option<crate::node::EpochPin>,
    stmts: HashMap<String, Stmt>,
    unnamed: Option<Unnamed>,
    /// Extended-protocol messages waiting for their Sync or Flush.
    batch: Vec<Frame>,
    state: SessionState,
    state_fp: u64,
    /// Shard of a backend whose transaction may have changed session state.
    state_dirty: Vec<bool>,
    /// A statement that may change settings was sent since `state` was
    /// last read: routing must not trust `state` (search_path,
    /// standard_conforming_strings) until it is read again.
    state_stale: bool,
    /// The server's `standard_conforming_strings` at login.
    server_scs: bool,
    /// Where unqualified names resolve, and what it was read under
    /// (search_path setting, routing table epoch, the node's
    /// catalog generation).
    ns: Arc<hotrepart_router::route::Namespace>,
    ns_under: Option<(Option<String>, u64, u64)>,
    /// Custom settings (`app.name`) the client has set, read back with
    /// the others.
    custom_settings: std::collections::BTreeSet<String>,
    /// ... or dropped prepared statements (DISCARD/DEALLOCATE).
    prepared_dirty: bool,
    /// After an error the node raised itself in an extended-protocol batch,
    /// client messages are skipped until Sync.
    pub(crate) skip_to_sync: bool,
    /// Transaction status as the client sees it.
    pub(crate) tx_status: u8,
    /// The client's BEGIN, replayed on shards that join the transaction.
    tx_begin: Option<String>,
    /// The shards this transaction has written to, in order of first write.
    pub(crate) tx_writes: Vec<usize>,
    /// The node refused a statement inside the transaction: like PostgreSQL
    /// after an error, only ROLLBACK (or COMMIT, which rolls back) is left.
    pub(crate) tx_failed: bool,
    /// The routing table of the open transaction's first routed statement:
    /// a REPEATABLE READ or SERIALIZABLE transaction must not outlive a
    /// range's change of owner (its snapshot on the new owner may predate
    /// the range's rows there).
    tx_routing: Option<Arc<hotrepart_router::catalog::RoutingSnapshot>>,
    /// The open transaction asked for REPEATABLE READ or SERIALIZABLE
    /// (`SET TRANSACTION …`, `SET SESSION CHARACTERISTICS …`).
    tx_snapshot_isolation: bool,
    cancel: Arc<CancelSlot>,
    user: String,
    /// Set while a multi-shard extended statement is gathered.
    pub(crate) gather: Option<Gather>,
}

/// What a multi-shard extended statement's first shard answered.
#[derive(Default, Debug)]
pub(crate) struct Gather {
    pub(crate) tags: Vec<String>,
    pub(crate) error: Option<(String, String)>,
    pub(crate) status: u8,
    pub(crate) empty: bool,
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
        database: String,
        session_mode: bool,
        state: SessionState,
        cancel: Arc<CancelSlot>,
        user: String,
    ) -> Self {
        let state_fp = state.fingerprint();
        let nshards = node.shard_slots() + SLOT_HEADROOM;
        let home = node.home_index();
        Session {
            node,
            client,
            out: BytesMut::with_capacity(8192),
            to_backend: BytesMut::with_capacity(8192),
            slots: (0..nshards).map(|_| Slot::default()).collect(),
            cur: home,
            database,
            session_mode,
            owed: VecDeque::new(),
            pin: None,
            stmts: HashMap::new(),
            unnamed: None,
            batch: Vec::new(),
            state,
            state_fp,
            state_dirty: vec![false; nshards],
            state_stale: false,
            server_scs: true,
            ns: Arc::default(),
            ns_under: None,
            custom_settings: Default::default(),
            prepared_dirty: false,
            skip_to_sync: false,
            tx_status: b'I',
            tx_begin: None,
            tx_writes: Vec::new(),
            tx_failed: false,
            tx_routing: None,
            tx_snapshot_isolation: false,
            cancel,
            user,
            gather: None,
        }
    }

    /// Runs until the client leaves or a fatal error. Never leaves an open
    /// transaction behind: a backend not cleanly idle is closed on exit.
    ///
    /// A panic inside the session (a bug: no input may cause one) is
    /// caught here: it is logged at ERROR (in the session's span, which
    /// names it), the client gets a FATAL `XX000` if its socket still
    /// takes it, every backend is closed (PostgreSQL rolls back), and the
    /// node and its other sessions go on.
    pub async fn run(mut self) -> End {
        let (end, panicked) = match catch_panic(self.run_inner()).await {
            Ok(end) => (end, false),
            Err(what) => {
                tracing::error!(user = %self.user, database = %self.database, panic = %what, "internal error in the proxy: the client session panicked; closing it");
                let mut e = BytesMut::new();
                wire::error_response(
                    &mut e,
                    Severity::Fatal,
                    sqlstate::INTERNAL_ERROR,
                    "internal error in the proxy; the session is closed and its open transaction, if any, was rolled back",
                );
                let w = self.client.get_mut();
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = w.write_all(&e).await;
                    let _ = w.flush().await;
                })
                .await;
                (End::Fatal, true)
            }
        };
        self.cancel.set(Vec::new());
        let clean = !panicked
            && self.owed.is_empty()
            && self.tx_status == b'I'
            && !self.state_dirty.contains(&true);
        for slot in &mut self.slots {
            if let Some(b) = slot.conn.take() {
                // Otherwise the guard's drop closes the connection (and
                // PostgreSQL rolls back).
                if clean {
                    b.release();
                }
            }
        }
        end
    }

    /// Grows the backend slots when the routing table gained shards. Done
    /// before each client batch is routed, with headroom: a decision can
    /// only name a shard added between this call and the routing (a
    /// replicated catalog change, not a per-statement event), so
    /// [`SLOT_HEADROOM`] more slots than the node has handed out cover it.
    fn ensure_slots(&mut self) {
        let n = self.node.shard_slots() + SLOT_HEADROOM;
        if self.slots.len() < n {
            self.slots.resize_with(n, Slot::default);
            self.state_dirty.resize(n, false);
        }
    }

    /// The server's defaults the client saw at login (ParameterStatus):
    /// those routing depends on when the client has not set them.
    pub fn with_server_params(mut self, params: &[(String, String)]) -> Self {
        if let Some((_, v)) = params
            .iter()
            .find(|(k, _)| k == "standard_conforming_strings")
        {
            self.server_scs = state::on(v);
        }
        self
    }

    /// What routing needs of this session.
    pub(crate) fn route_ctx(&self) -> crate::routing::RouteCtx<'_> {
        crate::routing::RouteCtx {
            state: &self.state,
            stale: self.state_stale,
            server_scs: self.server_scs,
            ns: &self.ns,
        }
    }

    /// Before routing: the namespace unqualified names resolve in, for the
    /// client's current `search_path` ([`crate::routing::names`]): from the node's
    /// cache, else read on the home shard on a backend carrying the
    /// client's settings (attached to its transaction if one is open;
    /// released again if the session was idle).
    async fn ensure_namespace(&mut self) -> Result<(), SessionError> {
        if self.node.single_shard() {
            return Ok(());
        }
        // Per statement only this: the routing table's epoch, the catalog
        // generation and the setting, compared without allocating.
        let snap = self.node.catalog.load_full();
        let generation = self
            .node
            .catalog_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if let Some((p, e, g)) = &self.ns_under {
            if *e == snap.epoch()
                && *g == generation
                && p.as_deref() == self.state.get("search_path")
            {
                return Ok(());
            }
        }
        let fp = crate::routing::names::declared_fingerprint(&snap);
        let path = self.state.get("search_path").map(str::to_string);
        let under = (path.clone(), snap.epoch(), generation);
        if fp == 0 {
            self.ns = Arc::default();
            self.ns_under = Some(under);
            return Ok(());
        }
        let key = (self.database.clone(), self.user.clone(), path);
        if let Some(ns) = self.node.namespace(&key, fp) {
            self.ns = ns;
            self.ns_under = Some(under);
            return Ok(());
        }
        if self.mid_pipeline() {
            return Ok(());
        }
        if !self.owed.is_empty() {
            self.drain_owed().await?;
        }
        let home = self.node.home_index();
        let was_attached = self.slots[home].conn.is_some();
        if let Err(r) = self.ensure_backend(home).await? {
            tracing::warn!(error = %r.message, "cannot read the search path on the home shard");
            return Ok(());
        }
        let sql = crate::routing::names::probe_sql(&snap);
        let rows = match self.slots[home].conn.as_mut() {
            Some(b) => b.hidden_query(&sql).await,
            None => return Ok(()),
        };
        match rows {
            Ok(rows) => {
                let ns = Arc::new(crate::routing::names::parse(rows));
                self.node.learn_namespace(key, fp, ns.clone());
                self.ns = ns;
                self.ns_under = Some(under);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the search path on the home shard"),
        }
        if !was_attached && self.tx_status == b'I' && self.owed.is_empty() {
            if let Some(b) = self.slots[home].conn.take() {
                b.release();
            }
            self.update_cancel();
        }
        Ok(())
    }

    /// Before routing: when a statement that may change settings was sent
    /// since they were last read, wait for its answer and read them again
    /// (inside a transaction too), so that the next statement is routed
    /// under the settings PostgreSQL will apply to it. When that is not
    /// possible (a backend with Flush-only messages, or a failed
    /// transaction) the state stays stale and routing treats what depends
    /// on it as unknown.
    async fn settle_state(&mut self) -> Result<(), SessionError> {
        if !self.state_stale || self.mid_pipeline() {
            return Ok(());
        }
        if !self.owed.is_empty() {
            self.drain_owed().await?;
        }
        let mut settled = true;
        for i in 0..self.slots.len() {
            if !self.state_dirty[i] {
                continue;
            }
            match self.slots[i].conn.as_ref().map(|b| b.status) {
                // Lost with its backend: the next backend gets `state`.
                None => {}
                Some(b'E') => settled = false,
                Some(_) => {
                    self.refresh_state_from(i).await;
                    settled &= !self.state_stale;
                    self.state_stale = true;
                }
            }
        }
        self.state_stale = !settled;
        Ok(())
    }

    pub(crate) fn database(&self) -> &str {
        &self.database
    }

    fn attached(&self) -> bool {
        self.slots.iter().any(|s| s.conn.is_some())
    }

    /// Some backend has messages up to a Flush but no Sync yet: no hidden
    /// query can run on the session's backends now.
    fn mid_pipeline(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.conn.as_ref().is_some_and(|b| b.unsynced))
    }

    async fn run_inner(&mut self) -> End {
        loop {
            // Everything routed has been answered: no statement of this
            // session is in flight any more.
            if self.owed.is_empty() {
                self.pin = None;
            }
            let res = if self.slots[self.cur].conn.is_some() {
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

    /// Nothing owed by the current shard: wait for the client, bounded by
    /// the idle (or idle-in-transaction) timeout.
    async fn step_idle(&mut self) -> Result<Option<End>, SessionError> {
        let (t, code, msg) = if self.tx_status == b'I' {
            (
                self.node.cfg.client_idle_timeout_ms,
                sqlstate::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout",
            )
        } else {
            (
                self.node.cfg.idle_in_transaction_timeout_ms,
                sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
        };
        let f = if t > 0 {
            match tokio::time::timeout(Duration::from_millis(t), self.client.next()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(SessionError::Fatal {
                        code,
                        msg: msg.into(),
                    })
                }
            }
        } else {
            self.client.next().await
        };
        let f = f.map_err(client_err)?;
        self.on_client_batch(f).await
    }

    async fn step_attached(&mut self) -> Result<Option<End>, SessionError> {
        let idle_in_tx = self.node.cfg.idle_in_transaction_timeout_ms;
        let timer_on = idle_in_tx > 0 && self.owed.is_empty() && self.tx_status != b'I';
        let sleep = tokio::time::sleep(Duration::from_millis(if timer_on {
            idle_in_tx
        } else {
            86_400_000
        }));
        let cur = self.cur;
        let Some(backend) = self.slots[cur].conn.as_mut() else {
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
                    Err(e) => Err(self.backend_lost(cur, e)),
                }
            }
            _ = sleep, if timer_on => Err(SessionError::Fatal {
                code: sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                msg: "terminating connection due to idle-in-transaction timeout".into(),
            }),
        }
    }

    pub(crate) fn backend_lost(&mut self, shard: usize, e: WireError) -> SessionError {
        tracing::warn!(error = %e, shard, "backend connection lost");
        self.slots[shard].conn = None;
        self.cancel.set(Vec::new());
        SessionError::Fatal {
            code: sqlstate::CONNECTION_FAILURE,
            msg: "server connection lost; the transaction, if any, was rolled back".into(),
        }
    }

    /// Handles one client frame and every further frame already buffered,
    /// then writes to backend and client once.
    async fn on_client_batch(&mut self, first: Frame) -> Result<Option<End>, SessionError> {
        self.ensure_slots();
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
        loop {
            let cur = self.cur;
            let Some(b) = self.slots[cur].conn.as_mut() else {
                break;
            };
            if !b.reader.has_frame() {
                break;
            }
            match b.reader.try_frame() {
                Ok(Some(f)) => self.on_backend_frame(f).await?,
                Ok(None) => break,
                Err(e) => return Err(self.backend_lost(cur, e)),
            }
        }
        self.flush_client().await
    }

    /// Reads the current backend until nothing is owed (before a statement
    /// goes to another shard, so replies stay in order).
    pub(crate) async fn drain_owed(&mut self) -> Result<(), SessionError> {
        self.flush_backend().await?;
        while !self.owed.is_empty() {
            let cur = self.cur;
            let Some(b) = self.slots[cur].conn.as_mut() else {
                break;
            };
            let f = match b.reader.next().await {
                Ok(f) => f,
                Err(e) => return Err(self.backend_lost(cur, e)),
            };
            self.on_backend_frame(f).await?;
            if self.out.len() > 64 * 1024 {
                self.flush_client().await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn flush_client(&mut self) -> Result<(), SessionError> {
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

    pub(crate) async fn flush_backend(&mut self) -> Result<(), SessionError> {
        if self.to_backend.is_empty() {
            return Ok(());
        }
        let cur = self.cur;
        let Some(b) = self.slots[cur].conn.as_mut() else {
            self.to_backend.clear();
            return Ok(());
        };
        if let Err(e) = b.writer.write_all(&self.to_backend).await {
            self.to_backend.clear();
            return Err(self.backend_lost(cur, WireError::Io(e)));
        }
        self.to_backend.clear();
        Ok(())
    }

    pub(crate) fn pool(&mut self, shard: usize) -> Arc<Pool> {
        if let Some(p) = &self.slots[shard].pool {
            return p.clone();
        }
        let p = self.node.pool_for(shard, &self.database, &self.user);
        self.slots[shard].pool = Some(p.clone());
        p
    }

    /// Makes sure shard `t` has a backend carrying this client's state (and
    /// inside a transaction, a transaction of its own). Returns a client
    /// error (not fatal) when no backend can be had.
    pub(crate) async fn ensure_backend(
        &mut self,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if self.slots[t].conn.is_some() {
            return Ok(Ok(()));
        }
        // A SET earlier in this transaction: learn the state it made before
        // giving a new backend this client's state.
        for d in 0..self.slots.len() {
            if d != t && self.state_dirty[d] && self.slots[d].conn.is_some() {
                self.refresh_state_from(d).await;
            }
        }
        let pool = self.pool(t);
        let mut b = match pool.get(self.state_fp, self.node.cfg.pool_timeout()).await {
            Ok(b) => b,
            Err(PoolError::Timeout { shard, waited_ms, size }) => {
                return Ok(Err(Refusal::new(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!("no server connection to shard {shard} became free within {waited_ms} ms (pool size {size})"),
                )))
            }
            Err(PoolError::Backend(e)) => {
                tracing::warn!(error = %e, "cannot open backend connection");
                return Ok(Err(Refusal::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!("cannot connect to shard {}", self.node.shard_name(t)),
                )));
            }
        };
        if b.state_fp != self.state_fp {
            let sql = self.state.replay_sql();
            if let Err(e) = b.hidden_query(&sql).await {
                b.broken = true;
                return Ok(Err(Refusal::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("cannot restore session state on a server connection: {e}"),
                )));
            }
            b.state_fp = self.state_fp;
        }
        if !self.node.single_shard() && self.node.collation_is_c(t, &self.database).is_none() {
            // Needed by the merger: text is ordered across shards only when
            // the database and every user column use the C collation.
            if let Ok(rows) = b.hidden_query(CATALOG_PROBE).await {
                let row = rows.first();
                let c = row
                    .and_then(|r| r.first().cloned().flatten())
                    .is_some_and(|v| v == "t");
                self.node.set_collation_is_c(t, &self.database, c);
            }
        }
        if self.tx_status != b'I' {
            // The shard joins an open transaction.
            let begin = self.tx_begin.clone().unwrap_or_else(|| "BEGIN".into());
            if let Err(e) = b.hidden_query(&begin).await {
                b.broken = true;
                return Ok(Err(Refusal::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("cannot begin the transaction on another shard: {e}"),
                )));
            }
        }
        self.slots[t].conn = Some(b);
        self.update_cancel();
        Ok(Ok(()))
    }

    /// A session setting as the node last read it back.
    pub(crate) fn setting(&self, name: &str) -> Option<&str> {
        self.state.get(name)
    }

    /// A statement that calls functions the router does not know to be
    /// read-only:
    /// - is refused (0A000) when one of them names a sharded table in its
    ///   body, unless a hint forced the shard: what such a function reads
    ///   or writes is not where the router sends the statement (the home
    ///   shard, or the shard of the statement's own key);
    /// - is a write for commit purposes when one of them is volatile (it
    ///   may run DML; a non-volatile SQL or PL/pgSQL function cannot,
    ///   PostgreSQL refuses it): `d.write` becomes true, so a transaction
    ///   that also wrote elsewhere commits with two-phase commit, and a
    ///   multi-shard statement outside a transaction block runs in a
    ///   transaction per shard committed together.
    ///
    /// Looked up in `pg_proc` on the statement's shard `t` (any overload or
    /// schema of the name counts), once per name and database, forgotten on
    /// DDL through the node. When the lookup cannot be made the statement
    /// counts as a write (and is not refused).
    async fn settle_calls(
        &mut self,
        d: &mut Decision,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if d.calls.is_empty() {
            return Ok(Ok(()));
        }
        let (unknown, mut known) = self.node.known_functions(&self.database, &d.calls);
        if !unknown.is_empty() {
            let unsynced = self.mid_pipeline();
            if unsynced {
                // Mid-pipeline: no hidden query can run now.
                d.write = true;
                return Ok(Ok(()));
            }
            if !self.owed.is_empty() {
                self.drain_owed().await?;
            }
            if self.ensure_backend(t).await?.is_err() {
                d.write = true;
                return Ok(Ok(()));
            }
            let list: Vec<String> = unknown.iter().map(|n| state::quote_literal(n)).collect();
            let sql = format!(
                "SELECT lower(proname), bool_or(provolatile = 'v'), string_agg(coalesce(prosrc, ''), ' ') \
                 FROM pg_catalog.pg_proc WHERE lower(proname) IN ({}) GROUP BY 1",
                list.join(", ")
            );
            let rows = match self.slots[t].conn.as_mut() {
                Some(b) => b.hidden_query(&sql).await.ok(),
                None => None,
            };
            let Some(rows) = rows else {
                d.write = true;
                return Ok(Ok(()));
            };
            let snap = self.node.catalog.load();
            let sharded: Vec<String> = snap
                .sharded_tables()
                .map(|t| {
                    t.name
                        .rsplit('.')
                        .next()
                        .unwrap_or(&t.name)
                        .to_ascii_lowercase()
                })
                .collect();
            let mut found = HashMap::new();
            for r in rows {
                let mut r = r.into_iter();
                let (Some(Some(name)), Some(vol), Some(src)) = (r.next(), r.next(), r.next())
                else {
                    continue;
                };
                let info = crate::node::FunctionInfo {
                    volatile: vol.as_deref() == Some("t"),
                    reads: src.as_deref().and_then(|src| names_table(src, &sharded)),
                };
                found.insert(name, info);
            }
            self.node.learn_functions(&self.database, &unknown, &found);
            known = self.node.known_functions(&self.database, &d.calls).1;
        }
        if let (Some((f, table)), false) = (&known.reads, d.hinted) {
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "function {f}() names sharded table \"{table}\" in its body: hotrepart cannot tell which rows it reads or writes, \
                     so the statement would run on one shard and see or change that shard's rows only; \
                     run it on the shard you mean with /* hotrepart: shard=NAME */ or SET hotrepart.shard"
                ),
            )));
        }
        if known.volatile.is_some() {
            d.write = true;
        }
        Ok(Ok(()))
    }

    /// The shard a decision's statement runs on first (for lookups).
    fn first_shard(&self, d: &Decision) -> usize {
        match &d.target {
            Target::Shard(t) => *t,
            Target::Multi { shards, .. } if !shards.is_empty() => shards[0],
            _ => self.default_shard(),
        }
    }

    /// A multi-shard statement the merger answers may write (a volatile
    /// function, FOR UPDATE): inside a transaction every shard is marked
    /// written (COMMIT then uses two-phase commit); outside one it is
    /// refused, as the merger runs each shard's part in its own implicit
    /// transaction and could not commit them atomically.
    fn check_merged_write(&mut self, d: &Decision, shards: &[usize]) -> Result<(), Refusal> {
        if !d.write {
            return Ok(());
        }
        if self.tx_status == b'I' {
            let f = d
                .calls
                .first()
                .map(|f| format!("calls {f}(), which may write"))
                .unwrap_or_else(|| "locks rows".to_string());
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("this statement reads several shards with a merge (ORDER BY, LIMIT, aggregates …) and {f}: run it inside a transaction block (BEGIN … COMMIT), so that what it does on every shard commits together"),
            ));
        }
        for &t in shards {
            self.note_write(t);
        }
        Ok(())
    }

    /// Before a statement runs on several shards: the refusal the router
    /// cannot make without the shards' catalog (a call to a user-defined
    /// aggregate, which it plans as a scalar function).
    async fn check_multi_shard(
        &mut self,
        d: &Decision,
    ) -> Result<Result<(), Refusal>, SessionError> {
        let Target::Multi { shards, .. } = &d.target else {
            return Ok(Ok(()));
        };
        if shards.len() < 2 || d.ddl {
            return Ok(Ok(()));
        }
        let names = called_names(&d.sql_text);
        let (unknown, mut found) = self.node.known_aggregates(&self.database, &names);
        if found.is_none() && !unknown.is_empty() {
            let t = shards[0];
            if let Err(r) = self.ensure_backend(t).await? {
                return Ok(Err(r));
            }
            let list: Vec<String> = unknown.iter().map(|n| state::quote_literal(n)).collect();
            let sql = format!(
                "SELECT DISTINCT lower(proname) FROM pg_catalog.pg_proc WHERE prokind = 'a' AND lower(proname) IN ({})",
                list.join(", ")
            );
            let rows = match self.slots[t].conn.as_mut() {
                Some(b) => b.hidden_query(&sql).await.ok(),
                None => None,
            };
            let Some(rows) = rows else {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "cannot read the shard's catalog (pg_proc) to check the statement's functions"
                        .into(),
                )));
            };
            let aggs: Vec<String> = rows
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect();
            self.node.learn_aggregates(&self.database, &unknown, &aggs);
            found = aggs.into_iter().next();
        }
        if let Some(name) = found {
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("aggregate function {name}() cannot be combined across shards (hotrepart combines count, sum, min, max, avg, bool_and, bool_or); pin the statement to one shard with its shard key"),
            )));
        }
        Ok(Ok(()))
    }

    fn update_cancel(&self) {
        let v = self
            .slots
            .iter()
            .filter_map(|s| s.conn.as_ref().map(|b| (b.addr, b.pid, b.secret)))
            .collect();
        self.cancel.set(v);
    }

    /// Makes `t` the current shard: drains what another shard still owes,
    /// then attaches a backend on `t`.
    async fn switch_to(&mut self, t: usize) -> Result<Result<(), Refusal>, SessionError> {
        if self.cur != t {
            if !self.owed.is_empty() {
                self.drain_owed().await?;
            }
            if self.slots[self.cur]
                .conn
                .as_ref()
                .is_some_and(|b| b.unsynced)
            {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "messages sent with Flush but without Sync are still open on one shard, and the next statement goes to another; send Sync first".into(),
                )));
            }
        }
        let r = self.ensure_backend(t).await?;
        if r.is_ok() {
            self.cur = t;
        }
        Ok(r)
    }

    fn backend_mut(&mut self) -> &mut BackendConn {
        // Called only after switch_to succeeded.
        let cur = self.cur;
        self.slots[cur]
            .conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!())
    }

    /// Queues a reply the node makes itself, after everything owed before it.
    pub(crate) fn push_synthetic(&mut self, f: Bytes) {
        self.push_synthetic_with(f, Forget::Nothing);
    }

    fn push_synthetic_with(&mut self, frame: Bytes, forget: Forget) {
        if self.owed.is_empty() {
            self.out.put_slice(&frame);
            if let Forget::OnSend(name) = forget {
                self.stmts.remove(&name);
            }
        } else {
            self.owed.push_back(Owed::Synthetic { frame, forget });
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
                client: None,
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
                if !self.batch.is_empty() {
                    // A Query after unsynced extended messages: they go first.
                    self.run_batch(false).await?;
                }
                self.on_query(f).await?;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => {
                self.batch.push(f);
                // Bounded memory: a client that never sends Sync or Flush
                // has its messages forwarded anyway (as Flush would).
                if self.batch.len() >= MAX_BATCH {
                    self.run_batch(false).await?;
                }
            }
            b'S' => {
                self.skip_to_sync = false;
                self.batch.push(f);
                self.run_batch(true).await?;
            }
            b'H' => {
                self.batch.push(f);
                self.run_batch(false).await?;
            }
            b'F' => {
                let t = self.default_shard();
                match self.switch_to(t).await? {
                    Ok(()) => {
                        // The function called may write (the node cannot
                        // see which it is): a write for commit purposes.
                        self.note_write(t);
                        self.to_backend.put_slice(&f.raw);
                        self.owed.push_back(Owed::FunctionCall);
                    }
                    Err(r) => self.refuse_simple(r),
                }
            }
            b'd' => {
                if self.slots[self.cur].conn.is_some() {
                    self.to_backend.put_slice(&f.raw);
                }
            }
            b'c' | b'f' => {
                if self.slots[self.cur].conn.is_some() {
                    self.to_backend.put_slice(&f.raw);
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

    /// The shard for statements that touch no table: the current one while
    /// a transaction or replies are open there, else the home shard.
    fn default_shard(&self) -> usize {
        if self.slots[self.cur].conn.is_some() {
            self.cur
        } else {
            self.node.home_index()
        }
    }

    /// Error for a statement the node refuses, in the simple protocol:
    /// ErrorResponse then ReadyForQuery.
    fn refuse_simple(&mut self, r: Refusal) {
        self.push_error(&r);
        let status = self.client_status();
        self.push_synthetic(rfq(status));
    }

    pub(crate) fn push_error(&mut self, r: &Refusal) {
        let mut e = BytesMut::new();
        wire::error_response(&mut e, Severity::Error, r.code, &r.message);
        self.push_synthetic(e.freeze());
        if self.tx_status != b'I' {
            self.tx_failed = true;
        }
    }

    pub(crate) fn client_status(&self) -> u8 {
        if self.tx_status != b'I' && self.tx_failed {
            b'E'
        } else {
            self.tx_status
        }
    }

    async fn on_query(&mut self, f: Frame) -> Result<(), SessionError> {
        self.settle_state().await?;
        self.ensure_namespace().await?;
        let mut b = f.body();
        let sql = wire::get_cstr(&mut b).map_err(client_err)?;
        if let Err(r) = self.check_listen(sql) {
            self.refuse_simple(r);
            return Ok(());
        }
        if self.deallocate(sql) {
            return Ok(());
        }
        if !self.node.single_shard() {
            if let Some(ex) = crate::exec::explain::parse(sql) {
                if !self.owed.is_empty() {
                    self.drain_owed().await?;
                }
                return crate::exec::explain::run(self, ex).await;
            }
        }
        let d = self
            .route_waiting(|s| s.node.decide(sql, None, &s.route_ctx()))
            .await
            .and_then(|d| self.check_owner_change(&d).map(|()| d));
        let mut d = match d {
            Ok(d) => d,
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        };
        let first = self.first_shard(&d);
        if let Err(r) = self.settle_calls(&mut d, first).await? {
            self.refuse_simple(r);
            return Ok(());
        }
        let target = match d.target {
            Target::Shard(t) => Some(t),
            _ => None,
        };
        // Decide with what the current shard has answered: a pipelined
        // statement for another shard waits for its replies (an error there
        // aborts the transaction).
        if !self.owed.is_empty() && (target != Some(self.cur) || d.kind != Kind::Other) {
            self.drain_owed().await?;
        }
        if self.transaction_control(&d, true, target).await? {
            return Ok(());
        }
        if d.copy.is_some() {
            return crate::exec::copy::run(self, &d, None).await;
        }
        if d.ddl {
            self.node.forget_catalog(&self.database);
        }
        if let Err(r) = self.check_multi_shard(&d).await? {
            self.refuse_simple(r);
            return Ok(());
        }
        match &d.target {
            Target::Multi { shards, .. } if d.merge.is_some() => {
                if !self.owed.is_empty() {
                    self.drain_owed().await?;
                }
                let (plan, shards) = (d.merge.clone(), shards.clone());
                if let Err(r) = self.check_merged_write(&d, &shards) {
                    self.refuse_simple(r);
                    return Ok(());
                }
                let sqls = match &d.target {
                    Target::Multi { sqls, .. } => sqls.clone(),
                    _ => None,
                };
                if let Some(plan) = plan {
                    return crate::exec::merge::exec::run(self, &plan, &shards, sqls.as_deref())
                        .await;
                }
            }
            Target::Multi { .. } => {
                let sql = sql.to_string();
                if !self.owed.is_empty() {
                    self.drain_owed().await?;
                }
                return crate::exec::scatter::run(self, &d, &sql).await;
            }
            Target::Shard(_) | Target::Any => {}
        }
        let t = match d.target {
            Target::Shard(t) => t,
            _ => self.default_shard(),
        };
        if t != self.cur && !self.owed.is_empty() {
            self.drain_owed().await?;
        }
        if let Err(r) = self.check_write(&d, t) {
            self.refuse_simple(r);
            return Ok(());
        }
        match self.switch_to(t).await? {
            Ok(()) => {}
            Err(r) => {
                self.refuse_simple(r);
                return Ok(());
            }
        }
        self.poison_if_failed(&d, t).await;
        self.note_sql(sql, t);
        self.to_backend.put_slice(&f.raw);
        self.owed.push_back(Owed::Query);
        if let Some(b) = self.slots[t].conn.as_mut() {
            b.unsynced = false;
        }
        Ok(())
    }

    /// SQL-level DEALLOCATE of statements the client prepared with the
    /// protocol: those live under node names on the backends, so the node
    /// answers `DEALLOCATE name` itself, and `DEALLOCATE ALL`/`DISCARD ALL`
    /// also forget the client's names (the backend's side follows from the
    /// prepared-statement re-read). Returns true when answered here.
    fn deallocate(&mut self, sql: &str) -> bool {
        // Most statements: no allocation.
        if !sql.trim_start().starts_with(['d', 'D']) {
            return false;
        }
        let words: Vec<&str> = sql
            .trim()
            .trim_end_matches(';')
            .split_whitespace()
            .collect();
        let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
        let is = |i: usize, w: &str| lower.get(i).is_some_and(|x| x == w);
        if (is(0, "discard") && is(1, "all") && words.len() == 2)
            || (is(0, "deallocate") && (is(1, "all") || (is(1, "prepare") && is(2, "all"))))
        {
            self.stmts.clear();
            return false;
        }
        if !is(0, "deallocate") {
            return false;
        }
        let name = match (lower.get(1).map(String::as_str), words.len()) {
            (Some("prepare"), 3) => words[2],
            (Some(_), 2) => words[1],
            _ => return false,
        };
        let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(q) => q.replace("\"\"", "\""),
            None => name.to_ascii_lowercase(),
        };
        if self.stmts.remove(&name).is_some() {
            self.push_synthetic(command_complete("DEALLOCATE"));
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        } else {
            self.refuse_simple(Refusal::new(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{name}\" does not exist"),
            ));
        }
        true
    }

    /// BEGIN/COMMIT/ROLLBACK and the failed-transaction rule. Returns true
    /// when the statement was answered here.
    async fn transaction_control(
        &mut self,
        d: &Decision,
        simple: bool,
        target: Option<usize>,
    ) -> Result<bool, SessionError> {
        let ending = matches!(d.kind, Kind::Commit | Kind::Rollback);
        let refuse = |s: &mut Self, r: Refusal| {
            if simple {
                s.refuse_simple(r);
            } else {
                s.push_error(&r);
                s.skip_to_sync = true;
            }
        };
        // Transaction control mixed with other statements in one string or
        // batch cannot be split over several shards correctly.
        if d.statements > 1
            && d.has_tx_control
            && (self.attached_count() > 1
                || target.is_some_and(|t| self.tx_writes.iter().any(|&w| w != t)))
        {
            refuse(self, Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "BEGIN/COMMIT/ROLLBACK together with other statements in one query string are not supported in a transaction that spans several shards; send them separately".into(),
            ));
            return Ok(true);
        }
        // A failed statement on one shard aborts the whole transaction.
        if !ending && self.tx_status != b'I' {
            let aborted_elsewhere = self.slots.iter().enumerate().any(|(i, sl)| {
                sl.conn.as_ref().is_some_and(|b| b.status == b'E') && target.is_some_and(|t| t != i)
            });
            if aborted_elsewhere {
                self.tx_failed = true;
            }
        }
        if self.tx_failed && !ending {
            let r = Refusal::new(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block"
                    .into(),
            );
            refuse(self, r);
            return Ok(true);
        }
        if ending {
            // The client's COMMIT/ROLLBACK must reach a written shard.
            let primary = match (self.tx_writes.as_slice(), target) {
                (w, Some(t)) if w.iter().any(|&x| x != t) => {
                    let names: Vec<String> = w.iter().map(|&x| self.node.shard_name(x)).collect();
                    refuse(self, Refusal::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "this COMMIT/ROLLBACK comes with statements for shard {} but the transaction wrote to shard(s) {}; send COMMIT on its own",
                            self.node.shard_name(t), names.join(", ")
                        ),
                    ));
                    return Ok(true);
                }
                ([w, ..], _) => *w,
                ([], Some(t)) => t,
                ([], None) => self.cur,
            };
            let aborted = self.tx_failed
                || self
                    .slots
                    .iter()
                    .any(|sl| sl.conn.as_ref().is_some_and(|b| b.status == b'E'));
            if aborted {
                // Before the shard that failed is released below: its
                // 'E' is what says the COMMIT must roll back.
                self.tx_failed = true;
            }
            if d.kind == Kind::Commit && self.tx_writes.len() > 1 && !aborted {
                return match self.two_phase_commit().await? {
                    Ok(()) => Ok(false),
                    Err(r) => {
                        refuse(self, r);
                        Ok(true)
                    }
                };
            }
            if self.attached_count() > 1 || (self.attached() && self.slots[primary].conn.is_none())
            {
                // Shards other than the written one end first (they were
                // only read, or everything rolls back); the client's own
                // statement then goes to it.
                let keep = [primary];
                self.finish_shards_except(d.kind == Kind::Commit && !aborted, &keep)
                    .await?;
            }
            if self.tx_failed
                || self
                    .slots
                    .iter()
                    .any(|sl| sl.conn.as_ref().is_some_and(|b| b.status == b'E'))
            {
                self.tx_failed = true;
            }
        }
        if !simple || d.statements != 1 {
            return Ok(false);
        }
        match d.kind {
            // A BEGIN is held back until the first statement shows which
            // shard the transaction needs; that shard then begins it.
            Kind::Begin if !self.attached() && self.tx_status == b'I' => {
                self.tx_begin = Some(d.sql_text.clone());
                self.tx_status = b'T';
                self.out.put_slice(&command_complete("BEGIN"));
                self.out.put_slice(&rfq(b'T'));
                Ok(true)
            }
            Kind::Commit | Kind::Rollback if !self.attached() && self.tx_status != b'I' => {
                let tag = if d.kind == Kind::Commit && !self.tx_failed {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                self.reset_tx();
                self.out.put_slice(&command_complete(tag));
                self.out.put_slice(&rfq(b'I'));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Before the client's COMMIT reaches a transaction the node failed,
    /// make PostgreSQL fail it too: COMMIT then rolls back and answers
    /// ROLLBACK, exactly as after an error of PostgreSQL's own.
    async fn poison_if_failed(&mut self, d: &Decision, t: usize) {
        if self.tx_failed && d.kind == Kind::Commit {
            if let Some(b) = self.slots[t].conn.as_mut() {
                let _ = b.hidden_query(POISON_SQL).await;
            }
        }
    }

    fn attached_count(&self) -> usize {
        self.slots.iter().filter(|s| s.conn.is_some()).count()
    }

    /// Ends the transaction on every attached shard but those in `keep`
    /// (they were only read in this transaction, or it is rolled back);
    /// the first of `keep` becomes the current shard.
    async fn finish_shards_except(
        &mut self,
        commit: bool,
        keep: &[usize],
    ) -> Result<(), SessionError> {
        if !self.owed.is_empty() {
            self.drain_owed().await?;
        }
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        for i in 0..self.slots.len() {
            if keep.contains(&i) || self.slots[i].conn.is_none() {
                continue;
            }
            if let Some(b) = self.slots[i].conn.as_mut() {
                if let Err(e) = b.hidden_query(sql).await {
                    tracing::warn!(error = %e, shard = i, "ending a read-only shard's transaction failed");
                    b.broken = true;
                }
            }
            if self.state_dirty[i] {
                self.refresh_state_from(i).await;
            }
            if let Some(b) = self.slots[i].conn.take() {
                b.release();
            }
        }
        if let Some(&p) = keep.first() {
            self.cur = p;
        }
        self.update_cancel();
        Ok(())
    }

    /// COMMIT of a transaction that wrote to several shards: read-only
    /// shards commit first, then the written ones commit with two-phase
    /// commit ([`crate::exec::twopc::commit`]). Ok(Ok): committed; an empty
    /// transaction is then begun on a written shard's backend, and the
    /// client's own COMMIT goes there, so that PostgreSQL answers it in
    /// whichever protocol the client used. Ok(Err): the error for the
    /// client; the transaction is over (every backend outside a
    /// transaction).
    async fn two_phase_commit(&mut self) -> Result<Result<(), Refusal>, SessionError> {
        let writes = self.tx_writes.clone();
        self.finish_shards_except(true, &writes).await?;
        if let Err(r) = crate::exec::twopc::commit(self, &writes).await {
            self.end_of_transaction().await?;
            return Ok(Err(r));
        }
        for &p in &writes {
            if let Some(b) = self.slots[p].conn.as_mut() {
                match b.hidden_query("BEGIN").await {
                    Ok(_) => {
                        self.cur = p;
                        return Ok(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, shard = p, "cannot begin the reply transaction after a commit");
                        b.broken = true;
                    }
                }
            }
        }
        self.end_of_transaction().await?;
        Ok(Err(Refusal::new(
            sqlstate::CONNECTION_FAILURE,
            "the transaction was committed on every shard, but the connections to the shards broke before the node could confirm it".into(),
        )))
    }

    fn reset_tx(&mut self) {
        self.tx_status = b'I';
        self.tx_begin = None;
        self.tx_writes.clear();
        self.tx_failed = false;
        self.tx_routing = None;
        self.tx_snapshot_isolation = false;
    }

    /// Records the shard written; the mark lasts until the ReadyForQuery
    /// that ends the transaction (so `BEGIN; INSERT …` in one string, whose
    /// transaction the node learns of only afterwards, is covered too). A
    /// transaction that wrote to several shards commits with two-phase
    /// commit. Call after replies owed by another shard are drained.
    pub(crate) fn check_write(&mut self, d: &Decision, t: usize) -> Result<(), Refusal> {
        if d.write {
            self.note_write(t);
        }
        Ok(())
    }

    /// Records that the transaction writes to shard `t`.
    pub(crate) fn note_write(&mut self, t: usize) {
        if !self.tx_writes.contains(&t) {
            self.tx_writes.push(t);
        }
    }

    /// Routes and sends an extended-protocol batch. `synced`: it ends with
    /// Sync (else with Flush, or a Query follows).
    /// Routes with `route` under a pin of the current routing table. A
    /// refusal for a frozen range waits (without the pin, when nothing is
    /// owed) for the next routing table and routes again, until
    /// `freeze_wait_ms` has passed; writers wait out a cut-over and the
    /// client sees a pause.
    async fn route_waiting<T>(
        &mut self,
        route: impl Fn(&Self) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut wait = self.node.freeze_wait();
        loop {
            self.pin_routing();
            let routed = route(self);
            if let Err(r) = &routed {
                if r.frozen() {
                    if let Some(source) = self.wrote_to_frozen_source() {
                        // The cut-over waits for this transaction to end: waiting
                        // here would hold both up until the cut-over gives up.
                        return Err(Refusal::new(
                            sqlstate::SERIALIZATION_FAILURE,
                            format!(
                                "could not serialize access due to a concurrent cut-over: this transaction wrote to shard {source}, \
                                 the source of a key range frozen for a cut-over that waits for this transaction to end; roll back and retry"
                            ),
                        ));
                    }
                    self.park();
                }
                if wait.retry(r).await {
                    continue;
                }
            }
            return routed;
        }
    }

    /// Inside a REPEATABLE READ or SERIALIZABLE transaction, after a key
    /// range changed owner since its first statement: 40001. Its snapshot
    /// on the new owner may have been taken before the range's rows were
    /// there (a read would miss them); PostgreSQL's own answer to a
    /// conflicting concurrent change at these levels is the same error.
    /// READ COMMITTED takes a snapshot per statement: nothing to do.
    fn check_owner_change(&mut self, d: &Decision) -> Result<(), Refusal> {
        // Transaction control (ROLLBACK above all) is never refused here.
        if self.tx_status == b'I' || d.kind != Kind::Other {
            return Ok(());
        }
        let now = self.node.catalog.load_full();
        let Some(first) = &self.tx_routing else {
            self.tx_routing = Some(now);
            return Ok(());
        };
        if first.epoch() == now.epoch() || !self.snapshot_isolation() {
            return Ok(());
        }
        let moved = now.ranges().iter().find(|r| {
            let before = first.range_for_point(r.lo);
            before.read_owner != r.read_owner || before.write_owner != r.write_owner
        });
        match moved {
            None => Ok(()),
            Some(r) => Err(Refusal::new(
                sqlstate::SERIALIZATION_FAILURE,
                format!(
                    "could not serialize access due to a concurrent reshard: key range {} moved to shard {} \
                     during this REPEATABLE READ or SERIALIZABLE transaction; retry the transaction",
                    r.span(),
                    r.read_owner
                ),
            )),
        }
    }

    /// Whether the open transaction runs at REPEATABLE READ or SERIALIZABLE
    /// (as far as the node can tell: its BEGIN, a SET TRANSACTION in it, or
    /// the session's default).
    fn snapshot_isolation(&self) -> bool {
        let level = |t: &str| {
            let t = t.to_ascii_lowercase();
            t.contains("repeatable") || t.contains("serializable")
        };
        self.tx_snapshot_isolation
            || self.tx_begin.as_deref().is_some_and(level)
            || self
                .state
                .get("default_transaction_isolation")
                .is_some_and(level)
    }

    /// The name of a shard this open transaction wrote to that is the
    /// source (write owner) of a range frozen for a cut-over, if any.
    fn wrote_to_frozen_source(&self) -> Option<String> {
        if self.tx_status == b'I' || self.tx_writes.is_empty() {
            return None;
        }
        let snap = self.node.catalog.load();
        snap.ranges()
            .iter()
            .filter(|r| r.status == hotrepart_router::catalog::RangeStatus::Frozen)
            .find(|r| {
                self.node
                    .shard_index(r.write_owner.as_str())
                    .is_some_and(|t| self.tx_writes.contains(&t))
            })
            .map(|r| r.write_owner.to_string())
    }

    /// Pins the current routing table before routing (unless a pin of
    /// this session is held already: it covers what is still in flight).
    pub(crate) fn pin_routing(&mut self) {
        if self.pin.is_none() {
            self.pin = Some(self.node.pin());
        }
    }

    /// Before waiting out a freeze: with nothing owed nothing of this
    /// session is in flight, so it lets go of its pin — a fence must not
    /// wait for a session that itself waits for the fence's cut-over. It
    /// pins again (a newer table) when it routes after the wait.
    pub(crate) fn park(&mut self) {
        if self.owed.is_empty() {
            self.pin = None;
        }
    }

    async fn run_batch(&mut self, synced: bool) -> Result<(), SessionError> {
        self.settle_state().await?;
        self.ensure_namespace().await?;
        let frames = std::mem::take(&mut self.batch);
        let routed = self
            .route_waiting(|s| s.route_batch(&frames))
            .await
            .and_then(|(t, d)| match &d {
                Some(dd) => self.check_owner_change(dd).map(|()| (t, d)),
                None => Ok((t, d)),
            });
        let (target, mut d) = match routed {
            Ok(x) => x,
            Err(r) => {
                self.batch_error(&r, synced);
                return Ok(());
            }
        };
        if let Some(dd) = d.as_mut() {
            let first = target.unwrap_or_else(|| self.first_shard(dd));
            if let Err(r) = self.settle_calls(dd, first).await? {
                self.batch_error(&r, synced);
                return Ok(());
            }
        }
        // A batch without a statement (a lone Sync, Close …) belongs to the
        // current backend: it may owe its replies only after this Sync
        // (PostgreSQL sends an extended COPY's CommandComplete at Sync).
        let here = target.is_none() && d.is_none() && self.slots[self.cur].conn.is_some();
        if !self.owed.is_empty()
            && !here
            && (target.is_none_or(|t| t != self.cur)
                || d.as_ref().is_some_and(|d| d.kind != Kind::Other))
        {
            self.drain_owed().await?;
        }
        if let Some(d) = &d {
            if self.transaction_control(d, false, target).await? {
                if synced {
                    let status = self.client_status();
                    self.push_synthetic(rfq(status));
                    self.skip_to_sync = false;
                }
                return Ok(());
            }
        }
        if let Some(d) = d.as_ref().filter(|d| d.copy.is_some()) {
            let (d, ext) = (d.clone(), crate::exec::copy::Ext { frames, synced });
            return crate::exec::copy::run(self, &d, Some(ext)).await;
        }
        if let Some(d) = d
            .as_ref()
            .filter(|d| matches!(&d.target, Target::Multi { shards, .. } if shards.len() > 1))
        {
            if !self.owed.is_empty() {
                self.drain_owed().await?;
            }
            let d = d.clone();
            if let Err(r) = self.check_multi_shard(&d).await? {
                self.batch_error(&r, synced);
                return Ok(());
            }
            if let (Some(plan), Target::Multi { shards, sqls }) = (&d.merge, &d.target) {
                if let Err(r) = self.check_merged_write(&d, shards) {
                    self.batch_error(&r, synced);
                    return Ok(());
                }
                return crate::exec::merge::exec::run_extended(
                    self,
                    plan,
                    shards,
                    sqls.as_deref(),
                    frames,
                    synced,
                )
                .await;
            }
            return crate::exec::scatter::run_extended(self, &d, frames, synced).await;
        }
        // A lone Sync with nothing held: answer it here.
        if target.is_none()
            && !self.attached()
            && frames.iter().all(|f| f.tag() == b'S' || f.tag() == b'H')
        {
            if synced {
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
            return Ok(());
        }
        let t = target.unwrap_or_else(|| self.default_shard());
        if synced && self.parse_without_backend(&frames, t)? {
            return Ok(());
        }
        if t != self.cur && !self.owed.is_empty() {
            self.drain_owed().await?;
        }
        if let Some(d) = &d {
            if let Err(r) = self.check_write(d, t) {
                self.batch_error(&r, synced);
                return Ok(());
            }
        }
        if let Err(r) = self.switch_to(t).await? {
            self.batch_error(&r, synced);
            return Ok(());
        }
        if let Some(d) = &d {
            self.poison_if_failed(d, t).await;
        }
        for f in frames {
            if self.skip_to_sync && f.tag() != b'S' {
                continue;
            }
            let tag = f.tag();
            self.forward_extended(f, t)?;
            if tag == b'S' {
                self.skip_to_sync = false;
            }
        }
        // Until its Sync, an implicit transaction may be open on this
        // backend: it must not be pooled or left for another shard.
        if let Some(b) = self.slots[t].conn.as_mut() {
            b.unsynced = !synced;
        }
        Ok(())
    }

    /// A batch the node refuses: the error, and ReadyForQuery if it ended
    /// with Sync (else the rest up to Sync is skipped).
    fn batch_error(&mut self, r: &Refusal, synced: bool) {
        self.push_error(r);
        if synced {
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        } else {
            self.skip_to_sync = true;
        }
    }

    /// Decides the one shard of a batch (None: any shard will do) and the
    /// decision of its most significant statement.
    fn route_batch(&self, frames: &[Frame]) -> Result<(Option<usize>, Option<Decision>), Refusal> {
        if self.node.single_shard() {
            // Nothing to route; only LISTEN needs a look.
            for f in frames.iter().filter(|f| f.tag() == b'P') {
                let mut b = f.body();
                let _name = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                self.check_listen(wire::get_cstr(&mut b).map_err(proto_refusal)?)?;
            }
            return Ok((Some(0), None));
        }
        let mut target: Option<usize> = None;
        let mut strongest: Option<Decision> = None;
        let mut batch_unnamed: Option<Arc<str>> = None;
        let mut batch_named: HashMap<String, Arc<str>> = HashMap::new();
        let mut multi = false;
        let mut binds = 0;
        let mut any_write = false;
        let mut calls: Vec<String> = Vec::new();
        let mut changed_settings = false;
        let mut parse_target: Option<usize> = None;
        for f in frames {
            match f.tag() {
                b'P' => {
                    let mut b = f.body();
                    let name = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let sql = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    self.check_listen(sql)?;
                    // Routing errors surface at Bind (parameters may be
                    // missing here); PostgreSQL reports syntax errors at
                    // Parse itself. A statement whose shard is known without
                    // parameters (hints, undeclared tables) is prepared there.
                    match self.node.decide(sql, None, &self.route_ctx()) {
                        Err(r) if r.code == sqlstate::SYNTAX_ERROR => return Err(r),
                        Ok(Decision {
                            target: Target::Shard(t),
                            ..
                        }) => parse_target = parse_target.or(Some(t)),
                        _ => {}
                    }
                    if name.is_empty() {
                        batch_unnamed = Some(Arc::from(sql));
                    } else {
                        batch_named.insert(name.to_string(), Arc::from(sql));
                    }
                }
                b'B' => {
                    let mut b = f.body();
                    let _portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let stmt = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let sql = if stmt.is_empty() {
                        batch_unnamed
                            .clone()
                            .or_else(|| self.unnamed.as_ref().and_then(Unnamed::sql))
                    } else {
                        batch_named
                            .get(stmt)
                            .cloned()
                            .or_else(|| self.stmts.get(stmt).map(|s| s.sql.clone()))
                    };
                    // An unknown statement: PostgreSQL will say so.
                    let Some(sql) = sql else { continue };
                    binds += 1;
                    if changed_settings {
                        return Err(Refusal::new(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "a statement that changes search_path or standard_conforming_strings must be followed by Sync before the next statement: hotrepart routes a batch before it runs".into(),
                        ));
                    }
                    changed_settings = crate::routing::changes_routing_settings(&sql);
                    let params = BindParams::parse(b).map_err(proto_refusal)?;
                    let d = self.node.decide(&sql, Some(&params), &self.route_ctx())?;
                    let t = match &d.target {
                        Target::Shard(t) => Some(*t),
                        Target::Any => None,
                        Target::Multi { shards, .. } if shards.len() == 1 => Some(shards[0]),
                        Target::Multi { .. } => {
                            multi = true;
                            None
                        }
                    };
                    if let Some(t) = t {
                        if target.is_some_and(|x| x != t) {
                            return Err(Refusal::new(
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "statements of one pipelined batch (up to Sync) go to different shards; send a Sync between them".into(),
                            ));
                        }
                        target = Some(t);
                    }
                    any_write |= d.write;
                    for c in d.calls.iter() {
                        if !calls.contains(c) {
                            calls.push(c.clone());
                        }
                    }
                    if strongest.as_ref().is_none_or(|s| d.outranks(s)) {
                        strongest = Some(d);
                    }
                }
                _ => {}
            }
        }
        if multi && (binds > 1 || target.is_some()) {
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a pipelined batch (up to Sync) that holds a multi-shard statement must hold only that statement; send a Sync after it".into(),
            ));
        }
        let target = target.or(parse_target);
        // The batch runs on one shard: it writes there if any statement does.
        if let Some(d) = strongest.as_mut() {
            d.write |= any_write;
            d.calls = Arc::from(calls);
        }
        Ok((target, strongest))
    }

    /// Forwards one extended-protocol message to the current backend,
    /// renaming named statements.
    pub(crate) fn forward_extended(&mut self, f: Frame, t: usize) -> Result<(), SessionError> {
        self.forward_extended_as(f, t, None)
    }

    /// [`Self::forward_extended`], except that with `text` a Bind runs that
    /// statement text instead of the one the client prepared (same
    /// parameter types; prepared under the node's name for that text): a
    /// shard's own form of a multi-shard statement (`Target::Multi::sqls`).
    pub(crate) fn forward_extended_as(
        &mut self,
        f: Frame,
        t: usize,
        text: Option<&str>,
    ) -> Result<(), SessionError> {
        match f.tag() {
            b'P' => self.on_parse(f, t),
            b'B' if text.is_some() => {
                let mut b = f.body();
                let portal = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                let stmt = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                let rest = Bytes::copy_from_slice(b);
                let types = self.param_types(&stmt);
                let mut parse = BytesMut::new();
                wire::put_cstr(&mut parse, text.unwrap_or_default());
                parse.put_i16(types.len() as i16);
                for ty in &types {
                    parse.put_u32(*ty);
                }
                let internal = internal_name(&parse);
                if !self.backend_mut().prepared.contains(&internal) {
                    self.backend_mut().prepared.insert(internal.clone());
                    wire::frame(&mut self.to_backend, b'P', |o| {
                        wire::put_cstr(o, &internal);
                        o.put_slice(&parse);
                    });
                    self.owed.push_back(Owed::Parse {
                        hidden: true,
                        internal: Some(internal.clone()),
                        client: None,
                    });
                }
                wire::frame(&mut self.to_backend, b'B', |o| {
                    wire::put_cstr(o, &portal);
                    wire::put_cstr(o, &internal);
                    o.put_slice(&rest);
                });
                self.owed.push_back(Owed::Bind);
                Ok(())
            }
            b'B' => {
                let mut b = f.body();
                let portal = wire::get_cstr(&mut b).map_err(client_err)?;
                let stmt = wire::get_cstr(&mut b).map_err(client_err)?;
                if stmt.is_empty() {
                    self.ensure_unnamed(t);
                    self.to_backend.put_slice(&f.raw);
                } else {
                    let (portal, stmt, rest) = (
                        portal.to_string(),
                        stmt.to_string(),
                        Bytes::copy_from_slice(b),
                    );
                    // A statement prepared in an earlier transaction may
                    // change session state each time it runs.
                    if self.stmts.get(&stmt).is_some_and(|s| s.changes_state) {
                        self.state_dirty[t] = true;
                        self.state_stale = true;
                        self.prepared_dirty |=
                            self.stmts.get(&stmt).is_some_and(|s| s.drops_prepared);
                    }
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
                Ok(())
            }
            b'D' => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Describe"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                if kind == b'S' && !name.is_empty() {
                    match self.prepare_on_backend(&name) {
                        Some(internal) => wire::frame(&mut self.to_backend, b'D', |o| {
                            o.put_u8(b'S');
                            wire::put_cstr(o, &internal);
                        }),
                        None => self.to_backend.put_slice(&f.raw),
                    }
                } else {
                    if kind == b'S' {
                        self.ensure_unnamed(t);
                    }
                    self.to_backend.put_slice(&f.raw);
                }
                self.owed.push_back(Owed::Describe);
                Ok(())
            }
            b'E' => {
                self.to_backend.put_slice(&f.raw);
                self.owed.push_back(Owed::Execute);
                Ok(())
            }
            b'C' => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Close"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?;
                if kind == b'S' && !name.is_empty() {
                    // Node-named statements stay prepared on the backends
                    // (other clients may share them); the client's name goes.
                    let name = name.to_string();
                    self.push_synthetic_with(wire::close_complete(), Forget::OnSend(name));
                } else {
                    self.to_backend.put_slice(&f.raw);
                    self.owed.push_back(Owed::Close);
                }
                Ok(())
            }
            b'S' => {
                self.to_backend.put_slice(&f.raw);
                self.owed.push_back(Owed::Sync);
                Ok(())
            }
            b'H' => {
                self.to_backend.put_slice(&f.raw);
                Ok(())
            }
            other => Err(proto_fatal(format!(
                "unexpected message {:?} in batch",
                other as char
            ))),
        }
    }

    /// Prepares the client's unnamed statement on shard `t`'s backend if the
    /// last Parse went elsewhere.
    fn ensure_unnamed(&mut self, t: usize) {
        let Some(u) = self.unnamed.as_mut() else {
            return;
        };
        if u.on == Some(t) {
            return;
        }
        u.on = Some(t);
        let raw = u.raw.clone();
        self.to_backend.put_slice(&raw);
        self.owed.push_back(Owed::Parse {
            hidden: true,
            internal: None,
            client: None,
        });
    }

    fn on_parse(&mut self, f: Frame, t: usize) -> Result<(), SessionError> {
        let mut b = f.body();
        let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
        let rest = b; // query \0, int16 n, n × int32 types
        let mut q = rest;
        let sql = wire::get_cstr(&mut q).map_err(client_err)?;
        self.note_sql(sql, t);
        if name.is_empty() {
            self.unnamed = Some(Unnamed {
                raw: f.raw.clone(),
                on: Some(t),
            });
            self.to_backend.put_slice(&f.raw);
            self.owed.push_back(Owed::Parse {
                hidden: false,
                internal: None,
                client: None,
            });
            return Ok(());
        }
        let Some(internal) = self.register_stmt(name.clone(), rest, sql) else {
            self.skip_to_sync = true;
            return Ok(());
        };
        if self.backend_mut().prepared.contains(&internal) {
            self.push_synthetic_with(wire::parse_complete(), Forget::OnSkip(name));
        } else {
            self.prepare_on_backend(&name);
            // This ParseComplete answers the client's own Parse.
            if let Some(Owed::Parse { hidden, client, .. }) = self.owed.back_mut() {
                *hidden = false;
                *client = Some(name);
            }
        }
        Ok(())
    }

    /// Records the client's statement `name` (Parse body `rest` after the
    /// name, SQL `sql`) under its node name, which it returns; None (and an
    /// error queued) when the name is taken.
    fn register_stmt(&mut self, name: String, rest: &[u8], sql: &str) -> Option<String> {
        if self.stmts.contains_key(&name) {
            self.push_error(&Refusal::new(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            ));
            return None;
        }
        let internal = internal_name(rest);
        let mut parse = BytesMut::with_capacity(rest.len() + 20);
        wire::put_cstr(&mut parse, &internal);
        parse.put_slice(rest);
        self.stmts.insert(
            name,
            Stmt {
                internal: internal.clone(),
                parse: parse.freeze(),
                sql: Arc::from(sql),
                changes_state: state::may_change_state(sql),
                drops_prepared: state::may_drop_prepared(sql),
            },
        );
        Some(internal)
    }

    /// The client's Parse in a batch the merger answers itself, recorded as
    /// if a backend had parsed it: a named statement is prepared where it
    /// runs, the unnamed one again on the next backend that needs it.
    /// False: the name is taken (the error is queued).
    pub(crate) fn record_parse(&mut self, f: &Frame) -> Result<bool, SessionError> {
        let mut b = f.body();
        let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
        let rest = b;
        let mut q = rest;
        let sql = wire::get_cstr(&mut q).map_err(client_err)?;
        if name.is_empty() {
            self.unnamed = Some(Unnamed {
                raw: f.raw.clone(),
                on: None,
            });
            return Ok(true);
        }
        Ok(self.register_stmt(name, rest, sql).is_some())
    }

    /// Parameter type OIDs the client gave when it prepared `stmt` ("" is
    /// the unnamed statement).
    pub(crate) fn param_types(&self, stmt: &str) -> Vec<u32> {
        if stmt.is_empty() {
            return self
                .unnamed
                .as_ref()
                .and_then(|u| u.raw.get(5..))
                .map(crate::exec::merge::exec::parse_body_types)
                .unwrap_or_default();
        }
        self.stmts
            .get(stmt)
            .map(|s| crate::exec::merge::exec::parse_body_types(&s.parse))
            .unwrap_or_default()
    }

    /// The node parsed its own unnamed statement on these shards' backends.
    pub(crate) fn unnamed_replaced_on(&mut self, shards: &[usize]) {
        if let Some(u) = self.unnamed.as_mut() {
            if u.on.is_some_and(|t| shards.contains(&t)) {
                u.on = None;
            }
        }
    }

    /// A batch of named Parses and a Sync, outside a transaction, whose
    /// statements backends of shard `t`'s pool have all parsed before under
    /// the client's session state: answered here, without waiting for a
    /// backend. (pgbench -M prepared prepares synchronously in the thread
    /// that drives its other clients; waiting for a backend those clients
    /// hold would deadlock it.) The backend that later runs the statement
    /// prepares it first, so an error PostgreSQL would raise at Parse (say
    /// the table was dropped since) surfaces at Bind instead.
    fn parse_without_backend(&mut self, frames: &[Frame], t: usize) -> Result<bool, SessionError> {
        let Some((last, parses)) = frames.split_last() else {
            return Ok(false);
        };
        if self.tx_status != b'I'
            || self.attached()
            || !self.owed.is_empty()
            || last.tag() != b'S'
            || parses.is_empty()
        {
            return Ok(false);
        }
        let pool = self.pool(t);
        let mut todo = Vec::with_capacity(parses.len());
        for f in parses {
            if f.tag() != b'P' {
                return Ok(false);
            }
            let mut b = f.body();
            let name = wire::get_cstr(&mut b).map_err(client_err)?;
            let rest = b;
            let mut q = rest;
            let sql = wire::get_cstr(&mut q).map_err(client_err)?;
            if name.is_empty()
                || self.stmts.contains_key(name)
                || state::may_change_state(sql)
                || !pool.is_validated(&internal_name(rest), self.state_fp)
            {
                return Ok(false);
            }
            todo.push((name.to_string(), rest, sql));
        }
        for (name, rest, sql) in todo {
            if self.register_stmt(name, rest, sql).is_none() {
                // As PostgreSQL: the error, then nothing up to Sync.
                break;
            }
            self.push_synthetic(wire::parse_complete());
        }
        self.push_synthetic(rfq(b'I'));
        Ok(true)
    }

    fn check_listen(&self, sql: &str) -> Result<(), Refusal> {
        if !self.session_mode && starts_with_ci(sql.trim_start(), "listen") {
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "LISTEN is not supported in transaction pooling mode; use pool_mode = \"session\" for this user".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn note_sql(&mut self, sql: &str, shard: usize) {
        if state::may_change_state(sql) {
            let lower = sql.to_ascii_lowercase();
            if lower.contains("isolation")
                && (lower.contains("repeatable") || lower.contains("serializable"))
            {
                self.tx_snapshot_isolation = true;
            }
            self.state_dirty[shard] = true;
            self.state_stale = true;
            match state::custom_settings(sql) {
                Some(names) => self.custom_settings.extend(names),
                // A setting we cannot name cannot be read back: this
                // backend is closed instead of pooled.
                None => {
                    if let Some(b) = self.slots[shard].conn.as_mut() {
                        b.broken = true;
                    }
                }
            }
        }
        if state::may_drop_prepared(sql) {
            self.prepared_dirty = true;
        }
    }

    pub(crate) async fn on_backend_frame(&mut self, f: Frame) -> Result<(), SessionError> {
        let tag = f.tag();
        if self.gather.is_some() && self.gathered(&f) {
            return Ok(());
        }
        let mut forward = true;
        match tag {
            b'1' => {
                if let Some(Owed::Parse {
                    hidden, internal, ..
                }) = self.owed.front()
                {
                    forward = !*hidden;
                    let cur = self.cur;
                    if let (Some(internal), Some(b), false) =
                        (internal, &self.slots[cur].conn, self.state_dirty[cur])
                    {
                        b.pool().mark_validated(internal, b.state_fp);
                    }
                    self.owed.pop_front();
                }
            }
            b'2' => self.pop_if(|o| matches!(o, Owed::Bind)),
            b'3' => self.pop_if(|o| matches!(o, Owed::Close)),
            b'T' | b'n' => self.pop_if(|o| matches!(o, Owed::Describe)),
            b'C' | b'I' | b's' => self.pop_if(|o| matches!(o, Owed::Execute)),
            b'E' => self.on_backend_error(),
            b'G' => {
                // PostgreSQL ignores Sync received in copy-in mode, and
                // drivers do send one right after the Execute that starts
                // COPY (tokio-postgres does): those already sent are not owed.
                if matches!(self.owed.front(), Some(Owed::Execute | Owed::Query)) {
                    let mut first = true;
                    self.owed
                        .retain(|o| std::mem::take(&mut first) || !matches!(o, Owed::Sync));
                }
            }
            b'Z' => {
                self.pop_if(|o| matches!(o, Owed::Sync | Owed::Query | Owed::FunctionCall));
                let s = f.body().first().copied().unwrap_or(b'I');
                let cur = self.cur;
                if let Some(b) = self.slots[cur].conn.as_mut() {
                    b.status = s;
                }
                self.tx_status = s;
                if s == b'I' {
                    self.tx_failed = false;
                }
            }
            _ => {}
        }
        if forward {
            if tag == b'Z' && self.tx_failed && self.tx_status != b'I' {
                // The node failed this transaction: the client must see 'E'.
                self.out.put_slice(&rfq(b'E'));
            } else {
                self.out.put_slice(&f.raw);
            }
        }
        self.emit_synthetic();
        if tag == b'Z' && self.owed.is_empty() && self.tx_status == b'I' {
            self.end_of_transaction().await?;
        }
        Ok(())
    }

    /// While a multi-shard extended statement runs (see `scatter`), the
    /// first shard's replies pass through here: its CommandComplete, errors
    /// and ReadyForQuery are collected instead of forwarded. True: consumed.
    fn gathered(&mut self, f: &Frame) -> bool {
        let executing = matches!(self.owed.front(), Some(Owed::Execute));
        let Some(g) = self.gather.as_mut() else {
            return false;
        };
        match f.tag() {
            b'C' | b's' | b'I' if executing => {
                if f.tag() == b'C' {
                    let mut b = f.body();
                    g.tags
                        .push(wire::get_cstr(&mut b).unwrap_or("").to_string());
                } else if f.tag() == b'I' {
                    g.empty = true;
                }
                self.owed.pop_front();
                self.emit_synthetic();
                true
            }
            b'E' => {
                if g.error.is_none() {
                    g.error = Some(wire::parse_error_fields(f.body()));
                }
                self.on_backend_error();
                true
            }
            b'D' => g.error.is_some(),
            b'Z' => {
                g.status = f.body().first().copied().unwrap_or(b'I');
                self.pop_if(|o| matches!(o, Owed::Sync));
                true
            }
            _ => false,
        }
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
                    match self.owed.pop_front() {
                        Some(Owed::Parse {
                            internal: Some(name),
                            client,
                            ..
                        }) => {
                            // Not prepared on this backend after all; a
                            // client's own Parse that never ran leaves no
                            // statement behind, a hidden re-Parse does not
                            // touch the client's name.
                            let cur = self.cur;
                            if let Some(b) = self.slots[cur].conn.as_mut() {
                                b.prepared.remove(&name);
                            }
                            if let Some(c) = client {
                                self.stmts.remove(&c);
                            }
                        }
                        Some(Owed::Synthetic {
                            forget: Forget::OnSkip(c),
                            ..
                        }) => {
                            self.stmts.remove(&c);
                        }
                        Some(Owed::Parse { internal: None, .. }) => {
                            if let Some(u) = self.unnamed.as_mut() {
                                u.on = None;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn emit_synthetic(&mut self) {
        while let Some(Owed::Synthetic { .. }) = self.owed.front() {
            if let Some(Owed::Synthetic { frame, forget }) = self.owed.pop_front() {
                self.out.put_slice(&frame);
                if let Forget::OnSend(name) = forget {
                    self.stmts.remove(&name);
                }
            }
        }
    }

    /// ReadyForQuery(idle) with nothing owed: read back session state if it
    /// may have changed, then return the backends (transaction mode).
    /// Reads the session state of shard `i`'s backend (where a SET may have
    /// run) and makes it the client's; the backend is labelled with it.
    async fn refresh_state_from(&mut self, i: usize) {
        let sql = state::read_state_sql(&self.custom_settings);
        let Some(b) = self.slots[i].conn.as_mut() else {
            return;
        };
        match b.hidden_query(&sql).await {
            Ok(rows) => {
                let pairs = rows
                    .into_iter()
                    .filter_map(|r| match (r.first(), r.get(1)) {
                        // A custom setting that was RESET reads as '' (it stays
                        // defined): the same as never set.
                        (Some(Some(k)), Some(Some(v)))
                            if !(v.is_empty() && self.custom_settings.contains(k)) =>
                        {
                            Some((k.clone(), v.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                self.state = SessionState::from_pairs(pairs);
                self.state_fp = self.state.fingerprint();
                b.state_fp = self.state_fp;
                self.state_stale = false;
                // Read inside a transaction, the state may still change at
                // its end (a ROLLBACK undoes a SET): read it again then.
                if b.status == b'I' {
                    self.state_dirty[i] = false;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read session state back");
                b.broken = true;
            }
        }
    }

    /// ReadyForQuery(idle) with nothing owed: end what other shards still
    /// hold open (they were only read: one written shard per transaction),
    /// read back session state where it may have changed, then return the
    /// backends (transaction mode).
    pub(crate) async fn end_of_transaction(&mut self) -> Result<(), SessionError> {
        self.reset_tx();
        for i in 0..self.slots.len() {
            if let Some(b) = self.slots[i].conn.as_mut() {
                if b.status != b'I' && !b.unsynced {
                    if let Err(e) = b.hidden_query("ROLLBACK").await {
                        tracing::warn!(error = %e, shard = i, "rolling back a read-only shard failed");
                        b.broken = true;
                    }
                }
            }
            if self.state_dirty[i] {
                self.refresh_state_from(i).await;
            }
        }
        if self.prepared_dirty {
            for slot in &mut self.slots {
                if let Some(b) = slot.conn.as_mut() {
                    match b
                        .hidden_query("SELECT name FROM pg_catalog.pg_prepared_statements")
                        .await
                    {
                        Ok(rows) => {
                            b.prepared = rows
                                .into_iter()
                                .filter_map(|r| r.into_iter().next().flatten())
                                .collect();
                        }
                        Err(_) => b.broken = true,
                    }
                }
            }
            self.prepared_dirty = false;
        }
        if !self.session_mode {
            for slot in &mut self.slots {
                if let Some(b) = slot.conn.take() {
                    // Closed instead when not idle and synced.
                    b.release();
                }
            }
            if let Some(u) = self.unnamed.as_mut() {
                u.on = None;
            }
            self.update_cancel();
        }
        Ok(())
    }
}

/// Runs `f`, turning a panic inside it into `Err(message)`.
pub(crate) async fn catch_panic<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string())
        })
}

/// Extended-protocol messages held before routing, at most.
const MAX_BATCH: usize = 1024;

const POISON_SQL: &str =
    "DO $$BEGIN RAISE EXCEPTION 'hotrepart: this transaction failed at the node'; END$$";

/// What the node learns of a shard's database on attach: whether text
/// orders bytewise there (database collation C/POSIX and no user column with
/// another collation).
const CATALOG_PROBE: &str = "SELECT d.datcollate IN ('C', 'POSIX') AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid >= 16384 AND a.attnum > 0 AND NOT a.attisdropped AND a.attcollation NOT IN (0, 100, 950, 951)) FROM pg_catalog.pg_database d WHERE d.datname = current_database()";

/// The first of `tables` (lower-case names) that `src`, a function body,
/// names as a whole word (case-insensitive; a mention in a comment or a
/// string counts too: refusing too much is safe).
fn names_table(src: &str, tables: &[String]) -> Option<String> {
    let lower = src.to_ascii_lowercase();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    tables
        .iter()
        .find(|t| {
            lower.match_indices(t.as_str()).any(|(i, _)| {
                let b = lower.as_bytes();
                let before = i.checked_sub(1).map(|j| b[j]);
                let after = b.get(i + t.len()).copied();
                !before.is_some_and(word) && !after.is_some_and(word)
            })
        })
        .cloned()
}

/// The names `sql` calls as functions (followed by `(`, outside literals,
/// quoted names and comments; lower case) that the router does not know as
/// aggregates: candidates for a user-defined aggregate.
pub(crate) fn called_names(sql: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let b = sql.as_bytes();
    let mut i = 0;
    let mut last_word: Option<String> = None;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                last_word = None;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                last_word = Some(String::from_utf8_lossy(&b[start..i.min(b.len())]).into_owned());
            }
            b'(' => {
                if let Some(w) = last_word.take() {
                    if !hotrepart_router::route::is_known_aggregate(&w) && !out.contains(&w) {
                        out.push(w);
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$')
                {
                    i += 1;
                }
                last_word = Some(String::from_utf8_lossy(&b[start..i]).to_ascii_lowercase());
                continue;
            }
            c if c.is_ascii_whitespace() || c == b'.' => {}
            _ => last_word = None,
        }
        i += 1;
    }
    out
}

/// The node's name for a statement: a hash of its Parse body after the
/// client's name (SQL text and parameter types), so that clients preparing
/// the same statement share it on a backend.
fn internal_name(rest: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rest.hash(&mut h);
    format!("hr_{:016x}", h.finish())
}

fn starts_with_ci(s: &str, p: &str) -> bool {
    s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
}

fn client_err(e: WireError) -> SessionError {
    match e {
        WireError::Closed | WireError::Io(_) => SessionError::ClientGone,
        WireError::Protocol(m) => proto_fatal(m),
    }
}

fn proto_refusal(e: WireError) -> Refusal {
    Refusal::new(
        sqlstate::PROTOCOL_VIOLATION,
        format!("protocol violation: {e}"),
    )
}

fn proto(m: &str) -> SessionError {
    proto_fatal(m.to_string())
}

fn proto_fatal(msg: String) -> SessionError {
    SessionError::Fatal {
        code: sqlstate::PROTOCOL_VIOLATION,
        msg: format!("protocol violation: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_session_future_is_caught() {
        let r = catch_panic(async {
            let s = "SELECT\u{a0}1";
            // The original defect: slicing inside a multi-byte character.
            s.get(..7)
                .map(str::len)
                .unwrap_or_else(|| panic!("byte 7 of {s:?}"))
        })
        .await;
        assert_eq!(r, Err("byte 7 of \"SELECT\\u{a0}1\"".to_string()));
        assert_eq!(catch_panic(async { 5 }).await, Ok(5));
    }
}
