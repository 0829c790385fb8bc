//! Runs a router [`MergePlan`] over several shards (a simple Query, or one
//! extended-protocol statement per batch; the shards always answer in text)
//! and sends the client the answer one PostgreSQL holding all rows would
//! give (in binary where the client's Bind asks for it).
//!
//! Two ways, chosen from the plan:
//! - **streaming** (no aggregation, no DISTINCT): a k-way merge over the
//!   shards' sorted streams (or their concatenation when nothing is
//!   ordered), OFFSET/LIMIT applied while streaming; memory holds one row per
//!   shard;
//! - **collecting** (aggregates, DISTINCT, or an order the shards cannot
//!   produce): rows are combined by group into at most `max_merge_rows`
//!   entries and `max_merge_bytes` of values and keys — more is an error
//!   (54000, 53200), never unbounded growth — then
//!   HAVING, outputs, DISTINCT, ORDER BY, OFFSET, LIMIT.
//!
//! Guarantee: values are compared and combined with PostgreSQL's semantics
//! for their type ([`super::value`]); text is ordered only when every shard
//! uses the C collation; anything else is an error naming what is missing.

use super::combine::*;
use super::packed::{Cols, GroupIndex, Packed};
use super::value::{self, Ty};
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::exec::multi::ShardStreams;
use crate::routing::BindParams;
use crate::session::conn::{Backends, Session};
use crate::wire::{self, Frame, Severity, WireError};
use crate::wire::{be, fe, tx};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::route::{
    Combined, CompareOp, HavingExpr, LimitSpec, Literal, MergePlan, Operand, Partial, ShardCol,
};
use postgres_protocol::message::frontend;
use std::cmp::Ordering;
use tokio::io::{AsyncRead, AsyncWrite};

/// A RowDescription's fields and a DataRow's values; None when the frame
/// is malformed (a backend's bytes never panic the merge).
pub(super) use hotrepart_wire::backend::row_description as parse_desc;

/// A DataRow; columns whose entry in `binary` is a type OID (not 0) are
/// converted to binary.
pub(super) fn put_out(
    out: &mut BytesMut,
    binary: &[u32],
    row: &[Option<Bytes>],
) -> Result<(), MergeError> {
    if binary.is_empty() {
        put_row(out, row);
        return Ok(());
    }
    let mut conv = Vec::with_capacity(row.len());
    for (i, v) in row.iter().enumerate() {
        conv.push(match (v, binary.get(i).copied().unwrap_or(0)) {
            (Some(v), oid) if oid != 0 => Some(
                super::binary::to_binary(oid, v)
                    .map_err(|m| MergeError(sqlstate::INVALID_BINARY_REPRESENTATION, m))?,
            ),
            (v, _) => v.clone(),
        });
    }
    put_row(out, &conv);
    Ok(())
}

pub(super) fn put_row(out: &mut BytesMut, row: &[Option<Bytes>]) {
    wire::frame(out, be::DATA_ROW, |o| {
        o.put_i16(row.len() as i16);
        for v in row {
            match v {
                None => o.put_i32(-1),
                Some(b) => {
                    o.put_i32(b.len() as i32);
                    o.put_slice(b);
                }
            }
        }
    });
}

/// The shards' reply streams (see [`crate::exec::multi::ShardStreams`]) and which
/// of them the merge has read to their ReadyForQuery.
pub(super) struct Streams {
    inner: ShardStreams,
    shards: Vec<usize>,
    done: Vec<bool>,
}

impl Streams {
    fn new(shards: &[usize]) -> Streams {
        Streams {
            inner: ShardStreams::new(shards, 1, true),
            shards: shards.to_vec(),
            done: vec![false; shards.len()],
        }
    }

    async fn frame(&mut self, be: &mut Backends, i: usize) -> Result<Option<Frame>, SessionError> {
        self.inner.frame(be, i).await
    }

    /// Next data row of stream `i` (None at its end). Errors are recorded
    /// (when read, by `frame`).
    async fn next(&mut self, be: &mut Backends, i: usize) -> Result<Option<Row>, SessionError> {
        Ok(self.next_packed(be, i).await?.map(|p| p.to_row(0)))
    }

    /// Next data row of stream `i`, its values read in place (no copy).
    async fn next_packed(
        &mut self,
        be: &mut Backends,
        i: usize,
    ) -> Result<Option<Packed<Bytes>>, SessionError> {
        while !self.done[i] {
            let t = self.shards[i];
            let Some(f) = self.frame(be, i).await? else {
                self.done[i] = true;
                break;
            };
            match f.tag() {
                be::DATA_ROW => {
                    let body = f.raw.slice(5.min(f.raw.len())..);
                    return match Packed::check(body) {
                        Some(row) => Ok(Some(row)),
                        None => Err(be.lost(t, WireError::Protocol("malformed DataRow".into()))),
                    };
                }
                be::READY_FOR_QUERY => {
                    if let Some(b) = be.slots[t].conn.as_mut() {
                        b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                    }
                    self.done[i] = true;
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Reads every stream to its end.
    async fn drain(&mut self, be: &mut Backends) -> Result<(), SessionError> {
        for i in 0..self.shards.len() {
            while self.next(be, i).await?.is_some() {}
        }
        Ok(())
    }
}

/// How the merged answer reaches the client.
pub(crate) struct Output {
    /// Send a RowDescription first (simple protocol; extended: Describe).
    describe: bool,
    /// The client's result format codes (Bind): none = all text, one = all
    /// columns, else one per column.
    formats: Vec<i16>,
    /// Execute's row limit (asyncpg's `fetchrow`/`fetchval` send 1): at
    /// most this many rows, then PortalSuspended when more would follow.
    /// The portal cannot be executed again (`session/extended.rs`).
    max_rows: Option<u64>,
    /// Set when rows were left for a later Execute.
    suspended: std::sync::atomic::AtomicBool,
}

impl Output {
    fn binary(&self, col: usize) -> bool {
        match self.formats.len() {
            0 => false,
            1 => self.formats[0] == 1,
            _ => self.formats.get(col) == Some(&1),
        }
    }
}

/// The text shard `i` of the statement runs: the plan's shard SQL, or the
/// route's per-shard text (a shard hiding a moving range's rows).
pub(super) fn shard_text<'a>(plan: &'a MergePlan, sqls: Option<&'a [String]>, i: usize) -> &'a str {
    sqls.and_then(|v| v.get(i))
        .map_or(plan.shard_sql.as_str(), String::as_str)
}

/// Runs `plan` on `shards` for a simple-protocol client (`sqls`: the
/// route's per-shard texts, if any).
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &MergePlan,
    shards: &[usize],
    sqls: Option<&[String]>,
) -> Result<(), SessionError> {
    let mut requests = Vec::with_capacity(shards.len());
    for i in 0..shards.len() {
        let mut q = BytesMut::new();
        frontend::query(shard_text(plan, sqls, i), &mut q).map_err(|_| encode_error())?;
        requests.push(q.freeze());
    }
    let out = Output {
        describe: true,
        formats: Vec::new(),
        max_rows: None,
        suspended: Default::default(),
    };
    run_with(s, plan, shards, &requests, &out, None).await
}

pub(super) fn encode_error() -> SessionError {
    SessionError::Fatal {
        code: sqlstate::INTERNAL_ERROR,
        msg: "cannot encode a message".into(),
    }
}

/// Runs `plan` on `shards` for an extended-protocol batch: Parse (optional),
/// Bind, Describe portal (optional), Execute without a row limit, Sync. The
/// shards run the rewritten statement with the client's parameters and
/// answer in text; the client gets its ParseComplete and BindComplete, the
/// merged rows in the formats its Bind asked for, and ReadyForQuery.
pub(crate) async fn run_extended<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &MergePlan,
    shards: &[usize],
    sqls: Option<&[String]>,
    frames: Vec<Frame>,
    synced: bool,
) -> Result<(), SessionError> {
    let refuse_batch = |s: &mut Session<S>, m: &str| {
        s.push_error(&Refusal::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            m.to_string(),
        ));
        if synced {
            let status = s.client_status();
            s.out.put_slice(&rfq(status));
        } else {
            s.skip_to_sync = true;
        }
    };
    const SHAPE: &str = "a multi-shard statement with ORDER BY, LIMIT/OFFSET, DISTINCT or aggregates must come in the extended protocol as Parse (optional), Bind, Describe of the portal (optional), Execute, Sync";
    if !synced {
        refuse_batch(
            s,
            "a statement that touches several shards must be followed by Sync, not Flush",
        );
        return Ok(());
    }
    let (mut parse, mut bind, mut describe, mut executed) = (None, None, false, false);
    let mut max_rows = None;
    for f in &frames {
        let body = f.body();
        match f.tag() {
            fe::PARSE if parse.is_none() && bind.is_none() => parse = Some(f),
            fe::BIND if bind.is_none() => bind = Some(f),
            fe::DESCRIBE if bind.is_some() && !executed && body.first() == Some(&wire::PORTAL) => {
                describe = true
            }
            fe::EXECUTE if bind.is_some() && !executed => {
                let Some(n) = body
                    .len()
                    .checked_sub(4)
                    .map(|i| i32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]))
                else {
                    refuse_batch(s, SHAPE);
                    return Ok(());
                };
                max_rows = u64::try_from(n).ok().filter(|&n| n > 0);
                executed = true;
            }
            fe::SYNC => {}
            _ => {
                refuse_batch(s, SHAPE);
                return Ok(());
            }
        }
    }
    let (Some(bind), true) = (bind, executed) else {
        refuse_batch(s, SHAPE);
        return Ok(());
    };
    // Bind: portal, statement, parameter formats and values, result formats.
    let mut b = bind.body();
    let _portal = wire::get_cstr(&mut b).map_err(|e| proto(&e))?;
    let stmt = wire::get_cstr(&mut b).map_err(|e| proto(&e))?.to_string();
    let params_start = bind.body().len() - b.len();
    let params = BindParams::parse(b).map_err(|e| proto(&e))?;
    let mut rest = b;
    skip_bind_params(&mut rest).map_err(|e| proto(&e))?;
    let params_part = &bind.body()[params_start..bind.body().len() - rest.len()];
    let nres = wire::get_i16(&mut rest).map_err(|e| proto(&e))?;
    let mut formats = Vec::with_capacity(nres.max(0) as usize);
    for _ in 0..nres {
        formats.push(wire::get_i16(&mut rest).map_err(|e| proto(&e))?);
    }
    // The statement's parameter types, for the shards' Parse.
    let mut types = match parse {
        Some(p) if parse_name(p).as_deref() == Some(stmt.as_str()) => parse_types(p),
        // Those Parse left unspecified, as a Describe of it told.
        _ => s.known_param_types(&stmt, s.param_types(&stmt), params.len()),
    };
    // As the client typed them (0: none), for HAVING's parameters.
    let client_types = types.clone();
    // A parameter still of unknown type that the shards' statement no
    // longer uses (only in HAVING, OFFSET or a LIMIT not pushed down):
    // a type that takes every value (text in text, bytea in binary), or
    // PostgreSQL cannot prepare it.
    if types.len() < params.len() {
        types.resize(params.len(), 0);
    }
    for (i, t) in types.iter_mut().enumerate() {
        if *t == 0 && !mentions_param(&plan.shard_sql, i + 1) {
            *t = if params.is_binary(i) {
                BYTEA_OID
            } else {
                TEXT_OID
            };
        }
    }
    if let Some(p) = parse {
        if !s.record_parse(p)? {
            // A duplicate name: the error is queued; nothing else runs.
            let status = s.client_status();
            s.push_synthetic(rfq(status));
            return Ok(());
        }
        s.out.put_slice(&wire::parse_complete());
    }
    let mut bc = BytesMut::new();
    wire::frame(&mut bc, be::BIND_COMPLETE, |_| {});
    s.out.put_slice(&bc);
    // The shards' request: the rewritten statement, unnamed, text results.
    let mut requests = Vec::with_capacity(shards.len());
    for (i, &shard) in shards.iter().enumerate() {
        // In the shard's OIDs of user types (`session/type_oids.rs`).
        let types = s.local_types(shard, &types);
        let mut q = BytesMut::new();
        wire::frame(&mut q, fe::PARSE, |o| {
            o.put_u8(0);
            wire::put_cstr(o, shard_text(plan, sqls, i));
            o.put_i16(types.len() as i16);
            for t in &types {
                o.put_u32(*t);
            }
        });
        wire::frame(&mut q, fe::BIND, |o| {
            o.put_u8(0);
            o.put_u8(0);
            o.put_slice(params_part);
            o.put_i16(0);
        });
        wire::frame(&mut q, fe::DESCRIBE, |o| {
            o.put_u8(wire::PORTAL);
            o.put_u8(0);
        });
        wire::frame(&mut q, fe::EXECUTE, |o| {
            o.put_u8(0);
            o.put_i32(0);
        });
        wire::frame(&mut q, fe::SYNC, |_| {});
        requests.push(q.freeze());
    }
    s.unnamed_replaced_on(shards);
    // `coalesce(sum(x), $n)` is combined as a partial sum only for 0.
    for &i in &plan.zero_params {
        if params.count(i) != Ok(Some(0)) {
            refuse_batch(
                s,
                &format!("coalesce(sum(…), ${}) over several shards is combined only when ${} is 0 (each shard would add its own value)", i + 1, i + 1),
            );
            return Ok(());
        }
    }
    // Parameters of HAVING (applied by the node): their values in place.
    let substituted;
    let plan = match plan.aggregate.as_ref().and_then(|a| a.having.as_ref()) {
        Some(h) if having_has_params(h) => match having_with_params(plan, &params, &client_types) {
            Ok(p) => {
                substituted = p;
                &substituted
            }
            Err(m) => {
                refuse_batch(s, &m);
                return Ok(());
            }
        },
        _ => plan,
    };
    let out = Output {
        describe,
        formats,
        max_rows,
        suspended: Default::default(),
    };
    run_with(s, plan, shards, &requests, &out, Some(&params)).await
}

/// `bytea` takes any binary value, `text` any text one.
const BYTEA_OID: u32 = 17;
const TEXT_OID: u32 = 25;

/// Whether `sql` holds placeholder `$n` (maybe inside a literal: then it
/// is taken as used).
fn mentions_param(sql: &str, n: usize) -> bool {
    let needle = format!("${n}");
    sql.match_indices(&needle).any(|(i, _)| {
        !sql[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// `plan` with the parameters of its HAVING replaced by their values, as
/// literals taken as the type of the other operand (as PostgreSQL takes a
/// parameter compared with an aggregate): text values as sent, binary
/// integers, floats and booleans in their text form. Err: a parameter of
/// another type, or a value the node cannot read.
fn having_with_params(
    plan: &MergePlan,
    params: &BindParams,
    types: &[u32],
) -> Result<MergePlan, String> {
    fn literal(i: usize, params: &BindParams, types: &[u32]) -> Result<Literal, String> {
        let ty = types.get(i).copied().unwrap_or(0);
        let what = || format!("HAVING parameter ${} of type OID {ty}", i + 1);
        let Some(v) = params.value(i) else {
            return Err(format!("there is no parameter ${}", i + 1));
        };
        let Some(v) = v else {
            return Ok(Literal::Null);
        };
        let number = matches!(ty, 20 | 21 | 23 | 700 | 701 | 1700);
        if !params.is_binary(i) {
            let t = std::str::from_utf8(v).map_err(|_| format!("{} is not UTF-8", what()))?;
            return Ok(match ty {
                16 => Literal::String(t.to_owned()),
                // As the type's input function reads it, or refused.
                _ if number => match super::combine::number_literal(t, ty) {
                    Some(n) => Literal::Number(n),
                    None => {
                        return Err(format!(
                            "{} ({t:?}) is not a number hotrepart reads exactly as PostgreSQL does",
                            what()
                        ))
                    }
                },
                // Of no type: read as the type it is compared with.
                0 | 705 => Literal::String(t.to_owned()),
                25 | 1042 | 1043 => Literal::Text(t.to_owned()),
                _ => return Err(format!("{} is not supported across shards", what())),
            });
        }
        let bad = || format!("{} has a malformed binary value", what());
        Ok(match (ty, v.len()) {
            (21, 2) => Literal::Number(i16::from_be_bytes([v[0], v[1]]).to_string()),
            (23, 4) => Literal::Number(i32::from_be_bytes([v[0], v[1], v[2], v[3]]).to_string()),
            (20, 8) => Literal::Number(
                i64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]).to_string(),
            ),
            (701, 8) => Literal::Number(format!(
                "{:?}",
                f64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]])
            )),
            (16, 1) => Literal::Bool(v[0] != 0),
            (25 | 1043, _) => Literal::Text(String::from_utf8(v.to_vec()).map_err(|_| bad())?),
            (21 | 23 | 20 | 701 | 16, _) => return Err(bad()),
            _ => {
                return Err(format!(
                    "{} in binary is not supported across shards; send it as text",
                    what()
                ))
            }
        })
    }
    fn walk(e: &HavingExpr, params: &BindParams, types: &[u32]) -> Result<HavingExpr, String> {
        let op = |o: &Operand| -> Result<Operand, String> {
            Ok(match o {
                Operand::Param(i) => Operand::Literal(literal(*i, params, types)?),
                other => other.clone(),
            })
        };
        Ok(match e {
            HavingExpr::And(a, b) => HavingExpr::And(
                Box::new(walk(a, params, types)?),
                Box::new(walk(b, params, types)?),
            ),
            HavingExpr::Or(a, b) => HavingExpr::Or(
                Box::new(walk(a, params, types)?),
                Box::new(walk(b, params, types)?),
            ),
            HavingExpr::Not(a) => HavingExpr::Not(Box::new(walk(a, params, types)?)),
            HavingExpr::Compare { left, op: o, right } => HavingExpr::Compare {
                left: op(left)?,
                op: *o,
                right: op(right)?,
            },
            HavingExpr::IsNull { operand, negated } => HavingExpr::IsNull {
                operand: op(operand)?,
                negated: *negated,
            },
        })
    }
    let mut p = plan.clone();
    if let Some(a) = p.aggregate.as_mut() {
        if let Some(h) = a.having.take() {
            a.having = Some(walk(&h, params, types)?);
        }
    }
    Ok(p)
}

pub(super) fn proto(e: &WireError) -> SessionError {
    SessionError::Fatal {
        code: sqlstate::PROTOCOL_VIOLATION,
        msg: format!("invalid Bind message: {e}"),
    }
}

/// Skips a Bind's parameter formats and values.
pub(super) fn skip_bind_params(b: &mut &[u8]) -> Result<(), WireError> {
    let nf = wire::get_i16(b)?;
    for _ in 0..nf {
        wire::get_i16(b)?;
    }
    let nv = wire::get_i16(b)?;
    for _ in 0..nv {
        let len = wire::get_i32(b)?;
        if len > 0 {
            let len = len as usize;
            if b.len() < len {
                return Err(WireError::Protocol(
                    "Bind parameter longer than the message".into(),
                ));
            }
            *b = &b[len..];
        }
    }
    Ok(())
}

pub(super) fn parse_name(p: &Frame) -> Option<String> {
    let mut b = p.body();
    wire::get_cstr(&mut b).ok().map(str::to_string)
}

/// The parameter type OIDs of a Parse message.
pub(crate) fn parse_types(p: &Frame) -> Vec<u32> {
    parse_body_types(p.body())
}

/// The parameter type OIDs of a Parse body (statement name first).
pub(crate) fn parse_body_types(mut b: &[u8]) -> Vec<u32> {
    let (Ok(_), Ok(_), Ok(n)) = (
        wire::get_cstr(&mut b),
        wire::get_cstr(&mut b),
        wire::get_i16(&mut b),
    ) else {
        return Vec::new();
    };
    (0..n)
        .map_while(|_| wire::get_i32(&mut b).ok().map(|t| t as u32))
        .collect()
}

/// Runs `plan` on `shards` (`requests[i]`: the messages shard `i` gets) and
/// answers the client.
pub(super) async fn run_with<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &MergePlan,
    shards: &[usize],
    requests: &[bytes::Bytes],
    out: &Output,
    params: Option<&BindParams>,
) -> Result<(), SessionError> {
    let in_tx = s.txn.open();
    let finish = |s: &mut Session<S>| {
        let status = s.client_status();
        s.out.put_slice(&rfq(status));
    };
    let having_params = plan
        .aggregate
        .as_ref()
        .and_then(|a| a.having.as_ref())
        .is_some_and(having_has_params);
    let counts = (count(&plan.offset, params), count(&plan.limit, params));
    let (offset, limit) = match counts {
        (Ok(o), Ok(l)) if !having_params => (o.unwrap_or(0), l),
        (Err(m), _) | (_, Err(m)) => {
            return refuse(s, Refusal::new(sqlstate::INVALID_PARAMETER_VALUE, m), in_tx).await
        }
        _ => {
            return refuse(
                s,
                Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "parameters in HAVING of a multi-shard statement are not supported yet".into(),
                ),
                in_tx,
            )
            .await
        }
    };
    for &t in shards {
        if let Err(r) = s.ensure_backend(t).await? {
            return refuse(s, r, in_tx).await;
        }
    }
    learn_collations(s, shards).await;
    for (&t, request) in shards.iter().zip(requests) {
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            if let Err(e) = b.write_frames(request).await {
                return Err(s.be.lost(t, WireError::Io(e)));
            }
        }
    }
    let mut st = Streams::new(shards);
    // Row descriptions first.
    let mut fields: Option<Vec<Field>> = None;
    let mut mismatch = false;
    for (i, &t) in shards.iter().enumerate() {
        loop {
            let Some(f) = st.frame(&mut s.be, i).await? else {
                st.done[i] = true;
                break;
            };
            match f.tag() {
                be::ROW_DESCRIPTION => {
                    // Compared and answered in the home shard's OIDs.
                    let f = s.canonical_frame(t, f).await;
                    let d = parse_desc(&f.raw);
                    match (&fields, d) {
                        (None, Some(d)) => fields = Some(d),
                        (Some(a), Some(b)) => {
                            mismatch |= a.len() != b.len()
                                || a.iter()
                                    .zip(&b)
                                    .any(|(x, y)| x.name != y.name || x.meta[6..] != y.meta[6..]);
                        }
                        _ => mismatch = true,
                    }
                    break;
                }
                be::READY_FOR_QUERY => {
                    if let Some(b) = s.be.slots[t].conn.as_mut() {
                        b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                    }
                    st.done[i] = true;
                    break;
                }
                _ => {}
            }
        }
    }
    let result = match (&fields, mismatch, &st.inner.error) {
        (Some(f), false, None) => {
            let f = f.clone();
            execute(s, plan, &f, &mut st, out, offset, limit).await?
        }
        (_, true, _) => Err(MergeError(
            sqlstate::INTERNAL_ERROR,
            "shards returned different row descriptions for the same statement".into(),
        )),
        _ => Ok(0),
    };
    st.drain(&mut s.be).await?;
    if let Some((code, msg, t)) = st.inner.error.take() {
        let m = format!("{msg} (on shard {})", s.node.routing.shard_name(t));
        wire::error_response(&mut s.out, Severity::Error, &code, &m);
        if in_tx {
            s.txn.failed = true;
        }
    } else {
        match result {
            Ok(_) if out.suspended.load(std::sync::atomic::Ordering::Relaxed) => {
                wire::frame(&mut s.out, be::PORTAL_SUSPENDED, |_| {})
            }
            Ok(n) => s.out.put_slice(&command_complete(&format!("SELECT {n}"))),
            Err(MergeError(code, m)) => {
                wire::error_response(&mut s.out, Severity::Error, code, &m);
                if in_tx {
                    s.txn.failed = true;
                }
            }
        }
    }
    finish(s);
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}

pub(super) async fn refuse<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    r: Refusal,
    in_tx: bool,
) -> Result<(), SessionError> {
    wire::error_response(&mut s.out, Severity::Error, r.code, &r.message);
    if in_tx {
        s.txn.failed = true;
    }
    let status = s.client_status();
    s.out.put_slice(&rfq(status));
    Ok(())
}

pub(super) fn having_has_params(e: &HavingExpr) -> bool {
    fn op(o: &Operand) -> bool {
        matches!(o, Operand::Param(_))
    }
    match e {
        HavingExpr::And(a, b) | HavingExpr::Or(a, b) => {
            having_has_params(a) || having_has_params(b)
        }
        HavingExpr::Not(a) => having_has_params(a),
        HavingExpr::Compare { left, right, .. } => op(left) || op(right),
        HavingExpr::IsNull { operand, .. } => op(operand),
    }
}

/// A LIMIT or OFFSET count; None: no limit.
pub(super) fn count(
    l: &Option<LimitSpec>,
    params: Option<&BindParams>,
) -> Result<Option<u64>, String> {
    match l {
        None => Ok(None),
        Some(LimitSpec::Count(n)) => Ok(Some(*n)),
        Some(LimitSpec::Param(i)) => match params {
            Some(p) => p.count(*i),
            None => Err(format!("there is no parameter ${}", i + 1)),
        },
    }
}

/// Merges the rows; returns the number sent.
pub(super) async fn execute<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &MergePlan,
    fields: &[Field],
    st: &mut Streams,
    out: &Output,
    offset: u64,
    limit: Option<u64>,
) -> Result<Result<u64, MergeError>, SessionError> {
    // The values counted DISTINCT (`ShardCol::Distinct`): their own types
    // to compare them, int8 once counted.
    let value_types: Vec<Ty> = fields.iter().map(|f| Ty::of(f.type_oid())).collect();
    let dcols = shard_cols_where(plan, |_, c| *c == ShardCol::Distinct);
    let mut types = value_types.clone();
    let mut oids: Vec<u32> = fields.iter().map(|f| f.type_oid()).collect();
    for &i in &dcols {
        if let Some(t) = types.get_mut(i) {
            *t = Ty::Int;
        }
        if let Some(o) = oids.get_mut(i) {
            *o = 20;
        }
    }
    let types = types;
    let text = text_comparisons(plan, &types, &value_types, &oids);
    // sum/avg of real: PostgreSQL rounds every step of sum(real) to float4,
    // which partial sums cannot reproduce.
    if let Some(a) = &plan.aggregate {
        if a.shard_cols.iter().enumerate().any(|(i, c)| {
            matches!(c, ShardCol::Partial(Partial::Sum))
                && fields.get(i).map(Field::type_oid) == Some(700)
        }) {
            return Ok(Err(MergeError(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "sum or avg of a real (float4) column across shards cannot reproduce PostgreSQL's float4 rounding; cast it to double precision or numeric".into(),
            )));
        }
    }
    // With extra_float_digits < 1 the shards print floats rounded: partial
    // sums, averages and comparisons of those texts are not PostgreSQL's.
    let float_rounded = s
        .setting("extra_float_digits")
        .and_then(|v| v.trim().parse::<i32>().ok())
        .is_some_and(|v| v < 1);
    if float_rounded
        && (plan.aggregate.is_some() || plan.distinct || !plan.order_by.is_empty())
        && value_types.contains(&Ty::Float)
    {
        return Ok(Err(MergeError(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "merging real or double precision values across shards needs extra_float_digits >= 1 (exact output); the session has it lower".into(),
        )));
    }
    let shards = st.shards.clone();
    let text = match text_order(s, plan, &shards, &text, true).await? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let max_rows = s.node.cfg().max_merge_rows;
    let max_bytes = s.node.cfg().max_merge_bytes;
    // Output row description.
    let out_fields: Vec<Field> = match &plan.aggregate {
        None => fields.get(plan.hidden..).unwrap_or(&[]).to_vec(),
        Some(a) => match a
            .outputs
            .iter()
            .map(|o| output_field(o, fields))
            .collect::<Option<Vec<Field>>>()
        {
            Some(f) => f,
            None => {
                return Ok(Err(MergeError(
                    sqlstate::INTERNAL_ERROR,
                    format!(
                        "the shards answered {} columns, fewer than the merge plan needs",
                        fields.len()
                    ),
                )))
            }
        },
    };
    // A distinct count is an int8, whatever the type of the values.
    let mut out_fields = out_fields;
    if let Some(a) = &plan.aggregate {
        for (k, o) in a.outputs.iter().enumerate() {
            if let (Combined::Col(c), Some(f)) = (o, out_fields.get_mut(k)) {
                if dcols.contains(c) {
                    f.meta[0..6].fill(0);
                    f.meta[6..10].copy_from_slice(&20u32.to_be_bytes());
                    f.meta[10..12].copy_from_slice(&8i16.to_be_bytes());
                    f.meta[12..16].copy_from_slice(&(-1i32).to_be_bytes());
                }
            }
        }
    }
    // Columns the client wants in binary: their type OIDs (0: text). An
    // enum's binary value is its label, as text's is.
    let binary: Vec<u32> = out_fields
        .iter()
        .enumerate()
        .map(|(i, f)| match (out.binary(i), f.type_oid()) {
            (false, _) => 0,
            (true, oid) if s.home_enum(&st.shards, oid) => 25,
            (true, oid) => oid,
        })
        .collect();
    if let Some((i, oid)) = binary
        .iter()
        .enumerate()
        .find(|(_, &oid)| oid != 0 && !super::binary::supported(oid))
    {
        return Ok(Err(MergeError(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "binary results of type OID {oid} (column \"{}\") are not supported for multi-shard statements; ask for text results",
                String::from_utf8_lossy(&out_fields[i].name)
            ),
        )));
    }
    // A float sent in binary is read from the shards' text: rounded text
    // (extra_float_digits < 1) would change its value.
    if float_rounded && binary.iter().any(|&o| o == 700 || o == 701) {
        return Ok(Err(MergeError(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "binary real or double precision results of a multi-shard statement need extra_float_digits >= 1 (exact output); the session has it lower".into(),
        )));
    }
    let binary = if binary.iter().all(|&o| o == 0) {
        Vec::new()
    } else {
        binary
    };
    if out.describe {
        wire::frame(&mut s.out, be::ROW_DESCRIPTION, |o| {
            o.put_i16(out_fields.len() as i16);
            for (i, f) in out_fields.iter().enumerate() {
                o.put_slice(&f.name);
                o.put_u8(0);
                o.put_slice(&f.meta[..16]);
                o.put_i16(i16::from(out.binary(i)));
            }
        });
    }
    // Text ranked by a shard: its values are known once all rows are.
    let streaming = plan.aggregate.is_none()
        && !plan.distinct
        && matches!(text, TextOrder::Bytes)
        && (plan.shards_sorted || plan.order_by.is_empty());
    if !streaming && !plan.distinct_on.is_empty() && matches!(text, TextOrder::Bytes) {
        return Ok(Err(MergeError(
            sqlstate::INTERNAL_ERROR,
            "a DISTINCT ON merge plan whose shards do not sort".into(),
        )));
    }
    if streaming {
        // DISTINCT ON: the key of the last row kept (its group's rows are
        // next to each other in the merged order).
        let mut last_on: Option<Vec<u8>> = None;
        let mut key = Vec::new();
        let mut heads: Vec<Option<Row>> = Vec::with_capacity(st.shards.len());
        for i in 0..st.shards.len() {
            heads.push(st.next(&mut s.be, i).await?);
        }
        let (mut skipped, mut sent) = (0u64, 0u64);
        loop {
            if limit.is_some_and(|l| sent >= l) {
                break;
            }
            // The smallest head (the first non-empty one when unordered).
            let mut best: Option<usize> = None;
            for i in 0..heads.len() {
                let Some(r) = &heads[i] else { continue };
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let o = match compare_rows(
                            plan,
                            &types,
                            &Ranks::default(),
                            r,
                            heads[b].as_deref().unwrap_or(&[]),
                        ) {
                            Ok(o) => o,
                            Err(e) => return Ok(Err(e)),
                        };
                        if o == Ordering::Less {
                            Some(i)
                        } else {
                            Some(b)
                        }
                    }
                };
                if plan.order_by.is_empty() {
                    break;
                }
            }
            let Some(b) = best else { break };
            let row = heads[b].take().unwrap_or_default();
            heads[b] = st.next(&mut s.be, b).await?;
            if !plan.distinct_on.is_empty() {
                if let Err(e) = key_into(&plan.distinct_on, row.as_slice(), &types, &mut key) {
                    return Ok(Err(e));
                }
                if last_on.as_ref() == Some(&key) {
                    continue;
                }
                match &mut last_on {
                    Some(k) => k.clone_from(&key),
                    None => last_on = Some(key.clone()),
                }
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            if out.max_rows.is_some_and(|m| sent >= m) {
                out.suspended
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            if let Err(e) = put_out(&mut s.out, &binary, row.get(plan.hidden..).unwrap_or(&[])) {
                return Ok(Err(e));
            }
            sent += 1;
            if s.out.len() > 64 * 1024 {
                s.flush_client().await?;
            }
        }
        return Ok(Ok(sent));
    }
    // Collecting: combine by group (or keep rows), bounded. Rows are held
    // packed, one allocation each, and the groups' keys end to end
    // (`packed.rs`).
    let mut groups: Vec<Packed> = Vec::new();
    let mut index = GroupIndex::default();
    let mut key = Vec::new();
    // Per group, per distinct column: the values seen (as GROUP BY keys).
    let mut seen: Vec<Vec<std::collections::HashSet<Vec<u8>>>> = Vec::new();
    // Bytes held: the kept rows, the group keys and the distinct values.
    let mut held: usize = 0;
    // min/max of text under a collation: every shard row is read first and
    // its text ranked, then combined by rank (the ranks also order them).
    let mut ranks: Option<Ranks> = None;
    let mut buffered: Option<std::vec::IntoIter<Packed<Bytes>>> = None;
    if let TextOrder::Rank {
        shard,
        sorts,
        min_max,
    } = &text
    {
        if !min_max.is_empty() {
            let mut rows = Vec::new();
            for i in 0..st.shards.len() {
                while let Some(row) = st.next_packed(&mut s.be, i).await? {
                    held += row.held_bytes();
                    if held > max_bytes {
                        return Ok(Err(too_big(max_bytes, rows.len())));
                    }
                    rows.push(row);
                }
            }
            if st.inner.error.is_some() {
                // The shard's error is the answer.
                return Ok(Ok(0));
            }
            let mut cols = min_max.clone();
            cols.extend(
                sorts
                    .iter()
                    .filter(|(c, _)| !min_max.iter().any(|(m, _)| m == c)),
            );
            match rank_text(s, st, *shard, &cols, &rows).await? {
                Some(r) => ranks = Some(r),
                None => return Ok(Ok(0)),
            }
            buffered = Some(rows.into_iter());
        }
    }
    let no_ranks = Ranks::default();
    for i in 0..st.shards.len() {
        loop {
            let row = match buffered.as_mut() {
                Some(rows) => {
                    let row = rows.next();
                    held -= row.as_ref().map_or(0, Packed::held_bytes);
                    row
                }
                None => st.next_packed(&mut s.be, i).await?,
            };
            let Some(row) = row else { break };
            let Some(a) = &plan.aggregate else {
                if groups.len() >= max_rows {
                    return Ok(Err(too_many(max_rows)));
                }
                let kept = row.to_held();
                held += kept.held_bytes();
                if held > max_bytes {
                    return Ok(Err(too_big(max_bytes, groups.len())));
                }
                groups.push(kept);
                continue;
            };
            if let Err(e) = key_into(&a.group_by, &row, &types, &mut key) {
                return Ok(Err(e));
            }
            let (g, new) = index.find_or_insert(&key);
            if !dcols.is_empty() {
                // The group's distinct values.
                let gi = g as usize;
                if seen.len() <= gi {
                    seen.resize_with(gi + 1, || vec![Default::default(); dcols.len()]);
                }
                for (j, &c) in dcols.iter().enumerate() {
                    let Some(v) = row.col(c) else { continue };
                    let k = match value::group_key(value_types[c], v) {
                        Ok(k) => k,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    let len = k.len();
                    if seen[gi][j].insert(k) {
                        held += len + 32;
                    }
                }
                if held > max_bytes {
                    return Ok(Err(too_big(max_bytes, groups.len())));
                }
            }
            if new {
                if groups.len() >= max_rows {
                    return Ok(Err(too_many(max_rows)));
                }
                let kept = row.to_held();
                held += kept.held_bytes() + GroupIndex::key_bytes(&key);
                if held > max_bytes {
                    return Ok(Err(too_big(max_bytes, groups.len())));
                }
                groups.push(kept);
                continue;
            }
            let Some(slot) = groups.get_mut(g as usize) else {
                return Ok(Err(MergeError(
                    sqlstate::INTERNAL_ERROR,
                    format!("merge group {g} has no row"),
                )));
            };
            match combine(a, &types, ranks.as_ref().unwrap_or(&no_ranks), slot, &row) {
                Ok(Some(combined)) => {
                    held = held.saturating_sub(slot.held_bytes()) + combined.held_bytes();
                    *slot = combined;
                    if held > max_bytes {
                        return Ok(Err(too_big(max_bytes, groups.len())));
                    }
                }
                Ok(None) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    // An aggregate without GROUP BY answers one row even with no input
    // (each shard sends one; with zero shards there is nothing to do).
    // From here on only the combined rows are kept: outputs are computed
    // as they are sent (memory: one row per group, not two).
    drop(index);
    if let (Some(a), false) = (&plan.aggregate, dcols.is_empty()) {
        if a.group_by.is_empty() && groups.is_empty() && !st.shards.is_empty() {
            // The shards grouped by the distinct values and sent no row:
            // the answer of an empty input (counts 0, other aggregates NULL).
            let zero: &[u8] = b"0";
            let vals: Vec<Option<&[u8]>> = a
                .shard_cols
                .iter()
                .map(|c| match c {
                    ShardCol::Partial(Partial::Count) | ShardCol::Distinct => Some(zero),
                    _ => None,
                })
                .collect();
            groups.push(Packed::pack(&vals));
            seen.push(vec![Default::default(); dcols.len()]);
        }
        // Each distinct column becomes its group's count.
        for (g, row) in groups.iter_mut().enumerate() {
            let counts: Vec<String> = (0..dcols.len())
                .map(|j| seen.get(g).map_or(0, |s| s[j].len()).to_string())
                .collect();
            let vals: Vec<Option<&[u8]>> = row
                .values()
                .enumerate()
                .map(|(i, v)| match dcols.iter().position(|&c| c == i) {
                    Some(j) => Some(counts[j].as_bytes()),
                    None => v,
                })
                .collect();
            *row = Packed::pack(&vals);
        }
        drop(seen);
    }
    let output = |g: &Packed| -> Result<Row, MergeError> {
        match &plan.aggregate {
            Some(a) => a
                .outputs
                .iter()
                .map(|o| Ok(combined_value(o, g, &types)?.map(owned_bytes)))
                .collect(),
            None => Ok(g.to_row(plan.hidden)),
        }
    };
    let mut err = None;
    if let Some(h) = plan.aggregate.as_ref().and_then(|a| a.having.as_ref()) {
        groups.retain(|g| match eval_having(h, g, &types, &oids) {
            Ok(keep) => keep == Some(true),
            Err(e) => {
                err.get_or_insert(e);
                false
            }
        });
    }
    if plan.distinct && err.is_none() {
        let out_types: Vec<Ty> = out_fields.iter().map(|f| Ty::of(f.type_oid())).collect();
        let cols: Vec<usize> = (0..out_types.len()).collect();
        let mut seen = GroupIndex::default();
        groups.retain(|g| {
            match output(g).and_then(|o| key_into(&cols, &o, &out_types, &mut key)) {
                Ok(()) => seen.find_or_insert(&key).1,
                Err(e) => {
                    err.get_or_insert(e);
                    false
                }
            }
        });
    }
    let ranks = match (ranks, &text, &err) {
        (Some(r), _, _) => r,
        (None, TextOrder::Rank { shard, sorts, .. }, None) if st.inner.error.is_none() => {
            match rank_text(s, st, *shard, sorts, &groups).await? {
                Some(r) => r,
                // The shard's error is the answer.
                None => return Ok(Ok(0)),
            }
        }
        _ => Ranks::default(),
    };
    if !plan.order_by.is_empty() && err.is_none() {
        let mut cmp = |a: &Packed, b: &Packed| match compare_rows(plan, &types, &ranks, a, b) {
            Ok(o) => o,
            Err(e) => {
                err.get_or_insert(e);
                Ordering::Equal
            }
        };
        // With a LIMIT only the first OFFSET + LIMIT rows are sorted: they
        // are selected first (linear), the others dropped. Rows that tie
        // on every sort key may be cut differently than a full sort would;
        // PostgreSQL does not order them either.
        // (DISTINCT ON keeps the first row of each group: all are sorted.)
        if let Some(n) = limit
            .map(|l| offset.saturating_add(l))
            .filter(|_| plan.distinct_on.is_empty())
        {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n == 0 {
                groups.clear();
            } else if n < groups.len() {
                groups.select_nth_unstable_by(n - 1, &mut cmp);
                groups.truncate(n);
            }
        }
        groups.sort_by(&mut cmp);
    }
    // DISTINCT ON (text ranked by a shard: collected, not streamed): the
    // first row of each group in the merged order.
    if !plan.distinct_on.is_empty() && err.is_none() {
        let mut last: Option<Vec<u8>> = None;
        groups.retain(|g| match key_into(&plan.distinct_on, g, &types, &mut key) {
            Ok(()) if last.as_ref() == Some(&key) => false,
            Ok(()) => {
                last = Some(key.clone());
                true
            }
            Err(e) => {
                err.get_or_insert(e);
                false
            }
        });
    }
    if let Some(e) = err {
        return Ok(Err(e));
    }
    let mut sent = 0u64;
    for g in groups.iter().skip(offset as usize) {
        if limit.is_some_and(|l| sent >= l) {
            break;
        }
        if out.max_rows.is_some_and(|m| sent >= m) {
            out.suspended
                .store(true, std::sync::atomic::Ordering::Relaxed);
            break;
        }
        let row = match output(g) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = put_out(&mut s.out, &binary, &row) {
            return Ok(Err(e));
        }
        sent += 1;
        if s.out.len() > 64 * 1024 {
            s.flush_client().await?;
        }
    }
    Ok(Ok(sent))
}

/// A computed value as an output row holds it.
fn owned_bytes(v: std::borrow::Cow<'_, [u8]>) -> Bytes {
    match v {
        std::borrow::Cow::Borrowed(b) => Bytes::copy_from_slice(b),
        std::borrow::Cow::Owned(v) => Bytes::from(v),
    }
}

/// The shard columns of `plan`'s aggregation that `pred` (index, kind)
/// picks; none without aggregation.
fn shard_cols_where(plan: &MergePlan, pred: impl Fn(usize, &ShardCol) -> bool) -> Vec<usize> {
    plan.aggregate.as_ref().map_or_else(Vec::new, |a| {
        a.shard_cols
            .iter()
            .enumerate()
            .filter(|(i, c)| pred(*i, c))
            .map(|(i, _)| i)
            .collect()
    })
}

/// How a merge orders text ([`text_order`]).
pub(super) enum TextOrder {
    /// Byte by byte (or it orders no text).
    Bytes,
    /// By the ranks shard `shard` gives the values of the merged columns
    /// `sorts` (ORDER BY) and `min_max` (min/max of text; each with whether
    /// it is `character(n)`): the shards' databases share one collation
    /// that does not order bytewise.
    Rank {
        shard: usize,
        sorts: Vec<(usize, bool)>,
        min_max: Vec<(usize, bool)>,
    },
}

/// What a merge by `plan` compares of text: the merged columns it sorts
/// by (by `types`, the merged columns' types; `oids` tells `character(n)`),
/// whether min/max or HAVING order text, and
/// whether it compares text for equality (groups, DISTINCT, DISTINCT ON,
/// count(DISTINCT …): by `value_types`, the shards' columns' own).
pub(super) struct TextComparisons {
    sorts: Vec<(usize, bool)>,
    min_max: Vec<(usize, bool)>,
    /// An ordering comparison of text in HAVING (bytewise only).
    having: bool,
    equates: bool,
}

/// Whether HAVING `e` compares text by order (`<`, `>=`…): the node
/// evaluates it bytewise.
fn having_orders_text(e: &HavingExpr, types: &[Ty]) -> bool {
    match e {
        HavingExpr::And(a, b) | HavingExpr::Or(a, b) => {
            having_orders_text(a, types) || having_orders_text(b, types)
        }
        HavingExpr::Not(a) => having_orders_text(a, types),
        HavingExpr::IsNull { .. } => false,
        HavingExpr::Compare { left, op, right } => {
            !matches!(op, CompareOp::Eq | CompareOp::NotEq)
                && [left, right]
                    .iter()
                    .any(|o| matches!(o, Operand::Value(v) if key_ty(v, types) == Ty::Text))
        }
    }
}

pub(super) fn text_comparisons(
    plan: &MergePlan,
    types: &[Ty],
    value_types: &[Ty],
    oids: &[u32],
) -> TextComparisons {
    // `name` too: a name column has collation C, but an expression cast
    // to name takes its input's (the database's default).
    let collated = |c: usize| types.get(c) == Some(&Ty::Text);
    let mut sorts: Vec<(usize, bool)> = Vec::new();
    for k in &plan.order_by {
        if let Combined::Col(c) = k.value {
            if collated(c) && !sorts.iter().any(|(s, _)| *s == c) {
                sorts.push((c, oids.get(c) == Some(&1042)));
            }
        }
    }
    let min_max: Vec<(usize, bool)> = shard_cols_where(plan, |i, c| {
        matches!(c, ShardCol::Partial(Partial::Min | Partial::Max)) && collated(i)
    })
    .into_iter()
    .map(|i| (i, oids.get(i) == Some(&1042)))
    .collect();
    let having = plan
        .aggregate
        .as_ref()
        .and_then(|a| a.having.as_ref())
        .is_some_and(|h| having_orders_text(h, types));
    let equates = value_types.contains(&Ty::Text)
        && (plan.distinct
            || !plan.distinct_on.is_empty()
            || plan.aggregate.as_ref().is_some_and(|a| {
                !a.group_by.is_empty() || a.shard_cols.contains(&ShardCol::Distinct)
            }));
    TextComparisons {
        sorts,
        min_max,
        having,
        equates,
    }
}

/// How a merge by `plan` over `shards` orders text as PostgreSQL would
/// (`text`: what it compares), or why it cannot. Bytes are PostgreSQL's
/// order under the C collation (no other COLLATE, every shard's database C,
/// no column of another collation) in a client encoding whose bytes order
/// as UTF-8's, and its equality under deterministic collations. Where the
/// shards' databases share another collation (ICU, en_US…) and every
/// column has it, a collecting merge (`rank`) sorts by the ranks one shard
/// gives the values: PostgreSQL's own order, no locale library in the node;
/// min/max, DISTINCT ON and merged cursors still need bytes.
pub(super) async fn text_order<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &MergePlan,
    shards: &[usize],
    text: &TextComparisons,
    rank: bool,
) -> Result<Result<TextOrder, MergeError>, SessionError> {
    let orders = !text.sorts.is_empty() || !text.min_max.is_empty() || text.having;
    let refused = |m: String| Ok(Err(MergeError(sqlstate::FEATURE_NOT_SUPPORTED, m)));
    if !orders && !text.equates {
        return Ok(Ok(TextOrder::Bytes));
    }
    let what = if orders {
        "ordering text across shards"
    } else {
        "grouping or deduplicating text across shards"
    };
    if let Some(c) = hotrepart_router::classify::non_c_collate(&plan.shard_sql) {
        return refused(format!("{what} under COLLATE {c} is not supported (hotrepart merges text bytewise: C collation only)"));
    }
    // Per shard: why its database does not order bytewise (None: it does).
    let mut defaults: Vec<(usize, Option<String>, String)> = Vec::new();
    for &t in shards {
        // Learned when the backend was attached (`Session::ensure_backend`).
        let shard = s.node.routing.shard_name(t);
        let Some(c) = s.node.text_collation(t, s.database()) else {
            return refused(format!(
                "{what} needs to know the shards' collations, and that of shard {shard} is not known yet (it is read when the node attaches a connection to the shard: after DDL in this transaction, once it ends); retry"
            ));
        };
        if text.equates {
            if let Err(why) = &c.equality {
                return refused(format!(
                    "{what} needs deterministic collations: on shard {shard} {why} (hotrepart compares the shards' text byte by byte)"
                ));
            }
        }
        if orders {
            if let Err(why) = &c.uniform {
                return refused(format!(
                    "{what} needs every column of the database's collation: on shard {shard} {why} (hotrepart cannot tell which collation a merged column has)"
                ));
            }
            defaults.push((t, c.bytewise.clone().err(), c.identity.clone()));
        }
    }
    if !orders {
        return Ok(Ok(TextOrder::Bytes));
    }
    let name = |s: &Session<S>, t: usize| s.node.routing.shard_name(t);
    if defaults.iter().all(|(_, why, _)| why.is_none()) {
        if !s.enc.orders_as_utf8() {
            return refused(format!("ordering text across shards needs client_encoding UTF8 or LATIN1 (it is {}): hotrepart compares the shards' text byte by byte, which orders characters as PostgreSQL does only in those", s.enc.name()));
        }
        return Ok(Ok(TextOrder::Bytes));
    }
    let Some((first, Some(why), identity)) = defaults.iter().find(|(_, w, _)| w.is_some()).cloned()
    else {
        return Ok(Ok(TextOrder::Bytes));
    };
    if let Some((t, _, other)) = defaults.iter().find(|(_, _, i)| *i != identity) {
        return refused(format!(
            "ordering text across shards needs their databases to share one collation: shard {} has {identity}, shard {} has {other}",
            name(s, first),
            name(s, *t)
        ));
    }
    let unranked = if text.having {
        Some("HAVING comparing text by order")
    } else if !rank {
        Some("a cursor")
    } else {
        None
    };
    if let Some(u) = unranked {
        return refused(format!(
            "{u} across shards needs the C collation: on shard {} {why} (hotrepart compares the shards' text byte by byte there)",
            name(s, first)
        ));
    }
    if let Some(c) = hotrepart_router::classify::first_collate(&plan.shard_sql, true) {
        return refused(format!(
            "ordering text across shards under COLLATE {c} is not supported where the databases' collation is not C ({why}): hotrepart cannot tell which sort key it applies to"
        ));
    }
    Ok(Ok(TextOrder::Rank {
        shard: first,
        sorts: text.sorts.clone(),
        min_max: text.min_max.clone(),
    }))
}

/// How text compares on `shards`, read where the node does not know it
/// (forgotten on DDL since their backends were attached: a transaction
/// block that changed the schema) on their idle backends — before the
/// statement is sent, as the merge needs it once rows come.
pub(super) async fn learn_collations<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    shards: &[usize],
) {
    // Every merge passes here: the common case (all known) copies nothing.
    let unknown = |s: &Session<S>, t: usize| !s.node.knows_text_collation(t, s.database());
    if !s.be.owed.is_empty() || !shards.iter().any(|&t| unknown(s, t)) {
        return;
    }
    let node = s.node.clone();
    let database = s.database().to_string();
    for &t in shards {
        if !unknown(s, t) {
            continue;
        }
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            if !b.unsynced && b.status != tx::FAILED {
                crate::session::learn_text_collation(&node, &database, t, b).await;
            }
        }
    }
}

/// The ranks shard `t` gives the values of `cols` in `rows` (see
/// [`TextOrder::Rank`]); a shard's error is recorded in `st` (None then).
async fn rank_text<S: AsyncRead + AsyncWrite + Unpin + Send, B: AsRef<[u8]>>(
    s: &mut Session<S>,
    st: &mut Streams,
    t: usize,
    cols: &[(usize, bool)],
    rows: &[Packed<B>],
) -> Result<Option<Ranks>, SessionError> {
    let mut ranks = Ranks::default();
    for &(c, blank_padded) in cols {
        let mut seen = std::collections::HashSet::new();
        let values: Vec<&[u8]> = rows
            .iter()
            .filter_map(|r| r.col(c))
            .filter(|v| seen.insert(*v))
            .collect();
        if values.is_empty() {
            continue;
        }
        // The statement replaces the client's unnamed statement there.
        s.unnamed_replaced_on(&[t]);
        let Some(b) = s.be.slots[t].conn.as_mut() else {
            return Err(s.be.lost(t, WireError::Closed));
        };
        match b.hidden_rank(&values, blank_padded).await {
            Ok(r) => ranks.set(c, values.iter().map(|v| v.to_vec()).zip(r).collect()),
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                st.inner.error = Some((code, message, t));
                return Ok(None);
            }
            Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                return Err(s.be.lost(t, e));
            }
        }
    }
    Ok(Some(ranks))
}

#[cfg(test)]
mod tests {
    use super::float_text;

    /// Malformed RowDescription / DataRow frames from a backend are
    /// rejected (None), never a panic: truncated at every length, and
    /// random bytes behind a valid header. The merge reads rows in place
    /// (`Packed`); it accepts exactly what the row decoder accepts.
    #[test]
    fn malformed_backend_frames_do_not_panic() {
        use super::parse_desc;
        use rand::{Rng, SeedableRng};
        let parse_row = |raw: &[u8]| super::Packed::check(raw.get(5..)?).map(|p| p.to_row(0));
        let mut desc = vec![b'T', 0, 0, 0, 0, 0, 2];
        for name in ["a", "b"] {
            desc.extend_from_slice(name.as_bytes());
            desc.push(0);
            desc.extend_from_slice(&[0; 18]);
        }
        let mut row = vec![b'D', 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, b'x', 255, 255, 255, 255];
        assert_eq!(parse_desc(&desc).map(|f| f.len()), Some(2));
        assert_eq!(parse_row(&row).map(|r| r.len()), Some(2));
        for cut in 0..desc.len() {
            assert!(parse_desc(&desc[..cut]).is_none(), "desc cut at {cut}");
        }
        for cut in 0..row.len() {
            assert!(parse_row(&row[..cut]).is_none(), "row cut at {cut}");
        }
        // a huge column count, a negative count (refused, not an empty
        // row: hotrepart_wire::backend), a length past the end
        assert!(parse_desc(&[b'T', 0, 0, 0, 0, 255, 255]).is_none());
        assert!(parse_row(&[b'D', 0, 0, 0, 0, 255, 255]).is_none());
        row[10] = 200;
        assert!(parse_row(&row).is_none());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.random_range(0..40);
            let mut f: Vec<u8> = (0..n).map(|_| rng.random::<u8>()).collect();
            if f.len() > 6 && rng.random_bool(0.5) {
                f[5] = 0;
                f[6] = rng.random_range(0..4);
            }
            let _ = parse_desc(&f);
            assert_eq!(
                parse_row(&f),
                hotrepart_wire::backend::data_row(&f),
                "{f:?}"
            );
        }
    }

    #[test]
    fn float_output_like_postgresql() {
        assert_eq!(float_text(1.5), "1.5");
        assert_eq!(float_text(1e15), "1e+15");
        assert_eq!(float_text(123456789012345.0), "123456789012345");
        assert_eq!(float_text(0.0001), "0.0001");
        assert_eq!(float_text(0.00001), "1e-05");
        assert_eq!(float_text(-2.5e-7), "-2.5e-07");
        assert_eq!(float_text(f64::NAN), "NaN");
    }
}
