//! Fixed window: at most `limit` per aligned window.

use std::num::NonZeroU32;

use super::{nonzero, ParamError, RateAlgorithm, Summary, Verdict};
use crate::time::Nanos;
use crate::window::{WindowCounts, WindowSpec};

/// At most `limit` in each window `[k·w, (k+1)·w)`. Exact with respect to its
/// own definition: one bucket per window, nothing estimated. A client may
/// still get `2·limit` across a window boundary, which is why the sliding
/// window exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    limit: NonZeroU32,
    spec: WindowSpec,
}

impl FixedWindow {
    /// Fails on a zero `limit` or a `window` shorter than 1 ms.
    pub fn new(limit: u32, window: Nanos) -> Result<Self, ParamError> {
        Ok(FixedWindow {
            limit: nonzero("limit", limit)?,
            spec: WindowSpec::new(window, 1)?,
        })
    }
}

impl RateAlgorithm for FixedWindow {
    fn window(&self) -> WindowSpec {
        self.spec
    }
    fn quota(&self) -> u64 {
        u64::from(self.limit.get())
    }
    fn quota_period(&self) -> Nanos {
        self.spec.granularity()
    }
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
        let limit = self.quota();
        let cost = u64::from(cost);
        if cost > limit {
            return Verdict::Never { capacity: limit };
        }
        let used = counts.nets[counts.nets.len() - 1];
        if let Some(v) = self.admit(counts.now, counts.current_epoch(), used, cost) {
            return v;
        }
        let end = self.spec.epoch_start(counts.current_epoch() + 1);
        let until_end = end - counts.now;
        let reset_after = if used == 0 { Nanos::ZERO } else { until_end };
        Verdict::Deny {
            remaining: limit.saturating_sub(used),
            retry_after: until_end,
            reset_after,
        }
    }

    fn admit_summary(&self, now: Nanos, now_epoch: u64, s: Summary, cost: u32) -> Option<Verdict> {
        self.admit(now, now_epoch, s.newer, u64::from(cost))
    }
}

impl FixedWindow {
    /// The admission of `cost` with `used` already counted in the current
    /// window; `None` if it does not fit. Both [`RateAlgorithm::decide`] and
    /// [`RateAlgorithm::admit_summary`] admit through here.
    #[inline]
    fn admit(&self, now: Nanos, now_epoch: u64, used: u64, cost: u64) -> Option<Verdict> {
        let limit = self.quota();
        if used.saturating_add(cost) > limit {
            return None;
        }
        Some(Verdict::Allow {
            remaining: limit - used - cost,
            reset_after: self.spec.epoch_start(now_epoch + 1) - now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_waits_for_the_next_window() {
        let a = FixedWindow::new(3, Nanos::from_secs(1)).unwrap();
        let now = Nanos::from_millis(10_250);
        let counts = |used: u64| [used];
        let v = a.decide(
            &WindowCounts {
                spec: a.window(),
                now,
                nets: &counts(2),
            },
            1,
        );
        assert_eq!(
            v,
            Verdict::Allow {
                remaining: 0,
                reset_after: Nanos::from_millis(750)
            }
        );
        let v = a.decide(
            &WindowCounts {
                spec: a.window(),
                now,
                nets: &counts(3),
            },
            1,
        );
        assert_eq!(
            v,
            Verdict::Deny {
                remaining: 0,
                retry_after: Nanos::from_millis(750),
                reset_after: Nanos::from_millis(750)
            }
        );
        let v = a.decide(
            &WindowCounts {
                spec: a.window(),
                now,
                nets: &counts(0),
            },
            4,
        );
        assert_eq!(v, Verdict::Never { capacity: 3 });
    }
}
