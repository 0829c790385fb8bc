//! Fuzz target `backend`: see `hotrepart_wire::fuzzing::backend`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hotrepart_wire::fuzzing::backend(data);
});
