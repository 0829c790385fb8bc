//! Client encodings: the bytes a client sends in its `client_encoding`,
//! read as text by the node, and text the node writes turned back into
//! them.
//!
//! The node never converts what it only forwards: a backend runs with the
//! client's `client_encoding`, so PostgreSQL itself converts statements,
//! parameters, rows, COPY data and notices, as it would directly. The node
//! reads text in three places only — the strings of the client's protocol
//! messages (query text, statement and portal names: routing parses them),
//! text parameters it routes by, and the messages it writes itself — and
//! uses a [`ClientEncoding`] there: [`frame_to_utf8`] when a client frame
//! comes in, [`frames_from_utf8`] when frames go to a backend (the node's
//! own statements as well as forwarded ones: all of them in the backend's
//! encoding), [`ClientEncoding::decode`] for a parameter.
//!
//! Guarantee: a decoded string is exactly what PostgreSQL would read from
//! the same bytes, or an error (22021): the tables come from `encoding_rs`
//! (the WHATWG Encoding Standard's), and those whose mapping differs from
//! PostgreSQL's on any byte sequence PostgreSQL accepts are checked in the
//! integration tests against a real server (`tests/tests/it/encodings.rs`)
//! and left out (`Unsupported`: only ASCII messages pass). Re-encoding a
//! decoded frame gives back the client's bytes (checked for multi-byte
//! encodings, where a table may hold two byte sequences for one character),
//! so a forwarded statement reaches PostgreSQL byte for byte as sent.

use bytes::{BufMut, BytesMut};
use encoding_rs::Encoding;
use std::borrow::Cow;

/// How the node reads a session's `client_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEncoding {
    /// UTF8, and SQL_ASCII (no conversion: the server checks the bytes
    /// against its own encoding, UTF8 on the shards the node supports).
    Utf8,
    /// LATIN1 (ISO-8859-1): each byte is the character of that number.
    Latin1,
    /// LATIN5 (ISO-8859-9): WIN1254's letters, C1 controls at 0x80–0x9F.
    Latin5,
    /// A table of `encoding_rs`, and PostgreSQL's name of the encoding.
    Table(&'static Encoding, &'static str),
    /// An encoding the node cannot read (PostgreSQL's name): messages that
    /// are pure ASCII pass (the same bytes in every client encoding),
    /// others are refused.
    Unsupported(&'static str),
}

/// A byte sequence that is not text in the client's encoding, or a
/// character the client's encoding cannot hold; the message is
/// PostgreSQL's and the SQLSTATE its (22021 or 22P05).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodingError {
    pub code: &'static str,
    pub message: String,
}

/// PostgreSQL's names of the client encodings the node reads (besides
/// UTF8 and SQL_ASCII).
pub const SUPPORTED: &[&str] = &[
    "LATIN1",
    "LATIN2",
    "LATIN3",
    "LATIN4",
    "LATIN5",
    "LATIN6",
    "LATIN7",
    "LATIN8",
    "LATIN9",
    "LATIN10",
    "ISO_8859_5",
    "ISO_8859_6",
    "ISO_8859_7",
    "ISO_8859_8",
    "WIN866",
    "WIN874",
    "WIN1250",
    "WIN1251",
    "WIN1252",
    "WIN1253",
    "WIN1254",
    "WIN1255",
    "WIN1256",
    "WIN1257",
    "WIN1258",
    "KOI8R",
    "EUC_JP",
    "SJIS",
    "EUC_KR",
    "UHC",
    "GBK",
];

/// How many bytes PostgreSQL takes a character starting at `b[0]` to be
/// in encoding `name` (`pg_encoding_mblen`): what its "invalid byte
/// sequence" message shows.
fn pg_mblen(name: &str, b: &[u8]) -> usize {
    let Some(&lead) = b.first() else { return 0 };
    if lead < 0x80 {
        return 1;
    }
    match name {
        "UTF8" | "SQL_ASCII" => match lead {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        },
        "EUC_JP" => {
            if lead == 0x8f {
                3
            } else {
                2
            }
        }
        "SJIS" if (0xa1..=0xdf).contains(&lead) => 1,
        "GB18030" if b.get(1).is_some_and(|c| (0x30..=0x39).contains(c)) => 4,
        "SJIS" | "GB18030" | "EUC_KR" | "UHC" | "GBK" | "BIG5" | "EUC_CN" => 2,
        _ => 1,
    }
}

fn hex_seq(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|c| format!("0x{c:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl ClientEncoding {
    /// The reader of PostgreSQL's encoding `name` (as PostgreSQL names it:
    /// `UTF8`, `LATIN9`, `EUC_JP`…; other spellings are not recognised).
    pub fn for_name(name: &str) -> ClientEncoding {
        use encoding_rs as e;
        let t = |enc: &'static Encoding, n: &'static str| ClientEncoding::Table(enc, n);
        match name {
            "UTF8" | "SQL_ASCII" => ClientEncoding::Utf8,
            "LATIN1" => ClientEncoding::Latin1,
            "LATIN5" => ClientEncoding::Latin5,
            "LATIN2" => t(e::ISO_8859_2, "LATIN2"),
            "LATIN3" => t(e::ISO_8859_3, "LATIN3"),
            "LATIN4" => t(e::ISO_8859_4, "LATIN4"),
            "ISO_8859_5" => t(e::ISO_8859_5, "ISO_8859_5"),
            "ISO_8859_6" => t(e::ISO_8859_6, "ISO_8859_6"),
            "ISO_8859_7" => t(e::ISO_8859_7, "ISO_8859_7"),
            "ISO_8859_8" => t(e::ISO_8859_8, "ISO_8859_8"),
            "LATIN6" => t(e::ISO_8859_10, "LATIN6"),
            "LATIN7" => t(e::ISO_8859_13, "LATIN7"),
            "LATIN8" => t(e::ISO_8859_14, "LATIN8"),
            "LATIN9" => t(e::ISO_8859_15, "LATIN9"),
            "LATIN10" => t(e::ISO_8859_16, "LATIN10"),
            "WIN866" => t(e::IBM866, "WIN866"),
            "WIN874" => t(e::WINDOWS_874, "WIN874"),
            "WIN1250" => t(e::WINDOWS_1250, "WIN1250"),
            "WIN1251" => t(e::WINDOWS_1251, "WIN1251"),
            "WIN1252" => t(e::WINDOWS_1252, "WIN1252"),
            "WIN1253" => t(e::WINDOWS_1253, "WIN1253"),
            "WIN1254" => t(e::WINDOWS_1254, "WIN1254"),
            "WIN1255" => t(e::WINDOWS_1255, "WIN1255"),
            "WIN1256" => t(e::WINDOWS_1256, "WIN1256"),
            "WIN1257" => t(e::WINDOWS_1257, "WIN1257"),
            "WIN1258" => t(e::WINDOWS_1258, "WIN1258"),
            "KOI8R" => t(e::KOI8_R, "KOI8R"),
            "EUC_JP" => t(e::EUC_JP, "EUC_JP"),
            "SJIS" => t(e::SHIFT_JIS, "SJIS"),
            "EUC_KR" => t(e::EUC_KR, "EUC_KR"),
            "UHC" => t(e::EUC_KR, "UHC"),
            "GBK" => t(e::GBK, "GBK"),
            other => ClientEncoding::Unsupported(unsupported_name(other)),
        }
    }

    /// PostgreSQL's name of it.
    pub fn name(&self) -> &'static str {
        match self {
            ClientEncoding::Utf8 => "UTF8",
            ClientEncoding::Latin1 => "LATIN1",
            ClientEncoding::Latin5 => "LATIN5",
            ClientEncoding::Table(_, n) | ClientEncoding::Unsupported(n) => n,
        }
    }

    pub fn is_utf8(&self) -> bool {
        matches!(self, ClientEncoding::Utf8)
    }

    /// Whether comparing its bytes orders text as comparing UTF-8 bytes
    /// does (as PostgreSQL's C collation orders it on a UTF8 database).
    pub fn orders_as_utf8(&self) -> bool {
        matches!(self, ClientEncoding::Utf8 | ClientEncoding::Latin1)
    }

    /// `b` read as text. Err: 22021 (not text in this encoding), or 0A000
    /// (an encoding the node cannot read, and `b` is not ASCII).
    pub fn decode<'a>(&self, b: &'a [u8]) -> Result<Cow<'a, str>, EncodingError> {
        let invalid = |at: &[u8]| EncodingError {
            code: "22021",
            message: format!(
                "invalid byte sequence for encoding \"{}\": {}",
                self.name(),
                hex_seq(&at[..pg_mblen(self.name(), at).min(at.len())])
            ),
        };
        if self.is_utf8() {
            return std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|e| invalid(&b[e.valid_up_to()..]));
        }
        if b.is_ascii() {
            // ASCII is the same bytes in every client encoding, and UTF-8.
            if let Ok(s) = std::str::from_utf8(b) {
                return Ok(Cow::Borrowed(s));
            }
        }
        match self {
            ClientEncoding::Utf8 => unreachable!(),
            ClientEncoding::Latin1 => Ok(Cow::Owned(b.iter().map(|&c| char::from(c)).collect())),
            ClientEncoding::Latin5 => {
                let mut s = String::with_capacity(b.len() * 2);
                for &c in b {
                    if (0x80..=0x9f).contains(&c) {
                        s.push(char::from(c));
                    } else {
                        let one = [c];
                        let d = encoding_rs::WINDOWS_1254
                            .decode_without_bom_handling_and_without_replacement(&one)
                            .ok_or_else(|| invalid(&one))?;
                        s.push_str(&d);
                    }
                }
                Ok(Cow::Owned(s))
            }
            ClientEncoding::Table(enc, _) => {
                let s = enc
                    .decode_without_bom_handling_and_without_replacement(b)
                    .ok_or_else(|| invalid(first_invalid(enc, b)))?;
                if !enc.is_single_byte() {
                    // Two byte sequences for one character (a table's
                    // duplicates): the node could not send back what the
                    // client sent.
                    match self.encode(&s) {
                        Ok(back) if back.as_ref() == b => {}
                        _ => return Err(invalid(b)),
                    }
                }
                Ok(Cow::Owned(s.into_owned()))
            }
            ClientEncoding::Unsupported(n) => Err(EncodingError {
                code: "0A000",
                message: format!(
                    "client_encoding {n} is not supported by hotrepart for text beyond ASCII (the node reads statements to route them); use UTF8, or one of the encodings listed in the README"
                ),
            }),
        }
    }

    /// `s` in this encoding. Err: 22P05, a character it has no byte
    /// sequence for.
    pub fn encode<'a>(&self, s: &'a str) -> Result<Cow<'a, [u8]>, EncodingError> {
        if self.is_utf8() || s.is_ascii() {
            return Ok(Cow::Borrowed(s.as_bytes()));
        }
        let untranslatable = |c: char| {
            EncodingError {
            code: "22P05",
            message: format!(
                "character with byte sequence {} in encoding \"UTF8\" has no equivalent in encoding \"{}\"",
                hex_seq(c.encode_utf8(&mut [0; 4]).as_bytes()),
                self.name()
            ),
        }
        };
        match self {
            ClientEncoding::Utf8 => unreachable!(),
            ClientEncoding::Latin1 => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).map_err(|_| untranslatable(c)))
                .collect::<Result<Vec<u8>, _>>()
                .map(Cow::Owned),
            ClientEncoding::Latin5 => {
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    let u = u32::from(c);
                    if (0x80..=0x9f).contains(&u) {
                        out.push(u as u8);
                        continue;
                    }
                    let mut buf = [0u8; 4];
                    let b = table_encode(encoding_rs::WINDOWS_1254, c.encode_utf8(&mut buf))
                        .map_err(untranslatable)?;
                    // WIN1254's own letters at 0x80–0x9F (€ …) are not LATIN5's.
                    if b.len() != 1 || (0x80..=0x9f).contains(&b[0]) {
                        return Err(untranslatable(c));
                    }
                    out.push(b[0]);
                }
                Ok(Cow::Owned(out))
            }
            ClientEncoding::Table(enc, _) => {
                table_encode(enc, s).map(Cow::Owned).map_err(untranslatable)
            }
            ClientEncoding::Unsupported(_) => {
                let c = s.chars().find(|c| !c.is_ascii()).unwrap_or('?');
                Err(untranslatable(c))
            }
        }
    }

    /// `s` in this encoding, each character it cannot hold as `?` (for the
    /// node's own messages to the client).
    pub fn encode_lossy(&self, s: &str) -> Vec<u8> {
        if let Ok(b) = self.encode(s) {
            return b.into_owned();
        }
        let mut out = Vec::with_capacity(s.len());
        let mut buf = [0u8; 4];
        for c in s.chars() {
            match self.encode(c.encode_utf8(&mut buf)) {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => out.push(b'?'),
            }
        }
        out
    }
}

/// PostgreSQL's names of the encodings the node cannot read.
fn unsupported_name(name: &str) -> &'static str {
    match name {
        "EUC_TW" => "EUC_TW",
        "EUC_JIS_2004" => "EUC_JIS_2004",
        "SHIFT_JIS_2004" => "SHIFT_JIS_2004",
        "JOHAB" => "JOHAB",
        "MULE_INTERNAL" => "MULE_INTERNAL",
        // encoding_rs's tables differ from PostgreSQL's on characters that
        // exist in both (checked by tests/tests/it/encodings.rs): KOI8-U's
        // box drawing (it is KOI8-RU), GB18030's 2005 private-use
        // mappings, Big5-HKSCS against PostgreSQL's BIG5, GBK's middle
        // dot and dash against GB2312's.
        "KOI8U" => "KOI8U",
        "GB18030" => "GB18030",
        "BIG5" => "BIG5",
        "EUC_CN" => "EUC_CN",
        _ => "an unknown encoding",
    }
}

/// Where decoding `b` fails first (for the error message).
fn first_invalid<'a>(enc: &'static Encoding, b: &'a [u8]) -> &'a [u8] {
    let mut d = enc.new_decoder_without_bom_handling();
    let mut out = String::with_capacity(b.len() * 3 + 16);
    let mut at = 0;
    loop {
        let (r, read) = d.decode_to_string_without_replacement(&b[at..], &mut out, true);
        match r {
            encoding_rs::DecoderResult::Malformed(len, extra) => {
                let end = at + read;
                let start = end.saturating_sub(usize::from(len) + usize::from(extra));
                return &b[start..];
            }
            encoding_rs::DecoderResult::OutputFull => {
                at += read;
                out.reserve(b.len() * 3 + 16);
            }
            encoding_rs::DecoderResult::InputEmpty => return b,
        }
    }
}

fn table_encode(enc: &'static Encoding, s: &str) -> Result<Vec<u8>, char> {
    let mut e = enc.new_encoder();
    let mut out = Vec::with_capacity(s.len() + 16);
    let mut at = 0;
    loop {
        let (r, read) = e.encode_from_utf8_to_vec_without_replacement(&s[at..], &mut out, true);
        at += read;
        match r {
            encoding_rs::EncoderResult::InputEmpty => return Ok(out),
            encoding_rs::EncoderResult::OutputFull => out.reserve(s.len() - at + 16),
            encoding_rs::EncoderResult::Unmappable(c) => return Err(c),
        }
    }
}

/// The NUL-terminated string at the front of `b`, and what follows it.
fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}

/// How many strings lead the body of a frontend message with tag `tag`
/// (what the node reads as text); 0 for the others.
fn leading_strings(tag: u8, body: &[u8]) -> usize {
    use crate::frame::fe;
    match tag {
        fe::QUERY | fe::EXECUTE | fe::COPY_FAIL => 1,
        fe::PARSE | fe::BIND => 2,
        // Describe and Close: a type byte, then the name.
        fe::DESCRIBE | fe::CLOSE if !body.is_empty() => 1,
        _ => 0,
    }
}

/// What a string of a message becomes (None: unchanged).
type StringMap<'a> = dyn FnMut(&[u8]) -> Result<Option<Vec<u8>>, EncodingError> + 'a;

/// Re-frames `raw` (a whole frontend frame) with its leading strings
/// passed through `f`; None when no string changes.
fn transcode_frame(raw: &[u8], f: &mut StringMap<'_>) -> Result<Option<BytesMut>, EncodingError> {
    if raw.len() < 5 {
        return Ok(None);
    }
    let tag = raw[0];
    let body = &raw[5..];
    let n = leading_strings(tag, body);
    if n == 0 {
        return Ok(None);
    }
    let skip = usize::from(matches!(
        tag,
        crate::frame::fe::DESCRIBE | crate::frame::fe::CLOSE
    ));
    let mut rest = &body[skip..];
    // At most two strings (Parse, Bind): no allocation on the hot path.
    let mut parts: [Option<Vec<u8>>; 2] = [None, None];
    let mut strs: [&[u8]; 2] = [&[], &[]];
    for (part, st) in parts.iter_mut().zip(strs.iter_mut()).take(n) {
        // A malformed message is the session's to refuse, as it is.
        let Some((s, r)) = split_cstr(rest) else {
            return Ok(None);
        };
        *part = f(s)?;
        *st = s;
        rest = r;
    }
    if parts.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(raw.len() + 16);
    out.put_u8(tag);
    out.put_u32(0);
    out.put_slice(&body[..skip]);
    for (p, s) in parts.iter().zip(&strs).take(n) {
        out.put_slice(p.as_deref().unwrap_or(s));
        out.put_u8(0);
    }
    out.put_slice(rest);
    let len = u32::try_from(out.len() - 1).map_err(|_| EncodingError {
        code: "54000",
        message: "message too long".into(),
    })?;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(Some(out))
}

/// A client frame's strings (query text, statement and portal names,
/// CopyFail's message) as UTF-8: None when they already are (always so
/// in a UTF-8 session, where they are only checked). Parameter values and
/// COPY data are not touched.
pub fn frame_to_utf8(enc: ClientEncoding, raw: &[u8]) -> Result<Option<BytesMut>, EncodingError> {
    transcode_frame(raw, &mut |s| match enc.decode(s)? {
        Cow::Borrowed(_) => Ok(None),
        Cow::Owned(t) => Ok(Some(t.into_bytes())),
    })
}

/// Frames for a backend (a run of whole frontend frames, as written to
/// it) with their strings in `enc`; borrowed when nothing changes.
pub fn frames_from_utf8(enc: ClientEncoding, buf: &[u8]) -> Result<Cow<'_, [u8]>, EncodingError> {
    if enc.is_utf8() {
        return Ok(Cow::Borrowed(buf));
    }
    let mut out: Option<Vec<u8>> = None;
    let mut at = 0;
    while at + 5 <= buf.len() {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        let end = (at + 1 + len).min(buf.len());
        let frame = &buf[at..end];
        let changed = transcode_frame(frame, &mut |s| {
            // Not UTF-8: bytes the client sent that the node did not read
            // (a CopyFail during COPY), already in its encoding.
            let Ok(t) = std::str::from_utf8(s) else {
                return Ok(None);
            };
            match enc.encode(t)? {
                Cow::Borrowed(_) => Ok(None),
                Cow::Owned(b) => Ok(Some(b)),
            }
        })?;
        match (changed, &mut out) {
            (Some(f), o) => o
                .get_or_insert_with(|| buf[..at].to_vec())
                .extend_from_slice(&f),
            (None, Some(o)) => o.extend_from_slice(frame),
            (None, None) => {}
        }
        at = end;
    }
    Ok(match out {
        Some(mut o) => {
            o.extend_from_slice(&buf[at..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(buf),
    })
}

/// A NotificationResponse (read as UTF-8 by the node's listening
/// connection) with its channel and payload in the client's encoding; a
/// character it cannot hold becomes `?`. Unchanged when `enc` is UTF-8 or
/// the frame is not one the node can read.
pub fn notification_for(enc: ClientEncoding, raw: &[u8]) -> Cow<'_, [u8]> {
    if enc.is_utf8() || raw.len() < 9 || raw[9..].is_ascii() {
        return Cow::Borrowed(raw);
    }
    let body = &raw[9..];
    let Some((channel, rest)) = split_cstr(body) else {
        return Cow::Borrowed(raw);
    };
    let Some((payload, _)) = split_cstr(rest) else {
        return Cow::Borrowed(raw);
    };
    let (Ok(channel), Ok(payload)) = (std::str::from_utf8(channel), std::str::from_utf8(payload))
    else {
        return Cow::Borrowed(raw);
    };
    let mut out = Vec::with_capacity(raw.len() + 8);
    out.extend_from_slice(&raw[..9]);
    out.extend_from_slice(&enc.encode_lossy(channel));
    out.push(0);
    out.extend_from_slice(&enc.encode_lossy(payload));
    out.push(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::fe;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn latin9_round_trips_and_reads_the_euro_sign() {
        let e = ClientEncoding::for_name("LATIN9");
        let b = b"SELECT '\xa4 \xe9t\xe9'";
        let s = e.decode(b).expect("ok");
        assert_eq!(s, "SELECT '€ été'");
        assert_eq!(e.encode(&s).expect("ok").as_ref(), b);
        assert_eq!(e.encode("ā").expect_err("an error").code, "22P05");
    }

    #[test]
    fn notifications_reach_the_client_in_its_encoding() {
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice("canal\0caf\u{e9} \u{3042}\0".as_bytes());
        let n = {
            let mut v = vec![b'A'];
            v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            v.extend_from_slice(&body);
            v
        };
        let out = notification_for(ClientEncoding::for_name("LATIN9"), &n);
        let mut want = vec![b'A', 0, 0, 0, 21];
        want.extend_from_slice(&42i32.to_be_bytes());
        want.extend_from_slice(b"canal\0caf\xe9 ?\0");
        assert_eq!(out.as_ref(), &want[..]);
        assert_eq!(notification_for(ClientEncoding::Utf8, &n).as_ref(), &n[..]);
    }

    #[test]
    fn latin1_and_latin5_keep_c1_controls() {
        let l1 = ClientEncoding::for_name("LATIN1");
        assert_eq!(l1.decode(b"\x80\xff").expect("ok"), "\u{80}\u{ff}");
        let l5 = ClientEncoding::for_name("LATIN5");
        assert_eq!(l5.decode(b"\x80\xf0").expect("ok"), "\u{80}ğ");
        assert_eq!(l5.encode("\u{80}ğ").expect("ok").as_ref(), b"\x80\xf0");
        assert_eq!(l5.encode("€").expect_err("an error").code, "22P05");
    }

    #[test]
    fn utf8_sessions_are_checked_not_copied() {
        let e = ClientEncoding::Utf8;
        let q = frame(fe::QUERY, "SELECT 'ż'\0".as_bytes());
        assert!(frame_to_utf8(e, &q).expect("ok").is_none());
        let bad = frame(fe::QUERY, b"SELECT '\xe9'\0");
        let err = frame_to_utf8(e, &bad).expect_err("an error");
        assert_eq!(err.code, "22021");
        assert!(err.message.contains("\"UTF8\": 0xe9"), "{}", err.message);
    }

    #[test]
    fn frames_turn_to_utf8_and_back_byte_for_byte() {
        let e = ClientEncoding::for_name("EUC_JP");
        // Parse "s1", "SELECT 'あ'", one parameter type.
        let mut body = b"s1\0SELECT '\xa4\xa2'\0".to_vec();
        body.extend_from_slice(&[0, 1, 0, 0, 0, 25]);
        let p = frame(fe::PARSE, &body);
        let u = frame_to_utf8(e, &p).expect("ok").expect("ok");
        let mut want = "s1\0SELECT 'あ'\0".as_bytes().to_vec();
        want.extend_from_slice(&[0, 1, 0, 0, 0, 25]);
        assert_eq!(&u[..], &frame(fe::PARSE, &want)[..]);
        // With a Bind whose value is left alone, and a Sync.
        let mut batch = u.to_vec();
        let bind = frame(fe::BIND, b"\0s1\0\0\0\0\x01\0\0\0\x02\xa4\xa2\0\0");
        batch.extend_from_slice(&bind);
        batch.extend_from_slice(&frame(fe::SYNC, b""));
        // A CopyFail read during COPY (not decoded by the node): as sent.
        let fail = frame(fe::COPY_FAIL, b"abandon \xa4\xa2 \xff\0");
        batch.extend_from_slice(&fail);
        let back = frames_from_utf8(e, &batch).expect("ok");
        let mut sent = p.clone();
        sent.extend_from_slice(&bind);
        sent.extend_from_slice(&frame(fe::SYNC, b""));
        sent.extend_from_slice(&fail);
        assert_eq!(back.as_ref(), &sent[..]);
    }

    /// What the node reads it writes back byte for byte (a forwarded
    /// frame reaches PostgreSQL as the client sent it), for random bytes in
    /// every supported encoding; nothing panics.
    #[test]
    fn what_is_read_is_written_back_byte_for_byte() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_e4c0);
        let alphabet: Vec<u8> = (0x20..0x7f).chain(0x80..=0xff).collect();
        for &name in SUPPORTED.iter().chain(&["UTF8", "EUC_TW"]) {
            let e = ClientEncoding::for_name(name);
            let mut read = 0;
            for _ in 0..3000 {
                let n = rng.random_range(0..10);
                let b: Vec<u8> = (0..n)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .filter(|&c| c != 0)
                    .collect();
                if let Ok(s) = e.decode(&b) {
                    read += 1;
                    assert_eq!(
                        e.encode(&s).expect("encodes").as_ref(),
                        &b[..],
                        "{name} {b:02x?}"
                    );
                    let mut body = b.clone();
                    body.push(0);
                    let q = frame(fe::QUERY, &body);
                    let u = frame_to_utf8(e, &q)
                        .expect("reads")
                        .map_or(q.clone(), |f| f.to_vec());
                    assert_eq!(
                        frames_from_utf8(e, &u).expect("writes").as_ref(),
                        &q[..],
                        "{name}"
                    );
                }
            }
            assert!(read > 100 || name == "EUC_TW", "{name}: only {read} read");
        }
    }

    #[test]
    fn bad_bytes_and_unreadable_encodings_are_errors_not_guesses() {
        let e = ClientEncoding::for_name("EUC_JP");
        let err = e.decode(b"SELECT '\xa4'").expect_err("an error");
        assert_eq!(err.code, "22021");
        // PostgreSQL's words: the character's bytes as far as it reads it.
        assert_eq!(
            err.message,
            "invalid byte sequence for encoding \"EUC_JP\": 0xa4 0x27"
        );
        let tw = ClientEncoding::for_name("EUC_TW");
        assert_eq!(tw.decode(b"SELECT 1").expect("ok"), "SELECT 1");
        assert_eq!(
            tw.decode(b"SELECT '\xa4\xa1'").expect_err("an error").code,
            "0A000"
        );
    }
}
