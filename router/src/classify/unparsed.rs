//! What the lexer can say about a statement string the SQL parser cannot
//! read (or whose statement the router does not plan): where it may go
//! without a parse, and a `COPY` statement's option list.
//!
//! [`unparsed`] decides, per statement of the string, from its first words
//! and the names it mentions:
//! - transaction control, cursors, SQL `PREPARE`/`EXECUTE` and `CALL` are
//!   refused: the node must understand them (or refuses them parsed too;
//!   a cursor statement sent alone is routed by the node by its cursor);
//! - a schema statement (`CREATE`, `ALTER`, `DROP`, `COMMENT`, `GRANT`,
//!   `REVOKE`, `SECURITY LABEL`, `IMPORT FOREIGN SCHEMA`, and a `DO` block
//!   whose body has schema words but no DML words) runs on every shard, as
//!   parsed DDL does, whatever tables it names; `CREATE TABLE … AS` and
//!   `CREATE MATERIALIZED VIEW` (rows, not schema) are refused;
//! - maintenance (`VACUUM`, `ANALYZE`, `REINDEX`, `CLUSTER`) naming a
//!   declared table runs on every shard (it writes no rows), else on the
//!   home shard;
//! - any other statement goes to the home shard if it mentions none of
//!   the relations given (declared tables and the relations that reach
//!   them), else it is refused: a write to a sharded or reference table
//!   routed without a parse could land where its rows do not belong.
//!
//! A mention is a word or a quoted name equal, ASCII case-insensitively,
//! to a relation's unqualified name (a schema-qualified `s.t` mentions
//! `t`), or a whole-word occurrence inside a string literal (dynamic SQL,
//! a `DO` body): strings are scanned as text, conservatively. Comments
//! mention nothing. Errs towards refusing: a false mention refuses a
//! statement, never routes it.

use super::{names_table, unquote, Kind, Lexer, StrKind, Tok};

/// Where a statement string the parser cannot read may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unparsed {
    /// It mentions no declared relation: the home shard runs it
    /// (PostgreSQL answers, with its own syntax error if it is one).
    Home {
        /// The number of statements in the string (0 for none).
        statements: usize,
        /// Every word followed by `(`, lower case, deduplicated: the
        /// functions it may call (and type names, which are harmless).
        calls: Vec<String>,
    },
    /// Schema statements only (this many): every shard, as DDL.
    Schema(usize),
    /// Maintenance (`VACUUM`, `ANALYZE`, `REINDEX`, `CLUSTER`) naming a
    /// declared table (this many statements): every shard; it writes no
    /// rows.
    Maintenance(usize),
    /// It cannot be routed without a parse; why, for the client.
    Refuse(String),
}

/// How one statement may go.
#[derive(PartialEq)]
enum Stmt {
    Home,
    Schema,
    Maintenance,
    Refuse(String),
}

/// Classifies `sql` for routing without a parse; `relations` are the
/// lower-case unqualified names of the declared tables and of the
/// relations that reach them.
pub fn unparsed(sql: &str, relations: &[String]) -> Unparsed {
    let mut lx = Lexer::new(sql);
    let mut kinds: Vec<Stmt> = Vec::new();
    loop {
        let mut toks = Vec::new();
        let mut end = true;
        while let Some(t) = lx.next() {
            if t.kind == Kind::Semi {
                end = false;
                break;
            }
            // Only words, names, strings and parentheses decide (and the
            // first two tokens, whatever they are): numbers, commas and
            // operators are not kept, so a huge `IN (1, 2, …)` list costs
            // no memory here.
            let keep = toks.len() < 2
                || matches!(
                    t.kind,
                    Kind::Word | Kind::Quoted | Kind::Str(_) | Kind::Punct(b'(' | b')')
                );
            if keep {
                toks.push(t);
            }
        }
        if !toks.is_empty() {
            match statement(sql, &toks, relations) {
                Stmt::Refuse(why) => return Unparsed::Refuse(why),
                k => kinds.push(k),
            }
        }
        if end {
            break;
        }
    }
    let n = kinds.len();
    match kinds.first() {
        Some(k) if kinds.iter().any(|o| o != k) => Unparsed::Refuse(
            "the string mixes statements for every shard (schema changes, maintenance) with others; send them separately".into(),
        ),
        Some(Stmt::Schema) => Unparsed::Schema(n),
        Some(Stmt::Maintenance) => Unparsed::Maintenance(n),
        _ => {
            let mut calls = Vec::new();
            let mut lx = Lexer::new(sql);
            let mut prev: Option<Tok> = None;
            while let Some(t) = lx.next() {
                if let (Some(p), Kind::Punct(b'(')) = (prev, t.kind) {
                    if let Some(w) = word(sql, &p) {
                        if !calls.contains(&w) {
                            calls.push(w);
                        }
                    }
                }
                prev = Some(t);
            }
            Unparsed::Home {
                statements: n,
                calls,
            }
        }
    }
}

/// The lower-case text of a word token.
fn word(sql: &str, t: &Tok) -> Option<String> {
    (t.kind == Kind::Word).then(|| sql[t.start..t.end].to_ascii_lowercase())
}

fn statement(sql: &str, toks: &[Tok], relations: &[String]) -> Stmt {
    let first = word(sql, &toks[0]).unwrap_or_default();
    let second = toks.get(1).and_then(|t| word(sql, t)).unwrap_or_default();
    let mentioned = || mention(sql, toks, relations);
    match first.as_str() {
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
        | "prepare" => Stmt::Refuse(format!(
            "{} is transaction control (or SQL PREPARE), which hotrepart must read to route, and its SQL parser cannot read this one",
            first.to_ascii_uppercase()
        )),
        "declare" | "fetch" | "move" | "close" => Stmt::Refuse(
            "a cursor statement (DECLARE/FETCH/MOVE/CLOSE) that hotrepart cannot read, or together with other statements in one query string; send it as a statement of its own".into(),
        ),
        "execute" => Stmt::Refuse("SQL-level EXECUTE (use the extended protocol)".into()),
        "call" => Stmt::Refuse("CALL (the router cannot see which shard a procedure needs)".into()),
        "create" if creates_rows(sql, toks) => Stmt::Refuse(
            "CREATE TABLE … AS and CREATE MATERIALIZED VIEW (the new relation would hold different rows on each shard)".into(),
        ),
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "import" => Stmt::Schema,
        "security" if second == "label" => Stmt::Schema,
        "vacuum" | "analyze" | "analyse" | "reindex" | "cluster" => match mentioned() {
            Some(_) => Stmt::Maintenance,
            None => Stmt::Home,
        },
        "do" => {
            let mut words = Vec::new();
            for t in toks.iter().filter(|t| matches!(t.kind, Kind::Str(_))) {
                body_words(&string_value(sql, t), 0, &mut words);
            }
            let body = |ws: &[&str]| words.iter().any(|w| ws.contains(&w.as_str()));
            let ddl = body(&["create", "alter", "drop", "comment", "grant", "revoke"]);
            let dml = body(&["insert", "update", "delete", "merge", "copy", "truncate"]);
            match (ddl, dml) {
                (true, false) => Stmt::Schema,
                (true, true) => Stmt::Refuse(
                    "a DO block that both changes the schema (every shard) and writes rows (one shard); split it".into(),
                ),
                _ => match mentioned() {
                    Some(t) => refuse_mention(&t),
                    None => Stmt::Home,
                },
            }
        }
        _ => match mentioned() {
            Some(t) => refuse_mention(&t),
            None => Stmt::Home,
        },
    }
}

/// The text a string token stands for: `''` undone in `'…'` and `E'…'`
/// (and `\'` in the latter); a dollar-quoted body as it is.
fn string_value(sql: &str, t: &Tok) -> String {
    let content = &sql[t.cs..t.ce];
    match sql.as_bytes().get(t.start) {
        Some(b'$') => content.to_owned(),
        Some(b'E' | b'e') => content.replace("\\'", "'").replace("''", "'"),
        _ => content.replace("''", "'"),
    }
}

/// The words of `body` (lower case), as a PL/pgSQL body's statements hold
/// them, and those of the strings in it that may be SQL run dynamically
/// (`EXECUTE 'INSERT …'`). A string that is a single word and an element
/// of a list (`ENUM ('insert', 'delete')`, between `(`/`,` and `,`/`)`) is a
/// value, not a statement: its word does not count. Anywhere else — built
/// into a statement with `||`, assigned to a variable — it counts.
fn body_words(body: &str, depth: usize, out: &mut Vec<String>) {
    let mut lx = Lexer::new(body);
    let mut toks = Vec::new();
    while let Some(t) = lx.next() {
        toks.push(t);
    }
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            Kind::Word => out.push(body[t.start..t.end].to_ascii_lowercase()),
            Kind::Str(_) => {
                let inner = string_value(body, t);
                let one_word = !inner.is_empty()
                    && inner
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80);
                let in_list = i
                    .checked_sub(1)
                    .and_then(|p| toks.get(p))
                    .is_some_and(|p| matches!(p.kind, Kind::Punct(b'(' | b',')))
                    && toks
                        .get(i + 1)
                        .is_some_and(|n| matches!(n.kind, Kind::Punct(b')' | b',')));
                if one_word && in_list {
                    continue;
                }
                if depth < 4 {
                    body_words(&inner, depth + 1, out);
                } else {
                    // Deeper than any real body: count it all.
                    out.extend(
                        inner
                            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                            .map(str::to_ascii_lowercase),
                    );
                }
            }
            _ => {}
        }
    }
}

fn refuse_mention(table: &str) -> Stmt {
    Stmt::Refuse(format!(
        "the statement names \"{table}\", a table declared to hotrepart (or a relation over one), and the node cannot route it without a parse: it cannot tell which shards own the rows it touches"
    ))
}

/// `CREATE [… ] TABLE … AS …` (an `AS` outside parentheses after `TABLE`)
/// or `CREATE [… ] MATERIALIZED VIEW`.
fn creates_rows(sql: &str, toks: &[Tok]) -> bool {
    let mut depth = 0usize;
    let mut table = false;
    for t in toks {
        match t.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth = depth.saturating_sub(1),
            Kind::Word if depth == 0 => match word(sql, t).as_deref() {
                Some("materialized") if !table => return true,
                Some("table") => table = true,
                Some("as") if table => return true,
                // CREATE FUNCTION … RETURNS TABLE (…) AS …
                Some("function" | "procedure" | "trigger" | "rule" | "policy") => return false,
                _ => {}
            },
            _ => {}
        }
    }
    false
}

/// The first relation of `relations` that the statement mentions.
fn mention(sql: &str, toks: &[Tok], relations: &[String]) -> Option<String> {
    for t in toks {
        let name = match t.kind {
            Kind::Word => sql[t.start..t.end].to_ascii_lowercase(),
            Kind::Quoted => unquote(sql, *t).to_ascii_lowercase(),
            Kind::Str(_) => match names_table(&sql[t.cs..t.ce], relations) {
                Some(n) => return Some(n),
                None => continue,
            },
            _ => continue,
        };
        if let Some(r) = relations.iter().find(|r| **r == name) {
            return Some(r.clone());
        }
    }
    None
}

/// A value in a `COPY` option list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOptionValue {
    /// A string literal's value, a word (folded to lower case unless
    /// quoted) or a number, as PostgreSQL reads it.
    Text(String),
    /// A parenthesized column list (names folded as PostgreSQL folds them).
    Columns(Vec<String>),
    /// `*`.
    Star,
}

/// A `COPY` statement's parenthesized option list, read by the lexer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Byte range of `[WITH] ( … )` in the text.
    pub span: std::ops::Range<usize>,
    /// `name [value]`, the name in lower case.
    pub options: Vec<(String, Option<CopyOptionValue>)>,
}

/// The `[WITH] ( option [, …] )` list of a string holding one `COPY`
/// statement, after its `FROM`/`TO` target; None when the string is not
/// such a statement, has no such list, or the list holds something the
/// lexer cannot read as PostgreSQL would (then the parser decides).
pub fn copy_options(sql: &str) -> Option<CopyOptions> {
    let mut lx = Lexer::new(sql);
    let t = lx.next()?;
    if word(sql, &t).as_deref() != Some("copy") {
        return None;
    }
    // Up to FROM/TO outside parentheses, then the target.
    let mut depth = 0usize;
    loop {
        let t = lx.next()?;
        match t.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth = depth.checked_sub(1)?,
            Kind::Semi => return None,
            Kind::Word if depth == 0 => {
                if matches!(word(sql, &t).as_deref(), Some("from" | "to")) {
                    break;
                }
            }
            _ => {}
        }
    }
    let mut t = lx.next()?;
    if word(sql, &t).as_deref() == Some("program") {
        t = lx.next()?;
    }
    if !matches!(t.kind, Kind::Word | Kind::Str(_)) {
        return None;
    }
    let mut open = lx.next()?;
    let start = open.start;
    if word(sql, &open).as_deref() == Some("with") {
        open = lx.next()?;
    }
    if open.kind != Kind::Punct(b'(') {
        return None;
    }
    let mut options = Vec::new();
    loop {
        let name = lx.next()?;
        let name = match name.kind {
            Kind::Word => sql[name.start..name.end].to_ascii_lowercase(),
            _ => return None,
        };
        let mut v = lx.next()?;
        let value = match v.kind {
            Kind::Punct(b',' | b')') => None,
            Kind::Punct(b'*') => {
                v = lx.next()?;
                Some(CopyOptionValue::Star)
            }
            Kind::Punct(b'(') => {
                let mut cols = Vec::new();
                loop {
                    let c = lx.next()?;
                    match c.kind {
                        Kind::Word => cols.push(sql[c.start..c.end].to_ascii_lowercase()),
                        Kind::Quoted => cols.push(unquote(sql, c)),
                        _ => return None,
                    }
                    match lx.next()?.kind {
                        Kind::Punct(b',') => {}
                        Kind::Punct(b')') => break,
                        _ => return None,
                    }
                }
                v = lx.next()?;
                Some(CopyOptionValue::Columns(cols))
            }
            _ => {
                let text = value_text(sql, v)?;
                v = lx.next()?;
                Some(CopyOptionValue::Text(text))
            }
        };
        options.push((name, value));
        match v.kind {
            Kind::Punct(b',') => {}
            Kind::Punct(b')') => {
                let span = start..v.end;
                // Only a WHERE clause (COPY FROM) or the end may follow.
                let mut rest = lx;
                match rest.next() {
                    None => {}
                    Some(t)
                        if t.kind == Kind::Semi || word(sql, &t).as_deref() == Some("where") => {}
                    Some(_) => return None,
                }
                return Some(CopyOptions { span, options });
            }
            _ => return None,
        }
    }
}

/// A single-token option value as PostgreSQL reads it; None for what the
/// lexer does not decode (escapes other than the common ones, `U&'…'`,
/// bit strings).
fn value_text(sql: &str, t: Tok) -> Option<String> {
    let body = &sql[t.cs..t.ce];
    match t.kind {
        Kind::Word => Some(body.to_ascii_lowercase()),
        Kind::Quoted => Some(unquote(sql, t)),
        Kind::Str(StrKind::Plain) => Some(body.replace("''", "'")),
        Kind::Str(StrKind::Other) => match sql.as_bytes()[t.start] {
            b'$' => Some(body.to_owned()),
            b'e' | b'E' => e_string(body),
            _ => None,
        },
        Kind::Other if body.bytes().all(|c| c.is_ascii_digit()) => Some(body.to_owned()),
        Kind::Punct(b'-' | b'+') => None,
        _ => None,
    }
}

/// The value of an `E'…'` literal with the usual escapes; None for octal,
/// hex and Unicode escapes (left to the parser).
fn e_string(body: &str) -> Option<String> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(match chars.next()? {
                'b' => '\u{8}',
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                c if c.is_ascii_alphanumeric() => return None,
                c => c,
            }),
            '\'' => {
                // '' inside E'…'
                chars.next();
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    Some(out)
}
