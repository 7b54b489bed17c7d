//! The one place that reads real time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::time::{Clock, Nanos};

/// Wall-clock time since the Unix epoch. Bucket boundaries come from absolute
/// time so that nodes agree on them; the effect of skew between nodes is
/// bounded (DESIGN.md, "Clocks") and measured (docs/report.md).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(Nanos::from)
            .unwrap_or(Nanos::ZERO)
    }
}
