//! Time as an input.
//!
//! Nothing in the core reads the system clock: every function that depends on
//! time takes a [`Nanos`] argument. Drivers read real time through
//! [`crate::clock::SystemClock`]; tests and simulations use [`ManualClock`].

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point in time or a span of time, in nanoseconds.
///
/// Points are measured from the Unix epoch so that every node derives the same
/// bucket boundaries from its own clock (see `window`). A `u64` of nanoseconds
/// lasts until the year 2554.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(u64);

impl Nanos {
    /// No time; also the Unix epoch itself.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest value: what saturating arithmetic stops at.
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// `nanos` nanoseconds.
    pub const fn new(nanos: u64) -> Self {
        Nanos(nanos)
    }
    /// `micros` microseconds, saturating at [`Nanos::MAX`].
    pub const fn from_micros(micros: u64) -> Self {
        Nanos(micros.saturating_mul(1_000))
    }
    /// `millis` milliseconds, saturating at [`Nanos::MAX`].
    pub const fn from_millis(millis: u64) -> Self {
        Nanos(millis.saturating_mul(1_000_000))
    }
    /// `secs` seconds, saturating at [`Nanos::MAX`].
    pub const fn from_secs(secs: u64) -> Self {
        Nanos(secs.saturating_mul(1_000_000_000))
    }
    /// The count of nanoseconds.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// Whole milliseconds, rounded up, so that a client that waits this long
    /// never comes back too early.
    pub const fn as_millis_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000)
    }
    /// Whole seconds, rounded up (the `Retry-After` header's unit).
    pub const fn as_secs_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000_000)
    }
    /// `self − other`, or zero if `other` is later. `-` does the same.
    pub const fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }
    /// `self + other`, stopping at [`Nanos::MAX`]. `+` does the same.
    pub const fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        self.saturating_add(rhs)
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, rhs: Nanos) -> Nanos {
        self.saturating_sub(rhs)
    }
}

impl std::ops::Mul<u64> for Nanos {
    type Output = Nanos;
    fn mul(self, rhs: u64) -> Nanos {
        Nanos(self.0.saturating_mul(rhs))
    }
}

impl From<Duration> for Nanos {
    fn from(d: Duration) -> Self {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl From<Nanos> for Duration {
    fn from(n: Nanos) -> Self {
        Duration::from_nanos(n.0)
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&Duration::from(*self), f)
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the Unix epoch, as this node believes.
    fn now(&self) -> Nanos;
}

/// A clock that moves only when told to. Shared by reference between the
/// test and the code under test.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock that reads `start` until moved.
    pub fn new(start: Nanos) -> Self {
        ManualClock(AtomicU64::new(start.as_u64()))
    }
    /// Moves the clock to `t`, backwards too (to test clock steps).
    pub fn set(&self, t: Nanos) {
        self.0.store(t.as_u64(), Ordering::Relaxed);
    }
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Nanos) {
        self.0.fetch_add(by.as_u64(), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        Nanos(self.0.load(Ordering::Relaxed))
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

/// Parses a duration written as in rule files: `"250ms"`, `"1s"`, `"5m"`,
/// `"1h"`, `"1d"`, `"100us"`, `"10ns"`. One number, one unit, no spaces.
pub fn parse_duration(text: &str) -> Result<Nanos, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(DurationError::MissingUnit)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(DurationError::MissingNumber);
    }
    let value: u64 = digits.parse().map_err(|_| DurationError::TooLarge)?;
    let scale: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "d" => 86_400 * 1_000_000_000,
        other => return Err(DurationError::UnknownUnit(other.to_owned())),
    };
    value
        .checked_mul(scale)
        .map(Nanos)
        .ok_or(DurationError::TooLarge)
}

/// Why [`parse_duration`] refused a text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Only digits (or nothing): no unit.
    #[error("a duration needs a unit: ns, us, ms, s, m, h or d (as in \"1s\")")]
    MissingUnit,
    /// The text does not start with a digit.
    #[error("a duration starts with a whole number (as in \"250ms\")")]
    MissingNumber,
    /// A unit other than `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`, `d`.
    #[error("unknown duration unit {0:?}: use ns, us, ms, s, m, h or d")]
    UnknownUnit(String),
    /// More than `u64` nanoseconds (about 584 years).
    #[error("duration too large")]
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("10ns"), Ok(Nanos(10)));
        assert_eq!(parse_duration("3us"), Ok(Nanos(3_000)));
        assert_eq!(parse_duration("250ms"), Ok(Nanos::from_millis(250)));
        assert_eq!(parse_duration("1s"), Ok(Nanos::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Nanos::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Nanos::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Nanos::from_secs(86_400)));
    }

    #[test]
    fn rejects_malformed_durations() {
        assert_eq!(parse_duration("10"), Err(DurationError::MissingUnit));
        assert_eq!(parse_duration("s"), Err(DurationError::MissingNumber));
        assert!(matches!(
            parse_duration("1w"),
            Err(DurationError::UnknownUnit(_))
        ));
        assert_eq!(
            parse_duration("99999999999999d"),
            Err(DurationError::TooLarge)
        );
    }

    #[test]
    fn ceil_conversions_never_round_down() {
        assert_eq!(Nanos(1).as_millis_ceil(), 1);
        assert_eq!(Nanos::from_millis(1000).as_secs_ceil(), 1);
        assert_eq!(Nanos::from_millis(1001).as_secs_ceil(), 2);
        assert_eq!(Nanos::ZERO.as_secs_ceil(), 0);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Nanos::from_secs(5));
        assert_eq!(c.now(), Nanos::from_secs(5));
        c.advance(Nanos::from_millis(1));
        assert_eq!(c.now(), Nanos::new(5_001_000_000));
        c.set(Nanos::ZERO);
        assert_eq!(c.now(), Nanos::ZERO);
    }
}
