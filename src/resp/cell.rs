//! redis-cell's `CL.THROTTLE`: a limit named in the call.
//!
//! `CL.THROTTLE key max_burst count_per_period period [quantity]` carries
//! its limit: a GCRA that admits `max_burst + 1` at once and
//! `count_per_period` every `period` seconds. That is the token bucket of
//! capacity `max_burst + 1` refilled at `count_per_period` per `period`,
//! decided as a request-defined limit (`drl_core::rules::request`): exactly
//! these parameters, whatever rules the cluster runs, counted under the key
//! and the parameters (a key asked with other parameters counts apart),
//! and replicated like any other count. The rules are never touched.

use drl_core::limiter::{Decision, Outcome};
use drl_core::rules::request::LimitSpec;
use drl_core::time::Nanos;

/// The descriptor field that carries the key.
pub const KEY_FIELD: &str = "cl_key";

/// The parameters of one `CL.THROTTLE` call, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    /// Hits admitted at once beyond the first.
    pub max_burst: u32,
    /// Hits per period.
    pub count_per_period: u32,
    /// Seconds.
    pub period: u32,
    /// Hits this call takes (0 reads the state).
    pub quantity: u32,
}

/// Why the arguments of a `CL.THROTTLE` are not usable. Nothing is counted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleError {
    #[error("wrong number of arguments for 'cl.throttle' command")]
    /// Not three or four numbers after the key: burst, count, period and an
    /// optional quantity.
    Arity,
    #[error("{0}: value is not an integer or out of range")]
    /// The named argument is not an integer in range.
    NotInteger(&'static str),
    #[error("{0} must be positive")]
    /// The named argument is zero where it must be positive.
    Zero(&'static str),
}

/// A non-negative integer argument that fits `u32`.
pub fn integer(name: &'static str, arg: &[u8]) -> Result<u32, ThrottleError> {
    std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(ThrottleError::NotInteger(name))
}

impl Throttle {
    /// The arguments after the command name and the key.
    pub fn from_args(args: &[&[u8]]) -> Result<Throttle, ThrottleError> {
        if !(3..=4).contains(&args.len()) {
            return Err(ThrottleError::Arity);
        }
        let max_burst = integer("max_burst", args[0])?;
        if max_burst == u32::MAX {
            return Err(ThrottleError::NotInteger("max_burst"));
        }
        let count_per_period = integer("count_per_period", args[1])?;
        let period = integer("period", args[2])?;
        let quantity = match args.get(3) {
            Some(q) => integer("quantity", q)?,
            None => 1,
        };
        if count_per_period == 0 {
            return Err(ThrottleError::Zero("count_per_period"));
        }
        if period == 0 {
            return Err(ThrottleError::Zero("period"));
        }
        Ok(Throttle {
            max_burst,
            count_per_period,
            period,
            quantity,
        })
    }

    /// The triple, as `max_burst-count_per_period-period`.
    pub fn params(&self) -> String {
        format!(
            "{}-{}-{}",
            self.max_burst, self.count_per_period, self.period
        )
    }

    /// The limit of this triple: a token bucket of `max_burst + 1` refilled
    /// at `count_per_period` per `period` seconds.
    pub fn spec(&self) -> LimitSpec {
        LimitSpec {
            algorithm: "token_bucket".into(),
            capacity: Some(self.max_burst.saturating_add(1)),
            refill: Some(self.count_per_period),
            per: Some(format!("{}s", self.period)),
            ..LimitSpec::default()
        }
    }
}

/// Whole seconds, rounded up: a client that waits this long is not early.
fn ceil_secs(n: Nanos) -> i64 {
    i64::try_from(n.as_u64().div_ceil(1_000_000_000)).unwrap_or(i64::MAX)
}

/// redis-cell's reply: limited (0 or 1), limit, remaining, retry after
/// (seconds, -1 when admitted), reset after (seconds until the key is full
/// again). `None` when no limit decided.
pub fn reply(decision: &Decision) -> Option<[i64; 5]> {
    let q = decision.quota?;
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let remaining = i64::try_from(q.remaining).unwrap_or(i64::MAX);
    let reset = ceil_secs(q.reset_after);
    Some(match decision.outcome {
        Outcome::Allowed => [0, limit, remaining, -1, reset],
        Outcome::Denied => [1, limit, remaining, ceil_secs(q.retry_after).max(1), reset],
        // More than the bucket holds: waiting cannot help.
        Outcome::Never => [1, limit, remaining, -1, reset],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use drl_core::decide::{block_on_ready, Decider};
    use drl_core::descriptor::Descriptors;
    use drl_core::limiter::{Check, Limiter, LimiterConfig};
    use drl_core::rules::request::RequestLimit;
    use drl_core::rules::RuleSet;
    use drl_core::time::ManualClock;

    fn throttle(args: &[&str]) -> Result<Throttle, ThrottleError> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Throttle::from_args(&args)
    }

    #[test]
    fn checks_the_arguments() {
        assert_eq!(
            throttle(&["15", "30", "60"]).unwrap(),
            Throttle {
                max_burst: 15,
                count_per_period: 30,
                period: 60,
                quantity: 1
            }
        );
        assert_eq!(throttle(&["15", "30", "60", "0"]).unwrap().quantity, 0);
        assert_eq!(throttle(&["15", "30"]), Err(ThrottleError::Arity));
        assert_eq!(
            throttle(&["1", "2", "3", "4", "5"]),
            Err(ThrottleError::Arity)
        );
        assert_eq!(
            throttle(&["-1", "30", "60"]),
            Err(ThrottleError::NotInteger("max_burst"))
        );
        assert_eq!(
            throttle(&["1", "x", "60"]),
            Err(ThrottleError::NotInteger("count_per_period"))
        );
        assert_eq!(
            throttle(&["1", "30", "60", "1.5"]),
            Err(ThrottleError::NotInteger("quantity"))
        );
        assert_eq!(
            throttle(&["1", "0", "60"]),
            Err(ThrottleError::Zero("count_per_period"))
        );
        assert_eq!(
            throttle(&["1", "1", "0"]),
            Err(ThrottleError::Zero("period"))
        );
        assert_eq!(
            throttle(&["4294967295", "1", "1"]),
            Err(ThrottleError::NotInteger("max_burst"))
        );
    }

    /// The limit behaves as redis-cell's README shows: 16 at once, then one
    /// every 2 s, whatever the rules say.
    #[test]
    fn the_limit_of_a_triple_is_redis_cells() {
        let t = throttle(&["15", "30", "60"]).unwrap();
        // A catch-all rule that would admit far more: not consulted.
        let rules = RuleSet::from_toml(
            "[[rules]]\nname = \"all\"\nmatch = {}\n\
             limits = [ { algorithm = \"fixed_window\", limit = 1000, window = \"1m\" } ]\n",
        )
        .unwrap();
        let clock = ManualClock::new(Nanos::from_secs(1_000));
        let limiter =
            Arc::new(Limiter::with_clock(rules, LimiterConfig::default(), clock).unwrap());
        let limit = Arc::new(RequestLimit::new(&t.spec(), limiter.request_limit_policy()).unwrap());
        let decider = Decider::local(limiter);
        let fields = [(KEY_FIELD, "user123")];
        let d = Descriptors::new(&fields).unwrap();
        let check = |cost| {
            let c = Check::with_limit(d, cost, limit.clone());
            block_on_ready(decider.decide(std::slice::from_ref(&c)))
                .unwrap()
                .unwrap()
                .decision()
        };
        let first = reply(&check(1)).unwrap();
        assert_eq!(&first[..3], &[0, 16, 15]);
        assert_eq!(first[3], -1);
        // Exactly 2 s for redis-cell; the bucket's time buckets (4 s for a
        // 32 s refill) may make it read up to one bucket more.
        assert!((2..=6).contains(&first[4]), "reset after {}", first[4]);
        for _ in 0..15 {
            assert!(check(1).is_allowed());
        }
        let refused = reply(&check(1)).unwrap();
        assert_eq!(&refused[..3], &[1, 16, 0]);
        assert!((1..=6).contains(&refused[3]), "retry after {}", refused[3]);
        let never = reply(&check(17)).unwrap();
        assert_eq!((never[0], never[3]), (1, -1));
    }
}
