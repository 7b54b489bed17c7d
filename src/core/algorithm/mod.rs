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

use crate::core::time::Nanos;
use crate::core::window::{WindowCounts, WindowSpec, WindowSpecError};

/// The answer of one algorithm for one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted. `remaining` is what is left after this request; the quota is
    /// whole again after `reset_after` if nothing else arrives.
    Allow { remaining: u64, reset_after: Nanos },
    /// Not now. Waiting `retry_after` (with no other arrivals) is enough for
    /// the same request to pass.
    Deny {
        remaining: u64,
        retry_after: Nanos,
        reset_after: Nanos,
    },
    /// The cost exceeds what this limit can ever admit at once: retrying is
    /// pointless. Distinct from a denial, as `governor`'s
    /// `InsufficientCapacity` is.
    Never { capacity: u64 },
}

impl Verdict {
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
    fn decide(&self, counts: &WindowCounts<'_>, cost: u32) -> Verdict;
}

/// Errors from building an algorithm out of parameters. Nothing is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("`{field}` must be greater than zero")]
    Zero { field: &'static str },
    #[error("window {window} must be a whole multiple of its {precision} sub-buckets, each at least 1ms")]
    Precision { window: Nanos, precision: u32 },
    #[error("`{field}` is out of range: {reason}")]
    Range { field: &'static str, reason: String },
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
    SlidingWindow(SlidingWindow),
    FixedWindow(FixedWindow),
    TokenBucket(TokenBucket),
    LeakyBucket(LeakyBucket),
    Gcra(Gcra),
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
    fn quota(&self) -> u64 {
        self.inner().quota()
    }
    fn quota_period(&self) -> Nanos {
        self.inner().quota_period()
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
}

/// Smallest `x` with `x * d >= n` (for waits that must not come back early).
pub(crate) fn div_ceil_u128(n: u128, d: u128) -> u128 {
    n.div_ceil(d)
}

pub(crate) fn nanos_u128(v: u128) -> Nanos {
    Nanos::new(u64::try_from(v).unwrap_or(u64::MAX))
}
