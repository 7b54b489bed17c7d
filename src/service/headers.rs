//! The rate-limit header fields of a decision in an HTTP header map, for
//! every front-end that answers with HTTP headers (the HTTP API, Envoy's
//! `response_headers_to_add`, the axum middleware). The values are
//! `drl_core::fields`', the one statement of what they say.

use http::{HeaderMap, HeaderName, HeaderValue};

use drl_core::fields::RateLimitFields;
use drl_core::limiter::{Outcome, QuotaState};

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
    insert_fields(headers, RateLimitFields::new(outcome, rule, q));
}

/// The header that names a rule in shadow mode that would have denied the
/// request (which passed).
pub const SHADOW_DENIED: HeaderName = HeaderName::from_static("x-drl-shadow-denied");

/// Names the shadow-mode limit `q` that would have denied the request.
pub fn shadow_header(headers: &mut HeaderMap, q: &QuotaState) {
    if let Some(v) = header_value(drl_core::fields::sf_string(q.rule.as_str())) {
        headers.insert(SHADOW_DENIED, v);
    }
}

/// Puts `fields` in `headers`.
pub fn insert_fields(headers: &mut HeaderMap, fields: RateLimitFields) {
    if let Some(v) = header_value(fields.policy) {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if let Some(v) = fields.ratelimit.and_then(header_value) {
        headers.insert(RATELIMIT, v);
    }
    if let Some(secs) = fields.retry_after {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
}

/// Takes the text without copying it (this runs on every decision).
fn header_value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use drl_core::time::Nanos;

    #[test]
    fn a_denial_gets_all_three_fields() {
        let q = QuotaState {
            limit_index: 0,
            rule: drl_core::rules::RuleName::intern("r"),
            limit: 10,
            limit_id: drl_core::key::LimitId(1),
            period: Nanos::from_secs(60),
            remaining: 0,
            reset_after: Nanos::from_millis(3_000),
            retry_after: Nanos::from_millis(2_001),
        };
        let mut h = HeaderMap::new();
        decision_headers(&mut h, Outcome::Denied, "r", &q);
        assert_eq!(h[RATELIMIT_POLICY], "\"r\";q=10;w=60");
        assert_eq!(h[RATELIMIT], "\"r\";r=0;t=3");
        assert_eq!(h["retry-after"], "3");
    }
}
