//! Data-driven routing tests: every case of `tests/cases.txt` (SQL,
//! parameters, hints → expected route) through one helper.
//!
//! The file's format is described at its top. Expected shards are written
//! literally (they were read once off the hash, which is itself pinned to
//! PostgreSQL elsewhere), so these tests do not recompute what they check.

mod common;

use hotrepart_router::catalog::{RoutingSnapshot, ShardId};
use hotrepart_router::route::{
    route, Combined, CompareOp, HavingExpr, Hints, LimitSpec, Literal, MergeNeed, MergePlan,
    Operand, Param, Partial, Route, ShardCol, SortKey, StatementKind, Target,
};

/// 4 shards s0..s3 with 4 equal ranges (range i owned by s_i), seed 0;
/// users(id int8), orders(user_id int8) and items(id int4) co-located
/// (integer keys hash alike), events(tenant text), devices(uuid uuid),
/// "Mixed"("Key" int8), app.accounts(id int8), reference table countries,
/// home shard s0.
fn snapshot() -> RoutingSnapshot {
    common::cases_snapshot()
}

/// An owned parameter, so the case can lend `Param`s.
struct OwnedParam {
    bytes: Option<Vec<u8>>,
    binary: bool,
    oid: Option<u32>,
}

fn parse_param(spec: &str) -> Result<OwnedParam, String> {
    if spec == "null" {
        return Ok(OwnedParam {
            bytes: None,
            binary: false,
            oid: None,
        });
    }
    let (spec, oid) = match spec.rsplit_once('@') {
        Some((s, o)) => (
            s,
            Some(o.parse::<u32>().map_err(|e| format!("oid {o}: {e}"))?),
        ),
        None => (spec, None),
    };
    let (kind, value) = spec
        .split_once(':')
        .ok_or_else(|| format!("param {spec:?} needs KIND:VALUE"))?;
    let int = |v: &str| v.parse::<i64>().map_err(|e| format!("{v}: {e}"));
    let bytes = match kind {
        "t" => value.as_bytes().to_vec(),
        "b2" => (int(value)? as i16).to_be_bytes().to_vec(),
        "b4" => (int(value)? as i32).to_be_bytes().to_vec(),
        "b8" => int(value)?.to_be_bytes().to_vec(),
        "btext" => value.as_bytes().to_vec(),
        "buuid" => {
            let hex: String = value.chars().filter(|c| *c != '-').collect();
            (0..16)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
                .collect::<Result<Vec<u8>, String>>()?
        }
        "barr8" => {
            // One-dimensional int8[] in binary array format.
            let elems: Vec<i64> = value.split(',').map(int).collect::<Result<_, _>>()?;
            let mut b = Vec::new();
            for v in [1i32, 0, 20, elems.len() as i32, 1] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            for e in elems {
                b.extend_from_slice(&8i32.to_be_bytes());
                b.extend_from_slice(&e.to_be_bytes());
            }
            b
        }
        other => return Err(format!("unknown param kind {other:?}")),
    };
    Ok(OwnedParam {
        bytes: Some(bytes),
        binary: kind != "t",
        oid,
    })
}

fn kind_name(k: &StatementKind) -> String {
    match k {
        StatementKind::Copy { direction, .. } => format!("Copy{direction:?}"),
        other => format!("{other:?}"),
    }
}

fn shard_list(v: &[ShardId]) -> String {
    v.iter().map(ShardId::as_str).collect::<Vec<_>>().join(",")
}

/// Renders a result in the file's notation, for comparison and messages.
fn render(r: &Result<Route, hotrepart_router::route::RouteError>) -> String {
    match r {
        Err(e) => format!("REFUSE:{}", e.sqlstate),
        Ok(route) => match &route.target {
            Target::Any => "ANY".to_owned(),
            Target::All => "ALL".to_owned(),
            Target::One(s) => s.to_string(),
            Target::Shards(v) => shard_list(v),
            Target::Split(parts) => {
                let parts: Vec<String> = parts
                    .iter()
                    .map(|p| format!("{}={}", p.shard, count_rows(&p.sql)))
                    .collect();
                format!("SPLIT:{}", parts.join(","))
            }
        },
    }
}

/// Number of VALUES rows in a rewritten INSERT (re-parsed, so the rewrite is
/// also checked to be valid SQL).
fn count_rows(sql: &str) -> String {
    use sqlparser::ast::{SetExpr, Statement};
    use sqlparser::dialect::PostgreSqlDialect;
    let Ok(stmts) = sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return format!("<unparsable {sql:?}>");
    };
    match stmts.as_slice() {
        [Statement::Insert(ins)] => match ins.source.as_ref().map(|s| s.body.as_ref()) {
            Some(SetExpr::Values(v)) => v.rows.len().to_string(),
            _ => "<no values>".to_owned(),
        },
        _ => "<not one insert>".to_owned(),
    }
}

fn render_combined(c: &Combined) -> String {
    match c {
        Combined::Col(i) => format!("#{i}"),
        Combined::Avg { sum, count } => format!("avg(#{sum}/#{count})"),
        Combined::CountAs { col, to } => format!("{to:?}(#{col})").to_lowercase(),
    }
}

fn render_limit(l: &LimitSpec) -> String {
    match l {
        LimitSpec::Count(n) => n.to_string(),
        LimitSpec::Param(i) => format!("${}", i + 1),
    }
}

fn render_operand(o: &Operand) -> String {
    match o {
        Operand::Value(c) => render_combined(c),
        Operand::Param(i) => format!("${}", i + 1),
        Operand::Literal(Literal::Null) => "null".to_owned(),
        Operand::Literal(Literal::Bool(b)) => b.to_string(),
        Operand::Literal(Literal::Number(n)) => n.clone(),
        Operand::Literal(Literal::String(s)) => format!("'{s}'"),
        Operand::Literal(Literal::Text(s)) => format!("'{s}'::text"),
    }
}

fn render_having(h: &HavingExpr) -> String {
    match h {
        HavingExpr::And(a, b) => format!("and({},{})", render_having(a), render_having(b)),
        HavingExpr::Or(a, b) => format!("or({},{})", render_having(a), render_having(b)),
        HavingExpr::Not(a) => format!("not({})", render_having(a)),
        HavingExpr::IsNull { operand, negated } => format!(
            "{}({})",
            if *negated { "notnull" } else { "isnull" },
            render_operand(operand)
        ),
        HavingExpr::Compare { left, op, right } => {
            let op = match op {
                CompareOp::Eq => "=",
                CompareOp::NotEq => "<>",
                CompareOp::Lt => "<",
                CompareOp::LtEq => "<=",
                CompareOp::Gt => ">",
                CompareOp::GtEq => ">=",
            };
            format!("{}{op}{}", render_operand(left), render_operand(right))
        }
    }
}

fn render_sort(k: &SortKey) -> String {
    let mut s = render_combined(&k.value);
    if k.desc {
        s.push_str(":desc");
    }
    if k.nulls_first != k.desc {
        s.push_str(if k.nulls_first {
            ":nulls-first"
        } else {
            ":nulls-last"
        });
    }
    s
}

/// A merge plan in the file's compact notation (everything but the SQL).
fn render_plan(p: &MergePlan) -> String {
    let mut out = Vec::new();
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(",")
        }
    };
    if p.hidden > 0 {
        out.push(format!("hidden={}", p.hidden));
    }
    if let Some(a) = &p.aggregate {
        let cols = a
            .shard_cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if let Some((_, sep)) = a.separators.iter().find(|(j, _)| *j == i) {
                    return format!("string_agg({sep:?})");
                }
                match c {
                    ShardCol::GroupKey => "key",
                    ShardCol::Plain => "val",
                    ShardCol::Distinct => "distinct",
                    ShardCol::Partial(Partial::Count) => "count",
                    ShardCol::Partial(Partial::Sum) => "sum",
                    ShardCol::Partial(Partial::Min) => "min",
                    ShardCol::Partial(Partial::Max) => "max",
                    ShardCol::Partial(Partial::BoolAnd) => "and",
                    ShardCol::Partial(Partial::BoolOr) => "or",
                    ShardCol::Partial(Partial::ArrayAgg) => "array",
                    ShardCol::Partial(Partial::JsonbAgg) => "jsonb",
                    ShardCol::Partial(Partial::StringAgg) => "string",
                }
                .to_owned()
            })
            .collect();
        out.push(format!("cols={}", list(cols)));
        out.push(format!(
            "group={}",
            list(a.group_by.iter().map(|g| format!("#{g}")).collect())
        ));
        out.push(format!(
            "out={}",
            list(a.outputs.iter().map(render_combined).collect())
        ));
        if let Some(h) = &a.having {
            out.push(format!("having={}", render_having(h)));
        }
    }
    if p.distinct {
        out.push("distinct".to_owned());
    }
    if !p.zero_params.is_empty() {
        out.push(format!(
            "zero={}",
            p.zero_params
                .iter()
                .map(|i| format!("${}", i + 1))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if !p.distinct_on.is_empty() {
        out.push(format!(
            "on={}",
            p.distinct_on
                .iter()
                .map(|c| format!("#{c}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if !p.order_by.is_empty() {
        out.push(format!(
            "order={}",
            p.order_by
                .iter()
                .map(render_sort)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if p.shards_sorted {
        out.push("sorted".to_owned());
    }
    if let Some(l) = &p.limit {
        out.push(format!("limit={}", render_limit(l)));
    }
    if let Some(o) = &p.offset {
        out.push(format!("offset={}", render_limit(o)));
    }
    out.join(" ")
}

/// What the continuation lines of a case expect of its merge.
#[derive(Default)]
struct MergeExpect {
    sql: Option<String>,
    plan: Option<String>,
    why: Option<String>,
}

/// Checks the route's merge against the `merge` option and the
/// continuation lines.
fn check_merge(r: &Route, want_refuse: bool, m: &MergeExpect) -> Result<(), String> {
    let want_plan = m.sql.is_some() || m.plan.is_some();
    match &r.merge {
        MergeNeed::Merge(p) => {
            if !want_plan {
                return Err(format!(
                    "unexpected merge plan: {} | {}",
                    p.shard_sql,
                    render_plan(p)
                ));
            }
            use sqlparser::dialect::PostgreSqlDialect;
            if let Err(e) =
                sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, &p.shard_sql)
            {
                return Err(format!("shard SQL does not parse ({e}): {}", p.shard_sql));
            }
            if let Some(sql) = &m.sql {
                if *sql != p.shard_sql {
                    return Err(format!(
                        "shard SQL:\n    expected {sql}\n    got      {}",
                        p.shard_sql
                    ));
                }
            }
            if let Some(plan) = &m.plan {
                let got = render_plan(p);
                if *plan != got {
                    return Err(format!("plan:\n    expected {plan}\n    got      {got}"));
                }
            }
        }
        MergeNeed::Refuse(what) => {
            if !want_refuse {
                return Err(format!(
                    "merge: expected {}, got Refuse({what:?})",
                    if want_plan { "a plan" } else { "None" }
                ));
            }
            if let Some(why) = &m.why {
                if why != what {
                    return Err(format!("refused construct: expected {why:?}, got {what:?}"));
                }
            }
        }
        MergeNeed::None => {
            if want_refuse || want_plan {
                return Err(format!(
                    "merge: expected {}, got None",
                    if want_plan { "a plan" } else { "Refuse" }
                ));
            }
        }
    }
    Ok(())
}

/// Runs one case line (with its continuation lines); `Err` describes the
/// mismatch.
fn run_case(snap: &RoutingSnapshot, line: &str, m: &MergeExpect) -> Result<(), String> {
    let (head, sql) = line
        .split_once('|')
        .ok_or_else(|| "no '|' between expectation and SQL".to_owned())?;
    let sql = sql.trim();
    let mut words = head.split_whitespace();
    let expect = words.next().ok_or("empty expectation")?;
    let mut owned: Vec<(usize, OwnedParam)> = Vec::new();
    let mut hints = Hints::default();
    let mut want_merge = false;
    let mut want_write = None;
    let mut want_kind = None;
    for w in words {
        if let Some(rest) = w.strip_prefix('$') {
            let (n, spec) = rest.split_once('=').ok_or("param needs $N=SPEC")?;
            let n: usize = n.parse().map_err(|e| format!("param number {n}: {e}"))?;
            owned.push((n, parse_param(spec)?));
        } else if let Some(s) = w.strip_prefix("session=") {
            hints.session_shard = Some(ShardId::new(s).map_err(|e| e.to_string())?);
        } else if w == "scs=off" {
            hints.standard_conforming_strings = false;
        } else if let Some(k) = w.strip_prefix("kind=") {
            want_kind = Some(k.to_owned());
        } else if w == "merge" {
            want_merge = true;
        } else if w == "write" {
            want_write = Some(true);
        } else if w == "read" {
            want_write = Some(false);
        } else {
            return Err(format!("unknown option {w:?}"));
        }
    }
    owned.sort_by_key(|(n, _)| *n);
    for (i, (n, _)) in owned.iter().enumerate() {
        if *n != i + 1 {
            return Err("parameters must be numbered $1, $2, … without gaps".to_owned());
        }
    }
    let params: Vec<Param<'_>> = owned
        .iter()
        .map(|(_, p)| Param {
            value: p.bytes.as_deref(),
            format: if p.binary {
                hotrepart_router::route::ParamFormat::Binary
            } else {
                hotrepart_router::route::ParamFormat::Text
            },
            type_oid: p.oid,
            decoder: None,
        })
        .collect();
    let result = route(snap, sql, &params, &hints);
    let got = render(&result);
    let detail = match &result {
        Err(e) => format!("error {}: {}", e.sqlstate, e.message),
        Ok(r) => format!("{r:?}"),
    };
    if got != expect {
        return Err(format!("expected {expect}, got {got} ({detail})"));
    }
    if let Ok(r) = &result {
        check_merge(r, want_merge, m)?;
        if let Some(w) = want_write {
            if r.is_write != w {
                return Err(format!("is_write: expected {w}, got {}", r.is_write));
            }
        }
        if let Some(k) = &want_kind {
            if kind_name(&r.kind) != *k {
                return Err(format!("kind: expected {k}, got {}", kind_name(&r.kind)));
            }
        }
    }
    Ok(())
}

#[test]
fn routing_cases() {
    let snap = snapshot();
    let text = include_str!("cases.txt");
    let mut failures = Vec::new();
    // (line number, case line, continuation lines)
    let mut cases: Vec<(usize, &str, MergeExpect)> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cont = [("sql>", 0), ("plan>", 1), ("why>", 2)]
            .into_iter()
            .find_map(|(p, i)| line.strip_prefix(p).map(|rest| (i, rest.trim().to_owned())));
        match (cont, cases.last_mut()) {
            (Some((i, rest)), Some((_, _, m))) => {
                let slot = [&mut m.sql, &mut m.plan, &mut m.why];
                let [sql, plan, why] = slot;
                match i {
                    0 => *sql = Some(rest),
                    1 => *plan = Some(rest),
                    _ => *why = Some(rest),
                }
            }
            (Some(_), None) => {
                failures.push(format!("cases.txt:{}: continuation without a case", no + 1))
            }
            (None, _) => cases.push((no + 1, line, MergeExpect::default())),
        }
    }
    let count = cases.len();
    let plans = cases
        .iter()
        .filter(|(_, _, m)| m.sql.is_some() || m.plan.is_some())
        .count();
    for (no, line, m) in &cases {
        if let Err(e) = run_case(&snap, line, m) {
            failures.push(format!("cases.txt:{no}: {line}\n    {e}"));
        }
    }
    assert!(count >= 150, "only {count} cases");
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(plans >= 40, "only {plans} merge-plan cases");
}

/// The rewritten statements of a split INSERT, verbatim.
#[test]
fn split_insert_rewrites_each_shard() {
    let snap = snapshot();
    let r = route(
        &snap,
        "INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b'), (6, 'c') \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name RETURNING id",
        &[],
        &Hints::default(),
    )
    .expect("route");
    let Target::Split(parts) = r.target else {
        panic!("not split: {r:?}");
    };
    let got: Vec<(String, String)> = parts
        .into_iter()
        .map(|p| (p.shard.to_string(), p.sql))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "s0".to_owned(),
                "INSERT INTO users (id, name) VALUES (2, 'b') ON CONFLICT(id) DO UPDATE SET name = excluded.name RETURNING id".to_owned()
            ),
            (
                "s3".to_owned(),
                "INSERT INTO users (id, name) VALUES (1, 'a'), (6, 'c') ON CONFLICT(id) DO UPDATE SET name = excluded.name RETURNING id".to_owned()
            ),
        ]
    );
    assert!(r.is_write);
    assert_eq!(r.kind, StatementKind::Insert);
}

/// Plan once, bind many times; a new epoch re-plans transparently.
#[test]
fn plan_bind_and_epochs() {
    let snap = snapshot();
    let plan =
        hotrepart_router::route::plan(&snap, "SELECT * FROM users WHERE id = $1").expect("plan");
    let one = |p: &str| {
        plan.bind(&snap, &[Param::text(p)], &Hints::default())
            .map(|r| r.target)
    };
    let s = |n: &str| Target::One(ShardId::new(n).expect("name"));
    assert_eq!(one("1"), Ok(s("s3")));
    assert_eq!(one("8"), Ok(s("s1")));
    assert_eq!(one("2"), Ok(s("s0")));
    assert_eq!(one("x").map_err(|e| e.sqlstate), Err("22P02"));
    // Missing parameter.
    assert_eq!(
        plan.bind(&snap, &[], &Hints::default())
            .map_err(|e| e.sqlstate),
        Err("08P01")
    );
    // Move every range to s2 in a new epoch: the old plan follows.
    let moved = {
        let mut b = snap.edit();
        let ranges = snap
            .ranges()
            .iter()
            .map(|r| {
                hotrepart_router::catalog::KeyRange::active(
                    r.lo,
                    r.hi,
                    ShardId::new("s2").expect("name"),
                )
            })
            .collect();
        b = b.ranges(ranges);
        b.build().expect("snapshot")
    };
    assert_eq!(
        plan.bind(&moved, &[Param::text("1")], &Hints::default())
            .map(|r| r.target),
        Ok(s("s2"))
    );
}

/// Writes go to the write owner and report frozen ranges; reads go to the
/// read owner.
#[test]
fn read_and_write_owners() {
    use hotrepart_router::catalog::{KeyRange, RangeStatus};
    let snap = snapshot();
    let s = |n: &str| ShardId::new(n).expect("name");
    // Key 1 lives in the last range (s3); make that range read on s3, write
    // on s1, frozen.
    let ranges: Vec<KeyRange> = snap
        .ranges()
        .iter()
        .map(|r| {
            if r.read_owner == s("s3") {
                KeyRange {
                    write_owner: s("s1"),
                    status: RangeStatus::Frozen,
                    ..r.clone()
                }
            } else {
                r.clone()
            }
        })
        .collect();
    let snap = snap.edit().ranges(ranges).build().expect("snapshot");
    let h = Hints::default();
    let r = route(&snap, "SELECT * FROM users WHERE id = 1", &[], &h).expect("route");
    assert_eq!((r.target, r.touches_frozen), (Target::One(s("s3")), false));
    let r = route(&snap, "UPDATE users SET name = 'x' WHERE id = 1", &[], &h).expect("route");
    assert_eq!((r.target, r.touches_frozen), (Target::One(s("s1")), true));
    let r = route(&snap, "UPDATE users SET name = 'x' WHERE id = 2", &[], &h).expect("route");
    assert_eq!((r.target, r.touches_frozen), (Target::One(s("s0")), false));
    let r = route(&snap, "DELETE FROM users", &[], &h).expect("route");
    assert_eq!((r.target, r.touches_frozen), (Target::All, true));
    // A sharded COPY FROM is placed (and waits) row by row, by the range:
    // the statement itself is not held up by a frozen range.
    let r = route(&snap, "COPY users FROM STDIN", &[], &h).expect("route");
    assert_eq!((r.target, r.touches_frozen), (Target::All, false));
    let copy = r.copy.expect("a copy plan");
    let k = hotrepart_router::catalog::KeyValue::Int8(1);
    let range = copy.range(&snap, &k).expect("range");
    assert_eq!(
        (range.status, range.write_owner.clone()),
        (RangeStatus::Frozen, s("s1"))
    );
    assert_eq!(copy.owner(&snap, &k).expect_err("frozen").sqlstate, "40001");
}

/// Error messages name the construct.
#[test]
fn messages_name_the_construct() {
    let snap = snapshot();
    let h = Hints::default();
    let msg = |sql: &str| match route(&snap, sql, &[], &h) {
        Err(e) => e.message,
        Ok(r) => match r.merge.error() {
            Some(e) => e.message,
            None => format!("routed: {r:?}"),
        },
    };
    assert!(msg("SELECT id, rank() OVER (ORDER BY id) FROM users").contains("rank()"));
    assert!(msg("SELECT sum(DISTINCT name) FROM users").contains("sum(DISTINCT"));
    assert!(msg("SELECT stddev(age) FROM users").contains("stddev()"));
    assert!(msg("SELECT string_agg(name, sep) FROM users").contains("string_agg()"));
    assert!(msg("SELECT count(*) + 1 FROM users").contains("count()"));
    assert!(msg("SELECT * FROM users ORDER BY id; SELECT 1").contains("several statements"));
    assert!(msg("COPY users (name) FROM STDIN").contains("shard key column \"id\""));
    assert!(msg("SELECT * FROM users WHERE id = 1 /* hotrepart: shard=s9 */").contains("s9"));
    assert!(msg("INSERT INTO users (name) VALUES ('x')").contains("\"id\""));
    // Set operations the node cannot merge say so (Django's
    // `qs1.union(qs2).count()` puts the UNION in a derived table).
    let m =
        msg("SELECT count(*) FROM (SELECT id FROM users UNION ALL SELECT user_id FROM orders) s");
    assert!(
        m.contains("UNION inside a subquery, derived table or CTE"),
        "{m}"
    );
    let m = msg("SELECT id FROM users INTERSECT SELECT 1");
    assert!(m.contains("INTERSECT over several shards"), "{m}");
    let m = msg("SELECT id FROM users EXCEPT SELECT user_id FROM orders");
    assert!(m.contains("EXCEPT over several shards"), "{m}");
    let m = msg("SELECT * FROM users WHERE");
    assert!(m.contains("\"users\"") && m.contains("Expected"), "{m}");
}

/// Hinted writes (issue 12, D5): they obey the freeze and ownership of the
/// ranges as unhinted writes do; hinted reads stay a shard's local view.
/// Cases: (ranges state, session shard, SQL, expected) where expected is a
/// shard name (`+frozen` when the write must wait for the cut-over), or
/// `REFUSE:SQLSTATE`. Key 1 lives in the last range (s3), 8 on s1, 2 on s0.
#[test]
fn hinted_writes_obey_ownership_and_the_freeze() {
    use hotrepart_router::catalog::{KeyRange, RangeStatus};
    let base = snapshot();
    let s = |n: &str| ShardId::new(n).expect("name");
    // The range of key 1 in a given state, with this write/read owner.
    let state = |status: RangeStatus, owner: &str| {
        let ranges: Vec<KeyRange> = base
            .ranges()
            .iter()
            .map(|r| {
                if r.read_owner == s("s3") {
                    KeyRange {
                        read_owner: s(owner),
                        write_owner: s(owner),
                        status,
                        ..r.clone()
                    }
                } else {
                    r.clone()
                }
            })
            .collect();
        base.edit().ranges(ranges).build().expect("snapshot")
    };
    let active = base.clone();
    // A reshard job copies the range from s3 to s1 (before the flip) …
    let moving = state(RangeStatus::Moving, "s3");
    // … freezes it for the cut-over …
    let frozen = state(RangeStatus::Frozen, "s3");
    // … and flips it to s1 (the Moving status lasts until the cleanup).
    let flipped = state(RangeStatus::Moving, "s1");
    let cases: &[(&RoutingSnapshot, Option<&str>, &str, &str)] = &[
        // Keyed writes: the key's write owner or nothing.
        (
            &active,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: shard=s3 */",
            "s3",
        ),
        (
            &active,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: shard=s2 */",
            "REFUSE:0A000",
        ),
        (
            &active,
            Some("s2"),
            "DELETE FROM users WHERE id = 8",
            "REFUSE:0A000",
        ),
        (&active, Some("s1"), "DELETE FROM users WHERE id = 8", "s1"),
        (
            &active,
            None,
            "DELETE FROM users WHERE id IN (1, 8) /* hotrepart: shard=s1 */",
            "REFUSE:0A000",
        ),
        (
            &active,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: key=8 */",
            "REFUSE:0A000",
        ),
        (
            &active,
            None,
            "UPDATE users SET name = 'x' WHERE id = 8 /* hotrepart: key=8 */",
            "s1",
        ),
        (
            &active,
            None,
            "UPDATE orders SET n = 1 WHERE user_id = 1 /* hotrepart: shard=s0 */",
            "REFUSE:0A000",
        ),
        (
            &active,
            None,
            "INSERT INTO users (id) VALUES (1) /* hotrepart: shard=s0 */",
            "REFUSE:0A000",
        ),
        // Keyless writes: the shard's own rows, while nothing moves.
        (
            &active,
            None,
            "DELETE FROM users /* hotrepart: shard=s2 */",
            "s2",
        ),
        (
            &active,
            Some("s2"),
            "UPDATE users SET name = 'x' WHERE name = 'y'",
            "s2",
        ),
        // Reads: the shard's local view, as asked.
        (
            &active,
            None,
            "SELECT * FROM users WHERE id = 1 /* hotrepart: shard=s2 */",
            "s2",
        ),
        // While the range of key 1 is copied to s1 (s3 still owns it).
        (
            &moving,
            None,
            "DELETE FROM users WHERE id = 1 /* hotrepart: shard=s3 */",
            "s3",
        ),
        (
            &moving,
            None,
            "DELETE FROM users /* hotrepart: shard=s1 */",
            "REFUSE:55000",
        ),
        (
            &moving,
            None,
            "DELETE FROM users /* hotrepart: shard=s0 */",
            "REFUSE:55000",
        ),
        (
            &moving,
            Some("s1"),
            "UPDATE users SET name = 'x'",
            "REFUSE:55000",
        ),
        (
            &moving,
            None,
            "SELECT * FROM users /* hotrepart: shard=s1 */",
            "s1",
        ),
        // During the cut-over: writes to the range wait, hinted or not.
        (
            &frozen,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: shard=s3 */",
            "s3+frozen",
        ),
        (
            &frozen,
            Some("s3"),
            "INSERT INTO users (id) VALUES (1)",
            "s3+frozen",
        ),
        (
            &frozen,
            None,
            "UPDATE users SET name = 'x' /* hotrepart: key=1 */",
            "s3+frozen",
        ),
        (
            &frozen,
            None,
            "DELETE FROM users /* hotrepart: shard=s0 */",
            "s0+frozen",
        ),
        (
            &frozen,
            None,
            "UPDATE users SET name = 'x' WHERE id = 2 /* hotrepart: shard=s0 */",
            "s0",
        ),
        (
            &frozen,
            None,
            "SELECT * FROM users WHERE id = 1 /* hotrepart: shard=s3 */",
            "s3",
        ),
        // After the flip: the old owner is never written again.
        (
            &flipped,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: shard=s3 */",
            "REFUSE:0A000",
        ),
        (
            &flipped,
            Some("s3"),
            "INSERT INTO users (id) VALUES (1)",
            "REFUSE:0A000",
        ),
        (
            &flipped,
            None,
            "UPDATE users SET name = 'x' WHERE id = 1 /* hotrepart: shard=s1 */",
            "s1",
        ),
        (
            &flipped,
            None,
            "UPDATE users SET name = 'x' /* hotrepart: key=1 */",
            "REFUSE:55000",
        ),
        (
            &flipped,
            None,
            "SELECT * FROM users /* hotrepart: key=1 */",
            "s1",
        ),
        (
            &flipped,
            None,
            "DELETE FROM users /* hotrepart: shard=s3 */",
            "REFUSE:55000",
        ),
    ];
    let mut failures = Vec::new();
    for (snap, session, sql, want) in cases {
        let hints = Hints {
            session_shard: session.map(s),
            ..Hints::default()
        };
        let got = match route(snap, sql, &[], &hints) {
            Err(e) => format!("REFUSE:{}", e.sqlstate),
            Ok(r) => match &r.target {
                Target::One(t) if r.touches_frozen => format!("{t}+frozen"),
                Target::One(t) => t.to_string(),
                other => format!("{other}"),
            },
        };
        if got != *want {
            failures.push(format!(
                "{sql} (session {session:?}): expected {want}, got {got}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the router cannot see (issue 12, D7): FOR UPDATE/SHARE may write
/// for commit purposes; calls of functions not known to be read-only are
/// reported for the node's volatility check; EXPLAIN without ANALYZE runs
/// nothing. Cases: (SQL, may_write, calls).
#[test]
fn may_write_and_calls_for_commit() {
    let snap = snapshot();
    let cases: &[(&str, bool, &[&str])] = &[
        ("SELECT * FROM users WHERE id = 1 FOR UPDATE", true, &[]),
        (
            "SELECT * FROM (SELECT * FROM users WHERE id = 1 FOR SHARE) s",
            true,
            &[],
        ),
        (
            "SELECT add_order(id) FROM users WHERE id = 1",
            false,
            &["add_order"],
        ),
        ("SELECT * FROM orders_of(5)", false, &["orders_of"]),
        (
            "SELECT lower(name), count(*) FROM users GROUP BY 1",
            false,
            &[],
        ),
        ("SELECT now(), random(), coalesce(1, 2)", false, &[]),
        ("SELECT f(1); SELECT g(2), f(3)", false, &["f", "g"]),
        (
            "SELECT public.f(1) WHERE EXISTS (SELECT h(id) FROM users WHERE id = 2)",
            false,
            &["f", "h"],
        ),
        ("UPDATE users SET name = 'x' WHERE id = 1", true, &[]),
        ("INSERT INTO users (id) VALUES (1)", true, &[]),
        ("EXPLAIN SELECT f(1) FROM users FOR UPDATE", false, &[]),
        ("EXPLAIN ANALYZE SELECT f(1)", false, &["f"]),
    ];
    let mut failures = Vec::new();
    for (sql, may_write, calls) in cases {
        match route(&snap, sql, &[], &Hints::default()) {
            Err(e) => failures.push(format!("{sql}: {}", e.message)),
            Ok(r) => {
                let got: Vec<&str> = r.calls.iter().map(String::as_str).collect();
                if r.may_write != *may_write || got != *calls {
                    failures.push(format!(
                        "{sql}: expected may_write {may_write} calls {calls:?}, got {} {got:?}",
                        r.may_write
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Unqualified names resolve through the session's search path as
/// PostgreSQL resolves them (issue 12, D6); relations that reach a declared
/// table without being declared (views, partitions) are refused.
/// Cases: (search path, relations listed, reaching, SQL, expected).
#[test]
fn names_resolve_through_the_search_path() {
    use hotrepart_router::route::{plan_in, Namespace};
    let snap = snapshot();
    let ns = |path: &[&str], rels: &[(&str, &str)], reach: &[(&str, &str, &str)]| Namespace {
        schemas: path.iter().map(|s| s.to_string()).collect(),
        relations: rels
            .iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect(),
        reaching: reach
            .iter()
            .map(|(s, t, d)| ((s.to_string(), t.to_string()), d.to_string()))
            .collect(),
        ..Namespace::default()
    };
    let app_first = ns(
        &["pg_catalog", "app", "public"],
        &[("public", "users"), ("app", "accounts")],
        &[],
    );
    let shadowed = ns(
        &["pg_catalog", "app", "public"],
        &[("app", "users"), ("public", "users")],
        &[],
    );
    let public_only = ns(&["pg_catalog", "public"], &[("public", "users")], &[]);
    let views = ns(
        &["pg_catalog", "public"],
        &[("public", "users")],
        &[
            ("public", "users_v", "users"),
            ("public", "users_2024", "users"),
        ],
    );
    let cases: &[(&Namespace, &str, &str)] = &[
        // `accounts` is app.accounts under search_path app, public.
        (&app_first, "SELECT * FROM accounts WHERE id = 1", "s3"),
        (&public_only, "SELECT * FROM accounts WHERE id = 1", "s0"),
        (&app_first, "INSERT INTO accounts (id) VALUES (8)", "s1"),
        (&app_first, "SELECT * FROM users WHERE id = 1", "s3"),
        // An undeclared app.users comes first: it is that one, on home.
        (&shadowed, "SELECT * FROM users WHERE id = 1", "s0"),
        (&shadowed, "SELECT * FROM public.users WHERE id = 1", "s3"),
        (&public_only, "SELECT * FROM users WHERE id = 1", "s3"),
        // Views and partitions of declared tables are refused.
        (&views, "SELECT * FROM users_v", "REFUSE:0A000"),
        (
            &views,
            "INSERT INTO users_v (id) VALUES (1)",
            "REFUSE:0A000",
        ),
        (
            &views,
            "SELECT * FROM public.users_2024 WHERE id = 1",
            "REFUSE:0A000",
        ),
        (&views, "UPDATE users_2024 SET x = 1", "REFUSE:0A000"),
        (&views, "SELECT * FROM other_table", "s0"),
        (
            &views,
            "WITH users_v AS (SELECT 1) SELECT * FROM users_v",
            "ANY",
        ),
    ];
    let mut failures = Vec::new();
    for (ns, sql, want) in cases {
        let got = match plan_in(&snap, sql, ns).and_then(|p| p.bind(&snap, &[], &Hints::default()))
        {
            Err(e) => format!("REFUSE:{}", e.sqlstate),
            Ok(r) => format!("{}", r.target)
                .replace("shard ", "")
                .replace("any shard", "ANY"),
        };
        if got != *want {
            failures.push(format!("{sql}: expected {want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
