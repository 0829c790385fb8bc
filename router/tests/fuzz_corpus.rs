//! The fuzz targets' bodies (`hotrepart_router::fuzzing`) on the stable
//! toolchain: every input kept in `fuzz/corpus/<target>/` (the corpora
//! cargo-fuzz grew, and every crash it found, minimised) is replayed, and
//! random inputs (seeded; the seed is printed, `FUZZ_SEED=n` replays it)
//! run through each target, so the properties are checked on every test
//! run even where no nightly toolchain builds the fuzzers.
#![allow(clippy::unwrap_used)]

use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_router::fuzzing::{copy_split, keyed_point, route_text, snapshot};
use rand::{Rng, SeedableRng};

type Target = fn(&RoutingSnapshot, &[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("route", route_text),
    ("point", keyed_point),
    ("copy", copy_split),
];

#[test]
fn kept_corpora_replay_cleanly() {
    let snap = snapshot();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");
    let mut total = 0;
    for (name, f) in TARGETS {
        let dir = std::path::Path::new(root).join(name);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&snap, &data)));
            assert!(r.is_ok(), "{name}: {} breaks the target", path.display());
            n += 1;
        }
        assert!(n > 10, "{name}: only {n} inputs kept in {}", dir.display());
        total += n;
    }
    eprintln!("{total} kept inputs replayed");
}

#[test]
fn random_inputs_keep_the_properties() {
    let snap = snapshot();
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (replay with FUZZ_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Bytes biased toward what the targets read: SQL words, digits,
    // quotes, COPY delimiters and the binary COPY signature.
    let pieces: [&[u8]; 14] = [
        b"SELECT * FROM users WHERE id = ",
        b"INSERT INTO users (id, name) VALUES (",
        b" OR id = ",
        b"'",
        b"\"",
        b"\\",
        b"-",
        b"\n",
        b"\r\n",
        b",",
        b"\t",
        b"\\.",
        b"PGCOPY\n\xff\r\n\0",
        b"$1",
    ];
    for (name, f) in TARGETS {
        for _ in 0..3_000 {
            let mut data = Vec::new();
            for _ in 0..rng.random_range(0..12) {
                if rng.random_bool(0.5) {
                    data.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
                } else {
                    for _ in 0..rng.random_range(1..6) {
                        data.push(rng.random());
                    }
                }
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&snap, &data)));
            assert!(
                r.is_ok(),
                "{name}: input {data:?} breaks the target (seed {seed})"
            );
        }
    }
}
