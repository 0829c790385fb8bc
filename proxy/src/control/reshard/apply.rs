//! Catch-up: read a batch of changes from the slot, keep those in the
//! range, apply them to the target in one transaction, then advance the
//! slot.
//!
//! Guarantees:
//! - Changes are applied in the source's commit order, each as an idempotent
//!   statement: INSERT … ON CONFLICT (key) DO UPDATE, or DELETE by key. So
//!   applying a prefix of the changes twice (a crash after the target
//!   committed but before the slot moved) leaves the same final state.
//! - The slot is advanced only after the target transaction committed
//!   (synchronously), and never past what was decoded.
//! - A row's membership in the range is decided by `MoveSpec::contains` (the
//!   router's own `RoutingFunction::point`, built-in or WebAssembly) on the
//!   key parsed by its `KeyType`; an UPDATE
//!   that moves a key out of the range deletes the old row, one that moves it
//!   in upserts the new one.
//! - A value left out of an UPDATE because it is TOASTed and unchanged is
//!   never overwritten: such an update touches only the columns it carries;
//!   if the row is not on the target yet, the row is read from the source as
//!   it is now (later changes to it are in the slot and follow).

use super::pgoutput::{self, Message, Relation, Value};
use super::schema::TableInfo;
use super::verify::Touched;
use super::{
    is_object_in_use, lock_job, sql, CatchUp, MoveSpec, ReshardError, Side, SLOT_BUSY_WAIT,
};
use crate::sql::{quote_ident, quote_literal};
use futures_util::TryStreamExt;
use hotrepart_router::catalog::KeyValue;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::{Client, Transaction};

/// Statements are sent to the target in scripts of about this size.
const SCRIPT_BYTES: usize = 256 * 1024;

/// A decoded relation bound to its moved table.
struct Bound {
    table: usize,
    /// Column names, in the order of the relation's tuples.
    cols: Vec<String>,
    key_pos: usize,
    /// Positions of the columns changes are applied by (the unique key).
    conflict_pos: Vec<usize>,
    /// Positions of the columns that identify the old row in UPDATE/DELETE
    /// messages: the unique key if the old tuple carries it, else the
    /// replica identity index.
    old_pos: Vec<usize>,
}

pub(crate) async fn catch_up(
    spec: &MoveSpec,
    src: &Client,
    dst: &mut Client,
    max_changes: usize,
    touched: Option<&mut Touched>,
    infos: &[TableInfo],
) -> Result<CatchUp, ReshardError> {
    let slot = spec.capture_name();
    let tx = dst
        .transaction()
        .await
        .map_err(sql(Side::Target, "BEGIN"))?;
    lock_job(&tx, spec).await?;
    // Commits on the source may be asynchronous (synchronous_commit = off):
    // a committed transaction is decodable only once its WAL is flushed. A
    // synchronous commit of our own flushes everything before it. It must
    // write WAL (a transaction that only took an xid commits
    // asynchronously whatever synchronous_commit says): a transactional
    // logical message does, and pgoutput does not send it.
    src.batch_execute("SELECT pg_logical_emit_message(true, 'hotrepart_flush', '')")
        .await
        .map_err(sql(Side::Source, "flushing the WAL"))?;
    let upto: String = src
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .map_err(sql(Side::Source, "pg_current_wal_flush_lsn"))?
        .get(0);
    let limit = i32::try_from(max_changes).unwrap_or(i32::MAX);
    let peek = "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                'proto_version', '1', 'publication_names', $4)";
    let deadline = tokio::time::Instant::now() + SLOT_BUSY_WAIT;
    let stream = loop {
        let r = src
            .query_raw(
                peek,
                [
                    &slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &upto,
                    &limit,
                    &slot,
                ],
            )
            .await;
        match r {
            Ok(s) => break s,
            // The session of a crashed run may still hold the slot until
            // PostgreSQL notices its client is gone.
            Err(e) if is_object_in_use(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(peek_error(&slot, e)),
        }
    };
    futures_util::pin_mut!(stream);

    let mut ap = Applier {
        infos,
        tx: &tx,
        spec,
        fetch: None,
        script: String::new(),
        group: None,
        applied: 0,
        skipped: 0,
        touched,
    };
    let mut rels: HashMap<u32, Bound> = HashMap::new();
    let mut rows = 0usize;
    let mut last_end: Option<u64> = None;
    while let Some(row) = stream.try_next().await.map_err(|e| peek_error(&slot, e))? {
        rows += 1;
        let data: &[u8] = row.get(0);
        match pgoutput::decode(data)? {
            Message::Relation(r) => {
                let b = bind(infos, &r)?;
                rels.insert(r.oid, b);
            }
            Message::Insert { rel, new } => {
                let b = bound(&rels, rel)?;
                ap.insert(b, &new).await?;
            }
            Message::Update { rel, old, new } => {
                let b = bound(&rels, rel)?;
                ap.update(b, old.as_deref(), &new).await?;
            }
            Message::Delete { rel, old } => {
                let b = bound(&rels, rel)?;
                ap.delete(b, &old).await?;
            }
            Message::Truncate { rels: oids } => {
                let table = oids
                    .iter()
                    .find_map(|o| infos.iter().find(|i| i.oid == *o))
                    .map_or_else(|| format!("(oid {oids:?})"), |i| i.name.clone());
                return Err(ReshardError::Truncated { table });
            }
            Message::Commit { end_lsn, .. } => last_end = Some(end_lsn),
            Message::Begin { .. } | Message::Other(_) => {}
        }
    }
    ap.flush().await?;
    let (applied, skipped) = (ap.applied, ap.skipped);
    drop(ap);
    spec.guard.check(spec, Side::Target)?;
    tx.commit().await.map_err(sql(Side::Target, "COMMIT"))?;

    // Decoding stops at the change count (after a whole transaction) or at
    // `upto`; fewer rows than asked means it reached `upto`.
    let drained = rows < max_changes;
    let advance_to = if drained {
        Some(upto)
    } else {
        last_end.map(fmt_lsn)
    };
    if let Some(lsn) = advance_to {
        // Never backwards: PostgreSQL refuses to move a slot below its
        // confirmed position (a resumed run may have been overtaken).
        src.execute(
            "SELECT pg_replication_slot_advance($1, GREATEST($2::text::pg_lsn, \
               (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1)))",
            &[&slot, &lsn],
        )
        .await
        .map_err(sql(Side::Source, "advancing the replication slot"))?;
    }
    let lag: Option<String> = src
        .query_opt(
            "SELECT GREATEST(pg_current_wal_insert_lsn() - confirmed_flush_lsn, 0)::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql(Side::Source, "reading the slot's lag"))?
        .and_then(|r| r.get(0));
    let remaining_lag_bytes = lag
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ReshardError::NoCapture(slot.clone()))?;
    Ok(CatchUp {
        applied,
        skipped,
        remaining_lag_bytes,
        drained,
    })
}

fn peek_error(slot: &str, e: tokio_postgres::Error) -> ReshardError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) {
        return ReshardError::NoCapture(slot.to_owned());
    }
    sql(Side::Source, "reading changes from the replication slot")(e)
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn bound(rels: &HashMap<u32, Bound>, oid: u32) -> Result<&Bound, ReshardError> {
    rels.get(&oid).ok_or_else(|| {
        pgoutput::DecodeError(format!(
            "change for relation {oid} before its Relation message"
        ))
        .into()
    })
}

fn bind(infos: &[TableInfo], r: &Relation) -> Result<Bound, ReshardError> {
    let table = infos
        .iter()
        .position(|i| i.oid == r.oid)
        .ok_or_else(|| ReshardError::Server {
            side: Side::Source,
            problem: format!(
                "the publication sends changes of {}.{}, which is not moved by this job",
                r.namespace, r.name
            ),
        })?;
    let info = &infos[table];
    let cols: Vec<String> = r.columns.iter().map(|c| c.name.clone()).collect();
    let pos = |name: &str| {
        cols.iter()
            .position(|c| c == name)
            .ok_or_else(|| ReshardError::Table {
                table: info.name.clone(),
                problem: format!(
                    "column {name:?} is not in the replicated row (was the table altered during the move?)"
                ),
            })
    };
    let key_pos = pos(&info.key_column)?;
    let conflict_pos = info
        .conflict
        .iter()
        .map(|c| pos(c))
        .collect::<Result<Vec<_>, _>>()?;
    let carries_conflict =
        info.identity_full || info.conflict.iter().all(|c| info.identity.contains(c));
    let old_pos = if carries_conflict {
        conflict_pos.clone()
    } else {
        info.identity
            .iter()
            .map(|c| pos(c))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(Bound {
        table,
        cols,
        key_pos,
        conflict_pos,
        old_pos,
    })
}

/// Rows of one multi-row INSERT … ON CONFLICT or DELETE … IN (…).
struct Group {
    upsert: bool,
    head: String,
    tail: String,
    tuples: Vec<String>,
    /// Conflict keys of the upserted rows.
    keys: HashSet<String>,
}

/// At most this many rows per multi-row statement.
const GROUP_ROWS: usize = 500;

struct Applier<'a> {
    infos: &'a [TableInfo],
    tx: &'a Transaction<'a>,
    spec: &'a MoveSpec,
    /// A second source connection, opened on first need, to read rows whose
    /// TOASTed values an update did not carry.
    fetch: Option<Client>,
    script: String,
    /// The multi-row statement being built (not yet in `script`).
    group: Option<Group>,
    applied: u64,
    skipped: u64,
    /// Records the shard key of every row the batch changes in the range.
    touched: Option<&'a mut Touched>,
}

impl Applier<'_> {
    /// Records the shard key of `row` (a row the batch changes in the range).
    fn touch(&mut self, b: &Bound, row: &[Value]) {
        if let (Some(t), Some(Value::Text(k))) = (self.touched.as_deref_mut(), row.get(b.key_pos)) {
            t.add(b.table, k);
        }
    }

    fn in_range(&self, b: &Bound, row: &[Value]) -> Result<bool, ReshardError> {
        let info = &self.infos[b.table];
        match row.get(b.key_pos) {
            Some(Value::Text(s)) => {
                let key = KeyValue::parse(info.key_type, s).map_err(|e| ReshardError::Table {
                    table: info.name.clone(),
                    problem: format!("shard key value from the slot: {e}"),
                })?;
                // `infos` are described from `spec.tables`, in order.
                self.spec.contains(&self.spec.tables[b.table], &key)
            }
            // A NULL key has no point: it is in no range (as in SQL, where
            // the range predicate on NULL is not true).
            Some(Value::Null) => Ok(false),
            _ => Err(ReshardError::Table {
                table: info.name.clone(),
                problem: "the shard key is missing from a replicated row".into(),
            }),
        }
    }

    async fn insert(&mut self, b: &Bound, new: &[Value]) -> Result<(), ReshardError> {
        if !self.in_range(b, new)? {
            self.skipped += 1;
            return Ok(());
        }
        self.touch(b, new);
        self.upsert(b, new).await?;
        self.applied += 1;
        Ok(())
    }

    async fn update(
        &mut self,
        b: &Bound,
        old: Option<&[Value]>,
        new: &[Value],
    ) -> Result<(), ReshardError> {
        let new_in = self.in_range(b, new)?;
        // Without an old tuple the replica identity did not change, and it
        // contains the shard key (checked up front): same key as the new row.
        let old_in = match old {
            Some(o) => self.in_range(b, o)?,
            None => new_in,
        };
        if !new_in && !old_in {
            self.skipped += 1;
            return Ok(());
        }
        if new_in {
            self.touch(b, new);
        }
        if let Some(o) = old.filter(|_| old_in) {
            self.touch(b, o);
        }
        if let Some(o) = old {
            let moved = b
                .old_pos
                .iter()
                .any(|&p| o.get(p) != new.get(p) && o.get(p) != Some(&Value::Unchanged));
            if old_in && (!new_in || moved) {
                self.delete_by(b, &b.old_pos, o).await?;
            }
        }
        if new_in {
            if new.contains(&Value::Unchanged) {
                self.partial_update(b, new).await?;
            } else {
                self.upsert(b, new).await?;
            }
        }
        self.applied += 1;
        Ok(())
    }

    async fn delete(&mut self, b: &Bound, old: &[Value]) -> Result<(), ReshardError> {
        if !self.in_range(b, old)? {
            self.skipped += 1;
            return Ok(());
        }
        self.touch(b, old);
        self.delete_by(b, &b.old_pos, old).await?;
        self.applied += 1;
        Ok(())
    }

    fn where_clause(
        &self,
        b: &Bound,
        pos: &[usize],
        row: &[Value],
    ) -> Result<String, ReshardError> {
        let mut conds = Vec::with_capacity(pos.len());
        for &p in pos {
            match row.get(p) {
                Some(Value::Text(s)) => conds.push(format!(
                    "{} = {}",
                    quote_ident(&b.cols[p]),
                    quote_literal(s)
                )),
                _ => {
                    return Err(ReshardError::Table {
                        table: self.infos[b.table].name.clone(),
                        problem: format!(
                            "key column {:?} has no value in a replicated row",
                            b.cols[p]
                        ),
                    })
                }
            }
        }
        Ok(conds.join(" AND "))
    }

    async fn delete_by(
        &mut self,
        b: &Bound,
        pos: &[usize],
        row: &[Value],
    ) -> Result<(), ReshardError> {
        let vals = self.literals(b, pos, row)?;
        let cols: Vec<String> = pos.iter().map(|&p| quote_ident(&b.cols[p])).collect();
        let head = format!(
            "DELETE FROM {} WHERE ({}) IN (",
            self.infos[b.table].qualified,
            cols.join(", ")
        );
        let tuple = format!("({})", vals.join(", "));
        self.add(false, head, ")".into(), tuple.clone(), tuple)
            .await
    }

    /// The literals of the columns at `pos`, which must all have values.
    fn literals(
        &self,
        b: &Bound,
        pos: &[usize],
        row: &[Value],
    ) -> Result<Vec<String>, ReshardError> {
        pos.iter()
            .map(|&p| match row.get(p) {
                Some(Value::Text(s)) => Ok(quote_literal(s)),
                _ => Err(ReshardError::Table {
                    table: self.infos[b.table].name.clone(),
                    problem: format!(
                        "key column {:?} has no value in a replicated row",
                        b.cols[p]
                    ),
                }),
            })
            .collect()
    }

    async fn upsert(&mut self, b: &Bound, row: &[Value]) -> Result<(), ReshardError> {
        let info = &self.infos[b.table];
        let cols: Vec<String> = b.cols.iter().map(|c| quote_ident(c)).collect();
        let vals: Vec<String> = row
            .iter()
            .map(|v| match v {
                Value::Text(s) => quote_literal(s),
                _ => "NULL".to_owned(),
            })
            .collect();
        let conflict: Vec<String> = b.conflict_pos.iter().map(|&p| cols[p].clone()).collect();
        let sets: Vec<String> = (0..cols.len())
            .filter(|p| !b.conflict_pos.contains(p))
            .map(|p| format!("{c} = EXCLUDED.{c}", c = cols[p]))
            .collect();
        let action = if sets.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", sets.join(", "))
        };
        let head = format!(
            "INSERT INTO {} ({}) VALUES ",
            info.qualified,
            cols.join(", ")
        );
        let tail = format!(" ON CONFLICT ({}) DO {action}", conflict.join(", "));
        let key = self.literals(b, &b.conflict_pos, row)?.join(",");
        self.add(true, head, tail, format!("({})", vals.join(", ")), key)
            .await
    }

    /// Adds a row to the current multi-row statement, or starts a new one.
    /// Consecutive upserts (or deletes) of one table become one statement;
    /// an upsert whose key is already in the statement starts a new one
    /// (ON CONFLICT cannot touch a row twice, and the order of two changes
    /// of one key matters; changes of different keys commute).
    async fn add(
        &mut self,
        upsert: bool,
        head: String,
        tail: String,
        tuple: String,
        key: String,
    ) -> Result<(), ReshardError> {
        let fits = self.group.as_ref().is_some_and(|g| {
            g.upsert == upsert
                && g.head == head
                && g.tail == tail
                && g.tuples.len() < GROUP_ROWS
                && !(upsert && g.keys.contains(&key))
        });
        if !fits {
            self.close_group();
            self.group = Some(Group {
                upsert,
                head,
                tail,
                tuples: Vec::new(),
                keys: HashSet::new(),
            });
        }
        if let Some(g) = self.group.as_mut() {
            g.tuples.push(tuple);
            if upsert {
                g.keys.insert(key);
            }
        }
        if self.script.len() >= SCRIPT_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    fn close_group(&mut self) {
        if let Some(g) = self.group.take() {
            self.script.push_str(&g.head);
            self.script.push_str(&g.tuples.join(", "));
            self.script.push_str(&g.tail);
            self.script.push_str(";\n");
        }
    }

    /// An update that did not carry every value: set what it carries; if the
    /// row is not on the target, take the row as it is now on the source.
    async fn partial_update(&mut self, b: &Bound, new: &[Value]) -> Result<(), ReshardError> {
        let info = &self.infos[b.table];
        let sets: Vec<String> = new
            .iter()
            .enumerate()
            .filter(|(p, v)| **v != Value::Unchanged && !b.conflict_pos.contains(p))
            .map(|(p, v)| {
                let val = match v {
                    Value::Text(s) => quote_literal(s),
                    _ => "NULL".to_owned(),
                };
                format!("{} = {val}", quote_ident(&b.cols[p]))
            })
            .collect();
        let w = self.where_clause(b, &b.conflict_pos, new)?;
        self.flush().await?;
        let n = if sets.is_empty() {
            // Only unchanged values besides the key: is the row there?
            self.tx
                .execute(&format!("SELECT 1 FROM {} WHERE {w}", info.qualified), &[])
                .await
        } else {
            self.tx
                .execute(
                    &format!(
                        "UPDATE {} SET {} WHERE {w}",
                        info.qualified,
                        sets.join(", ")
                    ),
                    &[],
                )
                .await
        }
        .map_err(sql(
            Side::Target,
            format!("applying an update to {}", info.name),
        ))?;
        if n > 0 {
            return Ok(());
        }
        if self.fetch.is_none() {
            self.fetch = Some(super::connect(self.spec, Side::Source).await?);
        }
        let Some(fetch) = self.fetch.as_ref() else {
            return Ok(());
        };
        let cols: Vec<String> = b.cols.iter().map(|c| quote_ident(c)).collect();
        let q = format!(
            "SELECT {} FROM {} WHERE {w}",
            cols.join(", "),
            info.qualified
        );
        let msgs = fetch
            .simple_query(&q)
            .await
            .map_err(sql(Side::Source, format!("reading a row of {}", info.name)))?;
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let row: Vec<Value> = (0..cols.len())
                    .map(|i| match r.get(i) {
                        Some(s) => Value::Text(s.to_owned()),
                        None => Value::Null,
                    })
                    .collect();
                // Gone from the range since: a later change in the slot
                // removes it; nothing to do now.
                if self.in_range(b, &row)? {
                    self.upsert(b, &row).await?;
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ReshardError> {
        self.close_group();
        if self.script.is_empty() {
            return Ok(());
        }
        let script = std::mem::take(&mut self.script);
        self.tx
            .batch_execute(&script)
            .await
            .map_err(sql(Side::Target, "applying changes"))
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_lsn;

    #[test]
    fn lsn_text_form() {
        assert_eq!(fmt_lsn(0x1_0000_00A0), "1/A0");
        assert_eq!(fmt_lsn(0x16B3748), "0/16B3748");
    }
}
