//! The bulk copy of one table's range: `COPY (SELECT … WHERE <range>) TO
//! STDOUT (FORMAT binary)` on the source streamed, chunk by chunk and
//! unparsed, into `COPY … FROM STDIN (FORMAT binary)` on the target.
//!
//! Guarantees: the target's delete of the range and the whole copy are one
//! target transaction, so a crash leaves either the old state (re-run the
//! copy) or the full copy — never half a table. Memory is bounded by
//! tokio-postgres' buffers (a few KiB per side): rows are never collected.

use super::schema::TableInfo;
use super::{lock_job, quote_ident, sql, MoveSpec, ReshardError, Side};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

/// `progress` is called every this many rows.
const PROGRESS_ROWS: u64 = 1000;

/// Copies one table's range; `progress` gets the rows copied so far of this
/// table. Returns the number of rows copied.
pub(crate) async fn copy_table(
    spec: &MoveSpec,
    src: &Client,
    dst: &mut Client,
    info: &TableInfo,
    predicate: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ReshardError> {
    let cols: Vec<String> = info.copy_columns().map(|c| quote_ident(&c.name)).collect();
    let cols = cols.join(", ");
    let tx = dst
        .transaction()
        .await
        .map_err(sql(Side::Target, "BEGIN"))?;
    lock_job(&tx, spec).await?;
    let deleted = tx
        .execute(
            &format!("DELETE FROM {} WHERE {predicate}", info.qualified),
            &[],
        )
        .await
        .map_err(sql(
            Side::Target,
            format!("clearing the range of {}", info.name),
        ))?;
    if deleted > 0 {
        tracing::info!(table = %info.name, rows = deleted, "range rows of an earlier attempt deleted on the target");
    }
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {} ({cols}) FROM STDIN (FORMAT binary)",
            info.qualified
        ))
        .await
        .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
    let stream = src
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {} WHERE {predicate}) TO STDOUT (FORMAT binary)",
            info.qualified
        ))
        .await
        .map_err(sql(Side::Source, format!("COPY {} TO STDOUT", info.name)))?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut counter = RowCounter::default();
    let mut reported = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(sql(Side::Source, format!("COPY {} TO STDOUT", info.name)))?;
        counter.feed(&chunk);
        // feed, not send: send would flush every row as its own message.
        sink.feed(chunk)
            .await
            .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
        if counter.rows - reported >= PROGRESS_ROWS {
            reported = counter.rows;
            progress(reported);
        }
    }
    let n = sink
        .as_mut()
        .finish()
        .await
        .map_err(sql(Side::Target, format!("COPY {} FROM STDIN", info.name)))?;
    tx.commit().await.map_err(sql(
        Side::Target,
        format!("COMMIT of the copy of {}", info.name),
    ))?;
    Ok(n)
}

/// Counts the tuples of a binary COPY stream cut at arbitrary places (for
/// progress only; the exact count is COPY's own answer).
#[derive(Debug, Default)]
pub(crate) struct RowCounter {
    state: State,
    /// Partial fixed-size integer being read.
    buf: [u8; 4],
    have: usize,
    pub rows: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Skip `n` bytes, then go to `then`.
    Skip(usize, Next),
    /// Read the header extension length (4 bytes).
    ExtLen,
    /// Read a tuple's field count (2 bytes).
    Count,
    /// Read a field length (4 bytes); `left` fields remain including it.
    FieldLen(u16),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    ExtLen,
    Count,
    /// `left` fields remain after the skipped one.
    Field(u16),
}

impl Default for State {
    fn default() -> Self {
        // "PGCOPY\n\xff\r\n\0" (11 bytes) + flags (4 bytes).
        State::Skip(15, Next::ExtLen)
    }
}

impl RowCounter {
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Done => return,
                State::Skip(n, next) => {
                    let k = n.min(data.len());
                    data = &data[k..];
                    self.state = if k == n {
                        self.after(next)
                    } else {
                        State::Skip(n - k, next)
                    };
                }
                State::ExtLen | State::Count | State::FieldLen(_) => {
                    let want = if self.state == State::Count { 2 } else { 4 };
                    let k = (want - self.have).min(data.len());
                    self.buf[self.have..self.have + k].copy_from_slice(&data[..k]);
                    self.have += k;
                    data = &data[k..];
                    if self.have < want {
                        return;
                    }
                    self.have = 0;
                    self.state = match self.state {
                        State::ExtLen => {
                            let n = u32::from_be_bytes(self.buf) as usize;
                            State::Skip(n, Next::Count)
                        }
                        State::Count => {
                            let n = i16::from_be_bytes([self.buf[0], self.buf[1]]);
                            if n < 0 {
                                State::Done
                            } else {
                                self.rows += 1;
                                self.fields(n as u16)
                            }
                        }
                        State::FieldLen(left) => {
                            let len = i32::from_be_bytes(self.buf);
                            State::Skip(usize::try_from(len).unwrap_or(0), Next::Field(left - 1))
                        }
                        s => s,
                    };
                }
            }
        }
    }

    fn fields(&self, left: u16) -> State {
        if left == 0 {
            State::Count
        } else {
            State::FieldLen(left)
        }
    }

    fn after(&self, next: Next) -> State {
        match next {
            Next::ExtLen => State::ExtLen,
            Next::Count => State::Count,
            Next::Field(left) => self.fields(left),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut b = b"PGCOPY\n\xff\r\n\0".to_vec();
        b.extend(0u32.to_be_bytes());
        b.extend(4u32.to_be_bytes());
        b.extend(b"ext!");
        for r in rows {
            b.extend((r.len() as i16).to_be_bytes());
            for f in *r {
                match f {
                    None => b.extend((-1i32).to_be_bytes()),
                    Some(v) => {
                        b.extend((v.len() as i32).to_be_bytes());
                        b.extend(*v);
                    }
                }
            }
        }
        b.extend((-1i16).to_be_bytes());
        b
    }

    #[test]
    fn counts_rows_whatever_the_chunking() {
        let data = stream(&[
            &[Some(b"12345678"), None, Some(b"")],
            &[],
            &[Some(b"x"), Some(b"yyyyyyyyyyyyyyyyyyyyyyyyyy")],
        ]);
        for size in 1..data.len() {
            let mut c = RowCounter::default();
            for chunk in data.chunks(size) {
                c.feed(chunk);
            }
            assert_eq!(c.rows, 3, "chunk size {size}");
            assert_eq!(c.state, State::Done);
        }
    }
}
