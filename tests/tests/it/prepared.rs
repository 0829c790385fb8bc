//! Prepared statements through the node behave as on PostgreSQL after DDL,
//! rollbacks and savepoints (issue 14): the same scenario runs directly on
//! a shard and through the node, and the outcomes must be the same.
#![allow(clippy::unwrap_used)]

use hotrepart_tests::*;
use tokio_postgres::Client;

/// What one step gave: rows as text, or the SQLSTATE of the error.
async fn outcome(
    c: &Client,
    st: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> String {
    match c.query(st, params).await {
        Ok(rows) => {
            let cols: Vec<String> = st
                .columns()
                .iter()
                .map(|c| format!("{}:{}", c.name(), c.type_().name()))
                .collect();
            format!("ok {} rows [{}]", rows.len(), cols.join(","))
        }
        Err(e) => format!(
            "err {}",
            e.code()
                .map(|c| c.code().to_string())
                .unwrap_or_else(|| e.to_string())
        ),
    }
}

async fn prep(c: &Client, sql: &str) -> Result<tokio_postgres::Statement, String> {
    c.prepare(sql).await.map_err(|e| {
        format!(
            "prepare err {}",
            e.code()
                .map(|c| c.code().to_string())
                .unwrap_or_else(|| e.to_string())
        )
    })
}

/// The scenario, on tables and types suffixed `sfx`; `ddl` runs the DDL
/// (the same client, or another session).
async fn scenario(c: &Client, ddl: &Client, sfx: &str) -> Vec<String> {
    let mut out = Vec::new();
    let t = format!("pt_{sfx}");
    let e = format!("pe_{sfx}");
    ddl.batch_execute(&format!(
        "DROP TABLE IF EXISTS {t}; DROP TYPE IF EXISTS {e}; CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)"
    ))
    .await
    .unwrap();
    // 1. a column added: the old statement fails as on PostgreSQL; a new
    //    Parse of the same text sees the new column.
    let sel = format!("SELECT * FROM {t}");
    let st = prep(c, &sel).await.unwrap();
    out.push(outcome(c, &st, &[]).await);
    ddl.batch_execute(&format!("ALTER TABLE {t} ADD COLUMN b text"))
        .await
        .unwrap();
    out.push(outcome(c, &st, &[]).await);
    match prep(c, &sel).await {
        Ok(st2) => out.push(outcome(c, &st2, &[]).await),
        Err(e) => out.push(e),
    }
    // 2. dropped and created again with another type: the parameter type
    //    follows.
    let by = format!("SELECT a FROM {t} WHERE a = $1");
    let st = prep(c, &by).await.unwrap();
    out.push(format!("param {}", st.params()[0].name()));
    ddl.batch_execute(&format!(
        "DROP TABLE {t}; CREATE TABLE {t} (a text); INSERT INTO {t} VALUES ('x')"
    ))
    .await
    .unwrap();
    match prep(c, &by).await {
        Ok(st2) => {
            out.push(format!("param {}", st2.params()[0].name()));
            if st2.params()[0].name() == "text" {
                out.push(outcome(c, &st2, &[&"x"]).await);
            }
        }
        Err(e) => out.push(e),
    }
    // 3. a type dropped and created again.
    ddl.batch_execute(&format!(
        "DROP TABLE {t}; CREATE TYPE {e} AS ENUM ('a', 'b'); CREATE TABLE {t} (v {e}); INSERT INTO {t} VALUES ('a')"
    ))
    .await
    .unwrap();
    let sv = format!("SELECT v::text, v FROM {t}");
    match prep(c, &sv).await {
        Ok(st) => out.push(outcome(c, &st, &[]).await.replace(sfx, "")),
        Err(e) => out.push(e),
    }
    ddl.batch_execute(&format!(
        "DROP TABLE {t}; DROP TYPE {e}; CREATE TYPE {e} AS ENUM ('x'); CREATE TABLE {t} (v {e}); INSERT INTO {t} VALUES ('x')"
    ))
    .await
    .unwrap();
    match prep(c, &sv).await {
        Ok(st) => out.push(outcome(c, &st, &[]).await.replace(sfx, "")),
        Err(e) => out.push(e),
    }
    // 4. prepared inside a transaction rolled back, and to a savepoint:
    //    protocol-level statements are not transactional.
    c.batch_execute("BEGIN").await.unwrap();
    let st = prep(c, &format!("SELECT count(*) FROM {t}")).await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    out.push(outcome(c, &st, &[]).await);
    c.batch_execute("BEGIN; SAVEPOINT s").await.unwrap();
    let st = prep(c, &format!("SELECT v::text FROM {t}")).await.unwrap();
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    out.push(outcome(c, &st, &[]).await);
    c.batch_execute("COMMIT").await.unwrap();
    out.push(outcome(c, &st, &[]).await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_after_ddl_and_rollback_behave_as_on_postgresql() {
    let c = Cluster::start(Opts::default()).await;
    for other_session in [false, true] {
        let direct = c.direct(0).await;
        let direct_ddl = c.direct(0).await;
        let want = scenario(
            &direct,
            if other_session { &direct_ddl } else { &direct },
            "d",
        )
        .await;
        let node = c.connect().await;
        let node_ddl = c.connect().await;
        let got = scenario(&node, if other_session { &node_ddl } else { &node }, "n").await;
        assert_eq!(
            got, want,
            "through the node vs directly (DDL in another session: {other_session})"
        );
    }
}
