//! `COPY … FROM STDIN` split row by row over the owners' COPYs (see the
//! parent module for the rules).

use super::*;
use crate::backend::conn::BackendConn;
use crate::error::sqlstate;
use crate::error::SessionError;
use crate::routing::Decision;
use crate::session::conn::Session;
use crate::wire::{self, Frame, WireError};
use crate::wire::{be, fe, tx};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::catalog::{RangeStatus, RoutingSnapshot, ShardId};
use hotrepart_router::route::copy::{CopyFormat, CopyPlan, CopyTable, Piece, RowSplitter};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Sends what is queued for the shard, reading (and recording) whatever the
/// shard says meanwhile, so a shard writing notices never blocks us.
pub(super) async fn send_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    sc: &mut ShardCopy,
) -> Result<(), SessionError> {
    sc.close_frame();
    if sc.out.is_empty() {
        return Ok(());
    }
    let buf = sc.out.split().freeze();
    if sc.error.is_some() || sc.done {
        // The shard no longer reads copy data.
        return Ok(());
    }
    let t = sc.t;
    let mut pos = 0;
    enum Ev {
        Wrote(usize),
        WriteErr(std::io::Error),
        Read(Result<Frame, WireError>),
    }
    while pos < buf.len() {
        let ev = {
            let Some(b) = s.be.slots[t].conn.as_mut() else {
                return Ok(());
            };
            let b: &mut BackendConn = b;
            tokio::select! {
                r = b.writer.write(&buf[pos..]) => match r {
                    Ok(n) => Ev::Wrote(n),
                    Err(e) => Ev::WriteErr(e),
                },
                f = b.reader.next() => Ev::Read(f),
            }
        };
        match ev {
            Ev::Wrote(0) => {
                return Err(s
                    .be
                    .lost(t, WireError::Io(std::io::ErrorKind::WriteZero.into())))
            }
            Ev::Wrote(n) => pos += n,
            Ev::WriteErr(e) => return Err(s.be.lost(t, WireError::Io(e))),
            Ev::Read(Err(e)) => return Err(s.be.lost(t, e)),
            Ev::Read(Ok(f)) => {
                if f.tag() == be::READY_FOR_QUERY {
                    if let Some(b) = s.be.slots[t].conn.as_mut() {
                        b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                    }
                }
                // PostgreSQL reads and ignores CopyData after an error: the
                // frame being written is finished anyway.
                on_copy_frame(s, sc, &f);
            }
        }
    }
    Ok(())
}

/// Reads the shard's messages until its ReadyForQuery (bounded by `wait`
/// when given; on timeout the connection is closed).
pub(super) async fn finish_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    sc: &mut ShardCopy,
    wait: Option<Duration>,
) -> Result<(), SessionError> {
    while !sc.done {
        match read_backend(s, sc.t, wait).await? {
            Some(f) => on_copy_frame(s, sc, &f),
            None => {
                // Timed out (or no connection): close it.
                s.be.slots[sc.t].conn = None;
                sc.done = true;
                if sc.error.is_none() {
                    sc.error = Some((
                        sqlstate::CONNECTION_FAILURE.into(),
                        "the shard did not answer in time".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Fails every running shard COPY (CopyFail) and waits for the shards to
/// be back at ReadyForQuery. Outside a transaction block their transactions
/// are rolled back by `end_of_transaction`.
pub(super) async fn abort_shards<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    st: &mut [ShardCopy],
    why: &str,
) -> Result<(), SessionError> {
    for sc in st.iter_mut() {
        sc.out.clear();
        sc.open = None;
        if sc.started && !sc.done && sc.error.is_none() {
            let mut m = BytesMut::new();
            frontend::copy_fail(why, &mut m).map_err(|_| encode_fatal())?;
            sc.out = m;
            send_shard(s, sc).await?;
        }
    }
    for sc in st.iter_mut() {
        if sc.started && !sc.done {
            finish_shard(s, sc, Some(ABORT_WAIT)).await?;
        }
    }
    Ok(())
}

/// Sends the client's COPY statement to shard `sc` (after `BEGIN` when
/// `begin`) and reads up to its CopyInResponse (or error).
pub(super) async fn start_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    sc: &mut ShardCopy,
    sql: &str,
    begin: bool,
) -> Result<Option<Bytes>, SessionError> {
    let mut buf = BytesMut::new();
    if begin {
        frontend::query("BEGIN", &mut buf).map_err(|_| encode_fatal())?;
    }
    frontend::query(sql, &mut buf).map_err(|_| encode_fatal())?;
    if let Some(b) = s.be.slots[sc.t].conn.as_mut() {
        if let Err(e) = b.write_frames(&buf).await {
            return Err(s.be.lost(sc.t, WireError::Io(e)));
        }
    }
    read_start(s, sc, begin).await
}

pub(super) async fn read_start<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    sc: &mut ShardCopy,
    begin: bool,
) -> Result<Option<Bytes>, SessionError> {
    let mut in_begin = begin;
    loop {
        let Some(f) = read_backend(s, sc.t, None).await? else {
            sc.done = true;
            return Ok(None);
        };
        match f.tag() {
            be::READY_FOR_QUERY if in_begin => in_begin = false,
            be::COMMAND_COMPLETE if in_begin => {}
            be::COPY_IN_RESPONSE => {
                sc.started = true;
                return Ok(Some(f.raw));
            }
            _ => {
                on_copy_frame(s, sc, &f);
                if sc.done {
                    return Ok(None);
                }
            }
        }
    }
}

/// Reads one client message during copy-in, bounded by the configured
/// idle timeouts.
pub(super) async fn read_client<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
) -> Result<Frame, SessionError> {
    s.flush_client().await?;
    let ms = {
        let cfg = s.node.cfg();
        if cfg.idle_in_transaction_timeout_ms > 0 {
            cfg.idle_in_transaction_timeout_ms
        } else {
            cfg.client_idle_timeout_ms
        }
    };
    let r =
        if ms > 0 {
            match tokio::time::timeout(Duration::from_millis(ms), s.client.next()).await {
                Ok(r) => r,
                Err(_) => return Err(SessionError::Fatal {
                    code: sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    msg: "terminating connection due to idle-in-transaction timeout (during COPY)"
                        .into(),
                }),
            }
        } else {
            s.client.next().await
        };
    if let Ok(f) = &r {
        s.stats.received(f.raw.len(), false);
    }
    r.map_err(|e| match e {
        WireError::Closed | WireError::Io(_) => SessionError::ClientGone,
        WireError::Protocol(m) => SessionError::Fatal {
            code: sqlstate::PROTOCOL_VIOLATION,
            msg: format!("protocol violation: {m}"),
        },
    })
}

/// Where the rows of a sharded COPY go: position in `st` by router shard
/// (shards of the routing table this COPY has not started yet are absent).
pub(super) fn shard_positions<S>(
    s: &Session<S>,
    snap: &RoutingSnapshot,
    st: &[ShardCopy],
) -> HashMap<ShardId, usize> {
    snap.shards()
        .filter_map(|sh| {
            let t = s.node.routing.shard_index(sh.id.as_str())?;
            let pos = st.iter().position(|sc| sc.t == t)?;
            Some((sh.id.clone(), pos))
        })
        .collect()
}

pub(super) async fn copy_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    shards: &[usize],
    proto: Proto,
) -> Result<(), SessionError> {
    let in_tx = s.txn.open();
    let reference = plan.placement == CopyTable::Reference;
    let sql = d.sql_text.as_str();
    if in_tx && reference {
        let names: Vec<String> = shards.iter().map(|&t| shard_name(s, t)).collect();
        reply_error(
            s,
            proto,
            false,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &format!(
                "this COPY writes to shards {} inside a transaction block; a COPY into a reference table is supported outside a transaction block only",
                names.join(", ")
            ),
        );
        return Ok(());
    }
    if let Some(opt) = bare_option_value(sql) {
        reply_error(
            s,
            proto,
            false,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &format!("write the value of COPY option {opt} as a quoted string (PostgreSQL lower-cases a bare word there; the node splits rows by the option's exact value)"),
        );
        return Ok(());
    }
    let mut st: Vec<ShardCopy> = shards
        .iter()
        .map(|&t| {
            let mut sc = ShardCopy::new(t);
            sc.name = shard_name(s, t);
            sc
        })
        .collect();
    let res = async {
        match setup_from(s, plan, shards, &mut st, sql, in_tx).await? {
            Ok(splitter) => {
                let r = copy_in_loop(s, d, plan, &mut st, splitter, in_tx).await?;
                end_from(s, plan, &mut st, in_tx, proto, r).await
            }
            Err(f) => {
                abort_shards(s, &mut st, &f.msg).await?;
                reply_error(s, proto, false, &f.code, &f.msg);
                if !in_tx {
                    s.end_of_transaction().await?;
                }
                Ok(())
            }
        }
    }
    .await;
    if res.is_err() {
        // Also the shards this COPY started on its own (see `run`).
        for sc in &st {
            if let Some(b) = s.be.slots[sc.t].conn.as_mut() {
                b.broken = true;
            }
        }
    }
    res
}

/// Before copy-in mode: backends, columns, the shards' COPYs started
/// (outside a transaction block) and the client's CopyInResponse.
pub(super) async fn setup_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    shards: &[usize],
    st: &mut [ShardCopy],
    sql: &str,
    in_tx: bool,
) -> Result<Result<Option<RowSplitter>, Fail>, SessionError> {
    let max_row = s.node.cfg().max_message_size;
    // Outside a transaction block every shard starts now; inside one, the
    // shard of the first row. Either way every shard's column order is
    // read and must agree (a row is split by it before its shard is known).
    let probe: Vec<usize> = shards.to_vec();
    for &t in &probe {
        if let Err(r) = s.ensure_backend(t).await? {
            return Ok(Err(r.into()));
        }
    }
    let splitter = match plan.sharded() {
        None => None,
        Some(_) => {
            let cols = match copied_columns(s, plan, &probe).await? {
                Ok(c) => c,
                Err(f) => return Ok(Err(f)),
            };
            match plan.splitter(&cols, max_row) {
                Ok(sp) => Some((sp, cols.len())),
                Err(e) => return Ok(Err(e.into())),
            }
        }
    };
    let response = if in_tx {
        let n = splitter.as_ref().map(|(_, n)| *n).unwrap_or(0);
        let fmt = u8::from(plan.format == CopyFormat::Binary);
        let mut g = BytesMut::new();
        wire::frame(&mut g, be::COPY_IN_RESPONSE, |o| {
            o.put_u8(fmt);
            o.put_i16(n as i16);
            for _ in 0..n {
                o.put_i16(i16::from(fmt));
            }
        });
        g.freeze()
    } else {
        // Send to every shard first: they start in parallel.
        let mut buf = BytesMut::new();
        frontend::query("BEGIN", &mut buf).map_err(|_| encode_fatal())?;
        frontend::query(sql, &mut buf).map_err(|_| encode_fatal())?;
        for sc in st.iter() {
            if let Some(b) = s.be.slots[sc.t].conn.as_mut() {
                if let Err(e) = b.write_frames(&buf).await {
                    return Err(s.be.lost(sc.t, WireError::Io(e)));
                }
            }
        }
        let mut first: Option<Bytes> = None;
        for sc in st.iter_mut() {
            if let Some(g) = read_start(s, sc, true).await? {
                first.get_or_insert(g);
            }
        }
        if let Some(sc) = st.iter().find(|sc| sc.error.is_some()) {
            let (code, msg) = sc.error.clone().unwrap_or_default();
            let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
            return Ok(Err(Fail { code, msg: m }));
        }
        match first {
            Some(g) => g,
            None => {
                return Ok(Err(Fail::new(
                    sqlstate::INTERNAL_ERROR,
                    "no shard started the COPY",
                )))
            }
        }
    };
    s.out.put_slice(&response);
    s.flush_client().await?;
    Ok(Ok(splitter.map(|(sp, _)| sp)))
}

/// How the client ended its data.
pub(super) enum InEnd {
    Done,
    /// The client's CopyFail (its message).
    ClientFail(String),
    /// The node stops the COPY with this error.
    Stop(Fail),
}

/// A row routed after the message it came in: its range was frozen, or
/// its shard is not in this COPY yet (see [`route_held`]).
pub(super) struct Held {
    data: Vec<u8>,
    key: hotrepart_router::catalog::KeyValue,
}

/// Copy-in mode: client CopyData split over the shards until CopyDone,
/// CopyFail or an error.
///
/// Rows are routed by the routing table current when their CopyData
/// message arrives (reloaded when its epoch changes). A row that the
/// table cannot place at once — its range is frozen for a cut-over, or its
/// owner is a shard this COPY has not started — is held, with every later
/// row of that message (row order per shard is kept), and routed by
/// [`route_held`] before the next message is read.
pub(super) async fn copy_in_loop<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    st: &mut Vec<ShardCopy>,
    mut splitter: Option<RowSplitter>,
    in_tx: bool,
) -> Result<InEnd, SessionError> {
    let mut snap = s.node.routing.catalog.load_full();
    let mut pos_of = shard_positions(s, &snap, st);
    let mut header: Option<Bytes> = None;
    let mut held: Vec<Held> = Vec::new();
    loop {
        let f = read_client(s).await?;
        let done = match f.tag() {
            fe::COPY_DATA => false,
            fe::COPY_DONE => true,
            fe::COPY_FAIL => {
                let mut b = f.body();
                let m = wire::get_cstr(&mut b).unwrap_or("").to_string();
                return Ok(InEnd::ClientFail(m));
            }
            fe::FLUSH | fe::SYNC => continue,
            other => {
                return Ok(InEnd::Stop(Fail::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                )))
            }
        };
        if s.node.routing.catalog.load().epoch() != snap.epoch() {
            snap = s.node.routing.catalog.load_full();
            pos_of = shard_positions(s, &snap, st);
        }
        let res: Result<(), Fail> = match splitter.as_mut() {
            None => {
                // Reference table: the same data to every shard.
                for sc in st.iter_mut() {
                    sc.push_data(f.body());
                }
                Ok(())
            }
            Some(sp) => {
                let mut emit = |p: Piece<'_>| -> Result<(), Fail> {
                    match p {
                        Piece::Header(h) => {
                            header = Some(Bytes::copy_from_slice(h));
                            Ok(())
                        }
                        Piece::Row { data, key } => {
                            let Some(key) = key else {
                                return Err(Fail::new(
                                    sqlstate::INTERNAL_ERROR,
                                    "a sharded COPY row without a key",
                                ));
                            };
                            if !held.is_empty() {
                                held.push(Held {
                                    data: data.to_vec(),
                                    key,
                                });
                                return Ok(());
                            }
                            let range = plan.range(&snap, &key)?;
                            let pos = match pos_of.get(&range.write_owner) {
                                Some(&p) if range.status != RangeStatus::Frozen => p,
                                _ => {
                                    held.push(Held {
                                        data: data.to_vec(),
                                        key,
                                    });
                                    return Ok(());
                                }
                            };
                            place(st, pos, header.as_ref(), data)
                        }
                    }
                };
                if done {
                    sp.finish(&mut emit)
                } else {
                    sp.feed(f.body(), &mut emit)
                }
            }
        };
        if let Err(fail) = res {
            return Ok(InEnd::Stop(fail));
        }
        if !held.is_empty() {
            // The rows queued so far were routed by the table this COPY's
            // pin holds, and waiting out a frozen range drops the pin:
            // they reach their shards first (started, sent), so that a
            // cut-over of their ranges meanwhile waits for this COPY (its
            // running statement, its open transaction) instead of missing
            // them.
            if let Some(fail) = start_queued(s, d, st, in_tx).await? {
                return Ok(InEnd::Stop(fail));
            }
            for sc in st.iter_mut().filter(|sc| sc.started) {
                send_shard(s, sc).await?;
                if let Some((code, msg)) = sc.error.clone() {
                    let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
                    return Ok(InEnd::Stop(Fail { code, msg: m }));
                }
            }
            let rows = std::mem::take(&mut held);
            let r = route_held(
                s,
                plan,
                st,
                &mut snap,
                &mut pos_of,
                in_tx,
                header.as_ref(),
                rows,
            )
            .await;
            if let Err(fail) = r {
                return Ok(InEnd::Stop(fail));
            }
        }
        if let Some(fail) = start_queued(s, d, st, in_tx).await? {
            return Ok(InEnd::Stop(fail));
        }
        for sc in st.iter_mut() {
            if done || sc.out.len() >= FLUSH_AT {
                if done {
                    // Every shard needs the header, rows or not (binary:
                    // the file header, and the trailer the node sends).
                    if sc.started {
                        sc.header(header.as_ref());
                        if splitter.is_some() && plan.format == CopyFormat::Binary {
                            sc.push_data(&[0xff, 0xff]);
                        }
                    }
                }
                send_shard(s, sc).await?;
            }
            if let Some((code, msg)) = sc.error.clone() {
                let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
                return Ok(InEnd::Stop(Fail { code, msg: m }));
            }
        }
        if done {
            return Ok(InEnd::Done);
        }
    }
}

/// Starts the COPY on each shard that has rows queued and has not started
/// it: inside a transaction block every shard (the transaction then
/// commits with two-phase commit when it wrote several); outside, a shard
/// the routing table gained during this COPY. The rows queued for it wait
/// while the COPY starts.
async fn start_queued<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    st: &mut [ShardCopy],
    in_tx: bool,
) -> Result<Option<Fail>, SessionError> {
    for sc in st.iter_mut() {
        if sc.started || sc.done || sc.out.is_empty() {
            continue;
        }
        if in_tx {
            if let Err(r) = s.check_write(d, sc.t) {
                return Ok(Some(r.into()));
            }
        }
        if let Err(r) = s.ensure_backend(sc.t).await? {
            return Ok(Some(r.into()));
        }
        if in_tx {
            s.be.cur = sc.t;
        }
        start_shard(s, sc, &d.sql_text, !in_tx).await?;
        if let Some((code, msg)) = sc.error.clone() {
            let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
            return Ok(Some(Fail { code, msg: m }));
        }
    }
    Ok(None)
}

/// Queues a row for `st[pos]` (after the header, once).
pub(super) fn place(
    st: &mut [ShardCopy],
    pos: usize,
    header: Option<&Bytes>,
    data: &[u8],
) -> Result<(), Fail> {
    let sc = &mut st[pos];
    sc.header(header);
    sc.push_data(data);
    sc.rows += 1;
    Ok(())
}

/// Routes held rows, in order, waiting where needed:
///
/// - A row whose owner is a shard this COPY has not started (the routing
///   table gained it during the COPY) gets that shard added; its COPY is
///   started by the caller before anything is sent to it.
/// - A row of a **frozen** range (a cut-over in progress) waits for the
///   next routing table with the node's [`crate::routing::state::FreezeWait`] — the
///   same wait, bounded by `freeze_wait_ms`, as a statement's — and is
///   routed again by it (after the cut-over, to the new owner); past the
///   bound: 40001, the COPY fails and nothing of it lands.
/// - But not when this COPY's transaction has written to the frozen
///   range's source (rows of this COPY queued or sent there, or, inside a
///   transaction block, an earlier write there): the cut-over waits for
///   every transaction open on the source at the freeze to end before it
///   can flip (`jobs::wait_open_transactions`), so waiting here would only
///   hold both up until the cut-over gives up (5 s), thaws and fails its
///   attempt (a job fails after 4 attempts). Such a row fails the COPY at
///   once with 40001: its rollback lets the cut-over go on, and the client
///   retries the COPY after it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn route_held<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    st: &mut Vec<ShardCopy>,
    snap: &mut Arc<RoutingSnapshot>,
    pos_of: &mut HashMap<ShardId, usize>,
    in_tx: bool,
    header: Option<&Bytes>,
    rows: Vec<Held>,
) -> Result<(), Fail> {
    let mut wait: Option<crate::routing::state::FreezeWait> = None;
    let mut i = 0;
    while i < rows.len() {
        let row = &rows[i];
        let range = plan.range(snap, &row.key)?;
        if range.status == RangeStatus::Frozen {
            let source = s.node.routing.shard_index(range.write_owner.as_str());
            let wrote_source = pos_of
                .get(&range.write_owner)
                .is_some_and(|&p| st[p].rows > 0)
                || (in_tx && source.is_some_and(|t| s.txn.writes.contains(&t)));
            let frozen = |why: &str| {
                Fail::new(
                    sqlstate::SERIALIZATION_FAILURE,
                    format!(
                        "the key range of key {} of \"{}\" is frozen for a cut-over {why}; retry the COPY",
                        row.key, plan.table
                    ),
                )
            };
            if wrote_source {
                return Err(frozen(&format!(
                    "that waits for this transaction, which wrote to its source shard {}",
                    range.write_owner
                )));
            }
            match wait.as_mut() {
                None => {
                    // Subscribe first, then read the current table: a
                    // table published in between is not missed.
                    wait = Some(s.node.routing.freeze_wait());
                }
                Some(w) => {
                    // Nothing of this COPY is in flight to the frozen
                    // range's source (checked above), so its pin goes while
                    // it waits (a fence must not wait for it), and comes
                    // back for the next table. Rows sent to other shards
                    // are not affected by this cut-over.
                    s.be.pin = None;
                    let next = w.next_table().await;
                    s.pin_routing();
                    if !next {
                        return Err(frozen("that did not end in time"));
                    }
                }
            }
            *snap = s.node.routing.catalog.load_full();
            *pos_of = shard_positions(s, snap, st);
            continue;
        }
        let pos = match pos_of.get(&range.write_owner) {
            Some(&p) => p,
            None => {
                let Some(t) = s.node.routing.shard_index(range.write_owner.as_str()) else {
                    return Err(Fail::new(
                        sqlstate::INTERNAL_ERROR,
                        format!(
                            "shard {} of the routing table is not configured on this node",
                            range.write_owner
                        ),
                    ));
                };
                let mut sc = ShardCopy::new(t);
                sc.name = s.node.routing.shard_name(t);
                st.push(sc);
                pos_of.insert(range.write_owner.clone(), st.len() - 1);
                st.len() - 1
            }
        };
        place(st, pos, header, &row.data)?;
        i += 1;
    }
    Ok(())
}

/// After copy-in mode: CopyDone (or CopyFail) to the shards, their answers,
/// COMMIT or ROLLBACK, and the client's reply.
pub(super) async fn end_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    st: &mut [ShardCopy],
    in_tx: bool,
    proto: Proto,
    end: InEnd,
) -> Result<(), SessionError> {
    let fail = match end {
        InEnd::Done => None,
        InEnd::ClientFail(m) => Some(Fail::new(
            sqlstate::QUERY_CANCELED,
            format!("COPY from stdin failed: {m}"),
        )),
        InEnd::Stop(f) => Some(f),
    };
    if let Some(f) = fail {
        abort_shards(s, st, &f.msg).await?;
        reply_error(s, proto, true, &f.code, &f.msg);
        if !in_tx {
            s.end_of_transaction().await?;
        }
        return Ok(());
    }
    for sc in st.iter_mut() {
        if sc.started && !sc.done {
            sc.out.put_slice(&[fe::COPY_DONE, 0, 0, 0, 4]);
            send_shard(s, sc).await?;
        }
    }
    for sc in st.iter_mut() {
        if sc.started {
            finish_shard(s, sc, None).await?;
        }
    }
    if let Some(sc) = st.iter().find(|sc| sc.error.is_some()) {
        let (code, msg) = sc.error.clone().unwrap_or_default();
        let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
        reply_error(s, proto, true, &code, &m);
        if !in_tx {
            s.end_of_transaction().await?;
        }
        return Ok(());
    }
    let total = if plan.placement == CopyTable::Reference {
        st.first().map(ShardCopy::count).unwrap_or(0)
    } else {
        st.iter().map(ShardCopy::count).sum()
    };
    if !in_tx {
        // All shards succeeded. Several shards: two-phase commit, all or
        // nothing (the client gets the error and nothing is copied, or 58000
        // / 08007 when the commit is decided / in doubt).
        let open: Vec<usize> = st
            .iter()
            .map(|sc| sc.t)
            .filter(|&t| {
                s.be.slots[t]
                    .conn
                    .as_ref()
                    .is_some_and(|b| b.status == tx::IN_TRANSACTION)
            })
            .collect();
        if open.len() > 1 {
            if let Err(r) = crate::exec::twopc::commit(s, &open).await {
                reply_error(s, proto, true, r.code, &r.message);
                s.end_of_transaction().await?;
                return Ok(());
            }
            reply_done(s, proto, true, total);
            s.end_of_transaction().await?;
            return Ok(());
        }
        // One shard: its COMMIT.
        let mut committed = Vec::new();
        let mut unknown: Vec<usize> = Vec::new();
        let mut failed: Option<(usize, String, String)> = None;
        for sc in st.iter() {
            let Some(b) = s.be.slots[sc.t].conn.as_mut() else {
                continue;
            };
            let sql = if failed.is_some() {
                "ROLLBACK"
            } else {
                "COMMIT"
            };
            match b.hidden_query(sql).await {
                Ok(_) if b.status == tx::IDLE && sql == "COMMIT" => committed.push(sc.t),
                Ok(_) => {}
                Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                    if failed.is_none() {
                        failed = Some((sc.t, code, message));
                    }
                }
                Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                    b.broken = true;
                    if sql == "COMMIT" {
                        // The shard may have committed before the
                        // connection broke: its outcome is unknown.
                        unknown.push(sc.t);
                    }
                    if failed.is_none() {
                        failed = Some((sc.t, sqlstate::CONNECTION_FAILURE.into(), e.to_string()));
                    }
                }
            }
        }
        if let Some((t, code, msg)) = failed {
            if !unknown.is_empty() {
                let names: Vec<String> = committed
                    .iter()
                    .chain(&unknown)
                    .map(|&c| shard_name(s, c))
                    .collect();
                let msg = format!(
                    "the connection to shard {} broke while committing the COPY ({msg}); the outcome there is unknown: shard(s) {} may hold their rows, the others were rolled back",
                    shard_name(s, t),
                    names.join(", ")
                );
                reply_error(
                    s,
                    proto,
                    true,
                    sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
                    &msg,
                );
                s.end_of_transaction().await?;
                return Ok(());
            }
            let msg = if committed.is_empty() {
                format!(
                    "{msg} (committing on shard {}); nothing was copied",
                    shard_name(s, t)
                )
            } else {
                let names: Vec<String> = committed.iter().map(|&c| shard_name(s, c)).collect();
                format!(
                    "the COPY succeeded on every shard but committing failed on shard {} ({msg}); shard(s) {} had already committed their rows",
                    shard_name(s, t),
                    names.join(", ")
                )
            };
            let code = if committed.is_empty() {
                code
            } else {
                sqlstate::STATEMENT_COMPLETION_UNKNOWN.into()
            };
            reply_error(s, proto, true, &code, &msg);
            s.end_of_transaction().await?;
            return Ok(());
        }
    }
    reply_done(s, proto, true, total);
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}
