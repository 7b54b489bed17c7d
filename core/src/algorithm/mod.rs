//! Rate-limiting algorithms as pure functions of merged windows.
//!
//! Every algorithm answers one question: given the cluster-wide usage of its
//! window as seen at `now` ([`WindowCounts`]), may `cost` more be admitted?
//! None keeps private state: what a node knows is what the replicated counters
//! say, so every node runs the same function on (nearly) the same input.

mod drain;
mod fixed;
mod sliding;

pub use drain::{Gcra, LeakyBucket, Rate, TokenBucket};
pub use fixed::FixedWindow;
pub use sliding::SlidingWindow;

use std::fmt;
use std::num::NonZeroU32;

use crate::time::Nanos;
use crate::window::{WindowCounts, WindowSpec, WindowSpecError};

/// The answer of one algorithm for one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted. `remaining` is what is left after this request; the quota is
    /// whole again after `reset_after` if nothing else arrives.
    Allow {
        /// Cost units left in the quota after this request.
        remaining: u64,
        /// Time until the quota is whole again.
        reset_after: Nanos,
    },
    /// Not now. Waiting `retry_after` (with no other arrivals) is enough for
    /// the same request to pass.
    Deny {
        /// Cost units left in the quota now: less than the request's cost.
        remaining: u64,
        /// Time until this request's cost fits, if nothing else arrives.
        retry_after: Nanos,
        /// Time until the quota is whole again.
        reset_after: Nanos,
    },
    /// The cost exceeds what this limit can ever admit at once: retrying is
    /// pointless. Distinct from a denial, as `governor`'s
    /// `InsufficientCapacity` is.
    Never {
        /// The most this limit admits at once (its limit or burst).
        capacity: u64,
    },
}

impl Verdict {
    /// True for [`Verdict::Allow`] only.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// One rate-limiting algorithm. Implementations must be pure: the same
/// counts, `now` and cost always give the same verdict.
pub trait RateAlgorithm: Send + Sync + fmt::Debug {
    /// The buckets this algorithm needs to be kept.
    fn window(&self) -> WindowSpec;
    /// The quota a client sees (`RateLimit-Policy` `q=`).
    fn quota(&self) -> u64;
    /// The period the quota refers to (`RateLimit-Policy` `w=`).
    fn quota_period(&self) -> Nanos;
    /// The verdict on admitting `cost` units given the merged `counts` at
    /// `counts.now`. Never fails and never panics, whatever the counts.
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict;
    /// The admission [`RateAlgorithm::decide`] would give for any counts
    /// with summary `s` at `now` in bucket `now_epoch`, for an algorithm
    /// that reads nothing of its window but the summary; `None` when it
    /// reads more, or when the request would not be admitted with a cost
    /// above zero (a denial's waits need the whole window). The key table
    /// keeps the summary of a hot key between decisions, so that this
    /// answer skips reading the window.
    fn admit_summary(&self, now: Nanos, now_epoch: u64, s: Summary, cost: u32) -> Option<Verdict> {
        let _ = (now, now_epoch, s, cost);
        None
    }
}

/// A window reduced to what the window algorithms read of it: the oldest
/// bucket's net count (zero for a window of one bucket) and the sum of the
/// others, the current bucket's included. It stays right for every `now`
/// within the current bucket as long as the counts do not change, and a
/// hit counted now only adds to `newer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The oldest bucket, which a sliding window weighs by its overlap.
    pub oldest: u64,
    /// Every newer bucket together, the current one included.
    pub newer: u64,
}

impl Summary {
    /// The summary of bucket counts `nets` (oldest first).
    pub fn of(nets: &[u64]) -> Summary {
        match nets {
            [] => Summary::default(),
            [only] => Summary {
                oldest: 0,
                newer: *only,
            },
            [oldest, newer @ ..] => Summary {
                oldest: *oldest,
                newer: newer.iter().fold(0u64, |a, &n| a.saturating_add(n)),
            },
        }
    }
}

/// Errors from building an algorithm out of parameters. Nothing is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A parameter that must be positive is zero.
    #[error("`{field}` must be greater than zero")]
    Zero {
        /// The parameter, as named in rule files.
        field: &'static str,
    },
    /// A sliding window that does not split into `precision` whole
    /// sub-buckets of at least 1 ms.
    #[error("window {window} must be a whole multiple of its {precision} sub-buckets, each at least 1ms")]
    Precision {
        /// The window length.
        window: Nanos,
        /// The sub-buckets asked for.
        precision: u32,
    },
    /// A parameter too large for the window it would need.
    #[error("`{field}` is out of range: {reason}")]
    Range {
        /// The parameter, as named in rule files.
        field: &'static str,
        /// Why, in words.
        reason: String,
    },
    /// The window the parameters imply cannot be kept.
    #[error(transparent)]
    Window(#[from] WindowSpecError),
}

pub(crate) fn nonzero(field: &'static str, v: u32) -> Result<NonZeroU32, ParamError> {
    NonZeroU32::new(v).ok_or(ParamError::Zero { field })
}

/// Every built-in algorithm, dispatched statically on the decision path. New
/// algorithms can be added behind [`RateAlgorithm`] through `Custom`.
#[derive(Debug)]
pub enum Algorithm {
    /// `sliding_window`.
    SlidingWindow(SlidingWindow),
    /// `fixed_window`.
    FixedWindow(FixedWindow),
    /// `token_bucket`.
    TokenBucket(TokenBucket),
    /// `leaky_bucket`.
    LeakyBucket(LeakyBucket),
    /// `gcra`.
    Gcra(Gcra),
    /// Any other [`RateAlgorithm`], dispatched dynamically; built in code,
    /// never from a rule file.
    Custom(Box<dyn RateAlgorithm>),
}

impl Algorithm {
    /// A short stable name, as written in rule files.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::SlidingWindow(_) => "sliding_window",
            Algorithm::FixedWindow(_) => "fixed_window",
            Algorithm::TokenBucket(_) => "token_bucket",
            Algorithm::LeakyBucket(_) => "leaky_bucket",
            Algorithm::Gcra(_) => "gcra",
            Algorithm::Custom(_) => "custom",
        }
    }
    fn inner(&self) -> &dyn RateAlgorithm {
        match self {
            Algorithm::SlidingWindow(a) => a,
            Algorithm::FixedWindow(a) => a,
            Algorithm::TokenBucket(a) => a,
            Algorithm::LeakyBucket(a) => a,
            Algorithm::Gcra(a) => a,
            Algorithm::Custom(a) => a.as_ref(),
        }
    }
}

impl RateAlgorithm for Algorithm {
    fn window(&self) -> WindowSpec {
        self.inner().window()
    }
    // Both run on every decision (its quota report): a match the
    // compiler can inline, not a call through the trait object.
    #[inline]
    fn quota(&self) -> u64 {
        match self {
            Algorithm::SlidingWindow(a) => a.quota(),
            Algorithm::FixedWindow(a) => a.quota(),
            Algorithm::TokenBucket(a) => a.quota(),
            Algorithm::LeakyBucket(a) => a.quota(),
            Algorithm::Gcra(a) => a.quota(),
            Algorithm::Custom(a) => a.quota(),
        }
    }
    #[inline]
    fn quota_period(&self) -> Nanos {
        match self {
            Algorithm::SlidingWindow(a) => a.quota_period(),
            Algorithm::FixedWindow(a) => a.quota_period(),
            Algorithm::TokenBucket(a) => a.quota_period(),
            Algorithm::LeakyBucket(a) => a.quota_period(),
            Algorithm::Gcra(a) => a.quota_period(),
            Algorithm::Custom(a) => a.quota_period(),
        }
    }
    #[inline]
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict {
        match self {
            Algorithm::SlidingWindow(a) => a.decide(counts, cost),
            Algorithm::FixedWindow(a) => a.decide(counts, cost),
            Algorithm::TokenBucket(a) => a.decide(counts, cost),
            Algorithm::LeakyBucket(a) => a.decide(counts, cost),
            Algorithm::Gcra(a) => a.decide(counts, cost),
            Algorithm::Custom(a) => a.decide(counts, cost),
        }
    }
    #[inline]
    fn admit_summary(&self, now: Nanos, now_epoch: u64, s: Summary, cost: u32) -> Option<Verdict> {
        match self {
            Algorithm::SlidingWindow(a) => a.admit_summary(now, now_epoch, s, cost),
            Algorithm::FixedWindow(a) => a.admit_summary(now, now_epoch, s, cost),
            Algorithm::Custom(a) => a.admit_summary(now, now_epoch, s, cost),
            _ => None,
        }
    }
}

impl Algorithm {
    /// Whether [`RateAlgorithm::admit_summary`] can answer for this
    /// algorithm (the window counters do; the drain algorithms read every
    /// bucket).
    pub fn reads_summary(&self) -> bool {
        matches!(
            self,
            Algorithm::SlidingWindow(_) | Algorithm::FixedWindow(_)
        )
    }
}

/// Smallest `x` with `x * d >= n` (for waits that must not come back early).
pub(crate) fn div_ceil_u128(n: u128, d: u128) -> u128 {
    n.div_ceil(d)
}

pub(crate) fn nanos_u128(v: u128) -> Nanos {
    Nanos::new(u64::try_from(v).unwrap_or(u64::MAX))
}
