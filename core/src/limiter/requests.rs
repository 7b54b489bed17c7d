//! The key tables of request-defined limits: one per bucket grid, made on
//! first use (by a request that carries such a limit, or by a peer's counts
//! for a grid this node has not seen yet), bounded in number, and the set
//! of distinct parameter sets seen, bounded too.
//!
//! See `rules::request` for what a request-defined limit is and why its
//! table is named by its grid.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::table::{self, KeyTable, MemoryBudget};
use super::LimiterConfig;
use crate::key::LimitId;
use crate::rules::request::{grid_of, RequestLimit, RequestLimitError, RequestLimitPolicy};
use crate::time::Nanos;

/// The request-defined limits' tables of one limiter.
pub(super) struct RequestTables {
    policy: RequestLimitPolicy,
    tables: RwLock<HashMap<LimitId, Arc<KeyTable>>>,
    /// Parameter digest → until when it is remembered (its window past the
    /// last request that used it). Sharded: no lock shared by every request.
    parameter_sets: dashmap::DashMap<u64, Nanos>,
}

impl RequestTables {
    pub(super) fn new(policy: RequestLimitPolicy) -> Self {
        RequestTables {
            policy,
            tables: RwLock::new(HashMap::new()),
            parameter_sets: dashmap::DashMap::new(),
        }
    }

    pub(super) fn policy(&self) -> &RequestLimitPolicy {
        &self.policy
    }

    /// The table of `limit`'s grid, made if needed, and `limit`'s parameter
    /// set remembered. `Err` when either bound is reached.
    pub(super) fn for_request(
        &self,
        now: Nanos,
        limit: &RequestLimit,
        config: &LimiterConfig,
        budget: &Arc<MemoryBudget>,
    ) -> Result<Arc<KeyTable>, RequestLimitError> {
        self.remember(now, limit)?;
        let id = limit.limit().id;
        self.get_or_make(id, config, budget)
            .ok_or(RequestLimitError::TooMany(self.policy.max_grids))
    }

    /// The table of grid `id`, if this node has it.
    pub(super) fn get(&self, id: LimitId) -> Option<Arc<KeyTable>> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The table of grid `id`, made if `id` names a grid and the bound
    /// allows (a peer's counts for a grid new to this node).
    pub(super) fn get_or_make(
        &self,
        id: LimitId,
        config: &LimiterConfig,
        budget: &Arc<MemoryBudget>,
    ) -> Option<Arc<KeyTable>> {
        if let Some(t) = self.get(id) {
            return Some(t);
        }
        let spec = grid_of(id)?;
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tables.get(&id) {
            return Some(t.clone());
        }
        if tables.len() >= self.policy.max_grids.min(self.policy.max_parameter_sets) {
            return None;
        }
        let table = Arc::new(
            KeyTable::new(spec, config.slots, config.max_keys)
                .ok()?
                .with_home_slot(config.own_slot)
                .with_budget(budget.clone()),
        );
        let weak: std::sync::Weak<dyn table::Reclaim> =
            Arc::downgrade(&table) as std::sync::Weak<dyn table::Reclaim>;
        budget.register(weak);
        tables.insert(id, table.clone());
        Some(table)
    }

    /// Every request-defined limits' table.
    pub(super) fn all(&self) -> Vec<(LimitId, Arc<KeyTable>)> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect()
    }

    /// Drops the tables that hold no key and that no decision holds: a
    /// grid used once does not keep its table for ever.
    pub(super) fn sweep(&self) {
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        tables.retain(|_, t| !(t.is_empty() && Arc::strong_count(t) == 1));
    }

    /// Distinct parameter sets remembered now.
    pub(super) fn parameter_sets(&self) -> usize {
        self.parameter_sets.len()
    }

    /// Remembers `limit`'s parameter set until its window has passed;
    /// refuses a new one when the bound is reached and none has expired.
    fn remember(&self, now: Nanos, limit: &RequestLimit) -> Result<(), RequestLimitError> {
        let until = now + limit.grid().span();
        let sets = &self.parameter_sets;
        if let Some(mut u) = sets.get_mut(&limit.params()) {
            if *u < until {
                *u = until;
            }
            return Ok(());
        }
        if sets.len() >= self.policy.max_parameter_sets {
            sets.retain(|_, u| *u > now);
            if sets.len() >= self.policy.max_parameter_sets {
                return Err(RequestLimitError::TooMany(self.policy.max_parameter_sets));
            }
        }
        sets.insert(limit.params(), until);
        Ok(())
    }
}
