//! No input panics the router (issue 12, D9): random SQL-like strings,
//! built from the pieces real statements are made of plus random
//! characters, are planned and bound with random parameters and hints.
//! Each must give a route or a `RouteError`. Seeded; a failure prints the
//! seed and the input (`HOTREPART_FUZZ_SEED=n` replays one seed).

mod common;

use hotrepart_router::catalog::{KeyType, RoutingSnapshot, ShardId};
use hotrepart_router::route::{plan, route, Hints, Param, ParamFormat, PlanCache};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn snapshot() -> RoutingSnapshot {
    common::snapshot(
        3,
        &[
            ("users", "id", KeyType::Int8),
            ("orders", "user_id", KeyType::Int8),
            ("events", "tenant", KeyType::Text),
            ("devices", "uuid", KeyType::Uuid),
            ("app.accounts", "id", KeyType::Int4),
        ],
        &["countries"],
    )
}

const PIECES: &[&str] = &[
    "SELECT",
    "INSERT INTO",
    "UPDATE",
    "DELETE FROM",
    "COPY",
    "FROM STDIN",
    "TO STDOUT",
    "EXPLAIN",
    "ANALYZE",
    "WITH",
    "AS",
    "VALUES",
    "SET",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "ANY",
    "JOIN",
    "LEFT JOIN",
    "ON",
    "USING",
    "GROUP BY",
    "ORDER BY",
    "HAVING",
    "LIMIT",
    "OFFSET",
    "DISTINCT",
    "UNION",
    "RETURNING",
    "FOR UPDATE",
    "ON CONFLICT",
    "DO NOTHING",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "TRUNCATE",
    "CREATE TABLE",
    "users",
    "orders",
    "events",
    "devices",
    "app.accounts",
    "countries",
    "public.users",
    "t",
    "id",
    "user_id",
    "tenant",
    "uuid",
    "*",
    "(",
    ")",
    ",",
    ";",
    "=",
    "<",
    "+",
    "-",
    "::",
    "int8",
    "text",
    "uuid[]",
    "count(*)",
    "sum(id)",
    "avg(id)",
    "min(tenant)",
    "now()",
    "my_fn(id)",
    "1",
    "-5",
    "2.5",
    "9223372036854775808",
    "'acme'",
    "'a''b'",
    "'a\\b'",
    "E'a\\'b'",
    "E'\\x41'",
    "E'\\u00e9'",
    "$$x$$",
    "$1",
    "$2",
    "$3",
    "NULL",
    "'{1,2}'",
    "ARRAY[1,2]",
    "/* hotrepart: shard=s1 */",
    "/* hotrepart: key=5 */",
    "/* hotrepart: shard=s9 */",
    "-- hotrepart: key='x'\n",
    "/* c */",
    "\"Quoted\"",
    "\u{a0}",
    "é",
    "'",
    "\"",
    "$",
    "\\",
    "\n",
    "'00000000-0000-0000-0000-000000000001'",
];

fn sql(rng: &mut StdRng) -> String {
    let mut s = String::new();
    for _ in 0..rng.random_range(0..24) {
        if rng.random_bool(0.1) {
            s.push(rng.random::<char>());
        } else {
            s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
        if rng.random_bool(0.8) {
            s.push(' ');
        }
    }
    s
}

#[test]
fn random_statements_never_panic_the_router() {
    let seed: u64 = std::env::var("HOTREPART_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let snap = snapshot();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cache = PlanCache::new(64);
    let values: &[&[u8]] = &[b"1", b"acme", b"", b"\xff\xfe", b"{1,NULL}", &[0, 0, 0, 1]];
    for round in 0..20_000 {
        let text = sql(&mut rng);
        let params: Vec<Param<'_>> = (0..rng.random_range(0..4))
            .map(|_| Param {
                value: rng
                    .random_bool(0.9)
                    .then(|| values[rng.random_range(0..values.len())]),
                format: if rng.random_bool(0.5) {
                    ParamFormat::Text
                } else {
                    ParamFormat::Binary
                },
                type_oid: [None, Some(20), Some(25), Some(1016)][rng.random_range(0..4)],
                decoder: None,
            })
            .collect();
        let hints = Hints {
            session_shard: rng
                .random_bool(0.2)
                .then(|| ShardId::new(["s1", "s9"][rng.random_range(0..2)]).expect("name")),
            standard_conforming_strings: rng.random_bool(0.5),
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = route(&snap, &text, &params, &hints);
            if let Ok(p) = plan(&snap, &text) {
                let _ = p.bind(&snap, &params, &hints);
            }
        }));
        assert!(
            r.is_ok(),
            "router panicked (seed {seed}, round {round}): {text:?}"
        );
        let _ = cache.get_or_plan(&snap, &text);
    }
}
