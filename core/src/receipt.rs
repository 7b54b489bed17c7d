//! Refund receipts: what an allowed check hands its caller so that a later
//! refund can give back exactly what that check charged, and nothing else.
//!
//! A receipt names the node that issued it (slot and boot id), when, the
//! cost, a nonce unique to that boot, and every `(limit id, key digest)` the
//! check counted. It is sealed with a 128-bit SipHash-2-4 MAC under a key
//! derived from the cluster's secret key seed: a caller can read a receipt
//! but can neither forge one nor change what it names. Texts are lowercase
//! hex. Pure data and codec: spending is the limiter's business.
//!
//! ```text
//! byte 0       version (1)
//! bytes 1..3   issuing node slot (u16, big-endian)
//! bytes 3..11  issuing node boot id (u64)
//! bytes 11..19 issued at, ns since the Unix epoch (u64)
//! bytes 19..23 cost (u32)
//! bytes 23..31 nonce (u64)
//! byte 31      charges n, 1..=MAX_CHARGES
//! then n × (limit id u64, key digest u64), then the 16-byte MAC
//! ```

use crate::key::{KeyDigest, LimitId};
use std::hash::Hasher;

use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher24};

use crate::key::KeySeed;
use crate::time::Nanos;

const VERSION: u8 = 1;
const HEAD: usize = 32;
const CHARGE: usize = 16;
const MAC: usize = 16;
/// Most limits one receipt can name; a check that charged more gets none.
pub const MAX_CHARGES: usize = 32;
/// The longest receipt text.
pub const MAX_TEXT: usize = 2 * (HEAD + CHARGE * MAX_CHARGES + MAC);

/// The secret receipts are sealed with, derived from the key seed so that
/// every node of a cluster can check every other node's receipts.
#[derive(Clone, Copy)]
pub struct ReceiptKey(u64, u64);

impl ReceiptKey {
    /// The receipt key of the cluster whose keys use `seed`. One-way: a
    /// receipt key does not reveal the seed.
    pub fn derive(seed: KeySeed) -> ReceiptKey {
        let part = |label: &[u8]| {
            let mut h = SipHasher13::new_with_keys(seed.0, seed.1);
            h.write(b"drl refund receipt key ");
            h.write(label);
            h.finish()
        };
        ReceiptKey(part(b"0"), part(b"1"))
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC] {
        let mut h = SipHasher24::new_with_keys(self.0, self.1);
        h.write(bytes);
        h.finish128().as_u128().to_be_bytes()
    }
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiptKey(..)")
    }
}

/// One limit a check counted: the limit's stable id and the key's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Charge {
    /// The limit's stable id (as in the frames nodes exchange).
    pub limit_id: LimitId,
    /// The digest of the key the check counted under that limit.
    pub key: KeyDigest,
}

/// What an allowed check charged, as its receipt says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Slot of the issuing node.
    pub node: u16,
    /// The issuing limiter's boot id: random at each start, so a receipt
    /// from before a restart is told apart.
    pub boot: u64,
    /// When the check was counted, by the issuer's clock.
    pub issued: Nanos,
    /// The cost the check charged on every limit.
    pub cost: u32,
    /// Unique among the receipts of one boot.
    pub nonce: u64,
    /// Every limit and key the check counted: 1 to [`MAX_CHARGES`].
    pub charges: Vec<Charge>,
}

/// Why a receipt text was refused. Nothing was refunded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Not hex, not a receipt's layout, or the MAC does not match. Which of
    /// these is not said: a forger learns nothing from the refusal.
    #[error("the receipt is not valid: it was not issued by this cluster or was altered")]
    Invalid,
}

impl Receipt {
    /// Seals the receipt into its text. `None` when it names no limit or
    /// more than [`MAX_CHARGES`].
    pub fn seal(&self, key: &ReceiptKey) -> Option<String> {
        if self.charges.is_empty() || self.charges.len() > MAX_CHARGES {
            return None;
        }
        let mut bytes = Vec::with_capacity(HEAD + CHARGE * self.charges.len() + MAC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.node.to_be_bytes());
        bytes.extend_from_slice(&self.boot.to_be_bytes());
        bytes.extend_from_slice(&self.issued.as_u64().to_be_bytes());
        bytes.extend_from_slice(&self.cost.to_be_bytes());
        bytes.extend_from_slice(&self.nonce.to_be_bytes());
        bytes.push(self.charges.len() as u8);
        for c in &self.charges {
            bytes.extend_from_slice(&c.limit_id.0.to_be_bytes());
            bytes.extend_from_slice(&c.key.0.to_be_bytes());
        }
        let mac = key.mac(&bytes);
        bytes.extend_from_slice(&mac);
        Some(hex(&bytes))
    }

    /// Opens a receipt text: checks its MAC first, then its layout.
    pub fn open(text: &str, key: &ReceiptKey) -> Result<Receipt, ReceiptError> {
        if text.len() > MAX_TEXT {
            return Err(ReceiptError::Invalid);
        }
        let bytes = unhex(text).ok_or(ReceiptError::Invalid)?;
        if bytes.len() < HEAD + CHARGE + MAC {
            return Err(ReceiptError::Invalid);
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC);
        let want = key.mac(body);
        // Constant time: a caller learns nothing from how long a refusal took.
        let diff = want.iter().zip(mac).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(ReceiptError::Invalid);
        }
        let u64_at = |at: usize| {
            body.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let n = usize::from(body[HEAD - 1]);
        if body[0] != VERSION || n == 0 || n > MAX_CHARGES || body.len() != HEAD + CHARGE * n {
            return Err(ReceiptError::Invalid);
        }
        let mut charges = Vec::with_capacity(n);
        for i in 0..n {
            let at = HEAD + CHARGE * i;
            charges.push(Charge {
                limit_id: LimitId(u64_at(at).ok_or(ReceiptError::Invalid)?),
                key: KeyDigest(u64_at(at + 8).ok_or(ReceiptError::Invalid)?),
            });
        }
        Ok(Receipt {
            node: u16::from_be_bytes([body[1], body[2]]),
            boot: u64_at(3).ok_or(ReceiptError::Invalid)?,
            issued: Nanos::new(u64_at(11).ok_or(ReceiptError::Invalid)?),
            cost: u32::from_be_bytes([body[19], body[20], body[21], body[22]]),
            nonce: u64_at(23).ok_or(ReceiptError::Invalid)?,
            charges,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let t = text.as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    t.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            node: 2,
            boot: 0xfeed,
            issued: Nanos::from_secs(1_700_000_000),
            cost: 3,
            nonce: 77,
            charges: vec![
                Charge {
                    limit_id: LimitId(10),
                    key: KeyDigest(0xabc),
                },
                Charge {
                    limit_id: LimitId(11),
                    key: KeyDigest(0xdef),
                },
            ],
        }
    }

    #[test]
    fn a_sealed_receipt_opens_to_itself() {
        let key = ReceiptKey::derive(KeySeed(1, 2));
        let text = receipt().seal(&key).unwrap();
        assert_eq!(Receipt::open(&text, &key), Ok(receipt()));
        assert!(text.len() <= MAX_TEXT);
    }

    #[test]
    fn altered_or_foreign_receipts_are_refused() {
        let key = ReceiptKey::derive(KeySeed(1, 2));
        let text = receipt().seal(&key).unwrap();
        // Another cluster's seed.
        assert!(Receipt::open(&text, &ReceiptKey::derive(KeySeed(1, 3))).is_err());
        // Every single-digit change, the cost and the charges included.
        for i in 0..text.len() {
            let mut b = text.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(b).unwrap();
            assert!(Receipt::open(&altered, &key).is_err(), "digit {i}");
        }
        for bad in ["", "zz", "0", &text[..text.len() - 2], &format!("{text}00")] {
            assert_eq!(Receipt::open(bad, &key), Err(ReceiptError::Invalid));
        }
        assert_eq!(
            Receipt::open(&text.to_uppercase(), &key),
            Err(ReceiptError::Invalid)
        );
    }

    #[test]
    fn receipts_name_between_one_and_max_charges() {
        let key = ReceiptKey::derive(KeySeed::default());
        let mut r = receipt();
        r.charges.clear();
        assert_eq!(r.seal(&key), None);
        r.charges = vec![
            Charge {
                limit_id: LimitId(1),
                key: KeyDigest(1)
            };
            MAX_CHARGES + 1
        ];
        assert_eq!(r.seal(&key), None);
        r.charges.pop();
        assert!(r.seal(&key).is_some());
    }
}
