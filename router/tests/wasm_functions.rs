//! Routing by user-supplied (WebAssembly) functions, with plain-Rust
//! stand-ins behind `PointFunction`: a table of cases (SQL, parameters →
//! route) through one helper, plus the error messages, COPY and
//! co-location.
//!
//! The stand-ins are deterministic and make the owners readable: with 4
//! equal ranges (range i = `[i·2^62, (i+1)·2^62)`, owned by `s{i}`),
//! `MOD4` puts integer key `k` on shard `s{k mod 4}` and text key on
//! `s{first byte mod 4}`; `DIV10` puts `k` on `s{(k / 10) mod 4}`. Key 13
//! traps, key 666 "runs out of fuel", key 777 "exceeds its memory";
//! a text key starting with `!` traps.

mod common;

use std::sync::Arc;

use hotrepart_router::catalog::{
    FunctionId, KeyType, KeyValue, PointError, PointFunction, RoutingFunction, RoutingSnapshot,
    ShardId, ShardedTable,
};
use hotrepart_router::route::{route, Hints, Param, RouteError, Target};

const MOD4: FunctionId = FunctionId([1; 32]);
const DIV10: FunctionId = FunctionId([2; 32]);
/// Used by a table, never attached.
const LOST: FunctionId = FunctionId([3; 32]);

#[derive(Debug)]
struct TestFn {
    div: i64,
}

impl PointFunction for TestFn {
    fn point(&self, key_type: KeyType, key: &KeyValue) -> Result<u64, String> {
        // Like the real adapter: integers are placed as the column's type.
        let v = match (key_type, key) {
            (_, KeyValue::Text(s)) if s.starts_with('!') => return Err("trapped: bang".into()),
            (_, KeyValue::Text(s)) => i64::from(s.bytes().next().unwrap_or(0)),
            (t, KeyValue::Int2(v)) if t.is_integer() => i64::from(*v),
            (t, KeyValue::Int4(v)) if t.is_integer() => i64::from(*v),
            (t, KeyValue::Int8(v)) if t.is_integer() => *v,
            _ => return Err(format!("trapped: no {key_type} keys")),
        };
        match v {
            13 => Err("trapped: wasm trap: wasm `unreachable` instruction executed".into()),
            666 => Err("ran out of fuel (10000000 units per call)".into()),
            777 => Err("exceeded its memory limit (16777216 bytes)".into()),
            _ => Ok(((v / self.div).rem_euclid(4) as u64) << 62 | 12345),
        }
    }
}

/// 4 shards s0..s3 with 4 equal ranges, home s0. MOD4: wusers(id int8),
/// worders(user_id int8), wtags(tag text); witems(id int4) (MOD4, but
/// another key type: not co-located); DIV10: wother(id int8); LOST:
/// wlost(id int8); pg_hash: users(id int8).
fn snapshot() -> RoutingSnapshot {
    let t = |name: &str, col: &str, ty: KeyType, function| ShardedTable {
        name: name.into(),
        key_column: col.into(),
        key_type: ty,
        function,
    };
    let wasm = |id| RoutingFunction::Wasm { id };
    let snap = common::builder(4)
        .sharded_table(t("wusers", "id", KeyType::Int8, wasm(MOD4)))
        .sharded_table(t("worders", "user_id", KeyType::Int8, wasm(MOD4)))
        .sharded_table(t("wtags", "tag", KeyType::Text, wasm(MOD4)))
        .sharded_table(t("witems", "id", KeyType::Int4, wasm(MOD4)))
        .sharded_table(t("wother", "id", KeyType::Int8, wasm(DIV10)))
        .sharded_table(t("wlost", "id", KeyType::Int8, wasm(LOST)))
        .sharded_table(common::pg_hash("users", "id", KeyType::Int8))
        .equal_ranges(4)
        .and_then(|b| b.build())
        .expect("test snapshot");
    let mod4: Arc<dyn PointFunction> = Arc::new(TestFn { div: 1 });
    let div10: Arc<dyn PointFunction> = Arc::new(TestFn { div: 10 });
    snap.with_functions([(MOD4, mod4), (DIV10, div10)])
}

fn render(r: &Result<hotrepart_router::route::Route, RouteError>) -> String {
    match r {
        Err(e) => format!("REFUSE:{}", e.sqlstate),
        Ok(route) => match &route.target {
            Target::Any => "ANY".to_owned(),
            Target::All => "ALL".to_owned(),
            Target::One(s) => s.to_string(),
            Target::Shards(v) => v.iter().map(ShardId::as_str).collect::<Vec<_>>().join(","),
            Target::Split(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| p.shard.to_string()).collect();
                format!("SPLIT:{}", parts.join(","))
            }
        },
    }
}

/// `(expected, binary int8 parameters, SQL)`.
const CASES: &[(&str, &[i64], &str)] = &[
    // point reads and writes by key
    ("s1", &[], "SELECT * FROM wusers WHERE id = 5"),
    ("s2", &[], "SELECT * FROM wusers WHERE id = 6"),
    ("s3", &[], "SELECT * FROM wusers WHERE id = '7'"),
    ("s0", &[4], "SELECT * FROM wusers WHERE id = $1"),
    ("s1,s2", &[], "SELECT * FROM wusers WHERE id IN (5, 6)"),
    ("s1", &[], "SELECT * FROM wtags WHERE tag = 'a'"), // 'a' = 97
    ("s1", &[], "SELECT * FROM witems WHERE id = 5"),
    ("s1", &[], "UPDATE wusers SET name = 'x' WHERE id = 5"),
    ("s3", &[], "DELETE FROM wusers WHERE id = 3"),
    ("s1", &[], "INSERT INTO wusers (id) VALUES (5)"),
    ("s1", &[1], "INSERT INTO wusers (id) VALUES ($1)"),
    (
        "SPLIT:s1,s2",
        &[],
        "INSERT INTO wusers (id) VALUES (1), (2), (5)",
    ),
    ("s2", &[], "SELECT * FROM wother WHERE id = 25"),
    // no key: every shard, no call
    ("ALL", &[], "SELECT * FROM wusers"),
    ("ALL", &[], "SELECT * FROM wlost"),
    // co-location: same function and key type
    (
        "s1",
        &[],
        "SELECT * FROM wusers u JOIN worders o ON u.id = o.user_id WHERE u.id = 5",
    ),
    (
        "s1",
        &[],
        "SELECT * FROM wusers u JOIN worders o ON u.id = o.user_id WHERE o.user_id = 5",
    ),
    // ... another key type (int4 vs int8: the function sees other bytes)
    (
        "REFUSE:0A000",
        &[],
        "SELECT * FROM wusers u JOIN witems i ON u.id = i.id WHERE u.id = 5",
    ),
    // ... another function
    (
        "REFUSE:0A000",
        &[],
        "SELECT * FROM wusers u JOIN wother o ON u.id = o.id WHERE u.id = 5",
    ),
    (
        "REFUSE:0A000",
        &[],
        "SELECT * FROM wusers u JOIN users o ON u.id = o.id WHERE u.id = 5",
    ),
    // the function fails: this statement only, 38000
    ("REFUSE:38000", &[], "SELECT * FROM wusers WHERE id = 13"),
    ("REFUSE:38000", &[], "SELECT * FROM wusers WHERE id = 666"),
    ("REFUSE:38000", &[], "SELECT * FROM wusers WHERE id = 777"),
    ("REFUSE:38000", &[13], "SELECT * FROM wusers WHERE id = $1"),
    (
        "REFUSE:38000",
        &[],
        "SELECT * FROM wusers WHERE id IN (5, 13)",
    ),
    (
        "REFUSE:38000",
        &[],
        "INSERT INTO wusers (id) VALUES (1), (13)",
    ),
    (
        "REFUSE:38000",
        &[],
        "UPDATE wusers SET id = 13 WHERE id = 1",
    ),
    // a shard hint on a read needs no point
    (
        "s1",
        &[],
        "SELECT * FROM wusers WHERE id = 13 /* hotrepart: shard=s1 */",
    ),
    // ... but a write under a hint is still checked against its key
    (
        "REFUSE:38000",
        &[],
        "INSERT INTO wusers (id) VALUES (13) /* hotrepart: shard=s1 */",
    ),
    (
        "REFUSE:38000",
        &[],
        "SELECT * FROM wusers /* hotrepart: key=13 */",
    ),
    ("s1", &[], "SELECT * FROM wusers /* hotrepart: key=5 */"),
    // the function is not loaded on this node: 39000
    ("REFUSE:39000", &[], "SELECT * FROM wlost WHERE id = 1"),
    ("REFUSE:39000", &[], "INSERT INTO wlost (id) VALUES (1)"),
];

#[test]
fn cases() {
    let snap = snapshot();
    let mut failures = Vec::new();
    for (want, params, sql) in CASES {
        let bytes: Vec<[u8; 8]> = params.iter().map(|p| p.to_be_bytes()).collect();
        let params: Vec<Param<'_>> = bytes.iter().map(|b| Param::binary(b, Some(20))).collect();
        let got = render(&route(&snap, sql, &params, &Hints::default()));
        if got != *want {
            failures.push(format!("{sql}\n    expected {want}\n    got      {got}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn an_int4_parameter_for_an_int8_key_is_placed_as_int8() {
    let snap = snapshot();
    let b = 5i32.to_be_bytes();
    let params = [Param::binary(&b, Some(23))];
    let r = route(
        &snap,
        "SELECT * FROM wusers WHERE id = $1",
        &params,
        &Hints::default(),
    );
    assert_eq!(render(&r), "s1");
}

#[test]
fn errors_name_the_table_the_function_the_key_and_the_reason() {
    let snap = snapshot();
    let err =
        |sql: &str| route(&snap, sql, &[], &Hints::default()).expect_err("the statement must fail");
    let e = err("SELECT * FROM wusers WHERE id = 13");
    assert_eq!(e.sqlstate, "38000");
    assert_eq!(
        e.message,
        format!(
            "cannot route by the shard key of \"wusers\": routing function {} failed for key 13: \
             trapped: wasm trap: wasm `unreachable` instruction executed",
            MOD4.short()
        )
    );
    assert!(err("SELECT * FROM wusers WHERE id = 666")
        .message
        .contains("ran out of fuel"));
    assert!(err("INSERT INTO wusers (id) VALUES (777)")
        .message
        .contains("memory limit"));
    // a long key is cut in the message
    let long = format!("!{}", "y".repeat(1000));
    let e = err(&format!("SELECT * FROM wtags WHERE tag = '{long}'"));
    assert!(e.message.len() < 300, "{}", e.message);
    assert!(e.message.contains("yyy…: trapped: bang"), "{}", e.message);
    let e = err("SELECT * FROM wlost WHERE id = 1");
    assert_eq!(e.sqlstate, "39000");
    assert_eq!(
        e.message,
        "cannot route by the shard key of \"wlost\": routing function 030303030303 is not loaded on this node"
    );
    // the same snapshot keeps routing other keys
    assert_eq!(
        render(&route(
            &snap,
            "SELECT * FROM wusers WHERE id = 5",
            &[],
            &Hints::default()
        )),
        "s1"
    );
}

#[test]
fn copy_rows_use_the_same_fallible_point() {
    let snap = snapshot();
    let r = route(&snap, "COPY wusers FROM STDIN", &[], &Hints::default()).expect("routes");
    let plan = r.copy.expect("a sharded COPY FROM has a copy plan");
    for (k, s) in [(4i64, "s0"), (5, "s1"), (6, "s2"), (7, "s3")] {
        assert_eq!(
            plan.owner(&snap, &KeyValue::Int8(k))
                .expect("owner")
                .as_str(),
            s
        );
    }
    let e = plan
        .owner(&snap, &KeyValue::Int8(13))
        .expect_err("the function traps");
    assert_eq!(e.sqlstate, "38000");
    assert!(e.message.contains("\"wusers\""), "{}", e.message);
    let r = route(&snap, "COPY wlost FROM STDIN", &[], &Hints::default()).expect("routes");
    let e = r
        .copy
        .expect("copy plan")
        .owner(&snap, &KeyValue::Int8(1))
        .expect_err("not loaded");
    assert_eq!(e.sqlstate, "39000");
}

#[test]
fn snapshot_lookups_and_functions() {
    let snap = snapshot();
    assert_eq!(
        snap.wasm_function_ids().into_iter().collect::<Vec<_>>(),
        vec![MOD4, DIV10, LOST]
    );
    assert_eq!(snap.unresolved_functions(), vec![LOST]);
    assert_eq!(
        snap.point_for_key("wusers", &KeyValue::Int8(6)),
        Ok(2 << 62 | 12345)
    );
    assert!(matches!(
        snap.point_for_key("wlost", &KeyValue::Int8(6)),
        Err(hotrepart_router::catalog::LookupError::Function {
            error: PointError::Unresolved(LOST),
            ..
        })
    ));
    // an edited snapshot keeps its functions; equality sees the ids
    let next = snap.edit().build().expect("valid");
    assert_eq!(next.functions(), snap.functions());
    assert_eq!(next.epoch(), 2);
    // no SQL for a WebAssembly function
    let f = RoutingFunction::Wasm { id: MOD4 };
    assert_eq!(f.sql_hash(KeyType::Int8, "id"), None);
    assert_eq!(f.sql_point(KeyType::Int8, "id"), None);
    assert_eq!(f.to_string(), "wasm(010101010101)");
    // ids print and parse as hex
    let hex = DIV10.to_string();
    assert_eq!(hex, "02".repeat(32));
    assert_eq!(FunctionId::from_hex(&hex), Some(DIV10));
    assert_eq!(FunctionId::from_hex(&hex.to_uppercase()), Some(DIV10));
    assert_eq!(FunctionId::from_hex("02"), None);
    assert_eq!(FunctionId::from_hex(&"zz".repeat(32)), None);
}

#[test]
fn co_location_needs_the_same_function_and_key_type() {
    let a = RoutingFunction::Wasm { id: MOD4 };
    let b = RoutingFunction::Wasm { id: DIV10 };
    let h = RoutingFunction::PgHash { seed: 0 };
    assert!(a.colocated(KeyType::Int8, &a, KeyType::Int8));
    assert!(!a.colocated(KeyType::Int8, &a, KeyType::Int4));
    assert!(!a.colocated(KeyType::Int8, &b, KeyType::Int8));
    assert!(!a.colocated(KeyType::Int8, &h, KeyType::Int8));
    assert!(h.colocated(KeyType::Int8, &h, KeyType::Int4));
    assert!(!h.colocated(KeyType::Int8, &h, KeyType::Text));
}
