//! The rules admin routes: `GET /v1/rules`, `PUT /v1/rules` and
//! `POST /v1/rules/validate`, behind `Authorization: Bearer <token>` of
//! one of the node's admin tokens. `GET` carries the version in force as an
//! `ETag`; `PUT` takes `If-Match` (412 when stale), refuses rules that deny
//! nothing unless `?allow_empty=true`, and answers once the change is
//! confirmed (200), lost to a concurrent one (409) or unconfirmed (503).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use serde::Serialize;

use super::body::LimitedBody;
use super::error::{ApiError, Position};
use super::{json_response, AppState};
use crate::node::{PutRulesError, RulesChange, RulesInForce, RulesOutcome, RulesVersion};
use drl_core::algorithm::RateAlgorithm;
use drl_core::rules::{RuleSet, RulesError};
use drl_core::wire::MAX_RULES_BYTES;

/// Refuses the request unless it carries one of the configured admin
/// tokens, and names its holder. With no token configured the admin API is
/// off (403), so that a node never runs with an open admin API by accident.
pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let tokens = state.service().admin_tokens();
    if tokens.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: no admin_token is configured on this node",
        ));
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented.map(|p| tokens.holder(p)) {
        Some(Some(name)) => Ok(name.to_owned()),
        Some(None) => Err(unauthorized("wrong admin token")),
        None => Err(unauthorized(
            "admin routes need `Authorization: Bearer <admin_token>`",
        )),
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        challenge: true,
        ..ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
}

#[derive(Serialize)]
struct Version {
    counter: u64,
    origin: u16,
    /// The digest of the rules text, as 16 hex digits.
    digest: String,
    /// The same version as the `ETag` header carries it.
    etag: String,
}

impl From<RulesVersion> for Version {
    fn from(v: RulesVersion) -> Self {
        Version {
            counter: v.counter,
            origin: v.origin,
            digest: format!("{:016x}", v.digest),
            etag: v.etag(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct LimitInfo {
    pub rule: String,
    pub scope: String,
    pub algorithm: &'static str,
    pub limit: u64,
    pub window_ms: u64,
}

/// The limits of a rule set, for the admin answers.
pub(crate) fn limit_list(rules: &RuleSet) -> Vec<LimitInfo> {
    rules
        .limits()
        .iter()
        .map(|l| LimitInfo {
            rule: l.rule.clone(),
            scope: l.scope.to_string(),
            algorithm: l.algorithm.name(),
            limit: l.algorithm.quota(),
            window_ms: l.algorithm.quota_period().as_millis_ceil(),
        })
        .collect()
}

#[derive(Serialize)]
struct RulesAnswer {
    version: Version,
    text: String,
    limits: Vec<LimitInfo>,
    /// The last reload of the rules file failed with this error (the rules
    /// in force stayed); `null` when the file is fine.
    file_error: Option<String>,
}

#[derive(Serialize)]
struct PutAnswer {
    version: Version,
    /// The version it replaced here.
    replaced: Version,
    /// The peers that confirmed it, by slot.
    confirmed_by: Vec<u16>,
    limits: Vec<LimitInfo>,
}

#[derive(Serialize)]
struct ValidateAnswer {
    valid: bool,
    limits: Vec<LimitInfo>,
}

pub(crate) async fn get_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let status = state.service().node().status();
    let RulesInForce { version, rules } = state.service().node().rules();
    Ok(with_etag(
        json_response(
            StatusCode::OK,
            &RulesAnswer {
                version: version.into(),
                text: rules.source().to_owned(),
                limits: limit_list(&rules),
                file_error: status.rules_file_error,
            },
        ),
        version,
    ))
}

fn with_etag(mut response: Response, version: RulesVersion) -> Response {
    if let Ok(v) = HeaderValue::from_str(&version.etag()) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// The version `If-Match` names, if the header is there: `None` for no
/// header or `*` (any version). A tag that names no version this node could
/// have made matches nothing: 412, like any stale one.
fn if_match(headers: &HeaderMap, current: RulesVersion) -> Result<Option<RulesVersion>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::bad_request("If-Match is not ASCII"))?;
    if value.trim() == "*" {
        return Ok(None);
    }
    // A list matches if any of its tags does.
    let tags: Vec<RulesVersion> = value
        .split(',')
        .filter_map(RulesVersion::from_etag)
        .collect();
    if tags.contains(&current) {
        return Ok(Some(current));
    }
    Err(stale(current))
}

fn stale(current: RulesVersion) -> ApiError {
    ApiError {
        etag: Some(current.etag()),
        ..ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "If-Match does not name the rules in force, version {current}: \
                 read them again (GET /v1/rules) and make the change against them"
            ),
        )
    }
}

/// `?allow_empty=true`; anything else in the query is refused.
fn allow_empty(query: Option<&str>) -> Result<bool, ApiError> {
    let mut allow = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("allow_empty", "true" | "1" | "") => allow = true,
            ("allow_empty", "false" | "0") => allow = false,
            (name, value) => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {name}={value}: PUT /v1/rules takes allow_empty=true"
                )))
            }
        }
    }
    Ok(allow)
}

pub(crate) async fn put_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    LimitedBody(body): LimitedBody<MAX_RULES_BYTES>,
) -> Result<Response, ApiError> {
    let by = authorize(&state, &headers)?;
    let allow_empty = allow_empty(uri.query())?;
    let node = state.service().node();
    let replaced = node.rules().version;
    let if_match = if_match(&headers, replaced)?;
    let text = rules_text(body)?;
    // Parsed once, here: the node takes the parsed rules.
    let rules = RuleSet::from_toml(&text).map_err(rules_error)?;
    if rules.denies_nothing() && !allow_empty {
        return Err(ApiError::bad_request(
            "these rules deny nothing (no limit, or only unlimited or shadow-mode rules): \
             they would lift every limit of the cluster. Send them with ?allow_empty=true \
             (drl rules put --allow-empty) if that is what you mean",
        ));
    }
    let limits = limit_list(&rules);
    let change = RulesChange {
        rules,
        if_match,
        by,
    };
    match node.put_rules(change).await {
        Ok(RulesOutcome::Confirmed { version, peers }) => Ok(with_etag(
            json_response(
                StatusCode::OK,
                &PutAnswer {
                    version: version.into(),
                    replaced: replaced.into(),
                    confirmed_by: peers.iter().map(|s| s.get()).collect(),
                    limits,
                },
            ),
            version,
        )),
        Ok(RulesOutcome::Superseded { version, winner }) => Err(ApiError {
            etag: Some(winner.etag()),
            ..ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "version {version} lost to version {winner}, a change made at the same \
                     time (or just after) on node slot {}: the rules in force are version \
                     {winner}, not these",
                    winner.origin
                ),
            )
        }),
        Ok(RulesOutcome::Unconfirmed {
            version,
            confirmed,
            silent,
            refused,
            majority,
        }) => Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "version {version} is in force on this node but was not confirmed in time: \
                     confirmed by peer slots {confirmed:?}, no answer from {silent:?}, refused \
                     by {refused:?}; a change needs every live node and at least {majority} \
                     nodes. It may still take effect everywhere: read GET /v1/rules before \
                     trying again",
                    confirmed = slots(&confirmed),
                    silent = slots(&silent),
                    refused = slots(&refused),
                ),
            )
        }),
        Err(PutRulesError::Invalid(e)) => Err(rules_error(e)),
        Err(e @ PutRulesError::Setup(_)) => Err(ApiError::bad_request(e.to_string())),
        Err(PutRulesError::TooLarge(_)) => Err(ApiError::too_large(MAX_RULES_BYTES)),
        Err(PutRulesError::Stale { current }) => Err(stale(current)),
        Err(e @ (PutRulesError::Stopped | PutRulesError::NoQuorum { .. })) => Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }),
        Err(e @ PutRulesError::NotPersisted(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

fn slots(s: &[drl_core::slot::NodeSlot]) -> Vec<u16> {
    s.iter().map(|s| s.get()).collect()
}

pub(crate) async fn validate_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<MAX_RULES_BYTES>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let text = rules_text(body)?;
    let rules = RuleSet::from_toml(&text).map_err(rules_error)?;
    Ok(json_response(
        StatusCode::OK,
        &ValidateAnswer {
            valid: true,
            limits: limit_list(&rules),
        },
    ))
}

fn rules_text(bytes: Bytes) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| ApiError::bad_request(format!("the rules text is not valid UTF-8: {e}")))
}

fn rules_error(e: RulesError) -> ApiError {
    ApiError {
        position: Some(Position {
            line: e.line(),
            column: e.column(),
            path: e.path().to_owned(),
        }),
        ..ApiError::bad_request(e.to_string())
    }
}
