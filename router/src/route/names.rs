//! How relation names resolve: identifiers folded as PostgreSQL folds
//! them ([`norm`], [`last_name`]), the catalog name of a relation
//! ([`table_name`]), and for unqualified names the session's effective
//! `search_path` and the relations in it that matter to routing, as the
//! node read them from the home shard's catalog (see
//! `proxy/src/routing/names.rs`).
//!
//! Resolution is PostgreSQL's: the first schema of the effective path
//! (`current_schemas(true)`: `pg_temp` and `pg_catalog` where PostgreSQL
//! puts them, `$user` expanded, missing schemas dropped) that holds a
//! relation of that name. The node lists every relation whose name is the
//! name of a declared table, in every schema of the path, so the first
//! match is exact for every name that could be a declared table; any other
//! name is not declared wherever it resolves (the home shard).
//!
//! The session's temporary relations ([`Namespace::temp`], read by the
//! node on the backend that holds them) come first, as `pg_temp` does when
//! the path does not name it: such a name, and any name qualified by
//! `pg_temp` or `pg_temp_N`, resolves to the catalog name `pg_temp.NAME`,
//! an undeclared relation (the home shard), unless it reaches a declared
//! table (listed in [`Namespace::reaching`] under schema `pg_temp`: a
//! temporary view over it …), which is refused. When the session's
//! `search_path` names `pg_temp` itself ([`Namespace::temp_explicit`]) an
//! unqualified name of a temporary relation is refused (`0A000`): where
//! PostgreSQL resolves it then depends on relations the node does not list.
//!
//! Relations that *reach* a declared table — a view over it (also through
//! other views), a partition or inheritance child or parent of it,
//! transitively — are refused (`0A000`): on the home shard they would see
//! or write only the home shard's rows.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use sqlparser::ast::{Ident, ObjectName};

use super::RouteError;

/// The session's namespace, as far as routing needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// The effective search path, in order. Empty: every unqualified name
    /// is taken to be in `public` (the convention without a catalog, e.g.
    /// in unit tests).
    pub schemas: Vec<String>,
    /// `(schema, name)` of the relations in those schemas named like a
    /// declared table or like a relation of [`Namespace::reaching`].
    pub relations: BTreeSet<(String, String)>,
    /// Undeclared relations `(schema, name)` that reach a declared table,
    /// with that table's catalog name.
    pub reaching: BTreeMap<(String, String), String>,
    /// The relations (tables, views, sequences, indexes …) in the
    /// session's own temporary schema, by name: they resolve before any
    /// schema of the path.
    pub temp: BTreeSet<String>,
    /// The session's `search_path` names `pg_temp` explicitly (then it is
    /// not searched first).
    pub temp_explicit: bool,
}

impl Namespace {
    /// A stable identity (plans made under it are valid only under it).
    pub fn id(&self) -> u64 {
        if self.schemas.is_empty()
            && self.relations.is_empty()
            && self.reaching.is_empty()
            && self.temp.is_empty()
        {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish() | 1
    }

    /// The schema an unqualified `name` resolves to, among the relations
    /// listed; None when no schema of the path lists it (then it is no
    /// declared table, wherever it resolves).
    pub fn resolve(&self, name: &str) -> Option<&str> {
        self.schemas.iter().map(String::as_str).find(|s| {
            let key = (s.to_string(), name.to_string());
            self.relations.contains(&key) || self.reaching.contains_key(&key)
        })
    }
}

/// Whether `schema` (folded) is the temporary schema: `pg_temp`, or the
/// `pg_temp_N` PostgreSQL gives a backend's.
pub(super) fn is_temp_schema(schema: &str) -> bool {
    schema == "pg_temp" || schema.starts_with("pg_temp_")
}

/// Whether a catalog name ([`table_name`]) is a temporary relation.
pub(super) fn is_temp_name(catalog_name: &str) -> bool {
    catalog_name.starts_with("pg_temp.")
}

/// Folds an identifier as PostgreSQL does: unquoted → ASCII lower case.
pub(super) fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_ascii_lowercase()
    }
}

/// The last part of a qualified name, folded (`s.F` → `f`).
pub(super) fn last_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(norm)
        .unwrap_or_default()
}

/// The catalog name of a relation: `public.t` → `t`, `s.t` → `s.t`, and
/// `t` as the session's search path resolves it ([`Namespace`]). A
/// relation that reaches a declared table without being declared itself (a
/// view over it, a partition …) is refused.
pub(super) fn table_name(ns: &Namespace, name: &ObjectName) -> Result<String, RouteError> {
    let mut parts = Vec::with_capacity(name.0.len());
    for p in &name.0 {
        match p.as_ident() {
            Some(id) => parts.push(norm(id)),
            None => return Err(RouteError::unsupported(format!("table name {name}"))),
        }
    }
    let (schema, t) = match parts.as_slice() {
        [t] if ns.temp.contains(t) => {
            if ns.temp_explicit {
                return Err(RouteError::unsupported(format!(
                    "\"{t}\" is a temporary table of this session and search_path names pg_temp explicitly: hotrepart cannot tell which relation \"{t}\" means; qualify it (pg_temp.{t}, or its schema)"
                )));
            }
            ("pg_temp".to_owned(), t.clone())
        }
        [t] => match ns.resolve(t) {
            Some(s) => (s.to_owned(), t.clone()),
            None => return Ok(t.clone()),
        },
        [s, t] if is_temp_schema(s) => ("pg_temp".to_owned(), t.clone()),
        [s, t] => (s.clone(), t.clone()),
        _ => {
            return Err(RouteError::unsupported(format!(
                "table name {name} (database-qualified names are not supported)"
            )))
        }
    };
    if let Some(declared) = ns.reaching.get(&(schema.clone(), t.clone())) {
        return Err(RouteError::unsupported(format!(
            "relation \"{schema}.{t}\" is not declared to hotrepart but reaches table \"{declared}\" (a view over it, or a partition or inheritance parent or child of it): on one shard it would see or change that shard's rows only; use \"{declared}\" itself, or declare the relation"
        )));
    }
    Ok(if schema == "public" {
        t
    } else {
        format!("{schema}.{t}")
    })
}
