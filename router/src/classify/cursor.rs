//! SQL cursors read by the lexer: `DECLARE`, `FETCH`, `MOVE`, `CLOSE`, so
//! that the node can send a cursor's statements to the shard that holds it
//! (or serve a cursor merged over several shards itself).
//!
//! Guarantees: a string is read as a cursor statement only when it is
//! exactly one such statement (an optional `;` at the end) in PostgreSQL's
//! syntax as far as the node needs it; names follow PostgreSQL's rules
//! (unquoted: lower case; quoted: verbatim). A fetch direction the node
//! does not serve itself is kept as written ([`Direction::Other`]).

use super::{unquote, Kind, Lexer, Tok};

/// One cursor statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorCommand<'a> {
    /// `DECLARE name … CURSOR … FOR query`.
    Declare(Declare<'a>),
    /// `FETCH` (or `MOVE`, `is_move`) `[direction] [FROM|IN] name`.
    Fetch {
        /// The cursor's name as PostgreSQL reads it.
        name: String,
        /// Which rows.
        direction: Direction,
        /// `MOVE`: the rows are skipped, not returned.
        is_move: bool,
    },
    /// `CLOSE name`; None: `CLOSE ALL`.
    Close(Option<String>),
}

/// `DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR
/// [{WITH|WITHOUT} HOLD] FOR query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declare<'a> {
    /// The cursor's name as PostgreSQL reads it.
    pub name: String,
    /// `WITH HOLD`: the cursor outlives its transaction.
    pub hold: bool,
    /// `SCROLL` (not `NO SCROLL`): it may be read backwards.
    pub scroll: bool,
    /// `BINARY`: its rows come in binary format.
    pub binary: bool,
    /// The query, as written (to the end of the string, without the final
    /// `;`); its `$n` parameters are the statement's.
    pub query: &'a str,
}

/// Which rows a `FETCH`/`MOVE` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// The next `n` rows forward (`NEXT`, `n`, `FORWARD [n]`, no
    /// direction); None: all the rest (`ALL`, `FORWARD ALL`).
    Forward(Option<u64>),
    /// Anything else (`PRIOR`, `FIRST`, `LAST`, `ABSOLUTE`, `RELATIVE`,
    /// `BACKWARD …`, `0`, a negative count), as written.
    Other(String),
}

/// Reads `sql` as one cursor statement; None for anything else (several
/// statements, other syntax).
pub fn cursor_command(sql: &str) -> Option<CursorCommand<'_>> {
    let mut lx = Lexer::new(sql);
    let first = lx.next().filter(|t| t.kind == Kind::Word)?;
    let kw = &sql[first.start..first.end];
    let which = ["declare", "fetch", "move", "close"]
        .into_iter()
        .find(|w| kw.eq_ignore_ascii_case(w))?;
    let mut toks = vec![first];
    while let Some(t) = lx.next() {
        if t.kind == Kind::Semi {
            if lx.next().is_some() {
                return None;
            }
            break;
        }
        toks.push(t);
    }
    match which {
        "declare" => declare(sql, &toks[1..]).map(CursorCommand::Declare),
        "close" => match &toks[1..] {
            [t] if is_word(sql, t, "all") => Some(CursorCommand::Close(None)),
            [t] => name(sql, t).map(|n| CursorCommand::Close(Some(n))),
            _ => None,
        },
        _ => fetch(sql, &toks[1..], which == "move"),
    }
}

fn is_word(sql: &str, t: &Tok, w: &str) -> bool {
    t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(w)
}

/// A cursor name token, as PostgreSQL reads it.
fn name(sql: &str, t: &Tok) -> Option<String> {
    match t.kind {
        Kind::Word => Some(sql[t.start..t.end].to_ascii_lowercase()),
        Kind::Quoted if t.ce > t.cs => Some(unquote(sql, *t)),
        _ => None,
    }
}

fn declare<'a>(sql: &'a str, toks: &[Tok]) -> Option<Declare<'a>> {
    let (first, rest) = toks.split_first()?;
    let name = name(sql, first)?;
    let (mut hold, mut scroll, mut binary) = (false, false, false);
    let mut i = 0;
    // Options before CURSOR, in any order.
    loop {
        let t = rest.get(i)?;
        if is_word(sql, t, "cursor") {
            i += 1;
            break;
        }
        if is_word(sql, t, "binary") {
            binary = true;
        } else if is_word(sql, t, "scroll") {
            scroll = true;
        } else if is_word(sql, t, "no")
            && rest.get(i + 1).is_some_and(|n| is_word(sql, n, "scroll"))
        {
            scroll = false;
            i += 1;
        } else if !is_word(sql, t, "insensitive") && !is_word(sql, t, "asensitive") {
            return None;
        }
        i += 1;
    }
    let t = rest.get(i)?;
    if is_word(sql, t, "with") || is_word(sql, t, "without") {
        if !rest.get(i + 1).is_some_and(|h| is_word(sql, h, "hold")) {
            return None;
        }
        hold = is_word(sql, t, "with");
        i += 2;
    }
    if !rest.get(i).is_some_and(|f| is_word(sql, f, "for")) {
        return None;
    }
    let (q0, q1) = (rest.get(i + 1)?, rest.last()?);
    Some(Declare {
        name,
        hold,
        scroll,
        binary,
        query: &sql[q0.start..q1.end],
    })
}

fn fetch(sql: &str, toks: &[Tok], is_move: bool) -> Option<CursorCommand<'static>> {
    let (last, mut dir) = toks.split_last()?;
    let name = name(sql, last)?;
    if let Some((l, d)) = dir.split_last() {
        if is_word(sql, l, "from") || is_word(sql, l, "in") {
            dir = d;
        }
    }
    let count = |t: &Tok| -> Option<u64> {
        (t.kind == Kind::Other)
            .then(|| sql[t.start..t.end].parse::<u64>().ok())
            .flatten()
            .filter(|&n| n > 0)
    };
    let direction = match dir {
        [] => Some(Direction::Forward(Some(1))),
        [a] if is_word(sql, a, "next") || is_word(sql, a, "forward") => {
            Some(Direction::Forward(Some(1)))
        }
        [a] if is_word(sql, a, "all") => Some(Direction::Forward(None)),
        [a] => count(a).map(|n| Direction::Forward(Some(n))),
        [a, b] if is_word(sql, a, "forward") && is_word(sql, b, "all") => {
            Some(Direction::Forward(None))
        }
        [a, b] if is_word(sql, a, "forward") => count(b).map(|n| Direction::Forward(Some(n))),
        _ => None,
    };
    let direction = match (direction, dir) {
        (Some(d), _) => d,
        (None, [a, .., z]) => Direction::Other(sql[a.start..z.end].to_owned()),
        (None, [a]) => Direction::Other(sql[a.start..a.end].to_owned()),
        (None, []) => return None,
    };
    Some(CursorCommand::Fetch {
        name,
        direction,
        is_move,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(name: &str, n: Option<u64>, is_move: bool) -> Option<CursorCommand<'static>> {
        Some(CursorCommand::Fetch {
            name: name.into(),
            direction: Direction::Forward(n),
            is_move,
        })
    }

    #[test]
    fn cursor_statements_are_read_as_postgresql_reads_them() {
        let d = |name: &str, hold, scroll, binary, query| {
            Some(CursorCommand::Declare(Declare {
                name: String::from(name),
                hold,
                scroll,
                binary,
                query,
            }))
        };
        assert_eq!(
            cursor_command("DECLARE C CURSOR FOR SELECT 1;"),
            d("c", false, false, false, "SELECT 1")
        );
        assert_eq!(
            cursor_command(
                "declare \"My\"\"C\" binary no scroll cursor with hold for select * from t where a = $1"
            ),
            d("My\"C", true, false, true, "select * from t where a = $1")
        );
        assert_eq!(
            cursor_command("DECLARE _psql_cursor NO SCROLL CURSOR FOR\nSELECT 1"),
            d("_psql_cursor", false, false, false, "SELECT 1")
        );
        assert_eq!(
            cursor_command("DECLARE c SCROLL CURSOR WITHOUT HOLD FOR VALUES (1)"),
            d("c", false, true, false, "VALUES (1)")
        );
        assert_eq!(cursor_command("DECLARE c CURSOR WITH FOR SELECT 1"), None);
        assert_eq!(cursor_command("DECLARE c CURSOR FOR"), None);
        assert_eq!(
            cursor_command("DECLARE c CURSOR FOR SELECT 1; SELECT 2"),
            None
        );
        assert_eq!(cursor_command("FETCH c"), fwd("c", Some(1), false));
        assert_eq!(
            cursor_command("fetch next from C"),
            fwd("c", Some(1), false)
        );
        assert_eq!(
            cursor_command("FETCH FORWARD 3 FROM \"drv_cur\""),
            fwd("drv_cur", Some(3), false)
        );
        assert_eq!(cursor_command("FETCH ALL IN c"), fwd("c", None, false));
        assert_eq!(cursor_command("FETCH FORWARD ALL c"), fwd("c", None, false));
        assert_eq!(cursor_command("MOVE 5 FROM c"), fwd("c", Some(5), true));
        assert_eq!(cursor_command("FETCH 10 c;"), fwd("c", Some(10), false));
        for (sql, dir) in [
            ("FETCH BACKWARD 2 FROM c", "BACKWARD 2"),
            ("FETCH PRIOR FROM c", "PRIOR"),
            ("FETCH ABSOLUTE -1 c", "ABSOLUTE -1"),
            ("MOVE LAST IN c", "LAST"),
            ("FETCH 0 FROM c", "0"),
            ("FETCH -3 FROM c", "-3"),
        ] {
            match cursor_command(sql) {
                Some(CursorCommand::Fetch {
                    name,
                    direction: Direction::Other(d),
                    ..
                }) => assert_eq!((name.as_str(), d.as_str()), ("c", dir), "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert_eq!(
            cursor_command("CLOSE \"A\""),
            Some(CursorCommand::Close(Some("A".into())))
        );
        assert_eq!(
            cursor_command("close all;"),
            Some(CursorCommand::Close(None))
        );
        assert_eq!(cursor_command("CLOSE"), None);
        assert_eq!(cursor_command("SELECT 1"), None);
        assert_eq!(cursor_command("/* declare */ SELECT 1"), None);
    }
}
