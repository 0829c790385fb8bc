//! The data-movement engine of `proxyctl reshard`: moves the rows of one key
//! range of a set of sharded tables from a source PostgreSQL to a target
//! PostgreSQL while the application keeps writing to the source.
//!
//! The engine knows nothing of the catalog: the caller (the reshard job,
//! whose state lives in the replicated log) runs the steps in order and
//! records which one finished. Every step is idempotent, so a job resumed by
//! another node after a crash at any point may simply re-run the step that
//! was running:
//!
//! 1. [`check_preconditions`]: logical WAL, a free slot, a usable replica
//!    identity on the source; the table on the target (created from the
//!    source's definition when absent).
//! 2. [`start_capture`]: publication `hr_<job>`, then logical slot
//!    `hr_<job>` (pgoutput). Both kept when they exist.
//! 3. [`copy`]: per table, in one target transaction: delete the range's
//!    rows on the target, then the source's binary `COPY … TO STDOUT`,
//!    filtered tuple by tuple in Rust, streamed into `COPY … FROM STDIN`
//!    (rows untouched).
//! 4. [`catch_up`] (repeatedly): peek the slot's changes, keep those whose key
//!    lies in the range, apply them as upserts and deletes by primary key in
//!    one target transaction, then advance the slot.
//! 5. [`verify`]: row count and an order-independent checksum per table on
//!    both sides.
//! 6. after the flip: [`stop_capture`], then [`cleanup_source`]. To abort
//!    before the flip: [`abort_target`] and [`stop_capture`].
//!
//! Owners: the engine knows no catalog, but asks its caller's
//! [`OwnerGuard`] (`MoveSpec::guard`) right before every statement that
//! deletes or overwrites rows of the range — each cleanup batch, and the
//! commit of the abort, of the copy's clearing of the target and of each
//! catch-up batch — and refuses ([`ReshardError::Owner`]) when the server's
//! shard owns the range now.
//!
//! Range membership: every step decides whether a row is in the range in
//! Rust, with [`MoveSpec::contains`] — the router's own code placing the
//! row's shard key (`RoutingFunction::point`), so built-in hashing and
//! WebAssembly routing functions move alike, and a row moves exactly when
//! queries for its key are routed by the range. When the table's function
//! has an SQL form (built-in hashing) the steps also send the range
//! predicate to PostgreSQL as a pre-filter, so that the servers send fewer
//! rows; it never decides anything the Rust check would not. Per step: copy
//! decodes the key of each tuple of the binary stream; catch-up parses the
//! key of each change; verify streams `(key, row hash)` and sums those in
//! the range; [`cleanup_source`], [`abort_target`] and the copy's clearing
//! of the target stream the table's distinct keys and delete the range's
//! ones by key, in batches (same key, same point: deleting by key is exact).
//! A NULL shard key has no point: such a row is in no range and never moves.
//!
//! Cancellation: every step may be dropped at any `.await` (that is how the
//! tests simulate a crash): its connections close, PostgreSQL rolls back
//! the open target transaction, and re-running the step is correct. A
//! dropped step may leave its server session running for a moment (a slot
//! still "active"): the next step waits for it (up to 30 s).
//!
//! Why nothing is missed: the slot exists before the copy starts, so every
//! transaction that commits after the copy's snapshot is in the slot; a
//! change that is both in the copy and in the slot is applied again, which is
//! harmless because every change is applied as "make the row with this key
//! look like this" (upsert) or "make it absent" (delete), in commit order:
//! the last change of each key decides its final state, as on the source.
//! The slot is advanced only after the target committed (at least once);
//! with idempotent apply that is exactly-once in effect.

mod apply;
mod copy;
pub mod pgoutput;
mod schema;
mod verify;

use crate::sql::{quote_ident, quote_table};
use futures_util::TryStreamExt;
use hotrepart_router::catalog::{
    Functions, KeyRange, KeyType, KeyValue, RoutingFunction, ShardId, Span,
};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio_postgres::Client;
use tracing::Instrument;

pub use schema::TableInfo;
pub use verify::{Baseline, KeyCheck, Touched};

/// One sharded table whose rows in the range move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMove {
    /// Table name, optionally schema-qualified (`schema.table`); each part is
    /// taken literally (quoted in SQL).
    pub name: String,
    /// The shard-key column.
    pub key_column: String,
    /// Its type, as in the catalog.
    pub key_type: KeyType,
    /// The routing function of the table.
    pub function: RoutingFunction,
}

/// Whether a server owns the range now. The engine knows no catalog: its
/// caller (the reshard job) answers from the current routing table.
/// Asked right before every statement that deletes or overwrites rows of
/// the range on a server — each batch of [`cleanup_source`] (source), the
/// commit of [`abort_target`], of the copy's clearing of the target and
/// of every catch-up batch (target) — and `Err(why)` refuses it
/// ([`ReshardError::Owner`]): nothing deletes a range's rows on the shard
/// that owns the range (read or write owner), whatever the job's runner
/// believes about its phase.
#[derive(Clone)]
pub struct OwnerGuard(Arc<OwnerCheck>);

type OwnerCheck = dyn Fn(Side) -> Result<(), String> + Send + Sync;

impl OwnerGuard {
    /// A guard answering with `check`: `Err(why)` when the server on that
    /// side owns the range now.
    pub fn new(check: impl Fn(Side) -> Result<(), String> + Send + Sync + 'static) -> OwnerGuard {
        OwnerGuard(Arc::new(check))
    }

    fn check(&self, spec: &MoveSpec, side: Side) -> Result<(), ReshardError> {
        (self.0)(side).map_err(|reason| ReshardError::Owner {
            side,
            range: spec.range,
            reason,
        })
    }
}

impl fmt::Debug for OwnerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnerGuard")
    }
}

impl PartialEq for OwnerGuard {
    fn eq(&self, other: &OwnerGuard) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OwnerGuard {}

/// What one job moves, from where to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveSpec {
    /// `[a-z0-9_]{1,60}`; names the slot and the publication: `hr_<job>`.
    pub job: String,
    /// libpq-style connection string (URL or key=value) of the source server.
    pub source_dsn: String,
    /// Connection string of the target server.
    pub target_dsn: String,
    /// The database on both servers (overrides a dbname in the DSNs).
    pub database: String,
    /// The tables; all share the range's point space.
    pub tables: Vec<TableMove>,
    /// The range of points whose rows move.
    pub range: Span,
    /// Implementations of the WebAssembly routing functions the tables use
    /// (those of the node's published routing table).
    pub functions: Functions,
    /// Asked before every delete or overwrite of the range's rows.
    pub guard: OwnerGuard,
}

impl MoveSpec {
    /// Name of the replication slot and of the publication.
    pub fn capture_name(&self) -> String {
        format!("hr_{}", self.job)
    }

    /// Whether `key`, a shard key of table `t`, lies in the range: its
    /// point by the table's routing function, computed by the router's own
    /// code (the same call that routes queries), built-in or WebAssembly.
    pub fn contains(&self, t: &TableMove, key: &KeyValue) -> Result<bool, ReshardError> {
        let point = t
            .function
            .point(t.key_type, key, &self.functions)
            .map_err(|e| ReshardError::Table {
                table: t.name.clone(),
                problem: e.to_string(),
            })?;
        Ok(self.range.contains(point))
    }

    fn validate(&self) -> Result<(), ReshardError> {
        let ok = !self.job.is_empty()
            && self.job.len() <= 60
            && self
                .job
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(ReshardError::Spec(format!(
                "job name {:?} must be 1 to 60 characters of [a-z0-9_]",
                self.job
            )));
        }
        if self.tables.is_empty() {
            return Err(ReshardError::Spec("no table to move".into()));
        }
        if self.range.is_empty() {
            return Err(ReshardError::Spec(format!("empty range {}", self.range)));
        }
        for t in &self.tables {
            if let RoutingFunction::Wasm { id } = t.function {
                if self.functions.get(&id).is_none() {
                    return Err(ReshardError::Table {
                        table: t.name.clone(),
                        problem: format!(
                            "its WebAssembly routing function {id} is not loaded on this node (no implementation to place its rows)"
                        ),
                    });
                }
            }
            if !t.function.supports(t.key_type) {
                return Err(ReshardError::Table {
                    table: t.name.clone(),
                    problem: format!(
                        "routing function {} does not support key type {}",
                        t.function,
                        t.key_type.sql_name()
                    ),
                });
            }
        }
        Ok(())
    }

    /// SQL predicate selecting the rows of `t` in the range, with the
    /// router's own hash expression, when the table's function has an SQL
    /// form (`None` for a WebAssembly function). Only a pre-filter: which
    /// rows are in the range is decided by [`MoveSpec::contains`].
    fn prefilter(&self, t: &TableMove) -> Option<String> {
        let hash = t
            .function
            .sql_hash(t.key_type, &quote_ident(&t.key_column))?;
        // KeyRange carries the predicate code; the owner is irrelevant here.
        let owner = ShardId::new("reshard").ok()?;
        Some(KeyRange::active(self.range.lo, self.range.hi, owner).sql_predicate(&hash))
    }

    /// ` WHERE <pre-filter>`, or nothing.
    fn where_prefilter(&self, t: &TableMove) -> String {
        self.prefilter(t)
            .map(|p| format!(" WHERE {p}"))
            .unwrap_or_default()
    }
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Why a step failed. Messages name the table and the problem; they never
/// contain the DSNs (which may hold passwords).
#[derive(Debug, Error)]
pub enum ReshardError {
    #[error("invalid reshard job: {0}")]
    Spec(String),
    #[error("cannot connect to the {side} server: {source}")]
    Connect {
        side: Side,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} on the {side} server failed: {source}")]
    Sql {
        side: Side,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{side} server: {problem}")]
    Server { side: Side, problem: String },
    #[error("table {table}: {problem}")]
    Table { table: String, problem: String },
    #[error("table {table} was truncated on the source during the move; the job is refused (abort it and start again)")]
    Truncated { table: String },
    #[error("capture {0} has not been started (no replication slot)")]
    NoCapture(String),
    #[error("the replication slot {0} still exists: stop the capture before cleaning up the source (a catch-up after the cleanup would delete the moved rows from the target)")]
    CaptureActive(String),
    #[error(
        "refusing to delete or overwrite rows of range {range} on the {side} server: {reason}"
    )]
    Owner {
        side: Side,
        range: Span,
        reason: String,
    },
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
}

/// Result of one [`catch_up`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CatchUp {
    /// Changes in the range applied to the target.
    pub applied: u64,
    /// Changes decoded but outside the range (not applied).
    pub skipped: u64,
    /// `pg_current_wal_insert_lsn() - confirmed_flush_lsn` after the call
    /// (the insert position, not the write position: an asynchronous commit
    /// may be inserted but not yet written).
    pub remaining_lag_bytes: u64,
    /// Every change committed on the source before the call started was
    /// applied (the call was not cut short by `max_changes`). This, not a
    /// lag of 0, is what a cut-over waits for once the range's writes are
    /// frozen: the lag counts all WAL of the server, also other tables' and
    /// databases' writes, and may never reach 0 on a busy server.
    pub drained: bool,
}

/// The check of one table by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    pub table: String,
    pub source_count: i64,
    pub target_count: i64,
    /// Sum of `hashtextextended(ROW(columns)::text, 0)` over the range's rows.
    pub source_sum: i128,
    pub target_sum: i128,
    pub equal: bool,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verify {
    pub tables: Vec<TableCheck>,
}

impl Verify {
    /// Whether every table is equal on both sides.
    pub fn equal(&self) -> bool {
        self.tables.iter().all(|t| t.equal)
    }
}

/// Settings of every engine session. The same text formats on both sides,
/// so values read from one side (pgoutput, verify) mean the same on the
/// other; synchronous commit so a target commit is durable before the slot
/// moves past its changes (test and some production servers run
/// `synchronous_commit = off`).
const SESSION_SETUP: &str = "SET standard_conforming_strings = on; SET DateStyle = 'ISO, YMD'; \
     SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; SET statement_timeout = 0; SET synchronous_commit = on; \
     SET client_encoding = 'UTF8'";

async fn connect(spec: &MoveSpec, side: Side) -> Result<Client, ReshardError> {
    let dsn = match side {
        Side::Source => &spec.source_dsn,
        Side::Target => &spec.target_dsn,
    };
    let (mut cfg, tls) = crate::control::pg::parse_dsn(dsn)
        .map_err(|_| ReshardError::Spec(format!("the {side} connection string is not valid")))?;
    cfg.dbname(&spec.database);
    cfg.application_name(format!("hotrepart-reshard-{}", spec.job));
    let what = match side {
        Side::Source => "reshard source",
        Side::Target => "reshard target",
    };
    let client = crate::control::pg::connect_config(&cfg, &tls, what)
        .await
        .map_err(|source| ReshardError::Connect { side, source })?;
    client
        .batch_execute(SESSION_SETUP)
        .await
        .map_err(sql(side, "session setup"))?;
    Ok(client)
}

fn sql(side: Side, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ReshardError {
    let what = what.into();
    move |source| ReshardError::Sql { side, what, source }
}

fn is_object_in_use(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
}

/// How long a step waits for a slot still held by a session that died
/// (PostgreSQL notices a vanished client only when it next talks to it).
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(30);

fn span(spec: &MoveSpec, step: &'static str) -> tracing::Span {
    tracing::info_span!("reshard", job = %spec.job, step)
}

/// Checks that the job can run, and prepares the target: `wal_level =
/// logical` on the source, a free replication slot (or this job's own), every
/// table present on the source with a primary key (or a unique replica
/// identity index) and a replica identity that contains the shard key (or
/// `REPLICA IDENTITY FULL`); on the target, each table is created from the
/// source's definition when absent, and otherwise must have the same columns
/// with the same types and a unique index on the same key. Idempotent.
pub async fn check_preconditions(spec: &MoveSpec) -> Result<(), ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        let dst = connect(spec, Side::Target).await?;
        schema::check_source_server(&src, spec).await?;
        for t in &spec.tables {
            let info = schema::describe_source(&src, t).await?;
            schema::ensure_target(&dst, t, &info).await?;
        }
        Ok(())
    }
    .instrument(span(spec, "preconditions"))
    .await
}

/// Creates the publication `hr_<job>` for the tables, then the logical
/// replication slot `hr_<job>` (pgoutput). Both are kept when they exist
/// (a resumed job). The slot is created before any copy, so every change
/// committed after a copy's snapshot is in it. Re-checks the source's
/// replica identities first: publishing a table without one would make the
/// application's UPDATEs and DELETEs on the source fail.
pub async fn start_capture(spec: &MoveSpec) -> Result<(), ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        schema::check_source_server(&src, spec).await?;
        let mut infos = Vec::new();
        for t in &spec.tables {
            infos.push(schema::describe_source(&src, t).await?);
        }
        let name = spec.capture_name();
        // The publication must exist before the slot: pgoutput looks it up
        // as of each decoded transaction.
        let exists = src
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(sql(Side::Source, "reading pg_publication"))?
            .is_some();
        if !exists {
            let tables: Vec<String> = infos.iter().map(|i| i.qualified.clone()).collect();
            let create = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&name),
                tables.join(", ")
            );
            if let Err(e) = src.batch_execute(&create).await {
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                    return Err(sql(Side::Source, "CREATE PUBLICATION")(e));
                }
            }
        }
        for info in &infos {
            let has = src
                .query_opt(
                    "SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                     WHERE p.pubname = $1 AND pr.prrelid = $2",
                    &[&name, &info.oid],
                )
                .await
                .map_err(sql(Side::Source, "reading pg_publication_rel"))?
                .is_some();
            if !has {
                return Err(ReshardError::Table {
                    table: info.name.clone(),
                    problem: format!("the existing publication {name} does not include it"),
                });
            }
        }
        let slot = src
            .query_opt(
                "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(sql(Side::Source, "reading pg_replication_slots"))?;
        match slot {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                let db: Option<String> = row.get(1);
                if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(&spec.database) {
                    return Err(ReshardError::Server {
                        side: Side::Source,
                        problem: format!(
                            "a replication slot {name} exists but is not a pgoutput slot of database {}",
                            spec.database
                        ),
                    });
                }
                tracing::info!(slot = %name, "replication slot exists; kept");
            }
            None => {
                let r = src
                    .execute(
                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&name],
                    )
                    .await;
                match r {
                    Ok(_) => tracing::info!(slot = %name, "replication slot created"),
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
                    Err(e) => return Err(sql(Side::Source, "creating the replication slot")(e)),
                }
            }
        }
        Ok(())
    }
    .instrument(span(spec, "start_capture"))
    .await
}

/// Copies the range's rows of every table (see the module docs); `progress`
/// is called with the total number of rows copied so far. Returns the
/// number of rows copied. Re-running it redoes the copy from scratch (the
/// range's rows on the target are deleted in the same transaction), so it
/// is safe after a crash; changes since the capture started are then
/// caught up from the slot as usual.
pub async fn copy(spec: &MoveSpec, progress: impl Fn(u64) + Sync) -> Result<u64, ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        let mut dst = connect(spec, Side::Target).await?;
        let keys = connect(spec, Side::Target).await?;
        let slot_exists = capture_exists(&src, spec).await?;
        if !slot_exists {
            return Err(ReshardError::NoCapture(spec.capture_name()));
        }
        let mut total = 0u64;
        for t in &spec.tables {
            let info = schema::describe_source(&src, t).await?;
            let n = copy::copy_table(spec, t, &src, &mut dst, &keys, &info, &|rows| {
                progress(total + rows)
            })
            .await?;
            total += n;
            tracing::info!(table = %t.name, rows = n, "table copied");
            progress(total);
        }
        Ok(total)
    }
    .instrument(span(spec, "copy"))
    .await
}

/// Applies up to about `max_changes` changes from the slot (whole source
/// transactions; a batch may exceed the bound by the rest of one
/// transaction) to the target in one transaction, then advances the slot.
/// A call made after the source stopped writing drains everything: the
/// source's WAL is flushed first (its commits may be asynchronous), and when
/// the call is not cut short the slot is advanced to the flush position
/// read before decoding, so the lag is then 0 unless something else writes
/// WAL. A TRUNCATE of a moved table is an error ([`ReshardError::Truncated`]).
pub async fn catch_up(spec: &MoveSpec, max_changes: usize) -> Result<CatchUp, ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        let mut dst = connect(spec, Side::Target).await?;
        let infos = describe_all(spec, &src).await?;
        let r = apply::catch_up(spec, &src, &mut dst, max_changes.max(1), None, &infos).await?;
        tracing::debug!(
            applied = r.applied,
            skipped = r.skipped,
            lag = r.remaining_lag_bytes,
            "catch-up batch"
        );
        Ok(r)
    }
    .instrument(span(spec, "catch_up"))
    .await
}

/// Both servers' connections of one job, kept open across the steps of a
/// cut-over (connecting costs milliseconds, and the writes are frozen).
pub struct Session {
    spec: MoveSpec,
    src: Client,
    dst: Client,
    /// The tables as described when the session opened (a table altered
    /// meanwhile fails the catch-up: its relation no longer binds).
    infos: Vec<TableInfo>,
}

async fn describe_all(spec: &MoveSpec, src: &Client) -> Result<Vec<TableInfo>, ReshardError> {
    let mut infos = Vec::new();
    for t in &spec.tables {
        infos.push(schema::describe_source(src, t).await?);
    }
    Ok(infos)
}

impl Session {
    /// Connects to both servers.
    pub async fn open(spec: &MoveSpec) -> Result<Session, ReshardError> {
        spec.validate()?;
        let (src, dst) =
            tokio::try_join!(connect(spec, Side::Source), connect(spec, Side::Target))?;
        let infos = describe_all(spec, &src).await?;
        Ok(Session {
            spec: spec.clone(),
            src,
            dst,
            infos,
        })
    }

    /// The job this session works for.
    pub fn spec(&self) -> &MoveSpec {
        &self.spec
    }

    /// The connection to the source server.
    pub fn source(&self) -> &Client {
        &self.src
    }

    /// [`catch_up`], recording in `touched` the shard key of every row it
    /// changes in the range.
    pub async fn catch_up(
        &mut self,
        max_changes: usize,
        touched: Option<&mut Touched>,
    ) -> Result<CatchUp, ReshardError> {
        let spec = &self.spec;
        apply::catch_up(
            spec,
            &self.src,
            &mut self.dst,
            max_changes.max(1),
            touched,
            &self.infos,
        )
        .instrument(span(spec, "catch_up"))
        .await
    }

    /// Compares the range row by row on both sides, while writes go on
    /// (the first half of the cut-over's verification; see
    /// `reshard::verify` module docs).
    pub async fn compare(&self) -> Result<Baseline, ReshardError> {
        verify::compare(&self.spec, &self.src, &self.dst, &self.infos)
            .instrument(span(&self.spec, "compare"))
            .await
    }

    /// Compares the rows of the given shard keys on both sides (the second
    /// half, inside the freeze).
    pub async fn verify_keys(&self, keys: &Touched) -> Result<KeyCheck, ReshardError> {
        verify::verify_keys(&self.spec, &self.src, &self.dst, &self.infos, keys)
            .instrument(span(&self.spec, "verify_keys"))
            .await
    }
}

/// Row count and checksum of the range's rows of every table on both
/// sides. Any missing, extra or different row makes the table unequal
/// (up to 64-bit hash collisions). Both sides stream `(key, row hash)` of
/// their rows (only the pre-filtered ones when the function has an SQL
/// form); the rows whose key [`MoveSpec::contains`] places in the range are
/// counted and summed here.
pub async fn verify(spec: &MoveSpec) -> Result<Verify, ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        let dst = connect(spec, Side::Target).await?;
        let mut tables = Vec::new();
        for t in &spec.tables {
            let info = schema::describe_source(&src, t).await?;
            let cols: Vec<String> = info.copy_columns().map(|c| quote_ident(&c.name)).collect();
            let q = format!(
                "SELECT {}::text, hashtextextended(ROW({})::text, 0) FROM {}{}",
                quote_ident(&t.key_column),
                cols.join(", "),
                info.qualified,
                spec.where_prefilter(t)
            );
            let (a, b) = tokio::join!(
                range_checksum(spec, t, &src, Side::Source, &q),
                range_checksum(spec, t, &dst, Side::Target, &q)
            );
            let ((source_count, source_sum), (target_count, target_sum)) = (a?, b?);
            tables.push(TableCheck {
                table: t.name.clone(),
                source_count,
                target_count,
                source_sum,
                target_sum,
                equal: source_count == target_count && source_sum == target_sum,
            });
        }
        Ok(Verify { tables })
    }
    .instrument(span(spec, "verify"))
    .await
}

/// Count and sum of the row hashes of the rows `q` streams (key as text,
/// row hash) whose key is in the range.
async fn range_checksum(
    spec: &MoveSpec,
    t: &TableMove,
    c: &Client,
    side: Side,
    q: &str,
) -> Result<(i64, i128), ReshardError> {
    let what = || format!("checksum of {}", t.name);
    let rows = c.query_raw(q, NO_PARAMS).await.map_err(sql(side, what()))?;
    futures_util::pin_mut!(rows);
    let (mut count, mut sum) = (0i64, 0i128);
    while let Some(row) = rows.try_next().await.map_err(sql(side, what()))? {
        let key: Option<&str> = row.try_get(0).map_err(sql(side, what()))?;
        let Some(key) = key else {
            continue; // a NULL key is in no range
        };
        if spec.contains(t, &parse_key(t, side, key)?)? {
            let hash: i64 = row.try_get(1).map_err(sql(side, what()))?;
            count += 1;
            sum += i128::from(hash);
        }
    }
    Ok((count, sum))
}

/// No statement parameters (for `query_raw`).
const NO_PARAMS: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];

/// A shard key of `t` read as text from `side`.
fn parse_key(t: &TableMove, side: Side, text: &str) -> Result<KeyValue, ReshardError> {
    KeyValue::parse(t.key_type, text).map_err(|e| ReshardError::Table {
        table: t.name.clone(),
        problem: format!("shard key {text:?} on the {side} server: {e}"),
    })
}

/// Keys per DELETE statement when clearing the range on the target.
pub(crate) const DELETE_BATCH: usize = 10_000;

/// Deletes the rows of `t` whose shard key lies in the range, on `side`:
/// `reader`, a connection to that server that is not `deleter`'s, streams
/// the table's distinct keys as text, in key order (pre-filtered in SQL
/// when the function has an SQL form); the keys [`MoveSpec::contains`] places in the range
/// are deleted through `deleter` by key, `batch` keys per statement. Every
/// row of a key has the key's point, so deleting by key is exact. Returns
/// the number of rows deleted.
pub(crate) async fn delete_range<C: tokio_postgres::GenericClient>(
    spec: &MoveSpec,
    t: &TableMove,
    side: Side,
    reader: &Client,
    deleter: &C,
    batch: usize,
) -> Result<u64, ReshardError> {
    let table = quote_table(&t.name);
    let key = quote_ident(&t.key_column);
    // In key order: an index on the key then yields the distinct keys as
    // it scans (no hashing of the whole range first), and each batch
    // deletes from one region of the index and the heap.
    let select = format!(
        "SELECT d.k::text FROM (SELECT DISTINCT {key} AS k FROM {table}{}) d ORDER BY d.k",
        spec.where_prefilter(t)
    );
    let delete = format!(
        "DELETE FROM {table} WHERE {key} = ANY($1::text[]::{}[])",
        t.key_type.sql_name()
    );
    let what = || format!("delete of the range of {}", t.name);
    let keys = reader
        .query_raw(&select, NO_PARAMS)
        .await
        .map_err(sql(side, what()))?;
    futures_util::pin_mut!(keys);
    let batch = batch.max(1);
    let mut pending: Vec<String> = Vec::new();
    let mut total = 0;
    loop {
        let row = keys.try_next().await.map_err(sql(side, what()))?;
        let done = row.is_none();
        if let Some(row) = row {
            let k: Option<String> = row.try_get(0).map_err(sql(side, what()))?;
            // A NULL key is in no range.
            if let Some(k) = k {
                if spec.contains(t, &parse_key(t, side, &k)?)? {
                    pending.push(k);
                }
            }
        }
        if pending.len() >= batch || (done && !pending.is_empty()) {
            spec.guard.check(spec, side)?;
            total += deleter
                .execute(&delete, &[&pending])
                .await
                .map_err(sql(side, what()))?;
            pending.clear();
        }
        if done {
            return Ok(total);
        }
    }
}

/// Deletes the range's rows from the source, by key, `batch` keys per
/// statement (each its own transaction, so locks and WAL stay small; see
/// [`delete_range`]). Returns the number of rows deleted by this call;
/// idempotent. Refused while the slot exists: these deletes are changes in
/// the range, and a catch-up after them would delete the moved rows from
/// the target.
pub async fn cleanup_source(spec: &MoveSpec, batch: usize) -> Result<u64, ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        if capture_exists(&src, spec).await? {
            return Err(ReshardError::CaptureActive(spec.capture_name()));
        }
        let reader = connect(spec, Side::Source).await?;
        let mut total = 0;
        for t in &spec.tables {
            total += delete_range(spec, t, Side::Source, &reader, &src, batch).await?;
        }
        tracing::info!(rows = total, "source cleaned up");
        Ok(total)
    }
    .instrument(span(spec, "cleanup_source"))
    .await
}

/// Deletes the range's rows from the target (abort before the flip; the
/// source is untouched), in one target transaction holding the job's lock.
/// Returns the number of rows deleted; idempotent.
pub async fn abort_target(spec: &MoveSpec) -> Result<u64, ReshardError> {
    spec.validate()?;
    async {
        let mut dst = connect(spec, Side::Target).await?;
        let reader = connect(spec, Side::Target).await?;
        let tx = dst
            .transaction()
            .await
            .map_err(sql(Side::Target, "BEGIN"))?;
        lock_job(&tx, spec).await?;
        let mut total = 0;
        for t in &spec.tables {
            let exists: bool = tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&quote_table(&t.name)],
                )
                .await
                .map_err(sql(Side::Target, "to_regclass"))?
                .get(0);
            if !exists {
                continue;
            }
            // The keys are read after the lock is held: every copy or
            // catch-up of this job that wrote the range has committed.
            total += delete_range(spec, t, Side::Target, &reader, &tx, DELETE_BATCH).await?;
        }
        spec.guard.check(spec, Side::Target)?;
        tx.commit().await.map_err(sql(Side::Target, "COMMIT"))?;
        tracing::info!(rows = total, "target range deleted (abort)");
        Ok(total)
    }
    .instrument(span(spec, "abort_target"))
    .await
}

/// Drops the slot, then the publication, when they exist. Idempotent; waits
/// for (and in the end terminates) a session still holding the slot, so no
/// slot is left behind to hold WAL on the source forever.
pub async fn stop_capture(spec: &MoveSpec) -> Result<(), ReshardError> {
    spec.validate()?;
    async {
        let src = connect(spec, Side::Source).await?;
        let name = spec.capture_name();
        let deadline = tokio::time::Instant::now() + SLOT_BUSY_WAIT;
        loop {
            let r = src
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await;
            match r {
                Ok(_) => break,
                Err(e) if is_object_in_use(&e) => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(slot = %name, "slot still in use; terminating its session");
                        src.execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE slot_name = $1 AND active_pid IS NOT NULL",
                            &[&name],
                        )
                        .await
                        .map_err(sql(Side::Source, "terminating the slot's session"))?;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(sql(Side::Source, "dropping the replication slot")(e)),
            }
        }
        src.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&name)))
            .await
            .map_err(sql(Side::Source, "DROP PUBLICATION"))?;
        tracing::info!(slot = %name, "capture stopped");
        Ok(())
    }
    .instrument(span(spec, "stop_capture"))
    .await
}

/// Serialises the steps that write a job's range on the target (copy,
/// catch-up, abort): each takes this transaction-scoped lock before it reads
/// anything from the source. Should two runners of one job overlap (a node
/// presumed dead that still has live sessions), their batches then apply
/// one after the other, each reading the slot after the previous one
/// committed, so a stale batch can never land after a newer one.
async fn lock_job(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &MoveSpec,
) -> Result<(), ReshardError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&spec.capture_name()],
    )
    .await
    .map_err(sql(Side::Target, "taking the job's lock"))?;
    Ok(())
}

async fn capture_exists(src: &Client, spec: &MoveSpec) -> Result<bool, ReshardError> {
    Ok(src
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&spec.capture_name()],
        )
        .await
        .map_err(sql(Side::Source, "reading pg_replication_slots"))?
        .is_some())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> MoveSpec {
        MoveSpec {
            job: "j1".into(),
            source_dsn: "host=a".into(),
            target_dsn: "host=b".into(),
            database: "postgres".into(),
            tables: vec![TableMove {
                name: "public.items".into(),
                key_column: "id".into(),
                key_type: KeyType::Int8,
                function: RoutingFunction::PgHash { seed: 0 },
            }],
            range: Span {
                lo: 0,
                hi: Some(1 << 62),
            },
            functions: Functions::new(),
            guard: OwnerGuard::new(|_| Ok(())),
        }
    }

    #[test]
    fn job_names_are_checked() {
        assert!(spec().validate().is_ok());
        for bad in ["", "Job", "a-b", "x;drop", &"a".repeat(61)] {
            let mut s = spec();
            s.job = bad.into();
            assert!(matches!(s.validate(), Err(ReshardError::Spec(_))), "{bad}");
        }
    }

    #[test]
    fn prefilter_uses_the_router_hash() {
        let s = spec();
        assert_eq!(
            s.prefilter(&s.tables[0]).as_deref(),
            Some("(hashint8extended(\"id\", 0) >= 0 AND hashint8extended(\"id\", 0) < 4611686018427387904)")
        );
    }

    /// Points are the key's integer value.
    #[derive(Debug)]
    struct Identity;

    impl hotrepart_router::catalog::PointFunction for Identity {
        fn point(&self, _: KeyType, key: &KeyValue) -> Result<u64, String> {
            key.as_i64()
                .map(|v| v as u64)
                .ok_or_else(|| "not an integer".into())
        }
    }

    #[test]
    fn webassembly_functions_move_when_loaded() {
        let id = hotrepart_router::catalog::FunctionId([7; 32]);
        let mut s = spec();
        s.tables[0].function = RoutingFunction::Wasm { id };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("public.items") && e.contains(&id.to_string()) && e.contains("not loaded"),
            "{e}"
        );
        s.functions.insert(id, std::sync::Arc::new(Identity));
        assert!(s.validate().is_ok());
        // No SQL form: no pre-filter; membership by the function's code.
        assert_eq!(s.prefilter(&s.tables[0]), None);
        assert_eq!(s.where_prefilter(&s.tables[0]), "");
        let t = &s.tables[0];
        assert!(s.contains(t, &KeyValue::Int8(5)).unwrap());
        assert!(s.contains(t, &KeyValue::Int8((1 << 62) - 1)).unwrap());
        assert!(!s.contains(t, &KeyValue::Int8(1 << 62)).unwrap());
        assert!(!s.contains(t, &KeyValue::Int8(-1)).unwrap());
        assert!(s.contains(t, &KeyValue::Text("x".into())).is_err());
    }
}
