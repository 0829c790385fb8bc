//! Backend pools: one per (shard, database, user), with a fixed size.
//!
//! Guarantees:
//! - at most `size` backend connections of a pool exist at any moment (a
//!   semaphore permit travels with every checked-out connection, and a new
//!   one is opened only when none is idle);
//! - waiting for a connection is bounded by the pool timeout and ends in
//!   [`PoolError::Timeout`];
//! - a [`Pooled`] guard returns its connection to the pool only through
//!   [`Pooled::release`], which the session calls at ReadyForQuery(idle) with
//!   nothing owed; dropping the guard any other way closes the connection, so
//!   a backend that might carry another client's state is never reused;
//! - a backend older than `server_lifetime` is closed when it comes back
//!   (at ReadyForQuery(idle): never inside a transaction) instead of going
//!   idle, and [`Pool::reap`] closes idle backends past their lifetime or
//!   idle longer than `server_idle_timeout`; checkout never hands out
//!   either;
//! - a configuration reload changes a pool in place ([`Pool::apply`]):
//!   a larger size adds permits at once, a smaller one takes them back as
//!   they come free — the connection released with each is closed, not
//!   pooled (a checked-out connection is never taken from its client) —
//!   and the ages and timeouts apply from the next checkout.
//!
//! Every live backend of a pool is listed (weakly) for `SHOW SERVERS`;
//! its state is written at checkout and release (atomics only).

use crate::backend::conn::{BackendConn, BackendError, BackendTarget, ServerInfo};
use crate::stats::DbStats;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no backend connection to shard {shard} became free within {waited_ms} ms (pool size {size})")]
    Timeout {
        shard: String,
        waited_ms: u128,
        size: usize,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Idle connections older than this are checked for liveness at checkout.
const LIVENESS_CHECK_AFTER: Duration = Duration::from_millis(100);

/// Sizes and ages of a pool's backends (from the node's config).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub size: usize,
    pub connect_timeout: Duration,
    /// `server_lifetime`: close a backend this old when it is idle.
    pub lifetime: Option<Duration>,
    /// `server_idle_timeout`: close a backend idle this long.
    pub idle_timeout: Option<Duration>,
}

/// [`PoolSettings`] a reload may change under a running pool: durations
/// in milliseconds, 0 for none.
#[derive(Debug, Default)]
struct LiveSettings {
    connect_timeout_ms: AtomicU64,
    lifetime_ms: AtomicU64,
    idle_timeout_ms: AtomicU64,
}

fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn nonzero(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl LiveSettings {
    fn set(&self, s: &PoolSettings) {
        self.connect_timeout_ms
            .store(ms(Some(s.connect_timeout)), Relaxed);
        self.lifetime_ms.store(ms(s.lifetime), Relaxed);
        self.idle_timeout_ms.store(ms(s.idle_timeout), Relaxed);
    }

    fn lifetime(&self) -> Option<Duration> {
        nonzero(self.lifetime_ms.load(Relaxed))
    }

    /// Whether an idle backend should be closed rather than used.
    fn expired(&self, c: &BackendConn) -> bool {
        self.lifetime().is_some_and(|l| c.created.elapsed() >= l)
            || nonzero(self.idle_timeout_ms.load(Relaxed))
                .is_some_and(|t| c.idle_since.elapsed() >= t)
    }
}

pub struct Pool {
    pub target: BackendTarget,
    /// `pool_size` now (a reload may change it).
    size: AtomicUsize,
    /// Permits still to be taken back after the size shrank: a permit
    /// released while this is above 0 is forgotten instead.
    shrink_debt: AtomicUsize,
    sem: Arc<Semaphore>,
    idle: Mutex<Vec<BackendConn>>,
    settings: LiveSettings,
    /// Where a client's wait for a connection is counted (`SHOW STATS`).
    stats: Option<Arc<DbStats>>,
    /// Every backend opened by this pool that may still live.
    servers: Mutex<Vec<Weak<ServerInfo>>>,
    /// ParameterStatus values of the first connection made, shown to clients
    /// at login.
    server_params: Mutex<Option<Vec<(String, String)>>>,
    /// Statements (node name, session-state fingerprint) a backend of this
    /// pool has parsed without error: a client's Parse of one of them,
    /// outside a transaction, is answered without taking a backend.
    validated: Mutex<HashSet<(String, u64)>>,
    /// Clients waiting for a connection right now (counted only when none
    /// was free at once: nothing is counted on the fast path).
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counts a waiter of [`Pool::get`] while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Bound on [`Pool::validated`]; the set is emptied when it is reached.
const VALIDATED_MAX: usize = 4096;

impl Pool {
    pub fn new(target: BackendTarget, settings: PoolSettings) -> Arc<Pool> {
        Pool::with_stats(target, settings, None)
    }

    /// A pool that counts its clients' waits in `stats`.
    pub fn with_stats(
        target: BackendTarget,
        settings: PoolSettings,
        stats: Option<Arc<DbStats>>,
    ) -> Arc<Pool> {
        let live = LiveSettings::default();
        live.set(&settings);
        Arc::new(Pool {
            target,
            size: AtomicUsize::new(settings.size),
            shrink_debt: AtomicUsize::new(0),
            sem: Arc::new(Semaphore::new(settings.size)),
            idle: Mutex::new(Vec::new()),
            settings: live,
            stats,
            servers: Mutex::new(Vec::new()),
            server_params: Mutex::new(None),
            validated: Mutex::new(HashSet::new()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Checks out a connection, preferring an idle one whose session state
    /// fingerprint equals `want_fp` (no replay needed).
    ///
    /// The semaphore counts checked-out connections; a new connection is
    /// opened only by a permit holder that finds no idle one, so idle plus
    /// checked-out never exceeds `size`.
    pub async fn get(self: &Arc<Self>, want_fp: u64, wait: Duration) -> Result<Pooled, PoolError> {
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Relaxed);
                let _waiting = Waiting(&self.waiting);
                let since = std::time::Instant::now();
                let got = tokio::time::timeout(wait, self.sem.clone().acquire_owned()).await;
                if let Some(s) = &self.stats {
                    s.add_wait(since.elapsed());
                }
                match got {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed, so only the timeout gets here.
                    Ok(Err(_)) | Err(_) => {
                        return Err(PoolError::Timeout {
                            shard: self.target.shard.clone(),
                            waited_ms: wait.as_millis(),
                            size: self.size(),
                        })
                    }
                }
            }
        };
        // Reusing a connection that died while idle would fail the client's
        // statement; check those idle long enough to have died (cheap: one
        // non-blocking recv), and drop the dead.
        let idle = loop {
            let candidate = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.is_empty() {
                    None
                } else {
                    let i = idle
                        .iter()
                        .rposition(|c| c.state_fp == want_fp)
                        .unwrap_or(idle.len() - 1);
                    Some(idle.swap_remove(i))
                }
            };
            match candidate {
                Some(c) if self.settings.expired(&c) => {
                    tracing::debug!(shard = %self.target.shard, "closing expired idle backend");
                    c.terminate();
                }
                Some(c) if c.idle_since.elapsed() >= LIVENESS_CHECK_AFTER && !c.is_alive() => {
                    tracing::debug!(shard = %self.target.shard, "dropping dead idle backend");
                    drop(c);
                }
                other => break other,
            }
        };
        let conn = match idle {
            Some(c) => c,
            None => {
                let conn = match BackendConn::connect(&self.target, self.connect_timeout()).await {
                    Ok(c) => c,
                    Err(e) => {
                        // The permit goes back as a released one would (a
                        // shrink may be owed it).
                        self.give_back(permit);
                        return Err(e.into());
                    }
                };
                let mut sp = self.server_params.lock().unwrap_or_else(|e| e.into_inner());
                if sp.is_none() {
                    *sp = Some(conn.params.clone());
                }
                drop(sp);
                let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
                servers.retain(|w| w.strong_count() > 0);
                servers.push(Arc::downgrade(&conn.info));
                conn
            }
        };
        conn.info.set_state(ServerInfo::ACTIVE);
        Ok(Pooled {
            conn: Some(conn),
            permit: Some(permit),
            pool: self.clone(),
        })
    }

    /// How long a new connection to the shard may take.
    pub fn connect_timeout(&self) -> Duration {
        nonzero(self.settings.connect_timeout_ms.load(Relaxed)).unwrap_or(Duration::from_secs(5))
    }

    /// Applies reloaded settings: the ages and timeouts from now on, the
    /// size by permits added at once or taken back as they come free.
    pub fn apply(&self, s: &PoolSettings) {
        self.settings.set(s);
        let old = self.size.swap(s.size, Relaxed);
        if s.size > old {
            let mut grow = s.size - old;
            // Permits still owed from an earlier shrink cancel out first.
            while grow > 0 {
                let debt = self.shrink_debt.load(Relaxed);
                if debt == 0 {
                    break;
                }
                let take = debt.min(grow);
                if self
                    .shrink_debt
                    .compare_exchange(debt, debt - take, Relaxed, Relaxed)
                    .is_ok()
                {
                    grow -= take;
                }
            }
            self.sem.add_permits(grow);
        } else if s.size < old {
            let shrink = old - s.size;
            let now = self.sem.forget_permits(shrink);
            self.shrink_debt.fetch_add(shrink - now, Relaxed);
            // Idle connections beyond the new size are closed.
            let extra: Vec<BackendConn> = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let keep = s.size.min(idle.len());
                idle.drain(keep..).collect()
            };
            for c in extra {
                c.terminate();
            }
        }
    }

    /// The pool's live backends, for `SHOW SERVERS`.
    pub fn servers(&self) -> Vec<Arc<ServerInfo>> {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Server parameters to announce to clients; connects once if needed.
    pub async fn server_params(
        self: &Arc<Self>,
        wait: Duration,
    ) -> Result<Vec<(String, String)>, PoolError> {
        if let Some(p) = self
            .server_params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(p);
        }
        let fp = crate::backend::state::SessionState::default().fingerprint();
        let c = self.get(fp, wait).await?;
        let params = c.params.clone();
        c.release();
        Ok(params)
    }

    /// Records that statement `internal` parsed without error on a backend
    /// with session state `fp`.
    pub fn mark_validated(&self, internal: &str, fp: u64) {
        let mut v = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= VALIDATED_MAX {
            v.clear();
        }
        v.insert((internal.to_owned(), fp));
    }

    /// Whether statement `internal` has parsed without error on a backend
    /// with session state `fp`.
    pub fn is_validated(&self, internal: &str, fp: u64) -> bool {
        self.validated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(internal.to_owned(), fp))
    }

    /// Closes the idle backends past `server_lifetime` or idle longer than
    /// `server_idle_timeout`; returns how many. Never waits: the node's
    /// pool reaper calls it periodically.
    pub fn reap(&self) -> usize {
        let expired: Vec<BackendConn> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (old, keep): (Vec<_>, Vec<_>) =
                idle.drain(..).partition(|c| self.settings.expired(c));
            *idle = keep;
            old
        };
        let n = expired.len();
        for c in expired {
            c.terminate();
        }
        if n > 0 {
            tracing::debug!(shard = %self.target.shard, closed = n, "closed expired idle backends");
        }
        n
    }

    /// Closes every idle backend (before `DROP DATABASE` of the pool's
    /// database, which PostgreSQL refuses while connections use it);
    /// returns how many.
    pub fn close_idle(&self) -> usize {
        let idle: Vec<BackendConn> = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let n = idle.len();
        for c in idle {
            c.terminate();
        }
        n
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn size(&self) -> usize {
        self.size.load(Relaxed)
    }

    /// Connections checked out right now.
    pub fn busy_count(&self) -> usize {
        (self.size() + self.shrink_debt.load(Relaxed)).saturating_sub(self.sem.available_permits())
    }

    /// Clients waiting for a connection right now.
    pub fn waiting_count(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Takes one permit off the debt of a shrink, if any is owed (one
    /// relaxed load when none is).
    fn take_debt(&self) -> bool {
        let mut debt = self.shrink_debt.load(Relaxed);
        while debt > 0 {
            match self
                .shrink_debt
                .compare_exchange(debt, debt - 1, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(d) => debt = d,
            }
        }
        false
    }

    /// A permit comes back: forgotten while the pool still owes permits
    /// after a shrink, else returned.
    fn give_back(&self, permit: OwnedSemaphorePermit) {
        if self.take_debt() {
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

/// A checked-out backend connection.
pub struct Pooled {
    conn: Option<BackendConn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
}

impl Pooled {
    /// The shard this connection goes to.
    pub fn shard(&self) -> &str {
        &self.pool.target.shard
    }

    /// Returns the connection to the pool. Call only at ReadyForQuery(idle)
    /// with nothing owed; a connection not `reusable()` is closed instead.
    pub fn release(mut self) {
        if self.pool.take_debt() {
            // The pool shrank (a reload): this connection and its permit
            // go, so that no more than the new size stay open.
            if let Some(c) = self.conn.take() {
                // No cancel may reach it from now on.
                c.cancel_gate.release();
                c.terminate();
            }
            if let Some(p) = self.permit.take() {
                p.forget();
            }
            return;
        }
        if let Some(mut c) = self.conn.take() {
            // A connection inside a transaction, or with an unsynced
            // pipeline, is closed (PostgreSQL rolls back), never reused.
            // One past its lifetime is closed here, at ReadyForQuery(idle):
            // its transaction, if any, has ended.
            let too_old = self
                .pool
                .settings
                .lifetime()
                .is_some_and(|l| c.created.elapsed() >= l);
            c.info.set_state(ServerInfo::IDLE);
            // After this no cancel can reach it; one already forwarded may
            // still land: then it is closed, not handed to another client.
            if c.cancel_gate.release() {
                tracing::debug!(shard = %self.pool.target.shard, "closing a backend a cancel request was forwarded to");
                c.terminate();
            } else if c.reusable() && too_old {
                tracing::debug!(shard = %self.pool.target.shard, "closing backend past server_lifetime");
                c.terminate();
            } else if c.reusable() {
                c.idle_since = std::time::Instant::now();
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(c);
            }
        }
        // Only now may a waiter take a permit and find the connection idle.
        if let Some(p) = self.permit.take() {
            self.pool.give_back(p);
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Not released: the connection (if still here) closes with the
        // guard; the permit goes back as a released one would.
        if let Some(p) = self.permit.take() {
            self.pool.give_back(p);
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        // `conn` is only taken by `release`, which consumes the guard.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}
impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

/// Pool key: shard index, database, user.
pub type PoolKey = (usize, String, String);

/// All pools of a node, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(&self, key: PoolKey, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key).or_insert_with(make).clone()
    }

    /// Forgets the pools of these client users (a reload changed their
    /// shard login): the next client makes new ones; sessions holding the
    /// old ones keep them until they end.
    pub fn forget_users(&self, users: &[String]) {
        if users.is_empty() {
            return;
        }
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|k, _| !users.contains(&k.2));
    }

    pub fn all(&self) -> Vec<(PoolKey, Arc<Pool>)> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
