//! The schema (and the reference tables' rows) a new shard gets before it
//! joins the routing table: `pg_dump --schema-only` of the declared tables
//! from the home shard, then each reference table copied under a lock.

use super::{connect, JobError};
use hotrepart_router::catalog::RoutingSnapshot;
use std::time::Duration;

/// A connection string with `dbname` set (key=value form, as libpq and
/// pg_dump accept it).
fn with_db(dsn: &str, db: &str) -> Result<String, JobError> {
    let (cfg, tls) = crate::control::pg::parse_dsn(dsn).map_err(JobError::Other)?;
    let mut parts = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        parts.push(format!("host={h}"));
    }
    if let Some(p) = cfg.get_ports().first() {
        parts.push(format!("port={p}"));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={u}"));
    }
    if let Some(pw) = cfg.get_password() {
        let pw = String::from_utf8_lossy(pw)
            .replace('\\', "\\\\")
            .replace('\'', "\\'");
        parts.push(format!("password='{pw}'"));
    }
    parts.push(format!(
        "dbname='{}'",
        db.replace('\\', "\\\\").replace('\'', "\\'")
    ));
    // pg_dump and psql are libpq: they take the DSN's TLS as written.
    let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    parts.push(format!("sslmode={}", q(&tls.mode)));
    if let Some(r) = &tls.root {
        parts.push(format!("sslrootcert={}", q(&r.display().to_string())));
    }
    Ok(parts.join(" "))
}

/// Creates the declared tables (sharded: empty; reference: schema) of
/// every database of `from` on the new shard `to_dsn`, from `pg_dump
/// --schema-only`; returns the databases that hold reference tables.
pub(crate) async fn copy_schema(
    snap: &RoutingSnapshot,
    from_dsn: &str,
    to_dsn: &str,
) -> Result<Vec<(String, Vec<String>)>, JobError> {
    let pg_dump = crate::control::jobs::pgbin::find(&["pg_dump"])
        .map(|d| d.join("pg_dump"))
        .ok_or_else(|| {
            JobError::Other(format!(
                "pg_dump is needed to copy the schema and was not found in {}; \
                 install the PostgreSQL client programs or set PG_BIN",
                crate::control::jobs::pgbin::SEARCHED
            ))
        })?;
    let declared: Vec<String> = snap
        .sharded_tables()
        .map(|t| t.name.clone())
        .chain(snap.reference_tables().map(str::to_string))
        .collect();
    let dbs = crate::control::pg::databases_with(from_dsn, &declared)
        .await
        .map_err(|e| JobError::Other(format!("source: {e}")))?;
    let dst = connect(to_dsn, "postgres").await?;
    let mut out = Vec::new();
    for (db, _, tables) in dbs {
        let reference: Vec<String> = tables
            .iter()
            .filter(|t| snap.is_reference_table(t))
            .cloned()
            .collect();
        let has_db: bool = dst
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[&db],
            )
            .await
            .map_err(|e| JobError::Other(format!("new shard: {e}")))?
            .get(0);
        if !has_db {
            dst.batch_execute(&format!("CREATE DATABASE \"{}\"", db.replace('"', "\"\"")))
                .await
                .map_err(|e| JobError::Other(format!("new shard: CREATE DATABASE {db}: {e}")))?;
        }
        let target = connect(to_dsn, &db).await?;
        let mut missing = Vec::new();
        for t in &tables {
            let exists = crate::control::pg::table_exists(&target, t)
                .await
                .map_err(|e| JobError::Other(format!("new shard: {e}")))?;
            if !exists {
                missing.push(t.clone());
            }
        }
        if !missing.is_empty() {
            let mut cmd = tokio::process::Command::new(&pg_dump);
            cmd.arg("--schema-only")
                .arg("--no-owner")
                .arg("--no-privileges");
            for t in &missing {
                cmd.arg(format!("--table={t}"));
            }
            cmd.arg(format!("--dbname={}", with_db(from_dsn, &db)?));
            let dump = cmd
                .output()
                .await
                .map_err(|e| JobError::Other(format!("pg_dump: {e}")))?;
            if !dump.status.success() {
                return Err(JobError::Other(format!(
                    "pg_dump of {missing:?} failed: {}",
                    String::from_utf8_lossy(&dump.stderr)
                )));
            }
            let sql = String::from_utf8_lossy(&dump.stdout)
                .lines()
                // psql meta-commands of recent pg_dump versions.
                .filter(|l| !l.starts_with('\\'))
                .collect::<Vec<_>>()
                .join("\n");
            target
                .batch_execute(&sql)
                .await
                .map_err(|e| JobError::Other(format!("new shard: creating {missing:?}: {e}")))?;
        }
        if !reference.is_empty() {
            out.push((db, reference));
        }
    }
    Ok(out)
}

/// Copies the rows of reference table `t` from `from` to the new shard
/// while writers of the table are held off on the source: every write
/// after it reaches the new shard too (it is in the routing table by now),
/// every write before it is in the copy. A writer caught between the two
/// servers makes the target's lock time out: then the copy is retried.
pub(crate) async fn sync_reference(
    from_dsn: &str,
    to_dsn: &str,
    db: &str,
    t: &str,
) -> Result<u64, JobError> {
    use futures_util::{SinkExt, StreamExt};
    let q = t
        .split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".");
    let mut last = String::new();
    for attempt in 0..20u64 {
        let mut src = connect(from_dsn, db).await?;
        let mut dst = connect(to_dsn, db).await?;
        let r: Result<u64, String> = async {
            let stx = src.transaction().await.map_err(|e| e.to_string())?;
            stx.batch_execute(&format!("SET LOCAL lock_timeout = '2s'; LOCK TABLE {q} IN SHARE MODE"))
                .await
                .map_err(|e| e.to_string())?;
            let dtx = dst.transaction().await.map_err(|e| e.to_string())?;
            dtx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '2s'; LOCK TABLE {q} IN ACCESS EXCLUSIVE MODE; TRUNCATE {q}"
            ))
            .await
            .map_err(|e| e.to_string())?;
            let out = stx
                .copy_out(format!("COPY {q} TO STDOUT (FORMAT binary)").as_str())
                .await
                .map_err(|e| e.to_string())?;
            let sink = dtx
                .copy_in::<_, bytes::Bytes>(format!("COPY {q} FROM STDIN (FORMAT binary)").as_str())
                .await
                .map_err(|e| e.to_string())?;
            let mut sink = std::pin::pin!(sink);
            let mut out = std::pin::pin!(out);
            while let Some(chunk) = out.next().await {
                sink.send(chunk.map_err(|e| e.to_string())?)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let n = sink.as_mut().finish().await.map_err(|e| e.to_string())?;
            dtx.commit().await.map_err(|e| e.to_string())?;
            stx.commit().await.map_err(|e| e.to_string())?;
            Ok(n)
        }
        .await;
        match r {
            Ok(n) => return Ok(n),
            Err(e) => {
                last = e;
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        }
    }
    Err(JobError::Other(format!(
        "reference table {t} (database {db}) could not be copied to the new shard: {last}"
    )))
}
