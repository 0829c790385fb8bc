//! Pre-rendered text of a multi-row `INSERT … VALUES`, for splitting it by
//! shard at bind time without touching the syntax tree.
//!
//! At plan time the statement is rendered once, exactly as sqlparser would
//! render it (`Insert`'s `Display`), and the byte ranges of the statement
//! prefix (`INSERT INTO t (cols) VALUES `), of each row and of the suffix
//! (`ON CONFLICT …`, `RETURNING …`) are remembered. A shard's part is then
//! the prefix, its rows joined by `", "` (what `Values`' `Display` writes
//! between rows) and the suffix: the same text as rendering the statement
//! with only those rows.

use std::fmt::Write as _;
use std::ops::Range;

use sqlparser::ast::{Expr, Ident, Insert, Parens, SetExpr};

/// What `Values`' `Display` writes between two rows (non-alternate form).
const ROW_SEPARATOR: &str = ", ";

/// A multi-row `INSERT … VALUES`, rendered and cut into prefix, rows and
/// suffix.
#[derive(Debug, Clone)]
pub(super) struct SplitText {
    /// The whole statement as sqlparser renders it.
    text: Box<str>,
    /// `text[..prefix_end]` is everything up to and including `VALUES `.
    prefix_end: usize,
    /// Each row's text (`(…)` or `ROW(…)`) in `text`.
    rows: Vec<Range<usize>>,
    /// `text[suffix_start..]` is everything after the last row.
    suffix_start: usize,
    /// The parameters (`$n`) in `text`: range and number, in order.
    params: Vec<(Range<usize>, usize)>,
}

impl SplitText {
    /// Renders `ins`; `None` when its source is not a plain `VALUES` list.
    pub(super) fn new(ins: &Insert) -> Option<SplitText> {
        let SetExpr::Values(values) = ins.source.as_ref()?.body.as_ref() else {
            return None;
        };
        let row_prefix = if values.explicit_row { "ROW" } else { "" };
        // The statement with a single sentinel row: finding the sentinel's
        // text gives the prefix and the suffix. A sentinel that occurs
        // elsewhere in the text (a quoted identifier spelled like it) is
        // replaced by another one, so the cut is never ambiguous.
        let mut shell = ins.clone();
        let mut n = 0u32;
        let (shell_text, at, sentinel_len) = loop {
            let sentinel = Expr::Identifier(Ident::with_quote(
                '"',
                format!("\u{1}hotrepart split row {n}\u{1}"),
            ));
            let sentinel_row = format!("{row_prefix}({sentinel})");
            let Some(SetExpr::Values(shell_values)) =
                shell.source.as_mut().map(|q| q.body.as_mut())
            else {
                return None;
            };
            shell_values.rows = vec![Parens::with_empty_span(vec![sentinel])];
            let text = shell.to_string();
            let mut found = text.match_indices(&sentinel_row);
            if let (Some((at, _)), None) = (found.next(), found.next()) {
                break (text, at, sentinel_row.len());
            }
            n += 1;
        };
        let (prefix, rest) = shell_text.split_at(at);
        let suffix = &rest[sentinel_len..];

        let mut text = String::with_capacity(shell_text.len() + 16 * values.rows.len());
        text.push_str(prefix);
        let prefix_end = text.len();
        let mut rows = Vec::with_capacity(values.rows.len());
        for (i, row) in values.rows.iter().enumerate() {
            if i > 0 {
                text.push_str(ROW_SEPARATOR);
            }
            let start = text.len();
            text.push_str(row_prefix);
            text.push('(');
            for (j, e) in row.content.iter().enumerate() {
                if j > 0 {
                    text.push_str(", ");
                }
                write!(text, "{e}").ok()?;
            }
            text.push(')');
            rows.push(start..text.len());
        }
        let suffix_start = text.len();
        text.push_str(suffix);
        Some(SplitText {
            params: crate::classify::placeholders(&text),
            text: text.into_boxed_str(),
            prefix_end,
            rows,
            suffix_start,
        })
    }

    /// The number of rows.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// [`Self::render`] for a statement with parameters: its parameters
    /// numbered `$1`, `$2` … in the order they first occur in the text, and
    /// for each the client's number (1-based) it stands for.
    pub(super) fn render_numbered(&self, keep: &[usize]) -> (String, Vec<usize>) {
        let mut out = String::with_capacity(self.text.len());
        let mut order: Vec<usize> = Vec::new();
        let mut copy = |out: &mut String, r: Range<usize>| {
            let from = self.params.partition_point(|(p, _)| p.start < r.start);
            let mut at = r.start;
            for (p, n) in self.params[from..]
                .iter()
                .take_while(|(p, _)| p.end <= r.end)
            {
                out.push_str(&self.text[at..p.start]);
                let new = match order.iter().position(|&o| o == *n) {
                    Some(i) => i + 1,
                    None => {
                        order.push(*n);
                        order.len()
                    }
                };
                let _ = write!(out, "${new}");
                at = p.end;
            }
            out.push_str(&self.text[at..r.end]);
        };
        copy(&mut out, 0..self.prefix_end);
        for (n, &i) in keep.iter().enumerate() {
            if n > 0 {
                out.push_str(ROW_SEPARATOR);
            }
            copy(&mut out, self.rows[i].clone());
        }
        copy(&mut out, self.suffix_start..self.text.len());
        (out, order)
    }

    /// The statement holding only rows `keep` (indices, in the order given).
    pub(super) fn render(&self, keep: &[usize]) -> String {
        let prefix = &self.text[..self.prefix_end];
        let suffix = &self.text[self.suffix_start..];
        let rows_len: usize = keep.iter().map(|&i| self.rows[i].len()).sum();
        let mut out = String::with_capacity(
            prefix.len()
                + rows_len
                + ROW_SEPARATOR.len() * keep.len().saturating_sub(1)
                + suffix.len(),
        );
        out.push_str(prefix);
        for (n, &i) in keep.iter().enumerate() {
            if n > 0 {
                out.push_str(ROW_SEPARATOR);
            }
            out.push_str(&self.text[self.rows[i].clone()]);
        }
        out.push_str(suffix);
        out
    }
}

#[cfg(test)]
mod tests {
    use sqlparser::ast::Statement;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    use super::*;

    fn insert(sql: &str) -> Insert {
        match Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .expect("parse")
            .remove(0)
        {
            Statement::Insert(i) => i,
            other => panic!("not an INSERT: {other}"),
        }
    }

    /// The old way: clone the tree, keep the rows, render.
    fn by_tree(ins: &Insert, keep: &[usize]) -> String {
        let mut ins = ins.clone();
        let Some(SetExpr::Values(v)) = ins.source.as_mut().map(|q| q.body.as_mut()) else {
            panic!("no VALUES");
        };
        v.rows = keep.iter().map(|&i| v.rows[i].clone()).collect();
        ins.to_string()
    }

    #[test]
    fn matches_rendering_the_tree() {
        for sql in [
            "INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            "insert into public.users as u (id, name) values (1, 'a, b'), (2, $$x$$), (3, NULL) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name WHERE u.id > 0 RETURNING id, name",
            "INSERT INTO \"(1)\" (\"(1)\", x) VALUES (1, (SELECT 1)), (2, ARRAY[1, 2]), (3, '(3, 4)') \
             ON CONFLICT DO NOTHING",
            // The column list renders exactly as the first sentinel row.
            "INSERT INTO t (\"\u{1}hotrepart split row 0\u{1}\") VALUES (1), (2), (3)",
            "INSERT INTO t (a, k) VALUES (-1, 1::int8), (2 + 3, 2), (now(), 3) RETURNING *",
        ] {
            let ins = insert(sql);
            let s = SplitText::new(&ins).expect("split text");
            assert_eq!(s.len(), 3);
            assert_eq!(s.render(&[0, 1, 2]), ins.to_string(), "{sql}");
            for keep in [&[0][..], &[1], &[2], &[0, 2], &[1, 2], &[0, 1]] {
                assert_eq!(s.render(keep), by_tree(&ins, keep), "{sql} {keep:?}");
            }
        }
    }

    #[test]
    fn not_values() {
        assert!(SplitText::new(&insert("INSERT INTO t (k) SELECT 1")).is_none());
    }

    #[test]
    fn parts_number_their_own_parameters() {
        let t = SplitText::new(&insert(
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, '$1 and $2'), ($4, $2) \
             ON CONFLICT (id) DO UPDATE SET name = $5 RETURNING id, \"$3\"",
        ))
        .expect("split");
        let (sql, params) = t.render_numbered(&[2, 1]);
        assert_eq!(
            sql,
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, '$1 and $2') \
             ON CONFLICT(id) DO UPDATE SET name = $4 RETURNING id, \"$3\""
        );
        assert_eq!(params, vec![4, 2, 3, 5]);
        let (sql, params) = t.render_numbered(&[0]);
        assert_eq!(
            sql,
            "INSERT INTO users (id, name) VALUES ($1, $2) ON CONFLICT(id) DO UPDATE SET name = $3 RETURNING id, \"$3\""
        );
        assert_eq!(params, vec![1, 2, 5]);
    }
}
