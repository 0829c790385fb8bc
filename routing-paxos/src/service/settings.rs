//! [`ClusterSettings`]: how one node joins the catalog cluster, and the
//! checks a cluster node's settings must pass before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ServiceError;

/// How one node joins the catalog cluster. `Debug` does not print the
/// secret.
#[derive(Clone)]
pub struct ClusterSettings {
    /// This node's id: non-zero, unique, not among `peers`.
    pub node_id: u64,
    /// Address to listen on for peers.
    pub listen: SocketAddr,
    /// The other nodes: id → "host:port".
    pub peers: BTreeMap<u64, String>,
    /// The shared cluster secret authenticating the links.
    pub secret: String,
    /// Where the replica's log is kept.
    pub data_dir: PathBuf,
    /// The replica's tick (default 10 ms): leader election, resends and
    /// proposal retries count in ticks.
    pub tick: Duration,
    /// Lease duration (default 2 s).
    pub lease: Duration,
    /// Compact the log into a catalog snapshot once more than this many
    /// decided entries follow the last snapshot (default 1000; 0: never).
    pub compact_after: usize,
    /// Start as a node that is not a member yet: it waits until a
    /// reconfiguration adds it ([`CatalogHandle::add_node`](super::CatalogHandle::add_node) on a member),
    /// then gets the whole catalog from the members. `peers` names the
    /// members to contact. Ignored once the node has a membership on disk.
    pub join: bool,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("data_dir", &self.data_dir)
            .field("tick", &self.tick)
            .field("lease", &self.lease)
            .field("compact_after", &self.compact_after)
            .field("join", &self.join)
            .finish()
    }
}

impl ClusterSettings {
    /// Settings with the default tick (10 ms), lease (2 s) and
    /// compaction threshold (1000 entries).
    pub fn new(
        node_id: u64,
        listen: SocketAddr,
        peers: BTreeMap<u64, String>,
        secret: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> ClusterSettings {
        ClusterSettings {
            node_id,
            listen,
            peers,
            secret: secret.into(),
            data_dir: data_dir.into(),
            tick: Duration::from_millis(10),
            lease: Duration::from_secs(2),
            compact_after: crate::replica::COMPACT_AFTER,
            join: false,
        }
    }

    /// Refuses settings a cluster node cannot run with: node id 0, no
    /// peers (a single node is [`CatalogHandle::local`]), peers that
    /// include this node or node 0, an empty secret, a lease shorter than
    /// eight ticks.
    ///
    /// [`CatalogHandle::local`]: super::CatalogHandle::local
    pub(super) fn validate(&self) -> Result<(), ServiceError> {
        let me = self.node_id;
        if me == 0 {
            return Err(ServiceError::Config("node_id must not be 0".into()));
        }
        if self.peers.is_empty() {
            return Err(ServiceError::Config(
                "a cluster needs peers (use CatalogHandle::local for a single node)".into(),
            ));
        }
        if self.peers.contains_key(&me) || self.peers.contains_key(&0) {
            return Err(ServiceError::Config(
                "peers must not include this node or node 0".into(),
            ));
        }
        if self.secret.is_empty() {
            return Err(ServiceError::Config("the cluster secret is empty".into()));
        }
        if self.tick.is_zero() || self.lease < self.tick * 8 {
            return Err(ServiceError::Config(
                "tick must be positive and lease at least 8 ticks".into(),
            ));
        }
        Ok(())
    }
}
