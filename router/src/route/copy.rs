//! `COPY` of sharded and reference tables.
//!
//! [`CopyPlan`] is what the router learned from a `COPY … FROM STDIN` or
//! `COPY … TO STDOUT` statement of a sharded (or, for `FROM`, reference)
//! table: the table, the column list, the format and its options. The
//! executor runs the statement itself on the shards.
//!
//! [`RowSplitter`] cuts a `COPY … FROM STDIN` data stream into rows exactly
//! where PostgreSQL 15 does (`CopyReadLineText`, `CopyReadAttributesText`,
//! `CopyReadAttributesCSV` and the binary tuple format), reads each row's
//! shard-key field as PostgreSQL would (text escapes, CSV quoting, the NULL
//! string, `FORCE_NULL`/`FORCE_NOT_NULL`, binary values), and hands back the
//! row's bytes unchanged with its key. [`CopyPlan::owner`] maps the key to
//! its shard with the same catalog code that routes statements.
//!
//! Guarantees:
//! * a row is forwarded as the exact bytes that arrived (with its line
//!   terminator), so the shard parses it exactly as one PostgreSQL would;
//! * a row whose key cannot be read (bad syntax, out of range, NULL, wrong
//!   number of fields, malformed CSV or binary data) is an error — never
//!   guessed — with PostgreSQL's SQLSTATE (`22P02`, `22003`, `23502`,
//!   `22P04` for bad COPY data);
//! * memory is bounded: at most one partial row (up to `max_row` bytes) is
//!   held.

use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, Ident};

use crate::classify::{CopyOptionValue, CopyOptions};

use super::names::norm;
use super::{CopyDirection, RouteError};
use crate::catalog::{
    KeyParseError, KeyRange, KeyType, KeyValue, RangeStatus, RoutingSnapshot, ShardId, ShardedTable,
};

/// The data format of a `COPY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyFormat {
    /// `FORMAT text` (the default): tab-separated lines with backslash
    /// escapes.
    Text,
    /// `FORMAT csv`.
    Csv,
    /// `FORMAT binary`: the `PGCOPY` file header, tuples, a trailer.
    Binary,
}

/// Where the copied table lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyTable {
    /// Spread over the shards by its key: each row goes to its owner.
    Sharded(ShardedTable),
    /// A full copy on every shard: every row goes to every shard.
    Reference,
}

/// A `COPY` of a sharded or reference table, as the executor needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// The catalog name of the table.
    pub table: String,
    /// The table's name as the statement spells it (quotes included), for
    /// SQL the executor sends (`'…'::regclass`).
    pub relation: String,
    /// Sharded or reference.
    pub placement: CopyTable,
    /// `FROM STDIN` or `TO STDOUT`.
    pub direction: CopyDirection,
    /// The column list (folded as PostgreSQL folds identifiers); empty when
    /// the statement has none (every non-generated column, in table order).
    pub columns: Vec<String>,
    /// The data format.
    pub format: CopyFormat,
    /// Field delimiter (text: tab, CSV: comma).
    pub delimiter: u8,
    /// The NULL string (text: `\N`, CSV: empty).
    pub null: Vec<u8>,
    /// CSV quote character.
    pub quote: u8,
    /// CSV escape character (default: the quote).
    pub escape: u8,
    /// The data starts with a header line (text and CSV).
    pub header: bool,
    /// `FORCE_NOT_NULL` columns (CSV, `FROM`).
    pub force_not_null: Vec<String>,
    /// `FORCE_NULL` columns (CSV, `FROM`).
    pub force_null: Vec<String>,
    /// An `ENCODING` option, if any.
    pub encoding: Option<String>,
}

/// A COPY option list read by the lexer ([`crate::classify::copy_options`])
/// as the parser's options, for the options the row splitter depends on
/// (`FORMAT`, `FREEZE`, `DELIMITER`, `NULL`, `HEADER`, `QUOTE`, `ESCAPE`,
/// `FORCE_QUOTE`, `FORCE_NOT_NULL`, `FORCE_NULL`, `ENCODING`), and the
/// names of the others, which pass to PostgreSQL untouched (it validates
/// them: `ON_ERROR`, `LOG_VERBOSITY`, …). Values are read as PostgreSQL's
/// `defGetBoolean`/`defGetString` read them.
pub(super) fn options_from_lexer(
    list: &CopyOptions,
) -> Result<(Vec<CopyOption>, Vec<String>), RouteError> {
    let mut read = Vec::new();
    let mut passed = Vec::new();
    for (name, value) in &list.options {
        let text = || match value {
            Some(CopyOptionValue::Text(t)) => Ok(t.clone()),
            _ => Err(copy_err("22023", format!("{name} requires a parameter"))),
        };
        let boolean = || match value {
            None => Ok(true),
            Some(CopyOptionValue::Text(t)) => match t.to_ascii_lowercase().as_str() {
                "true" | "on" | "1" => Ok(true),
                "false" | "off" | "0" => Ok(false),
                // HEADER MATCH: there is a header line (checked by the shard).
                "match" if name == "header" => Ok(true),
                _ => Err(copy_err(
                    "22023",
                    format!("{name} requires a Boolean value"),
                )),
            },
            _ => Err(copy_err(
                "22023",
                format!("{name} requires a Boolean value"),
            )),
        };
        let one = |what: &str| {
            let t = text()?;
            let mut cs = t.chars();
            match (cs.next(), cs.next()) {
                (Some(c), None) => Ok(c),
                _ => Err(RouteError::unsupported(format!(
                    "COPY {what} must be a single one-byte character"
                ))),
            }
        };
        let columns = || match value {
            Some(CopyOptionValue::Columns(cs)) => Ok(cs
                .iter()
                .map(|c| Ident::with_quote('"', c.clone()))
                .collect::<Vec<_>>()),
            Some(CopyOptionValue::Star) => Err(RouteError::unsupported(format!(
                "COPY {} * of a sharded or reference table (name the columns)",
                name.to_ascii_uppercase()
            ))),
            _ => Err(copy_err("22023", format!("{name} requires a column list"))),
        };
        read.push(match name.as_str() {
            "format" => CopyOption::Format(Ident::with_quote('"', text()?)),
            "freeze" => CopyOption::Freeze(boolean()?),
            "delimiter" => CopyOption::Delimiter(one("delimiter")?),
            "null" => CopyOption::Null(text()?),
            "header" => CopyOption::Header(boolean()?),
            "quote" => CopyOption::Quote(one("quote")?),
            "escape" => CopyOption::Escape(one("escape")?),
            "force_quote" => CopyOption::ForceQuote(match value {
                Some(CopyOptionValue::Star) => Vec::new(),
                _ => columns()?,
            }),
            "force_not_null" => CopyOption::ForceNotNull(columns()?),
            "force_null" => CopyOption::ForceNull(columns()?),
            "encoding" => CopyOption::Encoding(text()?),
            _ => {
                passed.push(name.clone());
                continue;
            }
        });
    }
    Ok((read, passed))
}

fn copy_err(sqlstate: &'static str, message: impl Into<String>) -> RouteError {
    RouteError {
        sqlstate,
        message: message.into(),
    }
}

/// `22P04 bad_copy_file_format`.
fn bad_format(message: impl Into<String>) -> RouteError {
    copy_err("22P04", message)
}

fn redundant() -> RouteError {
    copy_err("42601", "conflicting or redundant options")
}

fn one_byte(what: &str, c: char) -> Result<u8, RouteError> {
    u8::try_from(u32::from(c))
        .ok()
        .filter(u8::is_ascii)
        .ok_or_else(|| {
            RouteError::unsupported(format!("COPY {what} must be a single one-byte character"))
        })
}

impl CopyPlan {
    /// Reads the options of a `COPY` statement, validated as PostgreSQL 15
    /// validates them (`ProcessCopyOptions`), so that the splitter's
    /// assumptions hold before any shard sees the data.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        table: String,
        relation: String,
        placement: CopyTable,
        direction: CopyDirection,
        columns: Vec<String>,
        options: &[CopyOption],
        legacy: &[CopyLegacyOption],
    ) -> Result<CopyPlan, RouteError> {
        let mut format: Option<CopyFormat> = None;
        let mut delimiter: Option<u8> = None;
        let mut null: Option<Vec<u8>> = None;
        let mut quote: Option<u8> = None;
        let mut escape: Option<u8> = None;
        let mut header: Option<bool> = None;
        let mut force_not_null: Option<Vec<String>> = None;
        let mut force_null: Option<Vec<String>> = None;
        let mut force_quote = false;
        let mut encoding: Option<String> = None;
        let mut freeze = false;
        fn set<T>(slot: &mut Option<T>, v: T) -> Result<(), RouteError> {
            if slot.is_some() {
                return Err(redundant());
            }
            *slot = Some(v);
            Ok(())
        }
        for o in options {
            match o {
                CopyOption::Format(f) => {
                    let name = norm(f);
                    let f = match name.as_str() {
                        "text" => CopyFormat::Text,
                        "csv" => CopyFormat::Csv,
                        "binary" => CopyFormat::Binary,
                        _ => {
                            return Err(copy_err(
                                "22023",
                                format!("COPY format \"{name}\" not recognized"),
                            ))
                        }
                    };
                    set(&mut format, f)?;
                }
                CopyOption::Freeze(_) => {
                    if std::mem::replace(&mut freeze, true) {
                        return Err(redundant());
                    }
                }
                CopyOption::Delimiter(c) => set(&mut delimiter, one_byte("delimiter", *c)?)?,
                CopyOption::Null(s) => set(&mut null, s.as_bytes().to_vec())?,
                CopyOption::Header(h) => set(&mut header, *h)?,
                CopyOption::Quote(c) => set(&mut quote, one_byte("quote", *c)?)?,
                CopyOption::Escape(c) => set(&mut escape, one_byte("escape", *c)?)?,
                CopyOption::ForceQuote(_) => {
                    if std::mem::replace(&mut force_quote, true) {
                        return Err(redundant());
                    }
                }
                CopyOption::ForceNotNull(cols) => {
                    set(&mut force_not_null, cols.iter().map(norm).collect())?
                }
                CopyOption::ForceNull(cols) => {
                    set(&mut force_null, cols.iter().map(norm).collect())?
                }
                CopyOption::Encoding(e) => set(&mut encoding, e.clone())?,
            }
        }
        for o in legacy {
            match o {
                CopyLegacyOption::Binary => set(&mut format, CopyFormat::Binary)?,
                CopyLegacyOption::Delimiter(c) => set(&mut delimiter, one_byte("delimiter", *c)?)?,
                CopyLegacyOption::Null(s) => set(&mut null, s.as_bytes().to_vec())?,
                CopyLegacyOption::Header => set(&mut header, true)?,
                CopyLegacyOption::Csv(opts) => {
                    set(&mut format, CopyFormat::Csv)?;
                    for c in opts {
                        match c {
                            CopyLegacyCsvOption::Header => set(&mut header, true)?,
                            CopyLegacyCsvOption::Quote(q) => {
                                set(&mut quote, one_byte("quote", *q)?)?
                            }
                            CopyLegacyCsvOption::Escape(e) => {
                                set(&mut escape, one_byte("escape", *e)?)?
                            }
                            CopyLegacyCsvOption::ForceQuote(_) => {
                                if std::mem::replace(&mut force_quote, true) {
                                    return Err(redundant());
                                }
                            }
                            CopyLegacyCsvOption::ForceNotNull(cols) => {
                                set(&mut force_not_null, cols.iter().map(norm).collect())?
                            }
                        }
                    }
                }
                other => {
                    return Err(RouteError::unsupported(format!(
                        "COPY option {other} (not a PostgreSQL option)"
                    )))
                }
            }
        }
        let format = format.unwrap_or(CopyFormat::Text);
        let csv = format == CopyFormat::Csv;
        let binary = format == CopyFormat::Binary;
        let from = direction == CopyDirection::From;
        let unsupported = |m: &str| Err(RouteError::unsupported(m.to_owned()));
        let invalid = |m: String| Err(copy_err("22023", m));
        if binary && delimiter.is_some() {
            return unsupported("cannot specify DELIMITER in BINARY mode");
        }
        if binary && null.is_some() {
            return unsupported("cannot specify NULL in BINARY mode");
        }
        if binary && header.is_some() {
            return unsupported("cannot specify HEADER in BINARY mode");
        }
        if !csv && quote.is_some() {
            return unsupported("COPY quote available only in CSV mode");
        }
        if !csv && escape.is_some() {
            return unsupported("COPY escape available only in CSV mode");
        }
        if !csv && force_quote {
            return unsupported("COPY force quote available only in CSV mode");
        }
        if force_quote && from {
            return unsupported("COPY force quote only available using COPY TO");
        }
        if !csv && force_not_null.is_some() {
            return unsupported("COPY force not null available only in CSV mode");
        }
        if force_not_null.is_some() && !from {
            return unsupported("COPY force not null only available using COPY FROM");
        }
        if !csv && force_null.is_some() {
            return unsupported("COPY force null available only in CSV mode");
        }
        if force_null.is_some() && !from {
            return unsupported("COPY force null only available using COPY FROM");
        }
        let delimiter = delimiter.unwrap_or(if csv { b',' } else { b'\t' });
        let null = null.unwrap_or_else(|| if csv { Vec::new() } else { b"\\N".to_vec() });
        let quote = quote.unwrap_or(b'"');
        let escape = escape.unwrap_or(quote);
        if matches!(delimiter, b'\n' | b'\r') {
            return invalid("COPY delimiter cannot be newline or carriage return".into());
        }
        if null.contains(&b'\n') || null.contains(&b'\r') {
            return invalid(
                "COPY null representation cannot use newline or carriage return".into(),
            );
        }
        if !csv && b"\\.abcdefghijklmnopqrstuvwxyz0123456789".contains(&delimiter) {
            return invalid(format!(
                "COPY delimiter cannot be \"{}\"",
                char::from(delimiter)
            ));
        }
        if csv && delimiter == quote {
            return invalid("COPY delimiter and quote must be different".into());
        }
        if !binary && null.contains(&delimiter) {
            return invalid("COPY delimiter must not appear in the NULL specification".into());
        }
        if csv && null.contains(&quote) {
            return invalid("CSV quote character must not appear in the NULL specification".into());
        }
        if csv && (matches!(quote, b'\n' | b'\r') || matches!(escape, b'\n' | b'\r')) {
            // PostgreSQL accepts these but they cannot frame lines sanely.
            return unsupported("COPY quote or escape of newline or carriage return");
        }
        Ok(CopyPlan {
            table,
            relation,
            placement,
            direction,
            columns,
            format,
            delimiter,
            null,
            quote,
            escape,
            header: header.unwrap_or(false),
            force_not_null: force_not_null.unwrap_or_default(),
            force_null: force_null.unwrap_or_default(),
            encoding,
        })
    }

    /// Refuses a COPY of a sharded or reference table with a passed-through
    /// option (`passed`, see [`options_from_lexer`]) that changes how a
    /// row's fields read: `DEFAULT` (a field equal to it is the column's
    /// default, so the key field's text would not be the key).
    pub(super) fn check_passed_options(&self, passed: &[String]) -> Result<(), RouteError> {
        match passed.iter().find(|o| *o == "default") {
            Some(o) if self.direction == CopyDirection::From => Err(RouteError::unsupported(
                format!(
                    "COPY option {} into table \"{}\" (hotrepart reads each row's shard key as written)",
                    o.to_ascii_uppercase(),
                    self.table
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The sharded table, if the table is sharded.
    pub fn sharded(&self) -> Option<&ShardedTable> {
        match &self.placement {
            CopyTable::Sharded(t) => Some(t),
            CopyTable::Reference => None,
        }
    }

    /// The shard that receives a row whose key is `key`: the write owner
    /// of the key's range. A frozen range (a cut-over in progress) is an
    /// error (`40001`): the COPY must be retried. (The node waits out a
    /// freeze instead: see [`CopyPlan::range`].)
    pub fn owner<'s>(
        &self,
        snapshot: &'s RoutingSnapshot,
        key: &KeyValue,
    ) -> Result<&'s ShardId, RouteError> {
        let range = self.range(snapshot, key)?;
        if range.status == RangeStatus::Frozen {
            return Err(copy_err(
                "40001",
                format!(
                    "the key range of key {key} of \"{}\" is being moved; retry the COPY",
                    self.table
                ),
            ));
        }
        Ok(&range.write_owner)
    }

    /// The range of the row whose key is `key`, whatever its status: its
    /// `write_owner` receives the row unless it is frozen.
    pub fn range<'s>(
        &self,
        snapshot: &'s RoutingSnapshot,
        key: &KeyValue,
    ) -> Result<&'s KeyRange, RouteError> {
        let Some(t) = self.sharded() else {
            return Err(RouteError::unsupported(format!(
                "table \"{}\" is not sharded",
                self.table
            )));
        };
        let point = snapshot
            .point(t, key)
            .map_err(|e| RouteError::point(&t.name, e))?;
        Ok(snapshot.range_for_point(point))
    }

    /// A splitter for this COPY's data, given the copied columns (the
    /// statement's list, or the table's non-generated columns in order
    /// when it has none). Fails when the shard key is not among them
    /// (`23502`).
    pub fn splitter(&self, columns: &[String], max_row: usize) -> Result<RowSplitter, RouteError> {
        let key = match self.sharded() {
            None => None,
            Some(t) => {
                let Some(index) = columns.iter().position(|c| *c == t.key_column) else {
                    return Err(RouteError::not_null(format!(
                        "COPY into sharded table \"{}\" must include its shard key column \"{}\"",
                        t.name, t.key_column
                    )));
                };
                Some(KeySpec {
                    index,
                    ty: t.key_type,
                    column: t.key_column.clone(),
                    force_not_null: self.force_not_null.contains(&t.key_column),
                    force_null: self.force_null.contains(&t.key_column),
                })
            }
        };
        Ok(RowSplitter {
            format: self.format,
            delimiter: self.delimiter,
            quote: self.quote,
            escape: self.escape,
            null: self.null.clone(),
            header_pending: self.header && self.format != CopyFormat::Binary,
            columns: columns.to_vec(),
            key,
            table: self.table.clone(),
            buf: Vec::new(),
            scan: LineScan::default(),
            eol: Eol::Unknown,
            line_no: 0,
            ended: false,
            binary_header: false,
            max_row,
        })
    }
}

/// Where the shard key sits in a row and how to read it.
#[derive(Debug, Clone)]
struct KeySpec {
    index: usize,
    ty: KeyType,
    column: String,
    force_not_null: bool,
    force_null: bool,
}

/// Line terminator style, fixed by the first line (as in PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Nl,
    Cr,
    CrNl,
}

/// Scanner state inside the current (incomplete) line.
#[derive(Debug, Clone, Copy, Default)]
struct LineScan {
    /// Offset (from the line's start) where scanning resumes.
    at: usize,
    in_quote: bool,
    last_was_esc: bool,
}

/// One piece of the data stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// The header line (text/CSV `HEADER`) or the binary file header:
    /// every shard's COPY needs it before its rows.
    Header(&'a [u8]),
    /// One row, as the bytes that arrived (line terminator included), with
    /// its shard key (None for a reference table).
    Row {
        /// The row's bytes.
        data: &'a [u8],
        /// The row's key.
        key: Option<KeyValue>,
    },
}

/// Cuts `COPY … FROM STDIN` data into rows and reads their keys; see the
/// module documentation.
#[derive(Debug)]
pub struct RowSplitter {
    format: CopyFormat,
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: Vec<u8>,
    header_pending: bool,
    columns: Vec<String>,
    key: Option<KeySpec>,
    table: String,
    /// Input not yet cut into rows (at most one partial row).
    buf: Vec<u8>,
    scan: LineScan,
    eol: Eol,
    /// Lines (text/CSV) or tuples (binary) read, for messages.
    line_no: u64,
    /// The end-of-data marker (`\.`, binary trailer) was seen.
    ended: bool,
    binary_header: bool,
    max_row: usize,
}

/// A complete line found by the scanner.
struct Line {
    /// End of the line's content (terminator excluded), from the buffer's
    /// start.
    content_end: usize,
    /// Where the next line starts.
    next: usize,
    /// The end-of-copy marker ended this line (the rest is ignored).
    marker: bool,
}

impl RowSplitter {
    /// Feeds one CopyData payload; `emit` receives each complete piece, in
    /// order. An error from `emit` stops the splitting and is returned.
    pub fn feed<E: From<RouteError>>(
        &mut self,
        data: &[u8],
        emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.ended {
            if self.format == CopyFormat::Binary && !data.is_empty() {
                return Err(bad_format("received copy data after EOF marker").into());
            }
            // PostgreSQL drains and ignores text after `\.`.
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        self.cut(false, emit)
    }

    /// The client's CopyDone: the last line may lack its terminator.
    pub fn finish<E: From<RouteError>>(
        &mut self,
        emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.ended {
            return Ok(());
        }
        self.cut(true, emit)?;
        if self.format == CopyFormat::Binary {
            if !self.binary_header {
                return Err(bad_format("COPY file signature not recognized").into());
            }
            if !self.buf.is_empty() {
                return Err(bad_format("unexpected EOF in COPY data").into());
            }
        }
        Ok(())
    }

    /// Whether the end-of-data marker was seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn cut<E: From<RouteError>>(
        &mut self,
        eof: bool,
        emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut start = 0usize;
        let res = if self.format == CopyFormat::Binary {
            self.cut_binary(&mut start, emit)
        } else {
            self.cut_lines(&mut start, eof, emit)
        };
        self.buf.drain(..start);
        if self.ended && self.format != CopyFormat::Binary {
            // PostgreSQL ignores what follows `\.`.
            self.buf.clear();
        }
        res?;
        if self.buf.len() > self.max_row {
            return Err(copy_err(
                "54000",
                format!(
                    "a COPY row of \"{}\" is longer than {} bytes (max_message_size); it cannot be routed",
                    self.table, self.max_row
                ),
            )
            .into());
        }
        Ok(())
    }

    fn cut_lines<E: From<RouteError>>(
        &mut self,
        start: &mut usize,
        eof: bool,
        emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !self.ended {
            let Some(line) = self.next_line(*start, eof)? else {
                break;
            };
            self.line_no += 1;
            self.scan = LineScan::default();
            let content = &self.buf[*start..line.content_end];
            if line.marker {
                self.ended = true;
                if content.is_empty() {
                    break;
                }
            }
            // Forwarded: the line with its terminator (or, before a `\.`,
            // its content only: the end of this shard's data).
            let data = if line.marker {
                content
            } else {
                &self.buf[*start..line.next]
            };
            if std::mem::take(&mut self.header_pending) {
                emit(Piece::Header(data))?;
            } else {
                let key = match &self.key {
                    None => None,
                    Some(k) => Some(self.line_key(content, k)?),
                };
                emit(Piece::Row { data, key })?;
            }
            *start = line.next;
        }
        Ok(())
    }

    /// The next complete line of the buffer from `start`, as PostgreSQL's
    /// `CopyReadLineText` cuts it; None when more input is needed.
    fn next_line(&mut self, start: usize, eof: bool) -> Result<Option<Line>, RouteError> {
        let csv = self.format == CopyFormat::Csv;
        let buf = &self.buf;
        let len = buf.len();
        // As PostgreSQL: an escape equal to the quote is no escape here
        // (the quote just toggles).
        let quote = self.quote;
        let escape = if self.escape == quote { 0 } else { self.escape };
        let mut st = self.scan;
        let mut i = start + st.at;
        let mut first_char_in_line = st.at == 0;
        let cr_msg = if csv {
            "unquoted carriage return found in data"
        } else {
            "literal carriage return found in data"
        };
        let nl_msg = if csv {
            "unquoted newline found in data"
        } else {
            "literal newline found in data"
        };
        loop {
            if i >= len {
                if eof && i > start {
                    // The last line, without a terminator.
                    return Ok(Some(Line {
                        content_end: len,
                        next: len,
                        marker: false,
                    }));
                }
                self.scan = LineScan {
                    at: i - start,
                    ..st
                };
                return Ok(None);
            }
            let c = buf[i];
            let before = st;
            // Characters that look ahead need the next one (unless at EOF);
            // the state is saved before this character changes it.
            if (c == b'\\' || c == b'\r') && i + 1 >= len && !eof {
                self.scan = LineScan {
                    at: i - start,
                    ..st
                };
                return Ok(None);
            }
            i += 1;
            if csv {
                if st.in_quote && c == escape {
                    st.last_was_esc = !st.last_was_esc;
                }
                if c == quote && !st.last_was_esc {
                    st.in_quote = !st.in_quote;
                }
                if c != escape {
                    st.last_was_esc = false;
                }
            }
            if c == b'\r' && (!csv || !st.in_quote) {
                match self.eol {
                    Eol::Unknown | Eol::CrNl => {
                        if i < len && buf[i] == b'\n' {
                            self.eol = Eol::CrNl;
                            return Ok(Some(Line {
                                content_end: i - 1,
                                next: i + 1,
                                marker: false,
                            }));
                        }
                        if self.eol == Eol::CrNl {
                            return Err(self.line_err(bad_format(cr_msg)));
                        }
                        self.eol = Eol::Cr;
                    }
                    Eol::Nl => return Err(self.line_err(bad_format(cr_msg))),
                    Eol::Cr => {}
                }
                return Ok(Some(Line {
                    content_end: i - 1,
                    next: i,
                    marker: false,
                }));
            }
            if c == b'\n' && (!csv || !st.in_quote) {
                if matches!(self.eol, Eol::Cr | Eol::CrNl) {
                    return Err(self.line_err(bad_format(nl_msg)));
                }
                self.eol = Eol::Nl;
                return Ok(Some(Line {
                    content_end: i - 1,
                    next: i,
                    marker: false,
                }));
            }
            if c == b'\\' && (!csv || first_char_in_line) {
                if i >= len {
                    // A backslash just before EOF is data.
                    continue;
                }
                if buf[i] == b'.' {
                    match self.end_marker(i - 1, eof)? {
                        Marker::Yes(next) => {
                            return Ok(Some(Line {
                                content_end: i - 1,
                                next,
                                marker: true,
                            }))
                        }
                        Marker::NeedMore => {
                            self.scan = LineScan {
                                at: i - 1 - start,
                                ..before
                            };
                            return Ok(None);
                        }
                        // CSV: `\.` followed by more text is data.
                        Marker::No => {}
                    }
                } else if !csv {
                    // Anything after a backslash is data, newlines too.
                    i += 1;
                }
            }
            first_char_in_line = false;
        }
    }

    /// Checks the end-of-copy marker whose backslash is at `at`.
    fn end_marker(&self, at: usize, eof: bool) -> Result<Marker, RouteError> {
        let csv = self.format == CopyFormat::Csv;
        let buf = &self.buf;
        let mut j = at + 2;
        let get = |j: usize| buf.get(j).copied();
        let corrupt = |m: &str| {
            if csv {
                Ok(Marker::No)
            } else {
                Err(self.line_err(bad_format(m.to_owned())))
            }
        };
        if self.eol == Eol::CrNl {
            match get(j) {
                None if !eof => return Ok(Marker::NeedMore),
                // PostgreSQL: at EOF the line is data.
                None => return Ok(Marker::No),
                Some(b'\n') => {
                    return corrupt("end-of-copy marker does not match previous newline style")
                }
                Some(b'\r') => j += 1,
                Some(_) => return corrupt("end-of-copy marker corrupt"),
            }
        }
        let c2 = match get(j) {
            None if !eof => return Ok(Marker::NeedMore),
            None => return Ok(Marker::No),
            Some(c) => c,
        };
        if c2 != b'\r' && c2 != b'\n' {
            return corrupt("end-of-copy marker corrupt");
        }
        let expected = match self.eol {
            Eol::Nl | Eol::CrNl => b'\n',
            Eol::Cr => b'\r',
            Eol::Unknown => c2,
        };
        if c2 != expected {
            return Err(self.line_err(bad_format(
                "end-of-copy marker does not match previous newline style",
            )));
        }
        Ok(Marker::Yes(j + 1))
    }

    fn line_err(&self, mut e: RouteError) -> RouteError {
        e.message = format!(
            "{} (COPY {}, line {})",
            e.message,
            self.table,
            self.line_no + 1
        );
        e
    }

    fn field_err(&self, mut e: RouteError, column: &str) -> RouteError {
        e.message = format!(
            "{} (COPY {}, line {}, column {column})",
            e.message, self.table, self.line_no
        );
        e
    }

    /// The key of one text/CSV line (its content without terminator),
    /// checking the number of fields.
    fn line_key(&self, content: &[u8], k: &KeySpec) -> Result<KeyValue, RouteError> {
        let mut key: Option<Option<Vec<u8>>> = None;
        let mut quoted = false;
        let mut n = 0usize;
        let mut i = 0usize;
        let len = content.len();
        let csv = self.format == CopyFormat::Csv;
        loop {
            // One field: [i, end) raw, value de-escaped when it is the key.
            let want = n == k.index;
            let start = i;
            let mut value = Vec::new();
            let mut saw_quote = false;
            let (end, found_delim) = if csv {
                let mut found_delim = false;
                'field: loop {
                    // Not in quote.
                    loop {
                        if i >= len {
                            break 'field;
                        }
                        let c = content[i];
                        i += 1;
                        if c == self.delimiter {
                            found_delim = true;
                            break 'field;
                        }
                        if c == self.quote {
                            saw_quote = true;
                            break;
                        }
                        if want {
                            value.push(c);
                        }
                    }
                    // In quote.
                    loop {
                        if i >= len {
                            return Err(
                                self.line_err_at(bad_format("unterminated CSV quoted field"))
                            );
                        }
                        let c = content[i];
                        i += 1;
                        if c == self.escape && i < len {
                            let next = content[i];
                            if next == self.escape || next == self.quote {
                                if want {
                                    value.push(next);
                                }
                                i += 1;
                                continue;
                            }
                        }
                        if c == self.quote {
                            break;
                        }
                        if want {
                            value.push(c);
                        }
                    }
                }
                (if found_delim { i - 1 } else { i }, found_delim)
            } else {
                text_field(content, &mut i, self.delimiter, want.then_some(&mut value))
            };
            if want {
                let raw = &content[start..end];
                let is_null = if csv {
                    !saw_quote && raw == self.null.as_slice()
                } else {
                    raw == self.null.as_slice()
                };
                quoted = saw_quote;
                key = Some(if is_null { None } else { Some(value) });
            }
            n += 1;
            if !found_delim {
                break;
            }
        }
        let ncols = self.columns.len();
        if n < ncols {
            let col = self.columns.get(n).map(String::as_str).unwrap_or("?");
            return Err(self.line_err_at(bad_format(format!("missing data for column \"{col}\""))));
        }
        if n > ncols {
            return Err(self.line_err_at(bad_format("extra data after last expected column")));
        }
        let value = match key.unwrap_or(None) {
            None if csv && k.force_not_null => Some(self.null.clone()),
            Some(v) if csv && k.force_null && quoted && v == self.null => None,
            other => other,
        };
        self.key_from_text(value, k)
    }

    fn line_err_at(&self, mut e: RouteError) -> RouteError {
        e.message = format!("{} (COPY {}, line {})", e.message, self.table, self.line_no);
        e
    }

    fn null_key(&self, k: &KeySpec) -> RouteError {
        self.field_err(
            RouteError::not_null(format!(
                "null value in column \"{}\" of relation \"{}\" violates not-null constraint: the shard key of a row must not be NULL",
                k.column, self.table
            )),
            &k.column,
        )
    }

    fn key_from_text(&self, value: Option<Vec<u8>>, k: &KeySpec) -> Result<KeyValue, RouteError> {
        let Some(v) = value else {
            return Err(self.null_key(k));
        };
        let text = String::from_utf8(v).map_err(|_| {
            self.field_err(
                copy_err("22021", "invalid byte sequence for encoding \"UTF8\""),
                &k.column,
            )
        })?;
        KeyValue::parse(k.ty, &text).map_err(|e| self.field_err(parse_err(e), &k.column))
    }

    fn cut_binary<E: From<RouteError>>(
        &mut self,
        start: &mut usize,
        emit: &mut dyn FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
        let buf = &self.buf;
        let i32_at = |p: usize| -> Option<i32> {
            buf.get(p..p + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        if !self.binary_header {
            if buf.len() < 19 {
                if buf.len() >= 11 && &buf[..11] != SIGNATURE {
                    return Err(bad_format("COPY file signature not recognized").into());
                }
                return Ok(());
            }
            if &buf[..11] != SIGNATURE {
                return Err(bad_format("COPY file signature not recognized").into());
            }
            let flags = i32_at(11).unwrap_or(0);
            if flags & (1 << 16) != 0 {
                return Err(bad_format("invalid COPY file header (WITH OIDS)").into());
            }
            if (flags as u32) & !(1u32 << 16) & 0xffff_0000 != 0 {
                return Err(bad_format("unrecognized critical flags in COPY file header").into());
            }
            let ext = i32_at(15).unwrap_or(0);
            if ext < 0 {
                return Err(bad_format("invalid COPY file header (missing length)").into());
            }
            let end = 19 + ext as usize;
            if buf.len() < end {
                return Ok(());
            }
            self.binary_header = true;
            emit(Piece::Header(&buf[..end]))?;
            *start = end;
        }
        loop {
            let p = *start;
            let Some(b) = buf.get(p..p + 2) else {
                return Ok(());
            };
            let count = i16::from_be_bytes([b[0], b[1]]);
            if count == -1 {
                self.ended = true;
                if buf.len() > p + 2 {
                    return Err(bad_format("received copy data after EOF marker").into());
                }
                *start = p + 2;
                return Ok(());
            }
            let line = self.line_no + 1;
            let ctx = |m: String| bad_format(format!("{m} (COPY {}, line {line})", self.table));
            if count < 0 || count as usize != self.columns.len() {
                return Err(ctx(format!(
                    "row field count is {count}, expected {}",
                    self.columns.len()
                ))
                .into());
            }
            let mut q = p + 2;
            let mut key_field: Option<Option<(usize, usize)>> = None;
            for f in 0..count as usize {
                let Some(len) = i32_at(q) else {
                    return Ok(());
                };
                q += 4;
                let field = if len == -1 {
                    None
                } else if len < -1 {
                    return Err(ctx("invalid field size".into()).into());
                } else {
                    let r = (q, q + len as usize);
                    q += len as usize;
                    Some(r)
                };
                if self.key.as_ref().is_some_and(|k| k.index == f) {
                    key_field = Some(field);
                }
            }
            if buf.len() < q {
                return Ok(());
            }
            self.line_no += 1;
            let key = match &self.key {
                None => None,
                Some(k) => Some(match key_field.flatten() {
                    None => return Err(self.null_key(k).into()),
                    Some((a, b)) => {
                        decode_binary(&buf[a..b], k.ty).map_err(|e| self.field_err(e, &k.column))?
                    }
                }),
            };
            emit(Piece::Row {
                data: &buf[p..q],
                key,
            })?;
            *start = q;
        }
    }
}

enum Marker {
    Yes(usize),
    No,
    NeedMore,
}

fn parse_err(e: KeyParseError) -> RouteError {
    RouteError {
        sqlstate: e.sqlstate(),
        message: e.to_string(),
    }
}

/// A key in PostgreSQL's binary format (`int2/4/8send`, `textsend`,
/// `uuid_send`). Integers are read by their width, whatever the key
/// column's declared integer type (they hash alike).
fn decode_binary(b: &[u8], ty: KeyType) -> Result<KeyValue, RouteError> {
    let wrong = || {
        bad_format(format!(
            "incorrect binary data format: {} bytes for a {ty} shard key",
            b.len()
        ))
    };
    Ok(match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => match b.len() {
            2 => KeyValue::Int2(i16::from_be_bytes([b[0], b[1]])),
            4 => KeyValue::Int4(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                KeyValue::Int8(i64::from_be_bytes(a))
            }
            _ => return Err(wrong()),
        },
        KeyType::Uuid => {
            let a: [u8; 16] = b.try_into().map_err(|_| wrong())?;
            KeyValue::Uuid(a)
        }
        KeyType::Text => {
            let s = std::str::from_utf8(b)
                .map_err(|_| copy_err("22021", "invalid byte sequence for encoding \"UTF8\""))?;
            KeyValue::parse(KeyType::Text, s).map_err(parse_err)?
        }
    })
}

/// Scans one text-format field from `*i` as `CopyReadAttributesText`
/// does, de-escaping it into `out` when given (`\b \f \n \r \t \v`, octal
/// `\ooo`, hex `\xhh`, anything else taken literally). Returns the end of
/// the raw field (for the NULL-string comparison) and whether a delimiter
/// ended it.
fn text_field(
    content: &[u8],
    i: &mut usize,
    delim: u8,
    mut out: Option<&mut Vec<u8>>,
) -> (usize, bool) {
    let n = content.len();
    loop {
        let end = *i;
        if *i >= n {
            return (end, false);
        }
        let mut c = content[*i];
        *i += 1;
        if c == delim {
            return (end, true);
        }
        if c == b'\\' {
            if *i >= n {
                // A backslash at the end of the line is dropped.
                return (end, false);
            }
            let e = content[*i];
            *i += 1;
            c = match e {
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    for _ in 0..2 {
                        match content.get(*i) {
                            Some(&d @ b'0'..=b'7') => {
                                v = (v << 3) + u32::from(d - b'0');
                                *i += 1;
                            }
                            _ => break,
                        }
                    }
                    (v & 0xff) as u8
                }
                b'x' => match content.get(*i).and_then(|&h| char::from(h).to_digit(16)) {
                    Some(h) => {
                        let mut v = h;
                        *i += 1;
                        if let Some(h2) = content.get(*i).and_then(|&h| char::from(h).to_digit(16))
                        {
                            v = (v << 4) + h2;
                            *i += 1;
                        }
                        (v & 0xff) as u8
                    }
                    None => b'x',
                },
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 0x0b,
                other => other,
            };
        }
        if let Some(o) = out.as_deref_mut() {
            o.push(c);
        }
    }
}

#[cfg(test)]
mod tests;
