//! Schema statements that cannot run inside a transaction on the shards,
//! recognised by the lexer from their first words.
//!
//! The node makes a schema change on several shards atomic by running it
//! inside a transaction on each and committing them together with
//! two-phase commit. Two kinds of statements cannot take part:
//! - those PostgreSQL refuses inside a transaction block (SQLSTATE 25001:
//!   `CREATE INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY`, `REINDEX …
//!   CONCURRENTLY`, `REINDEX DATABASE|SYSTEM`, `VACUUM`,
//!   `CREATE|DROP TABLESPACE`, `ALTER SYSTEM`, `CREATE|DROP DATABASE`,
//!   `ALTER DATABASE … SET TABLESPACE`, `… SUBSCRIPTION`, `ALTER TABLE …
//!   DETACH PARTITION … CONCURRENTLY`);
//! - those that create or name a temporary object (`CREATE TEMP …`,
//!   `SELECT … INTO TEMP …`, `pg_temp.…`): PostgreSQL cannot `PREPARE
//!   TRANSACTION` a transaction that touched one. (The router sends those
//!   to one shard, where the session's temporary objects live: see
//!   `docs/design/session.md`.)
//!
//! The list errs towards "outside": a statement wrongly put here runs as
//! it did before the node made DDL atomic (shard by shard, an error naming
//! where it applied), never fails because of the node.

use super::{Kind, Lexer};

/// Why a string must run outside a transaction block on the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutsideTransaction {
    /// PostgreSQL refuses (one of) its statements inside a transaction
    /// block (25001).
    Refused,
    /// It creates or names a temporary object, which two-phase commit
    /// cannot prepare.
    Temporary,
}

/// Whether some statement of `sql` must run outside a transaction block
/// (see the module docs), and why; None: every statement may run inside
/// one. `Refused` wins over `Temporary`.
pub fn outside_transaction(sql: &str) -> Option<OutsideTransaction> {
    let mut lx = Lexer::new(sql);
    let mut found = None;
    loop {
        // The statement's words (lower case, unquoted words only), and
        // whether it names the temporary schema.
        let mut words: Vec<String> = Vec::new();
        let mut temp_schema = false;
        let mut end = true;
        while let Some(t) = lx.next() {
            match t.kind {
                Kind::Semi => {
                    end = false;
                    break;
                }
                Kind::Word => {
                    let w = sql[t.start..t.end].to_ascii_lowercase();
                    temp_schema |= w == "pg_temp" || w.starts_with("pg_temp_");
                    words.push(w);
                }
                _ => {}
            }
        }
        match statement(&words) {
            Some(OutsideTransaction::Refused) => return Some(OutsideTransaction::Refused),
            Some(OutsideTransaction::Temporary) => found = Some(OutsideTransaction::Temporary),
            None if temp_schema => found = Some(OutsideTransaction::Temporary),
            None => {}
        }
        if end {
            return found;
        }
    }
}

fn statement(w: &[String]) -> Option<OutsideTransaction> {
    let at = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    let has = |x: &str| w.iter().any(|v| v == x);
    let refused = match (at(0), at(1)) {
        ("create", "index") => at(2) == "concurrently",
        ("create", "unique") => at(2) == "index" && at(3) == "concurrently",
        ("drop", "index") => at(2) == "concurrently",
        ("reindex", kind) => has("concurrently") || kind == "database" || kind == "system",
        ("vacuum", _) => true,
        ("create" | "drop", "tablespace" | "database" | "subscription") => true,
        ("alter", "system" | "subscription") => true,
        ("alter", "database") => w.windows(2).any(|p| p[0] == "set" && p[1] == "tablespace"),
        ("alter", "table") => has("detach") && has("concurrently"),
        _ => false,
    };
    if refused {
        return Some(OutsideTransaction::Refused);
    }
    // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} …
    let temp = |x: &str| x == "temp" || x == "temporary";
    let mut i = 1;
    if at(i) == "or" && at(i + 1) == "replace" {
        i += 2;
    }
    if at(i) == "global" || at(i) == "local" {
        i += 1;
    }
    // SELECT … INTO TEMP t (not INSERT INTO temp, a table of that name).
    let into_temp =
        matches!(at(0), "select" | "with") && w.windows(2).any(|p| p[0] == "into" && temp(&p[1]));
    ((at(0) == "create" && temp(at(i))) || into_temp).then_some(OutsideTransaction::Temporary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_refuse_a_transaction_block() {
        use OutsideTransaction::{Refused, Temporary};
        let cases: &[(&str, Option<OutsideTransaction>)] = &[
            ("CREATE INDEX CONCURRENTLY i ON t (a)", Some(Refused)),
            ("create unique index concurrently on t (a)", Some(Refused)),
            ("DROP INDEX CONCURRENTLY IF EXISTS i", Some(Refused)),
            ("REINDEX INDEX CONCURRENTLY i", Some(Refused)),
            ("REINDEX (CONCURRENTLY) TABLE t", Some(Refused)),
            ("REINDEX DATABASE d", Some(Refused)),
            ("VACUUM (ANALYZE) t", Some(Refused)),
            ("CREATE TABLESPACE ts LOCATION '/x'", Some(Refused)),
            ("DROP TABLESPACE ts", Some(Refused)),
            ("ALTER SYSTEM SET work_mem = '8MB'", Some(Refused)),
            ("CREATE DATABASE d", Some(Refused)),
            ("ALTER DATABASE d SET TABLESPACE ts", Some(Refused)),
            (
                "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
                Some(Refused),
            ),
            (
                "CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p",
                Some(Refused),
            ),
            (
                "CREATE TABLE a (x int); CREATE INDEX CONCURRENTLY ON a (x)",
                Some(Refused),
            ),
            ("CREATE TEMP TABLE tmp (a int)", Some(Temporary)),
            ("create global temporary table tmp (a int)", Some(Temporary)),
            ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", Some(Temporary)),
            ("DROP TABLE pg_temp.tmp", Some(Temporary)),
            ("SELECT 1 AS a INTO TEMP tmp", Some(Temporary)),
            ("SELECT * INTO TEMPORARY TABLE tmp FROM t", Some(Temporary)),
            ("INSERT INTO t (temp) VALUES (1)", None),
            ("INSERT INTO temp VALUES (1)", None),
            (
                "CREATE TEMP TABLE a (x int); DROP TABLESPACE ts",
                Some(Refused),
            ),
            // Inside a transaction is fine.
            ("CREATE TABLE t (a int)", None),
            ("CREATE INDEX i ON t (concurrently)", None),
            ("CREATE TABLE t (concurrently int, temp int)", None),
            ("ALTER TABLE t ADD COLUMN b int", None),
            ("ALTER DATABASE d SET work_mem = '8MB'", None),
            ("ALTER TABLESPACE ts RENAME TO ts2", None),
            ("REINDEX TABLE t", None),
            ("DROP INDEX i", None),
            ("CREATE TABLE \"pg_temp\" (a int)", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(outside_transaction(sql), *want, "{sql}");
        }
    }
}
