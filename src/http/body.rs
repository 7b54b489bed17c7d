//! Reading request bodies with a size limit and a deadline.
//!
//! A declared `Content-Length` above the limit is refused with 413 before a
//! byte of the body is read, so a client that sent `Expect: 100-continue`
//! gets the 413 instead of `100 Continue`. A body that does not arrive in
//! full within the body timeout (a client that declared 100 bytes and sent
//! 2) is answered 408 and its connection closed, rather than held forever.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::AppState;

/// A whole request body of at most `MAX` bytes.
pub struct LimitedBody<const MAX: usize>(pub Bytes);

/// Why a body could not be read. Nothing was done with it.
pub enum BodyRejection {
    /// Refused with this error (too large, malformed).
    Refused(ApiError),
    /// The body did not arrive in time: 408, and the connection closes.
    TimedOut,
}

impl IntoResponse for BodyRejection {
    fn into_response(self) -> Response {
        match self {
            BodyRejection::Refused(e) => e.into_response(),
            BodyRejection::TimedOut => {
                let mut r = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                )
                .into_response();
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
        }
    }
}

fn too_large(max: usize) -> BodyRejection {
    BodyRejection::Refused(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is too large (limit: {} KiB on this route)",
            max / 1024
        ),
    ))
}

impl<const MAX: usize> FromRequest<AppState> for LimitedBody<MAX> {
    type Rejection = BodyRejection;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, BodyRejection> {
        if let Some(declared) = req.headers().get(header::CONTENT_LENGTH) {
            let declared = declared
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    BodyRejection::Refused(ApiError::bad_request("Content-Length is not a number"))
                })?;
            if declared > MAX as u64 {
                return Err(too_large(MAX));
            }
        }
        let body = http_body_util::Limited::new(req.into_body(), MAX);
        match tokio::time::timeout(state.body_timeout, body.collect()).await {
            Err(_) => Err(BodyRejection::TimedOut),
            Ok(Ok(collected)) => Ok(LimitedBody(collected.to_bytes())),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(MAX)),
            Ok(Err(e)) => Err(BodyRejection::Refused(ApiError::bad_request(format!(
                "the request body could not be read: {e}"
            )))),
        }
    }
}
