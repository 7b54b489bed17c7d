//! The counter API: `POST /v1/counters` reads what a request's key has
//! spent under each limit that applies, cluster-wide and per node slot;
//! `POST /v1/counters/reset` resets those counters on every node. Both
//! take the body of `POST /v1/check` (descriptors, and a request-defined
//! limit if the request carries one; the cost is ignored), count nothing,
//! and sit behind the admin token.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;

use super::admin::authorize;
use super::body::LimitedBody;
use super::error::ApiError;
use super::request::CheckRequest;
use super::{json_response, AppState, MAX_BODY_BYTES};
use drl_core::limiter::CounterView;

#[derive(Serialize)]
struct CounterAnswer {
    /// The limit's rule (`request` for a request-defined limit).
    rule: String,
    /// The limit's stable id and the key's digest, in hex.
    counter: String,
    limit: u64,
    window_ms: u64,
    /// Net hits in the window, every node's slot merged.
    count: u64,
    remaining: u64,
    reset_ms: u64,
    shadow: bool,
    request_defined: bool,
    /// What each node counted, as this node sees it.
    slots: Vec<SlotAnswer>,
}

#[derive(Serialize)]
struct SlotAnswer {
    slot: u16,
    count: i64,
}

#[derive(Serialize)]
struct CountersAnswer {
    counters: Vec<CounterAnswer>,
}

#[derive(Serialize)]
struct ResetAnswer {
    /// The counters reset, as they were just before.
    reset: Vec<CounterAnswer>,
    /// Net hits this node cleared from its own slot.
    cleared_here: u64,
    /// Nodes (by slot) that applied the reset before this answer.
    acked: Vec<u16>,
    /// Nodes that had not: they apply it when they are reached.
    pending: Vec<u16>,
}

fn answer(v: &CounterView) -> CounterAnswer {
    CounterAnswer {
        rule: v.quota.rule.as_str().to_owned(),
        counter: format!("{:016x}:{:016x}", v.counter.limit.0, v.counter.key.0),
        limit: v.quota.limit,
        window_ms: v.quota.period.as_millis_ceil(),
        count: v.count,
        remaining: v.quota.remaining,
        reset_ms: v.quota.reset_after.as_millis_ceil(),
        shadow: v.shadow,
        request_defined: v.request_defined,
        slots: v
            .slots
            .iter()
            .map(|&(slot, count)| SlotAnswer {
                slot: slot.get(),
                count,
            })
            .collect(),
    }
}

/// The counters the request's descriptors (and limit) reach.
fn views(state: &AppState, body: &[u8]) -> Result<Vec<CounterView>, ApiError> {
    let request = CheckRequest::from_json(body)?;
    let pairs = request.pairs();
    let d = pairs.descriptors()?;
    let limiter = state.service().decider().limiter();
    let check = limiter.request_check(d, 0, request.limit.as_ref())?;
    Ok(limiter.counters(&check)?)
}

pub(crate) async fn read(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<MAX_BODY_BYTES>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let counters = views(&state, &body)?.iter().map(answer).collect();
    Ok(json_response(StatusCode::OK, &CountersAnswer { counters }))
}

pub(crate) async fn reset(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<MAX_BODY_BYTES>,
) -> Result<Response, ApiError> {
    let by = authorize(&state, &headers)?;
    let before = views(&state, &body)?;
    if before.is_empty() {
        return Err(ApiError::bad_request(
            "no limit applies to these descriptors: nothing to reset",
        ));
    }
    let keys = before.iter().map(|v| v.counter).collect();
    let outcome = state
        .service()
        .node()
        .reset_counters(keys)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let reset: Vec<CounterAnswer> = before.iter().map(answer).collect();
    tracing::info!(
        target: "drl::audit",
        action = "counters.reset",
        by = %by,
        counters = %reset.iter().map(|c| format!("{}={}", c.rule, c.counter)).collect::<Vec<_>>().join(","),
        cleared_here = outcome.cleared_here,
        acked = ?outcome.acked,
        pending = ?outcome.pending,
        "admin reset counters"
    );
    Ok(json_response(
        StatusCode::OK,
        &ResetAnswer {
            reset,
            cleared_here: outcome.cleared_here,
            acked: outcome.acked,
            pending: outcome.pending,
        },
    ))
}
