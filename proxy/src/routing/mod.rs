//! The executor's view of a route: the router's [`Route`] with shard names
//! turned into the node's shard indexes, plus what the session needs to
//! know about the statement (transaction control, writes).
//!
//! Guarantee: a statement the router or the merger cannot answer correctly
//! becomes a [`Refusal`] with the router's SQLSTATE; nothing here guesses a
//! shard.

pub mod functions;
pub mod names;
pub mod state;

use crate::backend::state::SessionState;
use crate::error::sqlstate;
use crate::error::Refusal;
use crate::wire::{self, WireError};
use hotrepart_router::catalog::{RoutingSnapshot, ShardId};
use hotrepart_router::classify::classify;
use hotrepart_router::route::{
    self as r, Hints, MergeNeed, Param, ParamFormat, Route, StatementKind, TransactionKind,
};

/// Where the executor sends a statement (node shard indexes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Shard(usize),
    /// No table: any shard answers the same.
    Any,
    /// Several shards; `sqls[i]` is the text `shards[i]` runs instead of
    /// the statement (for a merge: instead of the plan's shard SQL) when it
    /// differs per shard — the router split a multi-row INSERT, or a shard
    /// must hide the rows of a range it holds without owning it
    /// (`hotrepart_router::route::hide_rows`); else None (same text).
    Multi {
        shards: Vec<usize>,
        sqls: Option<Vec<String>>,
    },
}

/// Transaction control, as far as the session cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Other,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub target: Target,
    pub kind: Kind,
    pub write: bool,
    pub ddl: bool,
    /// Number of statements in the string.
    pub statements: usize,
    /// Whether some statement may return rows.
    pub returns_rows: bool,
    /// The statement text (for BEGIN, replayed on shards joining later).
    pub sql_text: String,
    /// Some statement of the string is transaction control.
    pub has_tx_control: bool,
    /// For a multi-shard read: how to merge the shards' answers.
    pub merge: Option<std::sync::Arc<hotrepart_router::route::MergePlan>>,
    /// A COPY the node splits (FROM) or concatenates (TO) over the shards
    /// (see `exec::copy`).
    pub copy: Option<std::sync::Arc<hotrepart_router::route::copy::CopyPlan>>,
    /// Functions called that the router does not know to be read-only:
    /// when one is volatile the session makes `write` true (it may run
    /// DML), so a transaction over several shards commits with 2PC.
    pub calls: std::sync::Arc<[String]>,
    /// A hint chose the shard ([`hotrepart_router::route::Route::hinted`]).
    pub hinted: bool,
    /// It creates, names or drops a temporary object of the session
    /// ([`hotrepart_router::route::Route::temp`]): it must run on the
    /// backend that holds them (`session/temp.rs`).
    pub temp: bool,
    /// A multi-row INSERT split by shard: for shard `shards[i]` of the
    /// target, its part ([`SplitShard`]).
    pub split: Option<std::sync::Arc<[SplitShard]>>,
    /// The sharded tables its `INSERT … VALUES` statements write (declared
    /// names): columns a sequence numbers are filled by the node
    /// (`session/key_default.rs`).
    pub inserts_into: Vec<String>,
    /// An UPDATE over several shards that sets the shard key: the shard
    /// that owns the new key ([`hotrepart_router::route::Route::key_move`]);
    /// the executor fails the statement when another updated rows.
    pub key_move: Option<KeyMove>,
    /// Per statement, on several shards: DML on a reference table
    /// ([`hotrepart_router::route::Route::replicated`]) — the client gets
    /// the first shard's rows and count; the others must report the same
    /// count.
    pub replicated: Vec<bool>,
}

/// See [`Decision::key_move`].
#[derive(Debug, Clone)]
pub struct KeyMove {
    /// The shard (index) that owns the new key.
    pub shard: usize,
    pub route: hotrepart_router::route::KeyMove,
}

impl KeyMove {
    /// The statement's error when a shard other than `to` reported `rows`
    /// updated (the executor says which).
    pub fn refusal(&self, to: &str, rows: u64) -> String {
        let k = &self.route;
        format!(
            "UPDATE of shard key column \"{}\" of \"{}\" to {} would move {rows} row(s) to shard {to} (moving rows between shards is not supported)",
            k.column, k.table, k.key
        )
    }
}

/// One shard's part of a split multi-row INSERT.
#[derive(Debug, Clone)]
pub struct SplitShard {
    /// Its rows' places (0-based) in the client's statement: `RETURNING`
    /// rows are put back in the client's order by them.
    pub rows: Vec<usize>,
    /// With parameters: the client's numbers (1-based) of the parameters
    /// its text (`sqls[i]`) numbers `$1`, `$2` … (its Bind carries those).
    pub params: Option<Vec<usize>>,
}

impl Decision {
    /// A lone statement on a reference table's copies: one copy's rows are
    /// the answer ([`Decision::replicated`]).
    pub fn replicated_rows(&self) -> bool {
        self.statements == 1 && self.replicated.first() == Some(&true)
    }

    /// For a batch: which statement's decision governs transaction control
    /// and the write check.
    pub fn outranks(&self, other: &Decision) -> bool {
        let rank = |d: &Decision| match d.kind {
            Kind::Commit | Kind::Rollback => 3,
            _ if d.write => 2,
            Kind::Begin => 1,
            _ => 0,
        };
        rank(self) > rank(other)
    }

    /// Everything to one shard (a node with a single shard, nothing to route).
    /// Everything goes to shard `i` (the routing table has one shard).
    pub fn single_on(i: usize) -> Decision {
        Decision {
            target: Target::Shard(i),
            kind: Kind::Other,
            write: false,
            ddl: false,
            statements: 1,
            returns_rows: true,
            sql_text: String::new(),
            has_tx_control: false,
            merge: None,
            copy: None,
            calls: std::sync::Arc::from(Vec::new()),
            hinted: false,
            temp: false,
            split: None,
            inserts_into: Vec::new(),
            key_move: None,
            replicated: Vec::new(),
        }
    }
}

/// Bind parameters as they arrived (formats and raw values).
pub struct BindParams {
    formats: Vec<i16>,
    values: Vec<Option<bytes::Bytes>>,
}

impl BindParams {
    /// Parses the part of a Bind body after portal and statement names.
    pub fn parse(mut b: &[u8]) -> Result<BindParams, WireError> {
        let nf = wire::get_i16(&mut b)?;
        let mut formats = Vec::with_capacity(nf.max(0) as usize);
        for _ in 0..nf {
            formats.push(wire::get_i16(&mut b)?);
        }
        let nv = wire::get_i16(&mut b)?;
        let mut values = Vec::with_capacity(nv.max(0) as usize);
        for _ in 0..nv {
            let len = wire::get_i32(&mut b)?;
            if len < 0 {
                values.push(None);
            } else {
                let len = len as usize;
                if b.len() < len {
                    return Err(WireError::Protocol(
                        "Bind parameter longer than the message".into(),
                    ));
                }
                values.push(Some(bytes::Bytes::copy_from_slice(&b[..len])));
                b = &b[len..];
            }
        }
        Ok(BindParams { formats, values })
    }

    fn format(&self, i: usize) -> ParamFormat {
        let f = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => self.formats.get(i).copied().unwrap_or(0),
        };
        if f == 1 {
            ParamFormat::Binary
        } else {
            ParamFormat::Text
        }
    }

    /// How many parameter values the Bind carries.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the Bind carries no parameter value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Parameter `i`: None when there is no such parameter, Some(None)
    /// when it is NULL.
    pub fn value(&self, i: usize) -> Option<Option<&[u8]>> {
        self.values.get(i).map(|v| v.as_deref())
    }

    /// Whether parameter `i` comes in binary.
    pub fn is_binary(&self, i: usize) -> bool {
        self.format(i) == ParamFormat::Binary
    }

    /// Parameter `i` as a LIMIT/OFFSET count (text, or binary int2/4/8);
    /// None when it is NULL (PostgreSQL: no limit). A value that is not a
    /// non-negative integer is an error message.
    pub fn count(&self, i: usize) -> Result<Option<u64>, String> {
        let Some(v) = self.values.get(i) else {
            return Err(format!("there is no parameter ${}", i + 1));
        };
        let Some(v) = v else { return Ok(None) };
        let n: i64 = match self.format(i) {
            ParamFormat::Text => std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| format!("LIMIT/OFFSET parameter ${} is not an integer", i + 1))?,
            ParamFormat::Binary => match v.len() {
                2 => i64::from(i16::from_be_bytes([v[0], v[1]])),
                4 => i64::from(i32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                8 => i64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
                _ => {
                    return Err(format!(
                        "LIMIT/OFFSET parameter ${} is not a binary integer",
                        i + 1
                    ))
                }
            },
        };
        u64::try_from(n)
            .map(Some)
            .map_err(|_| format!("LIMIT/OFFSET must not be negative (parameter ${})", i + 1))
    }

    fn as_router_params<'a>(&'a self, decoder: Option<r::TextDecoder<'a>>) -> Vec<Param<'a>> {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| Param {
                value: v.as_deref(),
                format: self.format(i),
                type_oid: None,
                decoder,
            })
            .collect()
    }
}

/// Turns a router route into a decision for this node's shards.
pub fn decision(
    snapshot: &RoutingSnapshot,
    ns: &r::Namespace,
    shard_index: impl Fn(&ShardId) -> Option<usize>,
    route: Route,
    sql: &str,
) -> Result<Decision, Refusal> {
    if route.touches_frozen {
        let mut r = Refusal::new(
            sqlstate::SERIALIZATION_FAILURE,
            "the key range of this write is frozen for a cut-over that did not end in time; retry the statement".into(),
        );
        r.retry = crate::error::Retry::AfterFreeze;
        return Err(r);
    }
    let idx = |id: &ShardId| {
        shard_index(id).ok_or_else(|| {
            Refusal::new(
                sqlstate::INTERNAL_ERROR,
                format!("shard {id} of the routing table is not configured on this node"),
            )
        })
    };
    // A statement on several shards while a reshard job holds rows of a
    // range on a shard that does not own it: that shard runs it with the
    // ownership filter (router `hide_rows`), so each row is seen once.
    // DDL and utility statements (VACUUM …) are not rewritten by
    // `hide_rows` (and may be strings the parser cannot read).
    let ddl_only = !route.statements.is_empty()
        && route
            .statements
            .iter()
            .all(|k| matches!(k, StatementKind::Ddl | StatementKind::Utility));
    let hidden = |ids: &[ShardId]| -> Result<Option<Vec<String>>, Refusal> {
        if !snapshot.has_hidden() || ddl_only {
            return Ok(None);
        }
        let base = match &route.merge {
            MergeNeed::Merge(p) => p.shard_sql.as_str(),
            _ => sql,
        };
        let mut texts = Vec::with_capacity(ids.len());
        let mut changed = false;
        for id in ids {
            match r::hide_rows(snapshot, ns, base, id)
                .map_err(|e| Refusal::new(e.sqlstate, e.message))?
            {
                Some(t) => {
                    changed = true;
                    texts.push(t);
                }
                None => texts.push(base.to_owned()),
            }
        }
        Ok(changed.then_some(texts))
    };
    let split = match &route.target {
        r::Target::Split(parts) if parts.len() > 1 => Some(std::sync::Arc::from(
            parts
                .iter()
                .map(|p| SplitShard {
                    rows: p.rows.clone(),
                    params: p.params.clone(),
                })
                .collect::<Vec<_>>(),
        )),
        _ => None,
    };
    let target = match &route.target {
        r::Target::One(id) => Target::Shard(idx(id)?),
        r::Target::Any => Target::Any,
        r::Target::All => {
            let ids: Vec<ShardId> = snapshot.shards().map(|s| s.id.clone()).collect();
            Target::Multi {
                shards: ids.iter().map(idx).collect::<Result<_, _>>()?,
                sqls: hidden(&ids)?,
            }
        }
        r::Target::Shards(ids) => Target::Multi {
            shards: ids.iter().map(idx).collect::<Result<_, _>>()?,
            sqls: hidden(ids)?,
        },
        r::Target::Split(parts) => {
            if parts.len() == 1 {
                // One shard: the original text is exactly that shard's rows.
                Target::Shard(idx(&parts[0].shard)?)
            } else {
                Target::Multi {
                    shards: parts
                        .iter()
                        .map(|p| idx(&p.shard))
                        .collect::<Result<_, _>>()?,
                    sqls: Some(parts.iter().map(|p| p.sql.clone()).collect()),
                }
            }
        }
    };
    // A read of `pg_prepared_xacts` on every shard: the node's own prepared
    // transactions are left out of what each shard lists.
    let target = match target {
        Target::Multi { shards, sqls } if mentions(sql, "prepared_xacts") => {
            let base = match &route.merge {
                MergeNeed::Merge(p) => p.shard_sql.as_str(),
                _ => sql,
            };
            let texts = sqls.unwrap_or_else(|| vec![base.to_owned(); shards.len()]);
            let mut changed = false;
            let mut out = Vec::with_capacity(texts.len());
            for t in texts {
                match r::hide_node_transactions(ns, &t)
                    .map_err(|e| Refusal::new(e.sqlstate, e.message))?
                {
                    Some(n) => {
                        changed = true;
                        out.push(n);
                    }
                    None => out.push(t),
                }
            }
            let sqls = (changed || out.iter().any(|t| t != base)).then_some(out);
            Target::Multi { shards, sqls }
        }
        t => t,
    };
    if matches!(target, Target::Multi { .. }) {
        match &route.merge {
            MergeNeed::None => {}
            MergeNeed::Refuse(_) => {
                if let Some(e) = route.merge.error() {
                    return Err(Refusal::new(e.sqlstate, e.message));
                }
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "this multi-shard statement cannot be merged".into(),
                ));
            }
            MergeNeed::Merge(_) => {}
        }
    }
    let target_is_multi = matches!(target, Target::Multi { .. });
    let kind = match route.kind {
        StatementKind::Transaction(TransactionKind::Begin) => Kind::Begin,
        StatementKind::Transaction(TransactionKind::Commit) => Kind::Commit,
        StatementKind::Transaction(TransactionKind::Rollback) => Kind::Rollback,
        StatementKind::Transaction(_) => Kind::Savepoint,
        _ => Kind::Other,
    };
    let mut returning = None;
    let returns_rows = route.statements.iter().any(|k| {
        matches!(
            k,
            StatementKind::Select
                | StatementKind::Show
                | StatementKind::Utility
                | StatementKind::Copy { .. }
        ) || matches!(
            k,
            StatementKind::Insert | StatementKind::Update | StatementKind::Delete
        ) && *returning.get_or_insert_with(|| classify(sql).returning)
    });
    Ok(Decision {
        target,
        kind,
        // DML, FOR UPDATE/SHARE: a write for commit purposes.
        write: route.is_write || route.may_write,
        ddl: route
            .statements
            .iter()
            .all(|k| matches!(k, StatementKind::Ddl))
            && !route.statements.is_empty(),
        statements: route.statements.len().max(1),
        returns_rows,
        sql_text: sql.to_string(),
        has_tx_control: route
            .statements
            .iter()
            .any(|k| matches!(k, StatementKind::Transaction(_))),
        merge: match (&target_is_multi, &route.merge) {
            (true, MergeNeed::Merge(p)) => Some(p.clone()),
            _ => None,
        },
        copy: route.copy.filter(|_| target_is_multi),
        calls: route.calls.clone(),
        hinted: route.hinted,
        temp: route.temp,
        split,
        inserts_into: route.inserts_into,
        replicated: if target_is_multi {
            route.replicated
        } else {
            Vec::new()
        },
        key_move: match route.key_move {
            Some(k) if target_is_multi => Some(KeyMove {
                shard: idx(&k.shard)?,
                route: k,
            }),
            _ => None,
        },
    })
}

/// What routing needs to know of the client's session.
pub struct RouteCtx<'a> {
    /// The settings as the node last read them back.
    pub state: &'a SessionState,
    /// A statement that may have changed settings ran since `state` was
    /// read: what depends on them (standard_conforming_strings) is unknown.
    pub stale: bool,
    /// The server's `standard_conforming_strings` at login.
    pub server_scs: bool,
    /// Where unqualified names resolve ([`crate::routing::names`]).
    pub ns: &'a r::Namespace,
    /// The client's encoding: how its text parameters read.
    pub enc: crate::wire::encoding::ClientEncoding,
}

impl RouteCtx<'_> {
    /// `standard_conforming_strings`; unknown (stale) counts as off, the
    /// setting under which the router refuses more.
    fn standard_conforming_strings(&self) -> bool {
        !self.stale
            && crate::backend::state::standard_conforming_strings(self.state, self.server_scs)
    }
}

/// Statement texts longer than this are planned but not cached (nor is
/// their shape): the cache is bounded by entries, and each entry holds its
/// text twice.
const CACHE_MAX_TEXT: usize = 64 << 10;

/// Routes `sql` (with Bind parameters, if any) against `snapshot`, using
/// and filling the plan cache. A statement longer than `max_parse` bytes
/// (0: no limit) is not parsed: sqlparser's tree takes about a hundred
/// times the text in memory. It is routed by the lexer alone, as a string
/// the parser cannot read ([`r::plan_unparsed`]): to the home shard when
/// it names no declared table, to every shard as DDL; else refused with
/// 54000.
pub fn decide(
    snapshot: &RoutingSnapshot,
    cache: &std::sync::Mutex<r::PlanCache>,
    shard_index: impl Fn(&ShardId) -> Option<usize>,
    sql: &str,
    params: Option<&BindParams>,
    ctx: &RouteCtx<'_>,
    max_parse: usize,
) -> Result<Decision, Refusal> {
    let hints = hints(ctx)?;
    if max_parse > 0 && sql.len() > max_parse {
        let why = format!(
            "not parsed: {} bytes, more than max_parse_bytes = {max_parse}",
            sql.len()
        );
        let plan = r::plan_unparsed(snapshot, sql, ctx.ns, &why).map_err(|e| {
            Refusal::new(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("statement too long to route: {}; send a shorter statement (a long IN list as one array parameter: = ANY($1)) or raise max_parse_bytes", e.message),
            )
        })?;
        return bind_and_decide(snapshot, shard_index, sql, params, ctx, &plan, &hints);
    }
    let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
    let cacheable = sql.len() <= CACHE_MAX_TEXT;
    // A statement with literals is routed by its shape when it can be
    // (one plan per shape, not per key: `router/src/route/normalize.rs`).
    if cacheable && params.is_none_or(|p| p.values.is_empty()) {
        if let Some(route) = shape_route(snapshot, cache, sql, ctx.ns, &hints) {
            return decision(snapshot, ctx.ns, shard_index, route, sql);
        }
    }
    // The lock is held for the lookup and the insert only: a statement that
    // takes long to parse stalls no other session's routing.
    let cached = if cacheable {
        lock().get(snapshot, sql, ctx.ns)
    } else {
        None
    };
    let plan = match cached {
        Some(p) => Ok(p),
        None => r::plan_in(snapshot, sql, ctx.ns).map(|p| {
            let p = std::sync::Arc::new(p);
            if cacheable {
                lock().put(snapshot, sql, std::sync::Arc::clone(&p));
            }
            p
        }),
    };
    let plan = plan
        .map_err(|e| {
            // Off, PostgreSQL's reading of '…\'…' differs from the
            // router's, which may then not even tokenize (or route it by
            // its lexer, misreading where strings end).
            if !hints.standard_conforming_strings && sql.contains('\\') {
                Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("a string literal containing a backslash while standard_conforming_strings is off cannot be routed (hotrepart reads literals as with it on: {}); use E'…' for escapes, or SET standard_conforming_strings = on", e.message),
                )
            } else {
                Refusal::new(e.sqlstate, e.message)
            }
        })?;
    bind_and_decide(snapshot, shard_index, sql, params, ctx, &plan, &hints)
}

/// The session's routing hints (`hotrepart.shard`, the string reading).
fn hints(ctx: &RouteCtx<'_>) -> Result<Hints, Refusal> {
    let state = ctx.state;
    Ok(Hints {
        session_shard: match state.get("hotrepart.shard") {
            Some(s) if !s.is_empty() => Some(ShardId::new(s).map_err(|e| {
                Refusal::new(
                    sqlstate::UNDEFINED_OBJECT,
                    format!("SET hotrepart.shard: {e}"),
                )
            })?),
            _ => None,
        },
        standard_conforming_strings: ctx.standard_conforming_strings(),
    })
}

/// [`decide`] once the plan is at hand.
fn bind_and_decide(
    snapshot: &RoutingSnapshot,
    shard_index: impl Fn(&ShardId) -> Option<usize>,
    sql: &str,
    params: Option<&BindParams>,
    ctx: &RouteCtx<'_>,
    plan: &r::Plan,
    hints: &Hints,
) -> Result<Decision, Refusal> {
    let owned;
    // Text parameters in a client encoding other than UTF-8 are read in
    // it (a text key hashes as the server stores it).
    let enc = ctx.enc;
    let read = move |b: &[u8]| enc.decode(b).map(|t| t.into_owned()).map_err(|e| e.message);
    let decoder = (!enc.is_utf8()).then_some(r::TextDecoder(&read));
    let params: &[Param<'_>] = match params {
        Some(p) => {
            owned = p.as_router_params(decoder);
            &owned
        }
        None => &[],
    };
    let route = plan
        .bind(snapshot, params, hints)
        .map_err(|e| Refusal::new(e.sqlstate, e.message))?;
    if route.statements.len() > 1
        && classify(sql).changes_routing_settings
        && routed_after_change(&route)
    {
        return Err(Refusal::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "a query string that changes search_path or standard_conforming_strings must hold no other statement: hotrepart routes the whole string before the change is made; send the SET on its own".into(),
        ));
    }
    decision(snapshot, ctx.ns, shard_index, route, sql)
}

/// The route of `sql` taken from the plan of its shape (literals made
/// parameters), planned once per shape and cached under the shape's text;
/// `None` when the statement has no literal, its shape has no plan (marked
/// in the cache, not tried again in this epoch), or the shape's route
/// cannot stand for the statement's ([`r::shape_route_usable`]): then the
/// text itself is planned.
fn shape_route(
    snapshot: &RoutingSnapshot,
    cache: &std::sync::Mutex<r::PlanCache>,
    sql: &str,
    ns: &r::Namespace,
    hints: &Hints,
) -> Option<Route> {
    let n = r::normalize_literals(sql)?;
    let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
    let cached = {
        let mut c = lock();
        if c.is_no_shape(snapshot, &n.text) {
            return None;
        }
        c.get(snapshot, &n.text, ns)
    };
    let plan = match cached {
        Some(p) => p,
        // Parsed outside the lock, as the statements' own plans.
        None => match r::plan_shape(snapshot, &n.text, ns) {
            // A WebAssembly function would run twice for a statement the
            // shape cannot route (once for the shape, once for the text):
            // such tables are routed by their text, as before.
            Ok(Some(p)) if !p.places_by_function() => {
                let p = std::sync::Arc::new(p);
                lock().put(snapshot, &n.text, std::sync::Arc::clone(&p));
                p
            }
            Ok(_) | Err(_) => {
                lock().mark_no_shape(snapshot, &n.text);
                return None;
            }
        },
    };
    let route = plan.bind(snapshot, &n.params(), hints).ok()?;
    r::shape_route_usable(&route).then_some(route)
}

/// Whether a statement that depends on names or literals follows one that
/// may change settings (a SET/RESET, or anything when `set_config` may be
/// called in a query).
fn routed_after_change(route: &Route) -> bool {
    let changes = |k: &StatementKind| matches!(k, StatementKind::Set | StatementKind::Reset);
    let first = route
        .statements
        .iter()
        .position(|k| changes(k) || !route.calls.is_empty() || matches!(k, StatementKind::Select))
        .unwrap_or(route.statements.len());
    route.statements.iter().skip(first + 1).any(|k| {
        !matches!(
            k,
            StatementKind::Set
                | StatementKind::Reset
                | StatementKind::Show
                | StatementKind::Empty
                | StatementKind::Transaction(_)
        )
    })
}

/// Whether `text` holds `word` (ASCII letters in any case).
fn mentions(text: &str, word: &str) -> bool {
    text.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
}
