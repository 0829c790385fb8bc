//! The bulk copy of one table's range: `COPY … TO STDOUT (FORMAT binary)` on
//! the source, filtered row by row in Rust, streamed into `COPY … FROM STDIN
//! (FORMAT binary)` on the target.
//!
//! Which rows move is decided by [`MoveSpec::contains`] — the router's own
//! code, built-in hashing or a WebAssembly function alike — on the shard key
//! decoded from each tuple of the binary stream ([`RowFilter`]). When the
//! table's function has an SQL form (built-in hashing) the source runs
//! `COPY (SELECT … WHERE <range>)` so that it sends only the range's rows;
//! that predicate is a pre-filter only, the decision is still the Rust one.
//!
//! Guarantees: the target's delete of the range and the whole copy are one
//! target transaction, so a crash leaves either the old state (re-run the
//! copy) or the full copy — never half a table. Memory is bounded: rows are
//! never collected; the filter holds at most the start of one undecided
//! tuple (its fields up to the shard key) plus one block of kept tuples
//! (about [`BLOCK_BYTES`]) on its way to the target.

use super::schema::TableInfo;
use super::{lock_job, sql, MoveSpec, ReshardError, Side, TableMove};
use crate::sql::quote_ident;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hotrepart_router::catalog::{KeyType, KeyValue};
use tokio_postgres::Client;

/// `progress` is called every this many rows.
const PROGRESS_ROWS: u64 = 1000;

/// Kept tuples are sent to the target in blocks of about this size.
const BLOCK_BYTES: usize = 64 * 1024;

/// Copies one table's range; `progress` gets the rows copied so far of this
/// table. `keys` is a second target connection (it reads the keys of the
/// range rows of an earlier attempt, deleted first). Returns the number of
/// rows copied.
pub(crate) async fn copy_table(
    spec: &MoveSpec,
    t: &TableMove,
    src: &Client,
    dst: &mut Client,
    keys: &Client,
    info: &TableInfo,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ReshardError> {
    let cols: Vec<String> = info.copy_columns().map(|c| quote_ident(&c.name)).collect();
    let key_field = info
        .copy_columns()
        .position(|c| c.name == info.key_column)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| ReshardError::Table {
            table: info.name.clone(),
            problem: format!("shard key column {:?} is not copied", info.key_column),
        })?;
    let cols = cols.join(", ");
    let tx = dst
        .transaction()
        .await
        .map_err(sql(Side::Target, "BEGIN"))?;
    lock_job(&tx, spec).await?;
    let deleted = super::delete_range(spec, t, Side::Target, keys, &tx, super::DELETE_BATCH)
        .await
        .map_err(|e| match e {
            ReshardError::Sql { side, source, .. } => ReshardError::Sql {
                side,
                what: format!("clearing the range of {}", info.name),
                source,
            },
            e => e,
        })?;
    if deleted > 0 {
        tracing::info!(table = %info.name, rows = deleted, "range rows of an earlier attempt deleted on the target");
    }
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY {} ({cols}) FROM STDIN (FORMAT binary)",
            info.qualified
        ))
        .await
        .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
    let out = match spec.prefilter(t) {
        Some(p) => format!(
            "COPY (SELECT {cols} FROM {} WHERE {p}) TO STDOUT (FORMAT binary)",
            info.qualified
        ),
        None => format!("COPY {} ({cols}) TO STDOUT (FORMAT binary)", info.qualified),
    };
    let stream = src
        .copy_out(&out)
        .await
        .map_err(sql(Side::Source, format!("COPY {} TO STDOUT", info.name)))?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut decide = |field: Option<&[u8]>| -> Result<bool, ReshardError> {
        // A NULL key has no point: it is in no range.
        let Some(bytes) = field else {
            return Ok(false);
        };
        let key = decode_key(t.key_type, bytes).map_err(|problem| ReshardError::Table {
            table: t.name.clone(),
            problem: format!("shard key in the COPY stream: {problem}"),
        })?;
        spec.contains(t, &key)
    };
    let mut filter = RowFilter::new(key_field);
    let mut reported = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(sql(Side::Source, format!("COPY {} TO STDOUT", info.name)))?;
        filter
            .feed(&chunk, &mut decide)
            .map_err(|e| stream_error(info, e))?;
        if let Some(block) = filter.take_ready(BLOCK_BYTES) {
            // feed, not send: send would flush every block as its own write.
            sink.feed(block)
                .await
                .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
        }
        if filter.kept - reported >= PROGRESS_ROWS {
            reported = filter.kept;
            progress(reported);
        }
    }
    if !filter.done() {
        return Err(stream_error(
            info,
            ReshardError::Server {
                side: Side::Source,
                problem: "the binary COPY stream ended before its trailer".into(),
            },
        ));
    }
    if let Some(block) = filter.take_ready(0) {
        sink.feed(block)
            .await
            .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
    }
    let n = sink
        .as_mut()
        .finish()
        .await
        .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
    spec.guard.check(spec, Side::Target)?;
    tx.commit().await.map_err(sql(
        Side::Target,
        format!("COMMIT of the copy of {}", info.name),
    ))?;
    tracing::debug!(table = %info.name, read = filter.rows, kept = filter.kept, "copy filtered");
    Ok(n)
}

fn stream_error(info: &TableInfo, e: ReshardError) -> ReshardError {
    match e {
        ReshardError::Server { problem, .. } => ReshardError::Table {
            table: info.name.clone(),
            problem,
        },
        e => e,
    }
}

/// A shard key from its PostgreSQL binary form (the `*send` functions):
/// integers big-endian, text as UTF-8 bytes, uuid as its 16 bytes.
pub(crate) fn decode_key(ty: KeyType, b: &[u8]) -> Result<KeyValue, String> {
    let width = |n: usize| {
        if b.len() == n {
            Ok(())
        } else {
            Err(format!(
                "a {} key of {} bytes (expected {n})",
                ty.sql_name(),
                b.len()
            ))
        }
    };
    Ok(match ty {
        KeyType::Int2 => {
            width(2)?;
            KeyValue::Int2(i16::from_be_bytes([b[0], b[1]]))
        }
        KeyType::Int4 => {
            width(4)?;
            KeyValue::Int4(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        KeyType::Int8 => {
            width(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            KeyValue::Int8(i64::from_be_bytes(a))
        }
        KeyType::Text => KeyValue::Text(
            std::str::from_utf8(b)
                .map_err(|_| "a text key that is not UTF-8".to_owned())?
                .to_owned(),
        ),
        KeyType::Uuid => {
            width(16)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            KeyValue::Uuid(a)
        }
    })
}

/// Filters the tuples of a binary COPY stream cut at arbitrary places:
/// forwards the header, the trailer and each tuple for which `decide` (given
/// the shard-key field, `None` when NULL) says yes, byte for byte.
///
/// The bytes of a tuple are forwarded as they arrive once its key is
/// decided; until then they wait in the output (from the tuple's start),
/// which [`RowFilter::take_ready`] never hands out.
#[derive(Debug)]
pub(crate) struct RowFilter {
    /// Index of the shard-key field in each tuple.
    key_field: u16,
    state: State,
    /// Partial fixed-size part being read (the header is the longest).
    buf: [u8; HEADER],
    have: usize,
    /// The shard-key field being read.
    key: Vec<u8>,
    out: BytesMut,
    /// Start in `out` of the tuple whose key is not decided yet.
    pending: Option<usize>,
    /// Whether the bytes being read go to `out` (not: the rest of a dropped
    /// tuple).
    forward: bool,
    /// Tuples read.
    pub rows: u64,
    /// Tuples kept.
    pub kept: u64,
}

/// Whether a tuple is kept, given its shard-key field (`None`: NULL).
pub(crate) type Decide<'a> = dyn FnMut(Option<&[u8]>) -> Result<bool, ReshardError> + 'a;

/// "PGCOPY\n\xff\r\n\0", then flags (4 bytes) and the header extension's
/// length (4 bytes).
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
const HEADER: usize = 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The fixed header.
    Header,
    /// Pass `n` bytes, then read field `next` of `of` (or the next tuple
    /// when `next == of`).
    Skip { n: usize, next: u16, of: u16 },
    /// A tuple's field count (2 bytes).
    Count,
    /// The length of field `i` of `of` (4 bytes).
    FieldLen { i: u16, of: u16 },
    /// `n` more bytes of the key field, field `i` of `of`.
    Key { n: usize, i: u16, of: u16 },
    /// After the trailer.
    Done,
}

impl RowFilter {
    pub(crate) fn new(key_field: u16) -> RowFilter {
        RowFilter {
            key_field,
            state: State::Header,
            buf: [0; HEADER],
            have: 0,
            key: Vec::new(),
            out: BytesMut::with_capacity(BLOCK_BYTES * 2),
            pending: None,
            forward: true,
            rows: 0,
            kept: 0,
        }
    }

    /// Whether the trailer was read.
    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// The forwarded bytes of decided tuples, once there are at least `min`
    /// (and at least one).
    pub(crate) fn take_ready(&mut self, min: usize) -> Option<Bytes> {
        let end = self.pending.unwrap_or(self.out.len());
        if end == 0 || end < min {
            return None;
        }
        if let Some(p) = self.pending.as_mut() {
            *p -= end;
        }
        Some(self.out.split_to(end).freeze())
    }

    fn bad(problem: String) -> ReshardError {
        ReshardError::Server {
            side: Side::Source,
            problem: format!("malformed binary COPY stream: {problem}"),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.forward {
            self.out.extend_from_slice(bytes);
        }
    }

    /// The state that reads field `i` of `of`, or the next tuple.
    fn field(&mut self, i: u16, of: u16) -> State {
        if i < of {
            State::FieldLen { i, of }
        } else {
            // A new tuple (or the trailer) starts: undecided, forwarded for
            // now.
            self.forward = true;
            self.pending = Some(self.out.len());
            State::Count
        }
    }

    fn resolve(&mut self, keep: bool) {
        if keep {
            self.kept += 1;
        } else {
            if let Some(p) = self.pending {
                self.out.truncate(p);
            }
            self.forward = false;
        }
        self.pending = None;
    }

    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        decide: &mut Decide<'_>,
    ) -> Result<(), ReshardError> {
        while !data.is_empty() {
            match self.state {
                State::Done => return Err(Self::bad("data after the trailer".into())),
                State::Skip { n, next, of } => {
                    let k = n.min(data.len());
                    self.emit(&data[..k]);
                    data = &data[k..];
                    self.state = if k == n {
                        self.field(next, of)
                    } else {
                        State::Skip { n: n - k, next, of }
                    };
                }
                State::Key { n, i, of } => {
                    let k = n.min(data.len());
                    self.key.extend_from_slice(&data[..k]);
                    self.emit(&data[..k]);
                    data = &data[k..];
                    if k == n {
                        let keep = decide(Some(&self.key))?;
                        self.resolve(keep);
                        self.state = self.field(i + 1, of);
                    } else {
                        self.state = State::Key { n: n - k, i, of };
                    }
                }
                State::Header | State::Count | State::FieldLen { .. } => {
                    let want = match self.state {
                        State::Header => HEADER,
                        State::Count => 2,
                        _ => 4,
                    };
                    let k = (want - self.have).min(data.len());
                    self.buf[self.have..self.have + k].copy_from_slice(&data[..k]);
                    self.emit(&data[..k]);
                    self.have += k;
                    data = &data[k..];
                    if self.have < want {
                        return Ok(());
                    }
                    self.have = 0;
                    self.state = self.fixed(decide)?;
                }
            }
        }
        Ok(())
    }

    /// The state after a complete fixed-size part in `buf`.
    fn fixed(&mut self, decide: &mut Decide<'_>) -> Result<State, ReshardError> {
        let b = self.buf;
        Ok(match self.state {
            State::Header => {
                if &b[..11] != SIGNATURE {
                    return Err(Self::bad("no PGCOPY signature".into()));
                }
                let ext = u32::from_be_bytes([b[15], b[16], b[17], b[18]]) as usize;
                // The header is not a tuple: always forwarded.
                State::Skip {
                    n: ext,
                    next: 0,
                    of: 0,
                }
            }
            State::Count => {
                let n = i16::from_be_bytes([b[0], b[1]]);
                if n == -1 {
                    self.pending = None;
                    State::Done
                } else if n < 0 || (n as u16) <= self.key_field {
                    return Err(Self::bad(format!(
                        "a tuple of {n} fields, the shard key is field {}",
                        self.key_field + 1
                    )));
                } else {
                    self.rows += 1;
                    self.field(0, n as u16)
                }
            }
            State::FieldLen { i, of } => {
                let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if len < -1 {
                    return Err(Self::bad(format!("field length {len}")));
                }
                let n = usize::try_from(len).unwrap_or(0);
                if i == self.key_field {
                    if len <= 0 {
                        // NULL or empty: decided on the length alone.
                        let keep = decide(if len == 0 { Some(&[]) } else { None })?;
                        self.resolve(keep);
                        self.field(i + 1, of)
                    } else {
                        self.key.clear();
                        State::Key { n, i, of }
                    }
                } else {
                    State::Skip { n, next: i + 1, of }
                }
            }
            s => s,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend(0u32.to_be_bytes());
        b.extend(4u32.to_be_bytes());
        b.extend(b"ext!");
        b
    }

    fn tuple(r: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (r.len() as i16).to_be_bytes().to_vec();
        for f in r {
            match f {
                None => b.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(*v);
                }
            }
        }
        b
    }

    fn stream(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut b = header();
        for r in rows {
            b.extend(tuple(r));
        }
        b.extend((-1i16).to_be_bytes());
        b
    }

    #[test]
    fn filters_rows_whatever_the_chunking() {
        let big = vec![b'z'; 300];
        let rows: Vec<Vec<Option<&[u8]>>> = vec![
            vec![Some(b"1"), None, Some(b"")],
            vec![Some(b"x"), Some(b"keep"), Some(&big)],
            vec![Some(b"x"), None, Some(b"null key")],
            vec![Some(b""), Some(b"drop"), Some(&big)],
            vec![Some(b"y"), Some(b""), Some(b"empty key")],
            vec![Some(&big), Some(b"keep too"), None],
            vec![Some(b"y"), Some(b"dropped"), Some(b"")],
        ];
        let refs: Vec<&[Option<&[u8]>]> = rows.iter().map(|r| r.as_slice()).collect();
        let data = stream(&refs);
        // Keep keys that start with "keep" or are empty.
        let keep = |k: Option<&[u8]>| k.is_some_and(|k| k.is_empty() || k.starts_with(b"keep"));
        let kept: Vec<&[Option<&[u8]>]> = refs.iter().copied().filter(|r| keep(r[1])).collect();
        let want = stream(&kept);
        for size in 1..=data.len() {
            let mut f = RowFilter::new(1);
            let mut got = Vec::new();
            let mut seen = Vec::new();
            for chunk in data.chunks(size) {
                f.feed(chunk, &mut |k| {
                    seen.push(k.map(|k| k.to_vec()));
                    Ok(keep(k))
                })
                .unwrap();
                if let Some(b) = f.take_ready(if size % 2 == 0 { 0 } else { 100 }) {
                    got.extend_from_slice(&b);
                }
            }
            assert!(f.done(), "chunk size {size}");
            if let Some(b) = f.take_ready(0) {
                got.extend_from_slice(&b);
            }
            assert_eq!(got, want, "chunk size {size}");
            assert_eq!((f.rows, f.kept), (7, 3), "chunk size {size}");
            assert_eq!(seen.len(), 7, "one decision per row: chunk size {size}");
        }
    }

    #[test]
    fn refuses_malformed_streams() {
        let mut keep = |_: Option<&[u8]>| Ok(true);
        let mut f = RowFilter::new(0);
        assert!(f
            .feed(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0", &mut keep)
            .is_err());
        // A tuple too short to hold the key.
        let mut f = RowFilter::new(2);
        let mut data = header();
        data.extend(tuple(&[Some(b"a"), Some(b"b")]));
        assert!(f.feed(&data, &mut keep).is_err());
        // Data after the trailer.
        let mut f = RowFilter::new(0);
        let mut data = stream(&[]);
        data.push(0);
        assert!(f.feed(&data, &mut keep).is_err());
        // A stream cut short is not done.
        let mut f = RowFilter::new(0);
        let data = stream(&[&[Some(b"k")]]);
        f.feed(&data[..data.len() - 1], &mut keep).unwrap();
        assert!(!f.done());
    }

    #[test]
    fn decision_errors_stop_the_copy() {
        let mut f = RowFilter::new(0);
        let data = stream(&[&[Some(b"k")]]);
        let e = f.feed(&data, &mut |_| Err(ReshardError::Spec("no".into())));
        assert!(e.is_err());
    }

    #[test]
    fn keys_from_binary() {
        assert_eq!(
            decode_key(KeyType::Int2, &[0xff, 0xfe]),
            Ok(KeyValue::Int2(-2))
        );
        assert_eq!(
            decode_key(KeyType::Int4, &7i32.to_be_bytes()),
            Ok(KeyValue::Int4(7))
        );
        assert_eq!(
            decode_key(KeyType::Int8, &(-9i64).to_be_bytes()),
            Ok(KeyValue::Int8(-9))
        );
        assert_eq!(
            decode_key(KeyType::Text, "ü-1".as_bytes()),
            Ok(KeyValue::Text("ü-1".into()))
        );
        let u: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(decode_key(KeyType::Uuid, &u), Ok(KeyValue::Uuid(u)));
        assert!(decode_key(KeyType::Int8, &[1, 2, 3, 4]).is_err());
        assert!(decode_key(KeyType::Uuid, &[0; 15]).is_err());
        assert!(decode_key(KeyType::Text, &[0xff, 0xfe]).is_err());
    }
}
