//! The entries of one size class of a key table: fixed-stride runs of
//! 32-bit words in lazily allocated chunks, a free list and the CLOCK hand.
//!
//! Chunks double: chunk `k` holds `MIN_CHUNK_ENTRIES << k` entries, so a
//! table that tracks a handful of keys holds a handful of entries (a rule
//! set of thousands of limits costs kilobytes per limit, not a chunk of
//! thousands of entries each), and one that grows allocates as a vector
//! does, with at most half its entries unused.
//!
//! A class no key has used costs its struct only: the chunk list and the
//! free lists are made on its first entry. A node's tables span the whole
//! slot space, so their ladder of classes reaches sizes no key will need
//! (every bucket of every one of 65,536 slots); those classes stay empty.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{FREE_SHARDS, MIN_CHUNK_ENTRIES};

/// One chunk of entries, allocated when first reached.
pub(super) type Chunk = OnceLock<Box<[AtomicU32]>>;

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
    /// The chunk list, made on the class's first entry (`chunk_count`
    /// chunks, each allocated when first reached).
    pub(super) chunks: OnceLock<Box<[Chunk]>>,
    pub(super) chunk_count: usize,
    pub(super) fresh: AtomicU32,
    /// Entries given back, sharded; made on the first one.
    pub(super) free: OnceLock<Box<[Mutex<Vec<u32>>; FREE_SHARDS]>>,
    /// Entries holding a key (or being filled).
    pub(super) in_use: AtomicU32,
    pub(super) hand: AtomicU32,
    pub(super) sweep_cursor: AtomicU32,
}

impl Arena {
    /// What the lazily made parts of a class cost once it is used: its
    /// chunk list and its free lists (their headers; entries are charged
    /// one by one as they are taken).
    pub(super) fn used_overhead(&self) -> usize {
        self.chunk_count * std::mem::size_of::<Chunk>()
            + std::mem::size_of::<[Mutex<Vec<u32>>; FREE_SHARDS]>()
    }

    /// Makes the chunk list and free lists if this is the class's first
    /// use; true when it was (the caller charges [`Arena::used_overhead`]).
    pub(super) fn ensure_used(&self) -> bool {
        let mut made = false;
        self.chunks.get_or_init(|| {
            made = true;
            self.empty_chunks()
        });
        self.free
            .get_or_init(|| Box::new(std::array::from_fn(|_| Mutex::new(Vec::new()))));
        made
    }

    /// The chunk list, made on first use.
    fn chunk_list(&self) -> &[Chunk] {
        self.chunks.get_or_init(|| self.empty_chunks())
    }

    fn empty_chunks(&self) -> Box<[Chunk]> {
        (0..self.chunk_count).map(|_| OnceLock::new()).collect()
    }

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
            chunks: OnceLock::new(),
            chunk_count: chunks,
            fresh: AtomicU32::new(0),
            free: OnceLock::new(),
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
        let chunk = self.chunk_list()[k].get_or_init(|| {
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
        let free = self.free.get()?;
        let shard = (key as usize) % FREE_SHARDS;
        for i in 0..FREE_SHARDS {
            let popped = free[(shard + i) % FREE_SHARDS]
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
        let free = self
            .free
            .get_or_init(|| Box::new(std::array::from_fn(|_| Mutex::new(Vec::new()))));
        free[(entry as usize) % FREE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }
}
