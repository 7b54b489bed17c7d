//! The entries of one size class of a key table: fixed-stride runs of
//! 32-bit words in lazily allocated chunks, a free list and the CLOCK hand.
//!
//! Chunks double: chunk `k` holds `MIN_CHUNK_ENTRIES << k` entries, so a
//! table that tracks a handful of keys holds a handful of entries (a rule
//! set of thousands of limits costs kilobytes per limit, not a chunk of
//! thousands of entries each), and one that grows allocates as a vector
//! does, with at most half its entries unused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{FREE_SHARDS, MIN_CHUNK_ENTRIES};

/// The entries of one size class. Laid out in declaration order: what
/// finding an entry reads (stride, shifts, chunk list) shares the first
/// cache line, ahead of the free lists (a decision over thousands of limits
/// touches one arena per limit).
#[repr(C)]
pub(super) struct Arena {
    pub(super) stride: usize,
    pub(super) capacity: u32,
    /// log2 of the first chunk's entries and of `stride` (both powers of
    /// two): the hot path finds an entry with shifts, not divisions.
    pub(super) base_shift: u32,
    pub(super) stride_shift: u32,
    pub(super) chunks: Box<[OnceLock<Box<[AtomicU32]>>]>,
    pub(super) fresh: AtomicU32,
    pub(super) free: [Mutex<Vec<u32>>; FREE_SHARDS],
    /// Entries holding a key (or being filled).
    pub(super) in_use: AtomicU32,
    pub(super) hand: AtomicU32,
    pub(super) sweep_cursor: AtomicU32,
}

impl Arena {
    pub(super) fn new(stride: usize, capacity: u32) -> Arena {
        debug_assert!(stride.is_power_of_two() && MIN_CHUNK_ENTRIES.is_power_of_two());
        let base_shift = MIN_CHUNK_ENTRIES.trailing_zeros();
        // Chunks 0..k hold `MIN_CHUNK_ENTRIES * (2^k − 1)` entries.
        let mut chunks = 0;
        while ((1usize << chunks) - 1) << base_shift < capacity as usize {
            chunks += 1;
        }
        Arena {
            stride,
            capacity,
            base_shift,
            stride_shift: stride.trailing_zeros(),
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            fresh: AtomicU32::new(0),
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            in_use: AtomicU32::new(0),
            hand: AtomicU32::new(0),
            sweep_cursor: AtomicU32::new(0),
        }
    }

    #[inline]
    pub(super) fn words(&self, entry: u32) -> &[AtomicU32] {
        let e = entry as usize;
        // Chunk k starts at entry `(2^k − 1) << base_shift`.
        let q = (e >> self.base_shift) + 1;
        let k = (usize::BITS - 1 - q.leading_zeros()) as usize;
        let start = ((1usize << k) - 1) << self.base_shift;
        let chunk = self.chunks[k].get_or_init(|| {
            let entries =
                (1usize << (k as u32 + self.base_shift)).min(self.capacity as usize - start);
            std::iter::repeat_with(|| AtomicU32::new(0))
                .take(entries << self.stride_shift)
                .collect()
        });
        let at = (e - start) << self.stride_shift;
        &chunk[at..at + self.stride]
    }

    /// Entries ever handed out (the part of the arena that may hold keys).
    pub(super) fn live(&self) -> u32 {
        self.fresh.load(Ordering::Relaxed).min(self.capacity)
    }

    pub(super) fn pop_free(&self, key: u64) -> Option<u32> {
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

    pub(super) fn take_fresh(&self) -> Option<u32> {
        let fresh = self.fresh.fetch_add(1, Ordering::Relaxed);
        if fresh < self.capacity {
            return Some(fresh);
        }
        self.fresh.fetch_min(self.capacity, Ordering::Relaxed);
        None
    }

    pub(super) fn push_free(&self, entry: u32) {
        self.free[(entry as usize) % FREE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }
}
