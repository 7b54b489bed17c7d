//! Exact, continuous-time references of the three drain meters (token
//! bucket, leaky bucket, GCRA) in integer arithmetic.
//!
//! Shared: the algorithms' differential tests (`tests/algorithms_differential.rs`)
//! hold the real algorithms to them, and the simulation oracle's property
//! tests hold the oracle to them, so that both are measured against the same
//! definition. Amounts are scaled by the rate's period: one token is
//! `period` units, and `amount` units come back per nanosecond.

/// An exact meter: can a hit of `cost` pass at `now`, and take it.
pub(crate) trait Exact {
    /// Whether `cost` fits at `now` (nothing changes).
    fn allows(&self, now: u64, cost: u32) -> bool;
    /// Counts `cost` at `now` (the caller has checked it fits).
    fn admit(&mut self, now: u64, cost: u32);
}

/// Tokens (scaled by the period), refilled by `amount` per nanosecond;
/// full at `start`.
pub(crate) struct ExactTokenBucket {
    per_token: u128,
    amount: u128,
    cap: u128,
    tokens: u128,
    last: u64,
}

impl ExactTokenBucket {
    /// `capacity` tokens, `amount` back per `period` ns, full at `start`.
    pub(crate) fn new(capacity: u32, amount: u32, period: u64, start: u64) -> Self {
        let cap = u128::from(capacity) * u128::from(period);
        ExactTokenBucket {
            per_token: u128::from(period),
            amount: u128::from(amount),
            cap,
            tokens: cap,
            last: start,
        }
    }
    fn tokens_at(&self, now: u64) -> u128 {
        (self.tokens + self.amount * u128::from(now.saturating_sub(self.last))).min(self.cap)
    }
}

impl Exact for ExactTokenBucket {
    fn allows(&self, now: u64, cost: u32) -> bool {
        self.tokens_at(now) >= u128::from(cost) * self.per_token
    }
    fn admit(&mut self, now: u64, cost: u32) {
        self.tokens = self.tokens_at(now) - u128::from(cost) * self.per_token;
        self.last = now;
    }
}

/// A bucket that leaks `amount` per nanosecond (scaled); a request pours in.
pub(crate) struct ExactLeakyBucket {
    per_token: u128,
    amount: u128,
    cap: u128,
    level: u128,
    last: u64,
}

impl ExactLeakyBucket {
    /// Holds `capacity`, leaks `amount` per `period` ns, empty at first.
    pub(crate) fn new(capacity: u32, amount: u32, period: u64) -> Self {
        ExactLeakyBucket {
            per_token: u128::from(period),
            amount: u128::from(amount),
            cap: u128::from(capacity) * u128::from(period),
            level: 0,
            last: 0,
        }
    }
    fn level_at(&self, now: u64) -> u128 {
        self.level
            .saturating_sub(self.amount * u128::from(now.saturating_sub(self.last)))
    }
}

impl Exact for ExactLeakyBucket {
    fn allows(&self, now: u64, cost: u32) -> bool {
        self.level_at(now) + u128::from(cost) * self.per_token <= self.cap
    }
    fn admit(&mut self, now: u64, cost: u32) {
        self.level = self.level_at(now) + u128::from(cost) * self.per_token;
        self.last = now;
    }
}

/// GCRA, virtual scheduling: a theoretical arrival time, emission interval
/// `period / amount`, tolerance `burst` intervals. Times are multiplied by
/// `amount` so the interval is the integer `period`.
pub(crate) struct ExactGcra {
    amount: u128,
    interval: u128,
    tolerance: u128,
    tat: u128,
}

impl ExactGcra {
    /// `amount` per `period` ns with a tolerance of `burst` cells.
    pub(crate) fn new(burst: u32, amount: u32, period: u64) -> Self {
        ExactGcra {
            amount: u128::from(amount),
            interval: u128::from(period),
            tolerance: u128::from(burst) * u128::from(period),
            tat: 0,
        }
    }
    fn next_tat(&self, now: u64, cost: u32) -> (u128, u128) {
        let now = u128::from(now) * self.amount;
        (now, self.tat.max(now) + u128::from(cost) * self.interval)
    }
}

impl Exact for ExactGcra {
    fn allows(&self, now: u64, cost: u32) -> bool {
        let (now, tat) = self.next_tat(now, cost);
        tat - now <= self.tolerance
    }
    fn admit(&mut self, now: u64, cost: u32) {
        self.tat = self.next_tat(now, cost).1;
    }
}
