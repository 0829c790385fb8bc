//! Shared data of the merge tests (`tests/tests/it/merge.rs`,
//! `tests/tests/it/merge_random.rs`): the `items` table (sharded by `id`), deterministic rows with NULLs, ties
//! and negative numbers, and a reader for simple-query answers.
//!
//! Two variants of the table:
//! - [`SCHEMA`] / [`insert_sql`]: ten columns (int8 key, int4, text,
//!   numeric(10,2), int4, float8, bool, timestamptz, date, uuid), as the
//!   fixed differential test has always used;
//! - [`WIDE_SCHEMA`] / [`wide_insert_sql`]: the same plus `b bytea` and
//!   `n numeric` (no typmod), and float8 specials (NaN, ±Infinity). With
//!   `tricky`, also values PostgreSQL treats as equal but prints differently
//!   (`-0` beside `0` in float8, `1.5`/`1.50`/`1.500` in numeric).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::SimpleQueryMessage;

/// Rows of a simple-query answer as text (None = NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// All rows of the (last) result of a simple query.
pub async fn rows(db: &tokio_postgres::Client, sql: &str) -> Result<Rows, tokio_postgres::Error> {
    let msgs = db.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect())
}

/// The ten-column `items` table.
pub const SCHEMA: &str =
    "CREATE TABLE items (id bigint PRIMARY KEY, grp int, cat text, price numeric(10,2), \
    qty int, f float8, flag boolean, ts timestamptz, d date, u uuid)";

/// [`SCHEMA`] plus `b bytea` and `n numeric`.
pub const WIDE_SCHEMA: &str =
    "CREATE TABLE items (id bigint PRIMARY KEY, grp int, cat text, price numeric(10,2), \
    qty int, f float8, flag boolean, ts timestamptz, d date, u uuid, b bytea, n numeric)";

/// Deterministic INSERTs (100 rows each) for [`SCHEMA`], ids 1..=n.
pub fn insert_sql(seed: u64, n: usize) -> Vec<String> {
    gen(seed, n, None)
}

/// Deterministic INSERTs (100 rows each) for [`WIDE_SCHEMA`], ids 1..=n.
pub fn wide_insert_sql(seed: u64, n: usize, tricky: bool) -> Vec<String> {
    gen(seed, n, Some(tricky))
}

/// `wide`: None for [`SCHEMA`], Some(tricky) for [`WIDE_SCHEMA`]. The
/// narrow rows draw exactly what they always drew, so `insert_sql` keeps
/// its data.
fn gen(seed: u64, n: usize, wide: Option<bool>) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cats = ["apple", "Banana", "cherry", "date", "éclair", "fig"];
    let cols = if wide.is_some() {
        "id, grp, cat, price, qty, f, flag, ts, d, u, b, n"
    } else {
        "id, grp, cat, price, qty, f, flag, ts, d, u"
    };
    let mut out = Vec::new();
    let mut values = Vec::new();
    for id in 1..=n as i64 {
        let null = |rng: &mut StdRng| rng.random_range(0..10) == 0;
        let grp = if null(&mut rng) {
            "NULL".to_string()
        } else {
            rng.random_range(-3..8).to_string()
        };
        let cat = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!("'{}'", cats[rng.random_range(0..cats.len())])
        };
        let price = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!(
                "{}.{:02}",
                rng.random_range(-50..500),
                rng.random_range(0..100)
            )
        };
        let qty = if null(&mut rng) {
            "NULL".to_string()
        } else {
            rng.random_range(0..20).to_string()
        };
        let mut f = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!("{}", rng.random_range(-40..40) as f64 * 0.5)
        };
        let flag = if null(&mut rng) {
            "NULL"
        } else if rng.random() {
            "true"
        } else {
            "false"
        };
        let ts = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!(
                "'2024-{:02}-{:02} {:02}:{:02}:00+0{}'",
                rng.random_range(1..13),
                rng.random_range(1..28),
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..3)
            )
        };
        let d = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!(
                "'20{:02}-{:02}-{:02}'",
                rng.random_range(10..30),
                rng.random_range(1..13),
                rng.random_range(1..28)
            )
        };
        let u = if null(&mut rng) {
            "NULL".to_string()
        } else {
            format!("'{:032x}'", rng.random::<u128>())
        };
        let row = match wide {
            None => format!("({id}, {grp}, {cat}, {price}, {qty}, {f}, {flag}, {ts}, {d}, {u})"),
            Some(tricky) => {
                // float8 specials (quoted: 'NaN'::float8)
                if f != "NULL" && rng.random_range(0..20) == 0 {
                    let specials: &[&str] = if tricky {
                        &["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "'-0'"]
                    } else {
                        &["'NaN'", "'NaN'", "'Infinity'", "'-Infinity'"]
                    };
                    f = specials[rng.random_range(0..specials.len())].to_string();
                }
                let b = if null(&mut rng) {
                    "NULL".to_string()
                } else {
                    let alphabet = ["00", "01", "7f", "80", "ff"];
                    let len = rng.random_range(0..4);
                    let hex: String = (0..len)
                        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                        .collect();
                    format!("'\\x{hex}'")
                };
                let num = if null(&mut rng) {
                    "NULL".to_string()
                } else if rng.random_range(0..40) == 0 {
                    "'NaN'".to_string()
                } else {
                    // quarters: 2.5, -0.25, 3 …; each value printed one way,
                    // or (tricky) with 0 to 2 extra trailing zeros.
                    let q: i64 = rng.random_range(-40..40);
                    let mut s = format!("{}", q as f64 / 4.0);
                    if tricky {
                        let extra = rng.random_range(0..3);
                        if extra > 0 && !s.contains('.') {
                            s.push('.');
                        }
                        for _ in 0..extra {
                            s.push('0');
                        }
                    }
                    s
                };
                format!(
                    "({id}, {grp}, {cat}, {price}, {qty}, {f}, {flag}, {ts}, {d}, {u}, {b}, {num})"
                )
            }
        };
        values.push(row);
        if values.len() == 100 || id == n as i64 {
            out.push(format!(
                "INSERT INTO items ({cols}) VALUES {}",
                values.join(", ")
            ));
            values.clear();
        }
    }
    out
}

/// A value's binary form, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Raw(pub Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Column types and binary rows of an extended-protocol answer.
pub type BinaryRows = (Vec<Type>, Vec<Vec<Option<Raw>>>);

/// A query in the extended protocol (Parse/Describe, then Bind/Execute with
/// binary results, as tokio-postgres does).
pub async fn binary_rows(
    db: &tokio_postgres::Client,
    sql: &str,
) -> Result<BinaryRows, tokio_postgres::Error> {
    let st = db.prepare(sql).await?;
    let types = st.columns().iter().map(|c| c.type_().clone()).collect();
    let rows = db.query(&st, &[]).await?;
    Ok((
        types,
        rows.iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Option<Raw>>(i)).collect())
            .collect(),
    ))
}

/// Keeps the reference PostgreSQL of [`differential`] running; the server
/// stops before its directory is removed (fields drop in order).
pub struct ReferencePg {
    _pg: crate::LocalPg,
    _dir: crate::TestDir,
}

/// One plain PostgreSQL (the reference every merged answer is compared
/// with) beside a 4-shard node (pool 4) with `table` sharded by `id`
/// (int8): (reference connection, node connection, cluster, guard).
pub async fn differential(
    table: &str,
) -> (
    tokio_postgres::Client,
    tokio_postgres::Client,
    crate::Cluster,
    ReferencePg,
) {
    let dir = crate::TestDir::new("reference");
    let d = dir.0.clone();
    let pg = tokio::task::spawn_blocking(move || crate::start_pg(&d))
        .await
        .expect("reference PostgreSQL");
    let reference = crate::connect(&pg.dsn())
        .await
        .expect("connect to the reference");
    let cluster = crate::Cluster::start(crate::Opts {
        shards: 4,
        extra: "pool_size = 4".into(),
        tail: format!("[[sharded_tables]]\nname = \"{table}\"\nkey = \"id\"\ntype = \"int8\"\n"),
        ..crate::Opts::default()
    })
    .await;
    let node = cluster.connect().await;
    (reference, node, cluster, ReferencePg { _pg: pg, _dir: dir })
}
