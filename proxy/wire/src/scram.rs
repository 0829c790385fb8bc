//! Client authentication at the node: SCRAM-SHA-256 and, over TLS,
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (server
//! side, RFC 5802 / 7677 / 5929), md5 and trust.
//!
//! Guarantee: the node stores and needs only verifiers (the same formats as
//! PostgreSQL's `pg_authid.rolpassword`), never plain passwords; proofs are
//! compared in constant time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed SCRAM verifier: {0}")]
    BadVerifier(&'static str),
    #[error("malformed SCRAM message: {0}")]
    BadMessage(&'static str),
    /// Channel binding refused (PostgreSQL: 08P01 protocol violation).
    #[error("{0}")]
    Binding(&'static str),
    #[error("password authentication failed")]
    Failed,
}

/// A parsed `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier.
#[derive(Debug, Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<ScramVerifier, AuthError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(AuthError::BadVerifier("must start with SCRAM-SHA-256$"))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(AuthError::BadVerifier("missing keys"))?;
        let (iter, salt) = iter_salt
            .split_once(':')
            .ok_or(AuthError::BadVerifier("missing salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(AuthError::BadVerifier("missing server key"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| AuthError::BadVerifier("bad iteration count"))?;
        let salt = B64
            .decode(salt)
            .map_err(|_| AuthError::BadVerifier("bad salt"))?;
        let key = |k: &str| -> Result<[u8; 32], AuthError> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or(AuthError::BadVerifier("bad key"))
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

/// Makes a verifier from a password (for `hotrepart hash-password`).
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// A verifier no password matches, for a role the node does not know:
/// the client goes through the same SCRAM exchange as for a known role
/// and gets the same "password authentication failed" answer, so that
/// which role names exist cannot be learnt by trying (as PostgreSQL's
/// mock authentication). The salt is the same at every try for a name
/// (derived from a per-process secret), as a real role's is.
pub fn doomed_verifier(user: &str) -> String {
    static NONCE: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let nonce = NONCE.get_or_init(rand::random);
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(user.as_bytes());
    let salt = &h.finalize()[..16];
    let stored: [u8; 32] = rand::random();
    let server: [u8; 32] = rand::random();
    format!(
        "SCRAM-SHA-256$4096:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored),
        B64.encode(server)
    )
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Channel binding in one SCRAM exchange, as the node advertised it.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// Not offered (no TLS, or a certificate without end-point data): only
    /// SCRAM-SHA-256 was advertised.
    NotOffered,
    /// SCRAM-SHA-256-PLUS was advertised; the client chose it (`plus`) or
    /// plain SCRAM-SHA-256. `data`: the `tls-server-end-point` data of the
    /// node's certificate.
    Offered { plus: bool, data: &'a [u8] },
}

/// The only channel binding type supported (as PostgreSQL).
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// Server side of one SCRAM-SHA-256(-PLUS) exchange.
pub struct ScramServer {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    /// What the client-final `c=` must hold, decoded: the gs2 header, then
    /// the channel binding data when the client uses binding.
    expected_cbind: Vec<u8>,
    nonce: String,
}

impl ScramServer {
    /// Takes the client-first-message; returns the server-first-message.
    /// Checks the gs2 header against what was advertised (`binding`), as
    /// PostgreSQL's `read_client_first_message`: a client that chose
    /// SCRAM-SHA-256-PLUS must bind (`p=`), one that chose SCRAM-SHA-256
    /// must not, and a `y` (the client could bind but thinks the server
    /// cannot) where binding was offered is a downgrade and refused.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &str,
        binding: Binding<'_>,
    ) -> Result<ScramServer, AuthError> {
        let plus = matches!(binding, Binding::Offered { plus: true, .. });
        let (flag, rest) = client_first
            .split_once(',')
            .ok_or(AuthError::BadMessage("missing gs2 header"))?;
        let cb_data: &[u8] = match flag {
            "n" | "y" if plus => return Err(AuthError::Binding(
                "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data",
            )),
            "n" => &[],
            "y" => match binding {
                Binding::NotOffered => &[],
                Binding::Offered { .. } => return Err(AuthError::Binding(
                    "SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not; however, this server does support channel binding (possible downgrade attack)",
                )),
            },
            p if p.starts_with("p=") => {
                let Binding::Offered { plus: true, data } = binding else {
                    return Err(AuthError::Binding(
                        "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data",
                    ));
                };
                if &p[2..] != TLS_SERVER_END_POINT {
                    return Err(AuthError::Binding(
                        "unsupported SCRAM channel-binding type (only tls-server-end-point is supported)",
                    ));
                }
                data
            }
            _ => return Err(AuthError::BadMessage("unexpected channel-binding flag")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthError::BadMessage("missing gs2 header"))?;
        if !authzid.is_empty() {
            return Err(AuthError::BadMessage(
                "client uses authorization identity, but it is not supported",
            ));
        }
        let gs2_header = &client_first[..flag.len() + 1 + authzid.len() + 1];
        let mut expected_cbind = gs2_header.as_bytes().to_vec();
        expected_cbind.extend_from_slice(cb_data);
        let cnonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(AuthError::BadMessage("missing client nonce"))?;
        if cnonce.is_empty() {
            return Err(AuthError::BadMessage("empty client nonce"));
        }
        let mut sn = [0u8; 18];
        rand::Rng::fill(&mut rand::rng(), &mut sn[..]);
        let nonce = format!("{cnonce}{}", B64.encode(sn));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(ScramServer {
            verifier,
            client_first_bare: bare.to_string(),
            server_first,
            expected_cbind,
            nonce,
        })
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks the client-final-message; returns the server-final-message.
    pub fn finish(&self, client_final: &str) -> Result<String, AuthError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(AuthError::BadMessage("missing proof"))?;
        let mut cbind = None;
        let mut nonce = None;
        for a in without_proof.split(',') {
            if let Some(v) = a.strip_prefix("c=") {
                cbind = Some(v);
            } else if let Some(v) = a.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        // Decoded and compared in constant time: the binding data is not
        // secret, but this costs nothing.
        let cbind = cbind
            .and_then(|c| B64.decode(c).ok())
            .ok_or(AuthError::BadMessage(
                "missing or malformed channel binding",
            ))?;
        if !ct_eq(&cbind, &self.expected_cbind) {
            return Err(AuthError::Binding("SCRAM channel binding check failed"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::BadMessage("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthError::BadMessage("bad proof encoding"))?;
        if proof.len() != 32 {
            return Err(AuthError::Failed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_sig = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_sig).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !ct_eq(&stored, &self.verifier.stored_key) {
            return Err(AuthError::Failed);
        }
        let server_sig = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

/// Checks an md5 password response: `md5(md5hex(password+user) + salt)`.
/// `stored` is `md5<hex>` as in pg_authid.
pub fn md5_check(stored: &str, salt: [u8; 4], response: &str) -> bool {
    let Some(inner) = stored.strip_prefix("md5") else {
        return false;
    };
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    let expected = format!("md5{}", hex(&h.finalize()));
    ct_eq(expected.as_bytes(), response.as_bytes())
}

/// `md5<hex(md5(password + user))>`, the stored form.
pub fn md5_verifier(user: &str, password: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_round_trip_with_real_client() {
        let v = ScramVerifier::parse(&scram_verifier("s3cret")).expect("verifier");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let first = String::from_utf8(client.message().to_vec()).expect("utf8");
        let server = ScramServer::start(v.clone(), &first, Binding::NotOffered).expect("start");
        client
            .update(server.server_first().as_bytes())
            .expect("client update");
        let fin = String::from_utf8(client.message().to_vec()).expect("utf8");
        let sfinal = server.finish(&fin).expect("proof accepted");
        client.finish(sfinal.as_bytes()).expect("server verified");

        let mut bad = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let first = String::from_utf8(bad.message().to_vec()).expect("utf8");
        let server = ScramServer::start(v, &first, Binding::NotOffered).expect("start");
        bad.update(server.server_first().as_bytes())
            .expect("update");
        let fin = String::from_utf8(bad.message().to_vec()).expect("utf8");
        assert_eq!(server.finish(&fin), Err(AuthError::Failed));
    }

    /// One exchange with postgres-protocol's client: `Ok` when the
    /// server accepted the proof and the client the server's signature.
    fn exchange(
        password: &[u8],
        client_cb: ChannelBinding,
        binding: Binding<'_>,
    ) -> Result<(), AuthError> {
        let v = ScramVerifier::parse(&scram_verifier("s3cret")).expect("verifier");
        let mut client = ScramSha256::new(password, client_cb);
        let first = String::from_utf8(client.message().to_vec()).expect("utf8");
        let server = ScramServer::start(v, &first, binding)?;
        client
            .update(server.server_first().as_bytes())
            .expect("client update");
        let fin = String::from_utf8(client.message().to_vec()).expect("utf8");
        let sfinal = server.finish(&fin)?;
        client.finish(sfinal.as_bytes()).expect("server verified");
        Ok(())
    }

    #[test]
    fn channel_binding_is_checked_and_downgrades_refused() {
        let data = [7u8; 32];
        let offered = |plus| Binding::Offered { plus, data: &data };
        let cb = |d: &[u8]| ChannelBinding::tls_server_end_point(d.to_vec());
        // PLUS with the node's end-point data.
        assert_eq!(exchange(b"s3cret", cb(&data), offered(true)), Ok(()));
        // A wrong password is still a wrong password.
        assert_eq!(
            exchange(b"wrong", cb(&data), offered(true)),
            Err(AuthError::Failed)
        );
        // Other binding data (a man in the middle's certificate).
        assert!(matches!(
            exchange(b"s3cret", cb(&[8u8; 32]), offered(true)),
            Err(AuthError::Binding(m)) if m.contains("check failed")
        ));
        // `y` where PLUS was advertised: a downgrade.
        assert!(matches!(
            exchange(b"s3cret", ChannelBinding::unrequested(), offered(false)),
            Err(AuthError::Binding(m)) if m.contains("downgrade")
        ));
        // `n` (no binding support) with plain SCRAM over TLS is fine, and
        // `y` where nothing was offered.
        assert_eq!(
            exchange(b"s3cret", ChannelBinding::unsupported(), offered(false)),
            Ok(())
        );
        assert_eq!(
            exchange(
                b"s3cret",
                ChannelBinding::unrequested(),
                Binding::NotOffered
            ),
            Ok(())
        );
        // PLUS chosen, but no binding in the message; binding data sent
        // with plain SCRAM-SHA-256.
        assert!(matches!(
            exchange(b"s3cret", ChannelBinding::unsupported(), offered(true)),
            Err(AuthError::Binding(_))
        ));
        assert!(matches!(
            exchange(b"s3cret", cb(&data), offered(false)),
            Err(AuthError::Binding(_))
        ));
        assert!(matches!(
            exchange(b"s3cret", cb(&data), Binding::NotOffered),
            Err(AuthError::Binding(_))
        ));
        // Another binding type.
        let v = ScramVerifier::parse(&scram_verifier("s3cret")).expect("verifier");
        assert!(matches!(
            ScramServer::start(v, "p=tls-unique,,n=,r=abc", offered(true)),
            Err(AuthError::Binding(m)) if m.contains("unsupported")
        ));
    }

    #[test]
    fn md5_matches_libpq_formula() {
        let stored = md5_verifier("alice", "pw");
        let salt = [1, 2, 3, 4];
        let resp = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
        assert!(md5_check(&stored, salt, &resp));
        assert!(!md5_check(&stored, [0, 0, 0, 0], &resp));
    }

    #[test]
    fn rejects_bad_verifiers() {
        assert!(ScramVerifier::parse("plain").is_err());
        assert!(ScramVerifier::parse("SCRAM-SHA-256$x:AAAA$AAAA:AAAA").is_err());
    }
}
