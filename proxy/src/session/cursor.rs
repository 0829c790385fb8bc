//! SQL cursors (`DECLARE`, `FETCH`, `MOVE`, `CLOSE`) through the node.
//!
//! - *Routing*: a cursor statement is read by the lexer
//!   ([`hotrepart_router::classify::cursor_command`]). `DECLARE` routes as
//!   its query does ([`Session::decide_sql`]); a query on one shard (or on
//!   none: `Any`) declares the cursor there, and the session remembers the
//!   cursor's name (case-folded as PostgreSQL does) and shard, so `FETCH`,
//!   `MOVE` and `CLOSE` of it go there, in the simple and the extended
//!   protocol (a Describe of the portal of that name too). A cursor the
//!   session does not know goes to the current (else the home) shard,
//!   where PostgreSQL answers, mostly with "cursor does not exist".
//! - *Several shards*: a `DECLARE` whose query reads rows of several
//!   shards (or whose one shard runs its own text of it: a range being
//!   moved hidden there), alone in a simple Query or an extended batch,
//!   inside a transaction block (or `WITH HOLD`), is declared on each shard and served by
//!   the node ([`crate::exec::merge::cursor`]): [`Session::cursor_by_node`]
//!   (simple), [`Session::cursor_batch_by_node`] (extended: DECLARE,
//!   Describe of its portal, FETCH/MOVE/CLOSE prepared and bound). What it
//!   cannot serve is refused (0A000) with words that say what to do.
//! - *WITH HOLD under transaction pooling*: a holdable cursor lives in one
//!   backend's session after its transaction. What the backend holds is
//!   read back from PostgreSQL (`pg_cursors`), never guessed: at the end
//!   of a transaction in which the session declared one on that backend,
//!   or while it holds some. While it holds one, the session keeps that
//!   backend, through the same mechanism as for temporary objects
//!   (`session/temp.rs`: `Slot::kept`, [`Session::let_go`],
//!   `ensure_backend`), until the cursors are closed (`CLOSE`,
//!   `CLOSE ALL`, `DISCARD ALL`, read back as gone) or the session ends:
//!   then the backend runs `CLOSE ALL` before it goes back to the pool
//!   (closed if that fails). No other client ever sees the cursor.
//!   A holdable cursor merged over several shards keeps a backend on each
//!   of them; it stays while its name is read back on each (a shard that
//!   lost it — ROLLBACK, DISCARD ALL, a backend that died — loses it for
//!   the client: the other shards' parts are `stale`, closed there at their
//!   next read back, the name meanwhile no cursor, 34000).
//! - Cursors without hold end with their transaction: forgotten at its end.

use super::conn::*;
use crate::backend::pool::Pooled;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::error::SessionError;
use crate::exec::merge::cursor::{self as merged, Merged};
use crate::routing::{BindParams, Decision, Target};
use crate::stats::Route;
use crate::wire::{self, fe, tx, Frame};
use crate::wire::{command_complete, rfq};
use bytes::BufMut;
use hotrepart_router::classify::{cursor_command, first_keyword_is, CursorCommand, Direction};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// The session's open cursors, as far as the node knows them.
#[derive(Default)]
pub(crate) struct Cursors {
    /// By name (as PostgreSQL reads it): the shard and whether it holds.
    open: HashMap<String, OpenCursor>,
    /// Shards where a holdable cursor may have been declared in the open
    /// transaction: read back at its end.
    reread: Vec<usize>,
    /// (shard, name) of a holdable cursor merged over several shards that
    /// the session dropped because another of its shards lost it (that
    /// backend died, a `DISCARD ALL` there): still open on this shard's
    /// backend, which is kept until the cursor is closed there (at its
    /// next read back) and never pooled with it; the name reads as no
    /// cursor meanwhile.
    stale: Vec<(usize, String)>,
    /// The session sent a statement that may declare a holdable cursor:
    /// its backends run `CLOSE ALL` before they go back to the pool when it
    /// ends, whatever the node knows of them (a DECLARE cut short by a lost
    /// connection leaves parts it never recorded).
    pub(crate) ever_held: bool,
}

struct OpenCursor {
    /// Its shard (a merged cursor: the first of its shards).
    shard: usize,
    hold: bool,
    /// Declared on several shards and served by the node.
    merged: Option<Box<Merged>>,
    /// A protocol portal served as a merged cursor: its Bind's result
    /// formats (none: text, as a cursor's FETCH gives).
    formats: Vec<i16>,
    /// Savepoints open (over several shards) when it was opened: a
    /// ROLLBACK TO an earlier one closes it, as PostgreSQL does.
    depth: usize,
}

impl OpenCursor {
    fn on(&self, i: usize) -> bool {
        self.shard == i || self.merged.as_ref().is_some_and(|m| m.shards.contains(&i))
    }
}

impl Cursors {
    /// Whether shard `i`'s backend holds a holdable cursor of the session.
    pub(crate) fn holds_on(&self, i: usize) -> bool {
        self.open.values().any(|c| c.hold && c.on(i)) || self.stale.iter().any(|(s, _)| *s == i)
    }

    /// The backend of shard `i` was closed (or died): its cursors with it;
    /// a holdable merged one stays open on its other shards (`stale`).
    pub(crate) fn forget_shard(&mut self, i: usize) {
        self.stale.retain(|(s, _)| *s != i);
        self.drop_on(i, |_, _| false);
        self.reread.retain(|&x| x != i);
    }

    /// Drops the cursors on shard `i` that `keep` does not keep; the parts
    /// on its other shards of a holdable merged one dropped are `stale`.
    fn drop_on(&mut self, i: usize, keep: impl Fn(&str, &OpenCursor) -> bool) {
        let mut stale = std::mem::take(&mut self.stale);
        self.open.retain(|name, c| {
            if !c.on(i) || keep(name, c) {
                return true;
            }
            if let Some(m) = c.merged.as_ref().filter(|_| c.hold) {
                stale.extend(
                    m.shards
                        .iter()
                        .filter(|&&j| j != i)
                        .map(|&j| (j, name.clone())),
                );
            }
            false
        });
        self.stale = stale;
    }

    /// Whether `name` is a merged holdable cursor the session dropped
    /// (see `stale`).
    fn is_stale(&self, name: &str) -> bool {
        self.stale.iter().any(|(_, n)| n == name)
    }

    /// PostgreSQL's 42P03 for a DECLARE of `name` the node must refuse
    /// itself: a cursor it serves over several shards (or a part of one
    /// still open), or any cursor of the session when the new one is
    /// merged (`merged`) — its DECLARE would fail on some shards only.
    fn taken(&self, name: &str, merged: bool) -> Option<Refusal> {
        let open = self
            .open
            .get(name)
            .is_some_and(|c| merged || c.merged.is_some());
        (open || self.is_stale(name)).then(|| {
            Refusal::new(
                sqlstate::DUPLICATE_CURSOR,
                format!("cursor \"{name}\" already exists"),
            )
        })
    }

    /// ROLLBACK TO the savepoint at index `i` of the open ones: the cursors
    /// opened after it are closed (PostgreSQL closed them on every shard).
    pub(crate) fn rolled_back_to(&mut self, i: usize) {
        self.open.retain(|_, c| c.depth <= i);
    }

    /// RELEASE of the savepoint at index `i`: cursors opened after it now
    /// belong to the one before.
    pub(crate) fn released(&mut self, i: usize) {
        for c in self.open.values_mut() {
            c.depth = c.depth.min(i);
        }
    }

    /// The shard of the cursor `name`, if the session knows it.
    fn shard_of(&self, name: &str) -> Option<usize> {
        self.open.get(name).map(|c| c.shard)
    }
}

/// The words of a refusal of a cursor over several shards.
fn multi_shard_cursor() -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "DECLARE CURSOR: the cursor's query reads rows of several shards; hotrepart serves such a cursor only when its DECLARE comes alone (a simple query, or Parse, Bind, Describe, Execute and Sync of it alone), in a transaction block; or restrict the query to one shard by its shard key (or a /* hotrepart: shard=NAME */ hint)".into(),
    )
}

fn refuse(m: impl Into<String>) -> Refusal {
    Refusal::new(sqlstate::FEATURE_NOT_SUPPORTED, m.into())
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Routes one statement string: a cursor statement by its cursor
    /// (`DECLARE` by its query), anything else by the router.
    pub(crate) fn decide_sql(
        &self,
        sql: &str,
        params: Option<&BindParams>,
    ) -> Result<Decision, Refusal> {
        let Some(cmd) = cursor_command(sql) else {
            return self.node.decide(sql, params, &self.route_ctx());
        };
        let name = match cmd {
            CursorCommand::Declare(d) => {
                if let Some(r) = self.cursors.taken(&d.name, false) {
                    return Err(r);
                }
                let mut dec = self.node.decide(d.query, params, &self.route_ctx())?;
                if needs_node(&dec.target) {
                    return Err(multi_shard_cursor());
                }
                if let Target::Multi { shards, .. } = &dec.target {
                    dec.target = shards.first().map_or(Target::Any, |&t| Target::Shard(t));
                }
                // The text the shard runs is the client's DECLARE.
                dec.merge = None;
                dec.returns_rows = false;
                return Ok(dec);
            }
            CursorCommand::Fetch { name, .. } => Some(name),
            CursorCommand::Close(name) => name,
        };
        if let Some(n) = name.as_deref().filter(|n| self.cursors.is_stale(n)) {
            // Its other shards' part is gone: its rows would be one shard's.
            return Err(Refusal::new(
                sqlstate::INVALID_CURSOR_NAME,
                format!("cursor \"{n}\" does not exist (it was closed with the connection to one of its shards)"),
            ));
        }
        let merged = match &name {
            Some(n) => self.cursors.open.get(n).is_some_and(|c| c.merged.is_some()),
            None => self.cursors.open.values().any(|c| c.merged.is_some()),
        };
        if merged {
            // Served by the node (`Session::cursor_by_node`,
            // `Session::merged_use_batch`) when it comes alone.
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "FETCH, MOVE or CLOSE of a cursor whose query reads rows of several shards must come alone (a simple query, or one statement up to Sync in the extended protocol): hotrepart answers it itself".into(),
            ));
        }
        let mut d = Decision::single_on(self.default_shard());
        d.target = match name.and_then(|n| self.cursors.shard_of(&n)) {
            Some(t) => Target::Shard(t),
            None => match self.cursor_shards().as_slice() {
                // CLOSE ALL where the cursors are.
                [t] if name_is_all(sql) => Target::Shard(*t),
                _ => Target::Any,
            },
        };
        Ok(d)
    }

    /// A simple-protocol cursor statement the node answers itself: a
    /// `DECLARE` whose query reads rows of several shards (declared on
    /// each, merged by the node), `FETCH`/`MOVE`/`CLOSE` of such a cursor,
    /// `CLOSE ALL` while cursors are open on several shards. True when
    /// answered (ReadyForQuery included); false: route it as any statement.
    pub(super) async fn cursor_by_node(&mut self, sql: &str) -> Result<bool, SessionError> {
        if self.node.routing.single_shard() {
            return Ok(false);
        }
        let Some(cmd) = cursor_command(sql) else {
            return Ok(false);
        };
        let r = match cmd {
            CursorCommand::Declare(d) => {
                let routed = self
                    .route_waiting(|s| s.node.decide(d.query, None, &s.route_ctx()))
                    .await;
                let Ok(dec) = routed else {
                    // The ordinary path reports it.
                    return Ok(false);
                };
                if !needs_node(&dec.target) {
                    return Ok(false);
                }
                let Target::Multi { shards, sqls } = &dec.target else {
                    return Ok(false);
                };
                let (shards, sqls) = (shards.clone(), sqls.clone());
                // A REPEATABLE READ transaction whose snapshot predates a
                // range's move must not read it on the new owner.
                match self.check_owner_change(&dec) {
                    Err(r) => Err(r),
                    Ok(()) => {
                        self.declare_merged(&d, &dec, &shards, sqls.as_deref(), None)
                            .await?
                    }
                }
            }
            CursorCommand::Fetch {
                name,
                direction,
                is_move,
            } => {
                let Some(mut m) = self
                    .cursors
                    .open
                    .get_mut(&name)
                    .and_then(|c| c.merged.take())
                else {
                    return Ok(false);
                };
                let r: Result<Result<(), Refusal>, SessionError> = match direction {
                    Direction::Other(dir) => Ok(Err(merged::direction_refused(&dir))),
                    _ if self.txn.failed => Ok(Err(aborted())),
                    Direction::Forward(n) => {
                        let mut r = Ok(Ok(()));
                        if !self.be.owed.is_empty() {
                            r = self.drain_owed().await.map(Ok);
                        }
                        if matches!(r, Ok(Ok(()))) {
                            r = self.attach_shards(&m.shards).await;
                        }
                        if matches!(r, Ok(Ok(()))) {
                            self.stats.note_route(Route::Merge);
                            let how = merged::FetchOut {
                                describe: true,
                                formats: Vec::new(),
                                portal: false,
                            };
                            r = merged::fetch(self, &mut m, n, is_move, &how).await.map(Ok);
                        }
                        r
                    }
                };
                // Put back before an error ends the session: its shards
                // count as holding it (`holds_on`) until then.
                if let Some(c) = self.cursors.open.get_mut(&name) {
                    c.merged = Some(m);
                }
                r?
            }
            CursorCommand::Close(Some(name)) => {
                if self
                    .cursors
                    .open
                    .get(&name)
                    .is_none_or(|c| c.merged.is_none())
                {
                    return Ok(false);
                }
                if self.txn.failed {
                    Err(aborted())
                } else {
                    if self.close_merged(&name).await? {
                        self.out.put_slice(&command_complete("CLOSE CURSOR"));
                    }
                    Ok(())
                }
            }
            CursorCommand::Close(None) => {
                let shards = self.cursor_shards();
                let any_merged = self.cursors.open.values().any(|c| c.merged.is_some());
                if shards.len() < 2 && !any_merged {
                    return Ok(false);
                }
                if self.txn.failed {
                    Err(aborted())
                } else {
                    let r = self.close_all_on(&shards).await?;
                    if r.is_ok() {
                        self.out.put_slice(&command_complete("CLOSE CURSOR"));
                    }
                    r
                }
            }
        };
        self.release_after_cursor().await?;
        match r {
            Err(r) => self.refuse_simple(r),
            Ok(()) => {
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
        }
        Ok(true)
    }

    /// Attaches a backend on each of `shards` (a merged holdable cursor
    /// used outside the transaction that declared it: the backends the
    /// session keeps for it).
    async fn attach_shards(
        &mut self,
        shards: &[usize],
    ) -> Result<Result<(), Refusal>, SessionError> {
        for &t in shards {
            if let Err(r) = self.ensure_backend(t).await? {
                return Ok(Err(r));
            }
        }
        self.be.update_cancel();
        Ok(Ok(()))
    }

    /// Outside a transaction block, after a cursor statement the node
    /// answered: the backends it attached end their work as after any
    /// statement (those holding the session's holdable cursors are kept,
    /// `let_go`).
    async fn release_after_cursor(&mut self) -> Result<(), SessionError> {
        if !self.txn.open() && self.be.owed.is_empty() && !self.be.mid_pipeline() {
            self.end_of_transaction().await?;
        }
        Ok(())
    }

    /// `DECLARE` of a cursor over `shards` (`dec`: its query's decision).
    async fn declare_merged(
        &mut self,
        d: &hotrepart_router::classify::Declare<'_>,
        dec: &Decision,
        shards: &[usize],
        sqls: Option<&[String]>,
        ext: Option<Ext<'_>>,
    ) -> Result<Result<(), Refusal>, SessionError> {
        if !self.txn.open() && !d.hold {
            return Ok(Err(Refusal::new(
                sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                "DECLARE CURSOR can only be used in transaction blocks".into(),
            )));
        }
        if self.txn.failed {
            return Ok(Err(aborted()));
        }
        if let Some(r) = self.cursors.taken(&d.name, true) {
            return Ok(Err(r));
        }
        let what = if d.scroll {
            Some("SCROLL (it is read forward only)")
        } else if d.binary {
            Some("BINARY")
        } else {
            None
        };
        if let Some(w) = what {
            return Ok(Err(refuse(format!(
                "DECLARE CURSOR: the query reads rows of several shards (or of a range being moved), and such a cursor cannot be {w}; declare it without, or restrict the query to one shard by its shard key"
            ))));
        }
        if let Err(r) = merged::check_plan(dec.merge.as_deref()) {
            return Ok(Err(r));
        }
        if let Err(r) = self.check_multi_shard(dec).await? {
            return Ok(Err(r));
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let texts: Vec<String> = (0..shards.len())
            .map(|i| match (sqls.and_then(|v| v.get(i)), &dec.merge) {
                (Some(t), _) => t.clone(),
                (None, Some(p)) => p.shard_sql.clone(),
                (None, None) => d.query.to_owned(),
            })
            .collect();
        self.stats.note_route(Route::Merge);
        if let Some(x) = &ext {
            // What PostgreSQL answers before the statement runs.
            if let Some(p) = x.parse {
                if !self.record_parse(p)? {
                    // A duplicate name: the error is queued.
                    return Ok(Ok(()));
                }
                self.out.put_slice(&wire::parse_complete());
            }
            wire::frame(&mut self.out, wire::be::BIND_COMPLETE, |_| {});
        }
        let params = ext.as_ref().map(|x| &x.params);
        self.cursors.ever_held |= d.hold;
        match merged::declare(
            self,
            &d.name,
            shards,
            dec.merge.clone(),
            &texts,
            params,
            d.hold,
        )
        .await?
        {
            Ok(m) => {
                if ext.as_ref().is_some_and(|x| x.describe) {
                    wire::frame(&mut self.out, wire::be::NO_DATA, |_| {});
                }
                self.cursors.open.insert(
                    d.name.clone(),
                    OpenCursor {
                        shard: shards[0],
                        hold: d.hold,
                        merged: Some(Box::new(m)),
                        formats: Vec::new(),
                        depth: self.txn.savepoints.len(),
                    },
                );
                self.out.put_slice(&command_complete("DECLARE CURSOR"));
            }
            Err(e) => {
                self.out.put_slice(&e);
                if self.txn.open() {
                    self.txn.failed = true;
                }
            }
        }
        Ok(Ok(()))
    }

    /// An extended-protocol batch the node answers itself: a `DECLARE`
    /// whose query reads rows of several shards (psycopg's server-side
    /// cursors send it so), or a Describe of the portal of a cursor merged
    /// by the node. True when answered.
    pub(super) async fn cursor_batch_by_node(
        &mut self,
        frames: &[Frame],
        synced: bool,
    ) -> Result<bool, SessionError> {
        if self.node.routing.single_shard() {
            return Ok(false);
        }
        let any_merged = self.cursors.open.values().any(|c| c.merged.is_some());
        if any_merged {
            if let Some(done) = self.merged_use_batch(frames, synced).await? {
                return Ok(done);
            }
            if let Some(done) = self.merged_portal_batch(frames, synced).await? {
                return Ok(done);
            }
        }
        if self.portal_bind_by_node(frames, synced).await? {
            return Ok(true);
        }
        let merged_portal = |s: &Self, f: &Frame| {
            let b = f.body();
            any_merged
                && f.tag() == fe::DESCRIBE
                && b.first() == Some(&wire::PORTAL)
                && wire::get_cstr(&mut &b[1..])
                    .is_ok_and(|n| s.cursors.open.get(n).is_some_and(|c| c.merged.is_some()))
        };
        let declares = frames.iter().any(|f| {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let _ = wire::get_cstr(&mut b);
                    wire::get_cstr(&mut b).is_ok_and(|sql| first_keyword_is(sql, "declare"))
                }
                fe::BIND => {
                    let _ = wire::get_cstr(&mut b);
                    wire::get_cstr(&mut b).is_ok_and(|stmt| {
                        self.bound_sql(stmt, &None, None)
                            .is_some_and(|sql| first_keyword_is(&sql, "declare"))
                    })
                }
                _ => false,
            }
        });
        if !declares {
            // Describes of merged cursors' portals alone: answered here.
            if !frames.iter().any(|f| merged_portal(self, f))
                || !frames
                    .iter()
                    .all(|f| f.tag() == fe::SYNC || f.tag() == fe::FLUSH || merged_portal(self, f))
            {
                return Ok(false);
            }
            if !self.be.owed.is_empty() {
                self.drain_owed().await?;
            }
            for f in frames {
                if f.tag() != fe::DESCRIBE {
                    continue;
                }
                let name = wire::get_cstr(&mut &f.body()[1..]).unwrap_or_default();
                if let Some(m) = self.cursors.open.get(name).and_then(|c| c.merged.as_ref()) {
                    merged::row_description(m, &mut self.out, &|_| false);
                }
            }
            if synced {
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
            return Ok(true);
        }
        // The DECLARE's Bind: its statement and parameters.
        let mut unnamed: Option<Arc<str>> = None;
        let mut named: HashMap<&str, Arc<str>> = HashMap::new();
        let mut bound = None;
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let (Ok(name), Ok(sql)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b))
                    else {
                        return Ok(false);
                    };
                    if name.is_empty() {
                        unnamed = Some(Arc::from(sql));
                    } else {
                        named.insert(name, Arc::from(sql));
                    }
                }
                fe::BIND => {
                    let (Ok(_), Ok(stmt)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b)) else {
                        return Ok(false);
                    };
                    let Some(sql) = self.bound_sql(stmt, &unnamed, named.get(stmt)) else {
                        return Ok(false);
                    };
                    let Ok(params) = BindParams::parse(b) else {
                        return Ok(false);
                    };
                    if bound.is_some() {
                        // Several statements: the ordinary path.
                        return Ok(false);
                    }
                    bound = Some((sql, params));
                }
                _ => {}
            }
        }
        let Some((sql, params)) = bound else {
            return Ok(false);
        };
        let Some(CursorCommand::Declare(d)) = cursor_command(&sql) else {
            return Ok(false);
        };
        let routed = self
            .route_waiting(|s| s.node.decide(d.query, Some(&params), &s.route_ctx()))
            .await;
        let Ok(dec) = routed else {
            return Ok(false);
        };
        if !needs_node(&dec.target) {
            return Ok(false);
        }
        let Target::Multi { shards, sqls } = &dec.target else {
            return Ok(false);
        };
        let (shards, sqls) = (shards.clone(), sqls.clone());
        if let Err(r) = self.check_owner_change(&dec) {
            self.batch_error(&r, synced);
            return Ok(true);
        }
        let ext = match merged::declare_batch(self, frames, synced)? {
            Ok(p) => p,
            Err(r) => {
                self.batch_error(&r, synced);
                return Ok(true);
            }
        };
        let parse = frames.iter().find(|f| f.tag() == fe::PARSE);
        let describe = frames.iter().any(|f| f.tag() == fe::DESCRIBE);
        let ext = Ext {
            params: ext,
            parse,
            describe,
        };
        match self
            .declare_merged(&d, &dec, &shards, sqls.as_deref(), Some(ext))
            .await?
        {
            Err(r) => self.batch_error(&r, synced),
            Ok(()) => {
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
        }
        if synced {
            self.release_after_cursor().await?;
        }
        Ok(true)
    }

    /// An extended-protocol batch of `FETCH`, `MOVE` or `CLOSE` of a
    /// cursor merged by the node (tokio-postgres prepares and binds a
    /// FETCH; psycopg does for binary rows): answered here. None: not one.
    async fn merged_use_batch(
        &mut self,
        frames: &[Frame],
        synced: bool,
    ) -> Result<Option<bool>, SessionError> {
        let mut parsed: Option<(&Frame, String, Arc<str>)> = None;
        let mut bind: Option<(&Frame, Arc<str>)> = None;
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let (Ok(name), Ok(sql)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b))
                    else {
                        return Ok(None);
                    };
                    if parsed.is_some() {
                        return Ok(None);
                    }
                    parsed = Some((f, name.to_owned(), Arc::from(sql)));
                }
                fe::BIND => {
                    let (Ok(_), Ok(stmt)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b)) else {
                        return Ok(None);
                    };
                    let here = parsed
                        .as_ref()
                        .filter(|(_, n, _)| n == stmt)
                        .map(|(_, _, s)| s.clone());
                    let sql = here.or_else(|| self.bound_sql(stmt, &None, None));
                    let (Some(sql), None) = (sql, &bind) else {
                        return Ok(None);
                    };
                    bind = Some((f, sql));
                }
                _ => {}
            }
        }
        let sql = match (&bind, &parsed) {
            (Some((_, sql)), _) => sql.clone(),
            (None, Some((_, _, sql))) => sql.clone(),
            (None, None) => return Ok(None),
        };
        let (name, cmd) = match cursor_command(&sql) {
            Some(CursorCommand::Fetch {
                name,
                direction,
                is_move,
            }) => (Some(name), Some((direction, is_move))),
            Some(CursorCommand::Close(name)) => (name, None),
            _ => return Ok(None),
        };
        let ours = match &name {
            Some(n) => self.cursors.open.get(n).is_some_and(|c| c.merged.is_some()),
            None => true,
        };
        if !ours {
            return Ok(None);
        }
        const SHAPE: &str = "FETCH, MOVE or CLOSE of a cursor over several shards must come in the extended protocol alone: Parse, Describe of the statement, Sync; or Parse (optional), Bind, Describe of the portal (optional), Execute without a row limit, Sync";
        let shape_ok = frames.iter().all(|f| {
            let b = f.body();
            match f.tag() {
                fe::PARSE | fe::SYNC | fe::FLUSH => true,
                fe::DESCRIBE => {
                    b.first() == Some(&b'S') || (bind.is_some() && b.first() == Some(&wire::PORTAL))
                }
                fe::BIND => true,
                fe::EXECUTE => bind.is_some() && b.len() >= 4 && b[b.len() - 4..] == [0, 0, 0, 0],
                _ => false,
            }
        });
        if !shape_ok || (bind.is_some() && !synced) {
            self.batch_error(&refuse(SHAPE), synced);
            return Ok(Some(true));
        }
        if let Some((Direction::Other(dir), _)) = &cmd {
            self.batch_error(&merged::direction_refused(dir), synced);
            return Ok(Some(true));
        }
        if self.txn.failed && bind.is_some() {
            self.batch_error(&aborted(), synced);
            return Ok(Some(true));
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let fetching = matches!(cmd, Some((_, false)));
        let formats = match &bind {
            Some((b, _)) => merged::bind_result_formats(b)?,
            None => Vec::new(),
        };
        let describe_rows = |s: &mut Self, binary: &dyn Fn(usize) -> bool| {
            let m = name
                .as_ref()
                .and_then(|n| s.cursors.open.get(n))
                .and_then(|c| c.merged.as_ref());
            match m {
                Some(m) if fetching => merged::row_description(m, &mut s.out, binary),
                _ => wire::frame(&mut s.out, wire::be::NO_DATA, |_| {}),
            }
        };
        for f in frames {
            match f.tag() {
                fe::PARSE => {
                    if !self.record_parse(f)? {
                        // A duplicate name: the error is queued.
                        self.skip_to_sync = !synced;
                        break;
                    }
                    self.out.put_slice(&wire::parse_complete());
                }
                fe::DESCRIBE if f.body().first() == Some(&b'S') => {
                    wire::frame(&mut self.out, wire::be::PARAMETER_DESCRIPTION, |o| {
                        o.put_i16(0)
                    });
                    describe_rows(self, &|_| false);
                }
                fe::BIND => wire::frame(&mut self.out, wire::be::BIND_COMPLETE, |_| {}),
                fe::DESCRIBE => {
                    let fm = merged::FetchOut {
                        describe: true,
                        formats: formats.clone(),
                        portal: false,
                    };
                    describe_rows(self, &|i| fm.binary(i));
                }
                fe::EXECUTE => match (&name, &cmd) {
                    (Some(n), Some((Direction::Forward(count), is_move))) => {
                        let Some(mut m) =
                            self.cursors.open.get_mut(n).and_then(|c| c.merged.take())
                        else {
                            break;
                        };
                        let how = merged::FetchOut {
                            describe: false,
                            formats: formats.clone(),
                            portal: false,
                        };
                        let attached = self.attach_shards(&m.shards).await;
                        let r = match attached {
                            Ok(Err(r)) => {
                                self.push_error(&r);
                                Ok(())
                            }
                            Ok(Ok(())) => {
                                self.stats.note_route(Route::Merge);
                                merged::fetch(self, &mut m, *count, *is_move, &how).await
                            }
                            Err(e) => Err(e),
                        };
                        if let Some(c) = self.cursors.open.get_mut(n) {
                            c.merged = Some(m);
                        }
                        r?;
                    }
                    (Some(n), None) => {
                        let closed = self.close_merged(n).await?;
                        if closed {
                            self.out.put_slice(&command_complete("CLOSE CURSOR"));
                        }
                    }
                    (None, _) => {
                        let shards = self.cursor_shards();
                        match self.close_all_on(&shards).await? {
                            Ok(()) => self.out.put_slice(&command_complete("CLOSE CURSOR")),
                            Err(r) => self.push_error(&r),
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        if synced {
            self.release_after_cursor().await?;
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        }
        Ok(Some(true))
    }

    /// An extended-protocol batch that binds a named portal for a read
    /// over several shards inside a transaction block, and executes it
    /// with a row limit or not at all (asyncpg's `cursor()`, SQLAlchemy's
    /// `stream_results` on asyncpg): Parse (optional), Bind, Describe of
    /// the portal (optional), Execute with a row limit (optional), Sync or
    /// Flush. The portal is served as a cursor merged by the node, declared
    /// under the portal's name on each shard (PostgreSQL's portals and
    /// cursors are one thing), so that later Executes fetch its next rows
    /// ([`Session::merged_portal_batch`]). True when answered.
    async fn portal_bind_by_node(
        &mut self,
        frames: &[Frame],
        synced: bool,
    ) -> Result<bool, SessionError> {
        // Outside a transaction block, a portal the client reads in parts
        // with Flush (pg-cursor) lives in its implicit transaction, until
        // its Sync.
        let implicit = !self.txn.open();
        if self.txn.failed || (implicit && (synced || self.skip_to_sync)) {
            return Ok(false);
        }
        let mut parse: Option<(&Frame, &str, &str)> = None;
        let mut bind: Option<(&Frame, &str, Arc<str>, BindParams)> = None;
        let (mut describe, mut execute) = (false, None::<u64>);
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE if parse.is_none() && bind.is_none() => {
                    let (Ok(name), Ok(sql)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b))
                    else {
                        return Ok(false);
                    };
                    parse = Some((f, name, sql));
                }
                fe::BIND if bind.is_none() => {
                    let (Ok(portal), Ok(stmt)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b))
                    else {
                        return Ok(false);
                    };
                    if portal.is_empty() {
                        return Ok(false);
                    }
                    // The Parse's text is copied only for a named portal.
                    let here = parse
                        .as_ref()
                        .filter(|(_, n, _)| *n == stmt)
                        .map(|(_, _, sql)| Arc::<str>::from(*sql));
                    let (unnamed, named) = match here {
                        Some(sql) if stmt.is_empty() => (Some(sql), None),
                        here => (None, here),
                    };
                    let Some(sql) = self.bound_sql(stmt, &unnamed, named.as_ref()) else {
                        return Ok(false);
                    };
                    let Ok(params) = BindParams::parse(b) else {
                        return Ok(false);
                    };
                    bind = Some((f, portal, sql, params));
                }
                fe::DESCRIBE if execute.is_none() && !describe => {
                    let named_here = b.first() == Some(&wire::PORTAL)
                        && bind.as_ref().is_some_and(|(_, p, ..)| {
                            wire::get_cstr(&mut &b[1..]).is_ok_and(|n| n == *p)
                        });
                    if !named_here {
                        return Ok(false);
                    }
                    describe = true;
                }
                fe::EXECUTE if execute.is_none() => {
                    let (Ok(name), Ok(n)) = (wire::get_cstr(&mut b), wire::get_i32(&mut b)) else {
                        return Ok(false);
                    };
                    // Without a row limit the batch runs it whole (the
                    // ordinary path).
                    if n <= 0 || bind.as_ref().is_none_or(|(_, p, ..)| *p != name) {
                        return Ok(false);
                    }
                    execute = Some(n as u64);
                }
                fe::SYNC | fe::FLUSH => {}
                _ => return Ok(false),
            }
        }
        let Some((bind_frame, portal, sql, params)) = bind else {
            return Ok(false);
        };
        let reads = ["select", "with", "values", "table"]
            .iter()
            .any(|k| first_keyword_is(&sql, k));
        if !reads || cursor_command(&sql).is_some() {
            return Ok(false);
        }
        let routed = self
            .route_waiting(|s| s.node.decide(&sql, Some(&params), &s.route_ctx()))
            .await;
        let Ok(mut dec) = routed else {
            // The ordinary path reports it.
            return Ok(false);
        };
        if dec.write
            || !needs_node(&dec.target)
            || merged::check_plan(dec.merge.as_deref()).is_err()
        {
            return Ok(false);
        }
        let Target::Multi { shards, sqls } = &dec.target else {
            return Ok(false);
        };
        let (shards, sqls) = (shards.clone(), sqls.clone());
        // What the ordinary path checks before a statement runs: replies
        // owed first (an error there skips this batch), a snapshot older
        // than a move, functions that read sharded tables or write.
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
            if self.skip_to_sync {
                return Ok(false);
            }
        }
        if let Err(r) = self.check_owner_change(&dec) {
            self.batch_error(&r, synced);
            return Ok(true);
        }
        if let Err(r) = self.settle_calls(&mut dec, shards[0]).await? {
            self.batch_error(&r, synced);
            return Ok(true);
        }
        if let Err(r) = self.check_multi_shard(&dec).await? {
            self.batch_error(&r, synced);
            return Ok(true);
        }
        if implicit {
            if self.be.mid_pipeline() || !self.be.owed.is_empty() || self.skip_to_sync {
                // Statements of the client's before it in the pipeline:
                // the ordinary path (refused there).
                return Ok(false);
            }
            // The client's implicit transaction, as a transaction block of
            // the node's on the shards (`end_implicit_portal` at Sync).
            self.txn.begin = Some("BEGIN".into());
            self.txn.status = TxStatus::InTransaction;
            self.implicit_portal = true;
        }
        // The shards' maps of user type OIDs (Parse types, enum results).
        self.prepare_type_oids(frames, &shards).await;
        let formats = merged::bind_result_formats(bind_frame)?;
        let ext = merged::bind_params(self, parse.as_ref().map(|p| p.0), bind_frame)?;
        let texts: Vec<String> = (0..shards.len())
            .map(
                |i| match (sqls.as_ref().and_then(|v| v.get(i)), &dec.merge) {
                    (Some(t), _) => t.clone(),
                    (None, Some(p)) => p.shard_sql.clone(),
                    (None, None) => sql.to_string(),
                },
            )
            .collect();
        self.stats.note_route(Route::Merge);
        let mut ok = true;
        if let Some((p, ..)) = parse {
            if self.record_parse(p)? {
                self.out.put_slice(&wire::parse_complete());
            } else {
                // A duplicate name: the error is queued.
                ok = false;
            }
        }
        if ok {
            match merged::declare(
                self,
                portal,
                &shards,
                dec.merge.clone(),
                &texts,
                Some(&ext),
                false,
            )
            .await?
            {
                Ok(m) => {
                    wire::frame(&mut self.out, wire::be::BIND_COMPLETE, |_| {});
                    let how = merged::FetchOut {
                        describe: false,
                        formats: formats.clone(),
                        portal: true,
                    };
                    if describe {
                        merged::row_description(&m, &mut self.out, &|i| how.binary(i));
                    }
                    self.cursors.open.insert(
                        portal.to_string(),
                        OpenCursor {
                            shard: shards[0],
                            hold: false,
                            merged: Some(Box::new(m)),
                            formats,
                            depth: self.txn.savepoints.len(),
                        },
                    );
                    if let Some(n) = execute {
                        self.fetch_portal(portal, Some(n)).await?;
                    }
                }
                Err(e) => {
                    self.out.put_slice(&e);
                    self.txn.failed = true;
                }
            }
            ok = !self.txn.failed;
        }
        if synced {
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        } else if !ok {
            self.skip_to_sync = true;
        }
        Ok(true)
    }

    /// The client's Sync (or a simple Query: PostgreSQL's Query ends the
    /// pipeline's implicit transaction too) after a portal over several
    /// shards was bound outside a transaction block (`implicit_portal`):
    /// the batch's messages before the Sync run inside the node's
    /// transaction, which then ends — committed (the portal only read; a
    /// statement run beside it too), rolled back after an error — and,
    /// for a Sync, ReadyForQuery answers as PostgreSQL's: idle.
    pub(super) async fn end_implicit_portal(&mut self, sync: bool) -> Result<(), SessionError> {
        let mut frames = std::mem::take(&mut self.batch);
        frames.retain(|f| f.tag() != fe::SYNC);
        if sync && !frames.is_empty() && !self.skip_to_sync {
            self.batch = frames;
            Box::pin(self.run_batch_rounds(false)).await?;
            self.batch.clear();
        }
        self.implicit_portal = false;
        self.part = Some(Part {
            from: self.out.len(),
            ..Part::default()
        });
        let failed = self.txn.failed || self.skip_to_sync;
        let r = if self.txn.open() {
            Box::pin(self.end_implicit(!failed)).await.map(|_| ())
        } else {
            Ok(())
        };
        self.scan_part();
        self.part = None;
        r?;
        self.skip_to_sync = false;
        if sync {
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        }
        Ok(())
    }

    /// Closes the merged cursor `name` on its shards and forgets it. False:
    /// a shard failed the CLOSE — its error is queued for the client and
    /// the transaction is failed (its COMMIT would roll back otherwise
    /// unexplained).
    async fn close_merged(&mut self, name: &str) -> Result<bool, SessionError> {
        let Some(m) = self.cursors.open.remove(name).and_then(|c| c.merged) else {
            return Ok(true);
        };
        if let Err(r) = self.attach_shards(&m.shards).await? {
            // Not closed where no backend could be had: kept, as its
            // shards still hold it.
            self.push_error(&r);
            for &t in &m.shards {
                self.cursors.stale.push((t, name.to_string()));
            }
            return Ok(false);
        }
        match merged::close(self, &m).await? {
            Some(e) => {
                self.out.put_slice(&e);
                self.txn.failed = true;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Executes (`count` rows, None: all) the portal `name` the node serves
    /// as a merged cursor: its rows, then PortalSuspended or
    /// CommandComplete as PostgreSQL ends an Execute.
    async fn fetch_portal(&mut self, name: &str, count: Option<u64>) -> Result<(), SessionError> {
        let Some(c) = self.cursors.open.get_mut(name) else {
            return Ok(());
        };
        let formats = c.formats.clone();
        let Some(mut m) = c.merged.take() else {
            return Ok(());
        };
        let how = merged::FetchOut {
            describe: false,
            formats,
            portal: true,
        };
        let r = match self.attach_shards(&m.shards).await {
            Ok(Err(r)) => {
                self.push_error(&r);
                Ok(())
            }
            Ok(Ok(())) => {
                self.stats.note_route(Route::Merge);
                merged::fetch(self, &mut m, count, false, &how).await
            }
            Err(e) => Err(e),
        };
        if let Some(c) = self.cursors.open.get_mut(name) {
            c.merged = Some(m);
        }
        r
    }

    /// A batch that uses portals the node serves as merged cursors (bound
    /// by [`Session::portal_bind_by_node`], or cursors merged by the node
    /// executed as portals): their Describe, Execute (in parts, as asyncpg
    /// fetches a cursor) and Close, answered here. Beside other messages
    /// such a portal is refused: its shard alone would answer with its own
    /// rows. None: the batch names none of them.
    async fn merged_portal_batch(
        &mut self,
        frames: &[Frame],
        synced: bool,
    ) -> Result<Option<bool>, SessionError> {
        let merged_name = |s: &Self, f: &Frame| -> Option<String> {
            let b = f.body();
            let name = match f.tag() {
                fe::EXECUTE => wire::get_cstr(&mut &b[..]).ok()?,
                fe::DESCRIBE | fe::CLOSE if b.first() == Some(&wire::PORTAL) => {
                    wire::get_cstr(&mut &b[1..]).ok()?
                }
                _ => return None,
            };
            s.cursors
                .open
                .get(name)
                .is_some_and(|c| c.merged.is_some())
                .then(|| name.to_string())
        };
        if !frames.iter().any(|f| merged_name(self, f).is_some()) {
            return Ok(None);
        }
        let alone = frames
            .iter()
            .all(|f| f.tag() == fe::SYNC || f.tag() == fe::FLUSH || merged_name(self, f).is_some());
        let only_closed = frames
            .iter()
            .all(|f| f.tag() == fe::CLOSE || merged_name(self, f).is_none());
        if !alone && only_closed {
            // A Close beside other statements (PgJDBC closes a finished
            // portal in the pipeline of its next statement): the node
            // forgets the portal and the batch goes on; the Close reaches
            // the batch's shard (PostgreSQL closes it there or answers
            // CloseComplete for none), and the portal's cursor on the
            // other shards ends with the transaction.
            for f in frames {
                if let Some(name) = merged_name(self, f) {
                    self.cursors.open.remove(&name);
                }
            }
            return Ok(None);
        }
        if !alone {
            self.batch_error(
                &refuse("a portal over several shards (a cursor the node merges) must be used in a batch of its own: Describe, Execute or Close of it, then Sync or Flush; send the other statements after a Sync"),
                synced,
            );
            return Ok(Some(true));
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
            if self.skip_to_sync {
                // An error owed before: this batch is skipped up to its
                // Sync by the ordinary path.
                return Ok(Some(false));
            }
        }
        for f in frames {
            let Some(name) = merged_name(self, f) else {
                continue;
            };
            if self.txn.failed && f.tag() != fe::CLOSE {
                self.push_error(&aborted());
                break;
            }
            match f.tag() {
                fe::DESCRIBE => {
                    let Some(c) = self.cursors.open.get(&name) else {
                        continue;
                    };
                    let how = merged::FetchOut {
                        describe: true,
                        formats: c.formats.clone(),
                        portal: true,
                    };
                    if let Some(m) = c.merged.as_ref() {
                        merged::row_description(m, &mut self.out, &|i| how.binary(i));
                    }
                }
                fe::EXECUTE => {
                    let mut b = f.body();
                    let _ = wire::get_cstr(&mut b);
                    let n = wire::get_i32(&mut b).unwrap_or(0);
                    self.fetch_portal(&name, (n > 0).then_some(n as u64))
                        .await?;
                }
                _ => {
                    if self.close_merged(&name).await? {
                        wire::frame(&mut self.out, wire::be::CLOSE_COMPLETE, |_| {});
                    }
                }
            }
            if self.txn.failed {
                break;
            }
        }
        if synced {
            self.release_after_cursor().await?;
            let status = self.client_status();
            self.push_synthetic(rfq(status));
        } else if self.txn.failed {
            self.skip_to_sync = true;
        }
        Ok(Some(true))
    }

    /// `DISCARD ALL` (`sql`) about to run on shard `t`: the holdable
    /// cursors the session keeps on other shards are closed there too, as
    /// PostgreSQL's DISCARD ALL closes every cursor of the session.
    pub(super) async fn discard_cursors_except(
        &mut self,
        sql: &str,
        t: usize,
    ) -> Result<(), SessionError> {
        if !first_keyword_is(sql, "discard") || self.txn.open() {
            return Ok(());
        }
        let others: Vec<usize> = self
            .cursor_shards()
            .into_iter()
            .filter(|&x| x != t)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let cur = self.be.cur;
        if let Err(r) = self.close_all_on(&others).await? {
            tracing::warn!(error = %r.message, "cannot close the session's cursors for DISCARD ALL");
        }
        self.be.cur = cur;
        Ok(())
    }

    /// `CLOSE ALL` with cursors on several shards: on each of them (the
    /// caller answers).
    async fn close_all_on(
        &mut self,
        shards: &[usize],
    ) -> Result<Result<(), Refusal>, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        // The parts of merged holdable cursors on these shards: those on a
        // shard not reached stay open there (`stale`).
        let mut parts: Vec<(usize, String)> = Vec::new();
        for (name, c) in &self.cursors.open {
            if let Some(m) = c.merged.as_ref().filter(|_| c.hold) {
                parts.extend(
                    m.shards
                        .iter()
                        .filter(|j| shards.contains(j))
                        .map(|&j| (j, name.clone())),
                );
            }
        }
        for &t in shards {
            let was_attached = self.be.slots[t].conn.is_some();
            if let Err(r) = self.ensure_backend(t).await? {
                self.cursors.stale.extend(parts);
                return Ok(Err(r));
            }
            parts.retain(|(j, _)| *j != t);
            if let Some(b) = self.be.slots[t].conn.as_mut() {
                if let Err(e) = b.hidden_query("CLOSE ALL").await {
                    tracing::warn!(error = %e, shard = t, "CLOSE ALL failed; the backend is closed");
                    b.broken = true;
                }
            }
            self.cursors.open.retain(|_, c| !c.on(t));
            if !was_attached && !self.txn.open() {
                self.let_go(t);
            }
        }
        self.be.update_cancel();
        Ok(Ok(()))
    }

    /// The shard of a Describe of portal `name` when it names a cursor of
    /// the session (None: not one).
    pub(super) fn cursor_portal_shard(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return None;
        }
        self.cursors.shard_of(name)
    }

    /// The shards where the session has cursors (every shard of a merged
    /// one), in order.
    fn cursor_shards(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .cursors
            .open
            .values()
            .flat_map(|c| {
                let merged = c.merged.as_deref().map_or(&[][..], |m| &m.shards[..]);
                std::iter::once(c.shard).chain(merged.iter().copied())
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A statement string `sql` went to shard `t`: what it does to the
    /// session's cursors.
    pub(crate) fn note_cursor_sent(&mut self, sql: &str, t: usize) {
        match cursor_command(sql) {
            Some(CursorCommand::Declare(d)) => {
                self.cursors.ever_held |= d.hold;
                if d.hold && !self.cursors.reread.contains(&t) {
                    self.cursors.reread.push(t);
                }
                self.cursors.open.insert(
                    d.name,
                    OpenCursor {
                        shard: t,
                        hold: d.hold,
                        merged: None,
                        formats: Vec::new(),
                        depth: self.txn.savepoints.len(),
                    },
                );
            }
            Some(CursorCommand::Close(Some(name))) => {
                self.cursors.open.remove(&name);
            }
            Some(CursorCommand::Close(None)) => self.cursors.open.retain(|_, c| !c.on(t)),
            Some(CursorCommand::Fetch { .. }) => {}
            None => {
                // Not one cursor statement: it may still declare a
                // holdable one (several statements, a DO block): read back.
                if contains_hold(sql) && !self.cursors.reread.contains(&t) {
                    self.cursors.ever_held = true;
                    self.cursors.reread.push(t);
                }
            }
        }
    }

    /// Whether a batch may declare or close a cursor (no allocation: the
    /// common batch is only looked at).
    pub(super) fn may_touch_cursors(&self, frames: &[Frame]) -> bool {
        let cursor_word = |sql: &str| {
            ["declare", "close"]
                .iter()
                .any(|w| first_keyword_is(sql, w))
        };
        frames.iter().any(|f| {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let _ = wire::get_cstr(&mut b);
                    wire::get_cstr(&mut b).is_ok_and(cursor_word)
                }
                fe::BIND => {
                    let _ = wire::get_cstr(&mut b);
                    wire::get_cstr(&mut b).is_ok_and(|stmt| {
                        self.bound_sql(stmt, &None, None)
                            .is_some_and(|sql| cursor_word(&sql))
                    })
                }
                _ => false,
            }
        })
    }

    /// The statement texts of a forwarded batch's Binds that are cursor
    /// statements (read after the batch's Parses were recorded).
    pub(super) fn cursor_statements(&self, frames: &[Frame]) -> Vec<Arc<str>> {
        self.bound_texts(frames)
            .filter(|sql| {
                ["declare", "close"]
                    .iter()
                    .any(|w| first_keyword_is(sql, w))
            })
            .collect()
    }

    /// At the end of the transaction on shard `i` (its backend attached
    /// and idle): cursors without hold are gone; the holdable ones are
    /// read back when the transaction may have declared or closed one.
    pub(super) async fn read_cursors_due(&mut self, i: usize) {
        let due = self.cursors.reread.contains(&i) || self.cursors.holds_on(i);
        self.cursors.reread.retain(|&x| x != i);
        self.cursors.open.retain(|_, c| !c.on(i) || c.hold);
        if !due {
            return;
        }
        let Some(b) = self.be.slots[i].conn.as_mut() else {
            return;
        };
        if b.status != tx::IDLE || b.unsynced {
            return;
        }
        match b
            .hidden_query("SELECT name FROM pg_catalog.pg_cursors WHERE is_holdable")
            .await
        {
            Ok(rows) => {
                let names: Vec<String> = rows
                    .into_iter()
                    .filter_map(|r| r.into_iter().next().flatten())
                    .collect();
                // A merged cursor stays while its name is read on each of
                // its shards; one gone here (rolled back, DISCARD ALL) is
                // gone for the client, its other shards' part stale.
                // (Only holdable ones are left here: the others ended with
                // the transaction.)
                self.cursors.drop_on(i, |name, c| {
                    c.merged.is_some() && names.iter().any(|n| n == name)
                });
                let here: Vec<String> = self
                    .cursors
                    .stale
                    .iter()
                    .filter(|(s, _)| *s == i)
                    .map(|(_, n)| n.clone())
                    .collect();
                self.cursors.stale.retain(|(s, _)| *s != i);
                for name in names {
                    if here.contains(&name) {
                        let sql = format!("CLOSE {}", crate::sql::quote_ident(&name));
                        if let Err(e) = b.hidden_query(&sql).await {
                            tracing::warn!(error = %e, shard = i, "cannot close a stale cursor; the backend is closed");
                            b.broken = true;
                        }
                        continue;
                    }
                    if self
                        .cursors
                        .open
                        .get(&name)
                        .is_some_and(|c| c.merged.is_some())
                    {
                        continue;
                    }
                    self.cursors.open.insert(
                        name,
                        OpenCursor {
                            shard: i,
                            hold: true,
                            merged: None,
                            formats: Vec::new(),
                            depth: 0,
                        },
                    );
                }
            }
            Err(e) => {
                // What it holds cannot be known: closed, not pooled, so
                // that its cursors go with it.
                tracing::warn!(error = %e, shard = i, "cannot read the session's cursors");
                b.broken = true;
                self.cursors.forget_shard(i);
            }
        }
    }

    /// At the end of a transaction on every shard: cursors without hold
    /// are gone everywhere (those on shards whose backend is not attached
    /// too: they were declared in this transaction).
    pub(super) async fn read_cursors_at_end(&mut self) {
        for i in 0..self.be.slots.len() {
            if self.be.slots[i].conn.is_some() {
                self.read_cursors_due(i).await;
            }
        }
        self.cursors.open.retain(|_, c| c.hold);
        // Outlives the transaction's savepoints.
        for c in self.cursors.open.values_mut() {
            c.depth = 0;
        }
    }

    /// When the client leaves: a backend holding its cursors closes them
    /// (`CLOSE ALL`, within `wait`) before it goes back to the pool; one
    /// that cannot is closed.
    pub(super) async fn close_cursors(b: &mut Pooled, wait: std::time::Duration) {
        match tokio::time::timeout(wait, b.hidden_query("CLOSE ALL")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "CLOSE ALL failed; the backend is closed");
                b.broken = true;
            }
            Err(_) => {
                tracing::warn!("CLOSE ALL did not answer in time; the backend is closed");
                b.broken = true;
            }
        }
    }
}

/// An extended-protocol `DECLARE` over several shards: its parameters,
/// its Parse (answered by the node), whether its portal is described.
struct Ext<'a> {
    params: merged::ExtParams,
    parse: Option<&'a Frame>,
    describe: bool,
}

/// Whether a cursor's query needs the node to serve the cursor: rows of
/// several shards, or a shard's own text of it (rows of a range being
/// moved hidden there), which the client's DECLARE does not carry.
fn needs_node(t: &Target) -> bool {
    matches!(t, Target::Multi { shards, sqls } if shards.len() > 1 || sqls.is_some())
}

/// PostgreSQL's refusal of anything but ROLLBACK in a failed transaction.
fn aborted() -> Refusal {
    Refusal::new(
        sqlstate::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block".into(),
    )
}

/// `CLOSE ALL` (the statement read by the lexer has no name).
fn name_is_all(sql: &str) -> bool {
    matches!(cursor_command(sql), Some(CursorCommand::Close(None)))
}

/// Whether `sql` has the word `hold` anywhere (case-insensitive): a
/// statement that may declare a holdable cursor.
fn contains_hold(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"hold"))
}
