//! `PAUSE` / `RESUME` of the admin console (PgBouncer's semantics): while
//! the node (or one database) is paused, a client that needs a server
//! connection for a new transaction waits; transactions already holding
//! one go on to their end. The console's PAUSE returns once every server
//! connection concerned is back in its pool.
//!
//! The data path only reads one atomic flag ([`Pause::active`]) before a
//! checkout; the lock and the wait are taken only while something is
//! paused. A leaf: imports nothing of the crate.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    /// The whole node.
    all: bool,
    /// Single databases.
    dbs: BTreeSet<String>,
}

/// What is paused.
#[derive(Debug, Default)]
pub struct Pause {
    /// Anything paused: the only thing the data path reads when nothing is.
    any: AtomicBool,
    state: Mutex<State>,
    resumed: tokio::sync::Notify,
    /// Clients waiting for RESUME now (`SHOW STATE`).
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counts a waiter of [`Pause::wait`] while it lives.
struct Waiter<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a PAUSE or RESUME was refused (PgBouncer's words).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("already paused")]
    AlreadyPaused,
    #[error("the node is not paused")]
    NotPaused,
    #[error("database \"{0}\" is not paused")]
    DatabaseNotPaused(String),
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether anything is paused (one relaxed load: the fast path).
    #[inline]
    pub fn active(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether a new transaction on `database` must wait.
    pub fn holds(&self, database: &str) -> bool {
        if !self.active() {
            return false;
        }
        let s = self.lock();
        s.all || s.dbs.contains(database)
    }

    /// Pauses the node (`None`) or one database.
    pub fn pause(&self, database: Option<&str>) -> Result<(), PauseError> {
        let mut s = self.lock();
        match database {
            None if s.all => return Err(PauseError::AlreadyPaused),
            None => s.all = true,
            Some(d) if s.all || s.dbs.contains(d) => return Err(PauseError::AlreadyPaused),
            Some(d) => {
                s.dbs.insert(d.to_string());
            }
        }
        self.any.store(true, Ordering::Release);
        Ok(())
    }

    /// Resumes everything paused (`None`) or one database.
    pub fn resume(&self, database: Option<&str>) -> Result<(), PauseError> {
        let mut s = self.lock();
        match database {
            None if !s.all && s.dbs.is_empty() => return Err(PauseError::NotPaused),
            None => {
                s.all = false;
                s.dbs.clear();
            }
            Some(d) => {
                if !s.dbs.remove(d) {
                    return Err(PauseError::DatabaseNotPaused(d.to_string()));
                }
            }
        }
        self.any
            .store(s.all || !s.dbs.is_empty(), Ordering::Release);
        drop(s);
        self.resumed.notify_waiters();
        Ok(())
    }

    /// Waits until `database` is not paused, at most `limit` (`None`: no
    /// limit); false when the limit passed first. Cancel-safe.
    pub async fn wait(&self, database: &str, limit: Option<Duration>) -> bool {
        if !self.holds(database) {
            return true;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiter = Waiter(&self.waiting);
        let deadline = limit.map(|l| tokio::time::Instant::now() + l);
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            // Registered before the check: a RESUME between the two wakes it.
            resumed.as_mut().enable();
            if !self.holds(database) {
                return true;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, resumed).await.is_err() {
                        return !self.holds(database);
                    }
                }
                None => resumed.await,
            }
        }
    }

    /// Clients waiting for RESUME now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The paused databases, and whether the whole node is (`SHOW STATE`).
    pub fn paused(&self) -> (bool, Vec<String>) {
        let s = self.lock();
        (s.all, s.dbs.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_and_resume_follow_pgbouncer() {
        let p = Pause::default();
        assert!(!p.active() && !p.holds("a"));
        p.pause(Some("a")).expect("pause a");
        assert!(p.holds("a") && !p.holds("b"));
        assert_eq!(p.pause(Some("a")), Err(PauseError::AlreadyPaused));
        assert_eq!(
            p.resume(Some("b")),
            Err(PauseError::DatabaseNotPaused("b".into()))
        );
        p.pause(None).expect("pause all");
        assert_eq!(p.pause(None), Err(PauseError::AlreadyPaused));
        assert!(p.holds("b"));
        p.resume(None).expect("resume");
        assert!(!p.active() && !p.holds("a"));
        assert_eq!(p.resume(None), Err(PauseError::NotPaused));
    }

    #[tokio::test]
    async fn a_waiter_goes_on_at_resume_or_its_limit() {
        let p = Arc::new(Pause::default());
        p.pause(None).expect("pause");
        assert!(!p.wait("db", Some(Duration::from_millis(20))).await);
        let q = p.clone();
        let w = tokio::spawn(async move { q.wait("db", None).await });
        // The waiter is parked until the RESUME (no timing assumed: it
        // may start before or after it).
        p.resume(None).expect("resume");
        let done = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("the waiter ends after RESUME")
            .expect("no panic");
        assert!(done);
    }
}
