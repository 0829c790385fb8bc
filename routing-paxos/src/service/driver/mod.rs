//! The driver: the one tokio task per cluster node that owns the
//! [`Replica`] (and the retired replicas of ended configurations), its
//! timer, the transport ([`Net`]), the disk ([`SharedStorage`], under the
//! data directory's [`DirLock`]) and the lease state ([`Leases`]).
//!
//! It reacts to one input at a time (a tick, a transport event, a request
//! from a handle, the partition switch); after each it applies what was
//! decided, answers proposals, publishes the catalog in [`Shared`] and
//! sends what the replicas produced. Storage writes (fsync) run on the
//! driver task: catalog traffic is small and rare. Membership changes
//! (proposing one, and switching to the next configuration once its
//! StopSign is decided) are in [`reconfig`].
//!
//! # Who owns the task and how it stops
//!
//! [`spawn`] starts it with `tokio::spawn` and hands back its
//! [`JoinHandle`] in [`Running`], which the [`CatalogHandle`] keeps. It
//! stops when [`CatalogHandle::shutdown`] sends [`Request::Shutdown`] (and
//! then awaits the join handle), or by itself once every handle is dropped
//! (the request channel closes) or the transport's event channel closes.
//! On its way out it stops the transport's tasks ([`Net::stop`], which
//! frees the listening port), drops pending proposals and waits (their
//! callers see `Shutdown`), clears the lease, and releases the directory
//! lock.
//!
//! [`CatalogHandle`]: super::CatalogHandle
//! [`CatalogHandle::shutdown`]: super::CatalogHandle::shutdown

mod reconfig;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::error::{ProposeError, ServiceError};
use super::fault::PartitionSwitch;
use super::settings::ClusterSettings;
use super::shared::{Answer, Request, Shared};
use super::status::{ClusterStatus, LeaseStatus, PeerStatus};
use crate::command::{CatalogCommand, CatalogSeed};
use crate::entry::Outcome;
use crate::lease::Leases;
use crate::membership::{config_dir, read_membership, Membership};
use crate::net::{Net, NetConfig, NetEvent, Wire};
use crate::replica::{Replica, ReplicaConfig, ReplicaError, Ticket};
use crate::storage::{DirLock, SharedStorage};

/// A running driver, as the handle keeps it.
pub(super) struct Running {
    /// Requests to the driver.
    pub(super) requests: mpsc::Sender<Request>,
    /// Fault injection: cuts the node off from its peers.
    pub(super) partition: PartitionSwitch,
    /// The driver task (it stops the transport before it ends).
    pub(super) task: JoinHandle<()>,
}

/// Binds `settings.listen`, opens `settings.data_dir`, starts the
/// transport and spawns the driver under its supervisor (see the module
/// doc for who stops it). `settings` must have passed
/// [`ClusterSettings::validate`].
pub(super) async fn spawn(
    settings: ClusterSettings,
    seed: Option<CatalogSeed>,
) -> Result<(Arc<Shared>, Running), ServiceError> {
    let (requests, requests_rx) = mpsc::channel(1024);
    let (partition, partitioned_rx) = PartitionSwitch::new();
    let (driver, events) = open(&settings, seed, None, partitioned_rx.clone()).await?;
    let shared = driver.shared.clone();
    let task = tokio::spawn(supervise(
        settings,
        driver,
        events,
        requests_rx,
        partitioned_rx,
    ));
    Ok((
        shared,
        Running {
            requests,
            partition,
            task,
        },
    ))
}

/// The first wait before a driver that failed is started again; it
/// doubles up to [`RESTART_MAX`] while restarts keep failing, and starts
/// over once a driver has run for [`RESTART_RESET`].
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Runs the driver and, when it fails, starts it again from the disk.
///
/// A panic of the driver (omnipaxos panics when its store cannot be
/// written: a full disk) takes this node out of the catalog at once: the
/// lease is withdrawn (not left to lapse), the status says why
/// (`stopped`, also in `/v1/status` and SHOW NODES), and an error log
/// tells the operator. Then, after a pause, the driver is opened again
/// from the data directory exactly as at a process start (what was
/// written is authoritative; the peers bring it up to date), and it
/// takes part again once it can write; while the cause lasts (the disk
/// still full), it fails again and the pauses grow to
/// [`RESTART_MAX`]. Requests that arrive while no driver runs are dropped
/// (their callers see the service stopped), except `Shutdown`, which ends
/// the supervisor.
///
/// Each driver run gets its own request channel, fed from the handles'
/// one: a panic loses the receiver with the driver.
async fn supervise(
    settings: ClusterSettings,
    first: Driver,
    first_events: mpsc::Receiver<NetEvent>,
    mut requests: mpsc::Receiver<Request>,
    partitioned: watch::Receiver<bool>,
) {
    let shared = first.shared.clone();
    let mut next = Some((first, first_events));
    let mut pause = RESTART_FIRST;
    loop {
        let Some((driver, events)) = next.take() else {
            return;
        };
        let (tx, rx) = mpsc::channel(1024);
        let began = tokio::time::Instant::now();
        let mut run = tokio::spawn(driver.run(settings.tick, rx, events, partitioned.clone()));
        // Aborting the supervisor (a shutdown that timed out) aborts the
        // driver too.
        let _abort = AbortOnDrop(run.abort_handle());
        let ended = loop {
            tokio::select! {
                r = &mut run => break r,
                req = requests.recv() => match req {
                    // A send fails only once the driver has ended: its
                    // join handle says how, at the next turn.
                    Some(req) => { let _ = tx.send(req).await; }
                    None => {
                        // Every handle is gone: the driver ends when its
                        // own channel closes.
                        drop(tx);
                        break (&mut run).await;
                    }
                },
            }
        };
        let panic = match ended {
            Ok(()) => return,
            Err(e) if e.is_panic() => e.into_panic(),
            Err(_) => return,
        };
        let why = panic_text(panic);
        if began.elapsed() >= RESTART_RESET {
            pause = RESTART_FIRST;
        }
        // Out at once: no lease, and the status says why.
        shared.lease_until.store(0, Ordering::Release);
        if let Ok(mut s) = shared.status.lock() {
            s.stopped = Some(why.clone());
            s.lease = LeaseStatus {
                valid: false,
                remaining_ms: 0,
            };
        }
        tracing::error!(
            error = %why,
            retry_in_ms = pause.as_millis() as u64,
            "the catalog driver stopped: this node no longer takes part in the replicated catalog nor holds a lease (it refuses writes) until its driver runs again; fix the cause (e.g. free space under data_dir); it is restarted from the data directory"
        );
        // Pause, then open again from the disk; a failed open pauses
        // longer and tries again.
        loop {
            let wake = tokio::time::sleep(pause);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    () = &mut wake => break,
                    req = requests.recv() => match req {
                        Some(Request::Shutdown) | None => return,
                        // Dropped: the caller sees the service stopped.
                        Some(_) => {}
                    },
                }
            }
            pause = (pause * 2).min(RESTART_MAX);
            // Opening writes too (omnipaxos persists as it starts, and
            // panics when it cannot): in a task of its own, so that a
            // panic there is one more failed attempt.
            let opening = tokio::spawn({
                let (settings, shared, partitioned) =
                    (settings.clone(), shared.clone(), partitioned.clone());
                async move { open(&settings, None, Some(shared), partitioned).await }
            });
            let opened = match opening.await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) if e.is_panic() => Err(panic_text(e.into_panic())),
                Err(e) => Err(e.to_string()),
            };
            match opened {
                Ok(x) => {
                    tracing::warn!(
                        node = settings.node_id,
                        "the catalog driver runs again (opened from the data directory after a failure)"
                    );
                    next = Some(x);
                    break;
                }
                Err(e) => {
                    if let Ok(mut s) = shared.status.lock() {
                        s.stopped = Some(format!("{why}; starting again failed: {e}"));
                    }
                    tracing::error!(
                        error = %e,
                        retry_in_ms = pause.as_millis() as u64,
                        "the catalog driver could not start again"
                    );
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A panic's message.
fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Opens the data directory (under its lock), the replica and the
/// transport: a driver ready to run, and its transport's events. `shared`
/// is the node's, when it has one (a restart).
async fn open(
    settings: &ClusterSettings,
    seed: Option<CatalogSeed>,
    shared: Option<Arc<Shared>>,
    partitioned: watch::Receiver<bool>,
) -> Result<(Driver, mpsc::Receiver<NetEvent>), ServiceError> {
    let me = settings.node_id;
    // The data directory is this process's for as long as the driver
    // runs (see `DirLock`).
    let lock = DirLock::acquire(&settings.data_dir)?;
    // The configuration: from disk once there is one, else the seed
    // membership from the settings (or none yet, for a joining node).
    let saved = read_membership(&settings.data_dir).map_err(ServiceError::Config)?;
    let (membership, removed) = match saved {
        Some(f) => (Some(f.membership), f.removed),
        None if settings.join => (None, false),
        None => {
            let mut members = settings.peers.clone();
            members.insert(me, settings.listen.to_string());
            (
                Some(Membership {
                    config_id: 1,
                    members,
                    admin: BTreeMap::new(),
                }),
                false,
            )
        }
    };
    let replica = match (&membership, removed) {
        (Some(m), false) => {
            let storage = SharedStorage::open(&config_dir(&settings.data_dir, m.config_id))?;
            let mut config = ReplicaConfig::new(me, m.members.keys().copied().collect());
            config.config_id = m.config_id;
            config.compact_after = settings.compact_after;
            let mut replica = Replica::new(config, storage)?;
            // Replay the decided prefix before anything else happens.
            replica.apply_decided()?;
            Some(replica)
        }
        _ => None,
    };
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: settings.listen,
                source,
            })?;
    let catalog = replica
        .as_ref()
        .map(|r| r.catalog().clone())
        .unwrap_or_default();
    let applied = replica.as_ref().map_or(0, Replica::applied_index);
    let shared = match shared {
        // A restart after a failure: the node's readers keep their
        // `Shared`; it moves on only if the store is ahead of it.
        Some(s) => {
            if applied > s.applied.load(Ordering::Acquire) {
                s.publish(&catalog, applied);
            }
            s
        }
        None => {
            let s = Arc::new(Shared::new(me, catalog.clone()));
            s.publish(&catalog, applied);
            s
        }
    };
    let mut peers = settings.peers.clone();
    if let Some(m) = &membership {
        for (id, addr) in &m.members {
            if *id != me {
                peers.entry(*id).or_insert_with(|| addr.clone());
            }
        }
    }
    let (events_tx, events) = mpsc::channel(4096);
    let net = Net::start(
        NetConfig {
            me,
            peers: std::sync::RwLock::new(peers.clone()),
            secret: settings.secret.as_bytes().to_vec(),
        },
        listener,
        events_tx,
        partitioned.clone(),
    );
    let lease_ms = u64::try_from(settings.lease.as_millis()).unwrap_or(u64::MAX);
    let member_peers: Vec<u64> = membership
        .as_ref()
        .map(|m| m.members.keys().copied().filter(|id| *id != me).collect())
        .unwrap_or_default();
    let mut leases = Leases::new(member_peers, lease_ms);
    leases.set_applied(shared.now_ms(), applied);
    let mut driver = Driver {
        _lock: lock,
        shared: shared.clone(),
        replica,
        retired: Vec::new(),
        membership,
        removed,
        data_dir: settings.data_dir.clone(),
        listen: settings.listen.to_string(),
        compact_after: settings.compact_after,
        lease_ms,
        net: Some(net),
        reconfig: None,
        ticks: 0,
        acks_count_from: 0,
        leases,
        peers,
        out: BTreeMap::new(),
        inbound: BTreeMap::new(),
        proposals: BTreeMap::new(),
        waits: Vec::new(),
        seed,
        seed_proposed: false,
        partitioned: false,
    };
    driver.update_status();
    Ok((driver, events))
}

/// The driver task's state.
struct Driver {
    /// The data directory's lock: released when the driver ends.
    _lock: DirLock,
    shared: Arc<Shared>,
    /// The replica of the current configuration; `None` while joining or
    /// once removed.
    replica: Option<Replica>,
    /// Replicas of ended configurations, still run so that peers that have
    /// not learned the end (the decided StopSign) learn it from us.
    retired: Vec<Replica>,
    membership: Option<Membership>,
    /// Not a member of `membership` (removed).
    removed: bool,
    data_dir: PathBuf,
    /// Our node-to-node address, as the settings give it.
    listen: String,
    compact_after: usize,
    lease_ms: u64,
    net: Option<Net>,
    /// A reconfiguration proposed here that someone still waits for.
    reconfig: Option<reconfig::Pending>,
    ticks: u64,
    /// Until then (ms on the lease clock), `await_all_applied` does not
    /// take "every member acknowledged" as enough: a node that left the
    /// configuration may still hold a lease from the old one (granted by
    /// peers that had not switched yet), and it is not among the members
    /// that acknowledge. Only `lease + margin` after the switch is that
    /// lease surely over.
    acks_count_from: u64,
    leases: Leases,
    peers: BTreeMap<u64, String>,
    /// Sending side of the current outgoing link per peer.
    out: BTreeMap<u64, (u64, mpsc::Sender<Wire>)>,
    /// Current incoming link per peer: its generation, and the stop signal.
    inbound: BTreeMap<u64, (u64, oneshot::Sender<()>)>,
    proposals: BTreeMap<Ticket, Answer>,
    waits: Vec<(usize, oneshot::Sender<()>)>,
    seed: Option<CatalogSeed>,
    seed_proposed: bool,
    /// Fault injection: drop every link.
    partitioned: bool,
}

/// Ticks between two announcements of a configuration to its members.
const ANNOUNCE_TICKS: u64 = 50;

impl Driver {
    async fn run(
        mut self,
        tick: Duration,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::Receiver<NetEvent>,
        mut partitioned: watch::Receiver<bool>,
    ) {
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Every branch is cancel-safe (interval tick, mpsc recv, watch
            // changed).
            tokio::select! {
                _ = timer.tick() => self.on_tick(),
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                req = requests.recv() => match req {
                    Some(Request::Propose { cmd, reply }) => self.on_propose(cmd, reply),
                    Some(Request::AwaitApplied { index, reply }) => {
                        self.waits.push((index, reply));
                        self.check_waits();
                    }
                    Some(Request::Reconfigure { members, admin, reply }) => {
                        self.on_reconfigure(members, admin, reply);
                    }
                    Some(Request::Shutdown) | None => break,
                },
                changed = partitioned.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.partitioned = *partitioned.borrow_and_update();
                    if self.partitioned {
                        tracing::info!(node = self.shared.node_id, "catalog links partitioned (fault injection)");
                        self.out.clear();
                        self.inbound.clear();
                    }
                }
            }
            self.after_input();
        }
        // Pending proposals and waits see their senders dropped: Shutdown.
        self.out.clear();
        self.inbound.clear();
        self.proposals.clear();
        self.waits.clear();
        self.reconfig = None;
        drop(events);
        if let Some(net) = self.net.take() {
            net.stop().await;
        }
        self.shared.lease_until.store(0, Ordering::Release);
        tracing::debug!(node = self.shared.node_id, "catalog driver stopped");
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        for r in &mut self.retired {
            let _ = r.tick();
        }
        if let Some(r) = self.replica.as_mut() {
            if let Err(e) = r.tick() {
                tracing::error!(node = self.shared.node_id, error = %e, "catalog replica tick failed");
            }
            let now = self.shared.now_ms();
            let pings = self.leases.tick(now, r.applied_index(), r.log_len());
            for (peer, msg) in pings {
                self.send(peer, Wire::Lease(msg));
            }
        }
        // A configuration made by a reconfiguration is announced to its
        // members: a node it added has no log to learn it from.
        if self.ticks.is_multiple_of(ANNOUNCE_TICKS) && !self.removed {
            if let Some(m) = self.membership.clone().filter(|m| m.config_id > 1) {
                let me = self.shared.node_id;
                for id in m.members.keys().copied().filter(|id| *id != me) {
                    self.send(id, Wire::Config(m.clone()));
                }
            }
        }
        self.retry_reconfig();
        self.maybe_bootstrap();
        self.check_waits();
        self.update_status();
    }

    fn maybe_bootstrap(&mut self) {
        if self.seed_proposed || self.seed.is_none() {
            return;
        }
        let Some(r) = self.replica.as_mut() else {
            return;
        };
        let st = r.status();
        let caught_up = st.leader.is_some() && st.accepting && st.decided == st.applied;
        if !caught_up {
            return;
        }
        self.seed_proposed = true;
        if r.catalog().snapshot().is_some() {
            return;
        }
        if let Some(seed) = self.seed.take() {
            tracing::info!(
                node = self.shared.node_id,
                "catalog is empty: proposing the bootstrap seed"
            );
            if let Err(e) = r.propose(CatalogCommand::Bootstrap(seed)) {
                tracing::error!(node = self.shared.node_id, error = %e, "cannot propose the bootstrap seed");
            }
        }
    }

    fn on_propose(&mut self, cmd: CatalogCommand, reply: Answer) {
        let Some(r) = self.replica.as_mut() else {
            let _ = reply.send(Err(ProposeError::NotMember));
            return;
        };
        match r.propose(cmd) {
            Ok(ticket) => {
                self.proposals.insert(ticket, reply);
            }
            Err(ReplicaError::Reconfiguring) => {
                // Answered when the next configuration starts here (the
                // caller may retry then); a timeout is the usual answer.
                let _ = reply.send(Err(ProposeError::Timeout));
            }
            Err(e) => {
                tracing::error!(node = self.shared.node_id, error = %e, "cannot propose a catalog command");
                let _ = reply.send(Err(ProposeError::Shutdown));
            }
        }
    }

    fn on_event(&mut self, ev: NetEvent) {
        let me = self.shared.node_id;
        match ev {
            NetEvent::OutUp { peer, gen, tx } => {
                if self.partitioned {
                    return; // dropping tx closes it
                }
                // Before anything is sent on the new link.
                self.reconnected(peer);
                self.out.insert(peer, (gen, tx));
            }
            NetEvent::OutDown { peer, gen } => {
                if self.out.get(&peer).is_some_and(|(g, _)| *g == gen) {
                    self.out.remove(&peer);
                }
            }
            NetEvent::InUp { peer, gen, stop } => {
                if self.partitioned {
                    return;
                }
                // Before anything is delivered from the new link; replacing
                // the entry drops the old link's stop, closing it.
                self.reconnected(peer);
                self.inbound.insert(peer, (gen, stop));
            }
            NetEvent::InDown { peer, gen } => {
                if self.inbound.get(&peer).is_some_and(|(g, _)| *g == gen) {
                    self.inbound.remove(&peer);
                }
            }
            NetEvent::In { peer, gen, wire } => {
                if self.inbound.get(&peer).is_none_or(|(g, _)| *g != gen) {
                    return; // a superseded or closed link
                }
                match wire {
                    Wire::Paxos { cfg, msg } => {
                        if msg.get_sender() != peer || msg.get_receiver() != me {
                            tracing::warn!(
                                node = me,
                                peer,
                                "dropping a catalog message with a forged sender or receiver"
                            );
                            return;
                        }
                        // To the replica of that configuration, if the
                        // sender is one of its members (omnipaxos indexes
                        // its peers by id).
                        let target = self
                            .replica
                            .iter_mut()
                            .chain(self.retired.iter_mut())
                            .find(|r| r.config_id() == cfg);
                        if let Some(r) = target {
                            if r.nodes().contains(&peer) {
                                r.handle(*msg);
                            }
                        }
                    }
                    Wire::Config(m) => {
                        let newer = self
                            .membership
                            .as_ref()
                            .is_none_or(|cur| m.config_id > cur.config_id);
                        if newer && m.members.contains_key(&peer) && m.members.contains_key(&me) {
                            tracing::info!(
                                node = me,
                                peer,
                                config = m.config_id,
                                "joining the catalog configuration a member announced"
                            );
                            self.switch(m, None);
                        }
                    }
                    Wire::Lease(msg) => {
                        let Some(r) = self.replica.as_ref() else {
                            return;
                        };
                        if !r.nodes().contains(&peer) {
                            return;
                        }
                        // Apply first, so a pong reports what we applied.
                        self.apply();
                        let Some(r) = self.replica.as_ref() else {
                            return;
                        };
                        let now = self.shared.now_ms();
                        let reply =
                            self.leases
                                .handle(now, peer, msg, r.applied_index(), r.log_len());
                        if let Some(reply) = reply {
                            self.send(peer, Wire::Lease(reply));
                        }
                    }
                }
            }
        }
    }

    fn reconnected(&mut self, peer: u64) {
        for r in self.replica.iter_mut().chain(self.retired.iter_mut()) {
            if r.nodes().contains(&peer) {
                r.reconnected(peer);
            }
        }
    }

    /// Sends on the current link to `peer`, if any. A full queue counts as
    /// a broken link: dropping the sender closes the connection (after
    /// what is queued), the transport dials again, and both ends call
    /// `reconnected` on the new link.
    fn send(&mut self, peer: u64, wire: Wire) {
        let Some((_, tx)) = self.out.get(&peer) else {
            return; // no link: lost, as on a broken connection
        };
        if tx.try_send(wire).is_err() {
            tracing::warn!(
                node = self.shared.node_id,
                peer,
                "catalog link to peer is backed up: reconnecting"
            );
            self.out.remove(&peer);
        }
    }

    fn after_input(&mut self) {
        self.apply();
        self.check_stopped();
        let mut out = Vec::new();
        for r in self.retired.iter_mut().chain(self.replica.iter_mut()) {
            let cfg = r.config_id();
            out.extend(r.outgoing().into_iter().map(|m| (cfg, m)));
        }
        for (cfg, m) in out {
            let to = m.get_receiver();
            self.send(
                to,
                Wire::Paxos {
                    cfg,
                    msg: Box::new(m),
                },
            );
        }
        let until = if self.replica.is_some() {
            self.leases.valid_until()
        } else {
            0
        };
        self.shared.lease_until.store(until, Ordering::Release);
    }

    /// Applies what was decided, answers proposals, publishes the catalog.
    fn apply(&mut self) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let decided = match replica.apply_decided() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(node = self.shared.node_id, error = %e, "catalog replica cannot apply the log");
                return;
            }
        };
        for ticket in replica.take_lost() {
            if let Some(reply) = self.proposals.remove(&ticket) {
                tracing::warn!(
                    node = self.shared.node_id,
                    "a proposal's outcome was compacted into a snapshot before this node applied it"
                );
                let _ = reply.send(Err(ProposeError::Timeout));
            }
        }
        let applied = replica.applied_index();
        // Nothing new, or a replica still behind what this node published
        // (see `Shared::publish`: that is never taken back).
        if decided.is_empty() && applied <= self.shared.applied.load(Ordering::Acquire) {
            return;
        }
        // Publish before answering: a proposer reads its own write (and
        // the applied index that includes it).
        self.shared.publish(replica.catalog(), applied);
        self.leases.set_applied(self.shared.now_ms(), applied);
        for d in &decided {
            let Some(ticket) = d.ticket else { continue };
            let Some(reply) = self.proposals.remove(&ticket) else {
                continue; // the bootstrap seed, or an abandoned wait
            };
            let answer = match &d.outcome {
                Outcome::Applied(a) => Ok(a.clone()),
                Outcome::Rejected(r) => Err(r.clone()),
                // The replica re-proposes a stale proposal itself and never
                // answers a ticket with Stale.
                Outcome::Stale => continue,
            };
            let _ = reply.send(Ok(answer));
        }
        self.check_waits();
    }

    fn check_waits(&mut self) {
        if self.waits.is_empty() {
            return;
        }
        let now = self.shared.now_ms();
        let leases = &self.leases;
        let acks_count = now >= self.acks_count_from;
        let mut keep = Vec::new();
        for (index, reply) in self.waits.drain(..) {
            let done = (acks_count && leases.all_applied(index))
                || leases.safe_after(index).is_some_and(|t| now >= t);
            if done {
                let _ = reply.send(());
            } else if !reply.is_closed() {
                keep.push((index, reply));
            }
        }
        self.waits = keep;
    }

    fn update_status(&mut self) {
        let me = self.shared.node_id;
        let (config_id, members, admin) = self
            .membership
            .as_ref()
            .map(|m| {
                (
                    m.config_id,
                    m.members.keys().copied().collect::<Vec<_>>(),
                    m.admin.clone(),
                )
            })
            .unwrap_or_default();
        let peers = self
            .peers
            .iter()
            .filter(|(id, _)| members.is_empty() || members.contains(id))
            .map(|(&id, addr)| PeerStatus {
                id,
                addr: addr.clone(),
                connected: self.out.contains_key(&id) && self.inbound.contains_key(&id),
                applied: self.leases.peer_applied(id),
            })
            .collect();
        let st = self.replica.as_ref().map(Replica::status);
        let status = ClusterStatus {
            node_id: me,
            leader: st.as_ref().and_then(|s| s.leader),
            epoch: self.shared.catalog.load().epoch(),
            decided: st
                .as_ref()
                .map_or(self.shared.applied.load(Ordering::Acquire), |s| s.decided),
            applied: st
                .as_ref()
                .map_or(self.shared.applied.load(Ordering::Acquire), |s| s.applied),
            decisions: 0,
            compacted: st.as_ref().map_or(0, |s| s.compacted),
            log_len: st.as_ref().map_or(0, |s| s.log_len),
            lease: LeaseStatus {
                valid: false,
                remaining_ms: 0,
            },
            peers,
            config_id,
            member: self.replica.is_some() && members.contains(&me),
            members,
            admin,
            stopped: None,
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = status;
        }
    }
}
