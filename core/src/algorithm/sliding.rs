//! Sliding window counter.
//!
//! The window `(now − w, now]` is covered by `precision` whole sub-buckets of
//! length `w / precision` plus the part of one older sub-bucket that still
//! overlaps it. That older bucket's count is weighted by its overlap, assuming
//! its hits were spread evenly (Cloudflare's estimator, generalised to
//! several sub-buckets). The exact count of the window therefore lies in
//! `[full, full + oldest]` and the estimate never strays from it by more than
//! the oldest bucket's count times the unknown part of the overlap.

use std::num::NonZeroU32;

use super::{nanos_u128, nonzero, ParamError, RateAlgorithm, Summary, Verdict};
use crate::time::Nanos;
use crate::window::{WindowCounts, WindowSpec, MAX_BUCKETS};

#[derive(Clone, Debug, PartialEq, Eq)]
/// Sliding window counter: at most `limit` hits in any window of length
/// `window`, estimated from `precision` sub-buckets (see the module docs).
pub struct SlidingWindow {
    limit: NonZeroU32,
    window: Nanos,
    spec: WindowSpec,
}

impl SlidingWindow {
    /// `precision` is the number of sub-buckets per window (1 keeps two
    /// buckets per key: the classic and smallest form).
    pub fn new(limit: u32, window: Nanos, precision: u32) -> Result<Self, ParamError> {
        let limit = nonzero("limit", limit)?;
        let k = nonzero("precision", precision)?.get();
        if k as usize + 1 > MAX_BUCKETS {
            return Err(ParamError::Range {
                field: "precision",
                reason: format!("at most {} sub-buckets", MAX_BUCKETS - 1),
            });
        }
        if !window.as_u64().is_multiple_of(u64::from(k)) {
            return Err(ParamError::Precision {
                window,
                precision: k,
            });
        }
        let granularity = Nanos::new(window.as_u64() / u64::from(k));
        let spec =
            WindowSpec::new(granularity, k as usize + 1).map_err(|_| ParamError::Precision {
                window,
                precision: k,
            })?;
        Ok(SlidingWindow {
            limit,
            window,
            spec,
        })
    }
}

impl RateAlgorithm for SlidingWindow {
    fn window(&self) -> WindowSpec {
        self.spec
    }
    fn quota(&self) -> u64 {
        u64::from(self.limit.get())
    }
    fn quota_period(&self) -> Nanos {
        self.window
    }

    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
        let limit = u128::from(self.limit.get());
        if u128::from(cost) > limit {
            return Verdict::Never {
                capacity: limit as u64,
            };
        }
        let nets = counts.nets;
        let g = u128::from(self.spec.granularity().as_u64());
        let elapsed = self.elapsed(counts.now, counts.current_epoch());
        let full: u128 = nets[1..].iter().map(|&n| u128::from(n)).sum();
        let oldest = u128::from(nets[0]);
        if cost > 0 {
            if let Some(v) = self.admit(elapsed, full, oldest, cost, nets.len()) {
                return v;
            }
        }
        let cost = u128::from(cost);
        // Everything scaled by g to stay in integers.
        let used_scaled = full * g + oldest * (g - elapsed);
        let budget_scaled = limit * g;
        if used_scaled + cost * g <= budget_scaled {
            // A status query (cost 0) counts nothing: the window is whole
            // again once its newest non-empty bucket has left it.
            return Verdict::Allow {
                remaining: ((budget_scaled - used_scaled) / g) as u64,
                reset_after: self.reset_after(nets, elapsed, g),
            };
        }
        Verdict::Deny {
            remaining: (budget_scaled.saturating_sub(used_scaled) / g) as u64,
            retry_after: self.retry_after(nets, elapsed, g, limit, cost),
            reset_after: self.reset_after(nets, elapsed, g),
        }
    }

    fn admit_summary(&self, now: Nanos, now_epoch: u64, s: Summary, cost: u32) -> Option<Verdict> {
        if cost == 0 || cost > self.limit.get() {
            return None;
        }
        let elapsed = self.elapsed(now, now_epoch);
        self.admit(
            elapsed,
            u128::from(s.newer),
            u128::from(s.oldest),
            cost,
            self.spec.buckets(),
        )
    }
}

impl SlidingWindow {
    /// Time since the start of the current bucket.
    #[inline]
    fn elapsed(&self, now: Nanos, now_epoch: u64) -> u128 {
        u128::from((now - self.spec.epoch_start(now_epoch)).as_u64())
    }

    /// The admission of `cost` (at least 1, at most the limit) `elapsed`
    /// into the current bucket, given the whole newer buckets' count
    /// `full` and the oldest bucket's `oldest`, in a window of `buckets`;
    /// `None` if it does not fit.
    /// Both [`RateAlgorithm::decide`] and [`RateAlgorithm::admit_summary`]
    /// admit through here, so they cannot differ.
    #[inline]
    fn admit(
        &self,
        elapsed: u128,
        full: u128,
        oldest: u128,
        cost: u32,
        buckets: usize,
    ) -> Option<Verdict> {
        let limit = u128::from(self.limit.get());
        let cost = u128::from(cost);
        let g = u128::from(self.spec.granularity().as_u64());
        // The admitted cost lands in the current bucket: the window is
        // back to full only once that bucket has left it.
        let reset_after = nanos_u128(g - elapsed + (buckets as u128 - 1) * g);
        let remaining = if oldest == 0 {
            // Nothing to weigh (a key younger than the window): whole counts.
            if full + cost > limit {
                return None;
            }
            limit - full - cost
        } else {
            // Everything scaled by g to stay in integers.
            let used_scaled = full * g + oldest * (g - elapsed);
            let budget_scaled = limit * g;
            if used_scaled + cost * g > budget_scaled {
                return None;
            }
            // The common case fits 64 bits; a 128-bit division is a call.
            let left = budget_scaled - used_scaled;
            let whole = match u64::try_from(left) {
                Ok(left) => u128::from(left / g as u64),
                Err(_) => left / g,
            };
            whole - cost
        };
        Some(Verdict::Allow {
            remaining: remaining as u64,
            reset_after,
        })
    }

    /// The wait, with no new arrivals, until `cost` fits. Phase `j` is the
    /// time during which `nets[j]` is the partially overlapping bucket.
    fn retry_after(&self, nets: &[u64], elapsed: u128, g: u128, limit: u128, cost: u128) -> Nanos {
        let mut offset: u128 = 0;
        for j in 0..nets.len() {
            let x_start = if j == 0 { elapsed } else { 0 };
            let partial = u128::from(nets[j]);
            let full: u128 = nets[j + 1..].iter().map(|&n| u128::from(n)).sum();
            if full + cost <= limit {
                // Need full·g + partial·(g − x) + cost·g ≤ limit·g.
                let room = (limit - full - cost) * g;
                let x_needed = match room.checked_div(partial) {
                    None => x_start,
                    Some(fits) => g.saturating_sub(fits).max(x_start),
                };
                // Integer division rounded `room / partial` down, so x_needed
                // is never early.
                if x_needed < g || partial == 0 {
                    return nanos_u128(offset + x_needed - x_start);
                }
            }
            offset += g - x_start;
        }
        nanos_u128(offset)
    }

    fn reset_after(&self, nets: &[u64], elapsed: u128, g: u128) -> Nanos {
        match nets.iter().rposition(|&n| n > 0) {
            None => Nanos::ZERO,
            Some(j) => nanos_u128(g - elapsed + j as u128 * g),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(a: &SlidingWindow, now: Nanos, nets: &[u64], cost: u32) -> Verdict {
        a.decide(
            &WindowCounts {
                spec: a.window(),
                now,
                nets,
            },
            cost,
        )
    }

    #[test]
    fn weights_the_previous_window_by_its_overlap() {
        let a = SlidingWindow::new(10, Nanos::from_secs(1), 1).unwrap();
        // 25% into the current second: previous counts 75%.
        let now = Nanos::from_millis(7_250);
        // 8 * 0.75 + 3 = 9 used: one more fits, two do not.
        assert!(decide(&a, now, &[8, 3], 1).is_allowed());
        assert!(!decide(&a, now, &[8, 3], 2).is_allowed());
    }

    #[test]
    fn retry_after_is_when_the_overlap_has_shrunk_enough() {
        let a = SlidingWindow::new(10, Nanos::from_secs(1), 1).unwrap();
        let now = Nanos::from_millis(7_250);
        // 8·(1 − x) + 3 + 1 ≤ 10  ⇔  x ≥ 0.25 … already there; ask for 2:
        // 8·(1 − x) + 5 ≤ 10  ⇔  x ≥ 0.375, i.e. 125 ms from now.
        match decide(&a, now, &[8, 3], 2) {
            Verdict::Deny { retry_after, .. } => assert_eq!(retry_after, Nanos::from_millis(125)),
            v => panic!("expected a denial, got {v:?}"),
        }
        // And at that moment it is indeed allowed.
        assert!(decide(&a, Nanos::from_millis(7_375), &[8, 3], 2).is_allowed());
    }

    #[test]
    fn retry_after_crosses_bucket_boundaries() {
        let a = SlidingWindow::new(10, Nanos::from_secs(1), 1).unwrap();
        let now = Nanos::from_millis(7_500);
        // Current bucket full: must wait until it is the old one and has
        // shrunk to 9: 10·(1 − x) ≤ 9 ⇔ x ≥ 0.1 into the next second.
        match decide(&a, now, &[0, 10], 1) {
            Verdict::Deny {
                retry_after,
                reset_after,
                ..
            } => {
                assert_eq!(retry_after, Nanos::from_millis(600));
                assert_eq!(reset_after, Nanos::from_millis(1_500));
            }
            v => panic!("expected a denial, got {v:?}"),
        }
    }

    #[test]
    fn the_first_hit_of_a_key_resets_when_its_bucket_leaves_the_window() {
        let a = SlidingWindow::new(100, Nanos::from_secs(3600), 1).unwrap();
        let now = Nanos::from_secs(7_200 + 600);
        // Nothing counted yet: the hit being admitted is what must expire.
        match decide(&a, now, &[0, 0], 1) {
            Verdict::Allow {
                remaining,
                reset_after,
            } => {
                assert_eq!(remaining, 99);
                assert_eq!(reset_after, Nanos::from_secs(3_000 + 3_600));
            }
            v => panic!("expected an allowance, got {v:?}"),
        }
        // The whole limit at once: nothing left, and not back until then.
        match decide(&a, now, &[0, 0], 100) {
            Verdict::Allow {
                remaining,
                reset_after,
            } => {
                assert_eq!(remaining, 0);
                assert!(reset_after > Nanos::ZERO);
            }
            v => panic!("expected an allowance, got {v:?}"),
        }
        // A cost-0 peek at an empty window has nothing to reset.
        match decide(&a, now, &[0, 0], 0) {
            Verdict::Allow { reset_after, .. } => assert_eq!(reset_after, Nanos::ZERO),
            v => panic!("expected an allowance, got {v:?}"),
        }
    }

    #[test]
    fn precision_must_divide_the_window() {
        assert!(SlidingWindow::new(10, Nanos::from_millis(1000), 3).is_err());
        assert!(SlidingWindow::new(10, Nanos::from_millis(1200), 3).is_ok());
        assert!(SlidingWindow::new(0, Nanos::from_secs(1), 1).is_err());
        assert!(SlidingWindow::new(10, Nanos::from_secs(1), 64).is_err());
    }

    #[test]
    fn cost_above_the_limit_is_never_admitted() {
        let a = SlidingWindow::new(10, Nanos::from_secs(1), 1).unwrap();
        assert_eq!(
            decide(&a, Nanos::ZERO, &[0, 0], 11),
            Verdict::Never { capacity: 10 }
        );
    }

    /// The most hits any window `(t − w, t]` admits when a client sends a
    /// burst of `limit` requests within `burst_ms` starting at `start_ms`,
    /// then one request every millisecond for two windows, each counted
    /// when allowed (one node, exact counts: the estimator alone).
    fn worst_window(a: &SlidingWindow, burst_ms: u64, start_ms: u64) -> u64 {
        use crate::slot::NodeSlot;
        use crate::window::BucketWindow;
        let spec = a.window();
        let mut w = BucketWindow::new(spec, 1);
        let base = Nanos::from_secs(1_000);
        let limit = a.quota();
        let mut admitted: Vec<u64> = Vec::new();
        let mut try_at = |w: &mut BucketWindow, ms: u64| {
            let now = base + Nanos::from_millis(ms);
            let mut nets = vec![0u64; spec.buckets()];
            w.read(now, &mut nets);
            let counts = WindowCounts {
                spec,
                now,
                nets: &nets,
            };
            if let Verdict::Allow { .. } = a.decide(&counts, 1) {
                w.add(now, NodeSlot::new(0), 1);
                admitted.push(ms);
            }
        };
        for i in 0..limit {
            try_at(&mut w, start_ms + i * burst_ms / limit);
        }
        for ms in start_ms + burst_ms..start_ms + 2_000 {
            try_at(&mut w, ms);
        }
        // Slide a 1000 ms window over the admissions.
        let window_ms = a.quota_period().as_u64() / 1_000_000;
        admitted
            .iter()
            .map(|&end| {
                admitted
                    .iter()
                    .filter(|&&t| t + window_ms > end && t <= end)
                    .count() as u64
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_burst_in_one_sub_bucket_overshoots_whatever_the_precision() {
        // The sample rules' free tier: 5 per second. A burst of 5 within
        // 10 ms, placed anywhere in a second, then steady probing.
        let window = Nanos::from_secs(1);
        let worst = |precision| {
            let a = SlidingWindow::new(5, window, precision).unwrap();
            (0..1_000u64)
                .step_by(7)
                .map(|start| worst_window(&a, 10, start))
                .max()
                .unwrap()
        };
        let (p1, p10) = (worst(1), worst(10));
        // The estimator assumes the oldest bucket's hits were spread evenly;
        // a burst placed at the end of a bucket breaks that whatever the
        // bucket's length, so the stated bound (limit + the oldest bucket's
        // count, here 2·limit) is what holds, at every precision. More
        // precision shortens the time the error lasts (one sub-bucket), not
        // its worst size when one sub-bucket holds the whole limit.
        assert!(p1 <= 10 && p10 <= 10, "bound: precision 1 {p1}, 10 {p10}");
        assert_eq!((p1, p10), (9, 9));
    }
}
