//! The rate-limit header fields of a decision.
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
//! time never comes back too early. `w` is at least 1.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use drl_core::limiter::{Outcome, QuotaState};
use drl_core::time::Nanos;

/// The `RateLimit-Policy` header field.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header field.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Which header fields a decision gets (see `docs/http-api.md`):
///
/// - `Allowed`: both rate-limit fields.
/// - `Denied`: both, and `Retry-After` from the decision's `retry_after`.
/// - `Never`: `RateLimit-Policy` only: the cost exceeds the quota it states,
///   and neither a reset time nor a retry time would mean anything.
pub fn decision_headers(headers: &mut HeaderMap, outcome: Outcome, rule: &str, q: &QuotaState) {
    let name = sf_string(rule);
    if let Some(v) = header_value(format!("{name};q={};w={}", q.limit, window_secs(q.period))) {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if outcome == Outcome::Never {
        return;
    }
    if let Some(v) = header_value(format!(
        "{name};r={};t={}",
        q.remaining,
        q.reset_after.as_secs_ceil()
    )) {
        headers.insert(RATELIMIT, v);
    }
    if outcome == Outcome::Denied {
        headers.insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(q.retry_after)),
        );
    }
}

/// Takes the text without copying it (this runs on every decision).
fn header_value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(axum::body::Bytes::from(text)).ok()
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
            rule: drl_core::rules::RuleName::intern("r"),
            limit_id: 1,
            limit: 10,
            period: Nanos::from_millis(1500),
            remaining,
            reset_after: Nanos::from_millis(reset_ms),
            retry_after: Nanos::from_millis(retry_ms),
        }
    }

    #[test]
    fn allowed_gets_both_fields_and_no_retry_after() {
        let mut h = HeaderMap::new();
        decision_headers(&mut h, Outcome::Allowed, "per-user", &quota(9, 1001, 0));
        assert_eq!(h[RATELIMIT_POLICY], "\"per-user\";q=10;w=2");
        assert_eq!(h[RATELIMIT], "\"per-user\";r=9;t=2");
        assert!(h.get("retry-after").is_none());
    }

    #[test]
    fn denied_rounds_retry_after_up() {
        let mut h = HeaderMap::new();
        decision_headers(&mut h, Outcome::Denied, "r", &quota(0, 3000, 2001));
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h[RATELIMIT], "\"r\";r=0;t=3");
    }

    #[test]
    fn never_states_the_policy_only() {
        let mut h = HeaderMap::new();
        decision_headers(&mut h, Outcome::Never, "r", &quota(0, 0, 0));
        assert!(h.get(RATELIMIT_POLICY).is_some());
        assert!(h.get(RATELIMIT).is_none());
        assert!(h.get("retry-after").is_none());
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(sf_string("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c_\"");
    }
}
