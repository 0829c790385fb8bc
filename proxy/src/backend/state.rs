//! Session state that must follow a client across pooled backends: the
//! values of settings the client changed (`SET`, `set_config`, startup
//! parameters).
//!
//! One mechanism covers them all: after a transaction in which the client
//! may have changed a setting, the node reads the backend's own view
//! (`pg_settings WHERE source = 'session'`) and keeps it as the client's
//! state; before a client runs on a backend whose state fingerprint differs,
//! the node replays it with `RESET ALL` and `set_config`. So what the node
//! replays is what PostgreSQL itself reported — including SETs that were
//! rolled back, `SET LOCAL`, or `set_config()` inside a SELECT. Which
//! statements may change state (and which custom settings they name) is
//! the router's classification ([`hotrepart_router::classify`]).

use crate::error::sqlstate;
use std::hash::{Hash, Hasher};

/// Settings a client has changed, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    settings: Vec<(String, String)>,
}

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

impl SessionState {
    pub fn from_pairs(mut settings: Vec<(String, String)>) -> SessionState {
        settings.sort();
        settings.dedup_by(|a, b| a.0 == b.0);
        SessionState { settings }
    }

    /// Builds the initial state from a client's startup parameters.
    /// Returns the SQLSTATE and message for an option the node cannot
    /// honour or a value PostgreSQL would refuse.
    pub fn from_startup(
        params: &[(String, String)],
    ) -> Result<SessionState, (&'static str, String)> {
        let mut v = Vec::new();
        for (k, val) in params {
            if k == "options" {
                v.extend(parse_options(val).map_err(|m| (sqlstate::FEATURE_NOT_SUPPORTED, m))?);
                continue;
            }
            if NOT_SETTINGS.contains(&k.as_str()) {
                continue;
            }
            // libpq sends client_encoding=auto from a terminal; the server
            // resolves it at startup, which a set_config cannot do.
            if k == "client_encoding" && val.eq_ignore_ascii_case("auto") {
                continue;
            }
            // PostgreSQL reports (ParameterStatus) and replays the
            // encoding's own name: `UTF8` for `utf-8`.
            if k.eq_ignore_ascii_case("client_encoding") {
                let name = canonical_encoding(val).ok_or_else(|| {
                    (
                        sqlstate::INVALID_PARAMETER_VALUE,
                        format!("invalid value for parameter \"client_encoding\": \"{val}\""),
                    )
                })?;
                v.push(("client_encoding".into(), name.into()));
                continue;
            }
            v.push((k.to_ascii_lowercase(), val.clone()));
        }
        Ok(SessionState::from_pairs(v))
    }

    /// The settings, as (name, value) pairs.
    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.settings.hash(&mut h);
        h.finish()
    }

    /// SQL that turns any backend's session state into this one.
    pub fn replay_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        if !self.settings.is_empty() {
            sql.push_str(";SELECT ");
            for (i, (k, v)) in self.settings.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str("pg_catalog.set_config(");
                sql.push_str(&quote_literal(k));
                sql.push(',');
                sql.push_str(&quote_literal(v));
                sql.push_str(",false)");
            }
        }
        sql
    }
}

/// Query that reads a backend's session state: every built-in setting the
/// session changed, plus the custom (`prefix.name`) settings the client set,
/// which `pg_settings` does not list.
pub fn read_state_sql(custom: &std::collections::BTreeSet<String>) -> String {
    let mut sql =
        String::from("SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' AND name NOT IN ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable')");
    for name in custom {
        sql.push_str(" UNION ALL SELECT ");
        sql.push_str(&quote_literal(name));
        sql.push_str(", pg_catalog.current_setting(");
        sql.push_str(&quote_literal(name));
        sql.push_str(", true)");
    }
    sql
}

/// Re-exported for the session's call sites (`state::quote_literal`);
/// the one definition is [`crate::sql::quote_literal`].
pub use crate::sql::quote_literal;

/// The session's `standard_conforming_strings` as PostgreSQL reported it:
/// the client's own value, else the server's default (`server`).
pub fn standard_conforming_strings(state: &SessionState, server: bool) -> bool {
    match state.get("standard_conforming_strings") {
        Some(v) => on(v),
        None => server,
    }
}

/// A boolean setting's value as PostgreSQL prints or accepts it.
pub fn on(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "on" | "true" | "yes" | "1" | "t" | "y"
    )
}

fn parse_options(opts: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut words = opts.split_whitespace();
    while let Some(w) = words.next() {
        let kv = if w == "-c" {
            words
                .next()
                .ok_or_else(|| "startup option -c needs name=value".to_string())?
        } else if let Some(r) = w.strip_prefix("-c") {
            r
        } else if let Some(r) = w.strip_prefix("--") {
            r
        } else {
            return Err(format!(
                "startup option {w:?} is not supported by hotrepart"
            ));
        };
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("startup option {kv:?} is not name=value"))?;
        out.push((k.replace('-', "_").to_ascii_lowercase(), v.to_string()));
    }
    Ok(out)
}

/// PostgreSQL's name of a client encoding given under any of the names it
/// accepts (its `pg_encname_tbl`: case and punctuation ignored, so
/// `utf-8`, `Unicode` and `UTF8` are all `UTF8`). None: PostgreSQL would
/// refuse the name.
pub fn canonical_encoding(name: &str) -> Option<&'static str> {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Some(match clean.as_str() {
        "abc" | "tcvn" | "tcvn5712" | "vscii" | "win1258" | "windows1258" => "WIN1258",
        "alt" | "win866" | "windows866" => "WIN866",
        "big5" | "win950" | "windows950" => "BIG5",
        "euccn" => "EUC_CN",
        "eucjis2004" => "EUC_JIS_2004",
        "eucjp" => "EUC_JP",
        "euckr" => "EUC_KR",
        "euctw" => "EUC_TW",
        "gb18030" => "GB18030",
        "gbk" | "win936" | "windows936" => "GBK",
        "iso88591" | "latin1" => "LATIN1",
        "iso885910" | "latin6" => "LATIN6",
        "iso885913" | "latin7" => "LATIN7",
        "iso885914" | "latin8" => "LATIN8",
        "iso885915" | "latin9" => "LATIN9",
        "iso885916" | "latin10" => "LATIN10",
        "iso88592" | "latin2" => "LATIN2",
        "iso88593" | "latin3" => "LATIN3",
        "iso88594" | "latin4" => "LATIN4",
        "iso88595" => "ISO_8859_5",
        "iso88596" => "ISO_8859_6",
        "iso88597" => "ISO_8859_7",
        "iso88598" => "ISO_8859_8",
        "iso88599" | "latin5" => "LATIN5",
        "johab" => "JOHAB",
        "koi8" | "koi8r" => "KOI8R",
        "koi8u" => "KOI8U",
        "mskanji" | "shiftjis" | "sjis" | "win932" | "windows932" => "SJIS",
        "muleinternal" => "MULE_INTERNAL",
        "shiftjis2004" => "SHIFT_JIS_2004",
        "sqlascii" => "SQL_ASCII",
        "uhc" | "win949" | "windows949" => "UHC",
        "unicode" | "utf8" => "UTF8",
        "win" | "win1251" | "windows1251" => "WIN1251",
        "win1250" | "windows1250" => "WIN1250",
        "win1252" | "windows1252" => "WIN1252",
        "win1253" | "windows1253" => "WIN1253",
        "win1254" | "windows1254" => "WIN1254",
        "win1255" | "windows1255" => "WIN1255",
        "win1256" | "windows1256" => "WIN1256",
        "win1257" | "windows1257" => "WIN1257",
        "win874" | "windows874" => "WIN874",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_encoding_names_as_postgresql_reports_them() {
        use super::{canonical_encoding, SessionState};
        for (given, name) in [
            ("utf-8", "UTF8"),
            ("UTF8", "UTF8"),
            ("Unicode", "UTF8"),
            ("latin-9", "LATIN9"),
            ("ISO-8859-15", "LATIN9"),
            ("euc_jp", "EUC_JP"),
            ("win1252", "WIN1252"),
            ("sql_ascii", "SQL_ASCII"),
        ] {
            assert_eq!(canonical_encoding(given), Some(name), "{given}");
        }
        assert_eq!(canonical_encoding("klingon"), None);
        let s = SessionState::from_startup(&[("client_encoding".into(), "utf-8".into())])
            .expect("utf-8 is an encoding");
        assert_eq!(s.get("client_encoding"), Some("UTF8"));
        assert!(
            SessionState::from_startup(&[("client_encoding".into(), "klingon".into())]).is_err()
        );
    }

    use super::*;

    #[test]
    fn startup_params_become_state() {
        let p = vec![
            ("user".into(), "u".into()),
            ("database".into(), "d".into()),
            ("application_name".into(), "psql".into()),
            ("client_encoding".into(), "auto".into()),
            (
                "options".into(),
                "-c search_path=a,b --work-mem=64MB".into(),
            ),
        ];
        let s = SessionState::from_startup(&p).expect("state");
        assert_eq!(s.get("application_name"), Some("psql"));
        assert_eq!(s.get("search_path"), Some("a,b"));
        assert_eq!(s.get("work_mem"), Some("64MB"));
        assert_eq!(s.get("client_encoding"), None);
        assert!(SessionState::from_startup(&[("options".into(), "-x".into())]).is_err());
    }

    #[test]
    fn literals_read_the_same_under_both_string_settings() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
        let s =
            SessionState::from_pairs(vec![("standard_conforming_strings".into(), "off".into())]);
        assert!(!standard_conforming_strings(&s, true));
        assert!(standard_conforming_strings(&SessionState::default(), true));
        assert!(!standard_conforming_strings(
            &SessionState::default(),
            false
        ));
    }

    #[test]
    fn replay_sql_quotes() {
        let s = SessionState::from_pairs(vec![("application_name".into(), "it's".into())]);
        assert_eq!(
            s.replay_sql(),
            "RESET ALL;SELECT pg_catalog.set_config('application_name','it''s',false)"
        );
        assert_ne!(s.fingerprint(), SessionState::default().fingerprint());
    }
}
