//! The FROM/scope analyzer (the binder): walks a query's FROM lists,
//! scopes and conditions to find the sharded *occurrences*, the *pins*
//! that restrict them, what they *inherit* and the *edges* that join them
//! (the model is in [`super`]), then sums them up as a [`Shape`]. Reads
//! (`SELECT`, and the queries inside any statement) are planned here
//! ([`Analyzer::select_statement`]); the write planners ([`super::stmt`])
//! use the same binder for their targets and subqueries.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, BinaryOperator, Distinct, Expr, InTarget, JoinConstraint, JoinOperator, ObjectName,
    Query, Select, SelectItem, SetExpr, TableFactor, TableWithJoins, Value, Visit, Visitor,
};

use super::super::keys::{array_src, colocated, value_src, KeyExpr, TypedSrc};
use super::super::names::{is_temp_name, last_name, norm, table_name};
use super::super::{Namespace, RouteError, StatementKind};
use super::expr::{conjuncts, strip, unsupported};
use super::functions::{AGGREGATES, PURE_FUNCTIONS, READ_ONLY};
use super::merge_need::{aggregates_in, select_merge_need};
use super::merge_plan::merge_plan;
use super::plan::{Body, Shape, ShapeOcc, StmtPlan};
use crate::catalog::{KeyType, RoutingSnapshot, ShardedTable, TablePlacement};

/// Where a FROM item's name points.
#[derive(Debug, Clone)]
pub(super) struct Item {
    /// Name visible to column references (alias, or the table's own name).
    pub(super) visible: String,
    /// `schema.table` when not aliased (for three-part column references).
    pub(super) qualified: Option<String>,
    /// The sharded occurrence, if any.
    pub(super) occ: Option<usize>,
    /// `AS a(x, y)`: columns renamed, the key column name is unreliable.
    pub(super) col_aliases: bool,
}

#[derive(Debug, Default)]
pub(super) struct Scope {
    pub(super) parent: Option<usize>,
    pub(super) items: Vec<Item>,
    /// CTE names visible from here (FROM lookups only), each with whether
    /// it covers a FROM that names it (see [`Analyzer::cte_covers`]).
    pub(super) ctes: Vec<(String, bool)>,
    /// Every row of this scope's FROM contains a row (not null-extended) of
    /// a sharded occurrence: its output rows are partitioned by shard.
    pub(super) covered: bool,
}

#[derive(Debug)]
pub(super) struct Occ {
    pub(super) table: ShardedTable,
    pub(super) scope: usize,
    pub(super) nullable: bool,
}

/// One output column of a query, for `IN (SELECT …)` and `INSERT … SELECT`.
#[derive(Debug, Clone)]
pub(super) enum OutCol {
    /// The key column of an occurrence of the query's own scope.
    Key(usize),
    /// A literal or parameter expression.
    Value(Box<Expr>),
    Other,
}

#[derive(Debug, Default)]
pub(super) struct QueryInfo {
    /// The scope of the query's own SELECT (None for set operations etc.).
    pub(super) root: Option<usize>,
    /// Output columns, when known (None with `*` or set operations).
    pub(super) outputs: Option<Vec<OutCol>>,
    /// A UNION: the root scope of each branch (None for a branch without
    /// one, such as VALUES).
    pub(super) union: Option<Union>,
}

/// The branches of a UNION (nested UNIONs flattened).
#[derive(Debug, Default, Clone)]
pub(super) struct Union {
    /// The root scope of each branch's SELECT (None: VALUES and the like).
    pub(super) branches: Vec<Option<usize>>,
    /// Per branch: constants only (VALUES or a SELECT without FROM, no
    /// function call, no subquery) — the same rows from every shard.
    pub(super) constant: Vec<bool>,
    /// Some operator is `UNION ALL` (duplicates kept).
    pub(super) all: bool,
}

pub(super) struct Analyzer<'a> {
    pub(super) snap: &'a RoutingSnapshot,
    pub(super) ns: &'a Namespace,
    pub(super) occs: Vec<Occ>,
    pub(super) scopes: Vec<Scope>,
    pub(super) pins: Vec<(usize, KeyExpr)>,
    /// (o, p): o inherits p's restriction.
    pub(super) inherits: Vec<(usize, usize)>,
    pub(super) edges: Vec<(usize, usize)>,
    pub(super) home_tables: Vec<String>,
    pub(super) reference_tables: Vec<String>,
    /// Names `pg_prepared_xacts` (also listed in `home_tables`): each
    /// shard lists its own prepared transactions, so a read of it alone
    /// goes to every shard ([`is_every_shard_view`]).
    pub(super) every_shard_view: bool,
    /// Calls a function not in [`PURE_FUNCTIONS`].
    pub(super) impure_calls: bool,
    /// Calls of functions not known to be read-only ([`READ_ONLY`]).
    pub(super) calls: Vec<String>,
    /// A query with FOR UPDATE/SHARE.
    pub(super) locks: bool,
    pub(super) placeholders: bool,
    /// A name resolved to a temporary relation of the session
    /// ([`Namespace::temp`]).
    pub(super) temp: std::cell::Cell<bool>,
    /// `SELECT … INTO TEMP`: the query makes a temporary table.
    pub(super) into_temp: bool,
    /// Queries being analysed inside the statement's own (subqueries,
    /// derived tables, CTEs).
    nesting: usize,
    /// A set operation the shape cannot take over several shards: any
    /// inside a subquery, derived table or CTE, or INTERSECT/EXCEPT — the
    /// words of the refusal (see `Shape::set_op`).
    set_op: Option<String>,
    /// A CTE of plain rows of a sharded table that does not cover the FROM
    /// naming it because the statement names it more than once.
    cte_named_twice: Option<String>,
    /// See [`Shape::per_shard_subquery`].
    per_shard_subquery: Option<String>,
    /// See [`Shape::opaque_derived`].
    opaque_derived: Option<String>,
}

/// A visitor that analyses the subqueries directly inside an expression (in
/// scope `scope`) and notes function calls.
pub(super) struct SubqueryWalker<'x, 'a> {
    pub(super) a: &'x mut Analyzer<'a>,
    pub(super) scope: usize,
    pub(super) depth: usize,
}

impl Visitor for SubqueryWalker<'_, '_> {
    type Break = RouteError;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<RouteError> {
        if self.depth == 0 {
            if let Err(e) = self.a.query(q, Some(self.scope)) {
                return ControlFlow::Break(e);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<RouteError> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<RouteError> {
        match e {
            Expr::Function(f) => {
                let name = last_name(&f.name);
                if !PURE_FUNCTIONS.contains(&name.as_str()) {
                    self.a.impure_calls = true;
                }
                self.a.note_call(&name);
            }
            Expr::Value(v) if matches!(v.value, Value::Placeholder(_)) => {
                self.a.placeholders = true;
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Analyzer<'_> {
    /// See [`table_name`].
    pub(super) fn table_name(&self, name: &ObjectName) -> Result<String, RouteError> {
        let t = table_name(self.ns, name)?;
        if is_temp_name(&t) {
            self.temp.set(true);
        }
        Ok(t)
    }
}

impl<'a> Analyzer<'a> {
    pub(super) fn new(snap: &'a RoutingSnapshot, ns: &'a Namespace) -> Self {
        Analyzer {
            snap,
            ns,
            occs: Vec::new(),
            scopes: Vec::new(),
            pins: Vec::new(),
            inherits: Vec::new(),
            edges: Vec::new(),
            home_tables: Vec::new(),
            reference_tables: Vec::new(),
            every_shard_view: false,
            impure_calls: false,
            calls: Vec::new(),
            locks: false,
            placeholders: false,
            temp: std::cell::Cell::new(false),
            into_temp: false,
            nesting: 0,
            set_op: None,
            cte_named_twice: None,
            per_shard_subquery: None,
            opaque_derived: None,
        }
    }

    pub(super) fn new_scope(&mut self, parent: Option<usize>) -> usize {
        self.scopes.push(Scope {
            parent,
            ..Scope::default()
        });
        self.scopes.len() - 1
    }

    pub(super) fn walk<V: Visit + ?Sized>(
        &mut self,
        node: &V,
        scope: usize,
    ) -> Result<(), RouteError> {
        let mut w = SubqueryWalker {
            a: self,
            scope,
            depth: 0,
        };
        match node.visit(&mut w) {
            ControlFlow::Break(e) => Err(e),
            ControlFlow::Continue(()) => Ok(()),
        }
    }

    /// Whether the rows of `q` (analysed: `info`) are partitioned by shard
    /// as its sharded table's are — each comes from rows of one shard, and
    /// the shards' answers concatenated are `q`'s: [`row_local`] rows, or
    /// groups or DISTINCT rows by the shard key, windows partitioned by
    /// it (Django's `count()` of an annotated or `distinct()` queryset:
    /// `SELECT COUNT(*) FROM (SELECT … GROUP BY pk) subquery`).
    fn partitioned(&self, q: &Query, info: &QueryInfo) -> bool {
        if row_local(q) {
            return true;
        }
        if q.with.is_some() || q.order_by.is_some() || q.limit_clause.is_some() || q.fetch.is_some()
        {
            return false;
        }
        let is_key = |e: &Expr| {
            info.root
                .and_then(|root| self.resolve(e, root))
                .is_some_and(|o| !self.occs[o].nullable)
        };
        matches!(merge_plan(q, &is_key), super::super::MergeNeed::None)
    }

    /// `… IN (q)`, a semi-join on the key (`q` analysed: `info`): each
    /// shard tests membership in the rows `q` gives from its own rows —
    /// PostgreSQL's answer only when those rows, concatenated, are `q`'s
    /// (a filter, a join on the key, groups by the key); its order and
    /// DISTINCT do not change membership. Else noted for the refusal.
    /// Whether it is (true), or noted for the refusal (false).
    fn in_subquery_whole(&mut self, q: &Query, info: &QueryInfo) -> bool {
        let mut q = q.clone();
        if q.limit_clause.is_none() && q.fetch.is_none() {
            q.order_by = None;
        }
        if let SetExpr::Select(sel) = q.body.as_mut() {
            if matches!(sel.distinct, Some(Distinct::Distinct)) {
                sel.distinct = None;
            }
        }
        let is_key = |e: &Expr| {
            info.root
                .and_then(|root| self.resolve(e, root))
                .is_some_and(|o| !self.occs[o].nullable)
        };
        let what = match merge_plan(&q, &is_key) {
            super::super::MergeNeed::None => return true,
            super::super::MergeNeed::Refuse(what) => what,
            super::super::MergeNeed::Merge(_) => {
                "LIMIT, OFFSET, FETCH, DISTINCT ON or aggregates not grouped by the shard key"
                    .to_owned()
            }
        };
        self.per_shard_subquery.get_or_insert_with(|| format!(
            "an IN (subquery) over a sharded table whose rows need all shards' rows ({what}), in a statement over several shards: each shard would test membership in the rows it computes from its own rows only; restrict the subquery itself to one shard's key, or run it first and pass its values"
        ));
        false
    }

    fn is_cte(&self, scope: Option<usize>, name: &str) -> bool {
        self.cte_covers(scope, name).is_some()
    }

    /// The CTE `name` seen from `scope`, if it is one: whether it covers
    /// the FROM that names it — a row-local CTE over a sharded table
    /// (rows partitioned by shard, as a derived table's), named once in
    /// the whole statement (a second reference, a self-join or a subquery
    /// over it, would see only the shard's part).
    fn cte_covers(&self, mut scope: Option<usize>, name: &str) -> Option<bool> {
        while let Some(s) = scope {
            if let Some((_, covers)) = self.scopes[s].ctes.iter().rev().find(|c| c.0 == name) {
                return Some(*covers);
            }
            scope = self.scopes[s].parent;
        }
        None
    }

    /// Registers a base table named in FROM (or as a DML target) in `scope`.
    pub(super) fn table_item(
        &mut self,
        name: &ObjectName,
        alias: Option<&ast::TableAlias>,
        scope: usize,
    ) -> Result<Option<usize>, RouteError> {
        let visible = alias.map(|a| norm(&a.name));
        let col_aliases = alias.is_some_and(|a| !a.columns.is_empty());
        if name.0.len() == 1 {
            let simple = last_name(name);
            if self.is_cte(Some(scope), &simple) {
                self.scopes[scope].items.push(Item {
                    visible: visible.unwrap_or(simple),
                    qualified: None,
                    occ: None,
                    col_aliases,
                });
                return Ok(None);
            }
        }
        let catalog = self.table_name(name)?;
        let own = last_name(name);
        let qualified = if visible.is_some() {
            None
        } else if catalog.contains('.') {
            Some(catalog.clone())
        } else {
            Some(format!("public.{catalog}"))
        };
        let occ = match self.snap.placement(&catalog) {
            TablePlacement::Sharded(t) => {
                self.occs.push(Occ {
                    table: t.clone(),
                    scope,
                    nullable: false,
                });
                Some(self.occs.len() - 1)
            }
            TablePlacement::Reference => {
                self.reference_tables.push(catalog.clone());
                None
            }
            TablePlacement::Home(_) => {
                self.every_shard_view |= is_every_shard_view(&catalog);
                self.home_tables.push(catalog.clone());
                None
            }
        };
        self.scopes[scope].items.push(Item {
            visible: visible.unwrap_or(own),
            qualified,
            occ,
            col_aliases,
        });
        Ok(occ)
    }

    /// The occurrence whose key column `e` names, seen from `scope`.
    fn resolve(&self, e: &Expr, scope: usize) -> Option<usize> {
        match strip(e) {
            Expr::Identifier(id) => {
                let col = norm(id);
                let sc = &self.scopes[scope];
                // An unqualified name resolves in the innermost scope (we
                // do not know the other columns of tables, so never outward).
                if sc.items.iter().any(|i| i.col_aliases) {
                    return None;
                }
                let mut found = sc
                    .items
                    .iter()
                    .filter_map(|i| i.occ)
                    .filter(|&o| self.occs[o].table.key_column == col);
                let first = found.next()?;
                found.next().is_none().then_some(first)
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(norm).collect();
                // `q.col` matches an item by its visible name; `s.t.col`
                // matches an unaliased table by its qualified name.
                let (qualifier, by_visible, col) = match names.as_slice() {
                    [q, c] => (q.clone(), true, c),
                    [sch, t, c] => (format!("{sch}.{t}"), false, c),
                    _ => return None,
                };
                let qual = |i: &Item| {
                    if by_visible {
                        i.visible == qualifier
                    } else {
                        i.qualified.as_deref() == Some(qualifier.as_str())
                    }
                };
                let mut s = Some(scope);
                while let Some(cur) = s {
                    if let Some(item) = self.scopes[cur].items.iter().find(|i| qual(i)) {
                        let o = item.occ?;
                        return (!item.col_aliases && self.occs[o].table.key_column == *col)
                            .then_some(o);
                    }
                    s = self.scopes[cur].parent;
                }
                None
            }
            _ => None,
        }
    }

    /// The keys that rows of occurrence `o` must have for `e` to hold.
    fn pin_of(&self, e: &Expr, o: usize, scope: usize) -> Option<KeyExpr> {
        let ty = self.occs[o].table.key_type;
        match strip(e) {
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => {
                    match (self.pin_of(left, o, scope), self.pin_of(right, o, scope)) {
                        (Some(a), Some(b)) => Some(KeyExpr::And(Box::new(a), Box::new(b))),
                        (a, b) => a.or(b),
                    }
                }
                BinaryOperator::Or => {
                    let a = self.pin_of(left, o, scope)?;
                    let b = self.pin_of(right, o, scope)?;
                    Some(KeyExpr::Or(Box::new(a), Box::new(b)))
                }
                BinaryOperator::Eq => {
                    let (col, val) = if self.resolve(left, scope) == Some(o) {
                        (left, right)
                    } else if self.resolve(right, scope) == Some(o) {
                        (right, left)
                    } else {
                        return None;
                    };
                    let _ = col;
                    value_src(val, ty).ok().map(|s| KeyExpr::Keys(vec![s]))
                }
                _ => None,
            },
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } if self.resolve(expr, scope) == Some(o) => {
                let srcs: Option<Vec<TypedSrc>> =
                    list.iter().map(|v| value_src(v, ty).ok()).collect();
                srcs.map(KeyExpr::Keys)
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } if self.resolve(left, scope) == Some(o) => array_src(right, ty).map(KeyExpr::Keys),
            _ => None,
        }
    }

    /// A filtering condition `e` (WHERE, or a join's ON) in `scope`.
    /// `local`: occurrences the condition relates; `filtered`: those whose
    /// rows it filters.
    pub(super) fn condition(
        &mut self,
        e: &Expr,
        scope: usize,
        local: &[usize],
        filtered: &[usize],
    ) -> Result<(), RouteError> {
        for &o in filtered {
            if let Some(k) = self.pin_of(e, o, scope) {
                self.pins.push((o, k));
            }
        }
        for c in conjuncts(e) {
            match c {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    if let (Some(a), Some(b)) =
                        (self.resolve(left, scope), self.resolve(right, scope))
                    {
                        self.key_equality(a, b, local, filtered);
                    }
                    self.walk(c, scope)?;
                }
                Expr::In {
                    expr,
                    target: InTarget::Subquery(q),
                    negated: false,
                    ..
                } => {
                    self.walk(expr.as_ref(), scope)?;
                    let info = self.query(q, Some(scope))?;
                    // `key IN (SELECT key …)`, or a row of columns one of
                    // which is the key against the key in the same place
                    // (`(author_id, id) IN (SELECT author_id, id …)`,
                    // Django's composite primary keys).
                    let lhs: Vec<&Expr> = match strip(expr) {
                        Expr::Tuple(items) => items.iter().collect(),
                        one => vec![one],
                    };
                    let mut pairs = Vec::new();
                    if let (Some(outs), Some(root)) = (&info.outputs, info.root) {
                        if outs.len() == lhs.len() {
                            for (l, out) in lhs.iter().zip(outs) {
                                let b = match out {
                                    OutCol::Key(b)
                                        if self.occs[*b].scope == root
                                            && !self.occs[*b].nullable =>
                                    {
                                        Some(*b)
                                    }
                                    _ => None,
                                };
                                if let (Some(a), Some(b)) = (self.resolve(l, scope), b) {
                                    pairs.push((a, b));
                                }
                            }
                        }
                    }
                    // A subquery whose rows need all shards' rows (its
                    // LIMIT…) must not take the outer key's restriction:
                    // on that key's shard alone it would compute them from
                    // that shard's rows (the outer rows may still take its
                    // own: they match its keys).
                    let whole = pairs.is_empty() || self.in_subquery_whole(q, &info);
                    for (a, b) in pairs {
                        if filtered.contains(&a)
                            && colocated(&self.occs[a].table, &self.occs[b].table)
                        {
                            // A semi-join on the key: both sides' relevant
                            // rows have keys of the other side.
                            self.edges.push((a, b));
                            self.inherits.push((a, b));
                            if whole {
                                self.inherits.push((b, a));
                            }
                        }
                    }
                }
                other => self.walk(other, scope)?,
            }
        }
        Ok(())
    }

    fn key_equality(&mut self, a: usize, b: usize, local: &[usize], filtered: &[usize]) {
        if a == b || !colocated(&self.occs[a].table, &self.occs[b].table) {
            return;
        }
        let fa = filtered.contains(&a);
        let fb = filtered.contains(&b);
        if fa || fb || (local.contains(&a) && local.contains(&b)) {
            self.edges.push((a, b));
        }
        if fa {
            self.inherits.push((a, b));
        }
        if fb {
            self.inherits.push((b, a));
        }
    }

    /// Analyses a query in a new scope under `parent`.
    pub(super) fn query(
        &mut self,
        q: &Query,
        parent: Option<usize>,
    ) -> Result<QueryInfo, RouteError> {
        let nested = usize::from(parent.is_some());
        self.nesting += nested;
        let info = self.query_in(q, parent);
        self.nesting -= nested;
        info
    }

    fn query_in(&mut self, q: &Query, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        self.locks |= !q.locks.is_empty();
        let mut scope = parent;
        if let Some(with) = &q.with {
            let cs = self.new_scope(parent);
            if with.recursive {
                for cte in &with.cte_tables {
                    self.scopes[cs].ctes.push((norm(&cte.alias.name), false));
                }
            }
            for cte in &with.cte_tables {
                match cte.query.body.as_ref() {
                    SetExpr::Insert(_)
                    | SetExpr::Update(_)
                    | SetExpr::Delete(_)
                    | SetExpr::Merge(_) => {
                        return Err(unsupported("data-modifying statements in WITH"));
                    }
                    _ => {}
                }
                let info = self.query(&cte.query, Some(cs))?;
                let name = norm(&cte.alias.name);
                let plain = !with.recursive
                    && row_local(&cte.query)
                    && info.root.is_some_and(|r| self.scopes[r].covered);
                let covers = plain && references(q, &name) == 1;
                if plain && !covers {
                    self.cte_named_twice.get_or_insert_with(|| name.clone());
                }
                self.scopes[cs].ctes.push((name, covers));
            }
            scope = Some(cs);
        }
        let info = self.set_expr(&q.body, scope)?;
        let tail_scope = match info.root.or(scope) {
            Some(s) => s,
            None => self.new_scope(None),
        };
        if let Some(ob) = &q.order_by {
            self.walk(ob, tail_scope)?;
        }
        if let Some(l) = &q.limit_clause {
            self.walk(l, tail_scope)?;
        }
        Ok(info)
    }

    fn set_expr(&mut self, body: &SetExpr, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        match body {
            SetExpr::Select(s) => self.select(s, parent),
            SetExpr::Query(q) => self.query(q, parent),
            SetExpr::SetOperation {
                left,
                right,
                op,
                set_quantifier,
            } => {
                let l = self.set_expr(left, parent)?;
                let r = self.set_expr(right, parent)?;
                if self.set_op.is_none() {
                    if self.nesting > 0 {
                        self.set_op = Some(format!(
                            "{op} inside a subquery, derived table or CTE of a statement over several shards (each shard would combine only its own rows): run the set operation as the outermost query (UNION [ALL] is merged there), or name the shard key so that one shard answers"
                        ));
                    } else if *op != ast::SetOperator::Union {
                        self.set_op = Some(format!(
                            "{op} over several shards (rows of different shards would have to meet): name the shard key so that one shard answers, or compute it in the application"
                        ));
                    }
                }
                if *op != ast::SetOperator::Union {
                    return Ok(QueryInfo::default());
                }
                // The branches, for the shape of a UNION over several
                // shards (each branch on its own: see `shape`).
                let mut u = Union {
                    all: matches!(set_quantifier, ast::SetQuantifier::All),
                    ..Union::default()
                };
                for (side, ast) in [(l, left), (r, right)] {
                    match side.union {
                        Some(inner) => {
                            u.all |= inner.all;
                            u.branches.extend(inner.branches);
                            u.constant.extend(inner.constant);
                        }
                        None => {
                            u.branches.push(side.root);
                            u.constant.push(constant_branch(ast));
                        }
                    }
                }
                Ok(QueryInfo {
                    union: Some(u),
                    ..QueryInfo::default()
                })
            }
            SetExpr::Values(v) => {
                let s = self.new_scope(parent);
                for row in &v.rows {
                    self.walk(&row.content, s)?;
                }
                Ok(QueryInfo::default())
            }
            SetExpr::Table(t) => {
                let s = self.new_scope(parent);
                let name = match (&t.schema_name, &t.table_name) {
                    (Some(schema), Some(table)) => {
                        ObjectName::from(vec![schema.clone(), table.clone()])
                    }
                    (None, Some(table)) => ObjectName::from(vec![table.clone()]),
                    _ => return Err(unsupported("TABLE without a name")),
                };
                self.table_item(&name, None, s)?;
                Ok(QueryInfo {
                    root: Some(s),
                    outputs: None,
                    union: None,
                })
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                Err(unsupported("data-modifying statement inside a query"))
            }
        }
    }

    fn select(&mut self, sel: &Select, parent: Option<usize>) -> Result<QueryInfo, RouteError> {
        match &sel.into {
            None => {}
            // Like CREATE TEMP TABLE … AS: see `plan_known`.
            Some(into) if into.temporary => self.into_temp = true,
            Some(_) => {
                return Err(unsupported(
                    "SELECT … INTO (the new table would hold different rows on each shard)",
                ))
            }
        }
        let s = self.new_scope(parent);
        for twj in &sel.from {
            let (_, covered) = self.table_with_joins(twj, s)?;
            self.scopes[s].covered |= covered;
        }
        // `SELECT 1 AS "row_exists" FROM (SELECT 1 AS dummy_column)
        // "dummy_table" WHERE EXISTS (subquery) LIMIT 1` (TypeORM's
        // `exists()`): one constant row, kept when the subquery has a row.
        // When its rows are partitioned by shard, the shards' answers are
        // that row or nothing: the merge keeps one (`DISTINCT`,
        // `merge_plan::exists_filter_plan`). Only as the statement itself.
        if let Some(subquery) = exists_filter(sel).filter(|_| parent.is_none()) {
            let info = self.query(subquery, Some(s))?;
            self.scopes[s].covered =
                row_local(subquery) && info.root.is_some_and(|r| self.scopes[r].covered);
            return Ok(QueryInfo {
                root: Some(s),
                outputs: Some(vec![OutCol::Other; sel.projection.len()]),
                union: None,
            });
        }
        if let Some(w) = &sel.selection {
            let here: Vec<usize> = (0..self.occs.len())
                .filter(|&o| self.occs[o].scope == s)
                .collect();
            self.condition(w, s, &here, &here)?;
        }
        // `SELECT EXISTS (subquery)` alone (SQLAlchemy's `exists()`,
        // Peewee's `.exists()`): when the subquery's rows are partitioned
        // by shard, so is the answer — true when one shard's is (the merge
        // takes bool_or of the shards' rows, `merge_plan::exists_plan`).
        // Only as the statement itself: nested, or as a UNION branch, the
        // shards' one-row answers would be taken as rows.
        if let Some((subquery, _)) = lone_exists(sel).filter(|_| parent.is_none()) {
            let info = self.query(subquery, Some(s))?;
            self.scopes[s].covered =
                row_local(subquery) && info.root.is_some_and(|r| self.scopes[r].covered);
            return Ok(QueryInfo {
                root: Some(s),
                outputs: Some(vec![OutCol::Other]),
                union: None,
            });
        }
        let mut outputs = Some(Vec::with_capacity(sel.projection.len()));
        for item in &sel.projection {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
                _ => None,
            };
            match (expr, outputs.as_mut()) {
                (Some(e), Some(outs)) => {
                    let col = match self.resolve(e, s) {
                        Some(o) if self.occs[o].scope == s => OutCol::Key(o),
                        _ if value_src(e, KeyType::Text).is_ok()
                            || value_src(e, KeyType::Int8).is_ok() =>
                        {
                            OutCol::Value(Box::new(e.clone()))
                        }
                        _ => OutCol::Other,
                    };
                    outs.push(col);
                }
                _ => outputs = None,
            }
            self.walk(item, s)?;
        }
        self.walk(&sel.group_by, s)?;
        if let Some(h) = &sel.having {
            self.walk(h, s)?;
        }
        if let Some(Distinct::On(v)) = &sel.distinct {
            self.walk(v, s)?;
        }
        self.walk(&sel.named_window, s)?;
        if let Some(q) = &sel.qualify {
            self.walk(q, s)?;
        }
        Ok(QueryInfo {
            root: Some(s),
            outputs,
            union: None,
        })
    }

    /// Registers a FROM entry with its joins; returns its occurrences.
    pub(super) fn table_with_joins(
        &mut self,
        twj: &TableWithJoins,
        s: usize,
    ) -> Result<(Vec<usize>, bool), RouteError> {
        let (mut left, mut covered) = self.factor(&twj.relation, s)?;
        for j in &twj.joins {
            let (right, right_covered) = self.factor(&j.relation, s)?;
            #[derive(PartialEq)]
            enum J {
                Inner,
                Left,
                Right,
                Full,
                Cross,
            }
            let (kind, constraint) = match &j.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) => (J::Inner, Some(c)),
                JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (J::Left, Some(c)),
                JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (J::Right, Some(c)),
                JoinOperator::FullOuter(c) => (J::Full, Some(c)),
                JoinOperator::CrossJoin(_) => (J::Cross, None),
                other => return Err(unsupported(format!("join type {other:?}"))),
            };
            covered = match kind {
                J::Inner | J::Cross => covered || right_covered,
                J::Left => covered,
                J::Right => right_covered,
                J::Full => covered && right_covered,
            };
            if matches!(kind, J::Left | J::Full) {
                for &o in &right {
                    self.occs[o].nullable = true;
                }
            }
            if matches!(kind, J::Right | J::Full) {
                for &o in &left {
                    self.occs[o].nullable = true;
                }
            }
            let filtered: Vec<usize> = match kind {
                J::Inner => left.iter().chain(&right).copied().collect(),
                J::Left => right.clone(),
                J::Right => left.clone(),
                J::Full | J::Cross => Vec::new(),
            };
            let local: Vec<usize> = left.iter().chain(&right).copied().collect();
            match constraint {
                Some(JoinConstraint::On(e)) => self.condition(e, s, &local, &filtered)?,
                Some(JoinConstraint::Using(cols)) => {
                    for c in cols {
                        let col = last_name(c);
                        for &a in &left {
                            for &b in &right {
                                if self.occs[a].table.key_column == col
                                    && self.occs[b].table.key_column == col
                                {
                                    self.key_equality(a, b, &local, &filtered);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
            left.extend(right);
        }
        Ok((left, covered))
    }

    /// Registers one FROM item; returns its occurrences and whether it is
    /// covered (see [`Scope::covered`]).
    fn factor(&mut self, f: &TableFactor, s: usize) -> Result<(Vec<usize>, bool), RouteError> {
        match f {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                if let Some(args) = args {
                    // A set-returning function call in FROM.
                    self.walk(args, s)?;
                    self.impure_or_pure_call(name);
                    self.opaque_item(alias.as_ref(), last_name(name), s);
                    return Ok((Vec::new(), false));
                }
                // A row-local CTE covers as a derived table does.
                let cte_covers =
                    name.0.len() == 1 && self.cte_covers(Some(s), &last_name(name)) == Some(true);
                let occ = self.table_item(name, alias.as_ref(), s)?;
                Ok((occ.into_iter().collect(), occ.is_some() || cte_covers))
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                let occs = self.occs.len();
                let info = self.query(subquery, Some(s))?;
                self.opaque_item(alias.as_ref(), String::new(), s);
                // A derived table whose rows each come from one row of its
                // own FROM, which holds a row of a sharded table (no
                // aggregate, DISTINCT, LIMIT, window or set operation):
                // its rows are partitioned by shard as that table's are,
                // so it covers this FROM — `SELECT count(*) FROM (SELECT …
                // FROM t …) s`, what Peewee's and SQLAlchemy's `count()`
                // send. Its occurrences join nothing outside it.
                let covered = !*lateral
                    && self.partitioned(subquery, &info)
                    && info.root.is_some_and(|r| self.scopes[r].covered);
                if !covered && self.occs.len() > occs && self.opaque_derived.is_none() {
                    let name = alias
                        .as_ref()
                        .map_or(String::new(), |a| format!(" {}", a.name));
                    self.opaque_derived = Some(format!(
                        "derived table{name} takes {} of rows that are on several shards, so no shard can join it on the key by itself",
                        not_row_local(subquery)
                    ));
                }
                Ok((Vec::new(), covered))
            }
            TableFactor::Function {
                name, args, alias, ..
            } => {
                self.walk(args, s)?;
                self.impure_or_pure_call(name);
                self.opaque_item(alias.as_ref(), last_name(name), s);
                Ok((Vec::new(), false))
            }
            TableFactor::UNNEST {
                array_exprs, alias, ..
            } => {
                self.walk(array_exprs, s)?;
                self.opaque_item(alias.as_ref(), "unnest".to_owned(), s);
                Ok((Vec::new(), false))
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let res = self.table_with_joins(table_with_joins, s)?;
                if alias.is_some() {
                    self.opaque_item(alias.as_ref(), String::new(), s);
                }
                Ok(res)
            }
            other => Err(unsupported(format!("FROM item {other}"))),
        }
    }

    fn impure_or_pure_call(&mut self, name: &ObjectName) {
        let n = last_name(name);
        if !PURE_FUNCTIONS.contains(&n.as_str()) {
            self.impure_calls = true;
        }
        self.note_call(&n);
    }

    /// Records a call of `name` unless it is known to be read-only.
    fn note_call(&mut self, name: &str) {
        if !READ_ONLY.contains(&name)
            && !PURE_FUNCTIONS.contains(&name)
            && !AGGREGATES.contains(&name)
            && !self.calls.iter().any(|c| c == name)
        {
            self.calls.push(name.to_owned());
        }
    }

    fn opaque_item(&mut self, alias: Option<&ast::TableAlias>, default: String, s: usize) {
        self.scopes[s].items.push(Item {
            visible: alias.map(|a| norm(&a.name)).unwrap_or(default),
            qualified: None,
            occ: None,
            col_aliases: alias.is_some_and(|a| !a.columns.is_empty()),
        });
    }

    /// The shape of a UNION: each branch is a query of its own, so the
    /// shards' answers are right when each branch's are — its sharded
    /// tables joined on their keys (one component per branch that reads
    /// any) and read in its own FROM. A branch that reads no sharded
    /// table runs on every shard: UNION removes the copies when they are
    /// equal — constants only; a function (`now()`, `pg_backend_pid()`,
    /// `nextval()`), a subquery or a table (system columns, a reference
    /// table caught mid-update) may answer differently per shard — and
    /// UNION ALL never does (not anchored then).
    fn union_shape(&self, u: &Union) -> Shape {
        let mut shape = self.shape(None);
        // The branch of each occurrence: the branch root its scope is in.
        let branch_of = |o: &Occ| {
            let mut sc = Some(o.scope);
            while let Some(x) = sc {
                if let Some(b) = u.branches.iter().position(|r| *r == Some(x)) {
                    return Some(b);
                }
                sc = self.scopes[x].parent;
            }
            None
        };
        let mut reading = vec![false; u.branches.len()];
        for o in &self.occs {
            match branch_of(o) {
                Some(b) => reading[b] = true,
                // Outside every branch (a CTE of the UNION): not anchored.
                None => {
                    return Shape {
                        anchored: false,
                        ..shape
                    }
                }
            }
        }
        // Occurrences of two branches are never joined: each branch that
        // reads a sharded table adds one component at least.
        let readers = reading.iter().filter(|r| **r).count();
        shape.components = shape.components + 1 - readers.max(1);
        shape.anchored = u
            .branches
            .iter()
            .zip(&reading)
            .enumerate()
            .all(|(b, (root, reads))| {
                let covered = root.is_some_and(|r| self.scopes[r].covered);
                if *reads {
                    covered
                } else {
                    !u.all && u.constant.get(b).copied().unwrap_or(false)
                }
            });
        shape
    }

    /// Builds the shape from everything collected so far.
    pub(super) fn shape(&self, root: Option<usize>) -> Shape {
        let n = self.occs.len();
        // Restrictions: direct pins, then inherited along filtering equalities.
        let mut restr: Vec<Option<(KeyExpr, usize)>> = vec![None; n];
        for (o, k) in &self.pins {
            restr[*o] = Some(match restr[*o].take() {
                None => (k.clone(), *o),
                Some((old, from)) if from == *o => {
                    (KeyExpr::And(Box::new(old), Box::new(k.clone())), *o)
                }
                Some(_) => (k.clone(), *o),
            });
        }
        loop {
            let mut changed = false;
            for &(o, p) in &self.inherits {
                if restr[o].is_none() {
                    if let Some(r) = restr[p].clone() {
                        restr[o] = Some(r);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // Components (union-find).
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while p[r] != r {
                r = p[r];
            }
            p[x] = r;
            r
        }
        // Joins between rows that are always there first; an outer join's
        // null-extended side then attaches to the one group its keys meet.
        // Through it, two groups are not joined: where it is NULL their
        // rows pair freely (`u CROSS JOIN o LEFT JOIN i ON i.id = u.id AND
        // i.id = o.user_id`).
        let nullable = |x: usize| self.occs[x].nullable;
        for &(a, b) in self
            .edges
            .iter()
            .filter(|&&(a, b)| !nullable(a) && !nullable(b))
        {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra] = rb;
        }
        for &(a, b) in self
            .edges
            .iter()
            .filter(|&&(a, b)| nullable(a) && nullable(b))
        {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra] = rb;
        }
        let mixed: Vec<(usize, usize)> = self
            .edges
            .iter()
            .filter(|&&(a, b)| nullable(a) != nullable(b))
            .map(|&(a, b)| if nullable(a) { (a, b) } else { (b, a) })
            .collect();
        // Per group of null-extended occurrences: the groups it meets.
        let mut meets: Vec<(usize, usize)> = mixed
            .iter()
            .map(|&(x, y)| (find(&mut parent, x), find(&mut parent, y)))
            .collect();
        meets.sort_unstable();
        meets.dedup();
        for &(x, y) in &meets {
            let groups = meets.iter().filter(|(g, _)| *g == x).count();
            if groups == 1 {
                let (rx, ry) = (find(&mut parent, x), find(&mut parent, y));
                parent[rx] = ry;
            }
        }
        let mut roots: Vec<usize> = (0..n).map(|x| find(&mut parent, x)).collect();
        roots.sort_unstable();
        roots.dedup();
        let anchored = root.is_some_and(|r| self.scopes[r].covered);
        Shape {
            occs: self
                .occs
                .iter()
                .zip(restr)
                .map(|(o, r)| ShapeOcc {
                    table: o.table.clone(),
                    restriction: r.map(|(k, from)| (k, self.occs[from].table.clone())),
                })
                .collect(),
            components: roots.len(),
            anchored,
            home_table: self.home_tables.first().cloned(),
            update_key: None,
            insert_select: false,
            insert_into: None,
            set_op: self.set_op.clone(),
            cte_named_twice: self.cte_named_twice.clone(),
            per_shard_subquery: self.per_shard_subquery.clone(),
            opaque_derived: self.opaque_derived.clone(),
        }
    }

    pub(super) fn sharded_tables(&self) -> Vec<ShardedTable> {
        let mut v: Vec<ShardedTable> = Vec::new();
        for o in &self.occs {
            if !v.iter().any(|t| t.name == o.table.name) {
                v.push(o.table.clone());
            }
        }
        v
    }

    /// The body of a read of `pg_prepared_xacts`: every shard, whose
    /// answers the executor concatenates or merges as for a sharded table
    /// read without its key (each prepared transaction lives on one shard;
    /// the node's own are left out by [`crate::route::hide_node_transactions`]).
    /// Beside other relations it is refused: joined on the home shard it
    /// would miss the other shards' transactions.
    fn every_shard_view_body(&self) -> Result<Body, RouteError> {
        let alone = self.occs.is_empty()
            && self.reference_tables.is_empty()
            && self.home_tables.iter().all(|t| is_every_shard_view(t));
        if alone {
            Ok(Body::All)
        } else {
            Err(RouteError::unsupported(
                "pg_prepared_xacts beside other relations: each shard lists its own prepared transactions, and a join would see the home shard's only; read pg_prepared_xacts in a query of its own",
            ))
        }
    }

    /// The body for a statement that only reads (or writes a home table).
    fn read_body(&self, info: &QueryInfo) -> Body {
        if !self.occs.is_empty() {
            Body::Shape(match &info.union {
                Some(u) => self.union_shape(u),
                None => self.shape(info.root),
            })
        } else if !self.home_tables.is_empty()
            || !self.reference_tables.is_empty()
            || self.impure_calls
        {
            Body::Home
        } else {
            Body::Any
        }
    }

    pub(super) fn select_statement(
        &mut self,
        q: &Query,
        kind: StatementKind,
    ) -> Result<StmtPlan, RouteError> {
        let info = self.query(q, None)?;
        // A key of a table in the query's own FROM (not the nullable side
        // of an outer join): rows with equal values are on one shard.
        let is_key = |e: &Expr| {
            info.root
                .and_then(|root| self.resolve(e, root))
                .is_some_and(|o| !self.occs[o].nullable)
        };
        let merge = merge_plan(q, &is_key);
        let body = if self.every_shard_view {
            self.every_shard_view_body()?
        } else {
            self.read_body(&info)
        };
        Ok(StmtPlan {
            kind,
            is_write: false,
            body,
            merge,
            sharded_tables: self.sharded_tables(),
            reference_write: false,
            writes_sharded: false,
            may_write: false,
            calls: Vec::new(),
            temp: false,
            explain_analyze_write: false,
        })
    }
}

/// Whether a catalog name (as `names::table_name` gives it) is
/// `pg_prepared_xacts`, the view each shard answers with its own rows.
pub(in crate::route) fn is_every_shard_view(catalog_name: &str) -> bool {
    matches!(
        catalog_name,
        "pg_prepared_xacts" | "pg_catalog.pg_prepared_xacts"
    )
}

/// Whether a UNION branch is made of constants only: VALUES or a SELECT
/// without FROM or WHERE, of [`constant_expr`]s (see `union_shape`).
fn constant_branch(body: &SetExpr) -> bool {
    match body {
        SetExpr::Values(v) => v.rows.iter().all(|r| r.iter().all(constant_expr)),
        SetExpr::Select(s) => {
            s.from.is_empty()
                && s.selection.is_none()
                && s.having.is_none()
                && constant_exprs(&s.projection)
        }
        SetExpr::Query(q) => q.with.is_none() && constant_branch(&q.body),
        _ => false,
    }
}

/// How many times `q` names the relation `name` (one part, as PostgreSQL
/// folds it) anywhere: in FROM, joins, subqueries, nested CTEs and `TABLE
/// name` (a set expression of its own). Counts too many rather than too
/// few (a name of an inner scope counts as well).
fn references(q: &Query, name: &str) -> usize {
    struct Count<'a> {
        name: &'a str,
        n: usize,
    }
    impl Visitor for Count<'_> {
        type Break = ();
        fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
            if r.0.len() == 1 && last_name(r) == self.name {
                self.n += 1;
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            fn tables(body: &SetExpr, name: &str) -> usize {
                match body {
                    SetExpr::Table(t) => usize::from(
                        t.schema_name.is_none()
                            && t.table_name.as_ref().is_some_and(|n| norm(n) == name),
                    ),
                    SetExpr::SetOperation { left, right, .. } => {
                        tables(left, name) + tables(right, name)
                    }
                    _ => 0,
                }
            }
            self.n += tables(&q.body, self.name);
            ControlFlow::Continue(())
        }
    }
    let mut c = Count { name, n: 0 };
    let _ = q.visit(&mut c);
    c.n
}

/// What keeps `q` from being [`row_local`], in words.
fn not_row_local(q: &Query) -> &'static str {
    if q.limit_clause.is_some() || q.fetch.is_some() {
        "a LIMIT/OFFSET/FETCH"
    } else if q.with.is_some() {
        "a WITH"
    } else {
        match q.body.as_ref() {
            SetExpr::Select(sel)
                if matches!(sel.distinct, Some(Distinct::Distinct | Distinct::On(_))) =>
            {
                "a DISTINCT"
            }
            SetExpr::Select(_) => "aggregates, groups or windows",
            _ => "a set operation",
        }
    }
}

/// Whether every row of `q` comes from one row of its FROM, all of them
/// kept: a plain SELECT without aggregates, GROUP BY, HAVING, DISTINCT,
/// windows, LIMIT/OFFSET/FETCH, WITH or set operations.
fn row_local(q: &Query) -> bool {
    q.with.is_none()
        && q.limit_clause.is_none()
        && q.fetch.is_none()
        // An aggregate in ORDER BY makes it one aggregated row.
        && !q.order_by.as_ref().is_some_and(aggregates_in)
        && matches!(q.body.as_ref(), SetExpr::Select(sel)
            if lone_exists(sel).is_none()
                && matches!(select_merge_need(sel), super::super::MergeNeed::None))
}

/// The subquery of `SELECT constants [FROM (SELECT constants) [AS] d]
/// WHERE EXISTS (subquery)`: one constant row or none. The projections
/// hold no function call or subquery (each shard must give the same row),
/// the FROM is at most one derived table of one row (a SELECT without
/// FROM, WHERE or set-returning call), and nothing groups, filters or
/// numbers the row otherwise.
pub(super) fn exists_filter(sel: &Select) -> Option<&Query> {
    if sel.having.is_some()
        || !sel.named_window.is_empty()
        || sel.qualify.is_some()
        || sel.top.is_some()
        || matches!(sel.distinct, Some(Distinct::On(_)))
        || !matches!(&sel.group_by, ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty())
        || sel.from.len() > 1
        || !constant_exprs(&sel.projection)
    {
        return None;
    }
    if let Some(twj) = sel.from.first() {
        let TableFactor::Derived {
            lateral: false,
            subquery: d,
            ..
        } = &twj.relation
        else {
            return None;
        };
        let one_row = twj.joins.is_empty()
            && d.with.is_none()
            && d.limit_clause.is_none()
            && d.fetch.is_none()
            && matches!(d.body.as_ref(), SetExpr::Select(x)
                if x.from.is_empty()
                    && x.selection.is_none()
                    && x.having.is_none()
                    && x.named_window.is_empty()
                    && x.qualify.is_none()
                    && matches!(&x.group_by, ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty())
                    && constant_exprs(&x.projection));
        if !one_row {
            return None;
        }
    }
    match strip(sel.selection.as_ref()?) {
        Expr::Exists {
            subquery,
            negated: false,
        } => Some(subquery),
        _ => None,
    }
}

/// Whether the select items of `items` are the same on every shard:
/// literals, parameters, column references (of a derived table of such
/// constants) and casts of them to a type whose input reads nothing of
/// the server — not a date or time (`'now'::timestamptz`), not an OID
/// alias (`'t'::regclass`). No function call, no subquery. A bare string
/// takes its type from what it meets (under UNION, the other branch's
/// column): one that a date or time type reads from the clock (`'now'`,
/// `'today'`, …) does not count. (A parameter does; one bound to such a
/// word where a date or time type is inferred for it is not seen: known.)
fn constant_exprs(items: &[SelectItem]) -> bool {
    items.iter().all(|i| match i {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => constant_expr(e),
        _ => true,
    })
}

/// See [`constant_exprs`].
pub(super) fn constant_expr(e: &Expr) -> bool {
    use sqlparser::ast::DataType as T;
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(t)
            | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: t, .. })
            | Value::EscapedStringLiteral(t)
            | Value::UnicodeStringLiteral(t)
            | Value::NationalStringLiteral(t) => !["now", "today", "tomorrow", "yesterday"]
                .iter()
                .any(|w| t.trim().eq_ignore_ascii_case(w)),
            _ => true,
        },
        Expr::CompoundIdentifier(_) => true,
        // A column of a derived table of constants — or one of SQL's
        // niladic functions, which the parser may read as a name.
        Expr::Identifier(id) => {
            id.quote_style.is_some()
                || ![
                    "current_catalog",
                    "current_date",
                    "current_role",
                    "current_schema",
                    "current_time",
                    "current_timestamp",
                    "current_user",
                    "localtime",
                    "localtimestamp",
                    "session_user",
                    "system_user",
                    "user",
                ]
                .iter()
                .any(|f| id.value.eq_ignore_ascii_case(f))
        }
        Expr::Nested(e) => constant_expr(e),
        Expr::BinaryOp { left, op, right } => {
            matches!(
                op,
                BinaryOperator::Plus
                    | BinaryOperator::Minus
                    | BinaryOperator::Multiply
                    | BinaryOperator::Divide
                    | BinaryOperator::Modulo
                    | BinaryOperator::StringConcat
            ) && constant_expr(left)
                && constant_expr(right)
        }
        Expr::UnaryOp {
            op: ast::UnaryOperator::Minus | ast::UnaryOperator::Plus,
            expr,
        } => constant_expr(expr),
        Expr::Cast {
            expr, data_type, ..
        } => {
            // The cast decides a literal's or a parameter's type.
            (matches!(expr.as_ref(), Expr::Value(_)) || constant_expr(expr))
                && matches!(
                    data_type,
                    T::Int(_)
                        | T::Integer(_)
                        | T::Int2(_)
                        | T::Int4(_)
                        | T::Int8(_)
                        | T::SmallInt(_)
                        | T::BigInt(_)
                        | T::Numeric(_)
                        | T::Decimal(_)
                        | T::Real
                        | T::Float4
                        | T::Float8
                        | T::Double(_)
                        | T::DoublePrecision
                        | T::Float(_)
                        | T::Text
                        | T::Varchar(_)
                        | T::Char(_)
                        | T::Character(_)
                        | T::CharacterVarying(_)
                        | T::Bool
                        | T::Boolean
                        | T::Uuid
                        | T::Bytea
                        | T::JSON
                        | T::JSONB
                )
        }
        _ => false,
    }
}

/// The subquery of `SELECT [NOT] EXISTS (subquery) [AS a]`, with nothing
/// else (no FROM, WHERE, GROUP BY, HAVING, DISTINCT, window), and whether
/// it is negated.
pub(super) fn lone_exists(sel: &Select) -> Option<(&Query, bool)> {
    if !sel.from.is_empty()
        || sel.selection.is_some()
        || sel.having.is_some()
        || sel.distinct.is_some()
        || !sel.named_window.is_empty()
        || sel.qualify.is_some()
        || !matches!(&sel.group_by, ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty())
    {
        return None;
    }
    let [item] = sel.projection.as_slice() else {
        return None;
    };
    let e = match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return None,
    };
    match strip(e) {
        Expr::Exists { subquery, negated } => Some((subquery, *negated)),
        Expr::UnaryOp {
            op: ast::UnaryOperator::Not,
            expr,
        } => match strip(expr) {
            Expr::Exists {
                subquery,
                negated: false,
            } => Some((subquery, true)),
            _ => None,
        },
        _ => None,
    }
}
