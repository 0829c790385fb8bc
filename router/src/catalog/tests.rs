//! Unit tests of the catalog model: validation, lookups, the point mapping and
//! the SQL it generates. Hermetic; the PostgreSQL values are constants.

use super::*;

fn id(name: &str) -> ShardId {
    ShardId::new(name).expect("valid shard name")
}

fn users(seed: u64) -> ShardedTable {
    ShardedTable {
        name: "users".into(),
        key_column: "id".into(),
        key_type: KeyType::Int8,
        function: RoutingFunction::PgHash { seed },
    }
}

/// Three shards, home `s0`, `users` sharded by int8, `countries` reference,
/// `n` equal ranges.
fn base(n: usize) -> SnapshotBuilder {
    RoutingSnapshot::builder(7)
        .shard(id("s0"), "host=a")
        .shard(id("s1"), "host=b")
        .shard(id("s2"), "host=c")
        .home_shard(id("s0"))
        .sharded_table(users(0))
        .sharded_table(ShardedTable {
            name: "sessions".into(),
            key_column: "token".into(),
            key_type: KeyType::Uuid,
            function: RoutingFunction::PgHash { seed: 0 },
        })
        .reference_table("countries")
        .equal_ranges(n)
        .expect("equal ranges")
}

/// Deterministic pseudo-random points (splitmix64).
fn points(n: usize) -> impl Iterator<Item = u64> {
    let mut x: u64 = 0x1234_5678_9abc_def0;
    (0..n).map(move |_| {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

const EDGE_POINTS: [u64; 8] = [
    0,
    1,
    (1 << 63) - 1,
    1 << 63,
    (1 << 63) + 1,
    u64::MAX / 3,
    u64::MAX - 1,
    u64::MAX,
];

#[test]
fn shard_names() {
    assert!(ShardId::new("shard_01-eu").is_ok());
    assert!(ShardId::new(&"a".repeat(63)).is_ok());
    for bad in ["", "with space", "dot.ted", "ünï", &"a".repeat(64)] {
        let err = ShardId::new(bad).expect_err(bad);
        assert!(
            matches!(err, CatalogError::InvalidShardName { .. }),
            "{err}"
        );
    }
    assert_eq!(id("s1").to_string(), "s1");
    assert_eq!(format!("{:?}", id("s1")), "\"s1\"");
}

#[test]
fn dsn_is_not_debug_printed() {
    let snap = RoutingSnapshot::builder(1)
        .shard(id("s0"), "host=a password=hunter2")
        .home_shard(id("s0"))
        .equal_ranges(1)
        .expect("ranges")
        .build()
        .expect("valid");
    assert!(!format!("{snap:?}").contains("hunter2"));
    assert_eq!(
        snap.shard(&id("s0")).map(|s| s.dsn.as_str()),
        Some("host=a password=hunter2")
    );
}

#[test]
fn equal_ranges_tile_the_space_round_robin() {
    let shards = [id("a"), id("b"), id("c")];
    for n in [1usize, 2, 3, 7, 8, 1000] {
        let ranges = equal_ranges(n, &shards).expect("ranges");
        assert_eq!(ranges.len(), n);
        check_cover(&ranges).expect("covers");
        let sizes: Vec<u128> = ranges.iter().map(|r| r.span().len()).collect();
        let (min, max) = (sizes.iter().min(), sizes.iter().max());
        assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{n}");
        for (i, r) in ranges.iter().enumerate() {
            assert_eq!(r.read_owner, shards[i % 3]);
            assert_eq!(r.write_owner, shards[i % 3]);
            assert_eq!(r.status, RangeStatus::Active);
        }
    }
    let one = equal_ranges(1, &shards).expect("one range");
    assert_eq!((one[0].lo, one[0].hi), (0, None));
    let two = equal_ranges(2, &shards).expect("two ranges");
    assert_eq!((two[0].lo, two[0].hi), (0, Some(1 << 63)));
    assert_eq!((two[1].lo, two[1].hi), (1 << 63, None));
    assert_eq!(equal_ranges(0, &shards), Err(CatalogError::ZeroRanges));
    assert_eq!(equal_ranges(3, &[]), Err(CatalogError::NoShards));
}

#[test]
fn builds_a_valid_catalog() {
    let snap = base(8).build().expect("valid");
    assert_eq!(snap.epoch(), 7);
    assert_eq!(snap.ranges().len(), 8);
    assert_eq!(snap.shards().count(), 3);
    assert_eq!(snap.home_shard(), &id("s0"));
    assert_eq!(snap.sharded_tables().count(), 2);
    assert_eq!(snap.reference_tables().collect::<Vec<_>>(), ["countries"]);
    assert!(snap.is_reference_table("countries"));
    assert_eq!(snap.placement("users"), TablePlacement::Sharded(&users(0)));
    assert_eq!(snap.placement("countries"), TablePlacement::Reference);
    assert_eq!(snap.placement("orders"), TablePlacement::Home(&id("s0")));
}

#[test]
fn ranges_are_sorted_by_build() {
    let snap = base(1)
        .ranges(vec![
            KeyRange::active(100, None, id("s1")),
            KeyRange::active(0, Some(100), id("s0")),
        ])
        .build()
        .expect("valid");
    assert_eq!(snap.ranges()[0].lo, 0);
    assert_eq!(snap.range_for_point(99).read_owner, id("s0"));
    assert_eq!(snap.range_for_point(100).read_owner, id("s1"));
    assert_eq!(snap.range_for_point(u64::MAX).read_owner, id("s1"));
}

#[test]
fn range_for_point_agrees_with_a_linear_scan() {
    for n in [1usize, 2, 5, 64] {
        let snap = base(n).build().expect("valid");
        let bounds = snap
            .ranges()
            .iter()
            .flat_map(|r| [r.lo, r.lo.wrapping_sub(1), r.hi.unwrap_or(u64::MAX)]);
        for p in points(2000).chain(EDGE_POINTS).chain(bounds) {
            let scan = snap
                .ranges()
                .iter()
                .position(|r| r.contains(p))
                .expect("covered");
            assert_eq!(snap.range_index_for_point(p), scan, "n={n} p={p}");
            assert!(snap.range_for_point(p).contains(p));
        }
    }
}

#[test]
fn validation_errors() {
    let two_ranges = |a: KeyRange, b: KeyRange| base(1).ranges(vec![a, b]).build();
    let r = |lo, hi| KeyRange::active(lo, hi, id("s0"));
    let span = |lo, hi| Span { lo, hi };

    assert_eq!(
        RoutingSnapshot::builder(1).build(),
        Err(CatalogError::NoShards)
    );
    assert_eq!(
        base(1).shard(id("s1"), "dup").build(),
        Err(CatalogError::DuplicateShard(id("s1")))
    );
    assert_eq!(
        RoutingSnapshot::builder(1)
            .shard(id("s0"), "")
            .range(r(0, None))
            .build(),
        Err(CatalogError::NoHomeShard)
    );
    assert_eq!(
        base(1).home_shard(id("nope")).build(),
        Err(CatalogError::UnknownShard {
            shard: id("nope"),
            what: "the home shard".into()
        })
    );
    let err = base(1)
        .ranges(vec![KeyRange {
            write_owner: id("gone"),
            ..r(0, None)
        }])
        .build()
        .expect_err("unknown owner");
    assert_eq!(
        err.to_string(),
        "key range [0, 2^64) refers to unknown shard gone"
    );
    assert_eq!(
        base(1).sharded_table(users(1)).build(),
        Err(CatalogError::DuplicateTable("users".into()))
    );
    assert_eq!(
        base(1).reference_table("users").build(),
        Err(CatalogError::DuplicateTable("users".into()))
    );
    assert_eq!(
        base(1).reference_table("").build(),
        Err(CatalogError::EmptyTableName)
    );
    assert_eq!(
        base(1)
            .sharded_table(ShardedTable {
                name: "t".into(),
                key_column: String::new(),
                ..users(0)
            })
            .build(),
        Err(CatalogError::EmptyKeyColumn("t".into()))
    );

    assert_eq!(base(1).ranges(vec![]).build(), Err(CatalogError::NoRanges));
    assert_eq!(
        two_ranges(r(0, Some(5)), r(5, Some(5))),
        Err(CatalogError::EmptyRange(span(5, Some(5))))
    );
    assert_eq!(
        two_ranges(r(0, Some(5)), r(7, Some(3))),
        Err(CatalogError::EmptyRange(span(7, Some(3))))
    );
    assert_eq!(
        two_ranges(r(1, Some(5)), r(5, None)),
        Err(CatalogError::Gap(span(0, Some(1))))
    );
    assert_eq!(
        two_ranges(r(0, Some(5)), r(6, None)),
        Err(CatalogError::Gap(span(5, Some(6))))
    );
    assert_eq!(
        two_ranges(r(0, Some(5)), r(5, Some(u64::MAX))),
        Err(CatalogError::Gap(span(u64::MAX, None)))
    );
    assert_eq!(
        two_ranges(r(0, Some(6)), r(5, None)),
        Err(CatalogError::Overlap(span(0, Some(6)), span(5, None)))
    );
    assert_eq!(
        two_ranges(r(0, None), r(5, None)),
        Err(CatalogError::Overlap(span(0, None), span(5, None)))
    );
    assert_eq!(
        two_ranges(r(0, None), r(0, Some(9))).map(|_| ()),
        Err(CatalogError::Overlap(span(0, Some(9)), span(0, None)))
    );
    let err = two_ranges(r(0, Some(5)), r(6, None)).expect_err("gap");
    assert_eq!(err.to_string(), "no key range covers [5, 6)");
}

#[test]
fn edit_bumps_the_epoch_and_keeps_the_contents() {
    let snap = base(4).build().expect("valid");
    let next = snap.edit().build().expect("valid");
    assert_eq!(next.epoch(), snap.epoch() + 1);
    assert_eq!(next.ranges(), snap.ranges());
    assert_eq!(next.placement("users"), snap.placement("users"));

    // Move the first range to s2 by replacing the ranges.
    let mut ranges = snap.ranges().to_vec();
    ranges[0].write_owner = id("s2");
    ranges[0].status = RangeStatus::Frozen;
    let moved = snap.edit().ranges(ranges).build().expect("valid");
    assert_eq!(moved.range_for_point(0).write_owner, id("s2"));
    assert_eq!(moved.range_for_point(0).read_owner, id("s0"));
    assert_eq!(moved.range_for_point(0).status, RangeStatus::Frozen);

    let last = RoutingSnapshot::builder(u64::MAX)
        .shard(id("s0"), "")
        .home_shard(id("s0"))
        .equal_ranges(1)
        .expect("ranges")
        .build()
        .expect("valid");
    assert_eq!(last.edit().build(), Err(CatalogError::EpochOverflow));
}

/// `(key type, key text, seed as passed to SQL, point)` where PostgreSQL 15
/// printed `point` for `RoutingFunction::sql_point` (e.g.
/// `((hashint8extended(k, s))::numeric + 18446744073709551616) % 18446744073709551616`,
/// text under `COLLATE "C"`).
const PG_POINTS: &[(KeyType, &str, i64, u64)] = &[
    (KeyType::Int8, "1", 0, 14776145195350300486),
    (KeyType::Int8, "-1", 0, 16558486303981570378),
    (KeyType::Int8, "42", 7, 3069212791777980624),
    (
        KeyType::Int8,
        "-9223372036854775808",
        -1,
        8384907054876656385,
    ),
    (
        KeyType::Int8,
        "9223372036854775807",
        1311768467463733248,
        11748216659870663754,
    ),
    (KeyType::Int4, "-7", 3, 15385454834057218948),
    (
        KeyType::Int4,
        "100000",
        -6148914691236517206,
        15031582639998154469,
    ),
    (KeyType::Int2, "-7", 3, 15385454834057218948),
    (KeyType::Int2, "123", 0, 5322916028161108277),
    (KeyType::Text, "", 0, 11507180170145056365),
    (
        KeyType::Text,
        "user:42",
        9223372036854775807,
        14573128635133626024,
    ),
    (KeyType::Text, "日本語のキー", 5, 9825792833426993932),
    (
        KeyType::Uuid,
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        0,
        7543054272012930821,
    ),
    (
        KeyType::Uuid,
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        -9223372036854775808,
        13964725327758693401,
    ),
];

#[test]
fn point_for_key_matches_the_sql_point_in_postgres() {
    for &(ty, text, seed, want) in PG_POINTS {
        let table = ShardedTable {
            name: "t".into(),
            key_column: "k".into(),
            key_type: ty,
            function: RoutingFunction::PgHash { seed: seed as u64 },
        };
        let snap = base(4).sharded_table(table).build().expect("valid");
        let key = KeyValue::parse(ty, text).expect("fixture key parses");
        assert_eq!(
            snap.point_for_key("t", &key),
            Ok(want),
            "{ty} {text:?} {seed}"
        );
        let range = snap.range_for_key("t", &key).expect("sharded");
        assert!(range.contains(want));
    }
}

#[test]
fn point_for_key_checks_the_table_and_the_key_type() {
    let snap = base(4).build().expect("valid");
    // Integer keys of any width hash alike.
    let p = snap.point_for_key("users", &KeyValue::Int8(5));
    assert_eq!(snap.point_for_key("users", &KeyValue::Int4(5)), p);
    assert_eq!(snap.point_for_key("users", &KeyValue::Int2(5)), p);
    assert_eq!(
        snap.point_for_key("users", &KeyValue::from("5")),
        Err(LookupError::KeyTypeMismatch {
            table: "users".into(),
            expected: KeyType::Int8,
            got: KeyType::Text
        })
    );
    assert_eq!(
        snap.point_for_key("sessions", &KeyValue::Int8(5)),
        Err(LookupError::KeyTypeMismatch {
            table: "sessions".into(),
            expected: KeyType::Uuid,
            got: KeyType::Int8
        })
    );
    assert_eq!(
        snap.point_for_key("countries", &KeyValue::Int8(5)),
        Err(LookupError::NotSharded("countries".into()))
    );
    assert_eq!(
        snap.point_for_key("orders", &KeyValue::Int8(5)),
        Err(LookupError::NotSharded("orders".into()))
    );
}

#[test]
fn sql_expressions() {
    let f = RoutingFunction::PgHash { seed: u64::MAX };
    assert_eq!(
        f.sql_hash(KeyType::Int8, "id").as_deref(),
        Some("hashint8extended(id, -1)")
    );
    assert_eq!(
        f.sql_hash(KeyType::Text, "\"Name\"").as_deref(),
        Some("hashtextextended(\"Name\" COLLATE \"C\", -1)")
    );
    assert_eq!(
        RoutingFunction::PgHash { seed: 3 }
            .sql_point(KeyType::Uuid, "u")
            .as_deref(),
        Some("((uuid_hash_extended(u, 3))::numeric + 18446744073709551616) % 18446744073709551616")
    );

    let r = |lo, hi| KeyRange::active(lo, hi, id("s0"));
    let cases: &[(KeyRange, &str)] = &[
        (r(0, None), "true"),
        (r(0, Some(100)), "(h >= 0 AND h < 100)"),
        (r(100, Some(1 << 63)), "h >= 100"),
        (r(1 << 63, None), "h < 0"),
        (r(1 << 63, Some((1 << 63) + 10)), "h < -9223372036854775798"),
        (r(u64::MAX - 9, None), "(h >= -10 AND h < 0)"),
        (r(5, None), "(h >= 5 OR h < 0)"),
        (
            r(1 << 62, Some(3 << 62)),
            "(h >= 4611686018427387904 OR h < -4611686018427387904)",
        ),
    ];
    for (range, want) in cases {
        assert_eq!(range.sql_predicate("h"), *want, "{}", range.span());
    }
}

#[test]
fn signed_intervals_select_exactly_the_range() {
    let inside = |ivs: &[(i64, Option<i64>)], h: i64| {
        ivs.iter()
            .any(|&(lo, hi)| h >= lo && hi.is_none_or(|hi| h < hi))
    };
    let mut ranges = Vec::new();
    for n in [1usize, 2, 3, 4, 7] {
        ranges.extend(equal_ranges(n, &[id("s0")]).expect("ranges"));
    }
    let r = |lo, hi| KeyRange::active(lo, hi, id("s0"));
    ranges.extend([
        r(5, None),
        r(0, Some(1)),
        r(u64::MAX, None),
        r((1 << 63) - 1, Some((1 << 63) + 1)),
    ]);
    for range in &ranges {
        let ivs = range.signed_intervals();
        for p in points(500)
            .chain(EDGE_POINTS)
            .chain([range.lo, range.lo.wrapping_sub(1)])
        {
            assert_eq!(
                inside(&ivs, p as i64),
                range.contains(p),
                "{} p={p}",
                range.span()
            );
        }
    }
}
