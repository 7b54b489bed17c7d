//! `POST /v1/check`, `GET /v1/allow` and `POST /v1/refund`.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::body::LimitedBody;
use super::error::ApiError;
use super::request::{BatchRequest, CheckRequest, RefundRequest};
use super::{json_response, AppState, MAX_BODY_BYTES};
use crate::metrics::Protocol;
use crate::service::headers::{decision_headers, shadow_header};

use drl_core::limiter::{Check, CheckError, Decision, Outcome};

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

/// The answer to a batch: whether it was admitted (an atomic batch: every
/// check counted; independent checks: always true) and one result per
/// check, in order.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    allowed: bool,
    results: Vec<BatchItem<'a>>,
}

/// One check's result in a batch: its decision, or why it was not decided.
#[derive(Serialize)]
#[serde(untagged)]
enum BatchItem<'a> {
    Decided(CheckAnswer<'a>),
    Refused { status: u16, error: String },
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

/// Largest batch body: room for [`super::request::MAX_BATCH`] checks.
pub(super) const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// `POST /v1/check/batch`: many checks in one request. By default they
/// are decided atomically, as one request through the node's decision path
/// (every limit of every check admits and all are counted, or nothing is;
/// a check that cannot be decided refuses the whole batch with 400); with
/// `"independent": true` each on its own, a bad one getting its own error.
/// The status is 429 for a refused atomic batch, 200 otherwise.
pub(crate) async fn check_batch(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody<MAX_BATCH_BODY_BYTES>,
) -> Result<Response, ApiError> {
    let batch = BatchRequest::from_json(&body)?;
    if batch.independent {
        return Ok(decide_each(&state, &batch.checks).await);
    }
    let pairs: Vec<_> = batch.checks.iter().map(CheckRequest::pairs).collect();
    let mut checks = Vec::with_capacity(pairs.len());
    // The rules' endpoint list is checked here too, so that a refusal
    // names its check (the decision would refuse it without the number).
    let rules = state.service().decider().limiter().rules();
    for (i, (pairs, request)) in pairs.iter().zip(&batch.checks).enumerate() {
        let d = pairs
            .descriptors()
            .map_err(|e| ApiError::bad_request(format!("check {i}: {e}")))?;
        if request.limit.is_none() {
            rules
                .check_endpoint(&d)
                .map_err(|e| ApiError::bad_request(format!("check {i}: {e}")))?;
        }
        let check = check_of(&state, d, request)
            .map_err(|e| ApiError::bad_request(format!("check {i}: {e}")))?;
        checks.push(check);
    }
    let decided = state
        .service()
        .decide(Protocol::Http, &checks)
        .await
        .map_err(|e| ApiError::from_check(e, state.service()))?;
    let batch_decision = decided.decision();
    let allowed = batch_decision.is_allowed();
    let results = checks
        .iter()
        .zip(decided.each())
        .map(|(check, decision)| {
            state.service().count(Protocol::Http, decision);
            let mut body = if allowed {
                let receipt = state.service().decider().receipt(check, decision);
                answer_body(decision, receipt)
            } else {
                answer_body(decision, None)
            };
            if !allowed && decision.outcome == Outcome::Allowed {
                // Counted nothing: another check of the batch was refused.
                body.allowed = false;
                body.outcome = "denied";
                body.retry_after_ms = batch_decision.quota.map(|q| q.retry_after.as_millis_ceil());
                body.message =
                    Some("not counted: another check of this atomic batch was refused".into());
            }
            BatchItem::Decided(body)
        })
        .collect();
    let status = if allowed {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let mut response = json_response(status, &BatchAnswer { allowed, results });
    if let Some(q) = batch_decision.quota {
        decision_headers(
            response.headers_mut(),
            batch_decision.outcome,
            q.rule.as_str(),
            &q,
        );
    }
    Ok(response)
}

/// Independent checks of a batch, each decided (or refused) on its own.
async fn decide_each(state: &AppState, requests: &[CheckRequest<'_>]) -> Response {
    let mut decisions = Vec::with_capacity(requests.len());
    for request in requests {
        let pairs = request.pairs();
        let decided = match pairs.descriptors() {
            Err(e) => Err(ApiError::bad_request(e.to_string())),
            Ok(d) => match check_of(state, d, request) {
                Err(e) => Err(ApiError::from_check(e, state.service())),
                Ok(check) => match state
                    .service()
                    .decide(Protocol::Http, std::slice::from_ref(&check))
                    .await
                {
                    Err(e) => Err(ApiError::from_check(e, state.service())),
                    Ok(decided) => {
                        let decision = decided.decision();
                        let receipt = state.service().decider().receipt(&check, &decision);
                        Ok((decision, receipt))
                    }
                },
            },
        };
        decisions.push(decided);
    }
    let results = decisions
        .iter()
        .map(|d| match d {
            Ok((decision, receipt)) => {
                state.service().count(Protocol::Http, decision);
                BatchItem::Decided(answer_body(decision, receipt.clone()))
            }
            Err(e) => BatchItem::Refused {
                status: e.status.as_u16(),
                error: e.message.clone(),
            },
        })
        .collect();
    json_response(
        StatusCode::OK,
        &BatchAnswer {
            allowed: true,
            results,
        },
    )
}

/// The check of `request`'s descriptors `d`, with the request's own limit
/// if it carries one.
fn check_of<'d>(
    state: &AppState,
    d: drl_core::descriptor::Descriptors<'d>,
    request: &CheckRequest<'_>,
) -> Result<Check<'d>, CheckError> {
    state
        .service()
        .decider()
        .limiter()
        .request_check(d, request.cost, request.limit.as_ref())
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
    let check =
        check_of(state, d, request).map_err(|e| ApiError::from_check(e, state.service()))?;
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
        Shape::Full => json_response(status, &answer_body(decision, receipt)),
    };
    if let Some((q, rule)) = deciding {
        decision_headers(response.headers_mut(), decision.outcome, rule, &q);
    }
    if let Some(s) = &decision.shadow {
        shadow_header(response.headers_mut(), s);
    }
    response.into_response()
}

/// The body of a full decision.
fn answer_body(decision: &Decision, receipt: Option<String>) -> CheckAnswer<'_> {
    let allowed = decision.outcome == Outcome::Allowed;
    match decision.quota.as_ref().map(|q| (q, q.rule.as_str())) {
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
    }
}

fn shadow_answer(decision: &Decision) -> Option<ShadowAnswer<'static>> {
    decision.shadow.map(|s| ShadowAnswer {
        rule: s.rule.as_str(),
        limit: s.limit,
        remaining: s.remaining,
    })
}
