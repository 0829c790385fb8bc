//! The node-to-node transport: authenticated TCP links carrying [`Wire`]
//! frames.
//!
//! # Links
//!
//! Each node dials every peer and sends only on the connection it dialed;
//! it receives only on the connections peers dialed to it. So each
//! direction of a node pair is one TCP connection: messages arrive in the
//! order sent, at most once, and are lost only when that connection breaks.
//! A broken direction is noticed at both ends (the dialer's write or read
//! fails; the acceptor sees EOF or gets a newer connection from the same
//! peer), and its replacement is reported to the driver as
//! [`NetEvent::OutUp`] on the sending side and [`NetEvent::InUp`] on the
//! receiving side, each *before* anything is sent or delivered on it: the
//! driver calls [`crate::Replica::reconnected`] there, as omnipaxos needs.
//! Frames of a superseded incoming connection carry an old generation and
//! are dropped by the driver.
//!
//! # Handshake
//!
//! Both sides send a `Hello` (node id and a fresh 32-byte random nonce).
//! The acceptor refuses an unknown node id; the dialer refuses an id other
//! than the peer it dialed. Then the dialer proves knowledge of the cluster
//! secret with `HMAC-SHA256(secret, label "dialer" ‖ dialer id ‖ acceptor
//! id ‖ dialer nonce ‖ acceptor nonce)`; the acceptor checks it (in
//! constant time) and only then answers with the same MAC under the label
//! "acceptor", which the dialer checks. Fresh nonces on both sides defeat
//! replay, distinct labels defeat reflection, and the acceptor never
//! computes a MAC for an unauthenticated party. Every refusal closes the
//! connection and is logged with its reason; nothing is delivered to the
//! driver before both checks passed. Both `Hello`s carry the link protocol
//! version ([`LINK_VERSION`]); a peer of another version is refused with a
//! log naming both (a node from before sealed frames sends none).
//! Strangers cannot hold every handshake slot: at most
//! [`HANDSHAKES_PER_IP`] handshakes per source address and
//! [`STRANGER_HANDSHAKES`] in all from addresses that are not a peer's
//! (a peer's configured address, resolved when that limit is reached, is
//! let in), each bounded by the handshake timeout.
//!
//! # Sealed frames
//!
//! Every frame after the handshake is encrypted and authenticated
//! (ChaCha20-Poly1305, [`Sealer`]/[`Opener`]) under a key of its own
//! connection: HKDF-SHA256 of the cluster secret with both node ids and
//! both nonces. The nonce of frame *n* is *n*, so a frame that is
//! changed, dropped, replayed, reordered or taken from another connection
//! fails to open, and the connection is closed with a warning. So an
//! on-path attacker can neither read catalog traffic (shard DSNs) nor
//! inject commands; it can still cut links (which Paxos tolerates).
//!
//! # Frames
//!
//! `u32` big-endian length, then the payload: a JSON document (handshake),
//! or a sealed JSON document and its 16-byte tag. Handshake frames are at
//! most [`MAX_HANDSHAKE_FRAME`] bytes, others [`MAX_FRAME`] (plaintext); a
//! longer one closes the connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::lease::LeaseMsg;
use crate::replica::Message;

/// Largest frame after the handshake (catalog entries and log catch-up).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest handshake frame.
pub const MAX_HANDSHAKE_FRAME: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A peer that takes longer than this to take one frame is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections (authenticated or in their handshake) accepted at once,
/// beyond two per peer.
const SPARE_CONNECTIONS: usize = 32;
/// Handshakes in progress from one IP address at once.
const HANDSHAKES_PER_IP: usize = 4;
/// Handshakes in progress at once from addresses that are not a peer's
/// (a peer's address is always let in, within [`HANDSHAKES_PER_IP`]).
const STRANGER_HANDSHAKES: usize = 16;
/// Messages queued for one peer before its link counts as broken.
pub const SEND_QUEUE: usize = 4096;

/// What travels on a link after the handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Wire {
    /// An omnipaxos message of configuration `cfg` (boxed: a log sync can
    /// carry a catalog snapshot).
    Paxos {
        /// The omnipaxos configuration id the message belongs to.
        cfg: u32,
        /// The message.
        msg: Box<Message>,
    },
    /// "Configuration `id` has these members": sent by the members of a
    /// configuration made by a reconfiguration to its other members, so
    /// that a node added to it (which has no log to learn it from) joins.
    Config(crate::membership::Membership),
    /// Lease renewal traffic.
    Lease(LeaseMsg),
}

/// The link protocol: 2 seals every frame after the handshake (a node
/// from before that sends no version: 1); 3 carries the catalog command
/// `SchemaChanged`, which a node of version 2 cannot read (it would drop
/// the link at every such entry).
pub const LINK_VERSION: u32 = 3;

fn version_one() -> u32 {
    1
}

/// The first frame of each side.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    node: u64,
    nonce: Vec<u8>,
    #[serde(default = "version_one")]
    version: u32,
}

/// The second frame: a MAC proving knowledge of the secret.
#[derive(Debug, Serialize, Deserialize)]
struct Proof {
    mac: Vec<u8>,
}

/// A handshake or frame failure; the reason is logged by the caller.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// I/O on the socket failed or it closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame exceeds the limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A frame is not the expected JSON.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The peer's id is not a cluster member, or not the one dialed.
    #[error("unexpected node id {0}")]
    UnknownNode(u64),
    /// The peer's MAC is wrong.
    #[error("node {0} failed authentication (wrong cluster secret?)")]
    BadProof(u64),
    /// The acceptor closed the connection before proving itself: it
    /// refused our id or our proof.
    #[error("the peer refused us (wrong cluster secret or unknown node id?)")]
    Refused,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// The peer speaks another link protocol.
    #[error("node {node} speaks link protocol version {theirs}, this node {LINK_VERSION} (upgrade every node to the same release)")]
    Version {
        /// The peer.
        node: u64,
        /// Its version.
        theirs: u32,
    },
    /// Too many handshakes in progress from this address, or from
    /// addresses that are not a peer's.
    #[error("too many catalog handshakes in progress (from this address, or from non-peers)")]
    Busy,
    /// A sealed frame did not open: changed, replayed, reordered, or
    /// not from this connection.
    #[error("a frame failed authentication (altered or injected on the network?)")]
    BadFrame,
}

/// The AEAD tag appended to every sealed frame.
const TAG_LEN: usize = 16;

/// The key of one connection's frames, from the handshake.
fn link_key(secret: &[u8], dialer: u64, acceptor: u64, dn: &[u8], an: &[u8]) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"hotrepart-catalog-link-v2");
    let prk = salt.extract(secret);
    let (d, a) = (dialer.to_be_bytes(), acceptor.to_be_bytes());
    let info: [&[u8]; 5] = [b"frames dialer->acceptor", &d, &a, dn, an];
    let mut key = [0u8; 32];
    // HKDF-Expand fails only for outputs longer than 255 hashes.
    if let Ok(okm) = prk.expand(&info, Len) {
        let _ = okm.fill(&mut key);
    }
    key
}

/// Nonce *n* for frame *n* (never repeated under one key: a key is one
/// connection's, and the count ends the connection before it wraps).
fn frame_nonce(n: u64) -> ring::aead::Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    ring::aead::Nonce::assume_unique_for_key(b)
}

fn aead_key(key: &[u8; 32]) -> ring::aead::LessSafeKey {
    // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
    #[allow(clippy::expect_used)]
    let k = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
        .expect("a 32-byte ChaCha20-Poly1305 key");
    ring::aead::LessSafeKey::new(k)
}

/// The sending side of a connection's sealed frames.
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    next: u64,
}

/// The receiving side of a connection's sealed frames.
pub struct Opener {
    key: ring::aead::LessSafeKey,
    next: u64,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            key: aead_key(key),
            next: 0,
        }
    }

    /// Writes `payload` as the next sealed frame.
    pub async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        if payload.len() > MAX_FRAME {
            return Err(LinkError::TooLarge(payload.len()));
        }
        let n = self.next;
        self.next = n.checked_add(1).ok_or(LinkError::BadFrame)?;
        // MAX_FRAME + TAG_LEN fits in a u32.
        let len = ((payload.len() + TAG_LEN) as u32).to_be_bytes();
        let mut buf = Vec::with_capacity(4 + payload.len() + TAG_LEN);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(payload);
        let tag = self
            .key
            .seal_in_place_separate_tag(frame_nonce(n), ring::aead::Aad::from(&len), &mut buf[4..])
            .map_err(|_| LinkError::BadFrame)?;
        buf.extend_from_slice(tag.as_ref());
        w.write_all(&buf).await?;
        Ok(())
    }
}

impl Opener {
    fn new(key: &[u8; 32]) -> Opener {
        Opener {
            key: aead_key(key),
            next: 0,
        }
    }

    /// Reads and opens the next sealed frame. Not cancel-safe (see
    /// [`read_frame`]).
    pub async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Vec<u8>, LinkError> {
        let mut sealed = read_frame(r, MAX_FRAME + TAG_LEN).await?;
        let len = (sealed.len() as u32).to_be_bytes();
        let n = self.next;
        self.next = n.checked_add(1).ok_or(LinkError::BadFrame)?;
        let plain = self
            .key
            .open_in_place(frame_nonce(n), ring::aead::Aad::from(&len), &mut sealed)
            .map_err(|_| LinkError::BadFrame)?
            .len();
        sealed.truncate(plain);
        Ok(sealed)
    }
}

/// Reads one frame of at most `max` bytes. Not cancel-safe (a frame may be
/// half read): used only where the connection is dropped on cancellation.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, LinkError> {
    let len = r.read_u32().await? as usize;
    if len > max {
        return Err(LinkError::TooLarge(len));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), LinkError> {
    let len = u32::try_from(payload.len()).map_err(|_| LinkError::TooLarge(payload.len()))?;
    if payload.len() > MAX_FRAME {
        return Err(LinkError::TooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    Ok(())
}

async fn read_json<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    max: usize,
) -> Result<T, LinkError> {
    let buf = read_frame(r, max).await?;
    serde_json::from_slice(&buf).map_err(|e| LinkError::Malformed(e.to_string()))
}

async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> Result<(), LinkError> {
    let buf = serde_json::to_vec(v).map_err(|e| LinkError::Malformed(e.to_string()))?;
    write_frame(w, &buf).await
}

fn mac(
    secret: &[u8],
    label: &str,
    dialer: u64,
    acceptor: u64,
    dn: &[u8],
    an: &[u8],
) -> Hmac<Sha256> {
    #[allow(clippy::expect_used)]
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(b"hotrepart-catalog-link-v1\0");
    m.update(label.as_bytes());
    m.update(&[0]);
    m.update(&dialer.to_be_bytes());
    m.update(&acceptor.to_be_bytes());
    m.update(dn);
    m.update(an);
    m
}

/// The dialer's side of the handshake with `peer`.
pub async fn handshake_dial<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    me: u64,
    peer: u64,
    secret: &[u8],
) -> Result<Sealer, LinkError> {
    let dn: [u8; 32] = rand::random();
    write_json(
        s,
        &Hello {
            node: me,
            nonce: dn.to_vec(),
            version: LINK_VERSION,
        },
    )
    .await?;
    let hello: Hello = read_json(s, MAX_HANDSHAKE_FRAME)
        .await
        .map_err(|e| match e {
            // The acceptor closes without a word when it does not know us.
            LinkError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => LinkError::Refused,
            e => e,
        })?;
    if hello.node != peer {
        return Err(LinkError::UnknownNode(hello.node));
    }
    if hello.version != LINK_VERSION {
        return Err(LinkError::Version {
            node: peer,
            theirs: hello.version,
        });
    }
    let proof = mac(secret, "dialer", me, peer, &dn, &hello.nonce)
        .finalize()
        .into_bytes();
    write_json(
        s,
        &Proof {
            mac: proof.to_vec(),
        },
    )
    .await?;
    let theirs: Proof = read_json(s, MAX_HANDSHAKE_FRAME)
        .await
        .map_err(|e| match e {
            // The acceptor closes without a word when our proof is wrong.
            LinkError::Io(_) => LinkError::Refused,
            e => e,
        })?;
    mac(secret, "acceptor", me, peer, &dn, &hello.nonce)
        .verify_slice(&theirs.mac)
        .map_err(|_| LinkError::BadProof(peer))?;
    Ok(Sealer::new(&link_key(secret, me, peer, &dn, &hello.nonce)))
}

/// The acceptor's side of the handshake; returns the authenticated peer
/// and the opener of its frames. `known` tells whether a node id is a
/// cluster member.
pub async fn handshake_accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    me: u64,
    known: impl Fn(u64) -> bool,
    secret: &[u8],
) -> Result<(u64, Opener), LinkError> {
    let hello: Hello = read_json(s, MAX_HANDSHAKE_FRAME).await?;
    let peer = hello.node;
    if peer == me || !known(peer) {
        return Err(LinkError::UnknownNode(peer));
    }
    if hello.version != LINK_VERSION {
        return Err(LinkError::Version {
            node: peer,
            theirs: hello.version,
        });
    }
    let an: [u8; 32] = rand::random();
    write_json(
        s,
        &Hello {
            node: me,
            nonce: an.to_vec(),
            version: LINK_VERSION,
        },
    )
    .await?;
    let proof: Proof = read_json(s, MAX_HANDSHAKE_FRAME).await?;
    mac(secret, "dialer", peer, me, &hello.nonce, &an)
        .verify_slice(&proof.mac)
        .map_err(|_| LinkError::BadProof(peer))?;
    let ours = mac(secret, "acceptor", peer, me, &hello.nonce, &an)
        .finalize()
        .into_bytes();
    write_json(s, &Proof { mac: ours.to_vec() }).await?;
    Ok((
        peer,
        Opener::new(&link_key(secret, peer, me, &hello.nonce, &an)),
    ))
}

/// What the transport reports to the driver.
pub(crate) enum NetEvent {
    /// A new authenticated connection from `peer`: whatever came on older
    /// ones and was not delivered is lost. Sent before any [`NetEvent::In`]
    /// of this generation. Dropping `stop` closes the connection.
    InUp {
        /// The peer.
        peer: u64,
        /// This connection's generation.
        gen: u64,
        /// Dropped by the driver to close the connection.
        stop: oneshot::Sender<()>,
    },
    /// A frame from `peer` on connection `gen`.
    In {
        /// The peer.
        peer: u64,
        /// The connection's generation.
        gen: u64,
        /// The frame.
        wire: Wire,
    },
    /// Incoming connection `gen` from `peer` closed.
    InDown {
        /// The peer.
        peer: u64,
        /// The connection's generation.
        gen: u64,
    },
    /// A new authenticated connection to `peer`; send on `tx`. Dropping
    /// `tx` closes it.
    OutUp {
        /// The peer.
        peer: u64,
        /// This connection's generation.
        gen: u64,
        /// Frames to send.
        tx: mpsc::Sender<Wire>,
    },
    /// Outgoing connection `gen` to `peer` closed.
    OutDown {
        /// The peer.
        peer: u64,
        /// The connection's generation.
        gen: u64,
    },
}

/// Settings shared by the transport's tasks.
pub(crate) struct NetConfig {
    /// This node.
    pub me: u64,
    /// Peers and their addresses (grows when a reconfiguration adds a
    /// node: [`Net::add_peer`]).
    pub peers: std::sync::RwLock<BTreeMap<u64, String>>,
    /// The cluster secret.
    pub secret: Vec<u8>,
}

/// Logs each kind of refusal (source IP and reason) at warn level once a
/// minute, and at debug level in between: a misconfigured node retries
/// every second.
#[derive(Default)]
struct RefusalLog {
    last: std::sync::Mutex<BTreeMap<String, std::time::Instant>>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);

    fn log(&self, me: u64, addr: SocketAddr, reason: &LinkError) {
        let key = format!("{} {reason}", addr.ip());
        let now = std::time::Instant::now();
        let loud = match self.last.lock() {
            Ok(mut last) => {
                if last.len() > 1024 {
                    last.clear();
                }
                let loud = last
                    .get(&key)
                    .is_none_or(|t| now.duration_since(*t) >= Self::EVERY);
                if loud {
                    last.insert(key, now);
                }
                loud
            }
            Err(_) => true,
        };
        if loud {
            tracing::warn!(node = me, %addr, reason = %reason, "refused a catalog connection");
        } else {
            tracing::debug!(node = me, %addr, reason = %reason, "refused a catalog connection");
        }
    }
}

/// How long [`Net::stop`] waits for its tasks before it aborts them.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// The transport's tasks. [`Net::stop`] stops them and waits; dropping it
/// stops them too (their shutdown signal's sender is gone), without
/// waiting.
pub(crate) struct Net {
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    config: Arc<NetConfig>,
    events: mpsc::Sender<NetEvent>,
    partitioned: watch::Receiver<bool>,
    gens: Arc<std::sync::atomic::AtomicU64>,
}

impl Net {
    /// Starts the listener on `listener` and one dialer per peer. Events go
    /// to `events`. While `partitioned` is true, no connection is made or
    /// accepted and existing ones are closed.
    pub fn start(
        config: NetConfig,
        listener: TcpListener,
        events: mpsc::Sender<NetEvent>,
        partitioned: watch::Receiver<bool>,
    ) -> Net {
        let (shutdown, _) = watch::channel(false);
        let config = Arc::new(config);
        let gens = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let tasks = vec![tokio::spawn(listen(
            config.clone(),
            listener,
            events.clone(),
            partitioned.clone(),
            shutdown.subscribe(),
            gens.clone(),
        ))];
        let peers: Vec<(u64, String)> = config
            .peers
            .read()
            .map(|p| p.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        let mut net = Net {
            tasks,
            shutdown,
            config,
            events,
            partitioned,
            gens,
        };
        for (peer, addr) in peers {
            net.spawn_dialer(peer, addr);
        }
        net
    }

    fn spawn_dialer(&mut self, peer: u64, addr: String) {
        self.tasks.push(tokio::spawn(dial(
            self.config.clone(),
            peer,
            addr,
            self.events.clone(),
            self.partitioned.clone(),
            self.shutdown.subscribe(),
            self.gens.clone(),
        )));
    }

    /// Accepts and dials a new peer (a reconfiguration added it). No-op for
    /// a known peer.
    pub fn add_peer(&mut self, peer: u64, addr: String) {
        if peer == self.config.me {
            return;
        }
        let added = match self.config.peers.write() {
            Ok(mut p) if !p.contains_key(&peer) => {
                p.insert(peer, addr.clone());
                true
            }
            _ => false,
        };
        if added {
            tracing::info!(node = self.config.me, peer, %addr, "catalog transport: new peer");
            self.spawn_dialer(peer, addr);
        }
    }

    /// Stops every task and waits for them (the listening socket is closed
    /// when this returns). A task still running [`STOP_LIMIT`] after the
    /// request is aborted.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + STOP_LIMIT;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!(
                    node = self.config.me,
                    "a catalog transport task did not stop in time; aborted"
                );
                t.abort();
                let _ = t.await;
            }
        }
    }
}

/// Resolves when `flag` is true (or its sender is gone). Cancel-safe.
/// Handshakes in progress, per source address and from strangers.
#[derive(Default)]
struct Handshakes {
    inner: std::sync::Mutex<HandshakeCounts>,
}

#[derive(Default)]
struct HandshakeCounts {
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
    strangers: usize,
}

/// One handshake's place in [`Handshakes`], given back when dropped.
struct HandshakeSlot {
    of: Arc<Handshakes>,
    ip: std::net::IpAddr,
    stranger: bool,
}

impl Handshakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandshakeCounts> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn per_ip(&self, ip: std::net::IpAddr) -> usize {
        self.lock().per_ip.get(&ip).copied().unwrap_or(0)
    }

    /// A place for a handshake from `ip`: within the per-address limit,
    /// and, unless `peer` (its address is a peer's), within the strangers'.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr, peer: bool) -> Option<HandshakeSlot> {
        let mut c = self.lock();
        let n = c.per_ip.get(&ip).copied().unwrap_or(0);
        if n >= HANDSHAKES_PER_IP || (!peer && c.strangers >= STRANGER_HANDSHAKES) {
            return None;
        }
        c.per_ip.insert(ip, n + 1);
        if !peer {
            c.strangers += 1;
        }
        Some(HandshakeSlot {
            of: self.clone(),
            ip,
            stranger: !peer,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self.of.lock();
        if self.stranger {
            c.strangers = c.strangers.saturating_sub(1);
        }
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Whether `ip` is the address of a peer (its configured address
/// resolved now, within a second).
async fn is_peer_address(config: &NetConfig, ip: std::net::IpAddr) -> bool {
    let addrs: Vec<String> = config
        .peers
        .read()
        .map(|p| p.values().cloned().collect())
        .unwrap_or_default();
    let resolve = async {
        for a in addrs {
            if let Ok(mut it) = tokio::net::lookup_host(a).await {
                if it.any(|sa| sa.ip() == ip) {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(1), resolve)
        .await
        .unwrap_or(false)
}

async fn until_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

async fn listen(
    config: Arc<NetConfig>,
    listener: TcpListener,
    events: mpsc::Sender<NetEvent>,
    partitioned: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    gens: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut readers = tokio::task::JoinSet::new();
    let refusals = Arc::new(RefusalLog::default());
    let handshakes = Arc::new(Handshakes::default());
    loop {
        let accepted = tokio::select! {
            _ = until_true(&mut shutdown) => break,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "catalog listener: accept failed");
                tokio::time::sleep(BACKOFF_MIN).await;
                continue;
            }
        };
        if *partitioned.borrow() {
            drop(stream); // fault injection: refuse everything
            continue;
        }
        while readers.try_join_next().is_some() {}
        let npeers = config.peers.read().map_or(0, |p| p.len());
        if readers.len() >= 2 * npeers + SPARE_CONNECTIONS {
            tracing::warn!(node = config.me, %addr, "refused a catalog connection: too many open connections");
            drop(stream);
            continue;
        }
        // Strangers cannot hold every handshake slot: a few per address,
        // and past STRANGER_HANDSHAKES only peers' addresses (resolved
        // only then).
        let slot = match handshakes.enter(addr.ip(), false) {
            Some(s) => Some(s),
            None if handshakes.per_ip(addr.ip()) < HANDSHAKES_PER_IP
                && is_peer_address(&config, addr.ip()).await =>
            {
                handshakes.enter(addr.ip(), true)
            }
            None => None,
        };
        let Some(slot) = slot else {
            refusals.log(config.me, addr, &LinkError::Busy);
            drop(stream);
            continue;
        };
        readers.spawn(serve_incoming(
            config.clone(),
            refusals.clone(),
            slot,
            stream,
            addr,
            events.clone(),
            partitioned.clone(),
            shutdown.clone(),
            gens.clone(),
        ));
    }
    readers.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn serve_incoming(
    config: Arc<NetConfig>,
    refusals: Arc<RefusalLog>,
    slot: HandshakeSlot,
    mut stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<NetEvent>,
    mut partitioned: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    gens: Arc<std::sync::atomic::AtomicU64>,
) {
    let _ = stream.set_nodelay(true);
    let known = |id: u64| config.peers.read().is_ok_and(|p| p.contains_key(&id));
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake_accept(&mut stream, config.me, known, &config.secret),
    )
    .await
    .unwrap_or(Err(LinkError::Timeout));
    drop(slot);
    let (peer, mut opener) = match hs {
        Ok(p) => p,
        Err(e) => {
            refusals.log(config.me, addr, &e);
            return;
        }
    };
    let gen = gens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (stop_tx, mut stop_rx) = oneshot::channel();
    if events
        .send(NetEvent::InUp {
            peer,
            gen,
            stop: stop_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(node = config.me, peer, %addr, "catalog link from peer up");
    let (mut rd, _wr) = stream.into_split();
    loop {
        // read_frame is not cancel-safe; every other branch ends the
        // connection, so a half-read frame is never resumed.
        let frame = tokio::select! {
            _ = &mut stop_rx => break,
            _ = until_true(&mut partitioned) => break,
            _ = until_true(&mut shutdown) => break,
            f = opener.read(&mut rd) => f,
        };
        let wire = match frame.and_then(|f| {
            serde_json::from_slice::<Wire>(&f).map_err(|e| LinkError::Malformed(e.to_string()))
        }) {
            Ok(w) => w,
            Err(e @ LinkError::BadFrame) => {
                tracing::warn!(node = config.me, peer, %addr, reason = %e, "catalog link from peer closed");
                break;
            }
            Err(e) => {
                tracing::debug!(node = config.me, peer, reason = %e, "catalog link from peer closed");
                break;
            }
        };
        if events.send(NetEvent::In { peer, gen, wire }).await.is_err() {
            break;
        }
    }
    let _ = events.send(NetEvent::InDown { peer, gen }).await;
}

#[allow(clippy::too_many_arguments)]
async fn dial(
    config: Arc<NetConfig>,
    peer: u64,
    addr: String,
    events: mpsc::Sender<NetEvent>,
    mut partitioned: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    gens: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut backoff = BACKOFF_MIN;
    // Log a failure once per kind until the link comes up, not at every
    // retry.
    let mut last_failure = String::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if *partitioned.borrow() {
            tokio::select! {
                _ = until_true(&mut shutdown) => return,
                _ = partitioned.wait_for(|p| !*p) => {}
            }
            continue;
        }
        let attempt = async {
            let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
                .await
                .map_err(|_| LinkError::Timeout)??;
            let _ = s.set_nodelay(true);
            let sealer = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake_dial(&mut s, config.me, peer, &config.secret),
            )
            .await
            .unwrap_or(Err(LinkError::Timeout))?;
            Ok::<(TcpStream, Sealer), LinkError>((s, sealer))
        };
        let stream = tokio::select! {
            _ = until_true(&mut shutdown) => return,
            r = attempt => r,
        };
        let (stream, mut sealer) = match stream {
            Ok(s) => s,
            Err(e) => {
                let what = e.to_string();
                let auth = matches!(
                    e,
                    LinkError::BadProof(_)
                        | LinkError::UnknownNode(_)
                        | LinkError::Refused
                        | LinkError::Version { .. }
                );
                if what != last_failure {
                    if auth {
                        tracing::warn!(node = config.me, peer, %addr, reason = %e, "catalog link refused");
                    } else {
                        tracing::debug!(node = config.me, peer, %addr, reason = %e, "catalog link: cannot connect");
                    }
                    last_failure = what;
                }
                let jitter = Duration::from_millis(rand::random::<u64>() % 50);
                tokio::select! {
                    _ = until_true(&mut shutdown) => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        last_failure.clear();
        let gen = gens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Wire>(SEND_QUEUE);
        if events
            .send(NetEvent::OutUp { peer, gen, tx })
            .await
            .is_err()
        {
            return;
        }
        tracing::debug!(node = config.me, peer, %addr, "catalog link to peer up");
        let (mut rd, mut wr) = stream.into_split();
        let mut sink = [0u8; 64];
        loop {
            let wire = tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => w,
                    None => break,
                },
                // The acceptor never sends after the handshake: anything
                // here is EOF or an error, i.e. the link is gone.
                _ = rd.read(&mut sink) => break,
                _ = until_true(&mut partitioned) => break,
                _ = until_true(&mut shutdown) => break,
            };
            let Ok(buf) = serde_json::to_vec(&wire) else {
                break;
            };
            // A write cut short leaves half a frame on the stream; that is
            // fine because every branch but completion closes the
            // connection.
            let written = tokio::select! {
                w = tokio::time::timeout(WRITE_TIMEOUT, sealer.write(&mut wr, &buf)) => w,
                _ = until_true(&mut partitioned) => break,
                _ = until_true(&mut shutdown) => break,
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(node = config.me, peer, reason = %e, "catalog link to peer broke");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        node = config.me,
                        peer,
                        "catalog link to peer: write timed out; reconnecting"
                    );
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
        let _ = events.send(NetEvent::OutDown { peer, gen }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        dial_secret: &'static [u8],
        accept_secret: &'static [u8],
        dial_as: u64,
    ) -> (Result<Sealer, LinkError>, Result<(u64, Opener), LinkError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let d = tokio::spawn(async move {
            let r = handshake_dial(&mut a, dial_as, 2, dial_secret).await;
            drop(a);
            r
        });
        let acc = handshake_accept(&mut b, 2, |id| id == 1 || id == 3, accept_secret).await;
        drop(b);
        (d.await.expect("dialer task"), acc)
    }

    #[tokio::test]
    async fn the_same_secret_authenticates_both_sides() {
        let (d, a) = pair(b"s3cret", b"s3cret", 1).await;
        assert!(d.is_ok(), "{:?}", d.err());
        assert_eq!(a.expect("accepted").0, 1);
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (d, a) = pair(b"wrong", b"s3cret", 1).await;
        assert!(matches!(a, Err(LinkError::BadProof(1))), "{:?}", a.err());
        assert!(d.is_err());
    }

    #[tokio::test]
    async fn an_unknown_node_is_refused() {
        let (d, a) = pair(b"s3cret", b"s3cret", 7).await;
        assert!(matches!(a, Err(LinkError::UnknownNode(7))), "{:?}", a.err());
        assert!(d.is_err());
    }

    /// A handshake, then `frames` sealed by the dialer: the raw bytes it
    /// would write, and the acceptor's opener (to feed it bytes of our
    /// choosing).
    async fn sealed_link(frames: &[&[u8]]) -> (Vec<u8>, Opener) {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let dialer = tokio::spawn(async move {
            let sealer = handshake_dial(&mut a, 1, 2, b"s3cret").await.expect("dial");
            (a, sealer)
        });
        let (peer, opener) = handshake_accept(&mut b, 2, |id| id == 1, b"s3cret")
            .await
            .expect("accept");
        assert_eq!(peer, 1);
        let (_a, mut sealer) = dialer.await.expect("dialer task");
        let mut raw = Vec::new();
        for f in frames {
            sealer.write(&mut raw, f).await.expect("seal");
        }
        (raw, opener)
    }

    #[tokio::test]
    async fn frames_are_sealed_and_open_in_order_only() {
        let dsn: &[u8] = b"{\"dsn\":\"postgres://app:hunter2@db-7:5432/app\"}";
        let (raw, mut opener) = sealed_link(&[dsn, b"second", b"third"]).await;
        // Nothing of the plaintext on the wire.
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));
        assert!(!raw.windows(6).any(|w| w == b"second"));
        let mut r = &raw[..];
        assert_eq!(opener.read(&mut r).await.expect("first"), dsn);
        assert_eq!(opener.read(&mut r).await.expect("second"), b"second");
        assert_eq!(opener.read(&mut r).await.expect("third"), b"third");

        // One bit changed anywhere (length, ciphertext, tag): refused.
        let first_len = 4 + dsn.len() + TAG_LEN;
        for at in [2, 4, 10, first_len - 1] {
            let (mut raw, mut opener) = sealed_link(&[dsn]).await;
            raw[at] ^= 0x01;
            let got = opener.read(&mut &raw[..]).await;
            assert!(
                matches!(
                    got,
                    Err(LinkError::BadFrame | LinkError::Io(_) | LinkError::TooLarge(_))
                ),
                "byte {at} changed: {got:?}"
            );
            assert!(got.is_err());
        }
        // A frame replayed, or the second before the first: refused.
        let (raw, mut opener) = sealed_link(&[b"once", b"twice"]).await;
        let first = &raw[..4 + 4 + TAG_LEN];
        let mut replayed = first.to_vec();
        replayed.extend_from_slice(first);
        let mut r = &replayed[..];
        assert_eq!(opener.read(&mut r).await.expect("first"), b"once");
        assert!(matches!(
            opener.read(&mut r).await,
            Err(LinkError::BadFrame)
        ));
        let (raw, mut opener) = sealed_link(&[b"once", b"twice"]).await;
        let mut r = &raw[4 + 4 + TAG_LEN..];
        assert!(matches!(
            opener.read(&mut r).await,
            Err(LinkError::BadFrame)
        ));
        // A frame of another connection (same secret, same nodes): refused.
        let (other, _) = sealed_link(&[b"once"]).await;
        let (_, mut opener) = sealed_link(&[]).await;
        assert!(matches!(
            opener.read(&mut &other[..]).await,
            Err(LinkError::BadFrame)
        ));
    }

    #[tokio::test]
    async fn a_node_of_the_unsealed_protocol_is_refused_by_name() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        // What a node of link protocol 1 sends: no version.
        tokio::spawn(async move {
            let _ = write_frame(&mut a, br#"{"node":1,"nonce":[1,2,3]}"#).await;
            let mut sink = Vec::new();
            let _ = a.read_to_end(&mut sink).await;
        });
        let got = handshake_accept(&mut b, 2, |id| id == 1, b"s3cret").await;
        match got {
            Err(e @ LinkError::Version { node: 1, theirs: 1 }) => {
                let want = format!("version 1, this node {LINK_VERSION}");
                assert!(e.to_string().contains(&want), "{e}");
            }
            other => panic!("{:?}", other.err()),
        }
    }

    async fn stranger(from: &str, to: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(format!("{from}:0").parse().expect("addr"))
            .expect("bind");
        sock.connect(to).await.expect("connect")
    }

    /// Strangers that connect and stay silent hold handshake slots only
    /// within their limits (a few per address, a few in all), and a peer
    /// still gets its link up while they hold them.
    #[tokio::test]
    async fn silent_strangers_cannot_keep_a_peer_out() {
        let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (a2, a1) = (
            l2.local_addr().expect("addr"),
            l1.local_addr().expect("addr"),
        );
        let (_part, partitioned) = watch::channel(false);
        let config = |me: u64, peer: u64, addr: SocketAddr| NetConfig {
            me,
            peers: std::sync::RwLock::new([(peer, addr.to_string())].into_iter().collect()),
            secret: b"s3cret-s3cret-s3cret".to_vec(),
        };
        let (tx2, mut rx2) = mpsc::channel(64);
        let n2 = Net::start(config(2, 1, a1), l2, tx2, partitioned.clone());
        // 4 addresses × HANDSHAKES_PER_IP silent connections: every
        // stranger slot taken.
        let mut held = Vec::new();
        for i in 2..6 {
            for _ in 0..HANDSHAKES_PER_IP {
                held.push(stranger(&format!("127.0.0.{i}"), a2).await);
            }
        }
        assert_eq!(held.len(), STRANGER_HANDSHAKES);
        // One more stranger, and a fifth connection from a held address:
        // closed at once, long before the handshake timeout.
        let started = std::time::Instant::now();
        for from in ["127.0.0.6", "127.0.0.2"] {
            let mut s = stranger(from, a2).await;
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
                .await
                .expect("refused at once, not after the handshake timeout");
            assert!(matches!(n, Ok(0) | Err(_)), "{from}: {n:?}");
        }
        // The peer (node 1, dialing from 127.0.0.1, its configured
        // address) gets its link up while the strangers hold their slots.
        let (tx1, _rx1) = mpsc::channel(64);
        let n1 = Net::start(config(1, 2, a2), l1, tx1, partitioned);
        let up = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match rx2.recv().await {
                    Some(NetEvent::InUp { peer, .. }) => break peer,
                    Some(_) => {}
                    None => panic!("events closed"),
                }
            }
        })
        .await
        .expect("the peer's link came up while strangers held slots");
        assert_eq!(up, 1);
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        drop(held);
        n1.stop().await;
        n2.stop().await;
    }

    #[test]
    fn handshake_slots_are_counted_and_given_back() {
        let h = Arc::new(Handshakes::default());
        let ip = |i: u8| std::net::IpAddr::from([127, 0, 0, i]);
        let mut slots: Vec<HandshakeSlot> = (0..HANDSHAKES_PER_IP)
            .map(|_| h.enter(ip(2), false).expect("slot"))
            .collect();
        assert!(h.enter(ip(2), false).is_none());
        assert!(
            h.enter(ip(2), true).is_none(),
            "a peer too is capped per address"
        );
        slots.pop();
        assert_eq!(h.per_ip(ip(2)), HANDSHAKES_PER_IP - 1);
        assert!(h.enter(ip(2), false).is_some());
        for i in 0..STRANGER_HANDSHAKES {
            if let Some(s) = h.enter(ip(10 + (i / HANDSHAKES_PER_IP) as u8), false) {
                slots.push(s);
            }
        }
        assert!(h.enter(ip(100), false).is_none(), "strangers full");
        let peer = h.enter(ip(100), true).expect("a peer's address gets in");
        drop(slots);
        drop(peer);
        assert_eq!(h.lock().strangers, 0);
        assert!(h.lock().per_ip.is_empty());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_u32(MAX_HANDSHAKE_FRAME as u32 + 1).await;
        });
        assert!(matches!(
            read_frame(&mut b, MAX_HANDSHAKE_FRAME).await,
            Err(LinkError::TooLarge(_))
        ));
    }
}
