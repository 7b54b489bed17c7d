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
use crate::core::time::Nanos;
use crate::core::window::{WindowCounts, WindowSpec, MAX_BUCKETS};

/// `amount` tokens every `period`, the shared refill (or leak) rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    amount: NonZeroU32,
    period: Nanos,
}

impl Rate {
    pub fn new(amount: u32, period: Nanos) -> Result<Self, ParamError> {
        if period == Nanos::ZERO {
            return Err(ParamError::Zero { field: "per" });
        }
        Ok(Rate {
            amount: nonzero("rate", amount)?,
            period,
        })
    }
    pub fn amount(&self) -> u32 {
        self.amount.get()
    }
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

/// What the meter found, in scaled units.
struct Reading {
    debt: u128,
    capacity: u128,
    cost: u128,
    per_token: u128,
    refill_per_ns: u128,
}

impl Reading {
    fn wait_for(&self, excess: u128) -> Nanos {
        nanos_u128(div_ceil_u128(excess, self.refill_per_ns))
    }
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
                // A quarter of the refill time, coarser if the horizon would
                // need more buckets than a window may have.
                let min_g = horizon.div_ceil(MAX_BUCKETS as u64 - 1);
                let g = (refill / 4).max(min_g).max(1_000_000);
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

    fn read(&self, counts: &WindowCounts<'_>, cost: u32) -> Reading {
        let per_token = u128::from(self.rate.period.as_u64());
        let refill_per_ns = u128::from(self.rate.amount.get());
        let capacity = u128::from(self.capacity.get()) * per_token;
        let spec = &counts.spec;
        let mut prev = spec.epoch_start(counts.epoch_at(0));
        let mut debt = capacity;
        for (i, &net) in counts.nets.iter().enumerate() {
            let end = spec.epoch_start(counts.epoch_at(i) + 1).min(counts.now);
            let refilled = refill_per_ns * u128::from((end - prev).as_u64());
            debt = debt.saturating_sub(refilled) + u128::from(net) * per_token;
            prev = end;
        }
        Reading {
            debt,
            capacity,
            cost: u128::from(cost) * per_token,
            per_token,
            refill_per_ns,
        }
    }

    /// Common decision: admit when the debt plus the cost fits the capacity.
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
        if cost > self.capacity.get() {
            return Verdict::Never {
                capacity: u64::from(self.capacity.get()),
            };
        }
        let r = self.read(counts, cost);
        let free = r.capacity.saturating_sub(r.debt);
        if r.cost <= free {
            Verdict::Allow {
                remaining: ((free - r.cost) / r.per_token) as u64,
                reset_after: r.wait_for(r.debt + r.cost),
            }
        } else {
            Verdict::Deny {
                remaining: (free / r.per_token) as u64,
                retry_after: r.wait_for(r.cost - free),
                reset_after: r.wait_for(r.debt),
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
    /// (default: a quarter of the refill time, at least 1 ms).
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
        assert_eq!(
            decide(&a, now, &nets, 10),
            Verdict::Allow {
                remaining: 0,
                reset_after: Nanos::from_secs(2)
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
                assert_eq!(retry_after, Nanos::from_millis(200));
                assert_eq!(reset_after, Nanos::from_secs(2));
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
