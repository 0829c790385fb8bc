//! A route taken from a statement's shape (its literals made parameters:
//! `route_by_shape`, what the node's plan cache does) must be the route of
//! the statement itself, whenever the shape's route is used at all. Checked
//! over every parameterless case of `cases.txt` and over random statements
//! with random literal keys of every key type (seeded, the seeds drawn per
//! run and printed).
#![allow(clippy::unwrap_used)]

mod common;

use hotrepart_router::catalog::RoutingSnapshot;
use hotrepart_router::route::{
    normalize_literals, route, route_by_shape, Hints, Namespace, Route, Target,
};
use rand::{Rng, SeedableRng};

fn snapshot() -> RoutingSnapshot {
    common::cases_snapshot()
}

/// What must agree between the two routes.
fn essence(r: &Route) -> String {
    format!(
        "target={:?} kind={:?} statements={:?} write={} may_write={} frozen={} calls={:?} merge={:?}",
        r.target, r.kind, r.statements, r.is_write, r.may_write, r.touches_frozen, r.calls, r.merge
    )
}

/// Checks one statement; returns whether its shape's route was used.
fn check(snap: &RoutingSnapshot, sql: &str) -> bool {
    let hints = Hints::default();
    let Some(by_shape) = route_by_shape(snap, sql, &Namespace::default(), &hints) else {
        return false;
    };
    let own = route(snap, sql, &[], &hints);
    match own {
        Ok(own) => assert_eq!(
            essence(&by_shape),
            essence(&own),
            "{sql}: the shape's route differs from the statement's (shape {:?})",
            normalize_literals(sql).map(|n| n.text)
        ),
        Err(e) => panic!(
            "{sql}: the statement is refused ({} {}) but its shape routes it to {:?}",
            e.sqlstate, e.message, by_shape.target
        ),
    }
    assert!(matches!(by_shape.target, Target::One(_) | Target::Any));
    true
}

#[test]
fn every_case_of_the_corpus_routes_by_its_shape_as_by_itself() {
    let snap = snapshot();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases.txt")).unwrap();
    let (mut cases, mut used) = (0, 0);
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty()
            || line.starts_with('#')
            || ["sql>", "plan>", "why>"]
                .iter()
                .any(|p| line.starts_with(p))
        {
            continue;
        }
        let Some((head, sql)) = line.split_once(" | ") else {
            continue;
        };
        // Cases with parameters or session options are the extended
        // protocol's or need hints: not what the shape path serves.
        if head.split_whitespace().count() > 1 {
            continue;
        }
        cases += 1;
        if check(&snap, sql) {
            used += 1;
        }
    }
    eprintln!("{used} of {cases} parameterless cases routed by their shape");
    assert!(cases > 250, "the corpus was not read ({cases} cases)");
    assert!(used > 50, "the shape path served only {used} cases");
}

fn int_lit(rng: &mut impl Rng) -> String {
    match rng.random_range(0..8) {
        0 => "0".into(),
        1 => format!("-{}", rng.random_range(1..1_000_000i64)),
        2 => i64::MAX.to_string(),
        3 => format!("'{}'", rng.random_range(-50..50i64)),
        4 => format!("{}.0", rng.random_range(0..100)),
        5 => "99999999999999999999".into(),
        6 => format!("- {}", rng.random_range(1..100)),
        _ => rng.random_range(1..1_000_000i64).to_string(),
    }
}

fn text_lit(rng: &mut impl Rng) -> String {
    let words = ["acme", "it''s", "", "ÆØÅ", "a b", "42", "x\ty"];
    format!("'{}'", words[rng.random_range(0..words.len())])
}

fn uuid_lit(rng: &mut impl Rng) -> String {
    let v: u128 = rng.random();
    let h = format!("{v:032x}");
    format!(
        "'{}-{}-{}-{}-{}'",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn statement(rng: &mut impl Rng) -> String {
    let i = int_lit(rng);
    let j = int_lit(rng);
    let t = text_lit(rng);
    let u = uuid_lit(rng);
    let n = rng.random_range(1..20);
    match rng.random_range(0..22) {
        0 => format!("SELECT * FROM users WHERE id = {i}"),
        1 => format!("SELECT name FROM users WHERE id = {i} AND age > {n}"),
        2 => format!("SELECT * FROM users WHERE id = {i} OR id = {j}"),
        3 => format!("SELECT * FROM users WHERE id IN ({i}, {j})"),
        4 => format!("UPDATE users SET balance = balance + {j} WHERE id = {i}"),
        5 => format!("DELETE FROM users WHERE id = {i}"),
        6 => format!("INSERT INTO users (id, name) VALUES ({i}, {t})"),
        7 => format!("INSERT INTO users (id, name) VALUES ({i}, {t}), ({j}, 'b')"),
        8 => format!("SELECT * FROM events WHERE tenant = {t} LIMIT {n}"),
        9 => format!("SELECT * FROM devices WHERE uuid = {u}"),
        10 => format!("SELECT * FROM items WHERE id = {i} ORDER BY 1"),
        11 => format!(
            "SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {i}"
        ),
        12 => format!("SELECT * FROM users WHERE id = {i} AND id = {j}"),
        13 => format!("SELECT {n}, {t}"),
        14 => format!("SELECT * FROM countries WHERE code = {t}"),
        15 => format!("SELECT count(*) FROM users WHERE age > {n}"),
        16 => format!("UPDATE users SET id = {j} WHERE id = {i}"),
        17 => format!("SELECT * FROM users WHERE id = {i}::int8 + {n}"),
        18 => format!("SELECT * FROM users WHERE id = {i}; SELECT {n}"),
        19 => format!("SELECT * FROM users WHERE id BETWEEN {i} AND {j}"),
        20 => format!("INSERT INTO items (id) VALUES ({i}) ON CONFLICT (id) DO UPDATE SET v = {n}"),
        _ => format!("SELECT * FROM \"Mixed\" WHERE \"Key\" = {i}\n  AND v = {t}"),
    }
}

#[test]
fn random_statements_route_by_their_shape_as_by_themselves() {
    let snap = snapshot();
    let seed: u64 = std::env::var("SHAPE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (rerun with SHAPE_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut used, total) = (0, 20_000);
    for _ in 0..total {
        let sql = statement(&mut rng);
        if check(&snap, &sql) {
            used += 1;
        }
    }
    eprintln!("{used} of {total} random statements routed by their shape");
    assert!(used > total / 3, "the shape path served only {used}");
}
