//! The entries of one size class of a key table: fixed-stride runs of
//! 32-bit words in lazily allocated chunks, a free list and the CLOCK hand.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{CHUNK_ENTRIES, CLASS0_WORDS, FREE_SHARDS, MIN_CHUNK_ENTRIES};

/// The entries of one size class.
pub(super) struct Arena {
    pub(super) stride: usize,
    pub(super) capacity: u32,
    pub(super) chunk_entries: usize,
    /// log2 of `chunk_entries` and of `stride` (both powers of two): the
    /// hot path finds an entry with shifts, not divisions.
    pub(super) chunk_shift: u32,
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

    pub(super) fn words(&self, entry: u32) -> &[AtomicU32] {
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
