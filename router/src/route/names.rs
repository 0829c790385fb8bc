//! How unqualified relation names resolve: the session's effective
//! `search_path` and the relations in it that matter to routing, as the
//! node read them from the home shard's catalog (see
//! `proxy/src/names.rs`).
//!
//! Resolution is PostgreSQL's: the first schema of the effective path
//! (`current_schemas(true)`: `pg_temp` and `pg_catalog` where PostgreSQL
//! puts them, `$user` expanded, missing schemas dropped) that holds a
//! relation of that name. The node lists every relation whose name is the
//! name of a declared table, in every schema of the path, so the first
//! match is exact for every name that could be a declared table; any other
//! name is not declared wherever it resolves (the home shard).
//!
//! Relations that *reach* a declared table — a view over it (also through
//! other views), a partition or inheritance child or parent of it,
//! transitively — are refused (`0A000`): on the home shard they would see
//! or write only the home shard's rows.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

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
}

impl Namespace {
    /// A stable identity (plans made under it are valid only under it).
    pub fn id(&self) -> u64 {
        if self.schemas.is_empty() && self.relations.is_empty() && self.reaching.is_empty() {
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
