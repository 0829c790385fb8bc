//! The body of the coverage-guided fuzz target `wasm_load`
//! (`fuzz/wasm/fuzz_targets/wasm_load.rs`, cargo-fuzz with libFuzzer), here
//! so that the stable test suite replays the kept corpus through the same
//! code (`udf-wasm/tests/fuzz_corpus.rs`).
//!
//! Property: loading an uploaded module (binary or text, as `CREATE
//! FUNCTION … USING WASM` / the admin API hand it to
//! [`Runtime::compile`]) never panics; a binary module that WebAssembly
//! validation refuses gets an error; a module that loads answers calls
//! with a point or a [`crate::CallError`], the same point twice.
//!
//! Not part of the crate's API (hidden from its docs).

use crate::{Function, Limits, Runtime};
use std::sync::OnceLock;

/// The runtime every run compiles on: the default limits but a small fuel
/// budget, so that a looping module costs a fuzz run little.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::new(Limits {
            fuel_per_call: 100_000,
            ..Limits::default()
        })
        .unwrap_or_else(|e| panic!("the fuzz runtime: {e}"))
    })
}

/// A plain wasmtime engine (every standard proposal on): what it refuses,
/// the routing runtime (stricter) must refuse too.
fn plain_engine() -> &'static wasmtime::Engine {
    static E: OnceLock<wasmtime::Engine> = OnceLock::new();
    E.get_or_init(wasmtime::Engine::default)
}

/// Target `wasm_load`: `data` is the uploaded module.
pub fn wasm_load(data: &[u8]) {
    let r = Function::compile_with(runtime(), data);
    if data.starts_with(b"\0asm") && wasmtime::Module::validate(plain_engine(), data).is_err() {
        assert!(r.is_err(), "an invalid module loaded");
    }
    if let Ok(f) = r {
        assert!(
            wasmtime::Module::validate(plain_engine(), f.wasm()).is_ok(),
            "a loaded module does not validate"
        );
        let key = &data[..data.len().min(16)];
        for oid in [20, 25] {
            let a = f.point(oid, key);
            let b = f.point(oid, key);
            if let (Ok(x), Ok(y)) = (&a, &b) {
                assert_eq!(x, y, "two points for one key");
            }
        }
    }
}
