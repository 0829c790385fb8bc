//! The merge plan of a multi-shard SELECT: what to send to every shard and
//! how the executor combines the shards' rows into the client's answer.
//!
//! A plan is pure data, made at plan time from the statement text alone (it
//! does not depend on parameter values). The executor runs
//! [`MergePlan::shard_sql`] on every target shard and then, in this order:
//!
//! 1. **Collect** the shard rows. When [`MergePlan::shards_sorted`] is set,
//!    every shard streams its rows already sorted by
//!    [`MergePlan::order_by`], so a k-way merge keeps the order.
//! 2. **Combine** (only with [`MergePlan::aggregate`]): rows with equal
//!    [`AggregatePlan::group_by`] columns (NULLs equal, as in GROUP BY) are
//!    one group; each [`ShardCol::Partial`] column is combined across the
//!    group's rows, [`ShardCol::GroupKey`] and [`ShardCol::Plain`] columns are
//!    taken from any row (they are equal within a group). With an empty
//!    `group_by` every shard sends exactly one row and they form one group
//!    (with [`ShardCol::Distinct`] columns, one row per distinct value, or
//!    none: the executor then answers the row of an empty input).
//!    [`ShardCol::Distinct`] columns become their group's count of distinct
//!    values.
//! 3. **HAVING** ([`AggregatePlan::having`]) filters the combined groups.
//! 4. **Outputs**: the client row is [`AggregatePlan::outputs`] (aggregated
//!    plans) or the shard row without its first [`MergePlan::hidden`]
//!    columns (plans without aggregation).
//! 5. **DISTINCT** ([`MergePlan::distinct`]) removes duplicate client rows.
//!    **DISTINCT ON** ([`MergePlan::distinct_on`]) keeps the first of the
//!    merged rows of each of its groups (they arrive next to each other).
//! 6. **ORDER BY** [`MergePlan::order_by`] (already in order when the
//!    shards were sorted and the rows were merged), then **OFFSET** and
//!    **LIMIT**.
//!
//! Column numbers ([`Combined::Col`], [`AggregatePlan::group_by`], …) are
//! 0-based positions in the shard row. The first [`MergePlan::hidden`] shard
//! columns are hidden (sort keys, group keys, HAVING operands and `avg`
//! counts that the client did not select): they are never sent to the
//! client. Hidden columns come *first* so that their positions are known
//! even when the select list has a `*`.
//!
//! Parameter numbers ([`LimitSpec::Param`], [`Operand::Param`]) are 0-based
//! indexes into the Bind parameters (`$1` is 0). `shard_sql` uses the same
//! `$n` placeholders as the original statement, but some of them (those only
//! in HAVING, LIMIT or OFFSET) may no longer appear in it: the executor should
//! prepare it with the parameter types PostgreSQL reported for the original
//! statement.

/// How a multi-shard SELECT is answered; see the module documentation for
/// the order of the steps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MergePlan {
    /// The SELECT every shard runs: hidden columns first, then the client's
    /// select list (partial aggregates in place of `avg`); GROUP BY by
    /// position; no HAVING; ORDER BY by position when
    /// [`MergePlan::shards_sorted`]; `LIMIT offset+limit` when pushing the
    /// limit down is correct; no OFFSET.
    pub shard_sql: String,
    /// Number of leading hidden shard columns (not sent to the client).
    pub hidden: usize,
    /// Aggregation (GROUP BY, aggregates, HAVING); `None` when rows pass
    /// through.
    pub aggregate: Option<AggregatePlan>,
    /// `SELECT DISTINCT`: duplicate client rows are removed after combining.
    pub distinct: bool,
    /// `SELECT DISTINCT ON (…)`: shard columns (hidden or not) of its
    /// expressions; empty without it. Only in plans without aggregation,
    /// with [`MergePlan::shards_sorted`] and `order_by` leading with these
    /// columns: of the merged rows with equal values in them (compared as
    /// GROUP BY compares, NULLs equal) only the first is kept, before OFFSET
    /// and LIMIT.
    pub distinct_on: Vec<usize>,
    /// Parameters (0-based) written as the 0 of `coalesce(sum(x), $n)`
    /// (SQLAlchemy binds its literals): each shard's coalesced sum is a
    /// partial sum only when the value is 0, which the executor checks.
    pub zero_params: Vec<usize>,
    /// The final order (empty: any order). PostgreSQL's defaults are
    /// resolved: `nulls_first` is true for DESC unless `NULLS LAST` was given.
    pub order_by: Vec<SortKey>,
    /// Every shard returns its rows sorted by `order_by` (only set when all
    /// sort keys are shard columns; for aggregated plans only when the sort
    /// keys are exactly the group key, so a group's partial rows arrive next
    /// to each other after a k-way merge).
    pub shards_sorted: bool,
    /// `LIMIT` (or `FETCH FIRST`) applied after the merge; `None`: no limit.
    /// A NULL parameter means no limit; a negative value is PostgreSQL's
    /// error `2201W` ("LIMIT must not be negative").
    pub limit: Option<LimitSpec>,
    /// `OFFSET` applied after the merge. A NULL parameter means 0; a
    /// negative value is error `2201X` ("OFFSET must not be negative").
    pub offset: Option<LimitSpec>,
}

/// The aggregation part of a [`MergePlan`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregatePlan {
    /// The meaning of every shard column (hidden ones included).
    pub shard_cols: Vec<ShardCol>,
    /// The group key: shard columns ([`ShardCol::GroupKey`]). Empty: the
    /// whole result is one group (aggregates without GROUP BY).
    pub group_by: Vec<usize>,
    /// The client's columns, in order. Output `i` comes from shard column
    /// `hidden + i` (for [`Combined::Avg`], that column is its `sum`), so the
    /// shard's field description `hidden + i` describes it, except for the
    /// type of an `avg` (numeric for integer and numeric sums, float8 for
    /// float sums, interval for interval sums).
    pub outputs: Vec<Combined>,
    /// Applied to the combined groups.
    pub having: Option<HavingExpr>,
    /// The separator of each [`Partial::StringAgg`] column, by shard
    /// column: the string literal the statement wrote.
    pub separators: Vec<(usize, String)>,
}

/// What a shard column of an aggregated plan holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShardCol {
    /// Part of the group key.
    GroupKey,
    /// A value that depends only on the group (equal in every partial row
    /// of a group): take it from any row.
    Plain,
    /// A partial aggregate, combined across the group's rows.
    Partial(Partial),
    /// `count(DISTINCT x)` of a value that is not the shard key: the shards
    /// group by `x` too (this column), one row per distinct value; the
    /// executor counts a group's distinct non-NULL values (compared as
    /// GROUP BY compares them). The column then holds that count (int8).
    Distinct,
}

/// How partial aggregates combine. NULL partials are ignored; the result is
/// NULL when every partial is NULL (never for counts, which are never NULL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Partial {
    /// `count(*)`, `count(x)` (int8): the sum of the partial counts.
    Count,
    /// `sum(x)`: the sum, in the type of the partial sums.
    Sum,
    /// `min(x)`: the least.
    Min,
    /// `max(x)`: the greatest.
    Max,
    /// `bool_and(x)` / `every(x)`: AND.
    BoolAnd,
    /// `bool_or(x)`: OR.
    BoolOr,
    /// `array_agg(x)` (no DISTINCT, no ORDER BY: the order of the elements
    /// is unspecified, so the shards' arrays one after another is an
    /// answer PostgreSQL could give): the elements concatenated.
    ArrayAgg,
    /// `jsonb_agg(x)` (no DISTINCT, no ORDER BY): the arrays concatenated.
    JsonbAgg,
    /// `string_agg(x, 'sep')` (a literal separator, no DISTINCT, no ORDER
    /// BY): the strings joined by the separator
    /// ([`AggregatePlan::separators`]).
    StringAgg,
}

/// The type a combined count is cast to (`count(*)::int`, which
/// node-postgres users write so that the count is not a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountCast {
    /// `::smallint`, `::int2`
    Int2,
    /// `::int`, `::integer`, `::int4`
    Int4,
    /// `::bigint`, `::int8`
    Int8,
    /// `::numeric`, `::decimal` (no precision)
    Numeric,
    /// `::float8`, `::double precision`
    Float8,
    /// `::text`
    Text,
}

/// A value of a combined row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Combined {
    /// A shard column (combined, if a partial aggregate).
    Col(usize),
    /// `avg(x)`: the combined `sum` divided by the combined `count`; NULL
    /// when the count is 0.
    Avg {
        /// The shard column of `sum(x)`.
        sum: usize,
        /// The shard column of `count(x)`.
        count: usize,
    },
    /// `count(…)::T`: the combined count (shard column `col`) cast to `to`
    /// (an integer type too small for it: PostgreSQL's 22003).
    CountAs {
        /// The shard column of the partial `count(…)`.
        col: usize,
        /// The type.
        to: CountCast,
    },
}

/// One key of an ORDER BY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SortKey {
    /// What is compared.
    pub value: Combined,
    /// Descending.
    pub desc: bool,
    /// NULLs sort before non-NULL values.
    pub nulls_first: bool,
}

/// A LIMIT or OFFSET value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitSpec {
    /// A literal number.
    Count(u64),
    /// A parameter (0-based index).
    Param(usize),
}

/// A HAVING condition over combined groups, in SQL's three-valued logic (a
/// group passes when the condition is true, not NULL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HavingExpr {
    /// Both.
    And(Box<HavingExpr>, Box<HavingExpr>),
    /// Either.
    Or(Box<HavingExpr>, Box<HavingExpr>),
    /// Negation.
    Not(Box<HavingExpr>),
    /// `left op right`.
    Compare {
        /// Left operand.
        left: Operand,
        /// Operator.
        op: CompareOp,
        /// Right operand.
        right: Operand,
    },
    /// `operand IS [NOT] NULL`.
    IsNull {
        /// The operand.
        operand: Operand,
        /// `IS NOT NULL`.
        negated: bool,
    },
}

/// An operand of a HAVING comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operand {
    /// A combined value (an aggregate, or a shard-computed expression).
    Value(Combined),
    /// A literal, taken as the type of the other operand (as PostgreSQL
    /// does with untyped literals).
    Literal(Literal),
    /// A parameter (0-based index), taken as the type of the other operand.
    Param(usize),
}

/// A literal in HAVING.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Literal {
    /// `NULL`.
    Null,
    /// `TRUE` / `FALSE`.
    Bool(bool),
    /// A number as written (`-` included), e.g. `"10"`, `"-2.5"`, `"1e3"`.
    Number(String),
    /// A string literal's value (of no type yet: PostgreSQL reads it with
    /// the input function of the type it is compared with), or a
    /// parameter's sent as text of no type (node-postgres sends them so).
    String(String),
    /// A parameter's value typed `text` (or varchar, char): compared with
    /// text only (PostgreSQL has no `bigint > text`).
    Text(String),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `<>`, `!=`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}
