//! Making room and giving memory back: CLOCK eviction when a table (or
//! the node's memory budget) is full, the evicted sketch that keeps an
//! evicted key's usage, and the idle sweep that frees keys whose window
//! has passed.

use std::sync::atomic::Ordering;

use super::*;

impl<I: KeyIndex> KeyTable<I> {
    /// Makes room for one more key when the table holds `capacity`: an idle
    /// key if the sweep finds one, else a live one by CLOCK, taken from the
    /// size classes in turn.
    pub(super) fn make_room(&self, now: Nanos) {
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
    pub(super) fn relieve(&self, now: Nanos) {
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

    /// Records a live entry's usage in the sketch before it is evicted.
    pub(super) fn remember(&self, e: &Entry<'_, I>, now: Nanos) {
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
        sketch.record(e.raw_key(), newest, count, now_epoch, buckets);
    }

    /// CLOCK over the entries of `class`: sweep the hand, clearing
    /// referenced bits, and take the first entry that was not used since the
    /// hand last passed. Returns it locked and vacant (still counted in use).
    pub(super) fn evict_in(&self, class: usize, now: Nanos, for_memory: bool) -> Entry<'_, I> {
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
            if e.raw_key() == 0 {
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
    pub(super) fn forget(&self, e: &mut Entry<'_, I>) {
        if self.index.remove_if(e.raw_key(), e.handle) {
            self.credit(INDEX_BYTES_PER_KEY);
        }
        self.vacate(e);
    }

    pub(super) fn vacate(&self, e: &mut Entry<'_, I>) {
        for w in &e.words[1..] {
            w.store(0, Ordering::Relaxed);
        }
        e.words[0].store(LOCK, Ordering::Relaxed);
    }

    /// Unlocks a vacant entry and puts it on its class's free list.
    pub(super) fn release(&self, e: Entry<'_, I>) {
        let h = e.handle;
        drop(e);
        let class = class_of(h);
        self.classes[class].in_use.fetch_sub(1, Ordering::Relaxed);
        self.credit(self.entry_bytes(class));
        self.classes[class].push_free(entry_of(h));
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
            if e.raw_key() != 0 && Ring::is_idle(&e, &self.spec, now) {
                self.forget(&mut e);
                self.release(e);
                self.stats.expirations.fetch_add(1, Ordering::Relaxed);
                freed += 1;
            }
        }
        freed
    }
}
