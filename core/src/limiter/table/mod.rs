//! The key table of one limit: arenas of packed, sparse windows.
//!
//! Every tracked key owns one arena entry of 32-bit words: a header
//! (lock, epoch, in-flight counts, flags, key digest) and the window's
//! non-zero cells (layout and the memo of a hot key in [`entry`]).
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

mod arena;
mod budget;
pub mod cells;
pub mod entry;
mod evict;
mod evicted;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::algorithm::Summary;
use crate::key::KeyDigest;
use crate::slot::{NodeSlot, PnSlot, SLOT_SPACE};
use crate::time::Nanos;
use crate::window::{unpack_epoch, Ring, SlotGrid, WindowSpec, MAX_BUCKETS};

use arena::Arena;
pub use budget::{MemoryBudget, Reclaim};
pub use entry::Entry;
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
/// Entries of an arena's first chunk; each next chunk doubles (see
/// `arena`).
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
/// (`core/examples/memory_per_key.rs` measures 27.7 bytes at 1M keys, just
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
///
/// Laid out in declaration order, what a lookup reads first (a decision
/// over thousands of limits touches one table per limit).
#[repr(C)]
pub struct KeyTable<I: KeyIndex = DashMapIndex> {
    spec: WindowSpec,
    classes: Box<[Arena]>,
    slots: usize,
    capacity: u32,
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
    /// Bytes of the table before any key: charged to the budget as rules'
    /// memory while the table lives.
    fixed: usize,
    /// What the classes keys have used cost beyond their structs (their
    /// chunk and free lists), counted with `fixed` as the rules' memory.
    classes_used: AtomicUsize,
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
    #[error("a window has at most {} node slots, one per slot number", SLOT_SPACE)]
    /// More slots than there are slot numbers.
    TooManySlots,
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
        if slots > SLOT_SPACE {
            return Err(TableError::TooManySlots);
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
        let mut table = KeyTable {
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
            fixed: 0,
            classes_used: AtomicUsize::new(0),
        };
        // Every key starts in the first class: its lists are made now and
        // counted with the table; a larger class's when a key first needs it.
        table.classes[0].ensure_used();
        table.fixed = std::mem::size_of::<Self>()
            + table
                .classes
                .iter()
                .map(|_| std::mem::size_of::<Arena>())
                .sum::<usize>()
            + table.classes[0].used_overhead()
            + table.index.allocated_bytes();
        table.budget.charge_rules(table.fixed);
        Ok(table)
    }

    /// Bytes the table holds before any key (the table, its size classes'
    /// chunk lists, the index's first slots): counted as the rules' memory
    /// ([`MemoryBudget::rules_bytes`]).
    pub fn fixed_bytes(&self) -> usize {
        self.fixed + self.classes_used.load(Ordering::Relaxed)
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
        self.budget.credit_rules(self.fixed);
        budget.charge_rules(self.fixed);
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

    #[inline]
    fn lock_words(words: &[AtomicU32]) {
        let cur = words[0].load(Ordering::Relaxed);
        if cur & LOCK == 0
            && words[0]
                .compare_exchange_weak(cur, cur | LOCK, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        Self::lock_words_contended(words);
    }

    /// [`KeyTable::lock_words`] once the first try failed: spins, then
    /// yields.
    #[cold]
    #[inline(never)]
    fn lock_words_contended(words: &[AtomicU32]) {
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

    #[inline]
    fn entry_at(&self, handle: u32) -> Entry<'_, I> {
        Entry {
            table: self,
            words: self.classes[class_of(handle)].words(entry_of(handle)),
            handle,
        }
    }

    #[inline]
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
    pub fn get(&self, key: KeyDigest) -> Option<Entry<'_, I>> {
        self.get_raw(key.0)
    }

    #[inline]
    fn get_raw(&self, key: u64) -> Option<Entry<'_, I>> {
        let mut handle = self.index.get(key)?;
        loop {
            let e = self.lock_entry(handle);
            if e.raw_key() == key {
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
    pub fn get_or_insert_hinted(&self, key: KeyDigest, now: Nanos, hint: &mut u32) -> Entry<'_, I> {
        if *hint != NO_HINT {
            let e = self.entry_at(*hint);
            Self::lock_words(e.words);
            if e.raw_key() == key.0 {
                e.set_flags(REFERENCED);
                return e;
            }
        }
        let e = self.get_or_insert(key, now);
        *hint = e.handle;
        e
    }

    /// Locks the entry of `key`, creating it (and making room) if needed.
    pub fn get_or_insert(&self, key: KeyDigest, now: Nanos) -> Entry<'_, I> {
        let key = key.0;
        debug_assert_ne!(key, 0, "key digests are never zero");
        loop {
            if let Some(e) = self.get_raw(key) {
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

    /// Gives a key that was evicted within its window the usage the sketch
    /// recorded for it (a fresh entry, locked, newest epoch = now's).
    fn restore(&self, e: &mut Entry<'_, I>, now: Nanos) {
        let Some(sketch) = self.evicted.get() else {
            return;
        };
        let now_epoch = self.spec.epoch(now);
        let buckets = self.spec.buckets() as u64;
        if let Some((epoch, count)) = sketch.estimate(e.raw_key(), now_epoch, buckets) {
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
        if arena.ensure_used() {
            // A class's first entry: its chunk and free lists now exist.
            let bytes = arena.used_overhead();
            self.classes_used.fetch_add(bytes, Ordering::Relaxed);
            self.budget.charge_rules(bytes);
        }
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
        let key = e.raw_key();
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

    /// Visits every live entry (locking each in turn). For full-state sync
    /// and snapshots; not for the decision path.
    pub fn for_each(&self, mut f: impl FnMut(&mut Entry<'_, I>)) {
        for (class, arena) in self.classes.iter().enumerate() {
            for entry in 0..arena.live() {
                let mut e = self.lock_entry(handle(class, entry));
                if e.raw_key() != 0 {
                    f(&mut e);
                }
            }
        }
    }
}

impl<I: KeyIndex> Drop for KeyTable<I> {
    fn drop(&mut self) {
        self.budget.credit(self.charged.load(Ordering::Relaxed));
        self.budget
            .credit_rules(self.fixed + self.classes_used.load(Ordering::Relaxed));
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

#[cfg(test)]
mod tests;
