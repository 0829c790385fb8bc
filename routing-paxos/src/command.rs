//! Catalog commands: the entries of the replicated log.
//!
//! A [`CatalogCommand`] says what an operator (or a later job: reshard, 2PC)
//! wants to change. It is data only — names are plain strings, validated
//! when the command is applied ([`crate::Catalog::apply`]), so a malformed
//! command is still a well-formed log entry that every replica rejects in the
//! same way. Commands are serde types: they travel between nodes and sit on
//! disk.
//!
//! Commands that name a range name it by its exact bounds ([`Span`]): a
//! command written against one state of the catalog is rejected, not
//! misapplied, once that range was split or merged by someone else.

use std::fmt;

use hotrepart_router::catalog::{FunctionId, KeyType, RoutingFunction, Span};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Identifies one freeze of a range (chosen by whoever freezes it, e.g. a
/// reshard job). Unfreezing needs the same id, so a stale job cannot thaw
/// a range that another job froze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FreezeId(pub u64);

impl FreezeId {
    /// The freeze of reshard job `job`'s cut-over: the same on every node
    /// and across restarts (FNV-1a of the id, top bit set), so the catalog
    /// can tell a job's freeze from any other (`JobUpdate` to Flipped
    /// requires it; an operator's `UnfreezeRange` of it is refused while
    /// the job lives).
    pub fn for_job(job: &str) -> FreezeId {
        let h = job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
        });
        FreezeId(h | 1 << 63)
    }
}

impl fmt::Display for FreezeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "freeze#{}", self.0)
    }
}

/// A shard's connection string. It may hold a password, so `Debug` does not
/// print it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dsn(pub String);

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Dsn {
    fn from(s: &str) -> Dsn {
        Dsn(s.to_owned())
    }
}

/// A sharded table's declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    /// Table name, as the SQL layer normalises it.
    pub table: String,
    /// The shard-key column.
    pub key_column: String,
    /// The key column's type.
    #[serde(with = "KeyTypeDef")]
    pub key_type: KeyType,
    /// How keys map to points.
    #[serde(with = "RoutingFunctionDef")]
    pub function: RoutingFunction,
}

/// The binary module of a WebAssembly routing function (docs/WASM_ABI.md).
/// Serialised as lowercase hex; `Debug` prints its size and id, not the
/// bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WasmModule(#[serde(with = "bytes_hex")] pub Vec<u8>);

impl WasmModule {
    /// The function's id: SHA-256 of the module.
    pub fn id(&self) -> FunctionId {
        FunctionId(Sha256::digest(&self.0).into())
    }
}

impl fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes, {}>", self.0.len(), self.id().short())
    }
}

impl From<Vec<u8>> for WasmModule {
    fn from(v: Vec<u8>) -> WasmModule {
        WasmModule(v)
    }
}

/// A routing function in a [`CatalogSeed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The function's name.
    pub name: String,
    /// Its binary module, validated (compiled, trial-called) before it was
    /// proposed.
    pub wasm: WasmModule,
}

/// A shard in a [`CatalogSeed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Shard name.
    pub shard: String,
    /// Its connection string.
    pub dsn: Dsn,
}

/// A range in a [`CatalogSeed`]; status Active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSpec {
    /// The range's bounds.
    #[serde(with = "SpanDef")]
    pub range: Span,
    /// Shard serving reads.
    pub read_owner: String,
    /// Shard receiving writes.
    pub write_owner: String,
}

/// A whole initial catalog, as a node's configuration file describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSeed {
    /// All shards.
    pub shards: Vec<ShardSpec>,
    /// Shard holding undeclared tables.
    pub home_shard: String,
    /// Sharded tables.
    pub sharded: Vec<TableSpec>,
    /// Reference tables.
    pub reference: Vec<String>,
    /// Ranges covering the whole point space.
    pub ranges: Vec<RangeSpec>,
    /// WebAssembly routing functions, by name (tables name them by id:
    /// `RoutingFunction::Wasm`).
    #[serde(default)]
    pub functions: Vec<FunctionSpec>,
}

/// What a reshard job moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The range's exact bounds.
    #[serde(with = "SpanDef")]
    pub range: Span,
    /// Its write owner when the job starts.
    pub from: String,
    /// The shard it moves to.
    pub to: String,
}

/// The phases of a reshard job, in order (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Recorded; the capture (slot, publication) is next.
    Planned,
    /// Copying the range's rows from a snapshot taken after the slot.
    Copy,
    /// Applying the changes made since, from the slot.
    CatchUp,
    /// Range frozen: last changes, verification, flip of the owner.
    CutOver,
    /// The owner is flipped and the range thawed: the target owns it.
    Flipped,
    /// Abort requested (before the flip): the target's copy is removed.
    Aborting,
    /// Done: the source's copy removed, capture dropped.
    Done,
    /// Aborted: the source as it was, nothing left on the target.
    Aborted,
    /// Failed: see the note; the range is Active with its owner of the
    /// time (capture dropped).
    Failed,
}

impl JobPhase {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobPhase::Done | JobPhase::Aborted | JobPhase::Failed)
    }
    /// Name for output.
    pub fn name(self) -> &'static str {
        match self {
            JobPhase::Planned => "planned",
            JobPhase::Copy => "copy",
            JobPhase::CatchUp => "catch_up",
            JobPhase::CutOver => "cut_over",
            JobPhase::Flipped => "flipped",
            JobPhase::Aborting => "aborting",
            JobPhase::Done => "done",
            JobPhase::Aborted => "aborted",
            JobPhase::Failed => "failed",
        }
    }
}

/// One change to the catalog: an entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CatalogCommand {
    /// Creates the catalog from a node's configuration in one step. Accepted
    /// only while the catalog is empty, so every node may propose its seed
    /// when a cluster is first created: the first one in the log wins and
    /// the others are rejected.
    Bootstrap(CatalogSeed),
    /// Adds a shard. The first shard of an empty catalog becomes the home
    /// shard and owns the whole point space (one range).
    AddShard {
        /// Shard name.
        shard: String,
        /// Its connection string.
        dsn: Dsn,
    },
    /// Removes a shard that owns no range and is not the home shard.
    RemoveShard {
        /// Shard name.
        shard: String,
    },
    /// Declares a sharded table (metadata only: declaring a table that
    /// already holds rows elsewhere is the operator's business).
    DeclareSharded(TableSpec),
    /// Declares a reference table.
    DeclareReference {
        /// Table name.
        table: String,
    },
    /// Splits the active range `range` into `[lo, at)` and `[at, hi)`; both
    /// keep the owners.
    SplitRange {
        /// The range's exact current bounds.
        #[serde(with = "SpanDef")]
        range: Span,
        /// First point of the upper half; strictly inside the range.
        at: u64,
    },
    /// Sets the owners of a range (metadata only; moving rows is a reshard
    /// job). Allowed while the range is frozen: that is the cut-over.
    AssignRange {
        /// The range's exact current bounds.
        #[serde(with = "SpanDef")]
        range: Span,
        /// New read owner.
        read_owner: String,
        /// New write owner.
        write_owner: String,
    },
    /// Stops writes to a range (writers wait).
    FreezeRange {
        /// The range's exact current bounds.
        #[serde(with = "SpanDef")]
        range: Span,
        /// Identifies this freeze.
        freeze: FreezeId,
    },
    /// Ends the freeze `freeze` of a range; the range gets back the status
    /// it had before. An operator's unfreeze (`operator`) of the freeze of
    /// a reshard job that has not ended ([`FreezeId::for_job`]) is refused:
    /// it would let writes reach the source while the job verifies and
    /// flips; the job's runner lifts its freeze itself. (A marker on the
    /// operator's command rather than on the runner's, so that entries
    /// already in a log apply as they always did.)
    UnfreezeRange {
        /// The range's exact current bounds.
        #[serde(with = "SpanDef")]
        range: Span,
        /// The freeze being ended.
        freeze: FreezeId,
        /// Asked by an operator (`proxyctl range unfreeze`), not by the
        /// holder of the freeze.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        operator: bool,
    },
    /// Stores the WebAssembly routing function `wasm` under `name` (by id,
    /// the module's SHA-256). The module must be validated *before* it is
    /// proposed (`udf_wasm::Function::compile`): applying does no
    /// compilation. Uploading the same bytes again is accepted and changes
    /// nothing; other bytes under a name some table uses are refused (that
    /// would move rows: re-partitioning). Never changes the routing table
    /// or the epoch.
    UploadFunction {
        /// The function's name.
        name: String,
        /// The binary module.
        wasm: WasmModule,
    },
    /// Forgets the function `name`; refused while a table uses it.
    RemoveFunction {
        /// The function's name.
        name: String,
    },
    /// Sets the routing function of sharded table `table` (a WebAssembly
    /// function is named by id, and must be uploaded). Metadata only: the
    /// caller (the admin layer) must have checked that the table is empty
    /// on every shard before proposing — for a table with rows this is a
    /// re-partitioning job, never a flip. The catalog cannot check that
    /// (it does no I/O). Setting the function it already has changes
    /// nothing.
    SetTableFunction {
        /// The sharded table.
        table: String,
        /// Its new routing function.
        #[serde(with = "RoutingFunctionDef")]
        function: RoutingFunction,
    },
    /// Starts a reshard job moving the rows of one range to another shard.
    /// Accepted only for an active range whose write owner is `spec.from`;
    /// the range becomes Moving (no split, no second job) until the job
    /// ends.
    JobStart {
        /// The job's id (`[a-z0-9_]`, unique for the life of the catalog).
        job: String,
        /// What it moves.
        spec: JobSpec,
    },
    /// Records a reshard job's progress: its phase (phases only go forward;
    /// Aborting, Aborted and Failed only before the flip — or Aborted and
    /// Failed after Aborting), the node running it, and figures. Flipped
    /// (from CutOver) flips the owner and is accepted only while the range
    /// is frozen by the job's own freeze ([`FreezeId::for_job`]). Ending
    /// the job (Done, Aborted, Failed) makes its range Active again.
    JobUpdate {
        /// The job.
        job: String,
        /// Its new phase (the same phase again records progress).
        phase: JobPhase,
        /// The node running it.
        owner: u64,
        /// Rows copied so far.
        rows_copied: u64,
        /// Replication lag of the catch-up, in bytes.
        lag_bytes: u64,
        /// Free text: the error of a Failed job, the last step.
        note: String,
    },
    /// Records the outcome of a two-phase-commit transaction. The first
    /// decision for a `gid` in the log is final.
    TxDecision {
        /// The prepared transaction's GID (PostgreSQL: at most 199 bytes).
        gid: String,
        /// `true`: COMMIT PREPARED everywhere; `false`: ROLLBACK PREPARED.
        commit: bool,
        /// The coordinator's [`Catalog::decision_horizon`](crate::Catalog::decision_horizon),
        /// read before its first PREPARE: the decision is refused
        /// ([`Rejected::DecisionTooLate`](crate::Rejected)) when a decision
        /// recorded after that point was swept since (it may have been this
        /// gid's). `None`: no check (the resolver's rollback of a gid it
        /// found prepared, always consistent with a swept decision).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Forgets 2PC decisions that no shard can need any more (at most
    /// [`MAX_FORGET`] gids; gids not held are skipped). Replicated, so every
    /// node forgets the same ones. `swept: false` — reported by the
    /// coordinator that ran the final COMMIT/ROLLBACK PREPARED on every
    /// shard it prepared, and which never asks about the gid again.
    /// `swept: true` — found by the resolver: held on no shard, the
    /// coordinator possibly still alive; this raises the decision horizon,
    /// so that a coordinator that prepared before it cannot record a
    /// decision afterwards (its gid's decision may have been forgotten).
    ForgetDecisions {
        /// The transactions.
        gids: Vec<String>,
        /// Found by the resolver's sweep (see above).
        swept: bool,
    },
    /// The schema of `database` changed on the shards (DDL that went
    /// through a node has committed): every node forgets what it learned of
    /// that database's catalog — namespaces, views over sharded tables,
    /// function bodies, collations, type OIDs, validated statements —
    /// before it routes its next statement. The node that ran the DDL
    /// proposes it before its client sees the end of the transaction, and
    /// waits until every node with a lease has applied it. Never changes
    /// the routing table or the epoch.
    SchemaChanged {
        /// The database (PostgreSQL: at most 63 bytes).
        database: String,
    },
}

/// Most gids one [`CatalogCommand::ForgetDecisions`] names (one log entry
/// of at most ~200 KiB: well under the transport's frame limit).
pub const MAX_FORGET: usize = 1024;

impl CatalogCommand {
    /// Short name of the command kind, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CatalogCommand::Bootstrap(_) => "bootstrap",
            CatalogCommand::AddShard { .. } => "add_shard",
            CatalogCommand::RemoveShard { .. } => "remove_shard",
            CatalogCommand::DeclareSharded(_) => "declare_sharded",
            CatalogCommand::DeclareReference { .. } => "declare_reference",
            CatalogCommand::SplitRange { .. } => "split_range",
            CatalogCommand::AssignRange { .. } => "assign_range",
            CatalogCommand::FreezeRange { .. } => "freeze_range",
            CatalogCommand::UnfreezeRange { .. } => "unfreeze_range",
            CatalogCommand::UploadFunction { .. } => "upload_function",
            CatalogCommand::RemoveFunction { .. } => "remove_function",
            CatalogCommand::SetTableFunction { .. } => "set_table_function",
            CatalogCommand::TxDecision { .. } => "tx_decision",
            CatalogCommand::ForgetDecisions { .. } => "forget_decisions",
            CatalogCommand::JobStart { .. } => "job_start",
            CatalogCommand::JobUpdate { .. } => "job_update",
            CatalogCommand::SchemaChanged { .. } => "schema_changed",
        }
    }
}

// serde mirrors of the router's catalog types: the router stays free of
// serde, and the wire format of the log is fixed here, next to the commands.

#[derive(Serialize, Deserialize)]
#[serde(remote = "KeyType", rename_all = "snake_case")]
enum KeyTypeDef {
    Int2,
    Int4,
    Int8,
    Text,
    Uuid,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "RoutingFunction", rename_all = "snake_case")]
enum RoutingFunctionDef {
    PgHash {
        seed: u64,
    },
    Wasm {
        #[serde(with = "function_id_hex")]
        id: FunctionId,
    },
}

/// Bytes as lowercase hex (compact enough for modules of a few KiB, and
/// readable in any serde format without a base64 dependency).
mod bytes_hex {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(b.len() * 2);
        for &x in b {
            out.push(HEX[usize::from(x >> 4)] as char);
            out.push(HEX[usize::from(x & 15)] as char);
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd number of hex digits"));
        }
        s.as_bytes()
            .chunks_exact(2)
            .map(|p| {
                let digit = |c: u8| (c as char).to_digit(16);
                match (digit(p[0]), digit(p[1])) {
                    (Some(h), Some(l)) => Ok((h << 4 | l) as u8),
                    _ => Err(D::Error::custom("invalid hex digit")),
                }
            })
            .collect()
    }
}

/// A [`FunctionId`] as 64 lowercase hex digits.
mod function_id_hex {
    use hotrepart_router::catalog::FunctionId;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &FunctionId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FunctionId, D::Error> {
        let s = String::deserialize(d)?;
        FunctionId::from_hex(&s).ok_or_else(|| {
            D::Error::custom(format!("invalid function id {s:?}: expected 64 hex digits"))
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "Span")]
struct SpanDef {
    lo: u64,
    hi: Option<u64>,
}
