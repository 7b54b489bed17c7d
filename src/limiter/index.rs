//! The key index: key digest → arena entry.
//!
//! Kept behind a small trait so that the benchmark can run the same table on
//! papaya and on dashmap side by side (`benches/keymap.rs`); papaya won and is
//! the default (figures in README.md).

use std::hash::{BuildHasher, Hasher};

/// A concurrent map from 64-bit key digests to arena entry numbers.
pub trait KeyIndex: Send + Sync {
    fn with_capacity(capacity: usize) -> Self
    where
        Self: Sized;
    fn get(&self, key: u64) -> Option<u32>;
    /// Inserts unless the key is present; on conflict returns the present entry.
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32>;
    /// Removes the key only if it still maps to `entry`.
    fn remove_if(&self, key: u64, entry: u32) -> bool;
    fn len(&self) -> usize;
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
pub struct BuildDigestHasher;

impl BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// papaya: lock-free reads, which is what the decision path mostly does.
pub struct PapayaIndex(papaya::HashMap<u64, u32, BuildDigestHasher>);

impl KeyIndex for PapayaIndex {
    fn with_capacity(capacity: usize) -> Self {
        PapayaIndex(
            papaya::HashMap::builder()
                .capacity(capacity.min(1 << 16))
                .hasher(BuildDigestHasher)
                .build(),
        )
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        self.0.pin().get(&key).copied()
    }
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32> {
        match self.0.pin().try_insert(key, entry) {
            Ok(_) => Ok(()),
            Err(e) => Err(*e.current),
        }
    }
    fn remove_if(&self, key: u64, entry: u32) -> bool {
        matches!(
            self.0.pin().remove_if(&key, |_, &v| v == entry),
            Ok(Some(_))
        )
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}
