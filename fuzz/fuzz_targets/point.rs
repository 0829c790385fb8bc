//! Fuzz target `point`: see `hotrepart_router::fuzzing::keyed_point`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static SNAP: OnceLock<hotrepart_router::catalog::RoutingSnapshot> = OnceLock::new();
    let snap = SNAP.get_or_init(hotrepart_router::fuzzing::snapshot);
    hotrepart_router::fuzzing::keyed_point(snap, data);
});
