//! The write-ahead journal of this node's slot values: what a whole-cluster
//! crash would otherwise lose since the last snapshot.
//!
//! The journal holds values, never increments: each record carries this
//! node's current `(p, n)` of some keys' live buckets, and replay merges them
//! with the same per-slot maximum as gossip and snapshots. Replaying a record
//! twice, replaying an old record after a newer one, or replaying a segment
//! a snapshot already covers can therefore never count anything twice.
//! Resets and refunds need no records of their own: both change this node's
//! slot values (a reset raises `p` and `n` together), and the new values are
//! what the next record carries.
//!
//! # Format (version 1)
//!
//! A journal is a series of segment files. Each starts with a header:
//!
//! | bytes | field |
//! |---|---|
//! | 7 | magic `DRLJRNL` |
//! | 1 | format version (1) |
//! | 8 | cluster tag: SipHash-1-3 of nothing under the cluster's key seed, little-endian |
//!
//! then records, appended one group commit at a time:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | body length, `u32` little-endian (at most [`MAX_RECORD`]) |
//! | 4 | CRC-32 (IEEE) of the body, little-endian |
//! | … | body: one wire `Sync` frame carrying this node's slot values |
//!
//! A crash can leave the last record half written; a bad disk can change a
//! byte anywhere. Replay stops at the first record that is short, too long,
//! fails its checksum or does not decode, and reports where the good part
//! ends so that the driver cuts the file there. A header that does not
//! match (another file, another version, another cluster's seed) refuses
//! the whole segment before anything is merged.
//!
//! Pure functions over bytes: the node driver does the file I/O (appends,
//! fsyncs, segment rotation at each snapshot, cutting a torn tail).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use crate::cluster::store::{merge_into, SlotValues};
use crate::key::{CounterKey, KeySeed};
use crate::limiter::Limiter;
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::wire::{Frame, KeySlots, SlotsPacker};

const MAGIC: &[u8; 7] = b"DRLJRNL";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of a segment's header.
pub const HEADER_BYTES: usize = 7 + 1 + 8;
/// Bytes before each record's body: its length and checksum.
pub const RECORD_HEADER_BYTES: usize = 8;
/// The largest record body written; a longer length is corruption.
pub const MAX_RECORD: usize = 256 * 1024;

fn cluster_tag(seed: KeySeed) -> u64 {
    let mut h = SipHasher13::new_with_keys(seed.0 ^ 0x6a6f_7572_6e61_6c31, seed.1);
    h.write(&[]);
    h.finish()
}

/// The header a new segment starts with.
pub fn segment_header(seed: KeySeed) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..7].copy_from_slice(MAGIC);
    h[7] = VERSION;
    h[8..].copy_from_slice(&cluster_tag(seed).to_le_bytes());
    h
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and PNG compute it).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Appends one record per frame of `slot`'s `values` to `out`; `now` is
/// written as the frames' time. Returns how many records were written.
pub fn encode_values(
    out: &mut Vec<u8>,
    slot: NodeSlot,
    now: Nanos,
    values: impl IntoIterator<Item = (CounterKey, SlotValues)>,
) -> usize {
    let mut packer = SlotsPacker::new(MAX_RECORD, slot.get(), 0, now.as_u64());
    for (CounterKey { limit, key }, v) in values {
        packer.push(
            limit.0,
            v.newest,
            KeySlots {
                key: key.0,
                buckets: v.buckets,
            },
        );
    }
    let frames = packer.finish();
    let records = frames.len();
    for frame in frames {
        let body = Frame::Sync(frame).encode();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32(&body).to_le_bytes());
        out.extend_from_slice(&body);
    }
    records
}

/// Why a segment was refused whole. Nothing was merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("not a journal segment (bad magic)")]
    /// The file does not start with the journal magic.
    BadMagic,
    #[error("journal format version {0}, this node reads version {VERSION}")]
    /// A format version this node cannot read.
    UnsupportedVersion(u8),
    #[error("journal segment of another cluster (key seed)")]
    /// Written under another key seed: its digests mean nothing here.
    OtherCluster,
}

/// Why replay stopped before the end of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TailFault {
    #[error("torn record: the segment ends inside it")]
    /// The segment ends inside a record's header or body: a write cut
    /// short by a crash.
    Torn,
    #[error("record longer than any written")]
    /// A length above [`MAX_RECORD`].
    Length,
    #[error("record checksum does not match its contents")]
    /// The body does not match its CRC-32.
    Checksum,
    #[error("record does not decode")]
    /// The checksum holds but the body is not a `Sync` frame.
    Frame,
}

/// What replaying one segment did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records merged.
    pub records: u64,
    /// Values that raised a local value.
    pub applied: u64,
    /// Values no larger than the local one, or for buckets expired or too
    /// far ahead.
    pub stale: u64,
    /// Bytes of the segment up to the end of its last good record: where
    /// to cut it when `fault` is set.
    pub good_len: usize,
    /// Why replay stopped early; `None` when every byte was read.
    pub fault: Option<TailFault>,
}

/// Merges a segment's records into the limiter, each value with a per-slot
/// maximum, up to the first bad record. A bad header refuses the segment
/// whole.
pub fn replay<C: Clock>(
    limiter: &Limiter<C>,
    now: Nanos,
    bytes: &[u8],
) -> Result<Replayed, SegmentError> {
    let seed = limiter.config().seed;
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(SegmentError::BadMagic)?;
    let (&version, rest) = rest.split_first().ok_or(SegmentError::BadMagic)?;
    if version != VERSION {
        return Err(SegmentError::UnsupportedVersion(version));
    }
    let (tag, _) = rest
        .split_first_chunk::<8>()
        .ok_or(SegmentError::OtherCluster)?;
    if u64::from_le_bytes(*tag) != cluster_tag(seed) {
        return Err(SegmentError::OtherCluster);
    }
    let mut out = Replayed {
        good_len: HEADER_BYTES,
        ..Replayed::default()
    };
    while out.good_len < bytes.len() {
        let frame = match record_at(bytes, out.good_len) {
            Ok((frame, next)) => {
                out.good_len = next;
                frame
            }
            Err(fault) => {
                out.fault = Some(fault);
                break;
            }
        };
        out.records += 1;
        if usize::from(frame.slot) >= limiter.config().slots {
            continue;
        }
        let merged = merge_into(limiter, now, 1, NodeSlot::new(frame.slot), &frame);
        out.applied += merged.applied;
        out.stale += merged.stale + merged.too_far_ahead;
    }
    Ok(out)
}

/// The record at `at` and where the next one starts.
fn record_at(bytes: &[u8], at: usize) -> Result<(crate::wire::Slots, usize), TailFault> {
    let rest = &bytes[at..];
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(TailFault::Torn)?;
    let (sum, rest) = rest.split_first_chunk::<4>().ok_or(TailFault::Torn)?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_RECORD {
        return Err(TailFault::Length);
    }
    let body = rest.get(..len).ok_or(TailFault::Torn)?;
    if crc32(body) != u32::from_le_bytes(*sum) {
        return Err(TailFault::Checksum);
    }
    match Frame::decode(body) {
        Ok(Frame::Sync(s)) => Ok((s, at + RECORD_HEADER_BYTES + len)),
        _ => Err(TailFault::Frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::store::ReplicaStore;
    use crate::descriptor::Descriptors;
    use crate::limiter::LimiterConfig;
    use crate::rules::RuleSet;
    use crate::share::ShareView;
    use crate::time::ManualClock;
    use std::sync::Arc;

    const RULES: &str = r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "sliding_window", limit = 100, window = "1h", precision = 4 },
                   { algorithm = "fixed_window", limit = 20, window = "1m" } ]
    "#;
    const T0: u64 = 1_700_000_000;

    fn limiter(clock: Arc<ManualClock>, seed: KeySeed) -> Limiter<Arc<ManualClock>> {
        let config = LimiterConfig {
            own_slot: NodeSlot::new(1),
            slots: 3,
            seed,
            ..LimiterConfig::default()
        };
        let l = Limiter::with_clock(RuleSet::from_toml(RULES).unwrap(), config, clock)
            .and_then(|l| l.clustered(ShareView::alone(1)))
            .unwrap();
        l.set_admitting(true);
        l
    }

    fn spend(l: &Limiter<Arc<ManualClock>>, user: &str, n: u32) {
        let f = [("user", user)];
        let d = Descriptors::new(&f).unwrap();
        for _ in 0..n {
            assert!(l.check(&d, 1).unwrap().is_allowed());
        }
    }

    /// What the key has spent, as its tightest limit reports it: the
    /// remaining quota of a key never seen, less its own.
    fn spent(l: &Limiter<Arc<ManualClock>>, user: &str) -> u64 {
        let remaining = |user: &str| {
            let f = [("user", user)];
            l.check(&Descriptors::new(&f).unwrap(), 0)
                .unwrap()
                .quota
                .unwrap()
                .remaining
        };
        remaining("nobody") - remaining(user)
    }

    /// What the node's writer does: the changed keys' own values, now.
    fn journal_changes(l: &Limiter<Arc<ManualClock>>, now: Nanos, out: &mut Vec<u8>) {
        let own = NodeSlot::new(1);
        let values: Vec<_> = l
            .drain_changed()
            .into_iter()
            .filter_map(|k| {
                l.take_shipment(now, k, own)?;
                Some((k, l.slot_values(now, k, own)?))
            })
            .collect();
        encode_values(out, own, now, values);
    }

    #[test]
    fn crc32_matches_the_standard_check_values() {
        // The check value of CRC-32/ISO-HDLC, and zlib's for these inputs.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn replay_brings_back_every_spend_and_never_twice() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(T0)));
        let seed = KeySeed(3, 4);
        let a = limiter(clock.clone(), seed);
        let mut file = segment_header(seed).to_vec();
        spend(&a, "alice", 5);
        spend(&a, "bob", 2);
        journal_changes(&a, clock.now(), &mut file);
        spend(&a, "alice", 4);
        journal_changes(&a, clock.now(), &mut file);
        let b = limiter(clock.clone(), seed);
        let r = replay(&b, clock.now(), &file).unwrap();
        assert_eq!((r.fault, r.good_len, r.records), (None, file.len(), 2));
        assert_eq!(spent(&b, "alice"), 9);
        assert_eq!(spent(&b, "bob"), 2);
        // Values, not increments: replaying again, or the segment's records
        // in any order, changes nothing.
        let again = replay(&b, clock.now(), &file).unwrap();
        assert_eq!(again.applied, 0);
        assert_eq!(spent(&b, "alice"), 9);
    }

    #[test]
    fn a_reset_is_journaled_as_the_values_it_leaves() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(T0)));
        let seed = KeySeed::default();
        let a = limiter(clock.clone(), seed);
        let mut file = segment_header(seed).to_vec();
        spend(&a, "carol", 7);
        journal_changes(&a, clock.now(), &mut file);
        let before_reset = file.len();
        let f = [("user", "carol")];
        let check = crate::limiter::Check::new(Descriptors::new(&f).unwrap(), 1);
        let keys = a.reset_at(clock.now(), &check).unwrap();
        assert!(!keys.is_empty());
        journal_changes(&a, clock.now(), &mut file);
        let b = limiter(clock.clone(), seed);
        replay(&b, clock.now(), &file[..before_reset]).unwrap();
        assert_eq!(spent(&b, "carol"), 7);
        // The reset's values raise `n` to `p`: merged, the count is zero.
        replay(&b, clock.now(), &file).unwrap();
        assert_eq!(spent(&b, "carol"), 0);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_at_the_last_good_record() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(T0)));
        let seed = KeySeed::default();
        let a = limiter(clock.clone(), seed);
        let mut file = segment_header(seed).to_vec();
        spend(&a, "dave", 3);
        journal_changes(&a, clock.now(), &mut file);
        let first = file.len();
        spend(&a, "dave", 3);
        journal_changes(&a, clock.now(), &mut file);
        // Every cut inside the second record, and every flipped byte of it.
        for cut in first + 1..file.len() {
            let b = limiter(clock.clone(), seed);
            let r = replay(&b, clock.now(), &file[..cut]).unwrap();
            assert_eq!(r.fault, Some(TailFault::Torn), "cut at {cut}");
            assert_eq!(r.good_len, first);
            assert_eq!(spent(&b, "dave"), 3);
        }
        for at in first..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x10;
            let b = limiter(clock.clone(), seed);
            let r = replay(&b, clock.now(), &bad).unwrap();
            assert!(r.fault.is_some(), "flip at {at}");
            assert_eq!(r.good_len, first, "flip at {at}");
            assert_eq!(spent(&b, "dave"), 3, "flip at {at}");
        }
    }

    #[test]
    fn a_foreign_header_refuses_the_segment_whole() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(T0)));
        let a = limiter(clock.clone(), KeySeed(1, 1));
        let mut file = segment_header(KeySeed(1, 1)).to_vec();
        spend(&a, "erin", 1);
        journal_changes(&a, clock.now(), &mut file);
        let other = limiter(clock.clone(), KeySeed(2, 2));
        assert_eq!(
            replay(&other, clock.now(), &file),
            Err(SegmentError::OtherCluster)
        );
        assert_eq!(other.keys_tracked(), 0);
        let mut v2 = file.clone();
        v2[7] = 2;
        assert_eq!(
            replay(&a, clock.now(), &v2),
            Err(SegmentError::UnsupportedVersion(2))
        );
        assert_eq!(
            replay(&a, clock.now(), b"DRLSNAP"),
            Err(SegmentError::BadMagic)
        );
        // A header alone is an empty, valid segment.
        let empty = replay(&a, clock.now(), &segment_header(KeySeed(1, 1))).unwrap();
        assert_eq!((empty.records, empty.fault), (0, None));
    }

    #[test]
    fn expired_values_are_stale_on_replay() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(T0)));
        let seed = KeySeed::default();
        let a = limiter(clock.clone(), seed);
        let mut file = segment_header(seed).to_vec();
        spend(&a, "frank", 4);
        journal_changes(&a, clock.now(), &mut file);
        clock.advance(Nanos::from_secs(3 * 3600));
        let b = limiter(clock.clone(), seed);
        let r = replay(&b, clock.now(), &file).unwrap();
        assert_eq!((r.records, r.applied), (1, 0));
        assert_eq!(spent(&b, "frank"), 0);
    }
}
