use hotrepart_router::catalog::{KeyType, RoutingFunction};

use crate::command::FunctionSpec;

use super::*;
use crate::command::{RangeSpec, ShardSpec, MAX_FORGET};

const HALF: u64 = 1 << 63;
const ALL: Span = Span { lo: 0, hi: None };

fn span(lo: u64, hi: Option<u64>) -> Span {
    Span { lo, hi }
}

fn add(shard: &str) -> CatalogCommand {
    CatalogCommand::AddShard {
        shard: shard.into(),
        dsn: Dsn::from("host=x password=secret"),
    }
}

fn assign(range: Span, read: &str, write: &str) -> CatalogCommand {
    CatalogCommand::AssignRange {
        range,
        read_owner: read.into(),
        write_owner: write.into(),
    }
}

fn split(range: Span, at: u64) -> CatalogCommand {
    CatalogCommand::SplitRange { range, at }
}

fn freeze(range: Span, id: u64) -> CatalogCommand {
    CatalogCommand::FreezeRange {
        range,
        freeze: FreezeId(id),
    }
}

fn unfreeze(range: Span, id: u64) -> CatalogCommand {
    CatalogCommand::UnfreezeRange {
        range,
        freeze: FreezeId(id),
        operator: false,
    }
}

/// `proxyctl range unfreeze`'s command.
fn operator_unfreeze(range: Span, id: u64) -> CatalogCommand {
    CatalogCommand::UnfreezeRange {
        range,
        freeze: FreezeId(id),
        operator: true,
    }
}

fn table(name: &str) -> TableSpec {
    TableSpec {
        table: name.into(),
        key_column: "id".into(),
        key_type: KeyType::Int8,
        function: RoutingFunction::PgHash { seed: 0 },
    }
}

/// Applies commands that must all be accepted.
fn catalog(cmds: &[CatalogCommand]) -> Catalog {
    let mut c = Catalog::new();
    for cmd in cmds {
        if let Err(e) = c.apply(cmd) {
            panic!("{cmd:?} rejected: {e}");
        }
    }
    c
}

/// Two shards `a` (home, owns everything) and `b`; epoch 2.
fn two_shards() -> Catalog {
    catalog(&[add("a"), add("b")])
}

fn snap(c: &Catalog) -> &RoutingSnapshot {
    c.snapshot().expect("catalog has a snapshot")
}

/// Applies `cmd`, expects `want`, and checks that nothing changed.
fn rejects(c: &mut Catalog, cmd: CatalogCommand, want: Rejected) {
    let before = c.clone();
    assert_eq!(c.apply(&cmd), Err(want), "{cmd:?}");
    assert_eq!(*c, before, "a rejected command changed the catalog");
}

/// Applies `cmd`, expects a new snapshot with the next epoch.
fn accepts(c: &mut Catalog, cmd: CatalogCommand) -> Arc<RoutingSnapshot> {
    let epoch = c.epoch();
    match c.apply(&cmd) {
        Ok(Applied::Routing(s)) => {
            assert_eq!(s.epoch(), epoch + 1, "{cmd:?}");
            assert_eq!(c.epoch(), epoch + 1);
            assert_eq!(Some(&s), c.snapshot());
            s
        }
        other => panic!("{cmd:?}: {other:?}"),
    }
}

#[test]
fn empty_catalog_has_epoch_zero_and_rejects_what_needs_shards() {
    let mut c = Catalog::new();
    assert_eq!(c.epoch(), 0);
    assert!(c.snapshot().is_none());
    for cmd in [
        CatalogCommand::RemoveShard { shard: "a".into() },
        CatalogCommand::DeclareSharded(table("t")),
        CatalogCommand::DeclareReference { table: "r".into() },
        split(ALL, 5),
        assign(ALL, "a", "a"),
        freeze(ALL, 1),
        unfreeze(ALL, 1),
    ] {
        rejects(&mut c, cmd, Rejected::NoCatalog);
    }
}

#[test]
fn first_shard_is_home_and_owns_the_whole_space() {
    let mut c = Catalog::new();
    let s = accepts(&mut c, add("a"));
    assert_eq!(s.epoch(), 1);
    assert_eq!(s.home_shard().as_str(), "a");
    assert_eq!(s.ranges().len(), 1);
    assert_eq!(s.ranges()[0].span(), ALL);
    assert_eq!(s.ranges()[0].write_owner.as_str(), "a");
    assert_eq!(
        s.shard(&ShardId::new("a").expect("name"))
            .map(|s| s.dsn.as_str()),
        Some("host=x password=secret")
    );

    let s = accepts(&mut c, add("b"));
    assert_eq!(s.shards().count(), 2);
    assert_eq!(s.home_shard().as_str(), "a");
    assert_eq!(s.ranges().len(), 1, "a new shard owns nothing");
}

#[test]
fn add_shard_rejections() {
    let mut c = two_shards();
    rejects(&mut c, add("a"), Rejected::ShardExists("a".into()));
    let Err(Rejected::Invalid(CatalogError::InvalidShardName { .. })) =
        c.clone().apply(&add("no spaces"))
    else {
        panic!("invalid shard name accepted");
    };
    let mut empty = Catalog::new();
    let Err(Rejected::Invalid(CatalogError::InvalidShardName { .. })) = empty.apply(&add(""))
    else {
        panic!("empty shard name accepted");
    };
    assert_eq!(empty, Catalog::new());
}

#[test]
fn remove_shard() {
    let mut c = two_shards();
    rejects(
        &mut c,
        CatalogCommand::RemoveShard { shard: "zz".into() },
        Rejected::UnknownShard("zz".into()),
    );
    rejects(
        &mut c,
        CatalogCommand::RemoveShard { shard: "a".into() },
        Rejected::HomeShard("a".into()),
    );
    // b owns nothing: removable.
    let s = accepts(&mut c, CatalogCommand::RemoveShard { shard: "b".into() });
    assert_eq!(s.shards().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a"]);
}

#[test]
fn remove_shard_that_owns_ranges_is_rejected() {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let upper = span(HALF, None);
    // b only reads the upper half: still an owner.
    accepts(&mut c, assign(upper, "b", "a"));
    rejects(
        &mut c,
        CatalogCommand::RemoveShard { shard: "b".into() },
        Rejected::ShardOwnsRanges {
            shard: "b".into(),
            count: 1,
            first: upper,
        },
    );
    accepts(&mut c, assign(upper, "a", "a"));
    accepts(&mut c, CatalogCommand::RemoveShard { shard: "b".into() });
}

#[test]
fn declare_tables() {
    let mut c = two_shards();
    let s = accepts(&mut c, CatalogCommand::DeclareSharded(table("users")));
    assert_eq!(
        s.sharded_table("users").map(|t| t.key_type),
        Some(KeyType::Int8)
    );
    let s = accepts(
        &mut c,
        CatalogCommand::DeclareReference {
            table: "countries".into(),
        },
    );
    assert!(s.is_reference_table("countries"));

    rejects(
        &mut c,
        CatalogCommand::DeclareSharded(table("users")),
        Rejected::TableDeclared {
            table: "users".into(),
            kind: "sharded",
        },
    );
    rejects(
        &mut c,
        CatalogCommand::DeclareReference {
            table: "users".into(),
        },
        Rejected::TableDeclared {
            table: "users".into(),
            kind: "sharded",
        },
    );
    rejects(
        &mut c,
        CatalogCommand::DeclareSharded(table("countries")),
        Rejected::TableDeclared {
            table: "countries".into(),
            kind: "reference",
        },
    );
    rejects(
        &mut c,
        CatalogCommand::DeclareSharded(table("")),
        Rejected::Invalid(CatalogError::EmptyTableName),
    );
    let mut no_key = table("orders");
    no_key.key_column.clear();
    rejects(
        &mut c,
        CatalogCommand::DeclareSharded(no_key),
        Rejected::Invalid(CatalogError::EmptyKeyColumn("orders".into())),
    );
    rejects(
        &mut c,
        CatalogCommand::DeclareReference { table: "".into() },
        Rejected::Invalid(CatalogError::EmptyTableName),
    );
}

#[test]
fn split_range() {
    let mut c = two_shards();
    let s = accepts(&mut c, split(ALL, HALF));
    let spans: Vec<Span> = s.ranges().iter().map(KeyRange::span).collect();
    assert_eq!(spans, [span(0, Some(HALF)), span(HALF, None)]);
    assert!(s.ranges().iter().all(|r| r.read_owner.as_str() == "a"));
    // Splitting the lower half again.
    let s = accepts(&mut c, split(span(0, Some(HALF)), 1));
    assert_eq!(s.ranges()[0].span(), span(0, Some(1)));
    assert_eq!(s.ranges()[1].span(), span(1, Some(HALF)));
    // The last point of the space can start a range of its own.
    let s = accepts(&mut c, split(span(HALF, None), u64::MAX));
    assert_eq!(
        s.ranges().last().map(KeyRange::span),
        Some(span(u64::MAX, None))
    );
}

#[test]
fn split_range_rejections() {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let lower = span(0, Some(HALF));
    // At a bound or outside the range: never an empty range, never an
    // overlap with the neighbour.
    for at in [0, HALF, HALF + 1, u64::MAX] {
        rejects(
            &mut c,
            split(lower, at),
            Rejected::SplitOutside { range: lower, at },
        );
    }
    let upper = span(HALF, None);
    rejects(
        &mut c,
        split(upper, HALF),
        Rejected::SplitOutside {
            range: upper,
            at: HALF,
        },
    );
    rejects(
        &mut c,
        split(upper, 5),
        Rejected::SplitOutside {
            range: upper,
            at: 5,
        },
    );
    // The whole space is no longer a range; neither is a made-up one.
    rejects(&mut c, split(ALL, 10), Rejected::UnknownRange(ALL));
    rejects(
        &mut c,
        split(span(0, Some(HALF + 1)), 10),
        Rejected::UnknownRange(span(0, Some(HALF + 1))),
    );
    rejects(
        &mut c,
        split(span(1, Some(HALF)), 10),
        Rejected::UnknownRange(span(1, Some(HALF))),
    );
    // Frozen ranges cannot be split.
    accepts(&mut c, freeze(lower, 7));
    rejects(
        &mut c,
        split(lower, 10),
        Rejected::RangeNotActive {
            range: lower,
            status: RangeStatus::Frozen,
        },
    );
}

#[test]
fn assign_range() {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let upper = span(HALF, None);
    let s = accepts(&mut c, assign(upper, "a", "b"));
    assert_eq!(s.ranges()[1].read_owner.as_str(), "a");
    assert_eq!(s.ranges()[1].write_owner.as_str(), "b");
    assert_eq!(
        s.ranges()[0].write_owner.as_str(),
        "a",
        "the other range is untouched"
    );
    // Repeating an assignment is accepted (idempotent) and still a new epoch.
    accepts(&mut c, assign(upper, "a", "b"));

    rejects(
        &mut c,
        assign(upper, "c", "b"),
        Rejected::UnknownShard("c".into()),
    );
    rejects(
        &mut c,
        assign(upper, "a", "c"),
        Rejected::UnknownShard("c".into()),
    );
    rejects(
        &mut c,
        assign(upper, "a", "bad name"),
        Rejected::UnknownShard("bad name".into()),
    );
    rejects(&mut c, assign(ALL, "b", "b"), Rejected::UnknownRange(ALL));
}

#[test]
fn freeze_and_unfreeze() {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let upper = span(HALF, None);
    let s = accepts(&mut c, freeze(upper, 7));
    assert_eq!(s.ranges()[1].status, RangeStatus::Frozen);
    assert_eq!(s.ranges()[0].status, RangeStatus::Active);
    assert_eq!(c.freeze(HALF).map(|f| f.id), Some(FreezeId(7)));

    rejects(
        &mut c,
        freeze(upper, 7),
        Rejected::AlreadyFrozen {
            range: upper,
            by: FreezeId(7),
        },
    );
    rejects(
        &mut c,
        freeze(upper, 8),
        Rejected::AlreadyFrozen {
            range: upper,
            by: FreezeId(7),
        },
    );
    rejects(
        &mut c,
        unfreeze(upper, 8),
        Rejected::WrongFreeze {
            range: upper,
            by: FreezeId(7),
            given: FreezeId(8),
        },
    );
    // The cut-over: flip the owner while frozen.
    accepts(&mut c, assign(upper, "b", "b"));
    let s = accepts(&mut c, unfreeze(upper, 7));
    assert_eq!(s.ranges()[1].status, RangeStatus::Active);
    assert_eq!(s.ranges()[1].write_owner.as_str(), "b");
    assert_eq!(c.freeze(HALF), None);

    let lower = span(0, Some(HALF));
    rejects(&mut c, unfreeze(lower, 7), Rejected::NotFrozen(lower));
    rejects(&mut c, freeze(ALL, 1), Rejected::UnknownRange(ALL));
    rejects(&mut c, unfreeze(ALL, 1), Rejected::UnknownRange(ALL));
}

#[test]
fn tx_decisions_are_final_and_leave_the_epoch_alone() {
    let mut c = two_shards();
    let cmd = |gid: &str, commit| CatalogCommand::TxDecision {
        gid: gid.into(),
        commit,
        since: None,
    };
    assert_eq!(
        c.apply(&cmd("hr_1", true)),
        Ok(Applied::TxDecided {
            gid: "hr_1".into(),
            commit: true
        })
    );
    assert_eq!(c.epoch(), 2);
    assert_eq!(c.decision("hr_1"), Some(true));
    assert_eq!(c.decision("hr_2"), None);
    for commit in [true, false] {
        rejects(
            &mut c,
            cmd("hr_1", commit),
            Rejected::AlreadyDecided {
                gid: "hr_1".into(),
                commit: true,
            },
        );
    }
    rejects(
        &mut c,
        cmd("", false),
        Rejected::InvalidGid {
            gid: "".into(),
            reason: "it is empty",
        },
    );
    let long = "x".repeat(MAX_GID_LEN + 1);
    rejects(
        &mut c,
        cmd(&long, false),
        Rejected::InvalidGid {
            gid: long.clone(),
            reason: "it is longer than 199 bytes",
        },
    );
    assert!(c.apply(&cmd(&long[1..], false)).is_ok());
    assert_eq!(c.decisions().count(), 2);
}

fn decide(gid: &str, commit: bool, since: Option<u64>) -> CatalogCommand {
    CatalogCommand::TxDecision {
        gid: gid.into(),
        commit,
        since,
    }
}

fn forget(gids: &[&str], swept: bool) -> CatalogCommand {
    CatalogCommand::ForgetDecisions {
        gids: gids.iter().map(|g| g.to_string()).collect(),
        swept,
    }
}

#[test]
fn finished_decisions_are_forgotten_in_batches() {
    let mut c = two_shards();
    for g in ["g1", "g2", "g3"] {
        assert!(c
            .apply(&decide(g, true, Some(c.decision_horizon())))
            .is_ok());
    }
    assert_eq!(c.decision_horizon(), 3);
    // One command for several gids; one already gone is skipped.
    assert_eq!(
        c.apply(&forget(&["g1", "g3", "gone"], false)),
        Ok(Applied::DecisionsForgotten { count: 2 })
    );
    assert_eq!(c.decision_count(), 1);
    assert_eq!((c.decision("g1"), c.decision("g2")), (None, Some(true)));
    assert_eq!(c.epoch(), 2, "forgetting leaves the routing table alone");
    // Forgetting again is a no-op (a retried proposal).
    assert_eq!(
        c.apply(&forget(&["g1"], false)),
        Ok(Applied::DecisionsForgotten { count: 0 })
    );
    // A coordinator's report does not move the horizon: a coordinator that
    // read it before still records its decision.
    assert!(c.apply(&decide("g4", true, Some(0))).is_ok());
    // Bounded command.
    let many: Vec<String> = (0..=MAX_FORGET).map(|i| format!("g{i}")).collect();
    rejects(
        &mut c,
        CatalogCommand::ForgetDecisions {
            gids: many,
            swept: false,
        },
        Rejected::TooManyToForget(MAX_FORGET + 1),
    );
    // The image keeps the counters.
    assert_eq!(Catalog::from_image(&c.image()), Ok(c.clone()));
}

#[test]
fn a_sweep_refuses_a_coordinator_that_prepared_before_it() {
    let mut c = two_shards();
    // A coordinator reads the horizon, then prepares and stalls.
    let late = c.decision_horizon();
    // The resolver finds the gid prepared, records a rollback (no check),
    // rolls every shard back, and its sweep forgets the decision.
    assert!(c.apply(&decide("slow", false, None)).is_ok());
    // A coordinator that reads the horizon now prepared after that
    // decision: it is not refused for its sweep.
    let after = c.decision_horizon();
    assert_eq!(
        c.apply(&forget(&["slow"], true)),
        Ok(Applied::DecisionsForgotten { count: 1 })
    );
    assert_eq!(c.decision("slow"), None);
    // The coordinator comes back: it must not commit what was rolled back.
    rejects(
        &mut c,
        decide("slow", true, Some(late)),
        Rejected::DecisionTooLate { gid: "slow".into() },
    );
    // Nor may any coordinator that read the horizon before the sweep.
    rejects(
        &mut c,
        decide("other", true, Some(late)),
        Rejected::DecisionTooLate {
            gid: "other".into(),
        },
    );
    // One that read it after the swept decision was recorded commits; so
    // does one that read it after the sweep, and the resolver.
    assert!(c.apply(&decide("after", true, Some(after))).is_ok());
    assert!(c
        .apply(&decide("fresh", true, Some(c.decision_horizon())))
        .is_ok());
    assert!(c.apply(&decide("found", false, None)).is_ok());
    // A sweep that forgot nothing moves nothing.
    let h = c.decision_horizon();
    let before = c.decision_horizon();
    assert!(c.apply(&forget(&["nothing"], true)).is_ok());
    assert!(c.apply(&decide("next", true, Some(before))).is_ok());
    assert_eq!(c.decision_horizon(), h + 1);
    let back: super::image::CatalogImage =
        serde_json::from_str(&serde_json::to_string(&c.image()).expect("json")).expect("image");
    assert_eq!(Catalog::from_image(&back), Ok(c));
}

/// The issue's "catch-up after 1M multi-shard commits", at the level of
/// the state machine (a real run of a million commits is too slow for a
/// test): a million decisions recorded, forgotten in batches as the
/// coordinators report them, one in-doubt transaction kept throughout. The
/// image a lagging or new node loads stays a few KiB (unpruned: ~30 bytes
/// of JSON per decision, the 64 MiB frame limit at about two million), and
/// rebuilds the same catalog.
#[test]
fn a_million_pruned_decisions_keep_the_catch_up_image_small() {
    let mut c = two_shards();
    assert!(c.apply(&decide("hr_9_in_doubt", true, Some(0))).is_ok());
    let mut batch: Vec<String> = Vec::with_capacity(MAX_FORGET);
    let mut largest = 0;
    for i in 0..1_000_000u64 {
        let gid = format!("hr_1_{i:016x}");
        let since = Some(c.decision_horizon());
        assert!(matches!(
            c.apply(&decide(&gid, true, since)),
            Ok(Applied::TxDecided { .. })
        ));
        batch.push(gid);
        if batch.len() == MAX_FORGET {
            let cmd = CatalogCommand::ForgetDecisions {
                gids: std::mem::take(&mut batch),
                swept: false,
            };
            assert_eq!(
                c.apply(&cmd),
                Ok(Applied::DecisionsForgotten { count: MAX_FORGET })
            );
            if i % 100_000 < MAX_FORGET as u64 {
                let size = serde_json::to_vec(&c.image()).expect("json").len();
                largest = largest.max(size);
            }
        }
    }
    assert_eq!(c.decision_horizon(), 1_000_001);
    assert_eq!(c.decision_count(), 1 + batch.len());
    assert_eq!(c.decision("hr_9_in_doubt"), Some(true), "in doubt: kept");
    let bytes = serde_json::to_vec(&c.image()).expect("json");
    largest = largest.max(bytes.len());
    assert!(largest < 64 << 10, "image of {largest} bytes");
    let back: super::image::CatalogImage = serde_json::from_slice(&bytes).expect("image");
    assert_eq!(Catalog::from_image(&back), Ok(c));
}

fn seed() -> CatalogSeed {
    CatalogSeed {
        shards: vec![
            ShardSpec {
                shard: "s0".into(),
                dsn: Dsn::from("host=s0"),
            },
            ShardSpec {
                shard: "s1".into(),
                dsn: Dsn::from("host=s1"),
            },
        ],
        home_shard: "s0".into(),
        sharded: vec![table("users")],
        reference: vec!["countries".into()],
        ranges: vec![
            RangeSpec {
                range: span(0, Some(HALF)),
                read_owner: "s0".into(),
                write_owner: "s0".into(),
            },
            RangeSpec {
                range: span(HALF, None),
                read_owner: "s1".into(),
                write_owner: "s1".into(),
            },
        ],
        functions: Vec::new(),
    }
}

#[test]
fn bootstrap_once() {
    let mut c = Catalog::new();
    let s = accepts(&mut c, CatalogCommand::Bootstrap(seed()));
    assert_eq!(s.epoch(), 1);
    assert_eq!(s.ranges().len(), 2);
    assert!(s.sharded_table("users").is_some());
    // A second node's seed, or a second bootstrap: rejected.
    rejects(
        &mut c,
        CatalogCommand::Bootstrap(seed()),
        Rejected::AlreadyInitialised { epoch: 1 },
    );
    let mut c = catalog(&[add("a")]);
    rejects(
        &mut c,
        CatalogCommand::Bootstrap(seed()),
        Rejected::AlreadyInitialised { epoch: 1 },
    );
}

#[test]
fn bootstrap_rejects_an_inconsistent_seed() {
    let mut overlapping = seed();
    overlapping.ranges[1].range = span(HALF - 1, None);
    let mut gap = seed();
    gap.ranges[1].range = span(HALF + 1, None);
    let mut unknown_owner = seed();
    unknown_owner.ranges[1].write_owner = "s9".into();
    let mut no_home = seed();
    no_home.home_shard = "s9".into();
    for (s, what) in [
        (overlapping, "overlap"),
        (gap, "gap"),
        (unknown_owner, "unknown owner"),
        (no_home, "unknown home"),
    ] {
        let mut c = Catalog::new();
        assert!(
            matches!(
                c.apply(&CatalogCommand::Bootstrap(s)),
                Err(Rejected::Invalid(_))
            ),
            "{what}"
        );
        assert_eq!(c, Catalog::new(), "{what}");
    }
}

#[test]
fn ranges_always_tile_the_space() {
    // Many splits and assignments in a row; every snapshot the builder made
    // covers [0, 2^64) exactly (the builder refuses anything else), and the
    // catalog never holds a range that was not produced by a split.
    let mut c = two_shards();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..200u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = snap(&c);
        let r = s.ranges()[(x % s.ranges().len() as u64) as usize].clone();
        // Mostly inside the range, sometimes anywhere (then mostly rejected).
        let at = if i % 5 == 0 {
            x.rotate_left(17)
        } else {
            (u128::from(r.lo) + u128::from(x) % r.span().len()) as u64
        };
        let cmd = if i % 3 == 0 {
            assign(r.span(), if x.is_multiple_of(2) { "a" } else { "b" }, "b")
        } else {
            split(r.span(), at)
        };
        let _ = c.apply(&cmd);
        let s = snap(&c);
        let mut end: u128 = 0;
        for r in s.ranges() {
            assert_eq!(u128::from(r.lo), end);
            end = r.span().end();
        }
        assert_eq!(end, 1 << 64);
    }
    assert!(snap(&c).ranges().len() > 50);
}

#[test]
fn commands_round_trip_through_serde() {
    let cmds = vec![
        CatalogCommand::Bootstrap(seed()),
        add("a"),
        CatalogCommand::RemoveShard { shard: "a".into() },
        CatalogCommand::DeclareSharded(TableSpec {
            key_type: KeyType::Uuid,
            function: RoutingFunction::PgHash { seed: u64::MAX },
            ..table("t")
        }),
        CatalogCommand::DeclareReference { table: "r".into() },
        split(span(3, Some(9)), 5),
        assign(ALL, "a", "b"),
        freeze(span(0, Some(1)), u64::MAX),
        unfreeze(span(0, Some(1)), 0),
        operator_unfreeze(span(0, Some(1)), 3),
        CatalogCommand::TxDecision {
            gid: "g".into(),
            commit: false,
            since: None,
        },
        upload("f", 1),
        CatalogCommand::RemoveFunction { name: "f".into() },
        CatalogCommand::SetTableFunction {
            table: "t".into(),
            function: wasm(1),
        },
        CatalogCommand::SchemaChanged {
            database: "app".into(),
        },
        CatalogCommand::Bootstrap(CatalogSeed {
            functions: vec![FunctionSpec {
                name: "f".into(),
                wasm: module(1),
            }],
            ..seed()
        }),
    ];
    for cmd in cmds {
        let json = serde_json::to_string(&cmd).expect("serialize");
        let back: CatalogCommand = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, cmd, "{json}");
    }
    let json = serde_json::to_string(&split(span(3, None), 5)).expect("serialize");
    assert_eq!(
        json,
        r#"{"op":"split_range","range":{"lo":3,"hi":null},"at":5}"#
    );
    // An unfreeze written before the operator marker existed reads (and
    // is written) as it was.
    let old = r#"{"op":"unfreeze_range","range":{"lo":0,"hi":1},"freeze":7}"#;
    let cmd: CatalogCommand = serde_json::from_str(old).expect("old entry");
    assert_eq!(cmd, unfreeze(span(0, Some(1)), 7));
    assert_eq!(serde_json::to_string(&cmd).expect("serialize"), old);
}

#[test]
fn debug_never_prints_a_dsn() {
    let text = format!("{:?}", add("a"));
    assert!(!text.contains("secret"), "{text}");
}

/// A module the catalog accepts (it does not compile modules: the binary
/// header is all it checks), different for each `n`.
fn module(n: u8) -> WasmModule {
    WasmModule(vec![0, b'a', b's', b'm', 1, 0, 0, 0, 0, 2, 1, n])
}

fn upload(name: &str, n: u8) -> CatalogCommand {
    CatalogCommand::UploadFunction {
        name: name.into(),
        wasm: module(n),
    }
}

fn wasm(n: u8) -> RoutingFunction {
    RoutingFunction::Wasm { id: module(n).id() }
}

fn wasm_table(name: &str, n: u8) -> CatalogCommand {
    CatalogCommand::DeclareSharded(TableSpec {
        function: wasm(n),
        ..table(name)
    })
}

#[test]
fn functions_upload_by_name_and_leave_the_epoch_alone() {
    let mut c = two_shards();
    assert_eq!(
        c.apply(&upload("tenant", 1)),
        Ok(Applied::FunctionStored {
            name: "tenant".into(),
            id: module(1).id(),
        })
    );
    assert_eq!(c.epoch(), 2);
    // the same bytes again: accepted, nothing changes
    let before = c.clone();
    assert_eq!(c.apply(&upload("tenant", 1)), Ok(Applied::Unchanged));
    assert_eq!(c, before);
    // new bytes while no table uses it: replaced
    assert!(matches!(
        c.apply(&upload("tenant", 2)),
        Ok(Applied::FunctionStored { .. })
    ));
    let f = c.function("tenant").expect("stored");
    assert_eq!(f.id, module(2).id());
    assert_eq!(&*f.wasm, module(2).0.as_slice());
    assert_eq!(c.epoch(), 2);
    // the id is the module's SHA-256
    assert_eq!(
        module(2).id().to_string(),
        "3e5437effcde7f5fc6185dce20178e71185a59c327431f8f962a11b229a367e6"
    );
    assert_eq!(
        c.apply(&CatalogCommand::RemoveFunction {
            name: "tenant".into()
        }),
        Ok(Applied::FunctionRemoved {
            name: "tenant".into()
        })
    );
    assert!(c.function("tenant").is_none());
    assert_eq!(c.epoch(), 2);
}

#[test]
fn uploads_are_checked_without_compiling() {
    let mut c = two_shards();
    for (name, reason) in [
        ("", "it is empty"),
        (
            "a b",
            "only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
    ] {
        rejects(
            &mut c,
            CatalogCommand::UploadFunction {
                name: name.into(),
                wasm: module(1),
            },
            Rejected::InvalidFunctionName {
                name: name.into(),
                reason,
            },
        );
    }
    let long = "f".repeat(MAX_FUNCTION_NAME_LEN + 1);
    assert!(matches!(
        c.apply(&upload(&long, 1)),
        Err(Rejected::InvalidFunctionName { .. })
    ));
    assert!(c.apply(&upload(&long[1..], 1)).is_ok());
    let text = CatalogCommand::UploadFunction {
        name: "t".into(),
        wasm: WasmModule(b"(module)".to_vec()),
    };
    let before = c.clone();
    assert!(matches!(c.apply(&text), Err(Rejected::NotWasm { .. })));
    let mut huge = module(1);
    huge.0.resize(MAX_FUNCTION_BYTES + 1, 0);
    let huge = CatalogCommand::UploadFunction {
        name: "t".into(),
        wasm: huge,
    };
    assert!(matches!(c.apply(&huge), Err(Rejected::NotWasm { .. })));
    assert_eq!(c, before);
    rejects(
        &mut c,
        CatalogCommand::RemoveFunction { name: "t".into() },
        Rejected::UnknownFunction("t".into()),
    );
}

#[test]
fn tables_name_uploaded_functions_by_id() {
    let mut c = two_shards();
    rejects(
        &mut c,
        wasm_table("t", 1),
        Rejected::UnknownFunctionId {
            table: "t".into(),
            id: module(1).id(),
        },
    );
    accepts_function(&mut c, upload("tenant", 1));
    let s = accepts(&mut c, wasm_table("t", 1));
    assert_eq!(s.epoch(), 3);
    assert_eq!(
        s.sharded_table("t").map(|t| t.function),
        Some(RoutingFunction::Wasm { id: module(1).id() })
    );
    assert_eq!(s.wasm_function_ids().len(), 1);
    assert_eq!(c.function_names(module(1).id()), vec!["tenant"]);
    let modules: Vec<_> = c.function_modules().collect();
    assert_eq!(modules, vec![(module(1).id(), module(1).0.as_slice())]);
    // in use: no other bytes, no removal
    let in_use = Rejected::FunctionInUse {
        name: "tenant".into(),
        table: "t".into(),
    };
    rejects(&mut c, upload("tenant", 2), in_use.clone());
    rejects(
        &mut c,
        CatalogCommand::RemoveFunction {
            name: "tenant".into(),
        },
        in_use,
    );
    // the same bytes: fine
    assert_eq!(c.apply(&upload("tenant", 1)), Ok(Applied::Unchanged));
    // a second name for the same module: either name may go, not both
    accepts_function(&mut c, upload("alias", 1));
    assert_eq!(c.function_modules().count(), 1);
    accepts_function(
        &mut c,
        CatalogCommand::RemoveFunction {
            name: "tenant".into(),
        },
    );
    rejects(
        &mut c,
        CatalogCommand::RemoveFunction {
            name: "alias".into(),
        },
        Rejected::FunctionInUse {
            name: "alias".into(),
            table: "t".into(),
        },
    );
}

/// Applies a function command that must be accepted without a new epoch.
fn accepts_function(c: &mut Catalog, cmd: CatalogCommand) {
    let epoch = c.epoch();
    match c.apply(&cmd) {
        Ok(Applied::FunctionStored { .. } | Applied::FunctionRemoved { .. }) => {}
        other => panic!("{cmd:?}: {other:?}"),
    }
    assert_eq!(c.epoch(), epoch);
}

#[test]
fn set_table_function_is_a_metadata_flip() {
    let mut c = two_shards();
    accepts(&mut c, CatalogCommand::DeclareSharded(table("t")));
    accepts_function(&mut c, upload("a", 1));
    accepts_function(&mut c, upload("b", 2));
    let set = |f| CatalogCommand::SetTableFunction {
        table: "t".into(),
        function: f,
    };
    let s = accepts(&mut c, set(wasm(1)));
    assert_eq!(s.epoch(), 4);
    assert_eq!(c.apply(&set(wasm(1))), Ok(Applied::Unchanged));
    assert_eq!(c.epoch(), 4);
    // now "a" is in use, "b" is not
    assert!(matches!(
        c.apply(&upload("a", 3)),
        Err(Rejected::FunctionInUse { .. })
    ));
    accepts(&mut c, set(wasm(2)));
    assert_eq!(c.epoch(), 5);
    accepts_function(&mut c, upload("a", 3));
    accepts(&mut c, set(RoutingFunction::PgHash { seed: 7 }));
    accepts_function(&mut c, CatalogCommand::RemoveFunction { name: "b".into() });
    rejects(
        &mut c,
        set(wasm(2)),
        Rejected::UnknownFunctionId {
            table: "t".into(),
            id: module(2).id(),
        },
    );
    rejects(
        &mut c,
        CatalogCommand::SetTableFunction {
            table: "nope".into(),
            function: wasm(3),
        },
        Rejected::NotSharded("nope".into()),
    );
}

#[test]
fn bootstrap_with_functions() {
    let f = |name: &str, n| FunctionSpec {
        name: name.into(),
        wasm: module(n),
    };
    let with = |functions, sharded| CatalogSeed {
        functions,
        sharded,
        ..seed()
    };
    let tspec = TableSpec {
        function: wasm(1),
        ..table("w")
    };
    let mut c = Catalog::new();
    let missing = with(vec![f("x", 2)], vec![tspec.clone()]);
    rejects(
        &mut c,
        CatalogCommand::Bootstrap(missing),
        Rejected::UnknownFunctionId {
            table: "w".into(),
            id: module(1).id(),
        },
    );
    let twice = with(vec![f("x", 1), f("x", 2)], vec![]);
    rejects(
        &mut c,
        CatalogCommand::Bootstrap(twice),
        Rejected::DuplicateFunction("x".into()),
    );
    let ok = with(vec![f("x", 1), f("x", 1)], vec![tspec]);
    let s = accepts(&mut c, CatalogCommand::Bootstrap(ok));
    assert_eq!(s.epoch(), 1);
    assert_eq!(c.functions().count(), 1);
    assert!(matches!(
        c.apply(&CatalogCommand::RemoveFunction { name: "x".into() }),
        Err(Rejected::FunctionInUse { .. })
    ));
}

#[test]
fn function_commands_print_no_module_bytes() {
    let text = format!("{:?}", upload("f", 200));
    assert!(text.contains("<12 bytes, "), "{text}");
    assert!(!text.contains("200"), "{text}");
    let json = serde_json::to_string(&upload("f", 255)).expect("serialize");
    assert_eq!(
        json,
        r#"{"op":"upload_function","name":"f","wasm":"0061736d01000000000201ff"}"#
    );
    let json = serde_json::to_string(&CatalogCommand::SetTableFunction {
        table: "t".into(),
        function: RoutingFunction::Wasm {
            id: FunctionId([0xab; 32]),
        },
    })
    .expect("serialize");
    assert_eq!(
        json,
        format!(
            r#"{{"op":"set_table_function","table":"t","function":{{"wasm":{{"id":"{}"}}}}}}"#,
            "ab".repeat(32)
        )
    );
    assert!(serde_json::from_str::<CatalogCommand>(
        r#"{"op":"upload_function","name":"f","wasm":"0g"}"#
    )
    .is_err());
}

fn job_update(job: &str, phase: JobPhase) -> CatalogCommand {
    CatalogCommand::JobUpdate {
        job: job.into(),
        phase,
        owner: 1,
        rows_copied: 0,
        lag_bytes: 0,
        note: String::new(),
    }
}

#[test]
fn a_job_flips_its_range_and_lifts_its_freeze_in_one_entry() {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let upper = span(HALF, None);
    let start = CatalogCommand::JobStart {
        job: "j1".into(),
        spec: JobSpec {
            range: upper,
            from: "a".into(),
            to: "b".into(),
        },
    };
    let s = accepts(&mut c, start);
    assert_eq!(s.ranges()[1].status, RangeStatus::Moving);
    for phase in [JobPhase::Copy, JobPhase::CatchUp, JobPhase::CutOver] {
        assert!(c.apply(&job_update("j1", phase)).is_ok(), "{phase:?}");
    }
    let own = FreezeId::for_job("j1").0;
    let s = accepts(&mut c, freeze(upper, own));
    assert_eq!(s.ranges()[1].status, RangeStatus::Frozen);
    assert_eq!(s.ranges()[1].write_owner.as_str(), "a");

    let s = accepts(&mut c, job_update("j1", JobPhase::Flipped));
    assert_eq!(s.ranges()[1].write_owner.as_str(), "b");
    assert_eq!(s.ranges()[1].read_owner.as_str(), "b");
    // Writers are released by the flip itself; the job still holds the
    // range (Moving) until it is done.
    assert_eq!(s.ranges()[1].status, RangeStatus::Moving);
    assert_eq!(c.freeze(HALF), None);
    rejects(&mut c, unfreeze(upper, own), Rejected::NotFrozen(upper));
    // A flipped job cannot abort.
    assert!(c.apply(&job_update("j1", JobPhase::Aborting)).is_err());
    let s = accepts(&mut c, job_update("j1", JobPhase::Done));
    assert_eq!(s.ranges()[1].status, RangeStatus::Active);
    assert_eq!(s.ranges()[1].write_owner.as_str(), "b");
}

#[test]
fn a_catalog_round_trips_through_its_image() {
    // Empty.
    let empty = Catalog::new();
    assert_eq!(Catalog::from_image(&empty.image()), Ok(empty));
    // Everything a catalog holds: shards, tables (built-in and wasm),
    // split and reassigned ranges, a freeze, decisions, a job, functions.
    let mut c = two_shards();
    for cmd in [
        upload("tenant", 1),
        upload("spare", 2),
        wasm_table("w", 1),
        CatalogCommand::DeclareSharded(table("t")),
        CatalogCommand::DeclareReference {
            table: "countries".into(),
        },
        split(ALL, HALF),
        split(span(0, Some(HALF)), 1000),
        assign(span(0, Some(1000)), "b", "b"),
        freeze(span(1000, Some(HALF)), 7),
        CatalogCommand::TxDecision {
            gid: "hotrepart_1".into(),
            commit: true,
            since: None,
        },
        CatalogCommand::TxDecision {
            gid: "hotrepart_2".into(),
            commit: false,
            since: None,
        },
        CatalogCommand::JobStart {
            job: "j1".into(),
            spec: JobSpec {
                range: span(HALF, None),
                from: "a".into(),
                to: "b".into(),
            },
        },
    ] {
        let kind = cmd.kind();
        if let Err(e) = c.apply(&cmd) {
            panic!("{kind} rejected: {e}");
        }
    }
    let image = c.image();
    let json = serde_json::to_string(&image).expect("serialise");
    let back: CatalogImage = serde_json::from_str(&json).expect("deserialise");
    let rebuilt = Catalog::from_image(&back).expect("valid image");
    assert_eq!(rebuilt, c);
    assert_eq!(rebuilt.epoch(), c.epoch());
    // And it goes on the same way.
    let mut a = c.clone();
    let mut b = rebuilt;
    let next = unfreeze(span(1000, Some(HALF)), 7);
    assert_eq!(a.apply(&next), b.apply(&next));
    assert_eq!(a, b);
}

#[test]
fn an_invalid_image_is_refused() {
    let c = two_shards();
    let mut image = c.image();
    if let Some(r) = image.routing.as_mut() {
        r.ranges.pop(); // the ranges no longer tile the space
    }
    assert!(Catalog::from_image(&image).is_err());
    let mut image = c.image();
    image.freezes.push(FreezeImage {
        lo: 12345,
        id: FreezeId(1),
        previous: StatusImage::Active,
    });
    let err = Catalog::from_image(&image).expect_err("a freeze of no range");
    assert!(err.to_string().contains("12345"), "{err}");
}

/// Two shards, the upper half of the space moving from `a` to `b` under
/// job `j1`, which has reached `phase` (before the flip).
fn job_at(phase: JobPhase) -> (Catalog, Span) {
    let mut c = two_shards();
    accepts(&mut c, split(ALL, HALF));
    let upper = span(HALF, None);
    accepts(
        &mut c,
        CatalogCommand::JobStart {
            job: "j1".into(),
            spec: JobSpec {
                range: upper,
                from: "a".into(),
                to: "b".into(),
            },
        },
    );
    for p in [JobPhase::Copy, JobPhase::CatchUp, JobPhase::CutOver] {
        if p > phase {
            break;
        }
        assert!(c.apply(&job_update("j1", p)).is_ok(), "{p:?}");
    }
    (c, upper)
}

fn rejected_reason(c: &mut Catalog, cmd: CatalogCommand) -> String {
    let before = c.clone();
    let e = c.apply(&cmd).expect_err("rejected");
    assert_eq!(*c, before, "a rejected command changed the catalog");
    e.to_string()
}

#[test]
fn no_failure_or_abort_is_accepted_at_or_after_the_flip() {
    let (mut c, upper) = job_at(JobPhase::CutOver);
    accepts(&mut c, freeze(upper, FreezeId::for_job("j1").0));
    accepts(&mut c, job_update("j1", JobPhase::Flipped));
    // The runner that believes the flip failed (its proposal timed out
    // after it was decided) cannot undo the job: the range is b's now.
    for phase in [JobPhase::Failed, JobPhase::Aborting, JobPhase::Aborted] {
        let why = rejected_reason(&mut c, job_update("j1", phase));
        assert!(why.contains("can only go on to done"), "{phase:?}: {why}");
    }
    assert_eq!(snap(&c).ranges()[1].write_owner.as_str(), "b");
    // Before the flip a failure is still accepted (the runner undoes the
    // copy), and so is one after an abort.
    let (mut c, _) = job_at(JobPhase::CatchUp);
    assert!(c.apply(&job_update("j1", JobPhase::Failed)).is_ok());
    let (mut c, _) = job_at(JobPhase::CutOver);
    assert!(c.apply(&job_update("j1", JobPhase::Aborting)).is_ok());
    assert!(c.apply(&job_update("j1", JobPhase::Failed)).is_ok());
    assert_eq!(snap(&c).ranges()[1].write_owner.as_str(), "a");
}

#[test]
fn a_flip_needs_the_range_frozen_by_the_jobs_own_freeze() {
    let own = FreezeId::for_job("j1");
    assert_eq!(own, FreezeId::for_job("j1"), "deterministic");
    assert_ne!(own, FreezeId::for_job("j2"));
    // Not frozen (never, or lifted since the verification).
    let (mut c, upper) = job_at(JobPhase::CutOver);
    let why = rejected_reason(&mut c, job_update("j1", JobPhase::Flipped));
    assert!(
        why.contains("no longer frozen by the job's freeze"),
        "{why}"
    );
    accepts(&mut c, freeze(upper, own.0));
    accepts(&mut c, unfreeze(upper, own.0));
    let why = rejected_reason(&mut c, job_update("j1", JobPhase::Flipped));
    assert!(why.contains("no longer frozen"), "{why}");
    // Frozen by someone else.
    accepts(&mut c, freeze(upper, 77));
    let why = rejected_reason(&mut c, job_update("j1", JobPhase::Flipped));
    assert!(why.contains("frozen by freeze#77"), "{why}");
    accepts(&mut c, unfreeze(upper, 77));
    // Under its own freeze: the flip goes through and lifts it.
    accepts(&mut c, freeze(upper, own.0));
    let s = accepts(&mut c, job_update("j1", JobPhase::Flipped));
    assert_eq!(s.ranges()[1].write_owner.as_str(), "b");
    assert_eq!(c.freeze(HALF), None);
}

#[test]
fn an_operator_cannot_lift_a_live_jobs_freeze() {
    let (mut c, upper) = job_at(JobPhase::CutOver);
    let own = FreezeId::for_job("j1");
    accepts(&mut c, freeze(upper, own.0));
    // `proxyctl range unfreeze` while the job lives: refused, naming it.
    rejects(
        &mut c,
        operator_unfreeze(upper, own.0),
        Rejected::FrozenByJob {
            range: upper,
            job: "j1".into(),
        },
    );
    let msg = rejected_reason(&mut c, operator_unfreeze(upper, own.0));
    assert!(msg.contains("proxyctl jobs abort j1"), "{msg}");
    assert_eq!(c.live_job_freezing(upper, own), Some("j1"));
    // The job's runner lifts it (the command of every entry written
    // before the marker existed applies as it did).
    accepts(&mut c, unfreeze(upper, own.0));
    // An operator may lift any other freeze of the range.
    accepts(&mut c, freeze(upper, 5));
    accepts(&mut c, operator_unfreeze(upper, 5));
    // Once the job has ended, its freeze id is an ordinary one.
    assert!(c.apply(&job_update("j1", JobPhase::Aborting)).is_ok());
    accepts(&mut c, job_update("j1", JobPhase::Aborted));
    assert_eq!(c.live_job_freezing(upper, own), None);
    accepts(&mut c, freeze(upper, own.0));
    accepts(&mut c, operator_unfreeze(upper, own.0));
}

#[test]
fn schema_changes_are_counted_per_database_and_leave_the_epoch_alone() {
    let mut c = two_shards();
    let changed = |db: &str| CatalogCommand::SchemaChanged {
        database: db.into(),
    };
    assert_eq!(c.schema_generation(), 0);
    assert_eq!(
        c.apply(&changed("app")),
        Ok(Applied::SchemaChanged {
            database: "app".into(),
            generation: 1
        })
    );
    c.apply(&changed("other")).expect("accepted");
    c.apply(&changed("app")).expect("accepted");
    assert_eq!(c.epoch(), 2);
    assert_eq!(c.schema_generation(), 3);
    fn since(c: &Catalog, g: u64) -> Vec<&str> {
        c.schema_changed_since(g).collect()
    }
    assert_eq!(since(&c, 0), ["app", "other"]);
    assert_eq!(since(&c, 2), ["app"]);
    assert!(since(&c, 3).is_empty());
    for bad in ["", &"d".repeat(64)] {
        rejects(
            &mut c,
            changed(bad),
            Rejected::InvalidDatabase {
                database: bad.to_string(),
            },
        );
    }
    assert_eq!(c.schema_generation(), 3);
    // Kept across log compaction: a node restored from an image compares
    // the same counts.
    let back = Catalog::from_image(&c.image()).expect("valid image");
    assert_eq!(back, c);
    assert_eq!(since(&back, 2), ["app"]);
    // An image written before schema changes were recorded reads as none.
    let mut json = serde_json::to_value(c.image()).expect("serialize");
    let obj = json.as_object_mut().expect("object");
    obj.remove("schema_generation");
    obj.remove("schema_changed");
    let old: CatalogImage = serde_json::from_value(json).expect("old image");
    assert_eq!(
        Catalog::from_image(&old)
            .expect("valid")
            .schema_generation(),
        0
    );
}
