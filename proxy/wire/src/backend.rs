//! The backend (server → node) messages the node decodes itself rather
//! than forwarding: the login exchange with a shard (Authentication
//! requests, ParameterStatus, BackendKeyData, ErrorResponse), the rows of
//! its own hidden queries, the shards' RowDescription and DataRow a merge
//! reads, and the channel of a NotificationResponse.
//!
//! Guarantee: a malformed body gives an error (`WireError::Protocol`) or
//! `None`, never a panic. (A row's or description's vector is sized by
//! the count the message claims, at most 65,535 entries, before the
//! entries are checked.)

use crate::frame::{get_cstr, get_i16, get_i32, WireError};
use bytes::{Buf, Bytes};

pub use crate::frame::parse_error_fields;

/// A row as the merge holds it: one value per column, `None` for NULL.
pub type Row = Vec<Option<Bytes>>;

/// One column of a shard's RowDescription.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Vec<u8>,
    /// table oid, attnum, type oid, typlen, typmod, format (18 bytes)
    pub meta: [u8; 18],
}

impl Field {
    pub fn type_oid(&self) -> u32 {
        u32::from_be_bytes([self.meta[6], self.meta[7], self.meta[8], self.meta[9]])
    }
}

/// A RowDescription's fields (`raw`: the whole frame); None when the
/// frame is malformed (a backend's bytes never panic the merge).
pub fn row_description(raw: &[u8]) -> Option<Vec<Field>> {
    let mut b = raw.get(5..)?;
    if b.len() < 2 {
        return None;
    }
    let n = b.get_u16();
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let end = b.iter().position(|&c| c == 0)?;
        let name = b[..end].to_vec();
        let meta: [u8; 18] = b.get(end + 1..end + 19)?.try_into().ok()?;
        out.push(Field { name, meta });
        b = &b[end + 19..];
    }
    Some(out)
}

/// A DataRow's values (`raw`: the whole frame); None when malformed (a
/// negative column count or a value length below -1 included: not an
/// empty row, not a NULL).
pub fn data_row(raw: &[u8]) -> Option<Row> {
    let mut b = raw.get(5..)?;
    if b.len() < 2 {
        return None;
    }
    let n = b.get_i16();
    if n < 0 {
        return None;
    }
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return None;
        }
        let len = b.get_i32();
        if len < -1 {
            return None;
        }
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return None;
            }
            row.push(Some(Bytes::copy_from_slice(&b[..len])));
            b.advance(len);
        }
    }
    Some(row)
}

/// A DataRow body of a query the node runs itself, its values as text
/// (invalid UTF-8 replaced).
pub fn text_data_row(b: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    text_data_row_in(b, |v| Ok(String::from_utf8_lossy(v).into_owned()))
}

/// [`text_data_row`] with each value read by `text` (a connection's
/// client encoding, `crate::encoding`).
pub fn text_data_row_in(
    mut b: &[u8],
    text: impl Fn(&[u8]) -> Result<String, WireError>,
) -> Result<Vec<Option<String>>, WireError> {
    let n = get_i16(&mut b)?;
    if n < 0 {
        return Err(WireError::Protocol(format!(
            "data row with a negative column count ({n})"
        )));
    }
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = get_i32(&mut b)?;
        if len < -1 {
            return Err(WireError::Protocol(format!(
                "data row with an invalid value length ({len})"
            )));
        }
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return Err(WireError::Protocol("short data row".into()));
            }
            row.push(Some(text(&b[..len])?));
            b.advance(len);
        }
    }
    Ok(row)
}

/// An Authentication message body: its request code, and what follows.
pub fn auth_request(mut b: &[u8]) -> Result<(i32, &[u8]), WireError> {
    let code = get_i32(&mut b)?;
    Ok((code, b))
}

/// The salt of an AuthenticationMD5Password (the body after the code).
pub fn md5_salt(b: &[u8]) -> Result<[u8; 4], WireError> {
    if b.len() < 4 {
        return Err(WireError::Protocol("short md5 salt".into()));
    }
    Ok([b[0], b[1], b[2], b[3]])
}

/// The mechanisms an AuthenticationSASL offers (the body after the code),
/// up to the empty name or the first malformed one.
pub fn sasl_mechanisms(mut b: &[u8]) -> Vec<&str> {
    let mut v = Vec::new();
    while let Ok(m) = get_cstr(&mut b) {
        if m.is_empty() {
            break;
        }
        v.push(m);
    }
    v
}

/// A ParameterStatus body: (name, value).
pub fn parameter_status(mut b: &[u8]) -> Result<(String, String), WireError> {
    let k = get_cstr(&mut b)?.to_string();
    let v = get_cstr(&mut b)?.to_string();
    Ok((k, v))
}

/// A BackendKeyData body: (process id, secret key).
pub fn backend_key_data(mut b: &[u8]) -> Result<(i32, i32), WireError> {
    let pid = get_i32(&mut b)?;
    let secret = get_i32(&mut b)?;
    Ok((pid, secret))
}

/// The channel a NotificationResponse body names (after the sender's pid).
pub fn notification_channel(body: &[u8]) -> Option<String> {
    let mut b = body.get(4..)?;
    get_cstr(&mut b).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `backend` fuzz target: a DataRow claiming -1 columns
    /// was taken for an empty row (the merge would have read its columns
    /// as NULLs) instead of being refused.
    #[test]
    fn a_negative_column_count_is_refused() {
        let frame = [b'D', 0, 0, 0, 6, 0xff, 0xff];
        assert!(data_row(&frame).is_none());
        assert!(matches!(
            text_data_row(&frame[5..]),
            Err(WireError::Protocol(m)) if m.contains("negative column count")
        ));
        // Zero columns is a real (empty) row.
        let empty = [b'D', 0, 0, 0, 6, 0, 0];
        assert_eq!(data_row(&empty), Some(Vec::new()));
        assert_eq!(text_data_row(&empty[5..]).ok(), Some(Vec::new()));
    }

    /// Found by the `backend` fuzz target: a value length below -1 (only
    /// -1 means NULL) was read as a NULL instead of being refused.
    #[test]
    fn a_value_length_below_minus_one_is_refused() {
        let frame = [b'D', 0, 0, 0, 10, 0, 1, 0xff, 0xff, 0x00, 0xff];
        assert!(data_row(&frame).is_none());
        assert!(matches!(
            text_data_row(&frame[5..]),
            Err(WireError::Protocol(m)) if m.contains("invalid value length")
        ));
        let null = [b'D', 0, 0, 0, 10, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&null), Some(vec![None]));
        assert_eq!(text_data_row(&null[5..]).ok(), Some(vec![None]));
    }
}
