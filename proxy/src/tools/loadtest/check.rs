//! The final check of a load test: the table read through the node and
//! directly on every shard, compared with the [`Ledger`] and the routing
//! table of the admin API (see the parent module for what is checked).

use super::{
    bounded, connect, connect_dsn, payload, sql_err, Checked, Error, Ledger, Options, Violation,
    CHECK_POINT_READS,
};
use crate::sql::quote_ident;
use hotrepart_router::catalog::{KeyType, KeyValue, RoutingFunction};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// The routing table as the admin API shows it.
struct Routing {
    epoch: u64,
    /// (lo, hi, write owner), sorted by lo.
    ranges: Vec<(u64, Option<u64>, String)>,
    function: RoutingFunction,
}

impl Routing {
    fn owner(&self, point: u64) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(lo, hi, _)| point >= *lo && hi.is_none_or(|h| point < h))
            .map(|r| r.2.as_str())
    }
}

/// Parses the admin API's function string (`pg_hash(seed=N)`).
fn parse_function(s: &str) -> Option<RoutingFunction> {
    let seed = s.strip_prefix("pg_hash(seed=")?.strip_suffix(')')?;
    Some(RoutingFunction::PgHash {
        seed: seed.parse().ok()?,
    })
}

async fn routing(opts: &Options) -> Result<Routing, Error> {
    let tables = admin_get(opts, "/v1/tables").await?;
    let table = tables["sharded"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["table"] == opts.table.as_str()))
        .ok_or_else(|| Error::Table {
            table: opts.table.clone(),
            msg: "not declared sharded in the catalog (--setup declares it)".into(),
        })?;
    let key_type = table["key_type"]
        .as_str()
        .and_then(|k| k.parse::<KeyType>().ok());
    if !key_type.is_some_and(KeyType::is_integer) || table["key_column"] != "id" {
        return Err(Error::Table {
            table: opts.table.clone(),
            msg: format!("must be sharded by an integer column id, not {table}"),
        });
    }
    let f = table["function"].as_str().unwrap_or_default();
    let function = parse_function(f).ok_or_else(|| Error::Table {
        table: opts.table.clone(),
        msg: format!("routing function {f} cannot be computed here (only the built-in hash)"),
    })?;
    let ranges = admin_get(opts, "/v1/ranges").await?;
    let epoch = ranges["epoch"].as_u64().unwrap_or_default();
    let mut list = Vec::new();
    for r in ranges["ranges"].as_array().into_iter().flatten() {
        let (Some(lo), Some(owner)) = (r["lo"].as_u64(), r["write_owner"].as_str()) else {
            return Err(Error::Admin {
                path: "/v1/ranges".into(),
                msg: format!("unexpected range {r}"),
            });
        };
        list.push((lo, r["hi"].as_u64(), owner.to_owned()));
    }
    list.sort_by_key(|r| r.0);
    Ok(Routing {
        epoch,
        ranges: list,
        function,
    })
}

/// Compares the table, through the first node and directly on every
/// shard, with `ledger`. Returns what was looked at and the violations.
pub async fn check(opts: &Options, ledger: &Ledger) -> Result<(Checked, Vec<Violation>), Error> {
    let mut v = Vec::new();
    let mut checked = Checked::default();
    let routing = routing(opts).await?;
    checked.epoch = routing.epoch;
    let t = quote_ident(&opts.table);
    let scan_limit = opts.op_timeout * 30;
    let expect_row = |id: i64, version: i32, payload_s: &str, via: &str, v: &mut Vec<Violation>| {
        if payload_s != payload(id, version) {
            v.push(Violation::BadPayload {
                id,
                via: via.into(),
                version,
            });
        }
        match ledger.expected_versions(id) {
            Some((lo, hi)) if version < lo || version > hi => v.push(Violation::WrongVersion {
                id,
                via: via.into(),
                found: version,
                expected_min: lo,
                expected_max: hi,
            }),
            Some(_) => {}
            None if ledger.maybe_inserted.contains(&id) && version == 1 => {}
            None => v.push(Violation::Unexpected {
                id,
                via: via.into(),
            }),
        }
    };

    // (1) Through hotrepart: every row, count(*), and point reads.
    let db = connect(opts, 0).await?;
    let rows = bounded(
        scan_limit,
        "reading the table through the node",
        db.client
            .query(&format!("SELECT id, version, payload FROM {t}"), &[]),
    )
    .await?;
    checked.rows_via_node = rows.len() as u64;
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for r in &rows {
        let (id, version, p): (i64, i32, String) = (
            r.try_get(0).map_err(|e| sql_err("scan", e))?,
            r.try_get(1).map_err(|e| sql_err("scan", e))?,
            r.try_get(2).map_err(|e| sql_err("scan", e))?,
        );
        *seen.entry(id).or_default() += 1;
        expect_row(id, version, &p, "node", &mut v);
    }
    for (&id, &n) in &seen {
        if n > 1 {
            v.push(Violation::Duplicate {
                id,
                via: "node".into(),
                copies: n,
            });
        }
    }
    for &id in &ledger.ids {
        if !seen.contains_key(&id) {
            v.push(Violation::Missing {
                id,
                via: "node".into(),
            });
        }
    }
    let row = bounded(
        scan_limit,
        "count(*) through the node",
        db.client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[]),
    )
    .await?;
    let counted: i64 = row.try_get(0).map_err(|e| sql_err("count(*)", e))?;
    checked.count_via_node = counted;
    let (min, max) = (
        ledger.ids.len() as i64,
        (ledger.ids.len() + ledger.maybe_inserted.len()) as i64,
    );
    if counted < min || counted > max {
        v.push(Violation::Count {
            counted,
            expected_min: min,
            expected_max: max,
        });
    }
    drop(db);
    // Point reads exercise routing by key (the scan goes everywhere), on
    // every node in turn: a node routing by a stale table would miss rows.
    let sql = format!("SELECT version, payload FROM {t} WHERE id = $1");
    let mut nodes = Vec::new();
    for i in 0..opts.nodes.len() {
        let c = connect(opts, i).await?;
        let st = bounded(opts.op_timeout, "prepare", c.client.prepare(&sql)).await?;
        nodes.push((c, st));
    }
    let step = (ledger.ids.len() / CHECK_POINT_READS).max(1);
    for (k, &id) in ledger.ids.iter().step_by(step).enumerate() {
        let (c, st) = &nodes[k % nodes.len()];
        let via = format!("node {} point read", k % nodes.len() + 1);
        let rows = bounded(opts.op_timeout, "point read", c.client.query(st, &[&id])).await?;
        checked.point_reads += 1;
        match rows.first() {
            None => v.push(Violation::Missing { id, via }),
            Some(r) => {
                let version: i32 = r.try_get(0).map_err(|e| sql_err("point read", e))?;
                let p: String = r.try_get(1).map_err(|e| sql_err("point read", e))?;
                expect_row(id, version, &p, &via, &mut v);
            }
        }
    }
    drop(nodes);

    // (2) Directly on every shard: placement and uniqueness.
    let mut owners: Vec<&str> = routing.ranges.iter().map(|r| r.2.as_str()).collect();
    owners.sort_unstable();
    owners.dedup();
    for o in &owners {
        if !opts.shards.iter().any(|(n, _)| n == o) {
            v.push(Violation::ShardNotChecked {
                shard: (*o).to_owned(),
            });
        }
    }
    let mut on_shards: HashMap<i64, Vec<String>> = HashMap::new();
    for (name, dsn) in &opts.shards {
        let c = connect_dsn(dsn, opts.op_timeout, &format!("shard {name}")).await?;
        let exists = bounded(
            opts.op_timeout,
            "to_regclass",
            c.client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t]),
        )
        .await?;
        if !exists.try_get::<_, bool>(0).unwrap_or(false) {
            checked.rows_per_shard.insert(name.clone(), 0);
            continue;
        }
        let rows = bounded(
            scan_limit,
            &format!("reading the table on shard {name}"),
            c.client
                .query(&format!("SELECT id, version, payload FROM {t}"), &[]),
        )
        .await?;
        checked
            .rows_per_shard
            .insert(name.clone(), rows.len() as u64);
        let via = format!("shard {name}");
        for r in &rows {
            let (id, version, p): (i64, i32, String) = (
                r.try_get(0).map_err(|e| sql_err("scan", e))?,
                r.try_get(1).map_err(|e| sql_err("scan", e))?,
                r.try_get(2).map_err(|e| sql_err("scan", e))?,
            );
            if !ledger.state.contains_key(&id) && !ledger.maybe_inserted.contains(&id) {
                v.push(Violation::Unexpected {
                    id,
                    via: via.clone(),
                });
            } else if p != payload(id, version) {
                v.push(Violation::BadPayload {
                    id,
                    via: via.clone(),
                    version,
                });
            }
            let point = routing
                .function
                .builtin_point(&KeyValue::Int8(id))
                .unwrap_or_default();
            let owner = routing.owner(point).unwrap_or("(no range)");
            if owner != name {
                v.push(Violation::WrongShard {
                    id,
                    shard: name.clone(),
                    owner: owner.to_owned(),
                    point,
                });
            }
            on_shards.entry(id).or_default().push(name.clone());
        }
    }
    for (&id, where_) in &on_shards {
        if where_.len() > 1 {
            v.push(Violation::Duplicate {
                id,
                via: format!("shards {}", where_.join(", ")),
                copies: where_.len(),
            });
        }
    }
    if !opts.shards.is_empty() {
        for &id in &ledger.ids {
            if !on_shards.contains_key(&id) {
                v.push(Violation::Missing {
                    id,
                    via: "shards".into(),
                });
            }
        }
    }
    let after = routing_epoch(opts).await?;
    if after != routing.epoch {
        v.push(Violation::RoutingChanged {
            before: routing.epoch,
            after,
        });
    }
    Ok((checked, v))
}

async fn routing_epoch(opts: &Options) -> Result<u64, Error> {
    Ok(admin_get(opts, "/v1/ranges").await?["epoch"]
        .as_u64()
        .unwrap_or_default())
}

// -------------------------------------------------------------- admin API

pub(super) async fn admin_get(opts: &Options, path: &str) -> Result<Value, Error> {
    admin_call(opts, path, None).await
}

pub(super) async fn admin_post(opts: &Options, path: &str, body: Value) -> Result<Value, Error> {
    admin_call(opts, path, Some(body)).await
}

/// One admin API request (blocking HTTP client, off the runtime's
/// workers), bounded by 30 s.
async fn admin_call(opts: &Options, path: &str, body: Option<Value>) -> Result<Value, Error> {
    let url = format!("{}{}", opts.admin.trim_end_matches('/'), path);
    let auth = format!("Bearer {}", opts.token);
    let p = path.to_owned();
    let err = move |msg: String| Error::Admin {
        path: p.clone(),
        msg,
    };
    let e2 = err.clone();
    tokio::task::spawn_blocking(move || {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let res = match body {
            None => agent.get(&url).header("Authorization", &auth).call(),
            Some(b) => agent.post(&url).header("Authorization", &auth).send_json(b),
        };
        let mut res = res.map_err(|e| err(format!("cannot reach {url}: {e}")))?;
        let status = res.status();
        let text = res
            .body_mut()
            .read_to_string()
            .map_err(|e| err(e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| err(format!("answered {status} with non-JSON: {text}")))?;
        if !status.is_success() {
            let msg = v["error"].as_str().unwrap_or(&text).to_owned();
            return Err(err(format!("{msg} (HTTP {})", status.as_u16())));
        }
        Ok(v)
    })
    .await
    .map_err(|e| e2(e.to_string()))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn function_string() {
        assert_eq!(
            parse_function("pg_hash(seed=7)"),
            Some(RoutingFunction::PgHash { seed: 7 })
        );
        assert_eq!(parse_function("wasm(abc)"), None);
    }
}
