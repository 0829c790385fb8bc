//! A bounded cache of [`Plan`]s by statement text, valid for one snapshot
//! epoch.
//!
//! Eviction is CLOCK (second chance): each entry has a reference bit set on
//! every hit; the hand clears bits until it finds an unreferenced entry and
//! replaces it. That approximates LRU with O(1) hits and no linked list.
//! When a lookup comes with a snapshot of another epoch, the whole cache is
//! dropped first: plans embed table definitions and must never outlive their
//! snapshot. Errors are not cached (they are cheap to recompute and may
//! depend on hints).

use std::collections::HashMap;
use std::sync::Arc;

use super::{plan_in, Namespace, Plan, RouteError};
use crate::catalog::RoutingSnapshot;

struct Entry {
    sql: Arc<str>,
    plan: Arc<Plan>,
    referenced: bool,
}

/// Bounded plan cache (not thread-safe by itself; wrap it in a mutex or keep
/// one per worker).
pub struct PlanCache {
    capacity: usize,
    epoch: Option<u64>,
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Entry>,
    hand: usize,
    hits: u64,
    misses: u64,
    /// Statement shapes (see [`crate::route::normalize_literals`]) whose
    /// plan cannot stand for their statements' (the parser cannot read
    /// the shape, or the analyser refuses it): their statements are
    /// planned from their own text without trying the shape again.
    /// Bounded by `capacity` (emptied when full), dropped with the epoch.
    no_shape: std::collections::HashSet<Arc<str>>,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanCache")
            .field("capacity", &self.capacity)
            .field("len", &self.slots.len())
            .field("epoch", &self.epoch)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

impl PlanCache {
    /// A cache holding at most `capacity` plans (at least 1).
    pub fn new(capacity: usize) -> PlanCache {
        let capacity = capacity.max(1);
        PlanCache {
            capacity,
            epoch: None,
            index: HashMap::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            hand: 0,
            hits: 0,
            misses: 0,
            no_shape: std::collections::HashSet::new(),
        }
    }

    /// Number of cached plans.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Drops every plan.
    pub fn clear(&mut self) {
        self.no_shape.clear();
        self.index.clear();
        self.slots.clear();
        self.hand = 0;
    }

    /// The plan for `sql` under `snapshot`, planning it on a miss.
    pub fn get_or_plan(
        &mut self,
        snapshot: &RoutingSnapshot,
        sql: &str,
    ) -> Result<Arc<Plan>, RouteError> {
        self.get_or_plan_in(snapshot, sql, &Namespace::default())
    }

    /// The plan for `sql` under `snapshot` with names resolved in `ns`,
    /// planning it on a miss (under the caller's lock: a shared cache
    /// should use [`PlanCache::get`], plan outside its lock, then
    /// [`PlanCache::put`]).
    pub fn get_or_plan_in(
        &mut self,
        snapshot: &RoutingSnapshot,
        sql: &str,
        ns: &Namespace,
    ) -> Result<Arc<Plan>, RouteError> {
        if let Some(p) = self.get(snapshot, sql, ns) {
            return Ok(p);
        }
        let p = Arc::new(plan_in(snapshot, sql, ns)?);
        self.put(snapshot, sql, Arc::clone(&p));
        Ok(p)
    }

    /// The cached plan for `sql` under `snapshot` and `ns`, if any (a miss
    /// is counted). A cache of another epoch is dropped first.
    pub fn get(
        &mut self,
        snapshot: &RoutingSnapshot,
        sql: &str,
        ns: &Namespace,
    ) -> Option<Arc<Plan>> {
        if self.epoch != Some(snapshot.epoch()) {
            self.clear();
            self.epoch = Some(snapshot.epoch());
        }
        let ns_id = ns.id();
        if let Some(&i) = self.index.get(sql) {
            let e = &mut self.slots[i];
            if e.plan.namespace().id() == ns_id {
                self.hits += 1;
                e.referenced = true;
                return Some(Arc::clone(&e.plan));
            }
        }
        self.misses += 1;
        None
    }

    /// Caches `plan` (made from `sql` under `snapshot`); a plan of another
    /// epoch than the cache's is not kept. Replaces a plan of the same
    /// text made under another namespace.
    pub fn put(&mut self, snapshot: &RoutingSnapshot, sql: &str, plan: Arc<Plan>) {
        if self.epoch != Some(snapshot.epoch()) || plan.epoch() != snapshot.epoch() {
            return;
        }
        if let Some(&i) = self.index.get(sql) {
            self.slots[i].plan = plan;
            return;
        }
        self.insert(Arc::from(sql), plan);
    }

    /// Whether `shape` was marked as having no usable plan under
    /// `snapshot` ([`PlanCache::mark_no_shape`]).
    pub fn is_no_shape(&mut self, snapshot: &RoutingSnapshot, shape: &str) -> bool {
        if self.epoch != Some(snapshot.epoch()) {
            self.clear();
            self.epoch = Some(snapshot.epoch());
        }
        self.no_shape.contains(shape)
    }

    /// Remembers that `shape` has no usable plan under `snapshot`.
    pub fn mark_no_shape(&mut self, snapshot: &RoutingSnapshot, shape: &str) {
        if self.epoch != Some(snapshot.epoch()) {
            return;
        }
        if self.no_shape.len() >= self.capacity {
            self.no_shape.clear();
        }
        self.no_shape.insert(Arc::from(shape));
    }

    fn insert(&mut self, sql: Arc<str>, plan: Arc<Plan>) {
        let entry = Entry {
            sql: Arc::clone(&sql),
            plan,
            referenced: false,
        };
        if self.slots.len() < self.capacity {
            self.index.insert(sql, self.slots.len());
            self.slots.push(entry);
            return;
        }
        loop {
            let e = &mut self.slots[self.hand];
            if e.referenced {
                e.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            self.index.remove(&e.sql);
            self.index.insert(sql, self.hand);
            *e = entry;
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{KeyType, RoutingFunction, ShardId, ShardedTable};

    fn snap(epoch: u64) -> RoutingSnapshot {
        let s0 = ShardId::new("s0").expect("name");
        RoutingSnapshot::builder(epoch)
            .shard(s0.clone(), "")
            .home_shard(s0)
            .sharded_table(ShardedTable {
                name: "t".into(),
                key_column: "id".into(),
                key_type: KeyType::Int8,
                function: RoutingFunction::PgHash { seed: 0 },
            })
            .equal_ranges(1)
            .and_then(|b| b.build())
            .expect("snapshot")
    }

    #[test]
    fn bounded_with_second_chance_and_epoch_invalidation() {
        let s1 = snap(1);
        let mut c = PlanCache::new(2);
        let a = c.get_or_plan(&s1, "SELECT 1").expect("plan");
        c.get_or_plan(&s1, "SELECT 2").expect("plan");
        // Hit on "SELECT 1" marks it referenced.
        let again = c.get_or_plan(&s1, "SELECT 1").expect("plan");
        assert!(Arc::ptr_eq(&a, &again));
        // Inserting a third evicts "SELECT 2" (unreferenced), keeps "SELECT 1".
        c.get_or_plan(&s1, "SELECT 3").expect("plan");
        assert_eq!(c.len(), 2);
        assert!(c.index.contains_key("SELECT 1"));
        assert!(!c.index.contains_key("SELECT 2"));
        assert_eq!(c.stats(), (1, 3));
        // A new epoch drops everything.
        let s2 = snap(2);
        let b = c.get_or_plan(&s2, "SELECT 1").expect("plan");
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(b.epoch(), 2);
        assert_eq!(c.len(), 1);
        // Errors are not cached.
        assert!(c.get_or_plan(&s2, "BEGIN WEIRD").is_err());
        assert_eq!(c.len(), 1);
    }

    /// The split API a shared cache uses (look up under the lock, plan
    /// outside it, put under it): a plan made for an older epoch while the
    /// cache moved on is not kept.
    #[test]
    fn get_and_put_keep_only_plans_of_the_current_epoch() {
        let (s1, s2) = (snap(1), snap(2));
        let ns = Namespace::default();
        let mut c = PlanCache::new(4);
        assert!(c.get(&s1, "SELECT 1", &ns).is_none());
        let p1 = Arc::new(plan_in(&s1, "SELECT 1", &ns).expect("plan"));
        c.put(&s1, "SELECT 1", Arc::clone(&p1));
        let hit = c.get(&s1, "SELECT 1", &ns).expect("cached");
        assert!(Arc::ptr_eq(&hit, &p1));
        // Meanwhile the epoch moved: a plan of epoch 1 is not put.
        assert!(c.get(&s2, "SELECT 2", &ns).is_none());
        c.put(
            &s1,
            "SELECT 2",
            Arc::new(plan_in(&s1, "SELECT 2", &ns).expect("plan")),
        );
        assert_eq!(c.len(), 0);
        assert!(c.get(&s2, "SELECT 1", &ns).is_none());
        assert_eq!(c.stats(), (1, 3));
    }
}
