//! Counter keys: 64-bit digests of a limit and the descriptor values it counts by.
//!
//! A key is built in two steps, so that a request hashes its key material
//! once per rule however many limits the rule applies:
//!
//! 1. [`KeyHasher::values`]: rapidhash (v3, the portable, versioned variant,
//!    with its protected multiply) of the values under secrets derived from
//!    the cluster-wide [`KeySeed`]. One value is hashed as it is; several are
//!    each preceded by their length (`u32`, little endian), so that
//!    `("ab", "c")` and `("a", "bc")` differ. A limit always has the same
//!    number of key fields, so the two encodings never meet in one table.
//! 2. [`KeyHasher::for_limit`]: a bijective mix of that digest with the
//!    limit id, so that distinct values never share a counter beyond the
//!    collisions of step 1.
//!
//! Every node of a cluster computes the same key for the same request (the
//! seed is shared and rapidhash v3's output is fixed by its specification,
//! on every platform and crate version), while an outsider, not knowing the
//! seed, can neither predict digests nor pick ids that collide with a
//! victim's counter. Two distinct keys share a counter with probability
//! about `n² / 2^65` for `n` live keys (under 3·10⁻⁶ at ten million keys).
//!
//! Keys are visible on the wire and in snapshots: a node that computed them
//! with an earlier scheme (keyed SipHash-1-3 per limit) names the same
//! client differently, so a cluster is upgraded across this change as a
//! whole (DESIGN.md, "The in-process limiter").

use std::hash::Hasher;

use rapidhash::v3::{rapidhash_v3_inline, RapidSecrets};
use siphasher::sip::SipHasher13;

/// A limit's stable id: what every node names a limit by, on the wire, in
/// snapshots and in receipts (see `rules::CompiledLimit::id`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitId(pub u64);

/// A key's digest under one limit ([`KeyHasher::for_limit`]): which of the
/// limit's counters a request counts in. Never zero for a real key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub u64);

/// One counter of the cluster: a limit and a key of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// The limit.
    pub limit: LimitId,
    /// The key under that limit.
    pub key: KeyDigest,
}

impl CounterKey {
    /// The counter of `key` under `limit`.
    pub fn new(limit: LimitId, key: KeyDigest) -> Self {
        CounterKey { limit, key }
    }
}

impl std::fmt::Display for LimitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The seed of key digests. Nodes of one cluster must share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySeed(pub u64, pub u64);

impl Default for KeySeed {
    /// A fixed development seed; clusters set their own.
    fn default() -> Self {
        KeySeed(0x6472_6c2d_6b65_7931, 0x7365_6564_2d30_3031)
    }
}

/// Most bytes of length-prefixed values hashed from a stack buffer; longer
/// key material (up to 16 values of 256 bytes) goes through the heap.
const STACK_MATERIAL: usize = 128;

/// The key digest function under one seed: the seed's secrets expanded once
/// (a limiter keeps one), so that a digest costs only the hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHasher {
    secrets: RapidSecrets,
    /// Mixed into every limit's keys (from the seed, so that limit ids,
    /// which are public, do not alone decide the mix).
    limit_salt: u64,
}

impl KeyHasher {
    /// Expands `seed` into rapidhash's secrets: the first half of the seed
    /// derives the seven secrets, the second the hash's own seed, so every
    /// bit of the 128-bit seed counts.
    pub fn new(seed: KeySeed) -> KeyHasher {
        let mut secrets = RapidSecrets::seed(seed.0);
        secrets.seed = RapidSecrets::seed(seed.1).seed;
        KeyHasher {
            secrets,
            limit_salt: fmix64(seed.0 ^ fmix64(seed.1)),
        }
    }

    /// Hashes the values of one rule's key fields (see the module docs).
    #[inline]
    pub fn values<'v>(&self, values: impl IntoIterator<Item = &'v str>) -> u64 {
        let mut values = values.into_iter();
        let Some(first) = values.next() else {
            return self.hash(&[]);
        };
        let Some(second) = values.next() else {
            return self.hash(first.as_bytes());
        };
        let mut stack = [0u8; STACK_MATERIAL];
        let mut heap = Vec::new();
        let mut len = 0;
        for v in [first, second].into_iter().chain(values) {
            let need = len + 4 + v.len();
            if heap.is_empty() && need <= STACK_MATERIAL {
                stack[len..len + 4].copy_from_slice(&(v.len() as u32).to_le_bytes());
                stack[len + 4..need].copy_from_slice(v.as_bytes());
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack[..len]);
                }
                heap.extend_from_slice(&(v.len() as u32).to_le_bytes());
                heap.extend_from_slice(v.as_bytes());
            }
            len = need;
        }
        if heap.is_empty() {
            self.hash(&stack[..len])
        } else {
            self.hash(&heap)
        }
    }

    /// The key of `values_digest` ([`KeyHasher::values`]) in the limit with
    /// stable id `limit_id`. For one limit this is a bijection of the values
    /// digest, so it adds no collisions. Never zero: zero means "no key" in
    /// the key table.
    #[inline]
    pub fn for_limit(&self, limit_id: LimitId, values_digest: u64) -> KeyDigest {
        let salt = fmix64(limit_id.0 ^ self.limit_salt);
        KeyDigest(match fmix64(values_digest ^ salt) {
            0 => 1,
            d => d,
        })
    }

    /// [`KeyHasher::values`] then [`KeyHasher::for_limit`].
    #[inline]
    pub fn key<'v>(
        &self,
        limit_id: LimitId,
        values: impl IntoIterator<Item = &'v str>,
    ) -> KeyDigest {
        self.for_limit(limit_id, self.values(values))
    }

    #[inline]
    fn hash(&self, bytes: &[u8]) -> u64 {
        // Avalanche on, full (not compact) code, protected multiply.
        rapidhash_v3_inline::<true, false, true>(bytes, &self.secrets)
    }
}

/// MurmurHash3's 64-bit finaliser: a bijection on `u64` with full avalanche.
#[inline]
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Digests a limit id and the values of the limit's key fields: the key the
/// limiter counts them under. Expands the seed on every call; hot paths keep
/// a [`KeyHasher`].
///
/// Zero is reserved for "no key" in the key table and never returned.
pub fn key_digest<'v>(
    seed: KeySeed,
    limit_id: LimitId,
    values: impl IntoIterator<Item = &'v str>,
) -> KeyDigest {
    KeyHasher::new(seed).key(limit_id, values)
}

/// A stable digest of arbitrary bytes under a fixed seed, for ids that must be
/// the same on every node and in every version (limit ids, rule digests).
/// Kept on SipHash-1-3: its values are on the wire and in snapshots, and it
/// runs when rules are loaded, not per request.
pub fn stable_digest(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6c69_6d69_7469_6431, 0x7374_6162_6c65_3031);
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_length_prefixed() {
        let s = KeySeed::default();
        assert_ne!(
            key_digest(s, LimitId(1), ["ab", "c"]),
            key_digest(s, LimitId(1), ["a", "bc"])
        );
        assert_eq!(
            key_digest(s, LimitId(1), ["ab", "c"]),
            key_digest(s, LimitId(1), ["ab", "c"])
        );
        assert_ne!(
            key_digest(s, LimitId(1), ["x"]),
            key_digest(s, LimitId(2), ["x"])
        );
        assert_ne!(
            key_digest(s, LimitId(1), ["x"]),
            key_digest(KeySeed(1, 2), LimitId(1), ["x"])
        );
    }

    #[test]
    fn both_halves_of_the_seed_count() {
        let d = |seed| key_digest(seed, LimitId(7), ["user-42"]);
        assert_ne!(d(KeySeed(1, 2)), d(KeySeed(1, 3)));
        assert_ne!(d(KeySeed(1, 2)), d(KeySeed(4, 2)));
    }

    #[test]
    fn long_key_material_hashes_as_if_on_the_stack() {
        let h = KeyHasher::new(KeySeed::default());
        let long = "v".repeat(256);
        let values: Vec<&str> = vec![long.as_str(); 16];
        // Over the stack buffer: the heap path must hash the same encoding.
        let mut bytes = Vec::new();
        for v in &values {
            bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
            bytes.extend_from_slice(v.as_bytes());
        }
        assert!(bytes.len() > STACK_MATERIAL);
        assert_eq!(h.values(values.iter().copied()), h.hash(&bytes));
        // And a short pair on the stack.
        let mut short = Vec::new();
        for v in ["ab", "c"] {
            short.extend_from_slice(&(v.len() as u32).to_le_bytes());
            short.extend_from_slice(v.as_bytes());
        }
        assert_eq!(h.values(["ab", "c"]), h.hash(&short));
        assert_eq!(h.values(["one"]), h.hash(b"one"));
    }

    #[test]
    fn a_limit_key_is_a_bijection_of_the_values_digest() {
        let h = KeyHasher::new(KeySeed::default());
        let mut keys: Vec<u64> = (0..100_000u64)
            .map(|v| h.for_limit(LimitId(9), v).0)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 100_000);
        assert!(!keys.contains(&0));
    }

    /// The digest is part of the cluster's protocol (keys travel in frames
    /// and snapshots): these values must not change without a migration.
    #[test]
    fn digests_are_fixed_across_platforms_and_versions() {
        let s = KeySeed::default();
        let got = (
            key_digest(s, LimitId(0x0123_4567_89ab_cdef), ["user-00000042"]),
            key_digest(s, LimitId(0x0123_4567_89ab_cdef), ["alice", "/v1/search"]),
        );
        assert_eq!(got, (KeyDigest(GOLDEN_ONE), KeyDigest(GOLDEN_TWO)));
    }

    const GOLDEN_ONE: u64 = 9_080_830_734_516_917_323;
    const GOLDEN_TWO: u64 = 12_054_623_412_499_879_628;
}
