//! `COPY` of sharded tables (and `COPY FROM` of reference tables) through
//! the node.
//!
//! `COPY … FROM STDIN`: the client's CopyData stream is cut into rows by the
//! router's [`RowSplitter`] (text, CSV, binary), each row's shard key is read
//! and routed with the catalog code that routes statements, and the row's
//! bytes go unchanged to the owning shard, where the client's own `COPY`
//! statement runs. Reference tables get the whole stream on every shard.
//! - Outside a transaction block every shard's COPY runs inside a
//!   transaction begun by the node; they are committed only after every
//!   shard reported success, with two-phase commit when there are several
//!   ([`crate::exec::twopc`]), and a failure anywhere rolls back everywhere.
//! - Inside a transaction block a shard's COPY is started when its first row
//!   arrives: one COPY writes to one shard (rows for a second shard are
//!   refused with 0A000 and the transaction fails); the transaction itself
//!   may write to several shards and then commits with two-phase commit.
//! - A row whose key cannot be read (bad syntax, NULL, wrong number of
//!   fields, malformed CSV/binary data) makes every shard's COPY fail
//!   (CopyFail) and the client get one error; nothing lands.
//! - Rows are routed by the routing table current when their message
//!   arrives. A row of a range frozen for a cut-over waits for the next
//!   table (the node's `FreezeWait`, as a statement does) and goes where
//!   it names — unless this COPY's transaction already wrote to the range's
//!   source, which the cut-over waits for: then 40001 at once
//!   ([`route_held`]).
//! - The header line (text/CSV `HEADER`) and the binary file header go to
//!   every shard before its rows: each shard runs the client's statement
//!   unchanged, so it expects them. The binary trailer is sent by the node.
//!
//! `COPY … TO STDOUT`: the statement runs on every shard; the client gets one
//! CopyOutResponse, the shards' data one shard after the other (a header line
//! once; the binary file header once and the trailer once), one CopyDone and
//! one `COPY n` with the total.
//!
//! Memory is bounded: per shard at most ~64 KiB of rows waiting to be sent,
//! plus one partial row (at most `max_message_size`).

use crate::backend::conn::BackendConn;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Decision, Target};
use crate::session::conn::Session;
use crate::wire::{self, Frame, Severity, WireError};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::catalog::{KeyType, RangeStatus, RoutingSnapshot, ShardId};
use hotrepart_router::route::copy::{CopyFormat, CopyPlan, CopyTable, Piece, RowSplitter};
use hotrepart_router::route::{CopyDirection, RouteError};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Rows waiting for one shard are sent when they reach this size.
const FLUSH_AT: usize = 64 * 1024;
/// How long shards get to answer a CopyFail or a cancel before their
/// connections are closed instead.
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// The extended-protocol batch that holds the COPY's Bind/Execute.
pub(crate) struct Ext {
    pub(crate) frames: Vec<Frame>,
    pub(crate) synced: bool,
}

/// How replies end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Simple,
    Extended { synced: bool },
}

/// Runs a COPY the router marked for the node (`Decision::copy`): simple
/// protocol when `ext` is None, else the extended-protocol batch.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    ext: Option<Ext>,
) -> Result<(), SessionError> {
    let (Some(plan), Target::Multi { shards, .. }) = (d.copy.clone(), &d.target) else {
        return Ok(());
    };
    let shards = shards.clone();
    if !s.owed.is_empty() {
        s.drain_owed().await?;
    }
    let proto = match &ext {
        None => Proto::Simple,
        Some(e) => Proto::Extended { synced: e.synced },
    };
    if let Some(e) = &ext {
        if let Err(r) = ext_prelude(s, &e.frames) {
            reply_error(s, proto, false, r.code, &r.message);
            return Ok(());
        }
    }
    let res = match plan.direction {
        CopyDirection::From => copy_from(s, d, &plan, &shards, proto).await,
        CopyDirection::To => copy_to(s, d, &plan, &shards, proto).await,
    };
    if res.is_err() {
        // The session ends; no backend in the middle of a COPY may be pooled.
        for &t in &shards {
            if let Some(b) = s.slots[t].conn.as_mut() {
                b.broken = true;
            }
        }
    }
    res
}

/// Answers the messages of the batch before its Execute as PostgreSQL would
/// for a COPY (BindComplete, NoData …). A Parse in the same batch is refused:
/// the statement must be prepared in a batch of its own (tokio-postgres
/// does), or sent as a simple query (psql, libpq, pgjdbc do).
fn ext_prelude<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    frames: &[Frame],
) -> Result<(), Refusal> {
    let mut replies = BytesMut::new();
    let mut executed = false;
    for f in frames {
        match f.tag() {
            b'B' if !executed => wire::frame(&mut replies, b'2', |_| {}),
            b'D' if !executed => {
                if f.body().first() == Some(&b'S') {
                    wire::frame(&mut replies, b't', |o| o.put_i16(0));
                }
                wire::frame(&mut replies, b'n', |_| {});
            }
            b'E' if !executed => executed = true,
            b'S' | b'H' => {}
            b'P' => {
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "a COPY of a sharded or reference table cannot be parsed in the batch that executes it; prepare it in a batch of its own (Parse, Sync) or send it as a simple query".into(),
                ))
            }
            _ => {
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "a COPY of a sharded or reference table must be the only statement of its extended-protocol batch".into(),
                ))
            }
        }
    }
    if !executed {
        return Err(Refusal::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "a COPY of a sharded or reference table must be executed in the batch that binds it"
                .into(),
        ));
    }
    s.out.put_slice(&replies);
    Ok(())
}

/// An error reply. `copying_in`: the client is in copy-in mode (extended
/// protocol: PostgreSQL then skips everything up to the next Sync, as the
/// batch's own Sync was ignored in copy-in mode).
fn reply_error<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    proto: Proto,
    copying_in: bool,
    code: &str,
    msg: &str,
) {
    wire::error_response(&mut s.out, Severity::Error, code, msg);
    if s.tx_status != b'I' {
        s.tx_failed = true;
    }
    match proto {
        Proto::Simple => {
            let st = s.client_status();
            s.out.put_slice(&rfq(st));
        }
        Proto::Extended { synced } => {
            if synced && !copying_in {
                let st = s.client_status();
                s.out.put_slice(&rfq(st));
            } else {
                s.skip_to_sync = true;
            }
        }
    }
}

/// The end of a successful COPY: CommandComplete, and ReadyForQuery where
/// PostgreSQL sends one (simple protocol; extended: a COPY TO's own Sync,
/// a COPY FROM's comes after CopyDone).
fn reply_done<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    proto: Proto,
    from: bool,
    n: u64,
) {
    s.out.put_slice(&command_complete(&format!("COPY {n}")));
    let ready = match proto {
        Proto::Simple => true,
        Proto::Extended { synced } => synced && !from,
    };
    if ready {
        let st = s.client_status();
        s.out.put_slice(&rfq(st));
    }
}

/// One shard's side of a COPY FROM.
struct ShardCopy {
    /// Node shard index.
    t: usize,
    /// In copy-in mode on the shard.
    started: bool,
    /// The header (text/CSV header line, binary file header) was queued.
    got_header: bool,
    /// Frames waiting to be sent; `open` is the length field of the
    /// CopyData frame rows are appended to.
    out: BytesMut,
    open: Option<usize>,
    /// The shard's error, if it reported one.
    error: Option<(String, String)>,
    /// ReadyForQuery seen after the COPY.
    done: bool,
    /// Its CommandComplete tag.
    tag: Option<String>,
    /// Rows of this COPY queued or sent to the shard.
    rows: u64,
    /// The shard's name, for errors (COPY FROM).
    name: String,
}

impl ShardCopy {
    fn new(t: usize) -> ShardCopy {
        ShardCopy {
            t,
            started: false,
            got_header: false,
            out: BytesMut::new(),
            open: None,
            error: None,
            done: false,
            tag: None,
            rows: 0,
            name: String::new(),
        }
    }

    fn push_data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.open.is_none() {
            self.out.put_u8(b'd');
            self.open = Some(self.out.len());
            self.out.put_u32(0);
        }
        self.out.extend_from_slice(data);
    }

    fn close_frame(&mut self) {
        if let Some(at) = self.open.take() {
            let len = (self.out.len() - at) as u32;
            self.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    fn header(&mut self, header: Option<&Bytes>) {
        if !self.got_header {
            self.got_header = true;
            if let Some(h) = header {
                self.push_data(h);
            }
        }
    }

    fn count(&self) -> u64 {
        self.tag
            .as_deref()
            .and_then(|t| t.strip_prefix("COPY "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

fn shard_name<S>(s: &Session<S>, t: usize) -> String {
    s.node.shard_name(t)
}

fn encoding_ok(enc: &str, key: Option<KeyType>) -> bool {
    // PostgreSQL's own name cleaning: alphanumerics only, any case.
    let e: String = enc
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase();
    if e == "UTF8" || e == "UNICODE" {
        return true;
    }
    // Text keys are hashed as UTF-8. Other keys: only encodings whose
    // characters never contain ASCII bytes other than themselves (single-byte
    // and EUC encodings) can be split without converting; an allow-list, so
    // that no alias of SJIS, BIG5, GBK, UHC, GB18030 or JOHAB (whose second
    // bytes may be a backslash or a delimiter) gets through.
    key != Some(KeyType::Text)
        && (matches!(
            e.as_str(),
            "SQLASCII"
                | "MULEINTERNAL"
                | "EUCJP"
                | "EUCCN"
                | "EUCKR"
                | "EUCTW"
                | "EUCJIS2004"
                | "KOI8"
                | "KOI8R"
                | "KOI8U"
                | "ALT"
                | "WIN"
                | "TCVN"
                | "TCVN5712"
                | "VSCII"
                | "ABC"
        ) || ["LATIN", "ISO8859", "WIN", "WINDOWS"].iter().any(|p| {
            e.strip_prefix(p).is_some_and(|n| {
                !n.is_empty()
                    && n.bytes().all(|c| c.is_ascii_digit())
                    && !matches!(n, "932" | "936" | "949" | "950")
            })
        }))
}

/// The first of DELIMITER, QUOTE, ESCAPE, NULL in a COPY statement whose
/// value is not a quoted string (a conservative scan: quoted strings and
/// identifiers are skipped; a false hit only refuses).
fn bare_option_value(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut pending: Option<String> = None;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() || c == b',' || c == b'(' {
            i += 1;
            continue;
        }
        let e_string = (c == b'E' || c == b'e') && b.get(i + 1) == Some(&b'\'');
        if c == b'\'' || e_string {
            // A quoted string: the pending option has its quoted value.
            pending = None;
            i += if e_string { 2 } else { 1 };
            while i < b.len() {
                if e_string && b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if let Some(opt) = pending.take() {
            // Anything but a quoted string (AS is skipped).
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if sql[start..i].eq_ignore_ascii_case("as") {
                pending = Some(opt);
                continue;
            }
            return Some(opt);
        }
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let w = sql[start..i].to_ascii_uppercase();
            if matches!(w.as_str(), "DELIMITER" | "QUOTE" | "ESCAPE" | "NULL") {
                pending = Some(w);
            }
            continue;
        }
        i += 1;
    }
    None
}

fn column_sql(relation: &str) -> String {
    let lit = relation.replace('\\', "\\\\").replace('\'', "''");
    format!(
        "SELECT pg_catalog.current_setting('client_encoding'), a.attname \
         FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = E'{lit}'::pg_catalog.regclass AND a.attnum > 0 \
         AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum"
    )
}

/// What went wrong in a COPY: an error for the client.
struct Fail {
    code: String,
    msg: String,
}

impl Fail {
    fn new(code: &str, msg: impl Into<String>) -> Fail {
        Fail {
            code: code.to_string(),
            msg: msg.into(),
        }
    }
}

impl From<RouteError> for Fail {
    fn from(e: RouteError) -> Fail {
        Fail::new(e.sqlstate, e.message)
    }
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Fail {
        Fail::new(r.code, r.message)
    }
}

/// Reads the copied columns (the statement's list, or the table's
/// non-generated columns from the shard's catalog) and checks the client
/// encoding. Without a column list, every shard in `on` is asked and must
/// agree.
async fn copied_columns<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    on: &[usize],
) -> Result<Result<Vec<String>, Fail>, SessionError> {
    let sql = column_sql(&plan.relation);
    let key = plan.sharded().map(|t| t.key_type);
    let mut first: Option<(usize, Vec<String>)> = None;
    let ask: &[usize] = if plan.columns.is_empty() {
        on
    } else {
        &on[..on.len().min(1)]
    };
    for &t in ask {
        let Some(b) = s.slots[t].conn.as_mut() else {
            continue;
        };
        let rows = match b.hidden_query(&sql).await {
            Ok(rows) => rows,
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                return Ok(Err(Fail { code, msg: message }))
            }
            Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                return Err(s.backend_lost(t, e))
            }
        };
        let mut names = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Some(Some(enc)) = r.first() {
                if !encoding_ok(enc, key) {
                    return Ok(Err(Fail::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "COPY of sharded table \"{}\" needs client_encoding UTF8 (it is {enc})",
                            plan.table
                        ),
                    )));
                }
            }
            names.push(r.get(1).cloned().flatten().unwrap_or_default());
        }
        match &first {
            None => first = Some((t, names)),
            Some((t0, n0)) if *n0 != names => {
                return Ok(Err(Fail::new(
                    sqlstate::INTERNAL_ERROR,
                    format!(
                        "shards {} and {} disagree on the columns of table \"{}\"; is the schema the same everywhere?",
                        shard_name(s, *t0),
                        shard_name(s, t),
                        plan.table
                    ),
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(enc) = &plan.encoding {
        if !encoding_ok(enc, key) {
            return Ok(Err(Fail::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "COPY of sharded table \"{}\" with ENCODING {enc} is not supported",
                    plan.table
                ),
            )));
        }
    }
    let table_cols = first.map(|(_, n)| n).unwrap_or_default();
    if plan.columns.is_empty() {
        return Ok(Ok(table_cols));
    }
    for c in &plan.columns {
        if !table_cols.contains(c) {
            return Ok(Err(Fail::new(
                sqlstate::UNDEFINED_COLUMN,
                format!(
                    "column \"{c}\" of relation \"{}\" does not exist",
                    plan.table
                ),
            )));
        }
    }
    Ok(Ok(plan.columns.clone()))
}

async fn read_backend<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    t: usize,
    wait: Option<Duration>,
) -> Result<Option<Frame>, SessionError> {
    let r = {
        let Some(b) = s.slots[t].conn.as_mut() else {
            return Ok(None);
        };
        match wait {
            None => Some(b.reader.next().await),
            Some(w) => tokio::time::timeout(w, b.reader.next()).await.ok(),
        }
    };
    match r {
        None => Ok(None),
        Some(Ok(f)) => {
            if f.tag() == b'Z' {
                if let Some(b) = s.slots[t].conn.as_mut() {
                    b.status = f.body().first().copied().unwrap_or(b'I');
                }
            }
            Ok(Some(f))
        }
        Some(Err(e)) => Err(s.backend_lost(t, e)),
    }
}

/// A backend message while a shard is in (or leaving) copy-in mode.
fn on_copy_frame<S>(s: &mut Session<S>, sc: &mut ShardCopy, f: &Frame) {
    match f.tag() {
        b'E' if sc.error.is_none() => sc.error = Some(wire::parse_error_fields(f.body())),
        b'Z' => sc.done = true,
        b'N' => s.out.put_slice(&f.raw),
        b'C' => {
            let mut b = f.body();
            sc.tag = wire::get_cstr(&mut b).ok().map(str::to_string);
        }
        b'G' => sc.started = true,
        _ => {}
    }
}

/// Sends what is queued for the shard, reading (and recording) whatever the
/// shard says meanwhile, so a shard writing notices never blocks us.
async fn send_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
            let Some(b) = s.slots[t].conn.as_mut() else {
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
                return Err(s.backend_lost(t, WireError::Io(std::io::ErrorKind::WriteZero.into())))
            }
            Ev::Wrote(n) => pos += n,
            Ev::WriteErr(e) => return Err(s.backend_lost(t, WireError::Io(e))),
            Ev::Read(Err(e)) => return Err(s.backend_lost(t, e)),
            Ev::Read(Ok(f)) => {
                if f.tag() == b'Z' {
                    if let Some(b) = s.slots[t].conn.as_mut() {
                        b.status = f.body().first().copied().unwrap_or(b'I');
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
async fn finish_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    sc: &mut ShardCopy,
    wait: Option<Duration>,
) -> Result<(), SessionError> {
    while !sc.done {
        match read_backend(s, sc.t, wait).await? {
            Some(f) => on_copy_frame(s, sc, &f),
            None => {
                // Timed out (or no connection): close it.
                s.slots[sc.t].conn = None;
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
async fn abort_shards<S: AsyncRead + AsyncWrite + Unpin + Send>(
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

fn encode_fatal() -> SessionError {
    SessionError::Fatal {
        code: sqlstate::INTERNAL_ERROR,
        msg: "cannot encode a message".into(),
    }
}

/// Sends the client's COPY statement to shard `sc` (after `BEGIN` when
/// `begin`) and reads up to its CopyInResponse (or error).
async fn start_shard<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
    if let Some(b) = s.slots[sc.t].conn.as_mut() {
        if let Err(e) = b.writer.write_all(&buf).await {
            return Err(s.backend_lost(sc.t, WireError::Io(e)));
        }
    }
    read_start(s, sc, begin).await
}

async fn read_start<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
            b'Z' if in_begin => in_begin = false,
            b'C' if in_begin => {}
            b'G' => {
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
async fn read_client<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
) -> Result<Frame, SessionError> {
    s.flush_client().await?;
    let cfg = &s.node.cfg;
    let ms = if cfg.idle_in_transaction_timeout_ms > 0 {
        cfg.idle_in_transaction_timeout_ms
    } else {
        cfg.client_idle_timeout_ms
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
fn shard_positions<S>(
    s: &Session<S>,
    snap: &RoutingSnapshot,
    st: &[ShardCopy],
) -> HashMap<ShardId, usize> {
    snap.shards()
        .filter_map(|sh| {
            let t = s.node.shard_index(sh.id.as_str())?;
            let pos = st.iter().position(|sc| sc.t == t)?;
            Some((sh.id.clone(), pos))
        })
        .collect()
}

async fn copy_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    shards: &[usize],
    proto: Proto,
) -> Result<(), SessionError> {
    let in_tx = s.tx_status != b'I';
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
            if let Some(b) = s.slots[sc.t].conn.as_mut() {
                b.broken = true;
            }
        }
    }
    res
}

/// Before copy-in mode: backends, columns, the shards' COPYs started
/// (outside a transaction block) and the client's CopyInResponse.
async fn setup_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    shards: &[usize],
    st: &mut [ShardCopy],
    sql: &str,
    in_tx: bool,
) -> Result<Result<Option<RowSplitter>, Fail>, SessionError> {
    let max_row = s.node.cfg.max_message_size;
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
        wire::frame(&mut g, b'G', |o| {
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
            if let Some(b) = s.slots[sc.t].conn.as_mut() {
                if let Err(e) = b.writer.write_all(&buf).await {
                    return Err(s.backend_lost(sc.t, WireError::Io(e)));
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
enum InEnd {
    Done,
    /// The client's CopyFail (its message).
    ClientFail(String),
    /// The node stops the COPY with this error.
    Stop(Fail),
}

/// A row routed after the message it came in: its range was frozen, or
/// its shard is not in this COPY yet (see [`route_held`]).
struct Held {
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
async fn copy_in_loop<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    st: &mut Vec<ShardCopy>,
    mut splitter: Option<RowSplitter>,
    in_tx: bool,
) -> Result<InEnd, SessionError> {
    let mut snap = s.node.catalog.load_full();
    let mut pos_of = shard_positions(s, &snap, st);
    let mut header: Option<Bytes> = None;
    let mut written: Option<usize> = None;
    let mut held: Vec<Held> = Vec::new();
    loop {
        let f = read_client(s).await?;
        let done = match f.tag() {
            b'd' => false,
            b'c' => true,
            b'f' => {
                let mut b = f.body();
                let m = wire::get_cstr(&mut b).unwrap_or("").to_string();
                return Ok(InEnd::ClientFail(m));
            }
            b'H' | b'S' => continue,
            other => {
                return Ok(InEnd::Stop(Fail::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                )))
            }
        };
        if s.node.catalog.load().epoch() != snap.epoch() {
            snap = s.node.catalog.load_full();
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
                            place(st, &mut written, in_tx, pos, header.as_ref(), data)
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
            let rows = std::mem::take(&mut held);
            let r = route_held(
                s,
                plan,
                st,
                &mut snap,
                &mut pos_of,
                &mut written,
                in_tx,
                header.as_ref(),
                rows,
            )
            .await;
            if let Err(fail) = r {
                return Ok(InEnd::Stop(fail));
            }
        }
        // Start the COPY on a shard when its first row arrives: inside a
        // transaction block every shard (one COPY writes to one shard);
        // outside, a shard the routing table gained during this COPY.
        for sc in st.iter_mut() {
            if sc.started || sc.done || sc.out.is_empty() {
                continue;
            }
            if in_tx {
                if let Err(r) = s.check_write(d, sc.t) {
                    return Ok(InEnd::Stop(r.into()));
                }
            }
            if let Err(r) = s.ensure_backend(sc.t).await? {
                return Ok(InEnd::Stop(r.into()));
            }
            if in_tx {
                s.cur = sc.t;
            }
            // The rows queued for it wait while the COPY starts.
            start_shard(s, sc, &d.sql_text, !in_tx).await?;
            if let Some((code, msg)) = sc.error.clone() {
                let m = format!("{msg} (on shard {})", shard_name(s, sc.t));
                return Ok(InEnd::Stop(Fail { code, msg: m }));
            }
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

/// Queues a row for `st[pos]` (after the header, once). Inside a
/// transaction block one COPY writes to one shard.
fn place(
    st: &mut [ShardCopy],
    written: &mut Option<usize>,
    in_tx: bool,
    pos: usize,
    header: Option<&Bytes>,
    data: &[u8],
) -> Result<(), Fail> {
    if in_tx {
        if let Some(w) = written.filter(|&w| w != pos) {
            return Err(Fail::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "this COPY writes rows to shards {} and {} inside a transaction block; inside a transaction block one COPY writes to one shard (split the rows into one COPY per shard; the transaction may write to several shards)",
                    st[w].name, st[pos].name
                ),
            ));
        }
        *written = Some(pos);
    }
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
///   next routing table with the node's [`crate::node::FreezeWait`] — the
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
async fn route_held<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    plan: &CopyPlan,
    st: &mut Vec<ShardCopy>,
    snap: &mut Arc<RoutingSnapshot>,
    pos_of: &mut HashMap<ShardId, usize>,
    written: &mut Option<usize>,
    in_tx: bool,
    header: Option<&Bytes>,
    rows: Vec<Held>,
) -> Result<(), Fail> {
    let mut wait: Option<crate::node::FreezeWait> = None;
    let mut i = 0;
    while i < rows.len() {
        let row = &rows[i];
        let range = plan.range(snap, &row.key)?;
        if range.status == RangeStatus::Frozen {
            let source = s.node.shard_index(range.write_owner.as_str());
            let wrote_source = pos_of
                .get(&range.write_owner)
                .is_some_and(|&p| st[p].rows > 0)
                || (in_tx && source.is_some_and(|t| s.tx_writes.contains(&t)));
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
                    wait = Some(s.node.freeze_wait());
                }
                Some(w) => {
                    // Nothing of this COPY is in flight to the frozen
                    // range's source (checked above), so its pin goes while
                    // it waits (a fence must not wait for it), and comes
                    // back for the next table. Rows sent to other shards
                    // are not affected by this cut-over.
                    s.pin = None;
                    let next = w.next_table().await;
                    s.pin_routing();
                    if !next {
                        return Err(frozen("that did not end in time"));
                    }
                }
            }
            *snap = s.node.catalog.load_full();
            *pos_of = shard_positions(s, snap, st);
            continue;
        }
        let pos = match pos_of.get(&range.write_owner) {
            Some(&p) => p,
            None => {
                let Some(t) = s.node.shard_index(range.write_owner.as_str()) else {
                    return Err(Fail::new(
                        sqlstate::INTERNAL_ERROR,
                        format!(
                            "shard {} of the routing table is not configured on this node",
                            range.write_owner
                        ),
                    ));
                };
                let mut sc = ShardCopy::new(t);
                sc.name = s.node.shard_name(t);
                st.push(sc);
                pos_of.insert(range.write_owner.clone(), st.len() - 1);
                st.len() - 1
            }
        };
        place(st, written, in_tx, pos, header, &row.data)?;
        i += 1;
    }
    Ok(())
}

/// After copy-in mode: CopyDone (or CopyFail) to the shards, their answers,
/// COMMIT or ROLLBACK, and the client's reply.
async fn end_from<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
            sc.out.put_slice(&[b'c', 0, 0, 0, 4]);
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
            .filter(|&t| s.slots[t].conn.as_ref().is_some_and(|b| b.status == b'T'))
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
            let Some(b) = s.slots[sc.t].conn.as_mut() else {
                continue;
            };
            let sql = if failed.is_some() {
                "ROLLBACK"
            } else {
                "COMMIT"
            };
            match b.hidden_query(sql).await {
                Ok(_) if b.status == b'I' && sql == "COMMIT" => committed.push(sc.t),
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

/// Keeps one shard's COPY TO data as the client must see it in the
/// concatenation: the binary file header of the first shard only, no
/// trailers (the node sends one at the end), the header line of the first
/// shard only.
struct OutFilter {
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
            wire::frame(out, b'd', |o| o.put_slice(&keep));
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
            wire::frame(out, b'd', |o| o.put_slice(&carry));
        }
    }
}

/// Cancels the statement on shards still running it and reads them back to
/// ReadyForQuery (closing those that do not answer in time). Their
/// backends are not pooled afterwards: a late cancel must not hit another
/// client.
async fn cancel_rest<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    running: &[usize],
) -> Result<(), SessionError> {
    for &t in running {
        let Some(b) = s.slots[t].conn.as_mut() else {
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

async fn copy_to<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    plan: &Arc<CopyPlan>,
    shards: &[usize],
    proto: Proto,
) -> Result<(), SessionError> {
    let in_tx = s.tx_status != b'I';
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
        if let Some(b) = s.slots[t].conn.as_mut() {
            if let Err(e) = b.writer.write_all(&buf).await {
                return Err(s.backend_lost(t, WireError::Io(e)));
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
                b'H' => {
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
                b'd' => filter.data(&f.raw, f.body(), &mut s.out),
                b'c' => filter.end(&mut s.out),
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
                wire::frame(&mut s.out, b'd', |o| o.put_slice(&[0xff, 0xff]));
            }
            s.out.put_slice(&[b'c', 0, 0, 0, 4]);
            reply_done(s, proto, false, total);
        }
    }
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}

#[cfg(test)]
mod option_tests {
    use super::{bare_option_value, encoding_ok};
    use hotrepart_router::catalog::KeyType;

    #[test]
    fn bare_option_values_are_found() {
        let f = |s: &str| bare_option_value(s);
        assert_eq!(
            f("COPY t FROM STDIN (FORMAT csv, DELIMITER X)").as_deref(),
            Some("DELIMITER")
        );
        assert_eq!(
            f("COPY t FROM STDIN WITH NULL AS xyz").as_deref(),
            Some("NULL")
        );
        assert_eq!(
            f("COPY t FROM STDIN (FORMAT csv, DELIMITER ';', QUOTE '''', NULL '')"),
            None
        );
        assert_eq!(
            f(r"COPY t FROM STDIN WITH DELIMITER AS E'\t' NULL AS 'x'"),
            None
        );
        assert_eq!(f(r#"COPY "null" (a) FROM STDIN"#), None);
    }

    #[test]
    fn only_safe_encodings() {
        for ok in [
            "UTF8",
            "utf-8",
            "LATIN1",
            "win1252",
            "Windows1251",
            "ISO_8859_5",
            "EUC_JP",
            "SQL_ASCII",
            "KOI8R",
        ] {
            assert!(encoding_ok(ok, Some(KeyType::Int8)), "{ok}");
        }
        for bad in [
            "SJIS",
            "win932",
            "windows932",
            "shift_jis",
            "mskanji",
            "BIG5",
            "win950",
            "GBK",
            "win936",
            "UHC",
            "win949",
            "GB18030",
            "JOHAB",
            "nonsense",
        ] {
            assert!(!encoding_ok(bad, Some(KeyType::Int8)), "{bad}");
        }
        assert!(!encoding_ok("LATIN1", Some(KeyType::Text)));
    }
}
