//! A TCP proxy for fault injection between a node and a shard (issue 17):
//! it forwards both directions unchanged, or late (each chunk delivered a
//! fixed delay after it arrived, in order: a slow link, not a slow
//! server), or not at all for now (held: bytes are kept and delivered
//! once the link heals, as TCP retransmission would after a partition).
//! The mode applies to every connection, open or new, from the moment it
//! is set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the link does to the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    Pass,
    /// Each chunk is delivered this long after it arrived (each way).
    Delay(Duration),
    /// Nothing is delivered until the mode changes; then everything held
    /// is, in order.
    Hold,
}

/// A running proxy; it stops (and closes its connections) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<LinkMode>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watch_mode) = watch::channel(LinkMode::Pass);
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let counter = counter.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                let (m1, m2) = (watch_mode.clone(), watch_mode.clone());
                conns.spawn(async move {
                    // Either direction ending ends the connection.
                    tokio::select! {
                        () = pipe(cr, sw, m1) => {}
                        () = pipe(sr, cw, m2) => {}
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultProxy {
            addr,
            mode,
            open,
            task,
        }
    }

    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// Connections open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection's task (closing both sockets).
        self.task.abort();
    }
}

/// One direction: a reader stamps chunks as they arrive; the writer
/// delivers each once the mode lets it (at `arrival + delay`, or when no
/// longer held).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            loop {
                let m = *mode.borrow_and_update();
                match m {
                    LinkMode::Pass => break,
                    LinkMode::Delay(d) => {
                        // A mode change while waiting applies at once.
                        tokio::select! {
                            () = tokio::time::sleep_until(arrived + d) => break,
                            r = mode.changed() => if r.is_err() { return },
                        }
                    }
                    LinkMode::Hold => {
                        if mode.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The reader ending (EOF) must still let held bytes out: the writer
    // runs until the queue is empty and closed.
    tokio::join!(reader, writer);
}
