//! What the analysis of one statement produces: a [`StmtPlan`] (the
//! statement's kind, whether it writes, what a multi-shard read must
//! merge, the functions it calls) and its [`Body`], which [`crate::route::eval`]
//! turns into a target once the parameters are known. Data only.

use super::super::keys::{KeyExpr, TypedSrc};
use super::super::split::SplitText;
use super::super::{MergeNeed, StatementKind, TransactionKind};
use crate::catalog::ShardedTable;

/// A sharded occurrence as the binder sees it.
#[derive(Debug, Clone)]
pub(in crate::route) struct ShapeOcc {
    pub table: ShardedTable,
    /// The keys its relevant rows can have, evaluated with the key type and
    /// function of the second field (the table the restriction came from).
    pub restriction: Option<(KeyExpr, ShardedTable)>,
}

/// The general case: routed from the occurrences.
#[derive(Debug, Clone)]
pub(in crate::route) struct Shape {
    pub occs: Vec<ShapeOcc>,
    /// Number of connected components among `occs`.
    pub components: usize,
    /// Whether an occurrence in the outermost scope is not null-extended.
    pub anchored: bool,
    /// An undeclared table the statement uses (it must run on the home shard).
    pub home_table: Option<String>,
    /// `UPDATE … SET key = v`: the new key (must stay on the same shard).
    pub update_key: Option<(ShardedTable, TypedSrc)>,
    /// `INSERT … SELECT` into a sharded table (for messages).
    pub insert_select: bool,
    /// That table (declared name).
    pub insert_into: Option<String>,
    /// A set operation that makes the statement unanswerable over several
    /// shards, in words (refused with them when it does not run on one).
    pub set_op: Option<String>,
    /// A CTE of plain rows of a sharded table named more than once (it
    /// then covers no FROM: named in the refusal).
    pub cte_named_twice: Option<String>,
    /// An `IN (subquery)` over a sharded table whose rows each shard would
    /// compute from its own rows only (LIMIT, OFFSET, DISTINCT ON,
    /// aggregates not grouped by the key…): refused, in these words, when
    /// the statement does not run on one shard.
    pub per_shard_subquery: Option<String>,
    /// A derived table or CTE over a sharded table whose rows need all
    /// shards' rows (LIMIT, aggregates…), in words: what makes it opaque
    /// to joins on the key (named when such a join is refused).
    pub opaque_derived: Option<String>,
}

/// `INSERT … VALUES` into a sharded table.
#[derive(Debug, Clone)]
pub(in crate::route) struct InsertPlan {
    pub table: ShardedTable,
    /// The key of each row.
    pub rows: Vec<TypedSrc>,
    /// An undeclared table read by a subquery (all rows must go home).
    pub home_table: Option<String>,
    /// The statement's text cut into rows, for rewriting when split (None:
    /// not splittable: a single row, `$n` placeholders, or under EXPLAIN).
    pub split: Option<SplitText>,
    /// Whether the statement text has `$n` placeholders.
    pub has_placeholders: bool,
}

/// What the binder does with a statement.
#[derive(Debug, Clone)]
pub(in crate::route) enum Body {
    /// No table: any shard.
    Any,
    /// The home shard.
    Home,
    /// Every shard.
    All,
    /// Routed by occurrences.
    Shape(Shape),
    /// Routed row by row.
    Insert(InsertPlan),
    /// `COPY` of a sharded table (or `COPY FROM` of a reference table): every
    /// shard; the executor splits the rows (see [`crate::route::copy`]).
    Copy(std::sync::Arc<crate::route::copy::CopyPlan>),
}

/// One statement's plan.
#[derive(Debug, Clone)]
pub(in crate::route) struct StmtPlan {
    pub kind: StatementKind,
    pub is_write: bool,
    pub body: Body,
    /// What a multi-shard execution of this read would have to merge.
    pub merge: MergeNeed,
    /// Sharded tables it touches (for `key=` hints).
    pub sharded_tables: Vec<ShardedTable>,
    /// It writes a reference table (a shard hint must not narrow it).
    pub reference_write: bool,
    /// It writes a sharded table (a shard hint must respect ownership and
    /// the freeze, see [`crate::route::eval`]).
    pub writes_sharded: bool,
    /// It may write although it is no DML: `FOR UPDATE/SHARE` (row locks
    /// that must last to the commit). With [`StmtPlan::calls`], for commit
    /// purposes only (two-phase commit): routing still reads.
    pub may_write: bool,
    /// Functions it calls that the router does not know to be read-only
    /// (lower case, unqualified, deduplicated): the node treats the
    /// statement as a write when one of them is volatile.
    pub calls: Vec<String>,
    /// It creates, names or drops a temporary object of the session (which
    /// lives on one shard, and which two-phase commit cannot prepare).
    pub temp: bool,
    /// `EXPLAIN ANALYZE` of a write: it runs the write, and answers with
    /// plans, not its rows or its count (see [`crate::route::eval`]).
    pub explain_analyze_write: bool,
}

impl StmtPlan {
    pub(in crate::route) fn fixed(kind: StatementKind, is_write: bool, body: Body) -> StmtPlan {
        StmtPlan {
            kind,
            is_write,
            body,
            merge: MergeNeed::None,
            sharded_tables: Vec::new(),
            reference_write: false,
            writes_sharded: false,
            may_write: false,
            calls: Vec::new(),
            temp: false,
            explain_analyze_write: false,
        }
    }

    /// Whether hints apply to this kind of statement.
    pub(in crate::route) fn hintable(&self) -> bool {
        !matches!(
            self.kind,
            StatementKind::Empty
                | StatementKind::Transaction(_)
                | StatementKind::Set
                | StatementKind::Reset
                | StatementKind::Show
        )
    }
}

/// A transaction-control statement.
pub(super) fn tx(k: TransactionKind) -> StmtPlan {
    StmtPlan::fixed(StatementKind::Transaction(k), false, Body::Any)
}

/// DDL that runs on every shard.
pub(super) fn ddl_all() -> StmtPlan {
    StmtPlan::fixed(StatementKind::Ddl, true, Body::All)
}

impl StmtPlan {
    /// How a refusal names the statement's kind.
    pub(super) fn kind_name(&self) -> &'static str {
        match self.kind {
            StatementKind::Ddl => "DDL",
            StatementKind::Copy { .. } => "COPY",
            StatementKind::Transaction(_) => "transaction control",
            StatementKind::Set | StatementKind::Reset => "SET/RESET",
            StatementKind::Show => "SHOW",
            _ => "this statement",
        }
    }
}
