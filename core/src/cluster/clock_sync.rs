//! Clock discipline: steers this node's clock correction toward the
//! cluster's time, and closes the clock gate while it is too far off.
//!
//! The replicator estimates every peer's offset from the acknowledgements'
//! four timestamps (NTP's method, `replication::ack`), against this node's
//! *corrected* clock. The cluster's time is the median of the members'
//! clocks: the median of `{0} ∪ {peer offsets}` seen from here (this node
//! counts as one member at offset zero; for an even count the mean of the
//! two middle values). One node whose clock is off is outvoted by the
//! others: they see a median of zero and do not move, it sees its own
//! error and slews toward them. When the correction moves, every estimate
//! is moved the other way at once ([`Replicator::shift_clock_estimates`]),
//! so the smoothed estimates never lag the node's own steering and the
//! loop does not overshoot.
//!
//! The gate: while the cluster is more than `max_offset` away from the
//! corrected clock (a clock step, a node that just started with a wrong
//! clock), the node admits nothing ([`crate::limiter::Limiter::set_clock_in_bounds`]);
//! it reopens once the offset is back within half the bound (hysteresis,
//! so that it does not flap at the edge). A node that has measured no peer
//! yet has nothing to compare with and stays open: closing it until the
//! first acknowledgement made every node unavailable for a sync interval
//! at start and changed no measured figure (a node that starts recovers
//! its counts from its peers first, and measures them meanwhile).
//!
//! Calling order: [`ClockDiscipline::handle_timeout`] on every timer tick
//! of the node, with the *raw* (uncorrected) time.

use crate::corrected::ClockCorrection;
use crate::time::Nanos;

use super::replication::Replicator;

/// The default bound on a node's offset from the cluster's time before it
/// stops admitting: 50 ms. Within it, the skew a node can still have costs
/// at most `s/W` of a window's quota (5 % of a 1 s window) before the
/// correction removes it; beyond it, the node's windows are not the
/// cluster's and its clients are better served by another node. A healthy
/// LAN keeps corrected clocks within a millisecond of each other, so only
/// a clock step or a node that started with a wrong clock reaches it.
pub const DEFAULT_MAX_CLOCK_OFFSET: Nanos = Nanos::from_millis(50);

/// Offsets this small are left alone: they are within what jitter and
/// asymmetric paths make the estimates wander by (a few hundred
/// microseconds with 3 ms of jitter), and steering by that noise made
/// every clock wander with it (measured: docs/report.md, "Clock skew").
pub const DEADBAND: Nanos = Nanos::from_millis(2);

/// Where this node's clock stands against the cluster's. The default is
/// a node that has measured nothing yet: no offset, no correction, open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockStatus {
    /// The cluster's time minus this node's corrected time (ns); `None`
    /// before any peer has been measured.
    pub offset_ns: Option<i64>,
    /// The correction applied to the raw clock now (ns).
    pub correction_ns: i64,
    /// The clock gate is open: the node may admit.
    pub in_bounds: bool,
}

impl Default for ClockStatus {
    fn default() -> Self {
        ClockStatus {
            offset_ns: None,
            correction_ns: 0,
            in_bounds: true,
        }
    }
}

/// The steering state of one node's clock correction.
#[derive(Debug)]
pub struct ClockDiscipline {
    correction: ClockCorrection,
    max_offset: Nanos,
    /// The correction the estimates were last brought in line with.
    applied: i64,
    status: ClockStatus,
}

impl ClockDiscipline {
    /// Steers `correction`; closes the gate beyond `max_offset`.
    pub fn new(correction: ClockCorrection, max_offset: Nanos) -> Self {
        ClockDiscipline {
            correction,
            max_offset,
            applied: 0,
            status: ClockStatus::default(),
        }
    }

    /// The correction it steers (shared with the node's clock).
    pub fn correction(&self) -> &ClockCorrection {
        &self.correction
    }

    /// The status after the last tick.
    pub fn status(&self) -> ClockStatus {
        self.status
    }

    /// One tick at raw time `raw`: brings the peers' estimates in line
    /// with the correction as it now is, steers toward the cluster's
    /// median, and decides the gate.
    pub fn handle_timeout(&mut self, raw: Nanos, repl: &mut Replicator) -> ClockStatus {
        let current = self.correction.offset_at(raw);
        let moved = current.saturating_sub(self.applied);
        if moved != 0 {
            repl.shift_clock_estimates(moved);
            self.applied = current;
        }
        let offset = cluster_offset(repl.clock_offsets());
        if let Some(e) = offset.filter(|e| e.unsigned_abs() > DEADBAND.as_u64()) {
            let target = current.saturating_add(e);
            if target != self.correction.target() {
                self.correction.steer(raw, target);
            }
        }
        let bound = self.max_offset.as_u64();
        let in_bounds = match offset {
            None => true,
            Some(e) if self.status.in_bounds => e.unsigned_abs() <= bound,
            Some(e) => e.unsigned_abs() <= bound / 2,
        };
        self.status = ClockStatus {
            offset_ns: offset,
            correction_ns: current,
            in_bounds,
        };
        self.status
    }
}

/// The cluster's time relative to this node: the median of `{0} ∪
/// offsets` (this node at zero), the mean of the two middle values for an
/// even count; `None` with no offsets at all.
pub fn cluster_offset(offsets: impl Iterator<Item = i64>) -> Option<i64> {
    let mut all: Vec<i64> = offsets.collect();
    if all.is_empty() {
        return None;
    }
    all.push(0);
    all.sort_unstable();
    let n = all.len();
    Some(if n % 2 == 1 {
        all[n / 2]
    } else {
        ((i128::from(all[n / 2 - 1]) + i128::from(all[n / 2])) / 2) as i64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_outvotes_one_wrong_clock() {
        // Four healthy peers and one 500 ms ahead: a healthy node stays.
        assert_eq!(cluster_offset([0, 3, -2, 500_000_000].into_iter()), Some(0));
        // The wrong node itself sees everyone 500 ms behind.
        let behind = [-500_000_000i64, -499_000_000, -501_000_000, -500_000_000];
        assert_eq!(cluster_offset(behind.into_iter()), Some(-500_000_000));
        // Two nodes meet half-way.
        assert_eq!(cluster_offset([10].into_iter()), Some(5));
        assert_eq!(cluster_offset(std::iter::empty()), None);
    }
}
