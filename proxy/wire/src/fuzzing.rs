//! The bodies of the coverage-guided fuzz targets `frame`, `scram`,
//! `merge_values` and `backend` (`fuzz/fuzz_targets/`, cargo-fuzz with
//! libFuzzer), here so that the stable test suite replays the kept corpora
//! and random inputs through the same code (`proxy/wire/tests/fuzz_corpus.rs`).
//! Each function takes the fuzzer's bytes and panics only when a property
//! the decoders promise is broken:
//!
//! - [`frames`]: a startup packet and a stream of client frames, fed in
//!   chunks of any size, split into whole frames or a protocol error, with
//!   the read buffer bounded by the configured frame limit whatever length
//!   a frame claims; a frame re-encodes to its own bytes, a startup
//!   packet's parameters to its body.
//! - [`scram`]: client-first/client-final messages (with and without
//!   channel binding), verifiers and certificates: a wrong proof, a
//!   tampered message or a mismatched binding never verifies, the genuine
//!   exchange always does.
//! - [`merge_values`]: the merge's value decoders: compare is antisymmetric
//!   and agrees with integer/float oracles, numeric text round-trips, the
//!   binary output of integers, floats, bools, text and uuids is what
//!   PostgreSQL's `*send` gives.
//! - [`backend`]: a stream of backend messages through the decoders the
//!   node uses (login, hidden queries, merge, LISTEN): what decodes
//!   re-encodes to the bytes it came from.
//!
//! Not part of the crate's API (hidden from its docs).

use crate::backend as bk;
use crate::frame::{self, be, fe, startup, FrameReader, WireError};
use crate::scram::{self, AuthError, Binding, ScramServer, ScramVerifier};
use crate::value::{self, Num, Ty};
use crate::{binary, cbind};
use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// A byte source that hands out its input `step` bytes per read, then
/// end of stream. Never waits.
struct Chunks<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future over [`Chunks`] to its end (it never waits).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a reader over a slice waited"),
    }
}

/// Largest buffer a [`FrameReader`] may hold with frame limit `max_len`:
/// its initial 16 KiB or one whole frame, plus a read's spare room, at
/// most doubled by the buffer's growth.
fn buffer_bound(max_len: usize) -> usize {
    2 * ((16 * 1024).max(max_len + 1) + 64)
}

fn read_err(what: &str, e: WireError) {
    if let WireError::Io(e) = e {
        panic!("{what}: an i/o error from a slice: {e}");
    }
}

/// Target `frame`. The first byte chooses the chunk size (bits 0-4: 1 to
/// 31 bytes, or all at once), the frame limit (bits 5-6) and whether a
/// startup packet comes first (bit 7 clear); the rest is the client's
/// byte stream.
pub fn frames(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let step = match usize::from(sel & 0x1f) {
        0x1f => input.len().max(1),
        s => s + 1,
    };
    let max_len = [64, 1024, 65_535, 1 << 20][usize::from(sel >> 5) & 3];
    let mut r = FrameReader::new(Chunks { data: input, step }, max_len);
    if sel & 0x80 == 0 {
        match ready(r.next_startup()) {
            Ok(pkt) => check_startup(&pkt),
            Err(e) => return read_err("startup packet", e),
        }
    }
    loop {
        let buffered = r.has_frame();
        match ready(r.next()) {
            Ok(f) => check_frame(&f, max_len),
            Err(e) => {
                // A whole frame buffered: it is returned, or its length
                // refused, never waited for.
                assert!(
                    !buffered || matches!(e, WireError::Protocol(_)),
                    "a buffered frame was not returned: {e}"
                );
                read_err("frame", e);
                break;
            }
        }
        assert!(
            r.buffer_capacity() <= buffer_bound(max_len),
            "read buffer of {} bytes with a frame limit of {max_len}",
            r.buffer_capacity()
        );
    }
    assert!(
        r.buffer_capacity() <= buffer_bound(max_len),
        "read buffer of {} bytes with a frame limit of {max_len}",
        r.buffer_capacity()
    );
}

fn check_startup(pkt: &[u8]) {
    let len = pkt.len();
    assert!((8..=10_000).contains(&len), "startup packet of {len} bytes");
    assert_eq!(
        u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]) as usize,
        len,
        "startup packet length"
    );
    let code = i32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
    if code == startup::PROTOCOL_3_0 {
        if let Ok(params) = frame::parse_startup(&pkt[8..]) {
            let mut again = BytesMut::new();
            for (k, v) in &params {
                assert!(!k.is_empty(), "an empty parameter name ends the list");
                frame::put_cstr(&mut again, k);
                frame::put_cstr(&mut again, v);
            }
            again.put_u8(0);
            assert!(
                pkt[8..].starts_with(&again),
                "startup parameters {params:?} re-encode to other bytes"
            );
        }
    }
}

fn check_frame(f: &frame::Frame, max_len: usize) {
    let raw = &f.raw;
    assert!(raw.len() >= 5, "frame of {} bytes", raw.len());
    let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
    assert_eq!(len + 1, raw.len(), "frame length field");
    assert!(
        len <= max_len,
        "frame of {len} bytes past the limit {max_len}"
    );
    let mut again = BytesMut::new();
    frame::frame(&mut again, f.tag(), |o| o.put_slice(f.body()));
    assert_eq!(&again[..], &raw[..], "frame re-encodes to other bytes");
    // What the node reads of a client's frames itself (login, Query).
    let mut b = f.body();
    match f.tag() {
        fe::PASSWORD => {
            if let Ok(first) = frame::get_cstr(&mut b) {
                let _ = first.len();
                if frame::get_i32(&mut b).is_ok() {
                    let _ = std::str::from_utf8(b);
                }
            }
        }
        fe::QUERY | fe::CLOSE | fe::DESCRIBE => {
            let _ = frame::get_cstr(&mut b);
        }
        _ => {
            let _ = frame::get_i16(&mut b);
        }
    }
}

/// The password every `scram` run's verifier is made from.
const PASSWORD: &[u8] = b"pencil";

/// A verifier for `password` with one PBKDF2 iteration (the client takes
/// the count from the server: a fuzz run stays fast).
pub fn fast_verifier(password: &[u8]) -> ScramVerifier {
    type H = Hmac<Sha256>;
    let mac = |key: &[u8], data: &[&[u8]]| -> [u8; 32] {
        let mut m = <H as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for d in data {
            m.update(d);
        }
        m.finalize().into_bytes().into()
    };
    let salt = b"fuzzsalt".to_vec();
    let salted = mac(password, &[&salt, &[0, 0, 0, 1]]);
    let client_key = mac(&salted, &[b"Client Key"]);
    ScramVerifier {
        iterations: 1,
        salt,
        stored_key: Sha256::digest(client_key).into(),
        server_key: mac(&salted, &[b"Server Key"]),
    }
}

/// Target `scram`. The first byte chooses what is fuzzed (bits 0-1): raw
/// client messages, a real client's exchange with one message tampered
/// with, a stored verifier, a certificate's channel binding data.
pub fn scram(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let cert = [0x5au8; 32];
    let binding = match (sel >> 2) % 3 {
        0 => Binding::NotOffered,
        1 => Binding::Offered {
            plus: false,
            data: &cert,
        },
        _ => Binding::Offered {
            plus: true,
            data: &cert,
        },
    };
    match sel & 3 {
        0 => {
            // Raw messages, first and final split at the first newline:
            // whatever they hold, the proof cannot be right (the server's
            // nonce is fresh).
            let text = String::from_utf8_lossy(rest);
            let (first, fin) = text.split_once('\n').unwrap_or((&text, ""));
            if let Ok(s) = ScramServer::start(fast_verifier(PASSWORD), first, binding) {
                assert!(
                    s.server_first().starts_with("r="),
                    "server-first {:?}",
                    s.server_first()
                );
                let r = s.finish(fin);
                assert!(r.is_err(), "{first:?} / {fin:?} verified: {r:?}");
            }
        }
        1 => tampered_exchange(sel, binding, &cert, rest),
        2 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(v) = ScramVerifier::parse(&text) {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD;
                let again = format!(
                    "SCRAM-SHA-256${}:{}${}:{}",
                    v.iterations,
                    b64.encode(&v.salt),
                    b64.encode(v.stored_key),
                    b64.encode(v.server_key)
                );
                let w = ScramVerifier::parse(&again)
                    .unwrap_or_else(|e| panic!("{again:?} (from {text:?}): {e}"));
                assert_eq!(
                    (v.iterations, &v.salt, v.stored_key, v.server_key),
                    (w.iterations, &w.salt, w.stored_key, w.server_key)
                );
            }
            let stored = scram::md5_verifier("alice", "pw");
            let salt = [1, 2, 3, 4];
            let right = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
            assert_eq!(
                scram::md5_check(&stored, salt, &text),
                text == right,
                "md5 response {text:?}"
            );
        }
        _ => {
            if let Some(d) = cbind::tls_server_end_point(rest) {
                assert!(
                    [28, 32, 48, 64].contains(&d.len()),
                    "{} bytes of end-point data",
                    d.len()
                );
            }
        }
    }
}

/// A real client (postgres-protocol's) against the server, the password
/// right or wrong (bit 4 of `sel`), the client binding or not (bits 5-6),
/// and one of its two messages changed as `script` says (first byte: which
/// message and how; next two: where; the rest: bytes put in). The server
/// accepts exactly when nothing was changed, the password is right and
/// the client's binding choice fits what was offered.
fn tampered_exchange(sel: u8, binding: Binding<'_>, cert: &[u8], script: &[u8]) {
    let right = sel & 0x10 == 0;
    let password: &[u8] = if right { PASSWORD } else { b"pencil2" };
    let (client_cb, cb_kind) = match (sel >> 5) % 3 {
        0 => (ChannelBinding::unsupported(), 'n'),
        1 => (ChannelBinding::unrequested(), 'y'),
        _ => {
            // Bit 7: the node's own certificate data, or another's.
            let data = if sel & 0x80 == 0 {
                cert.to_vec()
            } else {
                vec![0xa5; 32]
            };
            (ChannelBinding::tls_server_end_point(data), 'p')
        }
    };
    let fits = match (cb_kind, binding) {
        ('n', Binding::NotOffered | Binding::Offered { plus: false, .. }) => true,
        ('y', Binding::NotOffered) => true,
        ('p', Binding::Offered { plus: true, .. }) => sel & 0x80 == 0,
        _ => false,
    };
    let mut client = ScramSha256::new(password, client_cb);
    let first = client.message().to_vec();
    let (op, at, put) = match script {
        [op, a, b, put @ ..] => (*op, usize::from(u16::from_le_bytes([*a, *b])), put),
        [op, ..] => (*op, 0, &[][..]),
        [] => (0, 0, &[][..]),
    };
    let tamper = |m: &[u8]| -> Vec<u8> {
        let mut m = m.to_vec();
        let at = at % (m.len() + 1);
        match (op >> 1) % 4 {
            0 => {}
            1 => {
                if let Some(b) = m.get_mut(at) {
                    *b ^= put.first().copied().unwrap_or(1);
                }
            }
            2 => {
                m.splice(at..at, put.iter().copied());
            }
            _ => m.truncate(at),
        }
        m
    };
    let (first_sent, tamper_final) = if op & 1 == 0 {
        (tamper(&first), false)
    } else {
        (first.clone(), true)
    };
    let Ok(first_text) = std::str::from_utf8(&first_sent) else {
        return;
    };
    let server = match ScramServer::start(fast_verifier(PASSWORD), first_text, binding) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !(fits && first_sent == first),
                "the genuine client-first {first_text:?} refused: {e}"
            );
            return;
        }
    };
    if client.update(server.server_first().as_bytes()).is_err() {
        // The client refuses a server-first built on a changed nonce.
        assert!(first_sent != first, "the client refused the server-first");
        return;
    }
    let fin = client.message().to_vec();
    let fin_sent = if tamper_final {
        tamper(&fin)
    } else {
        fin.clone()
    };
    let Ok(fin_text) = std::str::from_utf8(&fin_sent) else {
        return;
    };
    let untouched = first_sent == first && fin_sent == fin;
    match server.finish(fin_text) {
        Ok(server_final) => {
            assert!(
                untouched && right && fits,
                "verified: password right {right}, binding fits {fits}, \
                 first {first_text:?} (sent by the client: {:?}), final {fin_text:?} \
                 (the client's: {:?})",
                String::from_utf8_lossy(&first),
                String::from_utf8_lossy(&fin)
            );
            assert!(
                client.finish(server_final.as_bytes()).is_ok(),
                "the client refused the server's signature"
            );
        }
        Err(e) => {
            assert!(
                !(untouched && right && fits),
                "the genuine exchange refused: {e}"
            );
            if untouched && fits {
                assert_eq!(e, AuthError::Failed, "a wrong password");
            }
        }
    }
}

/// The type OIDs `merge_values` picks from: what the merge compares,
/// groups, adds up or sends in binary, and a few it refuses.
const TYPES: &[u32] = &[
    16, 17, 19, 20, 21, 23, 25, 26, 114, 700, 701, 705, 1042, 1043, 1082, 1083, 1114, 1184, 1700,
    2950, 3802, 1186,
];

/// Target `merge_values`. The first byte picks the type; the rest holds
/// two text values split at the first NUL.
pub fn merge_values(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let oid = TYPES[usize::from(sel) % TYPES.len()];
    let ty = Ty::of(oid);
    let (a, b) = match rest.iter().position(|&c| c == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, rest),
    };
    let ab = value::compare(ty, a, b);
    let ba = value::compare(ty, b, a);
    if let (Ok(x), Ok(y)) = (&ab, &ba) {
        assert_eq!(
            *x,
            y.reverse(),
            "compare({a:?}, {b:?}) is not antisymmetric"
        );
    }
    if ab.is_ok() {
        assert_eq!(
            value::compare(ty, a, a),
            Ok(Ordering::Equal),
            "{a:?} not equal to itself"
        );
    }
    let (ka, kb) = (value::group_key(ty, a), value::group_key(ty, b));
    if ty == Ty::Numeric {
        // 1.0 and 1.00 (two shards' outputs) are one group.
        if let (Ok(Ordering::Equal), Ok(x), Ok(y)) = (&ab, &ka, &kb) {
            assert_eq!(x, y, "equal numerics {a:?} and {b:?} in two groups");
        }
    }
    let (sa, sb) = (std::str::from_utf8(a), std::str::from_utf8(b));
    // Oracles on canonical integer and float text (what PostgreSQL prints).
    if let (Ok(sa), Ok(sb)) = (sa, sb) {
        let int = |s: &str| s.parse::<i64>().ok().filter(|v| v.to_string() == s);
        if let (Some(x), Some(y)) = (int(sa), int(sb)) {
            if matches!(ty, Ty::Int | Ty::Numeric) {
                assert_eq!(ab, Ok(x.cmp(&y)), "compare({sa}, {sb})");
            }
            if let (Ok(p), Ok(q)) = (Num::parse(sa), Num::parse(sb)) {
                let sum = (i128::from(x) + i128::from(y)).to_string();
                assert_eq!(p.add(&q).to_text(), sum, "{sa} + {sb}");
                assert_eq!(p.cmp_num(&q), x.cmp(&y), "numeric {sa} vs {sb}");
            } else {
                panic!("{sa:?} or {sb:?} is not a numeric");
            }
        }
        if ty == Ty::Float {
            let float = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite());
            if let (Some(x), Some(y)) = (float(sa), float(sb)) {
                if let Some(o) = x.partial_cmp(&y) {
                    assert_eq!(ab, Ok(o), "compare({sa}, {sb})");
                }
            }
        }
        if let Ok(n) = Num::parse(sa) {
            // Numeric text round-trips through its own output.
            let t = n.to_text();
            let again = Num::parse(&t).unwrap_or_else(|e| panic!("{sa:?} -> {t:?}: {e}"));
            assert_eq!(again.to_text(), t, "{sa:?} -> {t:?}");
            assert_eq!(n.cmp_num(&again), Ordering::Equal, "{sa:?} -> {t:?}");
            if let Ok(m) = Num::parse(sb) {
                let _ = n.div_pg(&m);
                let _ = n.clone().canonical().to_text();
            }
        }
    }
    let bin = binary::to_binary(oid, a);
    if let (Ok(bin), Ok(s)) = (&bin, sa) {
        let want: Option<Vec<u8>> = match oid {
            21 => s.parse::<i16>().ok().map(|v| v.to_be_bytes().to_vec()),
            23 => s.parse::<i32>().ok().map(|v| v.to_be_bytes().to_vec()),
            20 => s.parse::<i64>().ok().map(|v| v.to_be_bytes().to_vec()),
            701 => s
                .parse::<f64>()
                .ok()
                .filter(|v| !v.is_nan())
                .map(|v| v.to_be_bytes().to_vec()),
            16 => match s {
                "t" => Some(vec![1]),
                "f" => Some(vec![0]),
                _ => None,
            },
            25 | 1043 => Some(a.to_vec()),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(&bin[..], &want[..], "binary of {s:?} (oid {oid})");
        }
    }
    if binary::supported(oid) {
        // Canonical values of the simple types always convert.
        if let Ok(s) = sa {
            let canonical = match oid {
                23 => s.parse::<i32>().is_ok_and(|v| v.to_string() == s),
                20 => s.parse::<i64>().is_ok_and(|v| v.to_string() == s),
                16 => s == "t" || s == "f",
                _ => false,
            };
            assert!(
                !canonical || bin.is_ok(),
                "{s:?} (oid {oid}) refused: {bin:?}"
            );
        }
    }
}

/// Target `backend`. The first byte chooses the chunk size (bits 0-4) and
/// the frame limit (bit 5); the rest is a shard's byte stream.
pub fn backend(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let step = match usize::from(sel & 0x1f) {
        0x1f => input.len().max(1),
        s => s + 1,
    };
    let max_len = if sel & 0x20 == 0 { 1024 } else { 1 << 20 };
    let mut r = FrameReader::new(Chunks { data: input, step }, max_len);
    loop {
        match ready(r.next()) {
            Ok(f) => check_backend(&f),
            Err(e) => return read_err("backend frame", e),
        }
    }
}

fn check_backend(f: &frame::Frame) {
    let body = f.body();
    match f.tag() {
        be::AUTHENTICATION => {
            if let Ok((code, rest)) = bk::auth_request(body) {
                assert_eq!(&body[..4], &code.to_be_bytes());
                match code {
                    frame::auth::MD5_PASSWORD => {
                        if let Ok(salt) = bk::md5_salt(rest) {
                            assert_eq!(&salt[..], &rest[..4]);
                        }
                    }
                    frame::auth::SASL => {
                        let mut again = BytesMut::new();
                        for m in bk::sasl_mechanisms(rest) {
                            assert!(!m.is_empty());
                            frame::put_cstr(&mut again, m);
                        }
                        assert!(rest.starts_with(&again), "SASL mechanisms re-encode");
                    }
                    _ => {}
                }
            }
        }
        be::PARAMETER_STATUS => {
            if let Ok((k, v)) = bk::parameter_status(body) {
                let mut again = BytesMut::new();
                frame::put_cstr(&mut again, &k);
                frame::put_cstr(&mut again, &v);
                assert!(body.starts_with(&again), "ParameterStatus re-encodes");
            }
        }
        be::BACKEND_KEY_DATA => {
            if let Ok((pid, secret)) = bk::backend_key_data(body) {
                assert_eq!(&body[..4], &pid.to_be_bytes());
                assert_eq!(&body[4..8], &secret.to_be_bytes());
            }
        }
        be::DATA_ROW => {
            let row = bk::data_row(&f.raw);
            let text = bk::text_data_row(body);
            assert_eq!(
                row.is_some(),
                text.is_ok(),
                "the two DataRow decoders disagree"
            );
            if let (Some(row), Ok(text)) = (row, text) {
                let mut again = BytesMut::new();
                again.put_i16(row.len() as i16);
                for (v, t) in row.iter().zip(&text) {
                    match v {
                        None => again.put_i32(-1),
                        Some(v) => {
                            again.put_i32(v.len() as i32);
                            again.put_slice(v);
                        }
                    }
                    assert_eq!(
                        v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        *t
                    );
                }
                assert!(body.starts_with(&again), "DataRow re-encodes");
            }
        }
        be::ROW_DESCRIPTION => {
            if let Some(fields) = bk::row_description(&f.raw) {
                let mut again = BytesMut::new();
                again.put_u16(fields.len() as u16);
                for fd in &fields {
                    again.put_slice(&fd.name);
                    again.put_u8(0);
                    again.put_slice(&fd.meta);
                    let _ = fd.type_oid();
                }
                assert!(body.starts_with(&again), "RowDescription re-encodes");
            }
        }
        be::NOTIFICATION_RESPONSE => {
            if let Some(c) = bk::notification_channel(body) {
                assert!(!c.contains('\0'));
            }
        }
        _ => {
            let (code, msg) = frame::parse_error_fields(body);
            assert!(!code.contains('\0') && !msg.contains('\0'));
        }
    }
}
