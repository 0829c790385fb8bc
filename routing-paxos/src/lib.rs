//! hotrepart-routing-paxos: the catalog, replicated among the hotrepart nodes
//! with omnipaxos.
//!
//! # What is replicated
//!
//! One log of [`CatalogCommand`]s: bootstrap from a configuration, add and
//! remove shards, declare sharded and reference tables, split, assign,
//! freeze and unfreeze key ranges, upload and remove WebAssembly routing
//! functions (and set a table's), start and advance reshard jobs, and 2PC
//! decisions. Every replica applies the decided log, in order, to a
//! [`Catalog`]: the current [`hotrepart_router::catalog::RoutingSnapshot`]
//! plus what the snapshot does not carry (freezes, jobs, function modules,
//! 2PC decisions).
//!
//! * [`command`]: the commands (serde types; data only).
//! * [`catalog`]: the deterministic state machine, [`Catalog::apply`].
//! * [`entry`]: log entries with proposal ids, the [`StateMachine`] that
//!   applies each proposal at most once, and [`CatalogSnapshot`], what
//!   replaces a compacted prefix of the log (the state after it, as a
//!   [`catalog::CatalogImage`], plus its last entries).
//! * [`replica`]: [`Replica`], omnipaxos plus the state machine, sans-IO.
//! * [`storage`]: [`SharedStorage`], the log store: in memory (survives a
//!   replica: a restart "with the disk" in the simulation) or an fsynced
//!   journal file ([`SharedStorage::open`]).
//! * [`lease`]: [`Leases`], the sans-IO lease rule and the acknowledgements
//!   behind `await_all_applied`, with the safety argument.
//! * [`membership`]: [`Membership`], a configuration's members, the
//!   one-node-at-a-time rule for changing it, and `membership.json`.
//! * [`net`]: the node-to-node transport: one TCP connection per direction
//!   of each node pair, a mutual HMAC-SHA256 challenge-response on the
//!   cluster secret, length-prefixed JSON frames.
//! * [`service`]: [`CatalogHandle`], the driver task owning replica, timers,
//!   transport, disk and leases (or a single node without replication:
//!   [`CatalogHandle::local`]); split into the handle, the driver (and its
//!   membership changes), local mode, shared state, settings, errors,
//!   status DTOs and fault injection.
//!
//! # Determinism guarantee
//!
//! Applying a command reads only the catalog and the command: no clock, no
//! randomness, no I/O, ordered maps only. A rejected command (unknown shard,
//! split point outside its range, removing a shard that still owns ranges…)
//! stays in the log and applies as a no-op with the same reason everywhere.
//! Hence replicas that applied the same prefix of the log hold equal state,
//! and every accepted change of the routing table yields a snapshot whose
//! epoch is one more than the last. `tests/sim/` checks this, with
//! omnipaxos, over many seeds: random delays (messages on different links
//! arrive in any order), links that break and lose what is in flight,
//! partitions, and nodes that crash and restart from their storage.
//!
//! The transport ([`net`]) delivers each peer's messages in order and at
//! most once (one TCP connection per direction), and reports a link that
//! comes back so that the driver calls [`Replica::reconnected`] before
//! anything is sent or delivered on it; see [`replica`] for why omnipaxos
//! needs that.
//!
//! # Log compaction
//!
//! Once more than `compact_after` decided entries follow the last snapshot,
//! a replica replaces its applied prefix with a [`CatalogSnapshot`]
//! ([`Replica::compact`]); a restart loads it and replays the rest; a
//! follower behind a compacted point is brought up to date with a snapshot
//! by omnipaxos. The applied index keeps counting entries across
//! snapshots. `tests/sim/` compacts every few entries.
//!
//! # Membership changes
//!
//! [`CatalogHandle::reconfigure`] (and `add_node`/`remove_node`) proposes
//! an omnipaxos StopSign for configuration `id + 1` whose metadata is the
//! new [`Membership`] with addresses; one node is added or removed at a
//! time. When the StopSign is decided and everything before it applied,
//! each node persists the membership (`membership.json`), learns the new
//! peers' addresses, and, if it is a member, starts the next omnipaxos
//! instance over a fresh log (`config-<id>/`) that begins with a snapshot
//! of the catalog as of the StopSign, so the applied index goes on from
//! there; a node that is not a member stops taking part (no lease, every
//! proposal refused). Members announce a reconfigured membership to each
//! other; a node started with [`ClusterSettings::join`] starts the
//! instance when it hears it, empty, and gets the catalog as a snapshot
//! (so does a member that hears it before its own replica decided the
//! StopSign). What a node published never goes back: until the new
//! instance has the catalog, the node keeps publishing the one it had.
//! Protocol messages carry their configuration id; each goes to the
//! replica of that configuration, from its members only. A change is
//! proposed again until this node's replica accepted its StopSign (omnipaxos
//! forwards a follower's StopSign to the leader once), and blocks other
//! changes on this node only while its caller still waits for it.
//!
//! # Leases
//!
//! A node routes writes only while [`CatalogHandle::lease_valid`]; a range
//! cut-over calls [`CatalogHandle::await_all_applied`] after the freeze is
//! applied, which returns when every node acknowledged it or when every
//! lease that predates it has expired. `tests/sim/` checks the lease rule
//! with virtual time; `tests/cluster.rs` checks it over TCP with a
//! partitioned node.
//!
//! # Not done yet
//!
//! * Forwarding of admin requests between nodes: not needed — the HTTP
//!   admin API (proxy) proposes on the node it reached, and omnipaxos
//!   forwards a follower's proposal to the leader.
//! * Forgetting ended configurations: a node keeps running the replica of
//!   the configuration it left (so that lagging peers learn the decided
//!   StopSign) until it restarts, and keeps its directory on disk; a
//!   removed peer stays in the transport's address book (its connections
//!   are refused by nobody, but no message of a current configuration is
//!   accepted from it).
//! * Encryption of the node-to-node links (they are authenticated, not
//!   encrypted: shard DSNs travel in clear text).
//! * Forgetting finished reshard jobs (2PC decisions are forgotten by
//!   `ForgetDecisions`, which the proxy's coordinator and resolver propose).

#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

pub mod catalog;
pub mod command;
pub mod entry;
pub mod lease;
pub mod membership;
pub mod net;
pub mod replica;
pub mod service;
pub mod storage;

pub use catalog::{Applied, Catalog, JobRecord, Rejected};
pub use command::{CatalogCommand, CatalogSeed, FreezeId, JobPhase, JobSpec};
pub use entry::{CatalogEntry, CatalogSnapshot, Outcome, ProposalId, StateImage, StateMachine};
pub use lease::{LeaseMsg, Leases};
pub use replica::{Decided, Message, Replica, ReplicaConfig, ReplicaError, ReplicaStatus, Ticket};
pub use service::{
    CatalogHandle, ClusterSettings, ClusterStatus, LeaseStatus, Membership, PeerStatus,
    ProposeError, ReconfigureError, ServiceError,
};
pub use storage::{DirLock, SharedStorage, StorageError};
