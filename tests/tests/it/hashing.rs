//! The router's PostgreSQL-compatible hash functions give the same values as
//! a real PostgreSQL server for 10,000 random values of every key type.
#![allow(clippy::unwrap_used)]

use hotrepart_router::hash;
use hotrepart_tests::*;
use rand::{Rng, SeedableRng};

const N: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_match_postgresql_for_random_values() {
    let dir = TestDir::new("hash");
    let d = dir.0.clone();
    let pg = tokio::task::spawn_blocking(move || start_pg(&d))
        .await
        .unwrap();
    let db = connect(&pg.dsn()).await.unwrap();
    let seed: u64 = std::env::var("HOTREPART_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("hash test seed: {seed} (replay with HOTREPART_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for hseed in [0u64, rng.random(), u64::MAX] {
        let s = hseed as i64;
        // int8
        let vals: Vec<i64> = (0..N).map(|_| rng.random()).collect();
        let rows = db
            .query("SELECT hashint8extended(v, $2) FROM unnest($1::int8[]) WITH ORDINALITY AS u(v, o) ORDER BY o", &[&vals, &s])
            .await
            .unwrap();
        for (v, r) in vals.iter().zip(&rows) {
            assert_eq!(
                hash::hashint8extended(*v, hseed) as i64,
                r.get::<_, i64>(0),
                "int8 {v} seed {hseed}"
            );
        }
        // int4
        let vals: Vec<i32> = (0..N).map(|_| rng.random()).collect();
        let rows = db
            .query("SELECT hashint4extended(v, $2) FROM unnest($1::int4[]) WITH ORDINALITY AS u(v, o) ORDER BY o", &[&vals, &s])
            .await
            .unwrap();
        for (v, r) in vals.iter().zip(&rows) {
            assert_eq!(
                hash::hashint4extended(*v, hseed) as i64,
                r.get::<_, i64>(0),
                "int4 {v} seed {hseed}"
            );
        }
        // int2
        let vals: Vec<i16> = (0..N).map(|_| rng.random()).collect();
        let rows = db
            .query("SELECT hashint2extended(v, $2) FROM unnest($1::int2[]) WITH ORDINALITY AS u(v, o) ORDER BY o", &[&vals, &s])
            .await
            .unwrap();
        for (v, r) in vals.iter().zip(&rows) {
            assert_eq!(
                hash::hashint2extended(*v, hseed) as i64,
                r.get::<_, i64>(0),
                "int2 {v} seed {hseed}"
            );
        }
        // text: random lengths 0..80, mixed ASCII and multibyte characters
        let alphabet: Vec<char> = "abcXYZ019 _-'\"\\äöüßé€😀漢字".chars().collect();
        let vals: Vec<String> = (0..N)
            .map(|_| {
                let len = rng.random_range(0..80);
                (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            })
            .collect();
        let rows = db
            .query("SELECT hashtextextended(v, $2) FROM unnest($1::text[]) WITH ORDINALITY AS u(v, o) ORDER BY o", &[&vals, &s])
            .await
            .unwrap();
        for (v, r) in vals.iter().zip(&rows) {
            assert_eq!(
                hash::hashtextextended(v, hseed) as i64,
                r.get::<_, i64>(0),
                "text {v:?} seed {hseed}"
            );
        }
        // uuid (sent as text, cast by PostgreSQL)
        let raw: Vec<[u8; 16]> = (0..N).map(|_| rng.random()).collect();
        let vals: Vec<String> = raw.iter().map(uuid_text).collect();
        let rows = db
            .query("SELECT uuid_hash_extended(v::uuid, $2) FROM unnest($1::text[]) WITH ORDINALITY AS u(v, o) ORDER BY o", &[&vals, &s])
            .await
            .unwrap();
        for ((b, v), r) in raw.iter().zip(&vals).zip(&rows) {
            assert_eq!(
                hash::uuid_hash_extended(b, hseed) as i64,
                r.get::<_, i64>(0),
                "uuid {v} seed {hseed}"
            );
        }
    }
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
