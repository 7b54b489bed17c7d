//! The key index: key digest → arena entry.
//!
//! Kept behind a small trait so that the benchmark can run the same table on
//! dashmap and on papaya side by side (`benches/keymap.rs`, which holds the
//! papaya index); dashmap won on random keys and inserts and is the default
//! (figures in README.md).

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

/// dashmap: sharded hash tables with the value stored in place, so a lookup
/// is one shard read lock and two dependent memory reads (papaya's lock-free
/// reads cost a third: the separately allocated entry). Chosen over papaya
/// by `benches/keymap.rs` (figures in README.md).
pub struct DashMapIndex(dashmap::DashMap<u64, u32, BuildDigestHasher>);

impl KeyIndex for DashMapIndex {
    fn with_capacity(capacity: usize) -> Self {
        DashMapIndex(dashmap::DashMap::with_capacity_and_hasher(
            capacity.min(1 << 16),
            BuildDigestHasher,
        ))
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        self.0.get(&key).map(|e| *e.value())
    }
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32> {
        match self.0.entry(key) {
            dashmap::Entry::Occupied(present) => Err(*present.get()),
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(entry);
                Ok(())
            }
        }
    }
    fn remove_if(&self, key: u64, entry: u32) -> bool {
        self.0.remove_if(&key, |_, &v| v == entry).is_some()
    }
    fn replace(&self, key: u64, old: u32, new: u32) -> bool {
        match self.0.get_mut(&key) {
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
}
