//! The admin API's WebAssembly routing-function endpoints:
//! `GET|POST /v1/functions`, `DELETE /v1/functions/{name}` and
//! `POST /v1/tables/{table}/function`.
//!
//! Guarantees:
//! - a module reaches the replicated log only after it compiled on this
//!   node with the limits every node uses (no imports, the ABI's exports,
//!   trial calls; docs/WASM_ABI.md): an invalid upload is a 400 and leaves
//!   the catalog untouched;
//! - the log stores the binary module (text `.wat` is converted here), so
//!   the id (SHA-256) names the same bytes on every node;
//! - attaching a function to a table is refused while any shard holds rows
//!   of the table: changing the function moves rows, a data move that
//!   reshard does not support yet.

use super::{count_rows, epoch_json, Api, ApiError, ApiResult};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hotrepart_router::catalog::{FunctionId, RoutingFunction};
use hotrepart_routing_paxos::catalog::{MAX_FUNCTION_BYTES, MAX_FUNCTION_NAME_LEN};
use hotrepart_routing_paxos::command::WasmModule;
use hotrepart_routing_paxos::{Applied, Catalog, CatalogCommand};
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest module accepted in an upload, in bytes as sent: text (`.wat`)
/// is bigger than the binary it becomes, which must fit
/// [`MAX_FUNCTION_BYTES`].
pub(super) const MAX_UPLOAD_BYTES: usize = 2 * MAX_FUNCTION_BYTES;

/// Request body limit of an upload: the module as hex plus the JSON around.
pub(super) const MAX_UPLOAD_BODY: usize = 2 * MAX_UPLOAD_BYTES + (64 << 10);

/// The id of the function named `name` in `catalog`.
pub(super) fn function_id(catalog: &Catalog, name: &str) -> Result<FunctionId, ApiError> {
    catalog.function(name).map(|f| f.id).ok_or_else(|| {
        ApiError::bad(format!(
            "unknown routing function {name:?} (upload it first: `proxyctl function upload`)"
        ))
    })
}

/// `name` as the catalog will accept it (the same rule, checked here so a
/// bad name is a 400 before anything is compiled or proposed).
fn check_name(name: &str) -> Result<(), ApiError> {
    let reason = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_FUNCTION_NAME_LEN {
        Some(format!("it is longer than {MAX_FUNCTION_NAME_LEN} bytes"))
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        Some("only ASCII letters, digits, '_', '-' and '.' are allowed".to_string())
    } else {
        None
    };
    match reason {
        Some(r) => Err(ApiError::bad(format!(
            "invalid function name {name:?}: {r}"
        ))),
        None => Ok(()),
    }
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    let digit = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("{:?} is not a hex digit", char::from(c))),
        }
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[derive(Deserialize)]
pub(super) struct Upload {
    name: String,
    /// The module, binary `.wasm` or `.wat` text, as hex.
    module_hex: String,
}

pub(super) async fn upload(State(api): State<Api>, Json(req): Json<Upload>) -> ApiResult {
    check_name(&req.name)?;
    let bytes = decode_hex(&req.module_hex)
        .map_err(|e| ApiError::bad(format!("function {:?}: module_hex: {e}", req.name)))?;
    if bytes.is_empty() {
        return Err(ApiError::bad(format!(
            "function {:?}: the module is empty",
            req.name
        )));
    }
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(ApiError::bad(format!(
            "function {:?}: the module has {} bytes, more than the limit of {MAX_UPLOAD_BYTES}",
            req.name,
            bytes.len()
        )));
    }
    // Compiling and the trial calls take milliseconds of CPU (a looping
    // module burns its fuel): off the async workers.
    let compiled =
        tokio::task::spawn_blocking(move || hotrepart_udf_wasm::Function::compile(&bytes))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("validation task failed: {e}"),
                )
            })?
            .map_err(|e| ApiError::bad(format!("function {:?} refused: {e}", req.name)))?;
    let wasm = compiled.wasm().to_vec();
    if wasm.len() > MAX_FUNCTION_BYTES {
        return Err(ApiError::bad(format!(
            "function {:?}: the binary module has {} bytes, more than the limit of {MAX_FUNCTION_BYTES}",
            req.name,
            wasm.len()
        )));
    }
    let size = wasm.len();
    let id = FunctionId(compiled.id());
    let a = api
        .propose(CatalogCommand::UploadFunction {
            name: req.name.clone(),
            wasm: WasmModule(wasm),
        })
        .await?;
    Ok(Json(json!({
        "name": req.name,
        "id": id.to_string(),
        "size": size,
        "changed": !matches!(a, Applied::Unchanged),
    })))
}

pub(super) async fn list(State(api): State<Api>) -> ApiResult {
    let catalog = api.node.catalog_handle.catalog();
    let snap = catalog.snapshot();
    let list: Vec<Value> = catalog
        .functions()
        .map(|(name, f)| {
            let tables: Vec<&str> = snap
                .map(|s| {
                    s.sharded_tables()
                        .filter(|t| t.function == RoutingFunction::Wasm { id: f.id })
                        .map(|t| t.name.as_str())
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": name,
                "id": f.id.to_string(),
                "size": f.wasm.len(),
                "tables": tables,
            })
        })
        .collect();
    Ok(Json(json!({ "epoch": catalog.epoch(), "functions": list })))
}

pub(super) async fn remove(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    if api.node.catalog_handle.catalog().function(&name).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown routing function {name:?}"),
        ));
    }
    // A function some table uses is refused by the catalog (409).
    api.propose(CatalogCommand::RemoveFunction { name: name.clone() })
        .await?;
    Ok(Json(json!({ "removed": name })))
}

#[derive(Deserialize)]
pub(super) struct Attach {
    /// Name of an uploaded function.
    function: String,
}

pub(super) async fn attach(
    State(api): State<Api>,
    Path(table): Path<String>,
    Json(req): Json<Attach>,
) -> ApiResult {
    let snap = api.snapshot()?;
    let t = snap.sharded_table(&table).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{table:?} is not a sharded table (declare it with `proxyctl table shard … --function`)"
            ),
        )
    })?;
    let id = function_id(&api.node.catalog_handle.catalog(), &req.function)?;
    let function = RoutingFunction::Wasm { id };
    if t.function == function {
        return Ok(Json(json!({ "epoch": snap.epoch(), "unchanged": true })));
    }
    // Attaching a function to a table that holds rows is a data move; until
    // reshard supports it, refuse. (Rows written between this count and the
    // decision are the same window `declare_table` has.)
    let counts = count_rows(&snap, &table, None).await?;
    if let Some((shard, db, n)) = counts.iter().find(|c| c.2 > 0) {
        return Err(ApiError::conflict(format!(
            "table {table} holds {n} row(s) on shard {shard} (database {db}); attaching a routing function to a table with rows would move them, which reshard does not support yet — attach it while the table is empty"
        )));
    }
    let a = api
        .propose(CatalogCommand::SetTableFunction { table, function })
        .await?;
    Ok(Json(epoch_json(&a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(decode_hex("00ff1A").as_deref(), Ok(&[0u8, 255, 26][..]));
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert_eq!(decode_hex("").as_deref(), Ok(&[][..]));
    }

    #[test]
    fn names() {
        assert!(check_name("tenant_prefix-v1.2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
    }
}
