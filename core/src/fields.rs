//! The rate-limit fields of a decision, as text: what the HTTP API, Envoy's
//! rate limit service, the axum middleware and the SDK's tower layer all
//! send, so that no two of them can say it differently.
//!
//! Following draft-ietf-httpapi-ratelimit-headers (structured fields):
//!
//! ```text
//! RateLimit-Policy: "<rule>";q=<quota>;w=<window seconds>
//! RateLimit: "<rule>";r=<remaining>;t=<seconds until the quota is whole>
//! Retry-After: <seconds>            (429 Denied only)
//! ```
//!
//! Seconds are whole and rounded up, so a client that waits the advertised
//! time never comes back too early. `w` is at least 1, and `t` never exceeds
//! `w`: the quota of a window is whole again within one window, and a `t`
//! rounded up past it (a 1.2 s reset of a 1 s window) would tell a client a
//! reset later than the policy it states.

use crate::limiter::{Outcome, QuotaState};
use crate::time::Nanos;

/// The field values of one decision (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitFields {
    /// `RateLimit-Policy`.
    pub policy: String,
    /// `RateLimit`: absent for `Never` (the cost exceeds the quota the
    /// policy states; neither a reset nor a retry time would mean anything).
    pub ratelimit: Option<String>,
    /// `Retry-After`, in whole seconds: `Denied` only.
    pub retry_after: Option<u64>,
}

impl RateLimitFields {
    /// The fields of a decision by `outcome` of the limit `q` of rule
    /// `rule`.
    pub fn new(outcome: Outcome, rule: &str, q: &QuotaState) -> Self {
        let name = sf_string(rule);
        let w = window_secs(q.period);
        let policy = format!("{name};q={};w={w}", q.limit);
        if outcome == Outcome::Never {
            return RateLimitFields {
                policy,
                ratelimit: None,
                retry_after: None,
            };
        }
        let ratelimit = format!(
            "{name};r={};t={}",
            q.remaining,
            q.reset_after.as_secs_ceil().min(w)
        );
        RateLimitFields {
            policy,
            ratelimit: Some(ratelimit),
            retry_after: (outcome == Outcome::Denied).then(|| retry_after_secs(q.retry_after)),
        }
    }
}

/// `Retry-After` in whole seconds, rounded up.
pub fn retry_after_secs(retry_after: Nanos) -> u64 {
    retry_after.as_secs_ceil()
}

/// The policy window in whole seconds, rounded up, at least 1.
pub fn window_secs(period: Nanos) -> u64 {
    period.as_secs_ceil().max(1)
}

/// A structured-field string: printable ASCII with `"` and `\` escaped.
/// Rule names are already restricted to `[A-Za-z0-9_.-]`; anything else is
/// replaced so that a header is always valid.
pub fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(remaining: u64, reset_ms: u64, retry_ms: u64) -> QuotaState {
        QuotaState {
            limit_index: 0,
            rule: crate::rules::RuleName::intern("r"),
            limit_id: crate::key::LimitId(1),
            limit: 10,
            period: Nanos::from_millis(1500),
            remaining,
            reset_after: Nanos::from_millis(reset_ms),
            retry_after: Nanos::from_millis(retry_ms),
        }
    }

    #[test]
    fn allowed_gets_both_fields_and_no_retry_after() {
        let f = RateLimitFields::new(Outcome::Allowed, "per-user", &quota(9, 1001, 0));
        assert_eq!(f.policy, "\"per-user\";q=10;w=2");
        assert_eq!(f.ratelimit.as_deref(), Some("\"per-user\";r=9;t=2"));
        assert_eq!(f.retry_after, None);
    }

    #[test]
    fn denied_rounds_retry_after_up() {
        let f = RateLimitFields::new(Outcome::Denied, "r", &quota(0, 1200, 2001));
        assert_eq!(f.retry_after, Some(3));
        assert_eq!(f.ratelimit.as_deref(), Some("\"r\";r=0;t=2"));
    }

    #[test]
    fn the_reset_never_exceeds_the_window() {
        // A 1.5 s window states w=2; a reset 3 s away would round to t=3.
        let f = RateLimitFields::new(Outcome::Denied, "r", &quota(0, 3000, 2001));
        assert_eq!(f.policy, "\"r\";q=10;w=2");
        assert_eq!(f.ratelimit.as_deref(), Some("\"r\";r=0;t=2"));
        // The issue's case: a 1 s window whose reset is 1.2 s away.
        let mut q = quota(0, 1200, 0);
        q.period = Nanos::from_secs(1);
        let f = RateLimitFields::new(Outcome::Allowed, "r", &q);
        assert_eq!(f.policy, "\"r\";q=10;w=1");
        assert_eq!(f.ratelimit.as_deref(), Some("\"r\";r=0;t=1"));
    }

    #[test]
    fn never_states_the_policy_only() {
        let f = RateLimitFields::new(Outcome::Never, "r", &quota(0, 0, 0));
        assert!(f.policy.starts_with("\"r\""));
        assert_eq!((f.ratelimit, f.retry_after), (None, None));
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(sf_string("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c_\"");
    }
}
