//! RUN ON ALL by concatenation: one statement on several shards, their
//! answers concatenated — a simple Query (`run`) or one extended-protocol
//! statement per batch (`run_extended`).
//!
//! The session sends statements here only when the router says their
//! answers can be concatenated; ORDER BY, aggregates, LIMIT … across shards
//! come with a merge plan and go to [`crate::exec::merge`] instead, and
//! what no plan answers correctly is refused (0A000). The statement is sent
//! to every shard first, so they run in parallel; the answers are then read
//! shard by shard and streamed, so memory stays bounded (a shard not yet
//! read is read ahead up to a bound, then waits on TCP backpressure). An
//! error on one shard cancels the statement on the others
//! ([`crate::exec::multi`]), except DDL that runs outside a transaction.
//!
//! Guarantees:
//! - the client sees one RowDescription, the rows of every shard, one
//!   CommandComplete per statement with the counts summed, and one
//!   ReadyForQuery — or one error;
//! - shards that disagree on the row description make the statement fail;
//! - a write outside a transaction block, DDL included, runs inside a
//!   transaction on every shard and is committed only if it succeeded on
//!   all of them, with two-phase commit ([`crate::exec::twopc`]) — atomic
//!   across shards — else rolled back everywhere; the client gets the
//!   failing shard's error once. DDL that cannot run inside a transaction
//!   on the shards (CREATE INDEX CONCURRENTLY, VACUUM, ALTER SYSTEM …, or a
//!   temporary object, which two-phase commit cannot prepare — the router
//!   sends DDL on one to the home shard alone, so only what it could not
//!   read gets here: classified up front from its words,
//!   [`hotrepart_router::classify::outside_transaction`]) runs as sent, not
//!   atomically: its error names the shards where it did and did not
//!   apply; `CREATE`/`DROP DATABASE` run one shard at a time
//!   ([`crate::exec::database`]);
//! - inside a transaction block, a write (DDL included) to several shards
//!   marks them all written: the transaction's COMMIT uses two-phase
//!   commit.

use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::exec::multi::ShardStreams;
use crate::routing::{Decision, Target};
use crate::session::conn::Session;
use crate::wire::{self, Severity};
use crate::wire::{be, fe, tx};
use crate::wire::{command_complete, rfq};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::classify::OutsideTransaction;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};

pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    sql: &str,
) -> Result<(), SessionError> {
    let Target::Multi { shards, sqls } = &d.target else {
        return Ok(());
    };
    let names: Vec<String> = shards
        .iter()
        .map(|&i| s.node.routing.shard_name(i))
        .collect();
    let in_tx = s.txn.open();
    s.txn.schema_changed |= d.ddl;
    if d.ddl && !in_tx {
        if let Some(db) = hotrepart_router::classify::database_statement(sql) {
            let shards = shards.clone();
            return crate::exec::database::run(s, &db, &shards, sql).await;
        }
    }
    if d.statements > 1 && d.returns_rows {
        return refuse(
            s,
            Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "several statements in one query string that return rows from several shards are not supported; send them one by one".into(),
            ),
        );
    }
    if d.write && d.has_tx_control {
        return refuse(
            s,
            Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a write to several shards cannot share a query string with BEGIN/COMMIT/ROLLBACK; send it on its own".into(),
            ),
        );
    }
    if d.write && in_tx {
        for &t in shards {
            s.txn.note_write(t);
        }
    }
    let outside = outside_transaction(d, in_tx);
    let wrap = d.write && !in_tx && outside.is_none();
    for &t in shards {
        if let Err(r) = s.ensure_backend(t).await? {
            return refuse(s, r);
        }
        s.note_sql(sql, t);
    }
    // Send to every shard first: they run in parallel.
    for (i, &t) in shards.iter().enumerate() {
        let text = sqls.as_ref().map(|v| v[i].as_str()).unwrap_or(sql);
        let mut buf = BytesMut::new();
        if wrap {
            frontend::query("BEGIN", &mut buf).map_err(|_| io_fatal())?;
        }
        frontend::query(text, &mut buf).map_err(|_| io_fatal())?;
        let Some(b) = s.be.slots[t].conn.as_mut() else {
            continue;
        };
        if let Err(e) = b.write_frames(&buf).await {
            return Err(s.be.lost(t, crate::wire::WireError::Io(e)));
        }
    }
    let mut first_desc: Option<Bytes> = None;
    let mut mismatch = false;
    let mut order = RowOrder::of(d);
    let mut tags: Vec<Vec<String>> = Vec::new();
    let mut ok_shards = Vec::new();
    // An error on one shard cancels the statement on the others, except
    // DDL that runs outside a transaction: it is left to finish where it
    // runs (cut short, what it did there would be unknown).
    let mut st = ShardStreams::new(shards, if wrap { 2 } else { 1 }, outside.is_none());
    for (i, &t) in shards.iter().enumerate() {
        let mut shard_tags = Vec::new();
        let mut shard_err = false;
        let mut in_begin = wrap;
        while let Some(f) = st.frame(&mut s.be, i).await? {
            let f = s.canonical_frame(t, f).await;
            match f.tag() {
                be::READY_FOR_QUERY => in_begin = false,
                _ if in_begin => {}
                // Compared and answered in the home shard's OIDs of user
                // types (`session/type_oids.rs`).
                be::ROW_DESCRIPTION => match &first_desc {
                    None => {
                        first_desc = Some(f.raw.clone());
                        s.out.put_slice(&f.raw);
                    }
                    Some(d0) if !same_columns(d0, &f.raw) => mismatch = true,
                    Some(_) => {}
                },
                // A reference table's copies return the same rows: one's.
                be::DATA_ROW if i > 0 && d.replicated_rows() => {}
                be::DATA_ROW if !mismatch => match order.as_mut() {
                    Some(o) => o.push(i, f.raw),
                    None => s.out.put_slice(&f.raw),
                },
                be::COMMAND_COMPLETE => {
                    let mut body = f.body();
                    shard_tags.push(wire::get_cstr(&mut body).unwrap_or("").to_string());
                }
                be::PARAMETER_STATUS => {
                    if let Some(b) = s.be.slots[t].conn.as_mut() {
                        b.note_parameter_status(f.body());
                    }
                    if i == 0 {
                        s.note_parameter_status(t, &f);
                        s.out.put_slice(&f.raw)
                    }
                }
                be::EMPTY_QUERY_RESPONSE | be::NOTICE_RESPONSE if i == 0 => s.out.put_slice(&f.raw),
                be::ERROR_RESPONSE => shard_err = true,

                be::COPY_IN_RESPONSE | be::COPY_BOTH_RESPONSE => {
                    // COPY FROM STDIN across shards: the router refuses it;
                    // should one slip through, end the copy on that shard.
                    let mut fail = BytesMut::new();
                    frontend::copy_fail("COPY into several shards is not supported", &mut fail)
                        .map_err(|_| io_fatal())?;
                    if let Some(b) = s.be.slots[t].conn.as_mut() {
                        let _ = b.write_frames(&fail).await;
                    }
                }
                _ => {}
            }
            if s.out.len() > 64 * 1024 {
                s.flush_client().await?;
            }
        }
        if !shard_err {
            ok_shards.push(s.node.routing.shard_name(t));
        }
        tags.push(shard_tags);
    }
    let error = st
        .error
        .take()
        .map(|(code, msg, t)| (t, code, msg))
        .or_else(|| counts_refused(s, d, shards, &tags));
    // Finish implicit transactions: all or nothing.
    let commit_failed = if wrap {
        let r = finish_wrapped(s, shards, error.is_none() && !mismatch).await;
        s.txn.schema_changed &= in_tx;
        r
    } else {
        None
    };
    if let Some((t, code, msg)) = error {
        let mut m = format!("{msg} (on shard {})", s.node.routing.shard_name(t));
        if outside.is_some() {
            m.push_str(&applied_only_on(&ok_shards, &names));
        } else if wrap && d.ddl {
            m.push_str(refused_wrapped(&code));
        }
        wire::error_response(&mut s.out, Severity::Error, &code, &m);
        if in_tx {
            s.txn.failed = true;
        }
    } else if mismatch {
        wire::error_response(
            &mut s.out,
            Severity::Error,
            sqlstate::INTERNAL_ERROR,
            &format!("shards {} returned different row descriptions for the same statement; is the schema the same everywhere?", names.join(", ")),
        );
        if in_tx {
            s.txn.failed = true;
        }
    } else if let Some(r) = commit_failed {
        let hint = if d.ddl { temporary_hint(&r) } else { "" };
        wire::error_response(
            &mut s.out,
            Severity::Error,
            r.code,
            &format!("{}{hint}", r.message),
        );
    } else {
        if let Some(o) = order {
            o.emit(&mut s.out);
        }
        for tag in combine_tags(&tags, &d.replicated) {
            s.out.put_slice(&command_complete(&tag));
        }
    }
    let status = s.client_status();
    s.out.put_slice(&rfq(status));
    if !in_tx {
        s.end_of_transaction().await?;
    }
    Ok(())
}

/// What the shards' counts (`tags`) make the statement's error, though each
/// succeeded: rows a key-setting UPDATE would move ([`rows_to_move`]),
/// reference copies that answered differently ([`copies_differ`]).
fn counts_refused<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &Session<S>,
    d: &Decision,
    shards: &[usize],
    tags: &[Vec<String>],
) -> Option<(usize, String, String)> {
    rows_to_move(s, d, shards, tags).or_else(|| copies_differ(s, d, shards, tags))
}

/// An UPDATE that sets the shard key over several shards
/// ([`Decision::key_move`]): the first shard other than the new key's owner
/// that updated rows (`tags[i]`: shard `shards[i]`'s command tags), and the
/// statement's error — the rows would have to move, which the node does not
/// do. The statement then fails as any shard's error fails it: rolled back
/// outside a transaction block, the block failed inside one.
fn rows_to_move<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &Session<S>,
    d: &Decision,
    shards: &[usize],
    tags: &[Vec<String>],
) -> Option<(usize, String, String)> {
    let k = d.key_move.as_ref()?;
    shards.iter().zip(tags).find_map(|(&t, tags)| {
        let rows: u64 = tags
            .iter()
            .filter(|tag| tag.starts_with("UPDATE "))
            .filter_map(|tag| tag.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        (t != k.shard && rows > 0).then(|| {
            let to = s.node.routing.shard_name(k.shard);
            (
                t,
                sqlstate::FEATURE_NOT_SUPPORTED.to_string(),
                k.refusal(&to, rows),
            )
        })
    })
}

/// DML on a reference table ([`Decision::replicated`]) that changed
/// another number of rows on some shard than on the first: the copies
/// differ (a write made on one shard directly, a trigger…). The statement
/// fails — rolled back outside a transaction block — rather than answer
/// one copy's count while the copies drift further apart.
fn copies_differ<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &Session<S>,
    d: &Decision,
    shards: &[usize],
    tags: &[Vec<String>],
) -> Option<(usize, String, String)> {
    let (first, first_tags) = (shards.first()?, tags.first()?);
    for (j, _) in d.replicated.iter().enumerate().filter(|(_, r)| **r) {
        let want = first_tags.get(j);
        for (&t, tags) in shards.iter().zip(tags).skip(1) {
            if tags.get(j) != want {
                return Some((
                    t,
                    sqlstate::DATA_CORRUPTED.to_string(),
                    format!(
                        "the copies of a reference table differ between shards: the statement reported \"{}\" on shard {} and \"{}\" on shard {}; it was not applied (compare the table's rows on the shards and repair the copies)",
                        want.map_or("", String::as_str),
                        s.node.routing.shard_name(*first),
                        tags.get(j).map_or("", String::as_str),
                        s.node.routing.shard_name(t)
                    ),
                ));
            }
        }
    }
    None
}

/// The `RETURNING` rows of a multi-row INSERT split by shard, put back in
/// the order of the client's `VALUES` (what PostgreSQL returns, and what
/// ORMs rely on to give each object its generated key): each shard returns
/// its rows in the order it got them. When a shard returns another number
/// of rows than it got (`ON CONFLICT DO NOTHING` skipped some), no order
/// can be told and they go out shard by shard.
pub(crate) struct RowOrder {
    rows_of: Vec<Vec<usize>>,
    got: Vec<Vec<Bytes>>,
}

impl RowOrder {
    /// For decision `d`, when it is a split INSERT that returns rows.
    pub(crate) fn of(d: &Decision) -> Option<RowOrder> {
        let split = d.split.as_ref().filter(|_| d.returns_rows)?;
        Some(RowOrder {
            rows_of: split.iter().map(|p| p.rows.clone()).collect(),
            got: vec![Vec::new(); split.len()],
        })
    }

    /// A DataRow of the `i`-th shard of the target.
    pub(crate) fn push(&mut self, i: usize, row: Bytes) {
        if let Some(g) = self.got.get_mut(i) {
            g.push(row);
        }
    }

    /// Writes the rows to `out`, in the client's order when it is known.
    pub(crate) fn emit(self, out: &mut BytesMut) {
        let total: usize = self.rows_of.iter().map(Vec::len).sum();
        let exact = self
            .rows_of
            .iter()
            .zip(&self.got)
            .all(|(r, g)| r.len() == g.len());
        if exact {
            let mut slots: Vec<Option<Bytes>> = vec![None; total];
            for (rows, got) in self.rows_of.iter().zip(self.got.iter()) {
                for (&at, row) in rows.iter().zip(got) {
                    if let Some(slot) = slots.get_mut(at) {
                        *slot = Some(row.clone());
                    }
                }
            }
            if slots.iter().all(Option::is_some) {
                for row in slots.into_iter().flatten() {
                    out.put_slice(&row);
                }
                return;
            }
        }
        for row in self.got.into_iter().flatten() {
            out.put_slice(&row);
        }
    }
}

/// Ends the transactions the node wrapped around a write on `shards`:
/// commits them atomically (two-phase commit when there are several) when
/// `ok`, else rolls them all back. Some: the error the client gets instead
/// of the statement's result.
async fn finish_wrapped<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    shards: &[usize],
    ok: bool,
) -> Option<Refusal> {
    if ok && shards.len() > 1 {
        return crate::exec::twopc::commit(s, shards).await.err();
    }
    let end = if ok { "COMMIT" } else { "ROLLBACK" };
    let mut failed = None;
    for &t in shards {
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            let shard = &s.node.routing.shard_name(t);
            match b.hidden_query(end).await {
                Ok(_) => {}
                // The shard rolled back (a deferred constraint …).
                Err(crate::backend::conn::HiddenQueryError::Server { code, message }) => {
                    failed.get_or_insert_with(|| {
                        Refusal::new(
                            crate::error::sqlstate::intern(&code),
                            format!("{message} (committing on shard {shard}); the statement was rolled back"),
                        )
                    });
                }
                Err(crate::backend::conn::HiddenQueryError::Wire(e)) => {
                    b.broken = true;
                    failed.get_or_insert_with(|| {
                        Refusal::new(
                            sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
                            format!("the connection to shard {shard} broke during {end} ({e}); the outcome there is unknown"),
                        )
                    });
                }
            }
        }
    }
    if ok {
        failed
    } else {
        // The statement's own error is what the client sees.
        None
    }
}

/// Some: the statement is DDL outside a transaction block that cannot run
/// inside a transaction on the shards
/// ([`hotrepart_router::classify::outside_transaction`]); it runs on every
/// shard as sent, not atomically. None: it runs like any write.
fn outside_transaction(d: &Decision, in_tx: bool) -> Option<OutsideTransaction> {
    if !d.ddl || in_tx {
        return None;
    }
    hotrepart_router::classify::outside_transaction(&d.sql_text)
}

/// For DDL that ran outside a transaction and failed somewhere: where it
/// applied (`ok`, of `all`), and what to do.
fn applied_only_on(ok: &[String], all: &[String]) -> String {
    if ok.is_empty() {
        return String::new();
    }
    let rest: Vec<&str> = all
        .iter()
        .filter(|n| !ok.contains(n))
        .map(String::as_str)
        .collect();
    format!(
        "; the statement did apply on shard(s) {} and not on shard(s) {}: PostgreSQL cannot run it inside a transaction, so hotrepart cannot apply it on all shards or none, and it was not undone; run it again where it did not apply (SET hotrepart.shard = 'NAME' runs statements on one shard), or with IF NOT EXISTS / IF EXISTS",
        ok.join(", "),
        rest.join(", ")
    )
}

/// After a DDL statement the node wrapped in a transaction failed with
/// 25001 (a statement [`hotrepart_router::classify::outside_transaction`]
/// does not know): nothing applied; how to run it anyway.
fn refused_wrapped(code: &str) -> &'static str {
    if code == sqlstate::ACTIVE_SQL_TRANSACTION {
        "; hotrepart runs a schema change on several shards inside a transaction, so that it applies on all of them or none, and PostgreSQL refuses this statement there: nothing was changed; run it on each shard with SET hotrepart.shard = 'NAME'"
    } else {
        ""
    }
}

/// After a DDL statement's two-phase commit failed because it touched a
/// temporary object (PostgreSQL cannot prepare that): how to run it anyway.
fn temporary_hint(r: &Refusal) -> &'static str {
    if r.message.contains("temporary objects") {
        "; hotrepart commits a schema change on several shards with two-phase commit, which PostgreSQL refuses for temporary objects: run it on each shard with SET hotrepart.shard = 'NAME'"
    } else {
        ""
    }
}

fn refuse<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    r: Refusal,
) -> Result<(), SessionError> {
    wire::error_response(&mut s.out, Severity::Error, r.code, &r.message);
    if s.txn.open() {
        s.txn.failed = true;
    }
    let status = s.client_status();
    s.out.put_slice(&rfq(status));
    Ok(())
}

fn io_fatal() -> SessionError {
    SessionError::Fatal {
        code: sqlstate::INTERNAL_ERROR,
        msg: "cannot encode a message".into(),
    }
}

/// Whether two RowDescriptions describe the same columns: names, types,
/// type modifiers and formats. The source table's OID and column number
/// differ between shards (a table created at different times) and are
/// ignored.
pub(crate) fn same_columns(a: &[u8], b: &[u8]) -> bool {
    fn cols(raw: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
        let mut body = raw.get(5..)?;
        let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
        body = &body[2..];
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let end = body.iter().position(|&c| c == 0)?;
            let name = &body[..end];
            let rest = body.get(end + 1..end + 1 + 18)?;
            // rest: table oid (4), attnum (2), type oid (4), typlen (2),
            // typmod (4), format (2): keep the last 12 bytes.
            out.push((name, &rest[6..]));
            body = &body[end + 1 + 18..];
        }
        Some(out)
    }
    match (cols(a), cols(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Per statement position, the shards' CommandComplete tags with their row
/// counts summed ("INSERT 0 n", "UPDATE n", "SELECT n", …).
/// `replicated[j]`: statement `j` wrote a reference table, whose copies
/// answer alike: the first shard's tag is the answer (checked by
/// [`copies_differ`]).
pub(crate) fn combine_tags(tags: &[Vec<String>], replicated: &[bool]) -> Vec<String> {
    let n = tags.iter().map(Vec::len).max().unwrap_or(0);
    (0..n)
        .map(|j| {
            let mut it = tags.iter().filter_map(|t| t.get(j));
            let Some(first) = it.next() else {
                return String::new();
            };
            if replicated.get(j) == Some(&true) {
                return first.clone();
            }
            let Some((head, count)) = first.rsplit_once(' ') else {
                return first.clone();
            };
            let Ok(mut total) = count.parse::<u64>() else {
                return first.clone();
            };
            if !matches!(
                head.split(' ').next(),
                Some(
                    "INSERT" | "UPDATE" | "DELETE" | "SELECT" | "MERGE" | "COPY" | "FETCH" | "MOVE"
                )
            ) {
                return first.clone();
            }
            for t in it {
                if let Some(c) = t.rsplit_once(' ').and_then(|(_, c)| c.parse::<u64>().ok()) {
                    total += c;
                }
            }
            format!("{head} {total}")
        })
        .collect()
}

/// RUN ON ALL for one extended-protocol statement (a batch holding a single
/// Bind/Execute, ended by Sync): the batch goes to every target shard; the
/// first shard's replies (ParseComplete, BindComplete, RowDescription …)
/// reach the client as usual, every shard's rows follow, then one
/// CommandComplete with the counts summed (or one error) and ReadyForQuery.
pub(crate) async fn run_extended<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: &mut Session<S>,
    d: &Decision,
    frames: Vec<crate::wire::Frame>,
    synced: bool,
) -> Result<(), SessionError> {
    let Target::Multi { shards, sqls } = &d.target else {
        return Ok(());
    };
    let in_tx = s.txn.open();
    s.txn.schema_changed |= d.ddl;
    let refusal = if !synced {
        Some(
            "a statement that touches several shards must be followed by Sync, not Flush"
                .to_string(),
        )
    } else if frames.iter().any(|f| {
        f.tag() == be::ERROR_RESPONSE
            && f.body().len() >= 4
            && f.body()[f.body().len() - 4..] != [0, 0, 0, 0]
    }) {
        Some(
            "fetching a multi-shard result in parts (Execute with a row limit) is not supported"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(m) = refusal {
        s.push_error(&Refusal::new(sqlstate::FEATURE_NOT_SUPPORTED, m));
        if synced {
            let status = s.client_status();
            s.out.put_slice(&rfq(status));
        } else {
            s.skip_to_sync = true;
        }
        return Ok(());
    }
    if d.write && in_tx {
        for &t in shards {
            s.txn.note_write(t);
        }
    }
    let outside = outside_transaction(d, in_tx);
    let wrap = d.write && !in_tx && outside.is_none();
    for &t in shards {
        if let Err(r) = s.ensure_backend(t).await? {
            s.push_error(&r);
            let status = s.client_status();
            s.out.put_slice(&rfq(status));
            return Ok(());
        }
        if wrap {
            if let Some(b) = s.be.slots[t].conn.as_mut() {
                if let Err(e) = b.hidden_query("BEGIN").await {
                    b.broken = true;
                    s.push_error(&Refusal::new(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("cannot begin on shard: {e}"),
                    ));
                    let status = s.client_status();
                    s.out.put_slice(&rfq(status));
                    return Ok(());
                }
            }
        }
    }
    // Send the batch to every shard. The first shard's pass registers named
    // statements; the others get them through Bind's prepare-on-backend.
    let mut owed_by: Vec<std::collections::VecDeque<crate::session::conn::Owed>> = Vec::new();
    for (i, &t) in shards.iter().enumerate() {
        s.be.cur = t;
        for f in &frames {
            let named_parse_or_close = matches!(f.tag(), fe::PARSE | fe::CLOSE)
                && f.body().first() != Some(&0)
                && !(f.tag() == fe::CLOSE && f.body().get(1) == Some(&0));
            if i > 0 && named_parse_or_close {
                continue;
            }
            // The shard's own text, when it differs (a split INSERT's rows,
            // or the ownership filter of a reshard job).
            let text = sqls.as_ref().and_then(|v| v.get(i)).map(String::as_str);
            let params = d
                .split
                .as_ref()
                .and_then(|v| v.get(i))
                .and_then(|p| p.params.as_deref());
            s.forward_extended_as(f.clone(), t, text, params)?;
        }
        let buf = std::mem::take(&mut s.be.to_backend);
        if let Some(b) = s.be.slots[t].conn.as_mut() {
            if let Err(e) = b.write_frames(&buf).await {
                return Err(s.be.lost(t, crate::wire::WireError::Io(e)));
            }
        }
        owed_by.push(std::mem::take(&mut s.be.owed));
    }
    // Gather: the first shard through the session's reply logic, the others
    // for their rows only.
    let first = shards[0];
    s.be.cur = first;
    s.be.owed = owed_by.remove(0);
    let mut order = RowOrder::of(d);
    s.gather = Some(crate::session::conn::Gather {
        rows: order.as_ref().map(|_| Vec::new()),
        ..Default::default()
    });
    // All shards are read at once: an error on any cancels the others
    // (DDL that runs outside a transaction excepted).
    let mut st = ShardStreams::new(shards, 1, outside.is_none());
    loop {
        let f = match st.frame(&mut s.be, 0).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                s.gather = None;
                return Err(e);
            }
        };
        let done = f.tag() == be::READY_FOR_QUERY;
        s.on_backend_frame(f).await?;
        if s.out.len() > 64 * 1024 {
            s.flush_client().await?;
        }
        if done {
            break;
        }
    }
    let mut g = s.gather.take().unwrap_or_default();
    if let (Some(o), Some(rows)) = (order.as_mut(), g.rows.take()) {
        for row in rows {
            o.push(0, row);
        }
    }
    let mut tags = vec![g.tags.clone()];
    // The shards where the statement did not fail.
    let mut ok_shards = Vec::new();
    if g.error.is_none() {
        ok_shards.push(s.node.routing.shard_name(first));
    }
    for (i, &t) in shards.iter().enumerate().skip(1) {
        let mut shard_tags = Vec::new();
        let mut shard_err = false;
        // The OIDs inside binary values in the shard's rows, as the first
        // shard's went (`session/type_oids.rs`): from its Bind (a statement
        // described before), else its RowDescription.
        let mut fix = owed_by.get_mut(i - 1).and_then(|o| {
            o.iter_mut().find_map(|x| match x {
                crate::session::conn::Owed::Bind(f) => f.take(),
                _ => None,
            })
        });
        while let Some(f) = st.frame(&mut s.be, i).await? {
            match f.tag() {
                be::ERROR_RESPONSE => shard_err = true,
                be::ROW_DESCRIPTION => {
                    // A statement's (no formats yet) keeps the Bind's.
                    if let Some(x) = s.row_fix_of(t, &f).await {
                        fix = Some(Box::new(x));
                    }
                }
                be::DATA_ROW if d.replicated_rows() => {}
                be::DATA_ROW if st.error.is_none() => {
                    let row = match &fix {
                        Some(x) => x.apply(f.raw),
                        None => f.raw,
                    };
                    match order.as_mut() {
                        Some(o) => o.push(i, row),
                        None => s.out.put_slice(&row),
                    }
                }
                be::COMMAND_COMPLETE => {
                    let mut body = f.body();
                    shard_tags.push(wire::get_cstr(&mut body).unwrap_or("").to_string());
                }
                be::READY_FOR_QUERY => break,
                _ => {}
            }
            if s.out.len() > 64 * 1024 {
                s.flush_client().await?;
            }
        }
        if !shard_err {
            ok_shards.push(s.node.routing.shard_name(t));
        }
        tags.push(shard_tags);
    }
    s.be.owed.clear();
    let error = st
        .error
        .take()
        .map(|(code, msg, t)| (t, code, msg))
        .or_else(|| counts_refused(s, d, shards, &tags));
    let commit_failed = if wrap {
        let r = finish_wrapped(s, shards, error.is_none()).await;
        s.txn.schema_changed &= in_tx;
        r
    } else {
        None
    };
    if let Some((t, code, msg)) = error {
        let mut m = format!("{msg} (on shard {})", s.node.routing.shard_name(t));
        if outside.is_some() {
            let names: Vec<String> = shards
                .iter()
                .map(|&i| s.node.routing.shard_name(i))
                .collect();
            m.push_str(&applied_only_on(&ok_shards, &names));
        } else if wrap && d.ddl {
            m.push_str(refused_wrapped(&code));
        }
        wire::error_response(&mut s.out, Severity::Error, &code, &m);
        if in_tx {
            s.txn.failed = true;
        }
    } else if let Some(r) = commit_failed {
        let hint = if d.ddl { temporary_hint(&r) } else { "" };
        wire::error_response(
            &mut s.out,
            Severity::Error,
            r.code,
            &format!("{}{hint}", r.message),
        );
    } else if g.empty && tags.iter().all(Vec::is_empty) {
        let mut b = BytesMut::new();
        wire::frame(&mut b, be::EMPTY_QUERY_RESPONSE, |_| {});
        s.out.put_slice(&b);
    } else {
        if let Some(o) = order {
            o.emit(&mut s.out);
        }
        for tag in combine_tags(&tags, &d.replicated) {
            s.out.put_slice(&command_complete(&tag));
        }
    }
    let status = if in_tx { s.client_status() } else { tx::IDLE };
    s.out.put_slice(&rfq(status));
    if !in_tx {
        s.txn.status = crate::session::conn::TxStatus::Idle;
        s.end_of_transaction().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_counts_per_statement() {
        let tags = vec![
            vec!["INSERT 0 2".to_string(), "CREATE TABLE".to_string()],
            vec!["INSERT 0 3".to_string(), "CREATE TABLE".to_string()],
        ];
        assert_eq!(combine_tags(&tags, &[]), vec!["INSERT 0 5", "CREATE TABLE"]);
        assert_eq!(
            combine_tags(&tags, &[true, false]),
            vec!["INSERT 0 2", "CREATE TABLE"]
        );
        let tags = vec![
            vec!["SELECT 4".to_string()],
            vec!["SELECT 0".to_string()],
            vec!["SELECT 1".to_string()],
        ];
        assert_eq!(combine_tags(&tags, &[]), vec!["SELECT 5"]);
    }
}
