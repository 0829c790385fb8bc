//! Uniqueness across shards: a unique index (or PRIMARY KEY, UNIQUE or
//! EXCLUDE constraint) on a sharded table holds across the shards only
//! when it includes the shard key — rows with equal key values share a
//! shard. Any other is enforced by each shard on its own rows only: two
//! shards could hold the same email, and `ON CONFLICT (email)` would miss
//! the other shard's row — a silent wrong answer. Such indexes are
//! refused where they appear:
//! - DDL through the node: a transaction that changed the schema is
//!   checked before its two-phase commit ([`crate::exec::twopc::commit`]),
//!   on a shard it wrote, inside the transaction (so every form counts:
//!   `CREATE UNIQUE INDEX`, `ALTER TABLE … ADD UNIQUE`, a `PRIMARY KEY`
//!   in `CREATE TABLE` of a declared table …); found, it rolls back on
//!   every shard with 0A000;
//! - declaring a table sharded (`proxyctl table shard`, the admin API):
//!   refused while the table has one (`control/admin.rs`).

/// The query listing, for each `(catalog name, key column)`, its unique
/// and exclusion indexes whose key columns do not include the key column:
/// rows `(table, index, definition)`. None when there is no table.
pub fn check_sql(tables: &[(String, String)]) -> Option<String> {
    if tables.is_empty() {
        return None;
    }
    let values: Vec<String> = tables
        .iter()
        .map(|(name, key)| {
            // A catalog name without a schema is `public`'s, whatever the
            // session's search_path.
            let qualified = if name.contains('.') {
                name.clone()
            } else {
                format!("public.{name}")
            };
            format!(
                "({}, {}, {})",
                crate::sql::quote_literal(name),
                crate::sql::quote_literal(&crate::sql::quote_table(&qualified)),
                crate::sql::quote_literal(key)
            )
        })
        .collect();
    Some(format!(
        "SELECT t.name, ic.relname::text, pg_catalog.pg_get_indexdef(i.indexrelid) \
         FROM (VALUES {}) AS t(name, reg, key) \
         JOIN pg_catalog.pg_index i ON i.indrelid = pg_catalog.to_regclass(t.reg) \
         JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
         WHERE (i.indisunique OR i.indisexclusion) \
         AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = i.indrelid AND a.attname = t.key \
         AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1])) \
         ORDER BY 1, 2",
        values.join(", ")
    ))
}

/// The sharded tables of `snap` with their key columns, as [`check_sql`]
/// takes them.
pub fn sharded_keys(snap: &hotrepart_router::catalog::RoutingSnapshot) -> Vec<(String, String)> {
    snap.sharded_tables()
        .map(|t| (t.name.clone(), t.key_column.clone()))
        .collect()
}

/// What the DBA reads for the rows of [`check_sql`] (`table`, `index`,
/// `definition`), with `keys` to name each table's key column.
pub fn explain(rows: &[(String, String, String)], keys: &[(String, String)]) -> String {
    let parts: Vec<String> = rows
        .iter()
        .map(|(table, index, def)| {
            let key = keys
                .iter()
                .find(|(n, _)| n == table)
                .map(|(_, k)| k.as_str())
                .unwrap_or("?");
            format!(
                "index \"{index}\" of sharded table \"{table}\" ({def}) does not include its shard key \"{key}\""
            )
        })
        .collect();
    format!(
        "{}: each shard would enforce it on its own rows only, so two shards could hold the same value; \
         a unique index, PRIMARY KEY, UNIQUE or EXCLUDE constraint on a sharded table must include the shard key — add the key to it, or drop it",
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_names_every_table_quoted() {
        assert_eq!(check_sql(&[]), None);
        let sql = check_sql(&[
            ("users".into(), "id".into()),
            ("App.It's".into(), "Key".into()),
        ])
        .expect("sql");
        assert!(
            sql.contains(r#"('users', '"public"."users"', 'id')"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"('App.It''s', '"App"."It''s"', 'Key')"#),
            "{sql}"
        );
        let msg = explain(
            &[(
                "users".into(),
                "users_email_key".into(),
                "CREATE UNIQUE INDEX users_email_key ON public.users USING btree (email)".into(),
            )],
            &[("users".into(), "id".into())],
        );
        assert!(
            msg.starts_with(
                "index \"users_email_key\" of sharded table \"users\" (CREATE UNIQUE INDEX"
            ),
            "{msg}"
        );
        assert!(msg.contains("shard key \"id\""), "{msg}");
    }
}
