//! Fuzz target `frame`: see `hotrepart_wire::fuzzing::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hotrepart_wire::fuzzing::frames(data);
});
