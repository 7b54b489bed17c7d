//! A circuit breaker for one node: closed, open, half-open.
//!
//! Sans-IO: time is an input, nothing here reads a clock or touches a
//! socket. The client asks [`CircuitBreaker::poll_permit`] before each
//! attempt on the node and reports the attempt's end with
//! [`CircuitBreaker::handle_success`] or [`CircuitBreaker::handle_failure`].
//!
//! - **Closed**: every attempt is permitted; `failure_threshold` failures in
//!   a row open the breaker.
//! - **Open**: no attempt is permitted until `cool_down` has passed since it
//!   opened. A dead node therefore costs at most one failed attempt (one
//!   timeout for a node that hangs) per cool-down, not one per call.
//! - **Half-open**: after the cool-down, one trial attempt at a time is
//!   permitted; `success_threshold` successful trials close the breaker, a
//!   failed one opens it again for another cool-down.
//!
//! Calling order: `poll_permit(now)` → (attempt) → `handle_success(now)` or
//! `handle_failure(now)`. A permit that is never reported (the attempt was
//! dropped) is released by [`CircuitBreaker::handle_abandoned`].

use std::num::NonZeroU32;

use drl_core::time::Nanos;

/// How a breaker trips and recovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: NonZeroU32,
    /// How long an open breaker refuses attempts before a trial.
    pub cool_down: Nanos,
    /// Successful trials in half-open that close the breaker.
    pub success_threshold: NonZeroU32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: NonZeroU32::MIN.saturating_add(2),
            cool_down: Nanos::from_secs(2),
            success_threshold: NonZeroU32::MIN,
        }
    }
}

/// The externally visible state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Attempts pass.
    Closed,
    /// Attempts are refused until the cool-down ends.
    Open,
    /// One trial attempt at a time decides whether it closes.
    HalfOpen,
}

impl BreakerState {
    /// The value of the `breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
    /// The state as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        since: Nanos,
    },
    HalfOpen {
        trial_in_flight: bool,
        successes: u32,
    },
}

/// Whether an attempt may go to the node now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead (closed).
    Granted,
    /// Go ahead: this attempt is the half-open trial.
    Trial,
    /// Do not: the breaker is open, or a trial is already in flight.
    Refused,
}

#[derive(Clone, Debug)]
/// One node's circuit breaker (sans-IO: time is an input).
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: State,
    opened: u64,
    closed: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            state: State::Closed { failures: 0 },
            opened: 0,
            closed: 0,
        }
    }

    /// The state at `now` (an open breaker whose cool-down has passed reads
    /// as half-open).
    pub fn state(&self, now: Nanos) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
            State::Open { since } if now >= since.saturating_add(self.config.cool_down) => {
                BreakerState::HalfOpen
            }
            State::Open { .. } => BreakerState::Open,
        }
    }

    /// How many times the breaker opened, and closed again.
    pub fn transitions(&self) -> (u64, u64) {
        (self.opened, self.closed)
    }

    /// When an open breaker will permit its trial (`None` unless open).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        match self.state {
            State::Open { since } => Some(since.saturating_add(self.config.cool_down)),
            _ => None,
        }
    }

    /// Asks for one attempt. A granted `Trial` must be reported.
    pub fn poll_permit(&mut self, now: Nanos) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Granted,
            State::Open { since } => {
                if now >= since.saturating_add(self.config.cool_down) {
                    self.state = State::HalfOpen {
                        trial_in_flight: true,
                        successes: 0,
                    };
                    Permit::Trial
                } else {
                    Permit::Refused
                }
            }
            State::HalfOpen {
                trial_in_flight: true,
                ..
            } => Permit::Refused,
            State::HalfOpen {
                trial_in_flight: false,
                successes,
            } => {
                self.state = State::HalfOpen {
                    trial_in_flight: true,
                    successes,
                };
                Permit::Trial
            }
        }
    }

    /// Whether [`Self::poll_permit`] would grant something now, without
    /// taking it.
    pub fn would_permit(&self, now: Nanos) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { since } => now >= since.saturating_add(self.config.cool_down),
            State::HalfOpen {
                trial_in_flight, ..
            } => !trial_in_flight,
        }
    }

    /// An attempt on the node succeeded.
    pub fn handle_success(&mut self, _now: Nanos) {
        match self.state {
            State::Closed { .. } => self.state = State::Closed { failures: 0 },
            State::HalfOpen { successes, .. } => {
                let successes = successes + 1;
                if successes >= self.config.success_threshold.get() {
                    self.state = State::Closed { failures: 0 };
                    self.closed += 1;
                } else {
                    self.state = State::HalfOpen {
                        trial_in_flight: false,
                        successes,
                    };
                }
            }
            // A late answer of an attempt started before the breaker opened:
            // the node is alive, but the cool-down stands.
            State::Open { .. } => {}
        }
    }

    /// An attempt on the node failed (error or timeout).
    pub fn handle_failure(&mut self, now: Nanos) {
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold.get() {
                    self.state = State::Open { since: now };
                    self.opened += 1;
                } else {
                    self.state = State::Closed { failures };
                }
            }
            State::HalfOpen { .. } => {
                self.state = State::Open { since: now };
                self.opened += 1;
            }
            State::Open { .. } => {}
        }
    }

    /// A trial permit was granted but its attempt was never made or its
    /// result was lost: let another trial go.
    pub fn handle_abandoned(&mut self) {
        if let State::HalfOpen {
            trial_in_flight: true,
            successes,
        } = self.state
        {
            self.state = State::HalfOpen {
                trial_in_flight: false,
                successes,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(failures: u32, cool_ms: u64, successes: u32) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: NonZeroU32::new(failures).unwrap(),
            cool_down: Nanos::from_millis(cool_ms),
            success_threshold: NonZeroU32::new(successes).unwrap(),
        }
    }

    fn ms(n: u64) -> Nanos {
        Nanos::from_millis(n)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let mut b = CircuitBreaker::new(config(3, 1000, 1));
        b.handle_failure(ms(0));
        b.handle_failure(ms(1));
        b.handle_success(ms(2)); // resets the run
        b.handle_failure(ms(3));
        b.handle_failure(ms(4));
        assert_eq!(b.state(ms(5)), BreakerState::Closed);
        b.handle_failure(ms(5));
        assert_eq!(b.state(ms(6)), BreakerState::Open);
        assert_eq!(b.poll_permit(ms(6)), Permit::Refused);
        assert_eq!(b.transitions(), (1, 0));
    }

    #[test]
    fn one_trial_per_cool_down_then_closes_on_success() {
        let mut b = CircuitBreaker::new(config(1, 1000, 1));
        b.handle_failure(ms(0));
        assert_eq!(b.poll_timeout(), Some(ms(1000)));
        assert_eq!(b.poll_permit(ms(999)), Permit::Refused);
        assert_eq!(b.state(ms(1000)), BreakerState::HalfOpen);
        assert_eq!(b.poll_permit(ms(1000)), Permit::Trial);
        // Only one trial at a time.
        assert_eq!(b.poll_permit(ms(1001)), Permit::Refused);
        b.handle_success(ms(1002));
        assert_eq!(b.state(ms(1002)), BreakerState::Closed);
        assert_eq!(b.poll_permit(ms(1003)), Permit::Granted);
        assert_eq!(b.transitions(), (1, 1));
    }

    #[test]
    fn failed_trial_reopens_for_a_full_cool_down() {
        let mut b = CircuitBreaker::new(config(2, 500, 1));
        b.handle_failure(ms(0));
        b.handle_failure(ms(10));
        assert_eq!(b.poll_permit(ms(510)), Permit::Trial);
        b.handle_failure(ms(600));
        assert_eq!(b.state(ms(601)), BreakerState::Open);
        assert_eq!(b.poll_permit(ms(1099)), Permit::Refused);
        assert_eq!(b.poll_permit(ms(1100)), Permit::Trial);
        assert_eq!(b.transitions(), (2, 0));
    }

    #[test]
    fn a_dead_node_costs_one_attempt_per_cool_down() {
        // Calls every millisecond for ten seconds against a node that always
        // fails: attempts = threshold + one trial per cool-down.
        let mut b = CircuitBreaker::new(config(3, 1000, 1));
        let mut attempts = 0;
        for t in 0..10_000 {
            if b.poll_permit(ms(t)) != Permit::Refused {
                attempts += 1;
                b.handle_failure(ms(t));
            }
        }
        assert_eq!(attempts, 3 + 9);
    }

    #[test]
    fn success_threshold_needs_that_many_trials() {
        let mut b = CircuitBreaker::new(config(1, 100, 2));
        b.handle_failure(ms(0));
        assert_eq!(b.poll_permit(ms(100)), Permit::Trial);
        b.handle_success(ms(101));
        assert_eq!(b.state(ms(101)), BreakerState::HalfOpen);
        assert_eq!(b.poll_permit(ms(102)), Permit::Trial);
        b.handle_success(ms(103));
        assert_eq!(b.state(ms(103)), BreakerState::Closed);
    }

    #[test]
    fn abandoned_trial_frees_the_slot() {
        let mut b = CircuitBreaker::new(config(1, 100, 1));
        b.handle_failure(ms(0));
        assert_eq!(b.poll_permit(ms(100)), Permit::Trial);
        b.handle_abandoned();
        assert!(b.would_permit(ms(101)));
        assert_eq!(b.poll_permit(ms(101)), Permit::Trial);
    }

    #[test]
    fn late_success_does_not_close_an_open_breaker() {
        let mut b = CircuitBreaker::new(config(1, 100, 1));
        b.handle_failure(ms(0));
        b.handle_success(ms(1));
        assert_eq!(b.state(ms(2)), BreakerState::Open);
    }
}
