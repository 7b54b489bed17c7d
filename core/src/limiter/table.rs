//! The key table of one limit: arenas of packed, sparse windows.
//!
//! Every tracked key owns one arena entry of 32-bit words:
//!
//! ```text
//! word 0      bit 0 lock; bits 1..32 newest bucket epoch (low 31 bits)
//! word 1      bits 0..14 hits not yet shipped to peers, bits 14..28 hits
//!             shipped but not yet acknowledged, bit 28 confirming (a peer
//!             asked to confirm a hit on this key: decide by confirmation
//!             until the limiter's deadline for it passes), bit 29 memo
//!             (the last two words hold the window's summary), bit 30
//!             dirty, bit 31 referenced (CLOCK)
//! words 2..4  key digest (0 = vacant)
//! words 4..   cells: the window's non-zero slot values ([`cells`]); with
//!             the memo bit, the last two words are the summary instead
//! ```
//!
//! The memo is what lets a hot key skip reading its window: a decision on
//! a window algorithm leaves the window's [`Summary`] (two counts) in the
//! free tail of the cell area, and the next decision in the same bucket
//! decides from it ([`RateAlgorithm::admit_summary`]) instead of walking
//! the cells. Every write to the entry drops the memo first (and zeroes its
//! words, so a growing cell list never reads them as cells); a decision
//! that counts a hit writes it back with the hit added. It is kept only
//! where a zero word still ends the cells before it.
//!
//! [`RateAlgorithm::admit_summary`]: crate::algorithm::RateAlgorithm::admit_summary
//!
//! Word 0 is the only word ever compared-and-swapped (to take the lock); every
//! other word, and word 0's epoch bits, change only under the lock.
//!
//! A window is `buckets × slots` slot values, but an entry stores only the
//! non-zero ones, one 32-bit cell per component (two for a value above
//! 131,071). Entries come in size classes: class `c` is `16 << c` words
//! (64 bytes, then 128, 256, …), one arena per class. A key starts in class
//! 0 (12 cell words: a one-second sliding window with precision 10 hit by
//! one node in every bucket fits) and moves to the next class, under its
//! lock, when a write does not fit; the largest class a table has holds
//! every slot of every bucket, so a write always fits somewhere. Memory per
//! key therefore follows what the key used, not the window's length times
//! the cluster's size. A key that grew stays in its class until it expires
//! or is evicted.
//!
//! The index maps digests to entry handles (class and entry number). An
//! entry is read and written only under its own lock, so concurrent hits on
//! one key are serialised by that key alone; decisions on different keys
//! share at most an index shard's read lock.
//!
//! The table never tracks more than `capacity` keys, and the node's
//! [`MemoryBudget`] caps the bytes of all tables together: when either is
//! reached a new key evicts an old one by the CLOCK algorithm (an
//! approximation of least recently used), preferring keys whose window has
//! already expired (a short sweep for idle keys runs before the hand moves).
//! Idle keys are swept back to a free list as their windows pass.
//!
//! Eviction never hands quota back: a live key's usage is recorded in a
//! fixed-size count-min sketch ([`EvictedSketch`]) as it goes, and a key that
//! comes back within its window starts from that estimate, never lower,
//! counted in this node's own slot at the newest bucket the sketch holds.

mod budget;
pub mod cells;
mod evicted;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::algorithm::Summary;
use crate::slot::{NodeSlot, PnSlot};
use crate::time::Nanos;
use crate::window::{unpack_epoch, Ring, SlotGrid, WindowSpec, MAX_BUCKETS};

pub use budget::{MemoryBudget, Reclaim};
pub use evicted::EvictedSketch;

use super::index::{DashMapIndex, KeyIndex};

const LOCK: u32 = 1;
const EPOCH_BITS: u32 = 31;
const INFLIGHT_BITS: u32 = 14;
const INFLIGHT_MASK: u32 = (1 << INFLIGHT_BITS) - 1;
const CONFIRMING: u32 = 1 << 28;
const MEMO: u32 = 1 << 29;
/// Words the memo takes at the end of the cell area.
const MEMO_WORDS: usize = 2;
const DIRTY: u32 = 1 << 30;
const REFERENCED: u32 = 1 << 31;
/// Most hits one key may have in flight (unacknowledged by peers) on one node.
pub const MAX_INFLIGHT: u32 = INFLIGHT_MASK;
const HEADER_WORDS: usize = 4;
/// Words of a class-0 entry: one 64-byte cache line.
const CLASS0_WORDS: usize = 16;
/// Bytes of class-0 entries allocated at a time; larger classes take fewer
/// entries per chunk (at least [`MIN_CHUNK_ENTRIES`]).
const CHUNK_ENTRIES: usize = 4096;
const MIN_CHUNK_ENTRIES: usize = 16;
const FREE_SHARDS: usize = 16;
/// Entries a full table looks at for idle keys before it evicts a live one.
const IDLE_SCAN: usize = 32;
/// No entry: see [`KeyTable::get_or_insert_hinted`]. Entry numbers stay
/// below `ENTRY_MASK`, so no handle is all ones.
pub const NO_HINT: u32 = u32::MAX;
/// Handles are `class << CLASS_SHIFT | entry`.
const CLASS_SHIFT: u32 = 27;
const ENTRY_MASK: u32 = (1 << CLASS_SHIFT) - 1;
/// What the index costs per key, counted against the memory budget: a
/// dashmap slot (digest and handle, 12 bytes, and a control byte) at its
/// load factor, which swings between 7/16 and 7/8 as the tables double
/// (`examples/memory_per_key.rs` measures 27.7 bytes at 1M keys, just
/// past a doubling).
pub const INDEX_BYTES_PER_KEY: usize = 20;
/// Most keys one insertion evicts to bring the node back within its budget.
const BUDGET_EVICTIONS_PER_INSERT: usize = 8;

/// Counts of what the table has done to stay within its capacity.
#[derive(Debug, Default)]
pub struct TableStats {
    /// Live keys pushed out to make room for new ones (by `max_keys`).
    pub evictions: AtomicU64,
    /// Live keys pushed out to bring the node within `max_memory`.
    pub memory_evictions: AtomicU64,
    /// Keys removed because their whole window had passed.
    pub expirations: AtomicU64,
    /// Keys that came back after an eviction and were given their recorded
    /// usage rather than a fresh budget.
    pub restored: AtomicU64,
    /// Keys moved to a larger size class.
    pub grown: AtomicU64,
}

/// The entries of one size class.
struct Arena {
    stride: usize,
    capacity: u32,
    chunk_entries: usize,
    /// log2 of `chunk_entries` and of `stride` (both powers of two): the
    /// hot path finds an entry with shifts, not divisions.
    chunk_shift: u32,
    stride_shift: u32,
    chunks: Box<[OnceLock<Box<[AtomicU32]>>]>,
    fresh: AtomicU32,
    free: [Mutex<Vec<u32>>; FREE_SHARDS],
    /// Entries holding a key (or being filled).
    in_use: AtomicU32,
    hand: AtomicU32,
    sweep_cursor: AtomicU32,
}

impl Arena {
    fn new(stride: usize, capacity: u32) -> Arena {
        let chunk_entries = (CHUNK_ENTRIES * CLASS0_WORDS / stride).max(MIN_CHUNK_ENTRIES);
        let chunks = (capacity as usize).div_ceil(chunk_entries);
        debug_assert!(stride.is_power_of_two() && chunk_entries.is_power_of_two());
        Arena {
            stride,
            capacity,
            chunk_entries,
            chunk_shift: chunk_entries.trailing_zeros(),
            stride_shift: stride.trailing_zeros(),
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            fresh: AtomicU32::new(0),
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            in_use: AtomicU32::new(0),
            hand: AtomicU32::new(0),
            sweep_cursor: AtomicU32::new(0),
        }
    }

    fn words(&self, entry: u32) -> &[AtomicU32] {
        let e = entry as usize;
        let ce = self.chunk_entries;
        let c = e >> self.chunk_shift;
        let chunk = self.chunks[c].get_or_init(|| {
            let words = ce.min(self.capacity as usize - c * ce) * self.stride;
            std::iter::repeat_with(|| AtomicU32::new(0))
                .take(words)
                .collect()
        });
        let at = (e & (ce - 1)) << self.stride_shift;
        &chunk[at..at + self.stride]
    }

    /// Entries ever handed out (the part of the arena that may hold keys).
    fn live(&self) -> u32 {
        self.fresh.load(Ordering::Relaxed).min(self.capacity)
    }

    fn pop_free(&self, key: u64) -> Option<u32> {
        let shard = (key as usize) % FREE_SHARDS;
        for i in 0..FREE_SHARDS {
            let popped = self.free[(shard + i) % FREE_SHARDS]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            if popped.is_some() {
                return popped;
            }
        }
        None
    }

    fn take_fresh(&self) -> Option<u32> {
        let fresh = self.fresh.fetch_add(1, Ordering::Relaxed);
        if fresh < self.capacity {
            return Some(fresh);
        }
        self.fresh.fetch_min(self.capacity, Ordering::Relaxed);
        None
    }

    fn push_free(&self, entry: u32) {
        self.free[(entry as usize) % FREE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }
}

fn handle(class: usize, entry: u32) -> u32 {
    ((class as u32) << CLASS_SHIFT) | entry
}
fn class_of(handle: u32) -> usize {
    (handle >> CLASS_SHIFT) as usize
}
fn entry_of(handle: u32) -> u32 {
    handle & ENTRY_MASK
}

/// The key table of one limit: a bounded set of keys, each with its
/// window of slot counters, read and written under a per-key lock. Full
/// tables evict by CLOCK and remember evicted usage in an
/// [`EvictedSketch`].
pub struct KeyTable<I: KeyIndex = DashMapIndex> {
    spec: WindowSpec,
    slots: usize,
    capacity: u32,
    classes: Box<[Arena]>,
    hand: AtomicU32,
    sweep_cursor: AtomicU32,
    index: I,
    stats: TableStats,
    /// Usage of evicted keys; allocated at the first eviction.
    evicted: OnceLock<EvictedSketch>,
    /// The slot restored usage is counted in: this node's own.
    home: NodeSlot,
    budget: Arc<MemoryBudget>,
    /// Bytes this table has charged to the budget.
    charged: AtomicUsize,
    /// The latest time a key was inserted at: what a key growing into a
    /// larger class (a write with no time of its own) takes as now.
    last_now: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
/// Why a key table could not be built.
pub enum TableError {
    #[error("a key table needs room for at least one key")]
    /// Room for no key at all.
    ZeroCapacity,
    #[error("a key table holds at most {} keys", ENTRY_MASK)]
    /// More keys than an entry handle can address.
    TooLarge,
    #[error("a cluster needs at least one node slot")]
    /// Zero slots per window.
    ZeroSlots,
}

impl<I: KeyIndex> KeyTable<I> {
    /// A table for windows of `spec` with `slots` node slots, holding at most
    /// `capacity` keys. Memory is taken a chunk at a time as keys arrive.
    pub fn new(spec: WindowSpec, slots: usize, capacity: usize) -> Result<Self, TableError> {
        if capacity == 0 {
            return Err(TableError::ZeroCapacity);
        }
        if capacity >= ENTRY_MASK as usize {
            return Err(TableError::TooLarge);
        }
        if slots == 0 {
            return Err(TableError::ZeroSlots);
        }
        let worst = cells::worst_words(spec.buckets(), slots) + HEADER_WORDS;
        let mut classes = Vec::new();
        loop {
            let stride = CLASS0_WORDS << classes.len();
            classes.push(Arena::new(stride, capacity as u32));
            if stride >= worst {
                break;
            }
        }
        Ok(KeyTable {
            spec,
            slots,
            capacity: capacity as u32,
            classes: classes.into_boxed_slice(),
            hand: AtomicU32::new(0),
            sweep_cursor: AtomicU32::new(0),
            index: I::with_capacity(capacity),
            stats: TableStats::default(),
            evicted: OnceLock::new(),
            home: NodeSlot::new(0),
            budget: Arc::new(MemoryBudget::unlimited()),
            charged: AtomicUsize::new(0),
            last_now: AtomicU64::new(0),
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

    /// Charges this table's memory to `budget` (shared by every table of a
    /// node) instead of an unlimited budget of its own. Call before any key
    /// is inserted; register the table with [`MemoryBudget::register`] so
    /// that other tables can ask it to give memory back.
    pub fn with_budget(mut self, budget: Arc<MemoryBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// The sketch of evicted keys' usage, once anything was evicted.
    pub fn evicted_sketch(&self) -> Option<&EvictedSketch> {
        self.evicted.get()
    }

    fn evicted(&self) -> &EvictedSketch {
        self.evicted.get_or_init(|| {
            let sketch = EvictedSketch::for_capacity(self.capacity as usize);
            self.charge(sketch.bytes());
            sketch
        })
    }

    /// The window layout of every key.
    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }
    /// Slots per bucket: the cluster size.
    pub fn slots(&self) -> usize {
        self.slots
    }
    /// Most keys tracked at once.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }
    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.index.len()
    }
    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
    /// Counters of evictions, expirations, restorations and growth.
    pub fn stats(&self) -> &TableStats {
        &self.stats
    }
    /// How many size classes the table has, and the words of the largest.
    pub fn classes(&self) -> (usize, usize) {
        (
            self.classes.len(),
            self.classes.last().map_or(0, |a| a.stride),
        )
    }
    /// Keys held in each size class, smallest first.
    pub fn keys_per_class(&self) -> Vec<u32> {
        self.classes
            .iter()
            .map(|a| a.in_use.load(Ordering::Relaxed))
            .collect()
    }

    /// Bytes this table counts against the node's memory budget: entries in
    /// use, the index at [`INDEX_BYTES_PER_KEY`] per key, and the evicted
    /// keys' sketch once there is one.
    pub fn bytes(&self) -> usize {
        self.charged.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) {
        self.charged.fetch_add(bytes, Ordering::Relaxed);
        self.budget.charge(bytes);
    }

    fn credit(&self, bytes: usize) {
        self.charged.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.credit(bytes);
    }

    fn entry_bytes(&self, class: usize) -> usize {
        self.classes[class].stride * 4
    }

    fn lock_words(words: &[AtomicU32]) {
        let mut spins = 0u32;
        loop {
            let cur = words[0].load(Ordering::Relaxed);
            if cur & LOCK == 0
                && words[0]
                    .compare_exchange_weak(cur, cur | LOCK, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn entry_at(&self, handle: u32) -> Entry<'_, I> {
        Entry {
            table: self,
            words: self.classes[class_of(handle)].words(entry_of(handle)),
            handle,
        }
    }

    fn lock_entry(&self, handle: u32) -> Entry<'_, I> {
        let e = self.entry_at(handle);
        Self::lock_words(e.words);
        e.set_flags(REFERENCED);
        e
    }

    fn try_lock_entry(&self, handle: u32) -> Option<Entry<'_, I>> {
        let words = self.classes[class_of(handle)].words(entry_of(handle));
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
            table: self,
            words,
            handle,
        })
    }

    /// Locks the entry of `key` if the key is tracked.
    pub fn get(&self, key: u64) -> Option<Entry<'_, I>> {
        let mut handle = self.index.get(key)?;
        loop {
            let e = self.lock_entry(handle);
            if e.key() == key {
                return Some(e);
            }
            drop(e);
            // The key may have moved to a larger class while we waited.
            match self.index.get(key) {
                Some(h) if h != handle => handle = h,
                _ => return None,
            }
        }
    }

    /// [`KeyTable::get_or_insert`] for a caller that remembers where it
    /// last found `key`: `hint` is that entry's handle ([`NO_HINT`] at
    /// first), tried before the index, and updated whenever the key is
    /// found elsewhere (it moved to a larger class, or was evicted and came
    /// back).
    #[inline]
    pub fn get_or_insert_hinted(&self, key: u64, now: Nanos, hint: &mut u32) -> Entry<'_, I> {
        if *hint != NO_HINT {
            let e = self.entry_at(*hint);
            Self::lock_words(e.words);
            if e.key() == key {
                e.set_flags(REFERENCED);
                return e;
            }
        }
        let e = self.get_or_insert(key, now);
        *hint = e.handle;
        e
    }

    /// Locks the entry of `key`, creating it (and making room) if needed.
    pub fn get_or_insert(&self, key: u64, now: Nanos) -> Entry<'_, I> {
        debug_assert_ne!(key, 0, "key digests are never zero");
        loop {
            if let Some(e) = self.get(key) {
                return e;
            }
            self.last_now.fetch_max(now.as_u64(), Ordering::Relaxed);
            self.relieve(now);
            self.make_room(now);
            let mut e = self.allocate(0, key, now);
            e.set_key(key);
            e.set_newest(self.spec.epoch(now));
            self.restore(&mut e, now);
            match self.index.insert_if_absent(key, e.handle) {
                Ok(()) => {
                    self.charge(INDEX_BYTES_PER_KEY);
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

    /// Makes room for one more key when the table holds `capacity`: an idle
    /// key if the sweep finds one, else a live one by CLOCK, taken from the
    /// size classes in turn.
    fn make_room(&self, now: Nanos) {
        if self.len() < self.capacity as usize {
            return;
        }
        if self.sweep(now, IDLE_SCAN) > 0 {
            return;
        }
        let n = self.classes.len();
        let start = self.hand.fetch_add(1, Ordering::Relaxed) as usize;
        let Some(class) = (0..n)
            .map(|i| (start + i) % n)
            .find(|&c| self.classes[c].in_use.load(Ordering::Relaxed) > 0)
        else {
            return;
        };
        let e = self.evict_in(class, now, false);
        self.release(e);
    }

    /// Brings the node back within its memory budget, if it is over, by
    /// evicting keys: from whichever registered table holds the most bytes,
    /// this one if none is registered.
    fn relieve(&self, now: Nanos) {
        for _ in 0..BUDGET_EVICTIONS_PER_INSERT {
            if !self.budget.over(self.entry_bytes(0) + INDEX_BYTES_PER_KEY) {
                return;
            }
            let freed = match self.budget.largest() {
                Some(t) => t.reclaim(now),
                None => self.reclaim(now),
            };
            if freed == 0 {
                return;
            }
        }
    }

    /// Gives a key that was evicted within its window the usage the sketch
    /// recorded for it (a fresh entry, locked, newest epoch = now's).
    fn restore(&self, e: &mut Entry<'_, I>, now: Nanos) {
        let Some(sketch) = self.evicted.get() else {
            return;
        };
        let now_epoch = self.spec.epoch(now);
        let buckets = self.spec.buckets() as u64;
        if let Some((epoch, count)) = sketch.estimate(e.key(), now_epoch, buckets) {
            let row = (epoch % buckets) as usize;
            let home = self.home.index();
            let mut v = e.get(row, home);
            v.p = v.p.max(count);
            e.set(row, home, v);
            e.set_restored(epoch, count);
            self.stats.restored.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns a locked, vacant entry of `class`.
    fn allocate(&self, class: usize, key: u64, now: Nanos) -> Entry<'_, I> {
        let e = self.allocate_quiet(class, key, now);
        self.classes[class].in_use.fetch_add(1, Ordering::Relaxed);
        self.charge(self.entry_bytes(class));
        e
    }

    fn allocate_quiet(&self, class: usize, key: u64, now: Nanos) -> Entry<'_, I> {
        let arena = &self.classes[class];
        if let Some(entry) = arena.pop_free(key) {
            return self.lock_entry(handle(class, entry));
        }
        // Room for another key, or this class still has fresh entries for
        // a key that grows into it: take a fresh one.
        if let Some(entry) = arena.take_fresh() {
            return self.lock_entry(handle(class, entry));
        }
        // Full: idle keys go before live ones.
        if self.sweep(now, IDLE_SCAN) > 0 {
            if let Some(entry) = arena.pop_free(key) {
                return self.lock_entry(handle(class, entry));
            }
        }
        let e = self.evict_in(class, now, false);
        self.classes[class].in_use.fetch_sub(1, Ordering::Relaxed);
        e
    }

    /// Records a live entry's usage in the sketch before it is evicted.
    fn remember(&self, e: &Entry<'_, I>, now: Nanos) {
        let mut nets = [0u64; MAX_BUCKETS];
        let nets = &mut nets[..self.spec.buckets()];
        Ring::read(e, &self.spec, now, nets);
        let mut count: u64 = nets.iter().sum();
        if count == 0 {
            return;
        }
        let now_epoch = self.spec.epoch(now);
        let buckets = self.spec.buckets() as u64;
        let sketch = self.evicted();
        // What this entry was given back from the sketch is still recorded
        // there (cells never fall while live): record only the key's own
        // hits since, or an over-count would feed on itself, every round of
        // a flood raising every colliding key's estimate.
        if let Some((epoch, given)) = e.restored(now_epoch) {
            if epoch + buckets > now_epoch {
                count = count.saturating_sub(u64::from(given));
            }
        }
        if count == 0 {
            return;
        }
        let newest = e.newest(now_epoch).min(now_epoch);
        sketch.record(e.key(), newest, count, now_epoch, buckets);
    }

    /// CLOCK over the entries of `class`: sweep the hand, clearing
    /// referenced bits, and take the first entry that was not used since the
    /// hand last passed. Returns it locked and vacant (still counted in use).
    fn evict_in(&self, class: usize, now: Nanos, for_memory: bool) -> Entry<'_, I> {
        let arena = &self.classes[class];
        let n = arena.live().max(1);
        let mut passes = 0u64;
        loop {
            let entry = arena.hand.fetch_add(1, Ordering::Relaxed) % n;
            passes += 1;
            let Some(mut e) = self.try_lock_entry(handle(class, entry)) else {
                if passes > 64 * u64::from(n) {
                    // Every entry is locked by someone else: wait for one.
                    let e = self.lock_entry(handle(class, entry));
                    drop(e);
                }
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
            if for_memory {
                self.stats.memory_evictions.fetch_add(1, Ordering::Relaxed);
                self.budget.note_eviction();
            } else {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
            return e;
        }
    }

    /// Removes a locked live entry from the index and wipes it.
    fn forget(&self, e: &mut Entry<'_, I>) {
        if self.index.remove_if(e.key(), e.handle) {
            self.credit(INDEX_BYTES_PER_KEY);
        }
        self.vacate(e);
    }

    fn vacate(&self, e: &mut Entry<'_, I>) {
        for w in &e.words[1..] {
            w.store(0, Ordering::Relaxed);
        }
        e.words[0].store(LOCK, Ordering::Relaxed);
    }

    /// Unlocks a vacant entry and puts it on its class's free list.
    fn release(&self, e: Entry<'_, I>) {
        let h = e.handle;
        drop(e);
        let class = class_of(h);
        self.classes[class].in_use.fetch_sub(1, Ordering::Relaxed);
        self.credit(self.entry_bytes(class));
        self.classes[class].push_free(entry_of(h));
    }

    /// Moves the locked entry `e` to the next size class that holds at
    /// least `words` cell words. The key keeps its lock throughout: the new
    /// entry is locked before the index points at it, and the old one is
    /// wiped before it is unlocked, so a thread that waited on the old entry
    /// finds it vacant and looks the key up again.
    fn grow<'t>(&'t self, e: &mut Entry<'t, I>, words: usize) {
        let from = class_of(e.handle);
        let Some(to) = (from + 1..self.classes.len())
            .find(|&c| self.classes[c].stride - HEADER_WORDS >= words)
        else {
            // Cannot happen: the largest class holds the worst case.
            return;
        };
        let key = e.key();
        let now = Nanos::new(self.last_now.load(Ordering::Relaxed));
        let new = self.allocate(to, key, now);
        for (dst, src) in new.words[1..].iter().zip(&e.words[1..]) {
            dst.store(src.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        new.words[0].store(e.words[0].load(Ordering::Relaxed) | LOCK, Ordering::Relaxed);
        self.index.replace(key, e.handle, new.handle);
        let old = std::mem::replace(e, new);
        let mut old = old;
        self.vacate(&mut old);
        self.release(old);
        self.stats.grown.fetch_add(1, Ordering::Relaxed);
    }

    /// Evicts one live key (or frees an idle one) to give memory back.
    /// Returns the bytes freed; 0 if the table holds no key.
    pub fn reclaim(&self, now: Nanos) -> usize {
        if self.is_empty() {
            return 0;
        }
        let before = self.bytes();
        // The largest class with keys in it frees the most per eviction.
        let Some(class) = (0..self.classes.len())
            .rev()
            .find(|&c| self.classes[c].in_use.load(Ordering::Relaxed) > 0)
        else {
            return 0;
        };
        let e = self.evict_in(class, now, true);
        self.release(e);
        before.saturating_sub(self.bytes())
    }

    /// Looks at up to `budget` entries and frees those whose window has passed.
    /// Returns how many were freed.
    pub fn sweep(&self, now: Nanos, budget: usize) -> usize {
        let mut freed = 0;
        for _ in 0..budget {
            let class =
                self.sweep_cursor.fetch_add(1, Ordering::Relaxed) as usize % self.classes.len();
            let arena = &self.classes[class];
            let live = arena.live();
            if live == 0 {
                continue;
            }
            let entry = arena.sweep_cursor.fetch_add(1, Ordering::Relaxed) % live;
            let Some(mut e) = self.try_lock_entry(handle(class, entry)) else {
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
    pub fn for_each(&self, mut f: impl FnMut(&mut Entry<'_, I>)) {
        for (class, arena) in self.classes.iter().enumerate() {
            for entry in 0..arena.live() {
                let mut e = self.lock_entry(handle(class, entry));
                if e.key() != 0 {
                    f(&mut e);
                }
            }
        }
    }
}

impl<I: KeyIndex> Drop for KeyTable<I> {
    fn drop(&mut self) {
        self.budget.credit(self.charged.load(Ordering::Relaxed));
    }
}

impl<I: KeyIndex + 'static> Reclaim for KeyTable<I> {
    fn bytes(&self) -> usize {
        KeyTable::bytes(self)
    }
    fn reclaim(&self, now: Nanos) -> usize {
        KeyTable::reclaim(self, now)
    }
}

/// A locked arena entry. Unlocks on drop.
pub struct Entry<'t, I: KeyIndex = DashMapIndex> {
    table: &'t KeyTable<I>,
    words: &'t [AtomicU32],
    handle: u32,
}

impl<I: KeyIndex> Entry<'_, I> {
    /// The window layout of the table this entry belongs to.
    pub fn spec(&self) -> WindowSpec {
        self.table.spec
    }
    /// The key digest this entry holds.
    pub fn key(&self) -> u64 {
        u64::from(self.words[2].load(Ordering::Relaxed))
            | (u64::from(self.words[3].load(Ordering::Relaxed)) << 32)
    }
    fn set_key(&mut self, key: u64) {
        self.words[2].store(key as u32, Ordering::Relaxed);
        self.words[3].store((key >> 32) as u32, Ordering::Relaxed);
    }
    fn cells(&self) -> &[AtomicU32] {
        &self.words[HEADER_WORDS..]
    }
    /// Words of cells this entry holds, and its size in bytes.
    pub fn footprint(&self) -> (usize, usize) {
        (cells::used(self.cells()), self.words.len() * 4)
    }
    fn restored(&self, now_epoch: u64) -> Option<(u64, u32)> {
        let (epoch, count) = cells::restored(self.cells())?;
        (count > 0).then(|| (unpack_epoch(now_epoch, epoch, 32), count))
    }
    fn set_restored(&mut self, epoch: u64, count: u32) {
        self.drop_memo();
        let need = cells::used(self.cells()) + cells::restored_cost(self.cells());
        if need > self.cells().len() {
            let table = self.table;
            table.grow(self, need);
        }
        cells::set_restored(self.cells(), epoch as u32, count);
    }
    fn meta(&self) -> u32 {
        self.words[1].load(Ordering::Relaxed)
    }
    /// The summary of the window that the last decision on this key left
    /// (see the module docs), if nothing has written to the key since and
    /// its newest bucket is `now_epoch`.
    #[inline]
    pub fn memo(&self, now_epoch: u64) -> Option<Summary> {
        if self.meta() & MEMO == 0 || self.newest(now_epoch) != now_epoch {
            return None;
        }
        let tail = &self.cells()[self.cells().len() - MEMO_WORDS..];
        Some(Summary {
            oldest: u64::from(tail[0].load(Ordering::Relaxed)),
            newer: u64::from(tail[1].load(Ordering::Relaxed)),
        })
    }
    /// Keeps `s`, the summary of the window as it stands now in bucket
    /// `now_epoch`, for the next decision: only if the newest bucket is
    /// `now_epoch`, both counts fit a word, and the cells leave a free word
    /// before the memo's two.
    #[inline]
    pub fn set_memo(&mut self, now_epoch: u64, s: Summary) {
        self.drop_memo();
        let (Ok(oldest), Ok(newer)) = (u32::try_from(s.oldest), u32::try_from(s.newer)) else {
            return;
        };
        let cells = self.cells();
        // A zero word (the end marker) between the cells and the memo.
        if self.newest(now_epoch) != now_epoch || cells::used(cells) + MEMO_WORDS >= cells.len() {
            return;
        }
        let tail = &cells[cells.len() - MEMO_WORDS..];
        tail[0].store(oldest, Ordering::Relaxed);
        tail[1].store(newer, Ordering::Relaxed);
        self.set_flags(MEMO);
    }
    /// Adds `hits` to the `p` value of `slot` in the newest bucket's `row`
    /// of a key decided from its memo, and makes the memo's newer count
    /// `newer`: one pass over the cells and one store when the cell is
    /// there and keeps its width (the cells use no more words, so the memo
    /// stays where it is). Otherwise a plain add, which drops the memo.
    #[inline]
    pub fn add_p_keeping_memo(&mut self, row: usize, slot: usize, hits: u32, newer: u64) {
        let in_place = self.meta() & MEMO != 0
            && slot < self.table.slots
            && row < self.table.spec.buckets()
            && cells::add_p_in_place(self.cells(), row, slot, hits);
        match u32::try_from(newer) {
            Ok(newer) if in_place => {
                let cells = self.cells();
                cells[cells.len() - 1].store(newer, Ordering::Relaxed);
            }
            _ if in_place => self.drop_memo(),
            _ => self.add_p(row, slot, hits),
        }
    }
    /// Forgets the memo before a write (see the module docs).
    #[inline]
    fn drop_memo(&self) {
        let m = self.meta();
        if m & MEMO != 0 {
            self.set_meta(m & !MEMO);
            for w in &self.cells()[self.cells().len() - MEMO_WORDS..] {
                w.store(0, Ordering::Relaxed);
            }
        }
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
}

impl<I: KeyIndex> SlotGrid for Entry<'_, I> {
    fn slot_count(&self) -> usize {
        self.table.slots
    }
    #[inline]
    fn get(&self, row: usize, slot: usize) -> PnSlot {
        if slot >= self.table.slots {
            return PnSlot::ZERO;
        }
        cells::get(self.cells(), row, slot)
    }
    #[inline]
    fn set(&mut self, row: usize, slot: usize, value: PnSlot) {
        self.drop_memo();
        // Slots beyond the table's width are refused by the caller (merge
        // validates slot numbers); dropping here keeps a bad value harmless.
        if slot >= self.table.slots || row >= self.table.spec.buckets() {
            return;
        }
        let need = cells::words_after_set(self.cells(), row, slot, value);
        if need > self.cells().len() {
            let table = self.table;
            table.grow(self, need);
            if need > self.cells().len() {
                return;
            }
        }
        cells::set(self.cells(), row, slot, value);
    }
    #[inline]
    fn add_p(&mut self, row: usize, slot: usize, hits: u32) {
        self.drop_memo();
        if slot < self.table.slots
            && row < self.table.spec.buckets()
            && cells::add_p_in_place(self.cells(), row, slot, hits)
        {
            return;
        }
        let mut v = self.get(row, slot);
        v.p = v.p.saturating_add(hits);
        self.set(row, slot, v);
    }
    fn rows(&self) -> usize {
        self.table.spec.buckets()
    }
    fn clear_row(&mut self, row: usize) {
        self.drop_memo();
        cells::clear_row(self.cells(), row);
    }
    fn row_net(&self, row: usize) -> u64 {
        let (mut p, mut n) = (0u64, 0u64);
        cells::for_each(self.cells(), |r, _, v| {
            if r == row {
                p += u64::from(v.p);
                n += u64::from(v.n);
            }
        });
        p.saturating_sub(n)
    }
    fn row_sums(&self, sums: &mut [(u64, u64)]) {
        cells::row_sums(self.cells(), sums);
    }
    fn for_each_value(&self, f: &mut dyn FnMut(usize, usize, PnSlot)) {
        cells::for_each(self.cells(), f);
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
        self.drop_memo();
        // Under the lock: keep the lock bit, replace the epoch bits.
        self.words[0].store(LOCK | ((epoch as u32) << 1), Ordering::Relaxed);
    }
}

impl<I: KeyIndex> Drop for Entry<'_, I> {
    fn drop(&mut self) {
        // Nobody else writes word 0 while it is locked (taking the lock
        // compares and swaps from an unlocked value, which fails), so a
        // plain release store unlocks: no second locked instruction.
        let w = self.words[0].load(Ordering::Relaxed);
        self.words[0].store(w & !LOCK, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::NodeSlot;

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
    fn a_new_key_is_one_cache_line_whatever_the_cluster_size() {
        for slots in [1, 3, 50, 64] {
            let t: KeyTable = KeyTable::new(
                WindowSpec::new(Nanos::from_secs(60), 61).unwrap(),
                slots,
                16,
            )
            .unwrap();
            let now = Nanos::from_secs(1_000_000);
            let mut e = t.get_or_insert(7, now);
            let spec = e.spec();
            Ring::add(&mut e, &spec, now, NodeSlot::new(slots as u16 - 1), 3);
            assert_eq!(e.footprint(), (1, 64), "{slots} slots");
            let mut out = [0u64; 61];
            Ring::read(&e, &spec, now, &mut out);
            assert_eq!(out.iter().sum::<u64>(), 3);
            drop(e);
            assert_eq!(t.bytes(), 64 + INDEX_BYTES_PER_KEY);
        }
    }

    #[test]
    fn the_memo_never_reads_as_cells_and_any_write_drops_it() {
        // 11 buckets × 3 slots: the cells outgrow class 0 and its tail.
        let t: KeyTable =
            KeyTable::new(WindowSpec::new(Nanos::from_secs(1), 11).unwrap(), 3, 4).unwrap();
        let now = Nanos::from_secs(1_000);
        let epoch = t.spec().epoch(now);
        let mut want = std::collections::BTreeMap::new();
        let memo = Summary {
            oldest: 4,
            newer: 77,
        };
        for (i, (row, slot)) in (0..11)
            .flat_map(|r| (0..3).map(move |s| (r, s)))
            .enumerate()
        {
            let mut e = t.get_or_insert(9, now);
            e.set_memo(epoch, memo);
            let room = cells::used(e.cells()) + MEMO_WORDS < e.cells().len();
            assert_eq!(e.memo(epoch), room.then_some(memo), "step {i}");
            assert_eq!(e.memo(epoch + 1), None, "a memo is for its bucket only");
            // Cells and memo side by side: every value reads back.
            for (&(r, s), &v) in &want {
                assert_eq!(e.get(r, s).p, v, "step {i}");
            }
            let v = 1 + i as u32 * 9_000; // wide from the 15th on
            e.set(row, slot, PnSlot { p: v, n: 0 });
            want.insert((row, slot), v);
            assert_eq!(e.memo(epoch), None, "a write drops the memo");
        }
        let e = t.get(9).unwrap();
        for (&(r, s), &v) in &want {
            assert_eq!(e.get(r, s).p, v);
        }
    }

    #[test]
    fn keys_grow_into_larger_classes_and_keep_every_value() {
        let spec = WindowSpec::new(Nanos::from_secs(1), 11).unwrap();
        let t: KeyTable = KeyTable::new(spec, 50, 64).unwrap();
        let now = Nanos::from_secs(1_000);
        let mut oracle = crate::window::BucketWindow::new(spec, 50);
        let epoch = spec.epoch(now);
        // Every slot of every bucket, values narrow and wide.
        for back in (0..11u64).rev() {
            for slot in 0..50u16 {
                let value = PnSlot {
                    p: if slot % 7 == 0 {
                        1 << 20
                    } else {
                        1 + u32::from(slot)
                    },
                    n: u32::from(slot % 3 == 0),
                };
                let e_epoch = epoch - back;
                let mut e = t.get_or_insert(42, now);
                Ring::merge(&mut e, &spec, now, 1, e_epoch, NodeSlot::new(slot), value);
                oracle.merge(now, 1, e_epoch, NodeSlot::new(slot), value);
            }
        }
        let mut out = vec![0u64; 11];
        let mut want = vec![0u64; 11];
        Ring::read(&t.get(42).unwrap(), &spec, now, &mut out);
        oracle.read(now, &mut want);
        assert_eq!(out, want);
        assert!(t.stats().grown.load(Ordering::Relaxed) >= 4);
        assert_eq!(t.len(), 1);
        assert_eq!(t.keys_per_class().iter().sum::<u32>(), 1);
        // Only the key's own class is charged, not the ones it passed.
        let (_, bytes) = t.get(42).unwrap().footprint();
        assert_eq!(t.bytes(), bytes + INDEX_BYTES_PER_KEY);
        // And it expires like any other key, giving its memory back.
        assert_eq!(t.sweep(now + Nanos::from_secs(12), 64), 1);
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_key_moving_to_a_larger_class_loses_no_concurrent_hit() {
        let spec = WindowSpec::new(Nanos::from_secs(1), 11).unwrap();
        let t: std::sync::Arc<KeyTable> = std::sync::Arc::new(KeyTable::new(spec, 8, 64).unwrap());
        let now = Nanos::from_secs(5_000);
        let threads: Vec<_> = (0..4u16)
            .map(|slot| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let at = now + Nanos::from_millis(i % 1000);
                        let mut e = t.get_or_insert(99, at);
                        // Slot and bucket spread so the key grows meanwhile.
                        let epoch = spec.epoch(now) - (i % 11);
                        let v = e.get((epoch % 11) as usize, usize::from(slot));
                        Ring::merge(
                            &mut e,
                            &spec,
                            now,
                            1,
                            epoch,
                            NodeSlot::new(slot),
                            PnSlot { p: v.p + 1, n: 0 },
                        );
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let mut out = vec![0u64; 11];
        Ring::read(&t.get(99).unwrap(), &spec, now, &mut out);
        assert_eq!(out.iter().sum::<u64>(), 8_000);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_memory_budget_evicts_across_tables_and_keeps_usage() {
        // The tables' eviction sketches (256 KiB each at this capacity) are
        // charged too, once there is one.
        const LIMIT: usize = 512 * 1024;
        let budget = std::sync::Arc::new(MemoryBudget::new(Some(LIMIT)));
        let spec = WindowSpec::new(Nanos::from_secs(1), 2).unwrap();
        let a = std::sync::Arc::new(
            KeyTable::<DashMapIndex>::new(spec, 3, 8000)
                .unwrap()
                .with_budget(budget.clone()),
        );
        let b = std::sync::Arc::new(
            KeyTable::<DashMapIndex>::new(spec, 3, 8000)
                .unwrap()
                .with_budget(budget.clone()),
        );
        budget.register(std::sync::Arc::downgrade(&a) as std::sync::Weak<dyn Reclaim>);
        budget.register(std::sync::Arc::downgrade(&b) as std::sync::Weak<dyn Reclaim>);
        let now = Nanos::from_secs(100);
        for key in 1..=7_000u64 {
            let mut e = a.get_or_insert(key, now);
            Ring::add(&mut e, &spec, now, NodeSlot::new(0), 2);
        }
        let per_key = 64 + INDEX_BYTES_PER_KEY;
        // A filled the budget; the sketch of what it evicted is charged too.
        assert!(budget.used() <= LIMIT + per_key, "{}", budget.used());
        assert!(a.len() < 7_000 && a.len() > 100, "{}", a.len());
        assert_eq!(
            a.stats().evictions.load(Ordering::Relaxed),
            0,
            "not by max_keys"
        );
        assert!(budget.evictions() > 0);
        let a_before = a.len();
        // B's new keys are paid for by A, which holds the most.
        for key in 1..=50u64 {
            drop(b.get_or_insert(key, now));
        }
        assert_eq!(b.len(), 50);
        assert!(a.len() < a_before);
        assert!(budget.used() <= LIMIT + per_key);
        // An evicted key of A comes back with its usage, not a fresh budget.
        assert!(hits(&a, 1, now) >= 2 || a.get(1).is_none());
        drop(a.get_or_insert(1, now));
        assert!(hits(&a, 1, now) >= 2, "{}", hits(&a, 1, now));
        // Dropping a table gives its bytes back.
        drop(a);
        assert_eq!(budget.used(), b.bytes());
        assert!(
            budget.used() <= 50 * per_key + 256 * 1024,
            "{}",
            budget.used()
        );
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
