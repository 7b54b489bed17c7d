//! What a key table remembers of the keys it evicted: a count-min sketch of
//! their usage, so that an evicted key never comes back with a fresh budget.
//!
//! Each cell packs the newest bucket epoch it has seen (low 32 bits) and a
//! count. Recording a key raises its `DEPTH` cells to at least its count
//! and epoch ("conservative update"); estimating takes the smallest live
//! cell. Both only ever grow while live, so an estimate is never lower than
//! the key's true usage at eviction nor placed in an older bucket: a key can
//! come back over-counted (it shares cells with others), never under-counted.
//! A cell whose window has passed reads as empty. Keys are secret-seeded
//! digests, so nobody outside the cluster can aim keys at a victim's cells.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::window::unpack_epoch;

/// Rows of the sketch: the estimate is the minimum over this many cells.
pub(crate) const DEPTH: usize = 4;
/// Cells per row, at least and at most.
const MIN_WIDTH: usize = 1 << 10;
const MAX_WIDTH: usize = 1 << 16;
/// Odd multipliers, one per row (multiplicative hashing of the digest).
const MIX: [u64; DEPTH] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
];

/// A count-min sketch of evicted keys' usage; see the module docs.
pub struct EvictedSketch {
    shift: u32,
    width: usize,
    cells: Box<[AtomicU64]>,
}

impl EvictedSketch {
    /// A sketch sized for a table of `capacity` keys: `DEPTH` × width cells
    /// of 8 bytes, the width the capacity rounded up to a power of two
    /// within `[2^10, 2^16]` (32 KiB to 2 MiB).
    pub fn for_capacity(capacity: usize) -> EvictedSketch {
        let width = capacity.next_power_of_two().clamp(MIN_WIDTH, MAX_WIDTH);
        EvictedSketch {
            shift: 64 - width.trailing_zeros(),
            width,
            cells: (0..DEPTH * width).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Bytes held by the cells.
    pub fn bytes(&self) -> usize {
        self.cells.len() * 8
    }

    fn cell(&self, row: usize, key: u64) -> &AtomicU64 {
        let i = (key.wrapping_mul(MIX[row]) >> self.shift) as usize;
        &self.cells[row * self.width + i]
    }

    /// Remembers that `key` had `count` hits in its window, the newest in
    /// bucket `epoch`. `now_epoch` and `buckets` say which cells are stale.
    pub fn record(&self, key: u64, epoch: u64, count: u64, now_epoch: u64, buckets: u64) {
        if count == 0 {
            return;
        }
        let count = count.min(u64::from(u32::MAX)) as u32;
        for row in 0..DEPTH {
            let cell = self.cell(row, key);
            let mut cur = cell.load(Ordering::Relaxed);
            loop {
                let next = match live(cur, now_epoch, buckets) {
                    None => pack(epoch, count),
                    Some((e, c)) => pack(e.max(epoch), c.max(count)),
                };
                if next == cur {
                    break;
                }
                match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(seen) => cur = seen,
                }
            }
        }
    }

    /// The most `key` may have used: `(newest epoch, count)`, or `None`
    /// when some cell of the key is empty or stale (the key was not evicted
    /// within its window).
    pub fn estimate(&self, key: u64, now_epoch: u64, buckets: u64) -> Option<(u64, u32)> {
        let mut best: Option<(u64, u32)> = None;
        for row in 0..DEPTH {
            let (e, c) = live(
                self.cell(row, key).load(Ordering::Relaxed),
                now_epoch,
                buckets,
            )?;
            best = Some(match best {
                None => (e, c),
                // Every cell's epoch is at least the key's own: the smallest
                // is still never older than the truth.
                Some((be, bc)) => (be.min(e), bc.min(c)),
            });
        }
        best
    }
}

fn pack(epoch: u64, count: u32) -> u64 {
    ((epoch as u32 as u64) << 32) | u64::from(count)
}

/// A cell's `(epoch, count)` if it holds a count whose window has not passed.
fn live(cell: u64, now_epoch: u64, buckets: u64) -> Option<(u64, u32)> {
    let count = cell as u32;
    if count == 0 {
        return None;
    }
    let epoch = unpack_epoch(now_epoch, (cell >> 32) as u32, 32).min(now_epoch);
    (epoch + buckets > now_epoch).then_some((epoch, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_are_never_below_what_was_recorded() {
        let s = EvictedSketch::for_capacity(1000);
        // Far more keys than cells per row: collisions are certain.
        for key in 1..=20_000u64 {
            let key = key.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            s.record(key, 100, key % 50 + 1, 100, 2);
        }
        for key in 1..=20_000u64 {
            let key = key.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            let (epoch, count) = s.estimate(key, 100, 2).expect("recorded");
            assert!(u64::from(count) > key % 50);
            assert!(epoch >= 100);
        }
    }

    #[test]
    fn cells_forget_once_their_window_has_passed() {
        let s = EvictedSketch::for_capacity(16);
        s.record(42, 10, 7, 10, 2);
        assert_eq!(s.estimate(42, 11, 2), Some((10, 7)));
        assert_eq!(s.estimate(42, 12, 2), None);
        // A stale cell is replaced, not merged.
        s.record(42, 20, 3, 20, 2);
        assert_eq!(s.estimate(42, 20, 2), Some((20, 3)));
        assert_eq!(s.estimate(43, 20, 2), None, "an unseen key reads empty");
    }

    #[test]
    fn memory_is_fixed_by_the_capacity() {
        assert_eq!(
            EvictedSketch::for_capacity(1).bytes(),
            DEPTH * MIN_WIDTH * 8
        );
        assert_eq!(
            EvictedSketch::for_capacity(1 << 20).bytes(),
            DEPTH * MAX_WIDTH * 8
        );
    }
}
