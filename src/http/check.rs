//! `POST /v1/check`, `GET /v1/allow` and `POST /v1/refund`.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::body::LimitedBody;
use super::error::ApiError;
use super::request::{CheckRequest, RefundRequest};
use super::{json_response, AppState, MAX_BODY_BYTES};
use crate::metrics::Protocol;
use crate::service::headers::{decision_headers, shadow_header};
use std::sync::Arc;

use drl_core::limiter::{Check, CheckError, Decision, Outcome};
use drl_core::rules::request::RequestLimit;

/// The answer to a check.
#[derive(Serialize)]
struct CheckAnswer<'a> {
    allowed: bool,
    /// `allowed`, `denied`, or `never`: the cost exceeds what the deciding
    /// limit can ever admit, so retrying cannot succeed.
    outcome: &'static str,
    /// The rule of the deciding limit; `null` when no rule matched.
    rule: Option<&'a str>,
    limit: Option<u64>,
    window_ms: Option<u64>,
    remaining: Option<u64>,
    reset_ms: Option<u64>,
    /// 0 when allowed; `null` when no rule matched or for `never`.
    retry_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Present when allowed at a cost above zero: what `POST /v1/refund`
    /// must present to give this check's cost back.
    #[serde(skip_serializing_if = "Option::is_none")]
    receipt: Option<String>,
    /// Present when a rule in shadow mode would have denied the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<ShadowAnswer<'a>>,
}

/// What a rule in shadow mode would have said.
#[derive(Serialize)]
struct ShadowAnswer<'a> {
    rule: &'a str,
    limit: u64,
    remaining: u64,
}

#[derive(Serialize)]
struct AllowAnswer {
    allowed: bool,
}

#[derive(Serialize)]
struct RefundAnswer {
    /// The smallest amount given back over the receipt's limits.
    refunded: u32,
    /// The cost the receipt charged.
    requested: u32,
    /// What each limit the check counted gave back.
    limits: Vec<LimitAnswer>,
}

#[derive(Serialize)]
struct LimitAnswer {
    /// The limit's rule, `null` when the rules no longer have the limit.
    rule: Option<String>,
    refunded: u32,
}

/// What the body of a decision looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Full,
    Tiny,
}

pub(crate) async fn check(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody<MAX_BODY_BYTES>,
) -> Result<Response, ApiError> {
    let request = CheckRequest::from_json(&body)?;
    decide(&state, &request, Shape::Full).await
}

pub(crate) async fn allow(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = CheckRequest::from_query(query.as_deref().unwrap_or(""))?;
    decide(&state, &request, Shape::Tiny).await
}

/// `GET /v1/allow` served straight from the connection, without the
/// router: the same handler and the same answers, and a refusal counted as
/// the router's error layer counts it. The decision port's busiest route
/// skips the route lookup, the boxed route service and the layer.
pub(crate) async fn allow_direct(state: AppState, query: Option<String>) -> Response {
    let response = allow(State(state.clone()), RawQuery(query))
        .await
        .into_response();
    let status = response.status();
    if !status.is_success() && status != StatusCode::TOO_MANY_REQUESTS {
        state.service().metrics().count_rejected(status.as_u16());
    }
    response
}

/// `HEAD /v1/allow` would count a hit with no answer to read: refused,
/// counting nothing (axum would otherwise run the `GET` handler).
pub(crate) async fn head_allow() -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "HEAD would count a hit: use GET /v1/allow",
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::ALLOW,
        axum::http::HeaderValue::from_static("GET"),
    );
    response
}

pub(crate) async fn refund(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody<MAX_BODY_BYTES>,
) -> Result<Response, ApiError> {
    let request = RefundRequest::from_json(&body)?;
    let outcome = state.service().decider().refund(&request.receipt).await?;
    let rules = state.service().decider().limiter().rules();
    let limits = outcome
        .limits
        .iter()
        .map(|l| LimitAnswer {
            rule: rules
                .limits()
                .iter()
                .find(|r| r.id == l.limit_id)
                .map(|r| r.rule.clone()),
            refunded: l.refunded,
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &RefundAnswer {
            refunded: outcome.refunded(),
            requested: outcome.requested,
            limits,
        },
    ))
}

async fn decide(
    state: &AppState,
    request: &CheckRequest<'_>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let pairs = request.pairs();
    let d = pairs.descriptors()?;
    let check = match &request.limit {
        None => Check::new(d, request.cost),
        Some(spec) => {
            let policy = state.service().decider().limiter().request_limit_policy();
            let limit = RequestLimit::new(spec, policy).map_err(CheckError::from)?;
            Check::with_limit(d, request.cost, Arc::new(limit))
        }
    };
    let decided = state
        .service()
        .decide(Protocol::Http, std::slice::from_ref(&check))
        .await
        .map_err(|e| ApiError::from_check(e, state.service()))?;
    let decision = decided.decision();
    let receipt = match shape {
        Shape::Full => state.service().decider().receipt(&check, &decision),
        Shape::Tiny => None,
    };
    Ok(answer(state, &decision, shape, receipt))
}

fn answer(
    state: &AppState,
    decision: &Decision,
    shape: Shape,
    receipt: Option<String>,
) -> Response {
    // The decision names its rule as it was when it decided: the rules may
    // have been replaced since.
    let deciding = decision.quota.map(|q| (q, q.rule.as_str()));
    state.service().count(Protocol::Http, decision);
    let status = match decision.outcome {
        Outcome::Allowed => StatusCode::OK,
        Outcome::Denied | Outcome::Never => StatusCode::TOO_MANY_REQUESTS,
    };
    let allowed = decision.outcome == Outcome::Allowed;
    let mut response = match shape {
        Shape::Tiny => json_response(status, &AllowAnswer { allowed }),
        Shape::Full => {
            let body = match deciding {
                None => CheckAnswer {
                    allowed,
                    outcome: "allowed",
                    rule: None,
                    limit: None,
                    window_ms: None,
                    remaining: None,
                    reset_ms: None,
                    retry_after_ms: None,
                    message: None,
                    receipt: None,
                    shadow: shadow_answer(decision),
                },
                Some((q, rule)) => {
                    let never = decision.outcome == Outcome::Never;
                    CheckAnswer {
                        allowed,
                        outcome: match decision.outcome {
                            Outcome::Allowed => "allowed",
                            Outcome::Denied => "denied",
                            Outcome::Never => "never",
                        },
                        rule: Some(rule),
                        limit: Some(q.limit),
                        window_ms: Some(q.period.as_millis_ceil()),
                        remaining: Some(q.remaining),
                        reset_ms: (!never).then(|| q.reset_after.as_millis_ceil()),
                        retry_after_ms: match decision.outcome {
                            Outcome::Allowed => Some(0),
                            Outcome::Denied => Some(q.retry_after.as_millis_ceil()),
                            Outcome::Never => None,
                        },
                        message: never.then(|| {
                            format!(
                                "the cost exceeds what rule `{rule}` can ever admit ({} per {}): retrying cannot succeed",
                                q.limit, q.period
                            )
                        }),
                        receipt,
                        shadow: shadow_answer(decision),
                    }
                }
            };
            json_response(status, &body)
        }
    };
    if let Some((q, rule)) = deciding {
        decision_headers(response.headers_mut(), decision.outcome, rule, &q);
    }
    if let Some(s) = &decision.shadow {
        shadow_header(response.headers_mut(), s);
    }
    response.into_response()
}

fn shadow_answer(decision: &Decision) -> Option<ShadowAnswer<'static>> {
    decision.shadow.map(|s| ShadowAnswer {
        rule: s.rule.as_str(),
        limit: s.limit,
        remaining: s.remaining,
    })
}
