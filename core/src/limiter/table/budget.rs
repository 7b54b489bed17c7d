//! The node-wide memory budget (`max_memory`) shared by every key table.
//!
//! Each table charges the bytes it holds (entries in use, the index's share
//! per key, the evicted keys' sketch) to one budget. A table about to insert
//! a key while the node is over budget first asks the registered table that
//! holds the most bytes to evict one key, until the node is back within the
//! budget (a few keys per insertion at most). So the budget holds across
//! all limits: a busy limit cannot grow by pushing the node past it, and
//! whichever limit holds the most memory gives it back first.
//!
//! The rules count against the same budget ([`MemoryBudget::rules_bytes`]):
//! each compiled rule set (its text, matchers, limits and lookup maps) and
//! each key table's fixed part (the table, its size classes, chunk lists
//! and the index's allocated slots), charged when built and given back when
//! dropped, so that a rule change frees what the old rules held once no
//! decision uses them. Keys are evicted to make room for them as for any
//! other memory; rules themselves are never evicted.
//!
//! What the budget does not count: the chunks an arena has allocated but not
//! yet filled (at most one chunk per size class per table, 256 KiB of class-0
//! entries) and the index's spare capacity beyond its per-key share. A key
//! that grows into a larger size class is charged at once but only makes
//! room on the next insertion, so the node can be over budget by what keys
//! grew since the last insertion.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::time::Nanos;

/// A table that can give memory back.
pub trait Reclaim: Send + Sync {
    /// Bytes the table holds against the budget.
    fn bytes(&self) -> usize;
    /// Evicts (or expires) one key; returns the bytes freed, 0 if none.
    fn reclaim(&self, now: Nanos) -> usize;
}

/// Bytes all key tables of a node may hold together.
pub struct MemoryBudget {
    limit: Option<usize>,
    used: AtomicUsize,
    /// Bytes of the rules: compiled rule sets and key tables' fixed parts.
    rules: AtomicUsize,
    evictions: AtomicU64,
    tables: Mutex<Vec<Weak<dyn Reclaim>>>,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit)
            .field("used", &self.used())
            .field("rules", &self.rules_bytes())
            .finish()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes; `None` counts without limiting.
    pub fn new(limit: Option<usize>) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            rules: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            tables: Mutex::new(Vec::new()),
        }
    }

    /// Counts without limiting.
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(None)
    }

    /// The budget in bytes, if any.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// Bytes charged by every table for its keys (entries, index share,
    /// sketches).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes held by the rules in force and by the key tables' fixed parts
    /// (see the module docs); counted against the budget with
    /// [`MemoryBudget::used`].
    pub fn rules_bytes(&self) -> usize {
        self.rules.load(Ordering::Relaxed)
    }

    pub(crate) fn charge_rules(&self, bytes: usize) {
        self.rules.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn credit_rules(&self, bytes: usize) {
        let _ = self
            .rules
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Keys evicted to stay within the budget, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Lets the budget ask `table` for memory back (tables that are gone
    /// are forgotten).
    pub fn register(&self, table: Weak<dyn Reclaim>) {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        // Pruned only when the list is full, so registering costs O(1)
        // amortised: a rule set of 10,000 limits registers 10,000 tables,
        // and pruning on every call made that quadratic.
        if tables.len() == tables.capacity() {
            tables.retain(|t| t.strong_count() > 0);
        }
        tables.push(table);
    }

    /// The registered table holding the most bytes.
    pub(super) fn largest(&self) -> Option<Arc<dyn Reclaim>> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .iter()
            .filter_map(Weak::upgrade)
            .max_by_key(|t| t.bytes())
    }

    /// True when adding `more` bytes would take the node over its budget.
    pub(super) fn over(&self, more: usize) -> bool {
        self.limit.is_some_and(|limit| {
            self.used()
                .saturating_add(self.rules_bytes())
                .saturating_add(more)
                > limit
        })
    }

    pub(super) fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn credit(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    pub(super) fn note_eviction(&self) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }
}
