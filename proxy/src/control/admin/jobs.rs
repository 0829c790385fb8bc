//! The admin API of reshard jobs: `/v1/reshard/{move,split,add-shard,drain}`
//! and `/v1/jobs…` (`proxyctl reshard`, `proxyctl jobs`). The jobs
//! themselves run in [`crate::control::jobs`].

use super::{Api, ApiError, ApiResult};
use crate::control::jobs::schema_copy::{copy_schema, sync_reference};
use crate::control::jobs::{connect, rebalance, JobError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use hotrepart_router::catalog::{RoutingSnapshot, Span};
use hotrepart_routing_paxos::{CatalogCommand, JobPhase, JobRecord};
use serde::Deserialize;
use serde_json::{json, Value};

pub(crate) fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/reshard/move", post(reshard_move))
        .route("/v1/reshard/split", post(reshard_split))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/abort", post(abort_job))
        .route("/v1/reshard/add-shard", post(add_shard))
        .route("/v1/reshard/drain", post(drain))
}

/// Reshard requests need a catalog that survives a restart: a job's
/// phase is what tells the next runner whether the range has flipped, and
/// a node that forgot it would resume (or abort) a job against the wrong
/// owner. 409 on a node alone without `data_dir`.
fn require_durable(api: &Api) -> Result<(), ApiError> {
    if api.node.catalog_handle.is_durable() {
        return Ok(());
    }
    Err(ApiError::conflict(
        "reshard jobs need a durable catalog: this node runs without data_dir (its catalog is in memory and a restart would forget a job's progress and the range's owner); set data_dir (or run a [cluster]) and restart the node",
    ))
}

#[derive(Deserialize)]
struct MoveReq {
    lo: u64,
    to: String,
    #[serde(default)]
    job: Option<String>,
}

async fn reshard_move(State(api): State<Api>, Json(req): Json<MoveReq>) -> ApiResult {
    require_durable(&api)?;
    let r = api.range_at(req.lo)?;
    let job = req
        .job
        .unwrap_or_else(|| format!("move_{:x}_{:x}", r.lo, rand::random::<u32>()));
    api.propose(CatalogCommand::JobStart {
        job: job.clone(),
        spec: hotrepart_routing_paxos::JobSpec {
            range: r.span(),
            from: r.write_owner.as_str().to_string(),
            to: req.to,
        },
    })
    .await?;
    Ok(Json(json!({ "job": job })))
}

#[derive(Deserialize)]
struct SplitReq {
    lo: u64,
    #[serde(default)]
    at: Option<u64>,
    /// Move the upper half there.
    #[serde(default)]
    to: Option<String>,
}

async fn reshard_split(State(api): State<Api>, Json(req): Json<SplitReq>) -> ApiResult {
    require_durable(&api)?;
    let r = api.range_at(req.lo)?;
    let span = r.span();
    let at = match req.at {
        Some(at) => at,
        None => u64::try_from(u128::from(span.lo) + span.len() / 2)
            .map_err(|_| ApiError::bad("range too small to split"))?,
    };
    api.propose(CatalogCommand::SplitRange { range: span, at })
        .await?;
    let Some(to) = req.to else {
        return Ok(Json(json!({ "split_at": at })));
    };
    let job = format!("split_{:x}_{:x}", at, rand::random::<u32>());
    api.propose(CatalogCommand::JobStart {
        job: job.clone(),
        spec: hotrepart_routing_paxos::JobSpec {
            range: Span {
                lo: at,
                hi: span.hi,
            },
            from: r.write_owner.as_str().to_string(),
            to,
        },
    })
    .await?;
    Ok(Json(json!({ "split_at": at, "job": job })))
}

fn job_json(id: &str, r: &JobRecord) -> Value {
    json!({
        "job": id,
        "lo": r.spec.range.lo,
        "hi": r.spec.range.hi,
        "from": r.spec.from,
        "to": r.spec.to,
        "phase": r.phase.name(),
        "done": r.phase.is_final(),
        "owner": r.owner,
        "rows_copied": r.rows_copied,
        "lag_bytes": r.lag_bytes,
        "note": r.note,
    })
}

async fn list_jobs(State(api): State<Api>) -> ApiResult {
    let c = api.node.catalog_handle.catalog();
    let mut jobs: Vec<(&str, &JobRecord)> = c.jobs().collect();
    jobs.sort_by_key(|(_, r)| r.seq);
    let list: Vec<Value> = jobs.iter().map(|(id, r)| job_json(id, r)).collect();
    Ok(Json(json!({ "jobs": list })))
}

async fn get_job(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let c = api.node.catalog_handle.catalog();
    let r = c
        .job(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    Ok(Json(job_json(&id, r)))
}

async fn abort_job(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let c = api.node.catalog_handle.catalog();
    let r = c
        .job(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    if r.phase >= JobPhase::Flipped && r.phase != JobPhase::Aborting {
        return Err(ApiError::conflict(format!(
            "job {id} is {}: the range has moved already (abort is possible only before the flip)",
            r.phase.name()
        )));
    }
    api.propose(CatalogCommand::JobUpdate {
        job: id.clone(),
        phase: JobPhase::Aborting,
        owner: r.owner,
        rows_copied: r.rows_copied,
        lag_bytes: r.lag_bytes,
        note: "abort requested".into(),
    })
    .await?;
    Ok(Json(json!({ "job": id, "phase": "aborting" })))
}

// ---- add-shard (with reference tables and rebalance) and drain ----

#[derive(Deserialize)]
struct AddShardReq {
    name: String,
    dsn: String,
    #[serde(default)]
    rebalance: bool,
    /// Plan only: answer the moves `rebalance` would start, change nothing.
    #[serde(default)]
    dry_run: bool,
}

async fn add_shard(State(api): State<Api>, Json(req): Json<AddShardReq>) -> ApiResult {
    require_durable(&api)?;
    let snap = api.snapshot()?;
    let fail =
        |e: JobError| ApiError::new(StatusCode::CONFLICT, format!("add-shard {}: {e}", req.name));
    connect(&req.dsn, "postgres").await.map_err(fail)?;
    // A unique index that leaves out its table's shard key holds on one
    // shard only (DDL through the node refuses one over several shards;
    // one made while the catalog had a single shard, or on the shard
    // directly, is found here): with a second shard it would let
    // duplicates in. Refused before anything changes.
    let keys = crate::exec::unique::sharded_keys(&snap);
    let found = super::unique_outside_key(&snap, &keys).await?;
    if !found.is_empty() {
        return Err(ApiError::conflict(format!(
            "add-shard {}: {}; shard {} was not added",
            req.name,
            crate::exec::unique::explain(&found, &keys),
            req.name
        )));
    }
    if req.dry_run {
        if snap.shards().any(|s| s.id.as_str() == req.name) {
            return Err(ApiError::conflict(format!(
                "shard {} exists already",
                req.name
            )));
        }
        let plan = if req.rebalance {
            let mut shards = rebalance::shard_names(&snap);
            shards.push(req.name.clone());
            plan_json(&snap, &shards, |loads, shards| {
                rebalance::plan_onto(loads, shards, &req.name)
            })
            .await
            .map_err(fail)?
            .0
        } else {
            json!({ "moves": [] })
        };
        let mut v = json!({ "shard": req.name, "dry_run": true });
        merge(&mut v, plan);
        return Ok(Json(v));
    }
    let home_dsn = snap
        .shard(snap.home_shard())
        .map(|s| s.dsn.clone())
        .ok_or_else(|| ApiError::bad("no home shard"))?;
    // Schema first: once the shard is in the routing table, statements for
    // all shards reach it.
    let reference = copy_schema(&snap, &home_dsn, &req.dsn)
        .await
        .map_err(fail)?;
    api.propose(CatalogCommand::AddShard {
        shard: req.name.clone(),
        dsn: hotrepart_routing_paxos::command::Dsn(req.dsn.clone()),
    })
    .await?;
    // Every node routes by the table with the new shard, and no statement
    // routed by an older one is still in flight (a reference-table write
    // routed to the other shards only, e.g. waiting for a pooled backend,
    // would otherwise land after the copy below and never reach the new
    // shard). A write already done in an open transaction holds its lock:
    // the copy's `LOCK … IN SHARE MODE` waits for it. A statement running
    // longer than a fence allows (5 s) fails one attempt: a few, then a
    // clear error.
    const ATTEMPTS: u32 = 4;
    let copy = async {
        crate::control::jobs::settle_retrying(&api.node, ATTEMPTS)
            .await
            .map_err(|e| {
                format!("statements routed before it still run ({e}, {ATTEMPTS} attempts)")
            })?;
        let mut copied = Vec::new();
        for (db, tables) in &reference {
            for t in tables {
                let n = sync_reference(&home_dsn, &req.dsn, db, t)
                    .await
                    .map_err(|e| format!("copying {t} (database {db}): {e}"))?;
                copied.push(json!({ "database": db, "table": t, "rows": n }));
            }
        }
        Ok::<_, String>(copied)
    };
    let copied = match copy.await {
        Ok(c) => c,
        Err(why) => {
            // It owns no range yet: out of the routing table again, so
            // that no reference read is served by a shard without the rows.
            let undone = api
                .propose(CatalogCommand::RemoveShard {
                    shard: req.name.clone(),
                })
                .await;
            let state = match undone {
                Ok(_) => "it was taken out of the routing table again; add it again once the cause is gone (drop its copied schema first if it is to be copied again)".to_string(),
                Err(u) => format!("taking it out of the routing table again failed too ({}): remove it with `proxyctl shard remove {}`", u.message, req.name),
            };
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "shard {} was not added: its reference tables could not be copied: {why}; {state}",
                    req.name
                ),
            ));
        }
    };
    let mut v = json!({ "shard": req.name, "reference_copied": copied, "jobs": [] });
    if req.rebalance {
        let snap = api.snapshot()?;
        let shards = rebalance::shard_names(&snap);
        let (plan, moves) = plan_json(&snap, &shards, |loads, shards| {
            rebalance::plan_onto(loads, shards, &req.name)
        })
        .await
        .map_err(fail)?;
        let jobs = start_moves(&api, moves, "rebalance").await?;
        merge(&mut v, plan);
        v["jobs"] = json!(jobs);
    }
    Ok(Json(v))
}

/// Sets the keys of `extra` in `v`.
fn merge(v: &mut Value, extra: Value) {
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
}

/// The rows of every range now, a plan made of them by `plan`, and its
/// moves with their split points, as JSON: `basis`, `rows` (per shard),
/// `total_rows`, `moves` (`lo`, `hi`, `from`, `to`, `rows`, `split_of`).
/// Read-only.
async fn plan_json(
    snap: &RoutingSnapshot,
    shards: &[String],
    plan: impl FnOnce(&[rebalance::Load], &[String]) -> Vec<rebalance::Take>,
) -> Result<(Value, Vec<rebalance::Move>), JobError> {
    let (loads, basis) = rebalance::loads(snap).await?;
    let takes = plan(&loads, shards);
    let moves = rebalance::resolve(snap, &loads, &takes, basis).await?;
    let per = rebalance::per_shard(&loads, shards);
    let total: u64 = per.values().sum();
    let v = json!({
        "basis": basis,
        "rows": per,
        "total_rows": total,
        "share": total / (shards.len().max(1) as u64),
        "moves": moves,
    });
    Ok((v, moves))
}

/// Starts `moves` (from [`plan_json`]): a move cut from a larger range
/// splits it first. Returns the job ids.
async fn start_moves(
    api: &Api,
    moves: Vec<rebalance::Move>,
    kind: &str,
) -> Result<Vec<String>, ApiError> {
    let mut jobs = Vec::new();
    for m in moves {
        if let Some(of) = m.split_of {
            api.propose(CatalogCommand::SplitRange {
                range: Span {
                    lo: of.lo,
                    hi: of.hi,
                },
                at: m.lo,
            })
            .await?;
        }
        let job = format!("{kind}_{:x}_{:x}", m.lo, rand::random::<u32>());
        api.propose(CatalogCommand::JobStart {
            job: job.clone(),
            spec: hotrepart_routing_paxos::JobSpec {
                range: m.span(),
                from: m.from.clone(),
                to: m.to.clone(),
            },
        })
        .await?;
        jobs.push(job);
    }
    Ok(jobs)
}

#[derive(Deserialize)]
struct DrainReq {
    shard: String,
    /// Plan only: answer the moves, change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// Starts jobs moving every range of a shard to the others: the largest
/// range first, each to the shard holding the fewest rows then.
async fn drain(State(api): State<Api>, Json(req): Json<DrainReq>) -> ApiResult {
    require_durable(&api)?;
    let snap = api.snapshot()?;
    if snap.home_shard().as_str() == req.shard {
        return Err(ApiError::conflict(format!(
            "shard {} is the home shard of undeclared tables; it cannot be drained",
            req.shard
        )));
    }
    let shards = rebalance::shard_names(&snap);
    if shards.len() < 2 || !shards.contains(&req.shard) {
        return Err(ApiError::bad(format!(
            "unknown shard {} or no other shard",
            req.shard
        )));
    }
    let (plan, moves) = plan_json(&snap, &shards, |loads, shards| {
        rebalance::plan_drain(loads, shards, &req.shard)
    })
    .await
    .map_err(|e| ApiError::conflict(format!("drain {}: {e}", req.shard)))?;
    let mut v = json!({ "shard": req.shard });
    if req.dry_run {
        v["dry_run"] = json!(true);
    } else {
        v["jobs"] = json!(start_moves(&api, moves, "drain").await?);
    }
    merge(&mut v, plan);
    Ok(Json(v))
}
