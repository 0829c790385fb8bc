//! TLS as a client: the certificate checks libpq's `sslmode` values mean
//! ([`client_config`]), and a rustls connector for tokio-postgres
//! ([`MakeRustlsConnect`]) that reports `tls-server-end-point` channel
//! binding data (so SCRAM-SHA-256-PLUS works through it); the admin API's
//! HTTP(S) agent ([`http_agent`]).
//!
//! Guarantees: `verify-full` checks the chain against the given roots and
//! the host name; `verify-ca` the chain only; `require` encrypts without
//! checking who answers (as libpq). Handshake signatures are always
//! checked.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much of the server's certificate is checked (libpq's `sslmode`
/// values that use TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt, check nothing (`sslmode=require` without a root).
    None,
    /// The chain up to a trusted root (`verify-ca`).
    Ca,
    /// The chain and the host name (`verify-full`).
    Full,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    #[error("cannot read the root certificates {path}: {message}")]
    Roots { path: String, message: String },
    #[error("sslmode={0} needs a root certificate file (sslrootcert)")]
    NoRoots(&'static str),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Root certificates from a PEM file.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_roots_der(path)? {
        roots.add(c).map_err(|e| TlsClientError::Roots {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A rustls client configuration checking the server as `verify` says,
/// against the roots in `root_file` (needed for `Ca` and `Full`).
pub fn client_config(
    verify: Verify,
    root_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsClientError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let cfg = match (verify, root_file) {
        (Verify::None, _) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider())))
            .with_no_client_auth(),
        (Verify::Ca, None) => return Err(TlsClientError::NoRoots("verify-ca")),
        (Verify::Full, None) => return Err(TlsClientError::NoRoots("verify-full")),
        (Verify::Full, Some(f)) => b
            .with_root_certificates(load_roots(f)?)
            .with_no_client_auth(),
        (Verify::Ca, Some(f)) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(f)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsClientError::Rustls(rustls::Error::General(e.to_string())))?;
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
    };
    Ok(cfg)
}

/// `sslmode=require`: any certificate; handshake signatures still checked.
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain, not the name.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An HTTP(S) agent for the admin API (proxyctl, a node's calls to its
/// peers): answers of any status are returned, not errors; `https://`
/// servers are checked (chain and name) against the PEM roots in
/// `cacert` only — without it, no https server is trusted.
pub fn http_agent(
    timeout: std::time::Duration,
    cacert: Option<&Path>,
) -> Result<ureq::Agent, TlsClientError> {
    let roots: Vec<ureq::tls::Certificate<'static>> = match cacert {
        None => Vec::new(),
        Some(f) => load_roots_der(f)?
            .into_iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    };
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(provider())
        .build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .tls_config(tls)
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

/// The certificates of a PEM file (at least one).
fn load_roots_der(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsClientError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |message: String| TlsClientError::Roots {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

/// A tokio-postgres TLS connector over rustls.
#[derive(Clone)]
pub struct MakeRustlsConnect(Arc<rustls::ClientConfig>);

impl MakeRustlsConnect {
    pub fn new(cfg: rustls::ClientConfig) -> MakeRustlsConnect {
        MakeRustlsConnect(Arc::new(cfg))
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            cfg: self.0.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

/// One connection's TLS handshake ([`MakeRustlsConnect`]).
pub struct RustlsConnect {
    cfg: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let t = tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(t)))
        })
    }
}

/// A TLS stream to PostgreSQL, with its channel binding data.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::frontend::cbind::tls_server_end_point(c.as_ref()))
            .map(tokio_postgres::tls::ChannelBinding::tls_server_end_point)
            .unwrap_or_else(tokio_postgres::tls::ChannelBinding::none)
    }
}

/// TLS to a shard, from its DSN's `sslmode` and `sslrootcert` (libpq's
/// meanings; `disable`, `allow`, `prefer` and no `sslmode` mean plain
/// text: the node does not try TLS unless the DSN asks for it).
#[derive(Clone, Default)]
pub struct ShardTls {
    /// `None`: plain text.
    config: Option<Arc<rustls::ClientConfig>>,
    /// The `sslmode` as written (for messages).
    pub mode: String,
    /// `sslrootcert`, as written.
    pub root: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for ShardTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardTls({})", self.mode)
    }
}

impl ShardTls {
    /// Whether the connection must use TLS.
    pub fn required(&self) -> bool {
        self.config.is_some()
    }

    /// The rustls client configuration, when TLS is required.
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.config.clone()
    }

    /// A tokio-postgres connector for this shard (`None`: plain text).
    pub fn connector(&self) -> Option<MakeRustlsConnect> {
        self.config.clone().map(MakeRustlsConnect)
    }
}

/// Splits a shard DSN (key=value or URL) into what tokio-postgres
/// understands and the node's [`ShardTls`]: `sslmode=verify-ca` and
/// `verify-full` become `require` and `sslrootcert` is taken out
/// (tokio-postgres knows neither); TLS is then the node's to set up.
pub fn split_shard_dsn(dsn: &str) -> Result<(String, ShardTls), String> {
    let (rest, mode, root) = if let Some(q) = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
        .map(|_| dsn.split_once('?'))
    {
        match q {
            None => (dsn.to_string(), None, None),
            Some((base, query)) => {
                let (mut mode, mut root, mut kept) = (None, None, Vec::new());
                for kv in query.split('&').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    match k {
                        "sslmode" => mode = Some(percent_decode(v)?),
                        "sslrootcert" => root = Some(percent_decode(v)?),
                        _ => kept.push(kv.to_string()),
                    }
                }
                if mode
                    .as_deref()
                    .is_some_and(|m| m.starts_with("verify-") || m == "require")
                {
                    kept.push("sslmode=require".into());
                } else if let Some(m) = &mode {
                    kept.push(format!("sslmode={m}"));
                }
                let rest = if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                };
                (rest, mode, root)
            }
        }
    } else {
        let (mut mode, mut root, mut kept) = (None, None, Vec::new());
        for (k, v) in key_values(dsn)? {
            match k.as_str() {
                "sslmode" => mode = Some(v),
                "sslrootcert" => root = Some(v),
                _ => kept.push(format!("{k}={}", quote(&v))),
            }
        }
        if let Some(m) = &mode {
            let m = if m.starts_with("verify-") {
                "require"
            } else {
                m
            };
            kept.push(format!("sslmode={}", quote(m)));
        }
        (kept.join(" "), mode, root)
    };
    let mode_s = mode.clone().unwrap_or_else(|| "prefer".into());
    let root = root.map(std::path::PathBuf::from);
    let verify = match mode_s.as_str() {
        "disable" | "allow" | "prefer" => {
            return Ok((
                rest,
                ShardTls {
                    config: None,
                    mode: mode_s,
                    root,
                },
            ))
        }
        // libpq: require with a root file checks the chain, as verify-ca.
        "require" if root.is_some() => Verify::Ca,
        "require" => Verify::None,
        "verify-ca" => Verify::Ca,
        "verify-full" => Verify::Full,
        other => return Err(format!("invalid sslmode {other:?}")),
    };
    let cfg = client_config(verify, root.as_deref()).map_err(|e| e.to_string())?;
    Ok((
        rest,
        ShardTls {
            config: Some(Arc::new(cfg)),
            mode: mode_s,
            root,
        },
    ))
}

/// libpq key=value pairs: `key = value`, values optionally single-quoted
/// with `\'` and `\\` escapes.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(format!("missing \"=\" after {key:?} in connection string"));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut val = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => return Err("unterminated quoted string in connection string".into()),
                    Some('\'') => break,
                    Some('\\') => val.extend(it.next()),
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    it.next();
                    val.extend(it.next());
                    continue;
                }
                val.push(c);
                it.next();
            }
        }
        out.push((key, val));
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("bad percent-encoding in {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_dsns_are_split_for_tokio_postgres() {
        let (d, t) = split_shard_dsn("host=h port=5 user=u password='a b\\'c'").expect("kv");
        assert_eq!(d, "host='h' port='5' user='u' password='a b\\'c'");
        assert!(!t.required());
        let c: tokio_postgres::Config = d.parse().expect("tokio-postgres parses it");
        assert_eq!(c.get_password(), Some(&b"a b'c"[..]));
        let (d, t) = split_shard_dsn("host=h sslmode=require").expect("kv");
        assert!(t.required());
        assert!(d.contains("sslmode='require'"), "{d}");
        let e = split_shard_dsn("host=h sslmode=verify-full").expect_err("no root");
        assert!(e.contains("sslrootcert"), "{e}");
        let e = split_shard_dsn("host=h sslmode=verify-full sslrootcert=/nonexistent")
            .expect_err("missing file");
        assert!(e.contains("/nonexistent"), "{e}");
        let (d, t) = split_shard_dsn("postgres://u:p@h:5/db?sslmode=require&connect_timeout=3")
            .expect("url");
        assert!(t.required());
        assert_eq!(d, "postgres://u:p@h:5/db?connect_timeout=3&sslmode=require");
        let (d, t) = split_shard_dsn("postgres://u:p@h:5/db").expect("url");
        assert_eq!(d, "postgres://u:p@h:5/db");
        assert!(!t.required());
        assert!(split_shard_dsn("host=h sslmode=sometimes").is_err());
    }
}
