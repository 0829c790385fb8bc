//! Literal normalisation for the plan cache (as `pg_stat_statements`
//! does): `… WHERE id = 42` and `… WHERE id = 43` become the one shape
//! `… WHERE id = $1` with the values `["42"]` and `["43"]`, so that a
//! statement with literal keys is planned once per shape, not once per key.
//!
//! Only the *route* is taken from the shape: the node still sends the
//! client's own text to the shard. A route of the shape stands for the
//! statement's only when it is one statement to one shard (or to any
//! shard: no table): then the target depends on nothing but the key's
//! value, which a text parameter of unspecified type carries as the
//! literal does ([`usable`]). Anything else (several shards, a merge, a
//! split INSERT) is planned from the text itself, as before.
//!
//! The lexer is deliberately narrow: a text it does not fully understand
//! is not normalised (`None`): comments (they may carry hints), `$`
//! (placeholders, dollar quotes), strings with a prefix (`E'…'`, `B'…'`,
//! `X'…'`, `N'…'`, `U&'…'`) or a backslash, operators of several
//! characters holding `+` or `-` (PostgreSQL's lexer splits those by
//! rules this one does not repeat), and numbers glued to a name (`1e`,
//! `0x1f`).

use super::{Param, Route, Target};

/// A statement's shape and the literals taken out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The text with each literal replaced by `$1`, `$2`, ….
    pub text: String,
    /// The literals, in order, as text parameter values (strings without
    /// their quotes, `''` undoubled; numbers with their sign when folded).
    pub values: Vec<String>,
    /// Per value: a number (a `numeric` parameter: PostgreSQL compares it
    /// with integer columns only), else a string (of unknown type, which
    /// takes the column's type).
    pub numeric: Vec<bool>,
}

impl Normalized {
    /// The values as text Bind parameters of unspecified type.
    pub fn params(&self) -> Vec<Param<'_>> {
        self.values
            .iter()
            .zip(&self.numeric)
            .map(|(v, &n)| {
                if n {
                    Param::numeric_text(v)
                } else {
                    Param::text(v)
                }
            })
            .collect()
    }
}

/// Whether a route planned from a shape may stand for the statement's own
/// (see the module docs).
pub fn usable(route: &Route) -> bool {
    route.statements.len() == 1
        && route.copy.is_none()
        && matches!(route.target, Target::One(_) | Target::Any)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// Start of text, `(`, `,`, `;`, or an operator: a `-` here is a sign.
    SignAllowed,
    /// A name, a literal, `)`, `]`…: a `-` here is binary.
    Operand,
}

const OP_CHARS: &[u8] = b"+-*/<>=~!@#%^&|`?";

/// The shape of `sql` and its literals, or `None` when the text has no
/// literal or holds something the lexer does not normalise.
pub fn normalize_literals(sql: &str) -> Option<Normalized> {
    let b = sql.as_bytes();
    // Allocated at the first literal (most statements without literals
    // cost no allocation).
    let mut text = String::new();
    let mut values: Vec<String> = Vec::new();
    let mut numeric: Vec<bool> = Vec::new();
    let mut prev = Prev::SignAllowed;
    let mut i = 0;
    // Start of the part of `sql` not yet copied into `text`.
    let mut copied = 0;
    let push_param = |text: &mut String, values: &mut Vec<String>, v: String| {
        if text.capacity() == 0 {
            text.reserve(sql.len() + 8);
        }
        values.push(v);
        text.push('$');
        text.push_str(&values.len().to_string());
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => i += 1,
            b'$' | b'\\' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b'\'' => {
                // A prefix glued to the quote (E, B, X, N, U&) is part of
                // a name token before it: refused there (see below).
                let start = i;
                let mut v = String::new();
                i += 1;
                let mut seg = i;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'\\') => return None,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                            v.push_str(&sql[seg..=i]);
                            i += 2;
                            seg = i;
                        }
                        Some(b'\'') => {
                            v.push_str(&sql[seg..i]);
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                // 'a' and 'b' with a line break between are one literal in
                // PostgreSQL.
                let mut j = i;
                let mut newline = false;
                while let Some(&n) = b.get(j) {
                    match n {
                        b'\n' | b'\r' => newline = true,
                        b' ' | b'\t' | b'\x0c' => {}
                        _ => break,
                    }
                    j += 1;
                }
                if newline && b.get(j) == Some(&b'\'') {
                    return None;
                }
                text.push_str(&sql[copied..start]);
                push_param(&mut text, &mut values, v);
                numeric.push(false);
                copied = i;
                prev = Prev::Operand;
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                prev = Prev::Operand;
            }
            // A number: digits, or `.5` where an operand may start.
            c if c.is_ascii_digit()
                || (c == b'.'
                    && b.get(i + 1).is_some_and(u8::is_ascii_digit)
                    && prev == Prev::SignAllowed) =>
            {
                let (end, ok) = number_end(b, i);
                if !ok {
                    return None;
                }
                text.push_str(&sql[copied..i]);
                push_param(&mut text, &mut values, sql[i..end].to_string());
                numeric.push(true);
                i = end;
                copied = i;
                prev = Prev::Operand;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80)
                {
                    i += 1;
                }
                // A string prefix (E'…', U&'…') or a name glued to `$`.
                if matches!(b.get(i), Some(b'\'' | b'&' | b'$')) {
                    return None;
                }
                prev = Prev::Operand;
            }
            c if OP_CHARS.contains(&c) => {
                let start = i;
                while i < b.len() && OP_CHARS.contains(&b[i]) {
                    if (b[i] == b'-' && b.get(i + 1) == Some(&b'-'))
                        || (b[i] == b'/' && b.get(i + 1) == Some(&b'*'))
                    {
                        return None;
                    }
                    i += 1;
                }
                let op = &b[start..i];
                if op.len() > 1 && op.iter().any(|&o| o == b'+' || o == b'-') {
                    return None;
                }
                if op == b"-" && prev == Prev::SignAllowed {
                    // A sign: folded into the number that follows, after
                    // optional blanks (`= -5`, `+ -1234`, `(-1`).
                    let mut j = i;
                    while j < b.len() && matches!(b[j], b' ' | b'\t' | b'\n' | b'\r') {
                        j += 1;
                    }
                    if b.get(j).is_some_and(u8::is_ascii_digit) {
                        let (end, ok) = number_end(b, j);
                        if !ok {
                            return None;
                        }
                        text.push_str(&sql[copied..start]);
                        push_param(&mut text, &mut values, format!("-{}", &sql[j..end]));
                        numeric.push(true);
                        i = end;
                        copied = i;
                        prev = Prev::Operand;
                        continue;
                    }
                }
                prev = Prev::SignAllowed;
            }
            b'(' | b',' | b';' | b'[' => {
                i += 1;
                prev = Prev::SignAllowed;
            }
            b':' => {
                // `::type` (a cast: the type name follows) or a slice.
                i += 1;
                prev = Prev::SignAllowed;
            }
            _ => {
                i += 1;
                prev = Prev::Operand;
            }
        }
    }
    if values.is_empty() {
        return None;
    }
    text.push_str(&sql[copied..]);
    Some(Normalized {
        text,
        values,
        numeric,
    })
}

/// End of the number starting at `i` (digits, `.digits`, exponent), and
/// whether it stands alone (not glued to a name: `1e`, `0x1f`, `1_000`).
fn number_end(b: &[u8], mut i: usize) -> (usize, bool) {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        } else {
            return (i, false);
        }
    }
    let glued = b
        .get(i)
        .is_some_and(|&n| n.is_ascii_alphanumeric() || n == b'_' || n == b'.' || n >= 0x80);
    (i, !glued)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(sql: &str) -> Option<(String, Vec<String>)> {
        normalize_literals(sql).map(|n| {
            assert_eq!(n.values.len(), n.numeric.len());
            (n.text, n.values)
        })
    }

    fn some(text: &str, values: &[&str]) -> Option<(String, Vec<String>)> {
        Some((
            text.to_string(),
            values.iter().map(|v| v.to_string()).collect(),
        ))
    }

    #[test]
    fn literals_become_parameters() {
        assert_eq!(
            norm("SELECT abalance FROM pgbench_accounts WHERE aid = 42;"),
            some(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
                &["42"]
            )
        );
        assert_eq!(
            norm("UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 7;"),
            some(
                "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
                &["-1234", "7"]
            )
        );
        assert_eq!(
            norm("INSERT INTO h (tid, aid, delta) VALUES (1, 5, -12, 'it''s', 1.5e3)"),
            some(
                "INSERT INTO h (tid, aid, delta) VALUES ($1, $2, $3, $4, $5)",
                &["1", "5", "-12", "it's", "1.5e3"]
            )
        );
        // Binary minus stays an operator; names with digits stay names.
        assert_eq!(
            norm("SELECT a -5, t1.c2 FROM t1 WHERE x = .5"),
            some("SELECT a -$1, t1.c2 FROM t1 WHERE x = $2", &["5", ".5"])
        );
        assert_eq!(
            norm("SELECT \"we1rd 5\" FROM t WHERE k = '5'::int8"),
            some("SELECT \"we1rd 5\" FROM t WHERE k = $1::int8", &["5"])
        );
    }

    #[test]
    fn what_it_does_not_read_is_left_alone() {
        for sql in [
            "SELECT 1 -- hint",
            "SELECT /* shard=s1 */ 1",
            "SELECT $1 + 1",
            "SELECT $$x$$",
            "SELECT E'a\\n'",
            "SELECT 'a\\b'",
            "SELECT X'1f', 1",
            "SELECT U&'d\\0061t'",
            "SELECT 0x1f",
            "SELECT 1e",
            "SELECT 1_000",
            "SELECT 'a'\n  'b'",
            "SELECT 1 =-1",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT now()",
        ] {
            assert_eq!(norm(sql), None, "{sql}");
        }
    }

    #[test]
    fn a_literal_at_the_end_of_a_line_is_still_one() {
        assert_eq!(
            norm("SELECT * FROM t WHERE a = 'x'\n  AND b = 2"),
            some("SELECT * FROM t WHERE a = $1\n  AND b = $2", &["x", "2"])
        );
    }

    #[test]
    fn arrays_casts_and_ranges() {
        assert_eq!(
            norm("SELECT a[1:2], b::text FROM t WHERE id IN (1, 2) LIMIT 10"),
            some(
                "SELECT a[$1:$2], b::text FROM t WHERE id IN ($3, $4) LIMIT $5",
                &["1", "2", "1", "2", "10"]
            )
        );
    }
}
