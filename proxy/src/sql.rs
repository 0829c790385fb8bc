//! SQL text helpers: quoting identifiers, catalog table names and string
//! literals for SQL the node writes itself (state replay, namespace probe,
//! admin checks, the reshard engine, rebalance estimates). A leaf module:
//! it imports nothing of the crate. (What a client's SQL does is the
//! router's to say: `hotrepart_router::classify`.)
//!
//! Guarantees:
//! - [`quote_ident`] always quotes, so case, dots, spaces and keywords
//!   survive: the identifier PostgreSQL reads is exactly the string given;
//! - [`quote_table`] reads a catalog name as the router writes it
//!   (`hotrepart_router`'s `table_name`): `s.t` is table `t` in schema
//!   `s`, `t` (no dot) is `t` as the search path finds it; the parts are
//!   raw (unquoted) names, and everything after the first dot is the table
//!   name (`s.a.b` is table `a.b` in schema `s`);
//! - [`quote_literal`] reads the same whatever `standard_conforming_strings`
//!   is (a server or a client may turn it off).

/// `s` as a quoted SQL identifier: `"s"`, with `"` doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A catalog table name as SQL: `schema.table` → `"schema"."table"`
/// (split at the first dot), `table` → `"table"`.
pub fn quote_table(name: &str) -> String {
    match name.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(name),
    }
}

/// `s` as an SQL string literal that reads the same whatever
/// `standard_conforming_strings` is: a value with a backslash is written
/// as `E'…'` with the backslash doubled; `'` is doubled in both forms.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        for (name, sql) in [
            ("items", r#""items""#),
            ("Items", r#""Items""#),
            ("MiXeD_case", r#""MiXeD_case""#),
            ("select", r#""select""#),
            ("a b", r#""a b""#),
            (r#"we"ird"#, r#""we""ird""#),
            (r#""""#, r#""""""""#),
            ("a.b", r#""a.b""#),
            (r"back\slash", r#""back\slash""#),
            ("", r#""""#),
        ] {
            assert_eq!(quote_ident(name), sql, "{name:?}");
        }
    }

    #[test]
    fn catalog_names_are_schema_dot_table() {
        for (name, sql) in [
            ("items", r#""items""#),
            ("public.items", r#""public"."items""#),
            ("Sales.Orders", r#""Sales"."Orders""#),
            // Everything after the first dot is the table's name.
            ("s.a.b", r#""s"."a.b""#),
            (r#"s"x.t"y"#, r#""s""x"."t""y""#),
            (r"s\.t\", r#""s\"."t\""#),
        ] {
            assert_eq!(quote_table(name), sql, "{name:?}");
        }
    }

    #[test]
    fn literals_read_the_same_under_both_string_settings() {
        for (value, sql) in [
            ("plain", "'plain'"),
            ("it's", "'it''s'"),
            ("''", "''''''"),
            (r"a\b", r"E'a\\b'"),
            (r"a\b'c", r"E'a\\b''c'"),
            (r"\", r"E'\\'"),
            ("MiXeD", "'MiXeD'"),
            ("s.t", "'s.t'"),
            (r#""q""#, r#"'"q"'"#),
            ("", "''"),
        ] {
            assert_eq!(quote_literal(value), sql, "{value:?}");
        }
    }
}
