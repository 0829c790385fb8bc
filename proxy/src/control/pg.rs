//! Plain PostgreSQL connections of the control plane (not pooled): to a
//! shard's DSN or one of its databases, and the catalog lookups the admin
//! API and the jobs share.

use std::time::Duration;

/// How long a connection to a shard may take.
pub(crate) const SHARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether table `t` (a name as the catalog has it) exists.
pub(crate) async fn table_exists(c: &tokio_postgres::Client, t: &str) -> Result<bool, String> {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&t])
        .await
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
}

/// The databases of the server at `dsn` that hold any of `tables`, in name
/// order, each with a connection to it and the tables it holds (in the
/// order given).
pub(crate) async fn databases_with(
    dsn: &str,
    tables: &[String],
) -> Result<Vec<(String, tokio_postgres::Client, Vec<String>)>, String> {
    let c = connect(dsn, Some("postgres")).await?;
    let dbs = c
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in dbs {
        let db: String = row.get(0);
        let c = connect(dsn, Some(&db)).await?;
        let mut here = Vec::new();
        for t in tables {
            if table_exists(&c, t).await? {
                here.push(t.clone());
            }
        }
        if !here.is_empty() {
            out.push((db, c, here));
        }
    }
    Ok(out)
}

/// A connection for admin work (not pooled), to `dbname` or the DSN's.
pub(crate) async fn connect(
    dsn: &str,
    dbname: Option<&str>,
) -> Result<tokio_postgres::Client, String> {
    let mut cfg: tokio_postgres::Config = dsn.parse().map_err(|e| format!("invalid DSN: {e}"))?;
    if let Some(db) = dbname {
        cfg.dbname(db);
    }
    cfg.connect_timeout(SHARD_TIMEOUT);
    let (client, conn) = tokio::time::timeout(SHARD_TIMEOUT, cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}
