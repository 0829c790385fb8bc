//! A scripted PostgreSQL for the session's unit tests: a tokio listener on
//! 127.0.0.1:0, one task per connection, speaking enough of protocol 3.0
//! for the node's pools and sessions. No PostgreSQL is needed.
//!
//! What it models of PostgreSQL, because the session relies on it:
//! - startup: any user and database, trust (AuthenticationOk), the
//!   ParameterStatus PostgreSQL 15 sends, BackendKeyData (pid = the
//!   connection's number), ReadyForQuery('I'); SSLRequest/GSSENCRequest
//!   answered 'N'; a CancelRequest is recorded and the socket closed;
//! - the transaction status: BEGIN/START TRANSACTION → 'T', COMMIT/END/
//!   ROLLBACK/ABORT → 'I' (COMMIT of a failed block answers ROLLBACK), an
//!   error inside a block → 'E', and then 25P02 for everything but its end;
//! - the extended protocol: named and unnamed statements and portals
//!   (42P05 for a statement name taken, 26000/34000 for unknown ones),
//!   Describe (ParameterDescription + RowDescription/NoData), Execute,
//!   Close; after an error every message up to Sync is skipped; Sync ends
//!   the implicit transaction; replies are buffered until Sync, Flush or
//!   the end of a simple Query, as PostgreSQL does;
//! - simple Query strings of several statements (split at `;` outside
//!   quotes and dollar quotes): one ReadyForQuery, an error ends the string.
//!
//! What a statement answers: by its exact SQL text (trimmed), what the test
//! scripted with [`FakePg::answer`] (rows, a command tag, or an error);
//! else one of the built-in answers below, for what the node sends on its
//! own; else the error XX000 "fake PostgreSQL: nothing scripted for …", so
//! an unexpected statement shows in the client's replies.
//!
//! Built-in answers (the node's hidden queries; see `session/attach.rs`,
//! `session/txn.rs`, `backend/state.rs`, `routing/names.rs`):
//! - transaction control as above;
//! - session settings: `SET [SESSION] name {=|TO} value` → SET, `RESET
//!   name`/`RESET ALL` → RESET, `DISCARD ALL` (also forgets the
//!   connection's statements), and the state replay's `SELECT
//!   pg_catalog.set_config('name', 'value', false), …` → one row; the
//!   connection keeps the values (not transactionally: a rolled-back SET
//!   stays, unlike PostgreSQL) and the state read-back (`SELECT name,
//!   setting FROM pg_catalog.pg_settings …`) answers them;
//! - the collation probe (`CATALOG_PROBE`) → NULL, NULL, NULL, `c/C` (text orders and
//!   compares bytewise);
//! - the namespace probe (`WITH RECURSIVE declared …`) → no rows: the node
//!   then resolves every unqualified name in `public`;
//! - `SELECT name FROM pg_catalog.pg_prepared_statements` → the
//!   connection's named statements;
//! - any other query of `pg_catalog.pg_proc` → no rows (no user functions
//!   or aggregates);
//! - the column-defaults read of a sharded table (`SELECT a.attname,
//!   a.attidentity …`, `session/key_default.rs`) → no rows (nothing for the
//!   node to fill);
//! - the node's poison `DO $$BEGIN RAISE EXCEPTION 'hotrepart: …` → P0001.
//!
//! Probes ([`Msg::is_probe`]) are the catalog and state reads among them:
//! tests that assert what reached a shard usually leave them out.
//!
//! What a test can look at: every message each connection received
//! ([`FakePg::log`], or [`FakePg::msgs`] without startups and probes), the
//! connections accepted and still open, and — the fake's stand-in for
//! data — the scripted statements whose transaction committed
//! ([`FakePg::committed`]: at COMMIT, at the Sync or the end of the Query
//! string that ends an implicit transaction; an error drops what the
//! transaction ran). The fake's answers to the cases above were checked
//! against PostgreSQL 15 (skip-to-Sync, 25P02 at Parse in a failed block,
//! a named statement parsed before an error surviving it, a pipeline's
//! earlier INSERT rolled back by a later error).

use crate::wire::{self, FrameReader};
use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// What a statement answers.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// Text columns (RowDescription on Describe), rows, and the tag
    /// `SELECT n`.
    Rows {
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
    },
    /// A statement without rows (NoData on Describe): its command tag.
    Command(String),
    /// ErrorResponse with this SQLSTATE and message.
    Error { code: String, message: String },
}

impl Answer {
    pub(crate) fn rows(columns: &[&str], rows: &[&[&str]]) -> Answer {
        Answer::Rows {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: rows
                .iter()
                .map(|r| r.iter().map(|v| Some(v.to_string())).collect())
                .collect(),
        }
    }

    pub(crate) fn command(tag: &str) -> Answer {
        Answer::Command(tag.to_string())
    }

    pub(crate) fn error(code: &str, message: &str) -> Answer {
        Answer::Error {
            code: code.to_string(),
            message: message.to_string(),
        }
    }
}

/// A message a connection of the fake received, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    Startup {
        user: String,
        database: String,
    },
    Cancel {
        pid: i32,
    },
    Query(String),
    Parse {
        name: String,
        sql: String,
    },
    Bind {
        portal: String,
        stmt: String,
        params: Vec<Option<String>>,
    },
    Describe {
        kind: char,
        name: String,
    },
    Execute {
        portal: String,
    },
    Close {
        kind: char,
        name: String,
    },
    Sync,
    Flush,
    Terminate,
    Other(char),
}

impl Msg {
    /// A catalog or session-state read the node makes on its own.
    pub(crate) fn is_probe(&self) -> bool {
        match self {
            Msg::Query(q) => is_probe_sql(q),
            _ => false,
        }
    }
}

fn is_probe_sql(q: &str) -> bool {
    q == crate::session::conn::CATALOG_PROBE
        || q.starts_with("WITH RECURSIVE declared")
        || q.starts_with("SELECT name, setting FROM pg_catalog.pg_settings")
        || q.starts_with("SELECT name FROM pg_catalog.pg_prepared_statements")
        || q.contains("FROM pg_catalog.pg_proc")
        || q.starts_with("SELECT a.attname, a.attidentity")
}

/// One recorded message: the connection (1, 2, … in order of accept;
/// also its BackendKeyData pid) and what it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) conn: usize,
    pub(crate) msg: Msg,
}

#[derive(Default)]
struct Shared {
    answers: Mutex<HashMap<String, Answer>>,
    log: Mutex<Vec<Received>>,
    committed: Mutex<Vec<String>>,
    accepted: AtomicUsize,
    open: AtomicUsize,
}

impl Shared {
    fn record(&self, conn: usize, msg: Msg) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Received { conn, msg });
    }
}

/// The fake server; stops accepting (and closes its connections) when
/// dropped.
pub(crate) struct FakePg {
    pub(crate) addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for FakePg {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            c.abort();
        }
    }
}

impl FakePg {
    pub(crate) async fn start() -> FakePg {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake PostgreSQL");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (s, c) = (shared.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let id = s.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                s.open.fetch_add(1, Ordering::SeqCst);
                let s2 = s.clone();
                let h = tokio::spawn(async move {
                    serve(&s2, sock, id).await;
                    s2.open.fetch_sub(1, Ordering::SeqCst);
                });
                c.lock().unwrap_or_else(|e| e.into_inner()).push(h);
            }
        });
        FakePg {
            addr,
            shared,
            task,
            conns,
        }
    }

    /// A DSN for the node's `[[shards]]`.
    pub(crate) fn dsn(&self) -> String {
        format!("postgresql://fake@{}/postgres", self.addr)
    }

    /// Scripts the answer of the statement whose text is `sql` (trimmed),
    /// in both protocols, on every connection.
    pub(crate) fn answer(&self, sql: &str, a: Answer) {
        self.shared
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql.trim().to_string(), a);
    }

    /// Everything received so far, in order.
    pub(crate) fn log(&self) -> Vec<Received> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The messages received so far, without startups and probes, nor
    /// the Terminate of a connection that only got probes (the node's
    /// side reads: column defaults, type OIDs).
    pub(crate) fn msgs(&self) -> Vec<Msg> {
        let log = self.log();
        let probes_only = |conn: usize| {
            log.iter()
                .filter(|r| r.conn == conn)
                .all(|r| r.msg.is_probe() || matches!(r.msg, Msg::Startup { .. } | Msg::Terminate))
        };
        log.iter()
            .filter(|r| !r.msg.is_probe() && !matches!(r.msg, Msg::Startup { .. }))
            .filter(|r| !(matches!(r.msg, Msg::Terminate) && probes_only(r.conn)))
            .map(|r| r.msg.clone())
            .collect()
    }

    /// Forgets what was received so far.
    pub(crate) fn clear_log(&self) {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now (the node has not closed them).
    pub(crate) fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The scripted statements whose transaction committed, in order
    /// (the fake's stand-in for data: what a client could read back).
    pub(crate) fn committed(&self) -> Vec<String> {
        self.shared
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn scripted(shared: &Shared, sql: &str) -> Option<Answer> {
    shared
        .answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(sql.trim())
        .cloned()
}

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// One connection: startup, then messages until Terminate or EOF.
async fn serve(shared: &Shared, sock: TcpStream, id: usize) {
    let _ = sock.set_nodelay(true);
    let (r, mut w) = sock.into_split();
    let mut reader = FrameReader::new(r, 1 << 30);
    let params = loop {
        let Ok(pkt) = reader.next_startup().await else {
            return;
        };
        let code = i32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                if w.write_all(b"N").await.is_err() {
                    return;
                }
            }
            CANCEL_REQUEST => {
                let pid = pkt
                    .get(8..12)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                shared.record(id, Msg::Cancel { pid });
                return;
            }
            _ => break pkt,
        }
    };
    let mut b = params.get(8..).unwrap_or_default();
    let mut kv = HashMap::new();
    while let (Ok(k), Ok(v)) = (wire::get_cstr(&mut b), wire::get_cstr(&mut b)) {
        if k.is_empty() {
            break;
        }
        kv.insert(k.to_string(), v.to_string());
    }
    let user = kv.get("user").cloned().unwrap_or_default();
    let database = kv.get("database").cloned().unwrap_or_else(|| user.clone());
    shared.record(
        id,
        Msg::Startup {
            user: user.clone(),
            database,
        },
    );
    let mut out = BytesMut::new();
    wire::auth_request(&mut out, 0, &[]);
    for (k, v) in [
        ("application_name", ""),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "on"),
        ("server_encoding", "UTF8"),
        ("server_version", "15.0 (hotrepart fake)"),
        ("session_authorization", user.as_str()),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        wire::parameter_status(&mut out, k, v);
    }
    wire::backend_key_data(&mut out, id as i32, (id as i32).wrapping_mul(7919));
    wire::ready_for_query(&mut out, b'I');
    if w.write_all(&out).await.is_err() {
        return;
    }
    out.clear();
    let mut c = Conn {
        status: b'I',
        ..Conn::default()
    };
    loop {
        let Ok(f) = reader.next().await else { return };
        let msg = decode(f.tag(), f.body());
        shared.record(id, msg.clone());
        if msg == Msg::Terminate {
            return;
        }
        if c.handle(shared, msg, &mut out) {
            if w.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

fn decode(tag: u8, body: &[u8]) -> Msg {
    let mut b = body;
    let s = |b: &mut &[u8]| wire::get_cstr(b).map(str::to_string).unwrap_or_default();
    match tag {
        b'Q' => Msg::Query(s(&mut b)),
        b'P' => {
            let name = s(&mut b);
            Msg::Parse {
                name,
                sql: s(&mut b),
            }
        }
        b'B' => {
            let portal = s(&mut b);
            let stmt = s(&mut b);
            let params = bind_params(b).unwrap_or_default();
            Msg::Bind {
                portal,
                stmt,
                params,
            }
        }
        b'D' | b'C' => {
            let kind = b.first().map(|&k| k as char).unwrap_or('?');
            let mut rest = b.get(1..).unwrap_or_default();
            let name = s(&mut rest);
            if tag == b'D' {
                Msg::Describe { kind, name }
            } else {
                Msg::Close { kind, name }
            }
        }
        b'E' => Msg::Execute { portal: s(&mut b) },
        b'S' => Msg::Sync,
        b'H' => Msg::Flush,
        b'X' => Msg::Terminate,
        other => Msg::Other(other as char),
    }
}

/// Bind parameter values as text (binary ones lossily).
fn bind_params(mut b: &[u8]) -> Option<Vec<Option<String>>> {
    let nf = wire::get_i16(&mut b).ok()?;
    for _ in 0..nf {
        wire::get_i16(&mut b).ok()?;
    }
    let nv = wire::get_i16(&mut b).ok()?;
    let mut v = Vec::new();
    for _ in 0..nv {
        let len = wire::get_i32(&mut b).ok()?;
        if len < 0 {
            v.push(None);
        } else {
            let (val, rest) = b.split_at_checked(len as usize)?;
            v.push(Some(String::from_utf8_lossy(val).into_owned()));
            b = rest;
        }
    }
    Some(v)
}

/// One connection's protocol state.
#[derive(Default)]
struct Conn {
    status: u8,
    /// Named and unnamed ("") statements: SQL text and parameter count.
    stmts: HashMap<String, (String, usize)>,
    portals: HashMap<String, String>,
    /// After an error in the extended protocol: skip to Sync.
    skipping: bool,
    /// Settings changed in this session (name in lower case).
    settings: std::collections::BTreeMap<String, String>,
    /// Scripted statements run in the open transaction (explicit or
    /// implicit): they reach `Shared::committed` when it commits.
    pending: Vec<String>,
}

impl Conn {
    /// Handles one message; true when `out` must be written now.
    fn handle(&mut self, shared: &Shared, msg: Msg, out: &mut BytesMut) -> bool {
        if self.skipping && !matches!(msg, Msg::Sync) {
            return false;
        }
        let flush = match msg {
            Msg::Query(q) => {
                self.simple(shared, &q, out);
                true
            }
            Msg::Parse { name, sql } => {
                if self.status == b'E' && !ends_block(&sql) {
                    self.fail(out, "25P02", ABORTED);
                } else if !name.is_empty() && self.stmts.contains_key(&name) {
                    self.fail(
                        out,
                        "42P05",
                        &format!("prepared statement \"{name}\" already exists"),
                    );
                } else {
                    let n = param_count(&sql);
                    self.stmts.insert(name, (sql, n));
                    wire::frame(out, b'1', |_| {});
                }
                false
            }
            Msg::Bind { portal, stmt, .. } => {
                match self.stmts.get(&stmt) {
                    Some((sql, _)) if self.status == b'E' && !ends_block(sql) => {
                        self.fail(out, "25P02", ABORTED)
                    }
                    Some((sql, _)) => {
                        self.portals.insert(portal, sql.clone());
                        wire::frame(out, b'2', |_| {});
                    }
                    None => self.fail(
                        out,
                        "26000",
                        &format!("prepared statement \"{stmt}\" does not exist"),
                    ),
                }
                false
            }
            Msg::Describe { kind, name } => {
                let found = if kind == 'S' {
                    self.stmts
                        .get(&name)
                        .map(|(sql, n)| (sql.clone(), Some(*n)))
                } else {
                    self.portals.get(&name).map(|sql| (sql.clone(), None))
                };
                match found {
                    Some((sql, params)) => {
                        if let Some(n) = params {
                            wire::frame(out, b't', |o| {
                                o.put_i16(n as i16);
                                for _ in 0..n {
                                    o.put_u32(25);
                                }
                            });
                        }
                        match self.answer_for(shared, &sql) {
                            Answer::Rows { columns, .. } => row_description(out, &columns),
                            _ => wire::frame(out, b'n', |_| {}),
                        }
                    }
                    None if kind == 'S' => self.fail(
                        out,
                        "26000",
                        &format!("prepared statement \"{name}\" does not exist"),
                    ),
                    None => self.fail(out, "34000", &format!("portal \"{name}\" does not exist")),
                }
                false
            }
            Msg::Execute { portal } => {
                match self.portals.get(&portal).cloned() {
                    Some(sql) => {
                        if !self.statement(shared, &sql, false, out) {
                            self.skipping = true;
                        }
                    }
                    None => self.fail(out, "34000", &format!("portal \"{portal}\" does not exist")),
                }
                false
            }
            Msg::Close { kind, name } => {
                if kind == 'S' {
                    self.stmts.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
                wire::frame(out, b'3', |_| {});
                false
            }
            Msg::Sync => {
                self.skipping = false;
                self.end_implicit(shared);
                self.portals.retain(|p, _| !p.is_empty());
                wire::ready_for_query(out, self.status);
                true
            }
            Msg::Flush => true,
            Msg::Startup { .. } | Msg::Cancel { .. } | Msg::Terminate | Msg::Other(_) => {
                self.fail(out, "08P01", "fake PostgreSQL: unexpected message");
                false
            }
        };
        flush
    }

    /// An error in the extended protocol: skip to Sync.
    fn fail(&mut self, out: &mut BytesMut, code: &str, msg: &str) {
        self.error(out, code, msg);
        self.skipping = true;
    }

    /// An error: a transaction block fails, an implicit transaction is
    /// lost (what it ran never commits).
    fn error(&mut self, out: &mut BytesMut, code: &str, msg: &str) {
        error(out, code, msg);
        self.pending.clear();
        if self.status == b'T' {
            self.status = b'E';
        }
    }

    fn simple(&mut self, shared: &Shared, q: &str, out: &mut BytesMut) {
        let stmts = split_statements(q);
        if stmts.is_empty() {
            wire::frame(out, b'I', |_| {});
        }
        for s in stmts {
            if !self.statement(shared, s, true, out) {
                break;
            }
        }
        self.end_implicit(shared);
        wire::ready_for_query(out, self.status);
    }

    /// The end of a Query string or a Sync: outside a transaction block,
    /// the implicit transaction commits.
    fn end_implicit(&mut self, shared: &Shared) {
        if self.status == b'I' {
            self.commit(shared);
        }
    }

    fn commit(&mut self, shared: &Shared) {
        shared
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&mut self.pending);
    }

    /// Runs one statement: its rows (after a RowDescription when
    /// `describe`, as in the simple protocol) and CommandComplete, or its
    /// error. False on error.
    fn statement(
        &mut self,
        shared: &Shared,
        sql: &str,
        describe: bool,
        out: &mut BytesMut,
    ) -> bool {
        let upper = sql.trim().to_ascii_uppercase();
        let first = upper.split_whitespace().next().unwrap_or("");
        let ends = ends_block(sql);
        if self.status == b'E' && !ends {
            self.error(out, "25P02", ABORTED);
            return false;
        }
        let from_script = scripted(shared, sql).is_some();
        match self.answer_for(shared, sql) {
            Answer::Rows { columns, rows } => {
                if describe {
                    row_description(out, &columns);
                }
                for r in &rows {
                    wire::text_data_row(out, r);
                }
                out.put_slice(&wire::command_complete(&format!("SELECT {}", rows.len())));
            }
            Answer::Command(tag) => {
                match first {
                    "BEGIN" | "START" => self.status = b'T',
                    "COMMIT" | "END" if ends => {
                        if self.status == b'T' {
                            self.commit(shared);
                        }
                        self.pending.clear();
                        self.status = b'I';
                    }
                    _ if ends => {
                        self.pending.clear();
                        self.status = b'I';
                    }
                    _ => {}
                }
                out.put_slice(&wire::command_complete(&tag));
            }
            Answer::Error { code, message } => {
                self.error(out, &code, &message);
                return false;
            }
        }
        if from_script {
            self.pending.push(sql.trim().to_string());
        } else {
            self.apply_settings(sql);
        }
        true
    }

    /// What a built-in statement does to the session's settings.
    fn apply_settings(&mut self, sql: &str) {
        let t = sql.trim();
        let words: Vec<String> = t.split_whitespace().map(str::to_ascii_lowercase).collect();
        let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        match word(0) {
            "set"
                if !matches!(word(1), "local" | "transaction") && word(2) != "characteristics" =>
            {
                let rest = t[3..].trim_start();
                let rest = match word(1) {
                    "session" => rest[7..].trim_start(),
                    _ => rest,
                };
                let lower = rest.to_ascii_lowercase();
                let cut = lower
                    .find('=')
                    .map(|i| (i, 1))
                    .or_else(|| lower.find(" to ").map(|i| (i, 4)));
                if let Some((i, n)) = cut {
                    let value = rest[i + n..].trim().trim_end_matches(';').trim();
                    self.settings.insert(
                        rest[..i].trim().to_ascii_lowercase(),
                        value.trim_matches('\'').to_string(),
                    );
                }
            }
            "reset" if word(1) == "all" => self.settings.clear(),
            "reset" => {
                self.settings.remove(word(1).trim_end_matches(';'));
            }
            "discard" => {
                self.settings.clear();
                self.stmts.clear();
            }
            "select" => {
                let mut rest = t;
                while let Some(i) = rest.find("set_config(") {
                    rest = &rest[i + "set_config(".len()..];
                    let Some((name, r)) = literal(rest) else {
                        return;
                    };
                    let Some((value, r)) = r.strip_prefix(',').and_then(literal) else {
                        return;
                    };
                    self.settings.insert(name.to_ascii_lowercase(), value);
                    rest = r;
                }
            }
            _ => {}
        }
    }

    /// What `sql` answers: scripted, else built in, else XX000.
    fn answer_for(&self, shared: &Shared, sql: &str) -> Answer {
        if let Some(a) = scripted(shared, sql) {
            return a;
        }
        let t = sql.trim();
        let upper = t.to_ascii_uppercase();
        let first = upper.split_whitespace().next().unwrap_or("");
        match first {
            "BEGIN" | "START" => return Answer::command("BEGIN"),
            "COMMIT" | "END" if !upper.contains("PREPARED") => {
                return Answer::command(if self.status == b'E' {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                })
            }
            "ROLLBACK" | "ABORT" if !upper.contains("PREPARED") => {
                return Answer::command("ROLLBACK")
            }
            "SET" => return Answer::command("SET"),
            "RESET" => return Answer::command("RESET"),
            "DISCARD" => return Answer::command("DISCARD ALL"),
            _ => {}
        }
        if t.starts_with("SELECT pg_catalog.set_config(") {
            return Answer::rows(&["set_config"], &[&[""]]);
        }
        if t.starts_with("SELECT name, setting FROM pg_catalog.pg_settings") {
            return Answer::Rows {
                columns: vec!["name".into(), "setting".into()],
                rows: self
                    .settings
                    .iter()
                    .map(|(k, v)| vec![Some(k.clone()), Some(v.clone())])
                    .collect(),
            };
        }
        if t == crate::session::conn::CATALOG_PROBE {
            // Text orders and compares bytewise (no reason against).
            return Answer::Rows {
                columns: vec![
                    "bytewise".into(),
                    "equality".into(),
                    "uniform".into(),
                    "identity".into(),
                ],
                rows: vec![vec![None, None, None, Some("c/C".into())]],
            };
        }
        if t.starts_with("SELECT name FROM pg_catalog.pg_prepared_statements") {
            let mut names: Vec<&str> = self
                .stmts
                .keys()
                .filter(|n| !n.is_empty())
                .map(String::as_str)
                .collect();
            names.sort();
            let rows: Vec<&[&str]> = names.iter().map(std::slice::from_ref).collect();
            return Answer::rows(&["name"], &rows);
        }
        if is_probe_sql(t) {
            return Answer::Rows {
                columns: vec!["a".into(), "b".into(), "c".into(), "d".into()],
                rows: Vec::new(),
            };
        }
        if t.starts_with("DO $$BEGIN RAISE EXCEPTION 'hotrepart") {
            return Answer::error("P0001", "hotrepart: this transaction failed at the node");
        }
        Answer::error(
            "XX000",
            &format!("fake PostgreSQL: nothing scripted for {t:?}"),
        )
    }
}

/// A single-quoted SQL literal at the start of `s` ('' for a quote):
/// its value and what follows.
fn literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('\'')?;
    let mut v = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, ch)) = chars.next() {
        if ch == '\'' {
            if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                chars.next();
            } else {
                return Some((v, s[i + 1..].trim_start()));
            }
        }
        v.push(ch);
    }
    None
}

const ABORTED: &str =
    "current transaction is aborted, commands ignored until end of transaction block";

/// COMMIT/END/ROLLBACK/ABORT (not of a prepared transaction): what a
/// failed transaction block still runs.
fn ends_block(sql: &str) -> bool {
    let upper = sql.trim().to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or("");
    matches!(first, "COMMIT" | "END" | "ROLLBACK" | "ABORT") && !upper.contains("PREPARED")
}

fn error(out: &mut BytesMut, code: &str, msg: &str) {
    wire::error_response(out, wire::Severity::Error, code, msg);
}

fn row_description(out: &mut BytesMut, columns: &[String]) {
    wire::text_row_description(out, columns);
}

/// The highest `$n` in `sql`.
fn param_count(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if let Ok(n) = sql[start..j].parse::<usize>() {
                max = max.max(n);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

/// The statements of a simple Query string: split at `;` outside single
/// quotes and `$$` quotes; empty ones dropped.
fn split_statements(q: &str) -> Vec<&str> {
    let b = q.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    let (mut quote, mut dollar) = (false, false);
    while i < b.len() {
        match b[i] {
            b'\'' if !dollar => quote = !quote,
            b'$' if !quote && b.get(i + 1) == Some(&b'$') => {
                dollar = !dollar;
                i += 1;
            }
            b';' if !quote && !dollar => {
                out.push(&q[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&q[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_postgres() {
        assert_eq!(
            split_statements("BEGIN; SELECT ';'; DO $$BEGIN x; END$$;"),
            vec!["BEGIN", " SELECT ';'", " DO $$BEGIN x; END$$"]
        );
        assert_eq!(param_count("SELECT $1, $12, '$3'"), 12);
        assert_eq!(literal("'it''s', x"), Some(("it's".to_string(), ", x")));
        let mut c = Conn::default();
        c.apply_settings("SET work_mem = '8MB'");
        c.apply_settings("set session DateStyle to ISO");
        c.apply_settings(
            "SELECT pg_catalog.set_config('a.b','x''y',false),pg_catalog.set_config('c','d',false)",
        );
        let got: Vec<(&str, &str)> = c
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a.b", "x'y"),
                ("c", "d"),
                ("datestyle", "ISO"),
                ("work_mem", "8MB")
            ]
        );
        c.apply_settings("RESET work_mem");
        assert_eq!(c.settings.len(), 3);
        c.apply_settings("RESET ALL");
        assert!(c.settings.is_empty());
    }
}
