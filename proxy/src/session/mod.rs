//! The client session after login: routes each statement to its shard and
//! forwards frames between the client and the backends it holds, under
//! transaction (or session) pooling.
//!
//! States: idle (no backend) ⇄ attached (backends held: replies owed or a
//! transaction open) → closed. A backend is attached by the first statement
//! routed to its shard and every backend is released at the ReadyForQuery
//! that ends the transaction with nothing owed — but one holding the
//! session's temporary objects, which the session keeps between its
//! transactions and attaches again as from the pool (`temp.rs`).
//!
//! Statements are routed once per statement: a simple Query when it
//! arrives, an extended-protocol batch (Parse/Bind/Describe/Execute/Close)
//! when its Sync or Flush arrives — by then every Bind's parameter values
//! are known. A batch goes to one shard. A statement that touches several
//! shards runs through [`crate::exec`] (concatenated, merged, COPY,
//! EXPLAIN): a simple Query, or in the extended protocol one statement per
//! batch (a batch holding others beside it is cut into parts there). The
//! executors use the session's lower layer (`conn.rs` and the methods of
//! `attach.rs`, `replies.rs`, `extended.rs`), never this loop.
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

mod attach;
mod client_tpc;
mod computed;
pub(crate) mod conn;
mod cursor;
mod extended;
mod first;
pub(crate) mod key_default;
mod listen;
mod replies;
mod route;
mod script;
#[cfg(test)]
mod scripted;
mod sql_prepare;
mod temp;
mod txn;
pub(crate) mod type_oids;

pub(crate) use attach::learn_text_collation;
pub use conn::{End, Session};

use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Kind, Target};
use crate::stats::Route;
use crate::wire::encoding;
use crate::wire::fe;
use crate::wire::{self, Frame, Severity};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, BytesMut};
use conn::*;
use hotrepart_router::classify::{classify, Deallocate};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
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
        self.be.clear_cancel();
        if self.ddl_sent {
            // DDL the client sent may have committed (autocommit, or a
            // COMMIT whose answer it did not wait for): every node forgets
            // the schema as it was, in the background.
            let (node, db) = (self.node.clone(), self.database.clone());
            tokio::spawn(async move {
                if let Err(e) = node.schema_changed(&db).await {
                    tracing::warn!(database = %db, error = %e, "could not record a schema change in the replicated catalog; retrying in the background");
                }
            });
        }
        if let Some(who) = &self.listener {
            self.node.notifier.unlisten(&self.database, None, who.id);
        }
        let clean = !panicked
            && self.be.owed.is_empty()
            && !self.txn.open()
            && !self.state_dirty.contains(&true);
        // A statement still running (the client left mid-statement) would
        // go on holding its locks until it ends: PostgreSQL notices a
        // closed connection only when it writes. Cancel it.
        let running = !self.be.owed.is_empty();
        let wait = self.node.cfg().connect_timeout();
        let temp_home = self.temp.home;
        for (i, slot) in self.be.slots.iter_mut().enumerate() {
            // Kept for the session's temporary objects: they go first.
            let cursors = self.cursors.holds_on(i) || self.cursors.ever_held;
            if let Some(mut b) = slot.kept.take() {
                if cursors {
                    Self::close_cursors(&mut b, wait).await;
                }
                if temp_home == Some(i) || !cursors {
                    Self::discard_temp(&mut b, wait).await;
                }
                b.release();
            }
            if let Some(mut b) = slot.conn.take() {
                // Otherwise the guard's drop closes the connection (and
                // PostgreSQL rolls back); it is never pooled again, so the
                // cancel cannot reach another client.
                if clean {
                    if cursors {
                        Self::close_cursors(&mut b, wait).await;
                    }
                    if temp_home == Some(i) {
                        Self::discard_temp(&mut b, wait).await;
                    }
                    b.release();
                } else if running {
                    crate::backend::conn::cancel_before_close(&b, wait).await;
                }
            }
        }
        end
    }

    async fn run_inner(&mut self) -> End {
        loop {
            // Everything routed has been answered: no statement of this
            // session is in flight any more.
            if self.be.owed.is_empty() {
                self.be.pin = None;
                if self.out.is_empty() {
                    // Every request has had its ReadyForQuery (one PostgreSQL
                    // ignores, a Sync in COPY, is not waited for).
                    self.stats.settled();
                }
            }
            self.be.silence = match self.node.cfg().server_silence_timeout_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            };
            let res = if self.be.slots[self.be.cur].conn.is_some() {
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
                let msg = self.enc.encode_lossy(&msg);
                wire::error_response_bytes(&mut self.out, Severity::Fatal, code, &msg);
                let _ = self.flush_client().await;
                End::Fatal
            }
        }
    }

    /// How long the client may stay silent (ms, 0: no limit), and the
    /// FATAL error when it does: the idle-session limit, or inside a
    /// transaction the idle-in-transaction one.
    fn idle_limit(&self) -> (u64, &'static str, &'static str) {
        if self.txn.open() {
            (
                self.node.cfg().idle_in_transaction_timeout_ms,
                sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
        } else {
            (
                self.node.cfg().client_idle_timeout_ms,
                sqlstate::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout",
            )
        }
    }

    /// Nothing owed by the current shard: wait for the client, bounded by
    /// the idle (or idle-in-transaction) timeout.
    async fn step_idle(&mut self) -> Result<Option<End>, SessionError> {
        let (t, code, msg) = self.idle_limit();
        let timer = sleep_if((t > 0).then(|| Duration::from_millis(t)));
        // Notifications for a listening session wait for the end of its
        // transaction, as on PostgreSQL.
        let deliver = !self.txn.open();
        let listening = async {
            match self.listener.as_mut() {
                Some(l) if deliver => l.rx.recv().await,
                _ => std::future::pending().await,
            }
        };
        // `next()` and `recv()` are cancel-safe.
        tokio::select! {
            f = self.client.next() => {
                let f = f.map_err(client_err)?;
                self.on_client_batch(f).await
            }
            Some(n) = listening => {
                self.out.put_slice(&encoding::notification_for(self.enc, &n));
                if let Some(l) = self.listener.as_mut() {
                    while let Ok(n) = l.rx.try_recv() {
                        self.out.put_slice(&encoding::notification_for(self.enc, &n));
                    }
                }
                self.flush_client().await?;
                Ok(None)
            }
            () = timer, if t > 0 => Err(SessionError::Fatal {
                code,
                msg: msg.into(),
            }),
        }
    }

    async fn step_attached(&mut self) -> Result<Option<End>, SessionError> {
        // Nothing owed: the client's silence is bounded as in step_idle
        // (a backend kept by session pooling or a temporary object
        // included).
        let (limit, code, msg) = self.idle_limit();
        let timer_on = limit > 0 && self.be.owed.is_empty();
        let sleep = sleep_if(timer_on.then(|| Duration::from_millis(limit)));
        let cur = self.be.cur;
        // Answers owed and a silence limit: a backend quiet that long is
        // taken for stalled.
        let silence = self.be.silence.filter(|_| !self.be.owed.is_empty());
        let quiet = sleep_if(silence);
        let Some(backend) = self.be.slots[cur].conn.as_mut() else {
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
                    Err(e) => Err(self.be.lost(cur, e)),
                }
            }
            _ = sleep, if timer_on => Err(SessionError::Fatal {
                code,
                msg: msg.into(),
            }),
            _ = quiet, if silence.is_some() => Err(self.be.silent(cur)),
        }
    }

    /// Handles one client frame and every further frame already buffered,
    /// then writes to backend and client once.
    async fn on_client_batch(&mut self, first: Frame) -> Result<Option<End>, SessionError> {
        self.ensure_slots();
        if self.node.pause.active() && !self.be.holds() {
            // PAUSE: wait before routing, so that no routing pin is held
            // while waiting (a cut-over waits for pins); `ensure_backend`
            // refuses if the wait ran out, and waits itself for a PAUSE
            // that comes after this point.
            self.pause_deadline = Some(self.wait_for_resume().await);
        }
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
        self.pause_deadline = None;
        Ok(None)
    }

    async fn on_backend_batch(&mut self, first: Frame) -> Result<(), SessionError> {
        self.on_backend_frame(first).await?;
        loop {
            let cur = self.be.cur;
            let Some(b) = self.be.slots[cur].conn.as_mut() else {
                break;
            };
            if !b.reader.has_frame() {
                break;
            }
            match b.reader.try_frame() {
                Ok(Some(f)) => self.on_backend_frame(f).await?,
                Ok(None) => break,
                Err(e) => return Err(self.be.lost(cur, e)),
            }
        }
        self.flush_client().await
    }

    async fn on_client_frame(&mut self, f: Frame) -> Result<Option<End>, SessionError> {
        let tag = f.tag();
        let request = matches!(tag, fe::QUERY | fe::SYNC | fe::FUNCTION_CALL);
        self.stats.received(f.raw.len(), request);
        if request {
            if let Some(i) = self.be.client_info() {
                i.requested();
            }
        }
        // What DDL through another node changed (`Node::catch_up_schema`).
        self.node.catch_up_schema();
        if self.ddl_sent && self.be.owed.is_empty() && !self.txn.open() {
            // DDL whose transaction ended without `end_of_transaction`.
            self.ddl_sent = false;
            let node = self.node.clone();
            if let Err(e) = Box::pin(node.schema_changed(&self.database)).await {
                tracing::warn!(database = %self.database, error = %e, "could not record a schema change in the replicated catalog; retrying in the background");
            }
        }
        if self.skip_to_sync && tag != fe::SYNC {
            return Ok(None);
        }
        // The strings of the message (query text, names) as UTF-8 from
        // here on, read in the client's encoding; a backend gets them
        // back in it (`BackendConn::write_frames`). A UTF-8 client's are
        // only checked.
        let f = match encoding::frame_to_utf8(self.enc, &f.raw) {
            Ok(None) => f,
            Ok(Some(b)) => Frame { raw: b.freeze() },
            Err(_) if tag == fe::COPY_FAIL => f,
            Err(e) => {
                self.refuse_undecodable(tag, e).await?;
                return Ok(None);
            }
        };
        match tag {
            fe::QUERY => {
                if !self.batch.is_empty() {
                    // A Query after unsynced extended messages: they go
                    // first, with a Flush — PostgreSQL holds their replies
                    // until one (or a Sync), and the node may wait for them
                    // before the Query (pg-cursor's Close after its Sync).
                    self.push_flush();
                    self.run_batch(false).await?;
                }
                self.on_query(f).await?;
            }
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE => {
                if let Err(r) = self.hold_within_budget(&f) {
                    // Nothing of the batch held has been sent: it is
                    // dropped whole, and the rest skipped up to Sync.
                    self.batch.clear();
                    self.batch_error(&r, false);
                    return Ok(None);
                }
                self.batch.push(f);
                // Bounded memory: a client that never sends Sync or Flush
                // has its messages forwarded anyway, as Flush would.
                if self.batch.len() >= MAX_BATCH {
                    self.push_flush();
                    self.run_batch(false).await?;
                }
            }
            fe::SYNC => {
                self.skip_to_sync = false;
                self.batch.push(f);
                self.run_batch(true).await?;
            }
            fe::FLUSH => {
                self.batch.push(f);
                self.run_batch(false).await?;
            }
            fe::FUNCTION_CALL => {
                let t = self.default_shard();
                match self.switch_to(t).await? {
                    Ok(()) => {
                        // The function called may write (the node cannot
                        // see which it is): a write for commit purposes.
                        self.txn.note_write(t);
                        self.be.to_backend.put_slice(&f.raw);
                        self.be.owed.push_back(Owed::FunctionCall);
                    }
                    Err(r) => self.refuse_simple(r),
                }
            }
            fe::COPY_DATA => {
                if self.be.slots[self.be.cur].conn.is_some() {
                    self.be.to_backend.put_slice(&f.raw);
                }
            }
            fe::COPY_DONE | fe::COPY_FAIL => {
                if self.be.slots[self.be.cur].conn.is_some() {
                    self.be.to_backend.put_slice(&f.raw);
                }
            }
            fe::TERMINATE => return Ok(Some(End::ClientGone)),
            other => {
                return Err(proto_fatal(format!(
                    "unexpected message type {:?} from client",
                    other as char
                )))
            }
        }
        Ok(None)
    }

    /// A client message whose text is not text in its encoding (22021),
    /// or not ASCII in one the node cannot read (0A000): refused as
    /// PostgreSQL refuses such a message, the session goes on (what was
    /// held before it runs first; an extended message skips to Sync).
    async fn refuse_undecodable(
        &mut self,
        tag: u8,
        e: encoding::EncodingError,
    ) -> Result<(), SessionError> {
        if !self.batch.is_empty() {
            self.run_batch(false).await?;
        }
        let r = Refusal::new(e.code, e.message);
        if tag == fe::QUERY {
            self.refuse_simple(r);
        } else {
            self.batch_error(&r, false);
        }
        Ok(())
    }

    /// The session's budget of held client messages
    /// (`max_session_buffer_bytes`): `f` may join the batch held for its
    /// Sync, or the batch fails with 53200. (A frame itself is at most
    /// `max_message_size`, checked as it is read.)
    fn hold_within_budget(&self, f: &Frame) -> Result<(), Refusal> {
        let max = self.node.cfg().max_session_buffer_bytes;
        if max == 0 {
            return Ok(());
        }
        let held: usize = self.batch.iter().map(|b| b.raw.len()).sum::<usize>() + f.raw.len();
        if held <= max {
            return Ok(());
        }
        Err(Refusal::new(
            sqlstate::OUT_OF_MEMORY,
            format!("out of memory: this session holds more than {max} bytes of unanswered messages (max_session_buffer_bytes); send Sync more often or raise the limit"),
        ))
    }

    /// A simple Query after extended messages sent with Flush: their
    /// replies owed are read first; after an error in them PostgreSQL
    /// ignores everything (this Query too) up to the client's Sync; a
    /// search_path they changed is read back (`settle_pipeline`). False:
    /// the Query is answered (or ignored) here.
    async fn query_after_pipeline(&mut self) -> Result<bool, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        if self.skip_to_sync {
            return Ok(false);
        }
        if let Err(r) = self.settle_pipeline().await? {
            // PostgreSQL's Query ends the pipeline before it: failed,
            // with what it ran (the backend's implicit transaction too).
            self.batch_error(&r, true);
            return Ok(false);
        }
        Ok(!self.skip_to_sync)
    }

    async fn on_query(&mut self, f: Frame) -> Result<(), SessionError> {
        if self.implicit_portal {
            // The Query ends the implicit transaction the portal lived in.
            Box::pin(self.end_implicit_portal(false)).await?;
        }
        if self.be.mid_pipeline() && !Box::pin(self.query_after_pipeline()).await? {
            return Ok(());
        }
        self.settle_state().await?;
        self.settle_temp().await?;
        self.ensure_namespace().await?;
        let mut b = f.body();
        let sql = wire::get_cstr(&mut b).map_err(client_err)?;
        let class = classify(sql);
        if !self.session_mode {
            if let Some(cmd) = hotrepart_router::classify::listen_command(sql) {
                match self.on_listen(cmd).await {
                    Ok(()) => {
                        let status = self.client_status();
                        self.push_synthetic(rfq(status));
                    }
                    Err(r) => self.refuse_simple(r),
                }
                return Ok(());
            }
        }
        if let Err(r) = self.check_listen(class.listen) {
            self.refuse_simple(r);
            return Ok(());
        }
        // SQL PREPARE/EXECUTE: as the protocol's named statements, which
        // survive transaction pooling and route by their parameters (in
        // session pooling on one shard the backend keeps them itself).
        if !self.session_mode || !self.node.routing.single_shard() {
            if let Some(p) = hotrepart_router::classify::sql_prepare(sql) {
                return self.sql_prepare(p).await;
            }
            if let Some(e) = hotrepart_router::classify::sql_execute(sql) {
                return self.sql_execute(e).await;
            }
        }
        if class.two_phase {
            if let Some(tp) = hotrepart_router::classify::two_phase(sql) {
                return self.client_two_phase(&f, class, tp).await;
            }
            if let Some(r) = client_tpc::reserved_in(sql) {
                self.refuse_simple(r);
                return Ok(());
            }
        }
        if self.deallocate(class.deallocate.as_ref()) {
            return Ok(());
        }
        if self.cursor_by_node(sql).await? {
            return Ok(());
        }
        if !self.node.routing.single_shard() {
            if let Some(ex) = class.explain {
                if !self.be.owed.is_empty() {
                    self.drain_owed().await?;
                }
                self.stats.note_route(Route::All);
                return crate::exec::explain::run(self, ex).await;
            }
        }
        let d = self
            .route_waiting(|s| s.decide_sql(sql, None))
            .await
            .and_then(|d| self.check_owner_change(&d).map(|()| d));
        let mut d = match d {
            Ok(d) => d,
            Err(r) => {
                // Statements the node cannot route together (different
                // shards, rows from several): one by one, as PostgreSQL
                // runs them.
                // SQLAlchemy's INSERT … SELECT … FROM (VALUES …): as the
                // INSERT … VALUES it means.
                if r.code == sqlstate::FEATURE_NOT_SUPPORTED
                    || r.code == sqlstate::NOT_NULL_VIOLATION
                {
                    if let Some(flat) = self.values_select_of(sql) {
                        return Box::pin(self.on_query(script::query_frame(&flat))).await;
                    }
                }
                if r.code == sqlstate::FEATURE_NOT_SUPPORTED {
                    if let Some(ck) = self.computed_keys_of(sql) {
                        return self.insert_computed(ck).await;
                    }
                    if let Some(is) = self.insert_select_of(sql) {
                        return self.insert_selected(is).await;
                    }
                    if let Some(nc) = self.no_column_list_of(sql) {
                        return self.insert_with_columns(nc).await;
                    }
                    if let Some(f) = self.subqueries_first_of(sql) {
                        return self.run_subqueries_first(f, r).await;
                    }
                    if let Some(stmts) = self.script_of(sql) {
                        return self.run_script(stmts).await;
                    }
                }
                // A key left to its column default (`key_default.rs`), in
                // an INSERT … SELECT (Django 5.2's `bulk_create`: `SELECT *
                // FROM UNNEST(…)`) or an INSERT … VALUES.
                if r.code == sqlstate::NOT_NULL_VIOLATION {
                    if let Some(is) = self.insert_select_of(sql) {
                        return self.insert_selected(is).await;
                    }
                    if let Some(t) = self.key_default_table(sql) {
                        return self.insert_filled(sql, &t, Some(r)).await.map(|_| ());
                    }
                }
                self.refuse_simple(r);
                return Ok(());
            }
        };
        // Columns a sequence numbers, left to their default in an INSERT
        // into a sharded table: filled on the home shard (`key_default.rs`).
        if !d.inserts_into.is_empty() {
            match self.tables_fill(&d.inserts_into).await? {
                Ok(false) => {}
                Ok(true) if d.statements == 1 => {
                    let t = d.inserts_into[0].clone();
                    if self.insert_filled(sql, &t, None).await? {
                        return Ok(());
                    }
                }
                Ok(true) => match self.script_of(sql) {
                    Some(stmts) => return self.run_script(stmts).await,
                    None => {
                        self.refuse_simple(Refusal::new(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "this query string inserts into a sharded table whose sequence-numbered columns hotrepart fills, beside statements it cannot run one by one (COPY); send the INSERT on its own".into(),
                        ));
                        return Ok(());
                    }
                },
                Err(r) => {
                    self.refuse_simple(r);
                    return Ok(());
                }
            }
        }
        let first = self.first_shard(&d);
        if let Err(r) = self.settle_calls(&mut d, first).await? {
            // Sequelize's findOrCreate: a temporary function inserting
            // one row, run where the row belongs (`key_default.rs`).
            if self.temp_function_insert(sql).await? {
                return Ok(());
            }
            self.refuse_simple(r);
            return Ok(());
        }
        let target = match d.target {
            Target::Shard(t) => Some(t),
            _ => None,
        };
        if self.script_wanted(&d, target) {
            if let Some(stmts) = self.script_of(sql) {
                return self.run_script(stmts).await;
            }
        }
        // Decide with what the current shard has answered: a pipelined
        // statement for another shard waits for its replies (an error there
        // aborts the transaction).
        if !self.be.owed.is_empty() && (target != Some(self.be.cur) || d.kind != Kind::Other) {
            self.drain_owed().await?;
        }
        if self.transaction_control(&d, true, target).await? {
            return Ok(());
        }
        if d.copy.is_some() {
            let route = route_of(&d, self.default_shard());
            self.stats.note_route(route);
            return crate::exec::copy::run(self, &d, None).await;
        }
        if let Err(r) = self.check_multi_shard(&d).await? {
            self.refuse_simple(r);
            return Ok(());
        }
        match &d.target {
            Target::Multi { shards, .. } if d.merge.is_some() => {
                if !self.be.owed.is_empty() {
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
                    self.stats.note_route(Route::Merge);
                    return crate::exec::merge::exec::run(self, &plan, &shards, sqls.as_deref())
                        .await;
                }
            }
            Target::Multi { .. } => {
                let sql = sql.to_string();
                if !self.be.owed.is_empty() {
                    self.drain_owed().await?;
                }
                self.stats.note_route(route_of(&d, self.be.cur));
                return crate::exec::scatter::run(self, &d, &sql).await;
            }
            Target::Shard(_) | Target::Any => {}
        }
        let t = match d.target {
            Target::Shard(t) => t,
            _ => self.default_shard(),
        };
        if t != self.be.cur && !self.be.owed.is_empty() {
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
        if matches!(class.deallocate, Some(Deallocate::All)) {
            // DISCARD ALL closes the cursors the session holds elsewhere.
            self.discard_cursors_except(sql, t).await?;
        }
        self.note_set_transaction(sql);
        self.pass_query(&f, class, t);
        self.note_cursor_sent(sql, t);
        Ok(())
    }

    /// Sends the client's simple Query `f` as is to shard `t`, the current
    /// backend, and owes the client its replies.
    fn pass_query(&mut self, f: &Frame, class: hotrepart_router::classify::Class<'_>, t: usize) {
        self.note_class(class, t);
        self.stats.note_route(Route::One(Some(t)));
        self.be.to_backend.put_slice(&f.raw);
        self.be.owed.push_back(Owed::Query);
        if let Some(b) = self.be.slots[t].conn.as_mut() {
            b.unsynced = false;
            b.unsynced_ran = false;
        }
        self.pipeline_synced();
    }

    /// SQL-level DEALLOCATE of statements the client prepared with the
    /// protocol: those live under node names on the backends, so the node
    /// answers `DEALLOCATE name` itself, and `DEALLOCATE ALL`/`DISCARD ALL`
    /// also forget the client's names (the backend's side follows from the
    /// prepared-statement re-read). Returns true when answered here.
    fn deallocate(&mut self, d: Option<&Deallocate>) -> bool {
        let name = match d {
            None => return false,
            Some(Deallocate::All) => {
                self.stmts.clear();
                return false;
            }
            Some(Deallocate::Name(name)) => name,
        };
        if self.stmts.remove(name).is_some() {
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

    /// Ends the messages held with a Flush of the node's: PostgreSQL then
    /// sends their replies, which the node may wait for.
    fn push_flush(&mut self) {
        self.batch.push(Frame {
            raw: bytes::Bytes::from_static(&[fe::FLUSH, 0, 0, 0, 4]),
        });
    }

    /// Runs the extended-protocol messages held (up to a Sync when
    /// `synced`, else a Flush).
    async fn run_batch(&mut self, synced: bool) -> Result<(), SessionError> {
        if synced && self.implicit_portal {
            return Box::pin(self.end_implicit_portal(true)).await;
        }
        self.portals_begin_batch(synced);
        if !self.node.routing.single_shard() && !self.skip_to_sync {
            // INSERTs the router cannot route as written, made routable
            // once per batch, before it is routed: INSERT … SELECT from a
            // VALUES list as that list, no column list → the table's
            // columns (`computed.rs`), keys left to their default → values
            // (`key_default.rs`).
            if self.unsynced_settings && self.batch.iter().any(|f| f.tag() == fe::BIND) {
                if let Err(r) = Box::pin(self.settle_pipeline()).await? {
                    self.batch.clear();
                    self.batch_error(&r, synced);
                    return Ok(());
                }
            }
            // After an error owed by the pipeline the batch is skipped to
            // its Sync (`run_batch_rounds`): nothing of it is prepared.
            if !self.skip_to_sync {
                self.settle_state().await?;
                self.settle_temp().await?;
                self.ensure_namespace().await?;
                let frames = std::mem::take(&mut self.batch);
                let frames = self.flatten_values_selects(frames);
                let frames = match self.complete_column_lists(frames).await? {
                    Ok(f) => self.fill_key_defaults(f).await?,
                    Err(r) => Err(r),
                };
                match frames {
                    Ok(f) => self.batch = f,
                    Err(r) => {
                        self.batch_error(&r, synced);
                        return Ok(());
                    }
                }
            }
        }
        self.run_batch_rounds(synced).await?;
        if !std::mem::take(&mut self.cut_wanted) {
            return Ok(());
        }
        // Routing found a multi-shard statement beside others (the batch
        // is held again): cut it there.
        let frames = std::mem::take(&mut self.batch);
        match self.batch_parts(&frames) {
            Some((parts, tx_control)) => self.run_parts(parts, tx_control).await,
            None => {
                let r = self
                    .route_batch(&frames)
                    .err()
                    .unwrap_or_else(extended::multi_beside_others);
                self.batch_error(&r, synced);
                Ok(())
            }
        }
    }

    /// A batch cut where its statements change shards
    /// ([`Session::batch_parts`]): each part runs as a batch of its own,
    /// ended by a Sync of the node's (its ReadyForQuery not shown), and is
    /// answered in full before the next starts; after an error the rest
    /// is skipped up to the client's Sync, as PostgreSQL does.
    ///
    /// Outside a transaction block PostgreSQL runs the batch as one
    /// implicit transaction: so does the node — a transaction of its own
    /// over the shards the parts reach (deferred `BEGIN`), committed at the
    /// client's Sync (two-phase when several shards wrote) or rolled back
    /// after an error, as a multi-statement query string
    /// (`session/script.rs`). A batch holding transaction control
    /// (`BEGIN` … in it) runs its parts as they come, the last one with
    /// the client's Sync (outside a transaction block each part then
    /// commits on its own).
    async fn run_parts(
        &mut self,
        parts: Vec<Vec<Frame>>,
        tx_control: bool,
    ) -> Result<(), SessionError> {
        let implicit = !tx_control && !self.txn.open();
        if implicit {
            self.txn.begin = Some("BEGIN".into());
            self.txn.status = conn::TxStatus::InTransaction;
        }
        let n = parts.len();
        let mut failed_any = false;
        for (i, mut part) in parts.into_iter().enumerate() {
            if i + 1 == n && !implicit {
                self.batch = part;
                self.run_batch_rounds(true).await?;
                break;
            }
            if self.skip_to_sync {
                continue;
            }
            if i + 1 == n {
                // The node answers the client's Sync once the block ends.
                part.retain(|f| f.tag() != fe::SYNC);
            }
            part.push(Frame {
                raw: bytes::Bytes::from_static(&[fe::SYNC, 0, 0, 0, 4]),
            });
            self.part = Some(Part {
                from: self.out.len(),
                ..Part::default()
            });
            self.batch = part;
            let mut r = self.run_batch_rounds(true).await;
            if r.is_ok() && !self.be.owed.is_empty() {
                r = self.drain_owed().await;
            }
            self.scan_part();
            let failed = self.part.take().is_some_and(|p| p.failed);
            r?;
            self.skip_to_sync = failed;
            failed_any |= failed;
        }
        if implicit {
            self.part = Some(Part {
                from: self.out.len(),
                ..Part::default()
            });
            let r = if self.txn.open() {
                self.end_implicit(!failed_any).await.map(|_| ())
            } else {
                Ok(())
            };
            self.scan_part();
            self.part = None;
            r?;
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        }
        // The client's Sync is answered.
        self.skip_to_sync = false;
        Ok(())
    }

    /// [`Session::run_batch`] for a batch that is not cut.
    pub(super) async fn run_batch_rounds(&mut self, synced: bool) -> Result<(), SessionError> {
        loop {
            if self.skip_to_sync {
                // After an error in the pipeline everything up to Sync is
                // ignored, as PostgreSQL does; the Sync goes where the
                // failed messages went.
                if !synced {
                    self.batch.clear();
                    return Ok(());
                }
                self.batch.retain(|f| f.tag() == fe::SYNC);
            }
            if self.run_batch_once(synced).await? {
                return Ok(());
            }
        }
    }

    /// While the batch waited for what a backend owed, that backend
    /// reported an error its pipeline had not synced: PostgreSQL now
    /// ignores the batch up to its Sync. The Sync is held again (for
    /// [`Session::run_batch`]'s next round); true: stop this one.
    fn skipped(&mut self, frames: &[Frame]) -> bool {
        // A batch of its Sync alone goes on: the Sync reaches the backend
        // and ends the skipping (`forward_extended` below); cutting it
        // again would run the same round forever.
        if !self.skip_to_sync || frames.iter().all(|f| f.tag() == fe::SYNC) {
            return false;
        }
        self.batch = frames
            .iter()
            .filter(|f| f.tag() == fe::SYNC)
            .cloned()
            .collect();
        true
    }

    /// One round of [`Session::run_batch`]; false: the batch is to be run
    /// again (it turned out to follow an error).
    async fn run_batch_once(&mut self, synced: bool) -> Result<bool, SessionError> {
        self.settle_state().await?;
        self.settle_temp().await?;
        self.ensure_namespace().await?;
        let frames = std::mem::take(&mut self.batch);
        if self.listen_batch(&frames).await {
            return Ok(true);
        }
        if self.cursor_batch_by_node(&frames, synced).await? {
            return Ok(true);
        }
        // It waited for replies owed before this batch and one was an
        // error: the batch is skipped up to its Sync (a batch of Syncs
        // alone runs as usual).
        if self.skipped(&frames) {
            return Ok(false);
        }
        // A client's PREPARE TRANSACTION / COMMIT PREPARED: its shard is
        // the transaction's, or the one holding the identifier.
        let two_phase = match self.two_phase_batch(&frames) {
            Ok(tp) => tp,
            Err(r) => {
                self.batch_error(&r, synced);
                return Ok(true);
            }
        };
        let routed = match two_phase {
            Some(tp) => match self
                .two_phase_target(tp, client_tpc::Via::Batch { synced })
                .await?
            {
                Some(t) => Ok((Some(t), None)),
                None => return Ok(true),
            },
            None => self
                .route_waiting(|s| s.route_batch(&frames))
                .await
                .and_then(|(t, d)| match &d {
                    Some(dd) => self.check_owner_change(dd).map(|()| (t, d)),
                    None => Ok((t, d)),
                }),
        };
        let (target, mut d) = match routed {
            Ok((t, d)) => {
                self.note_portals(&frames, t, d.as_ref());
                (t, d)
            }
            Err(r)
                if (r.message == extended::MULTI_BESIDE_OTHERS
                    || r.message == extended::DIFFERENT_SHARDS)
                    && synced
                    && self.part.is_none() =>
            {
                self.batch = frames;
                self.cut_wanted = true;
                return Ok(true);
            }
            Err(r) => {
                // A SELECT whose subqueries need every shard's rows: they
                // run first, then the batch, rewritten.
                if r.code == sqlstate::FEATURE_NOT_SUPPORTED {
                    if let Some(done) = self.batch_subqueries_first(&frames, &r, synced).await? {
                        return Ok(done);
                    }
                }
                self.batch_error(&r, synced);
                return Ok(true);
            }
        };
        if let Some(dd) = d.as_mut() {
            let first = target.unwrap_or_else(|| self.first_shard(dd));
            if let Err(r) = self.settle_calls(dd, first).await? {
                self.batch_error(&r, synced);
                return Ok(true);
            }
            // Its lookup waited for replies owed and one was an error.
            if self.skipped(&frames) {
                return Ok(false);
            }
        }
        // The maps of user type OIDs its Parse messages need (`type_oids.rs`).
        match d.as_ref().map(|d| &d.target) {
            Some(Target::Multi { shards, .. }) if shards.len() > 1 => {
                self.prepare_type_oids(&frames, shards).await
            }
            _ => {
                let t = target.unwrap_or_else(|| self.default_shard());
                self.prepare_type_oids(&frames, &[t]).await
            }
        }
        // A batch without a statement (a lone Sync, Close …) belongs to the
        // current backend: it may owe its replies only after this Sync
        // (PostgreSQL sends an extended COPY's CommandComplete at Sync).
        let here = target.is_none() && d.is_none() && self.be.slots[self.be.cur].conn.is_some();
        if !self.be.owed.is_empty()
            && !here
            && (target.is_none_or(|t| t != self.be.cur)
                || d.as_ref().is_some_and(|d| d.kind != Kind::Other))
        {
            self.drain_owed().await?;
            if self.skipped(&frames) {
                return Ok(false);
            }
        }
        if let Some(d) = &d {
            if d.kind == Kind::Commit && self.txn.writes.len() > 1 && self.be.mid_pipeline() {
                // asyncpg's `fetch("COMMIT")` (Parse, Describe, Flush; then
                // Bind, Execute, Sync): those messages end before the
                // two-phase commit, which runs on synced backends.
                if let Err(r) = Box::pin(self.end_unsynced()).await? {
                    self.batch_error(&r, synced);
                    return Ok(true);
                }
                if self.skipped(&frames) {
                    return Ok(false);
                }
            }
            if self.transaction_control(d, false, target).await? {
                if synced {
                    let status = self.client_status();
                    self.push_synthetic(rfq(status));
                    self.skip_to_sync = false;
                }
                return Ok(true);
            }
        }
        if let Some(d) = d.as_ref().filter(|d| d.copy.is_some()) {
            let route = route_of(d, target.unwrap_or_else(|| self.default_shard()));
            self.stats.note_route(route);
            let (d, ext) = (d.clone(), crate::exec::copy::Ext { frames, synced });
            return crate::exec::copy::run(self, &d, Some(ext))
                .await
                .map(|()| true);
        }
        if let Some(d) = d
            .as_ref()
            .filter(|d| matches!(&d.target, Target::Multi { shards, .. } if shards.len() > 1))
        {
            if !self.be.owed.is_empty() {
                self.drain_owed().await?;
                if self.skipped(&frames) {
                    return Ok(false);
                }
            }
            let d = d.clone();
            if let Err(r) = self.end_unsynced().await? {
                self.batch_error(&r, synced);
                return Ok(true);
            }
            if self.skipped(&frames) {
                return Ok(false);
            }
            if let Err(r) = self.check_multi_shard(&d).await? {
                self.batch_error(&r, synced);
                return Ok(true);
            }
            // A read over several shards whose Execute has a row limit
            // (asyncpg's fetchrow/fetchval): the merge executor
            // concatenates and stops there, where the relay cannot.
            let concat = d
                .merge
                .is_none()
                .then(|| self.limited_read_plan(&d, &frames))
                .flatten();
            if let (Some(plan), Target::Multi { shards, sqls }) =
                (d.merge.as_ref().or(concat.as_ref()), &d.target)
            {
                if let Err(r) = self.check_merged_write(&d, shards) {
                    self.batch_error(&r, synced);
                    return Ok(true);
                }
                self.stats.note_route(Route::Merge);
                return crate::exec::merge::exec::run_extended(
                    self,
                    plan,
                    shards,
                    sqls.as_deref(),
                    frames,
                    synced,
                )
                .await
                .map(|()| true);
            }
            self.stats.note_route(Route::All);
            return crate::exec::scatter::run_extended(self, &d, frames, synced)
                .await
                .map(|()| true);
        }
        // A lone Sync with nothing held: answer it here.
        if target.is_none()
            && !self.be.attached()
            && frames
                .iter()
                .all(|f| f.tag() == fe::SYNC || f.tag() == fe::FLUSH)
        {
            if synced {
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
            return Ok(true);
        }
        let t = target.unwrap_or_else(|| self.default_shard());
        if synced && self.parse_without_backend(&frames, t)? {
            return Ok(true);
        }
        if t != self.be.cur && !self.be.owed.is_empty() {
            self.drain_owed().await?;
            if self.skipped(&frames) {
                return Ok(false);
            }
        }
        if let Some(d) = &d {
            if let Err(r) = self.check_write(d, t) {
                self.batch_error(&r, synced);
                return Ok(true);
            }
        }
        if self.txn.failed && self.node.routing.single_shard() {
            // The node refused a statement of this transaction: PostgreSQL
            // must see it failed (on several shards the node answers).
            self.fail_on_backend(t).await?;
        }
        let switched = self.switch_to(t).await?;
        if self.skipped(&frames) {
            return Ok(false);
        }
        if let Err(r) = switched {
            self.batch_error(&r, synced);
            return Ok(true);
        }
        if let Some(d) = &d {
            self.poison_if_failed(d, t).await;
        }
        self.stats.note_route(Route::One(Some(t)));
        let ran = frames
            .iter()
            .any(|f| matches!(f.tag(), fe::BIND | fe::EXECUTE));
        // A lone Flush (psycopg sends one after its pipeline's Sync) opens
        // nothing.
        let work = frames
            .iter()
            .any(|f| !matches!(f.tag(), fe::SYNC | fe::FLUSH));
        let cursor_frames = self.may_touch_cursors(&frames).then(|| frames.clone());
        // What the statements of a Flush-ended batch do to the settings
        // routing reads is read back only after their Sync
        // (`settle_pipeline`).
        let unsynced_binds = (!synced
            && !self.node.routing.single_shard()
            && frames.iter().any(|f| f.tag() == fe::BIND))
        .then(|| frames.clone());
        if synced {
            self.pipeline_synced();
        }
        for f in frames {
            if self.skip_to_sync && f.tag() != fe::SYNC {
                continue;
            }
            let tag = f.tag();
            self.forward_extended(f, t)?;
            if tag == fe::SYNC {
                self.skip_to_sync = false;
            }
        }
        if let Some(frames) = unsynced_binds {
            self.note_unsynced_binds(&frames);
        }
        // What the batch's statements did to the session's cursors (their
        // Parses are recorded by now).
        if let Some(frames) = cursor_frames {
            for sql in self.cursor_statements(&frames) {
                self.note_cursor_sent(&sql, t);
            }
        }
        // Until its Sync, an implicit transaction may be open on this
        // backend: it must not be pooled, nor left for another shard once
        // something ran there (`switch_to`).
        if let Some(b) = self.be.slots[t].conn.as_mut().filter(|_| synced || work) {
            b.unsynced_ran = !synced && ((b.unsynced && b.unsynced_ran) || ran);
            b.unsynced = !synced;
        }
        Ok(true)
    }
}

/// Sleeps for `d`, or never. A timer is made only when the future is
/// first polled: a `select!` branch disabled by its condition (the
/// default, every limit 0) costs no clock read and no timer entry.
async fn sleep_if(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// How the latency histograms label a routed statement (`t`: the shard it
/// runs on when the decision names none).
fn route_of(d: &crate::routing::Decision, t: usize) -> Route {
    match &d.target {
        Target::Multi { shards, .. } if shards.len() > 1 => {
            if d.merge.is_some() {
                Route::Merge
            } else {
                Route::All
            }
        }
        Target::Multi { shards, .. } => Route::One(shards.first().copied()),
        Target::Shard(t) => Route::One(Some(*t)),
        Target::Any => Route::One(Some(t)),
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
