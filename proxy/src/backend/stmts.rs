//! The statements the node has prepared on one backend connection, under
//! its node-wide names (`hr_…`), least recently used first out: a pooled
//! backend serves many clients over hours, and PostgreSQL keeps every
//! prepared statement (and its cached plans) until it is closed.
//!
//! Guarantee: [`StmtCache::insert`] never holds more than its bound; the
//! names it returns are those the caller must close on the backend
//! (a Close message) before it prepares the new one.

use std::collections::{BTreeMap, HashMap};

/// Names prepared on a backend, with their order of last use.
#[derive(Debug, Default)]
pub struct StmtCache {
    /// Name → its last use.
    by_name: HashMap<String, u64>,
    /// Last use → name (the first entry is the least recently used).
    by_use: BTreeMap<u64, String>,
    tick: u64,
}

impl StmtCache {
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Whether `name` is prepared; if so, it becomes the most recently used.
    pub fn touch(&mut self, name: &str) -> bool {
        let Some(t) = self.by_name.get_mut(name) else {
            return false;
        };
        self.tick += 1;
        if let Some(n) = self.by_use.remove(t) {
            self.by_use.insert(self.tick, n);
        }
        *t = self.tick;
        true
    }

    /// Records `name` as prepared (the most recently used) and returns the
    /// least recently used names dropped to keep at most `max` (0: no
    /// bound); `name` itself is never among them.
    pub fn insert(&mut self, name: String, max: usize) -> Vec<String> {
        if self.touch(&name) {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        while max > 0 && self.by_name.len() >= max {
            let Some((_, old)) = self.by_use.pop_first() else {
                break;
            };
            self.by_name.remove(&old);
            evicted.push(old);
        }
        self.tick += 1;
        self.by_use.insert(self.tick, name.clone());
        self.by_name.insert(name, self.tick);
        evicted
    }

    /// Forgets `name` (not prepared there after all, or closed).
    pub fn remove(&mut self, name: &str) -> bool {
        match self.by_name.remove(name) {
            Some(t) => {
                self.by_use.remove(&t);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl FromIterator<String> for StmtCache {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut c = StmtCache::default();
        for n in names {
            c.insert(n, 0);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_goes_first_and_the_bound_holds() {
        let mut c = StmtCache::default();
        assert!(c.insert("a".into(), 3).is_empty());
        assert!(c.insert("b".into(), 3).is_empty());
        assert!(c.insert("c".into(), 3).is_empty());
        // `a` used again: `b` is now the oldest.
        assert!(c.touch("a"));
        assert_eq!(c.insert("d".into(), 3), vec!["b".to_string()]);
        assert_eq!(c.len(), 3);
        assert!(!c.contains("b") && c.contains("a") && c.contains("d"));
        // A name already there evicts nothing.
        assert!(c.insert("c".into(), 3).is_empty());
        assert_eq!(c.insert("e".into(), 3), vec!["a".to_string()]);
        assert!(c.remove("d") && !c.remove("d"));
        assert_eq!(c.len(), 2);
        // A lower bound (a reload) drops several at once.
        c.insert("f".into(), 0);
        c.insert("g".into(), 0);
        assert_eq!(c.insert("h".into(), 2).len(), 3);
        assert_eq!(c.len(), 2);
        assert!(!c.touch("zz"));
    }
}
