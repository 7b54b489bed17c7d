//! A locked entry of a key table: the key's header words and its sparse
//! cells, read and written only under the entry's lock, and the window
//! storage ([`SlotGrid`]) the ring operations work on.
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

use std::sync::atomic::{AtomicU32, Ordering};

use super::cells;
use super::*;
use crate::key::KeyDigest;

/// A locked arena entry. Unlocks on drop.
pub struct Entry<'t, I: KeyIndex = DashMapIndex> {
    pub(super) table: &'t KeyTable<I>,
    pub(super) words: &'t [AtomicU32],
    pub(super) handle: u32,
}

impl<I: KeyIndex> Entry<'_, I> {
    /// The window layout of the table this entry belongs to.
    pub fn spec(&self) -> WindowSpec {
        self.table.spec
    }
    /// The key digest this entry holds.
    pub fn key(&self) -> KeyDigest {
        KeyDigest(self.raw_key())
    }
    /// The key digest as the table stores it (0 for a vacant entry).
    pub(super) fn raw_key(&self) -> u64 {
        u64::from(self.words[2].load(Ordering::Relaxed))
            | (u64::from(self.words[3].load(Ordering::Relaxed)) << 32)
    }
    pub(super) fn set_key(&mut self, key: u64) {
        self.words[2].store(key as u32, Ordering::Relaxed);
        self.words[3].store((key >> 32) as u32, Ordering::Relaxed);
    }
    pub(super) fn cells(&self) -> &[AtomicU32] {
        &self.words[HEADER_WORDS..]
    }
    /// Words of cells this entry holds, and its size in bytes.
    pub fn footprint(&self) -> (usize, usize) {
        (cells::used(self.cells()), self.words.len() * 4)
    }
    pub(super) fn restored(&self, now_epoch: u64) -> Option<(u64, u32)> {
        let (epoch, count) = cells::restored(self.cells())?;
        (count > 0).then(|| (unpack_epoch(now_epoch, epoch, 32), count))
    }
    pub(super) fn set_restored(&mut self, epoch: u64, count: u32) {
        self.drop_memo();
        let need = cells::used(self.cells()) + cells::restored_cost(self.cells());
        if need > self.cells().len() {
            let table = self.table;
            table.grow(self, need);
        }
        cells::set_restored(self.cells(), epoch as u32, count);
    }
    pub(super) fn meta(&self) -> u32 {
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
    pub(super) fn drop_memo(&self) {
        let m = self.meta();
        if m & MEMO != 0 {
            self.set_meta(m & !MEMO);
            for w in &self.cells()[self.cells().len() - MEMO_WORDS..] {
                w.store(0, Ordering::Relaxed);
            }
        }
    }
    pub(super) fn set_meta(&self, v: u32) {
        self.words[1].store(v, Ordering::Relaxed);
    }
    pub(super) fn set_flags(&self, flags: u32) {
        self.set_meta(self.meta() | flags);
    }
    pub(super) fn take_referenced(&mut self) -> bool {
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
