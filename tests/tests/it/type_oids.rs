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
use hotrepart_proxy::wire;
use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::*;
use std::error::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

/// A `to_tagged` (m to_mood, n int4) in binary: a record whose fields
/// carry their type OIDs, checked against those the driver knows (the
/// home shard's), as PostgreSQL checks them on input.
#[derive(Debug, PartialEq)]
struct Tagged(Label, i32);

fn tagged_fields(ty: &Type) -> Result<Vec<u32>, BoxError> {
    match ty.kind() {
        Kind::Composite(f) => Ok(f.iter().map(|f| f.type_().oid()).collect()),
        _ => Err("not a composite".into()),
    }
}

impl ToSql for Tagged {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        use bytes::BufMut;
        let f = tagged_fields(ty)?;
        out.put_i32(2);
        out.put_u32(f[0]);
        out.put_i32(self.0 .0.len() as i32);
        out.put_slice(self.0 .0.as_bytes());
        out.put_u32(f[1]);
        out.put_i32(4);
        out.put_i32(self.1);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "to_tagged"
    }
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Tagged {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let want = tagged_fields(ty)?;
        let u = |at: usize| -> Result<u32, BoxError> {
            Ok(u32::from_be_bytes(
                raw.get(at..at + 4).ok_or("short")?.try_into()?,
            ))
        };
        if u(0)? != 2 {
            return Err("not 2 fields".into());
        }
        let (oid0, len0) = (u(4)?, u(8)? as usize);
        let label = std::str::from_utf8(raw.get(12..12 + len0).ok_or("short")?)?.to_string();
        let oid1 = u(12 + len0)?;
        if [oid0, oid1] != want[..] {
            return Err(format!("field OIDs {oid0}, {oid1}; the driver knows {want:?}").into());
        }
        Ok(Tagged(Label(label), u(20 + len0)? as i32))
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "to_tagged"
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
    setup_with("").await
}

/// [`setup`] with `extra` lines in the node's configuration.
async fn setup_with(extra: &str) -> (Cluster, usize, usize, [u32; 4]) {
    let c = Cluster::start(Opts {
        shards: 2,
        extra: extra.into(),
        users: "[[users]]\nname = \"raw\"\nauth = \"trust\"\nserver_user = \"postgres\"\n".into(),
        tail: "[[sharded_tables]]\nname = \"to_items\"\nkey = \"id\"\ntype = \"int8\"\n".into(),
    })
    .await;
    let home = c.node.routing.home_index();
    let other = 1 - home;
    // Shifts the OIDs of the other shard.
    c.direct(other)
        .await
        .batch_execute(
            "CREATE TYPE to_shift AS ENUM ('x', 'y', 'z'); CREATE TABLE to_shift_t (a int)",
        )
        .await
        .unwrap();
    let node = c.connect().await;
    node.batch_execute(
        "CREATE TYPE to_mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TYPE to_pair AS (a int4, b text);
         CREATE DOMAIN to_pos AS int4 CHECK (VALUE > 0);
         CREATE TYPE to_tagged AS (m to_mood, n int4);
         CREATE TABLE to_items (id int8 PRIMARY KEY, m to_mood, c to_pair, d to_pos, ma to_mood[], t to_tagged)",
    )
    .await
    .unwrap();
    let mut oids = [0u32; 4];
    for (i, name) in ["to_mood", "to_mood[]", "to_pair", "to_pos"]
        .iter()
        .enumerate()
    {
        let (h, o) = (oid_on(&c, home, name).await, oid_on(&c, other, name).await);
        assert_ne!(
            h, o,
            "{name} must have another OID on each shard for this test"
        );
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
    assert_eq!(
        got,
        vec![oids[0], oids[2], Type::INT4.oid(), oids[1]],
        "key {k}"
    );
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
            &[
                &k,
                &Label(m.into()),
                &(k as i32),
                &format!("p{k}"),
                &5i32,
                &"{ok,happy}",
            ],
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
        assert_eq!(
            got_ma,
            vec![Label("ok".into()), Label("happy".into())],
            "key {k}"
        );
        // Parameters described by the key's shard: an enum and a domain.
        let by_m = node
            .prepare(&format!(
                "SELECT id FROM to_items WHERE id = {k} AND m = $1"
            ))
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
        let want = [
            m.to_string(),
            format!("({k},p{k})"),
            "7".into(),
            "{ok,happy}".into(),
        ];
        assert_eq!(rows, vec![want.map(Some).to_vec()], "key {k}");
    }
    // An enum parameter bound by key (the statement prepared on the home
    // shard, run on either).
    let by_key = node
        .prepare_typed(
            "SELECT m FROM to_items WHERE id = $1 AND m = $2",
            &[Type::INT8, mood],
        )
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
    let mut rows = simple_rows(
        node.simple_query("SELECT id, m FROM to_items")
            .await
            .unwrap(),
    );
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
    node.execute(
        &format!("UPDATE to_items SET col = 'blue' WHERE id = {k1}"),
        &[],
    )
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

/// A client speaking the protocol itself (user `raw`, trust): what a
/// driver that reads type OIDs inside binary values (psycopg) sees.
struct Raw(TcpStream);

impl Raw {
    async fn connect(c: &Cluster) -> Raw {
        let mut s = TcpStream::connect(c.addr).await.unwrap();
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "raw"), ("database", "postgres")],
            &mut buf,
        )
        .unwrap();
        s.write_all(&buf).await.unwrap();
        let mut r = Raw(s);
        r.until_ready().await;
        r
    }

    async fn msg(&mut self) -> (u8, Vec<u8>) {
        let tag = self.0.read_u8().await.unwrap();
        let len = self.0.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        self.0.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    /// The messages up to ReadyForQuery (excluded).
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let m = tokio::time::timeout(std::time::Duration::from_secs(10), self.msg())
                .await
                .expect("a reply within 10 s");
            if m.0 == b'Z' {
                return v;
            }
            v.push(m);
        }
    }

    /// Parse (no types), Bind (binary results), Describe portal, Execute,
    /// Sync of `sql`: the RowDescription's type OIDs and the DataRows'
    /// values.
    async fn binary_query(&mut self, sql: &str) -> (Vec<u32>, Vec<Vec<Option<Vec<u8>>>>) {
        use bytes::BufMut;
        let mut b = BytesMut::new();
        wire::frame(&mut b, b'P', |o| {
            wire::put_cstr(o, "");
            wire::put_cstr(o, sql);
            o.put_i16(0);
        });
        wire::frame(&mut b, b'B', |o| {
            wire::put_cstr(o, "");
            wire::put_cstr(o, "");
            o.put_i16(0);
            o.put_i16(0);
            o.put_i16(1);
            o.put_i16(1);
        });
        wire::frame(&mut b, b'D', |o| {
            o.put_u8(b'P');
            wire::put_cstr(o, "");
        });
        wire::frame(&mut b, b'E', |o| {
            wire::put_cstr(o, "");
            o.put_i32(0);
        });
        wire::frame(&mut b, b'S', |_| {});
        self.0.write_all(&b).await.unwrap();
        let (mut types, mut rows) = (Vec::new(), Vec::new());
        for (tag, body) in self.until_ready().await {
            let mut p = &body[..];
            match tag {
                b'E' => panic!("{sql}: {}", String::from_utf8_lossy(&body)),
                b'T' => {
                    let n = wire::get_i16(&mut p).unwrap();
                    for _ in 0..n {
                        wire::get_cstr(&mut p).unwrap();
                        types.push(u32::from_be_bytes(p[6..10].try_into().unwrap()));
                        p = &p[18..];
                    }
                }
                b'D' => {
                    let n = wire::get_i16(&mut p).unwrap();
                    let mut row = Vec::new();
                    for _ in 0..n {
                        let len = wire::get_i32(&mut p).unwrap();
                        if len < 0 {
                            row.push(None);
                        } else {
                            row.push(Some(p[..len as usize].to_vec()));
                            p = &p[len as usize..];
                        }
                    }
                    rows.push(row);
                }
                _ => {}
            }
        }
        (types, rows)
    }
}

fn u32_at(v: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(v[at..at + 4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_oids_inside_binary_values_are_the_home_shards() {
    let (c, home, other, oids) = setup().await;
    let node = c.connect().await;
    let (k0, k1) = (key_on(&c, home), key_on(&c, other));
    let labels = vec![Label("sad".into()), Label("happy".into())];
    // An enum array as a binary parameter: its element OID is the home
    // shard's, the one the driver knows. Parameter types as PostgreSQL
    // describes them, and as the client names them in Parse.
    let arr_ty = node
        .prepare("SELECT NULL::to_mood[]")
        .await
        .unwrap()
        .columns()[0]
        .type_()
        .clone();
    let typed = node
        .prepare_typed(
            "UPDATE to_items SET ma = $2 WHERE id = $1",
            &[Type::INT8, arr_ty],
        )
        .await
        .unwrap();
    for k in [k0, k1] {
        node.execute(
            "INSERT INTO to_items (id, m, ma) VALUES ($1, 'ok', $2)",
            &[&k, &labels],
        )
        .await
        .unwrap_or_else(|e| panic!("insert key {k}: {e}"));
        let got: Vec<Label> = node
            .query_one("SELECT ma FROM to_items WHERE id = $1", &[&k])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, labels, "key {k}");
        let owner = if k == k0 { home } else { other };
        let direct: String = c
            .direct(owner)
            .await
            .query_one(
                &format!("SELECT ma::text FROM to_items WHERE id = {k}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(direct, "{sad,happy}", "key {k} on its shard");
        node.execute(&typed, &[&k, &vec![Label("ok".into())]])
            .await
            .unwrap_or_else(|e| panic!("update key {k}: {e}"));
    }
    // A record with an enum field as a binary parameter (PostgreSQL checks
    // its field OIDs), with its parameter type described or named in
    // Parse; read back in binary from a statement described before (no
    // RowDescription before the rows: tokio-postgres's way).
    let tagged_ty = node
        .prepare("SELECT NULL::to_tagged")
        .await
        .unwrap()
        .columns()[0]
        .type_()
        .clone();
    let set_typed = node
        .prepare_typed(
            "UPDATE to_items SET t = $2 WHERE id = $1",
            &[Type::INT8, tagged_ty],
        )
        .await
        .unwrap();
    let get = node
        .prepare("SELECT t, id FROM to_items WHERE id = $1")
        .await
        .unwrap();
    for k in [k0, k1] {
        node.execute(
            "UPDATE to_items SET t = $1 WHERE id = $2",
            &[&Tagged(Label("happy".into()), 3), &k],
        )
        .await
        .unwrap_or_else(|e| panic!("update key {k}: {e}"));
        let got: Tagged = node
            .query_one(&get, &[&k])
            .await
            .unwrap_or_else(|e| panic!("read key {k}: {e}"))
            .try_get(0)
            .unwrap_or_else(|e| panic!("decode key {k}: {e}"));
        assert_eq!(got, Tagged(Label("happy".into()), 3), "key {k}");
        node.execute(&set_typed, &[&k, &Tagged(Label("sad".into()), 4)])
            .await
            .unwrap_or_else(|e| panic!("typed update key {k}: {e}"));
        let got: Tagged = node.query_one(&get, &[&k]).await.unwrap().get(0);
        assert_eq!(got, Tagged(Label("sad".into()), 4), "key {k}");
    }
    // Over both shards (concatenated), both ways of reading.
    let all: Vec<(i64, Tagged)> = node
        .query("SELECT id, t FROM to_items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.try_get(1).unwrap_or_else(|e| panic!("decode: {e}")),
            )
        })
        .collect();
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .all(|(_, t)| *t == Tagged(Label("sad".into()), 4)),
        "{all:?}"
    );
    // Rows read in binary after a Describe of the portal (psycopg's way):
    // the array's element OID and a record's field OIDs are the home
    // shard's whichever shard answers.
    let mut raw = Raw::connect(&c).await;
    for k in [k0, k1] {
        let (types, rows) = raw
            .binary_query(&format!(
                "SELECT ma, ROW(m, ma), m FROM to_items WHERE id = {k}"
            ))
            .await;
        assert_eq!(types, vec![oids[1], 2249, oids[0]], "key {k}");
        assert_eq!(rows.len(), 1, "key {k}");
        let arr = rows[0][0].as_ref().unwrap();
        assert_eq!(u32_at(arr, 8), oids[0], "array element, key {k}");
        let rec = rows[0][1].as_ref().unwrap();
        assert_eq!(u32_at(rec, 0), 2, "key {k}");
        assert_eq!(u32_at(rec, 4), oids[0], "record field 1, key {k}");
        let len = u32_at(rec, 8) as usize;
        assert_eq!(u32_at(rec, 12 + len), oids[1], "record field 2, key {k}");
        assert_eq!(
            u32_at(rec, 12 + len + 8 + 8),
            oids[0],
            "record field 2's element, key {k}"
        );
        assert_eq!(rows[0][2].as_deref(), Some(&b"ok"[..]), "key {k}");
    }
    let (types, rows) = raw.binary_query("SELECT ma, id FROM to_items").await;
    assert_eq!(types, vec![oids[1], 20]);
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(u32_at(r[0].as_ref().unwrap(), 8), oids[0], "concatenated");
    }
}

/// A cursor over both shards whose first shard is not the home shard
/// (`home_shard = "s1"`): its columns are described, and its rows typed,
/// in the home shard's OIDs of user types, as every other answer of the
/// node (they were the first shard's: a driver that learned the enum's
/// OID from the home shard could not read the column).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_cursor_describes_user_types_in_the_home_shards_oids() {
    let (c, home, other, oids) = setup_with("home_shard = \"s1\"").await;
    assert_eq!(
        (home, other),
        (1, 0),
        "the cursor's first shard is not home"
    );
    let node = c.connect().await;
    for (k, m) in [(key_on(&c, 0), "sad"), (key_on(&c, 1), "happy")] {
        node.execute(
            &format!("INSERT INTO to_items (id, m, ma) VALUES ({k}, '{m}', '{{ok}}')"),
            &[],
        )
        .await
        .unwrap();
    }
    node.batch_execute("BEGIN; DECLARE mc CURSOR FOR SELECT m, ma, id FROM to_items ORDER BY id")
        .await
        .unwrap();
    let st = node.prepare("FETCH 10 FROM mc").await.unwrap();
    let got: Vec<u32> = st.columns().iter().map(|c| c.type_().oid()).collect();
    assert_eq!(got, vec![oids[0], oids[1], 20]);
    // (Arrays in binary over several shards are refused: read an enum.)
    node.batch_execute("CLOSE mc; DECLARE mc2 CURSOR FOR SELECT m, id FROM to_items ORDER BY id")
        .await
        .unwrap();
    let st = node.prepare("FETCH 10 FROM mc2").await.unwrap();
    assert_eq!(st.columns()[0].type_().oid(), oids[0]);
    let rows = node.query(&st, &[]).await.unwrap();
    let labels: Vec<Label> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(labels.len(), 2);
    let mut want = vec![Label("sad".into()), Label("happy".into())];
    if key_on(&c, 0) > key_on(&c, 1) {
        want.reverse();
    }
    assert_eq!(labels, want);
    node.batch_execute("COMMIT").await.unwrap();
}
