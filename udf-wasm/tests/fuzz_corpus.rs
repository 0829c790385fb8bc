//! The `wasm_load` fuzz target's body (`hotrepart_udf_wasm::fuzzing`) on
//! the stable toolchain: every module kept in `fuzz/corpus/wasm_load/`
//! (seeds: the example and test functions, text and binary; what
//! cargo-fuzz kept; every crash it found, minimised) is loaded again, and
//! random damage to a valid binary module (seeded; `FUZZ_SEED=n` replays
//! it) is loaded, so the property is checked on every test run.
#![allow(clippy::unwrap_used)]

use hotrepart_udf_wasm::fuzzing::wasm_load;
use rand::{Rng, SeedableRng};

fn corpus() -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/wasm_load");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

#[test]
fn kept_corpus_replays_cleanly() {
    let kept = corpus();
    assert!(kept.len() >= 5, "only {} modules kept", kept.len());
    for (p, d) in &kept {
        let r = std::panic::catch_unwind(|| wasm_load(d));
        assert!(r.is_ok(), "{} breaks the target", p.display());
    }
}

#[test]
fn damaged_modules_load_or_fail_cleanly() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (replay with FUZZ_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let binaries: Vec<Vec<u8>> = corpus()
        .into_iter()
        .filter(|(_, d)| d.starts_with(b"\0asm"))
        .map(|(_, d)| d)
        .collect();
    assert!(!binaries.is_empty(), "no binary module kept");
    for _ in 0..300 {
        let mut m = binaries[rng.random_range(0..binaries.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..m.len());
            match rng.random_range(0..3) {
                0 => m[at] = rng.random(),
                1 => m.truncate(at.max(8)),
                _ => m.insert(at, rng.random()),
            }
        }
        let r = std::panic::catch_unwind(|| wasm_load(&m));
        assert!(r.is_ok(), "module {m:?} breaks the target (seed {seed})");
    }
}
