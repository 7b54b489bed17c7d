//! Local snapshots: every slot of every live key, so that a whole-cluster
//! restart keeps long windows (hours, days).
//!
//! # Format (version 2)
//!
//! | bytes | field |
//! |---|---|
//! | 7 | magic `DRLSNAP` |
//! | 1 | format version (2) |
//! | 8 | body length, little-endian |
//! | 8 | checksum: SipHash-1-3 of the body under the cluster's key seed, little-endian |
//! | … | body: length-prefixed (`u32` LE) wire frames, `Sync` frames, one series per slot |
//!
//! The body is written and read by the same codec and merged by the same
//! per-slot maximum as gossip. Restoring a snapshot can therefore only raise
//! counts: an old snapshot, or one restored twice, never lowers what peers
//! already taught the node. Buckets that expired while the node was down are
//! skipped as stale. The checksum is keyed by the cluster's key seed: one
//! flipped byte, a truncated file, or a snapshot of another cluster (whose
//! key digests would mean nothing here) is refused whole before anything is
//! merged. Version 1 files (no checksum) are refused too.
//!
//! Pure functions over bytes: the node driver does the file I/O (temporary
//! file, fsync, rename, directory fsync; a refused file is moved aside and
//! the node recovers from its peers).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use crate::cluster::store::{merge_into, ReplicaStore};
use crate::key::CounterKey;
use crate::key::KeySeed;
use crate::limiter::Limiter;
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::wire::{DecodeError, Frame, KeySlots, Slots, SlotsPacker};

const MAGIC: &[u8; 7] = b"DRLSNAP";
/// The format version this code writes and reads.
pub const VERSION: u8 = 2;
const HEADER_BYTES: usize = 7 + 1 + 8 + 8;
const CHUNK_BYTES: usize = 256 * 1024;

/// Why a snapshot was refused. Nothing was merged.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a snapshot (bad magic)")]
    /// The file does not start with the snapshot magic.
    BadMagic,
    #[error("snapshot format version {0}, this node reads version {VERSION}")]
    /// A format version this node cannot read.
    UnsupportedVersion(u8),
    #[error("snapshot truncated")]
    /// The file ends inside its header or a frame.
    Truncated,
    #[error("snapshot checksum does not match its contents")]
    /// The contents do not match the checksum (corrupt, or written under
    /// another key seed).
    Checksum,
    #[error("snapshot frame: {0}")]
    /// A frame inside does not decode.
    Frame(#[from] DecodeError),
    #[error("snapshot frame of an unexpected kind")]
    /// A frame inside is not a full-sync frame.
    UnexpectedFrame,
}

fn checksum(seed: KeySeed, body: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(seed.0 ^ 0x736e_6170_7368_6f74, seed.1);
    h.write(body);
    h.finish()
}

/// What a restore merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Slot values read from the snapshot.
    pub values: u64,
    /// Values that raised a local value.
    pub applied: u64,
    /// Values no larger than the local one, or for buckets too far ahead.
    pub stale: u64,
}

/// Every non-zero slot value of every live key, as snapshot bytes.
pub fn capture<C: Clock>(limiter: &Limiter<C>, now: Nanos) -> Vec<u8> {
    let mut out = Vec::new();
    // The slots that hold something, in one pass: a node's counters span
    // the whole slot space, and a pass per possible slot would be 65,536
    // passes over every key.
    let mut present = crate::peer_set::PeerSet::new();
    for (_, table) in limiter.tables() {
        table.for_each(|entry| {
            crate::window::SlotGrid::for_each_value(&*entry, &mut |_, slot, _| {
                if let Ok(slot) = u16::try_from(slot) {
                    present.insert(NodeSlot::new(slot));
                }
            });
        });
    }
    for slot in present.iter() {
        let mut packer = SlotsPacker::new(CHUNK_BYTES, slot.get(), 0, now.as_u64());
        limiter.each_slot_values(now, slot, &mut |CounterKey { limit, key }, v| {
            packer.push(
                limit.0,
                v.newest,
                KeySlots {
                    key: key.0,
                    buckets: v.buckets,
                },
            );
        });
        for frame in packer.finish() {
            let bytes = Frame::Sync(frame).encode();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
    }
    let mut file = Vec::with_capacity(HEADER_BYTES + out.len());
    file.extend_from_slice(MAGIC);
    file.push(VERSION);
    file.extend_from_slice(&(out.len() as u64).to_le_bytes());
    file.extend_from_slice(&checksum(limiter.config().seed, &out).to_le_bytes());
    file.extend_from_slice(&out);
    file
}

/// Checks a snapshot's header and checksum; its body if they hold.
fn verified(seed: KeySeed, bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(SnapshotError::BadMagic)?;
    let (&version, rest) = rest.split_first().ok_or(SnapshotError::Truncated)?;
    if version != VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(SnapshotError::Truncated)?;
    let (sum, body) = rest
        .split_first_chunk::<8>()
        .ok_or(SnapshotError::Truncated)?;
    if u64::try_from(body.len()).ok() != Some(u64::from_le_bytes(*len)) {
        return Err(SnapshotError::Truncated);
    }
    if checksum(seed, body) != u64::from_le_bytes(*sum) {
        return Err(SnapshotError::Checksum);
    }
    Ok(body)
}

/// Merges a snapshot into the limiter. Checks the whole snapshot before
/// merging anything: a corrupt file changes nothing.
pub fn restore<C: Clock>(
    limiter: &Limiter<C>,
    now: Nanos,
    bytes: &[u8],
) -> Result<RestoreStats, SnapshotError> {
    let frames = split(verified(limiter.config().seed, bytes)?)?;
    let mut stats = RestoreStats::default();
    for s in &frames {
        if usize::from(s.slot) >= limiter.config().slots {
            continue;
        }
        let merged = merge_into(limiter, now, 1, NodeSlot::new(s.slot), s);
        stats.values += merged.applied + merged.stale + merged.too_far_ahead;
        stats.applied += merged.applied;
        stats.stale += merged.stale + merged.too_far_ahead;
    }
    Ok(stats)
}

fn split(mut rest: &[u8]) -> Result<Vec<Slots>, SnapshotError> {
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or(SnapshotError::Truncated)?;
        let len = u32::from_le_bytes(*len) as usize;
        let frame = tail.get(..len).ok_or(SnapshotError::Truncated)?;
        match Frame::decode(frame)? {
            Frame::Sync(s) => frames.push(s),
            _ => return Err(SnapshotError::UnexpectedFrame),
        }
        rest = &tail[len..];
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Descriptors;
    use crate::limiter::LimiterConfig;
    use crate::rules::RuleSet;
    use crate::time::ManualClock;
    use std::sync::Arc;

    const RULES: &str = r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "sliding_window", limit = 100, window = "1h", precision = 4 } ]
    "#;

    fn limiter(clock: Arc<ManualClock>) -> Limiter<Arc<ManualClock>> {
        let config = LimiterConfig {
            slots: 3,
            ..LimiterConfig::default()
        };
        Limiter::with_clock(RuleSet::from_toml(RULES).unwrap(), config, clock).unwrap()
    }

    #[test]
    fn a_snapshot_brings_back_every_count() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
        let a = limiter(clock.clone());
        for i in 0..50 {
            let user = format!("u{}", i % 7);
            let f = [("user", user.as_str())];
            assert!(a
                .check(&Descriptors::new(&f).unwrap(), 1)
                .unwrap()
                .is_allowed());
        }
        let bytes = capture(&a, clock.now());
        clock.advance(Nanos::from_secs(60));
        let b = limiter(clock.clone());
        let stats = restore(&b, clock.now(), &bytes).unwrap();
        assert_eq!(stats.applied, 7);
        for i in 0..7 {
            let user = format!("u{i}");
            let f = [("user", user.as_str())];
            let d = Descriptors::new(&f).unwrap();
            assert_eq!(
                a.check(&d, 0).unwrap().quota.unwrap().remaining,
                b.check(&d, 0).unwrap().quota.unwrap().remaining
            );
        }
        // Restoring again changes nothing.
        assert_eq!(restore(&b, clock.now(), &bytes).unwrap().applied, 0);
    }

    #[test]
    fn corrupt_snapshots_are_refused_whole() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
        let a = limiter(clock.clone());
        let f = [("user", "x")];
        a.check(&Descriptors::new(&f).unwrap(), 1).unwrap();
        let bytes = capture(&a, clock.now());
        let b = limiter(clock.clone());
        assert!(matches!(
            restore(&b, clock.now(), b"nope"),
            Err(SnapshotError::BadMagic)
        ));
        assert!(restore(&b, clock.now(), &bytes[..bytes.len() - 1]).is_err());
        // One flipped byte anywhere, header or body, is refused.
        for at in [7, 9, 17, bytes.len() / 2, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x01;
            assert!(restore(&b, clock.now(), &flipped).is_err(), "byte {at}");
        }
        let mut v1 = b"DRLSNAP1".to_vec();
        v1.extend_from_slice(&bytes[HEADER_BYTES..]);
        assert!(matches!(
            restore(&b, clock.now(), &v1),
            Err(SnapshotError::UnsupportedVersion(b'1'))
        ));
        assert_eq!(b.keys_tracked(), 0, "nothing was merged");
    }

    #[test]
    fn a_changed_count_with_a_valid_frame_is_caught_by_the_checksum() {
        // The fault the issue reports: one count changed, the frame still
        // decodes. Only the checksum can tell.
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
        let a = limiter(clock.clone());
        let f = [("user", "x")];
        for _ in 0..3 {
            a.check(&Descriptors::new(&f).unwrap(), 1).unwrap();
        }
        let bytes = capture(&a, clock.now());
        let body = &bytes[HEADER_BYTES..];
        let mut forged = body.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 0x01;
        let mut file = bytes[..HEADER_BYTES].to_vec();
        file.extend_from_slice(&forged);
        let b = limiter(clock.clone());
        assert!(matches!(
            restore(&b, clock.now(), &file),
            Err(SnapshotError::Checksum)
        ));
    }

    #[test]
    fn a_snapshot_of_another_cluster_is_refused() {
        let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
        let a = limiter(clock.clone());
        a.check(&Descriptors::new(&[("user", "x")]).unwrap(), 1)
            .unwrap();
        let bytes = capture(&a, clock.now());
        let other = Limiter::with_clock(
            RuleSet::from_toml(RULES).unwrap(),
            LimiterConfig {
                slots: 3,
                seed: KeySeed(1, 2),
                ..LimiterConfig::default()
            },
            clock.clone(),
        )
        .unwrap();
        assert!(matches!(
            restore(&other, clock.now(), &bytes),
            Err(SnapshotError::Checksum)
        ));
    }
}
