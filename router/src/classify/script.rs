//! A simple-Query string of several statements, cut into its statements
//! by the lexer, and what the node must know of each to run them one by
//! one as PostgreSQL would (the implicit transaction block of a
//! multi-statement string, transaction control inside it).
//!
//! Guarantees:
//! - [`split_statements`] cuts only at a `;` outside literals, quoted
//!   names, comments and dollar quotes; it returns `None` (do not cut)
//!   for a `BEGIN ATOMIC … END` body (SQL-standard function bodies hold
//!   `;` that PostgreSQL's grammar, not its lexer, groups);
//! - [`transaction_statement`] reads the first words only: a statement
//!   it calls [`TxStatement::Other`] is none of the transaction-control
//!   statements PostgreSQL treats specially in an implicit block.

use super::{Kind, Lexer};

/// The statements of `sql` in order, each from the end of the previous
/// `;` (leading whitespace removed, comments kept) to its last token, and
/// without the `;`. Statements holding only comments or nothing are left
/// out, as PostgreSQL's parser leaves them out. `None` when the string
/// holds `BEGIN ATOMIC` (not cut: see the module docs).
pub fn split_statements(sql: &str) -> Option<Vec<&str>> {
    let b = sql.as_bytes();
    let mut lx = Lexer::new(sql);
    let mut out = Vec::new();
    let mut from = 0usize;
    let mut last_end: Option<usize> = None;
    let mut prev_begin = false;
    while let Some(t) = lx.next() {
        match t.kind {
            Kind::Semi => {
                if let Some(end) = last_end.take() {
                    out.push(sql[from..end].trim_start());
                }
                from = t.end;
                prev_begin = false;
            }
            _ => {
                let w = &b[t.start..t.end];
                let is_word = t.kind == Kind::Word;
                if is_word && prev_begin && w.eq_ignore_ascii_case(b"atomic") {
                    return None;
                }
                prev_begin = is_word && w.eq_ignore_ascii_case(b"begin");
                last_end = Some(t.end);
            }
        }
    }
    if let Some(end) = last_end {
        out.push(sql[from..end].trim_start());
    }
    Some(out)
}

/// Transaction control among the statements of a string, by its first
/// words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatement {
    /// `BEGIN`, `START TRANSACTION`; `options`: it sets transaction
    /// modes (isolation level, read only, deferrable).
    Begin {
        /// Transaction modes follow the keywords.
        options: bool,
    },
    /// `COMMIT`, `END` (not `COMMIT PREPARED`); `chain`: `AND CHAIN`.
    Commit {
        /// `AND CHAIN` (not `AND NO CHAIN`).
        chain: bool,
    },
    /// `ROLLBACK`, `ABORT` (not `ROLLBACK TO`, `ROLLBACK PREPARED`).
    Rollback {
        /// `AND CHAIN`.
        chain: bool,
    },
    /// `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK TO [SAVEPOINT]`: the
    /// name PostgreSQL gives the statement in its errors.
    Savepoint(&'static str),
    /// `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`.
    TwoPhase,
    /// Anything else.
    Other,
}

/// What transaction control one statement is (see [`TxStatement`]).
pub fn transaction_statement(sql: &str) -> TxStatement {
    let mut lx = Lexer::new(sql);
    let mut words: Vec<String> = Vec::new();
    while let Some(t) = lx.next() {
        if t.kind == Kind::Semi {
            break;
        }
        words.push(if t.kind == Kind::Word {
            sql[t.start..t.end].to_ascii_lowercase()
        } else {
            // A literal, a quoted name or punctuation: not a keyword.
            String::from("\0")
        });
        if words.len() > 8 {
            break;
        }
    }
    let at = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let chain = |from: usize| at(from) == "and" && at(from + 1) == "chain";
    let after_work = |i: usize| {
        if matches!(at(i), "work" | "transaction") {
            i + 1
        } else {
            i
        }
    };
    match at(0) {
        "begin" => TxStatement::Begin {
            options: !at(after_work(1)).is_empty(),
        },
        "start" if at(1) == "transaction" => TxStatement::Begin {
            options: !at(2).is_empty(),
        },
        "commit" if at(1) == "prepared" => TxStatement::TwoPhase,
        "rollback" if at(1) == "prepared" => TxStatement::TwoPhase,
        "prepare" if at(1) == "transaction" => TxStatement::TwoPhase,
        "commit" | "end" => TxStatement::Commit {
            chain: chain(after_work(1)),
        },
        "rollback" if at(after_work(1)) == "to" => TxStatement::Savepoint("ROLLBACK TO SAVEPOINT"),
        "rollback" | "abort" => TxStatement::Rollback {
            chain: chain(after_work(1)),
        },
        "savepoint" => TxStatement::Savepoint("SAVEPOINT"),
        "release" => TxStatement::Savepoint("RELEASE SAVEPOINT"),
        _ => TxStatement::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_at_semicolons_outside_literals_and_comments() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("SELECT 1", Some(&["SELECT 1"])),
            ("SELECT 1;", Some(&["SELECT 1"])),
            (
                "CREATE TABLE t (a int); INSERT INTO t VALUES (1)",
                Some(&["CREATE TABLE t (a int)", "INSERT INTO t VALUES (1)"]),
            ),
            ("SELECT ';'; SELECT 2", Some(&["SELECT ';'", "SELECT 2"])),
            (
                "SELECT 1 /* ; */; -- c;\n SELECT \"a;b\" FROM t",
                Some(&["SELECT 1", "-- c;\n SELECT \"a;b\" FROM t"]),
            ),
            (
                "DO $$BEGIN PERFORM 1; END$$; SELECT 2",
                Some(&["DO $$BEGIN PERFORM 1; END$$", "SELECT 2"]),
            ),
            ("SELECT 1;; ;-- only a comment\n", Some(&["SELECT 1"])),
            ("", Some(&[])),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 2",
                None,
            ),
        ];
        for (sql, want) in cases {
            let got = split_statements(sql);
            assert_eq!(got.as_deref(), *want, "{sql:?}");
        }
    }

    #[test]
    fn transaction_statements_by_their_first_words() {
        use TxStatement::*;
        for (sql, want) in [
            ("BEGIN", Begin { options: false }),
            ("begin work", Begin { options: false }),
            ("BEGIN TRANSACTION", Begin { options: false }),
            (
                "BEGIN ISOLATION LEVEL SERIALIZABLE",
                Begin { options: true },
            ),
            ("START TRANSACTION READ ONLY", Begin { options: true }),
            ("START TRANSACTION", Begin { options: false }),
            ("COMMIT", Commit { chain: false }),
            ("END", Commit { chain: false }),
            ("COMMIT WORK AND CHAIN", Commit { chain: true }),
            ("COMMIT AND NO CHAIN", Commit { chain: false }),
            ("ABORT", Rollback { chain: false }),
            ("ROLLBACK AND CHAIN", Rollback { chain: true }),
            (
                "ROLLBACK TO SAVEPOINT a",
                Savepoint("ROLLBACK TO SAVEPOINT"),
            ),
            (
                "ROLLBACK TRANSACTION TO a",
                Savepoint("ROLLBACK TO SAVEPOINT"),
            ),
            ("SAVEPOINT a", Savepoint("SAVEPOINT")),
            ("RELEASE a", Savepoint("RELEASE SAVEPOINT")),
            ("COMMIT PREPARED 'x'", TwoPhase),
            ("ROLLBACK PREPARED 'x'", TwoPhase),
            ("PREPARE TRANSACTION 'x'", TwoPhase),
            ("PREPARE q AS SELECT 1", Other),
            ("/* begin */ SELECT 1", Other),
            ("", Other),
        ] {
            assert_eq!(transaction_statement(sql), want, "{sql:?}");
        }
    }
}
