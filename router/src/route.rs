//! Statement routing: SQL text (+ parameters, + hints) in, one [`Route`] out.
//!
//! Routing is split in two, as the extended protocol needs:
//!
//! * [`plan`] parses a statement string once (Parse) and analyses it against a
//!   [`RoutingSnapshot`]: which tables it touches, which shard-key values pin
//!   them (literals are parsed here, parameters are remembered by number),
//!   which tables are joined on their keys, and what a multi-shard execution
//!   would have to merge. The resulting [`Plan`] is immutable and cacheable
//!   ([`PlanCache`], keyed by text and snapshot epoch).
//! * [`Plan::bind`] takes the parameter values (Bind) and the session hints and
//!   produces the [`Route`] the executor follows. [`route`] does both at once.
//!
//! # Guarantees
//!
//! * A route never loses rows: a statement goes to one shard only when every
//!   row it can read or write lives there; to a subset of shards only when
//!   every sharded table is pinned to that subset by its key and the tables
//!   are joined on their keys; otherwise to all shards or it is refused.
//! * A multi-shard read whose answer is not the plain concatenation of the
//!   shards' answers comes back with a [`MergePlan`] ([`MergeNeed::Merge`]:
//!   ORDER BY, LIMIT/OFFSET, DISTINCT [ON], count/sum/min/max/avg/bool_and/bool_or,
//!   GROUP BY, HAVING) or, when no plan is correct (window functions, set
//!   operations, other aggregates, `count(DISTINCT …)`, expressions over
//!   aggregates, FOR UPDATE, EXPLAIN, COPY, several statements
//!   in one string, …), with [`MergeNeed::Refuse`] naming the construct; a
//!   multi-shard statement whose shards' answers cannot be
//!   combined at all (sharded tables not joined on their keys, a sharded table
//!   only inside a derived table, …) is refused with SQLSTATE `0A000`.
//! * Anything the router does not understand is refused (`0A000`), never
//!   guessed. A string the parser cannot read (a syntax error, or syntax
//!   it does not know) is routed by the lexer ([`plan_in`],
//!   [`crate::classify::unparsed`]) only where routing needs nothing from
//!   it: naming no declared table (nor a relation over one) it goes to the
//!   home shard, so PostgreSQL answers — with its own syntax error;
//!   schema statements go to every shard as DDL; anything else is refused
//!   (`0A000`, naming the table).
//!
//! # Conventions (documented choices)
//!
//! * Names: unquoted identifiers are folded to lower case (ASCII, as
//!   PostgreSQL does), quoted ones are taken verbatim. A table `public.t`
//!   is looked up in the catalog as `t`; a table in another schema `s.t`
//!   is looked up as `s.t`. An unqualified name resolves through the
//!   session's [`Namespace`] (its effective `search_path` and the
//!   relations in it, read by the node from the home shard's catalog), as
//!   PostgreSQL resolves it; [`plan`] without one takes `public`. A view,
//!   partition or inheritance relative of a declared table that is not
//!   itself declared is refused (`0A000`), see [`Namespace`].
//! * Reads of reference tables only go to the home shard (deterministic, and
//!   the home shard also holds the undeclared tables they are often joined
//!   with); writes to them go to all shards.
//! * Undeclared tables live on the home shard; a statement using one must be
//!   able to run entirely on the home shard, or it is refused.
//! * Reads use each range's read owner; statements that write use the write
//!   owner for every key they touch.
//! * A statement without any table is [`Target::Any`], unless it calls a
//!   function that is not a known built-in: such a function may read
//!   undeclared tables, so it goes to the home shard.
//! * Hints: a comment `/* hotrepart: shard=NAME */` or
//!   `/* hotrepart: key=VALUE */` anywhere in the string, or
//!   [`Hints::session_shard`], force a single shard (comment first, then the
//!   session; `key=` means the key's read owner for a read, its write owner
//!   for a write). They are not honoured for transaction control, `SET`,
//!   `SHOW` and the like.
//!   - A hinted *read* is the user asking for that shard's local view: it
//!     runs there as it is, whatever the ranges say (rows of a range being
//!     moved may be seen twice or not at all across shards, by design).
//!   - A hinted *write* never writes where the ranges do not allow it: it
//!     never places a row on a shard that does not own its key, nor writes
//!     a reference table on one shard only, nor COPYs FROM. A write to a
//!     sharded table obeys the freeze exactly as an unhinted write (a key
//!     in a frozen range sets [`Route::touches_frozen`]: the session waits
//!     for the cut-over and routes again) and every key it names (INSERT
//!     rows, `WHERE key = …`, `SET key = …`) must belong to the hinted
//!     shard's write owner, else it is refused with `0A000` (the hint
//!     cannot change where rows live: after a flip the old owner's copy is
//!     deleted by the cleanup, so a write acknowledged there would be lost).
//!   - A hinted write to a sharded table that does not name the key of
//!     every table it touches (a keyless UPDATE/DELETE) touches whatever
//!     rows the shard holds. It is allowed only while no range is being
//!     moved (status Moving, or read and write owners differing): then a
//!     shard holds exactly the rows of the ranges it owns. While a range
//!     is frozen it waits; while one is moving it is refused with `55000`
//!     (object_not_in_prerequisite_state: the cluster's state, not the
//!     statement, is what stands in the way; retry after the job).

mod analyze;
mod cache;
pub mod copy;
mod eval;
mod hide;
mod keys;
mod merge;
mod names;
mod normalize;
mod params;
mod split;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use sqlparser::ast;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::catalog::{KeyType, KeyValue, PointError, RoutingSnapshot, ShardId};
use crate::classify::Unparsed;

pub use analyze::computed::{
    column_fill, computed_keys, default_eval_sql, default_evaluable, insert_select, insert_table,
    key_default, no_column_list, omitted_by_select, values_select, ColumnFill, ComputedKeys,
    InsertSelect, NoColumnList, Slot,
};
pub use analyze::first::{
    subqueries_first, values_query, AnswerColumn, FirstStep, SubqueriesFirst,
};
pub use cache::PlanCache;
pub use hide::{hide_node_transactions, hide_rows};
pub use names::Namespace;
pub use normalize::{normalize_literals, usable as shape_route_usable, Normalized};

/// Whether `name` (lower case, unqualified) is a built-in aggregate the
/// router knows: a call to any other aggregate (user-defined) is planned as
/// a scalar function, which the node must check before running a statement
/// on several shards.
pub fn is_known_aggregate(name: &str) -> bool {
    analyze::AGGREGATES.contains(&name)
}
pub use merge::{
    AggregatePlan, Combined, CompareOp, CountCast, HavingExpr, LimitSpec, Literal, MergePlan,
    Operand, Partial, ShardCol, SortKey,
};
pub use params::{Param, ParamFormat, TextDecoder};

use analyze::{Body, StmtPlan};

/// Where a statement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this shard.
    One(ShardId),
    /// These shards (at least two, sorted by name, not all of them).
    Shards(Vec<ShardId>),
    /// Every shard.
    All,
    /// No table is involved: any shard gives the same answer; the executor
    /// picks one.
    Any,
    /// A multi-row `INSERT … VALUES` split by shard: for each shard (sorted by
    /// name) the statement rewritten to hold only that shard's rows
    /// (`ON CONFLICT` and `RETURNING` preserved).
    Split(Vec<SplitPart>),
}

/// One shard's part of a split `INSERT` ([`Target::Split`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPart {
    /// The shard.
    pub shard: ShardId,
    /// The statement with only this shard's rows.
    pub sql: String,
    /// Those rows' places (0-based) in the client's statement, in order:
    /// what `RETURNING` gives back is put in the client's order by them.
    pub rows: Vec<usize>,
    /// For a statement with parameters: `sql` numbers its own from `$1`,
    /// and `params[i]` is the client's number (1-based) of its `$(i+1)`
    /// — the Bind this shard gets carries those values, in that order.
    pub params: Option<Vec<usize>>,
}

impl Target {
    /// Whether more than one shard is involved.
    pub fn is_multi_shard(&self) -> bool {
        match self {
            Target::One(_) | Target::Any => false,
            Target::Shards(_) | Target::All => true,
            Target::Split(parts) => parts.len() > 1,
        }
    }
}

/// Transaction-control statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionKind {
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `SAVEPOINT name`.
    Savepoint,
    /// `RELEASE [SAVEPOINT] name`.
    Release,
    /// `ROLLBACK TO [SAVEPOINT] name`.
    RollbackToSavepoint,
}

/// Direction of a `COPY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyDirection {
    /// `COPY … FROM STDIN`: rows flow to the server.
    From,
    /// `COPY … TO STDOUT`: rows flow to the client.
    To,
}

/// What kind of statement it is, for the executor and the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// An empty query string (PostgreSQL answers EmptyQueryResponse).
    Empty,
    /// `SELECT`, `VALUES`, `TABLE`, `WITH … SELECT`.
    Select,
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// Schema changes and `TRUNCATE`, `GRANT`, `COMMENT`, ….
    Ddl,
    /// `COPY`; `table` is the catalog name when copying a table.
    Copy {
        /// The table copied, if it is a table (not a query).
        table: Option<String>,
        /// Direction of the data.
        direction: CopyDirection,
    },
    /// Transaction control.
    Transaction(TransactionKind),
    /// `SET …` (session or local state; the proxy tracks it).
    Set,
    /// `RESET …`, `DISCARD …`.
    Reset,
    /// `SHOW …`.
    Show,
    /// `EXPLAIN`, `VACUUM`, `ANALYZE`, `LOCK`, `LISTEN`/`NOTIFY`,
    /// `DEALLOCATE`, ….
    Utility,
    /// Several statements in one simple-protocol string; see
    /// [`Route::statements`].
    Multi,
}

/// How a multi-shard read is answered from the shards' answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MergeNeed {
    /// One shard, or plain concatenation is correct.
    None,
    /// The shards run [`MergePlan::shard_sql`] and the executor combines
    /// their rows as the plan says (ORDER BY, LIMIT/OFFSET, DISTINCT,
    /// aggregates, GROUP BY, HAVING).
    Merge(Arc<MergePlan>),
    /// Neither concatenation nor a merge plan is correct; the string names
    /// the construct (e.g. `"window function row_number()"`,
    /// `"aggregate function count(DISTINCT …)"`). The executor refuses with
    /// [`MergeNeed::error`].
    Refuse(String),
}

impl MergeNeed {
    /// The error to send for a refused merge, if any.
    pub fn error(&self) -> Option<RouteError> {
        match self {
            MergeNeed::None | MergeNeed::Merge(_) => None,
            MergeNeed::Refuse(what) => Some(RouteError::unsupported(format!(
                "{what} in a statement that reads from several shards is not supported yet"
            ))),
        }
    }

    /// The merge plan, if the read needs one.
    pub fn plan(&self) -> Option<&MergePlan> {
        match self {
            MergeNeed::Merge(p) => Some(p),
            _ => None,
        }
    }
}

/// The one value the executor follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where to run.
    pub target: Target,
    /// What the statement is ([`StatementKind::Multi`] for several).
    pub kind: StatementKind,
    /// The kind of each statement in the string, in order (empty for an empty
    /// string).
    pub statements: Vec<StatementKind>,
    /// Whether the statement may write (DML, DDL, `COPY FROM`, …). A
    /// transaction that writes on several shards needs two-phase commit.
    pub is_write: bool,
    /// Whether the statement may write for commit purposes: `is_write`, or
    /// `SELECT … FOR UPDATE/SHARE`. A transaction that may have written on
    /// several shards must commit with two-phase commit. (Triggers fire
    /// only on DML, which is a write already.)
    pub may_write: bool,
    /// Functions the statement calls that the router does not know to be
    /// read-only (lower case, unqualified): a volatile function may run
    /// DML, so the executor treats the statement as a write when one of
    /// them is volatile (looked up in `pg_proc`).
    pub calls: Arc<[String]>,
    /// A hint (`/* hotrepart: … */` or `SET hotrepart.shard`) chose the
    /// shard: the user takes responsibility for what it reaches there.
    pub hinted: bool,
    /// For multi-shard reads: whether the results can be concatenated.
    pub merge: MergeNeed,
    /// A write touches a range that is frozen for a cut-over: the executor
    /// must wait for the new snapshot and route again.
    pub touches_frozen: bool,
    /// `COPY` of a sharded table (or `COPY FROM` of a reference table) on
    /// every shard ([`Target::All`]): the executor runs it itself, splitting
    /// `FROM` rows by key or concatenating `TO` output.
    pub copy: Option<Arc<copy::CopyPlan>>,
    /// The string creates, names or drops a temporary object of the
    /// session (a relation of [`Namespace::temp`], one qualified by
    /// `pg_temp`, `CREATE TEMP …`, `SELECT … INTO TEMP`): such objects
    /// live on the home shard only, and two-phase commit cannot prepare a
    /// transaction that touched one (`route/analyze/temp.rs`).
    pub temp: bool,
    /// The sharded tables the string's `INSERT` statements write
    /// (declared names): columns numbered by a sequence are filled by the
    /// node, not each shard (`proxy/src/session/key_default.rs`).
    pub inserts_into: Vec<String>,
    /// An UPDATE over several shards that sets the shard key to one value:
    /// only this shard may update rows (it owns that key); the executor
    /// fails the statement, rolling it back, when another shard reports
    /// rows updated (they would have to move, which the node does not do).
    pub key_move: Option<KeyMove>,
    /// Per statement: DML on a reference table, run on every shard's copy —
    /// each copy answers the same rows and count, and the client gets one
    /// copy's answer (not their sum). Empty when no statement is.
    pub replicated: Vec<bool>,
}

/// See [`Route::key_move`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMove {
    /// The shard that owns the new key.
    pub shard: ShardId,
    /// The table updated (declared name).
    pub table: String,
    /// Its shard key column.
    pub column: String,
    /// The new key, as the refusal shows it.
    pub key: String,
}

/// The name the issue uses for a route.
pub type Routed = Route;

/// Session state the router honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hints {
    /// Set by `SET hotrepart.shard = '…'` (tracked by the proxy): run every
    /// routable statement on this shard.
    pub session_shard: Option<ShardId>,
    /// The session's `standard_conforming_strings` (default on). Off,
    /// PostgreSQL reads backslash escapes inside plain `'…'` literals, which
    /// the router does not: a statement with a backslash in such a literal
    /// is then refused (`0A000`) rather than routed by a key the server
    /// would read differently. `E'…'` literals read the same either way.
    pub standard_conforming_strings: bool,
}

impl Default for Hints {
    fn default() -> Hints {
        Hints {
            session_shard: None,
            standard_conforming_strings: true,
        }
    }
}

/// A statement cannot be routed. Goes to the client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    /// The SQLSTATE to report.
    pub sqlstate: &'static str,
    /// The message, naming the construct.
    pub message: String,
}

impl RouteError {
    /// `0A000 feature_not_supported`.
    pub fn unsupported(message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate: "0A000",
            message: message.into(),
        }
    }

    /// `42601 syntax_error`.
    pub fn syntax(message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate: "42601",
            message: message.into(),
        }
    }

    /// `23502 not_null_violation`.
    pub fn not_null(message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate: "23502",
            message: message.into(),
        }
    }

    /// `42704 undefined_object` (unknown shard in a hint).
    pub fn undefined(message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate: "42704",
            message: message.into(),
        }
    }

    /// The routing function of `table` could not place a key: `38000`
    /// (the function failed) or `39000` (not loaded), see
    /// [`PointError::sqlstate`]. Concerns this statement only.
    pub fn point(table: &str, e: PointError) -> RouteError {
        RouteError {
            sqlstate: e.sqlstate(),
            message: format!("cannot route by the shard key of \"{table}\": {e}"),
        }
    }

    /// `08P01 protocol_violation` (missing or malformed parameter).
    pub fn protocol(message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate: "08P01",
            message: message.into(),
        }
    }
}

/// A hint found in a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CommentHint {
    Shard(ShardId),
    Key(String),
}

/// A statement string analysed against one snapshot. Immutable; share it.
#[derive(Debug)]
pub struct Plan {
    sql: Arc<str>,
    epoch: u64,
    stmts: Vec<StmtPlan>,
    hint: Option<CommentHint>,
    /// A plain `'…'` (or `N'…'`) literal contains a backslash: read
    /// differently when `standard_conforming_strings` is off.
    backslash_literal: bool,
    /// The calls of all statements (see [`Route::calls`]).
    calls: Arc<[String]>,
    /// The namespace it was planned in.
    ns: Namespace,
}

impl Plan {
    /// The statement text this plan was made from.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The epoch of the snapshot it was planned against.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The namespace it was planned in.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Whether binding it may call a WebAssembly routing function (a
    /// sharded table it touches is placed by one).
    pub fn places_by_function(&self) -> bool {
        self.stmts.iter().any(|s| {
            s.sharded_tables
                .iter()
                .any(|t| !matches!(t.function, crate::catalog::RoutingFunction::PgHash { .. }))
        })
    }

    /// Routes one execution. `params` are the Bind parameters (empty for the
    /// simple protocol). If `snapshot` is not the one the plan was made from
    /// (another epoch), the statement is planned again first, so a stale plan
    /// can never route by stale ranges.
    pub fn bind(
        &self,
        snapshot: &RoutingSnapshot,
        params: &[Param<'_>],
        hints: &Hints,
    ) -> Result<Route, RouteError> {
        if snapshot.epoch() != self.epoch {
            return plan_in(snapshot, &self.sql, &self.ns)?.bind(snapshot, params, hints);
        }
        if self.backslash_literal && !hints.standard_conforming_strings {
            return Err(RouteError::unsupported(
                "a string literal containing a backslash while standard_conforming_strings is off: PostgreSQL would read the backslash as an escape, hotrepart routes by the literal as written; use E'…' for escapes, or SET standard_conforming_strings = on",
            ));
        }
        let forced = self.forced(snapshot, hints)?;
        let mut parts = Vec::with_capacity(self.stmts.len());
        for stmt in &self.stmts {
            parts.push(eval::bind_stmt(stmt, snapshot, params, forced.as_ref())?);
        }
        let mut route = combine(parts)?;
        route.calls = self.calls.clone();
        route.hinted = forced.is_some();
        route.temp = self.stmts.iter().any(|s| s.temp);
        Ok(route)
    }

    /// What a hint forces, if anything: the comment hint, else the session.
    fn forced(
        &self,
        snapshot: &RoutingSnapshot,
        hints: &Hints,
    ) -> Result<Option<eval::Forced>, RouteError> {
        match &self.hint {
            Some(CommentHint::Shard(id)) => Ok(Some(eval::Forced::Shard(id.clone()))),
            Some(CommentHint::Key(text)) => key_hint(snapshot, &self.stmts, text).map(Some),
            None => match &hints.session_shard {
                Some(id) if snapshot.shard(id).is_none() => Err(RouteError::undefined(format!(
                    "hotrepart.shard names unknown shard \"{id}\""
                ))),
                other => Ok(other.clone().map(eval::Forced::Shard)),
            },
        }
    }
}

/// The key given in a `key=` hint, parsed as the key type of the sharded
/// tables in the statement (they must agree); each statement is then sent to
/// the key's read owner (a read) or write owner (a write, which waits while
/// the key's range is frozen).
fn key_hint(
    snapshot: &RoutingSnapshot,
    stmts: &[StmtPlan],
    text: &str,
) -> Result<eval::Forced, RouteError> {
    let mut table = None;
    for s in stmts {
        for t in &s.sharded_tables {
            match &table {
                None => table = Some(t.clone()),
                Some(first) if eval::colocated(first, t) => {}
                Some(first) => {
                    return Err(RouteError::unsupported(format!(
                    "hotrepart key hint is ambiguous: tables \"{}\" and \"{}\" are not co-located",
                    first.name, t.name
                )))
                }
            }
        }
    }
    let Some(table) = table else {
        return Err(RouteError::unsupported(
            "hotrepart key hint needs a sharded table in the statement (use shard=NAME instead)",
        ));
    };
    let key = KeyValue::parse(table.key_type, text).map_err(|e| RouteError {
        sqlstate: e.sqlstate(),
        message: e.to_string(),
    })?;
    let point = snapshot
        .point(&table, &key)
        .map_err(|e| RouteError::point(&table.name, e))?;
    Ok(eval::Forced::Key {
        range: snapshot.range_index_for_point(point),
    })
}

/// Merges the routes of the statements of one string.
fn combine(mut parts: Vec<eval::StmtRoute>) -> Result<Route, RouteError> {
    if parts.len() == 1 {
        let p = parts.remove(0);
        return Ok(Route {
            statements: vec![p.kind.clone()],
            kind: p.kind,
            target: p.target,
            is_write: p.is_write,
            may_write: p.may_write,
            calls: Arc::from(Vec::new()),
            hinted: false,
            merge: p.merge,
            touches_frozen: p.touches_frozen,
            copy: p.copy,
            temp: false,
            inserts_into: p.insert_into.into_iter().collect(),
            key_move: p.key_move,
            // (Empty when false: no allocation on the common path.)
            replicated: if p.replicated { vec![true] } else { Vec::new() },
        });
    }
    if let Some(k) = parts.iter().find_map(|p| p.key_move.as_ref()) {
        return Err(RouteError::unsupported(format!(
            "UPDATE of shard key column \"{}\" of \"{}\" over several shards must be sent as a statement of its own",
            k.column, k.table
        )));
    }
    let mut target = Target::Any;
    let mut is_write = false;
    let mut may_write = false;
    let mut touches_frozen = false;
    let mut merge = MergeNeed::None;
    let mut returns_rows = false;
    for p in &parts {
        if p.copy.is_some() {
            return Err(RouteError::unsupported(
                "COPY of a sharded or reference table must be sent as a query string of its own",
            ));
        }
        is_write |= p.is_write;
        may_write |= p.may_write;
        touches_frozen |= p.touches_frozen;
        returns_rows |= p.kind == StatementKind::Select;
        if merge == MergeNeed::None {
            merge = match &p.merge {
                // The executor merges one statement at a time.
                MergeNeed::Merge(_) => {
                    MergeNeed::Refuse("several statements in one query string".to_owned())
                }
                other => other.clone(),
            };
        }
        if let Target::Split(_) = p.target {
            return Err(RouteError::unsupported(
                "a multi-row INSERT spanning several shards must be sent as a statement of its own",
            ));
        }
        target = match (&target, &p.target) {
            (_, Target::Any) => target,
            (Target::Any, t) => t.clone(),
            (a, b) if a == b => target,
            (a, b) => {
                return Err(RouteError::unsupported(format!(
                    "the statements of this query string go to different shards ({} and {}); send them separately",
                    describe(a),
                    describe(b)
                )))
            }
        };
    }
    if target.is_multi_shard() && returns_rows && merge == MergeNeed::None {
        merge = MergeNeed::Refuse("several statements in one query string".to_owned());
    }
    let mut inserts_into: Vec<String> = Vec::new();
    for p in &parts {
        if let Some(t) = &p.insert_into {
            if !inserts_into.contains(t) {
                inserts_into.push(t.clone());
            }
        }
    }
    let replicated = if parts.iter().any(|p| p.replicated) {
        parts.iter().map(|p| p.replicated).collect()
    } else {
        Vec::new()
    };
    let statements = parts.into_iter().map(|p| p.kind).collect::<Vec<_>>();
    Ok(Route {
        target,
        kind: if statements.is_empty() {
            StatementKind::Empty
        } else {
            StatementKind::Multi
        },
        statements,
        is_write,
        may_write,
        calls: Arc::from(Vec::new()),
        hinted: false,
        merge,
        touches_frozen,
        copy: None,
        temp: false,
        inserts_into,
        key_move: None,
        replicated,
    })
}

fn describe(t: &Target) -> String {
    match t {
        Target::One(s) => format!("shard {s}"),
        Target::Shards(v) => {
            let names: Vec<&str> = v.iter().map(ShardId::as_str).collect();
            format!("shards {}", names.join(", "))
        }
        Target::All => "all shards".to_owned(),
        Target::Any => "any shard".to_owned(),
        Target::Split(_) => "a split INSERT".to_owned(),
    }
}

/// Parses and analyses `sql` against `snapshot`. The plan depends on the
/// text and the snapshot only (not on parameter values), so it can be cached
/// per (text, epoch).
pub fn plan(snapshot: &RoutingSnapshot, sql: &str) -> Result<Plan, RouteError> {
    plan_in(snapshot, sql, &Namespace::default())
}

/// [`plan`] with unqualified names resolved in `ns`.
///
/// A string the parser cannot read, or holding a statement the analyzer
/// does not plan, is routed by the lexer instead ([`plan_unparsed`]). A
/// `COPY`'s `( … )` option list is read by the lexer and passed to the
/// shards untouched (PostgreSQL validates it), so options the parser does
/// not know (`FREEZE ON`, `HEADER MATCH`, `ON_ERROR …`) do not stop it.
pub fn plan_in(snapshot: &RoutingSnapshot, sql: &str, ns: &Namespace) -> Result<Plan, RouteError> {
    match parse_and_plan(snapshot, sql, ns)? {
        Parsed::Plan(p) => Ok(p),
        Parsed::Unreadable(why) => plan_unparsed(snapshot, sql, ns, &why),
    }
}

/// The plan of a statement's shape (its literals made parameters,
/// [`normalize_literals`]): parsed and analysed only. `Ok(None)` when the
/// parser cannot read the shape: the lexer's routing of unparsed text
/// ([`plan_unparsed`]) must never stand for a statement the parser reads.
pub fn plan_shape(
    snapshot: &RoutingSnapshot,
    shape: &str,
    ns: &Namespace,
) -> Result<Option<Plan>, RouteError> {
    match parse_and_plan(snapshot, shape, ns)? {
        Parsed::Plan(p) => Ok(Some(p)),
        Parsed::Unreadable(_) => Ok(None),
    }
}

/// The route of `sql` (simple protocol, no parameters) taken from its
/// shape, when the shape's route may stand for the statement's (one
/// statement, one shard or any: [`shape_route_usable`]); `None` otherwise
/// (plan the text itself). The node does the same through its plan cache.
pub fn route_by_shape(
    snapshot: &RoutingSnapshot,
    sql: &str,
    ns: &Namespace,
    hints: &Hints,
) -> Option<Route> {
    let n = normalize_literals(sql)?;
    let plan = plan_shape(snapshot, &n.text, ns).ok()??;
    if plan.places_by_function() {
        return None;
    }
    let route = plan.bind(snapshot, &n.params(), hints).ok()?;
    shape_route_usable(&route).then_some(route)
}

/// What the parser and the analyzer made of a string.
enum Parsed {
    Plan(Plan),
    /// The parser cannot read it, or the analyzer does not plan one of its
    /// statements (why, for messages).
    Unreadable(String),
}

fn parse_and_plan(
    snapshot: &RoutingSnapshot,
    sql: &str,
    ns: &Namespace,
) -> Result<Parsed, RouteError> {
    let dialect = PostgreSqlDialect {};
    // A COPY option list is blanked for the parser (same length: token
    // positions stay) and read by the lexer.
    let copy_options = crate::classify::copy_options(sql);
    let blanked;
    let text = match &copy_options {
        Some(o) => {
            blanked = format!(
                "{}{}{}",
                &sql[..o.span.start],
                " ".repeat(o.span.len()),
                &sql[o.span.end..]
            );
            blanked.as_str()
        }
        None => sql,
    };
    let tokens = match Tokenizer::new(&dialect, text).tokenize_with_location() {
        Ok(t) => t,
        Err(e) => return Ok(Parsed::Unreadable(e.to_string())),
    };
    let mut hint = None;
    // With standard_conforming_strings off PostgreSQL tokenizes differently
    // only where a plain literal holds a backslash (up to that point both
    // readings agree), so flagging those literals is enough.
    let backslash_literal = tokens.iter().any(|t| {
        matches!(&t.token, Token::SingleQuotedString(s) | Token::NationalStringLiteral(s) if s.contains('\\'))
    });
    for t in &tokens {
        let comment = match &t.token {
            Token::Whitespace(Whitespace::MultiLineComment(c)) => c.as_str(),
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) => comment.as_str(),
            _ => continue,
        };
        if let Some(h) = parse_hint(snapshot, comment)? {
            if hint.as_ref().is_some_and(|old| old != &h) {
                return Err(RouteError::unsupported(
                    "conflicting hotrepart hints in one statement",
                ));
            }
            hint = Some(h);
        }
    }
    let mut statements = match Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
    {
        Ok(s) => s,
        Err(e) => return Ok(Parsed::Unreadable(e.to_string())),
    };
    let mut passed = Vec::new();
    if let (Some(list), [ast::Statement::Copy { options, .. }]) =
        (&copy_options, statements.as_mut_slice())
    {
        let (read, rest) = copy::options_from_lexer(list)?;
        *options = read;
        passed = rest;
    }
    // A word of a temporary object: each statement's own words are read
    // (`analyze::mark_by_words`).
    let temp_words = crate::classify::classify(sql).temporary;
    let mut stmts = Vec::with_capacity(statements.len());
    for st in &statements {
        match analyze::plan_statement(snapshot, ns, st)? {
            Some(mut p) => {
                if temp_words {
                    analyze::mark_by_words(&mut p, st);
                }
                stmts.push(p)
            }
            None => {
                let text = st.to_string();
                let word = text.split_whitespace().next().unwrap_or("statement");
                return Ok(Parsed::Unreadable(format!(
                    "statement {word} is not planned by the router"
                )));
            }
        }
    }
    for p in &stmts {
        if let analyze::Body::Copy(c) = &p.body {
            c.check_passed_options(&passed)?;
        }
    }
    if stmts.is_empty() {
        stmts.push(StmtPlan::fixed(StatementKind::Empty, false, Body::Any));
    }
    Ok(Parsed::Plan(Plan {
        sql: Arc::from(sql),
        epoch: snapshot.epoch(),
        calls: stmts
            .iter()
            .flat_map(|s| s.calls.iter().cloned())
            .collect::<BTreeSet<String>>()
            .into_iter()
            .collect(),
        stmts,
        hint,
        backslash_literal,
        ns: ns.clone(),
    }))
}

/// Routes a string the parser cannot read (or whose statement the
/// analyzer does not plan) by the lexer ([`crate::classify::unparsed`]):
/// when it names no declared table (nor a relation reaching one) the home
/// shard runs it, so the client gets PostgreSQL's answer — its own syntax
/// error included; schema statements run on every shard as DDL; anything
/// else is refused (`0A000`), never guessed. Such a plan has no hint (the
/// comments are not read) and counts as a write (what it does is unknown);
/// on the home shard its calls are every word before a `(`, so the node
/// checks their bodies for sharded tables as for a parsed statement.
/// `why` says why it is not parsed (in the refusal); the node also routes
/// this way a statement too long for it to parse (`max_parse_bytes`).
pub fn plan_unparsed(
    snapshot: &RoutingSnapshot,
    sql: &str,
    ns: &Namespace,
    why: &str,
) -> Result<Plan, RouteError> {
    let last = |n: &str| n.rsplit('.').next().unwrap_or(n).to_ascii_lowercase();
    let mut relations: Vec<String> = snapshot
        .sharded_tables()
        .map(|t| last(&t.name))
        .chain(snapshot.reference_tables().map(last))
        .chain(ns.reaching.keys().map(|(_, n)| n.to_ascii_lowercase()))
        .collect();
    relations.sort();
    relations.dedup();
    let (kind, body, n, calls) = match crate::classify::unparsed(sql, &relations) {
        Unparsed::Home { statements, calls } => {
            (StatementKind::Utility, Body::Home, statements, calls)
        }
        Unparsed::Schema(n) => (StatementKind::Ddl, Body::All, n, Vec::new()),
        Unparsed::Maintenance(n) => (StatementKind::Utility, Body::All, n, Vec::new()),
        Unparsed::Refuse(reason) => {
            return Err(RouteError::unsupported(format!(
                "{reason} (hotrepart's SQL parser: {why})"
            )))
        }
    };
    // A temporary object lives on the home shard only
    // (`route/analyze/temp.rs`): schema statements on one go there.
    let temp = crate::classify::outside_transaction(sql)
        == Some(crate::classify::OutsideTransaction::Temporary);
    let body = match body {
        Body::All if temp && kind == StatementKind::Ddl => {
            if n > 1 {
                return Err(RouteError::unsupported(format!(
                    "several statements in one string, one of them on a temporary object, which lives on the home shard only while the others run on every shard: send it on its own (hotrepart's SQL parser: {why})"
                )));
            }
            Body::Home
        }
        other => other,
    };
    let stmts = if n == 0 {
        vec![StmtPlan::fixed(StatementKind::Empty, false, Body::Any)]
    } else {
        (0..n)
            .map(|_| {
                let mut p = StmtPlan::fixed(
                    kind.clone(),
                    kind != StatementKind::Utility || matches!(body, Body::Home),
                    body.clone(),
                );
                p.temp = temp;
                p
            })
            .collect()
    };
    Ok(Plan {
        sql: Arc::from(sql),
        epoch: snapshot.epoch(),
        calls: Arc::from(calls),
        stmts,
        hint: None,
        // Not tokenized by the parser: refuse under
        // standard_conforming_strings off whenever a backslash appears.
        backslash_literal: sql.contains('\\'),
        ns: ns.clone(),
    })
}

/// Plans and binds in one go (simple protocol, or no cache at hand).
pub fn route(
    snapshot: &RoutingSnapshot,
    sql: &str,
    params: &[Param<'_>],
    hints: &Hints,
) -> Result<Route, RouteError> {
    plan(snapshot, sql)?.bind(snapshot, params, hints)
}

/// Reads `hotrepart: shard=NAME` / `hotrepart: key=VALUE` from a comment's
/// text. Other comments are ignored; a malformed hotrepart comment is an
/// error (a typo must not silently route elsewhere).
fn parse_hint(
    snapshot: &RoutingSnapshot,
    comment: &str,
) -> Result<Option<CommentHint>, RouteError> {
    let c = comment.trim();
    let Some(rest) = c.strip_prefix("hotrepart:") else {
        return Ok(None);
    };
    let rest = rest.trim();
    let bad = || {
        RouteError::syntax(format!(
            "malformed hotrepart hint {c:?}: expected \"hotrepart: shard=NAME\" or \"hotrepart: key=VALUE\""
        ))
    };
    let (name, value) = rest.split_once('=').ok_or_else(bad)?;
    let value = unquote(value.trim());
    match name.trim() {
        "shard" => {
            let id = ShardId::new(&value).map_err(|_| bad())?;
            if snapshot.shard(&id).is_none() {
                return Err(RouteError::undefined(format!(
                    "hotrepart hint names unknown shard \"{id}\""
                )));
            }
            Ok(Some(CommentHint::Shard(id)))
        }
        "key" => Ok(Some(CommentHint::Key(value))),
        _ => Err(bad()),
    }
}

/// Strips one pair of single or double quotes (doubling escapes a quote).
fn unquote(v: &str) -> String {
    for q in ['\'', '"'] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            let inner = &v[1..v.len() - 1];
            return inner.replace(&format!("{q}{q}"), &q.to_string());
        }
    }
    v.to_owned()
}

/// Shards sorted and deduplicated, as a target (`One` for one, `All` when it
/// is every shard, `One(home)` when empty: a statement that provably matches
/// no row may run anywhere, and the home shard is deterministic).
fn target_of(snapshot: &RoutingSnapshot, shards: BTreeSet<ShardId>) -> Target {
    match shards.len() {
        0 => Target::One(snapshot.home_shard().clone()),
        1 => Target::One(
            shards
                .into_iter()
                .next()
                .unwrap_or_else(|| snapshot.home_shard().clone()),
        ),
        n if n == snapshot.shards().count() => Target::All,
        _ => Target::Shards(shards.into_iter().collect()),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(self))
    }
}

/// The parsed type of a cast target, for the key types.
fn key_type_of(name: &str) -> Option<KeyType> {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "varchar" | "character varying" | "text" => Some(KeyType::Text),
        _ => n.parse().ok(),
    }
}
