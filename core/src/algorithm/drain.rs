//! Token bucket, leaky bucket and GCRA: one drain meter, three faces.
//!
//! All three admit a sequence of hits exactly when, for every interval
//! `(s, t]`, the hits in it stay within `capacity + rate·(t − s)`; GCRA is the
//! virtual-scheduling form of the leaky bucket, and a leaky bucket used as a
//! meter is a token bucket seen from the other side. They differ in how they
//! are parameterised and what they report, so each has its own type here, but
//! one computation:
//!
//! The debt `D` (tokens spent and not yet refilled, or the leaky bucket's
//! level) follows Lindley's recursion over the window's buckets:
//! `D ← max(0, D − rate·Δt) + hits`. Hits of a bucket are placed at the
//! bucket's end (or at `now` for the current one), later than they really
//! happened, and the recursion starts from a full debt at the window's oldest
//! edge. Both choices can only raise `D`, so the meter never admits what an
//! exact token bucket fed the same hits would refuse. It may refuse up to
//! `rate·granularity` tokens early (placement), and, for a key busy across
//! the whole horizon, count the start as fully spent (the horizon is at least
//! twice the time to refill the bucket so that an idle key always reads full).

use std::num::NonZeroU32;

use super::{div_ceil_u128, nanos_u128, nonzero, ParamError, RateAlgorithm, Verdict};
use crate::time::Nanos;
use crate::window::{WindowCounts, WindowSpec, MAX_BUCKETS};

/// `amount` tokens every `period`, the shared refill (or leak) rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    amount: NonZeroU32,
    period: Nanos,
}

impl Rate {
    /// Fails if `amount` (`rate` in rule files) or `period` (`per`) is zero.
    pub fn new(amount: u32, period: Nanos) -> Result<Self, ParamError> {
        if period == Nanos::ZERO {
            return Err(ParamError::Zero { field: "per" });
        }
        Ok(Rate {
            amount: nonzero("rate", amount)?,
            period,
        })
    }
    /// Tokens added (or leaked) every period; never zero.
    pub fn amount(&self) -> u32 {
        self.amount.get()
    }
    /// The period; never zero.
    pub fn period(&self) -> Nanos {
        self.period
    }
}

/// The shared computation. Debt is kept in units of `1 / period` tokens, so
/// that a refill over `Δt` nanoseconds is the integer `amount · Δt`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DrainMeter {
    capacity: NonZeroU32,
    rate: Rate,
    spec: WindowSpec,
}

impl DrainMeter {
    fn new(capacity: u32, rate: Rate, granularity: Option<Nanos>) -> Result<Self, ParamError> {
        let capacity = nonzero("capacity", capacity)?;
        // Time for an empty bucket to fill up again.
        let refill = u128::from(capacity.get()) * u128::from(rate.period.as_u64())
            / u128::from(rate.amount.get());
        let refill = u64::try_from(refill).map_err(|_| ParamError::Range {
            field: "rate",
            reason: "the bucket would take centuries to refill".into(),
        })?;
        let horizon = refill.saturating_mul(2);
        let spec = match granularity {
            Some(g) => {
                let buckets = horizon.div_ceil(g.as_u64().max(1)) + 1;
                WindowSpec::new(g, usize::try_from(buckets).unwrap_or(usize::MAX))?
            }
            None => {
                // An eighth of the refill time, coarser if the horizon would
                // need more buckets than a window may have.
                let min_g = horizon.div_ceil(MAX_BUCKETS as u64 - 1);
                let g = (refill / 8).max(min_g).max(1_000_000);
                let buckets = horizon.div_ceil(g) + 1;
                WindowSpec::new(Nanos::new(g), buckets as usize)?
            }
        };
        Ok(DrainMeter {
            capacity,
            rate,
            spec,
        })
    }

    fn refill_time(&self) -> Nanos {
        let t = u128::from(self.capacity.get()) * u128::from(self.rate.period.as_u64())
            / u128::from(self.rate.amount.get());
        nanos_u128(t)
    }

    fn per_token(&self) -> u128 {
        u128::from(self.rate.period.as_u64())
    }
    fn refill_per_ns(&self) -> u128 {
        u128::from(self.rate.amount.get())
    }
    fn capacity_scaled(&self) -> u128 {
        u128::from(self.capacity.get()) * self.per_token()
    }

    /// The debt at the start of the current bucket `current`: Lindley's
    /// recursion over the closed buckets before it, from a fully spent
    /// bucket at the window's oldest edge. `net(i)` is the count of the
    /// window's `i`-th bucket (oldest first).
    fn debt_before_current(
        &self,
        spec: &WindowSpec,
        current: u64,
        net: impl Fn(usize) -> u64,
    ) -> u128 {
        let b = spec.buckets();
        let first = (current + 1).saturating_sub(b as u64);
        let mut prev = spec.epoch_start(first);
        let mut debt = self.capacity_scaled();
        for i in 0..b - 1 {
            let end = spec.epoch_start(first + i as u64 + 1);
            let refilled = self.refill_per_ns() * u128::from((end - prev).as_u64());
            debt = debt.saturating_sub(refilled) + u128::from(net(i)) * self.per_token();
            prev = end;
        }
        debt
    }

    /// The debt at `now`: the current bucket's hits are placed at `now`.
    fn debt_now(&self, counts: &WindowCounts<'_>) -> u128 {
        let spec = &counts.spec;
        let current = counts.current_epoch();
        let before = self.debt_before_current(spec, current, |i| counts.nets[i]);
        let elapsed = u128::from((counts.now - spec.epoch_start(current)).as_u64());
        let last = counts.nets[counts.nets.len() - 1];
        before.saturating_sub(self.refill_per_ns() * elapsed) + u128::from(last) * self.per_token()
    }

    /// How long, with no new arrivals (and `extra` more hits in the current
    /// bucket), until this meter's own reading of the debt is at most
    /// `target`. Solved phase by phase as the window slides: within a bucket
    /// only the closed buckets' debt drains; at each boundary the current
    /// bucket closes and the oldest leaves.
    fn wait_until(&self, counts: &WindowCounts<'_>, extra: u64, target: u128) -> Nanos {
        let spec = &counts.spec;
        let b = counts.nets.len();
        let g = u128::from(spec.granularity().as_u64());
        let current = counts.current_epoch();
        let net = |j: usize| {
            counts.nets.get(j).copied().unwrap_or(0) + if j == b - 1 { extra } else { 0 }
        };
        for k in 0..=b {
            let start = spec.epoch_start(current + k as u64);
            let before = self.debt_before_current(spec, current + k as u64, |i| net(i + k));
            let open = u128::from(net(b - 1 + k)) * self.per_token();
            let x0 = if k == 0 {
                u128::from((counts.now - start).as_u64())
            } else {
                0
            };
            if open > target {
                continue;
            }
            let room = target - open;
            let x = if before <= room {
                x0
            } else {
                div_ceil_u128(before - room, self.refill_per_ns()).max(x0)
            };
            if x < g || (k == 0 && x == x0) {
                return (start + nanos_u128(x)) - counts.now;
            }
        }
        spec.epoch_start(current + b as u64 + 1) - counts.now
    }

    /// Common decision: admit when the debt plus the cost fits the capacity.
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
        if cost > self.capacity.get() {
            return Verdict::Never {
                capacity: u64::from(self.capacity.get()),
            };
        }
        let per_token = self.per_token();
        let capacity = self.capacity_scaled();
        let debt = self.debt_now(counts);
        let cost_scaled = u128::from(cost) * per_token;
        let free = capacity.saturating_sub(debt);
        if cost_scaled <= free {
            Verdict::Allow {
                remaining: ((free - cost_scaled) / per_token) as u64,
                reset_after: self.wait_until(counts, u64::from(cost), 0),
            }
        } else {
            Verdict::Deny {
                remaining: (free / per_token) as u64,
                retry_after: self.wait_until(counts, 0, capacity - cost_scaled),
                reset_after: self.wait_until(counts, 0, 0),
            }
        }
    }
}

/// Token bucket: holds up to `capacity` tokens (the burst), refilled at
/// `rate`; a request takes `cost` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    meter: DrainMeter,
}

impl TokenBucket {
    /// `granularity` overrides the bucket length of the underlying window
    /// (default: an eighth of the refill time, at least 1 ms).
    pub fn new(
        capacity: u32,
        refill: Rate,
        granularity: Option<Nanos>,
    ) -> Result<Self, ParamError> {
        DrainMeter::new(capacity, refill, granularity).map(|meter| TokenBucket { meter })
    }
}

/// Leaky bucket as a meter: a bucket of `capacity` that leaks at `rate`; a
/// request pours in `cost` and is refused if it would overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakyBucket {
    meter: DrainMeter,
}

impl LeakyBucket {
    /// `granularity` as for [`TokenBucket::new`]. Fails on a zero
    /// `capacity`, a bucket too slow to drain for any window to cover, or a
    /// `granularity` the window cannot keep.
    pub fn new(capacity: u32, leak: Rate, granularity: Option<Nanos>) -> Result<Self, ParamError> {
        DrainMeter::new(capacity, leak, granularity).map(|meter| LeakyBucket { meter })
    }
}

/// Generic cell rate algorithm: `limit` per `period`, one emission every
/// `period / limit`, with a tolerance of `burst` cells. Reported as GCRA
/// reports: the quota is `limit` per `period`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gcra {
    meter: DrainMeter,
    limit: NonZeroU32,
    period: Nanos,
}

impl Gcra {
    /// `burst` is the tolerance in cells; `granularity` as for
    /// [`TokenBucket::new`]. Fails on a zero `limit`, `period` or `burst`, or
    /// on parameters no window can cover.
    pub fn new(
        limit: u32,
        period: Nanos,
        burst: u32,
        granularity: Option<Nanos>,
    ) -> Result<Self, ParamError> {
        let rate = Rate::new(limit, period)?;
        Ok(Gcra {
            meter: DrainMeter::new(burst, rate, granularity)?,
            limit: rate.amount,
            period,
        })
    }
}

macro_rules! drain_algorithm {
    ($ty:ty, $meter:ident, |$s:ident| quota = $quota:expr, period = $period:expr) => {
        impl RateAlgorithm for $ty {
            fn window(&self) -> WindowSpec {
                self.$meter.spec
            }
            fn quota(&self) -> u64 {
                let $s = self;
                $quota
            }
            fn quota_period(&self) -> Nanos {
                let $s = self;
                $period
            }
            fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
                self.$meter.decide(counts, cost)
            }
        }
    };
}

drain_algorithm!(
    TokenBucket,
    meter,
    |s| quota = u64::from(s.meter.capacity.get()),
    period = s.meter.refill_time()
);
drain_algorithm!(
    LeakyBucket,
    meter,
    |s| quota = u64::from(s.meter.capacity.get()),
    period = s.meter.refill_time()
);
drain_algorithm!(
    Gcra,
    meter,
    |s| quota = u64::from(s.limit.get()),
    period = s.period
);

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(capacity: u32, per_sec: u32) -> TokenBucket {
        TokenBucket::new(
            capacity,
            Rate::new(per_sec, Nanos::from_secs(1)).unwrap(),
            None,
        )
        .unwrap()
    }

    fn decide(a: &dyn RateAlgorithm, now: Nanos, nets: &[u64], cost: u32) -> Verdict {
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
    fn idle_bucket_is_full() {
        let a = tb(10, 5);
        let nets = vec![0; a.window().buckets()];
        let now = Nanos::from_secs(1_000);
        // The ten hits count from the end of the current bucket (250 ms, an
        // eighth of the 2 s refill time); then 2 s refill all of them.
        assert_eq!(
            decide(&a, now, &nets, 10),
            Verdict::Allow {
                remaining: 0,
                reset_after: Nanos::from_millis(2_250)
            }
        );
        assert_eq!(decide(&a, now, &nets, 11), Verdict::Never { capacity: 10 });
    }

    #[test]
    fn spent_tokens_refill_at_the_rate() {
        let a = tb(10, 5);
        let spec = a.window();
        let b = spec.buckets();
        // 10 spent in the current bucket, right now.
        let start = spec.epoch_start(spec.epoch(Nanos::from_secs(1_000)));
        let mut nets = vec![0; b];
        nets[b - 1] = 10;
        match decide(&a, start, &nets, 1) {
            Verdict::Deny {
                retry_after,
                reset_after,
                remaining,
            } => {
                assert_eq!(remaining, 0);
                // Hits in the open bucket start to drain when it closes
                // (250 ms), then one token takes 200 ms.
                assert_eq!(retry_after, Nanos::from_millis(450));
                assert_eq!(reset_after, Nanos::from_millis(2_250));
            }
            v => panic!("expected a denial, got {v:?}"),
        }
    }

    #[test]
    fn horizon_covers_twice_the_refill_time() {
        let a = tb(100, 10);
        let spec = a.window();
        let horizon = spec.granularity().as_u64() * (spec.buckets() as u64 - 1);
        assert!(horizon >= 2 * Nanos::from_secs(10).as_u64(), "{spec:?}");
        assert!(spec.buckets() <= MAX_BUCKETS);
    }

    #[test]
    fn gcra_reports_its_own_quota() {
        let a = Gcra::new(100, Nanos::from_secs(60), 10, None).unwrap();
        assert_eq!(a.quota(), 100);
        assert_eq!(a.quota_period(), Nanos::from_secs(60));
        let l = LeakyBucket::new(20, Rate::new(10, Nanos::from_secs(1)).unwrap(), None).unwrap();
        assert_eq!(l.quota(), 20);
        assert_eq!(l.quota_period(), Nanos::from_secs(2));
    }

    #[test]
    fn zero_parameters_are_refused() {
        assert!(Rate::new(0, Nanos::from_secs(1)).is_err());
        assert!(Rate::new(1, Nanos::ZERO).is_err());
        assert!(TokenBucket::new(0, Rate::new(1, Nanos::from_secs(1)).unwrap(), None).is_err());
        assert!(Gcra::new(10, Nanos::from_secs(1), 0, None).is_err());
    }
}
