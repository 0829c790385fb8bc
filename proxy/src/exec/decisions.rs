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
}

/// Where commit decisions of distributed transactions are recorded.
pub trait DecisionLog: Send + Sync + 'static {
    /// Records `commit` for gid unless a decision exists; returns the final decision.
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
    ) -> Pin<Box<dyn Future<Output = Result<bool, DecisionError>> + Send + 'a>>;
    /// The recorded decision, without waiting.
    fn decision(&self, gid: &str) -> Option<bool>;
    /// Whether this node runs the resolver now (the leader, in a cluster).
    fn is_resolver(&self) -> bool;
    /// Every shard has ended gid's transaction: its decision is no longer
    /// needed (a log may drop it, or keep it; the default keeps it).
    fn finished(&self, _gid: &str) {}
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
/// need distinct ids).
#[derive(Default)]
pub struct LocalDecisions {
    map: Mutex<HashMap<String, bool>>,
    /// `hr_<node_id>_`: the gids this node makes; None: any.
    own_prefix: Option<String>,
}

impl LocalDecisions {
    /// Decisions of node `node_id`, whose resolver finishes only that
    /// node's transactions.
    pub fn for_node(node_id: u64) -> LocalDecisions {
        LocalDecisions {
            map: Mutex::default(),
            own_prefix: Some(format!("hr_{node_id}_")),
        }
    }
}

impl DecisionLog for LocalDecisions {
    fn decide<'a>(
        &'a self,
        gid: &'a str,
        commit: bool,
    ) -> Pin<Box<dyn Future<Output = Result<bool, DecisionError>> + Send + 'a>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let v = *m.entry(gid.to_string()).or_insert(commit);
        Box::pin(std::future::ready(Ok(v)))
    }

    fn decision(&self, gid: &str) -> Option<bool> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(gid)
            .copied()
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
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(gid);
    }
}
