//! A clock corrected toward the cluster's, slewed and never stepped.
//!
//! A node's decisions and window boundaries read `raw + c(raw)`: its own
//! clock plus a correction that the clock discipline
//! (`cluster::clock_sync`) steers toward the cluster's time. The
//! correction never jumps back: a correction forward (a clock behind the
//! cluster's) is applied at once, which only moves time ahead; a correction
//! backward (a clock ahead) is slewed, at most [`SLEW_NUM`]/[`SLEW_DEN`] of
//! the raw clock's rate, so the corrected clock runs at half speed while
//! it lets the cluster catch up, and never runs backwards (windows never
//! jump back, a token bucket never sees time reversed).
//!
//! The correction is a function of the raw time, written by one task (the
//! node's) and read on every decision, so it is kept in atomics behind a
//! sequence counter: readers never block and never see a torn update.

use std::sync::atomic::{fence, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::time::Nanos;

/// The fastest the correction moves, as a fraction of elapsed raw time.
pub const SLEW_NUM: i128 = 1;
/// See [`SLEW_NUM`].
pub const SLEW_DEN: i128 = 2;

/// The correction's state: it was `from` at raw time `at` and moves toward
/// `target` at the slew rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slew {
    at: u64,
    from: i64,
    target: i64,
}

impl Slew {
    fn offset_at(&self, raw: u64) -> i64 {
        let elapsed = i128::from(raw.saturating_sub(self.at));
        let most = elapsed * SLEW_NUM / SLEW_DEN;
        let gap = i128::from(self.target) - i128::from(self.from);
        // Forward at once (time only runs ahead faster), backward slewed.
        let moved = gap.clamp(-most, gap.max(0));
        (i128::from(self.from) + moved) as i64
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Odd while the writer updates the three fields.
    seq: AtomicU64,
    at: AtomicU64,
    from: AtomicI64,
    target: AtomicI64,
}

/// The correction of one node's clock, shared between the task that steers
/// it and every reader of the corrected clock. Cheap to clone; starts at
/// zero (the raw clock as it is).
#[derive(Clone, Debug, Default)]
pub struct ClockCorrection {
    shared: Arc<Shared>,
}

impl ClockCorrection {
    /// No correction.
    pub fn new() -> Self {
        Self::default()
    }

    fn load(&self) -> Slew {
        let s = &self.shared;
        loop {
            let before = s.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let slew = Slew {
                at: s.at.load(Ordering::Relaxed),
                from: s.from.load(Ordering::Relaxed),
                target: s.target.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) == before {
                return slew;
            }
        }
    }

    /// The correction, in nanoseconds, at raw time `raw`.
    pub fn offset_at(&self, raw: Nanos) -> i64 {
        self.load().offset_at(raw.as_u64())
    }

    /// Where the correction is heading.
    pub fn target(&self) -> i64 {
        self.load().target
    }

    /// The corrected time at raw time `raw`.
    pub fn corrected(&self, raw: Nanos) -> Nanos {
        let t = i128::from(raw.as_u64()) + i128::from(self.offset_at(raw));
        Nanos::new(t.clamp(0, i128::from(u64::MAX)) as u64)
    }

    /// From raw time `raw` on, moves the correction toward `target` at the
    /// slew rate, starting from where it is now (so it never jumps). Only
    /// one task steers a correction.
    pub fn steer(&self, raw: Nanos, target: i64) {
        let from = self.offset_at(raw);
        let s = &self.shared;
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        s.at.store(raw.as_u64(), Ordering::Relaxed);
        s.from.store(from, Ordering::Relaxed);
        s.target.store(target, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn starts_at_zero_and_slews_toward_the_target() {
        let c = ClockCorrection::new();
        let t0 = Nanos::new(1_000_000 * MS);
        assert_eq!(c.corrected(t0), t0);
        c.steer(t0, -500 * MS as i64);
        assert_eq!(c.offset_at(t0), 0, "no jump when steered");
        assert_eq!(c.offset_at(t0 + Nanos::new(100 * MS)), -50 * MS as i64);
        assert_eq!(c.offset_at(t0 + Nanos::new(1_000 * MS)), -500 * MS as i64);
        assert_eq!(c.offset_at(t0 + Nanos::new(5_000 * MS)), -500 * MS as i64);
        // Steered again half-way: it carries on from where it is.
        let mid = t0 + Nanos::new(400 * MS);
        // Forward at once.
        c.steer(mid, 100 * MS as i64);
        assert_eq!(c.offset_at(mid), 100 * MS as i64);
        assert_eq!(c.offset_at(mid + Nanos::new(600 * MS)), 100 * MS as i64);
        assert_eq!(c.target(), 100 * MS as i64);
    }

    #[test]
    fn the_corrected_clock_never_runs_backwards() {
        let c = ClockCorrection::new();
        let mut raw = 5_000 * MS;
        let mut last = Nanos::ZERO;
        for i in 0..2_000u64 {
            if i % 37 == 0 {
                // Alternate targets far apart in both directions.
                let target = if (i / 37) % 2 == 0 { -900 } else { 700 };
                c.steer(Nanos::new(raw), target * MS as i64);
            }
            let now = c.corrected(Nanos::new(raw));
            assert!(now >= last, "at raw {raw}: {now:?} < {last:?}");
            last = now;
            raw += (i % 7) * MS / 3;
        }
    }
}
