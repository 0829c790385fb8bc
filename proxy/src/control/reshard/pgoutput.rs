//! Decoder for the `pgoutput` logical replication protocol, version 1, as
//! returned by `pg_logical_slot_peek_binary_changes` (one message per row of
//! the result). Pure: bytes in, [`Message`] out, no I/O.
//!
//! Guarantees: every message of protocol version 1 is either decoded or
//! reported as [`DecodeError`]; a truncated or malformed message never
//! panics. Messages the engine does not need (Origin, Type, logical
//! decoding Message) are decoded as [`Message::Other`] so that a new kind of
//! message is an error, not silently dropped.

use thiserror::Error;

/// pgoutput message tags (protocol version 1), as PostgreSQL's
/// "Logical Replication Message Formats" names them.
mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
}

/// Markers inside Insert/Update/Delete: which tuple follows.
mod tuple_marker {
    /// The new tuple.
    pub const NEW: u8 = b'N';
    /// The old tuple's replica-identity key columns.
    pub const KEY: u8 = b'K';
    /// The whole old tuple (REPLICA IDENTITY FULL).
    pub const OLD: u8 = b'O';
}

/// The kind of one column value inside a TupleData.
mod value_kind {
    pub const NULL: u8 = b'n';
    pub const UNCHANGED_TOAST: u8 = b'u';
    pub const TEXT: u8 = b't';
}

/// A malformed pgoutput message.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key sent as the old tuple).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

/// A table's description, sent before the first change of the table in a
/// decoding session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One column value of a tuple, in PostgreSQL's text output format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that the change left unchanged (not sent).
    Unchanged,
    Text(String),
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    /// `old` is the replica identity key ('K', only when it changed) or the
    /// whole old row ('O', REPLICA IDENTITY FULL); `None` when not sent.
    Update {
        rel: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Vec<Value>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Origin, Type, logical decoding Message: not needed by the engine.
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!(
                "truncated: wanted {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError("string is not UTF-8".into()))?
            .to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| DecodeError("negative column count".into()))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                value_kind::NULL => Value::Null,
                value_kind::UNCHANGED_TOAST => Value::Unchanged,
                value_kind::TEXT => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    Value::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|_| DecodeError("text value is not UTF-8".into()))?,
                    )
                }
                k => return Err(DecodeError(format!("unknown tuple value kind {k:#x}"))),
            });
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8()?;
    let msg = match tag {
        tag::BEGIN => {
            let final_lsn = r.u64()?;
            let _commit_ts = r.u64()?;
            let xid = r.u32()?;
            Message::Begin { final_lsn, xid }
        }
        tag::COMMIT => {
            let _flags = r.u8()?;
            let commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            let _ts = r.u64()?;
            Message::Commit {
                commit_lsn,
                end_lsn,
            }
        }
        tag::RELATION => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replident = r.u8()?;
            let n = r.i16()?;
            let n = usize::try_from(n).map_err(|_| DecodeError("negative column count".into()))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column {
                    key: flags & 1 != 0,
                    name,
                    type_oid,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                columns,
            })
        }
        tag::INSERT => {
            let rel = r.u32()?;
            match r.u8()? {
                tuple_marker::NEW => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                k => return Err(DecodeError(format!("insert: unexpected {k:#x}"))),
            }
        }
        tag::UPDATE => {
            let rel = r.u32()?;
            let (old, marker) = match r.u8()? {
                tuple_marker::KEY | tuple_marker::OLD => {
                    let old = r.tuple()?;
                    (Some(old), r.u8()?)
                }
                k => (None, k),
            };
            if marker != tuple_marker::NEW {
                return Err(DecodeError(format!("update: unexpected {marker:#x}")));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        tag::DELETE => {
            let rel = r.u32()?;
            match r.u8()? {
                tuple_marker::KEY | tuple_marker::OLD => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                k => return Err(DecodeError(format!("delete: unexpected {k:#x}"))),
            }
        }
        tag::TRUNCATE => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut rels = Vec::new();
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate { rels }
        }
        tag::ORIGIN | tag::TYPE | tag::MESSAGE => Message::Other(tag),
        t => return Err(DecodeError(format!("unknown message tag {t:#x}"))),
    };
    Ok(msg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(value_kind::NULL),
                Some("\u{0}toast") => b.push(value_kind::UNCHANGED_TOAST),
                Some(s) => {
                    b.push(value_kind::TEXT);
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_relation_and_changes() {
        let mut rel = vec![tag::RELATION];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0items\0d");
        rel.extend(2i16.to_be_bytes());
        rel.extend(b"\x01id\0");
        rel.extend(20u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.extend(b"\x00v\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.name, "items");
        assert!(r.columns[0].key && !r.columns[1].key);

        let mut ins = vec![tag::INSERT];
        ins.extend(16384u32.to_be_bytes());
        ins.push(tuple_marker::NEW);
        ins.extend(tuple(&[Some("7"), None]));
        assert_eq!(
            decode(&ins).unwrap(),
            Message::Insert {
                rel: 16384,
                new: vec![Value::Text("7".into()), Value::Null]
            }
        );

        let mut upd = vec![tag::UPDATE];
        upd.extend(16384u32.to_be_bytes());
        upd.push(tuple_marker::KEY);
        upd.extend(tuple(&[Some("7"), None]));
        upd.push(tuple_marker::NEW);
        upd.extend(tuple(&[Some("8"), Some("\u{0}toast")]));
        assert_eq!(
            decode(&upd).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("7".into()), Value::Null]),
                new: vec![Value::Text("8".into()), Value::Unchanged]
            }
        );

        let mut upd2 = vec![tag::UPDATE];
        upd2.extend(1u32.to_be_bytes());
        upd2.push(tuple_marker::NEW);
        upd2.extend(tuple(&[Some("1")]));
        assert!(matches!(
            decode(&upd2).unwrap(),
            Message::Update { old: None, .. }
        ));

        let mut tr = vec![tag::TRUNCATE];
        tr.extend(2u32.to_be_bytes());
        tr.push(0);
        tr.extend(1u32.to_be_bytes());
        tr.extend(2u32.to_be_bytes());
        assert_eq!(decode(&tr).unwrap(), Message::Truncate { rels: vec![1, 2] });
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut ins = vec![tag::INSERT];
        ins.extend(16384u32.to_be_bytes());
        ins.push(tuple_marker::NEW);
        ins.extend(tuple(&[Some("hello")]));
        for cut in 0..ins.len() {
            assert!(decode(&ins[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(b"Z").is_err());
    }
}
