//! Where the commit decisions of distributed transactions are recorded
//! ([`DecisionLog`]): the replicated catalog in a cluster
//! (`control::cluster::CatalogDecisions`), memory for a node alone
//! ([`LocalDecisions`]). The coordinator ([`super::twopc`]) records a
//! decision before any COMMIT PREPARED; the resolver reads them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// Why a decision could not be recorded. The decision may still have been
/// recorded (a proposal in flight when a timeout hit): read it back with
/// [`DecisionLog::decision`] or ask again.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("the decision log is unavailable: {0}")]
    Unavailable(String),
    #[error("timed out recording the decision")]
    Timeout,
    /// Refused: the coordinator read the decision horizon before the
    /// resolver forgot decisions it may have needed (it took longer than
    /// the grace period). Nothing was recorded; no commit can be.
    #[error("too late to record a decision: the resolver has swept decisions since the transaction was prepared")]
    TooLate,
}

/// A boxed future of the log (the trait is used as a trait object).
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where commit decisions of distributed transactions are recorded.
pub trait DecisionLog: Send + Sync + 'static {
    /// Records `commit` for gid unless a decision exists; returns the final
    /// decision. `since`: the [`horizon`](Self::horizon) the coordinator read
    /// before its first PREPARE (`None`: the resolver, no check); a log that
    /// forgot decisions since then refuses ([`DecisionError::TooLate`]).
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
        since: Option<u64>,
    ) -> LogFuture<'a, Result<bool, DecisionError>>;
    /// What a coordinator reads before its first PREPARE (see `decide`).
    fn horizon(&self) -> Option<u64> {
        None
    }
    /// The recorded decision, without waiting.
    fn decision(&self, gid: &str) -> Option<bool>;
    /// Whether this node runs the resolver now (the leader, in a cluster).
    fn is_resolver(&self) -> bool;
    /// Its coordinator ended gid's transaction on every shard it prepared
    /// (and never asks about it again): its decision is no longer needed
    /// (a log may drop it at once, or in a batch at the next
    /// [`flush`](Self::flush); the default keeps it).
    fn finished(&self, _gid: &str) {}
    /// Forgets the decisions reported [`finished`](Self::finished) since
    /// the last flush. The resolver task calls it on every node.
    fn flush(&self) -> LogFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
    /// The gids whose decision the log holds, and the routing epoch of the
    /// catalog they were read from (the resolver sweeps only the shards of
    /// that table or a later one).
    fn held(&self) -> (u64, Vec<String>) {
        (0, Vec::new())
    }
    /// Forgets decisions the resolver found held prepared on no shard,
    /// after their grace period (their coordinator may be alive: a log
    /// shared by nodes refuses its decision afterwards, `TooLate`).
    fn sweep<'a>(&'a self, _gids: &'a [String]) -> LogFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
    /// Whether this node's resolver may decide gid. A log shared by every
    /// node (the replicated catalog) may decide any gid (the default); a
    /// log private to one node only its own, since another node's
    /// coordinator would never see the decision.
    fn may_resolve(&self, _gid: &str) -> bool {
        true
    }
}

/// In-memory decisions, used by a node on its own. They do not survive a
/// restart of the node (see the module documentation), and no other node
/// sees them: the resolver of a node using them finishes only the
/// transactions of its own `node_id` (nodes in front of the same shards
/// need distinct ids). Forgets as the catalog does: a finished gid at
/// once, a swept one with the horizon moved.
#[derive(Default)]
pub struct LocalDecisions {
    state: Mutex<Local>,
    /// `hr_<node_id>_`: the gids this node makes; None: any.
    own_prefix: Option<String>,
}

#[derive(Default)]
struct Local {
    /// gid → (commit, the horizon once it was recorded).
    map: HashMap<String, (bool, u64)>,
    /// Decisions ever recorded (the horizon).
    recorded: u64,
    /// A decision whose `since` is below this is refused.
    swept_at: u64,
}

impl LocalDecisions {
    /// Decisions of node `node_id`, whose resolver finishes only that
    /// node's transactions.
    pub fn for_node(node_id: u64) -> LocalDecisions {
        LocalDecisions {
            state: Mutex::default(),
            own_prefix: Some(format!("hr_{node_id}_")),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Local> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DecisionLog for LocalDecisions {
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
        since: Option<u64>,
    ) -> LogFuture<'a, Result<bool, DecisionError>> {
        let mut st = self.state();
        let r = if let Some(&(v, _)) = st.map.get(gid) {
            Ok(v)
        } else if since.is_some_and(|s| s < st.swept_at) {
            Err(DecisionError::TooLate)
        } else {
            st.recorded += 1;
            let seq = st.recorded;
            st.map.insert(gid.to_string(), (commit, seq));
            Ok(commit)
        };
        Box::pin(std::future::ready(r))
    }

    fn decision(&self, gid: &str) -> Option<bool> {
        self.state().map.get(gid).map(|d| d.0)
    }

    fn horizon(&self) -> Option<u64> {
        Some(self.state().recorded)
    }

    fn is_resolver(&self) -> bool {
        true
    }

    fn may_resolve(&self, gid: &str) -> bool {
        self.own_prefix
            .as_deref()
            .is_none_or(|p| gid.starts_with(p))
    }

    /// Dropped: nothing is left prepared under this gid, and a resolver
    /// that still sees it listed finds it gone on the shard.
    fn finished(&self, gid: &str) {
        self.state().map.remove(gid);
    }

    fn held(&self) -> (u64, Vec<String>) {
        (0, self.state().map.keys().cloned().collect())
    }

    fn sweep<'a>(&'a self, gids: &'a [String]) -> LogFuture<'a, ()> {
        let mut st = self.state();
        for g in gids {
            if let Some((_, seq)) = st.map.remove(g) {
                st.swept_at = st.swept_at.max(seq);
            }
        }
        Box::pin(std::future::ready(()))
    }
}
