//! The node's background tasks, all started here: every task the node runs
//! besides the caller's own is spawned through its [`Supervisor`]
//! (`Node::tasks`), under one [`TaskTracker`] and one [`CancellationToken`]
//! — the node's shutdown signal.
//!
//! Three kinds:
//! - [`Supervisor::supervise`]: tasks that live as long as the node (the
//!   catalog follower, the 2PC resolver, the reshard job supervisor),
//!   restarted when they fail;
//! - [`Supervisor::spawn`]: a task that runs to its own end and watches the
//!   shutdown token itself where it must stop early (the accept loop, the
//!   admin HTTP server, which finishes the requests in flight);
//! - [`Supervisor::spawn_until_shutdown`]: a task dropped at its next
//!   `.await` once the node shuts down (a client session, a reshard job's
//!   runner — every job step may be dropped at any `.await`).
//!
//! Not here: the drivers of the control plane's tokio-postgres connections
//! (`control::pg::drive`), which end on their own when their client is
//! dropped, and `spawn_blocking` calls that their caller awaits.
//!
//! Guarantees:
//! - no background task dies silently: a supervised task that panics,
//!   returns an error, or returns while the node is not shutting down is
//!   logged at ERROR and started again after a back-off (100 ms, doubling
//!   up to 30 s; back to 100 ms after a run of 60 s or more);
//! - panics are caught through the task's `JoinHandle` (`JoinError::
//!   is_panic`), so a panic anywhere in the task (not only at its top)
//!   counts;
//! - each supervised task's state (running or restarting, restarts so far,
//!   the last error and since when) is visible: [`Supervisor::status`],
//!   served by `GET /v1/status` and printed by `proxyctl status`;
//! - once the node's shutdown token is cancelled, nothing is restarted;
//!   [`Supervisor::shutdown`] cancels it and waits, for a bounded time,
//!   until every task started here has ended.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where a supervised task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Running.
    Running,
    /// It failed and waits for its back-off before it starts again.
    Restarting,
    /// It ended because the node shuts down.
    Stopped,
}

/// The state of one supervised task, as `/v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskStatus {
    /// The task's name.
    pub name: String,
    /// Where it is.
    pub state: TaskState,
    /// How often it was started again after a failure.
    pub restarts: u64,
    /// The last failure (a panic's message, the error it returned).
    pub last_error: Option<String>,
    /// When it entered `state` (milliseconds since the Unix epoch).
    pub since_ms: u64,
}

/// Back-off between restarts of a failing task.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
    /// A run at least this long resets the wait to `min`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Starts, tracks and stops the node's background tasks.
#[derive(Debug, Default)]
pub struct Supervisor {
    /// Supervised tasks, by name.
    tasks: Mutex<BTreeMap<String, TaskStatus>>,
    backoff: Backoff,
    /// Every task started here (supervised runs included).
    tracker: TaskTracker,
    /// The node's shutdown signal.
    shutdown: CancellationToken,
    /// Tasks [`Supervisor::spawn_until_shutdown`] started and that still
    /// run, aborted by [`Supervisor::stop`]. (A registry rather than a
    /// `select!` on the token in each task: client sessions wake many
    /// times per transaction, and the token would be polled each time.)
    droppable: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    next_droppable: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The message of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl Supervisor {
    /// A supervisor with its own back-off (tests use short ones).
    pub fn with_backoff(backoff: Backoff) -> Supervisor {
        Supervisor {
            backoff,
            ..Supervisor::default()
        }
    }

    /// The node's shutdown signal (a clone: cancelled together).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether the node is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// How many tasks started here have not ended yet.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Runs `task` in a tokio task of its own, tracked: [`Supervisor::
    /// shutdown`] waits for it. It runs to its own end; a task that must
    /// stop when the node shuts down watches [`Supervisor::
    /// shutdown_token`].
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `task` in a tokio task of its own, tracked, and drops it at its
    /// next `.await` once the node shuts down: only for tasks that may stop
    /// at any `.await` (a client session: its client sees the connection
    /// close; a reshard job's runner).
    pub fn spawn_until_shutdown<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.next_droppable.fetch_add(1, Ordering::Relaxed);
        let registry = Arc::clone(&self.droppable);
        // Registered under the lock the task's own removal takes: a task
        // that ends at once cannot remove itself before it is registered
        // (which would leave its handle behind for good).
        let handle = {
            let mut m = self.droppable.lock().unwrap_or_else(|e| e.into_inner());
            let handle = self.tracker.spawn(async move {
                task.await;
                registry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
            m.insert(id, handle.abort_handle());
            handle
        };
        // Started while the node stops: stopped at once.
        if self.shutdown.is_cancelled() {
            handle.abort();
        }
        handle
    }

    /// Starts the shutdown: cancels the token (the accept loop and the
    /// supervised tasks end, the tasks of [`Supervisor::
    /// spawn_until_shutdown`] are dropped, the admin API finishes its
    /// requests in flight). Does not wait.
    pub fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        let droppable: Vec<AbortHandle> = self
            .droppable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in droppable {
            h.abort();
        }
    }

    /// [`Supervisor::stop`], then waits until every task started here has
    /// ended, at most `within`. Returns whether they all ended; tasks
    /// still running then are left to the runtime (they end when it is
    /// dropped).
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.stop();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }

    /// The state of every task started so far, by name.
    pub fn status(&self) -> Vec<TaskStatus> {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, name: &str, f: impl FnOnce(&mut TaskStatus)) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let t = tasks.entry(name.to_string()).or_insert_with(|| TaskStatus {
            name: name.to_string(),
            state: TaskState::Running,
            restarts: 0,
            last_error: None,
            since_ms: now_ms(),
        });
        f(t);
    }

    /// Runs `make(shutdown)` as task `name` until the node shuts down: each
    /// run in its own tokio task; a run that panics, returns `Err`, or
    /// returns `Ok` before the shutdown is logged at ERROR and followed by
    /// a new run after the back-off. The task `make` returns must end when
    /// the token it is given is cancelled.
    pub fn supervise<F, Fut>(self: &Arc<Self>, name: &str, make: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let sup = self.clone();
        let name = name.to_string();
        self.set(&name, |_| {});
        self.tracker.spawn(async move {
            let shutdown = sup.shutdown.clone();
            let mut wait = sup.backoff.min;
            loop {
                sup.set(&name, |t| {
                    t.state = TaskState::Running;
                    t.since_ms = now_ms();
                });
                let started = tokio::time::Instant::now();
                let outcome = sup.tracker.spawn(make(shutdown.clone())).await;
                let stopping = shutdown.is_cancelled();
                let error = match outcome {
                    Ok(Ok(())) if stopping => None,
                    Ok(Ok(())) => Some("ended while the node is running".to_string()),
                    Ok(Err(e)) => Some(e),
                    Err(e) if e.is_panic() => {
                        Some(format!("panicked: {}", panic_message(&*e.into_panic())))
                    }
                    // Cancelled: the runtime is shutting down.
                    Err(_) => None,
                };
                let Some(error) = error.filter(|_| !stopping) else {
                    sup.set(&name, |t| {
                        t.state = TaskState::Stopped;
                        t.since_ms = now_ms();
                    });
                    return;
                };
                if started.elapsed() >= sup.backoff.reset_after {
                    wait = sup.backoff.min;
                }
                tracing::error!(task = %name, error = %error, restart_in_ms = wait.as_millis() as u64, "background task failed; restarting it");
                sup.set(&name, |t| {
                    t.state = TaskState::Restarting;
                    t.restarts += 1;
                    t.last_error = Some(error);
                    t.since_ms = now_ms();
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => {
                        sup.set(&name, |t| {
                            t.state = TaskState::Stopped;
                            t.since_ms = now_ms();
                        });
                        return;
                    },
                }
                wait = (wait * 2).min(sup.backoff.max);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> Arc<Supervisor> {
        Arc::new(Supervisor::with_backoff(Backoff {
            min: Duration::from_millis(5),
            max: Duration::from_millis(20),
            reset_after: Duration::from_secs(60),
        }))
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_reported() {
        let sup = fast();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.supervise("resolver", move |stop| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                // A panic deep inside the task, the first two runs.
                if n < 2 {
                    let v: Vec<u32> = Vec::new();
                    let _ = v[n as usize + 5];
                }
                stop.cancelled().await;
                Ok(())
            }
        });
        wait_until("the third run", || runs.load(Ordering::SeqCst) == 3).await;
        wait_until("the task running again", || {
            sup.status()
                .first()
                .is_some_and(|t| t.state == TaskState::Running)
        })
        .await;
        let st = sup.status();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].name, "resolver");
        assert_eq!(st[0].restarts, 2);
        let err = st[0].last_error.clone().unwrap_or_default();
        assert!(
            err.contains("panicked") && err.contains("index out of bounds"),
            "{err}"
        );
        // Shutdown: it ends and is not restarted.
        assert!(sup.shutdown(Duration::from_secs(10)).await);
        assert_eq!(sup.status()[0].state, TaskState::Stopped);
        assert_eq!(sup.running(), 0);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(sup.status()[0].restarts, 2);
    }

    #[tokio::test]
    async fn errors_and_early_returns_restart_the_task() {
        let sup = fast();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.supervise("follower", move |_stop| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err("the catalog stopped".to_string()),
                    1 => Ok(()),
                    _ => std::future::pending().await,
                }
            }
        });
        wait_until("the third run", || runs.load(Ordering::SeqCst) == 3).await;
        wait_until("two restarts", || sup.status()[0].restarts == 2).await;
        let st = &sup.status()[0];
        assert_eq!(
            st.last_error.as_deref(),
            Some("ended while the node is running")
        );
        let json = serde_json::to_value(st).unwrap_or_default();
        assert_eq!(json["restarts"], 2);
        assert!(json["state"].is_string(), "{json}");
    }

    /// Shutdown cancels the token, drops the tasks that may be dropped,
    /// waits for the ones that finish their work, and gives up on a task
    /// that does not end within the bound.
    #[tokio::test]
    async fn shutdown_waits_for_tracked_tasks_within_a_bound() {
        let sup = fast();
        // A supervised task and a task dropped at shutdown.
        sup.supervise("follower", |stop| async move {
            stop.cancelled().await;
            Ok(())
        });
        struct Dropped(Arc<AtomicU32>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicU32::new(0));
        let d = Dropped(dropped.clone());
        sup.spawn_until_shutdown(async move {
            let _d = d;
            std::future::pending::<()>().await;
        });
        // A task that finishes its work after the signal (50 ms).
        let finished = Arc::new(AtomicU32::new(0));
        let (f, stop) = (finished.clone(), sup.shutdown_token());
        sup.spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            f.fetch_add(1, Ordering::SeqCst);
        });
        wait_until("the follower running", || {
            sup.status()
                .first()
                .is_some_and(|t| t.state == TaskState::Running)
        })
        .await;
        assert!(sup.running() >= 3, "{}", sup.running());
        assert!(!sup.is_shutting_down());
        assert!(sup.shutdown(Duration::from_secs(10)).await);
        assert!(sup.is_shutting_down());
        assert_eq!(sup.running(), 0);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(sup.status()[0].state, TaskState::Stopped);

        // A task that ignores the signal holds the shutdown only as long
        // as the bound.
        let sup = fast();
        sup.spawn(std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        assert!(!sup.shutdown(Duration::from_millis(100)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(sup.running(), 1);
    }
}
