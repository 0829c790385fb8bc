//! Fuzz target `wasm_load`: see `hotrepart_udf_wasm::fuzzing::wasm_load`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hotrepart_udf_wasm::fuzzing::wasm_load(data);
});
