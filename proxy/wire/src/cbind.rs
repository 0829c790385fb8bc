//! SCRAM channel binding data: `tls-server-end-point` (RFC 5929 §4.1), the
//! hash of the node's own TLS certificate, as PostgreSQL computes it for
//! SCRAM-SHA-256-PLUS.
//!
//! The hash function is the one the certificate's signature uses, except
//! that MD5 and SHA-1 become SHA-256. A certificate whose signature names
//! no hash by itself (RSASSA-PSS, Ed25519, …) has no end-point data here
//! (PostgreSQL cannot compute one either): the node then does not offer
//! SCRAM-SHA-256-PLUS.
//!
//! Only the certificate's `signatureAlgorithm` OID is read, with a small
//! DER walker: the crates in the tree (rustls, webpki) do not expose it,
//! and one field does not justify an X.509 parser dependency.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// `tls-server-end-point` channel binding data for a DER certificate, or
/// `None` when its signature algorithm names no usable hash (or the DER
/// does not parse).
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(cert_der)?;
    let h = hash_for(oid)?;
    Some(match h {
        Hash::Sha224 => Sha224::digest(cert_der).to_vec(),
        Hash::Sha256 => Sha256::digest(cert_der).to_vec(),
        Hash::Sha384 => Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// RFC 5929: the signature's hash, MD5 and SHA-1 replaced by SHA-256.
fn hash_for(oid: &[u8]) -> Option<Hash> {
    // 1.2.840.113549.1.1.x: PKCS #1 RSA signatures.
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    // 1.2.840.10045.4.1 (ecdsa-with-SHA1), 1.2.840.10045.4.3.x (SHA-2).
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    if oid == ECDSA_SHA1 {
        return Some(Hash::Sha256);
    }
    if let Some(&[x]) = oid.strip_prefix(PKCS1) {
        return match x {
            // md2, md4, md5, sha1 with RSA
            2..=5 => Some(Hash::Sha256),
            11 => Some(Hash::Sha256),
            12 => Some(Hash::Sha384),
            13 => Some(Hash::Sha512),
            14 => Some(Hash::Sha224),
            _ => None,
        };
    }
    if let Some(&[x]) = oid.strip_prefix(ECDSA_SHA2) {
        return match x {
            1 => Some(Hash::Sha224),
            2 => Some(Hash::Sha256),
            3 => Some(Hash::Sha384),
            4 => Some(Hash::Sha512),
            _ => None,
        };
    }
    None
}

/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
/// SEQUENCE { algorithm OID, parameters ANY OPTIONAL }, signature BIT
/// STRING }: the content octets of `algorithm`.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (cert, _) = tlv(der, SEQUENCE)?;
    let (_tbs, rest) = tlv(cert, SEQUENCE)?;
    let (alg, _) = tlv(rest, SEQUENCE)?;
    let (oid, _) = tlv(alg, OID)?;
    Some(oid)
}

/// One DER tag-length-value with tag `tag`: (its content, what follows).
fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, b) = b.split_first()?;
    if t != tag {
        return None;
    }
    let (&l, mut b) = b.split_first()?;
    let len = if l < 0x80 {
        usize::from(l)
    } else {
        let n = usize::from(l & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let (digits, rest) = b.split_at(n);
        b = rest;
        digits
            .iter()
            .fold(0usize, |a, &d| (a << 8) | usize::from(d))
    };
    (b.len() >= len).then(|| b.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal certificate-shaped DER: SEQUENCE { SEQUENCE {}, SEQUENCE
    /// { OID }, BIT STRING }.
    fn fake_cert(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut inner = vec![0x30, 0x00, 0x30, alg.len() as u8];
        inner.extend_from_slice(&alg);
        inner.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut der = vec![0x30, 0x81, inner.len() as u8];
        der.extend_from_slice(&inner);
        der
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let sha256_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 11];
        let sha1_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 5];
        let sha384_ecdsa = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 3];
        let pss = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 10];
        let ed25519 = [0x2b, 0x65, 0x70];
        for (oid, len) in [
            (&sha256_rsa[..], Some(32)),
            (&sha1_rsa[..], Some(32)),
            (&sha384_ecdsa[..], Some(48)),
            (&pss[..], None),
            (&ed25519[..], None),
        ] {
            let der = fake_cert(oid);
            let got = tls_server_end_point(&der);
            assert_eq!(got.as_ref().map(Vec::len), len, "{oid:02x?}");
            if len == Some(32) {
                assert_eq!(got, Some(Sha256::digest(&der).to_vec()));
            }
        }
        assert_eq!(tls_server_end_point(b"not DER"), None);
        assert_eq!(tls_server_end_point(&[0x30, 0x84, 0xff, 0xff]), None);
    }
}
