//! How checks reach a node.
//!
//! [`Transport`] is the seam between the client's routing and the wire. Its
//! unit is a batch: the client coalesces the checks that are waiting for the
//! same node at the same moment into one [`Transport::check_batch`] call.
//! [`HttpTransport`], over the node's HTTP API (`POST /v1/check`), sends
//! the checks of a batch concurrently over a pool of keep-alive HTTP/1.1
//! connections to that node (HTTP/1.1 has no batch request); a transport over
//! a batch RPC would send one request per batch instead.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use drl_core::limiter::Outcome;

/// One check: descriptor fields and a cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub fields: Arc<[(String, String)]>,
    pub cost: u32,
}

/// The deciding limit of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    /// The rule the limit belongs to.
    pub rule: String,
    pub limit: u64,
    pub window: Duration,
    pub remaining: u64,
    /// Until the quota is whole again.
    pub reset_after: Duration,
    /// How long until the same request would pass; `None` for `Never`.
    pub retry_after: Option<Duration>,
}

/// What a node answered to one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckAnswer {
    /// A decision; `quota` is `None` when no rule limits the request.
    Decided {
        outcome: Outcome,
        quota: Option<Quota>,
    },
    /// The node refused the request itself (bad descriptors, unknown
    /// endpoint, cost out of range): no node would take it, nothing was
    /// counted.
    Refused(String),
}

/// Why a node gave no decision. Any of these moves the call to the next
/// node; nothing was counted unless the node counted and the answer was
/// lost (a timeout after the request was sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("{0} answered {1}")]
    Status(SocketAddr, u16),
    #[error("malformed answer from {0}: {1}")]
    Malformed(SocketAddr, String),
}

impl TransportError {
    /// The label of this error in the `calls` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Connect(..) => "connect_error",
            TransportError::Timeout(..) => "timeout",
            TransportError::Status(..) => "unavailable",
            TransportError::Malformed(..) => "malformed",
        }
    }
}

/// A way to send checks to nodes.
pub trait Transport: Send + Sync + 'static {
    /// Sends a batch of checks to `node`; one result per check, in order.
    /// Each check gets at most `timeout`.
    fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> impl Future<Output = Vec<Result<CheckAnswer, TransportError>>> + Send;

    /// A light request telling whether `node` is up and ready to decide.
    fn probe(
        &self,
        node: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// Largest answer body read from a node.
const MAX_ANSWER: usize = 64 * 1024;

/// Checks over the HTTP API, on pooled keep-alive HTTP/1.1 connections.
#[derive(Clone)]
pub struct HttpTransport {
    client: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl HttpTransport {
    /// `max_idle` keep-alive connections are kept per node.
    pub fn new(connect_timeout: Duration, max_idle: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .build(connector);
        HttpTransport { client }
    }

    async fn request(
        &self,
        node: SocketAddr,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), TransportError> {
        let uri = format!("http://{node}{path}");
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| TransportError::Malformed(node, e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                TransportError::Connect(node, e.to_string())
            } else {
                TransportError::Malformed(node, e.to_string())
            }
        })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| TransportError::Malformed(node, e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    async fn check_one(
        &self,
        node: SocketAddr,
        req: CheckRequest,
        timeout: Duration,
    ) -> Result<CheckAnswer, TransportError> {
        let body = check_body(&req);
        let (status, body) = tokio::time::timeout(
            timeout,
            self.request(node, http::Method::POST, "/v1/check", body),
        )
        .await
        .map_err(|_| TransportError::Timeout(node, timeout))??;
        parse_check(node, status, &body)
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        HttpTransport::new(Duration::from_millis(500), 64)
    }
}

impl Transport for HttpTransport {
    async fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Vec<Result<CheckAnswer, TransportError>> {
        futures_util::future::join_all(
            batch
                .into_iter()
                .map(|req| self.check_one(node, req, timeout)),
        )
        .await
    }

    async fn probe(&self, node: SocketAddr, timeout: Duration) -> Result<(), TransportError> {
        let (status, _) = tokio::time::timeout(
            timeout,
            self.request(node, http::Method::GET, "/readyz", Bytes::new()),
        )
        .await
        .map_err(|_| TransportError::Timeout(node, timeout))??;
        if status == 200 {
            Ok(())
        } else {
            Err(TransportError::Status(node, status))
        }
    }
}

/// The JSON body of `POST /v1/check`.
pub fn check_body(req: &CheckRequest) -> Bytes {
    let mut map = serde_json::Map::with_capacity(req.fields.len() + 1);
    for (n, v) in req.fields.iter() {
        map.insert(n.clone(), Value::String(v.clone()));
    }
    map.insert("cost".into(), Value::from(req.cost));
    Bytes::from(Value::Object(map).to_string())
}

/// Reads a node's answer to `POST /v1/check` (docs/http-api.md). A status
/// other than 200, 429, 400 and 413 is a node failure.
pub fn parse_check(
    node: SocketAddr,
    status: u16,
    body: &[u8],
) -> Result<CheckAnswer, TransportError> {
    let malformed = |why: &str| TransportError::Malformed(node, why.to_owned());
    match status {
        200 | 429 => {}
        400 | 413 => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let message = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused")
                .to_owned();
            return Ok(CheckAnswer::Refused(message));
        }
        other => return Err(TransportError::Status(node, other)),
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    let outcome = match v.get("outcome").and_then(Value::as_str) {
        Some("allowed") => Outcome::Allowed,
        Some("denied") => Outcome::Denied,
        Some("never") => Outcome::Never,
        _ => return Err(malformed("no outcome")),
    };
    let quota = match v.get("rule").and_then(Value::as_str) {
        None => None,
        Some(rule) => {
            let num = |k: &str| v.get(k).and_then(Value::as_u64);
            let ms = |k: &str| num(k).map(Duration::from_millis);
            Some(Quota {
                rule: rule.to_owned(),
                limit: num("limit").ok_or_else(|| malformed("no limit"))?,
                window: ms("window_ms").ok_or_else(|| malformed("no window_ms"))?,
                remaining: num("remaining").unwrap_or(0),
                reset_after: ms("reset_ms").unwrap_or_default(),
                retry_after: ms("retry_after_ms"),
            })
        }
    };
    Ok(CheckAnswer::Decided { outcome, quota })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn body_escapes_and_carries_cost() {
        let req = CheckRequest {
            fields: vec![("user".to_owned(), "a\"b".to_owned())].into(),
            cost: 7,
        };
        let v: Value = serde_json::from_slice(&check_body(&req)).unwrap();
        assert_eq!(v["user"], "a\"b");
        assert_eq!(v["cost"], 7);
    }

    #[test]
    fn allowed_denied_never_and_unlimited_parse() {
        let a = parse_check(
            node(),
            200,
            br#"{"allowed":true,"outcome":"allowed","rule":"r","limit":5,"window_ms":1000,"remaining":4,"reset_ms":200,"retry_after_ms":0}"#,
        )
        .unwrap();
        let CheckAnswer::Decided { outcome, quota } = a else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Allowed);
        let q = quota.unwrap();
        assert_eq!((q.limit, q.remaining), (5, 4));
        assert_eq!(q.window, Duration::from_secs(1));
        let n = parse_check(
            node(),
            429,
            br#"{"allowed":false,"outcome":"never","rule":"r","limit":5,"window_ms":1000,"remaining":0,"reset_ms":0,"retry_after_ms":null}"#,
        )
        .unwrap();
        let CheckAnswer::Decided { outcome, quota } = n else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Never);
        assert_eq!(quota.unwrap().retry_after, None);
        let u = parse_check(
            node(),
            200,
            br#"{"allowed":true,"outcome":"allowed","rule":null}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            CheckAnswer::Decided {
                outcome: Outcome::Allowed,
                quota: None
            }
        );
    }

    #[test]
    fn refusals_and_failures_are_told_apart() {
        assert_eq!(
            parse_check(node(), 400, br#"{"error":"bad"}"#).unwrap(),
            CheckAnswer::Refused("bad".into())
        );
        assert_eq!(
            parse_check(node(), 503, b"{}"),
            Err(TransportError::Status(node(), 503))
        );
        assert!(matches!(
            parse_check(node(), 200, b"not json"),
            Err(TransportError::Malformed(..))
        ));
        assert!(matches!(
            parse_check(node(), 200, br#"{"outcome":"maybe"}"#),
            Err(TransportError::Malformed(..))
        ));
    }
}
