//! Fuzz target `merge_values`: see `hotrepart_wire::fuzzing::merge_values`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hotrepart_wire::fuzzing::merge_values(data);
});
