//! Errors of the HTTP API: every one is a status code and a JSON body
//! `{"error": "..."}`, and none of them changed anything.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use drl_core::limiter::CheckError;

/// A refused request. Built only from what the client sent or from the
/// node's state; never from a bug (those do not become 500s by design: the
/// handlers have no path that returns one for client input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person; the body's `error` field.
    pub message: String,
    /// Extra fields of the body (line and column of a rules error).
    pub position: Option<Position>,
    /// `Retry-After` seconds, for 503 while recovering.
    pub retry_after: Option<u64>,
    /// Adds `WWW-Authenticate: Bearer` (401).
    pub challenge: bool,
    /// The rules version in force, as an entity tag: the `ETag` header and
    /// the body's `etag` field (412, 409).
    pub etag: Option<String>,
}

/// Where in a rules file an error is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1, in characters.
    pub column: usize,
    /// The field path, as `rules[2].limits[0].window` (empty when the text
    /// is not TOML at all).
    pub path: String,
}

impl ApiError {
    /// An error with `status` and `message` only.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            position: None,
            retry_after: None,
            challenge: false,
            etag: None,
        }
    }
    /// A 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// A 413 Payload Too Large naming the largest body of `limit` bytes.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds the {limit}-byte limit"),
        )
    }
}

impl From<CheckError> for ApiError {
    fn from(e: CheckError) -> ApiError {
        match e {
            CheckError::Recovering => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            CheckError::Descriptor(_)
            | CheckError::UnknownEndpoint(_)
            | CheckError::RequestLimit(_) => ApiError::bad_request(e.to_string()),
        }
    }
}

impl ApiError {
    /// [`ApiError::from`] a [`CheckError`], in the words of the node's
    /// [`Service::describe_check_error`](crate::service::Service::describe_check_error).
    pub fn from_check(e: CheckError, service: &crate::service::Service) -> ApiError {
        let message = service.describe_check_error(&e);
        ApiError {
            message,
            ..ApiError::from(e)
        }
    }
}

impl From<drl_core::limiter::RefundError> for ApiError {
    fn from(e: drl_core::limiter::RefundError) -> ApiError {
        use drl_core::limiter::RefundError as R;
        let status = match e {
            R::Invalid(_) => StatusCode::BAD_REQUEST,
            R::OtherNode { .. } => StatusCode::MISDIRECTED_REQUEST,
            R::OtherRun | R::Expired => StatusCode::GONE,
            R::AlreadyRefunded => StatusCode::CONFLICT,
            R::LedgerFull | R::Recovering | R::Unreachable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let retry_after = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1);
        ApiError {
            retry_after,
            ..ApiError::new(status, e.to_string())
        }
    }
}

impl From<drl_core::descriptor::DescriptorError> for ApiError {
    fn from(e: drl_core::descriptor::DescriptorError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    position: Option<&'a Position>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            position: self.position.as_ref(),
            etag: self.etag.as_deref(),
        };
        let mut response = super::json_response(self.status, &body);
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(v) = self
            .etag
            .as_deref()
            .and_then(|e| HeaderValue::from_str(e).ok())
        {
            headers.insert(header::ETAG, v);
        }
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"drl-admin\""),
            );
        }
        response
    }
}

impl From<super::request::RequestError> for ApiError {
    fn from(e: super::request::RequestError) -> ApiError {
        ApiError::bad_request(e.0)
    }
}
