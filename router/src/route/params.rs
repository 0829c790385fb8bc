//! Bind parameters as the client sent them, and their decoding into keys.
//!
//! Text format goes through [`KeyValue::parse`] (PostgreSQL's input
//! functions). Binary format is decoded from the parameter's type OID when
//! the client gave one, else from the key type and the length (PostgreSQL
//! infers the parameter's type from the key column in that case, so the
//! length is that type's).

use crate::catalog::{KeyType, KeyValue};

use super::RouteError;

/// PostgreSQL type OIDs the router decodes.
mod oid {
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const INT8: u32 = 20;
    pub const TEXT: u32 = 25;
    pub const VARCHAR: u32 = 1043;
    pub const BPCHAR: u32 = 1042;
    pub const NAME: u32 = 19;
    pub const UUID: u32 = 2950;
    pub const UNKNOWN: u32 = 705;
    pub const NUMERIC: u32 = 1700;
}

/// Wire format of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamFormat {
    /// Format code 0.
    Text,
    /// Format code 1.
    Binary,
}

/// One Bind parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    /// The bytes, `None` for SQL NULL.
    pub value: Option<&'a [u8]>,
    /// Text or binary.
    pub format: ParamFormat,
    /// The type OID from Parse, if the client specified one (0 = unspecified
    /// is the same as `None`).
    pub type_oid: Option<u32>,
    /// How text in `value` reads when the client's encoding is not UTF-8
    /// (text format, and the characters of a binary text value); `None`:
    /// the bytes are UTF-8.
    pub decoder: Option<TextDecoder<'a>>,
}

/// Reads a client's bytes as text in its `client_encoding`: `Err` holds
/// PostgreSQL's words for bytes that are not text in it.
#[derive(Clone, Copy)]
pub struct TextDecoder<'a>(pub &'a (dyn Fn(&[u8]) -> Result<String, String> + Sync));

impl std::fmt::Debug for TextDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextDecoder")
    }
}

impl PartialEq for TextDecoder<'_> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(self.0, other.0)
    }
}

impl Eq for TextDecoder<'_> {}

impl<'a> Param<'a> {
    /// A text-format value of unspecified type.
    pub fn text(value: &'a str) -> Param<'a> {
        Param {
            value: Some(value.as_bytes()),
            format: ParamFormat::Text,
            type_oid: None,
            decoder: None,
        }
    }

    /// A text-format number (type `numeric`, as a numeric literal is
    /// read: comparable with an integer key, not with a text one).
    pub fn numeric_text(value: &'a str) -> Param<'a> {
        Param {
            value: Some(value.as_bytes()),
            format: ParamFormat::Text,
            type_oid: Some(oid::NUMERIC),
            decoder: None,
        }
    }

    /// A binary-format value with an optional type OID.
    pub fn binary(value: &'a [u8], type_oid: Option<u32>) -> Param<'a> {
        Param {
            value: Some(value),
            format: ParamFormat::Binary,
            type_oid,
            decoder: None,
        }
    }

    /// SQL NULL.
    pub fn null() -> Param<'a> {
        Param {
            value: None,
            format: ParamFormat::Text,
            type_oid: None,
            decoder: None,
        }
    }

    fn oid(&self) -> Option<u32> {
        self.type_oid.filter(|&o| o != 0)
    }
}

fn bad(i: usize, what: impl std::fmt::Display) -> RouteError {
    RouteError {
        sqlstate: "22P03",
        message: format!("parameter ${}: {what}", i + 1),
    }
}

fn text_of<'b>(
    p: &Param<'_>,
    bytes: &'b [u8],
    i: usize,
) -> Result<std::borrow::Cow<'b, str>, RouteError> {
    if let Some(d) = p.decoder {
        if !bytes.is_ascii() {
            return (d.0)(bytes)
                .map(std::borrow::Cow::Owned)
                .map_err(|m| RouteError {
                    sqlstate: "22021",
                    message: format!("parameter ${}: {m}", i + 1),
                });
        }
    }
    std::str::from_utf8(bytes)
        .map(std::borrow::Cow::Borrowed)
        .map_err(|_| RouteError {
            sqlstate: "22021",
            message: format!(
                "parameter ${}: invalid byte sequence for encoding \"UTF8\"",
                i + 1
            ),
        })
}

fn parse_err(e: crate::catalog::KeyParseError) -> RouteError {
    RouteError {
        sqlstate: e.sqlstate(),
        message: e.to_string(),
    }
}

/// The key type a binary value of type `oid` decodes as, checked against the
/// key column's type `ty`.
fn binary_type(oid: Option<u32>, ty: KeyType, len: usize, i: usize) -> Result<KeyType, RouteError> {
    let from_oid = match oid {
        None | Some(oid::UNKNOWN) => None,
        Some(oid::INT2) => Some(KeyType::Int2),
        Some(oid::INT4) => Some(KeyType::Int4),
        Some(oid::INT8) => Some(KeyType::Int8),
        Some(oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME) => Some(KeyType::Text),
        Some(oid::UUID) => Some(KeyType::Uuid),
        Some(other) => {
            return Err(RouteError::unsupported(format!(
                "parameter ${} has type OID {other}, which cannot be a {} shard key",
                i + 1,
                ty
            )))
        }
    };
    let t = match from_oid {
        Some(t) => t,
        None if ty.is_integer() => match len {
            2 => KeyType::Int2,
            4 => KeyType::Int4,
            8 => KeyType::Int8,
            n => return Err(bad(i, format!("binary integer of {n} bytes"))),
        },
        None => ty,
    };
    let ok = t == ty || (t.is_integer() && ty.is_integer());
    if !ok {
        return Err(RouteError::unsupported(format!(
            "parameter ${} of type {t} cannot be compared with a {ty} shard key",
            i + 1
        )));
    }
    Ok(t)
}

fn decode_binary(
    p: &Param<'_>,
    bytes: &[u8],
    t: KeyType,
    i: usize,
) -> Result<KeyValue, RouteError> {
    let fixed = |n: usize| -> Result<&[u8], RouteError> {
        if bytes.len() == n {
            Ok(bytes)
        } else {
            Err(bad(
                i,
                format!(
                    "insufficient data left in message (binary {t} needs {n} bytes, got {})",
                    bytes.len()
                ),
            ))
        }
    };
    Ok(match t {
        KeyType::Int2 => {
            let b = fixed(2)?;
            KeyValue::Int2(i16::from_be_bytes([b[0], b[1]]))
        }
        KeyType::Int4 => {
            let b = fixed(4)?;
            KeyValue::Int4(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        KeyType::Int8 => {
            let b = fixed(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            KeyValue::Int8(i64::from_be_bytes(a))
        }
        KeyType::Uuid => {
            let b = fixed(16)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            KeyValue::Uuid(a)
        }
        KeyType::Text => {
            KeyValue::parse(KeyType::Text, &text_of(p, bytes, i)?).map_err(parse_err)?
        }
    })
}

/// Decodes parameter `i` as a key for a column of type `ty`; `None` for NULL.
pub(super) fn decode_key(
    p: &Param<'_>,
    ty: KeyType,
    i: usize,
) -> Result<Option<KeyValue>, RouteError> {
    let Some(bytes) = p.value else {
        return Ok(None);
    };
    match p.format {
        ParamFormat::Text => {
            // The server parses the text with the parameter's type; for an
            // integer parameter of another width the value is the same.
            let t = match p.oid() {
                // PostgreSQL has no operator comparing a number with a
                // text or uuid column: the server refuses such a
                // statement, the router does not pretend to route it.
                Some(oid::INT2 | oid::INT4 | oid::INT8 | oid::NUMERIC) if !ty.is_integer() => {
                    return Err(RouteError::unsupported(format!(
                        "parameter ${} of a numeric type cannot be compared with a {ty} shard key",
                        i + 1
                    )))
                }
                Some(oid::INT2) if ty.is_integer() => KeyType::Int2,
                Some(oid::INT4) if ty.is_integer() => KeyType::Int4,
                Some(oid::INT8) if ty.is_integer() => KeyType::Int8,
                _ => ty,
            };
            KeyValue::parse(t, &text_of(p, bytes, i)?)
                .map(Some)
                .map_err(parse_err)
        }
        ParamFormat::Binary => {
            let t = binary_type(p.oid(), ty, bytes.len(), i)?;
            decode_binary(p, bytes, t, i).map(Some)
        }
    }
}

/// Decodes parameter `i`, an array, into keys of type `ty` (None elements
/// are NULLs). NULL arrays hold no key.
pub(super) fn decode_array(
    p: &Param<'_>,
    ty: KeyType,
    i: usize,
) -> Result<Vec<Option<KeyValue>>, RouteError> {
    let Some(bytes) = p.value else {
        return Ok(Vec::new());
    };
    match p.format {
        ParamFormat::Text => {
            let elems = parse_text_array(&text_of(p, bytes, i)?).map_err(|m| bad(i, m))?;
            elems
                .into_iter()
                .map(|e| match e {
                    None => Ok(None),
                    Some(t) => KeyValue::parse(ty, &t).map(Some).map_err(parse_err),
                })
                .collect()
        }
        ParamFormat::Binary => decode_binary_array(p, bytes, ty, i),
    }
}

fn decode_binary_array(
    p: &Param<'_>,
    bytes: &[u8],
    ty: KeyType,
    i: usize,
) -> Result<Vec<Option<KeyValue>>, RouteError> {
    let mut pos = 0usize;
    let next_i32 = |pos: &mut usize| -> Result<i32, RouteError> {
        let b = bytes
            .get(*pos..*pos + 4)
            .ok_or_else(|| bad(i, "truncated binary array"))?;
        *pos += 4;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let ndim = next_i32(&mut pos)?;
    let _has_nulls = next_i32(&mut pos)?;
    let elem_oid = next_i32(&mut pos)? as u32;
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if ndim != 1 {
        return Err(RouteError::unsupported(format!(
            "parameter ${}: {ndim}-dimensional array of shard keys",
            i + 1
        )));
    }
    let len = next_i32(&mut pos)?;
    let _lbound = next_i32(&mut pos)?;
    let len = usize::try_from(len).map_err(|_| bad(i, "negative array length"))?;
    let mut out = Vec::with_capacity(len.min(1024));
    for _ in 0..len {
        let n = next_i32(&mut pos)?;
        if n < 0 {
            out.push(None);
            continue;
        }
        let n = n as usize;
        let el = bytes
            .get(pos..pos + n)
            .ok_or_else(|| bad(i, "truncated binary array"))?;
        pos += n;
        let t = binary_type(Some(elem_oid), ty, n, i)?;
        out.push(Some(decode_binary(p, el, t, i)?));
    }
    if pos != bytes.len() {
        return Err(bad(i, "trailing bytes after binary array"));
    }
    Ok(out)
}

/// Parses a one-dimensional array literal in PostgreSQL's text form
/// (`{1,2,"a b",NULL}`); `None` elements are NULLs.
pub(super) fn parse_text_array(s: &str) -> Result<Vec<Option<String>>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(|| format!("malformed array literal: \"{s}\""))?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        let mut el = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => el.push(c),
                        None => return Err(format!("malformed array literal: \"{s}\"")),
                    },
                    Some(c) => el.push(c),
                    None => return Err(format!("malformed array literal: \"{s}\"")),
                }
            }
            while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => break,
                    '{' | '}' | '"' => {
                        return Err(format!(
                            "malformed array literal: \"{s}\" (nested or quoted-in-the-middle arrays are not supported)"
                        ))
                    }
                    '\\' => {
                        chars.next();
                        match chars.next() {
                            Some(c) => el.push(c),
                            None => return Err(format!("malformed array literal: \"{s}\"")),
                        }
                    }
                    _ => {
                        el.push(c);
                        chars.next();
                    }
                }
            }
            let trimmed = el
                .trim_end_matches(|c: char| c.is_ascii_whitespace())
                .to_owned();
            el = trimmed;
        }
        if !quoted && el.eq_ignore_ascii_case("null") {
            out.push(None);
        } else if !quoted && el.is_empty() {
            return Err(format!("malformed array literal: \"{s}\""));
        } else {
            out.push(Some(el));
        }
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return Err(format!("malformed array literal: \"{s}\"")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays() {
        let s = |v: &[Option<&str>]| -> Vec<Option<String>> {
            v.iter().map(|o| o.map(str::to_owned)).collect()
        };
        assert_eq!(
            parse_text_array("{1,2, 3}"),
            Ok(s(&[Some("1"), Some("2"), Some("3")]))
        );
        assert_eq!(parse_text_array("{}"), Ok(vec![]));
        assert_eq!(
            parse_text_array(r#"{"a b",NULL,"NULL","x\"y"}"#),
            Ok(s(&[Some("a b"), None, Some("NULL"), Some("x\"y")]))
        );
        assert!(parse_text_array("{{1},{2}}").is_err());
        assert!(parse_text_array("1,2").is_err());
        assert!(parse_text_array("{1,,2}").is_err());
    }

    #[test]
    fn binary_array() {
        let mut b = Vec::new();
        for v in [1i32, 0, 20, 1, 1] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&42i64.to_be_bytes());
        let p = Param::binary(&b, None);
        assert_eq!(
            decode_array(&p, KeyType::Int8, 0),
            Ok(vec![Some(KeyValue::Int8(42))])
        );
        assert!(decode_array(&Param::binary(&b[..10], None), KeyType::Int8, 0).is_err());
    }

    #[test]
    fn binary_scalars() {
        let seven = 7i32.to_be_bytes();
        let p = Param::binary(&seven, None);
        assert_eq!(
            decode_key(&p, KeyType::Int8, 0),
            Ok(Some(KeyValue::Int4(7)))
        );
        let p = Param::binary(&seven, Some(oid::INT8));
        assert!(decode_key(&p, KeyType::Int8, 0).is_err());
        let p = Param::binary(b"abc", Some(oid::TEXT));
        assert!(decode_key(&p, KeyType::Int8, 0).is_err());
        assert_eq!(
            decode_key(&Param::binary(b"abc", None), KeyType::Text, 0),
            Ok(Some(KeyValue::Text("abc".into())))
        );
        assert_eq!(decode_key(&Param::null(), KeyType::Text, 0), Ok(None));
    }
}
