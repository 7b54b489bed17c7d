//! The key index: key digest → arena entry.
//!
//! Kept behind a small trait so that the benchmark can run the same table on
//! dashmap and on papaya side by side (`core/benches/keymap.rs`, which holds
//! the papaya index); dashmap won on random keys and inserts and is the
//! default (figures in docs/report.md, "The key index").

use std::hash::{BuildHasher, Hasher};

/// A concurrent map from 64-bit key digests to arena entry numbers.
pub trait KeyIndex: Send + Sync {
    /// An empty index sized for `capacity` keys.
    fn with_capacity(capacity: usize) -> Self
    where
        Self: Sized;
    /// The entry of `key`, if present.
    fn get(&self, key: u64) -> Option<u32>;
    /// Inserts unless the key is present; on conflict returns the present entry.
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32>;
    /// Removes the key only if it still maps to `entry`.
    fn remove_if(&self, key: u64, entry: u32) -> bool;
    /// Points the key at `new` if it still maps to `old` (a key moving to a
    /// larger entry, under its lock). The key must never be absent in
    /// between, or another thread could create a second entry for it.
    fn replace(&self, key: u64, old: u32, new: u32) -> bool;
    /// Keys present.
    fn len(&self) -> usize;
    /// True when no key is present.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the index has allocated for slots, filled or not (0 when the
    /// index cannot tell).
    fn allocated_bytes(&self) -> usize {
        0
    }
}

/// Keys are already keyed SipHash digests, uniformly spread and unknown to
/// clients, so hashing them again would only cost time.
#[derive(Clone, Copy, Default, Debug)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Clone, Copy, Default, Debug)]
/// A hasher builder that uses a key digest as its own hash: the keys are
/// already uniform, secret-seeded digests.
pub struct BuildDigestHasher;

impl BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// A key digest stored as two 32-bit halves: aligned to 4 bytes, so that a
/// map slot of digest and entry number takes 12 bytes, not the 16 a `u64`
/// key pads it to (a quarter of the index's memory).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Digest([u32; 2]);

impl Digest {
    #[inline]
    fn new(key: u64) -> Self {
        Digest([key as u32, (key >> 32) as u32])
    }
    #[inline]
    fn get(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }
}

impl std::hash::Hash for Digest {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// Keys an index has room for before its first growth.
const INITIAL_INDEX: usize = 64;

/// dashmap: sharded hash tables with the value stored in place, so a lookup
/// is one shard read lock and two dependent memory reads (papaya's lock-free
/// reads cost a third: the separately allocated entry). Chosen over papaya
/// by `core/benches/keymap.rs` (figures in docs/report.md).
pub struct DashMapIndex(dashmap::DashMap<Digest, u32, BuildDigestHasher>);

impl KeyIndex for DashMapIndex {
    fn with_capacity(capacity: usize) -> Self {
        // Grows with the keys the limit really tracks: a rule set of
        // thousands of limits must not reserve thousands of large maps.
        DashMapIndex(dashmap::DashMap::with_capacity_and_hasher(
            capacity.min(INITIAL_INDEX),
            BuildDigestHasher,
        ))
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        self.0.get(&Digest::new(key)).map(|e| *e.value())
    }
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32> {
        match self.0.entry(Digest::new(key)) {
            dashmap::Entry::Occupied(present) => Err(*present.get()),
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(entry);
                Ok(())
            }
        }
    }
    fn remove_if(&self, key: u64, entry: u32) -> bool {
        self.0
            .remove_if(&Digest::new(key), |_, &v| v == entry)
            .is_some()
    }
    fn replace(&self, key: u64, old: u32, new: u32) -> bool {
        match self.0.get_mut(&Digest::new(key)) {
            Some(mut v) if *v == old => {
                *v = new;
                true
            }
            _ => false,
        }
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn allocated_bytes(&self) -> usize {
        // A slot of digest and entry number, and its control byte.
        self.0.capacity() * (std::mem::size_of::<(Digest, u32)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_twelve_bytes_and_digests_round_trip() {
        assert_eq!(std::mem::size_of::<(Digest, u32)>(), 12);
        for key in [
            1,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            1 << 32,
            u64::from(u32::MAX),
        ] {
            assert_eq!(Digest::new(key).get(), key);
        }
        let index = DashMapIndex::with_capacity(4);
        assert_eq!(index.insert_if_absent(1 << 32, 7), Ok(()));
        assert_eq!(index.insert_if_absent(1, 8), Ok(()));
        assert_eq!(index.insert_if_absent(1 << 32, 9), Err(7));
        assert_eq!((index.get(1 << 32), index.get(1)), (Some(7), Some(8)));
        assert!(index.replace(1, 8, 10) && !index.replace(1, 8, 11));
        assert!(!index.remove_if(1, 8) && index.remove_if(1, 10));
        assert_eq!((index.get(1), index.len()), (None, 1));
    }
}
