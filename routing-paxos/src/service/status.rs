//! What [`CatalogHandle::status`](super::CatalogHandle::status) reports:
//! this node's view of the cluster, as data (serialized by the admin API).

use std::collections::BTreeMap;

use serde::Serialize;

/// This node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: u64,
    /// The leader it follows, if known.
    pub leader: Option<u64>,
    /// Catalog epoch.
    pub epoch: u64,
    /// Log entries decided (known to this node).
    pub decided: usize,
    /// Log entries applied here.
    pub applied: usize,
    /// 2PC decisions the catalog holds (recorded and not yet forgotten:
    /// bounded by the transactions in flight, see
    /// [`CatalogCommand::ForgetDecisions`](crate::CatalogCommand)).
    pub decisions: usize,
    /// Log entries replaced by this node's catalog snapshot (the
    /// snapshot's index; 0: none yet).
    pub compacted: usize,
    /// Log entries stored after the snapshot (accepted, decided or not).
    pub log_len: usize,
    /// This node's lease.
    pub lease: LeaseStatus,
    /// The peers.
    pub peers: Vec<PeerStatus>,
    /// The omnipaxos configuration id (0: none yet, a joining node).
    pub config_id: u32,
    /// The members of that configuration.
    pub members: Vec<u64>,
    /// Admin API URLs of members, where the configuration change gave one.
    pub admin: BTreeMap<u64, String>,
    /// Whether this node is a member of it (false: removed, or joining).
    pub member: bool,
    /// Why this node's catalog driver stopped, if it did (e.g. a write to
    /// its store failed: a full disk). It then takes no part in the
    /// catalog and holds no lease until the node is restarted.
    pub stopped: Option<String>,
}

/// A node's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// Whether it may route writes.
    pub valid: bool,
    /// Time left (0 if not valid).
    pub remaining_ms: u64,
}

/// One peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    /// Its node id.
    pub id: u64,
    /// Its address.
    pub addr: String,
    /// Whether both directions of the link are up.
    pub connected: bool,
    /// The applied index it last reported.
    pub applied: Option<usize>,
}
