//! The narrow view of the limiter's key tables that replication needs.
//!
//! The replicator never reaches into the limiter: it reads one slot's values
//! of a key, takes the hits admitted since the last shipment, merges peers'
//! values, settles acknowledged hits and holds keys under confirmation, all
//! through [`ReplicaStore`]. The limiter implements it here, against the key
//! table's public [`Entry`] API; tests can implement it over anything.

use crate::key::{KeyDigest, LimitId};
use crate::limiter::{Entry, Limiter, ShippedKeys};
use crate::slot::{NodeSlot, PnSlot};
use crate::time::{Clock, Nanos};
use crate::window::{MergeOutcome, Ring, SlotGrid};
use crate::wire::{BucketSlot, Slots};

pub use crate::key::CounterKey;

/// One slot's values of a key in its live buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotValues {
    /// The newest epoch the key's ring holds.
    pub newest: u64,
    /// Non-zero values, newest bucket first, `back` counted from `newest`.
    pub buckets: Vec<BucketSlot>,
}

/// What shipping one changed key took from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shipment {
    /// Hits admitted here since the last shipment: in flight until settled.
    pub hits: u32,
    /// This node's values of the key now; `None` when all are zero.
    pub values: Option<SlotValues>,
}

/// What merging a frame's values did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Values that raised a local value.
    pub applied: u64,
    /// Values no larger than the local one: duplicates and reorders.
    pub stale: u64,
    /// Values dropped for a bucket too far ahead of the local clock.
    pub too_far_ahead: u64,
}

/// The counts replication reads and writes.
pub trait ReplicaStore {
    /// How many slots every counter has: valid peer slots are below it.
    fn slots(&self) -> usize;
    /// Keys changed here since the last call.
    fn drain_changed(&self) -> Vec<CounterKey>;
    /// Takes a changed key's unshipped hits, with this node's (`own`) values
    /// of it at `now`. `None` when the key is gone or unchanged since it was
    /// last shipped.
    fn take_shipment(&self, now: Nanos, key: CounterKey, own: NodeSlot) -> Option<Shipment>;
    /// `slot`'s values of one key at `now`.
    fn slot_values(&self, now: Nanos, key: CounterKey, slot: NodeSlot) -> Option<SlotValues>;
    /// `slot`'s values of every key at `now`, one call per key with any.
    fn each_slot_values(
        &self,
        now: Nanos,
        slot: NodeSlot,
        f: &mut dyn FnMut(CounterKey, SlotValues),
    );
    /// The values of every slot `relay` accepts, of every key at `now`:
    /// one call per key and slot with any.
    fn each_relayed_values(
        &self,
        now: Nanos,
        relay: &dyn Fn(NodeSlot) -> bool,
        f: &mut dyn FnMut(NodeSlot, CounterKey, SlotValues),
    );
    /// The values of every slot `relay` accepts, of one key at `now`: one
    /// call per slot with any.
    fn key_slot_values(
        &self,
        now: Nanos,
        key: CounterKey,
        relay: &dyn Fn(NodeSlot) -> bool,
        f: &mut dyn FnMut(NodeSlot, SlotValues),
    );
    /// Merges the values of `slot` that `s` carries, each with a per-slot
    /// maximum. Limits the store does not know are skipped.
    fn merge(&self, now: Nanos, max_ahead: u64, slot: NodeSlot, s: &Slots) -> Merged;
    /// `hits` shipped earlier on `key` are acknowledged by every peer that
    /// must know them: they leave the in-flight share.
    fn settle(&self, key: CounterKey, hits: u32);
    /// A claim on `keys` (merged just before): decide them by confirmation
    /// for a while; `claim` is the claimant and when its hits were counted.
    fn hold_keys(&self, now: Nanos, keys: &[CounterKey], claim: Option<(NodeSlot, Nanos)>);
    /// Forgets holds that have passed.
    fn prune_confirming(&self, now: Nanos);
}

/// The values of every slot of `entry` that `relay` accepts, one call per
/// slot with any; `slots` is scratch space, kept between entries.
fn relayed_entry_values(
    entry: &Entry<'_>,
    now: Nanos,
    relay: &dyn Fn(NodeSlot) -> bool,
    slots: &mut Vec<NodeSlot>,
    f: &mut dyn FnMut(NodeSlot, SlotValues),
) {
    slots.clear();
    entry.for_each_value(&mut |_, slot, _| {
        // Slots are below the table's slot count, a `u16`.
        let slot = NodeSlot::new(u16::try_from(slot).unwrap_or(u16::MAX));
        if relay(slot) && !slots.contains(&slot) {
            slots.push(slot);
        }
    });
    for &slot in slots.iter() {
        if let Some(values) = entry_values(entry, now, slot) {
            f(slot, values);
        }
    }
}

/// `slot`'s values in the entry's live buckets; `None` when all are zero.
pub fn entry_values(entry: &Entry<'_>, now: Nanos, slot: NodeSlot) -> Option<SlotValues> {
    let (newest, column) = Ring::slot_column(entry, &entry.spec(), now, slot);
    let buckets: Vec<BucketSlot> = column
        .into_iter()
        .map(|(back, v)| BucketSlot {
            // Fewer than 256 buckets per window (`WindowSpec` refuses more).
            back: u8::try_from(back).unwrap_or(u8::MAX),
            p: v.p,
            n: v.n,
        })
        .collect();
    (!buckets.is_empty()).then_some(SlotValues { newest, buckets })
}

/// The keys the replicator takes, kept for the write-ahead journal (see
/// [`ShippedKeys`]); `None` when the limiter is not clustered.
pub fn shipped_keys<C: Clock>(limiter: &Limiter<C>) -> Option<&ShippedKeys> {
    limiter.journal().map(|j| j.shipped())
}

/// Merges the values of `slot` that `s` carries into the limiter's tables,
/// each with a per-slot maximum. Limits the limiter does not know are
/// skipped (the rules may be mid-reload). Gossip and snapshots both land here.
pub fn merge_into<C: Clock>(
    limiter: &Limiter<C>,
    now: Nanos,
    max_ahead: u64,
    slot: NodeSlot,
    s: &Slots,
) -> Merged {
    let mut merged = Merged::default();
    for group in &s.groups {
        let Some(table) = limiter.table_for_merge(LimitId(group.limit)) else {
            continue;
        };
        let spec = *table.spec();
        for k in &group.keys {
            let mut entry = table.get_or_insert(KeyDigest(k.key), now);
            for b in &k.buckets {
                let epoch = group.newest - u64::from(b.back);
                let value = PnSlot { p: b.p, n: b.n };
                match Ring::merge(&mut entry, &spec, now, max_ahead, epoch, slot, value) {
                    MergeOutcome::Applied => merged.applied += 1,
                    MergeOutcome::Stale => merged.stale += 1,
                    MergeOutcome::TooFarAhead => merged.too_far_ahead += 1,
                }
            }
        }
    }
    merged
}

impl<C: Clock> ReplicaStore for Limiter<C> {
    fn slots(&self) -> usize {
        self.config().slots
    }

    fn drain_changed(&self) -> Vec<CounterKey> {
        let Some(journal) = self.journal() else {
            return Vec::new();
        };
        journal.shipped().begin_round();
        journal.drain()
    }

    fn take_shipment(
        &self,
        now: Nanos,
        CounterKey { limit, key }: CounterKey,
        own: NodeSlot,
    ) -> Option<Shipment> {
        let table = self.table_by_id(limit)?;
        let mut entry = table.get(key)?;
        if !entry.take_dirty() {
            return None;
        }
        if let Some(j) = self.journal() {
            j.shipped().taken(CounterKey::new(limit, key));
        }
        let hits = entry.ship();
        Some(Shipment {
            hits,
            values: entry_values(&entry, now, own),
        })
    }

    fn slot_values(
        &self,
        now: Nanos,
        CounterKey { limit, key }: CounterKey,
        slot: NodeSlot,
    ) -> Option<SlotValues> {
        let table = self.table_by_id(limit)?;
        let entry = table.get(key)?;
        entry_values(&entry, now, slot)
    }

    fn each_slot_values(
        &self,
        now: Nanos,
        slot: NodeSlot,
        f: &mut dyn FnMut(CounterKey, SlotValues),
    ) {
        for (limit, table) in self.tables() {
            table.for_each(|entry| {
                if let Some(values) = entry_values(entry, now, slot) {
                    f(CounterKey::new(limit, entry.key()), values);
                }
            });
        }
    }

    fn each_relayed_values(
        &self,
        now: Nanos,
        relay: &dyn Fn(NodeSlot) -> bool,
        f: &mut dyn FnMut(NodeSlot, CounterKey, SlotValues),
    ) {
        let mut slots = Vec::new();
        for (limit, table) in self.tables() {
            table.for_each(|entry| {
                let key = CounterKey::new(limit, entry.key());
                relayed_entry_values(entry, now, relay, &mut slots, &mut |slot, values| {
                    f(slot, key, values)
                });
            });
        }
    }

    fn key_slot_values(
        &self,
        now: Nanos,
        CounterKey { limit, key }: CounterKey,
        relay: &dyn Fn(NodeSlot) -> bool,
        f: &mut dyn FnMut(NodeSlot, SlotValues),
    ) {
        let Some(table) = self.table_by_id(limit) else {
            return;
        };
        let Some(entry) = table.get(key) else {
            return;
        };
        relayed_entry_values(&entry, now, relay, &mut Vec::new(), f);
    }

    fn merge(&self, now: Nanos, max_ahead: u64, slot: NodeSlot, s: &Slots) -> Merged {
        merge_into(self, now, max_ahead, slot, s)
    }

    fn settle(&self, CounterKey { limit, key }: CounterKey, hits: u32) {
        if let Some(table) = self.table_by_id(limit) {
            if let Some(mut e) = table.get(key) {
                e.settle(hits);
            }
        }
    }

    fn hold_keys(&self, now: Nanos, keys: &[CounterKey], claim: Option<(NodeSlot, Nanos)>) {
        Limiter::hold_keys(self, now, keys, claim.map(|(s, t)| (s.get(), t)));
    }

    fn prune_confirming(&self, now: Nanos) {
        Limiter::prune_confirming(self, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::LimiterConfig;
    use crate::rules::RuleSet;
    use crate::share::ShareView;
    use crate::time::ManualClock;
    use crate::wire::{KeySlots, LimitGroup};
    use std::sync::Arc;

    const RULES: &str = r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "fixed_window", limit = 100, window = "1h" } ]
    "#;

    fn limiter(now: Nanos) -> Limiter<Arc<ManualClock>> {
        let config = LimiterConfig {
            own_slot: NodeSlot::new(0),
            slots: 3,
            ..LimiterConfig::default()
        };
        Limiter::with_clock(
            RuleSet::from_toml(RULES).unwrap(),
            config,
            Arc::new(ManualClock::new(now)),
        )
        .and_then(|l| l.clustered(ShareView::alone(0)))
        .unwrap()
    }

    #[test]
    fn the_limiter_ships_merges_and_settles_through_the_store() {
        let now = Nanos::from_secs(1_700_000_000);
        let l = limiter(now);
        l.set_admitting(true);
        let d = crate::descriptor::Descriptors::new(&[("user", "u")]).unwrap();
        assert!(l.check_at(now, &d, 3).unwrap().is_allowed());
        let store: &dyn ReplicaStore = &l;
        assert_eq!(store.slots(), 3);
        let changed = store.drain_changed();
        assert_eq!(changed.len(), 1);
        let key = changed[0];
        let shipped = store.take_shipment(now, key, NodeSlot::new(0)).unwrap();
        assert_eq!(shipped.hits, 3);
        let values = shipped.values.unwrap();
        assert_eq!(values.buckets.len(), 1);
        assert_eq!(values.buckets[0].p, 3);
        // Unchanged since: nothing more to ship.
        assert_eq!(store.take_shipment(now, key, NodeSlot::new(0)), None);
        // A peer's values land in its slot only.
        let frame = Slots {
            slot: 2,
            round: 1,
            sent_at: now.as_u64(),
            last: true,
            groups: vec![LimitGroup {
                limit: key.limit.0,
                newest: values.newest,
                keys: vec![KeySlots {
                    key: key.key.0,
                    buckets: values.buckets.clone(),
                }],
            }],
        };
        let merged = store.merge(now, 1, NodeSlot::new(2), &frame);
        assert_eq!(merged.applied, 1);
        assert_eq!(store.merge(now, 1, NodeSlot::new(2), &frame).stale, 1);
        assert_eq!(store.slot_values(now, key, NodeSlot::new(2)), Some(values));
        assert_eq!(store.slot_values(now, key, NodeSlot::new(1)), None);
        let mut seen = 0;
        store.each_slot_values(now, NodeSlot::new(2), &mut |k, _| {
            assert_eq!(k, key);
            seen += 1;
        });
        assert_eq!(seen, 1);
        store.settle(key, 3);
        let t = l.table_by_id(key.limit).unwrap();
        assert_eq!(t.get(key.key).unwrap().inflight(), 0);
    }
}
