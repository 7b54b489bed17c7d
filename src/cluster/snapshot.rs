//! Local snapshots: every slot of every live key, so that a whole-cluster
//! restart keeps long windows (hours, days).
//!
//! A snapshot is the magic `DRLSNAP1` followed by length-prefixed wire
//! frames (`Sync` frames, one series per slot), so it is written and read by
//! the same codec and merged by the same per-slot maximum as gossip. Restoring
//! a snapshot can therefore only raise counts: an old snapshot, or one
//! restored twice, never lowers what peers already taught the node. Buckets
//! that expired while the node was down are skipped as stale.
//!
//! Pure functions over bytes: the node driver does the file I/O (write to a
//! temporary file, then rename, so a crash mid-write leaves the previous
//! snapshot intact).

use crate::cluster::replication::merge_into;
use crate::core::slot::PnSlot;
use crate::core::time::{Clock, Nanos};
use crate::core::window::SlotGrid;
use crate::core::wire::{BucketSlot, DecodeError, Frame, KeySlots, Slots, SlotsPacker};
use crate::limiter::Limiter;

const MAGIC: &[u8; 8] = b"DRLSNAP1";
const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot truncated")]
    Truncated,
    #[error("snapshot frame: {0}")]
    Frame(#[from] DecodeError),
    #[error("snapshot frame of an unexpected kind")]
    UnexpectedFrame,
}

/// What a restore merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub values: u64,
    pub applied: u64,
    pub stale: u64,
}

/// Every non-zero slot value of every live key, as snapshot bytes.
pub fn capture<C: Clock>(limiter: &Limiter<C>, now: Nanos) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let slots = limiter.config().slots;
    for slot in 0..slots {
        let mut packer = SlotsPacker::new(CHUNK_BYTES, slot as u16, 0, now.as_u64());
        for (limit, table) in limiter.tables() {
            table.for_each(|entry| {
                let spec = entry.spec();
                let newest = entry.newest(spec.epoch(now));
                let b = spec.buckets() as u64;
                let buckets: Vec<BucketSlot> = (0..b.min(newest + 1))
                    .filter_map(|back| {
                        let row = ((newest - back) % b) as usize;
                        let v = entry.get(row, slot);
                        (v != PnSlot::ZERO).then_some(BucketSlot {
                            back: back as u8,
                            p: v.p,
                            n: v.n,
                        })
                    })
                    .collect();
                if !buckets.is_empty() {
                    packer.push(
                        limit,
                        newest,
                        KeySlots {
                            key: entry.key(),
                            buckets,
                        },
                    );
                }
            });
        }
        for frame in packer.finish() {
            let bytes = Frame::Sync(frame).encode();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
    }
    out
}

/// Merges a snapshot into the limiter. Checks the whole snapshot before
/// merging anything: a corrupt file changes nothing.
pub fn restore<C: Clock>(
    limiter: &Limiter<C>,
    now: Nanos,
    bytes: &[u8],
) -> Result<RestoreStats, SnapshotError> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(SnapshotError::BadMagic)?;
    let frames = split(rest)?;
    let mut stats = RestoreStats::default();
    for s in &frames {
        if usize::from(s.slot) >= limiter.config().slots {
            continue;
        }
        let merged = merge_into(limiter, now, 1, s.slot, s);
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
    use crate::core::descriptor::Descriptors;
    use crate::core::rules::RuleSet;
    use crate::core::time::ManualClock;
    use crate::limiter::LimiterConfig;
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
        let mut flipped = bytes.clone();
        flipped[9] ^= 0xff;
        assert!(restore(&b, clock.now(), &flipped).is_err());
        assert_eq!(b.keys_tracked(), 0, "nothing was merged");
    }
}
