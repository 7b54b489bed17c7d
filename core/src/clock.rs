//! The one place that reads real time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::corrected::ClockCorrection;
use crate::time::{Clock, Nanos};

/// Wall-clock time since the Unix epoch. Bucket boundaries come from absolute
/// time so that nodes agree on them. A cluster node reads it through its
/// clock correction ([`SystemClock::corrected`]): its own clock steered
/// toward the cluster's (DESIGN.md, "Clocks"); the effect of what skew
/// remains is bounded there and measured in docs/report.md.
#[derive(Clone, Debug, Default)]
pub struct SystemClock {
    /// Added to the operating system's clock: zero, except when a test
    /// plays a node with a wrong clock.
    offset_ns: i64,
    correction: Option<ClockCorrection>,
}

impl SystemClock {
    /// The operating system's clock as it is.
    pub const fn raw() -> Self {
        SystemClock {
            offset_ns: 0,
            correction: None,
        }
    }

    /// This clock, read through `correction`.
    pub fn corrected(self, correction: ClockCorrection) -> Self {
        SystemClock {
            correction: Some(correction),
            ..self
        }
    }

    /// This clock, `offset_ns` off the operating system's: for tests that
    /// play a node whose clock is wrong (the node's hidden
    /// `--test-clock-offset`), never for production.
    pub fn with_test_offset(self, offset_ns: i64) -> Self {
        SystemClock { offset_ns, ..self }
    }

    /// The uncorrected time: the operating system's clock plus the test
    /// offset.
    pub fn raw_now(&self) -> Nanos {
        let os = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(Nanos::from)
            .unwrap_or(Nanos::ZERO);
        let t = i128::from(os.as_u64()) + i128::from(self.offset_ns);
        Nanos::new(t.clamp(0, i128::from(u64::MAX)) as u64)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        let raw = self.raw_now();
        match &self.correction {
            Some(c) => c.corrected(raw),
            None => raw,
        }
    }
}
