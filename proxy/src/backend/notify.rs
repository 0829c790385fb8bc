//! LISTEN/NOTIFY under transaction pooling: the node listens for its
//! clients.
//!
//! A client's LISTEN cannot go to a pooled backend: the backend's next
//! client would get the notifications, and the client would miss its own
//! once it runs elsewhere. So the node keeps, per database, one listening
//! connection to each shard (opened at the first LISTEN in that database)
//! and a table from channel to the sessions listening on it; every
//! NotificationResponse a listening connection receives goes, unchanged
//! (the notifying backend's pid and the payload as PostgreSQL sent them),
//! to each session listening on its channel. NOTIFY and `pg_notify` are
//! ordinary statements that run wherever the client's statement runs: any
//! shard's notifications reach the listeners. A channel is listened on the
//! shards while at least one session listens on it; UNLISTEN and the end of
//! a session remove the session.
//!
//! Guarantees and limits: a notification is delivered to the sessions
//! listening when the listening connection receives it; one sent while a
//! listening connection is down (a shard restarted: it reconnects with
//! back-off and listens again) is lost, with a warning in the log. A shard
//! the routing table gains gets a listening connection of its own for
//! each database listened in, on the channels listened on then
//! ([`Notifier::follow_shards`]); until it listens, its notifications are
//! lost as a restarted shard's.

use crate::backend::conn::{BackendConn, BackendTarget};
use crate::sql::quote_ident;
use crate::wire::{self, be, Frame};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What a session receives: NotificationResponse frames, whole.
pub type Notifications = mpsc::UnboundedReceiver<Bytes>;

/// The node's listeners, per database.
#[derive(Default)]
pub struct Notifier {
    dbs: Mutex<HashMap<String, Arc<DbListeners>>>,
    next_session: AtomicU64,
}

/// One database's listening connections and who listens on what.
struct DbListeners {
    subs: Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Bytes>>>>,
    /// One command queue per shard's listening task, with the shard's
    /// index (locked after `subs` where both are).
    shards: Mutex<Vec<(usize, mpsc::UnboundedSender<Cmd>)>>,
    /// The user whose pool target the listening connections use (the
    /// first listener's).
    user: String,
}

/// Where one shard's listening connection goes: the shard's index, its
/// pool target, the connect timeout.
pub type ListenTarget = (usize, BackendTarget, Duration);

enum Cmd {
    /// Listen; the sender is told once the shard listens.
    Listen(String, oneshot::Sender<()>),
    Unlisten(String),
}

/// A session's membership: its id and where its notifications arrive.
pub struct Listener {
    pub id: u64,
    pub rx: Notifications,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Notifier {
    /// A new membership for a session (nothing listened yet).
    pub fn member(&self) -> Listener {
        let (tx, rx) = mpsc::unbounded_channel();
        Listener {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            rx,
            tx,
        }
    }

    /// `who` listens on `channel` in `database`; `targets`: the shards to
    /// listen on for `user`, should this be the database's first listener.
    /// `spawn` starts the listening tasks (the node's supervisor). Returns
    /// once every shard listens (a notification sent after this reaches
    /// `who`), or Err saying what failed within `wait`.
    #[allow(clippy::too_many_arguments)]
    pub async fn listen(
        &self,
        database: &str,
        user: &str,
        targets: impl FnOnce() -> Vec<ListenTarget>,
        spawn: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
        channel: &str,
        who: &Listener,
        wait: Duration,
    ) -> Result<(), String> {
        let db = {
            let mut dbs = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
            match dbs.get(database) {
                Some(d) => d.clone(),
                None => {
                    let d = Arc::new(DbListeners {
                        subs: Mutex::new(HashMap::new()),
                        shards: Mutex::new(Vec::new()),
                        user: user.to_string(),
                    });
                    add_shards(&d, targets(), &spawn);
                    dbs.insert(database.to_string(), d.clone());
                    d
                }
            }
        };
        // Every LISTEN goes to the shards (PostgreSQL takes it twice), so
        // that this one returns only once they listen; sent under the lock,
        // so that the shards see LISTEN and UNLISTEN in the table's order.
        let mut acks = Vec::new();
        {
            let mut subs = db.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.entry(channel.to_string())
                .or_default()
                .insert(who.id, who.tx.clone());
            for (_, s) in db.shards.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let (tx, rx) = oneshot::channel();
                let _ = s.send(Cmd::Listen(channel.to_string(), tx));
                acks.push(rx);
            }
        }
        let all = futures_util::future::join_all(acks);
        match tokio::time::timeout(wait, all).await {
            Ok(r) if r.iter().all(Result::is_ok) => Ok(()),
            _ => {
                unlisten_db(&db, Some(channel), who.id);
                Err(format!(
                    "could not listen on every shard within {} ms",
                    wait.as_millis()
                ))
            }
        }
    }

    /// Gives every database listened in a listening connection to each
    /// shard of `targets(database, user)` it has none to (a shard the
    /// routing table gained), listening on the channels listened on now.
    /// Called when the node publishes a routing table.
    pub fn follow_shards(
        &self,
        targets: impl Fn(&str, &str) -> Vec<ListenTarget>,
        spawn: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    ) {
        let dbs: Vec<(String, Arc<DbListeners>)> = self
            .dbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, db) in dbs {
            add_shards(&db, targets(&name, &db.user), &spawn);
        }
    }

    /// `who` stops listening on `channel` (None: on every channel).
    pub fn unlisten(&self, database: &str, channel: Option<&str>, who: u64) {
        let Some(db) = self
            .dbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(database)
            .cloned()
        else {
            return;
        };
        unlisten_db(&db, channel, who);
    }

    /// Sessions listening on `channel` in `database` (tests, status).
    pub fn listeners(&self, database: &str, channel: &str) -> usize {
        self.dbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(database)
            .and_then(|d| {
                d.subs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(channel)
                    .map(HashMap::len)
            })
            .unwrap_or(0)
    }
}

/// Starts a listening task for each of `targets` that `db` has none for,
/// told to listen on the channels of `db` (under its `subs` lock, so that
/// no LISTEN or UNLISTEN of the table is missed or reordered), and drops
/// those of shards no longer among them.
fn add_shards(
    db: &Arc<DbListeners>,
    targets: Vec<ListenTarget>,
    spawn: &impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
) {
    let subs = db.subs.lock().unwrap_or_else(|e| e.into_inner());
    let mut shards = db.shards.lock().unwrap_or_else(|e| e.into_inner());
    // A shard the routing table lost: its task ends with its queue (a
    // later LISTEN does not wait for it).
    shards.retain(|(j, _)| targets.iter().any(|(i, _, _)| i == j));
    for (i, target, timeout) in targets {
        if shards.iter().any(|(j, _)| *j == i) {
            continue;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for ch in subs.keys() {
            // Nobody waits for this one: its notifications count from when
            // it listens.
            let (ack, _) = oneshot::channel();
            let _ = tx.send(Cmd::Listen(ch.clone(), ack));
        }
        spawn(Box::pin(listen_loop(
            target,
            timeout,
            rx,
            Arc::downgrade(db),
        )));
        shards.push((i, tx));
    }
}

/// `who` leaves `channel` (None: every channel) of `db`; a channel left
/// without listeners is unlistened on the shards (under the lock: see
/// [`Notifier::listen`]).
fn unlisten_db(db: &DbListeners, channel: Option<&str>, who: u64) {
    let mut subs = db.subs.lock().unwrap_or_else(|e| e.into_inner());
    subs.retain(|ch, set| {
        if channel.is_none_or(|c| c == ch) && set.remove(&who).is_some() && set.is_empty() {
            for (_, s) in db.shards.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = s.send(Cmd::Unlisten(ch.clone()));
            }
            return false;
        }
        true
    });
}

/// The channel a NotificationResponse names.
fn channel_of(f: &Frame) -> Option<String> {
    hotrepart_wire::backend::notification_channel(f.body())
}

async fn send_query(c: &mut BackendConn, sql: &str) -> std::io::Result<()> {
    let mut q = BytesMut::new();
    wire::frame(&mut q, wire::fe::QUERY, |o| wire::put_cstr(o, sql));
    c.write_frames(&q).await
}

/// One shard's listening connection for one database: connects (again,
/// with back-off, after a failure), listens on the channels asked for
/// (telling each asker once its LISTEN is done), and hands each
/// notification to the sessions listening. Ends when the database's
/// listeners are dropped.
async fn listen_loop(
    target: BackendTarget,
    timeout: Duration,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    db: Weak<DbListeners>,
) {
    let mut channels: BTreeSet<String> = BTreeSet::new();
    // LISTENs asked for while not connected: told once listened.
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut conn = match BackendConn::connect_named(
            &target,
            timeout,
            Some("hotrepart listener"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(shard = %target.shard, error = %e, "cannot open the LISTEN connection; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    c = cmds.recv() => match c {
                        None => return,
                        Some(Cmd::Listen(ch, ack)) => { channels.insert(ch); waiting.push(ack); }
                        Some(Cmd::Unlisten(ch)) => { channels.remove(&ch); }
                    },
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Per query sent, in order: whom its ReadyForQuery tells.
        let mut pending: VecDeque<Vec<oneshot::Sender<()>>> = VecDeque::new();
        if !channels.is_empty() {
            let all: Vec<String> = channels
                .iter()
                .map(|c| format!("LISTEN {}", quote_ident(c)))
                .collect();
            if send_query(&mut conn, &all.join("; ")).await.is_err() {
                continue;
            }
            pending.push_back(std::mem::take(&mut waiting));
        }
        loop {
            tokio::select! {
                c = cmds.recv() => {
                    let (sql, ack) = match c {
                        None => return,
                        Some(Cmd::Listen(ch, ack)) => {
                            let q = format!("LISTEN {}", quote_ident(&ch));
                            channels.insert(ch);
                            (q, vec![ack])
                        }
                        Some(Cmd::Unlisten(ch)) => {
                            let q = format!("UNLISTEN {}", quote_ident(&ch));
                            channels.remove(&ch);
                            (q, Vec::new())
                        }
                    };
                    if send_query(&mut conn, &sql).await.is_err() {
                        break;
                    }
                    pending.push_back(ack);
                }
                f = conn.reader.next() => {
                    let f = match f {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(shard = %target.shard, error = %e, "the LISTEN connection was lost; notifications until it is back are lost");
                            break;
                        }
                    };
                    match f.tag() {
                        be::ERROR_RESPONSE => {
                            let (code, msg) = wire::parse_error_fields(f.body());
                            tracing::warn!(shard = %target.shard, %code, %msg, "LISTEN connection error");
                            // Its ReadyForQuery follows: those waiting are
                            // not told (they time out with an error).
                            if let Some(w) = pending.front_mut() {
                                w.clear();
                            }
                        }
                        be::READY_FOR_QUERY => {
                            for ack in pending.pop_front().unwrap_or_default() {
                                let _ = ack.send(());
                            }
                        }
                        be::NOTIFICATION_RESPONSE => {
                            let Some(db) = db.upgrade() else { return };
                            let Some(ch) = channel_of(&f) else { continue };
                            let subs = db.subs.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(set) = subs.get(&ch) {
                                for tx in set.values() {
                                    let _ = tx.send(f.raw.clone());
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
