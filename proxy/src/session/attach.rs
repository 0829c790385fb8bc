//! Backends joining and leaving a session: checkout from the pool,
//! session state replayed or read back, the namespace and the functions a
//! statement needs looked up on a shard, draining and flushing, the end of
//! a transaction (backends released).

use super::conn::*;
use crate::backend::pool::{Pool, PoolError};
use crate::backend::state::{self, SessionState};
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Decision, Target};
use crate::wire::tx;
use crate::wire::WireError;
use hotrepart_router::classify::{classify, Class};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(crate) fn pool(&mut self, shard: usize) -> Arc<Pool> {
        if let Some(p) = &self.be.slots[shard].pool {
            return p.clone();
        }
        let p = self.node.pool_for(shard, &self.database, &self.user);
        self.be.slots[shard].pool = Some(p.clone());
        p
    }

    /// Makes sure shard `t` has a backend carrying this client's state (and
    /// inside a transaction, a transaction of its own). Returns a client
    /// error (not fatal) when no backend can be had.
    pub(crate) async fn ensure_backend(
        &mut self,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if self.be.slots[t].conn.is_some() {
            return self.join_open_transaction(t).await;
        }
        // A SET earlier in this transaction: learn the state it made before
        // giving a new backend this client's state.
        for d in 0..self.be.slots.len() {
            if d != t && self.state_dirty[d] && self.be.slots[d].conn.is_some() {
                self.refresh_state_from(d).await;
            }
        }
        if self.node.pause.active() && !self.be.holds() {
            // PAUSE: a new transaction waits for RESUME (one that holds a
            // backend goes on, so that PAUSE can end).
            if let Err(r) = self.wait_while_paused().await {
                return Ok(Err(r));
            }
        }
        let pool = self.pool(t);
        let wait = self.node.cfg().pool_timeout();
        // The backend the session keeps (its temporary objects) is checked
        // out again as a pooled one would be.
        let kept = self.take_kept(t);
        let info = self.be.client_info();
        let got = match kept {
            Some(b) => Ok(b),
            None => {
                if let Some(i) = info {
                    i.waiting(true);
                }
                let got = pool.get(self.state_fp, wait).await;
                if let Some(i) = info {
                    i.waiting(false);
                }
                got
            }
        };
        let mut b = match got {
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
                    format!("cannot connect to shard {}", self.node.routing.shard_name(t)),
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
        if !self.node.routing.single_shard() {
            learn_text_collation(&self.node, &self.database, t, &mut b).await;
        }
        if self.txn.open() {
            // The shard joins an open transaction.
            let begin = self.begin_with_savepoints();
            if let Err(e) = b.hidden_query(&begin).await {
                b.broken = true;
                return Ok(Err(Refusal::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("cannot begin the transaction on another shard: {e}"),
                )));
            }
        }
        self.be.slots[t].conn = Some(b);
        self.be.update_cancel();
        Ok(Ok(()))
    }

    /// What a shard joining the open transaction runs: the client's BEGIN
    /// (with its `SET TRANSACTION …`), then the savepoints open in it.
    fn begin_with_savepoints(&self) -> String {
        let mut begin = self.txn.begin.clone().unwrap_or_else(|| "BEGIN".into());
        for (written, _) in &self.txn.savepoints {
            begin.push_str("; SAVEPOINT ");
            begin.push_str(written);
        }
        begin
    }

    /// A backend kept attached between transactions (session pooling, a
    /// pinned backend) that is outside the transaction the client has
    /// open now joins it before its first statement of the transaction:
    /// otherwise that statement would run, and commit, on its own.
    async fn join_open_transaction(
        &mut self,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if !self.txn.open() || (t == self.be.cur && !self.be.owed.is_empty()) {
            // Replies still owed by the current backend may be those of
            // the BEGIN itself: its status is not known yet.
            return Ok(Ok(()));
        }
        let begin = self.begin_with_savepoints();
        let Some(b) = self.be.slots[t].conn.as_mut() else {
            return Ok(Ok(()));
        };
        if b.status != tx::IDLE || b.unsynced {
            return Ok(Ok(()));
        }
        if let Err(e) = b.hidden_query(&begin).await {
            b.broken = true;
            return Ok(Err(Refusal::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("cannot begin the transaction on another shard: {e}"),
            )));
        }
        Ok(Ok(()))
    }

    /// Makes `t` the current shard: drains what another shard still owes,
    /// then attaches a backend on `t`.
    ///
    /// The current shard's backend may hold messages sent with Flush but
    /// no Sync. When they only prepared or described statements (Parse,
    /// Describe, Close: asyncpg prepares that way before the Bind that
    /// carries the key), the node ends them there with a Sync of its own
    /// (its ReadyForQuery hidden): nothing ran, so the Sync commits
    /// nothing, and inside a transaction block it leaves the transaction
    /// open on that backend. The statements are prepared again on `t`
    /// before a Bind uses them there (`prepare_on_backend`,
    /// `ensure_unnamed`). A portal or a statement run since the last Sync
    /// (Bind, Execute) is the client's implicit transaction on that shard:
    /// refused, as splitting it would break its atomicity.
    pub(super) async fn switch_to(
        &mut self,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if self.be.cur != t {
            if let Err(r) = self.end_unsynced().await? {
                return Ok(Err(r));
            }
        }
        let r = self.ensure_backend(t).await?;
        if r.is_ok() {
            self.be.cur = t;
        }
        Ok(r)
    }

    /// Before the next statement goes elsewhere (another shard, or
    /// several): the current backend's messages sent with Flush and not
    /// yet synced (asyncpg's Parse, Describe, Flush before its Bind) are
    /// ended with a hidden Sync when they only prepared statements;
    /// refused when they ran one (the client's implicit transaction there,
    /// which a split would break).
    pub(super) async fn end_unsynced(&mut self) -> Result<Result<(), Refusal>, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let cur = self.be.cur;
        let open = self.be.slots[cur]
            .conn
            .as_ref()
            .filter(|b| b.unsynced)
            .map(|b| b.unsynced_ran);
        match open {
            None => {}
            // After an error there the backend skips to the client's
            // Sync, which the caller sends there (`skipped`).
            Some(false) if !self.skip_to_sync => self.sync_hidden().await?,
            // Inside a transaction block the Sync commits nothing.
            Some(true) if !self.skip_to_sync && self.in_block_at_sync() => {
                self.sync_hidden().await?
            }
            Some(_) => {
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "messages sent with Flush but without Sync are still open on one shard, and the next statement goes to another; send Sync first".into(),
                )))
            }
        }
        Ok(Ok(()))
    }

    /// Ends the current backend's unsynced messages with a Sync of the
    /// node's own and reads its answers (the ReadyForQuery not shown).
    /// Outside a transaction block that Sync may end the transaction: the
    /// backends then go back to the pool (`end_of_transaction`).
    async fn sync_hidden(&mut self) -> Result<(), SessionError> {
        self.pipeline_synced();
        // The node's queries that this Sync lets run on the backend (its
        // lookups, the settings read back) drop the client's unnamed
        // statement there: parsed again when the client binds it.
        let cur = self.be.cur;
        self.unnamed_replaced_on(&[cur]);
        let b = self.be.current_mut();
        b.unsynced = false;
        b.unsynced_ran = false;
        crate::wire::frame(&mut self.be.to_backend, crate::wire::fe::SYNC, |_| {});
        self.be.owed.push_back(Owed::HiddenSync);
        self.drain_owed().await
    }

    /// Reads the current backend until nothing is owed (before a statement
    /// goes to another shard, so replies stay in order).
    pub(crate) async fn drain_owed(&mut self) -> Result<(), SessionError> {
        self.flush_backend().await?;
        while !self.be.owed.is_empty() {
            let cur = self.be.cur;
            let Some(b) = self.be.slots[cur].conn.as_mut() else {
                break;
            };
            let f = match b.reader.next().await {
                Ok(f) => f,
                Err(e) => return Err(self.be.lost(cur, e)),
            };
            self.on_backend_frame(f).await?;
            if self.out.len() > 64 * 1024 {
                self.flush_client().await?;
            }
        }
        Ok(())
    }

    /// Waits while the admin console has paused this session's database,
    /// at most `query_wait_timeout_ms`; returns when that ends.
    pub(super) async fn wait_for_resume(&self) -> Option<tokio::time::Instant> {
        let deadline = self
            .node
            .cfg()
            .query_wait_timeout()
            .map(|l| tokio::time::Instant::now() + l);
        self.node
            .pause
            .wait(
                &self.database,
                deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
        deadline
    }

    /// Waits while the admin console has paused this session's database
    /// (bounded by `query_wait_timeout_ms`, counted from the start of the
    /// batch's wait if it waited already).
    async fn wait_while_paused(&self) -> Result<(), Refusal> {
        let limit = match self.pause_deadline {
            Some(d) => d.map(|d| d.saturating_duration_since(tokio::time::Instant::now())),
            None => self.node.cfg().query_wait_timeout(),
        };
        if self.node.pause.wait(&self.database, limit).await {
            return Ok(());
        }
        Err(Refusal::new(
            sqlstate::CANNOT_CONNECT_NOW,
            format!(
                "database \"{}\" is paused on this hotrepart node (PAUSE on the admin console) and was not resumed within query_wait_timeout_ms",
                self.database
            ),
        ))
    }

    pub(crate) async fn flush_client(&mut self) -> Result<(), SessionError> {
        if let Some(c) = self.capture.as_mut() {
            // A subquery's answer is kept, up to its limit.
            c.keep(&mut self.out);
            return Ok(());
        }
        // A part of a cut batch shows no ReadyForQuery of its own.
        self.scan_part();
        self.drop_hidden_parse_complete();
        if !self.out.is_empty() {
            self.stats.sending(&self.out);
            let w = self.client.get_mut();
            w.write_all(&self.out)
                .await
                .map_err(|_| SessionError::ClientGone)?;
            w.flush().await.map_err(|_| SessionError::ClientGone)?;
            self.out.clear();
            if let Some(p) = self.part.as_mut() {
                p.from = 0;
            }
            if let Some(h) = self.hide_parse_complete.as_mut() {
                *h = 0;
            }
        }
        Ok(())
    }

    pub(crate) async fn flush_backend(&mut self) -> Result<(), SessionError> {
        if self.be.to_backend.is_empty() {
            return Ok(());
        }
        let cur = self.be.cur;
        let Some(b) = self.be.slots[cur].conn.as_mut() else {
            self.be.to_backend.clear();
            return Ok(());
        };
        if let Err(e) = b.write_frames(&self.be.to_backend).await {
            self.be.to_backend.clear();
            return Err(self.be.lost(cur, WireError::Io(e)));
        }
        self.be.to_backend.clear();
        Ok(())
    }

    /// ReadyForQuery(idle) with nothing owed: read back session state if it
    /// may have changed, then return the backends (transaction mode).
    /// Reads the session state of shard `i`'s backend (where a SET may have
    /// run) and makes it the client's; the backend is labelled with it.
    pub(super) async fn refresh_state_from(&mut self, i: usize) {
        let sql = state::read_state_sql(&self.custom_settings);
        let Some(b) = self.be.slots[i].conn.as_mut() else {
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
                if b.status == tx::IDLE {
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
        // Boxed: see `ensure_namespace`.
        Box::pin(self.end_of_transaction_now()).await
    }

    async fn end_of_transaction_now(&mut self) -> Result<(), SessionError> {
        let ddl = std::mem::take(&mut self.ddl_sent);
        self.ddl_syncs = 0;
        self.txn.reset();
        if std::mem::take(&mut self.ns_private) {
            self.ns_under = None;
        }
        self.forget_portals();
        for i in 0..self.be.slots.len() {
            if let Some(b) = self.be.slots[i].conn.as_mut() {
                if b.status != tx::IDLE && !b.unsynced {
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
            for slot in &mut self.be.slots {
                if let Some(b) = slot.conn.as_mut() {
                    match b
                        .hidden_query("SELECT name FROM pg_catalog.pg_prepared_statements")
                        .await
                    {
                        Ok(rows) => {
                            // The node's own names only: a client's SQL
                            // PREPARE is the client's to deallocate.
                            b.prepared = rows
                                .into_iter()
                                .filter_map(|r| r.into_iter().next().flatten())
                                .filter(|n| n.starts_with("hr_"))
                                .collect();
                        }
                        Err(_) => b.broken = true,
                    }
                }
            }
            self.prepared_dirty = false;
        }
        // Before the backends are let go: whether one keeps the session's
        // temporary objects.
        self.read_temp_at_end().await;
        self.read_cursors_at_end().await;
        if !self.session_mode {
            for i in 0..self.be.slots.len() {
                // Kept, or released (closed instead when not idle and synced).
                self.let_go(i);
            }
            if let Some(u) = self.unnamed.as_mut() {
                u.on = None;
            }
            self.be.update_cancel();
        }
        if ddl {
            // Before the client can act on the end of its transaction
            // (its ReadyForQuery is not flushed yet), and after the
            // backends went back to the pool: every node forgets the
            // schema as it was.
            let node = self.node.clone();
            if let Err(e) = Box::pin(node.schema_changed(&self.database)).await {
                tracing::warn!(database = %self.database, error = %e, "could not record a schema change in the replicated catalog; retrying in the background");
                crate::wire::notice_response(
                    &mut self.out,
                    "01000",
                    &format!("the schema change ran, but other hotrepart nodes could not be told yet ({e}): until they are (this node keeps trying), they may route statements by the schema as it was"),
                );
            }
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
    pub(super) async fn settle_state(&mut self) -> Result<(), SessionError> {
        if !self.state_stale || self.be.mid_pipeline() {
            return Ok(());
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let mut settled = true;
        for i in 0..self.be.slots.len() {
            if !self.state_dirty[i] {
                continue;
            }
            match self.be.slots[i].conn.as_ref().map(|b| b.status) {
                // Lost with its backend: the next backend gets `state`.
                None => {}
                Some(tx::FAILED) => settled = false,
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

    /// Before routing a statement: a statement sent since the backends'
    /// last Sync (the client's pipeline ended with Flush) may have changed
    /// how names and literals read — `search_path`,
    /// `standard_conforming_strings` — which the node reads back only on
    /// a synced backend ([`Self::settle_state`]). Inside a transaction
    /// block those messages are ended with a hidden Sync (it commits
    /// nothing) and the settings are read again; outside one that Sync
    /// would commit the client's implicit transaction, so the statement is
    /// refused rather than routed under the old settings. (Temporary
    /// tables need no such care: one that would hide a declared table is
    /// refused when it is created, and the others route as undeclared
    /// tables, to where PostgreSQL reports a wrong guess.)
    pub(super) async fn settle_pipeline(&mut self) -> Result<Result<(), Refusal>, SessionError> {
        if !self.unsynced_settings || self.node.routing.single_shard() {
            return Ok(Ok(()));
        }
        if !self.be.mid_pipeline() {
            self.pipeline_synced();
            return Ok(Ok(()));
        }
        // Inside a transaction block — as the node knew it at the last
        // Sync, or as a BEGIN/COMMIT sent since left it (psycopg 3 sends
        // its BEGIN in the pipeline).
        if !self.in_block_at_sync() {
            self.unsynced_settings = false;
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a statement that may change search_path or standard_conforming_strings was sent with Flush but without Sync, and the next statement cannot be routed until that change is read back: send Sync after it (hotrepart routes a statement before it runs)".into(),
            )));
        }
        let ended = self.end_unsynced().await?;
        if self.skip_to_sync {
            // An error was owed: the batch is skipped to its Sync.
            return Ok(Ok(()));
        }
        if let Err(r) = ended {
            return Ok(Err(r));
        }
        self.unsynced_settings = false;
        self.settle_state().await?;
        self.settle_temp().await?;
        self.ensure_namespace().await?;
        Ok(Ok(()))
    }

    /// Where a probe of the shards' catalog (namespace, function and
    /// aggregate lookups) reads, and whether the node may keep what it
    /// read for every session. PostgreSQL resolves names by the latest
    /// committed catalog, whatever the transaction's snapshot: a query of
    /// `pg_class` in a REPEATABLE READ transaction sees it as of the
    /// snapshot, so it is read apart; a transaction that ran DDL sees its
    /// own uncommitted changes, which no other session may be told.
    pub(super) fn probe_at(&self) -> ProbeAt {
        if !self.txn.open() {
            ProbeAt::Shared
        } else if self.ddl_sent {
            ProbeAt::Private
        } else if self.snapshot_isolation() {
            ProbeAt::Apart
        } else {
            ProbeAt::Shared
        }
    }

    /// Whether the client's transaction block is open at the point its
    /// pipeline has reached: as the node knew it at the last Sync, or as
    /// a `BEGIN`/`COMMIT` sent since left it (psycopg 3 sends its `BEGIN`
    /// in the pipeline). A Sync there commits nothing when it is.
    pub(super) fn in_block_at_sync(&self) -> bool {
        self.unsynced_block.unwrap_or(self.txn.open())
    }

    /// The backends are synced: what the node kept of the pipeline's
    /// statements since the last Sync is over.
    pub(super) fn pipeline_synced(&mut self) {
        self.unsynced_settings = false;
        self.unsynced_block = None;
    }

    /// A Flush-ended batch went out (its Parses recorded): whether its
    /// Binds may change the settings routing reads, and what they do to the
    /// transaction block (see [`Self::settle_pipeline`]).
    pub(super) fn note_unsynced_binds(&mut self, frames: &[crate::wire::Frame]) {
        let (mut settings, mut block) = (false, None);
        for sql in self.bound_texts(frames) {
            settings |= classify(&sql).changes_routing_settings;
            block = block_effect(&sql).or(block);
        }
        self.unsynced_settings |= settings;
        if block.is_some() {
            self.unsynced_block = block;
        }
    }

    /// Before routing: the namespace unqualified names resolve in, for the
    /// client's current `search_path` ([`crate::routing::names`]), with the
    /// session's temporary relations (`session/temp.rs`).
    pub(super) async fn ensure_namespace(&mut self) -> Result<(), SessionError> {
        if self.node.routing.single_shard() {
            return Ok(());
        }
        // Boxed: the session's futures are near the worker stack's size in
        // debug builds, and the probe's is large.
        Box::pin(self.ensure_base_namespace()).await?;
        self.apply_temp_namespace();
        Ok(())
    }

    /// The namespace of the client's `search_path` as every session of its
    /// user and database sees it: from the node's cache, else read on the
    /// home shard on a backend carrying the client's settings (attached to
    /// its transaction if one is open; let go again if the session was
    /// idle).
    async fn ensure_base_namespace(&mut self) -> Result<(), SessionError> {
        // Per statement only this: the routing table's epoch, the catalog
        // generation and the setting, compared without allocating.
        let snap = self.node.routing.catalog.load_full();
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
            self.ns_base = Arc::default();
            self.ns_under = Some(under);
            return Ok(());
        }
        let key = (self.database.clone(), self.user.clone(), path);
        let at = self.probe_at();
        // After DDL in this transaction the shared cache holds the
        // committed schema, not the one this transaction sees.
        if at != ProbeAt::Private {
            if let Some(ns) = self.node.namespace(&key, fp) {
                self.ns_base = ns;
                self.ns_under = Some(under);
                return Ok(());
            }
        }
        let sql = crate::routing::names::probe_sql(&snap);
        let apart = if at == ProbeAt::Apart {
            let r = self.read_apart(&sql).await;
            if let Err(e) = &r {
                // Read in the transaction instead (its snapshot may miss
                // a newer relation: logged).
                tracing::warn!(error = %e, "cannot read the search path on a connection apart; reading it in the client's transaction");
            }
            r.ok()
        } else {
            None
        };
        if apart.is_none() && self.be.mid_pipeline() {
            return Ok(());
        }
        if apart.is_none() && !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let home = self.node.routing.home_index();
        let was_attached = self.be.slots[home].conn.is_some();
        let rows = if let Some(rows) = apart {
            Ok(rows)
        } else {
            if let Err(r) = self.ensure_backend(home).await? {
                tracing::warn!(error = %r.message, "cannot read the search path on the home shard");
                return Ok(());
            }
            match self.be.slots[home].conn.as_mut() {
                Some(b) => b.hidden_query(&sql).await.map_err(|e| e.to_string()),
                None => return Ok(()),
            }
        };
        match rows {
            Ok(rows) => {
                let ns = Arc::new(crate::routing::names::parse(rows));
                if at == ProbeAt::Private {
                    self.ns_private = true;
                } else {
                    self.node.learn_namespace(key, fp, ns.clone(), generation);
                }
                self.ns_base = ns;
                self.ns_under = Some(under);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the search path on the home shard"),
        }
        if !was_attached && !self.txn.open() && self.be.owed.is_empty() {
            self.let_go(home);
            self.be.update_cancel();
        }
        Ok(())
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
    pub(super) async fn settle_calls(
        &mut self,
        d: &mut Decision,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if d.calls.is_empty() {
            return Ok(Ok(()));
        }
        // Boxed: see `ensure_namespace`.
        Box::pin(self.settle_calls_now(d, t)).await
    }

    async fn settle_calls_now(
        &mut self,
        d: &mut Decision,
        t: usize,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if d.calls.is_empty() {
            return Ok(Ok(()));
        }
        if let (Some(r), false) = (created_here_reads_sharded(&self.node, d), d.hinted) {
            return Ok(Err(r));
        }
        let at = self.probe_at();
        let (unknown, mut known) = if at == ProbeAt::Private {
            // The cache holds the committed schema, not this transaction's.
            (d.calls.to_vec(), crate::node::Calls::default())
        } else {
            self.node.known_functions(&self.database, &d.calls)
        };
        if !unknown.is_empty() {
            // asyncpg prepares each new statement with Parse, Describe and
            // Flush before its Bind: a function that reads a sharded table
            // must not run unchecked on one shard then. Outside a block the
            // catalog is read on a connection apart (a hidden Sync there
            // would end the client's implicit transaction); inside one,
            // those messages are ended with a hidden Sync (it may have
            // created the function).
            let apart = (self.be.mid_pipeline() && !self.txn.open()) || at == ProbeAt::Apart;
            if self.be.mid_pipeline() && self.txn.open() && !apart {
                let ended = self.end_unsynced().await?;
                if self.skip_to_sync {
                    // An error was owed: the batch is skipped to its Sync.
                    d.write = true;
                    return Ok(Ok(()));
                }
                if ended.is_err() || self.be.mid_pipeline() {
                    return Ok(Err(Refusal::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "this statement calls {} — not looked up by hotrepart yet — in a pipeline whose earlier messages were sent with Flush and ran a statement: hotrepart cannot read the function's definition now; send Sync before it (or call the function once on its own first)",
                            unknown.join(", ")
                        ),
                    )));
                }
            }
            if !apart {
                if !self.be.owed.is_empty() {
                    self.drain_owed().await?;
                }
                if let Err(r) = self.ensure_backend(t).await? {
                    return Ok(Err(r));
                }
            }
            // Names as the router folds them (a quoted `"Put"` stays
            // `Put`), matched whatever their case: refusing a namesake
            // too is safe, missing a body is not.
            let list: Vec<String> = unknown
                .iter()
                .map(|n| format!("({})", state::quote_literal(n)))
                .collect();
            let generation = self.generation();
            let sql = format!(
                "SELECT v.n, pg_catalog.bool_or(p.provolatile OPERATOR(pg_catalog.=) 'v'::pg_catalog.char), \
                 pg_catalog.string_agg(pg_catalog.concat_ws(' ', p.prosrc, CASE WHEN p.prokind OPERATOR(pg_catalog.=) ANY (ARRAY['f', 'p']::pg_catalog.char[]) THEN pg_catalog.pg_get_functiondef(p.oid) END), ' ') \
                 FROM (VALUES {}) AS v(n) JOIN pg_catalog.pg_proc p ON pg_catalog.lower(p.proname::pg_catalog.text) OPERATOR(pg_catalog.=) pg_catalog.lower(v.n::pg_catalog.text) GROUP BY 1",
                list.join(", ")
            );
            let rows = if apart {
                self.read_apart(&sql).await.ok()
            } else {
                match self.be.slots[t].conn.as_mut() {
                    Some(b) => b.hidden_query(&sql).await.ok(),
                    None => None,
                }
            };
            // A simple Query drops the backend's unnamed statement
            // (PostgreSQL's exec_simple_query): parsed again when needed.
            self.unnamed_replaced_on(&[t]);
            let Some(rows) = rows else {
                // Never run unchecked: the function could read one shard's
                // rows of a sharded table.
                return Ok(Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "cannot read the definition of {} in the shard's catalog (pg_proc) to check that it reads no sharded table (it would see one shard's rows); try again",
                        unknown.join(", ")
                    ),
                )));
            };
            let sharded = sharded_names(&self.node);
            let mut found = HashMap::new();
            for r in rows {
                let mut r = r.into_iter();
                let (Some(Some(name)), Some(vol), Some(src)) = (r.next(), r.next(), r.next())
                else {
                    continue;
                };
                let info = crate::node::FunctionInfo {
                    volatile: vol.as_deref() == Some("t"),
                    reads: src
                        .as_deref()
                        .and_then(|src| hotrepart_router::classify::names_table(src, &sharded)),
                };
                found.insert(name, info);
            }
            if at != ProbeAt::Private {
                self.node
                    .learn_functions(&self.database, &unknown, &found, generation);
            }
            // From what was read, not from the cache: a schema change
            // meanwhile leaves it unlearned.
            for n in &unknown {
                if let Some(info) = found.get(n) {
                    known.add(n, info);
                }
            }
        }
        if let (Some((f, table)), false) = (&known.reads, d.hinted) {
            return Ok(Err(body_names_sharded(f, table)));
        }
        if known.volatile.is_some() {
            d.write = true;
        }
        Ok(Ok(()))
    }

    /// Before a statement runs on several shards: the refusals the router
    /// cannot make without the session (its temporary objects,
    /// [`Self::check_temp`]) or the shards' catalog (a call to a
    /// user-defined aggregate, which it plans as a scalar function).
    pub(super) async fn check_multi_shard(
        &mut self,
        d: &Decision,
    ) -> Result<Result<(), Refusal>, SessionError> {
        // Boxed: see `ensure_namespace`.
        Box::pin(self.check_multi_shard_now(d)).await
    }

    async fn check_multi_shard_now(
        &mut self,
        d: &Decision,
    ) -> Result<Result<(), Refusal>, SessionError> {
        let Target::Multi { shards, .. } = &d.target else {
            return Ok(Ok(()));
        };
        if let Err(r) = self.check_temp(d, shards) {
            return Ok(Err(r));
        }
        if shards.len() < 2 || d.ddl {
            return Ok(Ok(()));
        }
        let names = hotrepart_router::classify::called_names(&d.sql_text);
        let at = self.probe_at();
        let (unknown, mut found) = if at == ProbeAt::Private {
            (names.clone(), None)
        } else {
            self.node.known_aggregates(&self.database, &names)
        };
        if found.is_none() && !unknown.is_empty() {
            let t = shards[0];
            if at != ProbeAt::Apart {
                if let Err(r) = self.ensure_backend(t).await? {
                    return Ok(Err(r));
                }
            }
            let list: Vec<String> = unknown.iter().map(|n| state::quote_literal(n)).collect();
            let generation = self.generation();
            let sql = format!(
                "SELECT DISTINCT pg_catalog.lower(proname::pg_catalog.text) FROM pg_catalog.pg_proc WHERE prokind OPERATOR(pg_catalog.=) 'a'::pg_catalog.char AND pg_catalog.lower(proname::pg_catalog.text) OPERATOR(pg_catalog.=) ANY (ARRAY[{}]::pg_catalog.text[])",
                list.join(", ")
            );
            let rows = if at == ProbeAt::Apart {
                self.read_apart(&sql).await.ok()
            } else {
                let rows = match self.be.slots[t].conn.as_mut() {
                    Some(b) => b.hidden_query(&sql).await.ok(),
                    None => None,
                };
                // A simple Query drops the backend's unnamed statement
                // (PostgreSQL's exec_simple_query): parsed again when needed.
                self.unnamed_replaced_on(&[t]);
                rows
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
            if at != ProbeAt::Private {
                self.node
                    .learn_aggregates(&self.database, &unknown, &aggs, generation);
            }
            found = aggs.into_iter().next();
        }
        if let Some(name) = found {
            return Ok(Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("aggregate function {name}() cannot be combined across shards (hotrepart combines count, sum, min, max, avg, bool_and, bool_or, array_agg, jsonb_agg, string_agg); pin the statement to one shard with its shard key"),
            )));
        }
        Ok(Ok(()))
    }

    /// A multi-shard statement the merger answers may write (a volatile
    /// function, FOR UPDATE): inside a transaction every shard is marked
    /// written (COMMIT then uses two-phase commit); outside one it is
    /// refused, as the merger runs each shard's part in its own implicit
    /// transaction and could not commit them atomically.
    pub(super) fn check_merged_write(
        &mut self,
        d: &Decision,
        shards: &[usize],
    ) -> Result<(), Refusal> {
        if !d.write {
            return Ok(());
        }
        if !self.txn.open() {
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
            self.txn.note_write(t);
        }
        Ok(())
    }

    /// The shard a decision's statement runs on first (for lookups).
    pub(super) fn first_shard(&self, d: &Decision) -> usize {
        match &d.target {
            Target::Shard(t) => *t,
            Target::Multi { shards, .. } if !shards.is_empty() => shards[0],
            _ => self.default_shard(),
        }
    }

    pub(crate) fn note_sql(&mut self, sql: &str, shard: usize) {
        self.note_set_transaction(sql);
        self.note_class(classify(sql), shard)
    }

    /// `SET TRANSACTION …` inside a transaction: kept with its BEGIN.
    pub(crate) fn note_set_transaction(&mut self, sql: &str) {
        if self.txn.open() && hotrepart_router::classify::set_transaction(sql) {
            // A shard joining the transaction later begins it with the
            // same characteristics (Sequelize: `START TRANSACTION;` then
            // `SET TRANSACTION ISOLATION LEVEL …`).
            let begin = self.txn.begin.get_or_insert_with(|| "BEGIN".into());
            let stmt = sql.trim().trim_end_matches(';');
            if !begin.ends_with(stmt) {
                begin.push_str("; ");
                begin.push_str(stmt);
            }
        }
    }

    /// [`Self::note_sql`] with the statement already classified.
    pub(crate) fn note_class(&mut self, class: Class<'_>, shard: usize) {
        self.note_temp(&class, shard);
        if class.schema_change {
            self.note_ddl();
            // Checked before the transaction's two-phase commit
            // (`exec/unique.rs`), also when other statements share its string.
            self.txn.schema_changed = true;
        }
        if class.changes_state {
            if class.snapshot_isolation {
                self.txn.snapshot_isolation = true;
            }
            self.state_dirty[shard] = true;
            self.state_stale = true;
            match class.custom_settings {
                Some(names) => self.custom_settings.extend(names),
                // A setting we cannot name cannot be read back: this
                // backend is closed instead of pooled.
                None => {
                    if let Some(b) = self.be.slots[shard].conn.as_mut() {
                        b.broken = true;
                    }
                }
            }
        }
        if class.drops_prepared {
            self.prepared_dirty = true;
        }
    }
}

/// The refusal of a call of function `f`, whose body names sharded table
/// `table`.
fn body_names_sharded(f: &str, table: &str) -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "function {f}() names sharded table \"{table}\" in its body: hotrepart cannot tell which rows it reads or writes, \
             so the statement would run on one shard and see or change that shard's rows only; \
             run it on the shard you mean with /* hotrepart: shard=NAME */ or SET hotrepart.shard"
        ),
    )
}

/// A query string that creates a function and calls it (Sequelize's
/// `findOrCreate` sends `CREATE FUNCTION pg_temp.testfunc() … INSERT INTO
/// users …; SELECT … FROM pg_temp.testfunc(); DROP FUNCTION …`): the body
/// is not in `pg_proc` yet when the string is routed, so it is read from
/// the string. The refusal when the body names a sharded table.
fn created_here_reads_sharded(node: &crate::node::Node, d: &Decision) -> Option<Refusal> {
    let created = hotrepart_router::classify::created_functions(&d.sql_text);
    if created.is_empty() {
        return None;
    }
    let sharded = sharded_names(node);
    created
        .iter()
        .filter(|(name, _)| d.calls.iter().any(|c| c == name))
        .find_map(|(name, text)| {
            hotrepart_router::classify::names_table(text, &sharded)
                .map(|table| body_names_sharded(name, &table))
        })
}

/// The declared sharded tables' names as a function body would write them
/// (last part, lower case), for `classify::names_table`.
fn sharded_names(node: &crate::node::Node) -> Vec<String> {
    node.routing
        .catalog
        .load()
        .sharded_tables()
        .map(|t| {
            t.name
                .rsplit('.')
                .next()
                .unwrap_or(&t.name)
                .to_ascii_lowercase()
        })
        .collect()
}

/// What statement `sql` does to the transaction block: `BEGIN`/`START
/// TRANSACTION` opens one (true); `COMMIT`, `END`, `ROLLBACK`, `ABORT`,
/// `PREPARE TRANSACTION` end it (false); anything else (a savepoint's
/// `ROLLBACK TO`, `COMMIT PREPARED` of another transaction) leaves it.
fn block_effect(sql: &str) -> Option<bool> {
    use hotrepart_router::classify::{first_keyword_is, savepoint};
    if first_keyword_is(sql, "begin") || first_keyword_is(sql, "start") {
        return Some(true);
    }
    let ends = ["commit", "end", "rollback", "abort"]
        .iter()
        .any(|w| first_keyword_is(sql, w));
    if ends && savepoint(sql).is_none() && !classify(sql).two_phase {
        return Some(false);
    }
    if first_keyword_is(sql, "prepare") && classify(sql).two_phase {
        return Some(false);
    }
    None
}

/// See [`Session::probe_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeAt {
    /// On the session's backend; kept for every session.
    Shared,
    /// On a connection of its own (latest committed catalog); kept for
    /// every session.
    Apart,
    /// On the session's backend, in its transaction; kept for this
    /// transaction only.
    Private,
}

/// Reads how text compares on shard `t`'s database `database` through
/// connection `b` (`CATALOG_PROBE`), unless the node knows it. Needed by
/// the merger: text is ordered across shards only when the database and
/// every user column order bytewise, or rank alike. A failed read leaves it
/// unknown (a merge that needs it is refused, naming that).
pub(crate) async fn learn_text_collation(
    node: &crate::node::Node,
    database: &str,
    t: usize,
    b: &mut crate::backend::conn::BackendConn,
) {
    if node.knows_text_collation(t, database) {
        return;
    }
    let generation = node
        .catalog_generation
        .load(std::sync::atomic::Ordering::SeqCst);
    if let Ok(rows) = b.hidden_query(CATALOG_PROBE).await {
        if let Some(row) = rows.first() {
            let why = |i: usize| row.get(i).cloned().flatten().map_or(Ok(()), Err);
            let c = crate::node::TextCollation {
                bytewise: why(0),
                equality: why(1),
                uniform: why(2),
                identity: row.get(3).cloned().flatten().unwrap_or_default(),
            };
            node.set_text_collation(t, database, c, generation);
        }
    }
}
