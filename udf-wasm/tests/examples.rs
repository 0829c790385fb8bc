//! The example functions of `deploy/examples/functions/` compile and give
//! the points their header comments document (checked against a Rust
//! reference implementation of each formula, and pinned values).

use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::{CallError, Function};

fn example(name: &str) -> Function {
    let path = format!(
        "{}/../deploy/examples/functions/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    Function::compile(&bytes).unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// tenant_prefix.wat's formula for a text key.
fn tenant_text(key: &str) -> u64 {
    let (tenant, rest) = key.split_once(':').unwrap_or((key, ""));
    u64::from(fmix32(fnv1a32(tenant.as_bytes()))) << 32
        | u64::from(fmix32(fnv1a32(rest.as_bytes())))
}

/// tenant_prefix.wat's formula for an int8 key.
fn tenant_int8(key: i64) -> u64 {
    let key = key as u64;
    u64::from(fmix32((key >> 32) as u32)) << 32 | u64::from(fmix32(key as u32))
}

/// geo.wat's region of a text key.
fn geo_region(key: &[u8]) -> u64 {
    match key {
        [a, b, b':', ..] => match [*a, *b] {
            [b'e', b'u'] => 1,
            [b'u', b's'] => 2,
            [b'a', b'p'] => 3,
            [b's', b'a'] => 4,
            [b'a', b'f'] => 5,
            [b'm', b'e'] => 6,
            _ => 0,
        },
        _ => 0,
    }
}

fn geo_text(key: &str) -> u64 {
    geo_region(key.as_bytes()) << 56 | fmix64(fnv1a64(key.as_bytes())) >> 8
}

fn geo_int8(key: i64) -> u64 {
    let bytes = abi::encode_int8(key);
    u64::from(bytes[0]) << 56 | fmix64(fnv1a64(&bytes)) >> 8
}

const TEXT_KEYS: &[&str] = &[
    "acme:42",
    "acme:43",
    "acme:",
    "acme",
    "",
    ":",
    "globex:order-2026-11-30-0001",
    "initech:ü-unicode",
    "eu:berlin-1",
    "us:nyc-7",
    "ap:tokyo",
    "sa:lima",
    "af:lagos",
    "me:doha",
    "xx:unknown-region",
    "eu",
    "e:u",
];

#[test]
fn tenant_prefix_points() {
    let f = example("tenant_prefix.wat");
    for key in TEXT_KEYS {
        assert_eq!(
            f.point(oid::TEXT, key.as_bytes()),
            Ok(tenant_text(key)),
            "key {key:?}"
        );
    }
    for key in [0, 1, -1, 7 << 32 | 1, 7 << 32 | 2, i64::MIN, i64::MAX] {
        assert_eq!(
            f.point(oid::INT8, &abi::encode_int8(key)),
            Ok(tenant_int8(key)),
            "key {key}"
        );
    }
    // The values written in the example's header.
    assert_eq!(f.point(oid::TEXT, b"acme:42"), Ok(0x7860_b3c2_28ec_2cbd));
    assert_eq!(
        f.point(oid::INT8, &abi::encode_int8(7 << 32 | 1)),
        Ok(0x18c9_aec4_514e_28b7)
    );
}

#[test]
fn tenant_prefix_keeps_a_tenant_in_one_slice() {
    let f = example("tenant_prefix.wat");
    let slice = |p: u64| p >> 32;
    let acme = slice(f.point(oid::TEXT, b"acme:1").expect("point"));
    for i in 0..200 {
        let key = format!("acme:{i}");
        assert_eq!(
            slice(f.point(oid::TEXT, key.as_bytes()).expect("point")),
            acme
        );
    }
    let t7 = slice(
        f.point(oid::INT8, &abi::encode_int8(7 << 32))
            .expect("point"),
    );
    for i in 0..200i64 {
        let p = f
            .point(oid::INT8, &abi::encode_int8(7 << 32 | i))
            .expect("point");
        assert_eq!(slice(p), t7);
    }
    // Different tenants land in different slices (these do).
    let other = slice(f.point(oid::TEXT, b"globex:1").expect("point"));
    assert_ne!(acme, other);
}

#[test]
fn tenant_prefix_refuses_other_types() {
    let f = example("tenant_prefix.wat");
    assert!(matches!(
        f.point(oid::INT4, &abi::encode_int4(5)),
        Err(CallError::Trap(_))
    ));
    assert!(matches!(
        f.point(oid::UUID, &[0; 16]),
        Err(CallError::Trap(_))
    ));
    // …and the next call still works.
    assert_eq!(f.point(oid::TEXT, b"acme:42"), Ok(tenant_text("acme:42")));
}

#[test]
fn geo_points() {
    let f = example("geo.wat");
    for key in TEXT_KEYS {
        assert_eq!(
            f.point(oid::TEXT, key.as_bytes()),
            Ok(geo_text(key)),
            "key {key:?}"
        );
    }
    for key in [0, 1, -1, 3 << 56 | 99, i64::MIN, i64::MAX] {
        assert_eq!(
            f.point(oid::INT8, &abi::encode_int8(key)),
            Ok(geo_int8(key)),
            "key {key}"
        );
    }
    // The values written in the example's header.
    assert_eq!(
        f.point(oid::TEXT, b"eu:berlin-1"),
        Ok(0x01e1_eddd_8017_cf0a)
    );
    assert_eq!(f.point(oid::TEXT, b"us:nyc-7"), Ok(0x0232_3e11_90f9_7f46));
    let top = |key: &str| f.point(oid::TEXT, key.as_bytes()).expect("point") >> 56;
    assert_eq!(top("eu:berlin-1"), 1);
    assert_eq!(top("us:nyc-7"), 2);
    assert_eq!(top("ap:tokyo"), 3);
    assert_eq!(top("me:doha"), 6);
    assert_eq!(top("xx:somewhere"), 0);
    assert_eq!(top("berlin"), 0);
    let p = f
        .point(oid::INT8, &abi::encode_int8(3 << 56 | 12345))
        .expect("point");
    assert_eq!(p >> 56, 3);
}

#[test]
fn long_keys_grow_the_example_memory() {
    let f = example("tenant_prefix.wat");
    let key = format!("acme:{}", "x".repeat(60_000));
    assert_eq!(f.point(oid::TEXT, key.as_bytes()), Ok(tenant_text(&key)));
}

#[test]
fn function_id_is_the_binary_hash() {
    let f = example("geo.wat");
    assert_eq!(&f.wasm()[..4], b"\0asm");
    let again = Function::compile(f.wasm()).expect("binary form compiles");
    assert_eq!(again.id(), f.id());
    assert_eq!(f.id(), hotrepart_udf_wasm::sha256_id(f.wasm()));
    assert_eq!(
        hotrepart_router::catalog::FunctionId(f.id())
            .to_string()
            .len(),
        64
    );
    assert_ne!(example("tenant_prefix.wat").id(), f.id());
}

#[test]
fn rust_hash_example_matches_the_builtin_hash() {
    use hotrepart_router::hash;
    let f = example("rust-hash.wasm");
    for v in [0i64, 1, -1, 42, 1 << 40, -(1 << 40), i64::MIN, i64::MAX] {
        assert_eq!(
            f.point(oid::INT8, &abi::encode_int8(v)),
            Ok(hash::hashint8extended(v, 0)),
            "int8 {v}"
        );
    }
    for v in [0i32, 7, -7, i32::MIN, i32::MAX] {
        assert_eq!(
            f.point(oid::INT4, &abi::encode_int4(v)),
            Ok(hash::hashint4extended(v, 0)),
            "int4 {v}"
        );
    }
    for v in [0i16, 7, -7, i16::MIN, i16::MAX] {
        assert_eq!(
            f.point(oid::INT2, &abi::encode_int2(v)),
            Ok(hash::hashint2extended(v, 0)),
            "int2 {v}"
        );
    }
    for v in [
        "",
        "a",
        "hello world",
        "twelve bytes",
        "ünïcödé and more than twelve",
    ] {
        assert_eq!(
            f.point(oid::TEXT, v.as_bytes()),
            Ok(hash::hashtextextended(v, 0)),
            "text {v:?}"
        );
    }
    let u = *b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x23\x45\x67\x89\xab\xcd\xef";
    assert_eq!(f.point(oid::UUID, &u), Ok(hash::uuid_hash_extended(&u, 0)));
    assert!(matches!(
        f.point(oid::INT8, &[0; 3]),
        Err(CallError::Trap(_))
    ));
}
