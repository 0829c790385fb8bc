//! Fuzz target `scram`: see `hotrepart_wire::fuzzing::scram`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hotrepart_wire::fuzzing::scram(data);
});
