//! The replicated counter: a PN-counter with one slot per node.
//!
//! Each node owns exactly one slot and only ever grows its own slot's two
//! components, `p` (hits admitted) and `n` (hits refunded). A replica learns
//! other slots only through [`PnSlot::merge`], a per-component maximum. Because
//! a slot's components never decrease, the maximum is the newest value, and
//! merge is commutative, associative and idempotent: replicas that saw the
//! same slot values in any order, any number of times, read the same.

use std::fmt;

/// How many distinct node slots there are: one per `u16`, so a cluster,
/// and a counter, has at most 65,536 slots.
pub const SLOT_SPACE: usize = 1 << 16;

/// The index of a node's slot inside every counter of the cluster.
///
/// Slots are dense small integers assigned by membership, not node ids, so
/// that a counter is a flat array.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct NodeSlot(u16);

impl NodeSlot {
    /// The slot numbered `index`.
    pub const fn new(index: u16) -> Self {
        NodeSlot(index)
    }
    /// The slot number as an index into a counter's slots.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
    /// The slot number as the wire and the certificates carry it.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for NodeSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// One node's contribution to a counter: hits it admitted and hits it refunded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PnSlot {
    /// Hits admitted (grow-only).
    pub p: u32,
    /// Hits refunded (grow-only).
    pub n: u32,
}

impl PnSlot {
    /// No hits admitted or refunded.
    pub const ZERO: PnSlot = PnSlot { p: 0, n: 0 };

    /// Per-component maximum: the join of the slot's two grow-only halves.
    pub fn merge(&mut self, other: PnSlot) {
        self.p = self.p.max(other.p);
        self.n = self.n.max(other.n);
    }

    /// True when `other` carries nothing this slot does not already have.
    pub fn covers(&self, other: PnSlot) -> bool {
        self.p >= other.p && self.n >= other.n
    }
}

/// Sums a row of slots into `(Σp, Σn)` without allocating.
pub fn sum_slots(slots: &[PnSlot]) -> (u64, u64) {
    slots.iter().fold((0u64, 0u64), |(p, n), s| {
        (p + u64::from(s.p), n + u64::from(s.n))
    })
}

/// An owned PN-counter with one slot per node.
///
/// The in-process limiter stores the same layout inline in its key table;
/// this owned form is what gossip frames carry and what the tests compare
/// against `crdts::PNCounter`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotCounter {
    slots: Vec<PnSlot>,
}

impl SlotCounter {
    /// A counter with no slots yet.
    pub fn new() -> Self {
        SlotCounter::default()
    }

    /// A counter with room for `nodes` slots, all zero.
    pub fn with_slots(nodes: usize) -> Self {
        SlotCounter {
            slots: vec![PnSlot::ZERO; nodes],
        }
    }

    fn slot_mut(&mut self, slot: NodeSlot) -> &mut PnSlot {
        if self.slots.len() <= slot.index() {
            self.slots.resize(slot.index() + 1, PnSlot::ZERO);
        }
        &mut self.slots[slot.index()]
    }

    /// Counts `hits` admitted by the node that owns `own`. Saturates rather
    /// than wraps: a wrapped slot would look older than it is and lose the merge.
    pub fn add(&mut self, own: NodeSlot, hits: u32) {
        let s = self.slot_mut(own);
        s.p = s.p.saturating_add(hits);
    }

    /// Counts `hits` refunded through the node that owns `own`.
    pub fn refund(&mut self, own: NodeSlot, hits: u32) {
        let s = self.slot_mut(own);
        s.n = s.n.saturating_add(hits);
    }

    /// Merges one slot value received from its owner.
    pub fn merge_slot(&mut self, slot: NodeSlot, value: PnSlot) {
        self.slot_mut(slot).merge(value);
    }

    /// The value of `slot`; zero if never set.
    pub fn slot(&self, slot: NodeSlot) -> PnSlot {
        self.slots.get(slot.index()).copied().unwrap_or_default()
    }

    /// Every slot's value, by slot index.
    pub fn slots(&self) -> &[PnSlot] {
        &self.slots
    }

    /// The counter's value, `Σp − Σn`, which may be negative when refunds
    /// arrived through other nodes before the hits they refund.
    pub fn value(&self) -> i64 {
        let (p, n) = sum_slots(&self.slots);
        p as i64 - n as i64
    }

    /// The value as a usage figure: never below zero.
    pub fn used(&self) -> u64 {
        let (p, n) = sum_slots(&self.slots);
        p.saturating_sub(n)
    }

    /// Joins another replica into this one, slot by slot.
    pub fn merge_from(&mut self, other: &SlotCounter) {
        if self.slots.len() < other.slots.len() {
            self.slots.resize(other.slots.len(), PnSlot::ZERO);
        }
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            mine.merge(*theirs);
        }
    }
}

/// Slot counters merge with any other slot counter; nothing can make a merge
/// unsafe, so validation never fails.
#[cfg(feature = "cluster")]
#[derive(Debug, thiserror::Error)]
#[error("slot counters always merge")]
pub struct NeverInvalid;

#[cfg(feature = "cluster")]
impl crdts::CvRDT for SlotCounter {
    type Validation = NeverInvalid;

    fn validate_merge(&self, _other: &Self) -> Result<(), NeverInvalid> {
        Ok(())
    }

    fn merge(&mut self, other: Self) {
        self.merge_from(&other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_grows_only_its_own_slot() {
        let mut c = SlotCounter::with_slots(3);
        c.add(NodeSlot::new(1), 5);
        c.refund(NodeSlot::new(1), 2);
        assert_eq!(c.slot(NodeSlot::new(0)), PnSlot::ZERO);
        assert_eq!(c.slot(NodeSlot::new(1)), PnSlot { p: 5, n: 2 });
        assert_eq!(c.value(), 3);
        assert_eq!(c.used(), 3);
    }

    #[test]
    fn merge_takes_the_newer_value_of_each_slot() {
        let mut a = SlotCounter::new();
        let mut b = SlotCounter::new();
        a.add(NodeSlot::new(0), 3);
        b.merge_slot(NodeSlot::new(0), PnSlot { p: 1, n: 0 });
        b.add(NodeSlot::new(2), 4);
        a.merge_from(&b);
        assert_eq!(
            a.slots(),
            &[PnSlot { p: 3, n: 0 }, PnSlot::ZERO, PnSlot { p: 4, n: 0 }]
        );
        assert_eq!(a.value(), 7);
    }

    #[test]
    fn refunds_ahead_of_their_hits_read_as_zero_usage() {
        let mut c = SlotCounter::new();
        c.refund(NodeSlot::new(0), 2);
        assert_eq!(c.value(), -2);
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut c = SlotCounter::new();
        c.add(NodeSlot::new(0), u32::MAX);
        c.add(NodeSlot::new(0), 7);
        assert_eq!(c.slot(NodeSlot::new(0)).p, u32::MAX);
    }
}
