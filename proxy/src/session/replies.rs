//! The replies of the backends: each matched against what the client is
//! owed (`Owed`), synthetic replies spliced in, errors skipping to Sync,
//! the ReadyForQuery that ends a transaction.

use super::conn::*;
use crate::error::SessionError;
use crate::wire::rfq;
use crate::wire::{self, Frame};
use crate::wire::{be, tx};
use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(crate) async fn on_backend_frame(&mut self, f: Frame) -> Result<(), SessionError> {
        let tag = f.tag();
        if tag == be::PARAMETER_STATUS {
            self.note_parameter_status(self.be.cur, &f);
        }
        // The home shard's OIDs of user types (`type_oids.rs`).
        let f = match tag {
            be::ROW_DESCRIPTION | be::PARAMETER_DESCRIPTION => {
                self.relay_description(self.be.cur, f).await
            }
            be::DATA_ROW => match &self.row_fix {
                Some(fix) => Frame {
                    raw: fix.apply(f.raw),
                },
                None => f,
            },
            be::COMMAND_COMPLETE
            | be::EMPTY_QUERY_RESPONSE
            | be::ERROR_RESPONSE
            | be::READY_FOR_QUERY => {
                self.row_fix = None;
                f
            }
            _ => f,
        };
        if self.gather.is_some() && self.gathered(&f) {
            return Ok(());
        }
        let mut forward = true;
        // `ddl_syncs` before this ReadyForQuery (if it is one).
        let mut ddl_before = 0;
        match tag {
            be::PARSE_COMPLETE | be::BIND_COMPLETE
                if matches!(self.be.owed.front(), Some(Owed::Hidden)) =>
            {
                forward = false;
                self.be.owed.pop_front();
            }
            be::ERROR_RESPONSE if matches!(self.be.owed.front(), Some(Owed::Poison)) => {
                forward = false;
                self.be.owed.pop_front();
                self.on_backend_error();
            }
            be::READY_FOR_QUERY if matches!(self.be.owed.front(), Some(Owed::HiddenSync)) => {
                forward = false;
                self.be.owed.pop_front();
                let s = f.body().first().copied().unwrap_or(tx::IDLE);
                let cur = self.be.cur;
                if let Some(b) = self.be.slots[cur].conn.as_mut() {
                    b.status = s;
                }
                self.txn.status = TxStatus::from_byte(s);
                if s == tx::IDLE {
                    self.txn.failed = false;
                    self.txn.begin = None;
                }
            }
            be::PARSE_COMPLETE => {
                if let Some(Owed::Parse {
                    hidden, internal, ..
                }) = self.be.owed.front()
                {
                    forward = !*hidden;
                    let cur = self.be.cur;
                    if let (Some(internal), Some(b), false) =
                        (internal, &self.be.slots[cur].conn, self.state_dirty[cur])
                    {
                        b.pool().mark_validated(internal, b.state_fp);
                    }
                    self.be.owed.pop_front();
                }
            }
            be::BIND_COMPLETE => {
                if let Some(Owed::Bind(fix)) = self.be.owed.front_mut() {
                    self.row_fix = fix.take().map(|f| *f);
                    self.be.owed.pop_front();
                }
            }
            be::CLOSE_COMPLETE if matches!(self.be.owed.front(), Some(Owed::Closing(_))) => {
                forward = false;
                self.be.owed.pop_front();
            }
            be::CLOSE_COMPLETE => self.pop_if(|o| matches!(o, Owed::Close)),
            be::ROW_DESCRIPTION | be::NO_DATA => self.pop_if(|o| matches!(o, Owed::Describe(_))),
            be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED => {
                self.pop_if(|o| matches!(o, Owed::Execute))
            }
            be::ERROR_RESPONSE => {
                self.note_stale_statement(&f);
                self.on_backend_error();
            }
            be::COPY_IN_RESPONSE => {
                // PostgreSQL ignores Sync received in copy-in mode, and
                // drivers do send one right after the Execute that starts
                // COPY (tokio-postgres does): those already sent are not owed.
                if matches!(self.be.owed.front(), Some(Owed::Execute | Owed::Query)) {
                    let mut first = true;
                    self.be
                        .owed
                        .retain(|o| std::mem::take(&mut first) || !matches!(o, Owed::Sync));
                }
            }
            be::READY_FOR_QUERY => {
                self.pop_if(|o| matches!(o, Owed::Sync | Owed::Query | Owed::FunctionCall));
                ddl_before = self.ddl_syncs;
                self.ddl_syncs = ddl_before.saturating_sub(1);
                let s = f.body().first().copied().unwrap_or(tx::IDLE);
                let cur = self.be.cur;
                if let Some(b) = self.be.slots[cur].conn.as_mut() {
                    b.status = s;
                }
                self.txn.status = TxStatus::from_byte(s);
                if s == tx::IDLE {
                    self.txn.failed = false;
                    self.txn.begin = None;
                }
            }
            _ => {}
        }
        if tag == be::READY_FOR_QUERY && self.ddl_sent && self.txn.open() {
            // DDL inside a block: recorded at the ReadyForQuery that ends it.
            self.ddl_syncs = self.ddl_syncs.max(1);
        }
        if tag == be::READY_FOR_QUERY
            && self.ddl_sent
            && !self.txn.open()
            && !self.be.owed.is_empty()
            && (1..=2).contains(&ddl_before)
        {
            // A transaction ended inside a pipeline whose later parts are
            // still owed: the client reads this ReadyForQuery before the
            // batch is over. The DDL noted last may be this part's: it is
            // recorded before it (at most twice, and at the end).
            let node = self.node.clone();
            if let Err(e) = Box::pin(node.schema_changed(&self.database)).await {
                tracing::warn!(database = %self.database, error = %e, "could not record a schema change in the replicated catalog; retrying in the background");
            }
            if self.ddl_syncs == 0 {
                // Every DDL noted so far has run, and is recorded.
                self.ddl_sent = false;
            }
        }
        if forward {
            if tag == be::READY_FOR_QUERY && self.txn.failed && self.txn.open() {
                // The node failed this transaction: the client must see 'E'.
                self.out.put_slice(&rfq(tx::FAILED));
            } else {
                self.out.put_slice(&f.raw);
            }
        }
        self.emit_synthetic();
        if tag == be::READY_FOR_QUERY && self.be.owed.is_empty() && !self.txn.open() {
            self.end_of_transaction().await?;
        }
        Ok(())
    }

    /// While a multi-shard extended statement runs (see `scatter`), the
    /// first shard's replies pass through here: its CommandComplete, errors
    /// and ReadyForQuery are collected instead of forwarded. True: consumed.
    pub(super) fn gathered(&mut self, f: &Frame) -> bool {
        let executing = matches!(self.be.owed.front(), Some(Owed::Execute));
        let Some(g) = self.gather.as_mut() else {
            return false;
        };
        match f.tag() {
            be::COMMAND_COMPLETE | be::PORTAL_SUSPENDED | be::EMPTY_QUERY_RESPONSE if executing => {
                if f.tag() == be::COMMAND_COMPLETE {
                    let mut b = f.body();
                    g.tags
                        .push(wire::get_cstr(&mut b).unwrap_or("").to_string());
                } else if f.tag() == be::EMPTY_QUERY_RESPONSE {
                    g.empty = true;
                }
                self.be.owed.pop_front();
                self.emit_synthetic();
                true
            }
            be::ERROR_RESPONSE => {
                if g.error.is_none() {
                    g.error = Some(wire::parse_error_fields(f.body()));
                }
                self.on_backend_error();
                true
            }
            be::DATA_ROW => {
                if g.error.is_some() {
                    return true;
                }
                match g.rows.as_mut() {
                    Some(rows) => {
                        rows.push(f.raw.clone());
                        true
                    }
                    None => false,
                }
            }
            be::READY_FOR_QUERY => {
                g.status = f.body().first().copied().unwrap_or(tx::IDLE);
                self.pop_if(|o| matches!(o, Owed::Sync));
                true
            }
            _ => false,
        }
    }

    pub(super) fn pop_if(&mut self, p: impl Fn(&Owed) -> bool) {
        if self.be.owed.front().is_some_and(p) {
            self.be.owed.pop_front();
        }
    }

    /// PostgreSQL skips everything up to Sync after an error in the
    /// extended protocol; so does the owed queue (synthetic replies too).
    pub(super) fn on_backend_error(&mut self) {
        match self.be.owed.front() {
            Some(Owed::Query | Owed::FunctionCall | Owed::Sync | Owed::HiddenSync) | None => {}
            Some(_) => {
                while let Some(o) = self.be.owed.front() {
                    if matches!(o, Owed::Sync | Owed::HiddenSync) {
                        break;
                    }
                    match self.be.owed.pop_front() {
                        Some(Owed::Parse {
                            internal: Some(name),
                            client,
                            ..
                        }) => {
                            // Not prepared on this backend after all; a
                            // client's own Parse that never ran leaves no
                            // statement behind, a hidden re-Parse does not
                            // touch the client's name.
                            let cur = self.be.cur;
                            if let Some(b) = self.be.slots[cur].conn.as_mut() {
                                b.prepared.remove(&name);
                            }
                            if let Some(c) = client {
                                self.stmts.remove(&c);
                            }
                        }
                        Some(Owed::Synthetic {
                            forget: Forget::OnSkip(c),
                            ..
                        }) => {
                            self.stmts.remove(&c);
                        }
                        Some(Owed::Parse { internal: None, .. }) => {
                            if let Some(u) = self.unnamed.as_mut() {
                                u.on = None;
                            }
                        }
                        Some(Owed::Closing(name)) => {
                            // Not closed: still prepared on the backend.
                            let cur = self.be.cur;
                            if let Some(b) = self.be.slots[cur].conn.as_mut() {
                                b.prepared.insert(name, 0);
                            }
                        }
                        _ => {}
                    }
                }
                // No Sync sent since the failed message: the backend ignores
                // whatever comes before the client's next Sync, and so does
                // the node (else it would owe replies that never come).
                if self.be.owed.is_empty() {
                    self.skip_to_sync = true;
                }
            }
        }
    }

    pub(super) fn emit_synthetic(&mut self) {
        while let Some(Owed::Synthetic { .. }) = self.be.owed.front() {
            if let Some(Owed::Synthetic { frame, forget }) = self.be.owed.pop_front() {
                self.out.put_slice(&frame);
                if let Forget::OnSend(name) = forget {
                    self.stmts.remove(&name);
                }
            }
        }
    }
}
