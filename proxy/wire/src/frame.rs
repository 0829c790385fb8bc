//! Wire layer: PostgreSQL protocol frames as `Bytes`, and the few messages the
//! node itself has to write.
//!
//! The wire layer knows frames, not SQL. A [`FrameReader`] splits a byte stream
//! into whole frames (1-byte tag + 4-byte length + body) without decoding the
//! body; the session forwards those bytes untouched unless it has to look
//! inside (Parse/Bind/Describe/Close names, ReadyForQuery status).
//!
//! Guarantee: a frame longer than the configured maximum, or with a length
//! below 4, is reported as [`WireError::Protocol`], never read into memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frontend (client → server) message tags, as the protocol docs name them.
pub mod fe {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server → client) message tags, as the protocol docs name them.
pub mod be {
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const NO_DATA: u8 = b'n';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const AUTHENTICATION: u8 = b'R';
}

/// The transaction status a ReadyForQuery carries.
pub mod tx {
    /// Not in a transaction block.
    pub const IDLE: u8 = b'I';
    /// In a transaction block.
    pub const IN_TRANSACTION: u8 = b'T';
    /// In a failed transaction block (only ROLLBACK will do).
    pub const FAILED: u8 = b'E';
}

/// Codes of the untagged first packet a client sends (length, then code).
pub mod startup {
    /// StartupMessage for protocol 3.0.
    pub const PROTOCOL_3_0: i32 = 196_608;
    /// SSLRequest.
    pub const SSL_REQUEST: i32 = 80_877_103;
    /// GSSENCRequest.
    pub const GSSENC_REQUEST: i32 = 80_877_104;
    /// CancelRequest.
    pub const CANCEL_REQUEST: i32 = 80_877_102;
    /// The one-byte answer to SSLRequest/GSSENCRequest: go ahead.
    pub const ACCEPT: &[u8] = b"S";
    /// The one-byte answer to SSLRequest/GSSENCRequest: not supported.
    pub const REFUSE: &[u8] = b"N";
}

/// The request codes an Authentication message carries.
pub mod auth {
    /// AuthenticationOk.
    pub const OK: i32 = 0;
    /// AuthenticationCleartextPassword.
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    /// AuthenticationMD5Password (followed by a 4-byte salt).
    pub const MD5_PASSWORD: i32 = 5;
    /// AuthenticationSASL (followed by the mechanism names).
    pub const SASL: i32 = 10;
    /// AuthenticationSASLContinue.
    pub const SASL_CONTINUE: i32 = 11;
    /// AuthenticationSASLFinal.
    pub const SASL_FINAL: i32 = 12;
}

/// Field types inside an ErrorResponse or NoticeResponse body.
pub mod field {
    /// Severity, possibly localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (protocol 3.0, PostgreSQL 9.6+).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    /// SQLSTATE code.
    pub const CODE: u8 = b'C';
    /// Primary human-readable message.
    pub const MESSAGE: u8 = b'M';
}

/// What a Describe or Close names: a prepared statement, or a portal.
pub const STATEMENT: u8 = b'S';
/// See [`STATEMENT`].
pub const PORTAL: u8 = b'P';

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// One protocol frame: the whole message including tag and length.
#[derive(Debug, Clone)]
pub struct Frame {
    pub raw: Bytes,
}

impl Frame {
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }
    /// The message body after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Splits a stream into frames. Cancel-safe: `next()` keeps partial input in
/// its buffer, so dropping the future inside `select!` loses nothing.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(16 * 1024),
            max_len,
        }
    }

    pub fn with_buffer(inner: R, buf: BytesMut, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf,
            max_len,
        }
    }

    /// Changes the largest frame accepted (e.g. small before login).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Takes a whole frame out of the buffer if one is there.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(WireError::Protocol(format!("invalid message length {len}")));
        }
        if len > self.max_len {
            return Err(WireError::Protocol(format!(
                "message of {len} bytes exceeds the limit of {} bytes",
                self.max_len
            )));
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        let raw = self.buf.split_to(len + 1).freeze();
        Ok(Some(Frame { raw }))
    }

    /// True if a whole frame is already buffered (no read needed).
    pub fn has_frame(&self) -> bool {
        if self.buf.len() < 5 {
            return false;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        self.buf.len() > len
    }

    /// Reads until one whole frame is available. Cancel-safe.
    pub async fn next(&mut self) -> Result<Frame, WireError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    /// Reads a startup-phase packet (length-prefixed, no tag). Not cancel-safe
    /// in the middle of a packet; used only during the handshake.
    pub async fn next_startup(&mut self) -> Result<Bytes, WireError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if !(8..=10_000).contains(&len) {
                    return Err(WireError::Protocol(format!(
                        "invalid startup packet length {len}"
                    )));
                }
                if self.buf.len() >= len {
                    return Ok(self.buf.split_to(len).freeze());
                }
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    /// The read buffer's capacity (what it holds allocated).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes read but not yet consumed (for handing over to TLS etc.).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

/// The parameters of a StartupMessage body (after length and protocol
/// code): name/value pairs up to the empty name. Err: the words of the
/// protocol violation (SQLSTATE 08P01 at the caller).
pub fn parse_startup(mut b: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut v = Vec::new();
    loop {
        let k = get_cstr(&mut b).map_err(|e| e.to_string())?;
        if k.is_empty() {
            return Ok(v);
        }
        let val = get_cstr(&mut b).map_err(|e| e.to_string())?;
        v.push((k.to_string(), val.to_string()));
    }
}

/// Reads a NUL-terminated string from the front of `b`.
pub fn get_cstr<'a>(b: &mut &'a [u8]) -> Result<&'a str, WireError> {
    let pos = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| WireError::Protocol("missing string terminator".into()))?;
    let s = std::str::from_utf8(&b[..pos])
        .map_err(|_| WireError::Protocol("invalid UTF-8 in message".into()))?;
    *b = &b[pos + 1..];
    Ok(s)
}

pub fn get_i16(b: &mut &[u8]) -> Result<i16, WireError> {
    if b.len() < 2 {
        return Err(WireError::Protocol("message too short".into()));
    }
    Ok(b.get_i16())
}

pub fn get_i32(b: &mut &[u8]) -> Result<i32, WireError> {
    if b.len() < 4 {
        return Err(WireError::Protocol("message too short".into()));
    }
    Ok(b.get_i32())
}

/// Builds a frame: tag, length, body written by `f`.
pub fn frame(out: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    f(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Severity of an error sent by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// Writes an ErrorResponse.
pub fn error_response(out: &mut BytesMut, sev: Severity, code: &str, msg: &str) {
    error_response_bytes(out, sev, code, msg.as_bytes())
}

/// Writes an ErrorResponse whose message is already in the client's
/// encoding (see [`crate::encoding`]).
pub fn error_response_bytes(out: &mut BytesMut, sev: Severity, code: &str, msg: &[u8]) {
    let s = match sev {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    frame(out, be::ERROR_RESPONSE, |o| {
        o.put_u8(field::SEVERITY);
        put_cstr(o, s);
        o.put_u8(field::SEVERITY_NONLOCALIZED);
        put_cstr(o, s);
        o.put_u8(field::CODE);
        put_cstr(o, code);
        o.put_u8(field::MESSAGE);
        o.put_slice(msg);
        o.put_u8(0);
        o.put_u8(0);
    });
}

/// Writes a NoticeResponse (severity NOTICE) from the node.
pub fn notice_response(out: &mut BytesMut, code: &str, msg: &str) {
    frame(out, be::NOTICE_RESPONSE, |o| {
        o.put_u8(field::SEVERITY);
        put_cstr(o, "NOTICE");
        o.put_u8(field::SEVERITY_NONLOCALIZED);
        put_cstr(o, "NOTICE");
        o.put_u8(field::CODE);
        put_cstr(o, code);
        o.put_u8(field::MESSAGE);
        put_cstr(o, msg);
        o.put_u8(0);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    frame(out, be::READY_FOR_QUERY, |o| o.put_u8(status));
}

/// A RowDescription of text columns (type `text`, text format) named
/// `names`: what the node answers itself (EXPLAIN, the admin console).
pub fn text_row_description<S: AsRef<str>>(out: &mut BytesMut, names: &[S]) {
    frame(out, be::ROW_DESCRIPTION, |o| {
        o.put_i16(names.len() as i16);
        for n in names {
            put_cstr(o, n.as_ref());
            o.put_u32(0); // table oid
            o.put_i16(0); // column number
            o.put_u32(25); // text
            o.put_i16(-1);
            o.put_i32(-1);
            o.put_i16(0); // text format
        }
    });
}

/// A DataRow of text values (None: NULL).
pub fn text_data_row<S: AsRef<[u8]>>(out: &mut BytesMut, values: &[Option<S>]) {
    frame(out, be::DATA_ROW, |o| {
        o.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    o.put_i32(v.as_ref().len() as i32);
                    o.put_slice(v.as_ref());
                }
                None => o.put_i32(-1),
            }
        }
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    frame(out, be::PARAMETER_STATUS, |o| {
        put_cstr(o, name);
        put_cstr(o, value);
    });
}

pub fn auth_request(out: &mut BytesMut, code: i32, data: &[u8]) {
    frame(out, be::AUTHENTICATION, |o| {
        o.put_i32(code);
        o.put_slice(data);
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    frame(out, be::BACKEND_KEY_DATA, |o| {
        o.put_i32(pid);
        o.put_i32(secret);
    });
}

/// Simple fixed frames the node synthesises in place of a backend's answer.
pub fn parse_complete() -> Bytes {
    Bytes::from_static(&[be::PARSE_COMPLETE, 0, 0, 0, 4])
}
pub fn close_complete() -> Bytes {
    Bytes::from_static(&[be::CLOSE_COMPLETE, 0, 0, 0, 4])
}

/// Fields of an ErrorResponse/NoticeResponse body: (code, message).
pub fn parse_error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut msg = String::new();
    let mut b = body;
    while let Some((&t, rest)) = b.split_first() {
        if t == 0 {
            break;
        }
        b = rest;
        let Ok(v) = get_cstr(&mut b) else { break };
        match t {
            field::CODE => code = v.to_string(),
            field::MESSAGE => msg = v.to_string(),
            _ => {}
        }
    }
    (code, msg)
}

/// ReadyForQuery with `status`, as bytes.
pub fn rfq(status: u8) -> Bytes {
    let mut b = BytesMut::with_capacity(6);
    ready_for_query(&mut b, status);
    b.freeze()
}

/// CommandComplete with `tag`, as bytes.
pub fn command_complete(tag: &str) -> Bytes {
    let mut b = BytesMut::new();
    frame(&mut b, be::COMMAND_COMPLETE, |o| put_cstr(o, tag));
    b.freeze()
}

/// A Bind message's parameters: the part of its body after the portal and
/// statement names, read.
#[derive(Debug)]
pub struct BindValues<'a> {
    /// The parameter format codes as sent (none: all text; one: for all).
    pub formats: Vec<i16>,
    /// Each parameter's value (None: NULL).
    pub values: Vec<Option<&'a [u8]>>,
    /// What follows: the result format codes, as sent.
    pub results: &'a [u8],
}

impl<'a> BindValues<'a> {
    /// Reads `rest` (a Bind's body from its parameter formats on).
    pub fn parse(rest: &'a [u8]) -> Result<BindValues<'a>, WireError> {
        let mut b = rest;
        let nf = get_i16(&mut b)?.max(0) as usize;
        let mut formats = Vec::with_capacity(nf);
        for _ in 0..nf {
            formats.push(get_i16(&mut b)?);
        }
        let nv = get_i16(&mut b)?.max(0) as usize;
        let mut values = Vec::with_capacity(nv);
        for _ in 0..nv {
            let len = get_i32(&mut b)?;
            if len < 0 {
                values.push(None);
                continue;
            }
            let len = len as usize;
            if b.len() < len {
                return Err(WireError::Protocol("Bind message too short".into()));
            }
            values.push(Some(&b[..len]));
            b = &b[len..];
        }
        Ok(BindValues {
            formats,
            values,
            results: b,
        })
    }

    /// The format code of parameter `i` (0-based).
    pub fn format(&self, i: usize) -> i16 {
        match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => self.formats.get(i).copied().unwrap_or(0),
        }
    }

    /// Writes a Bind's body from its parameter formats on: `formats`,
    /// `values`, then `results`.
    pub fn put(out: &mut BytesMut, formats: &[i16], values: &[Option<&[u8]>], results: &[u8]) {
        out.put_i16(formats.len() as i16);
        for f in formats {
            out.put_i16(*f);
        }
        out.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.put_slice(v);
                }
                None => out.put_i32(-1),
            }
        }
        out.put_slice(results);
    }
}

/// A Bind's body from its parameter formats on (`rest`), keeping only the
/// parameters numbered (1-based) in `map`, in that order, with their format
/// codes. None when `rest` does not parse or lacks a parameter of `map`.
pub fn bind_params_subset(rest: &[u8], map: &[usize]) -> Option<Bytes> {
    let v = BindValues::parse(rest).ok()?;
    let mut values = Vec::with_capacity(map.len());
    let mut formats = Vec::with_capacity(map.len());
    for &n in map {
        values.push(*v.values.get(n.checked_sub(1)?)?);
        formats.push(v.format(n - 1));
    }
    let formats = match v.formats.len() {
        0 => Vec::new(),
        1 => v.formats.clone(),
        _ => formats,
    };
    let mut out = BytesMut::with_capacity(rest.len());
    BindValues::put(&mut out, &formats, &values, v.results);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_parameters_are_kept_by_number() {
        let mut rest = BytesMut::new();
        BindValues::put(
            &mut rest,
            &[1, 0, 1],
            &[Some(b"a"), None, Some(b"ccc")],
            &[0, 1, 0, 1],
        );
        let v = BindValues::parse(&rest).expect("parses");
        assert_eq!(v.values, vec![Some(&b"a"[..]), None, Some(&b"ccc"[..])]);
        assert_eq!((v.format(0), v.format(1), v.format(2)), (1, 0, 1));
        let sub = bind_params_subset(&rest, &[3, 1]).expect("subset");
        let s = BindValues::parse(&sub).expect("parses");
        assert_eq!(s.formats, vec![1, 1]);
        assert_eq!(s.values, vec![Some(&b"ccc"[..]), Some(&b"a"[..])]);
        assert_eq!(s.results, &[0, 1, 0, 1][..]);
        // One format code for all stays one.
        let mut one = BytesMut::new();
        BindValues::put(&mut one, &[1], &[Some(b"x"), Some(b"y")], &[0, 0]);
        let s = BindValues::parse(&bind_params_subset(&one, &[2]).expect("subset"))
            .expect("parses")
            .formats;
        assert_eq!(s, vec![1]);
        assert!(
            bind_params_subset(&rest, &[4]).is_none(),
            "no such parameter"
        );
        assert!(bind_params_subset(&rest, &[0]).is_none());
        assert!(
            BindValues::parse(&rest[..rest.len() - 6]).is_err(),
            "cut short"
        );
    }

    #[tokio::test]
    async fn splits_frames_across_reads() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, tx::IDLE);
        error_response(&mut out, Severity::Error, "0A000", "nope");
        let data = out.freeze();
        let (a, b) = data.split_at(3);
        let stream = tokio_test_stream(vec![a.to_vec(), b.to_vec()]);
        let mut r = FrameReader::new(stream, 1 << 20);
        let f1 = r.next().await.expect("frame");
        assert_eq!(f1.tag(), be::READY_FOR_QUERY);
        assert_eq!(f1.body(), b"I");
        let f2 = r.next().await.expect("frame");
        assert_eq!(f2.tag(), be::ERROR_RESPONSE);
        let (code, msg) = parse_error_fields(f2.body());
        assert_eq!((code.as_str(), msg.as_str()), ("0A000", "nope"));
        assert!(matches!(r.next().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn rejects_oversized_and_short_lengths() {
        let big = vec![fe::QUERY, 0, 1, 0, 0];
        let mut r = FrameReader::new(tokio_test_stream(vec![big]), 1024);
        assert!(matches!(r.next().await, Err(WireError::Protocol(_))));
        let short = vec![fe::QUERY, 0, 0, 0, 2];
        let mut r = FrameReader::new(tokio_test_stream(vec![short]), 1024);
        assert!(matches!(r.next().await, Err(WireError::Protocol(_))));
    }

    fn tokio_test_stream(chunks: Vec<Vec<u8>>) -> impl AsyncRead + Unpin {
        let all: Vec<u8> = chunks.concat();
        std::io::Cursor::new(all)
    }
}
