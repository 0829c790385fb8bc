//! User type OIDs look the same to a client whichever shard answers
//! (issue 14): the home shard's (`proxy/src/session/type_oids.rs`).
//!
//! Two shards where every user type has another OID on each (a type
//! created first on the non-home shard alone shifts its OIDs), a sharded
//! table with an enum, a composite, a domain and an enum array column, and
//! tokio-postgres through the node: rows written and read with keys on
//! both shards, statements described by either shard, an enum parameter
//! typed by OID in Parse, merged and concatenated reads over both.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;
use std::error::Error;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

type BoxError = Box<dyn Error + Sync + Send>;

/// An enum label (its binary form is its text).
#[derive(Debug, PartialEq, Clone)]
struct Label(String);

impl ToSql for Label {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Enum(_))
    }
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Label {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Label(std::str::from_utf8(raw)?.to_string()))
    }
    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Enum(_))
    }
}

/// A value of the domain over int4.
#[derive(Debug)]
struct Pos(i32);

impl ToSql for Pos {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Domain(b) if *b == Type::INT4)
    }
    to_sql_checked!();
}

/// A `to_pair` (a int4, b text) read in binary.
#[derive(Debug, PartialEq)]
struct Pair(i32, String);

impl<'a> FromSql<'a> for Pair {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let mut b = raw;
        let mut take = |n: usize| -> Result<&'a [u8], BoxError> {
            if b.len() < n {
                return Err("short record".into());
            }
            let (h, t) = b.split_at(n);
            b = t;
            Ok(h)
        };
        let u32_of = |x: &[u8]| u32::from_be_bytes([x[0], x[1], x[2], x[3]]);
        if u32_of(take(4)?) != 2 {
            return Err("not 2 fields".into());
        }
        let mut fields = Vec::new();
        for want in [23u32, 25] {
            let oid = u32_of(take(4)?);
            if oid != want {
                return Err(format!("field oid {oid}, expected {want}").into());
            }
            let len = u32_of(take(4)?) as usize;
            fields.push(take(len)?.to_vec());
        }
        let a = i32::from_be_bytes(fields[0][..4].try_into()?);
        Ok(Pair(a, String::from_utf8(fields[1].clone())?))
    }
    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Composite(_)) && ty.name() == "to_pair"
    }
}

/// The OID of type `name` on shard `i`, read directly.
async fn oid_on(c: &Cluster, i: usize, name: &str) -> u32 {
    c.direct(i)
        .await
        .query_one(&format!("SELECT '{name}'::regtype::oid"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A key of `to_items` that shard `shard` owns.
fn key_on(c: &Cluster, shard: usize) -> i64 {
    let snap = c.node.routing.catalog.load();
    let name = c.node.routing.shard_name(shard);
    (1..10_000i64)
        .find(|k| {
            snap.range_for_key("to_items", &KeyValue::Int8(*k))
                .is_ok_and(|r| r.write_owner.as_str() == name)
        })
        .expect("a key on the shard")
}

fn simple_rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The cluster, its home and other shard, and the home shard's OIDs of
/// to_mood, _to_mood, to_pair, to_pos.
async fn setup() -> (Cluster, usize, usize, [u32; 4]) {
    let c = Cluster::start(Opts {
        shards: 2,
        tail: "[[sharded_tables]]\nname = \"to_items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
        ..Opts::default()
    })
    .await;
    let home = c.node.routing.home_index();
    let other = 1 - home;
    // Shifts the OIDs of the other shard.
    c.direct(other)
        .await
        .batch_execute("CREATE TYPE to_shift AS ENUM ('x', 'y', 'z'); CREATE TABLE to_shift_t (a int)")
        .await
        .unwrap();
    let node = c.connect().await;
    node.batch_execute(
        "CREATE TYPE to_mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TYPE to_pair AS (a int4, b text);
         CREATE DOMAIN to_pos AS int4 CHECK (VALUE > 0);
         CREATE TABLE to_items (id int8 PRIMARY KEY, m to_mood, c to_pair, d to_pos, ma to_mood[])",
    )
    .await
    .unwrap();
    let mut oids = [0u32; 4];
    for (i, name) in ["to_mood", "to_mood[]", "to_pair", "to_pos"].iter().enumerate() {
        let (h, o) = (oid_on(&c, home, name).await, oid_on(&c, other, name).await);
        assert_ne!(h, o, "{name} must have another OID on each shard for this test");
        oids[i] = h;
    }
    (c, home, other, oids)
}

/// The row of key `k` as the node gives it, in binary, from a statement
/// its key's shard described; checks the column types are the home
/// shard's.
async fn read_binary(node: &Client, k: i64, oids: [u32; 4]) -> (Label, Pair, i32, Vec<Label>) {
    let st = node
        .prepare(&format!("SELECT m, c, d, ma FROM to_items WHERE id = {k}"))
        .await
        .unwrap();
    let got: Vec<u32> = st.columns().iter().map(|c| c.type_().oid()).collect();
    // A domain column is described by its base type.
    assert_eq!(got, vec![oids[0], oids[2], Type::INT4.oid(), oids[1]], "key {k}");
    let r = node.query_one(&st, &[]).await.unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_types_carry_the_home_shards_oids_on_every_shard() {
    let (c, home, other, oids) = setup().await;
    let node = c.connect().await;
    let (k0, k1) = (key_on(&c, home), key_on(&c, other));

    // The enum's OID as a driver learns it (a catalog read: the home shard).
    let mood = node
        .prepare("SELECT NULL::to_mood")
        .await
        .unwrap()
        .columns()[0]
        .type_()
        .clone();
    assert_eq!(mood.oid(), oids[0]);
    // Parse names the enum's OID: on the other shard it is that shard's.
    let ins = node
        .prepare_typed(
            "INSERT INTO to_items (id, m, c, d, ma) VALUES ($1, $2, ROW($3, $4)::to_pair, $5::int4::to_pos, $6::text::to_mood[])",
            &[Type::INT8, mood.clone()],
        )
        .await
        .unwrap();
    for (k, m) in [(k0, "sad"), (k1, "happy")] {
        node.execute(
            &ins,
            &[&k, &Label(m.into()), &(k as i32), &format!("p{k}"), &5i32, &"{ok,happy}"],
        )
        .await
        .unwrap_or_else(|e| panic!("insert key {k}: {e}"));
    }
    for (k, m) in [(k0, "sad"), (k1, "happy")] {
        // Binary, described by the key's shard.
        let (got_m, got_c, got_d, got_ma) = read_binary(&node, k, oids).await;
        assert_eq!(got_m, Label(m.into()), "key {k}");
        assert_eq!(got_c, Pair(k as i32, format!("p{k}")), "key {k}");
        assert_eq!(got_d, 5, "key {k}");
        assert_eq!(got_ma, vec![Label("ok".into()), Label("happy".into())], "key {k}");
        // Parameters described by the key's shard: an enum and a domain.
        let by_m = node
            .prepare(&format!("SELECT id FROM to_items WHERE id = {k} AND m = $1"))
            .await
            .unwrap();
        assert_eq!(by_m.params()[0].oid(), oids[0], "key {k}");
        let rows = node.query(&by_m, &[&Label(m.into())]).await.unwrap();
        assert_eq!(rows.len(), 1, "key {k}");
        let set_d = node
            .prepare(&format!("UPDATE to_items SET d = $1 WHERE id = {k}"))
            .await
            .unwrap();
        assert_eq!(set_d.params()[0].oid(), oids[3], "key {k}");
        assert_eq!(node.execute(&set_d, &[&Pos(7)]).await.unwrap(), 1);
        // Text (the simple protocol).
        let rows = simple_rows(
            node.simple_query(&format!("SELECT m, c, d, ma FROM to_items WHERE id = {k}"))
                .await
                .unwrap(),
        );
        let want = [m.to_string(), format!("({k},p{k})"), "7".into(), "{ok,happy}".into()];
        assert_eq!(rows, vec![want.map(Some).to_vec()], "key {k}");
    }
    // An enum parameter bound by key (the statement prepared on the home
    // shard, run on either).
    let by_key = node
        .prepare_typed("SELECT m FROM to_items WHERE id = $1 AND m = $2", &[Type::INT8, mood])
        .await
        .unwrap();
    for (k, m) in [(k0, "sad"), (k1, "happy")] {
        let r = node.query(&by_key, &[&k, &Label(m.into())]).await.unwrap();
        assert_eq!(r.len(), 1, "key {k}");
        assert_eq!(r[0].columns()[0].type_().oid(), oids[0]);
    }

    // Over both shards: merged (ORDER BY; in text, the merge sends binary
    // results of built-in types only) and concatenated, both protocols. The
    // shards' row descriptions must agree.
    let mut want = vec![(k0, Label("sad".into())), (k1, Label("happy".into()))];
    want.sort_by_key(|x| x.0);
    let mut want_text: Vec<Vec<Option<String>>> = want
        .iter()
        .map(|(k, m)| vec![Some(k.to_string()), Some(m.0.clone())])
        .collect();
    want_text.sort();
    let merged = simple_rows(
        node.simple_query("SELECT id, m FROM to_items ORDER BY id")
            .await
            .unwrap(),
    );
    assert_eq!(merged, want_text);
    let mut all: Vec<(i64, Label)> = node
        .query("SELECT id, m FROM to_items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    all.sort_by_key(|x| x.0);
    assert_eq!(all, want);
    let mut rows = simple_rows(node.simple_query("SELECT id, m FROM to_items").await.unwrap());
    rows.sort();
    assert_eq!(rows, want_text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_created_after_the_first_translation_is_translated_too() {
    let (c, home, other, oids) = setup().await;
    let node = c.connect().await;
    let k1 = key_on(&c, other);
    node.execute(
        &format!("INSERT INTO to_items (id, m) VALUES ({k1}, 'ok')"),
        &[],
    )
    .await
    .unwrap();
    let st = node
        .prepare(&format!("SELECT m FROM to_items WHERE id = {k1}"))
        .await
        .unwrap();
    assert_eq!(st.columns()[0].type_().oid(), oids[0]);
    // A new type and column through the node: the map is read again.
    node.batch_execute(
        "CREATE TYPE to_color AS ENUM ('red', 'blue'); ALTER TABLE to_items ADD COLUMN col to_color",
    )
    .await
    .unwrap();
    let color = oid_on(&c, home, "to_color").await;
    assert_ne!(color, oid_on(&c, other, "to_color").await);
    node.execute(&format!("UPDATE to_items SET col = 'blue' WHERE id = {k1}"), &[])
        .await
        .unwrap();
    let st = node
        .prepare(&format!("SELECT col FROM to_items WHERE id = {k1}"))
        .await
        .unwrap();
    assert_eq!(st.columns()[0].type_().oid(), color);
    let r = node.query_one(&st, &[]).await.unwrap();
    assert_eq!(r.get::<_, Label>(0), Label("blue".into()));
    // A type created directly on each shard, not through the node: a
    // lookup that misses reads the map again (at most once a second).
    for i in [home, other] {
        c.direct(i)
            .await
            .batch_execute("CREATE TYPE to_direct AS ENUM ('a', 'b')")
            .await
            .unwrap();
    }
    let direct = oid_on(&c, home, "to_direct").await;
    assert_ne!(direct, oid_on(&c, other, "to_direct").await);
    let sql = format!("SELECT 'b'::to_direct FROM to_items WHERE id = {k1}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(st) = node.prepare(&sql).await {
            if st.columns()[0].type_().oid() == direct {
                let r = node.query_one(&st, &[]).await.unwrap();
                assert_eq!(r.get::<_, Label>(0), Label("b".into()));
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new type's OID was never translated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
