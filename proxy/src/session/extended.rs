//! The extended protocol: batches routed at Sync/Flush, named statements
//! renamed to node-wide names and prepared on whichever backend needs them,
//! the unnamed statement followed across backends.
//!
//! Bounded: a session's named statements by `max_prepared_statements` and
//! `max_prepared_statement_bytes` (53200 at the Parse beyond), the
//! statements the node keeps prepared on one backend by
//! `server_prepared_statements` (the least recently used is closed there
//! by a hidden Close before the Parse that needs its room, and prepared
//! again when next used).

use super::conn::*;
use crate::error::sqlstate;
use crate::error::{Refusal, SessionError};
use crate::routing::{BindParams, Decision, Target};
use crate::wire::rfq;
use crate::wire::{self, Frame};
use crate::wire::{fe, tx};
use bytes::{BufMut, Bytes, BytesMut};
use hotrepart_router::classify::{classify, first_keyword_is};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where a statement of a batch runs (`Session::batch_parts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    On(usize),
    Several,
    /// Any shard answers the same (no table), or not known here.
    Anywhere,
}

/// Protocol portals bound by earlier batches of the open transaction
/// (a driver's server-side cursor: asyncpg binds a named portal in one
/// batch and executes it, `n` rows at a time, in later ones).
#[derive(Debug, Default)]
pub(crate) struct Portals {
    /// Portal name → the shard it was bound on (None: bound for a
    /// statement over several shards, which the node runs only in the
    /// batch that binds it).
    at: HashMap<String, Option<usize>>,
    /// The last batch ended with Sync: outside a transaction block its
    /// implicit transaction, and the portals, ended there.
    after_sync: bool,
}

/// An Execute or Describe of a portal bound over several shards in an
/// earlier batch.
fn earlier_multi_portal(portal: &str) -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("portal \"{portal}\" was bound for a statement over several shards in an earlier batch: hotrepart runs such a statement only in the batch that binds it (Bind, Execute without a row limit, Sync), so it cannot be fetched later or in parts; fetch it whole, or restrict the query to one shard by its shard key"),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Forgets the portals of a transaction that has ended; called as a
    /// batch (ended by Sync when `synced`) begins.
    pub(super) fn portals_begin_batch(&mut self, synced: bool) {
        if self.portals.after_sync && !self.txn.open() {
            self.portals.at.clear();
        }
        self.portals.after_sync = synced;
    }

    /// The transaction ended: its portals with it.
    pub(super) fn forget_portals(&mut self) {
        self.portals.at.clear();
    }

    /// The batch `frames`, routed to `target` with decision `d`, binds or
    /// closes portals: where they now are.
    pub(super) fn note_portals(
        &mut self,
        frames: &[Frame],
        target: Option<usize>,
        d: Option<&Decision>,
    ) {
        if self.node.routing.single_shard() {
            return;
        }
        let multi =
            matches!(d.map(|d| &d.target), Some(Target::Multi { shards, .. }) if shards.len() > 1);
        let at = if multi {
            None
        } else {
            Some(target.unwrap_or_else(|| self.default_shard()))
        };
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::BIND => {
                    if let Ok(portal) = wire::get_cstr(&mut b) {
                        self.portals.at.insert(portal.to_string(), at);
                    }
                }
                fe::CLOSE if b.first() == Some(&b'P') => {
                    b = &b[1..];
                    if let Ok(portal) = wire::get_cstr(&mut b) {
                        self.portals.at.remove(portal);
                    }
                }
                _ => {}
            }
        }
    }

    /// Where portal `name`, not bound in the batch being routed, is: a
    /// cursor's shard, the shard an earlier batch bound it on; `Err` for a
    /// portal bound over several shards (unless only closed); None: not
    /// known (PostgreSQL will say so).
    fn earlier_portal(&self, name: &str, closing: bool) -> Result<Option<usize>, Refusal> {
        if let Some(t) = self.cursor_portal_shard(name) {
            return Ok(Some(t));
        }
        match self.portals.at.get(name) {
            Some(Some(t)) => Ok(Some(*t)),
            Some(None) if !closing => Err(earlier_multi_portal(name)),
            _ => Ok(None),
        }
    }

    /// For a batch of one read over several shards that needs no merge
    /// but whose Execute has a row limit: a plan that concatenates the
    /// shards' rows (the merge executor stops at the limit and answers
    /// PortalSuspended). None otherwise.
    pub(super) fn limited_read_plan(
        &self,
        d: &Decision,
        frames: &[Frame],
    ) -> Option<Arc<hotrepart_router::route::MergePlan>> {
        if d.write || d.ddl || d.copy.is_some() || d.statements != 1 || !d.returns_rows {
            return None;
        }
        let (mut unnamed, mut named): (Option<Arc<str>>, HashMap<String, Arc<str>>) =
            (None, HashMap::new());
        let mut sql = None;
        let mut limited = false;
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).ok()?;
                    let text = Arc::from(wire::get_cstr(&mut b).ok()?);
                    if name.is_empty() {
                        unnamed = Some(text);
                    } else {
                        named.insert(name.to_string(), text);
                    }
                }
                fe::BIND => {
                    let _portal = wire::get_cstr(&mut b).ok()?;
                    let stmt = wire::get_cstr(&mut b).ok()?;
                    sql = self.bound_sql(stmt, &unnamed, named.get(stmt));
                }
                fe::EXECUTE => {
                    limited |= b.len() >= 4 && b[b.len() - 4..] != [0, 0, 0, 0];
                }
                _ => {}
            }
        }
        let sql = sql?;
        let reads = ["select", "with", "values", "table"]
            .iter()
            .any(|k| first_keyword_is(&sql, k));
        (limited && reads).then(|| {
            Arc::new(hotrepart_router::route::MergePlan {
                shard_sql: sql.to_string(),
                hidden: 0,
                aggregate: None,
                distinct: false,
                distinct_on: Vec::new(),
                zero_params: Vec::new(),
                order_by: Vec::new(),
                shards_sorted: false,
                limit: None,
                offset: None,
            })
        })
    }

    /// The text a Bind of statement `stmt` runs: the statement parsed
    /// earlier in the batch being routed (`unnamed`, `named`), else the
    /// one the session knows.
    pub(super) fn bound_sql(
        &self,
        stmt: &str,
        unnamed: &Option<Arc<str>>,
        named: Option<&Arc<str>>,
    ) -> Option<Arc<str>> {
        let sql = self.client_sql(stmt, unnamed, named)?;
        if self.key_fills.is_empty() {
            return Some(sql);
        }
        // The node's text for a statement whose keys it fills
        // (`session/key_default.rs`).
        Some(self.filled_text(&sql).unwrap_or(sql))
    }

    /// The statement texts of a forwarded batch's Binds (read after the
    /// batch's Parses were recorded).
    pub(super) fn bound_texts<'a>(
        &'a self,
        frames: &'a [Frame],
    ) -> impl Iterator<Item = Arc<str>> + 'a {
        frames
            .iter()
            .filter(|f| f.tag() == fe::BIND)
            .filter_map(|f| {
                let mut b = f.body();
                let _portal = wire::get_cstr(&mut b).ok()?;
                let stmt = wire::get_cstr(&mut b).ok()?;
                self.bound_sql(stmt, &None, None)
            })
    }

    /// [`Self::bound_sql`] as the client wrote it.
    pub(super) fn client_sql(
        &self,
        stmt: &str,
        unnamed: &Option<Arc<str>>,
        named: Option<&Arc<str>>,
    ) -> Option<Arc<str>> {
        if stmt.is_empty() {
            unnamed
                .clone()
                .or_else(|| self.unnamed.as_ref().and_then(Unnamed::sql))
        } else {
            named
                .cloned()
                .or_else(|| self.stmts.get(stmt).map(|s| s.sql.clone()))
        }
    }

    /// Decides the one shard of a batch (None: any shard will do) and the
    /// decision of its most significant statement.
    pub(super) fn route_batch(
        &self,
        frames: &[Frame],
    ) -> Result<(Option<usize>, Option<Decision>), Refusal> {
        if let Some(home) = self.node.single_shard_now()? {
            // Nothing to route; only LISTEN needs a look.
            for f in frames {
                let mut b = f.body();
                match f.tag() {
                    fe::PARSE => {
                        let _name = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                        let sql = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                        // A Parse holds one statement.
                        self.check_listen(first_keyword_is(sql, "listen"))?;
                    }
                    fe::BIND => {
                        let _portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                        let stmt = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                        self.check_listen(self.listen_stmt(stmt).is_some())?;
                    }
                    _ => {}
                }
            }
            return Ok((Some(home), None));
        }
        let mut target: Option<usize> = None;
        let mut strongest: Option<Decision> = None;
        let mut batch_unnamed: Option<Arc<str>> = None;
        let mut batch_named: HashMap<String, Arc<str>> = HashMap::new();
        let mut multi = false;
        let mut different = false;
        let mut binds = 0;
        let mut savepoints = 0;
        let mut any_write = false;
        let mut calls: Vec<String> = Vec::new();
        let mut changed_settings = false;
        let mut parse_target: Option<usize> = None;
        let mut bound_here: Vec<&str> = Vec::new();
        for f in frames {
            match f.tag() {
                fe::EXECUTE | fe::CLOSE => {
                    // A portal bound by an earlier batch runs where it is.
                    let mut b = f.body();
                    let closing = f.tag() == fe::CLOSE;
                    if closing {
                        if b.first() != Some(&b'P') {
                            continue;
                        }
                        b = &b[1..];
                    }
                    let portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    if !bound_here.contains(&portal) {
                        if let Some(t) = self.earlier_portal(portal, closing)? {
                            different |= target.is_some_and(|x| x != t);
                            target = target.or(Some(t));
                        }
                    }
                }
                fe::PARSE => {
                    let mut b = f.body();
                    let name = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let sql = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    self.check_listen(first_keyword_is(sql, "listen"))?;
                    // Routing errors surface at Bind (parameters may be
                    // missing here); PostgreSQL reports syntax errors at
                    // Parse itself. A statement whose shard is known without
                    // parameters (hints, undeclared tables) is prepared there.
                    match self.decide_sql(sql, None) {
                        Err(r) if r.code == sqlstate::SYNTAX_ERROR => return Err(r),
                        Ok(Decision {
                            target: Target::Shard(t),
                            ..
                        }) => parse_target = parse_target.or(Some(t)),
                        _ => {}
                    }
                    if name.is_empty() {
                        batch_unnamed = Some(Arc::from(sql));
                    } else {
                        batch_named.insert(name.to_string(), Arc::from(sql));
                    }
                }
                fe::BIND => {
                    let mut b = f.body();
                    let portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    bound_here.push(portal);
                    let stmt = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                    let sql = self.bound_sql(stmt, &batch_unnamed, batch_named.get(stmt));
                    // An unknown statement: PostgreSQL will say so.
                    let Some(sql) = sql else { continue };
                    self.check_listen(self.listen_stmt(stmt).is_some())?;
                    binds += 1;
                    if changed_settings {
                        return Err(Refusal::new(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "a statement that changes search_path or standard_conforming_strings must be followed by Sync before the next statement: hotrepart routes a batch before it runs".into(),
                        ));
                    }
                    changed_settings = classify(&sql).changes_routing_settings;
                    let params = BindParams::parse(b).map_err(proto_refusal)?;
                    let d = self.decide_sql(&sql, Some(&params))?;
                    let t = match &d.target {
                        Target::Shard(t) => Some(*t),
                        Target::Any => None,
                        Target::Multi { shards, .. } if shards.len() == 1 => Some(shards[0]),
                        Target::Multi { .. } => {
                            multi = true;
                            None
                        }
                    };
                    if let Some(t) = t {
                        // Refused below, unless the batch is cut at a
                        // multi-shard statement between them.
                        different |= target.is_some_and(|x| x != t);
                        target = target.or(Some(t));
                    }
                    any_write |= d.write;
                    if d.kind == crate::routing::Kind::Savepoint {
                        savepoints += 1;
                    }
                    for c in d.calls.iter() {
                        if !calls.contains(c) {
                            calls.push(c.clone());
                        }
                    }
                    if strongest.as_ref().is_none_or(|s| d.outranks(s)) {
                        strongest = Some(d);
                    }
                }
                fe::DESCRIBE => {
                    // The portal of a cursor the session declared: where
                    // the cursor is.
                    let mut b = f.body();
                    if b.first() == Some(&b'P') {
                        b = &b[1..];
                        let portal = wire::get_cstr(&mut b).map_err(proto_refusal)?;
                        if !bound_here.contains(&portal) {
                            if let Some(t) = self.earlier_portal(portal, false)? {
                                different |= target.is_some_and(|x| x != t);
                                target = target.or(Some(t));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if savepoints > 0 && binds > 1 {
            // A savepoint statement runs on every shard of the transaction
            // (`txn.rs`), which a batch routed as one cannot do.
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "a savepoint statement (SAVEPOINT, RELEASE, ROLLBACK TO) beside other statements in one batch: over several shards hotrepart runs it on every shard of the transaction; send Sync after it".into(),
            ));
        }
        if multi && (binds > 1 || target.is_some()) {
            // Ended by Sync, the batch is cut at that statement instead
            // (`Session::run_batch`).
            return Err(multi_beside_others());
        }
        if different {
            // Ended by Sync, the batch is cut where the shard changes
            // instead (`Session::run_batch`).
            return Err(Refusal::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                DIFFERENT_SHARDS.into(),
            ));
        }
        let target = target.or(parse_target);
        // The batch runs on one shard: it writes there if any statement does.
        if let Some(d) = strongest.as_mut() {
            d.write |= any_write;
            d.calls = Arc::from(calls);
        }
        Ok((target, strongest))
    }

    /// A batch ended by Sync whose statements go to different shards (or
    /// hold a statement for several shards beside others), cut into parts
    /// to run one after another: each multi-shard statement alone, the
    /// statements between them together as long as they go to the same
    /// shard. A statement ends at its Execute; what follows the last
    /// Execute (the Sync) belongs to the last part. Also whether a
    /// statement of it is transaction control. None: no cut needed, or
    /// routing fails (`route_batch` then reports it).
    pub(super) fn batch_parts(&self, frames: &[Frame]) -> Option<(Vec<Vec<Frame>>, bool)> {
        if self.node.routing.single_shard() {
            return None;
        }
        let mut batch_unnamed: Option<Arc<str>> = None;
        let mut batch_named: HashMap<&str, Arc<str>> = HashMap::new();
        // (end of the statement's frames, where it runs)
        let mut stmts: Vec<(usize, Runs)> = Vec::new();
        let mut runs = Runs::Anywhere;
        let mut tx_control = false;
        for (i, f) in frames.iter().enumerate() {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let name = wire::get_cstr(&mut b).ok()?;
                    let sql = wire::get_cstr(&mut b).ok()?;
                    if name.is_empty() {
                        batch_unnamed = Some(Arc::from(sql));
                    } else {
                        batch_named.insert(name, Arc::from(sql));
                    }
                }
                fe::BIND => {
                    let _portal = wire::get_cstr(&mut b).ok()?;
                    let stmt = wire::get_cstr(&mut b).ok()?;
                    let sql = self.bound_sql(stmt, &batch_unnamed, batch_named.get(stmt));
                    let Some(sql) = sql else { continue };
                    let params = BindParams::parse(b).ok()?;
                    let d = self.decide_sql(&sql, Some(&params)).ok()?;
                    tx_control |= d.has_tx_control
                        || hotrepart_router::classify::transaction_statement(&sql)
                            != hotrepart_router::classify::TxStatement::Other;
                    runs = match &d.target {
                        Target::Shard(t) => Runs::On(*t),
                        Target::Multi { shards, .. } if shards.len() == 1 => Runs::On(shards[0]),
                        Target::Multi { .. } => Runs::Several,
                        Target::Any => Runs::Anywhere,
                    };
                }
                fe::EXECUTE => {
                    stmts.push((i + 1, std::mem::replace(&mut runs, Runs::Anywhere)));
                }
                _ => {}
            }
        }
        if stmts.len() < 2 {
            return None;
        }
        if let Some(last) = stmts.last_mut() {
            last.0 = frames.len();
        }
        // (frames, the one shard its statements run on so far)
        let mut parts: Vec<(Vec<Frame>, Runs)> = Vec::new();
        let mut start = 0;
        for (end, r) in stmts {
            let now = match (parts.last().map(|(_, p)| *p), r) {
                (None | Some(Runs::Several), _) | (_, Runs::Several) => None,
                (Some(p), Runs::Anywhere) => Some(p),
                (Some(Runs::Anywhere), on) => Some(on),
                (Some(Runs::On(a)), Runs::On(b)) if a == b => Some(r),
                (Some(Runs::On(_)), Runs::On(_)) => None,
            };
            match (now, parts.last_mut()) {
                (Some(now), Some(last)) => {
                    last.0.extend_from_slice(&frames[start..end]);
                    last.1 = now;
                }
                _ => parts.push((frames[start..end].to_vec(), r)),
            }
            start = end;
        }
        if parts.len() < 2 {
            return None;
        }
        Some((parts.into_iter().map(|(f, _)| f).collect(), tx_control))
    }

    /// Forwards one extended-protocol message to the current backend,
    /// renaming named statements.
    pub(crate) fn forward_extended(&mut self, f: Frame, t: usize) -> Result<(), SessionError> {
        self.forward_extended_as(f, t, None, None)
    }

    /// [`Self::forward_extended`], except that with `text` a Bind runs that
    /// statement text instead of the one the client prepared (same
    /// parameter types; prepared under the node's name for that text): a
    /// shard's own form of a multi-shard statement (`Target::Multi::sqls`).
    /// With `params` (a split INSERT's part, `Decision::split[i].params`) that
    /// text has only those of the client's parameters, renumbered: the
    /// Bind carries their values (and the Parse their types) in that order.
    pub(crate) fn forward_extended_as(
        &mut self,
        f: Frame,
        t: usize,
        text: Option<&str>,
        params: Option<&[usize]>,
    ) -> Result<(), SessionError> {
        if text.is_none() && f.tag() == fe::BIND && !self.key_fills.is_empty() {
            if let Some(filled) = self.filled_bind_text(&f) {
                return self.forward_extended_as(f, t, Some(&filled), None);
            }
        }
        match f.tag() {
            fe::PARSE => self.on_parse(f, t),
            fe::BIND if text.is_some() => {
                let mut b = f.body();
                let portal = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                let stmt = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                let rest = match self.local_bind_rest(t, &stmt, b) {
                    Some(r) => r.freeze(),
                    None => Bytes::copy_from_slice(b),
                };
                let mut types = self.param_types(&stmt);
                let rest = match params {
                    Some(map) => {
                        types = map
                            .iter()
                            .map(|&n| types.get(n.wrapping_sub(1)).copied().unwrap_or(0))
                            .collect();
                        // A Bind short of parameters: PostgreSQL says so.
                        wire::bind_params_subset(&rest, map).unwrap_or(rest)
                    }
                    None => rest,
                };
                let mut parse = BytesMut::new();
                wire::put_cstr(&mut parse, text.unwrap_or_default());
                parse.put_i16(types.len() as i16);
                for ty in &types {
                    parse.put_u32(*ty);
                }
                let internal = internal_name(&parse, self.generation());
                if !self.be.current_mut().prepared.touch(&internal) {
                    self.note_prepared(&internal);
                    let mut raw = BytesMut::new();
                    wire::frame(&mut raw, fe::PARSE, |o| {
                        wire::put_cstr(o, &internal);
                        o.put_slice(&parse);
                    });
                    let raw = self.local_parse_raw(t, &raw.freeze());
                    self.be.to_backend.put_slice(&raw);
                    self.be.owed.push_back(Owed::Parse {
                        hidden: true,
                        internal: Some(internal.clone()),
                        client: None,
                    });
                }
                wire::frame(&mut self.be.to_backend, fe::BIND, |o| {
                    wire::put_cstr(o, &portal);
                    wire::put_cstr(o, &internal);
                    o.put_slice(&rest);
                });
                let fix = self.bind_row_fix(t, &portal, &stmt, &rest);
                self.be.owed.push_back(Owed::Bind(fix));
                Ok(())
            }
            fe::BIND => {
                let mut b = f.body();
                let portal = wire::get_cstr(&mut b).map_err(client_err)?;
                let stmt = wire::get_cstr(&mut b).map_err(client_err)?;
                let fix = self.bind_row_fix(t, portal, stmt, b);
                if stmt.is_empty() {
                    // Run again (a Bind without its Parse): what it does to
                    // the session counts again, as a named statement's.
                    if let Some(u) = self.unnamed.as_ref() {
                        let (changes, drops, temp) = (u.changes_state, u.drops_prepared, u.temp);
                        if u.schema_change {
                            self.note_ddl();
                        }
                        if changes {
                            self.state_dirty[t] = true;
                            self.state_stale = true;
                            self.prepared_dirty |= drops;
                        }
                        self.note_temp_of(temp, t);
                    }
                    self.ensure_unnamed(t);
                    match self.local_bind_rest(t, stmt, b) {
                        Some(rest) => {
                            let head = f.raw.len() - b.len();
                            self.be.to_backend.put_slice(&f.raw[..head]);
                            self.be.to_backend.put_slice(&rest);
                        }
                        None => self.be.to_backend.put_slice(&f.raw),
                    }
                } else {
                    let rest = match self.local_bind_rest(t, stmt, b) {
                        Some(r) => r.freeze(),
                        None => Bytes::copy_from_slice(b),
                    };
                    let (portal, stmt) = (portal.to_string(), stmt.to_string());
                    // A statement prepared in an earlier transaction may
                    // change session state each time it runs.
                    if self.stmts.get(&stmt).is_some_and(|s| s.changes_state) {
                        self.state_dirty[t] = true;
                        self.state_stale = true;
                        self.prepared_dirty |=
                            self.stmts.get(&stmt).is_some_and(|s| s.drops_prepared);
                    }
                    if let Some(c) = self.stmts.get(&stmt).map(|s| s.temp) {
                        self.note_temp_of(c, t);
                    }
                    if self.stmts.get(&stmt).is_some_and(|s| s.schema_change) {
                        self.note_ddl();
                    }
                    match self.prepare_on_backend(&stmt) {
                        Some(internal) => wire::frame(&mut self.be.to_backend, fe::BIND, |o| {
                            wire::put_cstr(o, &portal);
                            wire::put_cstr(o, &internal);
                            o.put_slice(&rest);
                        }),
                        // Unknown to us: let PostgreSQL raise its own error.
                        None => self.be.to_backend.put_slice(&f.raw),
                    }
                }
                self.be.owed.push_back(Owed::Bind(fix));
                Ok(())
            }
            fe::DESCRIBE => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Describe"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
                if kind == wire::STATEMENT && !name.is_empty() {
                    match self.prepare_on_backend(&name) {
                        Some(internal) => wire::frame(&mut self.be.to_backend, fe::DESCRIBE, |o| {
                            o.put_u8(wire::STATEMENT);
                            wire::put_cstr(o, &internal);
                        }),
                        None => self.be.to_backend.put_slice(&f.raw),
                    }
                } else {
                    if kind == wire::STATEMENT {
                        self.ensure_unnamed(t);
                    }
                    self.be.to_backend.put_slice(&f.raw);
                }
                let parse = match (kind == wire::STATEMENT, name.is_empty()) {
                    (true, false) => self.stmts.get(&name).map(|s| s.parse.clone()),
                    (true, true) => self.unnamed.as_ref().map(|u| u.raw.clone()),
                    (false, _) => None,
                };
                self.be.owed.push_back(Owed::Describe(parse));
                Ok(())
            }
            fe::EXECUTE => {
                self.be.to_backend.put_slice(&f.raw);
                self.be.owed.push_back(Owed::Execute);
                Ok(())
            }
            fe::CLOSE => {
                let mut b = f.body();
                let kind = *b.first().ok_or_else(|| proto("empty Close"))?;
                b = &b[1..];
                let name = wire::get_cstr(&mut b).map_err(client_err)?;
                if kind == wire::STATEMENT && !name.is_empty() {
                    // Node-named statements stay prepared on the backends
                    // (other clients may share them); the client's name goes.
                    let name = name.to_string();
                    self.push_synthetic_with(wire::close_complete(), Forget::OnSend(name));
                } else {
                    self.be.to_backend.put_slice(&f.raw);
                    self.be.owed.push_back(Owed::Close);
                }
                Ok(())
            }
            fe::SYNC => {
                self.be.to_backend.put_slice(&f.raw);
                self.be.owed.push_back(Owed::Sync);
                Ok(())
            }
            fe::FLUSH => {
                self.be.to_backend.put_slice(&f.raw);
                Ok(())
            }
            other => Err(proto_fatal(format!(
                "unexpected message {:?} in batch",
                other as char
            ))),
        }
    }

    /// Prepares the client's unnamed statement on shard `t`'s backend if the
    /// last Parse went elsewhere.
    pub(super) fn ensure_unnamed(&mut self, t: usize) {
        let Some(u) = self.unnamed.as_mut() else {
            return;
        };
        if u.on == Some(t) {
            return;
        }
        u.on = Some(t);
        let raw = u.raw.clone();
        let raw = self.local_parse_raw(t, &raw);
        self.be.to_backend.put_slice(&raw);
        self.be.owed.push_back(Owed::Parse {
            hidden: true,
            internal: None,
            client: None,
        });
    }

    pub(super) fn on_parse(&mut self, f: Frame, t: usize) -> Result<(), SessionError> {
        let mut b = f.body();
        let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
        let rest = b; // query \0, int16 n, n × int32 types
        let mut q = rest;
        let sql = wire::get_cstr(&mut q).map_err(client_err)?;
        if name.is_empty() {
            self.note_set_transaction(sql);
            let class = classify(sql);
            self.unnamed = Some(Unnamed::new(f.raw.clone(), Some(t), &class));
            self.note_class(class, t);
            let raw = self.local_parse_raw(t, &f.raw);
            self.be.to_backend.put_slice(&raw);
            self.be.owed.push_back(Owed::Parse {
                hidden: false,
                internal: None,
                client: None,
            });
            return Ok(());
        }
        self.note_sql(sql, t);
        let Some(internal) = self.register_stmt(name.clone(), rest, sql) else {
            self.fail_pipeline(false);
            self.skip_to_sync = true;
            return Ok(());
        };
        if self.be.current_mut().prepared.touch(&internal) {
            self.push_synthetic_with(wire::parse_complete(), Forget::OnSkip(name));
        } else {
            self.prepare_on_backend(&name);
            // This ParseComplete answers the client's own Parse.
            if let Some(Owed::Parse { hidden, client, .. }) = self.be.owed.back_mut() {
                *hidden = false;
                *client = Some(name);
            }
        }
        Ok(())
    }

    /// Records the client's statement `name` (Parse body `rest` after the
    /// name, SQL `sql`) under its node name, which it returns; None (and an
    /// error queued) when the name is taken.
    pub(super) fn register_stmt(&mut self, name: String, rest: &[u8], sql: &str) -> Option<String> {
        if self.stmts.contains_key(&name) {
            self.push_error(&Refusal::new(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            ));
            return None;
        }
        if let Err(r) = self.prepared_within_budget(rest.len() + sql.len()) {
            self.push_error(&r);
            return None;
        }
        let internal = internal_name(rest, self.generation());
        let mut parse = BytesMut::with_capacity(rest.len() + 20);
        wire::put_cstr(&mut parse, &internal);
        parse.put_slice(rest);
        let class = classify(sql);
        self.stmts.insert(
            name,
            Stmt {
                internal: internal.clone(),
                parse: parse.freeze(),
                sql: Arc::from(sql),
                changes_state: class.changes_state,
                drops_prepared: class.drops_prepared,
                temp: super::temp::TempClass::of(&class),
                schema_change: class.schema_change,
            },
        );
        Some(internal)
    }

    /// One more named statement of `bytes` fits the session's budget
    /// (`max_prepared_statements`, `max_prepared_statement_bytes`), or the
    /// refusal (53200). (The sum is taken here, over at most
    /// `max_prepared_statements` entries, not kept: names leave the map on
    /// many paths.)
    fn prepared_within_budget(&self, bytes: usize) -> Result<(), Refusal> {
        let cfg = self.node.cfg();
        let (max, max_bytes) = (
            cfg.max_prepared_statements,
            cfg.max_prepared_statement_bytes,
        );
        if max > 0 && self.stmts.len() >= max {
            return Err(Refusal::new(
                sqlstate::OUT_OF_MEMORY,
                format!("out of memory: this session already holds {} prepared statements, the most max_prepared_statements allows; close some (Close, DEALLOCATE) or raise the limit", self.stmts.len()),
            ));
        }
        if max_bytes > 0 {
            let held: usize = self
                .stmts
                .values()
                .map(|s| s.parse.len() + s.sql.len())
                .sum();
            if held + bytes > max_bytes {
                return Err(Refusal::new(
                    sqlstate::OUT_OF_MEMORY,
                    format!("out of memory: this session's prepared statements would hold more than {max_bytes} bytes of text (max_prepared_statement_bytes; {held} held, {bytes} more asked); close some (Close, DEALLOCATE) or raise the limit"),
                ));
            }
        }
        Ok(())
    }

    /// The client's Parse in a batch the merger answers itself, recorded as
    /// if a backend had parsed it: a named statement is prepared where it
    /// runs, the unnamed one again on the next backend that needs it.
    /// False: the name is taken (the error is queued).
    pub(crate) fn record_parse(&mut self, f: &Frame) -> Result<bool, SessionError> {
        let mut b = f.body();
        let name = wire::get_cstr(&mut b).map_err(client_err)?.to_string();
        let rest = b;
        let mut q = rest;
        let sql = wire::get_cstr(&mut q).map_err(client_err)?;
        if name.is_empty() {
            self.unnamed = Some(Unnamed::new(f.raw.clone(), None, &classify(sql)));
            return Ok(true);
        }
        Ok(self.register_stmt(name, rest, sql).is_some())
    }

    /// Parameter type OIDs the client gave when it prepared `stmt` ("" is
    /// the unnamed statement).
    pub(crate) fn param_types(&self, stmt: &str) -> Vec<u32> {
        if stmt.is_empty() {
            return self
                .unnamed
                .as_ref()
                .and_then(|u| u.raw.get(5..))
                .map(crate::exec::merge::exec::parse_body_types)
                .unwrap_or_default();
        }
        self.stmts
            .get(stmt)
            .map(|s| crate::exec::merge::exec::parse_body_types(&s.parse))
            .unwrap_or_default()
    }

    /// The node parsed its own unnamed statement on these shards' backends.
    pub(crate) fn unnamed_replaced_on(&mut self, shards: &[usize]) {
        if let Some(u) = self.unnamed.as_mut() {
            if u.on.is_some_and(|t| shards.contains(&t)) {
                u.on = None;
            }
        }
    }

    /// A batch of named Parses and a Sync, outside a transaction, whose
    /// statements backends of shard `t`'s pool have all parsed before under
    /// the client's session state: answered here, without waiting for a
    /// backend. (pgbench -M prepared prepares synchronously in the thread
    /// that drives its other clients; waiting for a backend those clients
    /// hold would deadlock it.) The backend that later runs the statement
    /// prepares it first, so an error PostgreSQL would raise at Parse (say
    /// the table was dropped since) surfaces at Bind instead.
    pub(super) fn parse_without_backend(
        &mut self,
        frames: &[Frame],
        t: usize,
    ) -> Result<bool, SessionError> {
        let Some((last, parses)) = frames.split_last() else {
            return Ok(false);
        };
        if self.txn.open()
            || self.be.attached()
            || !self.be.owed.is_empty()
            || last.tag() != fe::SYNC
            || parses.is_empty()
        {
            return Ok(false);
        }
        let pool = self.pool(t);
        let mut todo = Vec::with_capacity(parses.len());
        for f in parses {
            if f.tag() != fe::PARSE {
                return Ok(false);
            }
            let mut b = f.body();
            let name = wire::get_cstr(&mut b).map_err(client_err)?;
            let rest = b;
            let mut q = rest;
            let sql = wire::get_cstr(&mut q).map_err(client_err)?;
            if name.is_empty()
                || self.stmts.contains_key(name)
                || classify(sql).changes_state
                || !pool.is_validated(&internal_name(rest, self.generation()), self.state_fp)
            {
                return Ok(false);
            }
            todo.push((name.to_string(), rest, sql));
        }
        for (name, rest, sql) in todo {
            if self.register_stmt(name, rest, sql).is_none() {
                // As PostgreSQL: the error, then nothing up to Sync.
                break;
            }
            self.push_synthetic(wire::parse_complete());
        }
        self.push_synthetic(rfq(tx::IDLE));
        Ok(true)
    }

    /// Makes sure the backend has the client's statement `name` prepared;
    /// returns the internal name, or None if the client never prepared it.
    pub(super) fn prepare_on_backend(&mut self, name: &str) -> Option<String> {
        let (internal, parse) = {
            let s = self.stmts.get(name)?;
            (s.internal.clone(), s.parse.clone())
        };
        if !self.be.current_mut().prepared.touch(&internal) {
            self.note_prepared(&internal);
            let mut raw = BytesMut::with_capacity(parse.len() + 5);
            wire::frame(&mut raw, fe::PARSE, |o| o.put_slice(&parse));
            let raw = self.local_parse_raw(self.be.cur, &raw.freeze());
            self.be.to_backend.put_slice(&raw);
            self.be.owed.push_back(Owed::Parse {
                hidden: true,
                internal: Some(internal.clone()),
                client: None,
            });
        }
        Some(internal)
    }

    /// Records `internal` as prepared on the current backend (its Parse
    /// goes next); beyond `server_prepared_statements` the least recently
    /// used statements are closed there first. One a later message of the
    /// pipeline needs is prepared again then ([`Self::prepare_on_backend`]
    /// finds it missing); a portal already bound from one survives its
    /// Close, as on PostgreSQL.
    fn note_prepared(&mut self, internal: &str) {
        let max = self.node.cfg().server_prepared_statements;
        let evicted = self
            .be
            .current_mut()
            .prepared
            .insert(internal.to_string(), max);
        for name in evicted {
            wire::frame(&mut self.be.to_backend, fe::CLOSE, |o| {
                o.put_u8(wire::STATEMENT);
                wire::put_cstr(o, &name);
            });
            self.be.owed.push_back(Owed::Closing(name));
        }
    }
}

/// The refusal of a batch that holds a multi-shard statement beside other
/// statements and cannot be cut (it ends with Flush, not Sync); a batch
/// that can be is recognised by it (`Session::run_batch_once`).
pub(super) fn multi_beside_others() -> Refusal {
    Refusal::new(sqlstate::FEATURE_NOT_SUPPORTED, MULTI_BESIDE_OTHERS.into())
}

/// A batch ended by Flush whose statements go to different shards (ended
/// by Sync it is cut instead).
pub(super) const DIFFERENT_SHARDS: &str =
    "statements of one pipelined batch go to different shards: end it with Sync, not Flush";

pub(super) const MULTI_BESIDE_OTHERS: &str = "a pipelined batch that holds a multi-shard statement beside other statements must end with Sync, not Flush";
