//! Temporary objects under transaction pooling. A temporary table lives in
//! one backend's session: a client that made one keeps that backend for
//! the rest of its session, as session pooling would, and its statements
//! on it go there.
//!
//! - *What the session has* is read back from PostgreSQL, never guessed
//!   from parsing: after a transaction in which a statement may have
//!   created or dropped a temporary object (its words, `Class::temporary`;
//!   once it has some, any `CREATE`/`ALTER`/`DROP`/`DO` or `DISCARD`),
//!   the node lists the backend's temporary schema
//!   ([`crate::routing::names::temp_probe_sql`]); inside a transaction it
//!   reads it too, before the next statement is routed.
//! - *The pin*: while that schema holds something, the backend is kept
//!   ([`TempObjects::home`]): at the end of each transaction it goes to the
//!   slot's `kept` instead of the pool ([`Session::let_go`]), and the next
//!   statement for the shard attaches it again through the same checkout
//!   path as a pooled one (`Session::ensure_backend`: state replay, a
//!   transaction begun on it). It holds its pool's permit all along, so
//!   it counts against `pool_size`. The pin ends when the schema is found
//!   empty (`DISCARD ALL`/`DISCARD TEMP`, the last object dropped, the
//!   transaction that made it rolled back): the backend then goes back to
//!   the pool at that end of transaction. When the client leaves, the
//!   backend runs `DISCARD TEMP` and goes back to the pool (closed if that
//!   fails), so no other client sees the objects.
//! - *Routing*: the session's namespace lists its temporary relations
//!   (`Namespace::temp`), so the router resolves their names as
//!   PostgreSQL does (first) and sends what names them, and their DDL, to
//!   the home shard alone (`router/src/route/analyze/temp.rs`); such a
//!   statement is marked (`Decision::temp`).
//! - *Refusals* (0A000, [`Session::check_temp`]): a marked statement that
//!   would run on several shards or on another shard than the objects'; and
//!   a transaction that used them and writes to their shard and to
//!   another — its COMMIT would need two-phase commit, and PostgreSQL
//!   cannot PREPARE a transaction that used temporary objects. Refused at
//!   the statement that makes it so, or at COMMIT for what the node could
//!   not see earlier.
//!
//! Not seen: temporary objects made inside a function the client calls
//! (its words do not show them): they stay on the backend unpinned, as
//! under PgBouncer.

use super::conn::*;
use crate::backend::pool::Pooled;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::error::SessionError;
use crate::routing::names::{parse_temp, temp_probe_sql, TempHeld};
use crate::routing::Decision;
use crate::wire::tx;
use hotrepart_router::classify::Class;
use hotrepart_router::route::Namespace;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// The session's temporary objects.
#[derive(Default)]
pub(crate) struct TempObjects {
    /// The shard whose backend holds them (kept between transactions); None
    /// while the session has none.
    pub(crate) home: Option<usize>,
    /// What that backend holds, as last read.
    held: TempHeld,
    /// Shards where a statement that may create or drop temporary objects
    /// ran since their schema was read: read before the next routing.
    unread: Vec<usize>,
    /// ... and again once their transaction ended (what it made may be
    /// rolled back, or dropped at commit).
    at_end: Vec<usize>,
    /// Bumped when `held` changes.
    generation: u64,
    /// The namespace last given the temporary relations: the base it was
    /// made from, the generation, whether `search_path` names `pg_temp`.
    overlay_of: Option<(Arc<Namespace>, u64, bool)>,
}

/// What a statement's words say about temporary objects (from its
/// `Class`, kept with a named statement).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TempClass {
    /// It may create one (`Class::temporary`).
    pub(crate) temporary: bool,
    /// It may drop one: `CREATE`/`ALTER`/`DROP`/`DO`, `DISCARD`.
    pub(crate) may_drop: bool,
}

impl TempClass {
    pub(crate) fn of(c: &Class<'_>) -> Self {
        TempClass {
            temporary: c.temporary,
            may_drop: c.schema_change || c.drops_prepared,
        }
    }
}

impl TempObjects {
    fn forget(&mut self) {
        self.home = None;
        if self.held != TempHeld::default() {
            self.held = TempHeld::default();
            self.generation += 1;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A statement that went to shard `shard`: whether what it does to
    /// temporary objects must be read back.
    pub(crate) fn note_temp(&mut self, class: &Class<'_>, shard: usize) {
        self.note_temp_of(TempClass::of(class), shard);
    }

    /// [`Self::note_temp`] for a statement classified earlier (a named
    /// statement run again).
    pub(super) fn note_temp_of(&mut self, c: TempClass, shard: usize) {
        let may = c.temporary || (self.temp.home.is_some() && c.may_drop);
        if !may {
            return;
        }
        for v in [&mut self.temp.unread, &mut self.temp.at_end] {
            if !v.contains(&shard) {
                v.push(shard);
            }
        }
    }

    /// Lets go of shard `i`'s backend at the end of a transaction: kept by
    /// the session when it holds the session's temporary objects (and is
    /// fit to be pooled), else released to the pool (closed if not fit).
    pub(crate) fn let_go(&mut self, i: usize) {
        let Some(mut b) = self.be.slots[i].conn.take() else {
            return;
        };
        if self.temp.home != Some(i) && !self.cursors.holds_on(i) {
            b.release();
            return;
        }
        if b.reusable() {
            b.idle_since = std::time::Instant::now();
            self.be.slots[i].kept = Some(b);
        } else {
            // Closed: PostgreSQL drops the objects (and cursors) with it.
            tracing::warn!(
                shard = i,
                "the backend holding this session's temporary objects or cursors is closed"
            );
            if self.temp.home == Some(i) {
                self.temp.forget();
            }
            self.cursors.forget_shard(i);
            b.release();
        }
    }

    /// The backend the session keeps for shard `t`, if any and alive
    /// (checked as the pool checks an idle one). A dead one is dropped with
    /// the session's temporary objects: the client's next use of one gets
    /// PostgreSQL's error.
    pub(crate) fn take_kept(&mut self, t: usize) -> Option<Pooled> {
        let Some(b) = self.be.slots[t].kept.take() else {
            if self.temp.home == Some(t) {
                // Closed with an error while attached (its objects with it).
                self.temp.forget();
            }
            if self.cursors.holds_on(t) && self.be.slots[t].conn.is_none() {
                self.cursors.forget_shard(t);
            }
            return None;
        };
        if b.idle_since.elapsed() >= std::time::Duration::from_millis(100) && !b.is_alive() {
            tracing::warn!(
                shard = t,
                "the backend holding this session's temporary objects or cursors died"
            );
            if self.temp.home == Some(t) {
                self.temp.forget();
            }
            self.cursors.forget_shard(t);
            return None;
        }
        Some(b)
    }

    /// Reads what shard `i`'s attached backend holds in its temporary
    /// schema. At ReadyForQuery(idle) the answer decides the pin;
    /// inside a transaction it only updates the names (the transaction
    /// may still roll back).
    async fn read_temp(&mut self, i: usize) {
        self.temp.unread.retain(|&x| x != i);
        let sql = temp_probe_sql(&self.node.routing.catalog.load());
        let Some(b) = self.be.slots[i].conn.as_mut() else {
            self.temp.at_end.retain(|&x| x != i);
            return;
        };
        let held = match b.hidden_query(&sql).await {
            Ok(rows) => parse_temp(rows),
            Err(e) => {
                // Its objects cannot be tracked: closed, not pooled, so
                // that they go with it.
                tracing::warn!(error = %e, shard = i, "cannot read the session's temporary objects");
                b.broken = true;
                self.temp.at_end.retain(|&x| x != i);
                if self.temp.home == Some(i) {
                    self.temp.forget();
                }
                return;
            }
        };
        let idle = b.status == tx::IDLE;
        if idle {
            self.temp.at_end.retain(|&x| x != i);
        }
        match self.temp.home {
            Some(h) if h != i && held.any => {
                // Objects on a second shard (made where the node could not
                // see it): that backend is closed rather than pooled with them.
                tracing::warn!(
                    shard = i,
                    home = h,
                    "temporary objects on a second shard: its backend will be closed"
                );
                b.broken = true;
                return;
            }
            Some(h) if h != i => return,
            _ => {}
        }
        if held.any {
            self.temp.home = Some(i);
        } else if idle {
            self.temp.home = None;
        }
        if held != self.temp.held {
            self.temp.held = held;
            self.temp.generation += 1;
        }
    }

    /// Before routing: reads back the temporary schema where a statement
    /// since the last read may have changed it (unless a pipeline is open,
    /// or the transaction failed there: then at its end).
    pub(super) async fn settle_temp(&mut self) -> Result<(), SessionError> {
        if self.temp.unread.is_empty() || self.be.mid_pipeline() {
            return Ok(());
        }
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        for i in self.temp.unread.clone() {
            match self.be.slots[i].conn.as_ref().map(|b| b.status) {
                None => self.temp.unread.retain(|&x| x != i),
                Some(tx::FAILED) => {}
                Some(_) => self.read_temp(i).await,
            }
        }
        Ok(())
    }

    /// At the end of a transaction (before the backends are let go):
    /// reads the temporary schema where the transaction may have changed it.
    pub(super) async fn read_temp_at_end(&mut self) {
        for i in self.temp.at_end.clone() {
            self.read_temp_due(i).await;
        }
    }

    /// [`Self::read_temp_at_end`] for shard `i` alone (its transaction
    /// ended before the others').
    pub(super) async fn read_temp_due(&mut self, i: usize) {
        if !self.temp.at_end.contains(&i) {
            return;
        }
        match self.be.slots[i].conn.as_ref().map(|b| b.status) {
            Some(tx::IDLE) => self.read_temp(i).await,
            Some(_) => {}
            None => {
                self.temp.at_end.retain(|&x| x != i);
                self.temp.unread.retain(|&x| x != i);
            }
        }
    }

    /// Sets the namespace routing uses (`ns`): the shared one (`ns_base`)
    /// with the session's temporary relations, made again only when
    /// either changed; without any, the shared one itself (no allocation
    /// per statement).
    pub(super) fn apply_temp_namespace(&mut self) {
        if self.temp.held.names.is_empty() {
            self.temp.overlay_of = None;
            if !Arc::ptr_eq(&self.ns, &self.ns_base) {
                self.ns = self.ns_base.clone();
            }
            return;
        }
        let explicit = self
            .state
            .get("search_path")
            .is_some_and(|p| p.to_ascii_lowercase().contains("pg_temp"));
        if let Some((b, g, e)) = &self.temp.overlay_of {
            if Arc::ptr_eq(b, &self.ns_base) && *g == self.temp.generation && *e == explicit {
                return;
            }
        }
        let mut ns = (*self.ns_base).clone();
        ns.temp = self.temp.held.names.clone();
        ns.temp_explicit = explicit;
        for (name, via) in &self.temp.held.reaching {
            ns.reaching
                .insert(("pg_temp".to_owned(), name.clone()), via.clone());
        }
        self.temp.overlay_of = Some((self.ns_base.clone(), self.temp.generation, explicit));
        self.ns = Arc::new(ns);
    }

    /// A statement about to run on `shards` (`d.write`: it writes there):
    /// refused (0A000) when it uses the session's temporary objects
    /// anywhere but on their shard, or when the transaction would then
    /// need two-phase commit over their shard after using them there.
    pub(crate) fn check_temp(&self, d: &Decision, shards: &[usize]) -> Result<(), Refusal> {
        let name = |t: usize| self.node.routing.shard_name(t);
        let objects_on = self.temp.home.or(self.txn.temp_used_on);
        if d.temp {
            if shards.len() > 1 {
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "this statement uses a temporary object of this session together with rows of several shards; temporary objects exist on one shard only ({}): use them in statements of their own",
                        name(objects_on.unwrap_or_else(|| self.node.routing.home_index()))
                    ),
                ));
            }
            if let (Some(h), [t]) = (objects_on, shards) {
                if *t != h {
                    return Err(Refusal::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "this statement uses a temporary object of this session, which exists on shard {} only, but goes to shard {} (by its shard key or a hint)",
                            name(h),
                            name(*t)
                        ),
                    ));
                }
            }
        }
        // The shard where the transaction used (or this statement uses)
        // temporary objects.
        let used_on = self.txn.temp_used_on.or_else(|| {
            d.temp
                .then(|| objects_on.or(shards.first().copied()))
                .flatten()
        });
        let Some(h) = used_on else {
            return Ok(());
        };
        let mut writes = self.txn.writes.clone();
        if d.write {
            for &t in shards {
                if !writes.contains(&t) {
                    writes.push(t);
                }
            }
        }
        if writes.len() > 1 && writes.contains(&h) {
            return Err(temp_twopc(self, h, &writes));
        }
        Ok(())
    }

    /// At COMMIT, before two-phase commit: the transaction used temporary
    /// objects on a shard it wrote to, where PREPARE TRANSACTION would
    /// fail (a use the node could not refuse at the statement).
    pub(super) fn temp_blocks_twopc(&self) -> Option<Refusal> {
        let h = self.txn.temp_used_on?;
        (self.txn.writes.contains(&h) && self.txn.writes.len() > 1)
            .then(|| temp_twopc(self, h, &self.txn.writes))
    }

    /// When the client leaves: its backends' temporary objects are dropped
    /// (`DISCARD TEMP`, within `wait`) before they go back to the pool; a
    /// backend that cannot is closed.
    pub(super) async fn discard_temp(b: &mut Pooled, wait: std::time::Duration) {
        match tokio::time::timeout(wait, b.hidden_query("DISCARD TEMP")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "DISCARD TEMP failed; the backend is closed");
                b.broken = true;
            }
            Err(_) => {
                tracing::warn!("DISCARD TEMP did not answer in time; the backend is closed");
                b.broken = true;
            }
        }
    }
}

fn temp_twopc<S>(s: &Session<S>, h: usize, writes: &[usize]) -> Refusal {
    let names: Vec<String> = writes
        .iter()
        .filter(|&&w| w != h)
        .map(|&w| s.node.routing.shard_name(w))
        .collect();
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "this transaction uses temporary objects on shard {} and writes there and on shard(s) {}: committing it would need two-phase commit, which PostgreSQL refuses for a transaction that used temporary objects; keep the work on temporary tables in a transaction of its own",
            s.node.routing.shard_name(h),
            names.join(", ")
        ),
    )
}
