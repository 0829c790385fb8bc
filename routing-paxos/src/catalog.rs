//! The catalog state machine: applies [`CatalogCommand`]s, one at a time, and
//! publishes a new [`RoutingSnapshot`] after each change of the routing table.
//!
//! # Guarantees
//!
//! * Deterministic: the result of [`Catalog::apply`] depends only on the
//!   catalog and the command — no clock, no randomness, no I/O, no hash-map
//!   iteration order. Replicas that apply the same commands in the same order
//!   hold equal catalogs.
//! * All or nothing: a command either changes the catalog as a whole
//!   ([`Applied`]) or leaves it exactly as it was ([`Rejected`], with the
//!   reason). A rejected command is still a log entry; it applies as a no-op
//!   on every replica.
//! * Every accepted command that changes the routing table produces a new,
//!   validated snapshot whose epoch is the previous one plus one (the first
//!   snapshot has epoch 1; an empty catalog has epoch 0). Key ranges
//!   therefore always tile the point space: an overlap or a gap cannot be
//!   built ([`hotrepart_router::catalog::SnapshotBuilder::build`] refuses it).
//! * 2PC decisions ([`CatalogCommand::TxDecision`]) are recorded beside the
//!   routing table and do not change the epoch: a new epoch empties every
//!   node's plan cache, and a decision per multi-shard commit must not do
//!   that. The first decision for a GID is final. Decisions no shard can
//!   need any more are forgotten in batches
//!   ([`CatalogCommand::ForgetDecisions`]); a coordinator that read the
//!   decision horizon before a sweep cannot decide afterwards.
//! * WebAssembly routing functions are stored beside the routing table, by
//!   name, as `(id = SHA-256 of the module, module)`. Tables name them by id
//!   (`RoutingFunction::Wasm`), and only ids that some name holds: a table
//!   can never refer to a module the catalog does not have. Uploading or
//!   removing a function does not change the routing table or the epoch;
//!   a name a table uses cannot be removed or get other bytes. The modules
//!   are not compiled here (no I/O, no compilation in `apply`): they are
//!   validated before they are proposed, and each node compiles them when
//!   it publishes a snapshot ([`Catalog::function_modules`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use hotrepart_router::catalog::{
    CatalogError, FunctionId, KeyRange, RangeStatus, RoutingFunction, RoutingSnapshot, Shard,
    ShardId, ShardedTable, Span,
};

use crate::command::{
    CatalogCommand, CatalogSeed, Dsn, FreezeId, JobPhase, JobSpec, TableSpec, WasmModule,
};

/// Longest PostgreSQL prepared-transaction GID, in bytes (`GIDSIZE` - 1).
pub const MAX_GID_LEN: usize = 199;

/// Largest WebAssembly module the catalog stores, in bytes. Every node keeps
/// every module in memory and in its log; routing functions are small (the
/// examples are 1–2 KB).
pub const MAX_FUNCTION_BYTES: usize = 4 << 20;

/// Longest function name, in bytes.
pub const MAX_FUNCTION_NAME_LEN: usize = 63;

/// A WebAssembly routing function stored in the catalog. `Debug` prints
/// the id and the size, not the module.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredFunction {
    /// SHA-256 of the module.
    pub id: FunctionId,
    /// The binary module (shared: snapshots of the catalog are cheap).
    pub wasm: Arc<[u8]>,
}

impl std::fmt::Debug for StoredFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredFunction({}, {} bytes)", self.id, self.wasm.len())
    }
}

/// The replicated catalog: the current routing snapshot plus what the
/// snapshot does not carry (who froze which range, 2PC decisions).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    /// `None` until the first shard is added (epoch 0).
    snapshot: Option<Arc<RoutingSnapshot>>,
    /// Frozen ranges by their `lo`. A frozen range cannot be split, so its
    /// `lo` identifies it for as long as the freeze lasts.
    freezes: BTreeMap<u64, Freeze>,
    /// Decided 2PC transactions: GID → commit (only those a shard may
    /// still need: see [`CatalogCommand::ForgetDecisions`]).
    decisions: BTreeMap<String, Decision>,
    /// 2PC decisions ever recorded (forgotten ones too).
    decisions_recorded: u64,
    /// A `TxDecision` whose `since` is below this is refused: a decision
    /// recorded after its coordinator read `since` was swept (the largest
    /// `seq` of a swept decision).
    decisions_swept_at: u64,
    /// Reshard jobs by id (finished ones too).
    jobs: BTreeMap<String, JobRecord>,
    /// WebAssembly routing functions by name.
    functions: BTreeMap<String, StoredFunction>,
    /// `SchemaChanged` entries applied (see [`Catalog::schema_generation`]).
    schema_generation: u64,
    /// Per database: the `schema_generation` of its last `SchemaChanged`.
    schema_changed: BTreeMap<String, u64>,
}

/// A recorded 2PC decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    commit: bool,
    /// `decisions_recorded` once it was recorded (1 for the first).
    seq: u64,
}

/// One freeze of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freeze {
    /// Who froze it.
    pub id: FreezeId,
    /// The status to restore on unfreeze.
    pub previous: RangeStatus,
}

/// What an accepted command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The routing table changed; this is the new snapshot, with the next
    /// epoch.
    Routing(Arc<RoutingSnapshot>),
    /// A 2PC decision was recorded; the routing table did not change.
    TxDecided {
        /// The transaction.
        gid: String,
        /// Its outcome.
        commit: bool,
    },
    /// 2PC decisions were forgotten; the routing table did not change.
    DecisionsForgotten {
        /// How many of the named gids the catalog held.
        count: usize,
    },
    /// A routing function was stored under `name` (new, or new bytes for a
    /// name no table uses); the routing table did not change.
    FunctionStored {
        /// The name.
        name: String,
        /// The module's id.
        id: FunctionId,
    },
    /// A routing function was forgotten; the routing table did not change.
    FunctionRemoved {
        /// The name.
        name: String,
    },
    /// The command asked for what already is (the same module uploaded
    /// again, a table's function set to the one it has): nothing changed.
    Unchanged,
    /// A reshard job's record changed; the routing table did not.
    JobUpdated {
        /// The job.
        job: String,
    },
    /// A database's schema changed; the routing table did not.
    SchemaChanged {
        /// The database.
        database: String,
        /// The catalog's `schema_generation` now.
        generation: u64,
    },
}

/// PostgreSQL's longest database name (NAMEDATALEN - 1).
const MAX_DATABASE_LEN: usize = 63;

/// A reshard job as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobRecord {
    /// What it moves.
    pub spec: JobSpec,
    /// Where it is.
    pub phase: JobPhase,
    /// The node that recorded the last update (0: none yet).
    pub owner: u64,
    /// Rows copied so far.
    pub rows_copied: u64,
    /// Catch-up lag in bytes at the last update.
    pub lag_bytes: u64,
    /// Last step or error.
    pub note: String,
    /// Log position of its start, for ordering.
    pub seq: u64,
}

/// Why a command was rejected. The catalog is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The command needs a catalog, and there is none yet.
    #[error("the catalog is empty: bootstrap it or add a shard first")]
    NoCatalog,
    /// Bootstrap on a catalog that already exists.
    #[error("the catalog already exists (epoch {epoch})")]
    AlreadyInitialised {
        /// Its epoch.
        epoch: u64,
    },
    /// The result would not be a valid catalog (bad names, duplicate
    /// tables, ranges that do not tile the space, …).
    #[error(transparent)]
    Invalid(#[from] CatalogError),
    /// AddShard of an existing shard.
    #[error("shard {0} already exists")]
    ShardExists(String),
    /// A command names a shard the catalog does not have.
    #[error("unknown shard {0:?}")]
    UnknownShard(String),
    /// RemoveShard of a shard that still reads or writes some range.
    #[error("shard {shard} still owns {count} key range(s), the first {first}; assign them elsewhere first")]
    ShardOwnsRanges {
        /// The shard.
        shard: String,
        /// How many ranges name it as read or write owner.
        count: usize,
        /// The first of them.
        first: Span,
    },
    /// RemoveShard of the home shard.
    #[error("shard {0} is the home shard of undeclared tables")]
    HomeShard(String),
    /// A table is declared already.
    #[error(
        "table {table:?} is already declared ({kind}); changing that is a re-partitioning job"
    )]
    TableDeclared {
        /// The table.
        table: String,
        /// "sharded" or "reference".
        kind: &'static str,
    },
    /// No range has exactly these bounds (it may have been split meanwhile).
    #[error("no key range is exactly {0}")]
    UnknownRange(Span),
    /// SplitRange at a point that is not strictly inside the range.
    #[error("split point {at} is not strictly inside key range {range}")]
    SplitOutside {
        /// The range.
        range: Span,
        /// The split point.
        at: u64,
    },
    /// SplitRange of a range that is frozen or moving.
    #[error("key range {range} is {status:?}; only an active range can be split")]
    RangeNotActive {
        /// The range.
        range: Span,
        /// Its status.
        status: RangeStatus,
    },
    /// FreezeRange of a frozen range.
    #[error("key range {range} is already frozen ({by})")]
    AlreadyFrozen {
        /// The range.
        range: Span,
        /// The current freeze.
        by: FreezeId,
    },
    /// UnfreezeRange of a range that is not frozen.
    #[error("key range {0} is not frozen")]
    NotFrozen(Span),
    /// UnfreezeRange with another freeze's id.
    #[error("key range {range} is frozen by {by}, not by {given}")]
    WrongFreeze {
        /// The range.
        range: Span,
        /// The current freeze.
        by: FreezeId,
        /// The id in the command.
        given: FreezeId,
    },
    /// An operator's UnfreezeRange of the freeze of a reshard job that has
    /// not ended.
    #[error("key range {range} is frozen by reshard job {job:?}, which has not ended: only the job lifts its own freeze (to end it, abort the job: `proxyctl jobs abort {job}`)")]
    FrozenByJob {
        /// The range.
        range: Span,
        /// The job.
        job: String,
    },
    /// A database name PostgreSQL would not accept (empty, or longer than
    /// 63 bytes).
    #[error("invalid database name {database:?}")]
    InvalidDatabase {
        /// The name.
        database: String,
    },
    /// A GID PostgreSQL would not accept.
    #[error("invalid transaction id {gid:?}: {reason}")]
    InvalidGid {
        /// The GID.
        gid: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A function name breaks the naming rules.
    #[error("invalid function name {name:?}: {reason}")]
    InvalidFunctionName {
        /// The name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The bytes of an upload are not a binary WebAssembly module.
    #[error("function {name:?}: {reason}")]
    NotWasm {
        /// The function's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No function has this name.
    #[error("unknown routing function {0:?}")]
    UnknownFunction(String),
    /// A table names a function id that no uploaded function has.
    #[error("table {table:?}: routing function {id} is not uploaded")]
    UnknownFunctionId {
        /// The table.
        table: String,
        /// The id.
        id: FunctionId,
    },
    /// RemoveFunction, or an upload with other bytes, of a function a table
    /// uses.
    #[error("routing function {name:?} is used by table {table:?}; changing or removing it would move rows (set the table's function first: a re-partitioning job for a table with rows)")]
    FunctionInUse {
        /// The function's name.
        name: String,
        /// The first table using it.
        table: String,
    },
    /// Two functions with one name and different modules in a seed.
    #[error("function {0:?} is declared twice with different modules")]
    DuplicateFunction(String),
    /// SetTableFunction of a table that is not sharded.
    #[error("table {0:?} is not a sharded table")]
    NotSharded(String),
    /// JobStart with an id in use, or a bad id.
    #[error("reshard job {job:?}: {reason}")]
    BadJob {
        /// The job.
        job: String,
        /// Why.
        reason: String,
    },
    /// A decision whose coordinator read the decision horizon before a
    /// sweep that may have forgotten this gid's decision.
    #[error("transaction {gid:?} cannot be decided any more: its decision may have been forgotten (the coordinator took longer than the resolver's grace period)")]
    DecisionTooLate {
        /// The GID.
        gid: String,
    },
    /// A ForgetDecisions naming more than [`crate::command::MAX_FORGET`] gids.
    #[error("too many transactions to forget in one command: {0}")]
    TooManyToForget(usize),
    /// A second decision for a GID.
    #[error("transaction {gid:?} is already decided ({})", if *commit { "commit" } else { "rollback" })]
    AlreadyDecided {
        /// The GID.
        gid: String,
        /// The decision that stands.
        commit: bool,
    },
}

impl Catalog {
    /// An empty catalog (epoch 0, no snapshot).
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// The current routing snapshot; `None` while the catalog is empty.
    pub fn snapshot(&self) -> Option<&Arc<RoutingSnapshot>> {
        self.snapshot.as_ref()
    }

    /// The current epoch (0 for an empty catalog).
    pub fn epoch(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.epoch())
    }

    /// The freeze on the range starting at `lo`, if it is frozen.
    pub fn freeze(&self, lo: u64) -> Option<Freeze> {
        self.freezes.get(&lo).copied()
    }

    /// The recorded outcome of 2PC transaction `gid`: `Some(true)` commit,
    /// `Some(false)` rollback, `None` not decided.
    pub fn decision(&self, gid: &str) -> Option<bool> {
        self.decisions.get(gid).map(|d| d.commit)
    }

    /// The routing function stored under `name`.
    pub fn function(&self, name: &str) -> Option<&StoredFunction> {
        self.functions.get(name)
    }

    /// All routing functions, by name.
    pub fn functions(&self) -> impl Iterator<Item = (&str, &StoredFunction)> {
        self.functions.iter().map(|(n, f)| (n.as_str(), f))
    }

    /// Every stored module once, by id: what a node compiles before it
    /// publishes a snapshot.
    pub fn function_modules(&self) -> impl Iterator<Item = (FunctionId, &[u8])> {
        let by_id: BTreeMap<FunctionId, &[u8]> =
            self.functions.values().map(|f| (f.id, &*f.wasm)).collect();
        by_id.into_iter()
    }

    /// The names under which module `id` is stored (for messages).
    pub fn function_names(&self, id: FunctionId) -> Vec<&str> {
        self.functions
            .iter()
            .filter(|(_, f)| f.id == id)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The reshard job `id`.
    pub fn job(&self, id: &str) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// All reshard jobs, by id.
    pub fn jobs(&self) -> impl Iterator<Item = (&str, &JobRecord)> {
        self.jobs.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// All decided 2PC transactions, by GID.
    pub fn decisions(&self) -> impl Iterator<Item = (&str, bool)> {
        self.decisions.iter().map(|(g, d)| (g.as_str(), d.commit))
    }

    /// How many 2PC decisions the catalog holds.
    pub fn decision_count(&self) -> usize {
        self.decisions.len()
    }

    /// What a coordinator reads before its first PREPARE and passes as
    /// `since` in its [`CatalogCommand::TxDecision`]: the number of
    /// decisions recorded so far.
    pub fn decision_horizon(&self) -> u64 {
        self.decisions_recorded
    }

    /// How many `SchemaChanged` commands were applied: a node compares it
    /// with the count it last acted on, and forgets what it learned of the
    /// databases [`Catalog::schema_changed_since`] names.
    pub fn schema_generation(&self) -> u64 {
        self.schema_generation
    }

    /// The databases whose schema changed after generation `seen`.
    pub fn schema_changed_since(&self, seen: u64) -> impl Iterator<Item = &str> + '_ {
        self.schema_changed
            .iter()
            .filter(move |(_, &g)| g > seen)
            .map(|(d, _)| d.as_str())
    }

    /// Applies one command. On `Err` the catalog is unchanged.
    pub fn apply(&mut self, cmd: &CatalogCommand) -> Result<Applied, Rejected> {
        match cmd {
            CatalogCommand::Bootstrap(seed) => self.bootstrap(seed),
            CatalogCommand::AddShard { shard, dsn } => self.add_shard(shard, dsn),
            CatalogCommand::RemoveShard { shard } => self.remove_shard(shard),
            CatalogCommand::DeclareSharded(spec) => self.declare_sharded(spec),
            CatalogCommand::DeclareReference { table } => self.declare_reference(table),
            CatalogCommand::SplitRange { range, at } => self.split_range(*range, *at),
            CatalogCommand::AssignRange {
                range,
                read_owner,
                write_owner,
            } => self.assign_range(*range, read_owner, write_owner),
            CatalogCommand::FreezeRange { range, freeze } => self.freeze_range(*range, *freeze),
            CatalogCommand::UnfreezeRange {
                range,
                freeze,
                operator,
            } => self.unfreeze_range(*range, *freeze, *operator),
            CatalogCommand::UploadFunction { name, wasm } => self.upload_function(name, wasm),
            CatalogCommand::RemoveFunction { name } => self.remove_function(name),
            CatalogCommand::SetTableFunction { table, function } => {
                self.set_table_function(table, *function)
            }
            CatalogCommand::TxDecision { gid, commit, since } => {
                self.tx_decision(gid, *commit, *since)
            }
            CatalogCommand::ForgetDecisions { gids, swept } => self.forget_decisions(gids, *swept),
            CatalogCommand::JobStart { job, spec } => self.job_start(job, spec),
            CatalogCommand::JobUpdate {
                job,
                phase,
                owner,
                rows_copied,
                lag_bytes,
                note,
            } => self.job_update(job, *phase, *owner, *rows_copied, *lag_bytes, note),
            CatalogCommand::SchemaChanged { database } => self.schema_changed(database),
        }
    }

    fn schema_changed(&mut self, database: &str) -> Result<Applied, Rejected> {
        if database.is_empty() || database.len() > MAX_DATABASE_LEN {
            return Err(Rejected::InvalidDatabase {
                database: database.to_owned(),
            });
        }
        self.schema_generation += 1;
        self.schema_changed
            .insert(database.to_owned(), self.schema_generation);
        Ok(Applied::SchemaChanged {
            database: database.to_owned(),
            generation: self.schema_generation,
        })
    }

    fn current(&self) -> Result<&RoutingSnapshot, Rejected> {
        self.snapshot.as_deref().ok_or(Rejected::NoCatalog)
    }

    /// Builds the next snapshot from `parts` and installs it. Nothing else
    /// may change before this succeeds.
    fn publish(&mut self, parts: Parts) -> Result<Applied, Rejected> {
        let epoch = self
            .epoch()
            .checked_add(1)
            .ok_or(CatalogError::EpochOverflow)?;
        let snap = Arc::new(parts.build(epoch)?);
        self.snapshot = Some(Arc::clone(&snap));
        Ok(Applied::Routing(snap))
    }

    fn bootstrap(&mut self, seed: &CatalogSeed) -> Result<Applied, Rejected> {
        if let Some(s) = &self.snapshot {
            return Err(Rejected::AlreadyInitialised { epoch: s.epoch() });
        }
        let mut shards = Vec::with_capacity(seed.shards.len());
        for s in &seed.shards {
            shards.push(Shard {
                id: ShardId::new(&s.shard)?,
                dsn: s.dsn.0.clone(),
            });
        }
        let mut ranges = Vec::with_capacity(seed.ranges.len());
        for r in &seed.ranges {
            let mut range = KeyRange::active(r.range.lo, r.range.hi, ShardId::new(&r.read_owner)?);
            range.write_owner = ShardId::new(&r.write_owner)?;
            ranges.push(range);
        }
        let mut functions = BTreeMap::new();
        for f in &seed.functions {
            let stored = stored_function(&f.name, &f.wasm)?;
            match functions.get(&f.name) {
                Some(StoredFunction { id, .. }) if *id != stored.id => {
                    return Err(Rejected::DuplicateFunction(f.name.clone()));
                }
                _ => {
                    functions.insert(f.name.clone(), stored);
                }
            }
        }
        let sharded: Vec<ShardedTable> = seed.sharded.iter().map(sharded_table).collect();
        for t in &sharded {
            check_function(&functions, &t.name, t.function)?;
        }
        let applied = self.publish(Parts {
            shards,
            home_shard: ShardId::new(&seed.home_shard)?,
            sharded,
            reference: seed.reference.clone(),
            ranges,
        })?;
        self.functions = functions;
        Ok(applied)
    }

    fn add_shard(&mut self, name: &str, dsn: &Dsn) -> Result<Applied, Rejected> {
        let id = ShardId::new(name)?;
        let shard = Shard {
            id: id.clone(),
            dsn: dsn.0.clone(),
        };
        let parts = match self.snapshot.as_deref() {
            // The first shard holds everything.
            None => Parts {
                shards: vec![shard],
                home_shard: id.clone(),
                sharded: Vec::new(),
                reference: Vec::new(),
                ranges: vec![KeyRange::active(0, None, id)],
            },
            Some(snap) => {
                if snap.shard(&id).is_some() {
                    return Err(Rejected::ShardExists(name.to_owned()));
                }
                let mut parts = Parts::of(snap);
                parts.shards.push(shard);
                parts
            }
        };
        self.publish(parts)
    }

    fn remove_shard(&mut self, name: &str) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let id = known_shard(snap, name)?;
        if *snap.home_shard() == id {
            return Err(Rejected::HomeShard(name.to_owned()));
        }
        let owned: Vec<Span> = snap
            .ranges()
            .iter()
            .filter(|r| r.read_owner == id || r.write_owner == id)
            .map(KeyRange::span)
            .collect();
        if let Some(first) = owned.first() {
            return Err(Rejected::ShardOwnsRanges {
                shard: name.to_owned(),
                count: owned.len(),
                first: *first,
            });
        }
        let mut parts = Parts::of(snap);
        parts.shards.retain(|s| s.id != id);
        self.publish(parts)
    }

    fn check_undeclared(snap: &RoutingSnapshot, table: &str) -> Result<(), Rejected> {
        let kind = if snap.sharded_table(table).is_some() {
            "sharded"
        } else if snap.is_reference_table(table) {
            "reference"
        } else {
            return Ok(());
        };
        Err(Rejected::TableDeclared {
            table: table.to_owned(),
            kind,
        })
    }

    fn declare_sharded(&mut self, spec: &TableSpec) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        Self::check_undeclared(snap, &spec.table)?;
        check_function(&self.functions, &spec.table, spec.function)?;
        let mut parts = Parts::of(snap);
        parts.sharded.push(sharded_table(spec));
        self.publish(parts)
    }

    fn declare_reference(&mut self, table: &str) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        Self::check_undeclared(snap, table)?;
        let mut parts = Parts::of(snap);
        parts.reference.push(table.to_owned());
        self.publish(parts)
    }

    fn split_range(&mut self, range: Span, at: u64) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let i = find_range(snap, range)?;
        let r = &snap.ranges()[i];
        if r.status != RangeStatus::Active {
            return Err(Rejected::RangeNotActive {
                range,
                status: r.status,
            });
        }
        if at <= range.lo || !range.contains(at) {
            return Err(Rejected::SplitOutside { range, at });
        }
        let mut parts = Parts::of(snap);
        let upper = KeyRange {
            lo: at,
            ..parts.ranges[i].clone()
        };
        parts.ranges[i].hi = Some(at);
        parts.ranges.insert(i + 1, upper);
        self.publish(parts)
    }

    fn assign_range(&mut self, range: Span, read: &str, write: &str) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let i = find_range(snap, range)?;
        let read_owner = known_shard(snap, read)?;
        let write_owner = known_shard(snap, write)?;
        let mut parts = Parts::of(snap);
        parts.ranges[i].read_owner = read_owner;
        parts.ranges[i].write_owner = write_owner;
        self.publish(parts)
    }

    fn freeze_range(&mut self, range: Span, id: FreezeId) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let i = find_range(snap, range)?;
        if let Some(f) = self.freezes.get(&range.lo) {
            return Err(Rejected::AlreadyFrozen { range, by: f.id });
        }
        let previous = snap.ranges()[i].status;
        let mut parts = Parts::of(snap);
        parts.ranges[i].status = RangeStatus::Frozen;
        let applied = self.publish(parts)?;
        self.freezes.insert(range.lo, Freeze { id, previous });
        Ok(applied)
    }

    fn unfreeze_range(
        &mut self,
        range: Span,
        id: FreezeId,
        operator: bool,
    ) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let i = find_range(snap, range)?;
        let freeze = self
            .freezes
            .get(&range.lo)
            .copied()
            .ok_or(Rejected::NotFrozen(range))?;
        if freeze.id != id {
            return Err(Rejected::WrongFreeze {
                range,
                by: freeze.id,
                given: id,
            });
        }
        if operator {
            if let Some(job) = self.live_job_freezing(range, freeze.id) {
                return Err(Rejected::FrozenByJob {
                    range,
                    job: job.to_owned(),
                });
            }
        }
        let mut parts = Parts::of(snap);
        parts.ranges[i].status = freeze.previous;
        let applied = self.publish(parts)?;
        self.freezes.remove(&range.lo);
        Ok(applied)
    }

    /// The reshard job, not ended, of range `range` whose freeze is `id`.
    pub fn live_job_freezing(&self, range: Span, id: FreezeId) -> Option<&str> {
        self.jobs
            .iter()
            .find(|(job, r)| {
                !r.phase.is_final() && r.spec.range == range && FreezeId::for_job(job) == id
            })
            .map(|(job, _)| job.as_str())
    }

    /// The first table that uses the module stored under `name`, unless
    /// another name holds the same module (then the module stays).
    fn user_of(&self, name: &str, id: FunctionId) -> Option<String> {
        let shared = self.functions.iter().any(|(n, f)| n != name && f.id == id);
        if shared {
            return None;
        }
        self.snapshot.as_deref().and_then(|snap| {
            snap.sharded_tables()
                .find(|t| t.function == RoutingFunction::Wasm { id })
                .map(|t| t.name.clone())
        })
    }

    fn upload_function(&mut self, name: &str, wasm: &WasmModule) -> Result<Applied, Rejected> {
        let stored = stored_function(name, wasm)?;
        if let Some(old) = self.functions.get(name) {
            if old.id == stored.id {
                return Ok(Applied::Unchanged);
            }
            if let Some(table) = self.user_of(name, old.id) {
                return Err(Rejected::FunctionInUse {
                    name: name.to_owned(),
                    table,
                });
            }
        }
        let id = stored.id;
        self.functions.insert(name.to_owned(), stored);
        Ok(Applied::FunctionStored {
            name: name.to_owned(),
            id,
        })
    }

    fn remove_function(&mut self, name: &str) -> Result<Applied, Rejected> {
        let old = self
            .functions
            .get(name)
            .ok_or_else(|| Rejected::UnknownFunction(name.to_owned()))?;
        if let Some(table) = self.user_of(name, old.id) {
            return Err(Rejected::FunctionInUse {
                name: name.to_owned(),
                table,
            });
        }
        self.functions.remove(name);
        Ok(Applied::FunctionRemoved {
            name: name.to_owned(),
        })
    }

    fn set_table_function(
        &mut self,
        table: &str,
        function: RoutingFunction,
    ) -> Result<Applied, Rejected> {
        let snap = self.current()?;
        let t = snap
            .sharded_table(table)
            .ok_or_else(|| Rejected::NotSharded(table.to_owned()))?;
        if t.function == function {
            return Ok(Applied::Unchanged);
        }
        check_function(&self.functions, table, function)?;
        let mut parts = Parts::of(snap);
        for t in &mut parts.sharded {
            if t.name == table {
                t.function = function;
            }
        }
        self.publish(parts)
    }

    fn job_start(&mut self, job: &str, spec: &JobSpec) -> Result<Applied, Rejected> {
        let bad = |reason: String| Rejected::BadJob {
            job: job.to_owned(),
            reason,
        };
        let ok_name = !job.is_empty()
            && job.len() <= 40
            && job
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok_name {
            return Err(bad("the id must be 1 to 40 characters of [a-z0-9_]".into()));
        }
        if self.jobs.contains_key(job) {
            return Err(bad("a job with this id exists".into()));
        }
        let snap = self.current()?;
        let i = find_range(snap, spec.range)?;
        let r = &snap.ranges()[i];
        if r.status != RangeStatus::Active {
            return Err(Rejected::RangeNotActive {
                range: spec.range,
                status: r.status,
            });
        }
        if r.write_owner.as_str() != spec.from || r.read_owner.as_str() != spec.from {
            return Err(bad(format!(
                "range {} is served by {} (reads) and {} (writes), not by {}",
                spec.range, r.read_owner, r.write_owner, spec.from
            )));
        }
        if spec.to == spec.from {
            return Err(bad(format!(
                "range {} is on {} already",
                spec.range, spec.to
            )));
        }
        let to = known_shard(snap, &spec.to)?;
        let mut parts = Parts::of(snap);
        parts.ranges[i].status = RangeStatus::Moving;
        // The target is about to receive the range's rows: nothing may see
        // them there before the flip.
        parts.ranges[i].hidden_on = Some(to);
        let applied = self.publish(parts)?;
        let seq = self.jobs.len() as u64;
        self.jobs.insert(
            job.to_owned(),
            JobRecord {
                spec: spec.clone(),
                phase: JobPhase::Planned,
                owner: 0,
                rows_copied: 0,
                lag_bytes: 0,
                note: String::new(),
                seq,
            },
        );
        Ok(applied)
    }

    fn job_update(
        &mut self,
        job: &str,
        phase: JobPhase,
        owner: u64,
        rows_copied: u64,
        lag_bytes: u64,
        note: &str,
    ) -> Result<Applied, Rejected> {
        let bad = |reason: String| Rejected::BadJob {
            job: job.to_owned(),
            reason,
        };
        let rec = self
            .jobs
            .get(job)
            .ok_or_else(|| bad("no such job".into()))?;
        let from = rec.phase;
        if from.is_final() {
            return Err(bad(format!("the job has ended ({})", from.name())));
        }
        let allowed = match phase {
            // Abort is possible only before the flip; so is a failure:
            // once the range is the target's, undoing the job would delete
            // the new owner's rows. After the flip a job only goes on
            // (Flipped) and ends Done.
            JobPhase::Aborting => from < JobPhase::Flipped || from == JobPhase::Aborting,
            JobPhase::Aborted => from == JobPhase::Aborting,
            JobPhase::Failed => from < JobPhase::Flipped || from == JobPhase::Aborting,
            // An aborting job only ends aborted (or failed).
            _ if from == JobPhase::Aborting => false,
            // Done needs the flip.
            JobPhase::Done => from >= JobPhase::Flipped,
            p => p >= from,
        };
        if !allowed {
            let why = if from == JobPhase::Flipped {
                "; the range belongs to the target since the flip, so the job can only go on to done"
            } else {
                ""
            };
            return Err(bad(format!(
                "cannot go from phase {} to {}{why}",
                from.name(),
                phase.name()
            )));
        }
        let spec = rec.spec.clone();
        let mut applied = Applied::JobUpdated {
            job: job.to_owned(),
        };
        if phase == JobPhase::Flipped && from != JobPhase::Flipped {
            // The flip itself: atomic with the phase, so a job aborted
            // before it can never flip (and one flipped never aborts).
            if from != JobPhase::CutOver {
                return Err(bad(format!("cannot flip from phase {}", from.name())));
            }
            // Only under the job's own freeze: the runner verified the
            // range while every write to it waited. A freeze lifted since
            // (an operator's unfreeze, another runner's thaw) let writes
            // reach the source that the verification did not see.
            let own = FreezeId::for_job(job);
            match self.freezes.get(&spec.range.lo) {
                Some(f) if f.id == own => {}
                Some(f) => {
                    return Err(bad(format!(
                        "cannot flip: range {} is frozen by {}, not by the job's own freeze {own}",
                        spec.range, f.id
                    )))
                }
                None => {
                    return Err(bad(format!(
                        "cannot flip: range {} is no longer frozen by the job's freeze {own} (lifted since the verification: writes may have reached the source); the cut-over must run again",
                        spec.range
                    )))
                }
            }
            let snap = self.current()?;
            let i = find_range(snap, spec.range)?;
            let to = known_shard(snap, &spec.to)?;
            let from = known_shard(snap, &spec.from)?;
            let mut parts = Parts::of(snap);
            parts.ranges[i].read_owner = to.clone();
            parts.ranges[i].write_owner = to;
            // The source keeps its copy until the cleanup: hidden from now on.
            parts.ranges[i].hidden_on = Some(from);
            // The flip also lifts the cut-over's freeze: writers waiting on
            // the range go to the new owner with this one entry, one
            // round of Paxos sooner than with a separate unfreeze.
            let thawed = self.freezes.remove(&spec.range.lo);
            if let Some(f) = thawed {
                parts.ranges[i].status = f.previous;
            }
            applied = self.publish(parts)?;
        }
        if phase.is_final() {
            // The range is Active again (a freeze the job left is lifted).
            if let Ok(snap) = self.current() {
                if let Ok(i) = find_range(snap, spec.range) {
                    let r = &snap.ranges()[i];
                    if r.status != RangeStatus::Active || r.hidden_on.is_some() {
                        // Done: the cleanup deleted the source's copy;
                        // Aborted/Failed: the abort deleted the target's.
                        let mut parts = Parts::of(snap);
                        parts.ranges[i].status = RangeStatus::Active;
                        parts.ranges[i].hidden_on = None;
                        applied = self.publish(parts)?;
                        self.freezes.remove(&spec.range.lo);
                    }
                }
            }
        }
        if let Some(rec) = self.jobs.get_mut(job) {
            rec.phase = phase;
            rec.owner = owner;
            rec.rows_copied = rows_copied;
            rec.lag_bytes = lag_bytes;
            rec.note = note.to_owned();
        }
        Ok(applied)
    }

    fn tx_decision(
        &mut self,
        gid: &str,
        commit: bool,
        since: Option<u64>,
    ) -> Result<Applied, Rejected> {
        let reason = if gid.is_empty() {
            Some("it is empty")
        } else if gid.len() > MAX_GID_LEN {
            Some("it is longer than 199 bytes")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Rejected::InvalidGid {
                gid: gid.to_owned(),
                reason,
            });
        }
        if let Some(&Decision { commit, .. }) = self.decisions.get(gid) {
            return Err(Rejected::AlreadyDecided {
                gid: gid.to_owned(),
                commit,
            });
        }
        // Checked after AlreadyDecided: a decision that stands is the answer.
        if since.is_some_and(|s| s < self.decisions_swept_at) {
            return Err(Rejected::DecisionTooLate {
                gid: gid.to_owned(),
            });
        }
        self.decisions_recorded += 1;
        self.decisions.insert(
            gid.to_owned(),
            Decision {
                commit,
                seq: self.decisions_recorded,
            },
        );
        Ok(Applied::TxDecided {
            gid: gid.to_owned(),
            commit,
        })
    }
}

impl Catalog {
    /// Why it is safe (the proxy keeps the other half of the rule: it names
    /// only gids that no shard holds prepared): a forgotten decision is
    /// needed again only if its gid is asked about again. A shard cannot
    /// prepare it again — a commit decision is recorded after every PREPARE
    /// returned, and a rollback found again is decided rollback again. The
    /// coordinator asks only before it reports the gid finished; a swept
    /// gid's coordinator may still be running, so a sweep moves the horizon
    /// to the swept decisions' `seq`, and a coordinator that read the
    /// horizon before one of them was recorded is refused
    /// ([`Rejected::DecisionTooLate`]): it may be that decision's own. The
    /// resolver sweeps only decisions older than its grace period, so only
    /// coordinators in flight that long are refused.
    fn forget_decisions(&mut self, gids: &[String], swept: bool) -> Result<Applied, Rejected> {
        if gids.len() > crate::command::MAX_FORGET {
            return Err(Rejected::TooManyToForget(gids.len()));
        }
        let mut count = 0;
        for g in gids {
            if let Some(d) = self.decisions.remove(g.as_str()) {
                count += 1;
                if swept {
                    self.decisions_swept_at = self.decisions_swept_at.max(d.seq);
                }
            }
        }
        Ok(Applied::DecisionsForgotten { count })
    }
}

/// The parts of a snapshot, editable, to build the next one from. (The
/// router's `SnapshotBuilder` only adds; removing a shard needs this.)
struct Parts {
    shards: Vec<Shard>,
    home_shard: ShardId,
    sharded: Vec<ShardedTable>,
    reference: Vec<String>,
    ranges: Vec<KeyRange>,
}

impl Parts {
    fn of(s: &RoutingSnapshot) -> Parts {
        Parts {
            shards: s.shards().cloned().collect(),
            home_shard: s.home_shard().clone(),
            sharded: s.sharded_tables().cloned().collect(),
            reference: s.reference_tables().map(str::to_owned).collect(),
            ranges: s.ranges().to_vec(),
        }
    }

    fn build(self, epoch: u64) -> Result<RoutingSnapshot, CatalogError> {
        let mut b = RoutingSnapshot::builder(epoch).home_shard(self.home_shard);
        for s in self.shards {
            b = b.shard(s.id, s.dsn);
        }
        for t in self.sharded {
            b = b.sharded_table(t);
        }
        for t in self.reference {
            b = b.reference_table(t);
        }
        b.ranges(self.ranges).build()
    }
}

fn sharded_table(spec: &TableSpec) -> ShardedTable {
    ShardedTable {
        name: spec.table.clone(),
        key_column: spec.key_column.clone(),
        key_type: spec.key_type,
        function: spec.function,
    }
}

/// Checks an upload's name and bytes (no compilation: that happened before
/// the command was proposed) and makes the stored function.
fn stored_function(name: &str, wasm: &WasmModule) -> Result<StoredFunction, Rejected> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_FUNCTION_NAME_LEN {
        Some("it is longer than 63 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        Some("only ASCII letters, digits, '_', '-' and '.' are allowed")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(Rejected::InvalidFunctionName {
            name: name.to_owned(),
            reason,
        });
    }
    let not_wasm = |reason: String| Rejected::NotWasm {
        name: name.to_owned(),
        reason,
    };
    if wasm.0.len() > MAX_FUNCTION_BYTES {
        return Err(not_wasm(format!(
            "the module has {} bytes, more than the limit of {MAX_FUNCTION_BYTES}",
            wasm.0.len()
        )));
    }
    // The binary magic and version 1; text (.wat) is converted before.
    if !wasm.0.starts_with(b"\0asm\x01\0\0\0") {
        return Err(not_wasm(
            "not a binary WebAssembly module (convert .wat text to binary before uploading)"
                .to_owned(),
        ));
    }
    Ok(StoredFunction {
        id: wasm.id(),
        wasm: Arc::from(wasm.0.as_slice()),
    })
}

/// A WebAssembly `function` of `table` must be stored under some name.
fn check_function(
    functions: &BTreeMap<String, StoredFunction>,
    table: &str,
    function: RoutingFunction,
) -> Result<(), Rejected> {
    match function.wasm_id() {
        Some(id) if !functions.values().any(|f| f.id == id) => Err(Rejected::UnknownFunctionId {
            table: table.to_owned(),
            id,
        }),
        _ => Ok(()),
    }
}

/// The id of shard `name` if the snapshot has it. (A name that is not even
/// valid is just as unknown.)
fn known_shard(snap: &RoutingSnapshot, name: &str) -> Result<ShardId, Rejected> {
    ShardId::new(name)
        .ok()
        .filter(|id| snap.shard(id).is_some())
        .ok_or_else(|| Rejected::UnknownShard(name.to_owned()))
}

/// Index of the range with exactly the bounds `span`.
fn find_range(snap: &RoutingSnapshot, span: Span) -> Result<usize, Rejected> {
    let ranges = snap.ranges();
    ranges
        .binary_search_by_key(&span.lo, |r| r.lo)
        .ok()
        .filter(|&i| ranges[i].hi == span.hi)
        .ok_or(Rejected::UnknownRange(span))
}

mod image;
pub use image::{
    BadImage, CatalogImage, FreezeImage, JobImage, RangeImage, RoutingImage, StatusImage,
};

#[cfg(test)]
mod tests;
