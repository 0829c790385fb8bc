//! [`CatalogImage`]: the whole [`Catalog`] as plain serde data, for log
//! compaction (the snapshot that replaces a trimmed prefix of the log).
//!
//! # Why a copy of the state, not the commands
//!
//! A snapshot must stay bounded however long the log grows. The commands
//! that built a catalog are not: every multi-shard commit adds a
//! `TxDecision`, every split and move adds entries, and the epoch counts
//! every routing change, so no shorter list of commands rebuilds the same
//! epoch. The image is the state itself — shards, tables, ranges with their
//! status, freezes, decisions, jobs, functions, the epoch — so its size is
//! the size of the catalog, not of its history. [`Catalog::from_image`]
//! rebuilds the routing snapshot with the router's validating builder (an
//! image that does not describe a valid catalog is refused, not loaded),
//! and `Catalog::from_image(&c.image()) == c` for every catalog (tested).

use std::collections::BTreeMap;
use std::sync::Arc;

use hotrepart_router::catalog::{
    KeyRange, RangeStatus, RoutingSnapshot, Shard, ShardId, ShardedTable,
};
use serde::{Deserialize, Serialize};

use super::{Catalog, Freeze, JobRecord, Parts, StoredFunction};
use crate::command::{Dsn, FreezeId, TableSpec, WasmModule};

/// A [`Catalog`] as data (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogImage {
    /// The routing table; `None` for an empty catalog.
    pub routing: Option<RoutingImage>,
    /// Freezes: range `lo`, freeze id, status to restore.
    pub freezes: Vec<FreezeImage>,
    /// 2PC decisions: GID, commit.
    pub decisions: Vec<(String, bool)>,
    /// Each decision's `seq`, in the order of `decisions` (missing in
    /// images written before it existed: then `decisions_recorded`).
    #[serde(default)]
    pub decision_seqs: Vec<u64>,
    /// 2PC decisions ever recorded (0 in images written before it existed).
    #[serde(default)]
    pub decisions_recorded: u64,
    /// The horizon below which a decision is refused (see
    /// `CatalogCommand::ForgetDecisions`).
    #[serde(default)]
    pub decisions_swept_at: u64,
    /// Reshard jobs.
    pub jobs: Vec<JobImage>,
    /// WebAssembly functions by name (the id is the module's SHA-256).
    pub functions: Vec<(String, WasmModule)>,
    /// `SchemaChanged` entries applied (0 in images written before it
    /// existed).
    #[serde(default)]
    pub schema_generation: u64,
    /// Per database: the generation of its last `SchemaChanged`.
    #[serde(default)]
    pub schema_changed: Vec<(String, u64)>,
}

/// The routing snapshot as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingImage {
    /// Its epoch.
    pub epoch: u64,
    /// Shards: name, DSN.
    pub shards: Vec<(String, Dsn)>,
    /// The home shard.
    pub home_shard: String,
    /// Sharded tables.
    pub sharded: Vec<TableSpec>,
    /// Reference tables.
    pub reference: Vec<String>,
    /// Ranges, in order.
    pub ranges: Vec<RangeImage>,
}

/// One key range as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeImage {
    /// First point.
    pub lo: u64,
    /// One past the last point (`None`: 2^64).
    pub hi: Option<u64>,
    /// Read owner.
    pub read_owner: String,
    /// Write owner.
    pub write_owner: String,
    /// Status.
    pub status: StatusImage,
    /// A shard that holds the range's rows without showing them (a reshard
    /// job's copy or leftover); absent in images written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_on: Option<String>,
}

/// [`RangeStatus`] as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusImage {
    /// Active.
    Active,
    /// Frozen.
    Frozen,
    /// Moving.
    Moving,
}

impl From<RangeStatus> for StatusImage {
    fn from(s: RangeStatus) -> StatusImage {
        match s {
            RangeStatus::Active => StatusImage::Active,
            RangeStatus::Frozen => StatusImage::Frozen,
            RangeStatus::Moving => StatusImage::Moving,
        }
    }
}

impl From<StatusImage> for RangeStatus {
    fn from(s: StatusImage) -> RangeStatus {
        match s {
            StatusImage::Active => RangeStatus::Active,
            StatusImage::Frozen => RangeStatus::Frozen,
            StatusImage::Moving => RangeStatus::Moving,
        }
    }
}

/// One freeze as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeImage {
    /// The frozen range's `lo`.
    pub lo: u64,
    /// Who froze it.
    pub id: FreezeId,
    /// The status to restore.
    pub previous: StatusImage,
}

/// One reshard job as data: its id and its record (the record's fields
/// sit beside `job` in the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobImage {
    /// Its id.
    pub job: String,
    /// Its record.
    #[serde(flatten)]
    pub record: JobRecord,
}

/// An image that does not describe a valid catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid catalog image: {0}")]
pub struct BadImage(pub String);

// A table spec from a table (the serde mirrors live in `command`).
fn table_spec(t: &ShardedTable) -> TableSpec {
    TableSpec {
        table: t.name.clone(),
        key_column: t.key_column.clone(),
        key_type: t.key_type,
        function: t.function,
    }
}

impl Catalog {
    /// This catalog as data.
    pub fn image(&self) -> CatalogImage {
        let routing = self.snapshot.as_ref().map(|s| RoutingImage {
            epoch: s.epoch(),
            shards: s
                .shards()
                .map(|sh| (sh.id.as_ref().to_owned(), Dsn(sh.dsn.clone())))
                .collect(),
            home_shard: s.home_shard().as_ref().to_owned(),
            sharded: s.sharded_tables().map(table_spec).collect(),
            reference: s.reference_tables().map(str::to_owned).collect(),
            ranges: s
                .ranges()
                .iter()
                .map(|r| RangeImage {
                    lo: r.lo,
                    hi: r.hi,
                    read_owner: r.read_owner.as_ref().to_owned(),
                    write_owner: r.write_owner.as_ref().to_owned(),
                    status: r.status.into(),
                    hidden_on: r.hidden_on.as_ref().map(|h| h.as_ref().to_owned()),
                })
                .collect(),
        });
        CatalogImage {
            routing,
            freezes: self
                .freezes
                .iter()
                .map(|(lo, f)| FreezeImage {
                    lo: *lo,
                    id: f.id,
                    previous: f.previous.into(),
                })
                .collect(),
            decisions: self
                .decisions
                .iter()
                .map(|(g, d)| (g.clone(), d.commit))
                .collect(),
            decision_seqs: self.decisions.values().map(|d| d.seq).collect(),
            decisions_recorded: self.decisions_recorded,
            decisions_swept_at: self.decisions_swept_at,
            jobs: self
                .jobs
                .iter()
                .map(|(id, j)| JobImage {
                    job: id.clone(),
                    record: j.clone(),
                })
                .collect(),
            functions: self
                .functions
                .iter()
                .map(|(n, f)| (n.clone(), WasmModule(f.wasm.to_vec())))
                .collect(),
            schema_generation: self.schema_generation,
            schema_changed: self
                .schema_changed
                .iter()
                .map(|(d, g)| (d.clone(), *g))
                .collect(),
        }
    }

    /// Rebuilds a catalog from its image. Refuses an image that does not
    /// describe a valid catalog (bad names, ranges that do not tile the
    /// space, a freeze of no range, …).
    pub fn from_image(image: &CatalogImage) -> Result<Catalog, BadImage> {
        let bad = |e: &dyn std::fmt::Display| BadImage(e.to_string());
        let id = |s: &str| ShardId::new(s).map_err(|e| bad(&e));
        let snapshot = match &image.routing {
            None => None,
            Some(r) => {
                let mut shards = Vec::with_capacity(r.shards.len());
                for (name, dsn) in &r.shards {
                    shards.push(Shard {
                        id: id(name)?,
                        dsn: dsn.0.clone(),
                    });
                }
                let mut ranges = Vec::with_capacity(r.ranges.len());
                for x in &r.ranges {
                    ranges.push(KeyRange {
                        lo: x.lo,
                        hi: x.hi,
                        read_owner: id(&x.read_owner)?,
                        write_owner: id(&x.write_owner)?,
                        status: x.status.into(),
                        hidden_on: x.hidden_on.as_deref().map(id).transpose()?,
                    });
                }
                let parts = Parts {
                    shards,
                    home_shard: id(&r.home_shard)?,
                    sharded: r
                        .sharded
                        .iter()
                        .map(|t| ShardedTable {
                            name: t.table.clone(),
                            key_column: t.key_column.clone(),
                            key_type: t.key_type,
                            function: t.function,
                        })
                        .collect(),
                    reference: r.reference.clone(),
                    ranges,
                };
                let snap: RoutingSnapshot = parts.build(r.epoch).map_err(|e| bad(&e))?;
                Some(Arc::new(snap))
            }
        };
        let mut freezes = BTreeMap::new();
        for f in &image.freezes {
            let known = snapshot
                .as_ref()
                .is_some_and(|s| s.ranges().iter().any(|r| r.lo == f.lo));
            if !known {
                return Err(BadImage(format!("a freeze of no range (lo {})", f.lo)));
            }
            freezes.insert(
                f.lo,
                Freeze {
                    id: f.id,
                    previous: f.previous.into(),
                },
            );
        }
        let mut functions = BTreeMap::new();
        for (name, wasm) in &image.functions {
            functions.insert(
                name.clone(),
                StoredFunction {
                    id: wasm.id(),
                    wasm: Arc::from(wasm.0.as_slice()),
                },
            );
        }
        Ok(Catalog {
            snapshot,
            freezes,
            decisions: image
                .decisions
                .iter()
                .enumerate()
                .map(|(i, (g, commit))| {
                    let seq = image
                        .decision_seqs
                        .get(i)
                        .copied()
                        .unwrap_or(image.decisions_recorded);
                    (
                        g.clone(),
                        super::Decision {
                            commit: *commit,
                            seq,
                        },
                    )
                })
                .collect(),
            decisions_recorded: image.decisions_recorded,
            decisions_swept_at: image.decisions_swept_at,
            jobs: image
                .jobs
                .iter()
                .map(|j| (j.job.clone(), j.record.clone()))
                .collect(),
            functions,
            schema_generation: image.schema_generation,
            schema_changed: image.schema_changed.iter().cloned().collect(),
        })
    }
}
