//! A cursor merged over several shards: `DECLARE` of a query that reads
//! rows of several shards declares a cursor of the same name on each of
//! them (inside the client's transaction block), and the node serves
//! `FETCH`/`MOVE` forward itself:
//!
//! - without ORDER BY, the shards' rows are concatenated: one shard is read
//!   to its end, then the next;
//! - with ORDER BY (sorted by every shard: `MergePlan::shards_sorted`),
//!   per-shard batches are merged k-way, with the merge's comparisons
//!   ([`super::combine::compare_rows`], PostgreSQL's order for each type;
//!   text under the C collation only).
//!
//! Memory: at most one batch per shard (`FETCH FORWARD b` with `b` the
//! count asked, between [`MIN_BATCH`] and [`MAX_BATCH`]) is held between
//! the client's statements. What cannot be served forward and
//! incrementally is refused at `DECLARE` (0A000): aggregates, GROUP BY,
//! DISTINCT, LIMIT/OFFSET, an order the shards cannot give, `SCROLL`,
//! `BINARY`, `WITH HOLD`; and so are the other fetch directions.

use super::combine::{compare_rows, Field, MergeError, Ranks, Row};
use super::packed::Packed;
use super::value::Ty;
use crate::backend::conn::HiddenQueryError;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::session::conn::Session;
use crate::wire::{self, be, tx, Frame, WireError};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::route::MergePlan;
use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// The smallest batch asked of a shard (a `FETCH 1` loop does not cost a
/// round trip per row on every shard).
pub(crate) const MIN_BATCH: u64 = 100;
/// The largest batch asked of a shard (`FETCH ALL` reads in batches).
pub(crate) const MAX_BATCH: u64 = 1000;

/// A cursor merged over several shards, as the session holds it.
pub(crate) struct Merged {
    /// The shards, in order (concatenation reads them in this order).
    pub(crate) shards: Vec<usize>,
    /// ORDER BY and the hidden leading columns; None: concatenation of
    /// the query's own columns.
    plan: Option<Arc<MergePlan>>,
    /// The cursor's name quoted, for the shards' statements.
    quoted: String,
    /// The shards' columns, known after the first fetch.
    fields: Option<Vec<Field>>,
    types: Vec<Ty>,
    /// Rows fetched from each shard and not yet given to the client.
    bufs: Vec<VecDeque<Row>>,
    /// The shard's cursor is at its end.
    ended: Vec<bool>,
    /// Concatenation: the shard being read.
    current: usize,
}

impl Merged {
    fn hidden(&self) -> usize {
        self.plan.as_ref().map_or(0, |p| p.hidden)
    }

    fn ordered(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| !p.order_by.is_empty())
    }
}

fn refusal(m: impl Into<String>) -> Refusal {
    Refusal::new(sqlstate::FEATURE_NOT_SUPPORTED, m.into())
}

/// Whether a cursor over several shards can be served for `plan` (None: a
/// plain concatenation); the refusal says what is not supported.
pub(crate) fn check_plan(plan: Option<&MergePlan>) -> Result<(), Refusal> {
    let Some(p) = plan else { return Ok(()) };
    let what = if p.aggregate.is_some() {
        Some("aggregates or GROUP BY")
    } else if p.distinct {
        Some("DISTINCT")
    } else if !p.distinct_on.is_empty() {
        Some("DISTINCT ON")
    } else if p.limit.is_some() || p.offset.is_some() {
        Some("LIMIT or OFFSET")
    } else if !p.order_by.is_empty() && !p.shards_sorted {
        Some("an ORDER BY on expressions the shards cannot sort by")
    } else {
        None
    };
    match what {
        Some(w) => Err(refusal(format!(
            "DECLARE CURSOR: the query reads rows of several shards and has {w}, which hotrepart cannot merge incrementally for a cursor; run the query without a cursor, or restrict it to one shard by its shard key"
        ))),
        None => Ok(()),
    }
}

/// The refusal of a fetch direction a merged cursor does not serve.
pub(crate) fn direction_refused(dir: &str) -> Refusal {
    refusal(format!(
        "FETCH/MOVE {dir}: a cursor whose query reads rows of several shards is read forward only (NEXT, FORWARD n, FORWARD ALL, n, ALL); declare it over one shard for other directions"
    ))
}

/// Declares cursor `name` on every shard of `shards` (`texts`: the query
/// each runs), inside the client's open transaction. Ok(Err): the
/// ErrorResponse for the client (a refusal, or a shard's own error).
pub(crate) async fn declare<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    name: &str,
    shards: &[usize],
    plan: Option<Arc<MergePlan>>,
    texts: &[String],
    params: Option<&ExtParams>,
    hold: bool,
) -> Result<Result<Merged, Bytes>, SessionError> {
    let quoted = crate::sql::quote_ident(name);
    let with_hold = if hold { " WITH HOLD" } else { "" };
    for (i, &t) in shards.iter().enumerate() {
        let r = declare_on(s, t, &quoted, with_hold, texts.get(i), params).await?;
        if r.is_err() && hold && !s.txn.open() {
            // Outside a transaction block each shard's DECLARE committed on
            // its own: those made are closed again.
            close_parts(s, &shards[..i], &quoted).await;
        }
        if let Err(e) = r {
            return Ok(Err(e));
        }
    }
    let mut m = Merged {
        shards: shards.to_vec(),
        plan,
        quoted: quoted.clone(),
        fields: None,
        types: Vec::new(),
        bufs: shards.iter().map(|_| VecDeque::new()).collect(),
        ended: vec![false; shards.len()],
        current: 0,
    };
    if let Err(e) = describe_first(s, &mut m, name).await? {
        if hold && !s.txn.open() {
            close_parts(s, shards, &quoted).await;
        }
        return Ok(Err(e));
    }
    Ok(Ok(m))
}

/// Closes cursor `quoted` on `shards` (holdable parts declared outside a
/// transaction block, each committed on its own, of a DECLARE that
/// failed); a backend where that fails is closed instead of pooled.
async fn close_parts<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    shards: &[usize],
    quoted: &str,
) {
    for &t in shards {
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            if b.hidden_query(&format!("CLOSE {quoted}")).await.is_err() {
                b.broken = true;
            }
        }
    }
}

/// `DECLARE` of one shard's part of a merged cursor (`quoted`: its name).
async fn declare_on<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
    quoted: &str,
    with_hold: &str,
    text: Option<&String>,
    params: Option<&ExtParams>,
) -> Result<Result<(), Bytes>, SessionError> {
    if let Err(r) = s.ensure_backend(t).await? {
        return Ok(Err(error_frame(r.code, &r.message)));
    }
    let sql = format!(
        "DECLARE {quoted} NO SCROLL CURSOR{with_hold} FOR {}",
        text.map_or("", String::as_str)
    );
    if let Some(p) = params {
        return run_with_params(s, t, &sql, p).await;
    }
    let Some(b) = s.be.slots[t].conn.as_mut() else {
        return Ok(Err(error_frame(
            sqlstate::CONNECTION_FAILURE,
            "a shard's connection was lost",
        )));
    };
    match b.hidden_query(&sql).await {
        Ok(_) => Ok(Ok(())),
        Err(HiddenQueryError::Server { code, message }) => Ok(Err(error_frame(&code, &message))),
        Err(HiddenQueryError::Wire(e)) => Err(s.be.lost(t, e)),
    }
}

/// An ErrorResponse frame.
pub(crate) fn error_frame(code: &str, msg: &str) -> Bytes {
    let mut e = BytesMut::new();
    wire::error_response(&mut e, wire::Severity::Error, code, msg);
    e.freeze()
}

/// Closes the cursor on its shards (those whose transaction failed
/// already skip it: it ends with the transaction). A shard's error comes
/// back (its transaction failed there: the client must hear it, or its
/// COMMIT would roll back unexplained); every shard is still tried.
pub(crate) async fn close<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    m: &Merged,
) -> Result<Option<Bytes>, SessionError> {
    let mut first = None;
    for &t in &m.shards {
        let Some(b) = s.be.slots[t].conn.as_mut() else {
            continue;
        };
        if b.status == tx::FAILED {
            continue;
        }
        match b.hidden_query(&format!("CLOSE {}", m.quoted)).await {
            Ok(_) => {}
            Err(HiddenQueryError::Server { code, message }) => {
                first = first.or_else(|| Some(error_frame(&code, &message)));
            }
            Err(HiddenQueryError::Wire(e)) => return Err(s.be.lost(t, e)),
        }
    }
    Ok(first)
}

/// How a FETCH's rows reach the client.
pub(crate) struct FetchOut {
    /// Send a RowDescription first (simple protocol; extended: a Describe
    /// of the portal).
    pub(crate) describe: bool,
    /// The client's result format codes (Bind): none = all text, one = all
    /// columns, else one per column.
    pub(crate) formats: Vec<i16>,
    /// An Execute of a portal (the protocol's cursor) rather than a
    /// FETCH: it ends as PostgreSQL's does, with PortalSuspended when the
    /// row limit was reached, else CommandComplete `SELECT n`.
    pub(crate) portal: bool,
}

impl FetchOut {
    pub(crate) fn binary(&self, col: usize) -> bool {
        match self.formats.len() {
            0 => false,
            1 => self.formats[0] == 1,
            _ => self.formats.get(col) == Some(&1),
        }
    }
}

/// `FETCH`/`MOVE` forward `count` rows (None: all): RowDescription (as
/// `how` says), the rows, CommandComplete. The caller adds ReadyForQuery.
/// An error (a shard's, or a merge's) goes to the client and fails the
/// transaction.
pub(crate) async fn fetch<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    m: &mut Merged,
    count: Option<u64>,
    is_move: bool,
    how: &FetchOut,
) -> Result<(), SessionError> {
    let want = count.unwrap_or(u64::MAX);
    let batch = count.unwrap_or(MAX_BATCH).clamp(MIN_BATCH, MAX_BATCH);
    // Columns the client wants in binary: their type OIDs (0: text).
    let hidden = m.hidden();
    let binary: Vec<u32> = m
        .fields
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .skip(hidden)
        .enumerate()
        .map(|(i, f)| match (how.binary(i), f.type_oid()) {
            (false, _) => 0,
            // An enum's binary value is its label, as in text.
            (true, oid) if s.home_enum(&m.shards, oid) => 25,
            (true, oid) => oid,
        })
        .collect();
    if let Some(&oid) = binary
        .iter()
        .find(|&&oid| oid != 0 && !super::binary::supported(oid))
    {
        s.push_error(&refusal(format!(
            "binary results of type OID {oid} are not supported for a cursor over several shards; ask for text results"
        )));
        return Ok(());
    }
    let binary = if binary.iter().all(|&o| o == 0) {
        Vec::new()
    } else {
        binary
    };
    if !is_move && how.describe {
        row_description(m, &mut s.out, &|i| how.binary(i));
    }
    // The rows go out as they come (flushed every 64 kB): no more than a
    // batch per shard is held.
    let mut sent = 0u64;
    let res = fetch_into(s, m, want, batch, is_move, &binary, &mut sent).await?;
    if let Err(e) = res {
        match e {
            Failure::Shard(f) => {
                s.out.put_slice(&f.raw);
                s.txn.failed = true;
            }
            Failure::Merge(MergeError(code, msg)) => s.push_error(&Refusal::new(code, msg)),
        }
        return Ok(());
    }
    if how.portal {
        // PostgreSQL: a portal that gave as many rows as asked is
        // suspended (even when no row is left); fewer: it completed.
        if count.is_some() && sent == want {
            wire::frame(&mut s.out, be::PORTAL_SUSPENDED, |_| {});
        } else {
            s.out
                .put_slice(&wire::command_complete(&format!("SELECT {sent}")));
        }
        return Ok(());
    }
    let tag = if is_move { "MOVE" } else { "FETCH" };
    s.out
        .put_slice(&wire::command_complete(&format!("{tag} {sent}")));
    Ok(())
}

enum Failure {
    /// A shard's ErrorResponse, as it came.
    Shard(Frame),
    Merge(MergeError),
}

async fn fetch_into<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    m: &mut Merged,
    want: u64,
    batch: u64,
    is_move: bool,
    binary: &[u32],
    sent: &mut u64,
) -> Result<Result<(), Failure>, SessionError> {
    let hidden = m.hidden();
    while *sent < want {
        let pick = if m.ordered() {
            for i in 0..m.shards.len() {
                if m.bufs[i].is_empty() && !m.ended[i] {
                    if let Err(f) = refill(s, m, i, batch).await? {
                        return Ok(Err(f));
                    }
                }
            }
            let plan = m.plan.clone();
            let Some(plan) = plan else { break };
            let mut best: Option<usize> = None;
            for i in 0..m.shards.len() {
                let Some(r) = m.bufs[i].front() else { continue };
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let other = m.bufs[b].front().map_or(&[][..], Vec::as_slice);
                        match compare_rows(&plan, &m.types, &Ranks::default(), r.as_slice(), other)
                        {
                            Ok(Ordering::Less) => Some(i),
                            Ok(_) => Some(b),
                            Err(e) => return Ok(Err(Failure::Merge(e))),
                        }
                    }
                };
            }
            best
        } else {
            // Concatenation: the shards in turn.
            loop {
                let i = m.current;
                if i >= m.shards.len() {
                    break None;
                }
                if m.bufs[i].is_empty() && !m.ended[i] {
                    if let Err(f) = refill(s, m, i, batch).await? {
                        return Ok(Err(f));
                    }
                }
                if !m.bufs[i].is_empty() {
                    break Some(i);
                }
                m.current += 1;
            }
        };
        let Some(i) = pick else { break };
        let Some(row) = m.bufs[i].pop_front() else {
            break;
        };
        if !is_move {
            if let Err(e) =
                super::exec::put_out(&mut s.out, binary, row.get(hidden..).unwrap_or(&[]))
            {
                return Ok(Err(Failure::Merge(e)));
            }
            if s.out.len() > 64 * 1024 {
                s.flush_client().await?;
            }
        }
        *sent += 1;
    }
    Ok(Ok(()))
}

/// Fetches the next batch of shard `i` into its buffer (`ended` when it
/// gave fewer rows than asked).
async fn refill<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    m: &mut Merged,
    i: usize,
    batch: u64,
) -> Result<Result<(), Failure>, SessionError> {
    let t = m.shards[i];
    let mut q = BytesMut::new();
    wire::frame(&mut q, wire::fe::QUERY, |o| {
        wire::put_cstr(o, &format!("FETCH FORWARD {batch} FROM {}", m.quoted));
    });
    let Some(b) = s.be.slots[t].conn.as_mut() else {
        return Err(SessionError::Fatal {
            code: sqlstate::CONNECTION_FAILURE,
            msg: "a shard's connection was lost while a cursor was open".into(),
        });
    };
    if let Err(e) = b.write_frames(&q).await {
        return Err(s.be.lost(t, WireError::Io(e)));
    }
    let mut error: Option<Frame> = None;
    let mut got = 0u64;
    while let Some(b) = s.be.slots[t].conn.as_mut() {
        // A shard quiet for server_silence_timeout_ms is taken for stalled.
        let next = match s.be.silence {
            Some(d) => tokio::time::timeout(d, b.reader.next()).await.ok(),
            None => Some(b.reader.next().await),
        };
        let f = match next {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(s.be.lost(t, e)),
            None => return Err(s.be.silent(t)),
        };
        match f.tag() {
            be::ROW_DESCRIPTION => {
                let Some(fields) = super::exec::parse_desc(&f.raw) else {
                    return Err(s
                        .be
                        .lost(t, WireError::Protocol("malformed RowDescription".into())));
                };
                match &m.fields {
                    Some(known) if known.len() != fields.len() => {
                        error = error.or_else(|| {
                            Some(node_error(
                                "the shards' cursors return different numbers of columns",
                            ))
                        });
                    }
                    Some(_) => {}
                    None => {
                        m.types = fields.iter().map(|f| Ty::of(f.type_oid())).collect();
                        m.fields = Some(fields);
                    }
                }
            }
            be::DATA_ROW => {
                let body = f.raw.slice(5.min(f.raw.len())..);
                match Packed::check(body) {
                    Some(p) => m.bufs[i].push_back(p.to_row(0)),
                    None => {
                        return Err(s
                            .be
                            .lost(t, WireError::Protocol("malformed DataRow".into())))
                    }
                }
                got += 1;
            }
            be::ERROR_RESPONSE => error = error.or(Some(f)),
            be::READY_FOR_QUERY => {
                b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                break;
            }
            _ => {}
        }
    }
    if let Some(f) = error {
        return Ok(Err(Failure::Shard(f)));
    }
    if got < batch {
        m.ended[i] = true;
    }
    Ok(Ok(()))
}

/// An ErrorResponse of the node's, as a frame.
fn node_error(msg: &str) -> Frame {
    Frame {
        raw: error_frame(sqlstate::INTERNAL_ERROR, msg),
    }
}

/// The parameters of an extended-protocol `DECLARE`: the statement's
/// parameter types and the Bind's parameter part (formats and values), as
/// each shard's Bind takes them.
pub(crate) struct ExtParams {
    pub(crate) types: Vec<u32>,
    pub(crate) part: Bytes,
}

/// An extended-protocol batch holding one `DECLARE` whose query reads
/// rows of several shards: Parse (optional), Bind, Describe of the portal
/// (optional), Execute, Sync. Returns the Bind's parameters, or the words
/// of the refusal of another shape.
pub(crate) fn declare_batch<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    frames: &[Frame],
    synced: bool,
) -> Result<Result<ExtParams, Refusal>, SessionError> {
    const SHAPE: &str = "a DECLARE whose query reads rows of several shards must come in the extended protocol alone: Parse (optional), Bind, Describe of the portal (optional), Execute, Sync";
    if !synced {
        return Ok(Err(refusal(SHAPE)));
    }
    let (mut parse, mut bind, mut executed) = (None, None, false);
    for f in frames {
        match f.tag() {
            wire::fe::PARSE if parse.is_none() && bind.is_none() => parse = Some(f),
            wire::fe::BIND if bind.is_none() => bind = Some(f),
            wire::fe::DESCRIBE
                if bind.is_some() && !executed && f.body().first() == Some(&wire::PORTAL) => {}
            wire::fe::EXECUTE if bind.is_some() && !executed => executed = true,
            wire::fe::SYNC => {}
            _ => return Ok(Err(refusal(SHAPE))),
        }
    }
    let (Some(bind), true) = (bind, executed) else {
        return Ok(Err(refusal(SHAPE)));
    };
    bind_params(s, parse, bind).map(Ok)
}

/// The parameters of `bind` (a Bind of the statement `parse` parses, if
/// given, else of one the session knows), as each shard's Bind takes them.
pub(crate) fn bind_params<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &Session<S>,
    parse: Option<&Frame>,
    bind: &Frame,
) -> Result<ExtParams, SessionError> {
    let mut b = bind.body();
    let _portal = wire::get_cstr(&mut b).map_err(|e| super::exec::proto(&e))?;
    let stmt = wire::get_cstr(&mut b)
        .map_err(|e| super::exec::proto(&e))?
        .to_string();
    let mut rest = b;
    super::exec::skip_bind_params(&mut rest).map_err(|e| super::exec::proto(&e))?;
    let part = Bytes::copy_from_slice(&b[..b.len() - rest.len()]);
    let types = match parse {
        Some(p) if super::exec::parse_name(p).as_deref() == Some(stmt.as_str()) => {
            super::exec::parse_types(p)
        }
        _ => s.param_types(&stmt),
    };
    Ok(ExtParams { types, part })
}

/// Runs `sql` on shard `t` in the extended protocol with the client's
/// parameters (`p`), unnamed; Ok(Err): the shard's ErrorResponse.
async fn run_with_params<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
    sql: &str,
    p: &ExtParams,
) -> Result<Result<(), Bytes>, SessionError> {
    let mut q = BytesMut::new();
    wire::frame(&mut q, wire::fe::PARSE, |o| {
        o.put_u8(0);
        wire::put_cstr(o, sql);
        o.put_i16(p.types.len() as i16);
        for ty in &p.types {
            o.put_u32(*ty);
        }
    });
    wire::frame(&mut q, wire::fe::BIND, |o| {
        o.put_u8(0);
        o.put_u8(0);
        o.put_slice(&p.part);
        o.put_i16(0);
    });
    wire::frame(&mut q, wire::fe::EXECUTE, |o| {
        o.put_u8(0);
        o.put_i32(0);
    });
    wire::frame(&mut q, wire::fe::SYNC, |_| {});
    s.unnamed_replaced_on(&[t]);
    read_reply(s, t, &q).await.map(|r| r.map(|_| ()))
}

/// Sends `q` to shard `t` and reads its replies to ReadyForQuery; Ok(Ok):
/// the RowDescription's fields if one came; Ok(Err): its ErrorResponse.
async fn read_reply<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
    q: &[u8],
) -> Result<Result<Option<Vec<Field>>, Bytes>, SessionError> {
    let Some(b) = s.be.slots[t].conn.as_mut() else {
        return Ok(Err(error_frame(
            sqlstate::CONNECTION_FAILURE,
            "a shard's connection was lost",
        )));
    };
    if let Err(e) = b.write_frames(q).await {
        return Err(s.be.lost(t, WireError::Io(e)));
    }
    let (mut desc, mut error) = (None, None);
    while let Some(b) = s.be.slots[t].conn.as_mut() {
        // A shard quiet for server_silence_timeout_ms is taken for stalled.
        let next = match s.be.silence {
            Some(d) => tokio::time::timeout(d, b.reader.next()).await.ok(),
            None => Some(b.reader.next().await),
        };
        let f = match next {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(s.be.lost(t, e)),
            None => return Err(s.be.silent(t)),
        };
        match f.tag() {
            be::ROW_DESCRIPTION => desc = Some(f),
            be::ERROR_RESPONSE => error = error.or(Some(f.raw.clone())),
            be::READY_FOR_QUERY => {
                b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                break;
            }
            _ => {}
        }
    }
    if let Some(e) = error {
        return Ok(Err(e));
    }
    // Described in the home shard's OIDs of user types, as every answer
    // of the node is (`session/type_oids.rs`): the cursor's first shard
    // need not be the home shard.
    let fields = match desc {
        Some(f) => super::exec::parse_desc(&s.canonical_frame(t, f).await.raw),
        None => None,
    };
    Ok(Ok(fields))
}

/// Learns the cursor's columns from its first shard (Describe of the
/// portal the cursor is): a Describe of it, or its first FETCH, answers
/// with them.
async fn describe_first<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    m: &mut Merged,
    name: &str,
) -> Result<Result<(), Bytes>, SessionError> {
    let mut q = BytesMut::new();
    wire::frame(&mut q, wire::fe::DESCRIBE, |o| {
        o.put_u8(wire::PORTAL);
        wire::put_cstr(o, name);
    });
    wire::frame(&mut q, wire::fe::SYNC, |_| {});
    let Some(&t) = m.shards.first() else {
        return Ok(Ok(()));
    };
    match read_reply(s, t, &q).await? {
        Ok(Some(fields)) => {
            m.types = fields.iter().map(|f| Ty::of(f.type_oid())).collect();
            let oids: Vec<u32> = fields.iter().map(Field::type_oid).collect();
            m.fields = Some(fields);
            // Rows ordered by text: only where the node's byte order is
            // PostgreSQL's (as for a merged SELECT; a cursor streams, it
            // does not rank).
            if let Some(plan) = m.plan.clone() {
                let text = super::exec::text_comparisons(&plan, &m.types, &m.types, &oids);
                let shards = m.shards.clone();
                super::exec::learn_collations(s, &shards).await;
                if let Err(e) = super::exec::text_order(s, &plan, &shards, &text, false).await? {
                    return Ok(Err(error_frame(e.0, &e.1)));
                }
            }
            Ok(Ok(()))
        }
        Ok(None) => Ok(Ok(())),
        Err(e) => Ok(Err(e)),
    }
}

/// The RowDescription of the cursor's rows (`binary(i)`: column `i` in
/// binary), as a Describe of its portal or a FETCH answers; NoData before
/// its columns are known.
pub(crate) fn row_description(m: &Merged, out: &mut BytesMut, binary: &dyn Fn(usize) -> bool) {
    let Some(fields) = &m.fields else {
        wire::frame(out, be::NO_DATA, |_| {});
        return;
    };
    let hidden = m.hidden();
    wire::frame(out, be::ROW_DESCRIPTION, |o| {
        let cols = fields.get(hidden..).unwrap_or(&[]);
        o.put_i16(cols.len() as i16);
        for (i, f) in cols.iter().enumerate() {
            o.put_slice(&f.name);
            o.put_u8(0);
            o.put_slice(&f.meta[..16]);
            o.put_i16(i16::from(binary(i)));
        }
    });
}

/// The result format codes of a Bind.
pub(crate) fn bind_result_formats(bind: &Frame) -> Result<Vec<i16>, SessionError> {
    let mut b = bind.body();
    let proto = |e: WireError| super::exec::proto(&e);
    wire::get_cstr(&mut b).map_err(proto)?;
    wire::get_cstr(&mut b).map_err(proto)?;
    super::exec::skip_bind_params(&mut b).map_err(proto)?;
    let n = wire::get_i16(&mut b).map_err(proto)?;
    let mut formats = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        formats.push(wire::get_i16(&mut b).map_err(proto)?);
    }
    Ok(formats)
}
