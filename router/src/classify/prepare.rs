//! SQL-level `PREPARE` and `EXECUTE`, read by the lexer so that the node
//! can run them as the protocol's Parse and Bind/Execute of the same named
//! statement (PostgreSQL keeps both in one namespace per session).
//!
//! Guarantees: a string is read as one of these only when it is exactly
//! one such statement (an optional `;` at the end); names follow
//! PostgreSQL's rules (unquoted: lower case; quoted: verbatim); an
//! `EXECUTE` argument is [`Arg::Value`] only when it is a constant whose
//! text PostgreSQL would hand to the parameter type's input function
//! unchanged (a string literal, a number, `NULL`, `TRUE`/`FALSE`), so
//! sending it as a text parameter gives the same value.

use super::{unquote, Kind, Lexer, StrKind, Tok};

/// `PREPARE name [ ( type [, …] ) ] AS statement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlPrepare<'a> {
    /// The statement's name as PostgreSQL reads it.
    pub name: String,
    /// The parameter types as written (empty: PostgreSQL infers them).
    pub types: Vec<&'a str>,
    /// The statement prepared (to the end of the string, without the
    /// final `;`).
    pub body: &'a str,
}

/// `EXECUTE name [ ( argument [, …] ) ]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlExecute<'a> {
    /// The statement's name as PostgreSQL reads it.
    pub name: String,
    /// The arguments, in order.
    pub args: Vec<Arg<'a>>,
}

/// An `EXECUTE` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg<'a> {
    /// `NULL`.
    Null,
    /// A constant, as the text its parameter receives.
    Value(String),
    /// Any other expression, as written.
    Expr(&'a str),
}

/// The tokens of `sql` up to an optional final `;`; None when a `;` has
/// something after it (several statements).
fn tokens(sql: &str) -> Option<Vec<Tok>> {
    let mut lx = Lexer::new(sql);
    let mut toks = Vec::new();
    while let Some(t) = lx.next() {
        if t.kind == Kind::Semi {
            return lx.next().is_none().then_some(toks);
        }
        toks.push(t);
    }
    Some(toks)
}

fn is_word(sql: &str, t: &Tok, w: &str) -> bool {
    t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(w)
}

/// A statement name token, as PostgreSQL reads it.
fn name(sql: &str, t: &Tok) -> Option<String> {
    match t.kind {
        Kind::Word => Some(sql[t.start..t.end].to_ascii_lowercase()),
        Kind::Quoted => Some(unquote(sql, *t)),
        _ => None,
    }
}

/// Splits the tokens between `(` at `open` and its matching `)` at the
/// top-level commas: each part's first and last token. Returns the parts
/// and the index after the `)`.
fn list(toks: &[Tok], open: usize) -> Option<(Vec<(usize, usize)>, usize)> {
    let mut depth = 0usize;
    let mut parts = Vec::new();
    let mut start = open + 1;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t.kind {
            Kind::Punct(b'(' | b'[') => depth += 1,
            Kind::Punct(b')' | b']') => {
                depth -= 1;
                if depth == 0 {
                    if i == start {
                        // `()` or a trailing comma: not PostgreSQL's syntax.
                        return None;
                    }
                    parts.push((start, i - 1));
                    return Some((parts, i + 1));
                }
            }
            Kind::Punct(b',') if depth == 1 => {
                if i == start {
                    return None;
                }
                parts.push((start, i - 1));
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// A client's own two-phase commit statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoPhase {
    /// Which of the three.
    pub op: TwoPhaseOp,
    /// The transaction identifier; None when it is not written as a plain
    /// string literal (`'…'`), which the node cannot read exactly.
    pub gid: Option<String>,
}

/// The three statements of a client's two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwoPhaseOp {
    /// `PREPARE TRANSACTION 'gid'`
    Prepare,
    /// `COMMIT PREPARED 'gid'`
    Commit,
    /// `ROLLBACK PREPARED 'gid'`
    Rollback,
}

impl TwoPhaseOp {
    /// The statement's name as PostgreSQL writes it in messages.
    pub fn name(self) -> &'static str {
        match self {
            TwoPhaseOp::Prepare => "PREPARE TRANSACTION",
            TwoPhaseOp::Commit => "COMMIT PREPARED",
            TwoPhaseOp::Rollback => "ROLLBACK PREPARED",
        }
    }
}

/// Reads `sql` as one `PREPARE TRANSACTION`, `COMMIT PREPARED` or
/// `ROLLBACK PREPARED` (alone in the string, a final `;` allowed).
pub fn two_phase(sql: &str) -> Option<TwoPhase> {
    // The common statement costs one token.
    let t = Lexer::new(sql).next()?;
    let w = &sql[t.start..t.end];
    if t.kind != Kind::Word
        || !["prepare", "commit", "rollback"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
    {
        return None;
    }
    let toks = tokens(sql)?;
    let op = match (toks.first()?, toks.get(1)?) {
        (a, b) if is_word(sql, a, "prepare") && is_word(sql, b, "transaction") => {
            TwoPhaseOp::Prepare
        }
        (a, b) if is_word(sql, a, "commit") && is_word(sql, b, "prepared") => TwoPhaseOp::Commit,
        (a, b) if is_word(sql, a, "rollback") && is_word(sql, b, "prepared") => {
            TwoPhaseOp::Rollback
        }
        _ => return None,
    };
    let gid = match toks.get(2..)? {
        [t] if t.kind == Kind::Str(StrKind::Plain) => Some(sql[t.cs..t.ce].replace("''", "'")),
        _ => None,
    };
    Some(TwoPhase { op, gid })
}

/// Reads `sql` as one SQL `PREPARE` (not `PREPARE TRANSACTION`).
pub fn sql_prepare(sql: &str) -> Option<SqlPrepare<'_>> {
    // The common statement costs one token, not a list of all of them (a
    // huge IN list would take memory in proportion).
    if !super::first_keyword_is(sql, "prepare") {
        return None;
    }
    let toks = tokens(sql)?;
    if !is_word(sql, toks.first()?, "prepare") || is_word(sql, toks.get(1)?, "transaction") {
        return None;
    }
    let name = name(sql, toks.get(1)?)?;
    let mut i = 2;
    let mut types = Vec::new();
    if toks.get(i)?.kind == Kind::Punct(b'(') {
        let (parts, next) = list(&toks, i)?;
        types = parts
            .iter()
            .map(|&(a, b)| &sql[toks[a].start..toks[b].end])
            .collect();
        i = next;
    }
    if !is_word(sql, toks.get(i)?, "as") {
        return None;
    }
    let first = toks.get(i + 1)?;
    let last = toks.last()?;
    Some(SqlPrepare {
        name,
        types,
        body: &sql[first.start..last.end],
    })
}

/// Reads `sql` as one SQL `EXECUTE`.
pub fn sql_execute(sql: &str) -> Option<SqlExecute<'_>> {
    if !super::first_keyword_is(sql, "execute") {
        return None;
    }
    let toks = tokens(sql)?;
    if !is_word(sql, toks.first()?, "execute") {
        return None;
    }
    let name = name(sql, toks.get(1)?)?;
    let mut args = Vec::new();
    match toks.get(2) {
        None => {}
        Some(t) if t.kind == Kind::Punct(b'(') => {
            let (parts, next) = list(&toks, 2)?;
            if next != toks.len() {
                return None;
            }
            for (a, b) in parts {
                args.push(arg(sql, &toks[a..=b]));
            }
        }
        Some(_) => return None,
    }
    Some(SqlExecute { name, args })
}

/// The highest `$n` in `sql` (0 when none): with the declared types, how
/// many parameters PostgreSQL gives a statement prepared from it.
pub fn highest_parameter(sql: &str) -> usize {
    let mut lx = Lexer::new(sql);
    let mut n = 0;
    while let Some(t) = lx.next() {
        if t.kind == Kind::Other && sql.as_bytes()[t.start] == b'$' {
            n = n.max(sql[t.start + 1..t.end].parse().unwrap_or(0));
        }
    }
    n
}

fn arg<'a>(sql: &'a str, toks: &[Tok]) -> Arg<'a> {
    let text = || &sql[toks[0].start..toks[toks.len() - 1].end];
    let number = |t: &Tok| t.kind == Kind::Other && sql.as_bytes()[t.start].is_ascii_digit();
    match toks {
        [t] if t.kind == Kind::Str(StrKind::Plain) && !sql[t.start..].starts_with(['n', 'N']) => {
            Arg::Value(sql[t.cs..t.ce].replace("''", "'"))
        }
        [t] if number(t) => Arg::Value(sql[t.start..t.end].to_owned()),
        [m, t] if m.kind == Kind::Punct(b'-') && number(t) => {
            Arg::Value(format!("-{}", &sql[t.start..t.end]))
        }
        [t] if is_word(sql, t, "null") => Arg::Null,
        [t] if is_word(sql, t, "true") || is_word(sql, t, "false") => {
            Arg::Value(sql[t.start..t.end].to_ascii_lowercase())
        }
        _ => Arg::Expr(text()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn two_phase_statements_and_their_identifiers() {
        use super::{two_phase, TwoPhase, TwoPhaseOp::*};
        let tp = |op, gid: Option<&str>| {
            Some(TwoPhase {
                op,
                gid: gid.map(String::from),
            })
        };
        let cases = [
            ("PREPARE TRANSACTION 'a1'", tp(Prepare, Some("a1"))),
            ("prepare transaction 'it''s';", tp(Prepare, Some("it's"))),
            ("  COMMIT PREPARED 'x' ; ", tp(Commit, Some("x"))),
            (
                "/* c */ ROLLBACK PREPARED 'hr_1'",
                tp(Rollback, Some("hr_1")),
            ),
            ("COMMIT PREPARED E'a\\b'", tp(Commit, None)),
            ("COMMIT PREPARED $$x$$", tp(Commit, None)),
            ("PREPARE TRANSACTION", tp(Prepare, None)),
            ("COMMIT PREPARED 'x' 'y'", tp(Commit, None)),
            ("COMMIT", None),
            ("ROLLBACK", None),
            ("ROLLBACK TO SAVEPOINT s", None),
            ("PREPARE q AS SELECT 1", None),
            ("COMMIT PREPARED 'x'; SELECT 1", None),
            ("SELECT 'COMMIT PREPARED'", None),
        ];
        for (sql, want) in cases {
            assert_eq!(two_phase(sql), want, "{sql}");
        }
    }

    use super::*;

    #[test]
    fn prepare_statements_are_read() {
        let p =
            sql_prepare("PREPARE Q1 (int, varchar(10), \"MyType\"[]) AS SELECT $1, $2;").unwrap();
        assert_eq!(p.name, "q1");
        assert_eq!(p.types, ["int", "varchar(10)", "\"MyType\"[]"]);
        assert_eq!(p.body, "SELECT $1, $2");
        let p = sql_prepare("prepare \"Q\" as insert into t values ($1)").unwrap();
        assert_eq!((p.name.as_str(), p.types.len()), ("Q", 0));
        assert_eq!(p.body, "insert into t values ($1)");
        for not in [
            "PREPARE TRANSACTION 'x'",
            "PREPARE q AS SELECT 1; SELECT 2",
            "PREPARE q SELECT 1",
            "PREPARE q () AS SELECT 1",
            "SELECT 1",
            "PREPARE",
        ] {
            assert_eq!(sql_prepare(not), None, "{not}");
        }
    }

    #[test]
    fn execute_statements_and_their_constants_are_read() {
        let e =
            sql_execute("EXECUTE q (1, -2.5, 'it''s', NULL, true, now(), 1 + 1, E'x')").unwrap();
        assert_eq!(e.name, "q");
        assert_eq!(
            e.args,
            [
                Arg::Value("1".into()),
                Arg::Value("-2.5".into()),
                Arg::Value("it's".into()),
                Arg::Null,
                Arg::Value("true".into()),
                Arg::Expr("now()"),
                Arg::Expr("1 + 1"),
                Arg::Expr("E'x'"),
            ]
        );
        let e = sql_execute("execute \"Q\";").unwrap();
        assert_eq!((e.name.as_str(), e.args.len()), ("Q", 0));
        assert_eq!(highest_parameter("SELECT $2, '$9', $1 -- $7"), 2);
        assert_eq!(highest_parameter("SELECT 1"), 0);
        for not in [
            "EXECUTE q (1); SELECT 1",
            "EXECUTE q 1",
            "EXECUTE q (1) x",
            "EXECUTE",
        ] {
            assert_eq!(sql_execute(not), None, "{not}");
        }
    }
}
