//! Rate limiting as axum middleware: a Rust web service adds limiting to its
//! routes in a few lines, with the same decisions and headers as the HTTP
//! API (`429`, `Retry-After`, `RateLimit-Policy`, `RateLimit`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{routing::get, Router};
//! use drl::middleware::{rate_limit, RateLimitState};
//!
//! # fn limiter() -> Arc<drl_core::limiter::Limiter> { unimplemented!() }
//! // An embedded limiter; a cluster node's `NodeHandle::decider()` fits too.
//! let state = RateLimitState::new(limiter(), |req| {
//!     let user = req.headers().get("x-user-id")?.to_str().ok()?.to_owned();
//!     Some(vec![("user".into(), user), ("endpoint".into(), req.uri().path().to_owned())])
//! });
//! let app: Router = Router::new()
//!     .route("/v1/search", get(|| async { "results" }))
//!     .layer(axum::middleware::from_fn_with_state(state, rate_limit));
//! ```
//!
//! Decisions go through a [`Decider`], the path every protocol takes: the
//! application's own embedded limiter, or a cluster node's decision path
//! (`NodeHandle::decider`), which confirms with the peers near a limit
//! exactly as the node's HTTP API does.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::service::headers::{decision_headers, shadow_header};
use drl_core::decide::Decider;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{CheckError, Outcome};

/// Descriptor fields of a request, or `None` to let it pass unlimited.
pub type Describe = dyn Fn(&Request) -> Option<Vec<(String, String)>> + Send + Sync;

/// What the middleware needs: the decision path and how to describe a
/// request.
#[derive(Clone)]
pub struct RateLimitState {
    decider: Decider,
    describe: Arc<Describe>,
}

impl RateLimitState {
    /// The state for [`rate_limit`]: decisions through `decider` (an
    /// `Arc<Limiter>` of the application's own, or a node's
    /// [`Decider`]); `describe` turns a request into its descriptor fields,
    /// or `None` to let it pass unlimited.
    pub fn new(
        decider: impl Into<Decider>,
        describe: impl Fn(&Request) -> Option<Vec<(String, String)>> + Send + Sync + 'static,
    ) -> Self {
        RateLimitState {
            decider: decider.into(),
            describe: Arc::new(describe),
        }
    }
}

fn refusal(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The answer to a request that could not be checked: 503 with
/// `Retry-After` while the node recovers its counts, 400 for bad
/// descriptors or an endpoint the rules do not know.
fn check_refusal(e: &CheckError) -> Response {
    match e {
        CheckError::Recovering => {
            let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(1u64),
            );
            response
        }
        CheckError::Descriptor(_)
        | CheckError::UnknownEndpoint(_)
        | CheckError::RequestLimit(_) => refusal(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// The middleware function; use with `axum::middleware::from_fn_with_state`.
pub async fn rate_limit(
    State(state): State<RateLimitState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(fields) = (state.describe)(&request) else {
        return next.run(request).await;
    };
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    // Refusals take the HTTP API's shape: the same status, body and
    // `Retry-After` for the same error.
    let decision = match Descriptors::new(&pairs) {
        Err(e) => return refusal(StatusCode::BAD_REQUEST, &e.to_string()),
        Ok(d) => match state.decider.check(&d, 1).await {
            Ok(decision) => decision,
            Err(e) => return check_refusal(&e),
        },
    };
    // The decision names its rule: no lookup in rules a reload may have
    // replaced since.
    let rule = decision.quota.map(|q| (q.rule, q));
    let mut response = match decision.outcome {
        Outcome::Allowed => next.run(request).await,
        Outcome::Denied => refusal(StatusCode::TOO_MANY_REQUESTS, "rate limited"),
        Outcome::Never => refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "the request costs more than the limit allows",
        ),
    };
    if let Some((name, q)) = rule {
        decision_headers(response.headers_mut(), decision.outcome, name.as_str(), &q);
    }
    if let Some(s) = &decision.shadow {
        shadow_header(response.headers_mut(), s);
    }
    response
}
