//! How checks reach a node.
//!
//! [`Transport`] is the seam between the client's routing and the wire. Its
//! unit is a batch: the client coalesces the checks that are waiting for the
//! same node at the same moment into one [`Transport::check_batch`] call.
//! [`HttpTransport`], over the node's HTTP API, sends a batch as one
//! `POST /v1/check/batch` over a pool of keep-alive HTTP/1.1 connections
//! to that node; `GrpcTransport` (feature `grpc`) sends one `CheckBatch` call per batch
//! over a multiplexed HTTP/2 connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use drl_core::limiter::Outcome;

/// A limit a check carries itself (a request-defined limit, decided alone,
/// without the rules): the fields of a rule file's limit entry. See
/// [`crate::limits`] for constructors.
pub use drl_core::rules::request::LimitSpec;

/// One check: descriptor fields, a cost, and optionally a limit of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    /// Descriptor fields, `(name, value)`.
    pub fields: Arc<[(String, String)]>,
    /// Hits this check weighs; 0 reports the state and counts nothing.
    pub cost: u32,
    /// A request-defined limit: when present the check is decided by it
    /// alone (the node's rules are not consulted).
    pub limit: Option<Arc<LimitSpec>>,
}

/// The deciding limit of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    /// The rule the limit belongs to (`request` for a request-defined
    /// limit).
    pub rule: String,
    /// The limit's quota per window.
    pub limit: u64,
    /// The limit's window (period).
    pub window: Duration,
    /// What is left to admit now.
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
        /// Allowed, denied or never.
        outcome: Outcome,
        /// The deciding limit.
        quota: Option<Quota>,
        /// The sealed receipt of an allowed check of cost above 0 that a
        /// rule counted: what a refund presents (to the node that issued
        /// it).
        receipt: Option<Arc<str>>,
    },
    /// The node refused the request itself (bad descriptors, unknown
    /// endpoint, cost out of range, a request-defined limit beyond the
    /// node's bounds): no node would take it, nothing was counted.
    Refused(String),
}

/// What a node answered to a refund.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefundAnswer {
    /// Given back: `refunded` of the `requested` cost (less when part of a
    /// window has passed).
    Refunded {
        /// The smallest amount given back across the receipt's limits.
        refunded: u32,
        /// The receipt's cost.
        requested: u32,
    },
    /// Another node issued the receipt (HTTP 421, gRPC
    /// `FAILED_PRECONDITION` naming the slot): only it can refund it.
    OtherNode(String),
    /// Refused for good, nothing given back: already refunded, expired,
    /// issued before the node restarted, or not a receipt.
    Refused(RefundRefusal, String),
}

/// Why a node refused a refund for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundRefusal {
    /// Spent already (HTTP 409, gRPC `ALREADY_EXISTS`).
    AlreadyRefunded,
    /// Every window it charged has passed, or its node restarted since
    /// (HTTP 410, gRPC `FAILED_PRECONDITION`).
    Expired,
    /// Not a receipt, or forged (HTTP 400, gRPC `INVALID_ARGUMENT`).
    Invalid,
}

/// Why a node gave no answer. [`TransportError::counted_nothing`] tells
/// whether the request can have been counted: only a request that was
/// certainly not counted is sent again to another node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made (or the connection was gone before the
    /// request was written): nothing was sent.
    #[error("cannot reach {0}: {1}")]
    Connect(SocketAddr, String),
    /// The node answered that it decides nothing now (HTTP 503, gRPC
    /// `UNAVAILABLE`: recovering its counts after a restart, or draining);
    /// nothing was counted.
    #[error("{0} is unavailable: {1}")]
    Unavailable(SocketAddr, String),
    /// No answer within the deadline; the node may have counted the
    /// request.
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// An unexpected status; the node may have counted the request.
    #[error("{0} answered {1}")]
    Status(SocketAddr, u16),
    /// An answer that cannot be read, or a connection lost after the
    /// request was sent; the node may have counted the request.
    #[error("malformed answer from {0}: {1}")]
    Malformed(SocketAddr, String),
    /// The transport cannot make this call (a refund over a transport
    /// without one).
    #[error("not supported by this transport: {0}")]
    Unsupported(&'static str),
}

impl TransportError {
    /// The label of this error in the `calls` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Connect(..) => "connect_error",
            TransportError::Timeout(..) => "timeout",
            TransportError::Status(..) | TransportError::Unavailable(..) => "unavailable",
            TransportError::Malformed(..) | TransportError::Unsupported(..) => "malformed",
        }
    }

    /// True when the node certainly counted nothing: the request never
    /// reached it, or it refused to decide. Sending it to another node
    /// then cannot count it twice.
    pub fn counted_nothing(&self) -> bool {
        matches!(
            self,
            TransportError::Connect(..)
                | TransportError::Unavailable(..)
                | TransportError::Unsupported(..)
        )
    }
}

/// A way to send checks to nodes. [`HttpTransport`] and (feature `grpc`)
/// `GrpcTransport` implement it; a test can put its own in their place.
pub trait Transport: Send + Sync + 'static {
    /// Sends independent checks to `node` (the client coalesces the single
    /// checks waiting for the same node); one result per check, in order.
    /// Each check gets at most `timeout`.
    fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> impl Future<Output = Vec<Result<CheckAnswer, TransportError>>> + Send;

    /// Sends checks to `node` as one request decided atomically: every
    /// limit of every check admits, and every check is counted, or nothing
    /// is. One answer per check, in order; when the node refused the
    /// request itself, every answer is that [`CheckAnswer::Refused`].
    fn check_atomic(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<CheckAnswer>, TransportError>> + Send {
        let _ = (node, batch, timeout);
        async { Err(TransportError::Unsupported("atomic batches")) }
    }

    /// Gives back what the check that issued `receipt` charged, on `node`.
    fn refund(
        &self,
        node: SocketAddr,
        receipt: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<RefundAnswer, TransportError>> + Send {
        let _ = (node, receipt, timeout);
        async { Err(TransportError::Unsupported("refunds")) }
    }

    /// A light request telling whether `node` is up and ready to decide.
    fn probe(
        &self,
        node: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// Largest answer body read from a node (a batch of 1,000 decisions).
const MAX_ANSWER: usize = 1024 * 1024;

/// Checks over the HTTP API (`POST /v1/check`, `POST /v1/refund`,
/// `GET /readyz`), on pooled keep-alive HTTP/1.1 connections.
///
/// Batches go as one `POST /v1/check/batch`: an atomic batch
/// ([`Transport::check_atomic`]) is decided on the node as one request
/// (every limit of every check, or nothing counted), independent checks
/// each on their own; a lone check goes as `POST /v1/check`.
#[derive(Clone)]
pub struct HttpTransport {
    client: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("bearer_token", &self.authorization.is_some())
            .finish()
    }
}

impl HttpTransport {
    /// `max_idle` keep-alive connections are kept per node; a connection
    /// must be made within `connect_timeout`.
    pub fn new(connect_timeout: Duration, max_idle: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .build(connector);
        HttpTransport {
            client,
            authorization: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request (for a
    /// gateway in front of the nodes; a node itself checks tokens only on
    /// its admin routes). Errors if the token cannot be a header value.
    pub fn with_bearer_token(mut self, token: &str) -> Result<Self, TransportError> {
        self.authorization = Some(bearer(token)?);
        Ok(self)
    }

    async fn request(
        &self,
        node: SocketAddr,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), TransportError> {
        let uri = format!("http://{node}{path}");
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        let request = request
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

/// `Bearer <token>` as a header value (marked sensitive).
pub(crate) fn bearer(token: &str) -> Result<HeaderValue, TransportError> {
    let mut v = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| TransportError::Unsupported("a bearer token that is not header text"))?;
    v.set_sensitive(true);
    Ok(v)
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
        if let [req] = &batch[..] {
            return vec![self.check_one(node, req.clone(), timeout).await];
        }
        match self.batch(node, &batch, true, timeout).await {
            Ok(items) => items,
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    async fn check_atomic(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Result<Vec<CheckAnswer>, TransportError> {
        self.batch(node, &batch, false, timeout)
            .await?
            .into_iter()
            .collect()
    }

    async fn refund(
        &self,
        node: SocketAddr,
        receipt: &str,
        timeout: Duration,
    ) -> Result<RefundAnswer, TransportError> {
        let body = Bytes::from(serde_json::json!({ "receipt": receipt }).to_string());
        let (status, body) = tokio::time::timeout(
            timeout,
            self.request(node, http::Method::POST, "/v1/refund", body),
        )
        .await
        .map_err(|_| TransportError::Timeout(node, timeout))??;
        parse_refund(node, status, &body)
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

impl HttpTransport {
    /// `POST /v1/check/batch`: one result per check, in order.
    async fn batch(
        &self,
        node: SocketAddr,
        batch: &[CheckRequest],
        independent: bool,
        timeout: Duration,
    ) -> Result<Vec<Result<CheckAnswer, TransportError>>, TransportError> {
        let body = batch_body(batch, independent);
        let (status, body) = tokio::time::timeout(
            timeout,
            self.request(node, http::Method::POST, "/v1/check/batch", body),
        )
        .await
        .map_err(|_| TransportError::Timeout(node, timeout))??;
        parse_batch(node, status, &body, batch.len())
    }
}

/// The JSON body of `POST /v1/check`.
pub fn check_body(req: &CheckRequest) -> Bytes {
    let mut map = serde_json::Map::with_capacity(req.fields.len() + 2);
    for (n, v) in req.fields.iter() {
        map.insert(n.clone(), Value::String(v.clone()));
    }
    map.insert("cost".into(), Value::from(req.cost));
    if let Some(limit) = &req.limit {
        map.insert("limit".into(), limit_json(limit));
    }
    Bytes::from(Value::Object(map).to_string())
}

/// A request-defined limit as the HTTP API takes it.
fn limit_json(l: &LimitSpec) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("algorithm".into(), Value::from(l.algorithm.clone()));
    let nums = [
        ("limit", l.limit),
        ("precision", l.precision),
        ("capacity", l.capacity),
        ("refill", l.refill),
        ("leak", l.leak),
        ("burst", l.burst),
    ];
    for (k, v) in nums {
        if let Some(v) = v {
            m.insert(k.into(), Value::from(v));
        }
    }
    let texts = [
        ("window", &l.window),
        ("per", &l.per),
        ("granularity", &l.granularity),
    ];
    for (k, v) in texts {
        if let Some(v) = v {
            m.insert(k.into(), Value::from(v.clone()));
        }
    }
    Value::Object(m)
}

fn error_message(body: &[u8], default: &str) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v.get("error")
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_owned()
}

/// Reads a node's answer to `POST /v1/check` (docs/http-api.md). 400 and
/// 413 are refusals of the request, 503 a node that decides nothing now;
/// any other status but 200 and 429 is a node failure.
pub fn parse_check(
    node: SocketAddr,
    status: u16,
    body: &[u8],
) -> Result<CheckAnswer, TransportError> {
    let malformed = |why: &str| TransportError::Malformed(node, why.to_owned());
    match status {
        200 | 429 => {}
        400 | 413 => return Ok(CheckAnswer::Refused(error_message(body, "refused"))),
        503 => {
            return Err(TransportError::Unavailable(
                node,
                error_message(body, "unavailable"),
            ))
        }
        other => return Err(TransportError::Status(node, other)),
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    decision_of(node, &v)
}

/// A decision as the HTTP API writes it (alone, or as an item of a batch).
fn decision_of(node: SocketAddr, v: &Value) -> Result<CheckAnswer, TransportError> {
    let malformed = |why: &str| TransportError::Malformed(node, why.to_owned());
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
    let receipt = v
        .get("receipt")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .map(Arc::from);
    Ok(CheckAnswer::Decided {
        outcome,
        quota,
        receipt,
    })
}

/// Reads a node's answer to `POST /v1/refund`.
pub fn parse_refund(
    node: SocketAddr,
    status: u16,
    body: &[u8],
) -> Result<RefundAnswer, TransportError> {
    let why = || error_message(body, "refused");
    match status {
        200 => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| TransportError::Malformed(node, e.to_string()))?;
            let num = |k: &str| {
                v.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| TransportError::Malformed(node, format!("no {k}")))
            };
            Ok(RefundAnswer::Refunded {
                refunded: num("refunded")?,
                requested: num("requested")?,
            })
        }
        421 => Ok(RefundAnswer::OtherNode(why())),
        409 => Ok(RefundAnswer::Refused(RefundRefusal::AlreadyRefunded, why())),
        410 => Ok(RefundAnswer::Refused(RefundRefusal::Expired, why())),
        400 | 413 => Ok(RefundAnswer::Refused(RefundRefusal::Invalid, why())),
        503 => Err(TransportError::Unavailable(node, why())),
        other => Err(TransportError::Status(node, other)),
    }
}

/// The JSON body of `POST /v1/check/batch`.
pub fn batch_body(batch: &[CheckRequest], independent: bool) -> Bytes {
    let checks = batch
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&check_body(r)).unwrap_or(Value::Null))
        .collect();
    let mut map = serde_json::Map::with_capacity(2);
    map.insert("checks".into(), Value::Array(checks));
    map.insert("independent".into(), Value::Bool(independent));
    Bytes::from(Value::Object(map).to_string())
}

/// Reads a node's answer to `POST /v1/check/batch` of `n` checks: one
/// result per check. A batch refused as a whole (400, 413) is that
/// refusal for every check; 503 is a node that decides nothing now.
pub fn parse_batch(
    node: SocketAddr,
    status: u16,
    body: &[u8],
    n: usize,
) -> Result<Vec<Result<CheckAnswer, TransportError>>, TransportError> {
    match status {
        200 | 429 => {}
        400 | 413 => {
            let why = error_message(body, "refused");
            return Ok((0..n)
                .map(|_| Ok(CheckAnswer::Refused(why.clone())))
                .collect());
        }
        503 => {
            return Err(TransportError::Unavailable(
                node,
                error_message(body, "unavailable"),
            ))
        }
        other => return Err(TransportError::Status(node, other)),
    }
    let malformed = |why: &str| TransportError::Malformed(node, why.to_owned());
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    let results = v
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no results"))?;
    if results.len() != n {
        return Err(malformed(&format!(
            "{} results for {n} checks",
            results.len()
        )));
    }
    Ok(results
        .iter()
        .map(|item| match item.get("error").and_then(Value::as_str) {
            None => decision_of(node, item),
            Some(why) => match item.get("status").and_then(Value::as_u64) {
                Some(400 | 413) => Ok(CheckAnswer::Refused(why.to_owned())),
                Some(503) => Err(TransportError::Unavailable(node, why.to_owned())),
                other => Err(TransportError::Status(
                    node,
                    other.and_then(|s| u16::try_from(s).ok()).unwrap_or(500),
                )),
            },
        })
        .collect())
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
