//! Sets of node slots: who is a member, whom to reserve for, who answered.
//!
//! A [`PeerSet`] is a bitset over the whole slot space (`0..=u16::MAX`).
//! Slots `0..64` live in one inline word; slots from 64 on live in a
//! vector of further words that stays empty, and so never allocates, until
//! a slot past 63 is inserted. Clusters of up to 64 nodes, which the
//! decision path serves on every request, therefore pay what the `u64`
//! masks this type replaces cost: a word, tested and combined with single
//! instructions, and an empty vector that is never touched. Larger
//! clusters pay one allocation per set (a few words: 256 nodes take 3
//! more), made when membership changes or a confirmation starts, not per
//! decision.
//!
//! A bitset rather than a sorted list of slots: membership, reservation and
//! answer sets are dense (most of the cluster), so a bit per slot is the
//! smallest form, and union, difference and membership stay linear in
//! words, not in members. The vector never ends in a zero word, so equal
//! sets are equal values (the derived `Eq` and `Hash` hold).

use crate::slot::NodeSlot;

/// A set of node slots (see the module documentation for the layout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerSet {
    /// Slots `0..64`, bit per slot.
    low: u64,
    /// Slots `64 + 64·i ..`, word `i`; never ends in a zero word.
    high: Vec<u64>,
}

impl PeerSet {
    /// The empty set.
    pub const fn new() -> Self {
        PeerSet {
            low: 0,
            high: Vec::new(),
        }
    }

    /// The set holding only `slot`.
    pub fn single(slot: NodeSlot) -> Self {
        let mut s = PeerSet::new();
        s.insert(slot);
        s
    }

    /// Slots `0..n` (`n` at most 65,536, the slot space).
    pub fn first(n: usize) -> Self {
        let n = n.min(usize::from(u16::MAX) + 1);
        let full = |bits: usize| {
            if bits >= 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            }
        };
        let low = full(n);
        let high = (64..n).step_by(64).map(|start| full(n - start)).collect();
        PeerSet { low, high }
    }

    /// Adds `slot`; true if it was not there.
    pub fn insert(&mut self, slot: NodeSlot) -> bool {
        let (word, bit) = place(slot);
        let w = if word == 0 {
            &mut self.low
        } else {
            if self.high.len() < word {
                self.high.resize(word, 0);
            }
            &mut self.high[word - 1]
        };
        let fresh = *w & bit == 0;
        *w |= bit;
        fresh
    }

    /// Removes `slot`; true if it was there.
    pub fn remove(&mut self, slot: NodeSlot) -> bool {
        let (word, bit) = place(slot);
        let present = self.contains(slot);
        if word == 0 {
            self.low &= !bit;
        } else if let Some(w) = self.high.get_mut(word - 1) {
            *w &= !bit;
            self.trim();
        }
        present
    }

    /// True if `slot` is in the set.
    pub fn contains(&self, slot: NodeSlot) -> bool {
        let (word, bit) = place(slot);
        self.word(word) & bit != 0
    }

    /// One past the highest slot in the set (zero when empty): how wide an
    /// array indexed by slot must be to cover every member. Constant time:
    /// the last word is never zero.
    pub fn width(&self) -> usize {
        match self.high.last() {
            Some(&w) => 64 * self.high.len() + 64 - w.leading_zeros() as usize,
            None => 64 - self.low.leading_zeros() as usize,
        }
    }

    /// True when the set holds no slot.
    pub fn is_empty(&self) -> bool {
        // `high` never ends in a zero word: non-empty means a slot past 63.
        self.low == 0 && self.high.is_empty()
    }

    /// True when the set holds exactly `slot`.
    pub fn is_just(&self, slot: NodeSlot) -> bool {
        let (word, bit) = place(slot);
        if word == 0 {
            self.low == bit && self.high.is_empty()
        } else {
            self.low == 0 && self.high.len() == word && self.len() == 1 && self.contains(slot)
        }
    }

    /// How many slots the set holds.
    pub fn len(&self) -> usize {
        self.low.count_ones() as usize
            + self
                .high
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
    }

    /// The slots in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = NodeSlot> + '_ {
        std::iter::once(self.low)
            .chain(self.high.iter().copied())
            .enumerate()
            .flat_map(|(i, mut w)| {
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    Some(NodeSlot::new((i * 64 + b) as u16))
                })
            })
    }

    /// The slots in the set below `width`, in ascending order.
    pub fn below(&self, width: usize) -> impl Iterator<Item = NodeSlot> + '_ {
        self.iter().take_while(move |s| s.index() < width)
    }

    /// Slots in both sets.
    pub fn intersection(&self, other: &PeerSet) -> PeerSet {
        let mut out = PeerSet {
            low: self.low & other.low,
            high: self
                .high
                .iter()
                .zip(&other.high)
                .map(|(a, b)| a & b)
                .collect(),
        };
        out.trim();
        out
    }

    /// Slots in this set and not in `other`.
    pub fn difference(&self, other: &PeerSet) -> PeerSet {
        let mut out = PeerSet {
            low: self.low & !other.low,
            high: self
                .high
                .iter()
                .enumerate()
                .map(|(i, a)| a & !other.high.get(i).copied().unwrap_or(0))
                .collect(),
        };
        out.trim();
        out
    }

    /// Adds every slot of `other`.
    pub fn union_with(&mut self, other: &PeerSet) {
        self.low |= other.low;
        if self.high.len() < other.high.len() {
            self.high.resize(other.high.len(), 0);
        }
        for (a, b) in self.high.iter_mut().zip(&other.high) {
            *a |= b;
        }
    }

    /// Word `i` of the set (zero past its end).
    fn word(&self, i: usize) -> u64 {
        if i == 0 {
            self.low
        } else {
            self.high.get(i - 1).copied().unwrap_or(0)
        }
    }

    fn trim(&mut self) {
        while self.high.last() == Some(&0) {
            self.high.pop();
        }
    }
}

/// The word (0: the inline one) and the bit of `slot`.
fn place(slot: NodeSlot) -> (usize, u64) {
    (slot.index() / 64, 1 << (slot.index() % 64))
}

impl FromIterator<NodeSlot> for PeerSet {
    fn from_iter<I: IntoIterator<Item = NodeSlot>>(iter: I) -> Self {
        let mut s = PeerSet::new();
        for slot in iter {
            s.insert(slot);
        }
        s
    }
}

impl Extend<NodeSlot> for PeerSet {
    fn extend<I: IntoIterator<Item = NodeSlot>>(&mut self, iter: I) {
        for slot in iter {
            self.insert(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u16) -> NodeSlot {
        NodeSlot::new(i)
    }

    #[test]
    fn small_sets_stay_inline() {
        let mut a = PeerSet::first(64);
        assert_eq!(a.len(), 64);
        assert!(a.high.capacity() == 0, "no allocation up to slot 63");
        assert!(a.remove(s(5)));
        assert!(!a.remove(s(5)));
        assert!(!a.contains(s(5)));
        assert!(a.contains(s(63)));
        assert_eq!(a.difference(&PeerSet::single(s(0))).len(), 62);
        assert!(a.difference(&PeerSet::single(s(0))).high.capacity() == 0);
        assert!(!PeerSet::first(3).is_just(s(0)));
        assert!(PeerSet::single(s(7)).is_just(s(7)));
        assert!(PeerSet::new().is_empty());
    }

    #[test]
    fn any_slot_up_to_the_last_fits() {
        let slots = [0u16, 63, 64, 255, 1000, 65535];
        let set: PeerSet = slots.iter().map(|&i| s(i)).collect();
        assert_eq!(set.len(), slots.len());
        assert_eq!(
            set.iter().map(NodeSlot::get).collect::<Vec<_>>(),
            slots.to_vec()
        );
        assert_eq!(
            set.below(256).map(NodeSlot::get).collect::<Vec<_>>(),
            vec![0, 63, 64, 255]
        );
        for &i in &slots {
            assert!(set.contains(s(i)));
            assert!(PeerSet::single(s(i)).is_just(s(i)));
        }
        assert!(!set.contains(s(65534)));
        let all = PeerSet::first(65536);
        assert_eq!(all.len(), 65536);
        assert!(all.contains(s(65535)));
        assert_eq!(PeerSet::first(257).len(), 257);
        assert!(!PeerSet::first(257).contains(s(257)));
    }

    #[test]
    fn set_operations_keep_equal_sets_equal() {
        let a: PeerSet = [1, 70, 300].into_iter().map(s).collect();
        let b: PeerSet = [70, 300, 2].into_iter().map(s).collect();
        let mut only_a = a.difference(&b);
        assert_eq!(only_a, PeerSet::single(s(1)), "trailing zero words trimmed");
        assert_eq!(
            a.intersection(&b),
            [70, 300].into_iter().map(s).collect::<PeerSet>()
        );
        only_a.union_with(&b);
        assert_eq!(only_a.len(), 4);
        let mut c = PeerSet::single(s(300));
        c.remove(s(300));
        assert_eq!(c, PeerSet::new());
        assert!(c.is_empty());
        assert!(!PeerSet::single(s(300)).is_just(s(44)));
    }

    #[test]
    fn width_is_one_past_the_highest_slot() {
        assert_eq!(PeerSet::new().width(), 0);
        assert_eq!(PeerSet::single(s(0)).width(), 1);
        assert_eq!(PeerSet::first(3).width(), 3);
        assert_eq!(PeerSet::single(s(63)).width(), 64);
        assert_eq!(PeerSet::single(s(64)).width(), 65);
        let mut set: PeerSet = [2, 130, 700].into_iter().map(s).collect();
        assert_eq!(set.width(), 701);
        set.remove(s(700));
        assert_eq!(set.width(), 131);
        assert_eq!(PeerSet::single(s(65535)).width(), 65536);
    }
}
