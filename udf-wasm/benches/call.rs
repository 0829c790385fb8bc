//! One routing call through WebAssembly vs the built-in hash.
//!
//! `cargo bench -p hotrepart-udf-wasm --bench call`
//!
//! * `builtin/hashint8extended`: `hotrepart_router::hash::hashint8extended`
//!   with seed 0, the point the built-in routing function computes.
//! * `wasm/rust-hash/int8`: the same computation compiled from Rust
//!   (`deploy/examples/functions/rust-hash.wasm`) and called through
//!   [`Function::point`] — pool checkout, fuel, `hr_alloc`, copy, `hr_route`,
//!   check-in. The difference is the WASM call overhead (target ≤ 1 µs).
//! * `wasm/tenant_prefix/int8` and `wasm/geo/text`: the WAT examples.
//! * `wasm/rust-hash/int8/4-threads`: four threads sharing one `Function`
//!   (per-call time per thread, pool contention included).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hotrepart_router::hash::hashint8extended;
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;

fn load(name: &str) -> Function {
    let path = format!(
        "{}/../deploy/examples/functions/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    Function::compile(&bytes).unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

fn bench(c: &mut Criterion) {
    let rust_hash = load("rust-hash.wasm");
    let tenant = load("tenant_prefix.wat");
    let geo = load("geo.wat");
    let key: i64 = 0x0123_4567_89ab_cdef;
    assert_eq!(
        rust_hash.point(oid::INT8, &abi::encode_int8(key)),
        Ok(hashint8extended(key, 0))
    );

    let mut g = c.benchmark_group("route_int8");
    g.bench_function("builtin/hashint8extended", |b| {
        let mut k = key;
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(hashint8extended(black_box(k), 0))
        })
    });
    g.bench_function("wasm/rust-hash/int8", |b| {
        let mut k = key;
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(rust_hash.point(oid::INT8, &abi::encode_int8(black_box(k))))
        })
    });
    g.bench_function("wasm/tenant_prefix/int8", |b| {
        let mut k = key;
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(tenant.point(oid::INT8, &abi::encode_int8(black_box(k))))
        })
    });
    g.bench_function("wasm/geo/text", |b| {
        b.iter(|| black_box(geo.point(oid::TEXT, black_box(b"eu:customer-123456"))))
    });
    let shared = Arc::new(rust_hash);
    g.bench_function("wasm/rust-hash/int8/4-threads", |b| {
        b.iter_custom(|iters| {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let f = Arc::clone(&shared);
                    std::thread::spawn(move || {
                        let started = std::time::Instant::now();
                        for i in 0..iters {
                            let k = ((t as i64) << 40) + i as i64;
                            black_box(f.point(oid::INT8, &abi::encode_int8(k)).ok());
                        }
                        started.elapsed()
                    })
                })
                .collect();
            let total: std::time::Duration = threads
                .into_iter()
                .map(|t| t.join().unwrap_or_default())
                .sum();
            total / 4
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
