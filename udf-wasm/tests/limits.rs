//! Validation at compile and the limits of a call: endless loops, traps,
//! unbounded memory, imports, missing exports, wrong ABI version, instance
//! replacement after a failure, concurrent callers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hotrepart_udf_wasm::abi::{self, oid};
use hotrepart_udf_wasm::{CallError, Error, Function, Limits, Runtime};

/// A module with the ABI's exports around `route_body` (the body of
/// `hr_route`, with params `$oid $p $n`, returning i64) and `extra` fields.
fn module(route_body: &str, extra: &str) -> String {
    format!(
        r#"(module
          (memory (export "memory") 1)
          (global $calls (mut i32) (i32.const 0))
          (func (export "hr_abi_version") (result i32) (i32.const 1))
          (func (export "hr_alloc") (param i32) (result i32) (i32.const 16))
          (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
            (local $i i32)
            {route_body})
          {extra})"#
    )
}

/// Returns the key's first byte as the point, but misbehaves when that
/// byte is 0xff (the test's "poison" key), as `poison` says.
fn poisoned(poison: &str) -> String {
    module(
        &format!(
            r#"(if (i32.eq (i32.load8_u (local.get $p)) (i32.const 255)) (then {poison}))
               (i64.extend_i32_u (i32.load8_u (local.get $p)))"#
        ),
        "",
    )
}

fn compile(src: &str) -> Function {
    Function::compile(src.as_bytes()).unwrap_or_else(|e| panic!("compile: {e}\n{src}"))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
fn endless_loop_runs_out_of_fuel_quickly() {
    let f = compile(&poisoned("(loop $forever (br $forever))"));
    let started = Instant::now();
    assert_eq!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::OutOfFuel(Limits::default().fuel_per_call))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(f.point(oid::TEXT, &[7]), Ok(7));
}

#[test]
fn an_endless_loop_is_refused_at_compile() {
    let err = Function::compile(module("(loop $l (br $l)) unreachable", "").as_bytes())
        .expect_err("endless loop must not compile");
    assert!(
        matches!(err, Error::TrialCall(ref m) if m.contains("fuel")),
        "{err}"
    );
}

#[test]
fn trap_is_reported_with_its_message() {
    let f = compile(&poisoned("unreachable"));
    match f.point(oid::TEXT, &[0xff]) {
        Err(CallError::Trap(msg)) => assert!(msg.contains("unreachable"), "{msg}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let f = compile(&poisoned(
        "(drop (i32.div_u (i32.const 1) (i32.sub (local.get $n) (local.get $n))))",
    ));
    match f.point(oid::TEXT, &[0xff]) {
        Err(CallError::Trap(msg)) => assert!(msg.contains("divide by zero"), "{msg}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let f = compile(&poisoned("(drop (i32.load (i32.const -1)))"));
    assert!(matches!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::Trap(_))
    ));
}

#[test]
fn unbounded_recursion_traps() {
    let f = compile(&module(
        r#"(if (i32.eq (i32.load8_u (local.get $p)) (i32.const 255))
             (then (return (call $deep (i64.const 0)))))
           (i64.const 1)"#,
        r#"(func $deep (param i64) (result i64)
             (i64.add (call $deep (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))"#,
    ));
    match f.point(oid::TEXT, &[0xff]) {
        Err(CallError::Trap(msg)) => assert!(msg.contains("stack"), "{msg}"),
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
    assert_eq!(f.point(oid::TEXT, &[1]), Ok(1));
}

#[test]
fn unbounded_memory_growth_hits_the_limit_without_growing_the_process() {
    // Grows one page at a time until memory.grow fails, then traps.
    let f = compile(&poisoned(
        r#"(loop $more
             (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
           unreachable"#,
    ));
    let before = rss_bytes();
    for _ in 0..20 {
        assert_eq!(
            f.point(oid::TEXT, &[0xff]),
            Err(CallError::MemoryLimit(Limits::default().max_memory_bytes))
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    // Each attempt may touch at most the 16 MiB cap, and its instance is
    // dropped afterwards; 20 attempts without the cap would be unbounded.
    assert!(grown < 128 << 20, "RSS grew by {grown} bytes");
    assert_eq!(f.point(oid::TEXT, &[9]), Ok(9));

    // One big grow (1 GiB) is refused at once.
    let f = compile(&poisoned(
        r#"(if (i32.eq (memory.grow (i32.const 16384)) (i32.const -1)) (then unreachable))"#,
    ));
    assert_eq!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::MemoryLimit(Limits::default().max_memory_bytes))
    );
}

#[test]
fn memory_limit_is_configurable_and_initial_memory_counts() {
    let runtime = Runtime::new(Limits {
        max_memory_bytes: 2 << 16,
        ..Limits::default()
    })
    .expect("runtime");
    // Two pages fit, a third does not.
    let f = runtime
        .compile(
            poisoned(
                r#"(if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
                   (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))"#,
            )
            .as_bytes(),
        )
        .expect("compile");
    assert_eq!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::MemoryLimit(2 << 16))
    );
    // A module whose initial memory is above the cap is refused.
    let big = module("(i64.const 0)", "").replace(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 3)",
    );
    let err = runtime
        .compile(big.as_bytes())
        .expect_err("too much memory");
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("memory")),
        "{err}"
    );
}

#[test]
fn a_bad_buffer_address_is_a_bad_return() {
    // Keys longer than 16 bytes get a buffer crossing the end of memory.
    let src = module("(i64.const 0)", "").replace(
        "(param i32) (result i32) (i32.const 16))",
        "(param i32) (result i32) (select (i32.const 65530) (i32.const 16) (i32.gt_u (local.get 0) (i32.const 16))))",
    );
    let f = compile(&src);
    assert!(matches!(
        f.point(oid::TEXT, &[b'k'; 32]),
        Err(CallError::BadReturn(_))
    ));
    assert_eq!(f.point(oid::TEXT, b"short"), Ok(0));
    let negative = module("(i64.const 0)", "").replace(
        "(param i32) (result i32) (i32.const 16))",
        "(param i32) (result i32) (i32.const -8))",
    );
    let err = Function::compile(negative.as_bytes()).expect_err("negative address");
    assert!(
        matches!(err, Error::TrialCall(ref m) if m.contains("bad value")),
        "{err}"
    );
}

#[test]
fn imports_are_refused() {
    let src = module("(i64.const 0)", "").replace(
        "(module",
        r#"(module (import "env" "now" (func $now (result i64)))"#,
    );
    let err = Function::compile(src.as_bytes()).expect_err("import");
    assert!(
        matches!(err, Error::Imports(ref m) if m.contains("env::now")),
        "{err}"
    );
    let wasi = module("(i64.const 0)", "").replace(
        "(module",
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
    );
    assert!(matches!(
        Function::compile(wasi.as_bytes()),
        Err(Error::Imports(_))
    ));
    let memory = module("(i64.const 0)", "").replace(
        "(memory (export \"memory\") 1)",
        r#"(import "env" "memory" (memory 1)) (export "memory" (memory 0))"#,
    );
    assert!(matches!(
        Function::compile(memory.as_bytes()),
        Err(Error::Imports(_))
    ));
}

#[test]
fn missing_and_wrong_exports_are_refused() {
    let ok = module("(i64.const 0)", "");
    compile(&ok);
    let no_route = ok.replace("(export \"hr_route\")", "");
    assert_eq!(
        Function::compile(no_route.as_bytes()).err(),
        Some(Error::MissingExport("hr_route"))
    );
    let no_memory = ok.replace("(memory (export \"memory\") 1)", "(memory 1)");
    assert_eq!(
        Function::compile(no_memory.as_bytes()).err(),
        Some(Error::MissingExport("memory"))
    );
    let no_alloc = ok.replace("(export \"hr_alloc\")", "");
    assert_eq!(
        Function::compile(no_alloc.as_bytes()).err(),
        Some(Error::MissingExport("hr_alloc"))
    );
    let i32_result = module("(i32.const 0)", "").replace("(result i64)", "(result i32)");
    let err = Function::compile(i32_result.as_bytes()).expect_err("wrong signature");
    assert!(
        matches!(
            err,
            Error::WrongExport {
                name: "hr_route",
                ..
            }
        ),
        "{err}"
    );
    let not_wasm = Function::compile(b"\0asm\x01\0\0\0garbage").expect_err("garbage");
    assert!(matches!(not_wasm, Error::Invalid(_)), "{not_wasm}");
    assert!(matches!(
        Function::compile(b"(module (func"),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn wrong_abi_version_is_refused() {
    let v2 = module("(i64.const 0)", "")
        .replace("(result i32) (i32.const 1))", "(result i32) (i32.const 2))");
    assert_eq!(
        Function::compile(v2.as_bytes()).err(),
        Some(Error::AbiVersion {
            found: 2,
            expected: abi::ABI_VERSION
        })
    );
}

#[test]
fn a_function_that_traps_for_every_type_is_refused() {
    let err = Function::compile(module("unreachable", "").as_bytes()).expect_err("always traps");
    assert!(matches!(err, Error::TrialCall(_)), "{err}");
}

#[test]
fn a_non_deterministic_function_is_refused() {
    // Counts its calls in a global: the second trial call disagrees.
    let src = module(
        "(global.set $calls (i32.add (global.get $calls) (i32.const 1))) (i64.extend_i32_u (global.get $calls))",
        "",
    );
    let err = Function::compile(src.as_bytes()).expect_err("counter");
    assert!(matches!(err, Error::TrialCall(_)), "{err}");
}

#[test]
fn a_failed_call_replaces_the_instance() {
    // Returns a global that is 0 in a fresh instance and set to 100 just
    // before trapping; were the trapped instance reused, the next call
    // would answer 100 + key.
    let f = compile(&module(
        r#"(if (i32.eq (i32.load8_u (local.get $p)) (i32.const 255))
             (then (global.set $calls (i32.const 100)) unreachable))
           (i64.extend_i32_u (i32.add (global.get $calls) (i32.load8_u (local.get $p))))"#,
        "",
    ));
    assert_eq!(f.point(oid::TEXT, &[3]), Ok(3));
    assert_eq!(f.idle_instances(), 1);
    assert!(matches!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::Trap(_))
    ));
    assert_eq!(f.idle_instances(), 0);
    assert_eq!(f.point(oid::TEXT, &[3]), Ok(3));
    assert_eq!(f.idle_instances(), 1);
}

#[test]
fn keys_longer_than_the_limit_are_refused_before_the_call() {
    let f = compile(&module("(i64.const 0)", ""));
    let max = Limits::default().max_key_len;
    assert_eq!(
        f.point(oid::TEXT, &vec![b'x'; max + 1]),
        Err(CallError::KeyTooLong { len: max + 1, max })
    );
}

#[test]
fn concurrent_calls_agree() {
    let path = format!(
        "{}/../deploy/examples/functions/geo.wat",
        env!("CARGO_MANIFEST_DIR")
    );
    let f =
        Arc::new(Function::compile(&std::fs::read(path).expect("read geo.wat")).expect("compile"));
    let keys: Vec<String> = (0..500).map(|i| format!("eu:user-{i}")).collect();
    let expected: Vec<u64> = keys
        .iter()
        .map(|k| f.point(oid::TEXT, k.as_bytes()).expect("point"))
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let f = Arc::clone(&f);
            let keys = keys.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                for round in 0..4 {
                    for (i, k) in keys.iter().enumerate().skip((t + round) % 3) {
                        assert_eq!(f.point(oid::TEXT, k.as_bytes()), Ok(expected[i]));
                        // Failing calls interleaved from other threads must
                        // not disturb anyone.
                        if i % 97 == 0 {
                            assert!(f.point(oid::UUID, &[0; 16]).is_err());
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread panicked");
    }
    assert!(f.idle_instances() <= Limits::default().max_idle_instances);
}

#[test]
fn multi_column_keys_are_passed_as_records() {
    // Returns the column count times 1000 plus the first column's length.
    let f = compile(&module(
        r#"(if (i32.ne (local.get $oid) (i32.const 2249)) (then (return (i64.const 0))))
           (i64.extend_i32_u
             (i32.add
               (i32.mul (i32.load8_u offset=3 (local.get $p)) (i32.const 1000))
               (i32.load8_u offset=11 (local.get $p))))"#,
        "",
    ));
    let key = abi::encode_record(&[
        (oid::INT8, Some(&abi::encode_int8(5))),
        (oid::TEXT, Some(b"abc")),
        (oid::TEXT, None),
    ]);
    assert_eq!(key.len(), 4 + (8 + 8) + (8 + 3) + 8);
    assert_eq!(f.point(oid::RECORD, &key), Ok(3008));
}

#[test]
fn the_abi_documents_example_works() {
    let doc = std::fs::read_to_string(format!(
        "{}/../docs/WASM_ABI.md",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("read docs/WASM_ABI.md");
    let start = doc.find("```wat\n").expect("a wat block") + "```wat\n".len();
    let len = doc[start..].find("```").expect("end of the wat block");
    let f = compile(&doc[start..start + len]);
    let point = |k: i64| f.point(oid::INT8, &abi::encode_int8(k)).expect("point");
    assert_eq!(point(i64::MIN), 0);
    assert_eq!(point(-1), (1 << 63) - 1);
    assert_eq!(point(0), 1 << 63);
    assert_eq!(point(i64::MAX), u64::MAX);
    assert!(point(-5) < point(3));
    assert!(matches!(f.point(oid::TEXT, b"x"), Err(CallError::Trap(_))));
}

#[test]
fn stats_count_failures_and_new_instances_not_the_trial() {
    let f = compile(&poisoned("(loop $forever (br $forever))"));
    assert_eq!(f.stats(), hotrepart_udf_wasm::FunctionStats::default());
    assert_eq!(f.point(oid::TEXT, &[7]), Ok(7));
    assert_eq!(f.point(oid::TEXT, &[8]), Ok(8));
    // The trial's idle instance serves them: no instance made, no
    // failure; the calls and the fuel they used are counted.
    let st = f.stats();
    assert_eq!((st.calls, st.instances_created, st.failed_calls), (2, 0, 0));
    assert!(
        st.fuel_used > 0 && st.fuel_used < 2 * f.limits().fuel_per_call,
        "{st:?}"
    );
    assert!(matches!(
        f.point(oid::TEXT, &[0xff]),
        Err(CallError::OutOfFuel(_))
    ));
    let trap = compile(&poisoned("unreachable"));
    assert!(matches!(
        trap.point(oid::TEXT, &[0xff]),
        Err(CallError::Trap(_))
    ));
    assert_eq!(trap.point(oid::TEXT, &[1]), Ok(1));
    let st = trap.stats();
    assert_eq!(
        (
            st.calls,
            st.instances_created,
            st.failed_calls,
            st.out_of_fuel
        ),
        (2, 1, 1, 0),
        "{st:?}"
    );
    assert!(st.fuel_used > 0, "{st:?}");
    let st = f.stats();
    assert_eq!((st.calls, st.failed_calls, st.out_of_fuel), (3, 1, 1));
    // The failed instance was dropped: the next call makes a new one.
    assert_eq!(f.point(oid::TEXT, &[9]), Ok(9));
    assert_eq!(f.stats().instances_created, 1);
}
