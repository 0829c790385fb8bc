//! Routing one point SELECT (`SELECT name FROM t WHERE id = $1`, binary
//! int8 parameter, plan-cache hit + bind) on a table sharded by a
//! WebAssembly function vs one sharded by the built-in hash: the router-level
//! cost of a WASM routing function.
//!
//! `cargo bench -p hotrepart-udf-wasm --bench route`
//!
//! It lives here, not in `router/benches`, because the router must not
//! depend on wasmtime — not even as a dev-dependency, which would build
//! wasmtime for every `cargo test -p hotrepart-router`. The adapter below is
//! the int8 case of the node's (`proxy/src/routing/functions.rs`).
//!
//! * `pg_hash`: `users(id int8)`, built-in hash, seed 0.
//! * `wasm/rust-hash`: `wusers(id int8)` by `rust-hash.wasm` (the same
//!   points as the built-in hash), through `PointFunction`.
//! * `wasm/tenant_prefix`: `tusers(id int8)` by `tenant_prefix.wat`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hotrepart_router::catalog::{
    FunctionId, KeyType, KeyValue, PointFunction, RoutingFunction, RoutingSnapshot, ShardId,
    ShardedTable,
};
use hotrepart_router::route::{Hints, Param, PlanCache, Target};
use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::Function;

#[derive(Debug)]
struct Int8Adapter(Function);

impl PointFunction for Int8Adapter {
    fn point(&self, _key_type: KeyType, key: &KeyValue) -> Result<u64, String> {
        let KeyValue::Int8(v) = key else {
            return Err("int8 keys only".into());
        };
        self.0
            .point(oid::INT8, &abi::encode_int8(*v))
            .map_err(|e| e.to_string())
    }
}

fn load(name: &str) -> Function {
    let path = format!(
        "{}/../deploy/examples/functions/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    Function::compile(&bytes).unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

fn snapshot() -> RoutingSnapshot {
    let rust_hash = load("rust-hash.wasm");
    let tenant = load("tenant_prefix.wat");
    let (rh, tp) = (FunctionId(rust_hash.id()), FunctionId(tenant.id()));
    let ids: Vec<ShardId> = (0..4)
        .map(|i| ShardId::new(&format!("s{i}")).expect("shard name"))
        .collect();
    let t = |name: &str, function| ShardedTable {
        name: name.into(),
        key_column: "id".into(),
        key_type: KeyType::Int8,
        function,
    };
    let mut b = RoutingSnapshot::builder(1);
    for id in &ids {
        b = b.shard(id.clone(), format!("dbname={id}"));
    }
    let rust_hash: Arc<dyn PointFunction> = Arc::new(Int8Adapter(rust_hash));
    let tenant: Arc<dyn PointFunction> = Arc::new(Int8Adapter(tenant));
    b.home_shard(ids[0].clone())
        .sharded_table(t("users", RoutingFunction::PgHash { seed: 0 }))
        .sharded_table(t("wusers", RoutingFunction::Wasm { id: rh }))
        .sharded_table(t("tusers", RoutingFunction::Wasm { id: tp }))
        .equal_ranges(4)
        .and_then(|b| b.build())
        .expect("bench snapshot")
        .with_functions([(rh, rust_hash), (tp, tenant)])
}

fn bench(c: &mut Criterion) {
    let snap = snapshot();
    let hints = Hints::default();
    let mut cache = PlanCache::new(10_000);
    let mut g = c.benchmark_group("route_point_select");
    for (name, table) in [
        ("pg_hash", "users"),
        ("wasm/rust-hash", "wusers"),
        ("wasm/tenant_prefix", "tusers"),
    ] {
        let sql = format!("SELECT name FROM {table} WHERE id = $1");
        let key = 42i64.to_be_bytes();
        let params = [Param::binary(&key, Some(20))];
        let r = cache
            .get_or_plan(&snap, &sql)
            .expect("plan")
            .bind(&snap, &params, &hints)
            .expect("bind");
        assert!(matches!(r.target, Target::One(_)), "{:?}", r.target);
        g.bench_function(name, |b| {
            let mut k = 0i64;
            b.iter(|| {
                k = k.wrapping_add(1);
                let key = k.to_be_bytes();
                let params = [Param::binary(&key, Some(20))];
                let p = cache.get_or_plan(&snap, black_box(&sql)).expect("plan");
                p.bind(&snap, black_box(&params), &hints).expect("bind")
            })
        });
    }
    // Same points: the WASM function is PostgreSQL's hash.
    let a = snap.point_for_key("users", &KeyValue::Int8(7));
    let b = snap.point_for_key("wusers", &KeyValue::Int8(7));
    assert_eq!(a, b);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
