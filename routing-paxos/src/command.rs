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

/// Identifies one freeze of a range (chosen by whoever freezes it, e.g. a
/// reshard job). Unfreezing needs the same id, so a stale job cannot thaw
/// a range that another job froze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FreezeId(pub u64);

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
    /// it had before.
    UnfreezeRange {
        /// The range's exact current bounds.
        #[serde(with = "SpanDef")]
        range: Span,
        /// The freeze being ended.
        freeze: FreezeId,
    },
    /// Records the outcome of a two-phase-commit transaction. The first
    /// decision for a `gid` in the log is final.
    TxDecision {
        /// The prepared transaction's GID (PostgreSQL: at most 199 bytes).
        gid: String,
        /// `true`: COMMIT PREPARED everywhere; `false`: ROLLBACK PREPARED.
        commit: bool,
    },
}

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
            CatalogCommand::TxDecision { .. } => "tx_decision",
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
