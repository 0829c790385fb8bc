//! Reading the replies of one statement sent to several shards.
//!
//! The caller consumes one shard's replies at a time (a k-way merge, or a
//! concatenation), but [`ShardStreams`] waits on all of them: while it waits
//! for shard `i`, frames the others send are read ahead (bounded per shard),
//! so that an error on any shard is seen at once and, when asked, the
//! statement is cancelled on the others. (PostgreSQL flushes a statement's
//! first replies only with later ones or at its end: waiting on one shard
//! alone could mean waiting for its whole statement while another shard
//! already failed.)

use crate::error::SessionError;
use crate::session::conn::Backends;
use crate::wire::{self, Frame, WireError};
use crate::wire::{be, tx};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// A pending read of one shard's next frame.
type Wait<'a> = Pin<Box<dyn Future<Output = Result<Frame, WireError>> + Send + 'a>>;

/// How long a cancelled shard may take to end before it is cancelled again.
const RECANCEL_AFTER: std::time::Duration = std::time::Duration::from_millis(300);

/// Read-ahead bound per shard, in bytes of frames.
const READ_AHEAD_BYTES: usize = 256 * 1024;

pub(crate) struct ShardStreams {
    shards: Vec<usize>,
    /// ReadyForQuery messages still to come from each shard (read, possibly
    /// ahead, not consumed); 0: nothing more comes from it.
    rfq_left: Vec<usize>,
    /// Frames read ahead, and their total size.
    ahead: Vec<(VecDeque<Frame>, usize)>,
    /// The first error any shard sent: SQLSTATE, message, shard.
    pub(crate) error: Option<(String, String, usize)>,
    /// Cancel the other shards at the first error.
    cancel_on_error: bool,
}

impl ShardStreams {
    /// `rfq_per_shard`: ReadyForQuery messages each shard will send.
    pub(crate) fn new(
        shards: &[usize],
        rfq_per_shard: usize,
        cancel_on_error: bool,
    ) -> ShardStreams {
        ShardStreams {
            shards: shards.to_vec(),
            rfq_left: vec![rfq_per_shard; shards.len()],
            ahead: (0..shards.len()).map(|_| Default::default()).collect(),
            error: None,
            cancel_on_error,
        }
    }

    /// Next frame of stream `i`; None when it has sent all its
    /// ReadyForQuery messages and all were consumed, or its backend is gone.
    pub(crate) async fn frame(
        &mut self,
        be: &mut Backends,
        i: usize,
    ) -> Result<Option<Frame>, SessionError> {
        // Since when stream i has been waited on (server_silence_timeout_ms).
        let since = std::time::Instant::now();
        loop {
            if let Some(f) = self.ahead[i].0.pop_front() {
                self.ahead[i].1 -= f.raw.len();
                return Ok(Some(f));
            }
            if self.rfq_left[i] == 0 {
                return Ok(None);
            }
            // Fast path: a whole frame of stream i is already buffered.
            let t = self.shards[i];
            let buffered = match be.slots[t].conn.as_mut() {
                Some(b) if b.reader.has_frame() => b.reader.try_frame(),
                _ => Ok(None),
            };
            match buffered {
                Ok(Some(f)) => {
                    self.note(be, i, &f).await;
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(be.lost(t, e)),
            }
            // Wait on stream i and on every other stream that may still
            // send and has room ahead.
            let mut waits: Vec<(usize, Wait<'_>)> = Vec::new();
            for (t, slot) in be.slots.iter_mut().enumerate() {
                let Some(j) = self.shards.iter().position(|&x| x == t) else {
                    continue;
                };
                let Some(b) = slot.conn.as_mut() else {
                    continue;
                };
                if j == i || (self.rfq_left[j] > 0 && self.ahead[j].1 < READ_AHEAD_BYTES) {
                    waits.push((j, Box::pin(b.reader.next())));
                }
            }
            if !waits.iter().any(|(j, _)| *j == i) {
                return Ok(None);
            }
            let any = std::future::poll_fn(|cx| {
                for (j, w) in waits.iter_mut() {
                    if let Poll::Ready(r) = w.as_mut().poll(cx) {
                        return Poll::Ready((*j, r));
                    }
                }
                Poll::Pending
            });
            // After an error, a cancel that reached a shard between two
            // messages (PostgreSQL ignores it while reading a command) is
            // sent again until the shard ends.
            let recancel = self.error.is_some() && self.cancel_on_error;
            let silence_left = be.silence.map(|d| d.saturating_sub(since.elapsed()));
            let limit = match (recancel, silence_left) {
                (true, Some(left)) => Some(RECANCEL_AFTER.min(left)),
                (true, None) => Some(RECANCEL_AFTER),
                (false, left) => left,
            };
            let got = match limit {
                Some(d) => tokio::time::timeout(d, any).await.ok(),
                None => Some(any.await),
            };
            drop(waits);
            let Some((j, r)) = got else {
                if be.silence.is_some_and(|d| since.elapsed() >= d) {
                    // server_silence_timeout_ms: nothing came from stream
                    // i that long (re-cancelled or not): it is stalled.
                    return Err(be.silent(self.shards[i]));
                }
                self.cancel_others(be, None).await;
                continue;
            };
            let t = self.shards[j];
            let f = match r {
                Ok(f) => f,
                Err(e) => return Err(be.lost(t, e)),
            };
            self.note(be, j, &f).await;
            if j == i {
                return Ok(Some(f));
            }
            self.ahead[j].1 += f.raw.len();
            self.ahead[j].0.push_back(f);
        }
    }

    /// Takes note of a frame read from stream `j`: the first error (and
    /// the cancel of the others), the end of the stream.
    async fn note(&mut self, be: &mut Backends, j: usize, f: &Frame) {
        match f.tag() {
            be::ERROR_RESPONSE if self.error.is_none() => {
                let (c, m) = wire::parse_error_fields(f.body());
                self.error = Some((c, m, self.shards[j]));
                if self.cancel_on_error {
                    self.cancel_others(be, Some(j)).await;
                }
            }
            be::READY_FOR_QUERY => {
                self.rfq_left[j] = self.rfq_left[j].saturating_sub(1);
                // Two-phase commit prepares only a backend known to be in
                // a transaction that has not failed.
                if let Some(b) = be.slots[self.shards[j]].conn.as_mut() {
                    b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                }
            }
            _ => {}
        }
    }

    /// Cancels every stream that has not ended but the one that failed.
    async fn cancel_others(&self, be: &mut Backends, failed: Option<usize>) {
        let failed = failed.or_else(|| {
            let t = self.error.as_ref()?.2;
            self.shards.iter().position(|&x| x == t)
        });
        let others: Vec<usize> = (0..self.shards.len())
            .filter(|&k| self.rfq_left[k] > 0 && Some(k) != failed)
            .map(|k| self.shards[k])
            .collect();
        cancel_shards(be, &others).await;
    }
}

/// After an error on one shard: cancels the statement still running on
/// `shards`, so that the client gets the one error without waiting for the
/// others' work. Their backends are closed at the end of the transaction
/// instead of pooled: a cancel that reaches one late must not hit another
/// client's query.
pub(crate) async fn cancel_shards(be: &mut Backends, shards: &[usize]) {
    for &t in shards {
        let Some(b) = be.slots[t].conn.as_mut() else {
            continue;
        };
        b.broken = true;
        let (addr, pid, secret) = (b.addr, b.pid, b.secret);
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            crate::backend::conn::send_cancel(addr, pid, secret),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!(
                shard = t,
                "cannot cancel a statement after another shard's error"
            );
        }
    }
}
