//! A backend connection's socket: plain TCP, or TLS when the shard's DSN
//! asks for it (`sslmode=require|verify-ca|verify-full`, see
//! [`crate::tls::split_shard_dsn`]). [`open`] does the SSLRequest and the
//! handshake; the halves read and write either way.
//!
//! Guarantee: with `sslmode=require` or stronger the node never speaks
//! plain text to the shard (an 'N' answer is an error, not a fallback).

use crate::backend::conn::BackendError;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS to one shard, and whether it may get a cleartext password
/// without TLS.
#[derive(Debug, Clone, Default)]
pub struct BackendTls {
    pub tls: crate::tls::ShardTls,
    /// The DSN's host (the name `verify-full` checks).
    pub host: String,
    /// `allow_cleartext_shard_password`.
    pub allow_cleartext_password: bool,
}

/// The read half.
pub enum BackendRead {
    Plain(OwnedReadHalf),
    /// With a duplicate of the socket, to see whether an idle connection
    /// was closed without reading the TLS stream.
    Tls(tokio::io::ReadHalf<Tls>, std::net::TcpStream),
}

/// The write half.
pub enum BackendWrite {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Tls>),
}

/// PostgreSQL's SSLRequest.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The connection's halves, after TLS when `tls` requires it.
pub async fn open(
    stream: TcpStream,
    shard: &str,
    tls: &BackendTls,
) -> Result<(BackendRead, BackendWrite), BackendError> {
    let Some(cfg) = tls.tls.client_config() else {
        let (r, w) = stream.into_split();
        return Ok((BackendRead::Plain(r), BackendWrite::Plain(w)));
    };
    let fail = |message: String| BackendError::Tls {
        shard: shard.to_string(),
        mode: tls.tls.mode.clone(),
        message,
    };
    let io = |e: io::Error| fail(e.to_string());
    let mut stream = stream;
    stream.write_all(&SSL_REQUEST).await.map_err(io)?;
    // One byte only: nothing the shard sends before the handshake may be
    // read as part of it (CVE-2021-23222).
    match stream.read_u8().await.map_err(io)? {
        b'S' => {}
        b'N' => {
            return Err(BackendError::TlsRefused {
                shard: shard.to_string(),
                mode: tls.tls.mode.clone(),
            })
        }
        other => {
            return Err(fail(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            )))
        }
    }
    let name = rustls::pki_types::ServerName::try_from(tls.host.clone())
        .map_err(|e| fail(format!("host {:?}: {e}", tls.host)))?;
    let std = stream.into_std().map_err(io)?;
    let dup = std.try_clone().map_err(io)?;
    let stream = TcpStream::from_std(std).map_err(io)?;
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, stream)
        .await
        .map_err(io)?;
    let (r, w) = tokio::io::split(s);
    Ok((BackendRead::Tls(r, dup), BackendWrite::Tls(w)))
}

impl BackendRead {
    /// Whether an idle connection is still open with nothing sent: one
    /// non-blocking peek, never waits.
    pub fn is_idle(&self) -> bool {
        let mut b = [0u8; 1];
        // A peek on the socket itself: tokio's `try_read` answers
        // WouldBlock from the readiness its reactor last saw, which may not
        // include a close the server made a moment ago.
        let r = match self {
            BackendRead::Plain(r) => {
                let mut u = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                socket2::SockRef::from(r.as_ref()).peek(&mut u)
            }
            BackendRead::Tls(_, dup) => dup.peek(&mut b),
        };
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl BackendWrite {
    /// A Terminate if the socket takes it at once (plain text only: a TLS
    /// record cannot be written without waiting; the close says enough).
    pub fn try_terminate(&self) {
        if let BackendWrite::Plain(w) = self {
            let _ = w.try_write(&[crate::wire::fe::TERMINATE, 0, 0, 0, 4]);
        }
    }
}

impl AsyncRead for BackendRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            BackendRead::Tls(r, _) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            BackendWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            BackendWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            BackendWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendWrite::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            BackendWrite::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendWrite::Plain(w) => w.is_write_vectored(),
            BackendWrite::Tls(w) => w.is_write_vectored(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::BackendRead;

    /// A server that closed an idle connection (FATAL, then EOF) is seen
    /// at once, even when the runtime's reactor has not run since: the
    /// pool must not hand out that connection (the client's statement
    /// would fail). tokio's `try_read` answered from the readiness the
    /// reactor last recorded — none here — and called it idle.
    #[test]
    fn a_closed_idle_connection_is_seen_before_the_reactor_runs() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut server, _) = listener.accept().unwrap();
            let (r, _w) = stream.into_split();
            let r = BackendRead::Plain(r);
            assert!(r.is_idle(), "nothing sent yet");
            std::io::Write::write_all(&mut server, b"E").unwrap();
            drop(server);
            // No await: the reactor does not run in between.
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!r.is_idle(), "the server sent and closed");
        });
    }
}
