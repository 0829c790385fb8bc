//! Statement-level analysis of writes and utility statements: INSERT,
//! UPDATE, DELETE, COPY, VACUUM/ANALYZE, TRUNCATE/LOCK. Reads are planned
//! by the binder in [`super::scope`]; both share the scope/occurrence model
//! described in [`super`].

use sqlparser::ast::{
    self, AssignmentTarget, CopySource, CopyTarget, Expr, FromTable, Insert, ObjectName,
    OnConflictAction, OnInsert, SetExpr, TableFactor, TableObject, UpdateTableFromKind, Visit,
};

use std::sync::Arc;

use super::super::keys::{colocated, value_src, Src, SrcError, TypedSrc};
use super::super::names::{last_name, norm};
use super::super::split::SplitText;
use super::super::{CopyDirection, MergeNeed, RouteError, StatementKind};
use super::expr::{strip, unsupported};
use super::merge_need::merge_need;
use super::plan::{Body, InsertPlan, StmtPlan};
use super::scope::{Analyzer, Item, OutCol, SubqueryWalker};
use crate::catalog::{ShardedTable, TablePlacement};
use crate::route::copy::{CopyPlan, CopyTable};

impl Analyzer<'_> {
    /// A write whose target is `target` (already registered in scope
    /// `root`): reference targets go everywhere and may read nothing
    /// shard-specific; home targets need everything on the home shard.
    pub(super) fn write_plan(
        &self,
        kind: StatementKind,
        target_name: &str,
        root: usize,
        update_key: Option<(ShardedTable, TypedSrc)>,
    ) -> Result<StmtPlan, RouteError> {
        let mut plan = StmtPlan {
            kind,
            is_write: true,
            body: Body::All,
            merge: MergeNeed::None,
            sharded_tables: self.sharded_tables(),
            reference_write: false,
            writes_sharded: false,
            may_write: false,
            calls: Vec::new(),
            temp: false,
            explain_analyze_write: false,
        };
        match self.snap.placement(target_name) {
            TablePlacement::Reference => {
                if let Some(o) = self.occs.first() {
                    return Err(unsupported(format!(
                        "a write to reference table \"{target_name}\" that reads sharded table \"{}\"",
                        o.table.name
                    )));
                }
                if let Some(h) = self.home_tables.first() {
                    return Err(unsupported(format!(
                        "a write to reference table \"{target_name}\" that reads undeclared table \"{h}\" (it lives on the home shard only)"
                    )));
                }
                plan.reference_write = true;
                plan.body = Body::All;
            }
            TablePlacement::Home(_) => {
                plan.body = if self.occs.is_empty() {
                    Body::Home
                } else {
                    // The written table itself pins the statement to the
                    // home shard (an INSERT target is not in `home_tables`).
                    let mut shape = self.shape(Some(root));
                    shape.home_table = Some(target_name.to_owned());
                    Body::Shape(shape)
                };
            }
            TablePlacement::Sharded(_) => {
                let mut shape = self.shape(Some(root));
                shape.update_key = update_key;
                plan.body = Body::Shape(shape);
                plan.writes_sharded = true;
            }
        }
        Ok(plan)
    }

    pub(super) fn update(&mut self, up: &ast::Update) -> Result<StmtPlan, RouteError> {
        let s = self.new_scope(None);
        if !up.table.joins.is_empty() {
            return Err(unsupported("UPDATE with a join in its target"));
        }
        let TableFactor::Table { name, alias, .. } = &up.table.relation else {
            return Err(unsupported("UPDATE of something that is not a table"));
        };
        let target = self.table_name(name)?;
        let target_occ = self.table_item(name, alias.as_ref(), s)?;
        self.scopes[s].covered = target_occ.is_some();
        if let Some(from) = &up.from {
            let (UpdateTableFromKind::BeforeSet(v) | UpdateTableFromKind::AfterSet(v)) = from;
            for twj in v {
                self.table_with_joins(twj, s)?;
            }
        }
        if let Some(w) = &up.selection {
            let here: Vec<usize> = (0..self.occs.len())
                .filter(|&o| self.occs[o].scope == s)
                .collect();
            self.condition(w, s, &here, &here)?;
        }
        let mut update_key = None;
        for asg in &up.assignments {
            if let Some(o) = target_occ {
                let table = self.occs[o].table.clone();
                let names: Vec<&ObjectName> = match &asg.target {
                    AssignmentTarget::ColumnName(n) => vec![n],
                    AssignmentTarget::Tuple(v) => v.iter().collect(),
                };
                let sets_key = names.iter().any(|n| last_name(n) == table.key_column);
                if sets_key {
                    let AssignmentTarget::ColumnName(_) = &asg.target else {
                        return Err(unsupported(format!(
                            "UPDATE of shard key column \"{}\" in a tuple assignment",
                            table.key_column
                        )));
                    };
                    match value_src(&asg.value, table.key_type) {
                        Ok(src) => update_key = Some((table, src)),
                        Err(SrcError::Parse(e)) => return Err(e),
                        Err(SrcError::NotValue) => {
                            return Err(unsupported(format!(
                                "UPDATE of shard key column \"{}\" of \"{}\" to an expression (moving rows between shards is not supported)",
                                table.key_column, table.name
                            )))
                        }
                    }
                }
            }
            self.walk(&asg.value, s)?;
        }
        if let Some(r) = &up.returning {
            self.walk(r, s)?;
        }
        if up.limit.is_some() || !up.order_by.is_empty() {
            return Err(unsupported("UPDATE … ORDER BY/LIMIT"));
        }
        self.write_plan(StatementKind::Update, &target, s, update_key)
    }

    pub(super) fn delete(&mut self, del: &ast::Delete) -> Result<StmtPlan, RouteError> {
        if !del.tables.is_empty() {
            return Err(unsupported("multi-table DELETE"));
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &del.from;
        let [twj] = from.as_slice() else {
            return Err(unsupported("DELETE from several tables"));
        };
        if !twj.joins.is_empty() {
            return Err(unsupported("DELETE with a join in its target"));
        }
        let TableFactor::Table { name, alias, .. } = &twj.relation else {
            return Err(unsupported("DELETE from something that is not a table"));
        };
        let s = self.new_scope(None);
        let target = self.table_name(name)?;
        let target_occ = self.table_item(name, alias.as_ref(), s)?;
        self.scopes[s].covered = target_occ.is_some();
        if let Some(using) = &del.using {
            for twj in using {
                self.table_with_joins(twj, s)?;
            }
        }
        if let Some(w) = &del.selection {
            let here: Vec<usize> = (0..self.occs.len())
                .filter(|&o| self.occs[o].scope == s)
                .collect();
            self.condition(w, s, &here, &here)?;
        }
        if let Some(r) = &del.returning {
            self.walk(r, s)?;
        }
        if del.limit.is_some() || !del.order_by.is_empty() {
            return Err(unsupported("DELETE … ORDER BY/LIMIT"));
        }
        self.write_plan(StatementKind::Delete, &target, s, None)
    }

    pub(super) fn insert(&mut self, ins: &Insert) -> Result<StmtPlan, RouteError> {
        let TableObject::TableName(name) = &ins.table else {
            return Err(unsupported("INSERT into a table function"));
        };
        let target = self.table_name(name)?;
        let s = self.new_scope(None);
        // The target is visible to RETURNING and ON CONFLICT, but it is not a
        // read occurrence: it is routed by the inserted keys.
        self.scopes[s].items.push(Item {
            visible: ins
                .table_alias
                .as_ref()
                .map(|a| norm(&a.alias))
                .unwrap_or_else(|| last_name(name)),
            qualified: None,
            occ: None,
            col_aliases: false,
        });
        let columns: Vec<String> = ins.columns.iter().map(last_name).collect();
        let placement = self.snap.placement(&target);
        let sharded = match placement {
            TablePlacement::Sharded(t) => Some(t.clone()),
            _ => None,
        };
        match &ins.on {
            None => {}
            Some(OnInsert::OnConflict(oc)) => {
                if let OnConflictAction::DoUpdate(du) = &oc.action {
                    for asg in &du.assignments {
                        if let (Some(t), AssignmentTarget::ColumnName(n)) = (&sharded, &asg.target)
                        {
                            if last_name(n) == t.key_column
                                && !excluded_key_on_key_conflict(oc, &asg.value, &t.key_column)
                            {
                                return Err(unsupported(format!(
                                    "ON CONFLICT DO UPDATE of shard key column \"{}\"",
                                    t.key_column
                                )));
                            }
                        }
                        if matches!(asg.target, AssignmentTarget::Tuple(_)) && sharded.is_some() {
                            return Err(unsupported(
                                "ON CONFLICT DO UPDATE with a tuple assignment",
                            ));
                        }
                        self.walk(&asg.value, s)?;
                    }
                    if let Some(w) = &du.selection {
                        self.walk(w, s)?;
                    }
                }
            }
            Some(_) => return Err(unsupported("ON DUPLICATE KEY UPDATE")),
        }
        if let Some(r) = &ins.returning {
            self.walk(r, s)?;
        }
        let Some(table) = sharded else {
            // Reference or undeclared target: route by what the source reads.
            if let Some(src) = &ins.source {
                self.query(src, Some(s))?;
            }
            let mut p = self.write_plan(StatementKind::Insert, &target, s, None)?;
            if let Body::Shape(shape) = &mut p.body {
                // Reads of sharded tables must all be on the home shard;
                // there is no anchor to scatter on.
                shape.anchored = false;
            }
            return Ok(p);
        };
        if matches!(ins.overriding, Some(sqlparser::ast::InsertOverriding::User)) {
            // PostgreSQL puts the shard's own identity values in place of
            // the given ones: a row could land where its key does not belong.
            return Err(unsupported(format!(
                "INSERT … OVERRIDING USER VALUE into sharded table \"{}\" is not supported through hotrepart: the shard would replace given identity values by its own sequence's; leave the column out (hotrepart numbers it on the home shard)",
                table.name
            )));
        }
        if ins.source.is_none() {
            return Err(RouteError::not_null(format!(
                "INSERT … DEFAULT VALUES into sharded table \"{}\" leaves its shard key \"{}\" NULL",
                table.name, table.key_column
            )));
        }
        if columns.is_empty() {
            return Err(unsupported(format!(
                "INSERT into sharded table \"{}\" needs an explicit column list",
                table.name
            )));
        }
        let Some(key_idx) = columns.iter().position(|c| *c == table.key_column) else {
            return Err(RouteError::not_null(format!(
                "INSERT into sharded table \"{}\" must set its shard key column \"{}\"",
                table.name, table.key_column
            )));
        };
        let Some(source) = &ins.source else {
            return Err(RouteError::not_null(format!(
                "INSERT … DEFAULT VALUES into sharded table \"{}\" leaves its shard key \"{}\" NULL",
                table.name, table.key_column
            )));
        };
        let sharded_tables = vec![table.clone()];
        if let (SetExpr::Values(values), None, None, None) = (
            source.body.as_ref(),
            &source.with,
            &source.order_by,
            &source.limit_clause,
        ) {
            let mut rows = Vec::with_capacity(values.rows.len());
            for row in &values.rows {
                let row = &row.content;
                if row.len() != columns.len() {
                    return Err(RouteError::syntax(
                        "INSERT has a different number of expressions than target columns",
                    ));
                }
                rows.push(self.insert_key(&row[key_idx], &table)?);
                self.walk(row, s)?;
            }
            if let Some(o) = self.occs.first() {
                return Err(unsupported(format!(
                    "INSERT … VALUES with a subquery reading sharded table \"{}\"",
                    o.table.name
                )));
            }
            let mut has_placeholders = self.placeholders;
            let mut w = SubqueryWalker {
                a: self,
                scope: s,
                depth: 1, // do not re-analyse subqueries, only look for `$n`
            };
            let _ = ins.visit(&mut w);
            has_placeholders |= self.placeholders;
            // A multi-row statement is split by shard at bind time (see
            // `eval::insert_target`).
            let split = if rows.len() > 1 {
                SplitText::new(ins)
            } else {
                None
            };
            return Ok(StmtPlan {
                kind: StatementKind::Insert,
                is_write: true,
                body: Body::Insert(InsertPlan {
                    table,
                    rows,
                    home_table: self.home_tables.first().cloned(),
                    split,
                    has_placeholders,
                }),
                merge: MergeNeed::None,
                sharded_tables,
                reference_write: false,
                writes_sharded: true,
                may_write: false,
                calls: Vec::new(),
                temp: false,
                explain_analyze_write: false,
            });
        }
        // INSERT … SELECT.
        let info = self.query(source, Some(s))?;
        let out = info
            .outputs
            .as_ref()
            .filter(|o| o.len() == columns.len())
            .map(|o| o[key_idx].clone());
        match out {
            Some(OutCol::Key(b))
                if info.root == Some(self.occs[b].scope)
                    && !self.occs[b].nullable
                    && colocated(&self.occs[b].table, &table) =>
            {
                let mut shape = self.shape(info.root);
                shape.insert_select = true;
                shape.insert_into = Some(table.name.clone());
                let mut tables = self.sharded_tables();
                if !tables.iter().any(|t| t.name == table.name) {
                    tables.push(table);
                }
                Ok(StmtPlan {
                    kind: StatementKind::Insert,
                    is_write: true,
                    body: Body::Shape(shape),
                    merge: merge_need(source),
                    sharded_tables: tables,
                    reference_write: false,
                    writes_sharded: true,
                    may_write: false,
                    calls: Vec::new(),
                    temp: false,
                    explain_analyze_write: false,
                })
            }
            Some(OutCol::Value(e)) if self.occs.is_empty() => {
                let key = self.insert_key(&e, &table)?;
                Ok(StmtPlan {
                    kind: StatementKind::Insert,
                    is_write: true,
                    body: Body::Insert(InsertPlan {
                        table,
                        rows: vec![key],
                        home_table: self.home_tables.first().cloned(),
                        split: None,
                        has_placeholders: true,
                    }),
                    merge: MergeNeed::None,
                    sharded_tables,
                    reference_write: false,
                    writes_sharded: true,
                    may_write: false,
                    calls: Vec::new(),
                    temp: false,
                    explain_analyze_write: false,
                })
            }
            _ => Err(unsupported(format!(
                "INSERT … SELECT into sharded table \"{}\": the router cannot prove that each row's shard key \"{}\" comes from a co-located shard key of the source",
                table.name, table.key_column
            ))),
        }
    }

    /// The key of one inserted row.
    pub(super) fn insert_key(
        &self,
        e: &Expr,
        table: &ShardedTable,
    ) -> Result<TypedSrc, RouteError> {
        if let Expr::Identifier(id) = strip(e) {
            if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") {
                return Err(RouteError::not_null(format!(
                    "shard key column \"{}\" of \"{}\" cannot be DEFAULT",
                    table.key_column, table.name
                )));
            }
        }
        match value_src(e, table.key_type) {
            Ok(TypedSrc { src: Src::Null, .. }) => Err(RouteError::not_null(format!(
                "shard key column \"{}\" of \"{}\" must not be NULL",
                table.key_column, table.name
            ))),
            Ok(src) => Ok(src),
            Err(SrcError::Parse(e)) => Err(e),
            Err(SrcError::NotValue) => Err(unsupported(format!(
                "the shard key \"{}\" of an INSERT into \"{}\" must be a literal or a parameter, not {e}",
                table.key_column, table.name
            ))),
        }
    }

    pub(super) fn copy(
        &mut self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[ast::CopyOption],
        legacy: &[ast::CopyLegacyOption],
    ) -> Result<StmtPlan, RouteError> {
        let direction = if to {
            CopyDirection::To
        } else {
            CopyDirection::From
        };
        match target {
            CopyTarget::Stdin | CopyTarget::Stdout => {}
            _ => {
                return Err(unsupported(
                    "COPY to or from a server file or program (use STDIN/STDOUT)",
                ))
            }
        }
        match source {
            CopySource::Table {
                table_name: name,
                columns,
            } => {
                let t = self.table_name(name)?;
                let kind = StatementKind::Copy {
                    table: Some(t.clone()),
                    direction,
                };
                let placement = match (self.snap.placement(&t), direction) {
                    (TablePlacement::Sharded(st), _) => Some(CopyTable::Sharded(st.clone())),
                    (TablePlacement::Reference, CopyDirection::From) => Some(CopyTable::Reference),
                    _ => None,
                };
                let Some(placement) = placement else {
                    // A table on one shard: the statement goes there whole.
                    return Ok(StmtPlan::fixed(kind, !to, Body::Home));
                };
                let reference = placement == CopyTable::Reference;
                let plan = CopyPlan::new(
                    t,
                    name.to_string(),
                    placement,
                    direction,
                    columns.iter().map(norm).collect(),
                    options,
                    legacy,
                )?;
                if let (Some(st), false, false) = (plan.sharded(), to, plan.columns.is_empty()) {
                    if !plan.columns.contains(&st.key_column) {
                        return Err(RouteError::not_null(format!(
                            "COPY into sharded table \"{}\" must include its shard key column \"{}\"",
                            st.name, st.key_column
                        )));
                    }
                }
                let mut p = StmtPlan::fixed(kind, !to, Body::Copy(Arc::new(plan)));
                p.reference_write = reference;
                Ok(p)
            }
            CopySource::Query(q) => {
                let mut p = self.select_statement(
                    q,
                    StatementKind::Copy {
                        table: None,
                        direction,
                    },
                )?;
                // COPY's output is not rows the merger can combine.
                p.merge = match merge_need(q) {
                    MergeNeed::None => MergeNeed::Refuse("COPY (query) TO STDOUT".to_owned()),
                    MergeNeed::Refuse(what) => MergeNeed::Refuse(format!(
                        "{what} inside COPY (query) TO (the node merges the rows of a SELECT, not COPY's output: send the query as a SELECT)"
                    )),
                    other => other,
                };
                Ok(p)
            }
        }
    }

    /// VACUUM / ANALYZE: the table's shards, or every shard.
    pub(super) fn maintenance(
        &mut self,
        name: Option<&ObjectName>,
    ) -> Result<StmtPlan, RouteError> {
        let body = match name {
            None => Body::All,
            Some(n) => match self.snap.placement(&self.table_name(n)?) {
                TablePlacement::Home(_) => Body::Home,
                _ => Body::All,
            },
        };
        Ok(StmtPlan::fixed(StatementKind::Utility, false, body))
    }

    /// TRUNCATE / LOCK: every shard if any table is sharded or reference,
    /// else the home shard.
    pub(super) fn ddl_on_tables(
        &mut self,
        names: &[&ObjectName],
        write: bool,
    ) -> Result<StmtPlan, RouteError> {
        let mut everywhere = false;
        for n in names {
            let t = self.table_name(n)?;
            if !matches!(self.snap.placement(&t), TablePlacement::Home(_)) {
                everywhere = true;
            }
        }
        let mut p = StmtPlan::fixed(
            StatementKind::Ddl,
            write,
            if everywhere { Body::All } else { Body::Home },
        );
        p.reference_write = everywhere && write;
        Ok(p)
    }
}

/// `SET key = EXCLUDED.key` in `ON CONFLICT (…, key, …) DO UPDATE`
/// (Sequelize's upsert sets every column so): the conflicting row has the
/// inserted key, so the assignment changes nothing and moves no row.
fn excluded_key_on_key_conflict(oc: &sqlparser::ast::OnConflict, value: &Expr, key: &str) -> bool {
    let on_key = matches!(
        &oc.conflict_target,
        Some(sqlparser::ast::ConflictTarget::Columns { columns, .. }) if columns.iter().any(|c| norm(c) == key)
    );
    let excluded_key = matches!(
        super::expr::strip(value),
        Expr::CompoundIdentifier(parts)
            if parts.len() == 2 && norm(&parts[0]) == "excluded" && norm(&parts[1]) == key
    );
    on_key && excluded_key
}
