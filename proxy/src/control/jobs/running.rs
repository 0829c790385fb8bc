//! What the node keeps of the jobs it runs: the set of running job ids
//! ([`Running`], a field of the node) and the test hook that stops a job
//! before each phase ([`JobGate`]). Below the node: imports nothing of it.

use hotrepart_routing_paxos::JobPhase;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Jobs being run by this node.
#[derive(Default)]
pub struct Running(pub(crate) Mutex<HashSet<String>>);

/// A test hook (`Node::job_gate`): before each step of a job the runner
/// reports `(job, phase)` and waits until the test calls
/// [`JobGate::release`], so a test can look at every phase of a job.
pub struct JobGate {
    reached: tokio::sync::mpsc::UnboundedSender<(String, JobPhase)>,
    go: tokio::sync::Semaphore,
}

impl JobGate {
    /// A gate and the receiver of the phases reached.
    pub fn new() -> (
        Arc<JobGate>,
        tokio::sync::mpsc::UnboundedReceiver<(String, JobPhase)>,
    ) {
        let (reached, rx) = tokio::sync::mpsc::unbounded_channel();
        let gate = JobGate {
            reached,
            go: tokio::sync::Semaphore::new(0),
        };
        (Arc::new(gate), rx)
    }

    /// Lets one waiting step go.
    pub fn release(&self) {
        self.go.add_permits(1);
    }

    pub(crate) async fn pass(&self, job: &str, phase: JobPhase) {
        let _ = self.reached.send((job.to_string(), phase));
        if let Ok(p) = self.go.acquire().await {
            p.forget();
        }
    }
}
