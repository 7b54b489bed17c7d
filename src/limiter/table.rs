//! The key table of one limit: a fixed-capacity arena of packed windows.
//!
//! Every tracked key owns one arena entry of `stride` 32-bit words:
//!
//! ```text
//! word 0      bit 0 lock; bits 1..32 newest bucket epoch (low 31 bits)
//! word 1      bits 0..14 hits not yet shipped to peers, bits 14..28 hits
//!             shipped but not yet acknowledged, bit 28 confirming (a peer
//!             asked to confirm a hit on this key: decide by confirmation
//!             until the limiter's deadline for it passes), bit 30 dirty,
//!             bit 31 referenced (CLOCK)
//! words 2..4  key digest (0 = vacant)
//! words 4..   buckets × slots × (p, n)
//! ```
//!
//! Word 0 is the only word ever compared-and-swapped (to take the lock); every
//! other word, and word 0's epoch bits, change only under the lock.
//!
//! For one sliding-window limit on a three-node cluster that is 16 words, one
//! cache line. The index maps digests to entry numbers. An entry is read and
//! written only under its own lock, so concurrent hits on one key are
//! serialised by that key alone; decisions on different keys share at most
//! an index shard's read lock.
//!
//! The arena never grows past `capacity`: when it is full a new key evicts an
//! old one by the CLOCK algorithm (an approximation of least recently used),
//! preferring keys whose window has already expired (a short sweep for idle
//! keys runs before the hand moves). Idle keys are swept back to a free list
//! as their windows pass.
//!
//! Eviction never hands quota back: a live key's usage is recorded in a
//! fixed-size count-min sketch ([`evicted`]) as it goes, and a key that
//! comes back within its window starts from that estimate, never lower,
//! counted in this node's own slot at the newest bucket the sketch holds.

mod evicted;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::core::slot::{NodeSlot, PnSlot};
use crate::core::time::Nanos;
use crate::core::window::{unpack_epoch, Ring, SlotGrid, WindowSpec, MAX_BUCKETS};

pub use evicted::EvictedSketch;

use super::index::{DashMapIndex, KeyIndex};

const LOCK: u32 = 1;
const EPOCH_BITS: u32 = 31;
const INFLIGHT_BITS: u32 = 14;
const INFLIGHT_MASK: u32 = (1 << INFLIGHT_BITS) - 1;
const CONFIRMING: u32 = 1 << 28;
const DIRTY: u32 = 1 << 30;
const REFERENCED: u32 = 1 << 31;
/// Most hits one key may have in flight (unacknowledged by peers) on one node.
pub const MAX_INFLIGHT: u32 = INFLIGHT_MASK;
const HEADER_WORDS: usize = 4;
const CHUNK_ENTRIES: usize = 4096;
const FREE_SHARDS: usize = 16;
/// Entries a full table looks at for idle keys before it evicts a live one.
const IDLE_SCAN: usize = 32;

/// Counts of what the table has done to stay within its capacity.
#[derive(Debug, Default)]
pub struct TableStats {
    /// Live keys pushed out to make room for new ones.
    pub evictions: AtomicU64,
    /// Keys removed because their whole window had passed.
    pub expirations: AtomicU64,
    /// Keys that came back after an eviction and were given their recorded
    /// usage rather than a fresh budget.
    pub restored: AtomicU64,
}

pub struct KeyTable<I: KeyIndex = DashMapIndex> {
    spec: WindowSpec,
    slots: usize,
    stride: usize,
    capacity: u32,
    chunks: Box<[OnceLock<Box<[AtomicU32]>>]>,
    fresh: AtomicU32,
    free: [Mutex<Vec<u32>>; FREE_SHARDS],
    hand: AtomicU32,
    sweep_cursor: AtomicU32,
    index: I,
    stats: TableStats,
    /// Usage of evicted keys; allocated at the first eviction.
    evicted: OnceLock<Evicted>,
    /// The slot restored usage is counted in: this node's own.
    home: NodeSlot,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("a key table needs room for at least one key")]
    ZeroCapacity,
    #[error("a key table holds at most {} keys", u32::MAX - 1)]
    TooLarge,
    #[error("a cluster needs at least one node slot")]
    ZeroSlots,
}

impl<I: KeyIndex> KeyTable<I> {
    /// A table for windows of `spec` with `slots` node slots, holding at most
    /// `capacity` keys. Memory is taken a chunk at a time as keys arrive.
    pub fn new(spec: WindowSpec, slots: usize, capacity: usize) -> Result<Self, TableError> {
        if capacity == 0 {
            return Err(TableError::ZeroCapacity);
        }
        if capacity >= u32::MAX as usize {
            return Err(TableError::TooLarge);
        }
        if slots == 0 {
            return Err(TableError::ZeroSlots);
        }
        let chunks = capacity.div_ceil(CHUNK_ENTRIES);
        Ok(KeyTable {
            spec,
            slots,
            stride: HEADER_WORDS + spec.buckets() * slots * 2,
            capacity: capacity as u32,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            fresh: AtomicU32::new(0),
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            hand: AtomicU32::new(0),
            sweep_cursor: AtomicU32::new(0),
            index: I::with_capacity(capacity),
            stats: TableStats::default(),
            evicted: OnceLock::new(),
            home: NodeSlot::new(0),
        })
    }

    /// Sets the slot that usage restored after an eviction is counted in
    /// (this node's own; slot 0 by default).
    pub fn with_home_slot(mut self, home: NodeSlot) -> Self {
        if home.index() < self.slots {
            self.home = home;
        }
        self
    }

    /// The sketch of evicted keys' usage, once anything was evicted.
    pub fn evicted_sketch(&self) -> Option<&EvictedSketch> {
        self.evicted.get().map(|e| &e.sketch)
    }

    fn evicted(&self) -> &Evicted {
        self.evicted.get_or_init(|| Evicted {
            sketch: EvictedSketch::for_capacity(self.capacity as usize),
            restored: (0..self.capacity).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }
    pub fn slots(&self) -> usize {
        self.slots
    }
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
    pub fn stats(&self) -> &TableStats {
        &self.stats
    }

    fn words(&self, entry: u32) -> &[AtomicU32] {
        let e = entry as usize;
        let chunk = self.chunks[e / CHUNK_ENTRIES].get_or_init(|| {
            let words = CHUNK_ENTRIES
                .min(self.capacity as usize - (e / CHUNK_ENTRIES) * CHUNK_ENTRIES)
                * self.stride;
            std::iter::repeat_with(|| AtomicU32::new(0))
                .take(words)
                .collect()
        });
        let at = (e % CHUNK_ENTRIES) * self.stride;
        &chunk[at..at + self.stride]
    }

    fn lock_entry(&self, entry: u32) -> Entry<'_> {
        let words = self.words(entry);
        let mut spins = 0u32;
        loop {
            let cur = words[0].load(Ordering::Relaxed);
            if cur & LOCK == 0
                && words[0]
                    .compare_exchange_weak(cur, cur | LOCK, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                let e = Entry {
                    words,
                    slots: self.slots,
                    entry,
                    spec: self.spec,
                };
                e.set_flags(REFERENCED);
                return e;
            }
            spins += 1;
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn try_lock_entry(&self, entry: u32) -> Option<Entry<'_>> {
        let words = self.words(entry);
        let cur = words[0].load(Ordering::Relaxed);
        let locked = cur & LOCK == 0
            && words[0]
                .compare_exchange(cur, cur | LOCK, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
        // An `Entry` unlocks when dropped, so one must exist only once the
        // lock is really ours.
        if !locked {
            return None;
        }
        Some(Entry {
            words,
            slots: self.slots,
            entry,
            spec: self.spec,
        })
    }

    /// Locks the entry of `key` if the key is tracked.
    pub fn get(&self, key: u64) -> Option<Entry<'_>> {
        let entry = self.index.get(key)?;
        let e = self.lock_entry(entry);
        (e.key() == key).then_some(e)
    }

    /// Locks the entry of `key`, creating it (and making room) if needed.
    pub fn get_or_insert(&self, key: u64, now: Nanos) -> Entry<'_> {
        debug_assert_ne!(key, 0, "key digests are never zero");
        loop {
            if let Some(e) = self.get(key) {
                return e;
            }
            let mut e = self.allocate(key, now);
            e.set_key(key);
            e.set_newest(self.spec.epoch(now));
            self.restore(&mut e, now);
            match self.index.insert_if_absent(key, e.entry) {
                Ok(()) => {
                    // Amortised expiry: every new key pays for looking at two old ones.
                    self.sweep(now, 2);
                    return e;
                }
                Err(_) => {
                    // Another thread created it first: give ours back, use theirs.
                    self.vacate(&mut e);
                    self.release(e);
                }
            }
        }
    }

    /// Gives a key that was evicted within its window the usage the sketch
    /// recorded for it (a fresh entry, locked, newest epoch = now's).
    fn restore(&self, e: &mut Entry<'_>, now: Nanos) {
        let Some(evicted) = self.evicted.get() else {
            return;
        };
        let now_epoch = self.spec.epoch(now);
        let buckets = self.spec.buckets() as u64;
        if let Some((epoch, count)) = evicted.sketch.estimate(e.key(), now_epoch, buckets) {
            let row = (epoch % buckets) as usize;
            let home = self.home.index();
            let mut v = e.get(row, home);
            v.p = v.p.max(count);
            e.set(row, home, v);
            evicted.restored[e.entry as usize]
                .store(pack_restored(epoch, count), Ordering::Relaxed);
            self.stats.restored.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn pop_free(&self, key: u64) -> Option<Entry<'_>> {
        let shard = (key as usize) % FREE_SHARDS;
        for i in 0..FREE_SHARDS {
            let popped = self.free[(shard + i) % FREE_SHARDS]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            if let Some(entry) = popped {
                return Some(self.lock_entry(entry));
            }
        }
        None
    }

    /// Returns a locked, vacant entry.
    fn allocate(&self, key: u64, now: Nanos) -> Entry<'_> {
        if let Some(e) = self.pop_free(key) {
            return e;
        }
        let fresh = self.fresh.fetch_add(1, Ordering::Relaxed);
        if fresh < self.capacity {
            return self.lock_entry(fresh);
        }
        self.fresh.fetch_min(self.capacity, Ordering::Relaxed);
        // Full: idle keys go before live ones.
        if self.sweep(now, IDLE_SCAN) > 0 {
            if let Some(e) = self.pop_free(key) {
                return e;
            }
        }
        self.evict(now)
    }

    /// Records a live entry's usage in the sketch before it is evicted.
    fn remember(&self, e: &Entry<'_>, now: Nanos) {
        let mut nets = [0u64; MAX_BUCKETS];
        let nets = &mut nets[..self.spec.buckets()];
        Ring::read(e, &self.spec, now, nets);
        let mut count: u64 = nets.iter().sum();
        if count == 0 {
            return;
        }
        let now_epoch = self.spec.epoch(now);
        let buckets = self.spec.buckets() as u64;
        let evicted = self.evicted();
        // What this entry was given back from the sketch is still recorded
        // there (cells never fall while live): record only the key's own
        // hits since, or an over-count would feed on itself, every round of
        // a flood raising every colliding key's estimate.
        let restored = evicted.restored[e.entry as usize].load(Ordering::Relaxed);
        if let Some((epoch, given)) = unpack_restored(restored, now_epoch) {
            if epoch + buckets > now_epoch {
                count = count.saturating_sub(u64::from(given));
            }
        }
        if count == 0 {
            return;
        }
        let newest = e.newest(now_epoch).min(now_epoch);
        evicted
            .sketch
            .record(e.key(), newest, count, now_epoch, buckets);
    }

    /// CLOCK: sweep the hand over live entries, clearing referenced bits, and
    /// take the first entry that was not used since the hand last passed.
    fn evict(&self, now: Nanos) -> Entry<'_> {
        let n = self.capacity;
        let mut passes = 0u64;
        loop {
            let entry = self.hand.fetch_add(1, Ordering::Relaxed) % n;
            passes += 1;
            let Some(mut e) = self.try_lock_entry(entry) else {
                continue;
            };
            if e.key() == 0 {
                // Vacant entries belong to the free list or to an allocation
                // under way elsewhere.
                drop(e);
                continue;
            }
            if Ring::is_idle(&e, &self.spec, now) {
                self.forget(&mut e);
                self.stats.expirations.fetch_add(1, Ordering::Relaxed);
                return e;
            }
            // After two full turns every bit has been cleared once: take it.
            if e.take_referenced() && passes < 2 * u64::from(n) {
                drop(e);
                continue;
            }
            self.remember(&e, now);
            self.forget(&mut e);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            return e;
        }
    }

    /// Removes a locked live entry from the index and wipes it.
    fn forget(&self, e: &mut Entry<'_>) {
        self.index.remove_if(e.key(), e.entry);
        self.vacate(e);
    }

    fn vacate(&self, e: &mut Entry<'_>) {
        for w in &e.words[1..] {
            w.store(0, Ordering::Relaxed);
        }
        if let Some(evicted) = self.evicted.get() {
            evicted.restored[e.entry as usize].store(0, Ordering::Relaxed);
        }
        e.words[0].store(LOCK, Ordering::Relaxed);
    }

    fn release(&self, e: Entry<'_>) {
        let entry = e.entry;
        drop(e);
        self.free[(entry as usize) % FREE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }

    /// Looks at up to `budget` entries and frees those whose window has passed.
    /// Returns how many were freed.
    pub fn sweep(&self, now: Nanos, budget: usize) -> usize {
        let live = self.fresh.load(Ordering::Relaxed).min(self.capacity);
        if live == 0 {
            return 0;
        }
        let mut freed = 0;
        for _ in 0..budget.min(live as usize) {
            let entry = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % live;
            let Some(mut e) = self.try_lock_entry(entry) else {
                continue;
            };
            if e.key() != 0 && Ring::is_idle(&e, &self.spec, now) {
                self.forget(&mut e);
                self.release(e);
                self.stats.expirations.fetch_add(1, Ordering::Relaxed);
                freed += 1;
            }
        }
        freed
    }

    /// Visits every live entry (locking each in turn). For full-state sync
    /// and snapshots; not for the decision path.
    pub fn for_each(&self, mut f: impl FnMut(&mut Entry<'_>)) {
        let live = self.fresh.load(Ordering::Relaxed).min(self.capacity);
        for entry in 0..live {
            let mut e = self.lock_entry(entry);
            if e.key() != 0 {
                f(&mut e);
            }
        }
    }
}

/// What a table keeps once it has evicted a live key: the sketch of evicted
/// keys' usage, and per arena entry what was restored into it from the
/// sketch (`epoch << 32 | count`, 0 for nothing), 8 bytes per entry.
struct Evicted {
    sketch: EvictedSketch,
    restored: Box<[AtomicU64]>,
}

fn pack_restored(epoch: u64, count: u32) -> u64 {
    ((epoch as u32 as u64) << 32) | u64::from(count)
}

fn unpack_restored(v: u64, now_epoch: u64) -> Option<(u64, u32)> {
    let count = v as u32;
    (count > 0).then(|| (unpack_epoch(now_epoch, (v >> 32) as u32, 32), count))
}

/// A locked arena entry. Unlocks on drop.
pub struct Entry<'t> {
    words: &'t [AtomicU32],
    slots: usize,
    entry: u32,
    spec: WindowSpec,
}

impl Entry<'_> {
    /// The window layout of the table this entry belongs to.
    pub fn spec(&self) -> WindowSpec {
        self.spec
    }
    pub fn key(&self) -> u64 {
        u64::from(self.words[2].load(Ordering::Relaxed))
            | (u64::from(self.words[3].load(Ordering::Relaxed)) << 32)
    }
    fn set_key(&mut self, key: u64) {
        self.words[2].store(key as u32, Ordering::Relaxed);
        self.words[3].store((key >> 32) as u32, Ordering::Relaxed);
    }
    fn meta(&self) -> u32 {
        self.words[1].load(Ordering::Relaxed)
    }
    fn set_meta(&self, v: u32) {
        self.words[1].store(v, Ordering::Relaxed);
    }
    fn set_flags(&self, flags: u32) {
        self.set_meta(self.meta() | flags);
    }
    fn take_referenced(&mut self) -> bool {
        let m = self.meta();
        self.set_meta(m & !REFERENCED);
        m & REFERENCED != 0
    }
    /// Marks the entry as changed locally; true if it was clean (so that the
    /// caller journals it once per shipping round).
    pub fn mark_dirty(&mut self) -> bool {
        let m = self.meta();
        self.set_meta(m | DIRTY);
        m & DIRTY == 0
    }
    /// Clears the dirty flag and says whether it was set.
    pub fn take_dirty(&mut self) -> bool {
        let m = self.meta();
        self.set_meta(m & !DIRTY);
        m & DIRTY != 0
    }
    /// Marks the key as under confirmation: decisions on it wait for the
    /// peers' answers until the limiter's deadline for it passes.
    pub fn set_confirming(&mut self, on: bool) {
        let m = self.meta();
        self.set_meta(if on { m | CONFIRMING } else { m & !CONFIRMING });
    }
    /// See [`Entry::set_confirming`].
    pub fn is_confirming(&self) -> bool {
        self.meta() & CONFIRMING != 0
    }
    /// Hits admitted here that peers have not yet acknowledged.
    pub fn inflight(&self) -> u32 {
        let m = self.meta();
        (m & INFLIGHT_MASK) + ((m >> INFLIGHT_BITS) & INFLIGHT_MASK)
    }
    /// Records hits admitted here, not yet shipped. Saturates at
    /// [`MAX_INFLIGHT`]; callers cap admissions well below it.
    pub fn add_unshipped(&mut self, hits: u32) {
        let m = self.meta();
        let unshipped = ((m & INFLIGHT_MASK) + hits).min(INFLIGHT_MASK);
        self.set_meta((m & !INFLIGHT_MASK) | unshipped);
    }
    /// Moves the unshipped hits to shipped-but-unacknowledged and returns
    /// how many moved.
    pub fn ship(&mut self) -> u32 {
        let m = self.meta();
        let unshipped = m & INFLIGHT_MASK;
        let unacked = (((m >> INFLIGHT_BITS) & INFLIGHT_MASK) + unshipped).min(INFLIGHT_MASK);
        self.set_meta(
            (m & !(INFLIGHT_MASK | (INFLIGHT_MASK << INFLIGHT_BITS))) | (unacked << INFLIGHT_BITS),
        );
        unshipped
    }
    /// Settles `hits` shipped hits that every peer that must know them has
    /// acknowledged.
    pub fn settle(&mut self, hits: u32) {
        let m = self.meta();
        let unacked = ((m >> INFLIGHT_BITS) & INFLIGHT_MASK).saturating_sub(hits);
        self.set_meta((m & !(INFLIGHT_MASK << INFLIGHT_BITS)) | (unacked << INFLIGHT_BITS));
    }
    fn at(&self, row: usize, slot: usize) -> usize {
        HEADER_WORDS + (row * self.slots + slot) * 2
    }
}

impl SlotGrid for Entry<'_> {
    fn slot_count(&self) -> usize {
        self.slots
    }
    #[inline]
    fn get(&self, row: usize, slot: usize) -> PnSlot {
        if slot >= self.slots {
            return PnSlot::ZERO;
        }
        let at = self.at(row, slot);
        PnSlot {
            p: self.words[at].load(Ordering::Relaxed),
            n: self.words[at + 1].load(Ordering::Relaxed),
        }
    }
    #[inline]
    fn set(&mut self, row: usize, slot: usize, value: PnSlot) {
        // Slots beyond the table's width are refused by the caller (merge
        // validates slot numbers); dropping here keeps a bad value harmless.
        if slot >= self.slots {
            return;
        }
        let at = self.at(row, slot);
        self.words[at].store(value.p, Ordering::Relaxed);
        self.words[at + 1].store(value.n, Ordering::Relaxed);
    }
    #[inline]
    fn newest(&self, now_epoch: u64) -> u64 {
        unpack_epoch(
            now_epoch,
            self.words[0].load(Ordering::Relaxed) >> 1,
            EPOCH_BITS,
        )
    }
    fn set_newest(&mut self, epoch: u64) {
        // Under the lock: keep the lock bit, replace the epoch bits.
        self.words[0].store(LOCK | ((epoch as u32) << 1), Ordering::Relaxed);
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.words[0].fetch_and(!LOCK, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::slot::NodeSlot;

    fn table(capacity: usize) -> KeyTable {
        KeyTable::new(
            WindowSpec::new(Nanos::from_secs(1), 2).unwrap(),
            3,
            capacity,
        )
        .unwrap()
    }

    fn hits(t: &KeyTable, key: u64, now: Nanos) -> u64 {
        let mut out = [0u64; 2];
        match t.get(key) {
            Some(e) => Ring::read(&e, t.spec(), now, &mut out),
            None => return 0,
        }
        out.iter().sum()
    }

    #[test]
    fn a_three_node_sliding_window_entry_is_one_cache_line() {
        assert_eq!(table(1).stride * 4, 64);
    }

    #[test]
    fn keys_keep_their_own_counts() {
        let t = table(16);
        let now = Nanos::from_secs(100);
        for key in 1..=5u64 {
            let mut e = t.get_or_insert(key, now);
            Ring::add(
                &mut e,
                &WindowSpec::new(Nanos::from_secs(1), 2).unwrap(),
                now,
                NodeSlot::new(1),
                key as u32,
            );
        }
        for key in 1..=5u64 {
            assert_eq!(hits(&t, key, now), key);
        }
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn a_full_table_evicts_instead_of_growing() {
        let t = table(8);
        let spec = *t.spec();
        let now = Nanos::from_secs(100);
        for key in 1..=100u64 {
            let mut e = t.get_or_insert(key, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
        }
        assert!(t.len() <= 8, "{} keys tracked", t.len());
        assert!(t.stats().evictions.load(Ordering::Relaxed) >= 92);
        // The newest key survived.
        assert_eq!(hits(&t, 100, now), 1);
    }

    #[test]
    fn an_evicted_key_comes_back_with_its_usage_not_a_fresh_budget() {
        let t = table(64);
        let spec = *t.spec();
        let now = Nanos::from_secs(100);
        let victim = 0xdead_beef;
        {
            let mut e = t.get_or_insert(victim, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 9);
        }
        // A flood of new keys, each hit once, pushes the victim out.
        for key in 1..=1_000u64 {
            let mut e = t.get_or_insert(key, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
        }
        assert!(t.get(victim).is_none(), "the victim was evicted");
        assert!(t.stats().evictions.load(Ordering::Relaxed) > 0);
        drop(t.get_or_insert(victim, now));
        assert!(hits(&t, victim, now) >= 9, "{}", hits(&t, victim, now));
        assert!(t.stats().restored.load(Ordering::Relaxed) >= 1);
        // Once its window has passed the key owes nothing.
        let later = Nanos::from_secs(103);
        for key in 2_000..2_100u64 {
            drop(t.get_or_insert(key, later));
        }
        drop(t.get(victim));
        let fresh = 0x1234_5678;
        drop(t.get_or_insert(fresh, later));
        assert_eq!(hits(&t, fresh, later), 0);
    }

    #[test]
    fn restored_estimates_do_not_feed_on_themselves() {
        // A flood far larger than the sketch: every fresh key collides with
        // evicted ones. Each key was hit once, so no estimate may exceed 1
        // however many rounds of eviction and restoring go by.
        let t = table(64);
        let spec = *t.spec();
        let now = Nanos::from_secs(100);
        for key in 1..=20_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut e = t.get_or_insert(key, now);
            let before = {
                let mut out = [0u64; 2];
                Ring::read(&e, &spec, now, &mut out);
                out.iter().sum::<u64>()
            };
            assert!(before <= 1, "a fresh key starts at {before}");
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
        }
        assert!(t.stats().restored.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_full_table_frees_idle_keys_before_live_ones() {
        let t = table(8);
        let spec = *t.spec();
        let old = Nanos::from_secs(100);
        for key in 1..=4u64 {
            let mut e = t.get_or_insert(key, old);
            Ring::add(&mut e, &spec, old, NodeSlot::new(0), 1);
        }
        let now = Nanos::from_secs(103);
        for key in 5..=8u64 {
            let mut e = t.get_or_insert(key, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
        }
        for key in 9..=12u64 {
            drop(t.get_or_insert(key, now));
        }
        for key in 5..=8u64 {
            assert_eq!(hits(&t, key, now), 1, "live key {key} was kept");
        }
        assert_eq!(t.stats().evictions.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn expired_keys_are_swept_and_their_entries_reused() {
        let t = table(4);
        let spec = *t.spec();
        let now = Nanos::from_secs(100);
        for key in 1..=4u64 {
            let mut e = t.get_or_insert(key, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
        }
        let later = Nanos::from_secs(103);
        assert_eq!(t.sweep(later, 10), 4);
        assert!(t.is_empty());
        let _ = t.get_or_insert(77, later);
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().evictions.load(Ordering::Relaxed), 0);
        assert_eq!(t.stats().expirations.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn inflight_hits_move_from_unshipped_to_settled() {
        let t = table(4);
        let mut e = t.get_or_insert(9, Nanos::from_secs(100));
        e.add_unshipped(3);
        assert_eq!(e.inflight(), 3);
        assert_eq!(e.ship(), 3);
        e.add_unshipped(2);
        assert_eq!(e.inflight(), 5);
        e.settle(3);
        assert_eq!(e.inflight(), 2);
        e.settle(10);
        assert_eq!(e.inflight(), 2, "unshipped hits cannot be settled");
        assert!(e.mark_dirty());
        assert!(!e.mark_dirty());
        assert!(e.take_dirty());
        e.set_confirming(true);
        assert!(e.is_confirming());
        assert_eq!(e.inflight(), 2, "flags leave the counters alone");
        e.set_confirming(false);
        assert!(!e.is_confirming());
        e.add_unshipped(MAX_INFLIGHT);
        assert!(!e.is_confirming(), "saturated counters stay in their bits");
    }

    #[test]
    fn epochs_survive_the_lock_bit() {
        let t = table(4);
        let spec = *t.spec();
        let now = Nanos::from_secs(1 << 33);
        let mut e = t.get_or_insert(5, now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(2), 4);
        drop(e);
        assert_eq!(hits(&t, 5, now), 4);
        assert_eq!(hits(&t, 5, now + Nanos::from_secs(1)), 4);
        assert_eq!(hits(&t, 5, now + Nanos::from_secs(2)), 0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let spec = WindowSpec::new(Nanos::from_secs(1), 2).unwrap();
        assert_eq!(
            KeyTable::<DashMapIndex>::new(spec, 3, 0).err(),
            Some(TableError::ZeroCapacity)
        );
        assert_eq!(
            KeyTable::<DashMapIndex>::new(spec, 0, 1).err(),
            Some(TableError::ZeroSlots)
        );
    }
}
