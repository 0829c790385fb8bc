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
