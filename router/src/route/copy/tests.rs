//! Unit tests of COPY option parsing and row splitting. Every input is also
//! fed one byte at a time: the pieces must not depend on how the client
//! cut its CopyData messages.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::catalog::{KeyType, RoutingSnapshot, ShardId};
use crate::route::{route, Hints, Target};

#[path = "../../../tests/common/mod.rs"]
mod common;

fn snapshot() -> RoutingSnapshot {
    common::snapshot(
        4,
        &[
            ("users", "id", KeyType::Int8),
            ("events", "tenant", KeyType::Text),
            ("devices", "uuid", KeyType::Uuid),
        ],
        &["countries"],
    )
}

fn plan(sql: &str) -> Result<CopyPlan, RouteError> {
    let r = route(&snapshot(), sql, &[], &Hints::default())?;
    assert_eq!(r.target, Target::All, "{sql}");
    Ok((*r.copy.expect("a copy plan")).clone())
}

/// (header?, row bytes, key as text or "-") for each piece.
type Out = Vec<(bool, Vec<u8>, String)>;

fn run(sql: &str, cols: &[&str], chunks: &[&[u8]]) -> Result<Out, RouteError> {
    let p = plan(sql)?;
    let cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
    let mut s = p.splitter(&cols, 1 << 20)?;
    let mut out: Out = Vec::new();
    let mut emit = |piece: Piece<'_>| -> Result<(), RouteError> {
        match piece {
            Piece::Header(h) => out.push((true, h.to_vec(), String::new())),
            Piece::Row { data, key } => out.push((
                false,
                data.to_vec(),
                key.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
            )),
        }
        Ok(())
    };
    for c in chunks {
        s.feed(c, &mut emit)?;
    }
    s.finish(&mut emit)?;
    Ok(out)
}

/// Runs `data` whole, then byte by byte, and checks both agree.
fn split(sql: &str, cols: &[&str], data: &[u8]) -> Result<Out, RouteError> {
    let whole = run(sql, cols, &[data]);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    let bytewise = run(sql, cols, &bytes);
    assert_eq!(
        whole,
        bytewise,
        "{sql}: {:?}",
        String::from_utf8_lossy(data)
    );
    whole
}

fn keys(out: &Out) -> Vec<&str> {
    out.iter()
        .filter(|(h, _, _)| !h)
        .map(|(_, _, k)| k.as_str())
        .collect()
}

fn rows(out: &Out) -> Vec<String> {
    out.iter()
        .map(|(h, d, _)| {
            format!(
                "{}{}",
                if *h { "H:" } else { "" },
                String::from_utf8_lossy(d)
            )
        })
        .collect()
}

fn err(r: Result<Out, RouteError>) -> RouteError {
    match r {
        Ok(o) => panic!("expected an error, got {o:?}"),
        Err(e) => e,
    }
}

#[test]
fn options_are_read_and_validated() {
    let p = plan("COPY users FROM STDIN").unwrap();
    assert_eq!(
        (p.format, p.delimiter, p.null.as_slice()),
        (CopyFormat::Text, b'\t', &b"\\N"[..])
    );
    assert!(p.columns.is_empty());
    let p = plan("COPY users (name, ID) FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'x', FORCE_NULL (id))").unwrap();
    assert_eq!(p.format, CopyFormat::Csv);
    assert_eq!(p.columns, ["name", "id"]);
    assert_eq!(
        (p.delimiter, p.quote, p.escape, p.header),
        (b';', b'\'', b'\\', true)
    );
    assert_eq!(p.null, b"x");
    assert_eq!(p.force_null, ["id"]);
    let p = plan("COPY users FROM STDIN WITH CSV HEADER QUOTE AS '|'").unwrap();
    assert_eq!(
        (p.format, p.header, p.quote, p.escape),
        (CopyFormat::Csv, true, b'|', b'|')
    );
    let p = plan("COPY users FROM STDIN BINARY").unwrap();
    assert_eq!(p.format, CopyFormat::Binary);
    let p = plan("COPY users TO STDOUT (FORMAT binary)").unwrap();
    assert_eq!(
        (p.format, p.direction),
        (CopyFormat::Binary, CopyDirection::To)
    );
    let p = plan("COPY countries FROM STDIN").unwrap();
    assert_eq!(p.placement, CopyTable::Reference);
    let code = |sql: &str| match route(&snapshot(), sql, &[], &Hints::default()) {
        Err(e) => e.sqlstate,
        Ok(r) => panic!("{sql}: routed {r:?}"),
    };
    assert_eq!(code("COPY users (name) FROM STDIN"), "23502");
    assert_eq!(code("COPY users FROM STDIN (FORMAT xml)"), "22023");
    assert_eq!(
        code("COPY users FROM STDIN (FORMAT binary, HEADER)"),
        "0A000"
    );
    assert_eq!(code("COPY users FROM STDIN (QUOTE '|')"), "0A000");
    assert_eq!(code("COPY users FROM STDIN (DELIMITER 'a')"), "22023");
    assert_eq!(
        code("COPY users FROM STDIN (FORMAT csv, DELIMITER '\"')"),
        "22023"
    );
    assert_eq!(
        code("COPY users FROM STDIN (FORMAT csv, NULL 'a,b')"),
        "22023"
    );
    assert_eq!(
        code("COPY users FROM STDIN (DELIMITER ',', DELIMITER ';')"),
        "42601"
    );
    assert_eq!(code("COPY users FROM STDIN (FORCE_NULL (id))"), "0A000");
    assert_eq!(
        code("COPY users TO STDOUT (FORMAT csv, FORCE_NULL (id))"),
        "0A000"
    );
    assert_eq!(code("COPY users FROM STDIN; SELECT 1"), "0A000");
    assert_eq!(
        code("COPY users FROM STDIN /* hotrepart: shard=s1 */"),
        "0A000"
    );
    // a shard hint narrows a COPY TO to one shard, which runs it whole
    let r = route(
        &snapshot(),
        "COPY users TO STDOUT /* hotrepart: shard=s1 */",
        &[],
        &Hints::default(),
    )
    .unwrap();
    assert_eq!(r.target, Target::One(ShardId::new("s1").unwrap()));
    assert!(r.copy.is_none());
    // tables on one shard keep going there whole
    let r = route(
        &snapshot(),
        "COPY settings FROM STDIN",
        &[],
        &Hints::default(),
    )
    .unwrap();
    assert!(r.copy.is_none());
    let r = route(
        &snapshot(),
        "COPY countries TO STDOUT",
        &[],
        &Hints::default(),
    )
    .unwrap();
    assert!(r.copy.is_none());
}

#[test]
fn text_rows_keys_and_escapes() {
    let sql = "COPY users FROM STDIN";
    let out = split(
        sql,
        &["id", "name"],
        b"1\tone\n2\ttwo\\tand\\\ttab\n-3\t\\N\n",
    )
    .unwrap();
    assert_eq!(keys(&out), ["1", "2", "-3"]);
    assert_eq!(
        rows(&out),
        ["1\tone\n", "2\ttwo\\tand\\\ttab\n", "-3\t\\N\n"]
    );
    // key in the second column; octal/hex escapes and surrounding spaces
    let out = split(sql, &["name", "id"], b"a\t\\061\\x32\nb\t 7 \nc\\\nd\t8").unwrap();
    assert_eq!(keys(&out), ["12", "7", "8"]);
    assert_eq!(
        rows(&out)[2],
        "c\\\nd\t8",
        "an escaped newline is data; the last line needs no terminator"
    );
    // CRLF lines stay CRLF
    let out = split(sql, &["id"], b"1\r\n2\r\n").unwrap();
    assert_eq!(rows(&out), ["1\r\n", "2\r\n"]);
    // end-of-data marker: nothing after it counts
    let out = split(sql, &["id"], b"1\n\\.\n2\n").unwrap();
    assert_eq!(keys(&out), ["1"]);
    // header line
    let out = split("COPY users FROM STDIN (HEADER)", &["id"], b"id\n5\n").unwrap();
    assert_eq!(rows(&out), ["H:id\n", "5\n"]);
    assert_eq!(keys(&out), ["5"]);
    // a text key keeps its escapes decoded; a delimiter other than tab
    let out = split(
        "COPY events FROM STDIN (DELIMITER '|')",
        &["tenant", "x"],
        b"ac\\|me|1\n\\\\b|2\n",
    )
    .unwrap();
    assert_eq!(keys(&out), ["ac|me", "\\b"]);
}

#[test]
fn text_bad_rows() {
    let sql = "COPY users FROM STDIN";
    let e = err(split(sql, &["id", "name"], b"1\tx\n\\N\ty\n"));
    assert_eq!(e.sqlstate, "23502", "{e:?}");
    assert!(e.message.contains("line 2"), "{}", e.message);
    let e = err(split(sql, &["id", "name"], b"abc\tx\n"));
    assert_eq!(e.sqlstate, "22P02", "{e:?}");
    assert!(
        e.message.contains("invalid input syntax for type bigint"),
        "{}",
        e.message
    );
    let e = err(split(sql, &["id", "name"], b"99999999999999999999\tx\n"));
    assert_eq!(e.sqlstate, "22003");
    let e = err(split(sql, &["id", "name"], b"1\n"));
    assert_eq!(e.sqlstate, "22P04");
    assert!(
        e.message.contains("missing data for column \"name\""),
        "{}",
        e.message
    );
    let e = err(split(sql, &["id", "name"], b"1\ta\tb\n"));
    assert_eq!(e.sqlstate, "22P04");
    let e = err(split(sql, &["id"], b"1\n2\r\n"));
    assert_eq!(e.sqlstate, "22P04", "mixed newline styles");
    let e = err(split(sql, &["id"], b"1\n\\.x\n"));
    assert_eq!(e.sqlstate, "22P04", "corrupt end marker");
}

#[test]
fn csv_quotes_newlines_and_nulls() {
    let sql = "COPY users FROM STDIN (FORMAT csv)";
    let data = b"1,\"multi\nline, with comma\"\n\"2\",\"say \"\"hi\"\"\"\n3,\n";
    let out = split(sql, &["id", "name"], data).unwrap();
    assert_eq!(keys(&out), ["1", "2", "3"]);
    assert_eq!(rows(&out)[0], "1,\"multi\nline, with comma\"\n");
    // header (quoted, with a newline) is not a row
    let out = split(
        "COPY users FROM STDIN WITH (FORMAT csv, HEADER true)",
        &["id", "name"],
        b"\"i\nd\",name\r\n4,x\r\n",
    )
    .unwrap();
    assert_eq!(rows(&out), ["H:\"i\nd\",name\r\n", "4,x\r\n"]);
    // NULL: an unquoted empty field; a quoted one is an empty string
    let e = err(split(sql, &["name", "id"], b"x,\n"));
    assert_eq!(e.sqlstate, "23502");
    let out = split(
        "COPY events FROM STDIN (FORMAT csv)",
        &["tenant"],
        b"\"\"\n",
    )
    .unwrap();
    assert_eq!(keys(&out), [""]);
    let e = err(split(
        "COPY events FROM STDIN (FORMAT csv, FORCE_NULL (tenant))",
        &["tenant"],
        b"\"\"\n",
    ));
    assert_eq!(e.sqlstate, "23502");
    let out = split(
        "COPY events FROM STDIN (FORMAT csv, FORCE_NOT_NULL (tenant))",
        &["tenant", "n"],
        b",1\n",
    )
    .unwrap();
    assert_eq!(keys(&out), [""]);
    // other escape, quote and delimiter
    let out = split(
        "COPY events FROM STDIN (FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\')",
        &["n", "tenant"],
        b"1;'it\\'s;x'\n",
    )
    .unwrap();
    assert_eq!(keys(&out), ["it's;x"]);
    // \. alone on a line ends the data; inside a line it is data
    let out = split(
        "COPY events FROM STDIN (FORMAT csv)",
        &["tenant"],
        b"\\.x\n\\.\nignored\n",
    )
    .unwrap();
    assert_eq!(keys(&out), ["\\.x"]);
    let e = err(split(sql, &["id", "name"], b"1,\"open\n"));
    assert_eq!(e.sqlstate, "22P04");
    assert!(
        e.message.contains("unterminated CSV quoted field"),
        "{}",
        e.message
    );
}

fn binary_copy(rows: &[Vec<Option<Vec<u8>>>], trailer: bool) -> Vec<u8> {
    let mut b = b"PGCOPY\n\xff\r\n\0".to_vec();
    b.extend_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    for r in rows {
        b.extend_from_slice(&(r.len() as i16).to_be_bytes());
        for f in r {
            match f {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
    }
    if trailer {
        b.extend_from_slice(&(-1i16).to_be_bytes());
    }
    b
}

#[test]
fn binary_tuples() {
    let sql = "COPY users FROM STDIN (FORMAT binary)";
    let data = binary_copy(
        &[
            vec![Some(1i64.to_be_bytes().to_vec()), Some(b"one".to_vec())],
            vec![Some(7i32.to_be_bytes().to_vec()), None],
        ],
        true,
    );
    let out = split(sql, &["id", "name"], &data).unwrap();
    assert_eq!(out.len(), 3);
    assert!(
        out[0].0 && out[0].1.len() == 19,
        "the file header comes first"
    );
    assert_eq!(keys(&out), ["1", "7"]);
    assert_eq!(out[1].1, &data[19..19 + 2 + 4 + 8 + 4 + 3]);
    // no trailer is fine, as in PostgreSQL
    let data = binary_copy(&[vec![Some(5i64.to_be_bytes().to_vec()), None]], false);
    assert_eq!(keys(&split(sql, &["id", "name"], &data).unwrap()), ["5"]);
    // uuid and text keys
    let u = [
        0xa0u8, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];
    let data = binary_copy(&[vec![Some(u.to_vec())]], true);
    let out = split("COPY devices FROM STDIN (FORMAT binary)", &["uuid"], &data).unwrap();
    assert_eq!(keys(&out), ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]);
    let data = binary_copy(&[vec![Some(b"acme".to_vec())]], true);
    assert_eq!(
        keys(&split("COPY events FROM STDIN (FORMAT binary)", &["tenant"], &data).unwrap()),
        ["acme"]
    );
    // bad input
    let null_key = binary_copy(&[vec![None, Some(b"x".to_vec())]], true);
    assert_eq!(
        err(split(sql, &["id", "name"], &null_key)).sqlstate,
        "23502"
    );
    let short = binary_copy(&[vec![Some(1i64.to_be_bytes().to_vec())]], true);
    assert_eq!(err(split(sql, &["id", "name"], &short)).sqlstate, "22P04");
    let mut after = binary_copy(&[], true);
    after.push(0);
    assert_eq!(err(split(sql, &["id", "name"], &after)).sqlstate, "22P04");
    let truncated = &binary_copy(&[vec![Some(1i64.to_be_bytes().to_vec()), None]], false)[..25];
    assert_eq!(
        err(split(sql, &["id", "name"], truncated)).sqlstate,
        "22P04"
    );
    assert_eq!(
        err(split(sql, &["id", "name"], b"not a copy file")).sqlstate,
        "22P04"
    );
    assert_eq!(err(split(sql, &["id", "name"], b"")).sqlstate, "22P04");
    let bad_width = binary_copy(&[vec![Some(vec![1, 2, 3]), None]], true);
    assert_eq!(
        err(split(sql, &["id", "name"], &bad_width)).sqlstate,
        "22P04"
    );
}

#[test]
fn rows_go_to_their_owner_and_long_rows_are_refused() {
    let snap = snapshot();
    let p = plan("COPY users FROM STDIN").unwrap();
    // owners read once off hashint8extended with seed 0 (see tests/cases.txt)
    for (k, s) in [(1i64, "s3"), (2, "s0"), (8, "s1"), (3, "s2")] {
        assert_eq!(p.owner(&snap, &KeyValue::Int8(k)).unwrap().as_str(), s);
    }
    let mut sp = p.splitter(&["id".to_string()], 16).unwrap();
    let mut emit = |_: Piece<'_>| -> Result<(), RouteError> { Ok(()) };
    sp.feed(b"1\n2\n", &mut emit).unwrap();
    let e = sp.feed(&[b'1'; 40], &mut emit).unwrap_err();
    assert_eq!(e.sqlstate, "54000");
    let e = p.splitter(&["name".to_string()], 16).unwrap_err();
    assert_eq!(e.sqlstate, "23502");
    // a reference table's rows carry no key
    let p = plan("COPY countries FROM STDIN").unwrap();
    let mut sp = p.splitter(&["code".to_string()], 1 << 10).unwrap();
    let mut n = 0;
    let mut emit = |piece: Piece<'_>| -> Result<(), RouteError> {
        assert!(matches!(piece, Piece::Row { key: None, .. }));
        n += 1;
        Ok(())
    };
    sp.feed(b"fr\nde\n", &mut emit).unwrap();
    sp.finish(&mut emit).unwrap();
    assert_eq!(n, 2);
}
