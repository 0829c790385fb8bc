//! Failpoints: places where a test makes the node misbehave on purpose,
//! named in the environment variable `HOTREPART_FAILPOINT` (a comma-
//! separated list, read once per process). Integration tests set it on the
//! node processes they start (`tests/src/procs.rs`); nothing else does.

use std::sync::OnceLock;

/// The failpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// `twopc_after_prepare`: the process aborts when every written shard
    /// prepared, before the decision is recorded.
    AfterPrepare,
    /// `twopc_after_decision`: the process aborts when the decision is
    /// recorded, before any COMMIT PREPARED.
    AfterDecision,
    /// `twopc_after_first_commit`: the process aborts when the first shard
    /// committed and the others are still prepared.
    AfterFirstCommit,
    /// `reshard_flip_lost`: the first three cut-over attempts of the
    /// process fail before their freeze; the fourth flips, and the flip's
    /// proposal is reported as timed out although it was decided — the
    /// runner believes its last allowed attempt failed.
    FlipLost,
    /// `reshard_hold_freeze`: every cut-over holds its freeze 3 s longer
    /// (after every node acknowledged it), so a test can act on a range
    /// frozen by a job.
    HoldFreeze,
    /// `catalog_publish_slow`: the catalog follower publishes every
    /// catalog change into the data plane 2 s late (the table at start at
    /// once), so a test can see what the data plane routes by while its
    /// routing table lags the catalog its lease covers.
    PublishSlow,
}

impl Failpoint {
    fn parse(name: &str) -> Option<Failpoint> {
        Some(match name.trim() {
            "twopc_after_prepare" => Failpoint::AfterPrepare,
            "twopc_after_decision" => Failpoint::AfterDecision,
            "twopc_after_first_commit" => Failpoint::AfterFirstCommit,
            "reshard_flip_lost" => Failpoint::FlipLost,
            "reshard_hold_freeze" => Failpoint::HoldFreeze,
            "catalog_publish_slow" => Failpoint::PublishSlow,
            _ => return None,
        })
    }
}

fn configured() -> &'static [Failpoint] {
    static FP: OnceLock<Vec<Failpoint>> = OnceLock::new();
    FP.get_or_init(|| {
        std::env::var("HOTREPART_FAILPOINT")
            .map(|v| v.split(',').filter_map(Failpoint::parse).collect())
            .unwrap_or_default()
    })
}

/// Whether `p` is named in `HOTREPART_FAILPOINT`.
pub fn active(p: Failpoint) -> bool {
    configured().contains(&p)
}

/// Aborts the process at `p` when `HOTREPART_FAILPOINT` names it.
pub fn abort_at(p: Failpoint) {
    if active(p) {
        tracing::error!(failpoint = ?p, "HOTREPART_FAILPOINT: aborting the process");
        std::process::abort();
    }
}
