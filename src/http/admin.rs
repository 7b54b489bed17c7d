//! The rules admin routes: `GET /v1/rules`, `PUT /v1/rules` and
//! `POST /v1/rules/validate`, behind `Authorization: Bearer <admin_token>`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;

use super::body::LimitedBody;
use super::error::{ApiError, Position};
use super::{json_response, AppState};
use crate::node::{PutRulesError, RulesVersion};
use drl_core::algorithm::RateAlgorithm;
use drl_core::rules::{RuleSet, RulesError};
use drl_core::wire::MAX_RULES_BYTES;

/// Refuses the request unless it carries the configured admin token. With
/// no token configured the admin API is off (403), so that a node never
/// runs with an open admin API by accident.
pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = state.service().admin_token() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: no admin_token is configured on this node",
        ));
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("wrong admin token")),
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

/// Compares without an early exit, so response time says nothing about
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

#[derive(Serialize)]
struct Version {
    counter: u64,
    origin: u16,
}

impl From<RulesVersion> for Version {
    fn from(RulesVersion { counter, origin }: RulesVersion) -> Self {
        Version { counter, origin }
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
    let rules = state.service().node().limiter.rules();
    Ok(json_response(
        StatusCode::OK,
        &RulesAnswer {
            version: status.rules_version.into(),
            text: rules.source().to_owned(),
            limits: limit_list(&rules),
            file_error: status.rules_file_error,
        },
    ))
}

pub(crate) async fn put_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<MAX_RULES_BYTES>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let text = rules_text(body)?;
    // Parsed once, here: the node takes the parsed rules.
    let rules = RuleSet::from_toml(&text).map_err(rules_error)?;
    let limits = limit_list(&rules);
    match state.service().node().put_rules(rules).await {
        Ok(version) => Ok(json_response(
            StatusCode::OK,
            &PutAnswer {
                version: version.into(),
                limits,
            },
        )),
        Err(PutRulesError::Invalid(e)) => Err(rules_error(e)),
        Err(e @ PutRulesError::Setup(_)) => Err(ApiError::bad_request(e.to_string())),
        Err(PutRulesError::TooLarge(_)) => Err(ApiError::too_large(MAX_RULES_BYTES)),
        Err(e @ PutRulesError::Stopped) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e @ PutRulesError::NotPersisted(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
    }
}
