//! The node's background tasks, supervised: the 2PC resolver, the reshard
//! job supervisor, the catalog follower — every task that lives as long as
//! the node — are started through [`Supervisor::spawn`].
//!
//! Guarantees:
//! - no background task dies silently: a task that panics, returns an
//!   error, or returns while the node is not shutting down is logged at
//!   ERROR and started again after a back-off (100 ms, doubling up to
//!   30 s; back to 100 ms after a run of 60 s or more);
//! - panics are caught through the task's `JoinHandle` (`JoinError::
//!   is_panic`), so a panic anywhere in the task (not only at its top)
//!   counts;
//! - each task's state (running or restarting, restarts so far, the last
//!   error and since when) is visible: [`Supervisor::status`], served by
//!   `GET /v1/status` and printed by `proxyctl status`;
//! - once the node's shutdown signal is set, nothing is restarted.

use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

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

/// Starts and watches the node's background tasks.
#[derive(Debug, Default)]
pub struct Supervisor {
    tasks: Mutex<BTreeMap<String, TaskStatus>>,
    backoff: Backoff,
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
            tasks: Mutex::default(),
            backoff,
        }
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

    /// Runs `make()` as task `name` until `shutdown` turns true: each run
    /// in its own tokio task; a run that panics, returns `Err`, or returns
    /// `Ok` before the shutdown is logged at ERROR and followed by a new
    /// run after the back-off. `make` must return a task that also ends
    /// when `shutdown` turns true.
    pub fn spawn<F, Fut>(self: &Arc<Self>, name: &str, shutdown: watch::Receiver<bool>, make: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let sup = self.clone();
        let name = name.to_string();
        self.set(&name, |_| {});
        tokio::spawn(async move {
            let mut shutdown = shutdown;
            let mut wait = sup.backoff.min;
            loop {
                sup.set(&name, |t| {
                    t.state = TaskState::Running;
                    t.since_ms = now_ms();
                });
                let started = tokio::time::Instant::now();
                let outcome = tokio::spawn(make()).await;
                let stopping = *shutdown.borrow();
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
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() {
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
        let (tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let stop = rx.clone();
        sup.spawn("resolver", rx, move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let mut stop = stop.clone();
            async move {
                // A panic deep inside the task, the first two runs.
                if n < 2 {
                    let v: Vec<u32> = Vec::new();
                    let _ = v[n as usize + 5];
                }
                let _ = stop.wait_for(|s| *s).await;
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
        let _ = tx.send(true);
        wait_until("the task stopped", || {
            sup.status()[0].state == TaskState::Stopped
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(sup.status()[0].restarts, 2);
    }

    #[tokio::test]
    async fn errors_and_early_returns_restart_the_task() {
        let sup = fast();
        let (_tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("follower", rx, move || {
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
}
