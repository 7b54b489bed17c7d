//! The counter API: what a key has spent under each limit that applies to
//! it, cluster-wide and per node slot, and its reset.
//!
//! A reset cannot simply zero a counter: merge is a per-slot maximum, so a
//! peer that had not seen the reset would bring the old values back. It is
//! instead a replicated record (the keys it clears) that every node applies
//! to its *own* slot only, by raising that slot's `p` and `n` to the larger
//! of the two: the slot's net count becomes zero while both components only
//! grow, so every merge keeps the reset. Once every node has applied the
//! record and its new values have reached the others, the key's count is
//! zero everywhere; a node that had not seen the record when it admitted a
//! hit clears that hit too when the record reaches it (a reset clears what
//! was counted before each node learned of it).

use std::sync::Arc;

use super::decision::{Check, Decision, QuotaState};
use super::evaluate::{Match, Matches, Target};
use super::table::KeyTable;
use super::{CheckError, Limiter};
use crate::algorithm::RateAlgorithm;
use crate::key::CounterKey;
use crate::rules::request::RequestLimit;
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::window::{Ring, SlotGrid, WindowCounts};

/// One counter of a key as the node sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterView {
    /// Which counter: the limit's id and the key's digest.
    pub counter: CounterKey,
    /// The limit, and the key's remaining quota and reset time under it (as
    /// a check of cost 0 would report them).
    pub quota: QuotaState,
    /// The limit's rule is in shadow mode (it never denies).
    pub shadow: bool,
    /// The limit is one a request carried, not one of the rules.
    pub request_defined: bool,
    /// Net hits in the window's live buckets, every slot merged.
    pub count: u64,
    /// Net hits of each slot that holds any, by slot: what each node
    /// counted (negative when a node gave back hits another counted).
    pub slots: Vec<(NodeSlot, i64)>,
}

/// A check's request-defined limit and its table.
type RequestTarget = (Arc<KeyTable>, Arc<RequestLimit>);

impl<C: Clock> Limiter<C> {
    /// The counters the check's descriptors (and request-defined limit, if
    /// any) reach, one per limit that applies, as this node sees them now.
    /// Counts nothing and creates no key.
    pub fn counters(&self, check: &Check<'_>) -> Result<Vec<CounterView>, CheckError> {
        self.counters_at(self.clock.now(), check)
    }

    /// [`Limiter::counters`] at `now`.
    pub fn counters_at(
        &self,
        now: Nanos,
        check: &Check<'_>,
    ) -> Result<Vec<CounterView>, CheckError> {
        let compiled = self.compiled.load();
        let (matches, request) = self.counter_matches(now, check)?;
        let mut views = Vec::with_capacity(matches.as_slice().len());
        let mut last = None;
        for m in matches.as_slice() {
            let (table, limit, request_defined) = match (m.target, &request) {
                (Target::Rule(i), _) => (
                    &compiled.tables[i as usize],
                    &compiled.rules.limits()[i as usize],
                    false,
                ),
                (Target::Request(_), Some((table, limit))) => (table, limit.limit(), true),
                (Target::Request(_), None) => continue,
            };
            let counter = CounterKey::new(limit.id, m.key);
            // Lists of one rule that share a counter: report it once.
            if last == Some((counter, limit.index)) {
                continue;
            }
            last = Some((counter, limit.index));
            let spec = *table.spec();
            let mut nets = vec![0u64; spec.buckets()];
            let mut slots = Vec::new();
            if let Some(entry) = table.get(m.key) {
                Ring::read(&entry, &spec, now, &mut nets);
                // As wide as the highest slot the key holds, not the
                // table's slot space (65,536 on a node).
                let mut width = 0;
                entry.for_each_value(&mut |_, slot, _| width = width.max(slot + 1));
                let mut per_slot = vec![0i64; width];
                Ring::slot_nets(&entry, &spec, now, &mut per_slot);
                slots = per_slot
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, n)| n != 0)
                    .map(|(s, n)| (NodeSlot::new(s as u16), n))
                    .collect();
            }
            let verdict = limit.algorithm.decide(
                &WindowCounts {
                    spec,
                    now,
                    nets: &nets,
                },
                0,
            );
            let Some(quota) = Decision::of(limit, verdict).quota else {
                continue;
            };
            views.push(CounterView {
                counter,
                quota,
                shadow: limit.shadow,
                request_defined,
                count: nets.iter().sum(),
                slots,
            });
        }
        Ok(views)
    }

    /// Resets, in this node's own slot, every counter the check reaches
    /// (see the module docs) and returns them: the record to send to the
    /// peers, which apply it with [`Limiter::reset_counters_at`]. Each
    /// counter is returned once, whether or not this node had counted on
    /// it.
    pub fn reset_at(&self, now: Nanos, check: &Check<'_>) -> Result<Vec<CounterKey>, CheckError> {
        let (matches, request) = self.counter_matches(now, check)?;
        let compiled = self.compiled.load();
        let mut keys: Vec<CounterKey> = Vec::new();
        for m in matches.as_slice() {
            let id = match (m.target, &request) {
                (Target::Rule(i), _) => compiled.rules.limits()[i as usize].id,
                (Target::Request(_), Some((_, limit))) => limit.limit().id,
                (Target::Request(_), None) => continue,
            };
            keys.push(CounterKey::new(id, m.key));
        }
        keys.sort_unstable();
        keys.dedup();
        self.reset_counters_at(now, &keys);
        Ok(keys)
    }

    /// Applies a reset record: clears this node's own slot of each counter
    /// in `keys` (see the module docs). Counters of limits this node does
    /// not hold are skipped. Returns the hits cleared.
    pub fn reset_counters_at(&self, now: Nanos, keys: &[CounterKey]) -> u64 {
        let own = self.config.own_slot;
        let mut cleared = 0;
        for &counter in keys {
            let Some(table) = self.table_for_merge(counter.limit) else {
                continue;
            };
            cleared += self.reset_one(&table, now, counter, own);
        }
        cleared
    }

    fn reset_one(&self, table: &KeyTable, now: Nanos, counter: CounterKey, own: NodeSlot) -> u64 {
        // The entry is made if absent: a key evicted within its window
        // comes back with the usage its sketch kept, which the reset clears.
        let mut entry = table.get_or_insert(counter.key, now);
        let spec = *table.spec();
        let cleared = Ring::reset_slot(&mut entry, &spec, now, own);
        if cleared > 0 && entry.mark_dirty() {
            if let Some(c) = &self.cluster {
                c.journal.push(counter);
            }
        }
        cleared
    }

    /// The limits a check reaches and their keys, as a decision would
    /// resolve them, with the check's request-defined limit and its table.
    fn counter_matches(
        &self,
        now: Nanos,
        check: &Check<'_>,
    ) -> Result<(Matches, Option<RequestTarget>), CheckError> {
        let compiled = self.compiled.load();
        let mut matches = Matches::new();
        let mut request = None;
        match &check.limit {
            None => self.resolve(&compiled, &check.descriptors, 0, &mut matches)?,
            Some(limit) => {
                let table = self
                    .requests
                    .for_request(now, limit, &self.config, &self.budget)?;
                matches.push(Match {
                    order: limit.limit().id.0,
                    key: self.request_key(&check.descriptors, limit),
                    check: 0,
                    target: Target::Request(0),
                });
                request = Some((table, limit.clone()));
            }
        }
        matches.sort();
        Ok((matches, request))
    }
}
