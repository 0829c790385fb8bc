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
//!   arrives; a transaction that wrote several shards commits with
//!   two-phase commit.
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

use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{Decision, Target};
use crate::session::conn::Session;
use crate::wire::{self, Frame, Severity};
use crate::wire::{be, fe, tx};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::catalog::KeyType;
use hotrepart_router::route::copy::CopyPlan;
use hotrepart_router::route::{CopyDirection, RouteError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

mod from;
use from::{copy_from, finish_shard};
mod to;
use to::copy_to;

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
    if !s.be.owed.is_empty() {
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
    if plan.direction == CopyDirection::From && plan.sharded().is_some() {
        // Columns a sequence numbers, left out: each shard would number
        // its rows on its own (`session/key_default.rs`).
        if let Some(r) = s.copy_refusal(&plan.table, &plan.columns).await? {
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
            if let Some(b) = s.be.slots[t].conn.as_mut() {
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
            fe::BIND if !executed => wire::frame(&mut replies, be::BIND_COMPLETE, |_| {}),
            fe::DESCRIBE if !executed => {
                if f.body().first() == Some(&wire::STATEMENT) {
                    wire::frame(&mut replies, be::PARAMETER_DESCRIPTION, |o| o.put_i16(0));
                }
                wire::frame(&mut replies, be::NO_DATA, |_| {});
            }
            fe::EXECUTE if !executed => executed = true,
            fe::SYNC | fe::FLUSH => {}
            fe::PARSE => {
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
    if s.txn.open() {
        s.txn.failed = true;
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
            self.out.put_u8(be::COPY_DATA);
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
    s.node.routing.shard_name(t)
}

fn encoding_ok(enc: &str, key: Option<KeyType>) -> bool {
    // PostgreSQL's own name for it (any alias, any case).
    let Some(e) = crate::backend::state::canonical_encoding(enc) else {
        return false;
    };
    if e == "UTF8" {
        return true;
    }
    // Text keys are hashed as UTF-8. Other keys: only encodings whose
    // characters never contain ASCII bytes other than themselves (single-byte
    // and EUC encodings) can be split without converting; an allow-list, so
    // that SJIS, BIG5, GBK, UHC, GB18030 and JOHAB (whose second bytes may be
    // a backslash or a delimiter) do not get through.
    key != Some(KeyType::Text)
        && matches!(
            e,
            "SQL_ASCII"
                | "MULE_INTERNAL"
                | "EUC_JP"
                | "EUC_CN"
                | "EUC_KR"
                | "EUC_TW"
                | "EUC_JIS_2004"
                | "KOI8R"
                | "KOI8U"
                | "WIN866"
                | "WIN874"
                | "WIN1250"
                | "WIN1251"
                | "WIN1252"
                | "WIN1253"
                | "WIN1254"
                | "WIN1255"
                | "WIN1256"
                | "WIN1257"
                | "WIN1258"
                | "LATIN1"
                | "LATIN2"
                | "LATIN3"
                | "LATIN4"
                | "LATIN5"
                | "LATIN6"
                | "LATIN7"
                | "LATIN8"
                | "LATIN9"
                | "LATIN10"
                | "ISO_8859_5"
                | "ISO_8859_6"
                | "ISO_8859_7"
                | "ISO_8859_8"
        )
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
        let Some(b) = s.be.slots[t].conn.as_mut() else {
            continue;
        };
        let rows = match b.hidden_query(&sql).await {
            Ok(rows) => rows,
            Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                return Ok(Err(Fail { code, msg: message }))
            }
            Err(crate::backend::conn::HiddenQueryError::Wire(e)) => return Err(s.be.lost(t, e)),
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
        let Some(b) = s.be.slots[t].conn.as_mut() else {
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
            if f.tag() == be::READY_FOR_QUERY {
                if let Some(b) = s.be.slots[t].conn.as_mut() {
                    b.status = f.body().first().copied().unwrap_or(tx::IDLE);
                }
            }
            Ok(Some(f))
        }
        Some(Err(e)) => Err(s.be.lost(t, e)),
    }
}

/// A backend message while a shard is in (or leaving) copy-in mode.
fn on_copy_frame<S>(s: &mut Session<S>, sc: &mut ShardCopy, f: &Frame) {
    match f.tag() {
        be::ERROR_RESPONSE if sc.error.is_none() => {
            sc.error = Some(wire::parse_error_fields(f.body()))
        }
        be::READY_FOR_QUERY => sc.done = true,
        be::NOTICE_RESPONSE => s.out.put_slice(&f.raw),
        be::COMMAND_COMPLETE => {
            let mut b = f.body();
            sc.tag = wire::get_cstr(&mut b).ok().map(str::to_string);
        }
        be::COPY_IN_RESPONSE => sc.started = true,
        _ => {}
    }
}

fn encode_fatal() -> SessionError {
    SessionError::Fatal {
        code: sqlstate::INTERNAL_ERROR,
        msg: "cannot encode a message".into(),
    }
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
