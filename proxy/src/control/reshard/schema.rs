//! What the engine needs to know about a moved table, read from
//! `pg_catalog` on the source, and the target's copy of the table: checked
//! against the source, or created from the source's definition.
//!
//! Guarantees: a [`TableInfo`] exists only for a plain table that has a
//! unique, non-null key to apply changes by (its primary key, else its
//! replica identity index) and whose replica identity contains the shard key
//! column (or is FULL), so for every UPDATE and DELETE decoded from the slot
//! the old row's shard key is known. A target table accepted by
//! [`ensure_target`] has every copied column with the same type (binary COPY
//! needs that) and a unique index on the same key (ON CONFLICT needs that).

use super::{sql, MoveSpec, ReshardError, Side, TableMove};
use crate::sql::{quote_ident, quote_table};
use hotrepart_router::catalog::{KeyType, RoutingFunction};
use tokio_postgres::Client;

/// One column of a moved table, as on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    pub type_sql: String,
    pub not_null: bool,
    /// Default expression (kept only when simple: no sequence).
    pub default: Option<String>,
    /// Expression of a stored generated column.
    pub generated: Option<String>,
}

/// A moved table as the engine sees it on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// The name as given in the job.
    pub name: String,
    /// The source's OID (pgoutput names relations by it).
    pub oid: u32,
    /// `"schema"."table"`.
    pub qualified: String,
    pub schema: String,
    pub columns: Vec<ColumnInfo>,
    /// Columns of the unique key changes are applied by (ON CONFLICT, DELETE).
    pub conflict: Vec<String>,
    /// Columns the old row carries in UPDATE/DELETE messages (all of them
    /// for REPLICA IDENTITY FULL).
    pub identity: Vec<String>,
    pub identity_full: bool,
    pub key_column: String,
    pub key_type: KeyType,
    pub function: RoutingFunction,
    /// `pg_get_constraintdef` of the primary key.
    pub primary_key_def: Option<String>,
    /// `pg_get_indexdef` of the replica identity index when there is no
    /// primary key.
    pub identity_index_def: Option<String>,
}

impl TableInfo {
    /// The columns COPY moves: all but generated ones (the target computes
    /// those itself).
    pub fn copy_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| c.generated.is_none())
    }

    fn err(&self, problem: impl Into<String>) -> ReshardError {
        ReshardError::Table {
            table: self.name.clone(),
            problem: problem.into(),
        }
    }
}

/// `wal_level = logical`, a free slot (unless this job's own exists), UTF8
/// when a key is text (the router hashes UTF-8 bytes).
pub(crate) async fn check_source_server(src: &Client, spec: &MoveSpec) -> Result<(), ReshardError> {
    let server = |problem: String| ReshardError::Server {
        side: Side::Source,
        problem,
    };
    let row = src
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, \
             (SELECT count(*)::int FROM pg_replication_slots), \
             EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
             current_setting('server_encoding')",
            &[&spec.capture_name()],
        )
        .await
        .map_err(sql(Side::Source, "reading server settings"))?;
    let wal_level: String = row.get(0);
    let (max, used, own): (i32, i32, bool) = (row.get(1), row.get(2), row.get(3));
    let encoding: String = row.get(4);
    if wal_level != "logical" {
        return Err(server(format!(
            "wal_level is {wal_level}; resharding needs wal_level = logical (and a restart)"
        )));
    }
    if !own && used >= max {
        return Err(server(format!(
            "no free replication slot ({used} of max_replication_slots = {max} in use)"
        )));
    }
    if encoding != "UTF8" && spec.tables.iter().any(|t| t.key_type == KeyType::Text) {
        return Err(server(format!(
            "server_encoding is {encoding}; text shard keys need UTF8"
        )));
    }
    Ok(())
}

/// Reads and checks a moved table's definition on the source.
pub(crate) async fn describe_source(
    src: &Client,
    t: &TableMove,
) -> Result<TableInfo, ReshardError> {
    let table_err = |problem: String| ReshardError::Table {
        table: t.name.clone(),
        problem,
    };
    let rel = src
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&quote_table(&t.name)],
        )
        .await
        .map_err(sql(Side::Source, format!("looking up table {}", t.name)))?
        .ok_or_else(|| table_err("does not exist on the source".into()))?;
    let oid: u32 = rel.get(0);
    let schema: String = rel.get(1);
    let relname: String = rel.get(2);
    let replident: String = rel.get(3);
    let relkind: String = rel.get(4);
    if relkind != "r" {
        return Err(table_err(format!(
            "is not a plain table (relkind {relkind}); only plain tables can be moved"
        )));
    }
    let columns = read_columns(src, oid, Side::Source).await?;
    let indexes = src
        .query(
            "SELECT i.indisprimary, i.indisreplident, \
               ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), \
               pg_get_indexdef(i.indexrelid), \
               (SELECT pg_get_constraintdef(con.oid) FROM pg_constraint con \
                 WHERE con.conindid = i.indexrelid AND con.contype = 'p' LIMIT 1), \
               i.indnatts::int, i.indexprs IS NULL AND i.indpred IS NULL \
             FROM pg_index i WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident)",
            &[&oid],
        )
        .await
        .map_err(sql(Side::Source, format!("reading the indexes of {}", t.name)))?;
    let mut pk: Option<(Vec<String>, Option<String>)> = None;
    let mut ident: Option<(Vec<String>, String)> = None;
    for r in &indexes {
        let cols: Vec<String> = r.get(2);
        let natts: i32 = r.get(5);
        let plain: bool = r.get(6);
        if cols.len() != natts as usize || !plain {
            continue; // expression or partial index: cannot be a key we use
        }
        if r.get::<_, bool>(0) {
            pk = Some((cols.clone(), r.get(4)));
        }
        if r.get::<_, bool>(1) {
            ident = Some((cols, r.get(3)));
        }
    }
    let identity_full = replident == "f";
    let identity: Vec<String> = match replident.as_str() {
        "d" => pk.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
        "i" => ident.as_ref().map(|i| i.0.clone()).unwrap_or_default(),
        "f" => columns.iter().map(|c| c.name.clone()).collect(),
        _ => Vec::new(),
    };
    if replident == "n" {
        return Err(table_err(
            "has REPLICA IDENTITY NOTHING: its updates and deletes cannot be captured".into(),
        ));
    }
    let (conflict, identity_index_def) = match (&pk, &ident) {
        (Some((cols, _)), _) => (cols.clone(), None),
        (None, Some((cols, def))) => (cols.clone(), Some(def.clone())),
        (None, None) => {
            return Err(table_err(
                "has no primary key (nor a unique replica identity index): its rows cannot be \
                 applied idempotently by key; add a primary key"
                    .into(),
            ))
        }
    };
    if identity.is_empty() {
        return Err(table_err(
            "has no replica identity (no primary key): updates and deletes cannot be captured"
                .into(),
        ));
    }
    let key = columns
        .iter()
        .find(|c| c.name == t.key_column)
        .ok_or_else(|| table_err(format!("has no shard key column {:?}", t.key_column)))?;
    if key.generated.is_some() {
        return Err(table_err(format!(
            "shard key column {:?} is generated; generated columns are not replicated",
            t.key_column
        )));
    }
    let type_ok = match t.key_type {
        KeyType::Int2 => key.type_sql == "smallint",
        KeyType::Int4 => key.type_sql == "integer",
        KeyType::Int8 => key.type_sql == "bigint",
        KeyType::Text => key.type_sql == "text" || key.type_sql.starts_with("character varying"),
        KeyType::Uuid => key.type_sql == "uuid",
    };
    if !type_ok {
        return Err(table_err(format!(
            "shard key column {:?} is {} but the catalog says {}",
            t.key_column,
            key.type_sql,
            t.key_type.sql_name()
        )));
    }
    if !identity_full && !identity.contains(&t.key_column) {
        return Err(table_err(format!(
            "shard key column {:?} is not part of the replica identity ({}): a change of the key \
             could not be placed; include it in the primary key or set REPLICA IDENTITY FULL",
            t.key_column,
            identity.join(", ")
        )));
    }
    Ok(TableInfo {
        name: t.name.clone(),
        oid,
        qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&relname)),
        schema,
        columns,
        conflict,
        identity,
        identity_full,
        key_column: t.key_column.clone(),
        key_type: t.key_type,
        function: t.function,
        primary_key_def: pk.and_then(|p| p.1),
        identity_index_def,
    })
}

async fn read_columns(c: &Client, oid: u32, side: Side) -> Result<Vec<ColumnInfo>, ReshardError> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
               pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(sql(side, "reading columns"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let expr: Option<String> = r.get(3);
            let generated = r.get::<_, String>(4) == "s";
            ColumnInfo {
                name: r.get(0),
                type_sql: r.get(1),
                not_null: r.get(2),
                default: if generated {
                    None
                } else {
                    // A sequence does not exist on the target (and must not
                    // hand out keys there): such defaults are left out.
                    expr.clone().filter(|e| !e.contains("nextval("))
                },
                generated: if generated { expr } else { None },
            }
        })
        .collect())
}

/// Makes sure the table exists on the target with what the engine needs,
/// creating it from the source's definition when absent.
pub(crate) async fn ensure_target(
    dst: &Client,
    t: &TableMove,
    info: &TableInfo,
) -> Result<(), ReshardError> {
    let oid = target_oid(dst, info).await?;
    let oid = match oid {
        Some(oid) => oid,
        None => {
            create_on_target(dst, info).await?;
            target_oid(dst, info)
                .await?
                .ok_or_else(|| info.err("was created on the target but cannot be found"))?
        }
    };
    let cols = read_columns(dst, oid, Side::Target).await?;
    for c in info.copy_columns() {
        match cols.iter().find(|d| d.name == c.name) {
            None => {
                return Err(info.err(format!("column {:?} is missing on the target", c.name)));
            }
            Some(d) if d.type_sql != c.type_sql => {
                return Err(info.err(format!(
                    "column {:?} is {} on the source but {} on the target",
                    c.name, c.type_sql, d.type_sql
                )));
            }
            Some(d) if d.generated.is_some() => {
                return Err(info.err(format!("column {:?} is generated on the target", c.name)));
            }
            Some(_) => {}
        }
    }
    let uniques = dst
        .query(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) k(n) \
                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) \
             FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique \
               AND i.indexprs IS NULL AND i.indpred IS NULL",
            &[&oid],
        )
        .await
        .map_err(sql(
            Side::Target,
            format!("reading the indexes of {}", t.name),
        ))?;
    let mut want = info.conflict.clone();
    want.sort();
    let found = uniques.iter().any(|r| {
        let mut cols: Vec<String> = r.get(0);
        cols.sort();
        cols == want
    });
    if !found {
        return Err(info.err(format!(
            "the target has no unique index on ({}) (the source's key), which applying changes needs",
            info.conflict.join(", ")
        )));
    }
    Ok(())
}

async fn target_oid(dst: &Client, info: &TableInfo) -> Result<Option<u32>, ReshardError> {
    Ok(dst
        .query_one("SELECT to_regclass($1)::oid", &[&info.qualified])
        .await
        .map_err(sql(Side::Target, format!("looking up table {}", info.name)))?
        .get(0))
}

/// The `CREATE TABLE` for the target: columns with types, NOT NULL, simple
/// defaults, stored generated columns, the primary key (or the unique
/// replica identity index). Not copied: other constraints and indexes,
/// foreign keys, triggers, identity/sequence defaults, storage options.
pub(crate) fn create_table_sql(info: &TableInfo) -> String {
    let mut items: Vec<String> = info
        .columns
        .iter()
        .map(|c| {
            let mut s = format!("{} {}", quote_ident(&c.name), c.type_sql);
            if let Some(g) = &c.generated {
                s.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
            }
            if c.not_null {
                s.push_str(" NOT NULL");
            }
            if let Some(d) = &c.default {
                s.push_str(&format!(" DEFAULT {d}"));
            }
            s
        })
        .collect();
    if let Some(pk) = &info.primary_key_def {
        items.push(pk.clone());
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        info.qualified,
        items.join(", ")
    )
}

async fn create_on_target(dst: &Client, info: &TableInfo) -> Result<(), ReshardError> {
    let mut script = String::from("BEGIN;\n");
    if info.schema != "public" {
        script.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};\n",
            quote_ident(&info.schema)
        ));
    }
    script.push_str(&create_table_sql(info));
    script.push_str(";\n");
    if let Some(def) = &info.identity_index_def {
        if let Some(rest) = def.strip_prefix("CREATE UNIQUE INDEX ") {
            script.push_str(&format!("CREATE UNIQUE INDEX IF NOT EXISTS {rest};\n"));
        }
    }
    script.push_str("COMMIT;");
    dst.batch_execute(&script).await.map_err(sql(
        Side::Target,
        format!("creating table {} on the target", info.name),
    ))?;
    tracing::info!(table = %info.name, "table created on the target");
    Ok(())
}
