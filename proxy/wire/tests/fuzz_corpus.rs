//! The fuzz targets' bodies (`hotrepart_wire::fuzzing`) on the stable
//! toolchain: every input kept in `fuzz/corpus/<target>/` (the seeds, the
//! corpora cargo-fuzz grew, and every crash it found, minimised) is
//! replayed, and random inputs (seeded; the seed is printed,
//! `FUZZ_SEED=n` replays it) run through each target, so the properties
//! are checked on every test run even where no nightly toolchain builds
//! the fuzzers.
#![allow(clippy::unwrap_used)]

use hotrepart_wire::fuzzing::{backend, frames, merge_values, scram};
use rand::{Rng, SeedableRng};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("frame", frames),
    ("scram", scram),
    ("merge_values", merge_values),
    ("backend", backend),
];

#[test]
fn kept_corpora_replay_cleanly() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus");
    let mut total = 0;
    for (name, f) in TARGETS {
        let dir = std::path::Path::new(root).join(name);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{name}: {} breaks the target", path.display());
            n += 1;
        }
        assert!(n >= 5, "{name}: only {n} inputs kept in {}", dir.display());
        total += n;
    }
    eprintln!("{total} kept inputs replayed");
}

/// Pieces of what each target reads: protocol codes and lengths, SCRAM
/// attributes, value text.
fn pieces(name: &str) -> &'static [&'static [u8]] {
    match name {
        "frame" | "backend" => &[
            b"\0\0\0\x08\x04\xd2\x16\x2f",
            b"\0\0\0\x10\x04\xd2\x16\x2e",
            b"\0\x03\0\0user\0alice\0\0",
            b"Q\0\0\0\x0dSELECT 1\0",
            b"p\0\0\0",
            b"R\0\0\0\x0c\0\0\0\x05",
            b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0",
            b"D\0\0\0\x0b\0\x01\0\0\0\x01x",
            b"T\0\0\0\x06\0\x01",
            b"S\0\0\0\x0aa\0b\0",
            b"K\0\0\0\x0c",
            b"E\0\0\0",
            b"A\0\0\0",
            b"\xff\xff\xff\xff",
            b"\0",
        ],
        "scram" => &[
            b"\x00",
            b"\x01",
            b"\x19",
            b"n,,n=,r=",
            b"p=tls-server-end-point,,",
            b"y,,",
            b"c=biws,r=",
            b",p=",
            b"\n",
            b"SCRAM-SHA-256$4096:",
            b"$",
            b"AAAA",
            b"\x30\x0a\x30\x00\x30\x06\x06\x04",
        ],
        _ => &[
            b"\x05",
            b"\x10",
            b"0",
            b"1",
            b"-",
            b".",
            b"e",
            b"NaN",
            b"Infinity",
            b"9223372036854775807",
            b"2024-01-31",
            b" 23:59:59.5+05:30",
            b" BC",
            b"\\x",
            b"\0",
        ],
    }
}

#[test]
fn random_inputs_keep_the_properties() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (replay with FUZZ_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, f) in TARGETS {
        let pieces = pieces(name);
        for _ in 0..3_000 {
            let mut data = vec![rng.random::<u8>()];
            for _ in 0..rng.random_range(0..12) {
                if rng.random_bool(0.6) {
                    data.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
                } else {
                    for _ in 0..rng.random_range(1..6) {
                        data.push(rng.random());
                    }
                }
            }
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(
                r.is_ok(),
                "{name}: input {data:?} breaks the target (seed {seed})"
            );
        }
    }
}
