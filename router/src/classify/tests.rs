use super::*;

fn names(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn plain_statements_change_nothing() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "SELECT 1",
        "BEGIN",
        "select * from t offset 3",
        "UPDATE t SET a = 1",
        "INSERT INTO t VALUES (1, 2)",
        "",
        "   ",
        "-- only a comment",
        "SELECT reset_val FROM pg_settings",
        "SELECT discarded, deallocated_at, settings FROM t",
        "SELECT x AS set FROM t",
    ] {
        let c = classify(sql);
        assert_eq!(c, Class::default(), "{sql:?}");
    }
}

#[test]
fn statements_that_change_state() {
    for sql in [
        "SET search_path = x",
        "  reset all",
        "select set_config('a','b',false)",
        "select pg_catalog.set_config('a','b',false)",
        "SELECT \"set_config\"('a', 'b', false)",
        "BEGIN; SET LOCAL x = 1",
        "DISCARD ALL",
        "/* tag */ SET search_path = x",
        "/* nested /* comment */ still */ SET work_mem = 1",
        "-- comment\nSET work_mem = '1MB'",
        "deallocate p",
        "SELECT 1;set work_mem=1",
        // Text another statement may run: scanned as text.
        "DO $$BEGIN SET work_mem = '1MB'; END$$",
        "DO $f$BEGIN PERFORM set_config('a.b', 'x', false); END$f$",
        "DO 'BEGIN RESET ALL; END'",
        "DO E'BEGIN\\nSET work_mem = 1; END'",
        "SELECT query_to_xml('select 1; discard plans', true, true, '')",
    ] {
        assert!(classify(sql).changes_state, "{sql:?}");
    }
}

#[test]
fn keywords_in_comments_strings_and_names_are_not_keywords() {
    for sql in [
        "SELECT 1 /* SET x = 1 */",
        "SELECT 1 -- ; SET x = 1",
        "SELECT \"set\" FROM t",
        "SELECT 1 /* discard all; deallocate all */",
        "SELECT 1 -- set_config('a', 'b', false)",
        "SELECT \"discard\", \"reset\" FROM t",
        "SELECT 'offset', 'settings', 'asset' FROM t",
    ] {
        let c = classify(sql);
        assert!(!c.changes_state && !c.drops_prepared, "{sql:?}");
    }
    for sql in [
        "INSERT INTO t VALUES ('returning')",
        "INSERT INTO t VALUES (1) /* returning */",
        "INSERT INTO t VALUES (1) -- RETURNING id",
        "INSERT INTO t (\"returning\") VALUES (1)",
        "INSERT INTO t VALUES ($$ returning $$)",
        "INSERT INTO t VALUES (E'\\' returning')",
    ] {
        assert!(!classify(sql).returning, "{sql:?}");
    }
    for sql in [
        "INSERT INTO t VALUES (1) RETURNING id",
        "update t set a = 1 returning *",
        "WITH x AS (DELETE FROM t RETURNING k) SELECT * FROM x",
        "INSERT INTO t VALUES ('a''b') RETURNING id",
        "INSERT INTO t VALUES (E'it\\'s') RETURNING id",
    ] {
        assert!(classify(sql).returning, "{sql:?}");
    }
}

#[test]
fn prepared_statements_dropped() {
    for sql in [
        "DISCARD ALL",
        "discard plans",
        "DEALLOCATE p",
        "SELECT 1; DEALLOCATE ALL",
        "DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$",
    ] {
        let c = classify(sql);
        assert!(c.drops_prepared && c.changes_state, "{sql:?}");
    }
    for sql in [
        "SET x.y = 1",
        "SELECT deallocate FROM t",
        "SELECT 1 -- discard",
    ] {
        assert!(!classify(sql).drops_prepared, "{sql:?}");
    }
}

#[test]
fn finds_custom_settings() {
    for (sql, want) in [
        ("SET app.tenant = 'x'", names(&["app.tenant"])),
        ("set local App.User to 3", names(&["app.user"])),
        ("SET SESSION app.x TO 1", names(&["app.x"])),
        ("SET \"App\".\"Quoted\" = 1", names(&["app.quoted"])),
        ("SET \"app.dotted\" = 1", names(&["app.dotted"])),
        ("SET app . spaced = 1", names(&["app.spaced"])),
        ("SET app.tenant='x'", names(&["app.tenant"])),
        ("select set_config('a.b', '1', false), 1", names(&["a.b"])),
        (
            "SET a.b = 1; SELECT set_config('C.D', '1', false)",
            names(&["a.b", "c.d"]),
        ),
        ("SET work_mem = '1MB'", names(&[])),
        ("SET LOCAL work_mem = '1MB'", names(&[])),
        ("SELECT 1 /* SET a.b = 1 */", names(&[])),
        ("select set_config($1, $2, false)", None),
        ("select set_config(E'a.b', '1', false)", None),
        ("select set_config('a.' || 'b', '1', false)", None),
        ("select set_config(name, '1', false) from t", None),
        // Inside a string: the call's name cannot be read.
        (
            "DO $$BEGIN PERFORM set_config('a.b', '1', false); END$$",
            None,
        ),
    ] {
        assert_eq!(classify(sql).custom_settings, want, "{sql:?}");
    }
}

#[test]
fn routing_settings() {
    for sql in [
        "SET search_path = a, b",
        "SET LOCAL \"search_path\" TO a",
        "SET standard_conforming_strings = off",
        "SET SCHEMA 'a'",
        "RESET ALL",
        "reset search_path",
        "DISCARD ALL",
        "SELECT set_config('search_path', 'a', false)",
        "DO $$BEGIN SET search_path = a; END$$",
    ] {
        let c = classify(sql);
        assert!(c.changes_routing_settings && c.changes_state, "{sql:?}");
    }
    for sql in [
        "SET work_mem = '1MB'",
        "SELECT current_setting('search_path')",
        "SHOW search_path",
        "SET work_mem = 1 /* search_path */",
        "SELECT 'reset'",
    ] {
        assert!(!classify(sql).changes_routing_settings, "{sql:?}");
    }
}

#[test]
fn snapshot_isolation() {
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "set session characteristics as transaction isolation level repeatable read",
        "SET default_transaction_isolation = 'serializable'",
        "SELECT set_config('transaction_isolation', 'repeatable read', true)",
    ] {
        assert!(classify(sql).snapshot_isolation, "{sql:?}");
    }
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SELECT 'isolation serializable'",
        "SET work_mem = 1 /* isolation level serializable */",
    ] {
        assert!(!classify(sql).snapshot_isolation, "{sql:?}");
    }
}

#[test]
fn listen() {
    for sql in [
        "LISTEN ch",
        "  listen \"Ch\"",
        "/* c */ LISTEN ch",
        "SELECT 1; LISTEN ch",
    ] {
        assert!(classify(sql).listen, "{sql:?}");
    }
    for sql in [
        "NOTIFY ch",
        "UNLISTEN *",
        "SELECT 'listen'",
        "SELECT listen FROM t",
        "-- LISTEN ch\nSELECT 1",
        "listening",
    ] {
        assert!(!classify(sql).listen, "{sql:?}");
    }
}

#[test]
fn deallocate_targets() {
    let d = |sql| classify(sql).deallocate;
    assert_eq!(d("DEALLOCATE p1"), Some(Deallocate::Name("p1".into())));
    assert_eq!(
        d("deallocate MyStmt;"),
        Some(Deallocate::Name("mystmt".into()))
    );
    assert_eq!(
        d("DEALLOCATE PREPARE \"My\"\"Stmt\""),
        Some(Deallocate::Name("My\"Stmt".into()))
    );
    assert_eq!(
        d("DEALLOCATE \"ALL\""),
        Some(Deallocate::Name("ALL".into()))
    );
    assert_eq!(d("DEALLOCATE ALL"), Some(Deallocate::All));
    assert_eq!(d("  Deallocate Prepare all ; "), Some(Deallocate::All));
    assert_eq!(d("DISCARD ALL"), Some(Deallocate::All));
    assert_eq!(d("/* x */ discard all -- bye"), Some(Deallocate::All));
    for sql in [
        "DISCARD PLANS",
        "DISCARD ALL; SELECT 1",
        "DEALLOCATE p; SELECT 1",
        "SELECT 1; DEALLOCATE p",
        "DEALLOCATE",
        "DEALLOCATE a b",
        "DEALLOCATE 'p'",
        "SELECT 'DEALLOCATE p'",
    ] {
        assert_eq!(d(sql), None, "{sql:?}");
    }
}

#[test]
fn splits_explain() {
    let e = |sql| classify(sql).explain;
    let x = e("EXPLAIN SELECT 1").expect("explain");
    assert_eq!(
        (x.prefix, x.inner, x.analyze, x.text),
        ("EXPLAIN", "SELECT 1", false, true)
    );
    let x = e("  /* c */ explain analyze verbose select * from t;").expect("explain");
    assert_eq!(
        (x.prefix, x.inner, x.analyze),
        ("explain analyze verbose", "select * from t", true)
    );
    let x = e("EXPLAIN (ANALYZE false, FORMAT JSON) SELECT 1").expect("explain");
    assert_eq!((x.inner, x.analyze, x.text), ("SELECT 1", false, false));
    let x = e("EXPLAIN (ANALYZE, FORMAT 'text') SELECT 1").expect("explain");
    assert_eq!((x.analyze, x.text), (true, true));
    let x = e("EXPLAIN (costs off) SELECT 1").expect("explain");
    assert_eq!(
        (x.prefix, x.inner, x.text),
        ("EXPLAIN (costs off)", "SELECT 1", true)
    );
    let x = e("EXPLAIN /* a) */ (FORMAT \"yaml\") -- )\n SELECT ')'").expect("explain");
    assert_eq!((x.inner, x.text), ("SELECT ')'", false));
    let x = e("EXPLAIN\tSELECT 1").expect("explain");
    assert_eq!(x.inner, "SELECT 1");
    assert_eq!(e("EXPLAINX SELECT 1"), None);
    assert_eq!(e("SELECT 1"), None);
    assert_eq!(e("SELECT 1; EXPLAIN SELECT 1"), None);
    assert_eq!(e("SELECT 'EXPLAIN SELECT 1'"), None);
    assert_eq!(e("EXPLAIN (FORMAT JSON SELECT 1"), None);
}

/// Multi-byte characters anywhere never panic (byte 7 of "SELECT\u{a0}1"
/// is inside the no-break space).
#[test]
fn multibyte_text_does_not_panic() {
    assert_eq!(classify("SELECT\u{a0}1").explain, None);
    assert_eq!(classify("EXPLAIN\u{a0}SELECT 1").explain, None);
    for s in [
        "EXPLAIN (é) SELECT 1",
        "EXPLAIN ANALYZé SELECT 1",
        "EXPLAIN /* é */ SELECT 1",
        "explain -- é\nSELECT 1",
        "EXPLAINé",
        "EXPLAIN (FORMAT 'é",
        "SET é.ü = 'ö'; DEALLOCATE \"é",
        "select set_config('é.x', $é$é$é$, false)",
        "DO $$é set é$$; E'é\\",
        "U&'é' U&\"é\" B'é' X'é' N'é' /* é /* é */",
    ] {
        for end in 0..=s.len() {
            if let Some(prefix) = s.get(..end) {
                let _ = classify(prefix);
            }
        }
    }
}

#[test]
fn lexer_tokens() {
    let kinds = |sql| {
        let mut lx = Lexer::new(sql);
        let mut v = Vec::new();
        while let Some(t) = lx.next() {
            v.push((t.kind, &sql[t.cs..t.ce]));
        }
        v
    };
    assert_eq!(
        kinds("a$b $1 $$x$$ $t$ $$ $t$ e'\\'' 'it''s' \"q\"\"\" ;"),
        vec![
            (Kind::Word, "a$b"),
            (Kind::Other, "$1"),
            (Kind::Str(StrKind::Other), "x"),
            (Kind::Str(StrKind::Other), " $$ "),
            (Kind::Str(StrKind::Other), "\\'"),
            (Kind::Str(StrKind::Plain), "it''s"),
            (Kind::Quoted, "q\"\""),
            (Kind::Semi, ";"),
        ]
    );
    assert_eq!(
        kinds("x.y 1.5e3 .5 U&'a' ue'x'"),
        vec![
            (Kind::Word, "x"),
            (Kind::Punct(b'.'), "."),
            (Kind::Word, "y"),
            (Kind::Other, "1.5e3"),
            (Kind::Other, ".5"),
            (Kind::Str(StrKind::Other), "a"),
            (Kind::Word, "ue"),
            (Kind::Str(StrKind::Plain), "x"),
        ]
    );
}

/// The scanners this module replaced (proxy `backend::state`), kept here
/// for the timing comparison below.
mod old {
    pub fn may_change_state(sql: &str) -> bool {
        let b = sql.as_bytes();
        let starts = |p: &[u8]| {
            let s = sql.trim_start().as_bytes();
            s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
        };
        if starts(b"set") || starts(b"reset") || starts(b"discard") || starts(b"deallocate") {
            return true;
        }
        for i in 0..b.len() {
            let rest = &b[i..];
            let hit = match b[i] | 0x20 {
                b's' => {
                    ci_prefix(rest, b"set_config")
                        || (ci_prefix(rest, b"set") && starts_statement(b, i))
                }
                b'd' => ci_prefix(rest, b"discard") || ci_prefix(rest, b"deallocate"),
                b'r' => {
                    ci_prefix(rest, b"reset")
                        && rest.get(5).is_some_and(|c| c.is_ascii_whitespace())
                }
                _ => false,
            };
            if hit {
                return true;
            }
        }
        false
    }

    fn starts_statement(b: &[u8], i: usize) -> bool {
        let before = &b[..i];
        match before.iter().rposition(|c| !c.is_ascii_whitespace()) {
            None => true,
            Some(p) if b[p] == b';' || b[p] == b'/' => true,
            Some(p) => {
                let line_start = before[..=p]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |n| n + 1);
                let line = &before[line_start..=p];
                let has_newline_after = before[p..].contains(&b'\n');
                has_newline_after && line.windows(2).any(|w| w == b"--")
            }
        }
    }

    fn ci_prefix(s: &[u8], p: &[u8]) -> bool {
        s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
    }

    fn contains_ci(hay: &str, needle: &str) -> bool {
        let n = needle.as_bytes();
        n.is_empty()
            || hay
                .as_bytes()
                .windows(n.len())
                .any(|w| w.eq_ignore_ascii_case(n))
    }

    pub fn may_drop_prepared(sql: &str) -> bool {
        contains_ci(sql, "discard") || contains_ci(sql, "deallocate")
    }
}

/// Wherever the old scanners saw a state change or a drop outside
/// comments, the classification sees one too (it is never less safe).
#[test]
fn never_less_conservative_than_the_old_scanners() {
    for sql in [
        "SET search_path = x",
        "  reset all",
        "select set_config('a','b',false)",
        "BEGIN; SET LOCAL x = 1",
        "DISCARD ALL",
        "/* tag */ SET search_path = x",
        "-- comment\nSET work_mem = '1MB'",
        "SELECT 'reset me'",
        "SELECT 'a;set x'",
        "INSERT INTO t VALUES ('discard')",
        "SELECT 'x'; SET y = 1",
        "DO $$BEGIN RESET ALL; DEALLOCATE ALL; END$$",
        "SELECT 1;\nset x = 1",
    ] {
        let c = classify(sql);
        assert!(old::may_change_state(sql), "old {sql:?}");
        assert!(c.changes_state, "{sql:?}");
        if old::may_drop_prepared(sql) {
            assert!(c.drops_prepared, "{sql:?}");
        }
    }
}

/// `cargo nextest run -p hotrepart-router --release --run-ignored only
/// classify_timing --no-capture`: the classification against the two old
/// scanners on pgbench's `-S` statement.
#[test]
#[ignore = "timing, run by hand"]
#[allow(clippy::print_stderr)]
fn classify_timing() {
    use std::hint::black_box;
    use std::time::Instant;
    const N: u32 = 1_000_000;
    let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let t = Instant::now();
    let mut n = 0u32;
    for _ in 0..N {
        let s = black_box(sql);
        n += u32::from(old::may_change_state(s)) + u32::from(old::may_drop_prepared(s));
    }
    let old = t.elapsed();
    let t = Instant::now();
    for _ in 0..N {
        let c = classify(black_box(sql));
        n += u32::from(c.changes_state) + u32::from(c.drops_prepared);
    }
    let new = t.elapsed();
    assert_eq!(n, 0);
    eprintln!(
        "{N} calls: old scanners {old:?} ({:.1} ns/call), classify {new:?} ({:.1} ns/call)",
        old.as_nanos() as f64 / f64::from(N),
        new.as_nanos() as f64 / f64::from(N)
    );
}

#[test]
fn first_keyword() {
    assert!(first_keyword_is("  /* c */ listen ch", "listen"));
    assert!(first_keyword_is("LISTEN ch", "listen"));
    assert!(!first_keyword_is("\"listen\"", "listen"));
    assert!(!first_keyword_is("listening", "listen"));
    assert!(!first_keyword_is("", "listen"));
}

#[test]
fn function_bodies_naming_tables() {
    let tables = ["accounts".to_string(), "s.items".to_string()];
    assert_eq!(
        names_table("BEGIN UPDATE Accounts SET x = 1; END", &tables),
        Some("accounts".into())
    );
    // Mentions in comments and strings count (refusing too much is safe).
    assert_eq!(
        names_table("select 1 -- accounts", &tables),
        Some("accounts".into())
    );
    assert_eq!(
        names_table("select 'x' from s.items", &tables),
        Some("s.items".into())
    );
    assert_eq!(
        names_table("select 1 from accounts_2, my_accounts", &tables),
        None
    );
    assert_eq!(names_table("select $accounts", &tables), None);
}

#[test]
fn schema_change() {
    for sql in [
        "CREATE TABLE t (a int)",
        "alter table t add column b text",
        "DROP TYPE e",
        "SELECT 1; DROP TABLE t",
        "/* c */ create index on t (a)",
        "DO $$BEGIN EXECUTE 'ALTER TABLE t ADD c int'; END$$",
        "IMPORT FOREIGN SCHEMA s FROM SERVER x INTO public",
        "SELECT * INTO t2 FROM t",
        "with x as (select 1) select * into t2 from x",
        "EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1",
        "explain (analyze) select * into t2 from t",
        "GRANT USAGE ON SCHEMA s TO PUBLIC",
        "revoke usage on schema s from public",
    ] {
        assert!(classify(sql).schema_change, "{sql:?}");
    }
    for sql in [
        "SELECT 'drop table t'",
        "SELECT created FROM t",
        "-- ALTER TABLE t\nSELECT 1",
        "INSERT INTO t (\"create\") VALUES (1)",
        "UPDATE t SET a = 1",
        "INSERT INTO t SELECT * FROM u",
        "insert /* c */ into t values (1)",
        "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
        "MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN DELETE",
        "SELECT \"into\", \"create\" FROM t",
        "SELECT revoke FROM t",
    ] {
        assert!(!classify(sql).schema_change, "{sql:?}");
    }
}

#[test]
fn temporary_objects() {
    for sql in [
        "CREATE TEMP TABLE t (a int)",
        "create global temporary table t (a int) on commit drop",
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "CREATE TEMPORARY SEQUENCE s",
        "CREATE TEMP TABLE t AS SELECT 1",
        "SELECT 1 AS a INTO TEMP t",
        "select * into temporary table t from u",
        "CREATE TABLE pg_temp.t (a int)",
        "DROP TABLE pg_temp_3.t",
        "SELECT * FROM \"pg_temp\".t",
        "SELECT 1; CREATE TEMP TABLE t (a int)",
        "DO $$BEGIN CREATE TEMP TABLE t (a int); END$$",
        "SELECT to_regclass('pg_temp.t')",
        // Conservative: a column named temp in a CREATE costs a read-back.
        "CREATE TABLE weather (temp int)",
    ] {
        assert!(classify(sql).temporary, "{sql:?}");
    }
    for sql in [
        "SELECT temp FROM weather",
        "INSERT INTO weather (temp) VALUES (20)",
        "UPDATE weather SET temp = 21",
        "SELECT 'temp'",
        "-- CREATE TEMP TABLE t\nSELECT 1",
        "DROP TABLE t",
        "DISCARD TEMP",
    ] {
        assert!(!classify(sql).temporary, "{sql:?}");
    }
}

#[test]
fn collate_clauses() {
    assert_eq!(
        non_c_collate("SELECT a FROM t ORDER BY a COLLATE \"C\""),
        None
    );
    assert_eq!(
        non_c_collate("SELECT a FROM t ORDER BY a collate pg_catalog.\"POSIX\""),
        None
    );
    assert_eq!(
        non_c_collate("SELECT a FROM t ORDER BY a COLLATE \"und-x-icu\", b").as_deref(),
        Some("\"und-x-icu\"")
    );
    assert_eq!(
        non_c_collate("SELECT a FROM t ORDER BY a COLLATE pg_catalog.\"de-x-icu\"").as_deref(),
        Some("pg_catalog.\"de-x-icu\"")
    );
    assert_eq!(non_c_collate("SELECT collated FROM t ORDER BY 1"), None);
    assert_eq!(
        first_collate("SELECT a FROM t ORDER BY a COLLATE \"C\"", true).as_deref(),
        Some("\"C\"")
    );
    assert_eq!(
        first_collate("SELECT collated FROM t ORDER BY 1", true),
        None
    );
    // not a clause: a literal, a comment
    assert_eq!(
        non_c_collate("SELECT 'COLLATE x' FROM t /* collate y */"),
        None
    );
}

#[test]
fn called_function_names() {
    assert_eq!(
        called_names("SELECT my_agg(a), s.other(b), \"Quoted\"(c), count(*) FROM t"),
        vec!["my_agg", "other", "Quoted"]
    );
    // not calls: literals, comments, dollar quotes, words before other tokens
    assert!(called_names("SELECT 'f(x)', $$g(y)$$ /* h(z) */ FROM t WHERE a = 1").is_empty());
}

#[test]
fn snapshot_isolation_words() {
    assert!(asks_snapshot_isolation(
        "BEGIN ISOLATION LEVEL SERIALIZABLE"
    ));
    assert!(asks_snapshot_isolation(
        "start transaction isolation level repeatable read"
    ));
    assert!(!asks_snapshot_isolation("BEGIN /* serializable */"));
    assert!(!asks_snapshot_isolation(
        "BEGIN ISOLATION LEVEL READ COMMITTED"
    ));
}

#[test]
fn listen_commands() {
    use ListenCommand::*;
    assert_eq!(listen_command("LISTEN Ch"), Some(Listen("ch".into())));
    assert_eq!(
        listen_command(" listen \"My \"\"Ch\"\"\" ;"),
        Some(Listen("My \"Ch\"".into()))
    );
    assert_eq!(
        listen_command("/* x */ UNLISTEN ch;"),
        Some(Unlisten(Some("ch".into())))
    );
    assert_eq!(listen_command("unlisten *"), Some(Unlisten(None)));
    for sql in [
        "LISTEN *",
        "LISTEN",
        "LISTEN a; SELECT 1",
        "SELECT 1; LISTEN a",
        "LISTEN a b",
        "NOTIFY a",
        "LISTEN \"\"",
    ] {
        assert_eq!(listen_command(sql), None, "{sql:?}");
    }
}

fn rels() -> Vec<String> {
    vec!["accounts".to_string(), "ref_countries".to_string()]
}

#[test]
fn unparsed_statements_naming_no_declared_table_go_home() {
    for sql in [
        "SELEC 1",
        "select * from home_t where x = 'unterminated",
        "MERGE INTO home_t USING src ON true WHEN MATCHED THEN DELETE",
        "-- accounts\nSELEC 1",
        "/* accounts /* nested */ */ SELEC 1",
        "SELEC 1 FROM accounts_archive",
        "SELEC 1 FROM my_accounts",
        "LOAD 'auto_explain'",
        "VACUUM (weird) home_t",
        "",
        ";;",
    ] {
        assert!(
            matches!(unparsed(sql, &rels()), Unparsed::Home { .. }),
            "{sql:?}: {:?}",
            unparsed(sql, &rels())
        );
    }
    assert_eq!(
        unparsed("SELEC f(1); g (2)", &rels()),
        Unparsed::Home {
            statements: 2,
            calls: vec!["f".to_string(), "g".to_string()]
        }
    );
}

#[test]
fn unparsed_statements_naming_a_declared_table_are_refused() {
    for (sql, table) in [
        (
            "MERGE INTO accounts USING s ON true WHEN MATCHED THEN DELETE",
            "accounts",
        ),
        ("SELEC * FROM public.accounts", "accounts"),
        ("SELEC * FROM \"public\".\"accounts\"", "accounts"),
        ("SELEC * FROM ACCOUNTS", "accounts"),
        ("SELEC * FROM \"Accounts\"", "accounts"),
        (
            "INSERT INTO other.Ref_Countries VALUES (1) WEIRD",
            "ref_countries",
        ),
        // dynamic SQL in a string counts
        (
            "SELEC query_to_xml('select * from accounts', true)",
            "accounts",
        ),
        ("DO $$ BEGIN UPDATE accounts SET a = 1; END $$", "accounts"),
        ("DO $$ BEGIN PERFORM 1 FROM accounts; END $$", "accounts"),
    ] {
        match unparsed(sql, &rels()) {
            Unparsed::Refuse(why) => {
                assert!(why.contains(&format!("\"{table}\"")), "{sql:?}: {why}")
            }
            other => panic!("{sql:?}: {other:?}"),
        }
    }
}

#[test]
fn unparsed_schema_statements_go_everywhere() {
    for sql in [
        "COMMENT ON TABLE accounts IS 'the accounts'",
        "COMMENT ON COLUMN home_t.x IS $c$ -- not a comment $c$",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app",
        "CREATE EVENT TRIGGER t ON ddl_command_start EXECUTE FUNCTION f()",
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO app",
        "SECURITY LABEL ON TABLE accounts IS 'x'",
        "CREATE FUNCTION f() RETURNS TABLE (a int) AS $$ SELECT 1 $$ LANGUAGE sql",
        "CREATE TABLE t (a int GENERATED ALWAYS AS (1) STORED) WEIRD",
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'e') THEN CREATE TYPE e AS ENUM ('a'); END IF; END $$",
        "CREATE TYPE a AS ENUM ('x'); COMMENT ON TYPE a IS 'y'",
        // Sequelize's ENUM: labels that are SQL words are values.
        "DO 'BEGIN CREATE TYPE \"public\".\"enum_audit_action\" AS ENUM(''insert'', ''update'', ''delete'', ''Copy''); EXCEPTION WHEN duplicate_object THEN null; END';",
        "DO $$ BEGIN CREATE TYPE k AS ENUM ('merge', 'truncate'); END $$ -- insert",
        "DO E'BEGIN CREATE TYPE k AS ENUM (\\'insert\\'); END'",
    ] {
        assert!(
            matches!(unparsed(sql, &rels()), Unparsed::Schema(_)),
            "{sql:?}: {:?}",
            unparsed(sql, &rels())
        );
    }
    assert_eq!(
        unparsed("VACUUM (FREEZE, weird) accounts", &rels()),
        Unparsed::Maintenance(1)
    );
}

#[test]
fn unparsed_statements_the_node_must_read_are_refused() {
    for sql in [
        "BEGIN WEIRD",
        "COMMIT PREPARED 'x'",
        "PREPARE TRANSACTION 'x'",
        "MOVE FORWARD 2 IN c",
        "FETCH weird",
        "CALL p()",
        "EXECUTE q(1)",
        "CREATE TABLE t2 AS SELECT * FROM home_t",
        "CREATE UNLOGGED TABLE IF NOT EXISTS t2 AS TABLE home_t",
        "CREATE MATERIALIZED VIEW mv AS SELECT 1",
        "DO $$ BEGIN CREATE TABLE x (a int); INSERT INTO x VALUES (1); END $$",
        "DO $$ BEGIN CREATE TABLE x (a int); EXECUTE 'insert into x values (1)'; END $$",
        "DO 'BEGIN CREATE TABLE x (a int); EXECUTE ''delete from x''; END'",
        "DO $$ BEGIN CREATE TABLE x (a int); EXECUTE format($q$ UPDATE x SET a = 1 $q$); END $$",
        "DO $$ DECLARE op text := 'INSERT'; BEGIN CREATE TABLE IF NOT EXISTS x(); EXECUTE op || ' INTO users VALUES (1)'; END $$",
        "COMMENT ON TABLE home_t IS 'x'; SELEC 1",
        "VACUUM accounts; VACUUM home_t",
    ] {
        assert!(
            matches!(unparsed(sql, &rels()), Unparsed::Refuse(_)),
            "{sql:?}: {:?}",
            unparsed(sql, &rels())
        );
    }
}

#[test]
fn copy_option_lists_are_read_by_the_lexer() {
    let o =
        copy_options("copy pgbench_accounts from stdin with (freeze on)").expect("an option list");
    assert_eq!(
        o.options,
        vec![(
            "freeze".to_string(),
            Some(CopyOptionValue::Text("on".to_string()))
        )]
    );
    let sql = r#"COPY "T" (a, "B") FROM STDIN (FORMAT csv, DELIMITER E'\t', NULL '', HEADER MATCH, FORCE_NULL (a, "B"), ON_ERROR ignore) WHERE a > 1"#;
    let o = copy_options(sql).expect("an option list");
    assert_eq!(
        &sql[o.span.clone()],
        r#"(FORMAT csv, DELIMITER E'\t', NULL '', HEADER MATCH, FORCE_NULL (a, "B"), ON_ERROR ignore)"#
    );
    let text = |s: &str| Some(CopyOptionValue::Text(s.to_string()));
    assert_eq!(
        o.options,
        vec![
            ("format".to_string(), text("csv")),
            ("delimiter".to_string(), text("\t")),
            ("null".to_string(), text("")),
            ("header".to_string(), text("match")),
            (
                "force_null".to_string(),
                Some(CopyOptionValue::Columns(vec!["a".into(), "B".into()]))
            ),
            ("on_error".to_string(), text("ignore")),
        ]
    );
    // A query's parentheses and a column list are not the options.
    let o = copy_options("COPY (SELECT 1 FROM t) TO STDOUT WITH (FORMAT binary)")
        .expect("an option list");
    assert_eq!(o.options, vec![("format".to_string(), text("binary"))]);
    assert_eq!(copy_options("COPY t (a, b) FROM STDIN"), None);
    assert_eq!(copy_options("COPY t FROM STDIN WITH CSV HEADER"), None);
    assert_eq!(copy_options("SELECT 1"), None);
    // What the lexer does not decode is left to the parser.
    assert_eq!(copy_options(r"COPY t FROM STDIN (DELIMITER E'\x09')"), None);
    assert_eq!(copy_options("COPY t FROM STDIN (FORMAT csv) garbage"), None);
}

#[test]
fn database_statements() {
    let db = |create, name: &str, if_exists| {
        Some(DatabaseStatement {
            create,
            name: name.to_string(),
            if_exists,
        })
    };
    assert_eq!(
        database_statement("CREATE DATABASE Shop"),
        db(true, "shop", false)
    );
    assert_eq!(
        database_statement("create database \"Shop\" TEMPLATE template0;"),
        db(true, "Shop", false)
    );
    assert_eq!(
        database_statement("DROP DATABASE shop"),
        db(false, "shop", false)
    );
    assert_eq!(
        database_statement("/* x */ DROP DATABASE IF EXISTS shop WITH (FORCE)"),
        db(false, "shop", true)
    );
    assert_eq!(
        database_statement("DROP DATABASE if"),
        db(false, "if", false)
    );
    assert_eq!(database_statement("CREATE DATABASE a; SELECT 1"), None);
    assert_eq!(database_statement("CREATE TABLE database (a int)"), None);
    assert_eq!(database_statement("DROP SCHEMA shop"), None);
}

#[test]
fn two_phase_statements_are_noticed_anywhere_in_the_string() {
    for (sql, want) in [
        ("PREPARE TRANSACTION 'a'", true),
        (
            "BEGIN; INSERT INTO t VALUES (1); prepare transaction 'a'",
            true,
        ),
        ("COMMIT PREPARED 'a'", true),
        ("select 1; Rollback Prepared 'a'", true),
        ("COMMIT", false),
        ("ROLLBACK; PREPARE q AS SELECT 1", false),
        ("SELECT 'PREPARE TRANSACTION x'", false),
        ("SELECT prepare, transaction FROM t", false),
    ] {
        assert_eq!(classify(sql).two_phase, want, "{sql}");
    }
}

#[test]
fn inserts_without_a_column_list_are_seen_by_their_first_tokens() {
    use super::insert_without_column_list as f;
    for yes in [
        "INSERT INTO t VALUES (1)",
        "insert into public.t values ($1, $2)",
        "INSERT INTO \"My T\" AS x VALUES (1)",
        "/* c */ INSERT INTO s.\"t\" VALUES (1)",
    ] {
        assert!(f(yes), "{yes}");
    }
    for no in [
        "INSERT INTO t (a, b) VALUES (1, 2)",
        "INSERT INTO t SELECT 1",
        "INSERT INTO t DEFAULT VALUES",
        "SELECT 'INSERT INTO t VALUES (1)'",
        "UPDATE t SET a = 1",
        "INSERT t VALUES (1)",
    ] {
        assert!(!f(no), "{no}");
    }
}

#[test]
fn functions_created_in_a_string_are_found_with_their_text() {
    let sql = "CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT r users) RETURNS RECORD AS $f$ BEGIN INSERT INTO users VALUES (1); END $f$ LANGUAGE plpgsql; \
               SELECT (testfunc.r).id FROM pg_temp.testfunc(); DROP FUNCTION IF EXISTS pg_temp.testfunc()";
    let got = super::created_functions(sql);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "testfunc");
    assert!(got[0].1.contains("INSERT INTO users"), "{got:?}");
    let names: Vec<String> = super::created_functions(
        "create procedure \"Mixed\".\"P\"() language sql as 'select 1'; CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql; CREATE TABLE t (x int); create or replace view v as select 1",
    )
    .into_iter()
    .map(|(n, _)| n)
    .collect();
    assert_eq!(names, ["P", "f"]);
    assert!(super::created_functions("SELECT 'CREATE FUNCTION f()'").is_empty());
}

#[test]
fn set_transaction_is_told_from_other_statements() {
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;",
        "set transaction isolation level repeatable read, read only",
        "SET TRANSACTION READ WRITE",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
    ] {
        assert!(super::set_transaction(sql), "{sql}");
    }
    for sql in [
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET transaction_isolation = 'serializable'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1",
        "SELECT 'SET TRANSACTION READ ONLY'",
    ] {
        assert!(!super::set_transaction(sql), "{sql}");
    }
}

#[test]
fn savepoint_statements_are_read_with_their_names() {
    use super::{savepoint, SavepointOp::*};
    let sp = |sql: &str| savepoint(sql).map(|s| (s.op, s.written, s.name));
    assert_eq!(sp("SAVEPOINT s"), Some((Take, "s".into(), "s".into())));
    assert_eq!(
        sp("savepoint Sp_1;"),
        Some((Take, "Sp_1".into(), "sp_1".into()))
    );
    assert_eq!(
        sp("SAVEPOINT \"a-sp-1\""),
        Some((Take, "\"a-sp-1\"".into(), "a-sp-1".into()))
    );
    assert_eq!(
        sp("RELEASE SAVEPOINT x"),
        Some((Release, "x".into(), "x".into()))
    );
    assert_eq!(sp("RELEASE x"), Some((Release, "x".into(), "x".into())));
    assert_eq!(
        sp("RELEASE savepoint"),
        Some((Release, "savepoint".into(), "savepoint".into()))
    );
    assert_eq!(
        sp("ROLLBACK TO SAVEPOINT x"),
        Some((RollbackTo, "x".into(), "x".into()))
    );
    assert_eq!(
        sp("rollback work to x"),
        Some((RollbackTo, "x".into(), "x".into()))
    );
    assert_eq!(
        sp("ROLLBACK TRANSACTION TO SAVEPOINT \"Q\"\"q\""),
        Some((RollbackTo, "\"Q\"\"q\"".into(), "Q\"q".into()))
    );
    for sql in [
        "ROLLBACK",
        "SAVEPOINT",
        "SAVEPOINT a; SELECT 1",
        "RELEASE a b",
        "ROLLBACK PREPARED 'x'",
        "SELECT 1",
    ] {
        assert_eq!(sp(sql), None, "{sql}");
    }
}

#[test]
fn sequelizes_temporary_insert_function_is_read() {
    let sql = "CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT response \"users\", OUT sequelize_caught_exception text) RETURNS RECORD AS $func_1a$ BEGIN INSERT INTO \"users\" (\"id\",\"username\") VALUES (DEFAULT,'foc') RETURNING * INTO response; EXCEPTION WHEN unique_violation THEN GET STACKED DIAGNOSTICS sequelize_caught_exception = PG_EXCEPTION_DETAIL; END $func_1a$ LANGUAGE plpgsql; SELECT (testfunc.response).\"id\", testfunc.sequelize_caught_exception FROM pg_temp.testfunc(); DROP FUNCTION IF EXISTS pg_temp.testfunc();";
    let t = super::temp_function_insert(sql).expect("read");
    assert_eq!(
        t.insert,
        "INSERT INTO \"users\" (\"id\",\"username\") VALUES (DEFAULT,'foc') RETURNING *"
    );
    assert_eq!(&sql[t.at.clone()], t.insert);
    for other in [
        // Two statements in the body, another call, no EXCEPTION, not temporary.
        sql.replace("RETURNING * INTO response;", "RETURNING * INTO response; DELETE FROM users;"),
        sql.replace("DROP FUNCTION IF EXISTS pg_temp.testfunc();", "DELETE FROM users;"),
        sql.replace("EXCEPTION WHEN unique_violation THEN GET STACKED DIAGNOSTICS sequelize_caught_exception = PG_EXCEPTION_DETAIL; ", ""),
        sql.replace("pg_temp.testfunc(OUT", "public.testfunc(OUT"),
        // Other reads or calls in the SELECT, another handler.
        sql.replace("FROM pg_temp.testfunc();", "FROM pg_temp.testfunc(), users;"),
        sql.replace("SELECT (testfunc.response)", "SELECT (SELECT count(*) FROM users), (testfunc.response)"),
        sql.replace("SELECT (testfunc.response)", "SELECT wipe(), (testfunc.response)"),
        sql.replace("GET STACKED DIAGNOSTICS sequelize_caught_exception = PG_EXCEPTION_DETAIL;", "UPDATE users SET v = 1;"),
        sql.replace("WHEN unique_violation", "WHEN others"),
        sql.replace("RETURNS RECORD AS", "RETURNS RECORD /* pg_temp. */ AS").replace("pg_temp.testfunc(OUT", "testfunc(OUT"),
        "SELECT 1".to_string(),
    ] {
        assert_eq!(super::temp_function_insert(&other), None, "{other}");
    }
}
