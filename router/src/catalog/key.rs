//! Shard-key types and values.
//!
//! [`KeyType`] is the PostgreSQL type of a sharded table's key column;
//! [`KeyValue`] is one parsed key. [`KeyValue::parse`] reads a key from its
//! PostgreSQL text form (a literal in a statement, a text-format parameter, a
//! `COPY` field) and accepts exactly what PostgreSQL 15's input function for
//! that type accepts (`int2in`, `int4in`, `int8in`, `textin`, `uuid_in`), so
//! a key hotrepart can route is a key the shard would accept and vice versa.
//! Errors carry PostgreSQL's wording and SQLSTATE.

use std::fmt;
use std::str::FromStr;

/// The type of a shard-key column. The set is closed on purpose: these are the
/// types whose PostgreSQL hash hotrepart reproduces bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyType {
    /// `smallint` / `int2`.
    Int2,
    /// `integer` / `int4`.
    Int4,
    /// `bigint` / `int8`.
    Int8,
    /// `text` in a deterministic collation, stored as UTF-8.
    Text,
    /// `uuid`.
    Uuid,
}

impl KeyType {
    /// All key types, in declaration order.
    pub const ALL: [KeyType; 5] = [
        KeyType::Int2,
        KeyType::Int4,
        KeyType::Int8,
        KeyType::Text,
        KeyType::Uuid,
    ];

    /// PostgreSQL's SQL name of the type, as used in error messages
    /// (`smallint`, `integer`, `bigint`, `text`, `uuid`).
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyType::Int2 => "smallint",
            KeyType::Int4 => "integer",
            KeyType::Int8 => "bigint",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    /// Name of the PostgreSQL function computing the 64-bit seeded hash of a
    /// value of this type (`hashint8extended`, …).
    pub fn pg_hash_function(self) -> &'static str {
        match self {
            KeyType::Int2 => "hashint2extended",
            KeyType::Int4 => "hashint4extended",
            KeyType::Int8 => "hashint8extended",
            KeyType::Text => "hashtextextended",
            KeyType::Uuid => "uuid_hash_extended",
        }
    }

    /// Whether this is one of the integer types. PostgreSQL hashes equal
    /// integer values equally whatever their width, so integer keys are
    /// interchangeable for routing.
    pub fn is_integer(self) -> bool {
        matches!(self, KeyType::Int2 | KeyType::Int4 | KeyType::Int8)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_name())
    }
}

/// Parsing a key type from a PostgreSQL type name failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported shard key type {0:?} (supported: smallint, integer, bigint, text, uuid)")]
pub struct UnknownKeyType(pub String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    /// Accepts PostgreSQL's names and aliases, case-insensitively:
    /// `smallint`/`int2`, `integer`/`int`/`int4`, `bigint`/`int8`, `text`,
    /// `uuid`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "smallint" | "int2" => Ok(KeyType::Int2),
            "integer" | "int" | "int4" => Ok(KeyType::Int4),
            "bigint" | "int8" => Ok(KeyType::Int8),
            "text" => Ok(KeyType::Text),
            "uuid" => Ok(KeyType::Uuid),
            _ => Err(UnknownKeyType(s.to_owned())),
        }
    }
}

/// One parsed shard-key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    /// A `smallint`.
    Int2(i16),
    /// An `integer`.
    Int4(i32),
    /// A `bigint`.
    Int8(i64),
    /// A `text` value (UTF-8).
    Text(String),
    /// A `uuid`, 16 bytes in network (textual) order.
    Uuid([u8; 16]),
}

impl KeyValue {
    /// The type this value is of.
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyValue::Int2(_) => KeyType::Int2,
            KeyValue::Int4(_) => KeyType::Int4,
            KeyValue::Int8(_) => KeyType::Int8,
            KeyValue::Text(_) => KeyType::Text,
            KeyValue::Uuid(_) => KeyType::Uuid,
        }
    }

    /// The value widened to `i64`, for integer values.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            KeyValue::Int2(v) => Some(i64::from(v)),
            KeyValue::Int4(v) => Some(i64::from(v)),
            KeyValue::Int8(v) => Some(v),
            KeyValue::Text(_) | KeyValue::Uuid(_) => None,
        }
    }

    /// Parses `text`, the PostgreSQL text form of a value of type `ty`,
    /// accepting exactly what PostgreSQL 15 accepts:
    ///
    /// * integers: optional leading/trailing whitespace, an optional `+`/`-`,
    ///   decimal digits (no `_`, no `0x`; those arrived in PostgreSQL 16);
    ///   values outside the type's range are [`KeyParseError::OutOfRange`];
    /// * text: any string without NUL;
    /// * uuid: 32 hex digits, either case, optionally in `{…}`, with an
    ///   optional `-` after any group of four digits; no whitespace.
    pub fn parse(ty: KeyType, text: &str) -> Result<KeyValue, KeyParseError> {
        match ty {
            KeyType::Int2 => parse_int::<i16>(ty, text).map(KeyValue::Int2),
            KeyType::Int4 => parse_int::<i32>(ty, text).map(KeyValue::Int4),
            KeyType::Int8 => parse_int::<i64>(ty, text).map(KeyValue::Int8),
            KeyType::Text => {
                if text.contains('\0') {
                    Err(KeyParseError::NulInText)
                } else {
                    Ok(KeyValue::Text(text.to_owned()))
                }
            }
            KeyType::Uuid => parse_uuid(text)
                .map(KeyValue::Uuid)
                .ok_or_else(|| invalid(ty, text)),
        }
    }
}

impl fmt::Display for KeyValue {
    /// The PostgreSQL text form (uuids in the canonical lowercase 8-4-4-4-12
    /// form, text unquoted).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int2(v) => write!(f, "{v}"),
            KeyValue::Int4(v) => write!(f, "{v}"),
            KeyValue::Int8(v) => write!(f, "{v}"),
            KeyValue::Text(s) => f.write_str(s),
            KeyValue::Uuid(b) => {
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl From<i16> for KeyValue {
    fn from(v: i16) -> Self {
        KeyValue::Int2(v)
    }
}

impl From<i32> for KeyValue {
    fn from(v: i32) -> Self {
        KeyValue::Int4(v)
    }
}

impl From<i64> for KeyValue {
    fn from(v: i64) -> Self {
        KeyValue::Int8(v)
    }
}

impl From<String> for KeyValue {
    fn from(v: String) -> Self {
        KeyValue::Text(v)
    }
}

impl From<&str> for KeyValue {
    fn from(v: &str) -> Self {
        KeyValue::Text(v.to_owned())
    }
}

impl From<[u8; 16]> for KeyValue {
    fn from(v: [u8; 16]) -> Self {
        KeyValue::Uuid(v)
    }
}

/// A key's text form is not a valid value of its type. The messages are
/// PostgreSQL's own, so they can be passed to the client unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// Not a value of the type at all (`"abc"` for `bigint`).
    #[error("invalid input syntax for type {}: \"{text}\"", .ty.sql_name())]
    InvalidSyntax {
        /// The type that was expected.
        ty: KeyType,
        /// The offending input.
        text: String,
    },
    /// A well-formed integer outside the type's range.
    #[error("value \"{text}\" is out of range for type {}", .ty.sql_name())]
    OutOfRange {
        /// The type that was expected.
        ty: KeyType,
        /// The offending input.
        text: String,
    },
    /// Text values cannot contain NUL bytes.
    #[error("invalid byte sequence for encoding \"UTF8\": 0x00")]
    NulInText,
}

impl KeyParseError {
    /// The SQLSTATE PostgreSQL reports for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // invalid_text_representation
            KeyParseError::InvalidSyntax { .. } => "22P02",
            // numeric_value_out_of_range
            KeyParseError::OutOfRange { .. } => "22003",
            // character_not_in_repertoire
            KeyParseError::NulInText => "22021",
        }
    }
}

fn invalid(ty: KeyType, text: &str) -> KeyParseError {
    KeyParseError::InvalidSyntax {
        ty,
        text: text.to_owned(),
    }
}

/// C `isspace` in the "C" locale, which is what PostgreSQL's integer input
/// skips around the number.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{0b}' | '\u{0c}')
}

fn parse_int<T>(ty: KeyType, text: &str) -> Result<T, KeyParseError>
where
    T: FromStr<Err = std::num::ParseIntError>,
{
    use std::num::IntErrorKind;
    let trimmed = text.trim_matches(is_c_space);
    // Rust's integer parser accepts exactly `[+-]?[0-9]+` (plus overflow
    // detection), which is PostgreSQL 15's grammar once whitespace is gone.
    trimmed.parse::<T>().map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => KeyParseError::OutOfRange {
            ty,
            text: text.to_owned(),
        },
        _ => invalid(ty, text),
    })
}

/// `uuid_in`'s grammar (PostgreSQL 15 `string_to_uuid`).
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let mut s = text.as_bytes();
    let braces = s.first() == Some(&b'{');
    if braces {
        s = &s[1..];
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        let (&hi, &lo) = (s.first()?, s.get(1)?);
        *byte = (hex_digit(hi)? << 4) | hex_digit(lo)?;
        s = &s[2..];
        if i % 2 == 1 && i < 15 && s.first() == Some(&b'-') {
            s = &s[1..];
        }
    }
    if braces {
        s = s.strip_prefix(b"}")?;
    }
    s.is_empty().then_some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: [u8; 16] = 0xa0eebc99_9c0b_4ef8_bb6d_6bb9bd380a11_u128.to_be_bytes();

    #[test]
    fn parses_what_postgres_accepts() {
        let ok: &[(KeyType, &str, KeyValue)] = &[
            (KeyType::Int2, "42", KeyValue::Int2(42)),
            (KeyType::Int2, " 42 ", KeyValue::Int2(42)),
            (KeyType::Int2, "+42", KeyValue::Int2(42)),
            (KeyType::Int2, "-0", KeyValue::Int2(0)),
            (KeyType::Int2, "\t7\n", KeyValue::Int2(7)),
            (KeyType::Int2, "-32768", KeyValue::Int2(i16::MIN)),
            (KeyType::Int2, "32767", KeyValue::Int2(i16::MAX)),
            (KeyType::Int4, "-2147483648", KeyValue::Int4(i32::MIN)),
            (KeyType::Int4, "007", KeyValue::Int4(7)),
            (
                KeyType::Int8,
                "9223372036854775807",
                KeyValue::Int8(i64::MAX),
            ),
            (
                KeyType::Int8,
                "-9223372036854775808",
                KeyValue::Int8(i64::MIN),
            ),
            (KeyType::Text, "", KeyValue::Text(String::new())),
            (KeyType::Text, " ключ ", KeyValue::Text(" ключ ".into())),
            (
                KeyType::Uuid,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                KeyValue::Uuid(U),
            ),
            (
                KeyType::Uuid,
                "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
                KeyValue::Uuid(U),
            ),
            (
                KeyType::Uuid,
                "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
                KeyValue::Uuid(U),
            ),
            (
                KeyType::Uuid,
                "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
                KeyValue::Uuid(U),
            ),
        ];
        for (ty, text, want) in ok {
            assert_eq!(
                KeyValue::parse(*ty, text).as_ref(),
                Ok(want),
                "{ty} {text:?}"
            );
        }
    }

    #[test]
    fn rejects_what_postgres_rejects() {
        let syntax: &[(KeyType, &str)] = &[
            (KeyType::Int8, "abc"),
            (KeyType::Int8, ""),
            (KeyType::Int8, " "),
            (KeyType::Int8, "-"),
            (KeyType::Int8, "+-1"),
            (KeyType::Int8, "1.0"),
            (KeyType::Int8, "1e3"),
            (KeyType::Int2, "4_2"),
            (KeyType::Int2, "0x10"),
            (KeyType::Int4, "1 2"),
            (KeyType::Uuid, " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 "),
            (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-"),
            (KeyType::Uuid, "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (KeyType::Uuid, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"),
            (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g"),
            (KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11aa"),
            (KeyType::Uuid, ""),
        ];
        for (ty, text) in syntax {
            let err = KeyValue::parse(*ty, text).expect_err(text);
            assert_eq!(
                err,
                KeyParseError::InvalidSyntax {
                    ty: *ty,
                    text: (*text).to_owned()
                }
            );
            assert_eq!(err.sqlstate(), "22P02");
        }
        let range: &[(KeyType, &str)] = &[
            (KeyType::Int2, "32768"),
            (KeyType::Int2, "-32769"),
            (KeyType::Int4, "2147483648"),
            (KeyType::Int8, "9223372036854775808"),
            (KeyType::Int8, " -99999999999999999999 "),
        ];
        for (ty, text) in range {
            let err = KeyValue::parse(*ty, text).expect_err(text);
            assert!(matches!(err, KeyParseError::OutOfRange { .. }), "{err}");
            assert_eq!(err.sqlstate(), "22003");
        }
        assert_eq!(
            KeyValue::parse(KeyType::Text, "a\0b"),
            Err(KeyParseError::NulInText)
        );
    }

    #[test]
    fn error_messages_match_postgres() {
        let e = KeyValue::parse(KeyType::Int8, "abc").expect_err("abc");
        assert_eq!(
            e.to_string(),
            "invalid input syntax for type bigint: \"abc\""
        );
        let e = KeyValue::parse(KeyType::Int2, "32768").expect_err("32768");
        assert_eq!(
            e.to_string(),
            "value \"32768\" is out of range for type smallint"
        );
    }

    #[test]
    fn display_round_trips() {
        for v in [
            KeyValue::Int2(-5),
            KeyValue::Int4(i32::MIN),
            KeyValue::Int8(i64::MAX),
            KeyValue::Text("héllo".into()),
            KeyValue::Uuid(U),
        ] {
            let text = v.to_string();
            assert_eq!(KeyValue::parse(v.key_type(), &text), Ok(v));
        }
        assert_eq!(
            KeyValue::Uuid(U).to_string(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
    }

    #[test]
    fn key_type_names() {
        for ty in KeyType::ALL {
            assert_eq!(ty.sql_name().parse::<KeyType>(), Ok(ty));
            assert_eq!(ty.to_string(), ty.sql_name());
        }
        assert_eq!("INT8".parse::<KeyType>(), Ok(KeyType::Int8));
        assert_eq!("int".parse::<KeyType>(), Ok(KeyType::Int4));
        assert!("numeric".parse::<KeyType>().is_err());
        assert!(KeyType::Int2.is_integer() && !KeyType::Uuid.is_integer());
    }
}
