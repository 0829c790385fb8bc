//! The catalog commands the simulation proposes: the bootstrap seed each
//! node proposes at the start, and random commands, mostly sensible
//! against the proposer's (possibly stale) view, sometimes not.

use hotrepart_router::catalog::{KeyType, RoutingFunction, Span};
use hotrepart_routing_paxos::command::{CatalogSeed, Dsn, RangeSpec, ShardSpec, TableSpec};
use hotrepart_routing_paxos::{Catalog, CatalogCommand, FreezeId};

use crate::rng::Rng;

pub(crate) fn seed_catalog(pid: u64) -> CatalogSeed {
    const HALF: u64 = 1 << 63;
    CatalogSeed {
        shards: (0..2)
            .map(|s| ShardSpec {
                shard: format!("s{s}"),
                dsn: Dsn(format!("host=s{s} seeded_by={pid}")),
            })
            .collect(),
        home_shard: "s0".into(),
        sharded: vec![TableSpec {
            table: "t0".into(),
            key_column: "id".into(),
            key_type: KeyType::Int8,
            function: RoutingFunction::PgHash { seed: 0 },
        }],
        reference: Vec::new(),
        functions: Vec::new(),
        ranges: vec![
            RangeSpec {
                range: Span {
                    lo: 0,
                    hi: Some(HALF),
                },
                read_owner: "s0".into(),
                write_owner: "s0".into(),
            },
            RangeSpec {
                range: Span { lo: HALF, hi: None },
                read_owner: "s1".into(),
                write_owner: "s1".into(),
            },
        ],
    }
}

/// A random command, mostly sensible against `view` (the proposer's own,
/// possibly stale, catalog), sometimes not.
pub(crate) fn random_command(rng: &mut Rng, view: &Catalog) -> CatalogCommand {
    let shard = |rng: &mut Rng| format!("s{}", rng.below(6));
    let spans: Vec<Span> = view
        .snapshot()
        .map(|s| s.ranges().iter().map(|r| r.span()).collect())
        .unwrap_or_default();
    let span = |rng: &mut Rng| -> Span {
        if spans.is_empty() || rng.chance(50) {
            let lo = rng.next();
            Span {
                lo,
                hi: lo.checked_add(1 + rng.below(1000)),
            }
        } else {
            *rng.pick(&spans)
        }
    };
    match rng.below(100) {
        0..=7 => CatalogCommand::AddShard {
            shard: shard(rng),
            dsn: Dsn::from("host=x"),
        },
        8..=12 => CatalogCommand::RemoveShard { shard: shard(rng) },
        13..=17 => CatalogCommand::DeclareSharded(TableSpec {
            table: format!("t{}", rng.below(8)),
            key_column: "id".into(),
            key_type: *rng.pick(&KeyType::ALL),
            function: RoutingFunction::PgHash { seed: rng.below(3) },
        }),
        18..=20 => CatalogCommand::DeclareReference {
            table: format!("t{}", rng.below(8)),
        },
        21..=44 => {
            let range = span(rng);
            let at = if rng.chance(850) && range.len() > 1 {
                (u128::from(range.lo) + 1 + u128::from(rng.next()) % (range.len() - 1)) as u64
            } else {
                rng.next()
            };
            CatalogCommand::SplitRange { range, at }
        }
        45..=64 => CatalogCommand::AssignRange {
            range: span(rng),
            read_owner: shard(rng),
            write_owner: shard(rng),
        },
        65..=74 => CatalogCommand::FreezeRange {
            range: span(rng),
            freeze: FreezeId(rng.below(4)),
        },
        75..=84 => {
            let range = span(rng);
            let freeze = match view.freeze(range.lo) {
                Some(f) if rng.chance(800) => f.id,
                _ => FreezeId(rng.below(4)),
            };
            CatalogCommand::UnfreezeRange {
                range,
                freeze,
                operator: false,
            }
        }
        85..=89 if !spans.is_empty() => CatalogCommand::Bootstrap(seed_catalog(0)),
        _ => CatalogCommand::TxDecision {
            gid: format!("g{}", rng.below(40)),
            commit: rng.chance(500),
            since: None,
        },
    }
}
