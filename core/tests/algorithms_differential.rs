//! Differential tests of the rate algorithms against exact references.
//!
//! One node, random request traces (bursts, idle gaps, arrivals exactly on
//! bucket edges, costs 1..=3 mostly 1). The real algorithm runs through a
//! real `BucketWindow` (read → decide → if allowed add at own slot), and at
//! every request a reference written here judges the same moment on THE SAME
//! admitted history, so the traces never diverge. Everything is integer:
//! times in nanoseconds, tokens scaled by the rate's period.

use drl_core::algorithm::{
    FixedWindow, Gcra, LeakyBucket, Rate, RateAlgorithm, SlidingWindow, TokenBucket, Verdict,
};
use drl_core::slot::NodeSlot;
use drl_core::time::Nanos;
use drl_core::window::{BucketWindow, WindowCounts};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

#[path = "exact/meters.rs"]
mod meters;
use meters::{Exact, ExactGcra, ExactLeakyBucket, ExactTokenBucket};

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Next to this file: tests/<name>.proptest-regressions (committed).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

const SECOND: u64 = 1_000_000_000;
const MILLI: u64 = 1_000_000;
/// Far from zero so that no window is clipped at the Unix epoch.
const T0: u64 = 1_000_000 * SECOND;

// ---------------------------------------------------------------------------
// Traces.

/// SplitMix64: a seeded generator for the long deterministic traces, so the
/// test needs no particular `rand` version.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..=max` (modulo bias is irrelevant at these sizes).
    fn up_to(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

/// How far to move the clock before the next request.
#[derive(Clone, Copy, Debug)]
enum Gap {
    /// Almost no time: a burst.
    Burst(u64),
    /// Around the average spacing at the limit.
    Normal(u64),
    /// A long pause.
    Idle(u64),
    /// To the next bucket edge, then `delta - 1` ns (just before, on, just after).
    Edge(u8),
}

#[derive(Clone, Copy, Debug)]
struct Step {
    gap: Gap,
    cost: u32,
}

/// `unit`: the mean spacing at the limit; `idle`: a long pause.
fn trace(unit: u64, idle: u64, max_len: usize) -> impl Strategy<Value = Vec<Step>> {
    let gap = prop_oneof![
        4 => (0..=unit / 4).prop_map(Gap::Burst),
        5 => (0..=2 * unit).prop_map(Gap::Normal),
        1 => (0..=idle).prop_map(Gap::Idle),
        1 => (0u8..3).prop_map(Gap::Edge),
    ];
    let cost = prop_oneof![8 => Just(1u32), 1 => 2u32..=3];
    prop::collection::vec(
        (gap, cost).prop_map(|(gap, cost)| Step { gap, cost }),
        1..max_len,
    )
}

/// Absolute arrival times of a trace; `g` is the bucket length for `Edge`.
fn arrivals(steps: &[Step], start: u64, g: u64) -> Vec<(u64, u32)> {
    let mut now = start;
    steps
        .iter()
        .map(|s| {
            now = match s.gap {
                Gap::Burst(d) | Gap::Normal(d) | Gap::Idle(d) => now + d,
                Gap::Edge(delta) => {
                    let edge = (now / g + 1) * g;
                    (edge + u64::from(delta)).saturating_sub(1).max(now)
                }
            };
            (now, s.cost)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The algorithm under test, driven through a real window.

struct Harness<'a> {
    alg: &'a dyn RateAlgorithm,
    window: BucketWindow,
    /// Admitted `(time, cost)`, in time order.
    log: Vec<(u64, u64)>,
}

impl<'a> Harness<'a> {
    fn new(alg: &'a dyn RateAlgorithm) -> Self {
        Harness {
            alg,
            window: BucketWindow::new(alg.window(), 1),
            log: Vec::new(),
        }
    }
    fn nets(&self, now: u64) -> Vec<u64> {
        let mut nets = vec![0; self.alg.window().buckets()];
        self.window.read(Nanos::new(now), &mut nets);
        nets
    }
    /// The verdict at `now`, without counting anything.
    fn decide(&self, now: u64, cost: u32) -> Verdict {
        let nets = self.nets(now);
        let counts = WindowCounts {
            spec: self.alg.window(),
            now: Nanos::new(now),
            nets: &nets,
        };
        self.alg.decide(&counts, cost)
    }
    fn admit(&mut self, now: u64, cost: u32) {
        self.window.add(Nanos::new(now), NodeSlot::new(0), cost);
        self.log.push((now, u64::from(cost)));
    }
    /// Admitted hits with `lo <= t <= hi`.
    fn sum(&self, lo: u64, hi: u64) -> u64 {
        if lo > hi {
            return 0;
        }
        let a = self.log.partition_point(|&(t, _)| t < lo);
        let b = self.log.partition_point(|&(t, _)| t <= hi);
        self.log[a..b].iter().map(|&(_, c)| c).sum()
    }
}

fn retry_after(v: &Verdict) -> Option<u64> {
    match v {
        Verdict::Deny { retry_after, .. } => Some(retry_after.as_u64()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Fixed window.

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fixed_window_equals_the_aligned_count(
        limit in 1u32..=12,
        window_ms in 1u64..=2_000,
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 5 * SECOND, 200),
    ) {
        let w = window_ms * MILLI;
        let alg = FixedWindow::new(limit, Nanos::new(w)).unwrap();
        let mut h = Harness::new(&alg);
        // Scale the trace to the window: `unit` was 100ms.
        let steps: Vec<Step> = steps.iter().map(|s| Step { gap: scale(s.gap, w, 100 * MILLI * u64::from(limit)), ..*s }).collect();
        for (now, cost) in arrivals(&steps, T0 + offset, w) {
            let k = now / w;
            let used = h.sum(k * w, now);
            let until_end = (k + 1) * w - now;
            let v = h.decide(now, cost);
            let limit = u64::from(limit);
            let c = u64::from(cost);
            if c > limit {
                prop_assert_eq!(v, Verdict::Never { capacity: limit });
                continue;
            }
            match v {
                Verdict::Allow { remaining, reset_after } => {
                    prop_assert!(used + c <= limit, "allowed over the limit at {}: used {} cost {}", now, used, c);
                    prop_assert_eq!(remaining, limit - used - c);
                    prop_assert_eq!(reset_after.as_u64(), until_end);
                    h.admit(now, cost);
                }
                Verdict::Deny { remaining, retry_after, reset_after } => {
                    prop_assert!(used + c > limit, "denied within the limit at {}: used {} cost {}", now, used, c);
                    prop_assert_eq!(remaining, limit - used.min(limit));
                    prop_assert_eq!(retry_after.as_u64(), until_end);
                    prop_assert_eq!(reset_after.as_u64(), until_end);
                    // Waiting exactly that long is enough.
                    prop_assert!(h.decide(now + until_end, cost).is_allowed());
                }
                Verdict::Never { .. } => prop_assert!(false, "cost {} <= limit {} is never Never", c, limit),
            }
        }
    }
}

/// Rescales a gap drawn for a mean spacing of `from` to one of `to / limit`.
fn scale(gap: Gap, to: u64, from: u64) -> Gap {
    let f = |d: u64| ((u128::from(d) * u128::from(to)) / u128::from(from)) as u64;
    match gap {
        Gap::Burst(d) => Gap::Burst(f(d)),
        Gap::Normal(d) => Gap::Normal(f(d)),
        Gap::Idle(d) => Gap::Idle(f(d)),
        e @ Gap::Edge(_) => e,
    }
}

// ---------------------------------------------------------------------------
// Sliding window.

/// The sliding window estimator recomputed from the admitted log.
struct SlidingReference {
    limit: u64,
    k: u64,
    g: u64,
}

struct SlidingView {
    full: u64,
    oldest: u64,
    exact: u64,
    allows: bool,
}

impl SlidingReference {
    fn view(&self, h: &Harness<'_>, now: u64, cost: u32) -> SlidingView {
        let (k, g) = (self.k, self.g);
        let start = now / g * g;
        let elapsed = now - start;
        let full_from = start - (k - 1) * g;
        let full = h.sum(full_from, now);
        let oldest = h.sum(full_from - g, full_from - 1);
        let exact = h.sum(now + 1 - k * g, now);
        let g = u128::from(g);
        let used = u128::from(full) * g + u128::from(oldest) * (g - u128::from(elapsed));
        SlidingView {
            full,
            oldest,
            exact,
            allows: used + u128::from(cost) * g <= u128::from(self.limit) * g,
        }
    }
}

fn sliding_case(
    limit: u32,
    precision: u32,
    g_ms: u64,
    offset: u64,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let g = g_ms * MILLI;
    let w = g * u64::from(precision);
    let alg = SlidingWindow::new(limit, Nanos::new(w), precision).unwrap();
    prop_assert_eq!(alg.window().granularity().as_u64(), g);
    let reference = SlidingReference {
        limit: u64::from(limit),
        k: u64::from(precision),
        g,
    };
    let mut h = Harness::new(&alg);
    let steps: Vec<Step> = steps
        .iter()
        .map(|s| Step {
            gap: scale(s.gap, w, 100 * MILLI * u64::from(limit)),
            ..*s
        })
        .collect();
    for (now, cost) in arrivals(&steps, T0 + offset, g) {
        if cost > limit {
            prop_assert_eq!(
                h.decide(now, cost),
                Verdict::Never {
                    capacity: u64::from(limit)
                }
            );
            continue;
        }
        let nets = h.nets(now);
        let r = reference.view(&h, now, cost);
        // The window holds exactly what the log says.
        prop_assert_eq!(nets[0], r.oldest);
        prop_assert_eq!(nets[1..].iter().sum::<u64>(), r.full);
        // The stated bound: the exact count lies in [full, full + oldest].
        prop_assert!(
            r.full <= r.exact && r.exact <= r.full + r.oldest,
            "exact {} outside [{}, {} + {}] at {}",
            r.exact,
            r.full,
            r.full,
            r.oldest,
            now
        );
        let v = h.decide(now, cost);
        prop_assert_eq!(
            v.is_allowed(),
            r.allows,
            "at {}: {:?}, nets {:?}",
            now,
            v,
            nets
        );
        if v.is_allowed() {
            h.admit(now, cost);
            continue;
        }
        let Some(wait) = retry_after(&v) else {
            prop_assert!(false, "cost {} <= limit {} is never Never", cost, limit);
            unreachable!()
        };
        // Exact: allowed after `wait` with no new arrivals, not 1ns sooner.
        prop_assert!(
            h.decide(now + wait, cost).is_allowed(),
            "at {} + {}: {:?}",
            now,
            wait,
            v
        );
        prop_assert!(reference.view(&h, now + wait, cost).allows);
        if wait > 0 {
            prop_assert!(
                !h.decide(now + wait - 1, cost).is_allowed(),
                "at {} + {} - 1: {:?}",
                now,
                wait,
                v
            );
            prop_assert!(!reference.view(&h, now + wait - 1, cost).allows);
        }
    }
    // Over the whole trace: each aligned window holds at most `limit`...
    let limit = u64::from(limit);
    let mut by_window = std::collections::BTreeMap::<u64, u64>::new();
    let mut by_bucket = std::collections::BTreeMap::<u64, u64>::new();
    for &(t, c) in &h.log {
        *by_window.entry(t / w).or_default() += c;
        *by_bucket.entry(t / g).or_default() += c;
    }
    for (k, n) in &by_window {
        prop_assert!(*n <= limit, "aligned window {} holds {} > {}", k, n, limit);
    }
    // ... and each sliding window of length w at most limit + the most one
    // sub-bucket admitted (the windows ending at an admission are the worst).
    let max_sub = by_bucket.values().copied().max().unwrap_or(0);
    for &(t, _) in &h.log {
        let n = h.sum(t + 1 - w, t);
        prop_assert!(
            n <= limit + max_sub,
            "window ending {} holds {} > {} + {}",
            t,
            n,
            limit,
            max_sub
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn sliding_window_precision_1_matches_its_estimator(
        limit in 1u32..=15,
        g_ms in 1u64..=1_000,
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 3 * SECOND, 200),
    ) {
        sliding_case(limit, 1, g_ms, offset, &steps)?;
    }

    #[test]
    fn sliding_window_precision_4_matches_its_estimator(
        limit in 1u32..=15,
        g_ms in 1u64..=250,
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 3 * SECOND, 200),
    ) {
        sliding_case(limit, 4, g_ms, offset, &steps)?;
    }

    #[test]
    fn sliding_window_any_precision_matches_its_estimator(
        limit in 1u32..=15,
        precision in 1u32..=12,
        g_ms in 1u64..=100,
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 3 * SECOND, 120),
    ) {
        sliding_case(limit, precision, g_ms, offset, &steps)?;
    }
}

// ---------------------------------------------------------------------------
// Token bucket, leaky bucket, GCRA.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    TokenBucket,
    LeakyBucket,
    Gcra,
}

/// Parameters of a drain meter: `capacity` tokens, `amount` per `period` ns.
#[derive(Clone, Copy, Debug)]
struct DrainParams {
    kind: Drain,
    capacity: u32,
    amount: u32,
    period: u64,
    granularity: Option<u64>,
}

impl DrainParams {
    fn build(&self) -> Option<Box<dyn RateAlgorithm>> {
        let g = self.granularity.map(Nanos::new);
        let rate = Rate::new(self.amount, Nanos::new(self.period)).ok()?;
        Some(match self.kind {
            Drain::TokenBucket => Box::new(TokenBucket::new(self.capacity, rate, g).ok()?),
            Drain::LeakyBucket => Box::new(LeakyBucket::new(self.capacity, rate, g).ok()?),
            // GCRA: `amount` per `period` with a tolerance of `capacity` cells.
            Drain::Gcra => {
                Box::new(Gcra::new(self.amount, Nanos::new(self.period), self.capacity, g).ok()?)
            }
        })
    }
    fn per_token(&self) -> u128 {
        u128::from(self.period)
    }
    fn cap_scaled(&self) -> u128 {
        u128::from(self.capacity) * self.per_token()
    }
    /// Time for an empty bucket to refill.
    fn refill(&self) -> u64 {
        (u128::from(self.capacity) * u128::from(self.period) / u128::from(self.amount)) as u64
    }
    fn reference(&self, start: u64) -> Box<dyn Exact> {
        match self.kind {
            Drain::TokenBucket => Box::new(ExactTokenBucket::new(
                self.capacity,
                self.amount,
                self.period,
                start,
            )),
            Drain::LeakyBucket => Box::new(ExactLeakyBucket::new(
                self.capacity,
                self.amount,
                self.period,
            )),
            Drain::Gcra => Box::new(ExactGcra::new(self.capacity, self.amount, self.period)),
        }
    }
}

/// The exact debt at `now` of a meter that starts fully spent at `t0` and
/// sees the admitted hits from `t0` on at their real times (scaled units).
fn truncated_debt(h: &Harness<'_>, p: &DrainParams, t0: u64, now: u64) -> u128 {
    let amount = u128::from(p.amount);
    let mut debt = p.cap_scaled();
    let mut prev = t0;
    let from = h.log.partition_point(|&(t, _)| t < t0);
    for &(t, c) in &h.log[from..] {
        debt = debt.saturating_sub(amount * u128::from(t - prev)) + u128::from(c) * p.per_token();
        prev = t;
    }
    debt.saturating_sub(amount * u128::from(now - prev))
}

fn drain_params(kind: Drain) -> impl Strategy<Value = DrainParams> {
    (
        1u32..=20,
        1u32..=20,
        1u64..=3_000,
        prop_oneof![3 => Just(None), 1 => (1u64..=2_000).prop_map(Some)],
    )
        .prop_map(move |(capacity, amount, period_ms, g_ms)| DrainParams {
            kind,
            capacity,
            amount,
            period: period_ms * MILLI,
            granularity: g_ms.map(|g| g * MILLI),
        })
}

/// Drives one drain meter over a trace and checks SAFETY and BOUND at every
/// request.
fn drain_case(p: &DrainParams, offset: u64, steps: &[Step]) -> Result<(), TestCaseError> {
    let Some(alg) = p.build() else {
        return Ok(()); // Parameters the constructor refuses are not this test's concern.
    };
    let spec = alg.window();
    let g = spec.granularity().as_u64();
    let buckets = spec.buckets() as u64;
    // The horizon covers twice the refill time, so an idle key reads full.
    prop_assert!(g * (buckets - 1) >= 2 * p.refill(), "{:?} {:?}", p, spec);

    let unit = (p.period / u64::from(p.amount)).max(1);
    let steps: Vec<Step> = steps
        .iter()
        .map(|s| Step {
            gap: scale(s.gap, unit, 100 * MILLI),
            ..*s
        })
        .collect();
    let start = T0 + offset;
    let mut h = Harness::new(alg.as_ref());
    let mut exact = p.reference(start);
    // All three references agree with each other (they are one meter).
    let mut others: Vec<Box<dyn Exact>> = [Drain::TokenBucket, Drain::LeakyBucket, Drain::Gcra]
        .iter()
        .map(|&kind| DrainParams { kind, ..*p }.reference(start))
        .collect();
    let rate_g = u128::from(p.amount) * u128::from(g);
    for (now, cost) in arrivals(&steps, start, g) {
        let v = h.decide(now, cost);
        if cost > p.capacity {
            prop_assert_eq!(
                v,
                Verdict::Never {
                    capacity: u64::from(p.capacity)
                }
            );
            continue;
        }
        let exact_allows = exact.allows(now, cost);
        for o in &others {
            prop_assert_eq!(
                o.allows(now, cost),
                exact_allows,
                "references disagree at {}",
                now
            );
        }
        // (1) SAFETY: never admit what the exact meter refuses.
        prop_assert!(
            !v.is_allowed() || exact_allows,
            "admitted at {} what the exact meter refuses: {:?}",
            now,
            v
        );
        // (2) BOUND: refusals are explained by placement (≤ rate·g) and the
        // truncated start (a full debt at the window's oldest edge).
        if !v.is_allowed() {
            let t0 = spec
                .epoch_start(spec.epoch(Nanos::new(now)) + 1 - buckets)
                .as_u64();
            let d_trunc = truncated_debt(&h, p, t0, now);
            let cost_s = u128::from(cost) * p.per_token();
            prop_assert!(
                d_trunc + cost_s + rate_g > p.cap_scaled(),
                "refused early at {}: D_trunc {} + cost {} + rate·g {} <= capacity {} ({:?})",
                now,
                d_trunc,
                cost_s,
                rate_g,
                p.cap_scaled(),
                v
            );
        }
        match v {
            Verdict::Allow { .. } => {
                h.admit(now, cost);
                exact.admit(now, cost);
                for o in others.iter_mut() {
                    o.admit(now, cost);
                }
            }
            Verdict::Deny { .. } => {}
            Verdict::Never { .. } => prop_assert!(
                false,
                "cost {} <= capacity {} is never Never",
                cost,
                p.capacity
            ),
        }
    }
    Ok(())
}

/// Which side of the retry property to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RetryCheck {
    /// The `Verdict` contract: waiting `retry_after` is enough.
    Enough,
    /// One nanosecond less than `retry_after` is not enough (it is exact).
    NotLate,
}

/// The retry property on its own: after a denial, with no new arrivals,
/// waiting `retry_after` is enough, and one nanosecond less is not.
fn drain_retry_case(
    p: &DrainParams,
    offset: u64,
    steps: &[Step],
    check: RetryCheck,
) -> Result<(), TestCaseError> {
    let Some(alg) = p.build() else {
        return Ok(());
    };
    let g = alg.window().granularity().as_u64();
    let unit = (p.period / u64::from(p.amount)).max(1);
    let steps: Vec<Step> = steps
        .iter()
        .map(|s| Step {
            gap: scale(s.gap, unit, 100 * MILLI),
            ..*s
        })
        .collect();
    let mut h = Harness::new(alg.as_ref());
    for (now, cost) in arrivals(&steps, T0 + offset, g) {
        let v = h.decide(now, cost);
        if cost > p.capacity {
            continue;
        }
        if v.is_allowed() {
            h.admit(now, cost);
            continue;
        }
        let wait = retry_after(&v).unwrap();
        if check == RetryCheck::NotLate {
            if wait > 0 {
                let sooner = h.decide(now + wait - 1, cost);
                prop_assert!(
                    !sooner.is_allowed(),
                    "denied at {} with retry_after {}, but allowed 1ns sooner: {:?}; nets now {:?}, then {:?} ({:?})",
                    now,
                    wait,
                    sooner,
                    h.nets(now),
                    h.nets(now + wait - 1),
                    p
                );
            }
            continue;
        }
        let later = h.decide(now + wait, cost);
        prop_assert!(
            later.is_allowed(),
            "denied at {} with retry_after {}, still denied then: {:?}; nets now {:?}, then {:?} ({:?})",
            now,
            wait,
            later,
            h.nets(now),
            h.nets(now + wait),
            p
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn token_bucket_is_safe_and_refuses_early_only_within_the_bound(
        p in drain_params(Drain::TokenBucket),
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 20 * SECOND, 200),
    ) {
        drain_case(&p, offset, &steps)?;
    }

    #[test]
    fn leaky_bucket_is_safe_and_refuses_early_only_within_the_bound(
        p in drain_params(Drain::LeakyBucket),
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 20 * SECOND, 200),
    ) {
        drain_case(&p, offset, &steps)?;
    }

    #[test]
    fn gcra_is_safe_and_refuses_early_only_within_the_bound(
        p in drain_params(Drain::Gcra),
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 20 * SECOND, 200),
    ) {
        drain_case(&p, offset, &steps)?;
    }

    /// The `Verdict` contract. Fails today: see
    /// `token_bucket_retry_after_a_burst_in_the_current_bucket`.
    #[test]
    fn drain_retry_after_is_enough(
        kind in prop_oneof![Just(Drain::TokenBucket), Just(Drain::LeakyBucket), Just(Drain::Gcra)],
        p in drain_params(Drain::TokenBucket),
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 20 * SECOND, 200),
    ) {
        drain_retry_case(&DrainParams { kind, ..p }, offset, &steps, RetryCheck::Enough)?;
    }

    /// Exactness from below: one nanosecond before `retry_after` the meter
    /// still refuses. Fails today: when the oldest bucket leaves the window
    /// the meter restarts from a full debt at the new edge, which may be
    /// less than the debt it carried, so it can admit before `retry_after`.
    #[test]
    fn drain_retry_after_is_not_late(
        kind in prop_oneof![Just(Drain::TokenBucket), Just(Drain::LeakyBucket), Just(Drain::Gcra)],
        p in drain_params(Drain::TokenBucket),
        offset in 0u64..10 * SECOND,
        steps in trace(100 * MILLI, 20 * SECOND, 200),
    ) {
        drain_retry_case(&DrainParams { kind, ..p }, offset, &steps, RetryCheck::NotLate)?;
    }
}

/// Regression: a token bucket (10 tokens, 5/s, default granularity 250ms)
/// spent at once at the start of a bucket. The spent tokens sit in the open
/// bucket, which the meter places at `now`; they start to drain only when the
/// bucket closes. `retry_after` must follow the meter's own future readings:
/// 250ms until the bucket closes plus 200ms for one token, and not the 200ms
/// an exact bucket would need.
#[test]
fn token_bucket_retry_after_a_burst_in_the_current_bucket() {
    let p = DrainParams {
        kind: Drain::TokenBucket,
        capacity: 10,
        amount: 5,
        period: SECOND,
        granularity: None,
    };
    let alg = p.build().unwrap();
    let mut h = Harness::new(alg.as_ref());
    let g = alg.window().granularity().as_u64();
    assert_eq!(g, 250 * MILLI);
    let now = T0 / g * g;
    assert!(h.decide(now, 10).is_allowed());
    h.admit(now, 10);
    let v = h.decide(now, 1);
    assert_eq!(retry_after(&v), Some(450 * MILLI), "{v:?}");
    assert!(h.decide(now + 450 * MILLI, 1).is_allowed());
    assert!(!h.decide(now + 450 * MILLI - 1, 1).is_allowed());
}

/// Regression: a token bucket of 1 token refilled every 3ms (buckets of 1ms,
/// 7 of them). Hits at 0.5ms and 4.5ms; at 6ms the meter refuses. When the
/// bucket of the first hit leaves the window (at 7ms) the meter restarts from
/// a full debt at the new edge, which is less than the debt it carried, and
/// it admits at 8ms: `retry_after` must say 2ms, not the 3ms a constant
/// drain from now would give.
#[test]
fn token_bucket_retry_after_follows_the_oldest_bucket_leaving() {
    let p = DrainParams {
        kind: Drain::TokenBucket,
        capacity: 1,
        amount: 1,
        period: 3 * MILLI,
        granularity: None,
    };
    let alg = p.build().unwrap();
    assert_eq!(alg.window().granularity(), Nanos::from_millis(1));
    assert_eq!(alg.window().buckets(), 7);
    let mut h = Harness::new(alg.as_ref());
    let t0 = T0; // a bucket edge
    for at in [t0 + MILLI / 2, t0 + 4 * MILLI + MILLI / 2] {
        assert!(h.decide(at, 1).is_allowed());
        h.admit(at, 1);
    }
    let now = t0 + 6 * MILLI;
    let v = h.decide(now, 1);
    assert_eq!(retry_after(&v), Some(2 * MILLI), "{v:?}");
    assert!(h.decide(t0 + 8 * MILLI, 1).is_allowed());
    assert!(!h.decide(t0 + 8 * MILLI - 1, 1).is_allowed());
}

// ---------------------------------------------------------------------------
// Utilisation: what the meter gives up, over a long busy trace.

/// Over 30 simulated seconds of arrivals at twice the rate, the meter admits
/// at least 7/8 of what an exact token bucket run on its own admits.
///
/// DESIGN.md bounds the loss by `g/H + cost/(rate·H)` (placement of the open
/// bucket's hits at its end, and the fully spent start charged to a key busy
/// across the whole horizon `H ≥ 2·refill`); with the default granularity of
/// an eighth of the refill time that is at most 1/16 plus `cost/(2·capacity)`.
/// These seeded cases stay above 7/8, including the small bucket (capacity
/// 3, 1 token/s) whose bound alone would allow more loss.
#[test]
fn drain_meters_admit_at_least_seven_eighths_of_an_exact_bucket() {
    let cases = [
        (Drain::TokenBucket, 10, 5, SECOND),
        (Drain::TokenBucket, 1, 10, SECOND),
        (Drain::TokenBucket, 50, 100, SECOND),
        (Drain::TokenBucket, 3, 1, SECOND),
        (Drain::LeakyBucket, 20, 10, SECOND),
        (Drain::Gcra, 10, 100, 60 * SECOND),
        (Drain::Gcra, 1, 10, SECOND),
    ];
    let mut report = Vec::new();
    for (kind, capacity, amount, period) in cases {
        let p = DrainParams {
            kind,
            capacity,
            amount,
            period,
            granularity: None,
        };
        let alg = p.build().unwrap();
        for seed in 0..4u64 {
            let mut rng = SplitMix(seed);
            let mean_gap = period / u64::from(amount) / 2;
            let start = T0 + rng.up_to(SECOND - 1);
            let mut h = Harness::new(alg.as_ref());
            let mut exact = ExactTokenBucket::new(p.capacity, p.amount, p.period, start);
            let (mut ours, mut theirs) = (0u64, 0u64);
            let mut now = start;
            while now < start + 30 * SECOND {
                now += rng.up_to(2 * mean_gap);
                if h.decide(now, 1).is_allowed() {
                    h.admit(now, 1);
                    ours += 1;
                }
                if exact.allows(now, 1) {
                    exact.admit(now, 1);
                    theirs += 1;
                }
            }
            if 8 * ours < 7 * theirs {
                report.push(format!("{p:?} seed {seed}: ours {ours}, exact {theirs}"));
            }
        }
    }
    assert!(
        report.is_empty(),
        "under 7/8 of the exact bucket:\n{}",
        report.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Never.

proptest! {
    #![proptest_config(config(256))]

    /// A cost above what a limit can ever admit at once is `Never`, whatever
    /// the window holds.
    #[test]
    fn cost_above_capacity_is_never_for_every_algorithm(
        cap in 1u32..=50,
        amount in 1u32..=20,
        extra in 1u32..=1_000,
        now in T0..T0 + 100 * SECOND,
        fill in prop::collection::vec(0u64..100, 64),
    ) {
        let per = Nanos::from_secs(1);
        let rate = Rate::new(amount, per).unwrap();
        let algs: Vec<Box<dyn RateAlgorithm>> = vec![
            Box::new(FixedWindow::new(cap, per).unwrap()),
            Box::new(SlidingWindow::new(cap, per, 1).unwrap()),
            Box::new(SlidingWindow::new(cap, per, 10).unwrap()),
            Box::new(TokenBucket::new(cap, rate, None).unwrap()),
            Box::new(LeakyBucket::new(cap, rate, None).unwrap()),
            Box::new(Gcra::new(amount, per, cap, None).unwrap()),
        ];
        for alg in &algs {
            let spec = alg.window();
            let counts = |nets: &[u64]| alg.decide(&WindowCounts { spec, now: Nanos::new(now), nets }, cap + extra);
            let b = spec.buckets();
            prop_assert_eq!(counts(&fill[..b]), Verdict::Never { capacity: u64::from(cap) }, "{:?}", alg);
            prop_assert_eq!(counts(&vec![0; b]), Verdict::Never { capacity: u64::from(cap) }, "{:?}", alg);
            // At exactly the capacity an idle key is admitted.
            let idle = alg.decide(&WindowCounts { spec, now: Nanos::new(now), nets: &vec![0; b] }, cap);
            prop_assert!(idle.is_allowed(), "{:?}: {:?}", alg, idle);
        }
    }
}
