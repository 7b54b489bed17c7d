//! The exact oracle: what a limit means, evaluated on an admitted history.
//!
//! Given every admission of one key on the reference clock, the oracle says
//! by how much each window held more than the limit allows:
//!
//! - sliding window: every window `(t − w, t]` ending at an admission
//!   instant (an exact sliding log, not the counter's estimate);
//! - fixed window: every aligned window `[k·w, (k+1)·w)`;
//! - token bucket, leaky bucket and GCRA: the burst-plus-rate envelope,
//!   `admitted in (s, t] ≤ capacity + rate·(t − s)` for every `s < t`, whose
//!   worst `s` Lindley's recursion finds exactly (debt `D ← max(0, D −
//!   rate·Δt) + 1`). All three meters enforce that envelope: the leaky
//!   bucket (as a meter) with its capacity and leak rate, GCRA with its
//!   burst as the capacity and `limit` per `per` as the rate. The property
//!   tests below hold the greedy limiter of the envelope to the exact
//!   continuous-time references the algorithms' own differential tests use.
//!
//! Overshoot is reported per *(key, period)*: the worst window ending in each
//! aligned period (of length `w`, or `per` for the bucket) that saw an
//! admission, as a fraction of the quota. The *excess* is how many admissions
//! must go for the history to respect the limit: an exact limiter that kept
//! the earliest admissions that fit (greedy keeps the most for these
//! constraints) drops exactly that many.

use std::collections::VecDeque;

use drl_core::time::Nanos;

use crate::scenario::LimitSpec;

/// Overshoot of one key's history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyOvershoot {
    /// Worst overshoot (fraction of the quota) per period with an admission.
    pub samples: Vec<f64>,
    /// Admissions an exact limiter would have refused.
    pub excess: u64,
}

/// `times`: admission instants on the reference clock (absolute ns), in
/// order, one hit each.
pub fn overshoot(spec: &LimitSpec, times: &[u64]) -> KeyOvershoot {
    match *spec {
        LimitSpec::Sliding { limit, window, .. } => sliding(limit, window.as_u64(), times),
        LimitSpec::Fixed { limit, window } => fixed(limit, window.as_u64(), times),
        LimitSpec::TokenBucket { .. } | LimitSpec::LeakyBucket { .. } | LimitSpec::Gcra { .. } => {
            let (capacity, rate, per) = spec.envelope().unwrap_or((0, 0, Nanos::new(1)));
            bucket(capacity, rate, per.as_u64().max(1), times)
        }
    }
}

/// What an exact single limiter of `spec`, seeing every arrival of one key
/// at once (one hit each, in order), admits: `true` per arrival it keeps.
/// The greedy choice (keep each arrival that fits among the kept ones) is
/// the limiter's own decision, and the `excess` of [`overshoot`] is the
/// count of `false` on an admitted history.
pub fn exact_decisions(spec: &LimitSpec, times: &[u64]) -> Vec<bool> {
    match *spec {
        LimitSpec::Sliding { limit, window, .. } => {
            let w = window.as_u64();
            let mut kept: VecDeque<u64> = VecDeque::new();
            times
                .iter()
                .map(|&t| {
                    while kept.front().is_some_and(|&k| k + w <= t) {
                        kept.pop_front();
                    }
                    let fits = (kept.len() as u64) < limit;
                    if fits {
                        kept.push_back(t);
                    }
                    fits
                })
                .collect()
        }
        LimitSpec::Fixed { limit, window } => {
            let w = window.as_u64().max(1);
            let mut current = (u64::MAX, 0u64);
            times
                .iter()
                .map(|&t| {
                    if current.0 != t / w {
                        current = (t / w, 0);
                    }
                    let fits = current.1 < limit;
                    current.1 += u64::from(fits);
                    fits
                })
                .collect()
        }
        _ => {
            let (capacity, rate, per) = spec.envelope().unwrap_or((0, 0, Nanos::new(1)));
            bucket_decisions(capacity, rate, per.as_u64().max(1), times)
        }
    }
}

/// The greedy limiter of the burst-plus-rate envelope: debt in units of
/// 1/per tokens (one hit is `per` units, `Δt` ns pay back `rate·Δt`).
fn bucket_decisions(capacity: u64, rate: u64, per: u64, times: &[u64]) -> Vec<bool> {
    let full = u128::from(capacity) * u128::from(per);
    let (hit, rate) = (u128::from(per), u128::from(rate));
    let mut kept_debt = 0u128;
    let mut last: Option<u64> = None;
    times
        .iter()
        .map(|&t| {
            let dt = u128::from(t - last.unwrap_or(t));
            last = Some(t);
            kept_debt = kept_debt.saturating_sub(rate * dt);
            let fits = kept_debt + hit <= full;
            if fits {
                kept_debt += hit;
            }
            fits
        })
        .collect()
}

/// Collects the worst value per period.
struct PerPeriod {
    period: u64,
    current: Option<(u64, f64)>,
    samples: Vec<f64>,
}

impl PerPeriod {
    fn new(period: u64) -> Self {
        PerPeriod {
            period,
            current: None,
            samples: Vec::new(),
        }
    }
    fn push(&mut self, t: u64, v: f64) {
        let p = t / self.period;
        match &mut self.current {
            Some((cur, worst)) if *cur == p => *worst = worst.max(v),
            _ => {
                if let Some((_, worst)) = self.current.take() {
                    self.samples.push(worst);
                }
                self.current = Some((p, v));
            }
        }
    }
    fn finish(mut self) -> Vec<f64> {
        if let Some((_, worst)) = self.current.take() {
            self.samples.push(worst);
        }
        self.samples
    }
}

fn ratio(over: u64, quota: u64) -> f64 {
    over as f64 / quota.max(1) as f64
}

fn sliding(limit: u64, w: u64, times: &[u64]) -> KeyOvershoot {
    let mut per = PerPeriod::new(w);
    let mut lo = 0;
    for (i, &t) in times.iter().enumerate() {
        while times[lo] + w <= t {
            lo += 1;
        }
        let count = (i - lo + 1) as u64;
        per.push(t, ratio(count.saturating_sub(limit), limit));
    }
    // Greedy exact limiter: keep an admission when the window it closes
    // still has room among the kept ones.
    let mut kept: VecDeque<u64> = VecDeque::new();
    let mut excess = 0;
    for &t in times {
        while kept.front().is_some_and(|&k| k + w <= t) {
            kept.pop_front();
        }
        if (kept.len() as u64) < limit {
            kept.push_back(t);
        } else {
            excess += 1;
        }
    }
    KeyOvershoot {
        samples: per.finish(),
        excess,
    }
}

fn fixed(limit: u64, w: u64, times: &[u64]) -> KeyOvershoot {
    let mut samples = Vec::new();
    let mut excess = 0;
    let mut i = 0;
    while i < times.len() {
        let window = times[i] / w;
        let mut j = i;
        while j < times.len() && times[j] / w == window {
            j += 1;
        }
        let over = ((j - i) as u64).saturating_sub(limit);
        samples.push(ratio(over, limit));
        excess += over;
        i = j;
    }
    KeyOvershoot { samples, excess }
}

fn bucket(capacity: u64, refill: u64, per: u64, times: &[u64]) -> KeyOvershoot {
    // Debt in units of 1/per tokens: one hit is `per` units, `Δt` ns refill
    // `refill·Δt` units. Exact in integers.
    let full = u128::from(capacity) * u128::from(per);
    let hit = u128::from(per);
    let rate = u128::from(refill);
    let mut samples = PerPeriod::new(per);
    let mut debt = 0u128;
    let mut last: Option<u64> = None;
    for &t in times {
        let dt = u128::from(t - last.unwrap_or(t));
        last = Some(t);
        debt = debt.saturating_sub(rate * dt) + hit;
        let over = debt.saturating_sub(full);
        samples.push(t, over as f64 / full.max(1) as f64);
    }
    let excess = bucket_decisions(capacity, refill, per, times)
        .iter()
        .filter(|&&kept| !kept)
        .count() as u64;
    KeyOvershoot {
        samples: samples.finish(),
        excess,
    }
}

/// Nearest-rank percentile of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
#[path = "../../core/tests/exact/meters.rs"]
mod meters;

#[cfg(test)]
mod tests {
    use super::meters::{Exact, ExactGcra, ExactLeakyBucket, ExactTokenBucket};
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn sliding_log_counts_every_window_ending_at_an_admission() {
        let spec = LimitSpec::Sliding {
            limit: 2,
            window: Nanos::from_secs(1),
            precision: 1,
        };
        // Three hits within one second: one too many; the fourth, a second
        // after the first, is fine again.
        let times = [10 * S, 10 * S + 100, 10 * S + 200, 11 * S + 150];
        let o = overshoot(&spec, &times);
        assert_eq!(o.excess, 1);
        assert_eq!(o.samples, vec![0.5, 0.0]);
        // (t − w, t] excludes t − w itself.
        let o = overshoot(&spec, &[10 * S, 10 * S + 1, 11 * S]);
        assert_eq!(o.excess, 0);
    }

    #[test]
    fn fixed_windows_are_aligned() {
        let spec = LimitSpec::Fixed {
            limit: 2,
            window: Nanos::from_secs(1),
        };
        // Four hits straddling a boundary: two per aligned window is fine.
        let times = [10 * S + 900, 10 * S + 901, 11 * S, 11 * S + 1, 11 * S + 2];
        let o = overshoot(&spec, &times);
        assert_eq!(o.samples, vec![0.0, 0.5]);
        assert_eq!(o.excess, 1);
    }

    #[test]
    fn token_bucket_envelope_is_burst_plus_rate() {
        let spec = LimitSpec::TokenBucket {
            capacity: 2,
            refill: 1,
            per: Nanos::from_secs(1),
        };
        // Burst of 2, then one every second: exactly on the envelope.
        let ok = [S, S, 2 * S, 3 * S, 4 * S];
        assert_eq!(overshoot(&spec, &ok).excess, 0);
        assert!(overshoot(&spec, &ok).samples.iter().all(|&v| v == 0.0));
        // A third hit at once is one over (half the capacity).
        let o = overshoot(&spec, &[S, S, S]);
        assert_eq!(o.excess, 1);
        assert_eq!(o.samples, vec![0.5]);
        // Half a second later half a token is back: still over by a half.
        let o = overshoot(&spec, &[S, S, S + S / 2]);
        assert_eq!(o.samples, vec![0.25]);
        assert_eq!(o.excess, 1);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    /// Arrival times: bursts, spacing around the rate, idle gaps.
    fn arrivals() -> impl Strategy<Value = Vec<u64>> {
        let gap = prop_oneof![
            4 => 0u64..2_000_000,
            5 => 0u64..400_000_000,
            1 => 0u64..5 * S,
        ];
        prop::collection::vec(gap, 1..300).prop_map(|gaps| {
            let mut t = 1_000 * S;
            gaps.iter()
                .map(|g| {
                    t += g;
                    t
                })
                .collect()
        })
    }

    /// The reference's own decisions on every arrival, one hit each.
    fn reference_decisions(exact: &mut dyn Exact, times: &[u64]) -> Vec<bool> {
        times
            .iter()
            .map(|&t| {
                let fits = exact.allows(t, 1);
                if fits {
                    exact.admit(t, 1);
                }
                fits
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn drain_meters_decide_as_their_exact_references(
            capacity in 1u32..=20,
            amount in 1u32..=20,
            per_ms in 1u64..=3_000,
            times in arrivals(),
        ) {
            let per = per_ms * 1_000_000;
            let first = times[0];
            let cases: [(LimitSpec, Box<dyn Exact>); 3] = [
                (
                    LimitSpec::TokenBucket { capacity: capacity.into(), refill: amount.into(), per: Nanos::new(per) },
                    Box::new(ExactTokenBucket::new(capacity, amount, per, first)),
                ),
                (
                    LimitSpec::LeakyBucket { capacity: capacity.into(), leak: amount.into(), per: Nanos::new(per) },
                    Box::new(ExactLeakyBucket::new(capacity, amount, per)),
                ),
                (
                    LimitSpec::Gcra { limit: amount.into(), per: Nanos::new(per), burst: capacity.into() },
                    Box::new(ExactGcra::new(capacity, amount, per)),
                ),
            ];
            for (spec, mut exact) in cases {
                let ours = exact_decisions(&spec, &times);
                let theirs = reference_decisions(exact.as_mut(), &times);
                prop_assert_eq!(&ours, &theirs, "{}", spec.name());
                // The excess on a history is the count of arrivals the exact
                // limiter refuses, and its admitted history has none.
                let refused = ours.iter().filter(|&&k| !k).count() as u64;
                prop_assert_eq!(overshoot(&spec, &times).excess, refused);
                let kept: Vec<u64> = times.iter().zip(&ours).filter(|p| *p.1).map(|p| *p.0).collect();
                let o = overshoot(&spec, &kept);
                prop_assert_eq!(o.excess, 0);
                prop_assert!(o.samples.iter().all(|&v| v == 0.0), "{:?}", o.samples);
            }
        }

        #[test]
        fn window_limiters_keep_their_admitted_history_within_the_limit(
            limit in 1u64..=12,
            window_ms in 1u64..=2_000,
            times in arrivals(),
        ) {
            let window = Nanos::new(window_ms * 1_000_000);
            for spec in [
                LimitSpec::Sliding { limit, window, precision: 1 },
                LimitSpec::Fixed { limit, window },
            ] {
                let ours = exact_decisions(&spec, &times);
                let refused = ours.iter().filter(|&&k| !k).count() as u64;
                prop_assert_eq!(overshoot(&spec, &times).excess, refused);
                let kept: Vec<u64> = times.iter().zip(&ours).filter(|p| *p.1).map(|p| *p.0).collect();
                prop_assert_eq!(overshoot(&spec, &kept).excess, 0);
                prop_assert!(overshoot(&spec, &kept).samples.iter().all(|&v| v == 0.0));
            }
        }
    }
}
