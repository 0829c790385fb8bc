//! `CREATE DATABASE` / `DROP DATABASE`, recognised by the lexer: the node
//! runs them on every shard one at a time, outside a transaction
//! (PostgreSQL cannot run them in one), and makes a retry finish the job.

use super::{unquote, Kind, Lexer};

/// A string that is exactly one `CREATE DATABASE` or `DROP DATABASE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseStatement {
    /// `CREATE` (else `DROP`).
    pub create: bool,
    /// The database, as PostgreSQL reads the name (unquoted: lower case).
    pub name: String,
    /// `DROP DATABASE IF EXISTS`.
    pub if_exists: bool,
}

/// Recognises `CREATE DATABASE name …` and `DROP DATABASE [IF EXISTS]
/// name …` (the rest is PostgreSQL's to check); None for anything else,
/// several statements included.
pub fn database_statement(sql: &str) -> Option<DatabaseStatement> {
    let mut lx = Lexer::new(sql);
    let word = |t: Option<super::Tok>| {
        t.filter(|t| t.kind == Kind::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let create = match word(lx.next())?.as_str() {
        "create" => true,
        "drop" => false,
        _ => return None,
    };
    if word(lx.next())?.as_str() != "database" {
        return None;
    }
    let mut t = lx.next()?;
    let mut if_exists = false;
    if !create && word(Some(t)).as_deref() == Some("if") {
        let mut ahead = lx;
        if word(ahead.next()).as_deref() == Some("exists") {
            if_exists = true;
            lx = ahead;
            t = lx.next()?;
        }
    }
    let name = match t.kind {
        Kind::Word => sql[t.start..t.end].to_ascii_lowercase(),
        Kind::Quoted => unquote(sql, t),
        _ => return None,
    };
    // One statement only.
    let mut seen_semi = false;
    for t in std::iter::from_fn(|| lx.next()) {
        match t.kind {
            Kind::Semi => seen_semi = true,
            _ if seen_semi => return None,
            _ => {}
        }
    }
    Some(DatabaseStatement {
        create,
        name,
        if_exists,
    })
}
