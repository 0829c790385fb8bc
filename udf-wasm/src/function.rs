//! Compiled routing functions and their instance pool.
//!
//! A [`Runtime`] is a wasmtime engine configured for deterministic,
//! limited execution plus the [`Limits`] its functions run under. A
//! [`Function`] is one validated module; [`Function::point`] takes an idle
//! instance from the function's pool (or makes one), runs one call with a
//! fresh fuel budget, and puts the instance back only if the call
//! succeeded — a trap can leave an instance's memory half-written, so a
//! failed instance is never reused.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, ExternType, FuncType, Instance, InstancePre, Linker, Memory, Module,
    ResourceLimiter, Store, Trap, TypedFunc, ValType, WasmBacktrace,
};

use crate::abi;
use crate::error::{CallError, Error};

/// Resource limits of routing calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per call (`hr_alloc` and `hr_route` together). One unit is
    /// roughly one WebAssembly instruction.
    pub fuel_per_call: u64,
    /// Cap on an instance's linear memory, in bytes. `memory.grow` past it
    /// returns -1; an initial memory above it is refused at compile.
    pub max_memory_bytes: usize,
    /// Cap on an instance's table elements.
    pub max_table_elements: usize,
    /// Longest key passed to a function, in bytes.
    pub max_key_len: usize,
    /// Idle instances kept per function; more may exist while calls run
    /// concurrently, the surplus is dropped when they finish.
    pub max_idle_instances: usize,
}

impl Default for Limits {
    /// 10 million fuel (a few milliseconds at most), 16 MiB of memory,
    /// 10,000 table elements, 64 KiB keys, 16 idle instances.
    fn default() -> Self {
        Limits {
            fuel_per_call: 10_000_000,
            max_memory_bytes: 16 << 20,
            max_table_elements: 10_000,
            max_key_len: 64 << 10,
            max_idle_instances: 16,
        }
    }
}

/// A wasmtime engine set up for routing functions, and the limits they run
/// under. One per node is enough; it is cheap to clone (the engine is shared).
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    limits: Limits,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime with these limits.
    pub fn new(limits: Limits) -> Result<Runtime, Error> {
        let mut config = Config::new();
        config
            .consume_fuel(true)
            // Same point on every node: canonical NaNs, no relaxed SIMD
            // (its results are allowed to differ between CPUs), one memory.
            .cranelift_nan_canonicalization(true)
            .wasm_relaxed_simd(false)
            .wasm_multi_memory(false)
            .wasm_memory64(false)
            // Routing functions are small; a deep recursion is a bug and
            // should trap quickly, well within the calling thread's stack.
            .max_wasm_stack(256 << 10);
        let engine = Engine::new(&config).map_err(|e| Error::Invalid(format!("{e:#}")))?;
        Ok(Runtime { engine, limits })
    }

    /// The limits calls run under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Compiles and validates a routing function (see [`Function::compile`]).
    pub fn compile(&self, bytes: &[u8]) -> Result<Function, Error> {
        Function::compile_with(self, bytes)
    }
}

/// The SHA-256 of a binary module: a function's identity in the catalog.
///
/// The catalog's type for it is `hotrepart_router::catalog::FunctionId`,
/// which the node builds from these bytes; this crate stands alone and
/// names no catalog type.
pub fn sha256_id(wasm: &[u8]) -> [u8; 32] {
    Sha256::digest(wasm).into()
}

/// Lowercase hex (for `Debug`).
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A validated routing function, ready to be called from any thread.
pub struct Function {
    id: [u8; 32],
    wasm: Vec<u8>,
    engine: Engine,
    limits: Limits,
    pre: InstancePre<HostState>,
    /// Idle instances. A plain mutex: it is held only to push or pop one
    /// element, never during a call.
    idle: Mutex<Vec<Slot>>,
    /// [`Function::stats`]: two relaxed adds per successful call (calls,
    /// fuel), the rest off that path.
    instances: AtomicU64,
    calls: AtomicU64,
    fuel: AtomicU64,
    failed: AtomicU64,
    out_of_fuel: AtomicU64,
}

/// What a function's calls have cost and how they failed since it was
/// compiled (its trial calls left out). A successful call on a pooled
/// instance pays two relaxed atomic adds (its count and its fuel); the
/// rest is counted where a call is slow or fails anyway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionStats {
    /// Calls, successful or not.
    pub calls: u64,
    /// Fuel the successful calls used (failed ones are not measured; one
    /// out of fuel used its whole budget).
    pub fuel_used: u64,
    /// Instances created (the first call on each thread at once, and one
    /// after each failed call).
    pub instances_created: u64,
    /// Calls that failed: traps, fuel, memory, bad returns, keys too long.
    pub failed_calls: u64,
    /// Of those, calls that ran out of fuel.
    pub out_of_fuel: u64,
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("id", &hex(&self.id))
            .field("wasm_len", &self.wasm.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Per-store data: the memory limiter, which also remembers whether it
/// refused a growth during the current call.
struct HostState {
    max_memory_bytes: usize,
    max_table_elements: usize,
    memory_refused: bool,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_table_elements)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// One live instance with its store and the exports a call needs.
struct Slot {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    route: TypedFunc<(i32, i32, i32), i64>,
}

impl Function {
    /// Compiles and validates a routing function with the default
    /// [`Limits`], on an engine of its own. A node should rather share one
    /// [`Runtime`] and call [`Runtime::compile`].
    ///
    /// `bytes` is a binary module (starting with `\0asm`) or its text form.
    pub fn compile(bytes: &[u8]) -> Result<Function, Error> {
        Runtime::new(Limits::default())?.compile(bytes)
    }

    /// Compiles and validates a routing function on `runtime`.
    pub fn compile_with(runtime: &Runtime, bytes: &[u8]) -> Result<Function, Error> {
        let wasm = wat::parse_bytes(bytes)
            .map_err(|e| Error::Invalid(e.to_string()))?
            .into_owned();
        let module =
            Module::new(&runtime.engine, &wasm).map_err(|e| Error::Invalid(format!("{e:#}")))?;
        check_interface(&module)?;
        let linker = Linker::new(&runtime.engine);
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| Error::Invalid(format!("{e:#}")))?;
        let function = Function {
            id: sha256_id(&wasm),
            wasm,
            engine: runtime.engine.clone(),
            limits: runtime.limits,
            pre,
            idle: Mutex::new(Vec::new()),
            instances: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            fuel: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            out_of_fuel: AtomicU64::new(0),
        };
        function.check_version()?;
        function.trial_calls()?;
        // The trial's instances and traps are not the users'.
        for c in [
            &function.instances,
            &function.calls,
            &function.fuel,
            &function.failed,
            &function.out_of_fuel,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        Ok(function)
    }

    /// The function's id: SHA-256 of [`wasm`](Self::wasm) ([`sha256_id`]).
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// The binary module (text input converted), as stored in the catalog.
    pub fn wasm(&self) -> &[u8] {
        &self.wasm
    }

    /// The limits calls run under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The point of `key`, a value of PostgreSQL type `type_oid` in its
    /// binary send format (see [`abi`]).
    pub fn point(&self, type_oid: u32, key: &[u8]) -> Result<u64, CallError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.call_pooled(type_oid, key) {
            Ok((point, fuel)) => {
                self.fuel.fetch_add(fuel, Ordering::Relaxed);
                Ok(point)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if matches!(e, CallError::OutOfFuel(_)) {
                    self.out_of_fuel.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// Counters of this function's calls ([`FunctionStats`]).
    pub fn stats(&self) -> FunctionStats {
        FunctionStats {
            instances_created: self.instances.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            fuel_used: self.fuel.load(Ordering::Relaxed),
            failed_calls: self.failed.load(Ordering::Relaxed),
            out_of_fuel: self.out_of_fuel.load(Ordering::Relaxed),
        }
    }

    /// (point, fuel used).
    fn call_pooled(&self, type_oid: u32, key: &[u8]) -> Result<(u64, u64), CallError> {
        if key.len() > self.limits.max_key_len {
            return Err(CallError::KeyTooLong {
                len: key.len(),
                max: self.limits.max_key_len,
            });
        }
        let popped = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut slot = match popped {
            Some(slot) => slot,
            None => self
                .instantiate()
                .map_err(|e| CallError::Instantiate(format!("{e:#}")))?,
        };
        // On error the slot is dropped here: never reuse a failed instance.
        let point = slot.call(type_oid, key, &self.limits)?;
        let fuel = self
            .limits
            .fuel_per_call
            .saturating_sub(slot.store.get_fuel().unwrap_or(0));
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.limits.max_idle_instances {
            idle.push(slot);
        }
        Ok((point, fuel))
    }

    /// Number of idle instances in the pool (for tests and metrics).
    pub fn idle_instances(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn new_store(&self) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                max_memory_bytes: self.limits.max_memory_bytes,
                max_table_elements: self.limits.max_table_elements,
                memory_refused: false,
            },
        );
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        store
    }

    fn instantiate(&self) -> wasmtime::Result<Slot> {
        self.instances.fetch_add(1, Ordering::Relaxed);
        let mut store = self.new_store();
        // Start functions and data initialisation run under the call budget.
        store.set_fuel(self.limits.fuel_per_call)?;
        let instance = self.pre.instantiate(&mut store)?;
        slot_from(store, instance)
    }

    /// `hr_abi_version()` on a fresh instance.
    fn check_version(&self) -> Result<(), Error> {
        let mut store = self.new_store();
        let call = |store: &mut Store<HostState>| -> wasmtime::Result<i32> {
            store.set_fuel(self.limits.fuel_per_call)?;
            let instance = self.pre.instantiate(&mut *store)?;
            let version =
                instance.get_typed_func::<(), i32>(&mut *store, abi::EXPORT_ABI_VERSION)?;
            store.set_fuel(self.limits.fuel_per_call)?;
            version.call(&mut *store, ())
        };
        let found = call(&mut store).map_err(|e| {
            let why = if store.data().memory_refused {
                format!(
                    "memory above the cap of {} bytes",
                    self.limits.max_memory_bytes
                )
            } else {
                format!("{e:#}")
            };
            Error::Invalid(format!("instantiating and calling hr_abi_version: {why}"))
        })?;
        if found != abi::ABI_VERSION {
            return Err(Error::AbiVersion {
                found,
                expected: abi::ABI_VERSION,
            });
        }
        Ok(())
    }

    /// Calls the function with a zero (or empty) key of every ABI type,
    /// twice. At least one type must give a point; a type may be refused by
    /// a trap, but not by running out of fuel or memory, and the two calls
    /// must agree.
    fn trial_calls(&self) -> Result<(), Error> {
        let keys: [(u32, &[u8]); 6] = [
            (abi::oid::INT8, &[0; 8]),
            (abi::oid::INT4, &[0; 4]),
            (abi::oid::INT2, &[0; 2]),
            (abi::oid::TEXT, b""),
            (abi::oid::TEXT, b"hotrepart"),
            (abi::oid::UUID, &[0; 16]),
        ];
        let mut answered = 0;
        for (type_oid, key) in keys {
            let first = self.point(type_oid, key);
            match first {
                Ok(p) => {
                    answered += 1;
                    let again = self.point(type_oid, key);
                    if again != Ok(p) {
                        return Err(Error::TrialCall(format!(
                            "type {type_oid}: first call gave point {p:#018x}, second {again:?}"
                        )));
                    }
                }
                Err(CallError::Trap(_)) => {}
                Err(e) => return Err(Error::TrialCall(format!("type {type_oid}: {e}"))),
            }
        }
        if answered == 0 {
            return Err(Error::TrialCall(
                "every trial key trapped (int8, int4, int2, text, uuid)".into(),
            ));
        }
        Ok(())
    }
}

fn slot_from(mut store: Store<HostState>, instance: Instance) -> wasmtime::Result<Slot> {
    let memory = instance
        .get_memory(&mut store, abi::EXPORT_MEMORY)
        .ok_or_else(|| wasmtime::Error::msg("no memory export"))?;
    let alloc = instance.get_typed_func::<i32, i32>(&mut store, abi::EXPORT_ALLOC)?;
    let route = instance.get_typed_func::<(i32, i32, i32), i64>(&mut store, abi::EXPORT_ROUTE)?;
    Ok(Slot {
        store,
        memory,
        alloc,
        route,
    })
}

impl Slot {
    fn call(&mut self, type_oid: u32, key: &[u8], limits: &Limits) -> Result<u64, CallError> {
        let store = &mut self.store;
        store.data_mut().memory_refused = false;
        store
            .set_fuel(limits.fuel_per_call)
            .map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
        // Keys are at most `max_key_len` (≪ 2 GiB), so the length fits.
        let len = key.len() as i32;
        let ptr = self
            .alloc
            .call(&mut *store, len)
            .map_err(|e| call_error(e, store.data(), limits))?;
        // A negative address wraps to a huge one: out of bounds below.
        let start = ptr as u32 as usize;
        let (data, state) = self.memory.data_and_store_mut(&mut *store);
        let mem_len = data.len();
        let Some(dst) = start
            .checked_add(key.len())
            .and_then(|end| data.get_mut(start..end))
        else {
            // hr_alloc's usual answer to a refused memory.grow is -1.
            if state.memory_refused {
                return Err(CallError::MemoryLimit(limits.max_memory_bytes));
            }
            return Err(CallError::BadReturn(format!(
                "hr_alloc({len}) returned {ptr}, but the buffer does not fit in the {mem_len} bytes of memory"
            )));
        };
        dst.copy_from_slice(key);
        let point = self
            .route
            .call(&mut *store, (type_oid as i32, ptr, len))
            .map_err(|e| call_error(e, store.data(), limits))?;
        Ok(point as u64)
    }
}

/// Sorts a failed wasm call into a [`CallError`].
fn call_error(e: wasmtime::Error, state: &HostState, limits: &Limits) -> CallError {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::OutOfFuel(limits.fuel_per_call),
        _ if state.memory_refused => CallError::MemoryLimit(limits.max_memory_bytes),
        Some(trap) => {
            let place = e
                .downcast_ref::<WasmBacktrace>()
                .and_then(|bt| bt.frames().first())
                .map(|frame| match frame.func_name() {
                    Some(name) => format!(" in `{name}`"),
                    None => format!(" in function #{}", frame.func_index()),
                })
                .unwrap_or_default();
            CallError::Trap(format!("{trap}{place}"))
        }
        None => CallError::Trap(format!("{e:#}")),
    }
}

/// The module's imports and exports against the ABI.
fn check_interface(module: &Module) -> Result<(), Error> {
    let imports: Vec<String> = module
        .imports()
        .map(|i| format!("`{}::{}`", i.module(), i.name()))
        .collect();
    if !imports.is_empty() {
        return Err(Error::Imports(imports.join(", ")));
    }
    match module.get_export(abi::EXPORT_MEMORY) {
        None => return Err(Error::MissingExport(abi::EXPORT_MEMORY)),
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => {}
        Some(other) => {
            return Err(Error::WrongExport {
                name: abi::EXPORT_MEMORY,
                expected: "a 32-bit unshared memory",
                found: describe(&other),
            })
        }
    }
    let funcs: [(&'static str, &'static str, &[ValType], &[ValType]); 3] = [
        (
            abi::EXPORT_ABI_VERSION,
            "func () -> i32",
            &[],
            &[ValType::I32],
        ),
        (
            abi::EXPORT_ALLOC,
            "func (i32) -> i32",
            &[ValType::I32],
            &[ValType::I32],
        ),
        (
            abi::EXPORT_ROUTE,
            "func (i32, i32, i32) -> i64",
            &[ValType::I32, ValType::I32, ValType::I32],
            &[ValType::I64],
        ),
    ];
    for (name, expected, params, results) in funcs {
        match module.get_export(name) {
            None => return Err(Error::MissingExport(name)),
            Some(ExternType::Func(f)) if signature_is(&f, params, results) => {}
            Some(other) => {
                return Err(Error::WrongExport {
                    name,
                    expected,
                    found: describe(&other),
                })
            }
        }
    }
    Ok(())
}

fn signature_is(f: &FuncType, params: &[ValType], results: &[ValType]) -> bool {
    fn same(a: impl ExactSizeIterator<Item = ValType>, b: &[ValType]) -> bool {
        a.len() == b.len() && a.zip(b).all(|(x, y)| ValType::eq(&x, y))
    }
    same(f.params(), params) && same(f.results(), results)
}

fn describe(t: &ExternType) -> String {
    match t {
        ExternType::Func(f) => {
            let list = |it: &mut dyn Iterator<Item = ValType>| {
                it.map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
            };
            format!(
                "func ({}) -> ({})",
                list(&mut f.params()),
                list(&mut f.results())
            )
        }
        ExternType::Memory(m) if m.is_64() => "a 64-bit memory".into(),
        ExternType::Memory(_) => "a shared memory".into(),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Function>();
        check::<Runtime>();
    }

    #[test]
    fn id_is_hex_sha256() {
        let id = sha256_id(b"");
        assert_eq!(
            hex(&id),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
