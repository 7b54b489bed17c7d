//! Counter keys: 64-bit digests of a limit and the descriptor values it counts by.
//!
//! Keys are SipHash-1-3 digests under a cluster-wide secret seed, so every node
//! computes the same key for the same request while an outsider, not knowing
//! the seed, can neither predict digests nor craft ids that collide with a
//! victim's counter. Two distinct keys share a counter with probability about
//! `n² / 2^65` for `n` live keys (under 3·10⁻⁶ at ten million keys).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// The seed of key digests. Nodes of one cluster must share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySeed(pub u64, pub u64);

impl Default for KeySeed {
    /// A fixed development seed; clusters set their own.
    fn default() -> Self {
        KeySeed(0x6472_6c2d_6b65_7931, 0x7365_6564_2d30_3031)
    }
}

/// Digests a limit id and the values of the limit's key fields.
///
/// Values are length-prefixed so that `("ab", "c")` and `("a", "bc")` differ.
/// Zero is reserved for "no key" in the key table and never returned.
pub fn key_digest<'v>(
    seed: KeySeed,
    limit_id: u64,
    values: impl IntoIterator<Item = &'v str>,
) -> u64 {
    let mut h = SipHasher13::new_with_keys(seed.0, seed.1);
    h.write_u64(limit_id);
    for v in values {
        h.write_u32(v.len() as u32);
        h.write(v.as_bytes());
    }
    match h.finish() {
        0 => 1,
        d => d,
    }
}

/// A stable digest of arbitrary bytes under a fixed seed, for ids that must be
/// the same on every node and in every version (limit ids).
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
        assert_ne!(key_digest(s, 1, ["ab", "c"]), key_digest(s, 1, ["a", "bc"]));
        assert_eq!(key_digest(s, 1, ["ab", "c"]), key_digest(s, 1, ["ab", "c"]));
        assert_ne!(key_digest(s, 1, ["x"]), key_digest(s, 2, ["x"]));
        assert_ne!(key_digest(s, 1, ["x"]), key_digest(KeySeed(1, 2), 1, ["x"]));
    }
}
