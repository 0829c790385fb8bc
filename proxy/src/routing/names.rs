//! The session's namespace for routing (issue 12, D6): its effective
//! `search_path` and the relations in it that matter, read from the home
//! shard's catalog on a backend that carries the client's settings, so
//! that `current_schemas(true)` is exactly the path PostgreSQL will use
//! for the statement (`$user` expanded for the backend's role, `pg_temp`
//! and `pg_catalog` where PostgreSQL puts them, missing schemas dropped).
//!
//! One query lists: the path; every relation in it named like a declared
//! table; and every relation that reaches a declared table — a view over
//! it (through other views too), a partition or inheritance child or
//! parent of it, transitively (an over-approximation: a sibling partition
//! of a declared one is refused too). The node caches the result per
//! (database, user, `search_path` setting) and the set of declared tables,
//! and forgets it on DDL through any node of the cluster
//! (`Node::schema_changed`, `Node::catch_up_schema`).
//! A view or partition created directly on the shards is not seen until
//! then. Temporary schemas (`pg_temp_N`) are left out: what one backend
//! holds there belongs to the session using it, which adds its own
//! temporary relations to its namespace (`session/temp.rs`), and must not
//! reach the namespace other sessions share.

use crate::sql::{quote_ident, quote_literal};
use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_router::route::Namespace;
use std::hash::{Hash, Hasher};

/// The declared tables (sharded and reference) by catalog name.
fn declared(snap: &RoutingSnapshot) -> Vec<String> {
    let mut v: Vec<String> = snap.sharded_tables().map(|t| t.name.clone()).collect();
    v.extend(snap.reference_tables().map(str::to_string));
    v.sort();
    v
}

/// Identifies the set of declared tables (0: none).
pub fn declared_fingerprint(snap: &RoutingSnapshot) -> u64 {
    let d = declared(snap);
    if d.is_empty() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    d.hash(&mut h);
    h.finish() | 1
}

/// `(schema, name)` of a catalog name (`t` is `public.t`).
fn split(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// The common part of the probes: `declared` (the declared tables' oids
/// and catalog names) and `reach` (every relation that reaches one, with
/// the declared table it reaches), as a `WITH RECURSIVE` prefix.
fn reach_cte(names: &[String]) -> String {
    let regs: Vec<String> = names
        .iter()
        .map(|n| {
            let (s, t) = split(n);
            quote_literal(&format!("{}.{}", quote_ident(s), quote_ident(t)))
        })
        .collect();
    let cats: Vec<String> = names.iter().map(|n| quote_literal(n)).collect();
    format!(
        "WITH RECURSIVE declared AS (\
           SELECT c.oid, x.name FROM ROWS FROM (pg_catalog.unnest(ARRAY[{regs}]::text[]), pg_catalog.unnest(ARRAY[{cats}]::text[])) AS x(reg, name) \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(x.reg)::pg_catalog.oid), \
         edges(src, dst) AS (\
           SELECT d.refobjid, r.ev_class FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
           WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid AND r.ev_class OPERATOR(pg_catalog.<>) d.refobjid \
           UNION ALL SELECT i.inhparent, i.inhrelid FROM pg_catalog.pg_inherits i \
           UNION ALL SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i), \
         reach(oid, via) AS (\
           SELECT oid, name FROM declared \
           UNION SELECT e.dst, r.via FROM reach r JOIN edges e ON e.src = r.oid)",
        regs = regs.join(","),
        cats = cats.join(","),
    )
}

/// The query that reads the namespace (rows: kind, schema, name, extra).
pub fn probe_sql(snap: &RoutingSnapshot) -> String {
    let names = declared(snap);
    let bases: Vec<String> = names.iter().map(|n| quote_literal(split(n).1)).collect();
    format!(
        "{cte}, \
         path AS (SELECT s.nspname, s.ord FROM pg_catalog.unnest(pg_catalog.current_schemas(true)) WITH ORDINALITY AS s(nspname, ord) \
           WHERE s.nspname::text NOT LIKE 'pg\\_temp\\_%') \
         SELECT 'path', p.nspname::text, p.ord::text, NULL::text FROM path p \
         UNION ALL SELECT 'reach', ns.nspname::text, c.relname::text, pg_catalog.min(r.via) FROM reach r \
           JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace \
           WHERE r.oid NOT IN (SELECT oid FROM declared) AND c.relpersistence <> 't' GROUP BY ns.nspname, c.relname \
         UNION ALL SELECT 'rel', ns.nspname::text, c.relname::text, NULL FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace \
           WHERE ns.nspname IN (SELECT nspname FROM path) \
           AND (c.relname = ANY(ARRAY[{bases}]::text[]) OR c.oid IN (SELECT oid FROM reach))",
        cte = reach_cte(&names),
        bases = bases.join(","),
    )
}

/// The query that reads what the session's backend holds in its own
/// temporary schema (`pg_my_temp_schema()`, none before its first
/// temporary object): a row per relation (name, and the declared table it
/// reaches if any: a temporary view over a sharded table …), and a row of
/// NULLs when it holds functions or types of their own too.
pub fn temp_probe_sql(snap: &RoutingSnapshot) -> String {
    format!(
        "{cte} \
         SELECT c.relname::text, (SELECT pg_catalog.min(r.via) FROM reach r WHERE r.oid = c.oid) FROM pg_catalog.pg_class c \
           WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() \
         UNION ALL SELECT NULL, NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = pg_catalog.pg_my_temp_schema()) \
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace = pg_catalog.pg_my_temp_schema() AND t.typrelid OPERATOR(pg_catalog.=) 0::pg_catalog.oid \
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.oid = t.typelem AND e.typrelid OPERATOR(pg_catalog.<>) 0::pg_catalog.oid))",
        cte = reach_cte(&declared(snap)),
    )
}

/// What a backend holds in its temporary schema ([`temp_probe_sql`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TempHeld {
    /// Relations by name.
    pub names: std::collections::BTreeSet<String>,
    /// Those that reach a declared table, with its catalog name.
    pub reaching: std::collections::BTreeMap<String, String>,
    /// Anything at all (functions and types included).
    pub any: bool,
}

/// [`TempHeld`] from the rows of [`temp_probe_sql`].
pub fn parse_temp(rows: Vec<Vec<Option<String>>>) -> TempHeld {
    let mut held = TempHeld::default();
    for r in rows {
        held.any = true;
        let mut r = r.into_iter();
        if let (Some(Some(name)), via) = (r.next(), r.next().flatten()) {
            if let Some(via) = via {
                held.reaching.insert(name.clone(), via);
            }
            held.names.insert(name);
        }
    }
    held
}

/// The namespace from the probe's rows.
pub fn parse(rows: Vec<Vec<Option<String>>>) -> Namespace {
    let mut ns = Namespace::default();
    let mut path: Vec<(u64, String)> = Vec::new();
    for r in rows {
        let col = |i: usize| r.get(i).cloned().flatten();
        match (col(0).as_deref(), col(1), col(2), col(3)) {
            (Some("path"), Some(s), Some(ord), _) => {
                path.push((ord.parse().unwrap_or(u64::MAX), s))
            }
            (Some("rel"), Some(s), Some(t), _) => {
                ns.relations.insert((s, t));
            }
            (Some("reach"), Some(s), Some(t), Some(via)) => {
                ns.reaching.insert((s, t), via);
            }
            _ => {}
        }
    }
    path.sort();
    ns.schemas = path.into_iter().map(|(_, s)| s).collect();
    ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_probe() {
        let row = |v: [&str; 4]| {
            v.iter()
                .map(|s| (!s.is_empty()).then(|| s.to_string()))
                .collect()
        };
        let ns = parse(vec![
            row(["path", "public", "2", ""]),
            row(["path", "pg_catalog", "1", ""]),
            row(["rel", "public", "users", ""]),
            row(["reach", "public", "users_v", "users"]),
        ]);
        assert_eq!(ns.schemas, vec!["pg_catalog", "public"]);
        assert_eq!(ns.resolve("users"), Some("public"));
        assert_eq!(ns.resolve("users_v"), Some("public"));
        assert_eq!(ns.resolve("other"), None);
    }

    #[test]
    fn parses_the_temporary_schema_probe() {
        let row = |n: Option<&str>, via: Option<&str>| {
            vec![n.map(str::to_string), via.map(str::to_string)]
        };
        assert_eq!(parse_temp(Vec::new()), TempHeld::default());
        let held = parse_temp(vec![row(Some("tmp"), None), row(Some("v"), Some("users"))]);
        assert!(held.any);
        assert_eq!(held.names.iter().collect::<Vec<_>>(), ["tmp", "v"]);
        assert_eq!(held.reaching.get("v").map(String::as_str), Some("users"));
        // Only functions or types: kept, no names.
        let held = parse_temp(vec![row(None, None)]);
        assert!(held.any && held.names.is_empty());
    }
}
