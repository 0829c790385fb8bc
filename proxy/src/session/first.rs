//! Subqueries the node runs first (issue 14): a `SELECT`, `UPDATE` or `DELETE` refused over
//! several shards because a subquery needs every shard's rows at once
//! (`WHERE x > (SELECT avg(x) FROM t)`, `SELECT count(*) FROM (SELECT
//! DISTINCT …) s`) has those subqueries run on their own first, as
//! simple-protocol statements of the client's (merged, or run first in
//! turn), their answers written in as typed `VALUES`, and the rest routed
//! as if the client had sent it: a simple Query as a Query, an extended
//! batch that Parses the statement unnamed as that batch with the Parse
//! rewritten (its parameters bound by the client's Bind; a subquery that
//! takes a parameter is not run first). What is run first, and why that
//! is sound: `hotrepart_router::route::subqueries_first`.
//!
//! A step's replies are captured (`Session::capture`: `flush_client`
//! keeps them, up to `max_parse_bytes`: the statement they are written
//! into is parsed): its rows become the answer; its
//! notices reach the client; its error is the statement's (PostgreSQL's
//! words, or the node's refusal of the subquery, which names its cause),
//! except an error saying the subquery names what only the outer query
//! has (42P01, 42703: a correlated subquery), which gives the statement's
//! own refusal.

use super::conn::*;
use super::script::query_frame;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::wire::{self, be, fe, rfq, Frame};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::route::{values_query, AnswerColumn, SubqueriesFirst};
use hotrepart_wire::backend::{row_description, text_data_row_in};
use tokio::io::{AsyncRead, AsyncWrite};

/// How many statements deep subqueries are run first inside subqueries
/// run first.
const MAX_DEPTH: u8 = 4;

/// The replies of a step being run (see the module's comment).
pub(crate) struct Capture {
    limit: usize,
    overflow: bool,
}

impl Capture {
    /// At a flush of `out`: past the limit its bytes are dropped and the
    /// step fails.
    pub(super) fn keep(&mut self, out: &mut BytesMut) {
        if out.len() > self.limit {
            self.overflow = true;
            out.clear();
        }
    }
}

/// The statement a batch binds (see [`Session::bound_statement`]).
struct BoundStatement {
    sql: String,
    /// Its Parse's parameter types (count, then OIDs), as sent.
    types: Vec<u8>,
    /// The index of its Parse in the batch, if there.
    parse_at: Option<usize>,
    /// The first frame naming it (a Bind, a Describe of it): the node's
    /// Parse goes before it.
    first_use: Option<usize>,
    /// Its name, when it is a named statement prepared before.
    named: Option<String>,
}

/// `bind` binding the unnamed statement instead of its own.
fn unnamed_bind(bind: &Frame) -> Frame {
    let mut b = bind.body();
    let portal = wire::get_cstr(&mut b).unwrap_or_default().to_string();
    let _ = wire::get_cstr(&mut b);
    let mut out = BytesMut::new();
    wire::frame(&mut out, fe::BIND, |o| {
        wire::put_cstr(o, &portal);
        o.put_u8(0);
        o.put_slice(b);
    });
    Frame { raw: out.freeze() }
}

/// Why a step gives no answer: a refusal, or its own ErrorResponse.
enum Failed {
    Refused(Refusal),
    Error(Bytes),
}

/// A column of a step's answer, as its RowDescription gives it.
struct Column {
    name: String,
    oid: u32,
    typmod: i32,
}

/// What a step's run gave.
enum Ran {
    Rows {
        columns: Vec<Column>,
        rows: Vec<Vec<Option<String>>>,
    },
    /// Its ErrorResponse, and that error's SQLSTATE.
    Failed(Bytes, String),
    /// A value or name not in the session's encoding.
    Unreadable(Refusal),
    TooLarge,
}

/// Floats and the geometric types made of them (and their arrays).
const FLOATS: &[u32] = &[
    700, 701, 1021, 1022, 600, 601, 602, 603, 604, 628, 718, 1017, 1018, 1019, 1020, 1027, 629, 719,
];
/// Times with a zone (and their arrays).
const ZONED_TIMES: &[u32] = &[1184, 1266, 1185, 1270];
/// Built-in types of a collation (and their arrays); `name` is always C.
const TEXTS: &[u32] = &[25, 1043, 1042, 1009, 1015, 1014];

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The subqueries of a refused simple-protocol statement to run first.
    pub(super) fn subqueries_first_of(&self, sql: &str) -> Option<SubqueriesFirst> {
        if self.first_depth >= MAX_DEPTH {
            return None;
        }
        let snap = self.node.routing.catalog.load();
        hotrepart_router::route::subqueries_first(&snap, &self.ns, sql)
    }

    /// Runs `f`'s steps, then the statement with their answers; `refused`:
    /// what the client gets when a step shows the rewrite does not apply.
    pub(super) async fn run_subqueries_first(
        &mut self,
        f: SubqueriesFirst,
        refused: Refusal,
    ) -> Result<(), SessionError> {
        self.first_depth += 1;
        let r = match Box::pin(self.answers_of(&f, &refused)).await {
            Ok(Ok(answers)) => {
                let sql = f.substitute(&answers);
                tracing::debug!(%sql, "subqueries run first");
                Box::pin(self.on_query(query_frame(&sql))).await
            }
            Ok(Err(failed)) => {
                self.push_failure(failed, None);
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.first_depth -= 1;
        r
    }

    /// An extended-protocol batch refused (`refused`, 0A000) that binds
    /// one statement — Parsed in it unnamed (psycopg 3, node-postgres), or
    /// a named statement prepared before (psycopg 3 past its
    /// `prepare_threshold`, JDBC past `prepareThreshold`, asyncpg) — a
    /// SELECT with subqueries to run first that take no parameter: those
    /// run (in the simple protocol, as [`Session::run_subqueries_first`]
    /// runs them), then the batch runs with the statement rewritten and
    /// Parsed unnamed (its parameters bound as the client bound them; the
    /// node's ParseComplete hidden when the client sent no Parse).
    /// Afterwards the client's unnamed statement is its own again, not
    /// the rewritten text. False: it does not apply (the caller refuses
    /// the batch).
    pub(super) async fn batch_subqueries_first(
        &mut self,
        frames: &[Frame],
        refused: &Refusal,
        synced: bool,
    ) -> Result<Option<bool>, SessionError> {
        // Not after a Flush-ended batch (the steps' simple Queries would
        // commit its implicit transaction).
        if !synced || self.part.is_some() || self.first_depth >= MAX_DEPTH || self.be.mid_pipeline()
        {
            return Ok(None);
        }
        let Some(shape) = self.bound_statement(frames) else {
            return Ok(None);
        };
        let Some(f) = self.subqueries_first_of(&shape.sql) else {
            return Ok(None);
        };
        // A step is run in the simple protocol: without parameters.
        if f.steps.iter().any(|s| s.sql.contains('$')) {
            return Ok(None);
        }
        // Replies owed by earlier synced batches first; one was an error:
        // this batch is skipped to its Sync, as PostgreSQL does (false:
        // the Syncs held run as the next round).
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
            if self.skipped(frames) {
                return Ok(Some(false));
            }
        }
        self.first_depth += 1;
        let answers = Box::pin(self.answers_of(&f, refused)).await;
        self.first_depth -= 1;
        let answers = match answers? {
            Ok(answers) => answers,
            Err(failed) => {
                self.push_failure(failed, Some(synced));
                self.batch.clear();
                return Ok(Some(true));
            }
        };
        // The steps' Queries dropped the backends' unnamed statements.
        let all: Vec<usize> = (0..self.be.slots.len()).collect();
        self.unnamed_replaced_on(&all);
        let sql = f.substitute(&answers);
        tracing::debug!(%sql, "subqueries run first (extended protocol)");
        let mut p = BytesMut::new();
        wire::frame(&mut p, fe::PARSE, |o| {
            o.put_u8(0);
            wire::put_cstr(o, &sql);
            o.put_slice(&shape.types);
        });
        let parse = Frame { raw: p.freeze() };
        let mut held = Vec::with_capacity(frames.len() + 1);
        for (i, fr) in frames.iter().enumerate() {
            if Some(i) == shape.parse_at {
                held.push(parse.clone());
                continue;
            }
            if shape.parse_at.is_none() && Some(i) == shape.first_use {
                held.push(parse.clone());
            }
            held.push(match (fr.tag(), &shape.named) {
                (fe::BIND, Some(_)) => unnamed_bind(fr),
                (fe::DESCRIBE, Some(_)) if fr.body().first() == Some(&b'S') => {
                    let mut d = BytesMut::new();
                    wire::frame(&mut d, fe::DESCRIBE, |o| {
                        o.put_u8(b'S');
                        o.put_u8(0);
                    });
                    Frame { raw: d.freeze() }
                }
                _ => fr.clone(),
            });
        }
        let client_unnamed = self.unnamed.take();
        if shape.named.is_some() {
            // The client sent no Parse: it gets no ParseComplete.
            self.hide_parse_complete = Some(self.out.len());
        }
        self.batch = held;
        let mut r = Box::pin(self.run_batch_rounds(synced)).await;
        if shape.named.is_some() {
            // Its replies in now (a statement passed to one shard owes
            // them), so the hidden ParseComplete is this batch's: a
            // pipelined batch after it may hide its own.
            if r.is_ok() {
                r = self.drain_owed().await;
            }
            self.drop_hidden_parse_complete();
            self.hide_parse_complete = None;
        }
        // The client's unnamed statement: the one it Parsed (its text,
        // which a later Bind without Parse runs — or is refused), or the
        // one it had; prepared again where next bound.
        self.unnamed = match shape.parse_at {
            Some(at) => Some(Unnamed::new(
                frames[at].raw.clone(),
                None,
                &hotrepart_router::classify::classify(&shape.sql),
            )),
            None => client_unnamed.map(|mut u| {
                u.on = None;
                u
            }),
        };
        r.map(|()| Some(true))
    }

    /// The one statement `frames` bind, if the batch is Parse (unnamed,
    /// optional), one Bind of it, Describe, Execute and Sync. (Several
    /// Binds may go to several shards: the batch would be cut, and the
    /// client's unnamed statement restored before its parts run.)
    fn bound_statement(&self, frames: &[Frame]) -> Option<BoundStatement> {
        let mut parse_at = None;
        let mut first_bind = None;
        let mut first_use = None;
        let mut nparams = 0usize;
        let mut bound: Option<String> = None;
        let mut sql = None;
        let mut types = Vec::new();
        let mut described = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE if parse_at.is_none() && first_bind.is_none() => {
                    if !wire::get_cstr(&mut b).ok()?.is_empty() {
                        return None;
                    }
                    sql = Some(wire::get_cstr(&mut b).ok()?.to_string());
                    types = b.to_vec();
                    parse_at = Some(i);
                }
                fe::BIND if first_bind.is_none() => {
                    wire::get_cstr(&mut b).ok()?;
                    bound = Some(wire::get_cstr(&mut b).ok()?.to_string());
                    let nf = wire::get_i16(&mut b).ok()?;
                    for _ in 0..nf {
                        wire::get_i16(&mut b).ok()?;
                    }
                    nparams = usize::try_from(wire::get_i16(&mut b).ok()?).ok()?;
                    first_bind = Some(i);
                    first_use.get_or_insert(i);
                }
                fe::DESCRIBE if b.first() == Some(&b'S') => {
                    b = &b[1..];
                    described.push(wire::get_cstr(&mut b).ok()?.to_string());
                    first_use.get_or_insert(i);
                }
                fe::DESCRIBE | fe::EXECUTE | fe::SYNC => {}
                _ => return None,
            }
        }
        let bound = bound?;
        if described.iter().any(|d| *d != bound) {
            return None;
        }
        let named = if parse_at.is_some() {
            if !bound.is_empty() {
                return None;
            }
            None
        } else {
            if bound.is_empty() {
                return None;
            }
            let st = self.stmts.get(&bound)?;
            sql = Some(st.sql.to_string());
            // The statement's parameter types: as its Parse gave them,
            // those it left unspecified as a Describe of it told (asyncpg,
            // tokio-postgres send 0 and bind by the description).
            let t = self.known_param_types(&bound, self.param_types(&bound), nparams);
            let mut v = Vec::with_capacity(2 + 4 * t.len());
            v.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for oid in t {
                v.extend_from_slice(&oid.to_be_bytes());
            }
            types = v;
            Some(bound)
        };
        Some(BoundStatement {
            sql: sql?,
            types,
            parse_at,
            first_use,
            named,
        })
    }

    /// At a flush: the ParseComplete of the node's own Parse (a batch that
    /// bound a named statement, run with the rewritten text unnamed) is
    /// not shown; an error or ReadyForQuery before it ends the search.
    pub(super) fn drop_hidden_parse_complete(&mut self) {
        let Some(mut at) = self.hide_parse_complete else {
            return;
        };
        while let Some((tag, size)) = whole_frame_at(&self.out, at) {
            match tag {
                b'1' => {
                    let tail = self.out.split_off(at);
                    self.out.extend_from_slice(&tail[size..]);
                    self.hide_parse_complete = None;
                    return;
                }
                be::ERROR_RESPONSE | be::READY_FOR_QUERY => {
                    self.hide_parse_complete = None;
                    return;
                }
                _ => at += size,
            }
        }
        self.hide_parse_complete = Some(at);
    }

    /// The client's error for a failed step: a refusal, or the step's own
    /// ErrorResponse; then ReadyForQuery (`synced`: for an extended
    /// batch, which skips to its Sync when it has none).
    fn push_failure(&mut self, failed: Failed, batch: Option<bool>) {
        match failed {
            Failed::Refused(r) => match batch {
                Some(synced) => self.batch_error(&r, synced),
                None => self.refuse_simple(r),
            },
            Failed::Error(frame) => {
                self.push_synthetic(frame);
                if self.txn.open() {
                    self.txn.failed = true;
                }
                let status = self.client_status();
                self.push_synthetic(rfq(status));
            }
        }
    }

    /// Each step's answer as a query of literals, or why not.
    async fn answers_of(
        &mut self,
        f: &SubqueriesFirst,
        refused: &Refusal,
    ) -> Result<Result<Vec<String>, Failed>, SessionError> {
        if !self.be.owed.is_empty() {
            self.drain_owed().await?;
        }
        let limit = self.answers_limit();
        // The template and every answer count against the limit.
        let mut left = limit.saturating_sub(f.template_len());
        let mut answers = Vec::with_capacity(f.steps.len());
        for step in &f.steps {
            let (columns, rows) = match self.run_captured(&step.sql, left).await? {
                Ran::Rows { columns, rows } => (columns, rows),
                Ran::Failed(_, code) if matches!(code.as_str(), "42P01" | "42703") => {
                    return Ok(Err(Failed::Refused(refused.clone())));
                }
                Ran::Failed(frame, _) => return Ok(Err(Failed::Error(frame))),
                Ran::Unreadable(r) => return Ok(Err(Failed::Refused(r))),
                Ran::TooLarge => return Ok(Err(Failed::Refused(too_large(limit)))),
            };
            if columns.is_empty() {
                // `VALUES ()` cannot be written.
                return Ok(Err(Failed::Refused(refused.clone())));
            }
            if let Err(r) = self.answer_reads_back(&columns).await? {
                return Ok(Err(Failed::Refused(r)));
            }
            let cols = match self.answer_columns(&columns).await? {
                Ok(cols) => cols,
                Err(r) => return Ok(Err(Failed::Refused(r))),
            };
            let rows: Vec<Vec<Option<&str>>> = rows
                .iter()
                .map(|r| r.iter().map(Option::as_deref).collect())
                .collect();
            let answer = values_query(&cols, &rows);
            if answer.len() > left {
                return Ok(Err(Failed::Refused(too_large(limit))));
            }
            left -= answer.len();
            answers.push(answer);
        }
        Ok(Ok(answers))
    }

    /// How long the statement with its answers written in may be: it is
    /// parsed again (`max_parse_bytes`; when that is 0, unlimited, the
    /// merge's `max_merge_bytes`).
    fn answers_limit(&self) -> usize {
        let cfg = self.node.cfg();
        if cfg.max_parse_bytes == 0 {
            cfg.max_merge_bytes
        } else {
            cfg.max_parse_bytes
        }
    }

    /// Refuses an answer whose text would not read back as the same
    /// value in the statement: floats the session writes rounded
    /// (`extra_float_digits` below 1), times with zone abbreviations
    /// (a `DateStyle` other than ISO), text of a database whose columns
    /// may have other collations than the default (the VALUES column
    /// takes the default).
    async fn answer_reads_back(
        &mut self,
        columns: &[Column],
    ) -> Result<Result<(), Refusal>, SessionError> {
        let refusal = |why: String| {
            Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("a subquery that needs the rows of several shards is run first and its answer written into the statement as text, but {why}; or run the subquery yourself"),
            )
        };
        let has = |oids: &[u32]| columns.iter().any(|c| oids.contains(&c.oid));
        let digits = self
            .state
            .get("extra_float_digits")
            .and_then(|v| v.trim().parse::<i32>().ok())
            .unwrap_or(1);
        if digits < 1 && has(FLOATS) {
            return Ok(Err(refusal("this session writes floating-point values rounded (extra_float_digits below 1): set extra_float_digits to 1 (PostgreSQL's default)".into())));
        }
        let iso = self
            .state
            .get("DateStyle")
            .is_none_or(|d| d.trim_start().to_ascii_uppercase().starts_with("ISO"));
        if !iso && has(ZONED_TIMES) {
            return Ok(Err(refusal("this session writes times with a zone by DateStyle's abbreviations, which may read back as another zone: set DateStyle to ISO".into())));
        }
        if has(TEXTS) {
            let home = self.node.routing.home_index();
            if !self.node.knows_text_collation(home, &self.database) {
                if let Err(r) = self.switch_to(home).await? {
                    return Ok(Err(r));
                }
                self.unnamed_replaced_on(&[home]);
                if let Some(b) = self.be.slots[home].conn.as_mut() {
                    super::attach::learn_text_collation(&self.node, &self.database, home, b).await;
                }
            }
            match self.node.text_collation(home, &self.database) {
                Some(c) => {
                    if let Err(why) = c.uniform {
                        return Ok(Err(refusal(format!(
                            "its text would take the database's default collation and {why}"
                        ))));
                    }
                }
                None => {
                    return Ok(Err(refusal(
                        "the collations of this database's columns are not known yet (retry)"
                            .into(),
                    )))
                }
            }
        }
        Ok(Ok(()))
    }

    /// Runs `sql` as the client's simple Query and keeps its replies (at
    /// most `limit` bytes of them).
    async fn run_captured(&mut self, sql: &str, limit: usize) -> Result<Ran, SessionError> {
        let saved = std::mem::take(&mut self.out);
        // A step run inside a step: the outer capture is the saved one.
        let outer = self.capture.replace(Capture {
            limit,
            overflow: false,
        });
        let mut r = Box::pin(self.on_query(query_frame(sql))).await;
        if r.is_ok() {
            // A statement passed to one shard: its replies.
            r = self.drain_owed().await;
        }
        let capture = std::mem::replace(&mut self.capture, outer);
        let got = std::mem::replace(&mut self.out, saved);
        r?;
        if capture.is_some_and(|c| c.overflow) || got.len() > limit {
            return Ok(Ran::TooLarge);
        }
        let enc = self.enc;
        let text = |v: &[u8]| -> Result<String, Refusal> {
            enc.decode(v)
                .map(|s| s.into_owned())
                .map_err(|e| Refusal::new(sqlstate::intern(e.code), e.message))
        };
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        let mut b = got.freeze();
        while let Some((tag, size)) = whole_frame_at(&b, 0) {
            let frame = b.split_to(size);
            let body = &frame[5..];
            match tag {
                be::ROW_DESCRIPTION => {
                    columns.clear();
                    for f in row_description(&frame).unwrap_or_default() {
                        let name = match text(&f.name) {
                            Ok(n) => n,
                            Err(r) => return Ok(Ran::Unreadable(r)),
                        };
                        let m = &f.meta;
                        columns.push(Column {
                            name,
                            oid: f.type_oid(),
                            typmod: i32::from_be_bytes([m[12], m[13], m[14], m[15]]),
                        });
                    }
                }
                be::DATA_ROW => {
                    let bad = std::cell::Cell::new(None);
                    let row = text_data_row_in(body, |v| {
                        text(v).map_err(|r| {
                            let m = r.message.clone();
                            bad.set(Some(r));
                            wire::WireError::Protocol(m)
                        })
                    });
                    match (row, bad.into_inner()) {
                        (Ok(row), _) => rows.push(row),
                        (Err(_), Some(r)) => return Ok(Ran::Unreadable(r)),
                        (Err(e), None) => {
                            return Ok(Ran::Unreadable(Refusal::new(
                                sqlstate::INTERNAL_ERROR,
                                format!("a row of a subquery run first could not be read: {e}"),
                            )))
                        }
                    }
                }
                be::ERROR_RESPONSE => {
                    let (code, _) = wire::parse_error_fields(body);
                    return Ok(Ran::Failed(frame, code));
                }
                // Its notices and settings reach the client.
                be::NOTICE_RESPONSE | be::PARAMETER_STATUS | be::NOTIFICATION_RESPONSE => {
                    self.push_synthetic(frame)
                }
                _ => {}
            }
        }
        Ok(Ran::Rows { columns, rows })
    }

    /// The answer's columns with their types as SQL: built-in types by
    /// name, others as the home shard's `format_type` writes them (the
    /// OIDs a client sees are the home shard's: `type_oids.rs`).
    async fn answer_columns(
        &mut self,
        columns: &[Column],
    ) -> Result<Result<Vec<AnswerColumn>, Refusal>, SessionError> {
        let mut names: Vec<Option<String>> = columns
            .iter()
            .map(|c| builtin_type_sql(c.oid).map(str::to_owned))
            .collect();
        let unknown: Vec<&Column> = columns
            .iter()
            .zip(&names)
            .filter(|(_, n)| n.is_none())
            .map(|(c, _)| c)
            .collect();
        if !unknown.is_empty() {
            let home = self.node.routing.home_index();
            if let Err(r) = self.switch_to(home).await? {
                return Ok(Err(r));
            }
            // With the column's type modifier: `bit` alone is bit(1), a
            // cast to it cuts '101' to '1'.
            let oids: Vec<String> = unknown.iter().map(|c| c.oid.to_string()).collect();
            let mods: Vec<String> = unknown.iter().map(|c| c.typmod.to_string()).collect();
            let sql = format!(
                "SELECT pg_catalog.format_type(o, m) FROM ROWS FROM (pg_catalog.unnest('{{{}}}'::pg_catalog.oid[]), pg_catalog.unnest('{{{}}}'::pg_catalog.int4[])) WITH ORDINALITY AS u(o, m, n) ORDER BY n",
                oids.join(","),
                mods.join(",")
            );
            let rows = match self
                .query_on(home, &sql, "naming the types of a subquery's columns")
                .await
            {
                Ok(rows) => rows,
                Err(r) => return Ok(Err(r)),
            };
            let mut got = rows.into_iter().map(|r| r.into_iter().next().flatten());
            for n in names.iter_mut().filter(|n| n.is_none()) {
                *n = got.next().flatten();
            }
        }
        let mut out = Vec::with_capacity(columns.len());
        for (c, ty) in columns.iter().zip(names) {
            let Some(type_sql) = ty.filter(|t| t != "-" && !t.starts_with("???")) else {
                return Ok(Err(Refusal::new(
                    sqlstate::INTERNAL_ERROR,
                    format!("the type (OID {}) of column \"{}\" of a subquery hotrepart runs first has no name on the home shard", c.oid, c.name),
                )));
            };
            out.push(AnswerColumn {
                name: c.name.clone(),
                type_sql,
            });
        }
        Ok(Ok(out))
    }
}

/// The tag and size of the whole frame at `at` of `buf` (None: none
/// there, or not whole yet).
fn whole_frame_at(buf: &[u8], at: usize) -> Option<(u8, usize)> {
    let h = buf.get(at..at + 5)?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    (len >= 4 && at + 1 + len <= buf.len()).then_some((h[0], 1 + len))
}

/// The statement with the answers of its subqueries written in would be
/// too long to parse.
fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("a subquery that needs the rows of several shards is run first and its answer written into the statement, which would then be longer than max_parse_bytes ({limit} bytes); narrow the subquery, or run it first yourself"),
    )
}

/// The SQL name of a built-in type whose name no schema can hide.
fn builtin_type_sql(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "pg_catalog.bool",
        17 => "pg_catalog.bytea",
        18 => "pg_catalog.\"char\"",
        19 => "pg_catalog.name",
        20 => "pg_catalog.int8",
        21 => "pg_catalog.int2",
        23 => "pg_catalog.int4",
        25 => "pg_catalog.text",
        26 => "pg_catalog.oid",
        114 => "pg_catalog.json",
        700 => "pg_catalog.float4",
        701 => "pg_catalog.float8",
        790 => "pg_catalog.money",
        869 => "pg_catalog.inet",
        650 => "pg_catalog.cidr",
        1042 => "pg_catalog.bpchar",
        1043 => "pg_catalog.varchar",
        1082 => "pg_catalog.date",
        1083 => "pg_catalog.time",
        1114 => "pg_catalog.timestamp",
        1184 => "pg_catalog.timestamptz",
        1186 => "pg_catalog.interval",
        1266 => "pg_catalog.timetz",
        1700 => "pg_catalog.numeric",
        2950 => "pg_catalog.uuid",
        3802 => "pg_catalog.jsonb",
        1000 => "pg_catalog.bool[]",
        1005 => "pg_catalog.int2[]",
        1007 => "pg_catalog.int4[]",
        1009 => "pg_catalog.text[]",
        1016 => "pg_catalog.int8[]",
        1231 => "pg_catalog.numeric[]",
        2951 => "pg_catalog.uuid[]",
        3807 => "pg_catalog.jsonb[]",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_names_are_schema_qualified() {
        for oid in [16, 20, 23, 25, 1700, 3802, 1016] {
            assert!(builtin_type_sql(oid).is_some_and(|n| n.starts_with("pg_catalog.")));
        }
        assert_eq!(builtin_type_sql(16384), None);
    }
}
