//! The HTTP API of a node (axum), JSON in and out.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/check` | a decision: 200 allowed, 429 denied or never |
//! | `GET /v1/allow?user=..&endpoint=..` | the same, with a tiny body |
//! | `POST /v1/refund` | gives back hits |
//! | `GET /v1/rules`, `PUT /v1/rules`, `POST /v1/rules/validate` | rules admin (bearer token) |
//! | `POST /v1/counters`, `POST /v1/counters/reset` | a key's counters, and their reset cluster-wide (bearer token) |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | operations |
//!
//! `docs/http-api.md` is the contract: bodies, status codes and headers.
//! Every refusal is a JSON `{"error": "..."}` with a 4xx (or 503 while the
//! node recovers) and changes nothing.
//!
//! # Layout
//!
//! - [`request`]: parsing bodies and query strings into descriptor fields.
//! - `check`, `admin`, `counters`: the handlers.
//! - [`server`]: the listeners (decision and operations ports) and how one
//!   connection is served.
//! - [`client`]: the HTTP/1.1 client (hyper's) of the CLI, the load generator and tests.

mod admin;
pub mod body;
mod check;
pub mod client;
mod counters;
pub mod error;
mod members;
pub mod request;
pub mod server;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

pub use error::ApiError;
pub use server::{HttpLimits, HttpListeners};

use crate::service::Service;

/// Largest request body, except rules texts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler shares: the node's [`Service`] and how long a
/// request body may take. axum clones it for every request: one reference
/// count.
#[derive(Clone)]
pub struct AppState {
    service: Service,
    /// How long a request body may take to arrive in full.
    body_timeout: std::time::Duration,
}

impl AppState {
    /// State for the handlers over `service`, with the time a request body
    /// may take to arrive.
    pub fn new(service: Service, body_timeout: std::time::Duration) -> AppState {
        AppState {
            service,
            body_timeout,
        }
    }

    /// The node's shared service.
    pub fn service(&self) -> &Service {
        &self.service
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let rules_limit = DefaultBodyLimit::max(drl_core::wire::MAX_RULES_BYTES);
    let admin = Router::new()
        .route("/v1/rules", get(admin::get_rules).put(admin::put_rules))
        .route("/v1/rules/validate", post(admin::validate_rules))
        .route("/v1/counters", post(counters::read))
        .route("/v1/counters/reset", post(counters::reset))
        .route("/v1/members", get(members::list))
        .route("/v1/members/{slot}/forget", post(members::forget))
        .layer(rules_limit);
    let api = Router::new()
        .route("/v1/check", post(check::check))
        .route("/v1/check/batch", post(check::check_batch))
        .route("/v1/allow", get(check::allow).head(check::head_allow))
        .route("/v1/refund", post(check::refund))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .merge(api)
        .merge(admin)
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            plain_errors_as_json,
        ))
        .with_state(state)
}

/// What the operations listener (`listen_admin`) serves: probes, metrics
/// and the rules admin, never decisions. It has its own threads'-worth of
/// connection budget, so a flood of the decision port cannot starve it.
pub fn operations_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/rules", get(admin::get_rules).put(admin::put_rules))
        .route("/v1/rules/validate", post(admin::validate_rules))
        .route("/v1/counters", post(counters::read))
        .route("/v1/counters/reset", post(counters::reset))
        .route("/v1/members", get(members::list))
        .route("/v1/members/{slot}/forget", post(members::forget))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            plain_errors_as_json,
        ))
        .with_state(state)
}

/// A JSON response with the right content type.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Serializing our own answer types into a Vec cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// axum answers some refusals itself (405 for a wrong method) with an empty
/// body: give them the JSON body every other error has, and count refusals.
async fn plain_errors_as_json(State(state): State<AppState>, response: Response) -> Response {
    let status = response.status();
    if status.is_success()
        || status == StatusCode::TOO_MANY_REQUESTS
        || response.extensions().get::<NotARefusal>().is_some()
    {
        return response;
    }
    state.service.metrics().count_rejected(status.as_u16());
    if response.headers().contains_key(header::CONTENT_TYPE) {
        return response;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_owned(),
        other => other
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned(),
    };
    let (mut parts, _) = response.into_parts();
    let body = ApiError::new(status, message).into_response();
    let (new_parts, body) = body.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        new_parts.headers[header::CONTENT_TYPE].clone(),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &Health { status: "ok" })
}

/// Marks an error status that answers a question rather than refusing a
/// request (`/readyz` saying "not yet"): not counted as a refusal.
#[derive(Clone, Copy)]
struct NotARefusal;

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    /// Why the node is not ready, and what to change; absent once ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The last reload of the rules file failed (the rules in force stay).
    rules_file_error: Option<String>,
    live_peers: usize,
    known_peers: usize,
    /// Members of the cluster as this node knows them, itself included.
    members: usize,
    /// The write-ahead journal's policy (`none` without a journal).
    durability: &'static str,
    /// Why durability is degraded (a failing or slow disk), if it is. The
    /// node stays ready: it decides as well as ever, only a crash of every
    /// node at once would cost more than the policy says.
    durability_degraded: Option<String>,
}

async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.service.node().is_ready();
    let status = state.service.node().status();
    let reason =
        crate::node::notices::waiting_reason(&state.service.node().settings, &status, ready);
    let body = Readiness {
        ready,
        reason,
        rules_file_error: status.rules_file_error,
        live_peers: status.live.len(),
        known_peers: status.known.len(),
        members: status.members.len() + 1,
        durability: state
            .service
            .node()
            .journal()
            .map_or("none", |j| j.policy.name()),
        durability_degraded: state.service.node().journal().and_then(|j| j.degraded()),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = json_response(code, &body);
    response.extensions_mut().insert(NotARefusal);
    response
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.service.metrics().encode();
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}
