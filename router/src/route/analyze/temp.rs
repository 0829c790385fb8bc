//! Statements on the session's temporary objects. A temporary relation
//! lives in one backend's temporary schema, so it exists on one shard
//! only: the home shard, where the node keeps the session's backend for it
//! (see `docs/design/session.md`). Its DDL runs there alone — not on every
//! shard as other DDL does — and its statements are marked
//! ([`StmtPlan::temp`]) so that the node can keep them on that backend
//! and refuse what cannot be (two-phase commit cannot prepare a
//! transaction that touched a temporary object).
//!
//! Rules (names resolve as in [`super::super::names`]: a relation of
//! [`Namespace::temp`](super::super::Namespace::temp), or one qualified
//! by `pg_temp`, is temporary):
//! - `CREATE TEMP TABLE|VIEW|SEQUENCE`, or a name qualified by `pg_temp`:
//!   the home shard. Named like a declared table it is refused (`0A000`):
//!   it would hide that table from the session on the home shard only.
//! - `CREATE TEMP TABLE … AS` and `SELECT … INTO TEMP`: the home shard,
//!   when the query reads no sharded table (else `0A000`: the home shard
//!   does not hold all its rows).
//! - A view whose query reads a temporary relation is temporary (as
//!   PostgreSQL makes it); a temporary view that reads a sharded table is
//!   refused (it would see the home shard's rows only).
//! - `CREATE INDEX ON`, `ALTER TABLE|INDEX|VIEW`, `DROP TABLE|VIEW|INDEX|
//!   SEQUENCE` of temporary relations: the home shard; a `DROP` naming
//!   temporary and other relations together is refused.
//! - Any other statement whose words name the temporary schema or create a
//!   temporary object ([`crate::classify::outside_transaction`]) is marked,
//!   and as DDL runs on the home shard only.

use sqlparser::ast::{ObjectName, ObjectType, Query, Statement};

use super::expr::unsupported;
use super::plan::{ddl_all, Body, StmtPlan};
use super::scope::Analyzer;
use crate::route::names::{is_temp_name, is_temp_schema, last_name, norm, table_name};
use crate::route::{RouteError, StatementKind};

/// DDL on the home shard that creates, changes or drops a temporary
/// object.
pub(super) fn temp_ddl() -> StmtPlan {
    let mut p = StmtPlan::fixed(StatementKind::Ddl, true, Body::Home);
    p.temp = true;
    p
}

/// Whether `name` is qualified by the temporary schema.
fn temp_qualified(name: &ObjectName) -> bool {
    name.0.len() == 2
        && name.0[0]
            .as_ident()
            .is_some_and(|id| is_temp_schema(&norm(id)))
}

/// Whether `name` resolves to a temporary relation of the session.
fn is_temp(a: &Analyzer<'_>, name: &ObjectName) -> bool {
    table_name(a.ns, name).is_ok_and(|t| is_temp_name(&t))
}

/// `CREATE [TEMP] TABLE|VIEW|SEQUENCE name`: whether it makes a temporary
/// relation; refused when that relation would hide a declared table.
fn creates_temp(a: &Analyzer<'_>, temporary: bool, name: &ObjectName) -> Result<bool, RouteError> {
    if !temporary && !temp_qualified(name) {
        return Ok(false);
    }
    let base = last_name(name);
    let last = |n: &str| n.rsplit('.').next().unwrap_or(n).to_owned();
    let declared = a
        .snap
        .sharded_tables()
        .map(|t| last(&t.name))
        .chain(a.snap.reference_tables().map(last))
        .find(|t| *t == base);
    if let Some(t) = declared {
        return Err(unsupported(format!(
            "a temporary relation named \"{t}\" like a declared table: it would hide that table from this session on the home shard only; choose another name"
        )));
    }
    Ok(true)
}

/// The query of `CREATE TEMP TABLE … AS` / `SELECT … INTO TEMP` (planned
/// in `a`, whose calls it keeps): it must read no sharded table.
fn fills_temp(what: &str, read: &StmtPlan) -> Result<(), RouteError> {
    match read.body {
        Body::Home | Body::Any => Ok(()),
        _ => Err(unsupported(format!(
            "{what} reading a sharded table: this session's temporary tables live on the home shard only, which does not hold all of its rows; create the table, then insert the rows from the client"
        ))),
    }
}

/// `CREATE TABLE`, temporary or not.
pub(super) fn create_table(
    a: &mut Analyzer<'_>,
    temporary: bool,
    name: &ObjectName,
    query: Option<&Query>,
) -> Result<StmtPlan, RouteError> {
    if !creates_temp(a, temporary, name)? {
        if query.is_some() {
            return Err(unsupported(
                "CREATE TABLE … AS (the new table would hold different rows on each shard)",
            ));
        }
        return Ok(ddl_all());
    }
    if let Some(q) = query {
        let read = a.select_statement(q, StatementKind::Select)?;
        fills_temp("CREATE TEMP TABLE … AS", &read)?;
    }
    Ok(temp_ddl())
}

/// `SELECT … INTO TEMP t`, planned as a read in `a`: the home shard.
pub(super) fn select_into_temp(read: StmtPlan) -> Result<StmtPlan, RouteError> {
    fills_temp("SELECT … INTO TEMP", &read)?;
    let mut p = read;
    p.body = Body::Home;
    p.is_write = true;
    p.temp = true;
    Ok(p)
}

/// `CREATE [TEMP] VIEW`.
pub(super) fn create_view(
    a: &Analyzer<'_>,
    temporary: bool,
    name: &ObjectName,
    query: &Query,
) -> Result<StmtPlan, RouteError> {
    // Planned apart: only to learn what the view reads (its calls are not
    // the statement's, and a query the router would refuse is PostgreSQL's
    // to judge when the view is not temporary).
    let mut sub = Analyzer::new(a.snap, a.ns);
    let read = sub.select_statement(query, StatementKind::Select);
    let over_temp = sub.temp.get();
    if !creates_temp(a, temporary, name)? && !over_temp {
        return Ok(ddl_all());
    }
    match read {
        Ok(r) if matches!(r.body, Body::Home | Body::Any) => Ok(temp_ddl()),
        Ok(_) => Err(unsupported(
            "a temporary view reading a sharded table: it would live on the home shard and see that shard's rows only",
        )),
        Err(e) => Err(e),
    }
}

/// `CREATE [TEMP] SEQUENCE`.
pub(super) fn create_sequence(
    a: &Analyzer<'_>,
    temporary: bool,
    name: &ObjectName,
) -> Result<StmtPlan, RouteError> {
    Ok(if creates_temp(a, temporary, name)? {
        temp_ddl()
    } else {
        ddl_all()
    })
}

/// DDL on the relation `name` (`CREATE INDEX ON`, `ALTER TABLE` …): the
/// home shard alone for a temporary one.
pub(super) fn on_relation(a: &Analyzer<'_>, name: &ObjectName) -> StmtPlan {
    if is_temp(a, name) {
        temp_ddl()
    } else {
        ddl_all()
    }
}

/// `DROP TABLE|VIEW|INDEX|SEQUENCE …`.
pub(super) fn drop(
    a: &Analyzer<'_>,
    object_type: &ObjectType,
    names: &[ObjectName],
) -> Result<StmtPlan, RouteError> {
    let relations = matches!(
        object_type,
        ObjectType::Table | ObjectType::View | ObjectType::Index | ObjectType::Sequence
    );
    if !relations {
        return Ok(ddl_all());
    }
    let temp = names.iter().filter(|n| is_temp(a, n)).count();
    if temp == 0 {
        Ok(ddl_all())
    } else if temp == names.len() {
        Ok(temp_ddl())
    } else {
        Err(unsupported(
            "DROP of temporary and other relations in one statement: the temporary ones live on the home shard only; drop them in a statement of their own",
        ))
    }
}

/// After a statement was planned, when the string has a word of the
/// temporary schema or of a temporary object: a statement whose own words
/// create or name one ([`crate::classify::outside_transaction`]) is
/// marked, and as DDL for every shard it runs on the home shard only.
pub(in crate::route) fn mark_by_words(p: &mut StmtPlan, st: &Statement) {
    if p.temp {
        return;
    }
    let text = st.to_string();
    if crate::classify::outside_transaction(&text)
        != Some(crate::classify::OutsideTransaction::Temporary)
    {
        return;
    }
    p.temp = true;
    if p.kind == StatementKind::Ddl && matches!(p.body, Body::All) {
        p.body = Body::Home;
    }
}
