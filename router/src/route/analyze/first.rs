//! Subqueries the node runs first (issue 14): a `SELECT` (or an `UPDATE`,
//! a `DELETE`) refused over several shards because a subquery in it needs every shard's rows at
//! once — `WHERE amount > (SELECT avg(amount) FROM orders)`,
//! `SELECT count(*) FROM (SELECT DISTINCT status FROM orders) s`,
//! `WHERE product_id IN (SELECT id FROM products WHERE …)` on tables not
//! sharded alike — runs such subqueries on their own first (merged like
//! any statement of the client's), writes each answer into the statement
//! as a table of literals, and routes what is left as if the client had
//! sent it. Citus calls this recursive planning.
//!
//! What is run first: the subqueries of the outermost `SELECT` (in its
//! expressions, its FROM and its `WITH`; of an UPDATE/DELETE: SET, WHERE,
//! FROM/USING, RETURNING) that read a sharded table —
//! scalar subqueries, `IN (subquery)`, derived tables and CTEs — but not
//! `LATERAL` ones, nor the right side of `ANY`/`ALL`, nor one that names a
//! CTE of the statement. Deeper subqueries run with the one that holds
//! them (run first in turn if that one is refused).
//!
//! Why it is sound: PostgreSQL resolves a name in a subquery against the
//! subquery's own FROM first, so a subquery that runs on its own names
//! what it named inside the statement; one that refers to the outer query
//! (correlated) cannot run on its own — it fails with 42P01/42703 and the
//! node keeps the statement's refusal. An uncorrelated subquery is
//! evaluated once by PostgreSQL too (an InitPlan or a hashed SubPlan).
//! Its answer is written as `SELECT * FROM (VALUES (v::type, …), …) AS
//! z(columns)` (no rows: `… WHERE false`), the column names and types of
//! the subquery's own answer: a scalar subquery of several rows still
//! fails with PostgreSQL's 21000 when it is evaluated, and not when it is
//! not.
//!
//! Not the same as one PostgreSQL: the subquery and the statement read
//! the shards at two moments (outside a transaction block, two
//! transactions), as every statement over several shards does — for an
//! UPDATE or DELETE, as under READ COMMITTED, rows the subquery chose may
//! change before the write; a subquery that fails (division by zero)
//! fails the statement even where PostgreSQL would not have evaluated it.
//! A locking subquery (`FOR UPDATE SKIP LOCKED`: its locks would end
//! before the write), SELECT INTO and data-modifying CTEs are not run so.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FromTable, InTarget, ObjectName, Query, SetExpr, Statement, TableFactor, Visit, VisitMut,
    Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::super::names::{last_name, norm, table_name};
use super::super::Namespace;
use super::functions::{AGGREGATES, PURE_FUNCTIONS, READ_ONLY};
use crate::catalog::{RoutingSnapshot, TablePlacement};

/// At most this many subqueries of one statement are run first (each is a
/// round trip, and its answer is written into the statement).
const MAX_STEPS: usize = 16;

/// A statement with subqueries to run first.
#[derive(Debug, Clone)]
pub struct SubqueriesFirst {
    /// The statement, each such subquery's text replaced by its step's
    /// placeholder.
    template: String,
    /// In the order they are to run.
    pub steps: Vec<FirstStep>,
}

/// One subquery to run first.
#[derive(Debug, Clone)]
pub struct FirstStep {
    /// The subquery as a statement of its own.
    pub sql: String,
    /// Stands for its text in [`SubqueriesFirst::template`].
    placeholder: String,
}

impl SubqueriesFirst {
    /// The length of the statement without its subqueries.
    pub fn template_len(&self) -> usize {
        self.template.len()
    }

    /// The statement with each step's answer (`answers[i]`, a query such
    /// as [`values_query`] writes) in place of its subquery.
    pub fn substitute(&self, answers: &[String]) -> String {
        // In one pass over the template: an answer may hold any text.
        let mut at: Vec<(usize, usize, &str)> = self
            .steps
            .iter()
            .zip(answers)
            .filter_map(|(step, answer)| {
                let i = self.template.find(&step.placeholder)?;
                Some((i, step.placeholder.len(), answer.as_str()))
            })
            .collect();
        at.sort_unstable();
        let mut sql = String::with_capacity(self.template.len());
        let mut from = 0;
        for (i, len, answer) in at {
            sql.push_str(&self.template[from..i]);
            sql.push_str(answer);
            from = i + len;
        }
        sql.push_str(&self.template[from..]);
        sql
    }
}

/// A column of a subquery's answer: its name and its type, as SQL
/// (`numeric`, `public.mood`).
#[derive(Debug, Clone)]
pub struct AnswerColumn {
    /// As the subquery's answer names it.
    pub name: String,
    /// A type name PostgreSQL reads in a cast.
    pub type_sql: String,
}

/// The query that gives `rows` (values in their text form, None for NULL)
/// under `columns`: `SELECT * FROM (VALUES (E'…'::t, …), (…)) AS
/// z("a", …)`, the first row's values cast to their column's type (the
/// others take it, as PostgreSQL types a VALUES column); no rows: one row
/// of typed NULLs and `WHERE false`.
pub fn values_query(columns: &[AnswerColumn], rows: &[Vec<Option<&str>>]) -> String {
    let mut out = String::from("SELECT * FROM (VALUES ");
    let null_row: Vec<Option<&str>>;
    let empty = rows.is_empty();
    let rows = if empty {
        null_row = vec![None; columns.len()];
        std::slice::from_ref(&null_row)
    } else {
        rows
    };
    for (r, row) in rows.iter().enumerate() {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (c, v) in row.iter().enumerate() {
            if c > 0 {
                out.push_str(", ");
            }
            match v {
                Some(v) => push_literal(&mut out, v),
                None => out.push_str("NULL"),
            }
            if r == 0 {
                if let Some(col) = columns.get(c) {
                    out.push_str("::");
                    out.push_str(&col.type_sql);
                }
            }
        }
        out.push(')');
    }
    out.push_str(") AS z(");
    for (c, col) in columns.iter().enumerate() {
        if c > 0 {
            out.push_str(", ");
        }
        out.push_str(&quote_ident(&col.name));
    }
    out.push(')');
    if empty {
        out.push_str(" WHERE false");
    }
    out
}

/// A string literal PostgreSQL reads as `v` whatever
/// `standard_conforming_strings` says.
fn push_literal(out: &mut String, v: &str) {
    if v.contains('\\') {
        out.push_str("E'");
        for ch in v.chars() {
            match ch {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("''"),
                c => out.push(c),
            }
        }
    } else {
        out.push('\'');
        for ch in v.chars() {
            if ch == '\'' {
                out.push('\'');
            }
            out.push(ch);
        }
    }
    out.push('\'');
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The subqueries of `sql` to run first, if it is one `SELECT` with some.
pub fn subqueries_first(
    snapshot: &RoutingSnapshot,
    ns: &Namespace,
    sql: &str,
) -> Option<SubqueriesFirst> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let mut stmt = stmts.pop()?;
    if !stmts.is_empty() {
        return None;
    }
    // A prefix no text of the statement holds; a hint in a comment would
    // be lost when the statement is written again.
    let prefix = String::from("hotrepart_first_");
    if sql.contains(&prefix) || sql.contains("hotrepart:") {
        return None;
    }
    let mut f = Finder {
        snapshot,
        ns,
        ctes: BTreeSet::new(),
        prefix,
        depth: 0,
        top: 1,
        steps: Vec::new(),
        bail: false,
    };
    match &mut stmt {
        // One plain SELECT (not SELECT INTO), reading only.
        Statement::Query(query) => {
            if !matches!(query.body.as_ref(), SetExpr::Select(s) if s.into.is_none())
                || locks_or_writes(query)
            {
                return None;
            }
            f.ctes = query
                .with
                .iter()
                .flat_map(|w| w.cte_tables.iter())
                .map(|c| norm(&c.alias.name))
                .collect();
            if let Some(with) = query.with.as_mut() {
                if !with.recursive {
                    for cte in &mut with.cte_tables {
                        // A CTE may name the ones before it: those are not
                        // run first (`Finder::candidate` sees their names).
                        f.take(&mut cte.query);
                    }
                }
            }
            let _ = VisitMut::visit(query, &mut f);
        }
        // An UPDATE or DELETE: its expressions and FROM/USING sit in no
        // query of their own. A locking subquery is not taken (its locks
        // would be released before the write).
        Statement::Update(_) | Statement::Delete(_) => {
            // A lock anywhere (inside a derived table of a subquery too)
            // would end with the step's transaction; a reference table's
            // copies could each pick another of several matching answer
            // rows (UPDATE … FROM).
            if locks_or_writes_in(&stmt) || writes_reference(snapshot, ns, &stmt) {
                return None;
            }
            f.top = 0;
            let _ = VisitMut::visit(&mut stmt, &mut f);
        }
        _ => return None,
    }
    if f.bail || f.steps.is_empty() || f.steps.len() > MAX_STEPS {
        return None;
    }
    let template = stmt.to_string();
    // Each placeholder once (`…_1_` is no part of `…_10_`).
    if f.steps
        .iter()
        .any(|s| template.matches(&s.placeholder).count() != 1)
    {
        return None;
    }
    Some(SubqueriesFirst {
        template,
        steps: f.steps,
    })
}

/// [`locks_or_writes`] of every query of an UPDATE or DELETE.
fn locks_or_writes_in(stmt: &Statement) -> bool {
    struct L(bool, usize);
    impl Visitor for L {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if locks_or_writes(q) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_statement(&mut self, _s: &Statement) -> ControlFlow<()> {
            // The statement itself is the first.
            self.1 += 1;
            if self.1 > 1 {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut l = L(false, 0);
    let _ = stmt.visit(&mut l);
    l.0
}

/// Whether an UPDATE or DELETE writes a reference table.
fn writes_reference(snapshot: &RoutingSnapshot, ns: &Namespace, stmt: &Statement) -> bool {
    let target = match stmt {
        Statement::Update(u) => Some(&u.table.relation),
        Statement::Delete(d) => match &d.from {
            FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) => {
                v.first().map(|t| &t.relation)
            }
        },
        _ => None,
    };
    match target {
        Some(TableFactor::Table { name, .. }) => table_name(ns, name).map_or(true, |t| {
            matches!(snapshot.placement(&t), TablePlacement::Reference)
        }),
        _ => true,
    }
}

/// A `FOR UPDATE`/`FOR SHARE`, or a statement (a data-modifying CTE),
/// anywhere in `q`.
fn locks_or_writes(q: &Query) -> bool {
    struct L(bool);
    impl Visitor for L {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if !q.locks.is_empty() {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_statement(&mut self, _s: &Statement) -> ControlFlow<()> {
            self.0 = true;
            ControlFlow::Break(())
        }
    }
    let mut l = L(false);
    let _ = q.visit(&mut l);
    l.0
}

/// A call anywhere in `q` of a function not known to write nothing: run
/// first outside a transaction block, its writes would be committed
/// even if the statement then fails.
fn calls_unknown(q: &Query) -> bool {
    any_expr(q, |e| {
        let Expr::Function(f) = e else {
            return false;
        };
        let n = last_name(&f.name);
        let n = n.as_str();
        !READ_ONLY.contains(&n) && !PURE_FUNCTIONS.contains(&n) && !AGGREGATES.contains(&n)
    })
}

/// A `COLLATE` anywhere in `q`: the collation of its answer's columns
/// would not survive as VALUES (typed by name, of the default collation).
fn collates(q: &Query) -> bool {
    any_expr(q, |e| matches!(e, Expr::Collate { .. }))
}

/// Whether some expression anywhere in `q` is `hit`.
fn any_expr(q: &Query, hit: impl Fn(&Expr) -> bool) -> bool {
    struct V<F>(F, bool);
    impl<F: Fn(&Expr) -> bool> Visitor for V<F> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if (self.0)(e) {
                self.1 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = V(hit, false);
    let _ = q.visit(&mut v);
    v.1
}

struct Finder<'a> {
    snapshot: &'a RoutingSnapshot,
    ns: &'a Namespace,
    /// The statement's CTE names (lower case).
    ctes: BTreeSet<String>,
    prefix: String,
    /// Queries entered: 1 in a SELECT's own.
    depth: usize,
    /// The depth of the statement's own expressions: 1 in a SELECT, 0 in
    /// an UPDATE or DELETE.
    top: usize,
    steps: Vec<FirstStep>,
    /// A form this does not rewrite (`ANY`/`ALL` of a subquery).
    bail: bool,
}

impl Finder<'_> {
    /// Whether `q` reads a sharded table and names no CTE of the
    /// statement.
    fn candidate(&self, q: &Query) -> bool {
        struct Reads<'b> {
            f: &'b Finder<'b>,
            sharded: bool,
            cte: bool,
        }
        impl Visitor for Reads<'_> {
            type Break = ();
            fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
                if name.0.len() == 1 && self.f.ctes.contains(&last_name(name)) {
                    self.cte = true;
                    return ControlFlow::Break(());
                }
                if let Ok(t) = table_name(self.f.ns, name) {
                    if matches!(self.f.snapshot.placement(&t), TablePlacement::Sharded(_)) {
                        self.sharded = true;
                    }
                }
                ControlFlow::Continue(())
            }
        }
        if !q.locks.is_empty() || collates(q) || calls_unknown(q) {
            return false;
        }
        let mut r = Reads {
            f: self,
            sharded: false,
            cte: false,
        };
        let _ = q.visit(&mut r);
        r.sharded && !r.cte
    }

    /// Makes `q` a step if it is a candidate.
    fn take(&mut self, q: &mut Query) {
        if !self.candidate(q) {
            return;
        }
        let placeholder = format!("{}{}_", self.prefix, self.steps.len());
        let Some(p) = placeholder_query(&placeholder) else {
            self.bail = true;
            return;
        };
        let sql = q.to_string();
        *q = p;
        self.steps.push(FirstStep {
            sql,
            // As the statement's text shows it.
            placeholder: format!("SELECT {placeholder}"),
        });
    }
}

fn placeholder_query(name: &str) -> Option<Query> {
    match Parser::parse_sql(&PostgreSqlDialect {}, &format!("SELECT {name}"))
        .ok()?
        .pop()?
    {
        Statement::Query(q) => Some(*q),
        _ => None,
    }
}

impl VisitorMut for Finder<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
        if self.depth == self.top {
            if let TableFactor::Derived {
                lateral: false,
                subquery,
                ..
            } = t
            {
                self.take(subquery);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if self.depth != self.top {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::AnyOp { right, .. } | Expr::AllOp { right, .. }
                if matches!(right.as_ref(), Expr::Subquery(_)) =>
            {
                self.bail = true;
                ControlFlow::Break(())
            }
            Expr::Subquery(q)
            | Expr::In {
                target: InTarget::Subquery(q),
                ..
            } => {
                self.take(q);
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot() -> RoutingSnapshot {
        crate::fuzzing::snapshot()
    }

    /// The steps' texts and the template with `#i` for placeholder i.
    fn first(sql: &str) -> Option<(Vec<String>, String)> {
        let f = subqueries_first(&snapshot(), &Namespace::default(), sql)?;
        let marks: Vec<String> = (0..f.steps.len()).map(|i| format!("#{i}")).collect();
        Some((
            f.steps.iter().map(|s| s.sql.clone()).collect(),
            f.substitute(&marks),
        ))
    }

    #[test]
    fn subqueries_reading_sharded_tables_run_first() {
        let (steps, t) =
            first("SELECT * FROM users WHERE age > (SELECT avg(age) FROM users)").unwrap();
        assert_eq!(steps, ["SELECT avg(age) FROM users"]);
        assert_eq!(t, "SELECT * FROM users WHERE age > (#0)");
        let (steps, t) =
            first("SELECT count(*) FROM (SELECT DISTINCT name FROM users) AS s").unwrap();
        assert_eq!(steps, ["SELECT DISTINCT name FROM users"]);
        assert_eq!(t, "SELECT count(*) FROM (#0) AS s");
        let (steps, t) = first(
            "WITH n AS (SELECT DISTINCT name FROM users), m AS (SELECT * FROM n) SELECT o.* FROM orders o WHERE o.note NOT IN (SELECT name FROM users WHERE age > 3) AND o.id IN (SELECT 1)",
        )
        .unwrap();
        // m names CTE n; SELECT 1 reads no sharded table.
        assert_eq!(
            steps,
            [
                "SELECT DISTINCT name FROM users",
                "SELECT name FROM users WHERE age > 3"
            ]
        );
        assert_eq!(
            t,
            "WITH n AS (#0), m AS (SELECT * FROM n) SELECT o.* FROM orders o WHERE o.note NOT IN (#1) AND o.id IN (SELECT 1)"
        );
        // Writes: UPDATE (SET, WHERE, FROM, RETURNING) and DELETE.
        let (steps, t) = first(
            "UPDATE users SET age = (SELECT max(age) FROM users) WHERE id IN (SELECT id FROM users ORDER BY age LIMIT 5) RETURNING id, (SELECT min(age) FROM users)",
        )
        .unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(
            t,
            "UPDATE users SET age = (#0) WHERE id IN (#1) RETURNING id, (#2)"
        );
        let (steps, t) = first(
            "DELETE FROM orders USING (SELECT user_id FROM orders GROUP BY user_id HAVING count(*) > 3) AS big WHERE orders.user_id = big.user_id AND total < (SELECT avg(total) FROM orders)",
        )
        .unwrap();
        assert_eq!(steps.len(), 2);
        assert!(t.starts_with("DELETE FROM orders USING (#0) AS big"), "{t}");
        // A CTE read twice is run once; the subquery naming it stays.
        let (steps, t) = first(
            "WITH x AS (SELECT * FROM users) SELECT * FROM x WHERE age > (SELECT avg(age) FROM x)",
        )
        .unwrap();
        assert_eq!(steps, ["SELECT * FROM users"]);
        assert_eq!(
            t,
            "WITH x AS (#0) SELECT * FROM x WHERE age > (SELECT avg(age) FROM x)"
        );
        // Many steps; answers holding any text, placeholders included.
        let too_many: Vec<String> = (0..17)
            .map(|i| format!("(SELECT max(age) + {i} FROM users)"))
            .collect();
        assert!(first(&format!("SELECT {}", too_many.join(", "))).is_none());
        let many: Vec<String> = (0..12)
            .map(|i| format!("(SELECT max(age) + {i} FROM users)"))
            .collect();
        let sql = format!("SELECT {}", many.join(", "));
        let f = subqueries_first(&snapshot(), &Namespace::default(), &sql).unwrap();
        assert_eq!(f.steps.len(), 12);
        let answers: Vec<String> = f
            .steps
            .iter()
            .rev()
            .map(|s| s.placeholder.clone())
            .collect();
        let want: Vec<String> = answers.iter().map(|a| format!("({a})")).collect();
        assert_eq!(
            f.substitute(&answers),
            format!("SELECT {}", want.join(", "))
        );
        // Deeper subqueries stay inside the step that holds them.
        let (steps, _) = first(
            "SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders WHERE user_id IN (SELECT id FROM users WHERE age > (SELECT 1)))",
        )
        .unwrap();
        assert_eq!(steps.len(), 1);
    }

    #[test]
    fn what_cannot_run_on_its_own_stays() {
        for sql in [
            "SELECT * FROM countries WHERE code IN (SELECT code FROM countries)",
            "SELECT * FROM users WHERE age > ALL (SELECT age FROM users)",
            "SELECT * FROM users u, LATERAL (SELECT count(*) FROM orders o WHERE o.user_id = u.id) c",
            "SELECT * FROM users WHERE age > (SELECT avg(age) FROM users) FOR UPDATE",
            "SELECT * FROM users WHERE age > (SELECT age FROM users LIMIT 1 FOR UPDATE)",
            "UPDATE users SET age = 1 WHERE id IN (SELECT id FROM users ORDER BY age LIMIT 5 FOR UPDATE SKIP LOCKED)",
            "INSERT INTO users (id, age) SELECT id + 1000, age FROM users WHERE age > (SELECT avg(age) FROM users)",
            "UPDATE orders SET note = 'x' WHERE id IN (SELECT id FROM (SELECT id FROM orders ORDER BY id LIMIT 5 FOR UPDATE SKIP LOCKED) s)",
            "UPDATE countries c SET top = d.id FROM (SELECT country, max(id) AS id FROM users GROUP BY country) d WHERE c.code = d.country",
            "DELETE FROM countries WHERE code IN (SELECT country FROM users GROUP BY country HAVING count(*) < 2)",
            "UPDATE users SET age = 1 WHERE id IN (SELECT audit_pick(id) FROM users ORDER BY age LIMIT 5)",
            "SELECT * FROM users WHERE age > (SELECT avg(my_score(age)) FROM users)",
            "SELECT * INTO t2 FROM users WHERE age > (SELECT avg(age) FROM users)",
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d WHERE total > (SELECT avg(total) FROM orders)",
            r#"SELECT count(*) FROM (SELECT DISTINCT name COLLATE "C" FROM users) s"#,
            "/* hotrepart: shard=s1 */ SELECT * FROM users WHERE age > (SELECT avg(age) FROM users)",
            "SELECT 'hotrepart_first_0' FROM users WHERE age > (SELECT avg(age) FROM users)",
            "SELECT 1 UNION SELECT avg(age) FROM (SELECT age FROM users) s",
        ] {
            assert!(first(sql).is_none(), "{sql}");
        }
    }

    #[test]
    fn answers_are_typed_values_under_their_names() {
        let cols = [
            AnswerColumn {
                name: "a\"b".into(),
                type_sql: "numeric".into(),
            },
            AnswerColumn {
                name: "t".into(),
                type_sql: "text".into(),
            },
        ];
        assert_eq!(
            values_query(
                &cols,
                &[vec![Some("1.5"), None], vec![None, Some("it's \\ ok")]]
            ),
            r#"SELECT * FROM (VALUES ('1.5'::numeric, NULL::text), (NULL, E'it''s \\ ok')) AS z("a""b", "t")"#
        );
        assert_eq!(
            values_query(&cols, &[]),
            r#"SELECT * FROM (VALUES (NULL::numeric, NULL::text)) AS z("a""b", "t") WHERE false"#
        );
    }
}
