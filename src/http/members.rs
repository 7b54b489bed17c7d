//! The membership admin routes, behind the admin token: `GET /v1/members`
//! lists the members this node counts, and `POST /v1/members/{slot}/forget`
//! forgets one gone for good, here and at every member that does not hold
//! it alive. For the one case the cluster cannot handle by itself: half the
//! members or more lost at once, which leaves the survivors in the minority
//! and forgetting nobody (DESIGN.md, "Membership").

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;

use super::admin::authorize;
use super::error::ApiError;
use super::{json_response, AppState};
use crate::node::ForgetError;

#[derive(Serialize)]
struct Member {
    slot: u16,
    /// The name from its last hello; empty before one arrived.
    name: String,
    /// The failure detector holds it alive.
    live: bool,
    /// A connection to it is open.
    connected: bool,
}

#[derive(Serialize)]
struct MembersAnswer {
    /// This node's slot and name.
    slot: u16,
    name: String,
    /// This node and its live peers are at most half the members: it
    /// forgets nobody that died, and under `strict` admits only its
    /// in-flight share.
    minority: bool,
    /// The other members, by slot.
    members: Vec<Member>,
}

fn members_answer(state: &AppState) -> MembersAnswer {
    let node = state.service().node();
    let status = node.status();
    let members = status
        .members
        .iter()
        .map(|&slot| {
            let peer = status.peers.get(&slot);
            Member {
                slot,
                name: peer.map(|p| p.name.clone()).unwrap_or_default(),
                live: status.live.contains(&slot),
                connected: peer.is_some_and(|p| p.connected),
            }
        })
        .collect();
    MembersAnswer {
        slot: node.settings.slot,
        name: node.settings.name.clone(),
        minority: status.minority,
        members,
    }
}

pub(crate) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(json_response(StatusCode::OK, &members_answer(&state)))
}

pub(crate) async fn forget(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(slot): Path<String>,
) -> Result<Response, ApiError> {
    let by = authorize(&state, &headers)?;
    let slot: u16 = slot
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{slot}` is not a node slot (0 to 65535)")))?;
    let outcome = state
        .service()
        .node()
        .forget_member(slot)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match outcome {
        Ok(()) => {
            tracing::info!(target: "drl::audit", action = "members.forget", by = %by, slot);
            Ok(json_response(StatusCode::OK, &members_answer(&state)))
        }
        Err(e @ ForgetError::NotMember(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
    }
}
