//! LISTEN/UNLISTEN under transaction pooling, answered by the node: a
//! pooled backend must never listen (its next client would get the
//! notifications), so the node listens for the session
//! ([`crate::backend::notify`]) and answers the client's messages itself,
//! as PostgreSQL would — a simple Query holding only the command, or an
//! extended-protocol batch that only prepares, describes and runs such
//! commands, under the unnamed statement (psycopg 3) or a named one
//! (asyncpg's `add_listener`: Parse/Describe/Flush, then
//! Bind/Execute/Sync). A named LISTEN statement is kept among the client's
//! statements but never prepared on a backend for running: a Bind of it
//! beside other statements is refused (0A000).

use super::conn::*;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::wire::be;
use crate::wire::fe;
use crate::wire::{self, command_complete, rfq, Frame};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::classify::{listen_command, ListenCommand};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// `listen`: the statement string holds a LISTEN, or a batch the node
    /// does not answer itself ([`Self::listen_batch`]) runs a LISTEN or
    /// UNLISTEN: refused (it would run on a pooled backend).
    pub(super) fn check_listen(&self, listen: bool) -> Result<(), Refusal> {
        if !self.session_mode && listen {
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "in transaction pooling mode, LISTEN and UNLISTEN must be sent alone (one statement in its query string; in the extended protocol, a batch up to Sync or Flush that only prepares and runs LISTEN/UNLISTEN)".into(),
            ));
        }
        Ok(())
    }

    /// LISTEN/UNLISTEN under transaction pooling: the node listens for the
    /// session ([`crate::backend::notify`]); answers the CommandComplete
    /// once every shard listens. Takes effect at once (PostgreSQL: at the
    /// end of the transaction).
    pub(super) async fn on_listen(
        &mut self,
        cmd: hotrepart_router::classify::ListenCommand,
    ) -> Result<(), Refusal> {
        use hotrepart_router::classify::ListenCommand;
        let node = self.node.clone();
        let tag = match cmd {
            ListenCommand::Listen(channel) => {
                let (database, user) = (self.database.clone(), self.user.clone());
                let targets = || {
                    node.routing
                        .live_shards()
                        .into_iter()
                        .map(|t| {
                            let p = node.pool_for(t, &database, &user);
                            (t, p.target.clone(), p.connect_timeout())
                        })
                        .collect()
                };
                let wait = Duration::from_millis(node.cfg().pool_timeout_ms.max(1000));
                let who = self.listener.get_or_insert_with(|| node.notifier.member());
                node.notifier
                    .listen(
                        &database,
                        &user,
                        targets,
                        |task| {
                            node.tasks.spawn_until_shutdown(task);
                        },
                        &channel,
                        who,
                        wait,
                    )
                    .await
                    .map_err(|e| {
                        Refusal::new(
                            sqlstate::CONNECTION_FAILURE,
                            format!("LISTEN {channel}: {e}; see the node's log"),
                        )
                    })?;
                "LISTEN"
            }
            ListenCommand::Unlisten(channel) => {
                if let Some(who) = &self.listener {
                    node.notifier
                        .unlisten(&self.database, channel.as_deref(), who.id);
                }
                "UNLISTEN"
            }
        };
        self.push_synthetic(command_complete(tag));
        Ok(())
    }

    /// The LISTEN/UNLISTEN the client's statement `name` ("" the unnamed
    /// one) runs, if it is one: the client's named statements only (the
    /// node never keeps an unnamed LISTEN; a batch parses it anew).
    pub(super) fn listen_stmt(&self, name: &str) -> Option<ListenCommand> {
        if name.is_empty() {
            return None;
        }
        self.stmts.get(name).and_then(|s| listen_command(&s.sql))
    }

    /// An extended-protocol batch whose every message concerns a
    /// LISTEN/UNLISTEN statement (Parse of one, named or unnamed; Bind of
    /// one and Describe/Execute of its portal; Describe of the statement;
    /// Sync, Flush): answered by the node, message by message, as
    /// PostgreSQL would. True: answered. A named statement is recorded
    /// (Close and DEALLOCATE work as for any other).
    pub(super) async fn listen_batch(&mut self, frames: &[Frame]) -> bool {
        if self.session_mode {
            return false;
        }
        let Some(plan) = self.listen_plan(frames) else {
            return false;
        };
        let mut failed = false;
        for (f, cmd) in frames.iter().zip(plan) {
            if failed && f.tag() != fe::SYNC {
                continue;
            }
            match f.tag() {
                fe::PARSE => {
                    let mut b = f.body();
                    let name = wire::get_cstr(&mut b).unwrap_or_default().to_string();
                    let rest = b;
                    let sql = wire::get_cstr(&mut b).unwrap_or_default();
                    if name.is_empty() {
                        self.push_synthetic(wire::parse_complete());
                    } else if self.register_stmt(name.clone(), rest, sql).is_some() {
                        self.push_synthetic_with(wire::parse_complete(), Forget::OnSkip(name));
                    } else {
                        // The name is taken: the error is queued.
                        failed = true;
                    }
                }
                fe::BIND => self.push_synthetic(empty_message(be::BIND_COMPLETE)),
                fe::DESCRIBE => {
                    if f.body().first() == Some(&wire::STATEMENT) {
                        let mut p = BytesMut::new();
                        wire::frame(&mut p, be::PARAMETER_DESCRIPTION, |o| o.put_i16(0));
                        self.push_synthetic(p.freeze());
                    }
                    self.push_synthetic(empty_message(be::NO_DATA));
                }
                fe::EXECUTE => {
                    if let Some(c) = cmd {
                        if let Err(r) = self.on_listen(c).await {
                            // As PostgreSQL: the error, then nothing up to
                            // Sync.
                            self.push_error(&r);
                            failed = true;
                        }
                    }
                }
                fe::SYNC => {
                    let status = self.client_status();
                    self.push_synthetic(rfq(status));
                    failed = false;
                }
                _ => {}
            }
        }
        if failed {
            self.skip_to_sync = true;
        }
        true
    }

    /// Whether `frames` is a batch for [`Self::listen_batch`], and if so
    /// the command each Execute runs (None for every other message).
    fn listen_plan(&self, frames: &[Frame]) -> Option<Vec<Option<ListenCommand>>> {
        // Statements and portals of this batch: name → command.
        let mut stmts: HashMap<&str, ListenCommand> = HashMap::new();
        let mut portals: HashMap<&str, ListenCommand> = HashMap::new();
        let mut any = false;
        let mut plan = Vec::with_capacity(frames.len());
        for f in frames {
            let mut b = f.body();
            let mut cmd = None;
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).ok()?;
                    let sql = wire::get_cstr(&mut b).ok()?;
                    stmts.insert(name, listen_command(sql)?);
                    any = true;
                }
                fe::BIND => {
                    let portal = wire::get_cstr(&mut b).ok()?;
                    let stmt = wire::get_cstr(&mut b).ok()?;
                    let c = stmts
                        .get(stmt)
                        .cloned()
                        .or_else(|| self.listen_stmt(stmt))?;
                    portals.insert(portal, c);
                    any = true;
                }
                fe::DESCRIBE => {
                    let (&kind, mut rest) = b.split_first()?;
                    let name = wire::get_cstr(&mut rest).ok()?;
                    let known = if kind == wire::STATEMENT {
                        stmts.contains_key(name) || self.listen_stmt(name).is_some()
                    } else {
                        portals.contains_key(name)
                    };
                    if !known {
                        return None;
                    }
                }
                fe::EXECUTE => {
                    let portal = wire::get_cstr(&mut b).ok()?;
                    cmd = Some(portals.get(portal)?.clone());
                }
                fe::SYNC | fe::FLUSH => {}
                _ => return None,
            }
            plan.push(cmd);
        }
        any.then_some(plan)
    }
}

/// A backend message without a body (BindComplete, NoData).
fn empty_message(tag: u8) -> Bytes {
    let mut b = BytesMut::new();
    wire::frame(&mut b, tag, |_| {});
    b.freeze()
}
