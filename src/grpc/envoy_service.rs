//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//!
//! The descriptors of a request are decided together, through the node's
//! one decision path (`Decider::decide`): confirmed with the peers near a
//! limit, and, when any descriptor is over its limit, none is counted. Each
//! gets its own status; the overall code is `OVER_LIMIT` if any is. The response carries the same `RateLimit-Policy`,
//! `RateLimit` and `Retry-After` fields as the HTTP API, for the deciding
//! limit of the whole request, so Envoy can forward them to the client.

use axum::http::HeaderMap;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response, Status};

use super::envoy_request::RlsRequest;
use super::state::{rule_name, GrpcState};
use crate::service::headers::{decision_headers, shadow_header};
use drl_core::descriptor::Descriptors;

use drl_core::limiter::{Decided, Decision, Outcome};
use drl_core::time::Nanos;

/// The Envoy rate limit service of one node.
#[derive(Clone)]
pub struct EnvoyRateLimit {
    state: GrpcState,
}

impl EnvoyRateLimit {
    /// The service over `state`'s node; wrap it in the generated
    /// `RateLimitServiceServer` to serve it.
    pub fn new(state: GrpcState) -> EnvoyRateLimit {
        EnvoyRateLimit { state }
    }

    async fn decide(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let parsed = RlsRequest::parse(request)
            .map_err(|e| self.state.refuse(Status::invalid_argument(e.to_string())))?;
        let pairs: Vec<Vec<(&str, &str)>> = parsed.checks.iter().map(|c| c.pairs()).collect();
        let mut checks = Vec::with_capacity(pairs.len());
        for (pairs, check) in pairs.iter().zip(&parsed.checks) {
            // Parsing checked every set already.
            let d = Descriptors::new(pairs)
                .map_err(|e| self.state.refuse(Status::invalid_argument(e.to_string())))?;
            let limiter = self.state.service().decider().limiter();
            checks.push(
                limiter
                    .request_check(d, check.cost, check.limit.as_ref())
                    .map_err(|e| self.state.refuse_check(e))?,
            );
        }
        let decided = self
            .state
            .decide(&checks)
            .await
            .map_err(|e| self.state.refuse_check(e))?;
        for d in decided.each() {
            self.state.count(d);
        }
        Ok(response(&decided))
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRateLimit {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let _in_flight = self.state.admit()?;
        self.decide(request.get_ref()).await.map(Response::new)
    }
}

/// The answer to a decided request: one status per descriptor, in order,
/// and the headers of the request's deciding limit (the refusal with the
/// longest wait, else the allowed limit with the least left).
pub fn response(decided: &Decided) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = decided.each().iter().map(descriptor_status).collect();
    let over = !decided.is_allowed();
    let mut headers = HeaderMap::new();
    let decision = decided.decision();
    if let Some(q) = decision.quota {
        decision_headers(&mut headers, decision.outcome, rule_name(&q), &q);
    }
    if let Some(s) = &decision.shadow {
        shadow_header(&mut headers, s);
    }
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add: headers
            .iter()
            .filter_map(|(name, value)| {
                Some(HeaderValue {
                    key: name.as_str().to_owned(),
                    value: value.to_str().ok()?.to_owned(),
                    ..Default::default()
                })
            })
            .collect(),
        ..Default::default()
    }
}

fn descriptor_status(d: &Decision) -> DescriptorStatus {
    let code = if d.outcome == Outcome::Allowed {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let Some(q) = d.quota else {
        // No rule matched: OK, as Envoy's own service answers.
        return DescriptorStatus {
            code: code as i32,
            ..Default::default()
        };
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: rule_name(&q).to_owned(),
            requests_per_unit: u32::try_from(q.limit).unwrap_or(u32::MAX),
            unit: unit(q.period) as i32,
        }),
        limit_remaining: u32::try_from(q.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(duration(q.reset_after)),
        ..Default::default()
    }
}

/// Envoy's units are whole calendar-free periods; any other window is
/// `UNKNOWN` (its length is in the rule, and in `RateLimit-Policy`'s `w`).
fn unit(period: Nanos) -> Unit {
    const SECOND: u64 = 1_000_000_000;
    match period.as_u64() {
        SECOND => Unit::Second,
        n if n == 60 * SECOND => Unit::Minute,
        n if n == 3_600 * SECOND => Unit::Hour,
        n if n == 86_400 * SECOND => Unit::Day,
        n if n == 7 * 86_400 * SECOND => Unit::Week,
        _ => Unit::Unknown,
    }
}

fn duration(n: Nanos) -> PbDuration {
    let ns = n.as_u64();
    PbDuration {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        // Below 10^9: fits.
        nanos: (ns % 1_000_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drl_core::limiter::QuotaState;

    fn quota(remaining: u64, retry_ms: u64) -> QuotaState {
        QuotaState {
            limit_index: 0,
            rule: drl_core::rules::RuleName::intern("r"),
            limit_id: drl_core::key::LimitId(1),
            limit: 10,
            period: Nanos::from_secs(60),
            remaining,
            reset_after: Nanos::from_millis(1_500),
            retry_after: Nanos::from_millis(retry_ms),
        }
    }

    #[test]
    fn units_are_exact_or_unknown() {
        assert_eq!(unit(Nanos::from_secs(1)), Unit::Second);
        assert_eq!(unit(Nanos::from_secs(60)), Unit::Minute);
        assert_eq!(unit(Nanos::from_secs(3600)), Unit::Hour);
        assert_eq!(unit(Nanos::from_secs(86_400)), Unit::Day);
        assert_eq!(unit(Nanos::from_secs(7 * 86_400)), Unit::Week);
        assert_eq!(unit(Nanos::from_secs(10)), Unit::Unknown);
        assert_eq!(unit(Nanos::from_millis(1_500)), Unit::Unknown);
        let d = duration(Nanos::from_millis(1_500));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
    }

    #[test]
    fn over_limit_statuses_and_headers() {
        let denied = Decision {
            outcome: Outcome::Denied,
            quota: Some(quota(0, 2_100)),
            shadow: None,
        };
        let r = response(&Decided::from_parts(
            denied,
            vec![Decision::UNLIMITED, denied],
        ));
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
        assert_eq!(r.statuses[0].current_limit, None);
        assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
        let limit = r.statuses[1].current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (10, Unit::Minute as i32)
        );
        let header = |name: &str| {
            r.response_headers_to_add
                .iter()
                .find(|h| h.key == name)
                .map(|h| h.value.clone())
        };
        assert_eq!(header("retry-after").as_deref(), Some("3"));
        assert!(header("ratelimit-policy").unwrap().contains(";q=10;w=60"));
        assert!(header("ratelimit").unwrap().contains(";r=0;t=2"));
    }
}
