//! The session's state and its lowest plumbing: the client connection
//! and what is queued for it, the backend slots, the replies owed, the
//! open transaction's bookkeeping. Everything else of the session (and
//! the executors in `crate::exec`) builds on this; it imports none of them.

use crate::backend::conn::BackendConn;
use crate::backend::pool::{Pool, Pooled};
use crate::backend::state::{self, SessionState};
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::node::{CancelSlot, Node};
use crate::routing::Decision;
use crate::wire::encoding::ClientEncoding;
use crate::wire::rfq;
use crate::wire::{self, Frame, FrameReader, Severity, WireError};
use crate::wire::{fe, tx};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

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
    /// BindComplete; with what turns the OIDs inside the binary values of
    /// the rows its Execute brings into the home shard's (`type_oids.rs`).
    Bind(Option<Box<super::type_oids::RowFix>>),
    /// RowDescription/NoData. For a statement: its Parse (the named
    /// statement's body, the unnamed one's message), under which its
    /// ParameterDescription's types are noted (`type_oids.rs`).
    Describe(Option<Bytes>),
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
    /// A ParseComplete or BindComplete of the node's own hidden statement
    /// ([`Session::fail_pipeline`]): not shown to the client.
    Hidden,
    /// The ErrorResponse the node's failing statement provokes: not shown
    /// to the client; the backend then skips to Sync, and so does the queue.
    Poison,
    /// The ReadyForQuery of a Sync the node sent itself: not shown.
    HiddenSync,
    /// The CloseComplete of a statement the node closes on the backend to
    /// keep it within `server_prepared_statements`: not shown. Skipped
    /// after an error, the statement stays prepared there (and known).
    Closing(String),
}

/// When a synthetic reply drops a client statement name.
#[derive(Debug, Clone)]
pub(crate) enum Forget {
    Nothing,
    OnSend(String),
    OnSkip(String),
}

/// A client's named prepared statement.
pub(super) struct Stmt {
    pub(super) internal: String,
    /// Body of a Parse message under the internal name.
    pub(super) parse: Bytes,
    pub(super) sql: Arc<str>,
    /// Running it may change session state / drop prepared statements.
    pub(super) changes_state: bool,
    pub(super) drops_prepared: bool,
    /// What it may do to temporary objects each time it runs.
    pub(super) temp: super::temp::TempClass,
    /// It is DDL: each run changes the schema (`note_ddl`).
    pub(super) schema_change: bool,
}

/// The client's unnamed statement: kept so that it can be prepared again on
/// another shard's backend when a later Bind goes there.
pub(super) struct Unnamed {
    /// The Parse message as the client sent it.
    pub(super) raw: Bytes,
    /// Shard whose current backend has it.
    pub(super) on: Option<usize>,
    /// What running it may do to the session (as a named statement's
    /// `Stmt` keeps it): each Bind of it counts, not only its Parse.
    pub(super) changes_state: bool,
    pub(super) drops_prepared: bool,
    pub(super) temp: super::temp::TempClass,
    pub(super) schema_change: bool,
}

impl Unnamed {
    pub(super) fn new(
        raw: Bytes,
        on: Option<usize>,
        class: &hotrepart_router::classify::Class<'_>,
    ) -> Self {
        Unnamed {
            raw,
            on,
            changes_state: class.changes_state,
            drops_prepared: class.drops_prepared,
            temp: super::temp::TempClass::of(class),
            schema_change: class.schema_change,
        }
    }

    /// Its SQL text (read from the Parse message when routing needs it).
    pub(super) fn sql(&self) -> Option<Arc<str>> {
        let mut b = self.raw.get(5..)?;
        let _name = wire::get_cstr(&mut b).ok()?;
        wire::get_cstr(&mut b).ok().map(Arc::from)
    }
}

/// One shard's side of the session.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) pool: Option<Arc<Pool>>,
    /// The backend attached while a transaction (or replies) are open.
    pub(crate) conn: Option<Pooled>,
    /// A backend the session keeps between its transactions instead of
    /// returning it to the pool (it holds the session's temporary
    /// objects: `session/temp.rs`); idle, synced, outside a transaction.
    /// The next statement for the shard attaches it again
    /// (`Session::ensure_backend`), as a checkout from the pool would.
    pub(crate) kept: Option<Pooled>,
}

/// Backend slots a session keeps beyond the shards the node knows of; see
/// `Session::ensure_slots`.
pub(super) const SLOT_HEADROOM: usize = 8;

/// The session's backend side: a slot per shard (its pool and, while
/// attached, its backend), the shard that receives forwarded frames, what
/// is queued for the backends and the replies they (or the node) owe the
/// client, in order.
pub(crate) struct Backends {
    pub(crate) slots: Vec<Slot>,
    /// Shard whose backend receives forwarded frames and owes the replies.
    pub(crate) cur: usize,
    pub(crate) to_backend: BytesMut,
    pub(crate) owed: VecDeque<Owed>,
    /// Held from routing until the session has the answers of what it
    /// routed (`owed` empty after a batch): see [`RoutingState::pin`](crate::routing::state::RoutingState::pin).
    pub(crate) pin: Option<crate::routing::state::EpochPin>,
    /// Where the node's cancel requests find the attached backends.
    cancel: Arc<CancelSlot>,
    /// `server_silence_timeout_ms` as of the session's latest step (None:
    /// 0, never).
    pub(crate) silence: Option<std::time::Duration>,
}

impl Backends {
    /// What SHOW CLIENTS shows of this session (None in unit tests).
    pub(crate) fn client_info(&self) -> Option<&crate::node::ClientInfo> {
        self.cancel.info.get()
    }

    fn new(nshards: usize, home: usize, cancel: Arc<CancelSlot>) -> Self {
        Backends {
            cancel,
            slots: (0..nshards).map(|_| Slot::default()).collect(),
            cur: home,
            to_backend: BytesMut::with_capacity(8192),
            owed: VecDeque::new(),
            pin: None,
            silence: None,
        }
    }

    /// Shard `shard`'s backend sent nothing for `server_silence_timeout_ms`
    /// while owing answers: it is taken for stalled and closed (not
    /// pooled: whatever it runs is rolled back by PostgreSQL when it
    /// notices), and the session ends.
    pub(crate) fn silent(&mut self, shard: usize) -> SessionError {
        let name = self.slots[shard]
            .conn
            .as_ref()
            .map_or_else(|| format!("#{shard}"), |b| b.shard().to_string());
        let ms = self.silence.map_or(0, |d| d.as_millis());
        tracing::warn!(shard = %name, silent_ms = ms, "shard sent nothing within server_silence_timeout_ms; its connection is closed");
        if let Some(b) = self.slots[shard].conn.as_mut() {
            b.broken = true;
        }
        self.slots[shard].conn = None;
        self.clear_cancel();
        SessionError::Fatal {
            code: sqlstate::CONNECTION_FAILURE,
            msg: format!(
                "shard {name} sent nothing for {ms} ms (server_silence_timeout_ms): its connection was closed; the transaction, if any, was rolled back"
            ),
        }
    }

    /// Some shard's backend is attached to the session.
    pub(crate) fn attached(&self) -> bool {
        self.slots.iter().any(|s| s.conn.is_some())
    }

    /// Some backend is attached or kept between transactions: the session
    /// holds a server connection (PAUSE lets it go on).
    pub(crate) fn holds(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.conn.is_some() || s.kept.is_some())
    }

    pub(crate) fn attached_count(&self) -> usize {
        self.slots.iter().filter(|s| s.conn.is_some()).count()
    }

    /// Some backend has messages up to a Flush but no Sync yet: no hidden
    /// query can run on the session's backends now.
    pub(crate) fn mid_pipeline(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.conn.as_ref().is_some_and(|b| b.unsynced))
    }

    /// The current shard's backend. Called only after the session
    /// attached it (`switch_to` succeeded).
    pub(crate) fn current_mut(&mut self) -> &mut BackendConn {
        let cur = self.cur;
        self.slots[cur]
            .conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!())
    }

    /// Publishes the attached backends' cancel keys (for a cancel request
    /// of the client).
    pub(crate) fn update_cancel(&self) {
        self.cancel.set(self.slots.iter().filter_map(|s| {
            s.conn.as_ref().map(|b| crate::node::CancelTarget {
                addr: b.addr,
                pid: b.pid,
                secret: b.secret,
                gate: b.cancel_gate.clone(),
            })
        }));
    }

    /// No backend may be cancelled for this client any more.
    pub(crate) fn clear_cancel(&self) {
        self.cancel.set(std::iter::empty());
    }

    /// Shard `shard`'s backend failed (`e`): dropped, and the session ends
    /// with the error returned.
    pub(crate) fn lost(&mut self, shard: usize, e: WireError) -> SessionError {
        tracing::warn!(error = %e, shard, "backend connection lost");
        self.slots[shard].conn = None;
        self.clear_cancel();
        SessionError::Fatal {
            code: sqlstate::CONNECTION_FAILURE,
            msg: "server connection lost; the transaction, if any, was rolled back".into(),
        }
    }
}

/// The client's transaction as the node keeps it.
#[derive(Default)]
pub(crate) struct Txn {
    /// Transaction status as the backends reported it (ReadyForQuery).
    pub(crate) status: TxStatus,
    /// The client's BEGIN, replayed on shards that join the transaction.
    pub(crate) begin: Option<String>,
    /// The shards this transaction has written to, in order of first write.
    pub(crate) writes: Vec<usize>,
    /// The node refused a statement inside the transaction: like PostgreSQL
    /// after an error, only ROLLBACK (or COMMIT, which rolls back) is left.
    pub(crate) failed: bool,
    /// The routing table of the open transaction's first routed statement:
    /// a REPEATABLE READ or SERIALIZABLE transaction must not outlive a
    /// range's change of owner (its snapshot on the new owner may predate
    /// the range's rows there).
    pub(crate) routing: Option<Arc<hotrepart_router::catalog::RoutingSnapshot>>,
    /// The open transaction asked for REPEATABLE READ or SERIALIZABLE
    /// (`SET TRANSACTION …`, `SET SESSION CHARACTERISTICS …`).
    pub(crate) snapshot_isolation: bool,
    /// The shard where a statement of the transaction used a temporary
    /// object (`session/temp.rs`): PostgreSQL cannot PREPARE it there.
    pub(crate) temp_used_on: Option<usize>,
    /// DDL ran on several shards in it (or in the statement the node wraps
    /// in a transaction of its own): before its two-phase commit the node
    /// checks the unique indexes of sharded tables (`exec/unique.rs`).
    pub(crate) schema_changed: bool,
    /// The savepoints open in it, oldest first: (name as written, name as
    /// PostgreSQL folds it). A shard that joins the transaction takes them
    /// after its BEGIN, and savepoint statements run on every shard of the
    /// transaction (`session/txn.rs`, `savepoint_on_every_shard`).
    pub(crate) savepoints: Vec<(String, String)>,
}

/// A transaction status of ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TxStatus {
    #[default]
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    /// From ReadyForQuery's status byte (anything unknown counts as in a
    /// transaction: the safe reading).
    pub(crate) fn from_byte(b: u8) -> Self {
        match b {
            tx::IDLE => TxStatus::Idle,
            tx::FAILED => TxStatus::Failed,
            _ => TxStatus::InTransaction,
        }
    }

    /// ReadyForQuery's status byte.
    pub(crate) fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => tx::IDLE,
            TxStatus::InTransaction => tx::IN_TRANSACTION,
            TxStatus::Failed => tx::FAILED,
        }
    }
}

impl Txn {
    /// A transaction block is open.
    pub(crate) fn open(&self) -> bool {
        self.status != TxStatus::Idle
    }

    /// The status the client sees: failed after the node refused a
    /// statement inside the transaction.
    pub(crate) fn client_status(&self) -> TxStatus {
        if self.open() && self.failed {
            TxStatus::Failed
        } else {
            self.status
        }
    }

    /// The transaction ended: everything of it forgotten.
    pub(crate) fn reset(&mut self) {
        *self = Txn::default();
    }

    /// Records that the transaction writes to shard `t`.
    pub(crate) fn note_write(&mut self, t: usize) {
        if !self.writes.contains(&t) {
            self.writes.push(t);
        }
    }
}

pub struct Session<S> {
    pub(crate) node: Arc<Node>,
    pub(crate) client: FrameReader<S>,
    /// What is queued for the client.
    pub(crate) out: BytesMut,
    pub(crate) be: Backends,
    pub(crate) txn: Txn,
    pub(super) database: String,
    pub(super) session_mode: bool,
    pub(super) stmts: HashMap<String, Stmt>,
    /// While the node runs a subquery first (`session/first.rs`): its
    /// replies are kept in `out`, not sent.
    pub(super) capture: Option<super::first::Capture>,
    /// How many statements deep subqueries are being run first.
    pub(super) first_depth: u8,
    /// Where in `out` the ParseComplete of the node's own Parse may come
    /// (`session/first.rs`): dropped at the next flush.
    pub(super) hide_parse_complete: Option<usize>,
    /// Columns of sharded tables, in order, read for INSERTs without a
    /// column list (`session/computed.rs`): by (table as written,
    /// namespace id, catalog generation).
    pub(super) table_columns: HashMap<(String, u64, u64), Arc<[String]>>,
    /// The declared sharded table of INSERT texts (`session/key_default.rs`),
    /// with the namespace id and catalog generation it was read under.
    pub(super) insert_tables: HashMap<Arc<str>, (u64, u64, Option<String>)>,
    /// Extended-protocol INSERT texts and what the node fills in them
    /// (`session/key_default.rs`), by text.
    pub(super) key_fills: HashMap<Arc<str>, super::key_default::FillEntry>,
    pub(super) unnamed: Option<Unnamed>,
    /// Extended-protocol messages waiting for their Sync or Flush.
    pub(super) batch: Vec<Frame>,
    pub(super) state: SessionState,
    pub(super) state_fp: u64,
    /// Shard of a backend whose transaction may have changed session state.
    pub(super) state_dirty: Vec<bool>,
    /// A statement that may change settings was sent since `state` was
    /// last read: routing must not trust `state` (search_path,
    /// standard_conforming_strings) until it is read again.
    pub(super) state_stale: bool,
    /// A statement sent with Flush and not yet synced may have changed
    /// `search_path` or `standard_conforming_strings`: read back only once
    /// its pipeline is synced ([`Session::settle_pipeline`]).
    pub(super) unsynced_settings: bool,
    /// What the statements sent since the last Sync did to the
    /// transaction block (`BEGIN` bound: true; `COMMIT`/`ROLLBACK`:
    /// false), which the node learns from PostgreSQL only at the Sync.
    pub(super) unsynced_block: Option<bool>,
    /// A portal over several shards was bound outside a transaction block
    /// with Flush (pg-cursor, node-postgres's streams): the client's
    /// implicit transaction, which the node holds open on the shards as a
    /// transaction of its own until the client's Sync
    /// (`session/cursor.rs` `end_implicit_portal`).
    pub(super) implicit_portal: bool,
    /// The server's `standard_conforming_strings` at login.
    pub(super) server_scs: bool,
    /// Where unqualified names resolve, and what it was read under
    /// (search_path setting, routing table epoch, the node's
    /// catalog generation).
    pub(super) ns: Arc<hotrepart_router::route::Namespace>,
    /// `ns` without the session's temporary relations (shared with the
    /// other sessions of the user and database).
    pub(super) ns_base: Arc<hotrepart_router::route::Namespace>,
    pub(super) ns_under: Option<(Option<String>, u64, u64)>,
    /// `ns_base` was read in a transaction that ran DDL
    /// ([`ProbeAt::Private`](super::attach::ProbeAt)): read again after it.
    pub(super) ns_private: bool,
    /// Custom settings (`app.name`) the client has set, read back with
    /// the others.
    pub(super) custom_settings: std::collections::BTreeSet<String>,
    /// ... or dropped prepared statements (DISCARD/DEALLOCATE).
    pub(super) prepared_dirty: bool,
    /// After an error the node raised itself in an extended-protocol batch,
    /// client messages are skipped until Sync.
    pub(crate) skip_to_sync: bool,
    pub(super) user: String,
    /// Set while a multi-shard extended statement is gathered.
    pub(crate) gather: Option<Gather>,
    /// While a non-home shard sends rows whose binary values embed type
    /// OIDs: what turns them into the home shard's (`type_oids.rs`).
    pub(crate) row_fix: Option<super::type_oids::RowFix>,
    /// Parameter types PostgreSQL gave (ParameterDescription) to statements
    /// whose Parse left them unspecified, where they name user types.
    pub(crate) described: super::type_oids::Described,
    /// DDL was sent: once its replies are in (and its transaction ended),
    /// the node's catalog generation is bumped again, so that statements
    /// other sessions parsed while it ran are not reused.
    pub(super) ddl_sent: bool,
    /// ReadyForQuery messages still to come from the backends before the
    /// DDL noted last has surely run (its own is one of the last two):
    /// a pipeline's transaction that ends at one of them records the
    /// schema change before the client reads it (`replies.rs`).
    pub(super) ddl_syncs: usize,
    /// The session listens (LISTEN under transaction pooling): its
    /// membership in the node's listeners, created at the first LISTEN.
    pub(super) listener: Option<crate::backend::notify::Listener>,
    /// The session's side of its database's counters (`SHOW STATS`).
    pub(crate) stats: crate::stats::Tracker,
    /// The client batch being handled waited for RESUME: until when it
    /// may wait in all (`None` inside: no limit).
    pub(super) pause_deadline: Option<Option<tokio::time::Instant>>,
    /// Set while a part of a client batch cut at a multi-shard statement
    /// runs (`Session::run_parts`), or a query string runs statement by
    /// statement (`Session::run_script`).
    pub(crate) part: Option<Part>,
    /// Routing asked for the batch held to be cut at a multi-shard
    /// statement (`Session::run_batch`).
    pub(super) cut_wanted: bool,
    /// Protocol portals bound by earlier batches of the transaction, and
    /// where (`Session::note_portals`): an Execute, Describe or Close of
    /// one in a later batch goes where it is.
    pub(super) portals: super::extended::Portals,
    /// The session's temporary objects: where they are, their names
    /// (`session/temp.rs`).
    pub(crate) temp: super::temp::TempObjects,
    /// The session's cursors: where they are (`session/cursor.rs`).
    pub(crate) cursors: super::cursor::Cursors,
    /// The client's `client_encoding` as PostgreSQL last reported it: how
    /// the node reads the strings of its messages and writes its own
    /// errors (`wire::encoding`; backends convert everything else).
    pub(crate) enc: ClientEncoding,
}

/// A part of a client batch that the node cut at a multi-shard statement,
/// while it runs: it ends with a Sync of the node's, whose ReadyForQuery
/// the client must not see, and an error in it skips the rest of the
/// client's batch. Its replies start at `from` in the client output. Also
/// a statement of a simple-Query string run statement by statement
/// (`session/script.rs`).
#[derive(Debug, Default)]
pub(crate) struct Part {
    pub(crate) from: usize,
    pub(crate) failed: bool,
    /// Drop CommandComplete too: the statement running is the node's own
    /// (the COMMIT or ROLLBACK that ends a query string's implicit
    /// transaction block, `session/script.rs`).
    pub(crate) hide_complete: bool,
    /// Show its ReadyForQuery (a SQL PREPARE/EXECUTE run as a batch of
    /// the node's, outside a query string run statement by statement).
    pub(crate) keep_ready: bool,
    /// The replies of a SQL PREPARE/EXECUTE run as protocol messages,
    /// shown as the simple protocol's (`session/sql_prepare.rs`).
    pub(crate) sql_reply: Option<SqlReply>,
}

/// Which SQL statement a batch of the node's stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SqlReply {
    /// `PREPARE`: ParseComplete shows as CommandComplete `PREPARE`.
    Prepare,
    /// `EXECUTE`: BindComplete and NoData are not shown.
    Execute,
}

/// What a multi-shard extended statement's first shard answered.
#[derive(Default, Debug)]
pub(crate) struct Gather {
    /// Some: the first shard's DataRows are kept here, not sent (a split
    /// INSERT's `RETURNING`, put in order by `exec::scatter::RowOrder`).
    pub(crate) rows: Option<Vec<bytes::Bytes>>,
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
        let enc = ClientEncoding::for_name(state.get("client_encoding").unwrap_or("UTF8"));
        let nshards = node.routing.shard_slots() + SLOT_HEADROOM;
        let home = node.routing.home_index();
        let stats =
            crate::stats::Tracker::new(node.stats.db(&database), node.stats.requests.clone());
        Session {
            stats,
            pause_deadline: None,
            node,
            client,
            out: BytesMut::with_capacity(8192),
            be: Backends::new(nshards, home, cancel),
            txn: Txn::default(),
            database,
            session_mode,
            stmts: HashMap::new(),
            capture: None,
            first_depth: 0,
            hide_parse_complete: None,
            table_columns: HashMap::new(),
            insert_tables: HashMap::new(),
            key_fills: HashMap::new(),
            unnamed: None,
            batch: Vec::new(),
            state,
            state_fp,
            state_dirty: vec![false; nshards],
            state_stale: false,
            unsynced_settings: false,
            unsynced_block: None,
            implicit_portal: false,
            server_scs: true,
            ns: Arc::default(),
            ns_base: Arc::default(),
            ns_under: None,
            ns_private: false,
            custom_settings: Default::default(),
            prepared_dirty: false,
            skip_to_sync: false,
            user,
            gather: None,
            row_fix: None,
            described: Default::default(),
            ddl_sent: false,
            ddl_syncs: 0,
            listener: None,
            part: None,
            cut_wanted: false,
            portals: Default::default(),
            temp: Default::default(),
            cursors: Default::default(),
            enc,
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

    /// Grows the backend slots when the routing table gained shards. Done
    /// before each client batch is routed, with headroom: a decision can
    /// only name a shard added between this call and the routing (a
    /// replicated catalog change, not a per-statement event), so
    /// [`SLOT_HEADROOM`] more slots than the node has handed out cover it.
    pub(super) fn ensure_slots(&mut self) {
        let n = self.node.routing.shard_slots() + SLOT_HEADROOM;
        if self.be.slots.len() < n {
            self.be.slots.resize_with(n, Slot::default);
            self.state_dirty.resize(n, false);
        }
    }

    /// What routing needs of this session.
    pub(crate) fn route_ctx(&self) -> crate::routing::RouteCtx<'_> {
        crate::routing::RouteCtx {
            state: &self.state,
            stale: self.state_stale,
            server_scs: self.server_scs,
            ns: &self.ns,
            enc: self.enc,
        }
    }

    /// The node's catalog generation (see [`internal_name`]).
    pub(super) fn generation(&self) -> u64 {
        self.node
            .catalog_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// DDL goes out: what the node knows of the schema is forgotten now,
    /// and once more when it has run (`ddl_sent`).
    pub(crate) fn note_ddl(&mut self) {
        self.node.forget_catalog(&self.database);
        self.ddl_sent = true;
        // Its ReadyForQuery is one of the next two (its Sync may be queued
        // already or come next): see `replies.rs`.
        let owed = self
            .be
            .owed
            .iter()
            .filter(|o| matches!(o, Owed::Sync | Owed::Query))
            .count();
        self.ddl_syncs = self.ddl_syncs.max(owed + 1);
    }

    /// A backend reported an error that shows a prepared statement older
    /// than the schema: statements parsed from now on get new names.
    pub(super) fn note_stale_statement(&self, f: &Frame) {
        let (code, message) = wire::parse_error_fields(f.body());
        let stale = (code == sqlstate::FEATURE_NOT_SUPPORTED
            && message.starts_with("cached plan must not change result type"))
            || (code == sqlstate::INTERNAL_ERROR && message.starts_with("cache lookup failed"));
        if stale {
            self.node.forget_catalog(&self.database);
        }
    }

    pub(crate) fn database(&self) -> &str {
        &self.database
    }

    /// A session setting as the node last read it back.
    pub(crate) fn setting(&self, name: &str) -> Option<&str> {
        self.state.get(name)
    }

    /// The shard for statements that touch no table: the current one while
    /// a transaction or replies are open there, else the one holding the
    /// session's temporary objects, else the home shard.
    pub(super) fn default_shard(&self) -> usize {
        if self.be.slots[self.be.cur].conn.is_some() {
            self.be.cur
        } else {
            self.temp
                .home
                .unwrap_or_else(|| self.node.routing.home_index())
        }
    }

    /// While a part of a cut batch runs ([`Part`]): looks at its replies
    /// queued for the client since the last look, notes an ErrorResponse
    /// and drops the ReadyForQuery messages (the part's Sync is the
    /// node's; the client's own Sync ends the last part), and rewrites
    /// what the part's mode asks ([`Part::hide_complete`],
    /// [`Part::sql_reply`]).
    pub(crate) fn scan_part(&mut self) {
        let Some(p) = self.part.as_mut() else {
            return;
        };
        let mut kept = BytesMut::new();
        let mut dropped = false;
        let mut i = p.from;
        while i + 5 <= self.out.len() {
            let len = u32::from_be_bytes([
                self.out[i + 1],
                self.out[i + 2],
                self.out[i + 3],
                self.out[i + 4],
            ]) as usize;
            let end = (i + 1 + len).min(self.out.len());
            match self.out[i] {
                wire::be::READY_FOR_QUERY if !p.keep_ready => dropped = true,
                wire::be::COMMAND_COMPLETE if p.hide_complete => dropped = true,
                wire::be::PARSE_COMPLETE if p.sql_reply == Some(SqlReply::Prepare) => {
                    dropped = true;
                    kept.put_slice(&crate::wire::command_complete("PREPARE"));
                }
                wire::be::BIND_COMPLETE | wire::be::NO_DATA
                    if p.sql_reply == Some(SqlReply::Execute) =>
                {
                    dropped = true
                }
                tag => {
                    p.failed |= tag == wire::be::ERROR_RESPONSE;
                    kept.put_slice(&self.out[i..end]);
                }
            }
            i = end;
        }
        if dropped {
            self.out.truncate(p.from);
            self.out.put_slice(&kept);
        }
        p.from = self.out.len();
    }

    /// Queues a reply the node makes itself, after everything owed before it.
    pub(crate) fn push_synthetic(&mut self, f: Bytes) {
        self.push_synthetic_with(f, Forget::Nothing);
    }

    pub(super) fn push_synthetic_with(&mut self, frame: Bytes, forget: Forget) {
        if self.be.owed.is_empty() {
            self.out.put_slice(&frame);
            if let Forget::OnSend(name) = forget {
                self.stmts.remove(&name);
            }
        } else {
            self.be.owed.push_back(Owed::Synthetic { frame, forget });
        }
    }

    /// Error for a statement the node refuses, in the simple protocol:
    /// ErrorResponse then ReadyForQuery.
    pub(super) fn refuse_simple(&mut self, r: Refusal) {
        self.push_error(&r);
        let status = self.client_status();
        self.push_synthetic(rfq(status));
    }

    /// A ParameterStatus from shard `t`'s backend that the client sees:
    /// the session (and the backend) follow its `client_encoding`.
    pub(crate) fn note_parameter_status(&mut self, t: usize, f: &Frame) {
        if let Some(b) = self.be.slots[t].conn.as_mut() {
            b.note_parameter_status(f.body());
            self.enc = b.enc;
        }
    }

    pub(crate) fn push_error(&mut self, r: &Refusal) {
        let mut e = BytesMut::new();
        let msg = self.enc.encode_lossy(&r.message);
        wire::error_response_bytes(&mut e, Severity::Error, r.code, &msg);
        self.push_synthetic(e.freeze());
        if self.txn.open() {
            self.txn.failed = true;
        }
    }

    /// ReadyForQuery's status byte for the client.
    pub(crate) fn client_status(&self) -> u8 {
        self.txn.client_status().byte()
    }

    /// A batch the node refuses: the error, and ReadyForQuery if it ended
    /// with Sync (else the rest up to Sync is skipped).
    pub(super) fn batch_error(&mut self, r: &Refusal, synced: bool) {
        // The error first: the backend's own failure (the hidden statement
        // of `fail_pipeline`) skips whatever is owed after it.
        self.push_error(r);
        // The client's Sync is answered here: the backend gets its own.
        self.fail_pipeline(synced);
        if synced {
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        } else {
            self.skip_to_sync = true;
        }
    }

    /// After the node itself raised an error in an extended-protocol
    /// pipeline: the current backend's implicit transaction holds what the
    /// pipeline ran before it, which PostgreSQL would roll back with the
    /// error (the client was told so). Makes the backend fail it as well:
    /// a hidden statement that raises, its replies not shown; with `sync`
    /// the node also sends the Sync (when it answers the client's Sync
    /// itself). Nothing to do when the backend has nothing of this
    /// pipeline (no statement since its last Sync).
    pub(super) fn fail_pipeline(&mut self, sync: bool) {
        let cur = self.be.cur;
        let Some(b) = self.be.slots[cur].conn.as_mut() else {
            return;
        };
        let work = b.unsynced
            || self
                .be
                .owed
                .iter()
                .any(|o| !matches!(o, Owed::Synthetic { .. }));
        if !work {
            return;
        }
        if sync {
            b.unsynced = false;
        }
        b.unsynced_ran = !sync;
        if sync {
            self.pipeline_synced();
        }
        wire::frame(&mut self.be.to_backend, fe::PARSE, |o| {
            o.put_u8(0);
            wire::put_cstr(o, POISON_SQL);
            o.put_i16(0);
        });
        wire::frame(&mut self.be.to_backend, fe::BIND, |o| {
            o.put_u8(0);
            o.put_u8(0);
            o.put_i16(0);
            o.put_i16(0);
            o.put_i16(0);
        });
        wire::frame(&mut self.be.to_backend, fe::EXECUTE, |o| {
            o.put_u8(0);
            o.put_i32(0);
        });
        self.be
            .owed
            .extend([Owed::Hidden, Owed::Hidden, Owed::Poison]);
        if sync {
            wire::frame(&mut self.be.to_backend, fe::SYNC, |_| {});
            self.be.owed.push_back(Owed::HiddenSync);
        }
        if let Some(u) = self.unnamed.as_mut() {
            if u.on == Some(cur) {
                u.on = None;
            }
        }
    }

    /// Records the shard written; the mark lasts until the ReadyForQuery
    /// that ends the transaction (so `BEGIN; INSERT …` in one string, whose
    /// transaction the node learns of only afterwards, is covered too). A
    /// transaction that wrote to several shards commits with two-phase
    /// commit. Call after replies owed by another shard are drained.
    ///
    /// A statement on the session's temporary objects must run where they
    /// are, and a transaction that used them there must not need
    /// two-phase commit with that shard: refused otherwise
    /// ([`Session::check_temp`]), before anything is recorded.
    pub(crate) fn check_write(&mut self, d: &Decision, t: usize) -> Result<(), Refusal> {
        self.check_temp(d, &[t])?;
        if d.temp {
            self.txn.temp_used_on = Some(t);
        }
        if d.write {
            self.txn.note_write(t);
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
pub(super) const MAX_BATCH: usize = 1024;

pub(super) const POISON_SQL: &str =
    "DO $$BEGIN RAISE EXCEPTION 'hotrepart: this transaction failed at the node'; END$$";

/// What the node learns of a shard's database on attach: how text compares
/// there (`node::TextCollation`). It runs with the client's search_path and
/// its answer serves every client: every operator and function is
/// pg_catalog's by name (a user's own `>=(oid, int4)` would be a better
/// match than pg_catalog's otherwise). Four columns:
/// 1. why the database's default collation does not order bytewise, or
///    NULL when it does: libc's C or POSIX, the builtin provider's C or
///    C.UTF-8 (code point order) do; an ICU database reports `datcollate`
///    C while ordering by ICU;
/// 2. why bytes would not tell equal text (a column or domain of a
///    nondeterministic collation: 'a' = 'A' under a case-insensitive one),
///    or NULL;
/// 3. the first user column (of a table, view, composite type…; not of an
///    index: its collation orders the index only) or domain (a cast to one
///    takes its collation) whose collation may order otherwise than the
///    database's default, or NULL (C and POSIX count as the default in a
///    bytewise database);
/// 4. the default collation as the shards must share it to rank text alike
///    (provider, collation, locale, ICU rules, version).
///
/// Optional catalog columns (`datlocprovider` since PostgreSQL 15,
/// `daticulocale` renamed `datlocale` in 17, `daticurules` in 16) are read
/// through `to_jsonb`, absent as NULL.
pub(super) const CATALOG_PROBE: &str = "WITH db AS (SELECT d.datname, d.datcollate::pg_catalog.text AS coll, \
COALESCE(j OPERATOR(pg_catalog.->>) 'datlocprovider', 'c') AS provider, \
COALESCE(j OPERATOR(pg_catalog.->>) 'datlocale', j OPERATOR(pg_catalog.->>) 'daticulocale') AS locale, \
j OPERATOR(pg_catalog.->>) 'daticurules' AS rules, j OPERATOR(pg_catalog.->>) 'datcollversion' AS version \
FROM pg_catalog.pg_database d CROSS JOIN LATERAL pg_catalog.to_jsonb(d) AS j (j) \
WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()), \
b AS (SELECT db.*, CASE WHEN db.provider OPERATOR(pg_catalog.=) 'c' THEN db.coll OPERATOR(pg_catalog.=) ANY (ARRAY['C', 'POSIX']::pg_catalog.text[]) \
WHEN db.provider OPERATOR(pg_catalog.=) 'b' THEN COALESCE(db.locale OPERATOR(pg_catalog.=) ANY (ARRAY['C', 'C.UTF-8']::pg_catalog.text[]), false) ELSE false END AS bytewise FROM db), \
cols AS (SELECT pg_catalog.format('column %I of %s', a.attname, a.attrelid::pg_catalog.regclass) AS what, c.oid AS coll, \
pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'collisdeterministic' AS det, c.collname, 0 AS kind, a.attrelid AS o, a.attnum AS n \
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_collation c ON c.oid OPERATOR(pg_catalog.=) a.attcollation \
JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) a.attrelid AND r.relkind OPERATOR(pg_catalog.<>) ALL (ARRAY['i', 'I', 'S']::pg_catalog.\"char\"[]) \
WHERE a.attrelid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2 AND NOT a.attisdropped \
AND NOT (a.attcollation OPERATOR(pg_catalog.=) ANY (ARRAY[0, 100]::pg_catalog.oid[])) \
UNION ALL SELECT pg_catalog.format('domain %s', t.oid::pg_catalog.regtype), c.oid, \
pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'collisdeterministic', c.collname, 1, t.oid, 0 \
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_collation c ON c.oid OPERATOR(pg_catalog.=) t.typcollation \
WHERE t.oid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid AND t.typtype OPERATOR(pg_catalog.=) 'd' \
AND NOT (t.typcollation OPERATOR(pg_catalog.=) ANY (ARRAY[0, 100]::pg_catalog.oid[]))) \
SELECT CASE WHEN NOT b.bytewise THEN CASE WHEN b.provider OPERATOR(pg_catalog.=) 'c' \
THEN pg_catalog.format('database %I uses collation %s', b.datname, b.coll) \
ELSE pg_catalog.format('database %I uses the %s collation provider (locale %s)', b.datname, \
CASE WHEN b.provider OPERATOR(pg_catalog.=) 'i' THEN 'ICU' WHEN b.provider OPERATOR(pg_catalog.=) 'b' THEN 'builtin' ELSE 'non-libc' END, COALESCE(b.locale, '?')) END END, \
(SELECT pg_catalog.format('%s uses nondeterministic collation %I', cols.what, cols.collname) FROM cols \
WHERE cols.det OPERATOR(pg_catalog.=) 'false' ORDER BY cols.kind, cols.o, cols.n LIMIT 1), \
(SELECT pg_catalog.format('%s uses collation %I', cols.what, cols.collname) FROM cols \
WHERE NOT (b.bytewise AND cols.coll OPERATOR(pg_catalog.=) ANY (ARRAY[950, 951]::pg_catalog.oid[])) ORDER BY cols.kind, cols.o, cols.n LIMIT 1), \
pg_catalog.format('%s/%s/%s/%s/%s', b.provider, b.coll, b.locale, b.rules, b.version) \
FROM b";

/// The node's name for a statement: a hash of its Parse body after the
/// client's name (SQL text and parameter types), so that clients preparing
/// the same statement share it on a backend.
///
/// `generation`: the node's catalog generation, bumped by DDL: a statement
/// parsed after a schema change gets a new name, so that no backend answers
/// it with a statement prepared against the old schema.
pub(super) fn internal_name(rest: &[u8], generation: u64) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rest.hash(&mut h);
    generation.hash(&mut h);
    format!("hr_{:016x}", h.finish())
}

pub(super) fn client_err(e: WireError) -> SessionError {
    match e {
        WireError::Closed | WireError::Io(_) => SessionError::ClientGone,
        WireError::Protocol(m) => proto_fatal(m),
    }
}

pub(super) fn proto_refusal(e: WireError) -> Refusal {
    Refusal::new(
        sqlstate::PROTOCOL_VIOLATION,
        format!("protocol violation: {e}"),
    )
}

pub(super) fn proto(m: &str) -> SessionError {
    proto_fatal(m.to_string())
}

pub(super) fn proto_fatal(msg: String) -> SessionError {
    SessionError::Fatal {
        code: sqlstate::PROTOCOL_VIOLATION,
        msg: format!("protocol violation: {msg}"),
    }
}
