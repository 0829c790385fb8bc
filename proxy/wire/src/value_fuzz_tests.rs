//! Random and almost-valid backend values through every decoder and value
//! function of the merger: each must answer (a value or an error), never
//! panic. Seeded: a failure prints the seed and the input.

use super::{binary, value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pieces that make almost-valid text values of every type the merger reads.
const PIECES: &[&str] = &[
    "0",
    "1",
    "9",
    "-",
    "+",
    ".",
    ":",
    " ",
    "BC",
    " BC",
    "e",
    "E",
    "NaN",
    "Infinity",
    "-Infinity",
    "infinity",
    "99999999999999999999999999999999999999999",
    "2024-01-31",
    "0000-00-00",
    "23:59:59",
    ".999999",
    "+05:30",
    "-99999999999999",
    "\\x",
    "ff",
    "t",
    "f",
    "é",
    "\u{a0}",
    "\0",
    "'",
    "\"",
    "{",
    "}",
    "9223372036854775807",
    "-9223372036854775808",
    "170141183460469231731687303715884105727",
    "00000000-0000-0000-0000-000000000000",
];

/// Numbers at the edges of the integer types.
const NUMS: &[&str] = &[
    "0",
    "1",
    "12",
    "59",
    "99",
    "-1",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "170141183460469231731687303715884105727",
    "",
    "1e5",
];

fn num(rng: &mut StdRng) -> &'static str {
    NUMS[rng.random_range(0..NUMS.len())]
}

fn text(rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.3) {
        // Shaped like a date, a timestamp or a numeric, with extreme parts.
        let v = match rng.random_range(0..3) {
            0 => format!("{}-{}-{}", num(rng), num(rng), num(rng)),
            1 => format!(
                "{}-{}-{} {}:{}:{}.{}{}{}{}",
                num(rng),
                num(rng),
                num(rng),
                num(rng),
                num(rng),
                num(rng),
                num(rng),
                ["+", "-", ""][rng.random_range(0..3)],
                num(rng),
                [" BC", "", ":30"][rng.random_range(0..3)],
            ),
            _ => format!("{}.{}", num(rng), num(rng)),
        };
        return v.into_bytes();
    }
    let mut v = Vec::new();
    for _ in 0..rng.random_range(0..8) {
        if rng.random_bool(0.2) {
            v.push(rng.random::<u8>());
        } else {
            v.extend_from_slice(PIECES[rng.random_range(0..PIECES.len())].as_bytes());
        }
    }
    v
}

const TYPES: &[u32] = &[
    16, 17, 19, 20, 21, 23, 25, 26, 114, 700, 701, 705, 1042, 1043, 1082, 1083, 1114, 1184, 1700,
    2950, 3802, 1186,
];

#[test]
fn random_values_never_panic() {
    let seed: u64 = std::env::var("HOTREPART_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..20_000 {
        let (a, b) = (text(&mut rng), text(&mut rng));
        let oid = TYPES[rng.random_range(0..TYPES.len())];
        let ty = value::Ty::of(oid);
        let r = std::panic::catch_unwind(|| {
            let _ = value::compare(ty, &a, &b);
            let _ = value::group_key(ty, &a);
            let _ = binary::to_binary(oid, &a);
            if let (Ok(x), Ok(y)) = (std::str::from_utf8(&a), std::str::from_utf8(&b)) {
                if let (Ok(x), Ok(y)) = (value::Num::parse(x), value::Num::parse(y)) {
                    let _ = x.add(&y).to_text();
                    let _ = x.cmp_num(&y);
                    let _ = x.div_pg(&y);
                    let _ = x.clone().canonical().to_text();
                }
            }
        });
        assert!(
            r.is_ok(),
            "panic (seed {seed}, round {round}, oid {oid}): {:?} / {:?}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b)
        );
    }
}
