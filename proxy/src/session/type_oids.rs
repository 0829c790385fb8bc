//! User type OIDs the same to a client whichever shard answers (issue 14).
//!
//! PostgreSQL gives each user type (enum, composite, domain, range, a
//! table's row type, their array types …) the next free OID of its server,
//! so one type has a different OID on each shard; drivers learn a type's
//! OID from one read (catalog reads go to the home shard) and send it
//! back, or read it in a RowDescription from another shard and fail to
//! decode. PostgreSQL cannot create a type with a chosen OID, so the node
//! translates: the *canonical* OID of a user type is the home shard's; for
//! every other shard a [`TypeMap`] pairs its local OIDs with the home
//! shard's, matched by (schema, name, `typtype`) in `pg_type`.
//!
//! - Client → shard: the parameter type OIDs of each Parse sent to a
//!   non-home shard (the client's own, the node's re-Parse of a named or
//!   unnamed statement, a shard's own text of a multi-shard statement, the
//!   merge's Parse: `local_parse_raw`, `local_types`), and the OIDs inside
//!   binary Bind values of arrays and records (`local_bind_rest`; the
//!   parameter types from Parse, else from the ParameterDescription of a
//!   Describe of the statement, noted in [`Described`]). PostgreSQL 15
//!   ignores a user OID inside binary array and record input that differs
//!   from the one it expects; older servers refuse it (42804).
//! - Shard → client: the type OIDs of each RowDescription and
//!   ParameterDescription from a non-home shard ([`Session::canonical_frame`])
//!   on the single-shard relay (`replies.rs`), in a concatenated and in a
//!   merged read (whose shards' row descriptions are compared after
//!   translation); and the OIDs inside binary values of arrays and records
//!   in the DataRows of the single-shard relay and of a concatenated read
//!   (`exec/scatter.rs`, each shard its own) ([`RowFix`]): set by the
//!   RowDescription of the portal (Describe, simple query) or, for rows
//!   that come without one (Bind and Execute of a statement described
//!   before: tokio-postgres, asyncpg), at the BindComplete of the unnamed
//!   portal from the statement's described columns and the Bind's result
//!   formats (`bind_row_fix`).
//!
//! Only OIDs ≥ 16384 (`FirstNormalObjectId`, plus `record`/`record[]`
//! inside values) are looked at: built-in types are the same everywhere, so
//! the hot path pays a compare per column or parameter of a non-home shard
//! and no lookup; rows are rewritten only while a [`RowFix`] is set. A map
//! is built only when such an OID is seen for or from a non-home shard:
//! read on dedicated connections to the home shard and to the shard (never
//! a pooled backend, so nothing is read mid-pipeline and no pool is held),
//! one reader per map at a time (the others await its result), cached per
//! (database, home, shard) in the node ([`TypeOidCache`]), forgotten on DDL
//! through the node (`Node::forget_catalog`: CREATE/DROP/ALTER TYPE,
//! DOMAIN, TABLE, EXTENSION … all go there), and read again when an OID is
//! missing from it (at most once per [`RELOAD_AFTER`], so a type that
//! exists on one side only costs no query per statement; a failed read is
//! retried after it too).
//!
//! A type the home shard lacks, or holds under the same name as another
//! kind, keeps its local OID (logged once per map): the node never makes
//! an OID up. Left as they are (documented in the README): a type created
//! in a transaction not yet committed (the dedicated connections cannot
//! see it) until it commits; binary values in the rows of a named portal
//! executed without a Describe, and of a portal resumed after
//! PortalSuspended in a later batch; a FunctionCall's function OID; the
//! table OIDs of RowDescription.

use super::conn::Session;
use crate::backend::conn::{BackendConn, BackendTarget};
use crate::wire::{self, be, fe, Frame};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// `FirstNormalObjectId`: OIDs below are built in, the same on every shard.
pub(crate) const FIRST_USER_OID: u32 = 16384;

/// A map missing an OID is read again only this long after it was read.
pub(crate) const RELOAD_AFTER: Duration = Duration::from_secs(1);

/// The user types of a database as the catalog of one shard lists them.
pub(crate) const TYPES_SQL: &str =
    "SELECT t.oid::text, n.nspname::text, t.typname::text, t.typtype::text, \
     t.typcategory::text, t.typelem::text, t.typbasetype::text \
     FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
     WHERE t.oid >= 16384 AND n.nspname !~ '^pg_(toast_)?temp_'";

/// One shard's user type OIDs paired with the home shard's.
#[derive(Debug)]
pub(crate) struct TypeMap {
    /// Local OID → home OID.
    to_home: HashMap<u32, u32>,
    /// Home OID → local OID.
    to_local: HashMap<u32, u32>,
    /// Local OIDs of types the home shard lacks (or holds as another kind).
    only_here: HashSet<u32>,
    /// Home OIDs of types this shard lacks.
    only_home: HashSet<u32>,
    /// Local user types whose binary values name types.
    kinds: HashMap<u32, Kind>,
    /// Home OIDs of enum types (whose binary value is the label's text).
    home_enums: HashSet<u32>,
    loaded: Instant,
    /// OIDs already logged as passed through unchanged.
    logged: Mutex<HashSet<(bool, u32)>>,
}

/// A catalog row of [`TYPES_SQL`]: (oid, schema, name, typtype) and what
/// a binary value of the type holds.
#[derive(Debug, Clone)]
pub(crate) struct TypeRow {
    oid: u32,
    nsp: String,
    name: String,
    typtype: String,
    kind: Kind,
}

/// `record` and `record[]`: built in, their values carry field OIDs.
const RECORD: u32 = 2249;
const RECORD_ARRAY: u32 = 2287;

/// What a binary value of a type holds that names types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An array: its header names the element type.
    Array(u32),
    /// A record: each field names its type.
    Composite,
    /// A domain: a value of its base type.
    Domain(u32),
    Other,
}

impl TypeMap {
    /// Pairs the rows of [`TYPES_SQL`] read on the home shard and on the
    /// shard by (schema, name, kind).
    pub(crate) fn build(home: &[TypeRow], shard: &[TypeRow]) -> TypeMap {
        let by_name: HashMap<(&str, &str), (u32, &str)> = home
            .iter()
            .map(|r| {
                (
                    (r.nsp.as_str(), r.name.as_str()),
                    (r.oid, r.typtype.as_str()),
                )
            })
            .collect();
        let mut m = TypeMap {
            to_home: HashMap::new(),
            to_local: HashMap::new(),
            only_here: HashSet::new(),
            only_home: HashSet::new(),
            kinds: HashMap::new(),
            home_enums: home
                .iter()
                .filter(|r| r.typtype == "e")
                .map(|r| r.oid)
                .collect(),
            loaded: Instant::now(),
            logged: Mutex::new(HashSet::new()),
        };
        for r in shard {
            if r.kind != Kind::Other {
                m.kinds.insert(r.oid, r.kind);
            }
            match by_name.get(&(r.nsp.as_str(), r.name.as_str())) {
                Some((h, k)) if *k == r.typtype.as_str() => {
                    m.to_home.insert(r.oid, *h);
                    m.to_local.insert(*h, r.oid);
                }
                _ => {
                    m.only_here.insert(r.oid);
                }
            }
        }
        for r in home {
            if !m.to_local.contains_key(&r.oid) {
                m.only_home.insert(r.oid);
            }
        }
        m
    }

    /// What a binary value of local type `oid` holds.
    fn kind(&self, oid: u32) -> Kind {
        match oid {
            RECORD => Kind::Composite,
            RECORD_ARRAY => Kind::Array(RECORD),
            o if o < FIRST_USER_OID => Kind::Other,
            o => self.kinds.get(&o).copied().unwrap_or(Kind::Other),
        }
    }

    /// A binary value of local type `oid` may name user types.
    pub(crate) fn names_types(&self, oid: u32) -> bool {
        let mut oid = oid;
        for _ in 0..MAX_DEPTH {
            match self.kind(oid) {
                Kind::Array(e) => return e >= FIRST_USER_OID || self.kind(e) != Kind::Other,
                Kind::Composite => return true,
                Kind::Domain(b) => oid = b,
                Kind::Other => return false,
            }
        }
        false
    }

    /// The map knows what to do with `oid` (a local OID when `local`,
    /// else a home OID): a pair, or a type of one side only.
    fn knows(&self, oid: u32, local: bool) -> bool {
        if local {
            self.to_home.contains_key(&oid) || self.only_here.contains(&oid)
        } else {
            self.to_local.contains_key(&oid) || self.only_home.contains(&oid)
        }
    }

    /// The home OID of local `oid` (itself when unpaired).
    pub(crate) fn home_of(&self, oid: u32, shard: &str) -> u32 {
        if oid < FIRST_USER_OID {
            return oid;
        }
        match self.to_home.get(&oid) {
            Some(h) => *h,
            None => {
                self.log_once(true, oid, shard);
                oid
            }
        }
    }

    /// The local OID of home `oid` (itself when unpaired).
    pub(crate) fn local_of(&self, oid: u32, shard: &str) -> u32 {
        if oid < FIRST_USER_OID {
            return oid;
        }
        match self.to_local.get(&oid) {
            Some(l) => *l,
            None => {
                self.log_once(false, oid, shard);
                oid
            }
        }
    }

    fn log_once(&self, local: bool, oid: u32, shard: &str) {
        let mut l = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() < 10_000 && l.insert((local, oid)) {
            if local {
                tracing::warn!(shard, oid, "a type of this shard has no type of the same schema, name and kind on the home shard: its OID goes to the client unchanged");
            } else {
                tracing::warn!(shard, oid, "the home shard's type of this OID has no type of the same schema, name and kind on this shard: its OID goes to the shard unchanged");
            }
        }
    }
}

/// (database, home shard, shard) by name.
type MapKey = (String, String, String);

/// The node's [`TypeMap`]s.
#[derive(Debug, Default)]
pub struct TypeOidCache {
    maps: Mutex<HashMap<MapKey, Arc<TypeMap>>>,
    /// One reader of a map at a time: sessions that need it meanwhile
    /// wait for its result instead of each opening connections.
    loading: Mutex<HashMap<MapKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl TypeOidCache {
    pub(crate) fn get(&self, key: &MapKey) -> Option<Arc<TypeMap>> {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn load_lock(&self, key: &MapKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() > 10_000 {
            l.clear();
        }
        l.entry(key.clone()).or_default().clone()
    }

    /// Keeps `m` when `current()` — checked under the maps' lock, which
    /// [`Self::forget`] takes after the catalog generation was bumped.
    fn put(&self, key: MapKey, m: Arc<TypeMap>, current: impl FnOnce() -> bool) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if !current() {
            return;
        }
        if maps.len() > 10_000 {
            maps.clear();
        }
        maps.insert(key, m);
    }

    /// DDL through any node: the maps of the databases `which` selects are
    /// read again when next needed.
    pub fn forget(&self, which: &impl Fn(&str) -> bool) {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !which(&k.0));
    }
}

/// Calls `f` with the offset of each type OID (4 bytes) in a message
/// body: Parse (client), RowDescription and ParameterDescription
/// (backend). False, having called it for none, for any other message or
/// a malformed one.
pub(crate) fn for_each_oid(tag: u8, frontend: bool, body: &[u8], mut f: impl FnMut(usize)) -> bool {
    if frontend {
        return tag == fe::PARSE && parse_oids(body, f);
    }
    let mut b = body;
    let Ok(n) = wire::get_i16(&mut b) else {
        return false;
    };
    let n = n.max(0) as usize;
    match tag {
        be::PARAMETER_DESCRIPTION => {
            if b.len() < 4 * n {
                return false;
            }
            (0..n).for_each(|i| f(2 + 4 * i));
            true
        }
        be::ROW_DESCRIPTION => {
            // Checked whole first: all or nothing.
            let mut c = b;
            for _ in 0..n {
                // name, table OID (4), column number (2), type OID (4),
                // size (2), modifier (4), format (2)
                if wire::get_cstr(&mut c).is_err() || c.len() < 18 {
                    return false;
                }
                c = &c[18..];
            }
            for _ in 0..n {
                let _ = wire::get_cstr(&mut b);
                f(body.len() - b.len() + 6);
                b = &b[18..];
            }
            true
        }
        _ => false,
    }
}

fn parse_oids(body: &[u8], mut f: impl FnMut(usize)) -> bool {
    let mut b = body;
    if wire::get_cstr(&mut b).is_err() || wire::get_cstr(&mut b).is_err() {
        return false;
    }
    let Ok(n) = wire::get_i16(&mut b) else {
        return false;
    };
    let n = n.max(0) as usize;
    if b.len() < 4 * n {
        return false;
    }
    let start = body.len() - b.len();
    (0..n).for_each(|i| f(start + 4 * i));
    true
}

fn oid_at(body: &[u8], at: usize) -> u32 {
    body.get(at..at + 4)
        .map_or(0, |x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

/// The message body holds a user type OID (≥ 16384).
pub(crate) fn has_user_oids(tag: u8, frontend: bool, body: &[u8]) -> bool {
    let mut any = false;
    for_each_oid(tag, frontend, body, |o| {
        any |= oid_at(body, o) >= FIRST_USER_OID
    });
    any
}

/// The user type OIDs (≥ 16384) of a message body.
pub(crate) fn user_oids(tag: u8, frontend: bool, body: &[u8]) -> Vec<u32> {
    let mut v = Vec::new();
    for_each_oid(tag, frontend, body, |o| {
        let oid = oid_at(body, o);
        if oid >= FIRST_USER_OID {
            v.push(oid);
        }
    });
    v
}

/// Message `raw` (tag, length, body) with each user type OID replaced by
/// `f`'s; None when none changes.
pub(crate) fn rewrite(raw: &[u8], frontend: bool, f: impl Fn(u32) -> u32) -> Option<Bytes> {
    let (tag, body) = (*raw.first()?, raw.get(5..)?);
    let mut out: Option<BytesMut> = None;
    for_each_oid(tag, frontend, body, |o| {
        let old = oid_at(body, o);
        if old < FIRST_USER_OID {
            return;
        }
        let new = f(old);
        if new != old {
            let buf = out.get_or_insert_with(|| BytesMut::from(raw));
            buf[5 + o..5 + o + 4].copy_from_slice(&new.to_be_bytes());
        }
    });
    out.map(BytesMut::freeze)
}

/// Reads the rows of [`TYPES_SQL`] on a dedicated connection to `t`.
async fn read_types(t: &BackendTarget, timeout: Duration) -> Result<Vec<TypeRow>, String> {
    let mut c = BackendConn::connect_named(t, timeout, Some("hotrepart type oids"))
        .await
        .map_err(|e| e.to_string())?;
    let rows = tokio::time::timeout(
        timeout.max(Duration::from_secs(5)),
        c.hidden_query(TYPES_SQL),
    )
    .await
    .map_err(|_| "timed out".to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    c.terminate();
    Ok(rows?.into_iter().filter_map(type_row).collect())
}

/// A row of [`TYPES_SQL`] as text.
fn type_row(r: Vec<Option<String>>) -> Option<TypeRow> {
    let mut it = r.into_iter();
    let mut next = || it.next().flatten();
    let oid = next()?.parse().ok()?;
    let (nsp, name, typtype, category) = (next()?, next()?, next()?, next()?);
    let elem: u32 = next()?.parse().ok()?;
    let base: u32 = next()?.parse().ok()?;
    let kind = match (typtype.as_str(), category.as_str()) {
        ("c", _) => Kind::Composite,
        ("d", _) => Kind::Domain(base),
        (_, "A") if elem != 0 => Kind::Array(elem),
        _ => Kind::Other,
    };
    Some(TypeRow {
        oid,
        nsp,
        name,
        typtype,
        kind,
    })
}

/// Nesting depth of the values walked (arrays of records of arrays …).
const MAX_DEPTH: usize = 32;

fn be_u32(v: &[u8], at: usize) -> Option<u32> {
    let x = v.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

/// Rewrites in place the type OIDs that binary value `v` of type `oid`
/// names: an array's element type, a record's field types, and those of
/// the values inside them. OIDs are of the side the value comes from;
/// `kind` tells what a value of such an OID holds, `f` gives the other
/// side's OID. None: malformed (PostgreSQL or the driver will say so).
pub(crate) fn walk_value(
    v: &mut [u8],
    oid: u32,
    kind: &impl Fn(u32) -> Kind,
    f: &impl Fn(u32) -> u32,
    depth: usize,
) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    let set = |v: &mut [u8], at: usize, o: u32| {
        if o >= FIRST_USER_OID {
            v[at..at + 4].copy_from_slice(&f(o).to_be_bytes());
        }
    };
    match kind(oid) {
        Kind::Other => Some(()),
        Kind::Domain(b) => walk_value(v, b, kind, f, depth + 1),
        Kind::Array(_) => {
            let ndim = be_u32(v, 0)? as i32;
            let elem = be_u32(v, 8)?;
            set(v, 8, elem);
            if !(1..=6).contains(&ndim) || kind(elem) == Kind::Other {
                return Some(());
            }
            let mut count: usize = 1;
            for d in 0..ndim as usize {
                let n = be_u32(v, 12 + 8 * d)? as i32;
                count = count.checked_mul(usize::try_from(n).ok()?)?;
            }
            let mut pos = 12 + 8 * ndim as usize;
            for _ in 0..count {
                let len = be_u32(v, pos)? as i32;
                pos += 4;
                if len < 0 {
                    continue;
                }
                let end = pos.checked_add(len as usize)?;
                walk_value(v.get_mut(pos..end)?, elem, kind, f, depth + 1)?;
                pos = end;
            }
            Some(())
        }
        Kind::Composite => {
            let n = be_u32(v, 0)? as i32;
            let mut pos = 4;
            for _ in 0..n.max(0) {
                let field = be_u32(v, pos)?;
                set(v, pos, field);
                let len = be_u32(v, pos + 4)? as i32;
                pos += 8;
                if len < 0 {
                    continue;
                }
                let end = pos.checked_add(len as usize)?;
                walk_value(v.get_mut(pos..end)?, field, kind, f, depth + 1)?;
                pos = end;
            }
            Some(())
        }
    }
}

/// The binary columns of the rows a non-home shard sends whose values
/// name user types, and its map: turns those OIDs into the home shard's.
#[derive(Debug)]
pub(crate) struct RowFix {
    /// (column, local type)
    cols: Vec<(usize, u32)>,
    map: Arc<TypeMap>,
    shard: String,
}

impl RowFix {
    /// DataRow `raw` with the OIDs inside its values turned into the home
    /// shard's (as it is when malformed).
    pub(crate) fn apply(&self, raw: Bytes) -> Bytes {
        let mut buf = BytesMut::from(&raw[..]);
        let m = &self.map;
        let kind = |o: u32| m.kind(o);
        let f = |o: u32| m.home_of(o, &self.shard);
        let ok = (|| {
            let body = buf.get_mut(5..)?;
            let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
            let mut pos = 2;
            let mut next = 0;
            for col in 0..n {
                let len = be_u32(body, pos)? as i32;
                pos += 4;
                if len < 0 {
                    continue;
                }
                let end = pos.checked_add(len as usize)?;
                if let Some(&(c, oid)) = self.cols.get(next) {
                    if c == col {
                        next += 1;
                        walk_value(body.get_mut(pos..end)?, oid, &kind, &f, 0)?;
                    }
                }
                pos = end;
            }
            Some(())
        })();
        match ok {
            Some(()) => buf.freeze(),
            None => raw,
        }
    }
}

/// What a Describe of a statement told (ParameterDescription,
/// RowDescription, in home OIDs), by the statement's Parse, kept only
/// where a type may name user types inside its values (an array of a user
/// type, a record …): the parameter types its Parse left unspecified, and
/// the column types of rows a later Bind and Execute bring without a
/// RowDescription. Forgotten when the node's catalog generation moves
/// (DDL).
#[derive(Debug, Default)]
pub(crate) struct Described {
    generation: u64,
    by_parse: HashMap<Bytes, Told>,
    /// The parameter types of every statement described (user types or
    /// not), for the node's own statements taking the same parameters
    /// ([`Session::known_param_types`]); bounded and forgotten apart, so
    /// that they never push out the entries above.
    params: HashMap<Bytes, Arc<[u32]>>,
    params_generation: u64,
}

#[derive(Debug, Default, Clone)]
struct Told {
    params: Option<Arc<[u32]>>,
    cols: Option<Arc<[u32]>>,
}

impl Described {
    fn note(&mut self, generation: u64, parse: Bytes, f: impl FnOnce(&mut Told)) {
        if self.generation != generation || self.by_parse.len() >= 1000 {
            self.by_parse.clear();
            self.generation = generation;
        }
        f(self.by_parse.entry(parse).or_default());
    }

    fn note_params(&mut self, generation: u64, parse: Bytes, types: Arc<[u32]>) {
        if self.params_generation != generation || self.params.len() >= 1000 {
            self.params.clear();
            self.params_generation = generation;
        }
        self.params.insert(parse, types);
    }
}

/// Result formats of a Bind from its parameter formats on.
fn result_formats(rest: &[u8]) -> Option<Vec<i16>> {
    let mut b = rest;
    let nf = wire::get_i16(&mut b).ok()?.max(0) as usize;
    b = b.get(2 * nf..)?;
    let nv = wire::get_i16(&mut b).ok()?.max(0);
    for _ in 0..nv {
        let len = wire::get_i32(&mut b).ok()?;
        if len > 0 {
            b = b.get(len as usize..)?;
        }
    }
    let nr = wire::get_i16(&mut b).ok()?.max(0) as usize;
    (0..nr).map(|_| wire::get_i16(&mut b).ok()).collect()
}

/// A parameter or column type whose binary values may name user types.
fn may_hold_types(oid: u32) -> bool {
    oid >= FIRST_USER_OID || oid == RECORD || oid == RECORD_ARRAY
}

/// (type OID, format) of each column of a RowDescription body.
fn columns(body: &[u8]) -> Vec<(u32, i16)> {
    let mut v = Vec::new();
    for_each_oid(be::ROW_DESCRIPTION, false, body, |o| {
        let fmt = body
            .get(o + 10..o + 12)
            .map_or(0, |x| i16::from_be_bytes([x[0], x[1]]));
        v.push((oid_at(body, o), fmt));
    });
    v
}

/// A binary column of type `oid` may name types inside its values.
fn may_name_types(oid: u32, format: i16) -> bool {
    format == 1 && may_hold_types(oid)
}

/// Bind body part `params` (from the parameter formats on) with the OIDs
/// inside its binary values of statement parameter types `types` (home
/// OIDs) turned into the shard's; None when nothing changes.
fn local_bind_params(params: &[u8], types: &[u32], m: &TypeMap, shard: &str) -> Option<BytesMut> {
    let mut b = params;
    let nf = wire::get_i16(&mut b).ok()?.max(0) as usize;
    let mut formats = Vec::with_capacity(nf);
    for _ in 0..nf {
        formats.push(wire::get_i16(&mut b).ok()?);
    }
    let nv = wire::get_i16(&mut b).ok()?.max(0) as usize;
    let mut pos = params.len() - b.len();
    let mut out: Option<BytesMut> = None;
    let local = |o: u32| m.to_local.get(&o).copied().unwrap_or(o);
    let kind = |o: u32| m.kind(local(o));
    let f = |o: u32| m.local_of(o, shard);
    for i in 0..nv {
        let len = be_u32(params, pos)? as i32;
        pos += 4;
        if len < 0 {
            continue;
        }
        let end = pos.checked_add(len as usize)?;
        let format = match nf {
            0 => 0,
            1 => formats[0],
            _ => *formats.get(i)?,
        };
        let ty = types.get(i).copied().unwrap_or(0);
        if format == 1 && ty != 0 && m.names_types(local(ty)) {
            let buf = out.get_or_insert_with(|| BytesMut::from(params));
            walk_value(buf.get_mut(pos..end)?, ty, &kind, &f, 0)?;
        }
        pos = end;
    }
    out
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn type_map_key(&self, t: usize) -> Option<MapKey> {
        let home = self.node.routing.home_index();
        (t != home).then(|| {
            (
                self.database.clone(),
                self.node.routing.shard_name(home),
                self.node.routing.shard_name(t),
            )
        })
    }

    /// The map of shard `t` that knows `oids` (local OIDs of `t` when
    /// `local`, else home OIDs): the cached one, else read now (also when
    /// the cached one misses one of them and is older than
    /// [`RELOAD_AFTER`]). None for the home shard, or when it cannot be
    /// read (logged; the OIDs then pass unchanged).
    pub(crate) async fn type_map(
        &mut self,
        t: usize,
        oids: &[u32],
        local: bool,
    ) -> Option<Arc<TypeMap>> {
        let key = self.type_map_key(t)?;
        let fresh = |m: &TypeMap| {
            oids.iter()
                .all(|&o| o < FIRST_USER_OID || m.knows(o, local))
                || m.loaded.elapsed() < RELOAD_AFTER
        };
        let cached = self.node.type_oids.get(&key);
        if cached.as_deref().is_some_and(fresh) {
            return cached;
        }
        // An async lock (no thread blocks), held while this map is read.
        let lock = self.node.type_oids.load_lock(&key);
        let _one_reader = lock.lock().await;
        // Another session may have read it meanwhile.
        let cached = self.node.type_oids.get(&key);
        if cached.as_deref().is_some_and(fresh) {
            return cached;
        }
        // DDL through the node meanwhile (`Node::forget_catalog`): what was
        // read may be older than it, and is not kept.
        let generation = self.generation();
        let home = self.node.routing.home_index();
        let (hp, tp) = (self.pool(home), self.pool(t));
        let timeout = hp.connect_timeout();
        let (h, s) = tokio::join!(
            read_types(&hp.target, timeout),
            read_types(&tp.target, timeout)
        );
        let node = &self.node;
        let current = || {
            node.catalog_generation
                .load(std::sync::atomic::Ordering::SeqCst)
                == generation
        };
        match (h, s) {
            (Ok(h), Ok(s)) => {
                let m = Arc::new(TypeMap::build(&h, &s));
                node.type_oids.put(key, m.clone(), current);
                Some(m)
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(shard = %key.2, error = %e, "cannot read the user types of the home shard and of this shard: their OIDs pass unchanged");
                if cached.is_none() {
                    // Tried again in RELOAD_AFTER, not at every statement.
                    node.type_oids
                        .put(key, Arc::new(TypeMap::build(&[], &[])), current);
                }
                cached
            }
        }
    }

    /// A RowDescription or ParameterDescription of shard `t` with the
    /// home shard's OIDs of its user types; any other frame as it is.
    pub(crate) async fn canonical_frame(&mut self, t: usize, f: Frame) -> Frame {
        if !matches!(f.tag(), be::ROW_DESCRIPTION | be::PARAMETER_DESCRIPTION)
            || t == self.node.routing.home_index()
        {
            return f;
        }
        let oids = user_oids(f.tag(), false, f.body());
        if oids.is_empty() {
            return f;
        }
        let Some(m) = self.type_map(t, &oids, true).await else {
            return f;
        };
        let name = self.node.routing.shard_name(t);
        match rewrite(&f.raw, false, |o| m.home_of(o, &name)) {
            Some(raw) => Frame { raw },
            None => f,
        }
    }

    /// [`Self::canonical_frame`] on the single-shard relay: also notes,
    /// for the rows that follow a RowDescription of a non-home shard,
    /// which binary columns name user types inside their values
    /// ([`Session::row_fix`]).
    pub(crate) async fn relay_description(&mut self, t: usize, f: Frame) -> Frame {
        if f.tag() != be::ROW_DESCRIPTION {
            let f = self.canonical_frame(t, f).await;
            self.note_described(&f);
            return f;
        }
        self.row_fix = None;
        if t == self.node.routing.home_index() {
            self.note_described(&f);
            return f;
        }
        self.row_fix = self.row_fix_of(t, &f).await;
        let f = self.canonical_frame(t, f).await;
        self.note_described(&f);
        f
    }

    /// For the rows that follow RowDescription `f` of shard `t`: what
    /// turns the OIDs inside their binary values into the home shard's,
    /// if a binary column's type may hold some.
    pub(crate) async fn row_fix_of(&mut self, t: usize, f: &Frame) -> Option<RowFix> {
        if f.tag() != be::ROW_DESCRIPTION || t == self.node.routing.home_index() {
            return None;
        }
        let cols = columns(f.body());
        if !cols.iter().any(|&(o, fmt)| may_name_types(o, fmt)) {
            return None;
        }
        let oids: Vec<u32> = cols
            .iter()
            .map(|c| c.0)
            .filter(|&o| o >= FIRST_USER_OID)
            .collect();
        let map = self.type_map(t, &oids, true).await?;
        let fix: Vec<(usize, u32)> = cols
            .iter()
            .enumerate()
            .filter(|(_, &(o, fmt))| fmt == 1 && map.names_types(o))
            .map(|(i, &(o, _))| (i, o))
            .collect();
        (!fix.is_empty()).then(|| RowFix {
            cols: fix,
            map,
            shard: self.node.routing.shard_name(t),
        })
    }

    /// A ParameterDescription or RowDescription (home OIDs) answering a
    /// Describe of a statement: its types noted ([`Described`]) — the
    /// parameters' always (a merged read prepares its own statement on the
    /// shards with them, [`Session::known_param_types`]), the columns'
    /// when one may name user types inside its values.
    fn note_described(&mut self, f: &Frame) {
        let Some(super::conn::Owed::Describe(Some(parse))) = self.be.owed.front() else {
            return;
        };
        let mut types = Vec::new();
        for_each_oid(f.tag(), false, f.body(), |o| {
            types.push(oid_at(f.body(), o))
        });
        let params = f.tag() == be::PARAMETER_DESCRIPTION;
        let (parse, generation) = (parse.clone(), self.generation());
        let types: Arc<[u32]> = Arc::from(types);
        if params {
            self.described
                .note_params(generation, parse.clone(), types.clone());
        }
        if !types.iter().any(|&o| may_hold_types(o)) {
            return;
        }
        self.described.note(generation, parse, |t| {
            if params {
                t.params = Some(types);
            } else {
                t.cols = Some(types);
            }
        });
    }

    /// The Parse of statement `stmt` ("" unnamed) and what a Describe of
    /// it told, if noted.
    fn told(&self, stmt: &str) -> Option<(&[u8], Option<Told>)> {
        let key: &Bytes = if stmt.is_empty() {
            &self.unnamed.as_ref()?.raw
        } else {
            &self.stmts.get(stmt)?.parse
        };
        let d = &self.described;
        let told = if d.by_parse.is_empty() || d.generation != self.generation() {
            None
        } else {
            d.by_parse.get(key).cloned()
        };
        let parse = if stmt.is_empty() {
            key.get(5..)?
        } else {
            &key[..]
        };
        Some((parse, told))
    }

    /// For a Bind of statement `stmt` into the unnamed portal on shard
    /// `t` (Bind body `rest` from the parameter formats on): the rows its
    /// Execute brings without a RowDescription (a driver that described
    /// the statement before: tokio-postgres, asyncpg …), where binary
    /// columns name user types inside their values. Set when its
    /// BindComplete arrives (`replies.rs`).
    pub(crate) fn bind_row_fix(
        &self,
        t: usize,
        portal: &str,
        stmt: &str,
        rest: &[u8],
    ) -> Option<Box<RowFix>> {
        if !portal.is_empty() || self.described.by_parse.is_empty() {
            return None;
        }
        if t == self.node.routing.home_index() {
            return None;
        }
        let cols = self.told(stmt)?.1?.cols?;
        let (map, shard) = self.send_map(t)?;
        let formats = result_formats(rest)?;
        let fix: Vec<(usize, u32)> = cols
            .iter()
            .enumerate()
            .filter_map(|(i, &canon)| {
                let fmt = match formats.len() {
                    0 => 0,
                    1 => formats[0],
                    _ => formats.get(i).copied().unwrap_or(0),
                };
                let local = map.to_local.get(&canon).copied().unwrap_or(canon);
                (fmt == 1 && map.names_types(local)).then_some((i, local))
            })
            .collect();
        (!fix.is_empty()).then(|| {
            Box::new(RowFix {
                cols: fix,
                map,
                shard,
            })
        })
    }

    /// The part of a Bind of statement `stmt` ("" unnamed) to shard `t`
    /// from its parameter formats on, with the OIDs inside its binary
    /// values turned into the shard's. None: as it is (the home shard, or
    /// no parameter type whose values name types).
    pub(crate) fn local_bind_rest(&self, t: usize, stmt: &str, rest: &[u8]) -> Option<BytesMut> {
        if t == self.node.routing.home_index() {
            return None;
        }
        let (parse, told) = self.told(stmt)?;
        let described = told.and_then(|t| t.params);
        let mut any = described.is_some();
        for_each_oid(fe::PARSE, true, parse, |o| {
            any |= may_hold_types(oid_at(parse, o))
        });
        if !any {
            return None;
        }
        let mut types = self.param_types(stmt);
        if let Some(d) = described {
            if types.len() < d.len() {
                types.resize(d.len(), 0);
            }
            for (t, d) in types.iter_mut().zip(d.iter()) {
                if *t == 0 {
                    *t = *d;
                }
            }
        }
        self.local_bind(t, &types, rest)
    }

    /// The parameter types of statement `stmt` ("" unnamed) for a statement
    /// of the node's own that takes the same parameters: `types` (its
    /// Parse's), those left unspecified (0, or missing up to `n`) filled
    /// from what a Describe of it told. Drivers such as asyncpg give no
    /// types in Parse and bind what ParameterDescription said (an int4 for
    /// `LIMIT $1::INTEGER`); a rewritten statement left to infer them
    /// would take other types, or none for a parameter it no longer uses.
    pub(crate) fn known_param_types(&self, stmt: &str, mut types: Vec<u32>, n: usize) -> Vec<u32> {
        if types.len() < n {
            types.resize(n, 0);
        }
        if types.contains(&0) {
            let key: Option<&Bytes> = if stmt.is_empty() {
                self.unnamed.as_ref().map(|u| &u.raw)
            } else {
                self.stmts.get(stmt).map(|s| &s.parse)
            };
            let d = &self.described;
            let told = key
                .filter(|_| d.params_generation == self.generation())
                .and_then(|k| d.params.get(k));
            if let Some(d) = told {
                for (t, d) in types.iter_mut().zip(d.iter()) {
                    if *t == 0 {
                        *t = *d;
                    }
                }
            }
        }
        types
    }

    /// The part of a Bind to shard `t` from its parameter formats on, for
    /// a statement of parameter types `types` (home OIDs; 0 unknown): the
    /// OIDs inside its binary values turned into the shard's. None: as it
    /// is.
    pub(crate) fn local_bind(&self, t: usize, types: &[u32], params: &[u8]) -> Option<BytesMut> {
        if !types.iter().any(|&o| may_hold_types(o)) {
            return None;
        }
        let (m, name) = self.send_map(t)?;
        local_bind_params(params, types, &m, &name)
    }

    /// Before a batch goes to `shards`: the maps its Parse messages need
    /// (the batch's own, and the re-Parse of the statements it names),
    /// read now so that sending stays synchronous.
    pub(crate) async fn prepare_type_oids(&mut self, frames: &[Frame], shards: &[usize]) {
        let home = self.node.routing.home_index();
        if shards.iter().all(|&t| t == home) {
            return;
        }
        let mut oids = Vec::new();
        for f in frames {
            let mut b = f.body();
            match f.tag() {
                fe::PARSE => {
                    let body = f.body();
                    for_each_oid(fe::PARSE, true, body, |o| {
                        let o = oid_at(body, o);
                        if may_hold_types(o) {
                            oids.push(o);
                        }
                    });
                }
                fe::BIND | fe::DESCRIBE => {
                    if f.tag() == fe::DESCRIBE {
                        if b.first() != Some(&wire::STATEMENT) {
                            continue;
                        }
                        b = &b[1..];
                    } else if wire::get_cstr(&mut b).is_err() {
                        continue;
                    }
                    let Ok(stmt) = wire::get_cstr(&mut b) else {
                        continue;
                    };
                    if let Some((parse, told)) = self.told(stmt) {
                        for_each_oid(fe::PARSE, true, parse, |o| {
                            let o = oid_at(parse, o);
                            if may_hold_types(o) {
                                oids.push(o);
                            }
                        });
                        if let Some(t) = told {
                            for types in [t.params, t.cols].into_iter().flatten() {
                                oids.extend(types.iter().copied().filter(|&o| may_hold_types(o)));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if oids.is_empty() {
            return;
        }
        for &t in shards {
            if t != home {
                self.type_map(t, &oids, false).await;
            }
        }
    }

    /// The cached map of shard `t`, when the node sends it a Parse with
    /// user types (read by [`Self::prepare_type_oids`]).
    fn send_map(&self, t: usize) -> Option<(Arc<TypeMap>, String)> {
        let key = self.type_map_key(t)?;
        let m = self.node.type_oids.get(&key)?;
        Some((m, key.2))
    }

    /// A Parse message (tag, length, body) for shard `t`: its parameter
    /// types turned into the shard's OIDs.
    pub(crate) fn local_parse_raw(&self, t: usize, raw: &Bytes) -> Bytes {
        let Some(body) = raw.get(5..) else {
            return raw.clone();
        };
        if !has_user_oids(fe::PARSE, true, body) {
            return raw.clone();
        }
        let Some((m, name)) = self.send_map(t) else {
            return raw.clone();
        };
        rewrite(raw, true, |o| m.local_of(o, &name)).unwrap_or_else(|| raw.clone())
    }

    /// Parameter types for a Parse to shard `t`, in the shard's OIDs.
    /// Whether home OID `oid` is an enum type, as a type map of one of
    /// `shards` read it (a merge over several shards has read one for a
    /// RowDescription naming user types).
    pub(crate) fn home_enum(&self, shards: &[usize], oid: u32) -> bool {
        oid >= FIRST_USER_OID
            && shards.iter().any(|&t| {
                self.send_map(t)
                    .is_some_and(|(m, _)| m.home_enums.contains(&oid))
            })
    }

    pub(crate) fn local_types(&self, t: usize, types: &[u32]) -> Vec<u32> {
        if types.iter().all(|&o| o < FIRST_USER_OID) {
            return types.to_vec();
        }
        match self.send_map(t) {
            Some((m, name)) => types.iter().map(|&o| m.local_of(o, &name)).collect(),
            None => types.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn row(oid: u32, name: &str, typtype: &str) -> TypeRow {
        let kind = match typtype {
            "c" => Kind::Composite,
            _ => Kind::Other,
        };
        TypeRow {
            oid,
            nsp: "public".into(),
            name: name.into(),
            typtype: typtype.into(),
            kind,
        }
    }

    fn array(oid: u32, name: &str, elem: u32) -> TypeRow {
        TypeRow {
            kind: Kind::Array(elem),
            ..row(oid, name, "b")
        }
    }

    /// Home: mood 16400 (array 16401), pair 16402 (array 16403); the
    /// shard: 16410, 16411, 16412, 16413.
    fn shifted() -> TypeMap {
        let home = [
            row(16400, "mood", "e"),
            array(16401, "_mood", 16400),
            row(16402, "pair", "c"),
            array(16403, "_pair", 16402),
        ];
        let shard = [
            row(16410, "mood", "e"),
            array(16411, "_mood", 16410),
            row(16412, "pair", "c"),
            array(16413, "_pair", 16412),
        ];
        TypeMap::build(&home, &shard)
    }

    /// A binary array of `elem` holding `items` (None: NULL).
    fn bin_array(elem: u32, items: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&1i32.to_be_bytes());
        v.extend_from_slice(&(items.iter().any(Option::is_none) as i32).to_be_bytes());
        v.extend_from_slice(&elem.to_be_bytes());
        v.extend_from_slice(&(items.len() as i32).to_be_bytes());
        v.extend_from_slice(&1i32.to_be_bytes());
        for it in items {
            match it {
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    /// A binary record of (type, value) fields.
    fn bin_record(fields: &[(u32, &[u8])]) -> Vec<u8> {
        let mut v = (fields.len() as i32).to_be_bytes().to_vec();
        for (oid, b) in fields {
            v.extend_from_slice(&oid.to_be_bytes());
            v.extend_from_slice(&(b.len() as i32).to_be_bytes());
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn walks_arrays_and_records_inside_values() {
        let m = shifted();
        let kind = |o: u32| m.kind(o);
        let f = |o: u32| m.home_of(o, "s");
        // An array of the enum: its element type.
        let mut v = bin_array(16410, &[Some(b"sad"), None, Some(b"ok")]);
        let want = bin_array(16400, &[Some(b"sad"), None, Some(b"ok")]);
        assert!(m.names_types(16411));
        walk_value(&mut v, 16411, &kind, &f, 0).expect("well formed");
        assert_eq!(v, want);
        // An array of records of (int4, the enum): every field too.
        let rec = |e: u32| bin_record(&[(23, &7i32.to_be_bytes()), (e, b"ok")]);
        let mut v = bin_array(16412, &[Some(&rec(16410)), Some(&rec(16410))]);
        walk_value(&mut v, 16413, &kind, &f, 0).expect("well formed");
        assert_eq!(v, bin_array(16402, &[Some(&rec(16400)), Some(&rec(16400))]));
        // An anonymous record holding an array of the enum.
        let inner = bin_array(16410, &[Some(b"happy")]);
        let mut v = bin_record(&[(16411, &inner)]);
        walk_value(&mut v, RECORD, &kind, &f, 0).expect("well formed");
        assert_eq!(
            v,
            bin_record(&[(16401, &bin_array(16400, &[Some(b"happy")]))])
        );
        // Built-in arrays are left alone; malformed values are refused.
        assert!(!m.names_types(1007));
        let mut short = bin_array(16412, &[Some(&rec(16410))]);
        short.truncate(short.len() - 1);
        assert!(walk_value(&mut short, 16413, &kind, &f, 0).is_none());
        for n in 0..12 {
            let mut v = vec![0xffu8; n];
            let _ = walk_value(&mut v, 16413, &kind, &f, 0);
            let _ = walk_value(&mut v, RECORD, &kind, &f, 0);
        }
    }

    #[test]
    fn rows_and_bind_parameters_are_rewritten_where_they_name_types() {
        let m = Arc::new(shifted());
        // A DataRow of (int4, _mood), the second binary.
        let arr = bin_array(16410, &[Some(b"sad")]);
        let mut raw = BytesMut::new();
        wire::frame(&mut raw, be::DATA_ROW, |o| {
            o.put_i16(2);
            o.put_i32(4);
            o.put_i32(9);
            o.put_i32(arr.len() as i32);
            o.put_slice(&arr);
        });
        let fix = RowFix {
            cols: vec![(1, 16411)],
            map: m.clone(),
            shard: "s".into(),
        };
        let out = fix.apply(raw.clone().freeze());
        let want = bin_array(16400, &[Some(b"sad")]);
        assert_eq!(&out[out.len() - want.len()..], &want[..]);
        assert_eq!(
            &out[..out.len() - want.len()],
            &raw[..raw.len() - arr.len()]
        );
        // A truncated DataRow goes on as it came.
        let cut = raw.clone().freeze().slice(..raw.len() - 2);
        assert_eq!(fix.apply(cut.clone()), cut);

        // Bind parameters (formats: binary for all), types in home OIDs.
        let home_arr = bin_array(16400, &[Some(b"ok")]);
        let mut params = BytesMut::new();
        params.put_i16(1);
        params.put_i16(1);
        params.put_i16(2);
        params.put_i32(8);
        params.put_i64(5);
        params.put_i32(home_arr.len() as i32);
        params.put_slice(&home_arr);
        params.put_i16(0);
        let out = local_bind_params(&params, &[20, 16401], &m, "s").expect("changed");
        let local = bin_array(16410, &[Some(b"ok")]);
        assert_eq!(&out[out.len() - 2 - local.len()..out.len() - 2], &local[..]);
        // Text parameters, or types that name none: nothing to do.
        assert!(local_bind_params(&params, &[20, 25], &m, "s").is_none());
        let mut text = params.clone();
        text[2..4].copy_from_slice(&0i16.to_be_bytes());
        assert!(local_bind_params(&text, &[20, 16401], &m, "s").is_none());
    }

    #[test]
    fn pairs_by_schema_name_and_kind() {
        let home = [
            row(16400, "mood", "e"),
            row(16401, "_mood", "b"),
            row(16500, "x", "e"),
        ];
        let shard = [
            row(16410, "mood", "e"),
            row(16411, "_mood", "b"),
            row(16420, "x", "c"),
            row(16430, "y", "e"),
        ];
        let m = TypeMap::build(&home, &shard);
        assert_eq!(m.home_of(16410, "s"), 16400);
        assert_eq!(m.home_of(16411, "s"), 16401);
        assert_eq!(m.local_of(16400, "s"), 16410);
        // Another kind under the same name, or a type of one side only:
        // unchanged.
        assert_eq!(m.home_of(16420, "s"), 16420);
        assert_eq!(m.home_of(16430, "s"), 16430);
        assert_eq!(m.local_of(16500, "s"), 16500);
        assert!(m.knows(16430, true) && m.knows(16500, false));
        assert!(!m.knows(16999, true));
        assert_eq!(m.home_of(25, "s"), 25);
    }

    #[test]
    fn rewrites_parse_row_and_parameter_descriptions() {
        let f = |o: u32| if o == 16410 { 16400 } else { o };
        let mut parse = BytesMut::new();
        wire::frame(&mut parse, fe::PARSE, |o| {
            wire::put_cstr(o, "s");
            wire::put_cstr(o, "SELECT $1, $2");
            o.put_i16(2);
            o.put_u32(20);
            o.put_u32(16410);
        });
        assert_eq!(user_oids(fe::PARSE, true, &parse[5..]), vec![16410]);
        let out = rewrite(&parse, true, f).expect("changed");
        assert_eq!(&out[out.len() - 8..], &[0, 0, 0, 20, 0, 0, 0x40, 0x10]);
        assert_eq!(out.len(), parse.len());

        let mut rd = BytesMut::new();
        wire::frame(&mut rd, be::ROW_DESCRIPTION, |o| {
            o.put_i16(2);
            for (name, oid) in [("a", 23u32), ("m", 16410)] {
                wire::put_cstr(o, name);
                o.put_u32(1234);
                o.put_i16(1);
                o.put_u32(oid);
                o.put_i16(4);
                o.put_i32(-1);
                o.put_i16(1);
            }
        });
        let out = rewrite(&rd, false, f).expect("changed");
        assert_eq!(
            user_oids(be::ROW_DESCRIPTION, false, &out[5..]),
            vec![16400]
        );

        let mut pd = BytesMut::new();
        wire::frame(&mut pd, be::PARAMETER_DESCRIPTION, |o| {
            o.put_i16(1);
            o.put_u32(16410);
        });
        let out = rewrite(&pd, false, f).expect("changed");
        assert_eq!(
            user_oids(be::PARAMETER_DESCRIPTION, false, &out[5..]),
            vec![16400]
        );
        // Nothing changes: no copy.
        assert!(rewrite(&pd, false, |o| o).is_none());
        let mut builtin = BytesMut::new();
        wire::frame(&mut builtin, be::PARAMETER_DESCRIPTION, |o| {
            o.put_i16(1);
            o.put_u32(25);
        });
        assert!(!has_user_oids(
            be::PARAMETER_DESCRIPTION,
            false,
            &builtin[5..]
        ));
        assert!(rewrite(&builtin, false, |_| 16400).is_none());
    }

    #[test]
    fn malformed_messages_are_left_alone() {
        for body in [&b""[..], &[0, 5][..], &[0, 1, b'a'][..], &[0xff, 0xff][..]] {
            for tag in [be::ROW_DESCRIPTION, be::PARAMETER_DESCRIPTION] {
                let mut raw = BytesMut::new();
                wire::frame(&mut raw, tag, |o| o.put_slice(body));
                assert!(rewrite(&raw, false, |o| o + 1).is_none());
            }
        }
        assert!(rewrite(&[], false, |o| o).is_none());
    }
}
