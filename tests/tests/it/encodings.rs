//! Client encodings other than UTF-8 (`proxy/wire/src/encoding.rs`): the
//! node reads each supported encoding exactly as PostgreSQL does (checked
//! against a real server over every one- and two-byte sequence), and psql
//! in LATIN9 or EUC_JP gets byte for byte what it gets directly, through
//! one shard and two, with text keys on the shard that owns them.

#![allow(clippy::unwrap_used)]

use hotrepart_proxy::wire::encoding::{ClientEncoding, SUPPORTED};
use hotrepart_router::catalog::KeyValue;
use hotrepart_tests::{pg_tool, Cluster, Opts};
use std::time::Duration;

/// The byte sequences whose reading is compared: every byte from 0x80
/// for a single-byte encoding; for a multi-byte one every lead byte
/// 0x81–0xFE with every second byte 0x40–0xFE, and EUC_JP's three-byte
/// (0x8F) characters. (GB18030, BIG5, EUC_CN and KOI8U failed this
/// comparison with `encoding_rs`'s tables: the node does not read them.)
fn sequences(name: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0x80..=0xffu8).map(|b| vec![b]).collect();
    let multi = matches!(name, "EUC_JP" | "SJIS" | "EUC_KR" | "UHC" | "GBK");
    if !multi {
        return v;
    }
    for a in 0x81..=0xfeu8 {
        for b in 0x40..=0xfeu8 {
            v.push(vec![a, b]);
        }
    }
    if name == "EUC_JP" {
        for a in 0xa1..=0xfeu8 {
            for b in 0xa1..=0xfeu8 {
                v.push(vec![0x8f, a, b]);
            }
        }
    }
    v
}

/// Each supported encoding reads every sequence as PostgreSQL's
/// `convert_from` does, or refuses it: never another character. (Bytes
/// the node reads and PostgreSQL refuses are fine: the statement goes to
/// PostgreSQL as sent, which refuses it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_reads_every_supported_encoding_as_postgresql_does() {
    let c = Cluster::start(Opts::default()).await;
    let db = c.direct(0).await;
    db.batch_execute(
        "CREATE FUNCTION pg_temp.conv(seqs bytea[], enc text) RETURNS SETOF text \
         LANGUAGE plpgsql AS $$ DECLARE b bytea; BEGIN \
         FOREACH b IN ARRAY seqs LOOP \
           BEGIN RETURN NEXT convert_from(b, enc); \
           EXCEPTION WHEN others THEN RETURN NEXT NULL; END; \
         END LOOP; END $$",
    )
    .await
    .unwrap();
    let mut wrong = Vec::new();
    let mut report = Vec::new();
    for &name in SUPPORTED {
        let enc = ClientEncoding::for_name(name);
        assert!(
            !matches!(enc, ClientEncoding::Unsupported(_)),
            "{name} is listed as supported"
        );
        let seqs = sequences(name);
        let theirs: Vec<Option<String>> = db
            .query("SELECT pg_temp.conv($1, $2)", &[&seqs, &name])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(theirs.len(), seqs.len(), "{name}");
        let (mut same, mut refused_by_node, mut refused_by_pg) = (0, 0, 0);
        for (s, pg) in seqs.iter().zip(&theirs) {
            let ours = enc.decode(s).ok().map(|t| t.into_owned());
            match (&ours, pg) {
                (Some(a), Some(b)) if a == b => same += 1,
                (Some(a), Some(b)) => wrong.push(format!(
                    "{name} {s:02x?}: node reads {a:?}, PostgreSQL {b:?}"
                )),
                (None, Some(_)) => refused_by_node += 1,
                (Some(_), None) => refused_by_pg += 1,
                (None, None) => {}
            }
        }
        report.push(format!(
            "{name}: {same} read alike, {refused_by_node} refused by the node only, {refused_by_pg} by PostgreSQL only"
        ));
        assert!(same > 60, "{name}: only {same} sequences read alike");
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        wrong.is_empty(),
        "{} sequences read otherwise than PostgreSQL reads them:\n{}",
        wrong.len(),
        {
            // Up to five of each encoding, and how many in all.
            let mut m = std::collections::BTreeMap::<&str, Vec<&String>>::new();
            for w in &wrong {
                m.entry(w.split(' ').next().unwrap_or(""))
                    .or_default()
                    .push(w);
            }
            m.iter()
                .map(|(e, v)| {
                    let some: Vec<&str> = v.iter().take(5).map(|s| s.as_str()).collect();
                    format!("{e}: {} sequences, e.g.\n{}", v.len(), some.join("\n"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    );
}

/// psql's output (raw bytes) and exit status for `script` (in the client
/// encoding `enc`).
async fn psql(dsn: &str, enc: &str, script: &[u8], dir: &std::path::Path) -> (bool, Vec<u8>) {
    let file = dir.join(format!("script-{enc}.sql"));
    std::fs::write(&file, script).unwrap();
    let mut cmd = tokio::process::Command::new(pg_tool("psql"));
    cmd.args(["-X", "-w", "-A", "-v", "ON_ERROR_STOP=0", "-f"])
        .arg(&file)
        .arg(dsn)
        .env("PGCLIENTENCODING", enc)
        .env("PGSSLMODE", "disable")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("psql timed out")
        .expect("psql runs");
    let mut all = out.stdout;
    all.extend_from_slice(b"\n--- stderr ---\n");
    // psql names the script's file and line in its errors.
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&file.display().to_string(), "F");
    all.extend_from_slice(stderr.as_bytes());
    (out.status.success(), all)
}

fn opts(shards: usize) -> Opts {
    Opts {
        shards,
        tail: "[[sharded_tables]]\nname = \"enc_t\"\nkey = \"k\"\ntype = \"text\"\n".into(),
        ..Opts::default()
    }
}

/// The script of each encoding: a sharded table with non-ASCII text keys
/// written and read by key, a count over every shard, an error naming a
/// non-ASCII relation, and bytes that are not text in the encoding (22021,
/// and the session goes on).
fn script(enc: &str) -> (Vec<u8>, Vec<&'static str>) {
    match enc {
        "LATIN9" => (
            b"SET client_min_messages = warning;\n\
              DROP TABLE IF EXISTS enc_t;\n\
              CREATE TABLE enc_t (k text PRIMARY KEY, v text);\n\
              INSERT INTO enc_t VALUES ('caf\xe9', 'cr\xe8me \xa4'), ('na\xefve', '\xbduvre'), ('plain', 'x');\n\
              SELECT k, v FROM enc_t WHERE k = 'caf\xe9';\n\
              SELECT v FROM enc_t WHERE k = 'na\xefve';\n\
              UPDATE enc_t SET v = v || ' \xe0 la carte' WHERE k = 'caf\xe9';\n\
              SELECT k, v, length(v) FROM enc_t WHERE k = 'caf\xe9';\n\
              SELECT count(*) FROM enc_t;\n\
              SELECT * FROM \"tabl\xe9_absente\";\n\
              SELECT 'apr\xe8s l''erreur';\n"
                .to_vec(),
            vec!["caf\u{e9}", "na\u{ef}ve", "plain"],
        ),
        "EUC_JP" => (
            b"SET client_min_messages = warning;\n\
              DROP TABLE IF EXISTS enc_t;\n\
              CREATE TABLE enc_t (k text PRIMARY KEY, v text);\n\
              INSERT INTO enc_t VALUES ('\xa4\xa2\xa4\xa4', '\xc6\xfc\xcb\xdc'), ('\xb4\xc1\xbb\xfa', '\xa5\xab\xa5\xbf\xa5\xab\xa5\xca'), ('plain', 'x');\n\
              SELECT k, v FROM enc_t WHERE k = '\xa4\xa2\xa4\xa4';\n\
              SELECT v, length(v) FROM enc_t WHERE k = '\xb4\xc1\xbb\xfa';\n\
              SELECT count(*) FROM enc_t;\n\
              SELECT * FROM \"\xa4\xca\xa4\xa4\";\n\
              SELECT 'broken \xa4\x41';\n\
              SELECT '\xa4\xa2 after the error';\n"
                .to_vec(),
            vec!["\u{3042}\u{3044}", "\u{6f22}\u{5b57}", "plain"],
        ),
        other => panic!("no script for {other}"),
    }
}

async fn same_as_postgresql(enc: &str, shards: usize) {
    let c = Cluster::start(opts(shards)).await;
    let (script, keys) = script(enc);
    let direct = psql(&c.shards[0].dsn(), enc, &script, &c.dir.0).await;
    let through = psql(&c.dsn(), enc, &script, &c.dir.0).await;
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if enc == "EUC_JP" {
        assert!(
            show(&direct.1).contains("invalid byte sequence for encoding \"EUC_JP\": 0xa4 0x41"),
            "the script's bad bytes make PostgreSQL's error: {}",
            show(&direct.1)
        );
    }
    assert_eq!(
        show(&through.1),
        show(&direct.1),
        "{enc} through {shards} shard(s): psql's output differs from PostgreSQL's"
    );
    assert_eq!(through.1, direct.1, "{enc}: the same bytes");
    assert_eq!(through.0, direct.0);
    // Each text key is on the shard that owns it (hashed as the server
    // stores it, UTF-8), and only there.
    let snap = c.node.routing.catalog.load();
    let mut found = Vec::new();
    for i in 0..c.shards.len() {
        let rows = c
            .direct(i)
            .await
            .query("SELECT k FROM enc_t", &[])
            .await
            .unwrap();
        for r in rows {
            let k: String = r.get(0);
            let owner = snap
                .range_for_key("enc_t", &KeyValue::Text(k.clone()))
                .unwrap()
                .write_owner
                .as_str()
                .to_owned();
            assert_eq!(owner, format!("s{i}"), "key {k:?} is on s{i}");
            found.push(k);
        }
    }
    found.sort();
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "every key once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_in_latin9_through_one_shard_as_on_postgresql() {
    same_as_postgresql("LATIN9", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_in_latin9_through_two_shards_as_on_postgresql() {
    same_as_postgresql("LATIN9", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_in_euc_jp_through_two_shards_as_on_postgresql() {
    same_as_postgresql("EUC_JP", 2).await;
}

/// What the node cannot do in another encoding is refused in words, not
/// answered wrongly: text ordered across shards in LATIN9 (bytes do not
/// order as the characters), and text beyond ASCII in an encoding the
/// node cannot read (EUC_TW) — ASCII statements still run in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_node_cannot_read_or_order_is_refused() {
    let c = Cluster::start(opts(2)).await;
    let script = b"SET client_min_messages = warning;\n\
              DROP TABLE IF EXISTS enc_t;\n\
        CREATE TABLE enc_t (k text PRIMARY KEY, v text);\n\
        INSERT INTO enc_t VALUES ('\xa4', 'a'), ('\xe9', 'b'), ('z', 'c');\n\
        SELECT k FROM enc_t ORDER BY k;\n\
        SELECT count(*) FROM enc_t;\n\
        BEGIN;\n\
        DECLARE cur CURSOR FOR SELECT k FROM enc_t ORDER BY k;\n\
        ROLLBACK;\n";
    let (_, out) = psql(&c.dsn(), "LATIN9", script, &c.dir.0).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.contains(
            "ordering text across shards needs client_encoding UTF8 or LATIN1 (it is LATIN9)"
        ),
        "{out}"
    );
    assert!(out.contains("count\n3\n"), "{out}");
    // A merged cursor orders as a merged SELECT does: refused the same.
    assert_eq!(
        out.matches("ordering text across shards needs client_encoding UTF8 or LATIN1")
            .count(),
        2,
        "{out}"
    );
    let tw = b"SELECT 'plain ascii' AS a;\nSELECT '\xa4\xa1' AS b;\nSELECT 1 AS c;\n";
    let (_, out) = psql(&c.dsn(), "EUC_TW", tw, &c.dir.0).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("a\nplain ascii\n"), "{out}");
    assert!(
        out.contains("client_encoding EUC_TW is not supported by hotrepart for text beyond ASCII"),
        "{out}"
    );
    assert!(out.contains("c\n1\n"), "the session goes on: {out}");
}
