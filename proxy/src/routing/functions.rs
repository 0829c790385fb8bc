//! WebAssembly routing functions in the node: compiled once per node (by
//! content hash), adapted to the router's [`PointFunction`], and attached to
//! each routing snapshot before it is published, so that routing stays
//! synchronous and never compiles.
//!
//! Guarantees:
//! * A module is compiled at most once per [`FunctionCache`] (per id); a
//!   snapshot that names the same function again reuses it, with its pool
//!   of warm instances.
//! * A compiled function's id is checked against the id the catalog gives
//!   it: a module whose SHA-256 differs is refused, never attached under
//!   the wrong id.
//! * The key reaches the function as docs/WASM_ABI.md says, encoded as the
//!   *column's* type (an `int4` literal for a `bigint` column arrives as 8
//!   bytes with OID 20), so the point of a row does not depend on how a
//!   statement wrote its key.
//! * A failing call (trap, fuel, memory, bad return) is an `Err` for that
//!   key only; the router turns it into an error for that statement.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hotrepart_router::catalog::{FunctionId, KeyType, KeyValue, PointFunction, RoutingSnapshot};
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::{CallError, Function, Limits, Runtime};

/// A routing function could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The wasmtime engine could not be set up.
    #[error("cannot set up the WebAssembly runtime: {0}")]
    Runtime(String),
    /// A module does not compile or fails validation (docs/WASM_ABI.md).
    #[error("routing function {id}: {reason}")]
    Invalid {
        /// Its id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A module's SHA-256 is not the id it was given.
    #[error("routing function {expected}: the module's SHA-256 is {actual}")]
    WrongId {
        /// The id it was given.
        expected: FunctionId,
        /// Its content hash.
        actual: FunctionId,
    },
    /// A table uses a function whose module was not given.
    #[error("routing function {0} is used by a table but its module is missing")]
    Missing(FunctionId),
    /// A module file cannot be read or converted.
    #[error("routing function {name:?} ({path}): {reason}")]
    File {
        /// The function's name.
        name: String,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// Compiled routing functions by id, sharing one wasmtime engine (made
/// when the first function is compiled: a node without routing functions
/// never sets up wasmtime).
pub struct FunctionCache {
    limits: Limits,
    runtime: OnceLock<Runtime>,
    compiled: Mutex<BTreeMap<FunctionId, Arc<Function>>>,
}

impl fmt::Debug for FunctionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<FunctionId> = self.lock().keys().copied().collect();
        f.debug_struct("FunctionCache")
            .field("limits", &self.limits)
            .field("compiled", &ids)
            .finish()
    }
}

impl FunctionCache {
    /// An empty cache whose functions run under `limits`.
    pub fn new(limits: Limits) -> FunctionCache {
        FunctionCache {
            limits,
            runtime: OnceLock::new(),
            compiled: Mutex::new(BTreeMap::new()),
        }
    }

    fn runtime(&self) -> Result<&Runtime, FunctionError> {
        if let Some(r) = self.runtime.get() {
            return Ok(r);
        }
        let r = Runtime::new(self.limits).map_err(|e| FunctionError::Runtime(e.to_string()))?;
        Ok(self.runtime.get_or_init(|| r))
    }

    /// The counters of every compiled function (for `/metrics`).
    pub fn stats(&self) -> Vec<(FunctionId, hotrepart_udf_wasm::FunctionStats)> {
        self.lock().iter().map(|(id, f)| (*id, f.stats())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<FunctionId, Arc<Function>>> {
        self.compiled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The compiled function `id`, compiling `wasm` (binary module) the first
    /// time. Compiling takes milliseconds: call it where blocking that long
    /// is fine (publishing a snapshot), not per statement.
    pub fn get_or_compile(
        &self,
        id: FunctionId,
        wasm: &[u8],
    ) -> Result<Arc<Function>, FunctionError> {
        if let Some(f) = self.lock().get(&id) {
            return Ok(Arc::clone(f));
        }
        // Compiled outside the lock: a concurrent resolve of another
        // function does not wait; two compiles of one id keep the first.
        let f = self
            .runtime()?
            .compile(wasm)
            .map_err(|e| FunctionError::Invalid {
                id: id.short(),
                reason: e.to_string(),
            })?;
        let actual = FunctionId(f.id());
        if actual != id {
            return Err(FunctionError::WrongId {
                expected: id,
                actual,
            });
        }
        Ok(Arc::clone(
            self.lock().entry(id).or_insert_with(|| Arc::new(f)),
        ))
    }

    /// `snapshot` with the implementations of the functions its tables use
    /// attached, compiled from `modules` (id → binary module; modules no
    /// table uses are ignored). Every function that cannot be attached is
    /// reported; the snapshot is returned anyway with those left out, so
    /// only statements that need them fail (39000).
    pub fn resolve_partial<'a>(
        &self,
        snapshot: RoutingSnapshot,
        modules: impl IntoIterator<Item = (FunctionId, &'a [u8])>,
    ) -> (RoutingSnapshot, Vec<FunctionError>) {
        let used = snapshot.wasm_function_ids();
        let mut attached: Vec<(FunctionId, Arc<dyn PointFunction>)> = Vec::new();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (id, wasm) in modules {
            if !used.contains(&id) || !seen.insert(id) {
                continue;
            }
            match self.get_or_compile(id, wasm) {
                Ok(f) => attached.push((id, Arc::new(WasmPoint::new(f)))),
                Err(e) => errors.push(e),
            }
        }
        errors.extend(used.difference(&seen).map(|id| FunctionError::Missing(*id)));
        // Forget functions no table uses any more (their instances too).
        self.lock().retain(|id, _| used.contains(id));
        (snapshot.with_functions(attached), errors)
    }

    /// Like [`resolve_partial`](Self::resolve_partial), but any function
    /// that cannot be attached is an error.
    pub fn resolve<'a>(
        &self,
        snapshot: RoutingSnapshot,
        modules: impl IntoIterator<Item = (FunctionId, &'a [u8])>,
    ) -> Result<RoutingSnapshot, FunctionError> {
        let (snapshot, mut errors) = self.resolve_partial(snapshot, modules);
        match errors.is_empty() {
            true => Ok(snapshot),
            false => Err(errors.swap_remove(0)),
        }
    }
}

/// Attaches the functions `snapshot` uses, compiled from `modules` with a
/// fresh cache and the default [`Limits`] (see [`FunctionCache::resolve`];
/// a node that publishes many snapshots keeps one cache instead).
pub fn resolve<'a>(
    snapshot: RoutingSnapshot,
    modules: impl IntoIterator<Item = (FunctionId, &'a [u8])>,
) -> Result<RoutingSnapshot, FunctionError> {
    FunctionCache::new(Limits::default()).resolve(snapshot, modules)
}

/// Reads a routing function's file: binary `.wasm`, or `.wat` text converted
/// to binary (the binary is what has an id).
pub fn load_module(name: &str, path: &Path) -> Result<Vec<u8>, FunctionError> {
    let err = |reason: String| FunctionError::File {
        name: name.to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    wat::parse_bytes(&bytes)
        .map(|b| b.into_owned())
        .map_err(|e| err(e.to_string()))
}

/// The id of a binary module (SHA-256).
pub fn module_id(wasm: &[u8]) -> FunctionId {
    FunctionId(hotrepart_udf_wasm::sha256_id(wasm))
}

/// A compiled WebAssembly function as the router's [`PointFunction`].
#[derive(Debug)]
pub struct WasmPoint {
    function: Arc<Function>,
}

impl WasmPoint {
    /// Wraps a compiled function.
    pub fn new(function: Arc<Function>) -> WasmPoint {
        WasmPoint { function }
    }
}

/// An integer key as `i64`, whatever its width.
fn int_value(key: &KeyValue) -> Option<i64> {
    match *key {
        KeyValue::Int2(v) => Some(i64::from(v)),
        KeyValue::Int4(v) => Some(i64::from(v)),
        KeyValue::Int8(v) => Some(v),
        KeyValue::Text(_) | KeyValue::Uuid(_) => None,
    }
}

/// The user-facing reason of a failed call (the router prefixes the
/// function and the key).
fn reason(e: CallError) -> String {
    match e {
        CallError::Trap(m) => format!("trap: {m}"),
        CallError::OutOfFuel(n) => format!("fuel exhausted ({n} units per call)"),
        CallError::MemoryLimit(b) => format!("memory limit exceeded ({b} bytes)"),
        CallError::BadReturn(m) => format!("bad return: {m}"),
        CallError::KeyTooLong { len, max } => {
            format!("the key has {len} bytes, more than the limit of {max}")
        }
        CallError::Instantiate(m) => format!("cannot instantiate: {m}"),
    }
}

impl PointFunction for WasmPoint {
    fn point(&self, key_type: KeyType, key: &KeyValue) -> Result<u64, String> {
        let out_of_range =
            |v: i64| format!("value {v} is out of range for type {}", key_type.sql_name());
        let f = &self.function;
        let result = match (key_type, key) {
            (KeyType::Text, KeyValue::Text(s)) => f.point(oid::TEXT, s.as_bytes()),
            (KeyType::Uuid, KeyValue::Uuid(u)) => f.point(oid::UUID, u),
            (t, k) if t.is_integer() && k.key_type().is_integer() => {
                let v = int_value(k).unwrap_or_default();
                match t {
                    KeyType::Int2 => {
                        let v = i16::try_from(v).map_err(|_| out_of_range(v))?;
                        f.point(oid::INT2, &abi::encode_int2(v))
                    }
                    KeyType::Int4 => {
                        let v = i32::try_from(v).map_err(|_| out_of_range(v))?;
                        f.point(oid::INT4, &abi::encode_int4(v))
                    }
                    _ => f.point(oid::INT8, &abi::encode_int8(v)),
                }
            }
            (t, k) => {
                return Err(format!(
                    "a {} key for a {} shard key column",
                    k.key_type(),
                    t
                ))
            }
        };
        result.map_err(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE_WAT: &str = r#"(module
      (memory (export "memory") 1)
      (func (export "hr_abi_version") (result i32) (i32.const 1))
      (func (export "hr_alloc") (param $len i32) (result i32) (i32.const 16))
      ;; the point is the key's length in bytes << 8 | the type OID's low byte;
      ;; key 13 as int8 traps
      (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
        (if (i32.and (i32.eq (local.get $oid) (i32.const 20))
                     (i64.eq (i64.load (local.get $p)) (i64.const 0x0d00000000000000)))
          (then unreachable))
        (i64.or (i64.shl (i64.extend_i32_u (local.get $n)) (i64.const 8))
                (i64.extend_i32_u (i32.and (local.get $oid) (i32.const 255))))))"#;

    fn module() -> Vec<u8> {
        wat::parse_str(RANGE_WAT).expect("valid wat")
    }

    #[test]
    fn keys_are_encoded_as_the_column_type() {
        let cache = FunctionCache::new(Limits::default());
        let wasm = module();
        let f = WasmPoint::new(
            cache
                .get_or_compile(module_id(&wasm), &wasm)
                .expect("compiles"),
        );
        // int8 column: 8 bytes, OID 20, whatever the literal's width
        for k in [KeyValue::Int2(5), KeyValue::Int4(5), KeyValue::Int8(5)] {
            assert_eq!(f.point(KeyType::Int8, &k), Ok(8 << 8 | 20));
        }
        assert_eq!(f.point(KeyType::Int4, &KeyValue::Int8(5)), Ok(4 << 8 | 23));
        assert_eq!(f.point(KeyType::Int2, &KeyValue::Int8(5)), Ok(2 << 8 | 21));
        assert_eq!(
            f.point(KeyType::Text, &KeyValue::Text("abc".into())),
            Ok(3 << 8 | 25)
        );
        assert_eq!(
            f.point(KeyType::Uuid, &KeyValue::Uuid([0; 16])),
            Ok(16 << 8 | (2950 & 255))
        );
        assert_eq!(
            f.point(KeyType::Int2, &KeyValue::Int8(1 << 20)),
            Err("value 1048576 is out of range for type smallint".into())
        );
        assert!(f.point(KeyType::Int8, &KeyValue::Text("x".into())).is_err());
        let e = f
            .point(KeyType::Int8, &KeyValue::Int8(13))
            .expect_err("traps");
        assert!(e.starts_with("trap: "), "{e}");
    }

    #[test]
    fn resolve_compiles_once_and_checks_ids() {
        use hotrepart_router::catalog::{RoutingFunction, ShardId, ShardedTable};
        let wasm = module();
        let id = module_id(&wasm);
        let s0 = ShardId::new("s0").expect("name");
        let snap = |function| {
            RoutingSnapshot::builder(1)
                .shard(s0.clone(), "")
                .home_shard(s0.clone())
                .sharded_table(ShardedTable {
                    name: "t".into(),
                    key_column: "k".into(),
                    key_type: KeyType::Int8,
                    function,
                })
                .equal_ranges(1)
                .and_then(|b| b.build())
                .expect("snapshot")
        };
        let cache = FunctionCache::new(Limits::default());
        let s = cache
            .resolve(snap(RoutingFunction::Wasm { id }), [(id, wasm.as_slice())])
            .expect("resolves");
        assert_eq!(s.point_for_key("t", &KeyValue::Int4(1)), Ok(8 << 8 | 20));
        let first = cache.get_or_compile(id, &wasm).expect("cached");
        let again = cache.get_or_compile(id, &wasm).expect("cached");
        assert!(Arc::ptr_eq(&first, &again));
        // a module under another id is refused
        let other = FunctionId([7; 32]);
        let e = cache
            .resolve(
                snap(RoutingFunction::Wasm { id: other }),
                [(other, wasm.as_slice())],
            )
            .expect_err("wrong id");
        assert!(matches!(e, FunctionError::WrongId { .. }), "{e}");
        // a missing module: partial resolution leaves it unresolved
        let (s, errors) = cache.resolve_partial(snap(RoutingFunction::Wasm { id: other }), []);
        assert_eq!(s.unresolved_functions(), vec![other]);
        assert!(matches!(errors.as_slice(), [FunctionError::Missing(m)] if *m == other));
        // not a valid routing function
        let bad = wat::parse_str("(module)").expect("wat");
        let bad_id = module_id(&bad);
        let e = cache
            .resolve(
                snap(RoutingFunction::Wasm { id: bad_id }),
                [(bad_id, bad.as_slice())],
            )
            .expect_err("invalid");
        assert!(matches!(e, FunctionError::Invalid { .. }), "{e}");
        // functions no table uses are dropped from the cache
        cache
            .resolve(snap(RoutingFunction::PgHash { seed: 0 }), [])
            .expect("nothing to resolve");
        assert!(format!("{cache:?}").contains("compiled: []"));
    }
}
