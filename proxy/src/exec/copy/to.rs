//! `COPY … TO STDOUT` from every shard, concatenated into one stream.

use super::*;
use crate::error::sqlstate;
use crate::error::SessionError;
use crate::routing::Decision;
use crate::session::conn::Session;
use crate::wire::be;
use crate::wire::{self, WireError};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::route::copy::{CopyFormat, CopyPlan};
use postgres_protocol::message::frontend;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Keeps one shard's COPY TO data as the client must see it in the
/// concatenation: the binary file header of the first shard only, no
/// trailers (the node sends one at the end), the header line of the first
/// shard only.
pub(super) struct OutFilter {
    binary: bool,
    first: bool,
    drop_first_message: bool,
    head: Vec<u8>,
    head_done: bool,
    carry: Vec<u8>,
}

impl OutFilter {
    fn new(plan: &CopyPlan, first: bool) -> OutFilter {
        let binary = plan.format == CopyFormat::Binary;
        OutFilter {
            binary,
            first,
            drop_first_message: !first && !binary && plan.header,
            head: Vec::new(),
            head_done: false,
            carry: Vec::new(),
        }
    }

    /// Appends what the client gets of one CopyData message to `out`.
    fn data(&mut self, raw: &Bytes, body: &[u8], out: &mut BytesMut) {
        if std::mem::take(&mut self.drop_first_message) {
            return;
        }
        if !self.binary {
            out.put_slice(raw);
            return;
        }
        let mut d = body;
        let mut keep: Vec<u8> = Vec::new();
        while !self.head_done && !d.is_empty() {
            let take = (self.head_need() - self.head.len()).min(d.len());
            self.head.extend_from_slice(&d[..take]);
            d = &d[take..];
            if self.head.len() >= 19 && self.head.len() == self.head_need() {
                self.head_done = true;
                if self.first {
                    keep.extend_from_slice(&self.head);
                }
            }
        }
        self.carry.extend_from_slice(d);
        if self.carry.len() > 2 {
            let n = self.carry.len() - 2;
            keep.extend(self.carry.drain(..n));
        }
        if !keep.is_empty() {
            wire::frame(out, be::COPY_DATA, |o| o.put_slice(&keep));
        }
    }

    /// Length of the binary file header: 19 bytes and the extension.
    fn head_need(&self) -> usize {
        match self.head.get(15..19) {
            Some(e) => 19 + i32::from_be_bytes([e[0], e[1], e[2], e[3]]).max(0) as usize,
            None => 19,
        }
    }

    /// The shard's data ended: what was held back, unless it is the
    /// trailer.
    fn end(&mut self, out: &mut BytesMut) {
        let carry = std::mem::take(&mut self.carry);
        if self.binary && carry != [0xff, 0xff] && !carry.is_empty() {
            wire::frame(out, be::COPY_DATA, |o| o.put_slice(&carry));
        }
    }
}

/// Cancels the statement on shards still running it and reads them back to
/// ReadyForQuery (closing those that do not answer in time). Their
/// backends are not pooled afterwards: a late cancel must not hit another
/// client.
pub(super) async fn cancel_rest<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    running: &[usize],
) -> Result<(), SessionError> {
    for &t in running {
        let Some(b) = s.be.slots[t].conn.as_mut() else {
            continue;
        };
        b.broken = true;
        let (addr, pid, secret) = (b.addr, b.pid, b.secret);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            crate::backend::conn::send_cancel(addr, pid, secret),
        )
        .await;
    }
    for &t in running {
        let mut sc = ShardCopy::new(t);
        sc.started = true;
        finish_shard(s, &mut sc, Some(ABORT_WAIT)).await?;
    }
    Ok(())
}

pub(super) async fn copy_to<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    shards: &[usize],
    proto: Proto,
) -> Result<(), SessionError> {
    let in_tx = s.txn.open();
    for &t in shards {
        if let Err(r) = s.ensure_backend(t).await? {
            reply_error(s, proto, false, r.code, &r.message);
            if !in_tx {
                s.end_of_transaction().await?;
            }
            return Ok(());
        }
    }
    // Each shard's text: the statement, or its per-shard form (a shard that
    // must hide a moving range's rows, `Target::Multi::sqls`).
    let sqls = match &d.target {
        crate::routing::Target::Multi { sqls, .. } => sqls.as_deref(),
        _ => None,
    };
    for (i, &t) in shards.iter().enumerate() {
        let text = sqls.and_then(|v| v.get(i)).unwrap_or(&d.sql_text);
        let mut buf = BytesMut::new();
        frontend::query(text, &mut buf).map_err(|_| encode_fatal())?;
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            if let Err(e) = b.write_frames(&buf).await {
                return Err(s.be.lost(t, WireError::Io(e)));
            }
        }
    }
    // Every shard's CopyOutResponse (or error) before anything reaches the
    // client.
    let mut first: Option<Bytes> = None;
    let mut error: Option<(String, String)> = None;
    let mut running = Vec::new();
    for &t in shards {
        let mut sc = ShardCopy::new(t);
        loop {
            let Some(f) = read_backend(s, t, None).await? else {
                break;
            };
            match f.tag() {
                be::COPY_OUT_RESPONSE => {
                    match &first {
                        None => first = Some(f.raw.clone()),
                        Some(h) if h[5..] != f.raw[5..] => {
                            error.get_or_insert((
                                sqlstate::INTERNAL_ERROR.into(),
                                format!(
                                    "shards return different COPY formats for table \"{}\"; is the schema the same everywhere?",
                                    plan.table
                                ),
                            ));
                        }
                        Some(_) => {}
                    }
                    running.push(t);
                    break;
                }
                _ => {
                    on_copy_frame(s, &mut sc, &f);
                    if sc.done {
                        break;
                    }
                }
            }
        }
        if let Some((code, msg)) = sc.error {
            error.get_or_insert((code, format!("{msg} (on shard {})", shard_name(s, t))));
        }
    }
    let Some(h) = first.filter(|_| error.is_none()) else {
        cancel_rest(s, &running).await?;
        let (code, msg) = error.unwrap_or_else(|| {
            (
                sqlstate::INTERNAL_ERROR.into(),
                "no shard ran the COPY".into(),
            )
        });
        reply_error(s, proto, false, &code, &msg);
        if !in_tx {
            s.end_of_transaction().await?;
        }
        return Ok(());
    };
    s.out.put_slice(&h);
    let mut total = 0u64;
    let mut error: Option<(String, String)> = None;
    for (i, &t) in shards.iter().enumerate() {
        let mut filter = OutFilter::new(plan, i == 0);
        let mut sc = ShardCopy::new(t);
        sc.started = true;
        while !sc.done {
            let Some(f) = read_backend(s, t, None).await? else {
                break;
            };
            match f.tag() {
                be::COPY_DATA => filter.data(&f.raw, f.body(), &mut s.out),
                be::COPY_DONE => filter.end(&mut s.out),
                _ => on_copy_frame(s, &mut sc, &f),
            }
            if s.out.len() > FLUSH_AT {
                s.flush_client().await?;
            }
        }
        total += sc.count();
        if let Some((code, msg)) = sc.error {
            error = Some((code, format!("{msg} (on shard {})", shard_name(s, t))));
            cancel_rest(s, &shards[i + 1..]).await?;
            break;
        }
    }
    match error {
        Some((code, msg)) => reply_error(s, proto, false, &code, &msg),
        None => {
            if plan.format == CopyFormat::Binary {
                wire::frame(&mut s.out, be::COPY_DATA, |o| o.put_slice(&[0xff, 0xff]));
            }
            s.out.put_slice(&[be::COPY_DONE, 0, 0, 0, 4]);
            reply_done(s, proto, false, total);
        }
    }
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}
