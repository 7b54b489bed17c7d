//! Time-bucketed windows of slot counters.
//!
//! A window is a ring of `buckets` rows; row `e % buckets` holds the slot
//! counters of bucket epoch `e = t / granularity`, where `t` is absolute time
//! since the Unix epoch. Nodes therefore agree on bucket boundaries without
//! talking, and a row is wiped the moment the ring advances past it, so expired
//! counts drop out on their own.
//!
//! The ring logic here is written once against [`SlotGrid`], the storage of
//! one window: the owned [`BucketWindow`] (gossip, tests, oracle) and the key
//! table of the in-process limiter (atomic words) both implement it.

use crate::slot::{sum_slots, NodeSlot, PnSlot};
use crate::time::Nanos;

/// The most buckets one window may have. Reads are done into a stack buffer
/// of this size, so a decision never allocates.
pub const MAX_BUCKETS: usize = 64;

/// Rings up to this many buckets are read through a stack buffer of this
/// size: the default sliding window (precision 10: 11 buckets), fixed
/// windows, and GCRA or token buckets with a small burst.
pub const SMALL_RING: usize = 20;

/// The bucket layout of one limit: bucket length and how many are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    granularity: Nanos,
    /// `⌊2⁶⁴ / granularity⌋`: epochs are computed on every decision, and a
    /// multiply-high with one correction is several times cheaper than a
    /// 64-bit division.
    reciprocal: u64,
    buckets: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
/// Why a [`WindowSpec`] could not be built.
pub enum WindowSpecError {
    #[error("bucket granularity must be at least 1ms, got {0}")]
    /// Buckets shorter than 1 ms.
    GranularityTooSmall(Nanos),
    #[error("a window keeps between 1 and {MAX_BUCKETS} buckets, got {0}")]
    /// Zero buckets, or more than [`MAX_BUCKETS`].
    BucketCount(usize),
}

impl WindowSpec {
    /// Granularity of at least 1 ms keeps epochs inside 32 bits for 49 days,
    /// which the packed key table relies on (see `unpack_epoch`).
    pub fn new(granularity: Nanos, buckets: usize) -> Result<Self, WindowSpecError> {
        if granularity < Nanos::from_millis(1) {
            return Err(WindowSpecError::GranularityTooSmall(granularity));
        }
        if buckets == 0 || buckets > MAX_BUCKETS {
            return Err(WindowSpecError::BucketCount(buckets));
        }
        Ok(WindowSpec {
            granularity,
            reciprocal: (u128::from(u64::MAX) / u128::from(granularity.as_u64())) as u64,
            buckets: buckets as u16,
        })
    }
    /// Length of one bucket.
    pub fn granularity(&self) -> Nanos {
        self.granularity
    }
    /// How many buckets the ring keeps: 1 to [`MAX_BUCKETS`].
    pub fn buckets(&self) -> usize {
        usize::from(self.buckets)
    }
    /// The bucket epoch that contains `t`.
    #[inline]
    pub fn epoch(&self, t: Nanos) -> u64 {
        let (t, g) = (t.as_u64(), self.granularity.as_u64());
        // The estimate is ⌊t/g⌋ or one less (the reciprocal is rounded down).
        let q = ((u128::from(t) * u128::from(self.reciprocal)) >> 64) as u64;
        if t - q * g >= g {
            q + 1
        } else {
            q
        }
    }
    /// When the bucket of `epoch` begins (saturating).
    pub fn epoch_start(&self, epoch: u64) -> Nanos {
        Nanos::new(epoch.saturating_mul(self.granularity.as_u64()))
    }
    /// How long the ring remembers: all buckets together.
    pub fn span(&self) -> Nanos {
        Nanos::new(self.granularity.as_u64() * u64::from(self.buckets))
    }
}

/// The merged usage of one window as an algorithm sees it at `now`.
///
/// `nets[i]` is the cluster-wide net count (Σp − Σn, floored at zero) of
/// bucket epoch `epoch(now) − (len − 1) + i`: the last entry is the current
/// bucket. Algorithms are pure functions of this view, the cost and their
/// parameters.
#[derive(Clone, Copy, Debug)]
pub struct WindowCounts<'a> {
    /// The window's bucket layout.
    pub spec: WindowSpec,
    /// The time the counts were read at.
    pub now: Nanos,
    /// Net counts per bucket, oldest first; the last is the current bucket.
    pub nets: &'a [u64],
}

impl WindowCounts<'_> {
    /// The bucket epoch containing `now`.
    pub fn current_epoch(&self) -> u64 {
        self.spec.epoch(self.now)
    }
    /// The epoch of `nets[i]`.
    pub fn epoch_at(&self, i: usize) -> u64 {
        (self.current_epoch() + 1).saturating_sub((self.nets.len() - i) as u64)
    }
    /// Net count of the whole window.
    pub fn total(&self) -> u64 {
        self.nets.iter().sum()
    }
}

/// Storage for one window: `buckets` rows of `slots` slot values, plus the
/// newest epoch the ring has advanced to.
pub trait SlotGrid {
    /// Slots per row.
    fn slot_count(&self) -> usize;
    /// The value of `slot` in ring row `row`.
    fn get(&self, row: usize, slot: usize) -> PnSlot;
    /// Overwrites the value of `slot` in ring row `row`.
    fn set(&mut self, row: usize, slot: usize, value: PnSlot);
    /// Adds `hits` to the `p` component of `slot` in ring row `row`
    /// (saturating). Sparse stores override it to grow a cell in place.
    fn add_p(&mut self, row: usize, slot: usize, hits: u32) {
        let mut v = self.get(row, slot);
        v.p = v.p.saturating_add(hits);
        self.set(row, slot, v);
    }
    /// The newest epoch, given the caller's current epoch (packed stores keep
    /// only 32 bits and rebuild the rest relative to `now_epoch`).
    fn newest(&self, now_epoch: u64) -> u64;
    /// Records the newest epoch the ring has advanced to.
    fn set_newest(&mut self, epoch: u64);

    /// Zeroes every slot of ring row `row`.
    fn clear_row(&mut self, row: usize) {
        for slot in 0..self.slot_count() {
            self.set(row, slot, PnSlot::ZERO);
        }
    }
    /// Net count of ring row `row` across all slots (Σp − Σn, floored at
    /// zero).
    fn row_net(&self, row: usize) -> u64 {
        let (p, n) = (0..self.slot_count()).fold((0u64, 0u64), |(p, n), s| {
            let v = self.get(row, s);
            (p + u64::from(v.p), n + u64::from(v.n))
        });
        p.saturating_sub(n)
    }
    /// Adds every row's `(Σp, Σn)` into `sums[row]`. Sparse stores do it in
    /// one pass over what they hold.
    fn row_sums(&self, sums: &mut [(u64, u64)]) {
        for (row, sum) in sums.iter_mut().enumerate() {
            for s in 0..self.slot_count() {
                let v = self.get(row, s);
                sum.0 += u64::from(v.p);
                sum.1 += u64::from(v.n);
            }
        }
    }
    /// Calls `f(row, slot, value)` for the slot values held; a store may
    /// skip zero values, or report one slot's `p` and `n` in separate calls
    /// (the other component zero), so callers only add.
    fn for_each_value(&self, f: &mut dyn FnMut(usize, usize, PnSlot)) {
        for row in 0..self.rows() {
            for s in 0..self.slot_count() {
                let v = self.get(row, s);
                if v != PnSlot::ZERO {
                    f(row, s, v);
                }
            }
        }
    }
    /// Rows in the grid (its window's bucket count).
    fn rows(&self) -> usize;
}

/// Rebuilds a full epoch from its low `bits` bits, taking the one nearest to
/// `now_epoch`. Exact while the stored epoch is within `2^(bits−1)` buckets of
/// now; the key table's idle sweep frees entries long before that.
pub fn unpack_epoch(now_epoch: u64, stored: u32, bits: u32) -> u64 {
    let modulus = 1i64 << bits;
    let mask = (modulus - 1) as u64;
    let mut back = ((now_epoch & mask).wrapping_sub(u64::from(stored)) & mask) as i64;
    if back >= modulus / 2 {
        back -= modulus;
    }
    (now_epoch as i64).wrapping_sub(back) as u64
}

/// What happened to one merged slot value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The value was newer than what the grid held and is now counted.
    Applied,
    /// The value was already covered, or its bucket has expired.
    Stale,
    /// The bucket lies further in the future than the caller allows; nothing
    /// changed. A peer whose clock runs far ahead cannot wipe current counts.
    TooFarAhead,
}

/// Ring operations, written once for every [`SlotGrid`].
pub struct Ring;

impl Ring {
    fn row(spec: &WindowSpec, epoch: u64) -> usize {
        (epoch % spec.buckets as u64) as usize
    }

    /// Moves the ring forward to `epoch`, wiping the rows it passes.
    pub fn advance<G: SlotGrid + ?Sized>(grid: &mut G, spec: &WindowSpec, epoch: u64) {
        let newest = grid.newest(epoch);
        if epoch <= newest {
            return;
        }
        let steps = (epoch - newest).min(spec.buckets as u64);
        for e in (epoch + 1 - steps)..=epoch {
            grid.clear_row(Self::row(spec, e));
        }
        grid.set_newest(epoch);
    }

    /// True when the row of `epoch` currently holds that epoch's counts.
    fn holds(spec: &WindowSpec, newest: u64, epoch: u64) -> bool {
        epoch <= newest && newest - epoch < spec.buckets as u64
    }

    /// Fills `out` (one entry per bucket, oldest first) with the net counts
    /// seen at `now`. Counts in buckets ahead of `now`, written by a node whose
    /// clock runs ahead, are added to the current bucket: usage is never
    /// hidden by skew.
    pub fn read<G: SlotGrid + ?Sized>(grid: &G, spec: &WindowSpec, now: Nanos, out: &mut [u64]) {
        let b = spec.buckets();
        debug_assert_eq!(out.len(), b);
        // Per-row sums on the stack, cleared only as far as common windows
        // need (clearing all MAX_BUCKETS rows costs a 1 KiB memset a read).
        let mut few = [(0u64, 0u64); SMALL_RING];
        let mut many;
        let sums = if b <= SMALL_RING {
            &mut few[..b]
        } else {
            many = [(0u64, 0u64); MAX_BUCKETS];
            &mut many[..b]
        };
        let now_epoch = spec.epoch(now);
        let newest = grid.newest(now_epoch);
        grid.row_sums(sums);
        let net = |e: u64| {
            let (p, n) = sums[Self::row(spec, e)];
            p.saturating_sub(n)
        };
        // Bucket i (oldest first) is epoch now + 1 + i − b, in ring row
        // (now + 1 + i) mod b: the row steps by one, with no division.
        let mut row = Self::row(spec, now_epoch + 1);
        for (i, slot) in out.iter_mut().enumerate() {
            let e = (now_epoch + 1 + i as u64).checked_sub(b as u64);
            *slot = match e {
                Some(e) if Self::holds(spec, newest, e) => {
                    let (p, n) = sums[row];
                    p.saturating_sub(n)
                }
                _ => 0,
            };
            row += 1;
            if row == b {
                row = 0;
            }
        }
        if newest > now_epoch {
            let ahead: u64 = (now_epoch + 1..=newest)
                .filter(|&e| Self::holds(spec, newest, e))
                .map(net)
                .sum();
            out[b - 1] += ahead;
        }
    }

    /// Counts `hits` admitted now by the node owning `own`.
    pub fn add<G: SlotGrid + ?Sized>(
        grid: &mut G,
        spec: &WindowSpec,
        now: Nanos,
        own: NodeSlot,
        hits: u32,
    ) -> u64 {
        let epoch = Self::writable_epoch(grid, spec, now);
        let row = Self::row(spec, epoch);
        grid.add_p(row, own.index(), hits);
        epoch
    }

    /// The ring row of `epoch` when the grid's newest bucket is known to be
    /// `epoch`, the bucket of now (a key decided from its memo): where
    /// [`Ring::add`] would count, with no ring to move.
    #[inline]
    pub fn row_of_newest<G: SlotGrid + ?Sized>(grid: &G, spec: &WindowSpec, epoch: u64) -> usize {
        debug_assert_eq!(grid.newest(epoch), epoch);
        Self::row(spec, epoch)
    }

    /// Gives back up to `hits` of the bucket of `epoch` only (a provisional
    /// hit that its confirmation refused), never more than the bucket's
    /// merged net count. Returns how many were given back: none once the
    /// bucket has left the window.
    pub fn refund_epoch<G: SlotGrid + ?Sized>(
        grid: &mut G,
        spec: &WindowSpec,
        now: Nanos,
        own: NodeSlot,
        epoch: u64,
        hits: u32,
    ) -> u32 {
        let current = Self::writable_epoch(grid, spec, now);
        let newest = grid.newest(current);
        if !Self::holds(spec, newest, epoch) {
            return 0;
        }
        let row = Self::row(spec, epoch);
        let take = grid.row_net(row).min(u64::from(hits)) as u32;
        if take > 0 {
            let mut v = grid.get(row, own.index());
            v.n = v.n.saturating_add(take);
            grid.set(row, own.index(), v);
        }
        take
    }

    /// Where the bucket of `epoch` sits in what [`Ring::read`] returns at
    /// `now`: `None` once it has left the window; the newest position for a
    /// bucket ahead of the local clock (`read` counts those there).
    pub fn read_index(spec: &WindowSpec, now: Nanos, epoch: u64) -> Option<usize> {
        let b = spec.buckets() as u64;
        let now_epoch = spec.epoch(now);
        if epoch >= now_epoch {
            return Some(b as usize - 1);
        }
        let back = now_epoch - epoch;
        (back < b).then(|| (b - 1 - back) as usize)
    }

    /// The epoch a local write goes to: the current one, or the oldest live
    /// one if a far-ahead peer has already pushed the ring past it.
    fn writable_epoch<G: SlotGrid + ?Sized>(grid: &mut G, spec: &WindowSpec, now: Nanos) -> u64 {
        let epoch = spec.epoch(now);
        Self::advance(grid, spec, epoch);
        let newest = grid.newest(epoch);
        epoch.max((newest + 1).saturating_sub(spec.buckets as u64))
    }

    /// Gives back up to `hits`, newest bucket first, never more than a
    /// bucket's merged net count (hits that already expired cannot be
    /// refunded). Returns how many were given back.
    pub fn refund<G: SlotGrid + ?Sized>(
        grid: &mut G,
        spec: &WindowSpec,
        now: Nanos,
        own: NodeSlot,
        hits: u32,
    ) -> u32 {
        let current = Self::writable_epoch(grid, spec, now);
        let newest = grid.newest(current);
        let mut left = hits;
        let mut e = newest;
        while left > 0 && Self::holds(spec, newest, e) {
            let row = Self::row(spec, e);
            let take = grid.row_net(row).min(u64::from(left)) as u32;
            if take > 0 {
                let mut v = grid.get(row, own.index());
                v.n = v.n.saturating_add(take);
                grid.set(row, own.index(), v);
                left -= take;
            }
            if e == 0 {
                break;
            }
            e -= 1;
        }
        hits - left
    }

    /// Merges one slot value of bucket `epoch` received from a peer.
    /// `max_ahead` bounds how many buckets past the local current epoch a
    /// value may be (clock skew allowance).
    pub fn merge<G: SlotGrid + ?Sized>(
        grid: &mut G,
        spec: &WindowSpec,
        now: Nanos,
        max_ahead: u64,
        epoch: u64,
        slot: NodeSlot,
        value: PnSlot,
    ) -> MergeOutcome {
        let now_epoch = spec.epoch(now);
        if epoch > now_epoch.saturating_add(max_ahead) {
            return MergeOutcome::TooFarAhead;
        }
        let newest = grid.newest(now_epoch);
        if epoch > newest {
            Self::advance(grid, spec, epoch);
        } else if !Self::holds(spec, newest, epoch) {
            return MergeOutcome::Stale;
        }
        let row = Self::row(spec, epoch);
        let mut v = grid.get(row, slot.index());
        if v.covers(value) {
            return MergeOutcome::Stale;
        }
        v.merge(value);
        grid.set(row, slot.index(), v);
        MergeOutcome::Applied
    }

    /// Adds each slot's hits (`p`) over the live buckets at `now` into
    /// `out[slot]`: the traffic shares of a key.
    pub fn slot_hits<G: SlotGrid + ?Sized>(
        grid: &G,
        spec: &WindowSpec,
        now: Nanos,
        out: &mut [u64],
    ) {
        let live = Self::live_rows(grid, spec, now);
        let slots = grid.slot_count();
        grid.for_each_value(&mut |row, slot, v| {
            if live[row] && slot < slots {
                if let Some(total) = out.get_mut(slot) {
                    *total += u64::from(v.p);
                }
            }
        });
    }

    /// Adds each slot's net hits (`p − n`) over the live buckets at `now`
    /// into `out[slot]`: what each node counted of a key, less what it gave
    /// back.
    pub fn slot_nets<G: SlotGrid + ?Sized>(
        grid: &G,
        spec: &WindowSpec,
        now: Nanos,
        out: &mut [i64],
    ) {
        let live = Self::live_rows(grid, spec, now);
        let slots = grid.slot_count();
        grid.for_each_value(&mut |row, slot, v| {
            if live[row] && slot < slots {
                if let Some(total) = out.get_mut(slot) {
                    *total += i64::from(v.p) - i64::from(v.n);
                }
            }
        });
    }

    /// Clears slot `own` of every live bucket at `now` by raising its `p`
    /// and `n` to the larger of the two: its net count becomes zero while
    /// both components only grow, so no merge can undo it (a reset).
    /// Returns the net hits cleared.
    pub fn reset_slot<G: SlotGrid + ?Sized>(
        grid: &mut G,
        spec: &WindowSpec,
        now: Nanos,
        own: NodeSlot,
    ) -> u64 {
        let live = Self::live_rows(grid, spec, now);
        let mut cleared = 0;
        for (row, _) in live.iter().enumerate().filter(|(_, &l)| l) {
            let mut v = grid.get(row, own.index());
            if v.p == v.n {
                continue;
            }
            cleared += u64::from(v.p.saturating_sub(v.n));
            let top = v.p.max(v.n);
            v.p = top;
            v.n = top;
            grid.set(row, own.index(), v);
        }
        cleared
    }

    /// Which rows hold a live bucket at `now`.
    fn live_rows<G: SlotGrid + ?Sized>(
        grid: &G,
        spec: &WindowSpec,
        now: Nanos,
    ) -> [bool; MAX_BUCKETS] {
        let now_epoch = spec.epoch(now);
        let newest = grid.newest(now_epoch);
        let oldest = (now_epoch + 1).saturating_sub(spec.buckets() as u64);
        let mut live = [false; MAX_BUCKETS];
        for e in oldest..=newest.max(now_epoch) {
            if Self::holds(spec, newest, e) {
                live[Self::row(spec, e)] = true;
            }
        }
        live
    }

    /// True when nothing in the ring can count at `now` any more.
    pub fn is_idle<G: SlotGrid + ?Sized>(grid: &G, spec: &WindowSpec, now: Nanos) -> bool {
        let now_epoch = spec.epoch(now);
        let newest = grid.newest(now_epoch);
        newest + (spec.buckets as u64) <= now_epoch
    }

    /// The values of `slot` in the ring's live buckets at `now`, as the
    /// newest epoch and `(buckets back from it, value)` pairs, newest first,
    /// zero values left out: what replication ships of one slot.
    pub fn slot_column<G: SlotGrid + ?Sized>(
        grid: &G,
        spec: &WindowSpec,
        now: Nanos,
        slot: NodeSlot,
    ) -> (u64, Vec<(u64, PnSlot)>) {
        let newest = grid.newest(spec.epoch(now));
        let b = spec.buckets as u64;
        let column = (0..b.min(newest + 1))
            .filter_map(|back| {
                let v = grid.get(Self::row(spec, newest - back), slot.index());
                (v != PnSlot::ZERO).then_some((back, v))
            })
            .collect();
        (newest, column)
    }
}

/// An owned window: what gossip carries, what tests and the simulation
/// oracle hold. Same ring semantics as the key table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketWindow {
    spec: WindowSpec,
    slots: usize,
    newest: u64,
    rows: Vec<PnSlot>,
}

impl BucketWindow {
    /// An empty window of `slots` slots per bucket.
    pub fn new(spec: WindowSpec, slots: usize) -> Self {
        BucketWindow {
            spec,
            slots,
            newest: 0,
            rows: vec![PnSlot::ZERO; spec.buckets() * slots],
        }
    }
    /// The window's bucket layout.
    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }
    /// Counts `hits` admitted at `now` in slot `own` (see [`Ring::add`]).
    pub fn add(&mut self, now: Nanos, own: NodeSlot, hits: u32) {
        let spec = self.spec;
        Ring::add(self, &spec, now, own, hits);
    }
    /// Gives back up to `hits` of slot `own`, newest bucket first; returns
    /// how many (see [`Ring::refund`]).
    pub fn refund(&mut self, now: Nanos, own: NodeSlot, hits: u32) -> u32 {
        let spec = self.spec;
        Ring::refund(self, &spec, now, own, hits)
    }
    /// Merges a peer's value of `slot` in bucket `epoch` (see [`Ring::merge`]).
    pub fn merge(
        &mut self,
        now: Nanos,
        max_ahead: u64,
        epoch: u64,
        slot: NodeSlot,
        value: PnSlot,
    ) -> MergeOutcome {
        let spec = self.spec;
        Ring::merge(self, &spec, now, max_ahead, epoch, slot, value)
    }
    /// Fills `out` with the net counts seen at `now` (see [`Ring::read`]).
    pub fn read(&self, now: Nanos, out: &mut [u64]) {
        Ring::read(self, &self.spec, now, out)
    }
    /// Every live `(epoch, slot, value)` with a non-zero value: a full-state
    /// delta of this window.
    pub fn live_slots(&self) -> impl Iterator<Item = (u64, NodeSlot, PnSlot)> + '_ {
        let b = self.spec.buckets() as u64;
        let oldest = (self.newest + 1).saturating_sub(b);
        (oldest..=self.newest).flat_map(move |e| {
            let row = (e % b) as usize;
            (0..self.slots).filter_map(move |s| {
                let v = self.rows[row * self.slots + s];
                (v != PnSlot::ZERO).then_some((e, NodeSlot::new(s as u16), v))
            })
        })
    }
    /// Sum of all slots of the bucket of `epoch`, or zero if not held.
    pub fn bucket_sum(&self, epoch: u64) -> (u64, u64) {
        if !Ring::holds(&self.spec, self.newest, epoch) {
            return (0, 0);
        }
        let row = Ring::row(&self.spec, epoch);
        sum_slots(&self.rows[row * self.slots..(row + 1) * self.slots])
    }
}

impl SlotGrid for BucketWindow {
    fn slot_count(&self) -> usize {
        self.slots
    }
    fn get(&self, row: usize, slot: usize) -> PnSlot {
        if slot >= self.slots {
            return PnSlot::ZERO;
        }
        self.rows[row * self.slots + slot]
    }
    fn set(&mut self, row: usize, slot: usize, value: PnSlot) {
        if slot >= self.slots {
            // Owned windows grow to fit a new node's slot.
            let grown = slot + 1;
            let mut rows = vec![PnSlot::ZERO; self.spec.buckets() * grown];
            for r in 0..self.spec.buckets() {
                rows[r * grown..r * grown + self.slots]
                    .copy_from_slice(&self.rows[r * self.slots..(r + 1) * self.slots]);
            }
            self.rows = rows;
            self.slots = grown;
        }
        self.rows[row * self.slots + slot] = value;
    }
    fn newest(&self, _now_epoch: u64) -> u64 {
        self.newest
    }
    fn rows(&self) -> usize {
        self.spec.buckets()
    }
    fn set_newest(&mut self, epoch: u64) {
        self.newest = epoch;
    }
}

#[cfg(test)]
mod tests;
