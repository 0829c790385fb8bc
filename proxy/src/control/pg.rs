//! Plain PostgreSQL connections of the control plane (not pooled): to a
//! shard's DSN or one of its databases, and the catalog lookups the admin
//! API and the jobs share.
//!
//! Guarantee: a connection's driver task (`drive`) ends when its
//! `Client` is dropped (or the server closes the connection), so it never
//! outlives the control-plane work that holds the client — which runs in
//! the node's tracked tasks and ends at the node's shutdown.

use std::time::Duration;

/// How long a connection to a shard may take.
pub(crate) const SHARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether table `t` (a name as the catalog has it) exists.
pub(crate) async fn table_exists(c: &tokio_postgres::Client, t: &str) -> Result<bool, String> {
    c.query_one(
        "SELECT to_regclass($1) IS NOT NULL",
        &[&crate::sql::quote_table(t)],
    )
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
    let (mut cfg, tls) = parse_dsn(dsn)?;
    if let Some(db) = dbname {
        cfg.dbname(db);
    }
    cfg.connect_timeout(SHARD_TIMEOUT);
    tokio::time::timeout(SHARD_TIMEOUT, connect_config(&cfg, &tls, "admin"))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))
}

/// A shard DSN as tokio-postgres reads it, and its TLS
/// ([`crate::tls::split_shard_dsn`]: `sslmode=verify-ca|verify-full` and
/// `sslrootcert` are the node's).
pub(crate) fn parse_dsn(
    dsn: &str,
) -> Result<(tokio_postgres::Config, crate::tls::ShardTls), String> {
    let (dsn, tls) = crate::tls::split_shard_dsn(dsn).map_err(|e| format!("invalid DSN: {e}"))?;
    let cfg = dsn.parse().map_err(|e| format!("invalid DSN: {e}"))?;
    Ok((cfg, tls))
}

/// Connects with TLS when `tls` requires it (rustls, the DSN's checks),
/// and runs the connection's driver ([`drive`]).
pub(crate) async fn connect_config(
    cfg: &tokio_postgres::Config,
    tls: &crate::tls::ShardTls,
    what: &'static str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    match tls.connector() {
        None => {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            drive(conn, what);
            Ok(client)
        }
        Some(t) => {
            let (client, conn) = cfg.connect(t).await?;
            drive(conn, what);
            Ok(client)
        }
    }
}

/// Runs a tokio-postgres connection's driver (`what` names it in the log).
///
/// The one spawn of the control plane outside the node's supervisor: the
/// driver does no work of its own — it carries its `Client`'s requests —
/// and it ends once the client and everything borrowed from it (a COPY
/// sink, a replication stream) are dropped and the requests sent are
/// answered, or when the server closes the connection. Tracking it would
/// add nothing: the tracked task that holds the client ends at shutdown,
/// and with it the driver.
pub(crate) fn drive<F>(conn: F, what: &'static str)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(connection = what, "connection ended: {e}");
        }
    });
}
