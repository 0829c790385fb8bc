//! What a statement string does besides reading and writing rows: the
//! classification the node needs before and after running it (does it
//! change session state, drop prepared statements, change a setting routing
//! depends on, return rows from a write, LISTEN; is it an EXPLAIN or a
//! DEALLOCATE the node answers itself).
//!
//! [`classify`] makes one pass over the text with a lexer that follows
//! PostgreSQL's lexical rules (whitespace, `--` and nested `/* */` comments,
//! `'…'` with `''`, `E'…'` with backslash escapes, `U&'…'`, `B'…'`/`X'…'`,
//! `$tag$…$tag$`, `"…"` identifiers, `$n` parameters), so a keyword inside
//! a comment, a string or a quoted identifier is not taken for the keyword.
//! The common statement (no keyword of interest) allocates nothing.
//!
//! For a string the SQL parser cannot read, [`unparsed`] says whether it
//! may go to the home shard or to every shard without a parse, or must be
//! refused; [`copy_options`] reads a `COPY` statement's option list (see
//! `classify/unparsed.rs`).
//!
//! Guarantees (each flag errs on the side where a mistake costs a round
//! trip or a refusal, never a leak):
//! - [`Class::changes_state`] is set for a statement starting with `SET`,
//!   `RESET`, `DISCARD` or `DEALLOCATE` (any statement of the string), for
//!   a name `set_config` anywhere outside comments, and for a string
//!   literal whose text holds such a word (a `DO` body, `query_to_xml`'s
//!   query … may run it): strings are scanned as text, conservatively;
//! - [`Class::drops_prepared`]: a `DISCARD`/`DEALLOCATE` statement, or a
//!   string literal holding one of the words;
//! - [`Class::custom_settings`] names the custom (`prefix.name`) settings
//!   a `SET` or a `set_config('literal', …)` sets, lower case; `None` when a
//!   `set_config` call's name is not a plain literal (or the call is inside
//!   a string): its effect cannot be read back;
//! - [`Class::temporary`]: a statement starting with `CREATE` that has the
//!   word `TEMP` or `TEMPORARY`, `INTO TEMP|TEMPORARY` (`SELECT … INTO`),
//!   a name starting with `pg_temp` anywhere, or a string literal whose
//!   text has `pg_temp`, or `temp` beside `create` or `into` (a `DO`
//!   body);
//! - [`Class::changes_routing_settings`] implies `changes_state` and is set
//!   when the string may change `search_path` (also `SET SCHEMA`) or
//!   `standard_conforming_strings`, or resets/discards settings;
//! - the string is lexed as with `standard_conforming_strings` on (a
//!   backslash does not escape in `'…'`); with it off a string may end
//!   later than the lexer thinks, which the state flags survive (string
//!   text is scanned for their words too).

/// What a statement string does, as far as the node cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class<'a> {
    /// May change session state (settings, prepared statements): the node
    /// reads the state back after the transaction.
    pub changes_state: bool,
    /// May drop prepared statements the node made (`DISCARD`,
    /// `DEALLOCATE`).
    pub drops_prepared: bool,
    /// May change a setting routing depends on: `search_path` (`SET
    /// SCHEMA`), `standard_conforming_strings`, or `RESET`/`DISCARD`.
    /// Implies `changes_state`.
    pub changes_routing_settings: bool,
    /// Custom settings (`prefix.name`, lower case) the string may set;
    /// `None` when it calls `set_config` with a name that is not a
    /// literal. Only meaningful with `changes_state`.
    pub custom_settings: Option<Vec<String>>,
    /// Changes state and mentions `isolation` together with `repeatable`
    /// or `serializable` (a snapshot isolation level for the transaction
    /// or the session).
    pub snapshot_isolation: bool,
    /// Has the keyword `RETURNING` (a write that returns rows).
    pub returning: bool,
    /// A statement of the string is `LISTEN`.
    pub listen: bool,
    /// The first statement is an `EXPLAIN`.
    pub explain: Option<Explain<'a>>,
    /// The string is exactly one `DEALLOCATE` / `DISCARD ALL`.
    pub deallocate: Option<Deallocate>,
    /// A statement of the string may change the schema: it starts with
    /// `CREATE`, `ALTER`, `DROP`, `IMPORT`, `GRANT`, `REVOKE` or `DO`
    /// (whose body may), or holds the word `CREATE` (`EXPLAIN ANALYZE
    /// CREATE TABLE … AS`) or an `INTO` that is not INSERT's or MERGE's
    /// (`SELECT … INTO new_table`).
    /// Statements prepared before it may describe what no longer is.
    pub schema_change: bool,
    /// A statement of the string is `PREPARE TRANSACTION`, `COMMIT
    /// PREPARED` or `ROLLBACK PREPARED` (see [`two_phase`]).
    pub two_phase: bool,
    /// The string may create a temporary object or name the temporary
    /// schema, as far as its words show (see the module docs): the node
    /// then reads back which temporary objects the session has. A function
    /// that creates one in its body is not seen.
    pub temporary: bool,
}

impl Default for Class<'_> {
    fn default() -> Self {
        Class {
            changes_state: false,
            drops_prepared: false,
            changes_routing_settings: false,
            custom_settings: Some(Vec::new()),
            snapshot_isolation: false,
            returning: false,
            listen: false,
            explain: None,
            deallocate: None,
            schema_change: false,
            two_phase: false,
            temporary: false,
        }
    }
}

/// An `EXPLAIN` statement, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Explain<'a> {
    /// `EXPLAIN` and its options, as written.
    pub prefix: &'a str,
    /// The explained statement (to the end of the string, trailing
    /// whitespace and `;` removed).
    pub inner: &'a str,
    /// `ANALYZE` (not `ANALYZE false`).
    pub analyze: bool,
    /// `FORMAT TEXT` (the default).
    pub text: bool,
}

/// A string that is exactly one `DEALLOCATE` or `DISCARD ALL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deallocate {
    /// `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`: every prepared
    /// statement goes.
    All,
    /// `DEALLOCATE [PREPARE] name`: the name as PostgreSQL reads it
    /// (unquoted: lower case; quoted: verbatim).
    Name(String),
}

/// Classifies a statement string (one or several statements).
pub fn classify(sql: &str) -> Class<'_> {
    let b = sql.as_bytes();
    let mut c = Class::default();
    let mut lx = Lexer::new(sql);
    // The next token begins a statement.
    let mut at_start = true;
    let mut first = true;
    let mut routing_words = false;
    // The statement began with CREATE; the previous token was INTO;
    // the previous token was INSERT or MERGE.
    let (mut create, mut into, mut insert) = (false, false, false);
    while let Some(t) = lx.next() {
        let after_into = std::mem::take(&mut into);
        let after_insert = std::mem::take(&mut insert);
        match t.kind {
            Kind::Semi => {
                if !at_start {
                    first = false;
                }
                at_start = true;
                continue;
            }
            Kind::Word => {
                let w = &b[t.start..t.end];
                if at_start {
                    create = w.eq_ignore_ascii_case(b"create");
                    statement_start(sql, w, t, lx, first, &mut c, &mut routing_words);
                }
                match w.len() {
                    // `SELECT … INTO new_table` creates a table (an INTO
                    // that is not INSERT's or MERGE's).
                    4 if w.eq_ignore_ascii_case(b"into") => {
                        into = true;
                        c.schema_change |= !after_insert;
                    }
                    5 | 6
                        if w.eq_ignore_ascii_case(b"insert")
                            || w.eq_ignore_ascii_case(b"merge") =>
                    {
                        insert = true
                    }
                    // CREATE is reserved: anywhere outside strings it is a
                    // statement's (`EXPLAIN ANALYZE CREATE TABLE … AS`).
                    6 if w.eq_ignore_ascii_case(b"create") => c.schema_change = true,
                    4 | 9
                        if (create || after_into)
                            && (w.eq_ignore_ascii_case(b"temp")
                                || w.eq_ignore_ascii_case(b"temporary")) =>
                    {
                        c.temporary = true
                    }
                    9 if w.eq_ignore_ascii_case(b"returning") => c.returning = true,
                    10 if w.eq_ignore_ascii_case(b"set_config") => set_config(sql, lx, &mut c),
                    11 if w.eq_ignore_ascii_case(b"search_path") => routing_words = true,
                    27 if w.eq_ignore_ascii_case(b"standard_conforming_strings") => {
                        routing_words = true
                    }
                    n if n >= 7 && ci_prefix(w, b"pg_temp") => c.temporary = true,
                    _ => {}
                }
            }
            Kind::Quoted => {
                let w = &b[t.cs..t.ce];
                c.temporary |= ci_prefix(w, b"pg_temp");
                if w.eq_ignore_ascii_case(b"set_config") {
                    set_config(sql, lx, &mut c);
                } else if w.eq_ignore_ascii_case(b"search_path")
                    || w.eq_ignore_ascii_case(b"standard_conforming_strings")
                {
                    routing_words = true;
                }
            }
            Kind::Str(_) => {
                let text = &b[t.cs..t.ce];
                scan_string(text, &mut c, &mut routing_words);
                c.temporary |= contains_ci(text, b"pg_temp")
                    || (contains_ci(text, b"temp")
                        && (contains_ci(text, b"create") || contains_ci(text, b"into")));
            }
            Kind::Punct(_) | Kind::Other => {}
        }
        at_start = false;
    }
    if c.changes_state {
        c.changes_routing_settings = routing_words;
        c.snapshot_isolation = snapshot_isolation(sql);
    }
    c
}

/// The parameters (`$n`) of `sql`, outside strings, quoted identifiers
/// and comments: each one's byte range and number.
pub(crate) fn placeholders(sql: &str) -> Vec<(std::ops::Range<usize>, usize)> {
    let mut out = Vec::new();
    let mut lx = Lexer::new(sql);
    while let Some(t) = lx.next() {
        if t.kind == Kind::Other && sql.as_bytes().get(t.start) == Some(&b'$') {
            if let Ok(n) = sql[t.start + 1..t.end].parse::<usize>() {
                out.push((t.start..t.end, n));
            }
        }
    }
    out
}

/// Whether the first token of `sql` is the unquoted keyword `kw` (any
/// case): enough for a string that holds one statement (a Parse).
pub fn first_keyword_is(sql: &str, kw: &str) -> bool {
    Lexer::new(sql)
        .next()
        .is_some_and(|t| t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(kw))
}

/// Whether `sql` begins `INSERT INTO name [AS alias] VALUES`: an INSERT
/// without a column list (a few tokens read; the node writes the table's
/// columns in before routing it).
pub fn insert_without_column_list(sql: &str) -> bool {
    let mut lx = Lexer::new(sql);
    let mut next = || lx.next();
    let is = |t: Option<Tok>, w: &str| {
        t.is_some_and(|t| t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(w))
    };
    if !is(next(), "insert") || !is(next(), "into") {
        return false;
    }
    // The table's name: words or quoted identifiers joined by dots.
    let mut t = next();
    loop {
        if !t.is_some_and(|t| matches!(t.kind, Kind::Word | Kind::Quoted)) {
            return false;
        }
        t = next();
        if t.is_some_and(|t| t.kind == Kind::Punct(b'.')) {
            t = next();
        } else {
            break;
        }
    }
    if is(t, "as") {
        next();
        t = next();
    }
    is(t, "values")
}

/// A word beginning a statement.
fn statement_start<'a>(
    sql: &'a str,
    w: &[u8],
    t: Tok,
    lx: Lexer<'a>,
    first: bool,
    c: &mut Class<'a>,
    routing_words: &mut bool,
) {
    let is = |k: &[u8]| w.eq_ignore_ascii_case(k);
    match w.len() {
        3 if is(b"set") => {
            c.changes_state = true;
            set_name(sql, lx, c, routing_words);
        }
        5 if is(b"reset") => {
            c.changes_state = true;
            *routing_words = true;
        }
        6 if is(b"listen") => c.listen = true,
        6..=8 if is(b"commit") || is(b"prepare") || is(b"rollback") => {
            let mut ahead = lx;
            let next = ahead.next().filter(|n| n.kind == Kind::Word);
            c.two_phase |= next.is_some_and(|n| {
                let n = &sql.as_bytes()[n.start..n.end];
                n.eq_ignore_ascii_case(if is(b"prepare") {
                    b"transaction"
                } else {
                    b"prepared"
                })
            });
        }
        2 if is(b"do") => c.schema_change = true,
        4 if is(b"drop") => c.schema_change = true,
        // GRANT / REVOKE: a schema's USAGE decides how names resolve.
        5 if is(b"alter") || is(b"grant") => c.schema_change = true,
        6 if is(b"create") || is(b"import") || is(b"revoke") => c.schema_change = true,
        7 if is(b"discard") => {
            c.changes_state = true;
            c.drops_prepared = true;
            *routing_words = true;
            if first {
                c.deallocate = discard_all(sql, lx);
            }
        }
        7 if is(b"explain") && first => c.explain = explain(sql, t, lx),
        10 if is(b"deallocate") => {
            c.changes_state = true;
            c.drops_prepared = true;
            if first {
                c.deallocate = deallocate(sql, lx);
            }
        }
        _ => {}
    }
}

/// `SET [SESSION | LOCAL] name …`: a custom name joins the class's list;
/// `SET SCHEMA` is `search_path`.
fn set_name(sql: &str, mut lx: Lexer<'_>, c: &mut Class<'_>, routing_words: &mut bool) {
    let mut t = lx.next();
    if let Some(w) = t.filter(|t| t.kind == Kind::Word) {
        let w = &sql.as_bytes()[w.start..w.end];
        if w.eq_ignore_ascii_case(b"session") || w.eq_ignore_ascii_case(b"local") {
            t = lx.next();
        } else if w.eq_ignore_ascii_case(b"schema") {
            *routing_words = true;
            return;
        }
    }
    let mut name = String::new();
    while let Some(part) = t.filter(|t| matches!(t.kind, Kind::Word | Kind::Quoted)) {
        match part.kind {
            Kind::Quoted => name.push_str(&unquote(sql, part)),
            _ => name.push_str(&sql[part.start..part.end]),
        }
        let mut ahead = lx;
        match ahead.next() {
            Some(dot) if dot.kind == Kind::Punct(b'.') => {
                name.push('.');
                lx = ahead;
                t = lx.next();
            }
            _ => break,
        }
    }
    if name.contains('.') {
        name.make_ascii_lowercase();
        if let Some(v) = c.custom_settings.as_mut() {
            v.push(name);
        }
    }
}

/// After the name `set_config`: a call whose first argument is a plain
/// literal names the setting; any other call cannot be read back.
fn set_config(sql: &str, mut lx: Lexer<'_>, c: &mut Class<'_>) {
    c.changes_state = true;
    if lx.next().map(|t| t.kind) != Some(Kind::Punct(b'(')) {
        // Not a call (a column of that name).
        return;
    }
    let arg = lx.next();
    let name = match (arg, lx.next().map(|t| t.kind)) {
        (Some(a), Some(Kind::Punct(b','))) if a.kind == Kind::Str(StrKind::Plain) => {
            sql[a.cs..a.ce].replace("''", "'")
        }
        _ => {
            c.custom_settings = None;
            return;
        }
    };
    if name.contains('.') {
        if let Some(v) = c.custom_settings.as_mut() {
            v.push(name.to_ascii_lowercase());
        }
    }
}

/// The words of interest inside a string literal's text (a `DO` body or a
/// query another function runs): a case-insensitive text scan, as a false
/// hit only costs a state read-back.
fn scan_string(s: &[u8], c: &mut Class<'_>, routing_words: &mut bool) {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_' || x >= 0x80;
    for i in 0..s.len() {
        let rest = &s[i..];
        match s[i] | 0x20 {
            b's' => {
                if ci_prefix(rest, b"set_config") {
                    c.changes_state = true;
                    c.custom_settings = None;
                } else if ci_prefix(rest, b"set")
                    // A word (`\nSET` in an E'' string starts one too).
                    && (i == 0 || !word(s[i - 1]) || (i >= 2 && s[i - 2] == b'\\'))
                    && !rest.get(3).is_some_and(|&x| word(x))
                {
                    c.changes_state = true;
                } else if ci_prefix(rest, b"search_path")
                    || ci_prefix(rest, b"standard_conforming_strings")
                {
                    *routing_words = true;
                }
            }
            b'd' => {
                let discard = ci_prefix(rest, b"discard");
                if discard || ci_prefix(rest, b"deallocate") {
                    c.changes_state = true;
                    c.drops_prepared = true;
                    *routing_words |= discard;
                }
            }
            b'r' if ci_prefix(rest, b"reset")
                && rest.get(5).is_some_and(u8::is_ascii_whitespace) =>
            {
                c.changes_state = true;
                *routing_words = true;
            }
            _ => {}
        }
    }
}

/// Whether the string mentions `isolation` and a snapshot level (a text
/// scan outside comments, for a string that changes state).
fn snapshot_isolation(sql: &str) -> bool {
    let (mut isolation, mut level) = (false, false);
    let mut lx = Lexer::new(sql);
    while let Some(t) = lx.next() {
        let text = &sql.as_bytes()[t.cs..t.ce];
        isolation |= contains_ci(text, b"isolation");
        level |= contains_ci(text, b"repeatable") || contains_ci(text, b"serializable");
    }
    isolation && level
}

/// What a savepoint statement does ([`savepoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavepointOp {
    /// `SAVEPOINT name`
    Take,
    /// `RELEASE [SAVEPOINT] name`
    Release,
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`
    RollbackTo,
}

/// One savepoint statement: what it does, its name as written (for
/// replaying it) and as PostgreSQL folds it (to compare names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Savepoint {
    /// What it does.
    pub op: SavepointOp,
    /// The name as written (`"a-sp-1"` with its quotes).
    pub written: String,
    /// The name as PostgreSQL folds it (`Sp` → `sp`, `"Sp"` → `Sp`).
    pub name: String,
}

/// Reads `sql` as one savepoint statement (a `;` may end it); None for
/// anything else.
pub fn savepoint(sql: &str) -> Option<Savepoint> {
    let mut lx = Lexer::new(sql);
    let mut toks = Vec::new();
    while let Some(t) = lx.next() {
        if t.kind != Kind::Semi {
            toks.push(t);
        } else if lx.next().is_some() {
            return None;
        } else {
            break;
        }
    }
    let word = |i: usize| {
        toks.get(i)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let (op, mut i) = match word(0).as_deref() {
        Some("savepoint") => (SavepointOp::Take, 1),
        Some("release") => (SavepointOp::Release, 1),
        Some("rollback") => {
            let mut i = 1;
            if matches!(word(i).as_deref(), Some("work" | "transaction")) {
                i += 1;
            }
            if word(i).as_deref() != Some("to") {
                return None;
            }
            (SavepointOp::RollbackTo, i + 1)
        }
        _ => return None,
    };
    if op != SavepointOp::Take && word(i).as_deref() == Some("savepoint") && toks.len() > i + 1 {
        i += 1;
    }
    if toks.len() != i + 1 {
        return None;
    }
    let t = toks[i];
    let name = match t.kind {
        Kind::Word => sql[t.start..t.end].to_ascii_lowercase(),
        Kind::Quoted => sql[t.cs..t.ce].replace("\"\"", "\""),
        _ => return None,
    };
    Some(Savepoint {
        op,
        written: sql[t.start..t.end].to_owned(),
        name,
    })
}

/// Whether `sql` is one `SET TRANSACTION …` giving the transaction's
/// characteristics (isolation level, READ ONLY/WRITE, DEFERRABLE): a shard
/// that joins the transaction later gets it right after its BEGIN. `SET
/// TRANSACTION SNAPSHOT` (one server's snapshot) is not.
pub fn set_transaction(sql: &str) -> bool {
    let mut lx = Lexer::new(sql);
    let mut words = Vec::new();
    while let Some(t) = lx.next() {
        match t.kind {
            Kind::Word => words.push(sql[t.start..t.end].to_ascii_lowercase()),
            Kind::Semi => {}
            Kind::Punct(b',') => {}
            _ => return false,
        }
    }
    words.len() > 2
        && words[0] == "set"
        && words[1] == "transaction"
        && !words.iter().any(|w| w == "snapshot")
}

/// `DISCARD ALL` and nothing else.
fn discard_all(sql: &str, mut lx: Lexer<'_>) -> Option<Deallocate> {
    let all = lx.next()?;
    (all.kind == Kind::Word && sql[all.start..all.end].eq_ignore_ascii_case("all") && at_end(lx))
        .then_some(Deallocate::All)
}

/// `DEALLOCATE [PREPARE] name | ALL` and nothing else.
fn deallocate(sql: &str, mut lx: Lexer<'_>) -> Option<Deallocate> {
    let mut t = lx.next()?;
    if t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case("prepare") {
        t = lx.next()?;
    }
    if !at_end(lx) {
        return None;
    }
    match t.kind {
        Kind::Word if sql[t.start..t.end].eq_ignore_ascii_case("all") => Some(Deallocate::All),
        Kind::Word => Some(Deallocate::Name(sql[t.start..t.end].to_ascii_lowercase())),
        Kind::Quoted => Some(Deallocate::Name(unquote(sql, t))),
        _ => None,
    }
}

/// Nothing but `;` up to the end.
fn at_end(mut lx: Lexer<'_>) -> bool {
    loop {
        match lx.next() {
            None => return true,
            Some(t) if t.kind == Kind::Semi => {}
            Some(_) => return false,
        }
    }
}

/// `EXPLAIN [ ( option [, …] ) ] statement` or
/// `EXPLAIN [ ANALYZE ] [ VERBOSE ] statement`, `kw` the `EXPLAIN` token.
fn explain<'a>(sql: &'a str, kw: Tok, mut lx: Lexer<'a>) -> Option<Explain<'a>> {
    let b = sql.as_bytes();
    let (mut analyze, mut text) = (false, true);
    let mut end = kw.end;
    let mut next = lx.next();
    if next.is_some_and(|t| t.kind == Kind::Punct(b'(')) {
        // Options: `name [value]` separated by commas.
        let mut words: [Option<Tok>; 2] = [None, None];
        let mut n = 0;
        let apply = |words: &[Option<Tok>; 2], analyze: &mut bool, text: &mut bool| {
            let lower = |t: &Option<Tok>| t.map(|t| sql[t.cs..t.ce].to_ascii_lowercase());
            match lower(&words[0]).as_deref() {
                Some("analyze" | "analyse") => {
                    *analyze = !matches!(lower(&words[1]).as_deref(), Some("false" | "off" | "0"))
                }
                Some("format") => *text = lower(&words[1]).is_none_or(|f| f == "text"),
                _ => {}
            }
        };
        loop {
            let t = lx.next()?;
            match t.kind {
                Kind::Punct(b')') => {
                    apply(&words, &mut analyze, &mut text);
                    end = t.end;
                    break;
                }
                Kind::Punct(b',') => {
                    apply(&words, &mut analyze, &mut text);
                    words = [None, None];
                    n = 0;
                }
                _ => {
                    if n < 2 {
                        words[n] = Some(t);
                    }
                    n += 1;
                }
            }
        }
        next = lx.next();
    } else {
        while let Some(t) = next.filter(|t| t.kind == Kind::Word) {
            let w = &b[t.start..t.end];
            if w.eq_ignore_ascii_case(b"analyze") || w.eq_ignore_ascii_case(b"analyse") {
                analyze = true;
            } else if !w.eq_ignore_ascii_case(b"verbose") {
                break;
            }
            end = t.end;
            next = lx.next();
        }
    }
    let inner = match next {
        Some(t) => sql.get(t.start..)?.trim_end().trim_end_matches(';'),
        None => "",
    };
    Some(Explain {
        prefix: sql.get(kw.start..end)?,
        inner,
        analyze,
        text,
    })
}

/// A quoted identifier's name (`""` → `"`).
fn unquote(sql: &str, t: Tok) -> String {
    sql[t.cs..t.ce].replace("\"\"", "\"")
}

fn ci_prefix(s: &[u8], p: &[u8]) -> bool {
    s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.len() >= needle.len()
        && hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// The functions and procedures a query string creates
/// (`CREATE [OR REPLACE] FUNCTION|PROCEDURE [schema.]name (…`): each one's
/// name (last part, folded as PostgreSQL folds it) with the text of its
/// statement. A function created and called in one string is not in
/// `pg_proc` yet when the node routes the string, so its body is read here.
pub fn created_functions(sql: &str) -> Vec<(String, &str)> {
    let statements = crate::classify::split_statements(sql).unwrap_or_else(|| vec![sql]);
    let mut out = Vec::new();
    for st in statements {
        let mut lx = Lexer::new(st);
        let word = |lx: &mut Lexer| {
            lx.next()
                .filter(|t| t.kind == Kind::Word)
                .map(|t| st[t.start..t.end].to_ascii_lowercase())
        };
        if word(&mut lx).as_deref() != Some("create") {
            continue;
        }
        let mut w = word(&mut lx);
        if w.as_deref() == Some("or") {
            if word(&mut lx).as_deref() != Some("replace") {
                continue;
            }
            w = word(&mut lx);
        }
        if !matches!(w.as_deref(), Some("function" | "procedure")) {
            continue;
        }
        // The name: words, quoted identifiers and dots up to `(`.
        let mut name = None;
        while let Some(t) = lx.next() {
            match t.kind {
                Kind::Word => name = Some(st[t.start..t.end].to_ascii_lowercase()),
                Kind::Quoted => name = Some(st[t.cs..t.ce].replace("\"\"", "\"")),
                Kind::Punct(b'.') => {}
                _ => break,
            }
        }
        if let Some(n) = name {
            out.push((n, st));
        }
    }
    out
}

/// A query string that creates a temporary PL/pgSQL function whose body
/// is one `INSERT … RETURNING * INTO var` (with an EXCEPTION handler),
/// and otherwise only calls and drops it — Sequelize's `findOrCreate`:
/// `CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT response "users", …)
/// … AS $func_…$ BEGIN INSERT INTO "users" (…) VALUES (…) RETURNING * INTO
/// response; EXCEPTION WHEN unique_violation THEN …; END $func_…$ LANGUAGE
/// plpgsql; SELECT … FROM pg_temp.testfunc(); DROP FUNCTION IF EXISTS
/// pg_temp.testfunc()`. The whole string can run on the shard that owns the
/// INSERT's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempFunctionInsert {
    /// `INSERT … RETURNING *` as the body holds it.
    pub insert: String,
    /// Where that text is in the query string (replaced by the node when
    /// it fills a key left to its default).
    pub at: std::ops::Range<usize>,
}

/// Reads `sql` as a [`TempFunctionInsert`]; None for anything else.
pub fn temp_function_insert(sql: &str) -> Option<TempFunctionInsert> {
    let statements = crate::classify::split_statements(sql)?;
    let created = created_functions(sql);
    let [(name, create)] = created.as_slice() else {
        return None;
    };
    // Only the creation of `pg_temp.name`, then `SELECT <columns of its
    // result> FROM pg_temp.name()` (no other call, no subquery) and
    // `DROP FUNCTION [IF EXISTS] pg_temp.name()`.
    let rest_ok = statements
        .iter()
        .all(|st| std::ptr::eq(*st, *create) || only_calls_temp_function(st, name));
    if statements.len() < 2 || !rest_ok || !creates_in_pg_temp(create) {
        return None;
    }
    let base = create.as_ptr() as usize - sql.as_ptr() as usize;
    if !create.to_ascii_lowercase().contains("plpgsql") {
        return None;
    }
    // The body: the one dollar-quoted string of the statement.
    let mut lx = Lexer::new(create);
    let mut body = None;
    while let Some(t) = lx.next() {
        if matches!(t.kind, Kind::Str(_)) && create.as_bytes().get(t.start) == Some(&b'$') {
            if body.is_some() {
                return None;
            }
            body = Some((t.cs, t.ce));
        }
    }
    let (cs, ce) = body?;
    let text = &create[cs..ce];
    let mut lx = Lexer::new(text);
    let mut toks = Vec::new();
    while let Some(t) = lx.next() {
        toks.push(t);
    }
    let word = |i: usize| {
        toks.get(i)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| text[t.start..t.end].to_ascii_lowercase())
    };
    if word(0).as_deref() != Some("begin") || word(1).as_deref() != Some("insert") {
        return None;
    }
    // The INSERT ends at the first `;`, with `RETURNING * INTO var`.
    let semi = toks.iter().position(|t| t.kind == Kind::Semi)?;
    if semi < 6
        || word(semi - 4).as_deref() != Some("returning")
        || toks[semi - 3].kind != Kind::Punct(b'*')
        || word(semi - 2).as_deref() != Some("into")
        || !matches!(toks[semi - 1].kind, Kind::Word | Kind::Quoted)
    {
        return None;
    }
    // What follows: exactly Sequelize's handler, which runs nothing.
    let handler = [
        "exception",
        "when",
        "unique_violation",
        "then",
        "get",
        "stacked",
        "diagnostics",
    ];
    let n = handler.len();
    let rest = &toks[semi + 1..];
    let handler_ok = rest.len() >= n + 5
        && handler
            .iter()
            .enumerate()
            .all(|(i, w)| word(semi + 1 + i).as_deref() == Some(*w))
        && matches!(rest[n].kind, Kind::Word | Kind::Quoted)
        && rest[n + 1].kind == Kind::Punct(b'=')
        && word(semi + 1 + n + 2).as_deref() == Some("pg_exception_detail")
        && rest[n + 3].kind == Kind::Semi
        && word(semi + 1 + n + 4).as_deref() == Some("end")
        && rest[n + 5..].iter().all(|t| t.kind == Kind::Semi);
    if !handler_ok {
        return None;
    }
    let (from, to) = (toks[1].start, toks[semi - 3].end);
    Some(TempFunctionInsert {
        insert: text[from..to].to_owned(),
        at: base + cs + from..base + cs + to,
    })
}

/// `CREATE [OR REPLACE] FUNCTION pg_temp.…`: the function is created in
/// the session's temporary schema.
fn creates_in_pg_temp(create: &str) -> bool {
    let mut lx = Lexer::new(create);
    let mut words = Vec::new();
    while let Some(t) = lx.next() {
        match t.kind {
            Kind::Word => words.push(create[t.start..t.end].to_ascii_lowercase()),
            Kind::Punct(b'.') => words.push(".".into()),
            _ => break,
        }
        if words.len() > 6 {
            break;
        }
    }
    let at = words.iter().position(|w| w == "function");
    at.is_some_and(|i| {
        words.get(i + 1).map(String::as_str) == Some("pg_temp")
            && words.get(i + 2).map(String::as_str) == Some(".")
    })
}

/// `SELECT … FROM pg_temp.name()` with no call nor subquery in its select
/// list, or `DROP FUNCTION [IF EXISTS] pg_temp.name()`.
fn only_calls_temp_function(st: &str, name: &str) -> bool {
    let mut lx = Lexer::new(st);
    let mut toks = Vec::new();
    while let Some(t) = lx.next() {
        if t.kind != Kind::Semi {
            toks.push(t);
        }
    }
    let w = |i: usize| {
        toks.get(i)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| st[t.start..t.end].to_ascii_lowercase())
    };
    let is_name = |i: usize| {
        toks.get(i).is_some_and(|t| match t.kind {
            Kind::Word => st[t.start..t.end].eq_ignore_ascii_case(name),
            Kind::Quoted => st[t.cs..t.ce] == *name,
            _ => false,
        })
    };
    // `pg_temp . name ( )` ending the statement at `i`.
    let call_at_end = |i: usize| {
        toks.len() == i + 5
            && w(i).as_deref() == Some("pg_temp")
            && toks[i + 1].kind == Kind::Punct(b'.')
            && is_name(i + 2)
            && toks[i + 3].kind == Kind::Punct(b'(')
            && toks[i + 4].kind == Kind::Punct(b')')
    };
    match w(0).as_deref() {
        Some("drop") => {
            let i = if w(2).as_deref() == Some("if") && w(3).as_deref() == Some("exists") {
                4
            } else {
                2
            };
            w(1).as_deref() == Some("function") && call_at_end(i)
        }
        Some("select") => {
            let Some(from) = (1..toks.len()).find(|&i| w(i).as_deref() == Some("from")) else {
                return false;
            };
            // The select list: names, quoted names, dots, parentheses,
            // commas and `*` — no call (a word before `(`), no subquery.
            let list_ok = (1..from).all(|i| {
                let t = toks[i];
                match t.kind {
                    Kind::Word => {
                        !matches!(w(i).as_deref(), Some("select"))
                            && toks.get(i + 1).is_none_or(|n| n.kind != Kind::Punct(b'('))
                    }
                    Kind::Quoted => true,
                    Kind::Punct(c) => matches!(c, b'.' | b',' | b'(' | b')' | b'*'),
                    _ => false,
                }
            });
            list_ok && call_at_end(from + 1)
        }
        _ => false,
    }
}

/// Whether `src`, a function body, names one of `tables` (lower-case names)
/// as a whole word, case-insensitively; the first it names. A mention in a
/// comment or a string counts too: the body is not lexed, as refusing too
/// much is safe.
pub fn names_table(src: &str, tables: &[String]) -> Option<String> {
    let lower = src.to_ascii_lowercase();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    tables
        .iter()
        .find(|t| {
            lower.match_indices(t.as_str()).any(|(i, _)| {
                let b = lower.as_bytes();
                let before = i.checked_sub(1).map(|j| b[j]);
                let after = b.get(i + t.len()).copied();
                !before.is_some_and(word) && !after.is_some_and(word)
            })
        })
        .cloned()
}

/// The names `sql` calls as functions (a name followed by `(`, outside
/// literals and comments; unquoted names lower case, the last part of a
/// qualified name) that the router does not know as aggregates: candidates
/// for a user-defined aggregate.
pub fn called_names(sql: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut last: Option<String> = None;
    let mut lx = Lexer::new(sql);
    for t in std::iter::from_fn(|| lx.next()) {
        match t.kind {
            Kind::Word => last = Some(sql[t.start..t.end].to_ascii_lowercase()),
            Kind::Quoted => last = Some(sql[t.cs..t.ce].replace("\"\"", "\"")),
            Kind::Punct(b'(') => {
                if let Some(w) = last.take() {
                    if !crate::route::is_known_aggregate(&w) && !out.contains(&w) {
                        out.push(w);
                    }
                }
            }
            // `schema.name(`: the next part replaces the word.
            Kind::Punct(b'.') => {}
            _ => last = None,
        }
    }
    out
}

/// The first `COLLATE name` in `sql` (outside literals and comments) whose
/// collation is not C or POSIX, as written.
pub fn non_c_collate(sql: &str) -> Option<String> {
    first_collate(sql, false)
}

/// The first `COLLATE name` in `sql` (outside literals and comments), as
/// written; `c_too`: C and POSIX count (else they are skipped).
pub fn first_collate(sql: &str, c_too: bool) -> Option<String> {
    let mut lx = Lexer::new(sql);
    while let Some(t) = lx.next() {
        if t.kind != Kind::Word || !sql[t.start..t.end].eq_ignore_ascii_case("collate") {
            continue;
        }
        // name [. name …]
        let (mut first, mut last) = (None, None);
        let mut bare = "";
        let mut ahead = lx;
        while let Some(n) = ahead.next() {
            match n.kind {
                Kind::Word | Kind::Quoted => {
                    first.get_or_insert(n.start);
                    last = Some(n.end);
                    bare = &sql[n.cs..n.ce];
                    lx = ahead;
                }
                Kind::Punct(b'.') if last.is_some() => lx = ahead,
                _ => break,
            }
        }
        let (Some(a), Some(b)) = (first, last) else {
            // COLLATE followed by no name: PostgreSQL's syntax error.
            continue;
        };
        if c_too || !matches!(bare, "C" | "POSIX" | "c" | "posix") {
            return Some(sql[a..b].to_string());
        }
    }
    None
}

/// Whether a transaction's BEGIN/START TRANSACTION (or SET TRANSACTION)
/// text asks for REPEATABLE READ or SERIALIZABLE (the words, outside
/// literals and comments).
pub fn asks_snapshot_isolation(sql: &str) -> bool {
    let mut lx = Lexer::new(sql);
    std::iter::from_fn(|| lx.next()).any(|t| {
        t.kind == Kind::Word && {
            let w = &sql[t.start..t.end];
            w.eq_ignore_ascii_case("repeatable") || w.eq_ignore_ascii_case("serializable")
        }
    })
}

/// A string that is exactly one LISTEN or UNLISTEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenCommand {
    /// `LISTEN channel`
    Listen(String),
    /// `UNLISTEN channel`, or `UNLISTEN *` (None).
    Unlisten(Option<String>),
}

/// `sql` as a LISTEN or UNLISTEN, if it is exactly one (an optional `;`,
/// comments anywhere). The channel as PostgreSQL names it: an unquoted
/// name in lower case, a quoted one as written.
pub fn listen_command(sql: &str) -> Option<ListenCommand> {
    let mut lx = Lexer::new(sql);
    let kw = lx.next().filter(|t| t.kind == Kind::Word)?;
    let w = &sql[kw.start..kw.end];
    let listen = w.eq_ignore_ascii_case("listen");
    if !listen && !w.eq_ignore_ascii_case("unlisten") {
        return None;
    }
    let t = lx.next()?;
    let name = match t.kind {
        Kind::Word => Some(sql[t.start..t.end].to_ascii_lowercase()),
        Kind::Quoted if t.ce > t.cs => Some(sql[t.cs..t.ce].replace("\"\"", "\"")),
        Kind::Punct(b'*') if !listen => None,
        _ => return None,
    };
    while let Some(t) = lx.next() {
        if t.kind != Kind::Semi {
            return None;
        }
    }
    if listen {
        name.map(ListenCommand::Listen)
    } else {
        Some(ListenCommand::Unlisten(name))
    }
}

/// The kinds of string literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrKind {
    /// `'…'` (and `N'…'`).
    Plain,
    /// `E'…'`, `U&'…'`, `B'…'`, `X'…'`, `$tag$…$tag$`: text that is not
    /// the value as written, or not a plain literal.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An unquoted identifier or keyword.
    Word,
    /// `"…"` (content between the quotes, `""` not undone).
    Quoted,
    /// A string literal (content between the quotes).
    Str(StrKind),
    /// `;`
    Semi,
    /// Any other single byte outside words (operators, parentheses …).
    Punct(u8),
    /// Numbers, `$n`, `U&"…"`.
    Other,
}

/// A token: `start..end` in the text, `cs..ce` its content (the text
/// between quotes, the whole token otherwise).
#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
    cs: usize,
    ce: usize,
}

/// PostgreSQL's lexer, as far as token boundaries go. Every boundary falls
/// on a character boundary (non-ASCII bytes only occur inside words,
/// strings, identifiers and comments).
#[derive(Clone, Copy)]
struct Lexer<'a> {
    b: &'a [u8],
    i: usize,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Lexer<'a> {
        Lexer {
            b: sql.as_bytes(),
            i: 0,
        }
    }

    /// Skips whitespace and comments.
    fn skip(&mut self) {
        let b = self.b;
        while self.i < b.len() {
            match b[self.i] {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'\x0b' => self.i += 1,
                b'-' if b.get(self.i + 1) == Some(&b'-') => {
                    self.i = b[self.i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |p| self.i + p);
                }
                b'/' if b.get(self.i + 1) == Some(&b'*') => {
                    let mut depth = 0usize;
                    while self.i < b.len() {
                        if b[self.i] == b'/' && b.get(self.i + 1) == Some(&b'*') {
                            depth += 1;
                            self.i += 2;
                        } else if b[self.i] == b'*' && b.get(self.i + 1) == Some(&b'/') {
                            depth -= 1;
                            self.i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            self.i += 1;
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// A quoted run from `open` (the opening quote): `q` doubled stands for
    /// itself; with `backslash`, `\` escapes the next byte. Returns the
    /// token end (after the closing quote, or the text's end).
    fn quoted(&self, open: usize, q: u8, backslash: bool) -> (usize, usize) {
        let b = self.b;
        let mut j = open + 1;
        while j < b.len() {
            let c = b[j];
            if backslash && c == b'\\' {
                j += 2;
            } else if c == q {
                if b.get(j + 1) == Some(&q) {
                    j += 2;
                } else {
                    return (j, j + 1);
                }
            } else {
                j += 1;
            }
        }
        (b.len(), b.len())
    }

    fn next(&mut self) -> Option<Tok> {
        self.skip();
        let b = self.b;
        let start = self.i;
        let c = *b.get(start)?;
        let tok = |kind, end, cs, ce| Tok {
            kind,
            start,
            end,
            cs,
            ce,
        };
        let t = match c {
            b'\'' => {
                let (ce, end) = self.quoted(start, b'\'', false);
                tok(Kind::Str(StrKind::Plain), end, start + 1, ce)
            }
            b'"' => {
                let (ce, end) = self.quoted(start, b'"', false);
                tok(Kind::Quoted, end, start + 1, ce)
            }
            b'$' => {
                let mut j = start + 1;
                if b.get(j).is_some_and(u8::is_ascii_digit) {
                    while b.get(j).is_some_and(u8::is_ascii_digit) {
                        j += 1;
                    }
                    tok(Kind::Other, j, start, j)
                } else {
                    while b.get(j).is_some_and(|&x| ident_cont(x) && x != b'$') {
                        j += 1;
                    }
                    if b.get(j) == Some(&b'$') {
                        let delim = &b[start..=j];
                        let body = j + 1;
                        match b[body..].windows(delim.len()).position(|w| w == delim) {
                            Some(p) => tok(
                                Kind::Str(StrKind::Other),
                                body + p + delim.len(),
                                body,
                                body + p,
                            ),
                            None => tok(Kind::Str(StrKind::Other), b.len(), body, b.len()),
                        }
                    } else {
                        tok(Kind::Punct(b'$'), start + 1, start, start + 1)
                    }
                }
            }
            c if ident_start(c) => {
                let mut j = start + 1;
                while b.get(j).is_some_and(|&x| ident_cont(x)) {
                    j += 1;
                }
                let next = b.get(j).copied();
                let one = j == start + 1;
                match (c | 0x20, next) {
                    (b'e', Some(b'\'')) if one => {
                        let (ce, end) = self.quoted(j, b'\'', true);
                        tok(Kind::Str(StrKind::Other), end, j + 1, ce)
                    }
                    (b'n', Some(b'\'')) if one => {
                        let (ce, end) = self.quoted(j, b'\'', false);
                        tok(Kind::Str(StrKind::Plain), end, j + 1, ce)
                    }
                    (b'b' | b'x', Some(b'\'')) if one => {
                        let (ce, end) = self.quoted(j, b'\'', false);
                        tok(Kind::Str(StrKind::Other), end, j + 1, ce)
                    }
                    (b'u', Some(b'&')) if one && matches!(b.get(j + 1), Some(b'\'' | b'"')) => {
                        let q = b[j + 1];
                        let (ce, end) = self.quoted(j + 1, q, false);
                        let kind = if q == b'\'' {
                            Kind::Str(StrKind::Other)
                        } else {
                            Kind::Other
                        };
                        tok(kind, end, j + 2, ce)
                    }
                    _ => tok(Kind::Word, j, start, j),
                }
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(start + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                let mut j = start + 1;
                while b
                    .get(j)
                    .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.')
                {
                    j += 1;
                }
                tok(Kind::Other, j, start, j)
            }
            b';' => tok(Kind::Semi, start + 1, start, start + 1),
            c => tok(Kind::Punct(c), start + 1, start, start + 1),
        };
        self.i = t.end;
        Some(t)
    }
}

mod cursor;
mod database;
mod outside;
mod prepare;
mod script;
mod unparsed;
pub use cursor::{cursor_command, CursorCommand, Declare, Direction};
pub use database::{database_statement, DatabaseStatement};
pub use outside::{outside_transaction, OutsideTransaction};
pub use prepare::{
    highest_parameter, sql_execute, sql_prepare, two_phase, Arg, SqlExecute, SqlPrepare, TwoPhase,
    TwoPhaseOp,
};
pub use script::{split_statements, transaction_statement, TxStatement};
pub use unparsed::{copy_options, unparsed, CopyOptionValue, CopyOptions, Unparsed};

#[cfg(test)]
mod tests;
