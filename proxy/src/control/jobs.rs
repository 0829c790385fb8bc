//! Reshard jobs: `proxyctl reshard move|split|add-shard|drain`, run by the
//! catalog's leader with the data-movement engine
//! ([`crate::control::reshard`]), their state in the replicated log. The
//! HTTP endpoints are in `control/admin/jobs.rs`; design:
//! `docs/design/resharding.md`.
//!
//! A job is a `JobStart` entry (the range becomes Moving: no split, no
//! second job) followed by `JobUpdate`s recording each phase. The leader's
//! supervisor runs every unfinished job from its recorded phase; every step
//! is idempotent, so when the node running a job dies, the next leader
//! resumes it (after waiting one lease, so that the old runner — which
//! stops when it loses its lease or its leadership — is no longer running).
//!
//! `add-shard --rebalance` and `drain` start jobs from a plan balanced by
//! rows (`rebalance`), which `dry_run` answers without changing anything.
//!
//! Phases: Planned (capture: publication and slot on the source) → Copy
//! (after `settle`: every node hides the range on the target) → CatchUp →
//! CutOver (the whole range compared row by row before the freeze; freeze;
//! `settle`: every node acknowledges the freeze or loses its lease, and
//! fences its statements in flight; open transactions on the source end;
//! final catch-up; the keys touched since the comparison rechecked; the
//! flip, which assigns the range and lifts the freeze in one catalog entry)
//! → Flipped (`settle`; capture dropped; the source's copy deleted in
//! batches) → Done. Abort (before the flip) → Aborting (thaw;
//! the target's copy deleted; capture dropped) → Aborted. A step that keeps
//! failing before the flip aborts the job the same way and records Failed
//! with the error.
//!
//! Guarantees:
//! - a write never lands on a shard that no longer owns its range: writes
//!   to the range wait while it is frozen, and the flip happens only once
//!   every node has applied the freeze (or stopped routing);
//! - nothing is lost: the slot exists before the copy; the final catch-up
//!   runs after every transaction open at the freeze has ended; the owner
//!   flips only if the range is equal on both sides, row by row (compared
//!   before the freeze, the keys touched since rechecked inside it:
//!   `reshard::verify`);
//! - no path leaves a slot or publication behind: Done, Aborted and Failed
//!   all drop the capture (a failure to drop is retried, and reported).
//! - nothing deletes a range's rows on a shard that owns it: giving up is
//!   recorded (Aborting) before anything is undone, and the catalog
//!   refuses it after the flip; every destructive step re-reads the phase
//!   from the catalog right before it acts; the engine checks the current
//!   routing table before every delete (`MoveSpec::guard`);
//! - a step runs only while this node leads and holds its lease: it is
//!   dropped (`while_running`) within 50 ms of losing either;
//! - the flip happens only under the job's own freeze (the catalog checks
//!   `FreezeId::for_job`), and only the job lifts that freeze while it
//!   lives (an operator's `range unfreeze` is refused).

pub(crate) mod pgbin;
pub(crate) mod rebalance;
pub(crate) mod schema_copy;

pub mod running;
pub use running::{JobGate, Running};

use crate::control::reshard::{self, MoveSpec, OwnerGuard, Session, Side, TableMove, Touched};
use crate::failpoint::{self, Failpoint};
use crate::node::Node;
use futures_util::FutureExt;
use hotrepart_router::catalog::{Functions, RoutingSnapshot, Span};
use hotrepart_routing_paxos::{
    Applied, Catalog, CatalogCommand, FreezeId, JobPhase, JobRecord, ProposeError, Rejected,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a catalog change of a job may take.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Changes read per catch-up call.
const CATCH_UP_BATCH: usize = 20_000;
/// Attempts of a failing step before a job is aborted (before the flip).
const ATTEMPTS: u32 = 4;
/// How long the cut-over waits for transactions open at the freeze.
const OPEN_TX_WAIT: Duration = Duration::from_secs(5);
/// The final catch-up of the cut-over must drain within this.
const FINAL_DRAIN_WAIT: Duration = Duration::from_secs(5);

/// The job supervisor (a supervised background task of the node, see
/// [`crate::control::supervisor`]): while this node leads the catalog (and holds
/// its lease), it runs every unfinished job, each in a task of the node's
/// supervisor that ends at the node's shutdown. Ends when `shutdown` is
/// cancelled.
pub async fn supervise(node: Arc<Node>, shutdown: CancellationToken) -> Result<(), String> {
    let mut led_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        if !runs_jobs(&node) {
            led_since = None;
            continue;
        }
        let since = *led_since.get_or_insert_with(Instant::now);
        let catalog = node.catalog_handle.catalog();
        for (id, rec) in catalog.jobs() {
            if rec.phase.is_final() || is_running(&node, id) {
                continue;
            }
            // Another node ran it last: wait one lease (+ margin) after
            // taking over, so that node has stopped.
            let me = node.catalog_handle.node_id();
            if rec.owner != 0 && rec.owner != me && since.elapsed() < takeover_delay(&node) {
                continue;
            }
            spawn_job(&node, id);
        }
    }
}

/// Marks job `id` as running here until dropped (also when its task
/// panics: the job is then picked up again by the supervisor).
struct RunningGuard {
    node: Arc<Node>,
    id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.node
            .jobs
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Runs job `id` in a task of its own, tracked by the node's supervisor
/// and dropped at the node's shutdown (a job's steps may be dropped at any
/// `.await`; the next runner resumes from the recorded phase); a panic is
/// logged at ERROR (the job supervisor starts the job again on its next
/// round).
fn spawn_job(node: &Arc<Node>, id: &str) {
    node.jobs
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_string());
    let guard = RunningGuard {
        node: node.clone(),
        id: id.to_string(),
    };
    node.tasks.spawn_until_shutdown(async move {
        let r = std::panic::AssertUnwindSafe(run(&guard.node, &guard.id))
            .catch_unwind()
            .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(job = %guard.id, error = %e, "reshard job stopped on this node");
            }
            Err(_) => {
                tracing::error!(job = %guard.id, "reshard job runner panicked; the supervisor starts it again");
            }
        }
    });
}

fn is_running(node: &Node, id: &str) -> bool {
    node.jobs
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(id)
}

/// Whether this node should drive jobs now: it is the leader (a node alone
/// always is) and holds its lease.
fn runs_jobs(node: &Node) -> bool {
    let st = node.catalog_handle.status();
    let leader = node.cfg().cluster.is_none() || st.leader == Some(st.node_id);
    leader && node.catalog_handle.lease_valid() && node.routing.catalog_ready()
}

fn takeover_delay(node: &Node) -> Duration {
    let lease = node.cfg().cluster.as_ref().map_or(0, |c| c.lease_ms);
    Duration::from_millis(lease + lease / 10 + 100)
}

/// How long one node may take to fence (`RoutingState::fence`).
const FENCE_LIMIT: Duration = Duration::from_secs(5);

/// Waits until every node routes by the catalog as this node has applied
/// it now, and no node has a statement routed by an older routing table
/// still in flight: `await_all_applied` (every node applied the entries, or
/// lost its lease), then `RoutingState::fence` on this node and on every peer
/// through its admin API (`POST /v1/fence`). Without the fence, a write
/// routed just before a freeze (e.g. still waiting for a pooled backend)
/// could reach the range's source after the cut-over's last catch-up.
///
/// A peer whose admin API is not configured or cannot be reached is
/// waited for by its lease instead (lease + 10% + 100 ms from the start):
/// by then it no longer routes by an older table. Limit: a statement such
/// an unreachable node had already routed and still holds in flight is not
/// waited for. A peer that answers but cannot fence in time fails the call
/// (the cut-over retries).
pub(crate) async fn settle(node: &Arc<Node>) -> Result<(), JobError> {
    let started = Instant::now();
    let h = &node.catalog_handle;
    let epoch = h.catalog().epoch();
    h.await_all_applied(h.applied_index()).await?;
    let own = node.routing.fence(epoch, FENCE_LIMIT);
    // The current members (membership changes at run time), with the admin
    // URL this node's configuration gives for them, else the one recorded
    // when they were added (`node add --admin`).
    let status = h.status();
    let configured: std::collections::HashMap<u64, Option<String>> = node
        .cfg()
        .cluster
        .as_ref()
        .map(|c| c.peers.iter().map(|p| (p.id, p.admin.clone())).collect())
        .unwrap_or_default();
    let peers: Vec<(u64, Option<String>)> = status
        .members
        .iter()
        .filter(|&&id| id != status.node_id)
        .map(|id| {
            let admin = configured
                .get(id)
                .cloned()
                .flatten()
                .or_else(|| status.admin.get(id).cloned());
            (*id, admin)
        })
        .collect();
    let token = node.cfg().admin.as_ref().and_then(|a| a.token().ok());
    let cacert = node.cfg().admin.as_ref().and_then(|a| a.cacert.clone());
    let calls = peers.into_iter().map(|(id, admin)| {
        let token = token.clone();
        let cacert = cacert.clone();
        async move {
            let answer = match (admin, token) {
                (Some(url), Some(token)) => fence_peer(url, token, epoch, cacert).await,
                _ => Err(None),
            };
            match answer {
                Ok(()) => Ok(()),
                Err(Some(refusal)) => Err(JobError::Other(format!("node {id}: {refusal}"))),
                Err(None) => {
                    let wait = takeover_delay(node).saturating_sub(started.elapsed());
                    tracing::warn!(peer = id, wait_ms = wait.as_millis() as u64, "peer cannot be fenced through its admin API; waiting for its lease instead");
                    tokio::time::sleep(wait).await;
                    Ok(())
                }
            }
        }
    });
    let (own, peers) = tokio::join!(own, futures_util::future::join_all(calls));
    own.map_err(|e| JobError::Other(format!("this node: {e}")))?;
    peers.into_iter().collect::<Result<Vec<()>, JobError>>()?;
    Ok(())
}

/// [`settle`], up to `attempts` times, 200 ms apart (a statement running
/// longer than a fence allows fails one attempt): the last error if none
/// succeeded.
pub(crate) async fn settle_retrying(node: &Arc<Node>, attempts: u32) -> Result<(), JobError> {
    let mut attempt = 1;
    loop {
        match settle(node).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "fencing the nodes failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `POST {admin}/v1/fence`. `Err(None)`: the peer could not be reached
/// (an `https://` peer is checked against `[admin] cacert`);
/// `Err(Some(why))`: it answered that it cannot fence.
async fn fence_peer(
    admin: String,
    token: String,
    epoch: u64,
    cacert: Option<std::path::PathBuf>,
) -> Result<(), Option<String>> {
    tokio::task::spawn_blocking(move || {
        let agent = crate::tls::http_agent(FENCE_LIMIT + Duration::from_secs(2), cacert.as_deref())
            .map_err(|e| {
                tracing::warn!(error = %e, "fence: [admin] cacert");
                None
            })?;
        let url = format!("{}/v1/fence", admin.trim_end_matches('/'));
        let mut res = agent
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(json!({ "epoch": epoch, "timeout_ms": FENCE_LIMIT.as_millis() as u64 }))
            .map_err(|e| {
                tracing::debug!(%url, "fence: {e}");
                None
            })?;
        if res.status().is_success() {
            return Ok(());
        }
        let text = res.body_mut().read_to_string().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(Some(format!("{msg} (HTTP {})", res.status().as_u16())))
    })
    .await
    .unwrap_or(Err(None))
}

/// Why a job stopped on this node.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("this node no longer leads the catalog or lost its lease")]
    NotLeader,
    #[error("the job is {phase} in the catalog now, so this runner does not {what}")]
    PhaseChanged { phase: &'static str, what: String },
    #[error("the job is not in the catalog")]
    Unknown,
    #[error("catalog: {0}")]
    Catalog(String),
    #[error(transparent)]
    Engine(#[from] reshard::ReshardError),
    #[error("{0}")]
    Other(String),
}

impl From<ProposeError> for JobError {
    fn from(e: ProposeError) -> JobError {
        JobError::Catalog(e.to_string())
    }
}

/// What a job moves, per database of the source.
struct Plan {
    /// The job.
    id: String,
    specs: Vec<MoveSpec>,
    range: Span,
    from: String,
    /// The job's freeze (`FreezeId::for_job`: the same on every node and
    /// across restarts; the catalog flips the range only under it).
    freeze: FreezeId,
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100000001b3)
    })
}

/// Proposes `cmd`; a rejection is an error.
async fn propose(node: &Node, cmd: CatalogCommand) -> Result<Applied, JobError> {
    let kind = cmd.kind();
    match node.catalog_handle.propose(cmd, PROPOSE_TIMEOUT).await? {
        Ok(a) => Ok(a),
        Err(r) => Err(JobError::Catalog(format!("{kind}: {r}"))),
    }
}

async fn update(
    node: &Node,
    job: &str,
    phase: JobPhase,
    rows: u64,
    lag: u64,
    note: &str,
) -> Result<(), JobError> {
    propose(
        node,
        CatalogCommand::JobUpdate {
            job: job.to_string(),
            phase,
            owner: node.catalog_handle.node_id(),
            rows_copied: rows,
            lag_bytes: lag,
            note: note.to_string(),
        },
    )
    .await
    .map(|_| ())
}

fn record(node: &Node, job: &str) -> Result<JobRecord, JobError> {
    node.catalog_handle
        .catalog()
        .job(job)
        .cloned()
        .ok_or(JobError::Unknown)
}

/// The note of an Aborting recorded because the job gave up (its steps
/// kept failing): the job then ends Failed, with the rest of the note as
/// the error, instead of Aborted.
const GIVING_UP: &str = "failed: ";

/// Err(NotLeader) unless this node may run jobs now.
fn ensure_runs(node: &Node) -> Result<(), JobError> {
    if runs_jobs(node) {
        Ok(())
    } else {
        Err(JobError::NotLeader)
    }
}

/// Right before a destructive step (deleting rows, dropping the capture,
/// lifting the freeze): this node still runs jobs, and the catalog — read
/// again now, not the phase the step started from — has the job in a
/// phase `allowed` says the step belongs to.
fn recheck(
    node: &Node,
    id: &str,
    allowed: impl Fn(JobPhase) -> bool,
    what: &str,
) -> Result<(), JobError> {
    ensure_runs(node)?;
    let phase = record(node, id)?.phase;
    if allowed(phase) {
        Ok(())
    } else {
        Err(JobError::PhaseChanged {
            phase: phase.name(),
            what: what.to_string(),
        })
    }
}

/// Runs `step` until it ends, or until this node loses its leadership or
/// its lease (checked every 50 ms): then the step is dropped — every step
/// may be, at any `.await` (see `reshard`'s module docs) — and the job is
/// left to the next leader. A runner that lost its right to run never
/// goes on to its next statement, however long the step's waits are.
async fn while_running<T>(
    node: &Node,
    step: impl std::future::Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    let lost = async {
        while runs_jobs(node) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = step => r,
        () = lost => Err(JobError::NotLeader),
    }
}

/// Test-only knob: `HOTREPART_TEST_JOB_STEP_DELAY_MS=<ms>` makes the
/// runner of a reshard job wait that long before each step (read once per
/// process), so that every phase lasts long enough for a test to act in it
/// (`tests/tests/it/consistency/` reads through the nodes in every phase). Never
/// set in production: it only slows jobs down (a wait between idempotent
/// steps, as a slow step would), it changes no step.
fn test_step_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var("HOTREPART_TEST_JOB_STEP_DELAY_MS")
            .ok()?
            .parse()
            .ok()?;
        tracing::warn!(
            delay_ms = ms,
            "HOTREPART_TEST_JOB_STEP_DELAY_MS (test only): reshard job steps are delayed"
        );
        Some(Duration::from_millis(ms))
    })
}

/// Runs job `id` from its recorded phase until it ends or this node stops
/// leading.
///
/// The phase every step acts on is read from the catalog at the top of
/// each round, and the destructive steps read it again right before they
/// act ([`recheck`]). Giving up (a step failed [`ATTEMPTS`] times before
/// the flip) is itself a catalog decision: Aborting is proposed first and
/// the copy is undone only once the catalog accepted it — the catalog
/// refuses it once the range flipped, even when the flip's proposal
/// seemed to fail here (a timeout after it was decided), and the job then
/// goes on from Flipped.
pub async fn run(node: &Arc<Node>, id: &str) -> Result<(), JobError> {
    let mut failures = 0u32;
    loop {
        if let Some(d) = test_step_delay() {
            tokio::time::sleep(d).await;
        }
        ensure_runs(node)?;
        let rec = record(node, id)?;
        if rec.phase.is_final() {
            return Ok(());
        }
        let catalog = node.catalog_handle.catalog();
        let functions = node.routing.catalog.load().functions().clone();
        let plan = match plan(node, &catalog, id, &rec, functions).await {
            Ok(p) => p,
            Err(e) if rec.phase < JobPhase::Flipped => {
                // Nothing can be moved (the source unreachable, a routing
                // function not loaded …). Before the copy: end the job.
                // After it the target may hold copied rows, hidden from
                // reads only while the job lives (`KeyRange::hidden_on`):
                // ending it without deleting them would show them twice,
                // and deleting needs the plan — so keep trying, and say why
                // in the job's note.
                tracing::warn!(job = %id, error = %e, "reshard job cannot be planned");
                failures += 1;
                if failures >= ATTEMPTS && rec.phase > JobPhase::Planned {
                    let note = format!("cannot plan the job (retrying): {e}");
                    if rec.note != note {
                        let _ = update(node, id, rec.phase, rec.rows_copied, rec.lag_bytes, &note)
                            .await;
                    }
                    let backoff = Duration::from_secs(u64::from(failures.min(30)));
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                if failures >= ATTEMPTS {
                    let r = update(
                        node,
                        id,
                        JobPhase::Failed,
                        rec.rows_copied,
                        0,
                        &e.to_string(),
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(job = %id, error = %e, "cannot record the job as failed; reading its phase again");
                        failures = 0;
                    }
                    continue;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(gate) = &node.job_gate {
            gate.pass(id, rec.phase).await;
        }
        match while_running(node, step(node, id, &rec, &plan)).await {
            Ok(()) => failures = 0,
            Err(JobError::NotLeader) => return Err(JobError::NotLeader),
            Err(e @ JobError::PhaseChanged { .. }) => {
                // Not a failure: the next round acts on the new phase.
                tracing::info!(job = %id, "{e}");
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(job = %id, phase = rec.phase.name(), attempt = failures, error = %e, "reshard step failed");
                if failures >= ATTEMPTS && record(node, id)?.phase < JobPhase::Flipped {
                    // Give up before the flip: record the decision, then
                    // (in the Aborting phase) undo and record Failed.
                    let r = update(
                        node,
                        id,
                        JobPhase::Aborting,
                        rec.rows_copied,
                        0,
                        &format!("{GIVING_UP}{e}"),
                    )
                    .await;
                    if let Err(refused) = r {
                        tracing::warn!(job = %id, error = %refused, "the job cannot be given up now (it may have flipped); going on from its recorded phase");
                    }
                    failures = 0;
                    continue;
                }
                let backoff = 500 * u64::from(failures.min(20));
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
}

/// Counts the cut-over attempts of this process (failpoint `reshard_flip_lost`).
static CUT_OVER_ATTEMPTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One phase of a job.
async fn step(node: &Arc<Node>, id: &str, rec: &JobRecord, plan: &Plan) -> Result<(), JobError> {
    match rec.phase {
        JobPhase::Planned => {
            let grace = match node.cfg().cutover_idle_grace_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            };
            for s in &plan.specs {
                reshard::check_preconditions(s).await?;
                // Creating the slot waits for every transaction open on
                // the source server.
                ending_idle_writers(
                    &s.source_dsn,
                    &s.database,
                    grace,
                    id,
                    reshard::start_capture(s),
                )
                .await??;
            }
            update(node, id, JobPhase::Copy, 0, 0, "capture started").await
        }
        JobPhase::Copy => {
            // Every node routes by the table that hides the range on the
            // target (`KeyRange::hidden_on`, set by JobStart), and nothing
            // routed by an older one is in flight, before a row lands there.
            settle(node).await?;
            let copied = Arc::new(AtomicU64::new(0));
            let copy = async {
                let mut total = 0;
                for s in &plan.specs {
                    let base = total;
                    let c = copied.clone();
                    total +=
                        reshard::copy(s, move |n| c.store(base + n, Ordering::Relaxed)).await?;
                }
                Ok::<u64, JobError>(total)
            };
            // The progress reports run beside the copy, in this task: they
            // end when the copy does — or when the step is dropped.
            let total = tokio::select! {
                r = copy => r?,
                never = report_copy_progress(node, id, &copied) => match never {},
            };
            update(node, id, JobPhase::CatchUp, total, 0, "copied").await
        }
        JobPhase::CatchUp => {
            // Catch up until the backlog is small, then cut over (over
            // connections kept open between passes).
            let started = Instant::now();
            let mut sessions = Vec::new();
            for s in &plan.specs {
                sessions.push(Session::open(s).await?);
            }
            loop {
                ensure_runs(node)?;
                let mut applied = 0;
                let mut lag = 0;
                let mut drained = true;
                for sess in &mut sessions {
                    let r = sess.catch_up(CATCH_UP_BATCH, None).await?;
                    applied += r.applied;
                    lag += r.remaining_lag_bytes;
                    drained &= r.drained;
                }
                if record(node, id)?.phase != JobPhase::CatchUp {
                    return Ok(()); // aborted meanwhile
                }
                if drained && applied < 5_000 || started.elapsed() > Duration::from_secs(120) {
                    return update(
                        node,
                        id,
                        JobPhase::CutOver,
                        rec.rows_copied,
                        lag,
                        "caught up",
                    )
                    .await;
                }
                update(
                    node,
                    id,
                    JobPhase::CatchUp,
                    rec.rows_copied,
                    lag,
                    "catching up",
                )
                .await?;
            }
        }
        JobPhase::CutOver => cut_over(node, id, rec, plan).await,
        JobPhase::Flipped => {
            let flipped = |p: JobPhase| p == JobPhase::Flipped;
            recheck(node, id, flipped, "lift the freeze")?;
            thaw(node, plan).await?;
            // No node may still read the range from the source.
            settle(node).await?;
            let mut deleted = 0;
            for s in &plan.specs {
                recheck(node, id, flipped, "drop the capture")?;
                reshard::stop_capture(s).await?;
                // The engine checks the current routing table again before
                // every batch (`MoveSpec::guard`).
                recheck(node, id, flipped, "delete the source's copy")?;
                deleted += reshard::cleanup_source(s, 10_000).await?;
            }
            update(
                node,
                id,
                JobPhase::Done,
                rec.rows_copied,
                0,
                // The flip's note (how long writes paused) stays readable.
                &format!(
                    "done; {deleted} rows deleted from {}; {}",
                    plan.from, rec.note
                ),
            )
            .await
        }
        JobPhase::Aborting => {
            abort_steps(node, plan).await?;
            let (phase, note) = match rec.note.strip_prefix(GIVING_UP) {
                Some(why) => (JobPhase::Failed, why.to_string()),
                None => (JobPhase::Aborted, "aborted".to_string()),
            };
            update(node, id, phase, rec.rows_copied, 0, &note).await
        }
        JobPhase::Done | JobPhase::Aborted | JobPhase::Failed => Ok(()),
    }
}

/// Records the rows `copied` so far every 2 s (a failed report is
/// skipped: the next one says more); never ends by itself.
async fn report_copy_progress(
    node: &Node,
    id: &str,
    copied: &AtomicU64,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = copied.load(Ordering::Relaxed);
        let _ = update(node, id, JobPhase::Copy, n, 0, "copying").await;
    }
}

/// Lifts the job's freeze if it is still there.
async fn thaw(node: &Node, plan: &Plan) -> Result<(), JobError> {
    let catalog = node.catalog_handle.catalog();
    if catalog
        .freeze(plan.range.lo)
        .is_some_and(|f| f.id == plan.freeze)
    {
        match node
            .catalog_handle
            .propose(
                CatalogCommand::UnfreezeRange {
                    range: plan.range,
                    freeze: plan.freeze,
                    operator: false,
                },
                PROPOSE_TIMEOUT,
            )
            .await?
        {
            Ok(_) | Err(Rejected::NotFrozen(_)) => {}
            Err(r) => return Err(JobError::Catalog(r.to_string())),
        }
    }
    Ok(())
}

/// Undoes a job that is Aborting (re-read from the catalog before each
/// destructive step): thaw, delete the target's copy, drop the capture.
/// The engine also refuses to delete on a target that owns the range.
async fn abort_steps(node: &Node, plan: &Plan) -> Result<(), JobError> {
    let aborting = |p: JobPhase| p == JobPhase::Aborting;
    recheck(node, &plan.id, aborting, "lift the freeze")?;
    thaw(node, plan).await?;
    for s in &plan.specs {
        recheck(node, &plan.id, aborting, "delete the target's copy")?;
        reshard::abort_target(s).await?;
        recheck(node, &plan.id, aborting, "drop the capture")?;
        reshard::stop_capture(s).await?;
    }
    Ok(())
}

/// A comparison that found more differing keys (a large backlog) is
/// repeated after catching up.
const MAX_RECHECK: usize = 20_000;
/// Recheck rounds before the freeze go on while more keys than this are
/// left (at most `PRE_FREEZE_ROUNDS`); each round rechecks the keys written
/// during the previous one.
const FREEZE_RECHECK: usize = 200;
const PRE_FREEZE_ROUNDS: usize = 4;

/// Compare, freeze, wait, drain, recheck, flip (the flip lifts the freeze).
///
/// The whole range is compared row by row BEFORE the freeze while writes go
/// on; inside the freeze only the rows whose shard key a change touched
/// since then (or that differed) are compared again — see
/// `reshard::verify`'s module docs for why that proves the whole range
/// equal. So the freeze costs a few round trips plus the changes written
/// during it, not a scan of the range.
async fn cut_over(
    node: &Arc<Node>,
    id: &str,
    rec: &JobRecord,
    plan: &Plan,
) -> Result<(), JobError> {
    let h = &node.catalog_handle;
    let attempt = CUT_OVER_ATTEMPTS.fetch_add(1, Ordering::Relaxed) + 1;
    if failpoint::active(Failpoint::FlipLost) && attempt < ATTEMPTS {
        return Err(JobError::Other(format!(
            "failpoint reshard_flip_lost: cut-over attempt {attempt} fails before its freeze"
        )));
    }
    // A runner that died inside the freeze left it: writers must not wait
    // through the comparison below.
    recheck(node, id, |p| p == JobPhase::CutOver, "lift the freeze")?;
    thaw(node, plan).await?;
    let mut sessions = Vec::new();
    for s in &plan.specs {
        sessions.push(Session::open(s).await?);
    }
    // Before the freeze: compare everything, then recheck the keys written
    // meanwhile in rounds (each round's recording starts before its
    // recheck reads anything) until few are left for the freeze.
    let mut keys: Vec<Touched> = Vec::new();
    let mut compared = 0;
    for sess in &mut sessions {
        let mut attempt = 0;
        let mut k = loop {
            attempt += 1;
            let mut k = Touched::new(sess.spec());
            let base = sess.compare().await?;
            k.extend(&base.mismatched);
            catch_up_all(sess, &mut k, FINAL_DRAIN_WAIT).await?;
            if base.mismatched.len() <= MAX_RECHECK || attempt >= 3 {
                compared += base.source_rows;
                break k;
            }
            tracing::info!(job = %id, differing = base.mismatched.len(), "comparison found a large backlog; comparing again");
        };
        for _ in 0..PRE_FREEZE_ROUNDS {
            if k.len() <= FREEZE_RECHECK {
                break;
            }
            let mut next = Touched::new(sess.spec());
            let check = sess.verify_keys(&k).await?;
            next.extend(&check.differing_keys);
            catch_up_all(sess, &mut next, FINAL_DRAIN_WAIT).await?;
            tracing::debug!(job = %id, rechecked = k.len(), left = next.len(), "pre-freeze recheck round");
            k = next;
        }
        keys.push(k);
    }
    if record(node, id)?.phase != JobPhase::CutOver {
        return Ok(()); // aborted meanwhile
    }
    ensure_runs(node)?;
    // Each source's clock just before the freeze: statements started
    // before it that still run after `settle` are waited for.
    let mut freeze_ts = Vec::new();
    for sess in &sessions {
        freeze_ts.push(source_clock(sess.source()).await?);
    }
    let frozen_at = Instant::now();
    if h.catalog().freeze(plan.range.lo).map(|f| f.id) != Some(plan.freeze) {
        // Frozen by someone else: refused, and the cut-over retries (the
        // catalog flips the range only under the job's own freeze).
        match h
            .propose(
                CatalogCommand::FreezeRange {
                    range: plan.range,
                    freeze: plan.freeze,
                },
                PROPOSE_TIMEOUT,
            )
            .await?
        {
            Ok(_) => {}
            Err(Rejected::AlreadyFrozen { by, .. }) if by == plan.freeze => {}
            Err(r) => return Err(JobError::Catalog(r.to_string())),
        }
    }
    let result = async {
        // Every node routes by the freeze (or has stopped routing), and
        // nothing routed before it is still in flight.
        settle(node).await?;
        ensure_runs(node)?;
        if failpoint::active(Failpoint::HoldFreeze) {
            tracing::warn!(job = %id, "failpoint reshard_hold_freeze: holding the freeze 3 s");
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let acked = frozen_at.elapsed();
        // Transactions that wrote to the range before the freeze end.
        let grace = match node.cfg().cutover_idle_grace_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        for (sess, since) in sessions.iter().zip(&freeze_ts) {
            wait_open_transactions(sess.source(), grace, id, since).await?;
        }
        let open_tx = frozen_at.elapsed();
        // The last changes.
        for (sess, k) in sessions.iter_mut().zip(keys.iter_mut()) {
            catch_up_all(sess, k, FINAL_DRAIN_WAIT).await?;
        }
        let drained = frozen_at.elapsed();
        ensure_runs(node)?;
        let mut rechecked = 0;
        for (sess, k) in sessions.iter().zip(&keys) {
            let v = sess.verify_keys(k).await?;
            if !v.equal() {
                return Err(JobError::Other(format!(
                    "verification failed in database {}: {} keys differ between {} and the target, e.g. {}",
                    sess.spec().database,
                    v.differing_count,
                    plan.from,
                    v.differing.join(", ")
                )));
            }
            rechecked += v.keys;
        }
        let paused = frozen_at.elapsed();
        // The flip: the catalog assigns the range and lifts the freeze with
        // the phase change, unless the job was aborted meanwhile.
        let note = format!(
            "flipped; {compared} rows compared before the freeze; writes paused {} ms \
             (acknowledged {} ms, open transactions {} ms, last changes {} ms, {rechecked} keys rechecked {} ms)",
            paused.as_millis(),
            acked.as_millis(),
            (open_tx - acked).as_millis(),
            (drained - open_tx).as_millis(),
            (paused - drained).as_millis(),
        );
        ensure_runs(node)?;
        update(node, id, JobPhase::Flipped, rec.rows_copied, 0, &note).await?;
        if failpoint::active(Failpoint::FlipLost) && attempt == ATTEMPTS {
            tracing::warn!(job = %id, "failpoint reshard_flip_lost: the flip is decided; reporting it as timed out");
            return Err(JobError::Catalog(
                "job_update: no answer from the catalog cluster in time (failpoint reshard_flip_lost: the flip was decided)".into(),
            ));
        }
        tracing::info!(job = %id, frozen_ms = frozen_at.elapsed().as_millis() as u64, "{note}");
        node.stats.freezes.observe(paused);
        Ok(())
    }
    .await;
    match result {
        Ok(()) => thaw(node, plan).await,
        Err(e) => {
            // Writers must not wait on a cut-over that will not finish now:
            // thaw and go back to catching up.
            thaw(node, plan).await?;
            let _ = update(
                node,
                id,
                JobPhase::CutOver,
                rec.rows_copied,
                0,
                &format!("cut-over retried: {e}"),
            )
            .await;
            Err(e)
        }
    }
}

/// Catches up until a call drains everything committed before it,
/// recording the touched keys; fails after `limit`.
async fn catch_up_all(
    sess: &mut Session,
    keys: &mut Touched,
    limit: Duration,
) -> Result<(), JobError> {
    let deadline = Instant::now() + limit;
    loop {
        let r = sess.catch_up(CATCH_UP_BATCH, Some(keys)).await?;
        if r.drained {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(JobError::Other("the catch-up did not drain in time".into()));
        }
    }
}

/// The writers (sessions holding a transaction id) open on a server now,
/// but the caller's own: (pid, xid).
async fn open_writers(c: &tokio_postgres::Client) -> Result<Vec<(i32, String)>, JobError> {
    Ok(c.query(
        "SELECT pid, backend_xid::text FROM pg_catalog.pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .map_err(|e| JobError::Other(format!("source: {e}")))?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Ends those of `writers` still idle in the same transaction
/// (`pg_terminate_backend`): their clients' transactions are rolled back
/// and their connections to the shard end.
async fn end_idle_writers(
    c: &tokio_postgres::Client,
    writers: &[(i32, String)],
    grace: Duration,
    job: &str,
    what: &str,
) -> Result<(), JobError> {
    for (pid, xid) in writers {
        let ended: Option<bool> = c
            .query_opt(
                "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                 WHERE pid = $1 AND backend_xid::text = $2 \
                 AND state IN ('idle in transaction', 'idle in transaction (aborted)')",
                &[pid, xid],
            )
            .await
            .map_err(|e| JobError::Other(format!("source: {e}")))?
            .map(|r| r.get(0));
        if ended == Some(true) {
            tracing::warn!(
                %job, pid, xid = %xid, grace_ms = grace.as_millis() as u64,
                "ended a session idle in a transaction that held the {what} back (cutover_idle_grace_ms); its client's transaction is rolled back"
            );
        }
    }
    Ok(())
}

/// Runs `fut`, a step that waits for every transaction open on the source
/// server (creating the logical slot does); with `grace`, the writers open
/// when it began and still idle in their transaction `grace` later are
/// ended, so that a client gone quiet inside a transaction cannot hold the
/// job back for ever.
async fn ending_idle_writers<F: std::future::Future>(
    dsn: &str,
    db: &str,
    grace: Option<Duration>,
    job: &str,
    fut: F,
) -> Result<F::Output, JobError> {
    let Some(g) = grace else {
        return Ok(fut.await);
    };
    let c = connect(dsn, db).await?;
    let writers = open_writers(&c).await?;
    tokio::pin!(fut);
    tokio::select! {
        out = &mut fut => return Ok(out),
        () = tokio::time::sleep(g) => {}
    }
    end_idle_writers(&c, &writers, g, job, "start of the capture").await?;
    Ok(fut.await)
}

/// Waits until every transaction open on the source now has ended. With
/// `idle_grace`, a writer among them still idle in its transaction that
/// long after the wait began is ended (`pg_terminate_backend`): a client
/// that went quiet inside a transaction must not hold every move of the
/// shard back (issue 17; `cutover_idle_grace_ms`). Prepared (2PC)
/// transactions have no backend and are waited for: the resolver finishes
/// them. Also waited for: every statement still running in a transaction
/// that began before `frozen_since` (the source's clock before the
/// freeze) — one that has not written yet has no transaction id, so the
/// horizon misses it. After `settle` no live node has such a statement left; one
/// sent by a node that died is still executed by its backend, and would
/// commit after the last catch-up, on the old owner. Never terminated:
/// the attempt fails after the bound and the cut-over retries.
async fn wait_open_transactions(
    c: &tokio_postgres::Client,
    idle_grace: Option<Duration>,
    job: &str,
    frozen_since: &str,
) -> Result<(), JobError> {
    // The writers open now, before the horizon is read: each of them
    // started before it.
    let writers = open_writers(c).await?;
    // The statements running now, before the horizon is read. One that
    // has written nothing yet has no transaction id, so the horizon does
    // not cover it, yet it may still write the range and commit after the
    // last catch-up. Every live node's statement routed before the freeze
    // has been answered (`settle` fenced it); one still running was sent
    // by a node that died (its backend goes on until it answers) or could
    // not be fenced, or by a client of the shard itself.
    let running = running_statements(c, frozen_since).await?;
    let started = Instant::now();
    let mut ended_idle = false;
    let horizon = xid_horizon(c).await?;
    let deadline = Instant::now() + OPEN_TX_WAIT;
    loop {
        let done: bool = c
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
                &[&horizon],
            )
            .await
            .map_err(|e| JobError::Other(format!("source: {e}")))?
            .get(0);
        if done && still_running(c, &running, frozen_since).await? == 0 {
            return Ok(());
        }
        if let Some(g) = idle_grace.filter(|g| !ended_idle && started.elapsed() >= *g) {
            ended_idle = true;
            end_idle_writers(c, &writers, g, job, "cut-over").await?;
        }
        if Instant::now() > deadline {
            return Err(JobError::Other(if done {
                format!(
                    "{} statements running on the source at the freeze did not end in time",
                    still_running(c, &running, frozen_since).await?
                )
            } else {
                "transactions open on the source at the freeze did not end in time".into()
            }));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A transaction id that every transaction holding one now is older than:
/// the id `pg_current_xact_id()` assigns in a transaction of its own (`c`
/// is not in a transaction block), committed at once. The wait is over
/// when a snapshot's xmin reaches it: no id below it is still running.
///
/// Not `pg_snapshot_xmax(pg_current_snapshot())`: a snapshot's xmax is the
/// latest *completed* id + 1, and ids of transactions still running above
/// it are not in the snapshot at all — with a writer holding the newest id
/// (nothing committed after it began), xmin = xmax and the wait ended at
/// once; its commit then came after the final catch-up, on the old owner,
/// and the cleanup deleted it (money lost in the bank test, 2026-12-06).
async fn xid_horizon(c: &tokio_postgres::Client) -> Result<String, JobError> {
    Ok(c.query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .map_err(|e| JobError::Other(format!("source: {e}")))?
        .get(0))
}

/// The source server's clock now (`clock_timestamp()` as text).
async fn source_clock(c: &tokio_postgres::Client) -> Result<String, JobError> {
    Ok(c.query_one("SELECT clock_timestamp()::text", &[])
        .await
        .map_err(|e| JobError::Other(format!("source: {e}")))?
        .get(0))
}

/// The client sessions running a statement in the source's database now
/// in a transaction that began before `since` (a source clock reading),
/// but the caller's and the reshard engine's own: (pid, start of the
/// transaction). By the transaction, not the statement: a dead client's
/// pipelined statements run one after the other in it.
async fn running_statements(
    c: &tokio_postgres::Client,
    since: &str,
) -> Result<Vec<(i32, String)>, JobError> {
    Ok(c.query(
        "SELECT pid, xact_start::text FROM pg_catalog.pg_stat_activity \
             WHERE state = 'active' AND backend_type = 'client backend' \
             AND datname = current_database() AND pid <> pg_backend_pid() \
             AND xact_start < $1::text::timestamptz \
             AND application_name NOT LIKE 'hotrepart-reshard-%'",
        &[&since],
    )
    .await
    .map_err(|e| JobError::Other(format!("source: {e}")))?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// How many of `statements` still run (the same session, the same
/// transaction, running a statement).
async fn still_running(
    c: &tokio_postgres::Client,
    statements: &[(i32, String)],
    since: &str,
) -> Result<usize, JobError> {
    if statements.is_empty() {
        return Ok(0);
    }
    let now = running_statements(c, since).await?;
    Ok(statements.iter().filter(|s| now.contains(s)).count())
}

pub(crate) async fn connect(dsn: &str, db: &str) -> Result<tokio_postgres::Client, JobError> {
    crate::control::pg::connect(dsn, Some(db))
        .await
        .map_err(JobError::Other)
}

/// The engine's work for job `id`: one MoveSpec per database of the source
/// that holds any sharded table.
async fn plan(
    node: &Arc<Node>,
    catalog: &Catalog,
    id: &str,
    rec: &JobRecord,
    functions: Functions,
) -> Result<Plan, JobError> {
    let snap: Arc<RoutingSnapshot> = catalog
        .snapshot()
        .cloned()
        .ok_or_else(|| JobError::Other("no catalog".into()))?;
    let dsn = |name: &str| {
        snap.shards()
            .find(|s| s.id.as_str() == name)
            .map(|s| s.dsn.clone())
            .ok_or_else(|| JobError::Other(format!("shard {name} is not in the catalog")))
    };
    let source_dsn = dsn(&rec.spec.from)?;
    let target_dsn = dsn(&rec.spec.to)?;
    let tables: Vec<TableMove> = snap
        .sharded_tables()
        .map(|t| TableMove {
            name: t.name.clone(),
            key_column: t.key_column.clone(),
            key_type: t.key_type,
            function: t.function,
        })
        .collect();
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let dbs = crate::control::pg::databases_with(&source_dsn, &names)
        .await
        .map_err(|e| JobError::Other(format!("source: {e}")))?;
    let mut specs = Vec::new();
    for (db, _, present) in dbs {
        let here: Vec<TableMove> = tables
            .iter()
            .filter(|t| present.contains(&t.name))
            .cloned()
            .collect();
        specs.push(MoveSpec {
            job: format!("{id}_{:08x}", fnv(db.as_bytes()) as u32),
            source_dsn: source_dsn.clone(),
            target_dsn: target_dsn.clone(),
            database: db,
            tables: here,
            range: rec.spec.range,
            functions: functions.clone(),
            guard: owner_guard(node, rec.spec.range, &rec.spec.from, &rec.spec.to),
        });
    }
    Ok(Plan {
        id: id.to_string(),
        specs,
        range: rec.spec.range,
        from: rec.spec.from.clone(),
        freeze: FreezeId::for_job(id),
    })
}

/// The engine's owner check for a job moving `range` from `from` to `to`:
/// a server may lose (or get overwritten) rows of the range only while
/// its shard owns no part of it — neither reads nor writes — in the
/// catalog as this node has applied it at that moment.
fn owner_guard(node: &Arc<Node>, range: Span, from: &str, to: &str) -> OwnerGuard {
    let node = node.clone();
    let (from, to) = (from.to_string(), to.to_string());
    OwnerGuard::new(move |side| {
        let shard = match side {
            Side::Source => &from,
            Side::Target => &to,
        };
        let catalog = node.catalog_handle.catalog();
        let snap = catalog
            .snapshot()
            .ok_or_else(|| "the node has no routing table".to_string())?;
        let owned = snap.ranges().iter().find(|r| {
            let s = r.span();
            u128::from(s.lo) < range.end()
                && u128::from(range.lo) < s.end()
                && (r.read_owner.as_str() == shard || r.write_owner.as_str() == shard)
        });
        match owned {
            Some(r) => Err(format!(
                "shard {shard} owns range {} (reads {}, writes {}) in the routing table of epoch {}",
                r.span(),
                r.read_owner,
                r.write_owner,
                snap.epoch()
            )),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tools::localpg::{free_port, LocalPg, PgInstall};

    /// The cut-over's wait for the transactions open at the freeze sees a
    /// writer that holds the newest transaction id while nothing committed
    /// after it began (a write that reached the source just after the
    /// freeze, routed by a node that had not applied it yet). The wait
    /// read the horizon as the snapshot's xmax — the latest completed id
    /// + 1, which such a writer is above — and ended at once; the writer
    /// committed after the final catch-up and the move lost its change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wait_for_open_transactions_sees_the_newest_writer() {
        let Ok(install) = PgInstall::find() else {
            eprintln!("skipped: no PostgreSQL binaries (run deploy/setup.sh)");
            return;
        };
        let dir = std::env::temp_dir().join(format!("hr-jobs-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pg = LocalPg::start(&install, &dir, free_port().unwrap(), "pw", None).unwrap();
        let connect = || async {
            let (c, conn) = tokio_postgres::connect(&pg.dsn(), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c
        };
        let (writer, job) = (connect().await, connect().await);
        writer
            .batch_execute("CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        let since = source_clock(&job).await.unwrap();
        let wait = tokio::spawn(async move {
            let r = wait_open_transactions(&job, None, "test", &since).await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !wait.is_finished(),
            "the wait ended while a writer that began before it is still open: {:?}",
            wait.await.unwrap().0
        );
        let committed = Instant::now();
        writer.batch_execute("COMMIT").await.unwrap();
        let (r, ended) = wait.await.unwrap();
        r.unwrap();
        assert!(ended >= committed, "the wait ended before the commit");
        drop(pg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
