//! Real drivers of other languages through the node (issue 14): psycopg 3
//! and asyncpg (Python, from a venv the harness builds) and node-postgres
//! (Node.js, from `npm ci`), through a 1-shard and a 2-shard node; and the
//! ORMs over them, as they send their SQL: SQLAlchemy and Django over
//! psycopg, Sequelize over node-postgres, on tables sharded in the config.
//!
//! The scripts under `tests/drivers/` check exact values themselves and
//! print one JSON line per scenario (`tests/src/drivers.rs` runs each
//! scenario in its own process, bounded in time). Every scenario also runs
//! directly on shard 0 first: through the node it must pass and report the
//! same observed values (`detail`) as PostgreSQL gave directly — errors
//! included, SQLSTATE and words. After `sharded_keys`, each row must be on
//! the shard that owns its key and nowhere else.
//!
//! What does not work yet is listed in [`KNOWN_FAILURES`], and the tests
//! assert it still fails: a fix makes them fail until the entry is removed.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::drivers::{self, Outcome};
use hotrepart_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One scenario run may take this long; more is a hang.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Clone, Copy, PartialEq, Debug)]
enum Driver {
    Psycopg,
    Asyncpg,
    NodePg,
}

impl Driver {
    fn scenarios(self) -> &'static [&'static str] {
        match self {
            Driver::Psycopg => &[
                "types",
                "transactions",
                "executemany",
                "executemany_error",
                "pipeline_aborted",
                "pipeline_mixed",
                "prepared_after_alter",
                "listen_notify",
                "client_encoding",
                "executemany_sharded",
                "executemany_in_transaction",
                "orm_generated_keys",
                "sqlalchemy_orm",
                "django_orm",
                "client_encoding_latin9",
                "client_encoding_euc_jp",
                "cancel",
                "sharded_keys",
                "server_cursor",
                "server_cursor_sharded",
                "server_cursor_withhold",
                "enum_type",
                "subqueries_first",
                "copy_rows",
                "temp_table",
                "sql_prepare",
                "tpc",
            ],
            Driver::Asyncpg => &[
                "types",
                "transactions",
                "executemany",
                "executemany_error",
                "prepared_after_alter",
                "listen_notify",
                "client_encoding",
                "cancel",
                "sharded_keys",
                "sharded_reads",
                "sharded_writes_in_transaction",
                "cursor_sharded",
                "savepoints_sharded",
            ],
            Driver::NodePg => &[
                "types",
                "transactions",
                "pipeline_error",
                "prepared_after_alter",
                "multi_statement_string",
                "listen_notify",
                "client_encoding",
                "cancel",
                "sharded_keys",
                "sequelize_orm",
                "having_params",
                "query_stream",
                "subqueries_first",
            ],
        }
    }
}

/// A scenario that does not work through the node yet: the tests assert
/// it still fails, and the same way (its failure holds `fails_with`).
struct Known {
    driver: Driver,
    shards: usize,
    scenario: &'static str,
    known_failure: &'static str,
    fails_with: &'static str,
}

const KNOWN_FAILURES: &[Known] = &[];

/// The interpreter, script and environment of a driver; None when skipped
/// (outside CI, without a registry).
struct Runner {
    program: PathBuf,
    script: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
}

async fn runner(d: Driver) -> Option<Runner> {
    let dir = drivers::drivers_dir();
    match d {
        Driver::Psycopg | Driver::Asyncpg => {
            let py = tokio::task::spawn_blocking(drivers::python).await.unwrap();
            let py = drivers::require("the Python driver venv", py)?;
            let script = if d == Driver::Psycopg {
                "python/psycopg_scenarios.py"
            } else {
                "python/asyncpg_scenarios.py"
            };
            Some(Runner {
                program: py,
                script: dir.join(script),
                // No __pycache__ in the source tree.
                env: vec![("PYTHONDONTWRITEBYTECODE", PathBuf::from("1"))],
            })
        }
        Driver::NodePg => {
            let nm = tokio::task::spawn_blocking(drivers::node_modules)
                .await
                .unwrap();
            let nm = drivers::require("the Node.js driver modules", nm)?;
            Some(Runner {
                program: PathBuf::from("node"),
                script: dir.join("node/pg_scenarios.js"),
                env: vec![("NODE_PATH", nm)],
            })
        }
    }
}

impl Runner {
    async fn run(&self, dsn: &str, scenario: &str) -> Outcome {
        let env: Vec<(&str, &Path)> = self.env.iter().map(|(k, v)| (*k, v.as_path())).collect();
        drivers::run_scenario(
            &self.program,
            &self.script,
            &env,
            dsn,
            scenario,
            SCENARIO_TIMEOUT,
        )
        .await
    }
}

fn opts(shards: usize) -> Opts {
    Opts {
        shards,
        tail: "[[sharded_tables]]\nname = \"drv_kv\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_enum\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_curs\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_curh\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_enc\"\nkey = \"k\"\ntype = \"text\"\n\
               [[sharded_tables]]\nname = \"drv_orm\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_sa\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_dj_author\"\nkey = \"id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"drv_dj_book\"\nkey = \"author_id\"\ntype = \"int8\"\n\
               [[sharded_tables]]\nname = \"DrvSqUsers\"\nkey = \"id\"\ntype = \"int4\"\n"
            .into(),
        ..Opts::default()
    }
}

/// Every row of `table` (sharded by the integer column `key`; the name
/// as declared, quoted in SQL) is on the shard that owns its key, and only
/// there; the rows' keys are `keys_wanted` (sorted, repeated for rows
/// sharing a key).
async fn check_placement(
    c: &Cluster,
    table: &str,
    key: &str,
    keys_wanted: impl IntoIterator<Item = i64>,
) -> Result<(), String> {
    let snap = c.node.routing.catalog.load();
    let mut all = Vec::new();
    for i in 0..c.shards.len() {
        let name = format!("s{i}");
        let ids: Vec<i64> = c
            .direct(i)
            .await
            .query(
                &format!("SELECT \"{key}\"::int8 FROM \"{table}\" ORDER BY 1"),
                &[],
            )
            .await
            .map_err(|e| format!("{name}: {e}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if c.shards.len() > 1 && ids.is_empty() {
            return Err(format!("no row of {table} on {name}"));
        }
        for id in &ids {
            let owner = snap
                .range_for_key(table, &KeyValue::Int8(*id))
                .map_err(|e| format!("{table} key {id}: {e}"))?
                .write_owner
                .as_str()
                .to_owned();
            if owner != name {
                return Err(format!("{table} key {id} is on {name}, owned by {owner}"));
            }
        }
        all.extend(ids);
    }
    all.sort();
    if all != keys_wanted.into_iter().collect::<Vec<i64>>() {
        return Err(format!("keys of {table} over all shards: {all:?}"));
    }
    Ok(())
}

/// Every row of `table` (sharded by its text key `k`) is on the shard
/// that owns its key, and only there; `n` rows in all.
async fn check_text_placement(c: &Cluster, table: &str, n: usize) -> Result<(), String> {
    let snap = c.node.routing.catalog.load();
    let mut all = Vec::new();
    for i in 0..c.shards.len() {
        let name = format!("s{i}");
        let rows = c
            .direct(i)
            .await
            .query(&format!("SELECT k FROM {table}"), &[])
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        for r in rows {
            let k: String = r.get(0);
            let owner = snap
                .range_for_key(table, &KeyValue::Text(k.clone()))
                .map_err(|e| format!("key {k:?}: {e}"))?
                .write_owner
                .as_str()
                .to_owned();
            if owner != name {
                return Err(format!("key {k:?} is on {name}, owned by {owner}"));
            }
            all.push(k);
        }
    }
    all.sort();
    all.dedup();
    if all.len() != n {
        return Err(format!("rows of {table} over all shards: {all:?}"));
    }
    Ok(())
}

/// A detail as text (a string unquoted, anything else as JSON).
fn text(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

async fn check(d: Driver, shards: usize) {
    let Some(r) = runner(d).await else { return };
    let c = Cluster::start(opts(shards)).await;
    let direct_dsn = c.shards[0].dsn();
    let started = Instant::now();
    let mut problems = Vec::new();
    let mut known_seen = Vec::new();
    for &s in d.scenarios() {
        let direct = r.run(&direct_dsn, s).await;
        assert!(
            direct.ok,
            "{d:?} {s} fails directly on PostgreSQL (the script is wrong): {}",
            direct.detail
        );
        let through = r.run(&c.dsn(), s).await;
        let mut failure = if !through.ok {
            Some(format!("failed: {}", text(&through.detail)))
        } else if through.detail != direct.detail {
            Some(format!(
                "differs from PostgreSQL: node {} / direct {}",
                through.detail, direct.detail
            ))
        } else {
            None
        };
        if failure.is_none() && (s == "sharded_keys" || s == "executemany_sharded") {
            // (ids 1..19: the scenarios delete 20)
            failure = check_placement(&c, "drv_kv", "id", 1..=19).await.err();
        }
        if failure.is_none() && s == "orm_generated_keys" {
            // (ids 1..24; 25 went to the rolled-back INSERT)
            failure = check_placement(&c, "drv_orm", "id", 1..=24).await.err();
        }
        if failure.is_none() && s == "sqlalchemy_orm" {
            // (the ORM deleted id 6 and rolled back 11)
            let ids = (1..=10).filter(|&i| i != 6);
            failure = check_placement(&c, "drv_sa", "id", ids).await.err();
        }
        if failure.is_none() && s == "django_orm" {
            // (Django deleted author 9 with its book, and rolled back
            // authors 13..16 and the book of 13; books are on their
            // author's shard)
            let authors = (1..=17).filter(|i| ![9, 13, 14, 15, 16].contains(i));
            failure = check_placement(&c, "drv_dj_author", "id", authors)
                .await
                .err();
            if failure.is_none() {
                failure = check_placement(&c, "drv_dj_book", "author_id", 1..=8)
                    .await
                    .err();
            }
        }
        if failure.is_none() && s == "sequelize_orm" {
            // (ids 1..17 from the sequence but 8 and 10 destroyed, 13..16
            // rolled back; 100 upserted)
            let ids = (1..=17)
                .filter(|i| ![8, 10, 13, 14, 15, 16].contains(i))
                .chain([100]);
            failure = check_placement(&c, "DrvSqUsers", "id", ids).await.err();
        }
        if failure.is_none() && s.starts_with("client_encoding_") {
            failure = check_text_placement(&c, "drv_enc", 3).await.err();
        }
        let known = KNOWN_FAILURES
            .iter()
            .find(|k| k.driver == d && k.shards == shards && k.scenario == s);
        match (known, failure) {
            (None, None) => {}
            (None, Some(f)) => problems.push(format!("{s}: {f}")),
            (Some(k), Some(f)) if f.contains(k.fails_with) => {
                known_seen.push(format!("{s} ({}): {f}", k.known_failure))
            }
            (Some(k), Some(f)) => problems.push(format!(
                "{s} fails otherwise than listed in KNOWN_FAILURES (expected {:?}): {f}",
                k.fails_with
            )),
            (Some(k), None) => problems.push(format!(
                "{s} passes now but is listed as a known failure ({}): remove it from KNOWN_FAILURES",
                k.known_failure
            )),
        }
    }
    eprintln!(
        "{d:?} through {shards} shard(s): {} scenarios in {:?}; known failures still failing: {known_seen:#?}",
        d.scenarios().len(),
        started.elapsed()
    );
    assert!(
        problems.is_empty(),
        "{d:?} through a {shards}-shard node:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_one_shard() {
    check(Driver::Psycopg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_two_shards() {
    check(Driver::Psycopg, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_one_shard() {
    check(Driver::Asyncpg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_two_shards() {
    check(Driver::Asyncpg, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_one_shard() {
    check(Driver::NodePg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_two_shards() {
    check(Driver::NodePg, 2).await;
}

/// A driver environment that cannot be prepared fails the test in CI and
/// skips elsewhere (with the reason printed).
#[test]
fn missing_driver_env_fails_in_ci_and_skips_elsewhere() {
    let err = || Err::<PathBuf, _>("registry unreachable".to_string());
    assert_eq!(drivers::require_in(false, "x", err()), None);
    let panic = std::panic::catch_unwind(|| drivers::require_in(true, "the venv", err()))
        .expect_err("CI must fail");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("the venv could not be prepared") && msg.contains("registry unreachable"),
        "{msg}"
    );
    assert_eq!(
        drivers::require_in(true, "x", Ok(PathBuf::from("/p"))),
        Some(PathBuf::from("/p"))
    );
}
