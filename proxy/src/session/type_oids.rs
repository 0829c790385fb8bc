//! User type OIDs the same to a client whichever shard answers (issue 14).
//!
//! PostgreSQL gives each user type (enum, composite, domain, range, a
//! table's row type, their array types …) the next free OID of its server,
//! so one type has a different OID on each shard; drivers cache a type's
//! OID from one read (catalog reads go to the home shard) and send it
//! back, or read it in a RowDescription from another shard and fail to
//! decode. PostgreSQL cannot create a type with a chosen OID, so the node
//! translates: the *canonical* OID of a user type is the home shard's; for
//! every other shard a [`TypeMap`] pairs its local OIDs with the home
//! shard's, matched by (schema, name, kind) in `pg_type`.
//!
//! - Client → shard: the parameter type OIDs of each Parse sent to a
//!   non-home shard (the client's own, the node's re-Parse of a named or
//!   unnamed statement, a shard's own text of a multi-shard statement, the
//!   merge's Parse) are turned into the shard's (`local_parse_raw`,
//!   `local_types`).
//! - Shard → client: the type OIDs of each RowDescription and
//!   ParameterDescription from a non-home shard are turned into the home
//!   shard's ([`Session::canonical_frame`]) on the single-shard relay
//!   (`replies.rs`), in a concatenated and in a merged read (whose shards'
//!   row descriptions are compared after translation).
//!
//! Only OIDs ≥ 16384 (`FirstNormalObjectId`) are looked at: built-in types
//! are the same everywhere, so the hot path pays one compare per column or
//! parameter and no lookup. A map is built only when such an OID is seen
//! for or from a non-home shard: read on dedicated connections to the home
//! shard and to the shard (never a pooled backend, so no session waits on
//! another and nothing is read mid-pipeline), cached per (database, home,
//! shard) in the node ([`TypeOidCache`]), forgotten on DDL through the
//! node (`Node::forget_catalog`: CREATE/DROP/ALTER TYPE, DOMAIN, TABLE,
//! EXTENSION … all go there), and read again when an OID is missing from
//! it (at most once per [`RELOAD_AFTER`], so a type that exists on one
//! side only costs no query per statement).
//!
//! A type the home shard lacks, or holds under the same name as another
//! kind, keeps its local OID (logged once per map): the node never makes
//! an OID up. Left as they are (documented in the README): OIDs inside
//! binary values (an array's element OID, a record's field OIDs) in
//! DataRow and Bind; a type created in a transaction not yet committed
//! (the dedicated connections cannot see it) until it commits.

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
pub(crate) const TYPES_SQL: &str = "SELECT t.oid::text, n.nspname::text, t.typname::text, t.typtype::text \
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
    loaded: Instant,
    /// OIDs already logged as passed through unchanged.
    logged: Mutex<HashSet<(bool, u32)>>,
}

/// A catalog row of [`TYPES_SQL`]: (oid, schema, name, kind).
type TypeRow = (u32, String, String, String);

impl TypeMap {
    /// Pairs the rows of [`TYPES_SQL`] read on the home shard and on the
    /// shard by (schema, name, kind).
    pub(crate) fn build(home: &[TypeRow], shard: &[TypeRow]) -> TypeMap {
        let by_name: HashMap<(&str, &str), (u32, &str)> = home
            .iter()
            .map(|(oid, nsp, name, kind)| ((nsp.as_str(), name.as_str()), (*oid, kind.as_str())))
            .collect();
        let mut m = TypeMap {
            to_home: HashMap::new(),
            to_local: HashMap::new(),
            only_here: HashSet::new(),
            only_home: HashSet::new(),
            loaded: Instant::now(),
            logged: Mutex::new(HashSet::new()),
        };
        for (oid, nsp, name, kind) in shard {
            match by_name.get(&(nsp.as_str(), name.as_str())) {
                Some((h, k)) if *k == kind.as_str() => {
                    m.to_home.insert(*oid, *h);
                    m.to_local.insert(*h, *oid);
                }
                _ => {
                    m.only_here.insert(*oid);
                }
            }
        }
        for (oid, ..) in home {
            if !m.to_local.contains_key(oid) {
                m.only_home.insert(*oid);
            }
        }
        m
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
}

impl TypeOidCache {
    pub(crate) fn get(&self, key: &MapKey) -> Option<Arc<TypeMap>> {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn put(&self, key: MapKey, m: Arc<TypeMap>) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if maps.len() > 10_000 {
            maps.clear();
        }
        maps.insert(key, m);
    }

    /// DDL through the node: the maps of `database` are read again when
    /// next needed.
    pub fn forget(&self, database: &str) {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| k.0 != database);
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
    for_each_oid(tag, frontend, body, |o| any |= oid_at(body, o) >= FIRST_USER_OID);
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
    let rows = tokio::time::timeout(timeout.max(Duration::from_secs(5)), c.hidden_query(TYPES_SQL))
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    c.terminate();
    Ok(rows?
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let oid = it.next()??.parse().ok()?;
            Some((oid, it.next()??, it.next()??, it.next()??))
        })
        .collect())
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
        let cached = self.node.type_oids.get(&key);
        if let Some(m) = &cached {
            if oids.iter().all(|&o| m.knows(o, local)) || m.loaded.elapsed() < RELOAD_AFTER {
                return cached;
            }
        }
        let home = self.node.routing.home_index();
        let (hp, tp) = (self.pool(home), self.pool(t));
        let timeout = hp.connect_timeout();
        let (h, s) = tokio::join!(
            read_types(&hp.target, timeout),
            read_types(&tp.target, timeout)
        );
        match (h, s) {
            (Ok(h), Ok(s)) => {
                let m = Arc::new(TypeMap::build(&h, &s));
                self.node.type_oids.put(key, m.clone());
                Some(m)
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(shard = %key.2, error = %e, "cannot read the user types of the home shard and of this shard: their OIDs pass unchanged");
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
                fe::PARSE => oids.extend(user_oids(fe::PARSE, true, f.body())),
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
                    if stmt.is_empty() {
                        if let Some(u) = &self.unnamed {
                            oids.extend(user_oids(fe::PARSE, true, u.raw.get(5..).unwrap_or(&[])));
                        }
                    } else if let Some(s) = self.stmts.get(stmt) {
                        oids.extend(user_oids(fe::PARSE, true, &s.parse));
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

    fn row(oid: u32, name: &str, kind: &str) -> TypeRow {
        (oid, "public".into(), name.into(), kind.into())
    }

    #[test]
    fn pairs_by_schema_name_and_kind() {
        let home = [row(16400, "mood", "e"), row(16401, "_mood", "b"), row(16500, "x", "e")];
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
        assert_eq!(user_oids(be::ROW_DESCRIPTION, false, &out[5..]), vec![16400]);

        let mut pd = BytesMut::new();
        wire::frame(&mut pd, be::PARAMETER_DESCRIPTION, |o| {
            o.put_i16(1);
            o.put_u32(16410);
        });
        let out = rewrite(&pd, false, f).expect("changed");
        assert_eq!(user_oids(be::PARAMETER_DESCRIPTION, false, &out[5..]), vec![16400]);
        // Nothing changes: no copy.
        assert!(rewrite(&pd, false, |o| o).is_none());
        let mut builtin = BytesMut::new();
        wire::frame(&mut builtin, be::PARAMETER_DESCRIPTION, |o| {
            o.put_i16(1);
            o.put_u32(25);
        });
        assert!(!has_user_oids(be::PARAMETER_DESCRIPTION, false, &builtin[5..]));
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
