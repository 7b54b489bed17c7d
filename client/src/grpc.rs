//! The gRPC transport (feature `grpc`): the node's native API,
//! `drl.v1.RateLimiter` (`Check`, `CheckBatch`, `Refund`), and
//! `grpc.health.v1` for probes, over HTTP/2 with hyper, optionally over
//! TLS (feature `tls`).
//!
//! Each node gets a small pool of HTTP/2 connections (`connections`,
//! default 2), each carrying many calls at once; a connection is made on
//! first use and again after it breaks. The checks the client coalesces
//! for one node go as one `CheckBatch` with `independent = true` (each
//! decided on its own), an atomic batch as one `CheckBatch` decided as a
//! single request. Every call carries its deadline (`grpc-timeout`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderValue;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::proto;
use crate::transport::{
    bearer, CheckAnswer, CheckRequest, RefundAnswer, RefundRefusal, Transport, TransportError,
};

/// Largest answer read from a node (a batch of 1000 answers fits).
const MAX_ANSWER: usize = 1024 * 1024;

/// gRPC status codes the client tells apart.
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const ALREADY_EXISTS: i32 = 6;
const FAILED_PRECONDITION: i32 = 9;
const UNAVAILABLE: i32 = 14;

/// Checks over the native gRPC API. Cheap to clone (clones share the
/// connections).
///
/// ```no_run
/// # async fn demo() -> Result<(), drl_client::ClientError> {
/// use drl_client::{Client, GrpcTransport};
///
/// let client = Client::builder()
///     .nodes(["127.0.0.1:9400", "127.0.0.1:9401", "127.0.0.1:9402"])
///     .build_with(GrpcTransport::new())
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GrpcTransport {
    inner: Arc<Shared>,
}

struct Shared {
    nodes: Mutex<HashMap<SocketAddr, Arc<NodePool>>>,
    connections: usize,
    connect_timeout: Duration,
    authorization: Option<HeaderValue>,
    #[cfg(feature = "tls")]
    tls: Option<(
        tokio_rustls::TlsConnector,
        Option<rustls::pki_types::ServerName<'static>>,
    )>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("connections", &self.inner.connections)
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("bearer_token", &self.inner.authorization.is_some())
            .finish()
    }
}

struct NodePool {
    slots: Vec<tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>>,
    next: AtomicUsize,
}

impl Default for GrpcTransport {
    fn default() -> Self {
        GrpcTransport::new()
    }
}

impl GrpcTransport {
    /// Plaintext HTTP/2 (h2c), two connections per node, connections made
    /// within 500 ms.
    pub fn new() -> Self {
        GrpcTransport {
            inner: Arc::new(Shared {
                nodes: Mutex::new(HashMap::new()),
                connections: 2,
                connect_timeout: Duration::from_millis(500),
                authorization: None,
                #[cfg(feature = "tls")]
                tls: None,
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::try_unwrap(self.inner).unwrap_or_else(|a| Shared {
            nodes: Mutex::new(HashMap::new()),
            connections: a.connections,
            connect_timeout: a.connect_timeout,
            authorization: a.authorization.clone(),
            #[cfg(feature = "tls")]
            tls: a.tls.clone(),
        });
        f(&mut shared);
        GrpcTransport {
            inner: Arc::new(shared),
        }
    }

    /// HTTP/2 connections per node (at least 1; default 2). Each carries
    /// many calls at once; more spread the work of one busy client over
    /// more of a node's threads.
    pub fn connections(self, n: usize) -> Self {
        self.with(|s| s.connections = n.max(1))
    }

    /// How long a connection (and its TLS handshake) may take.
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.with(|s| s.connect_timeout = timeout)
    }

    /// Sends `authorization: Bearer <token>` with every call (for a gateway
    /// in front of the nodes: a node does not check it).
    pub fn bearer_token(self, token: &str) -> Result<Self, TransportError> {
        let value = bearer(token)?;
        Ok(self.with(|s| s.authorization = Some(value)))
    }

    /// Speaks TLS to every node, as `tls` says (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls(self, tls: &crate::tls::TlsConfig) -> Result<Self, crate::tls::TlsError> {
        let connector = tls.connector()?;
        Ok(self.with(|s| s.tls = Some(connector)))
    }

    fn pool(&self, node: SocketAddr) -> Arc<NodePool> {
        let mut nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .entry(node)
            .or_insert_with(|| {
                Arc::new(NodePool {
                    slots: (0..self.inner.connections)
                        .map(|_| tokio::sync::Mutex::new(None))
                        .collect(),
                    next: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// A ready sender on one of `node`'s connections, connecting if need
    /// be. Its errors are all "nothing sent".
    async fn sender(&self, node: SocketAddr) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let pool = self.pool(node);
        let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.slots.len();
        let mut slot = pool.slots[i].lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let sender = tokio::time::timeout(self.inner.connect_timeout, self.connect(node))
            .await
            .map_err(|_| TransportError::Connect(node, "connect timed out".into()))??;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self, node: SocketAddr) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let refused = |e: &dyn std::fmt::Display| TransportError::Connect(node, e.to_string());
        let tcp = tokio::net::TcpStream::connect(node)
            .await
            .map_err(|e| refused(&e))?;
        let _ = tcp.set_nodelay(true);
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .timer(hyper_util::rt::TokioTimer::new());
        #[cfg(feature = "tls")]
        if let Some((connector, name)) = &self.inner.tls {
            let name = name
                .clone()
                .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(node.ip().into()));
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| refused(&e))?;
            let (sender, conn) = builder
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| refused(&e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(sender);
        }
        let (sender, conn) = builder
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| refused(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One unary call: `message` to `path`, the answer's message back.
    /// A status other than OK is `Ok(Err((code, message)))`.
    async fn call(
        &self,
        node: SocketAddr,
        path: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<Result<Bytes, (i32, String)>, TransportError> {
        let work = async {
            let mut sender = self.sender(node).await?;
            let mut body = BytesMut::with_capacity(5 + message.len());
            body.put_u8(0);
            body.put_u32(message.len() as u32);
            body.put_slice(message);
            #[cfg(feature = "tls")]
            let scheme = if self.inner.tls.is_some() {
                "https"
            } else {
                "http"
            };
            #[cfg(not(feature = "tls"))]
            let scheme = "http";
            let mut request = http::Request::builder()
                .method(http::Method::POST)
                .uri(format!("{scheme}://{node}{path}"))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .header("grpc-timeout", format!("{}m", timeout.as_millis().max(1)));
            if let Some(auth) = &self.inner.authorization {
                request = request.header(http::header::AUTHORIZATION, auth.clone());
            }
            let request = request
                .body(Full::new(body.freeze()))
                .map_err(|e| TransportError::Malformed(node, e.to_string()))?;
            // A connection that closed before the call was written: nothing
            // was sent.
            if sender.ready().await.is_err() {
                return Err(TransportError::Connect(node, "connection closed".into()));
            }
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| sent_error(node, &e))?;
            let (head, body) = response.into_parts();
            if head.status != http::StatusCode::OK {
                return Err(TransportError::Status(node, head.status.as_u16()));
            }
            // A trailers-only answer: the status is in the headers.
            if let Some(code) = grpc_status(&head.headers) {
                if code != OK {
                    return Ok(Err((code, grpc_message(&head.headers))));
                }
            }
            let collected = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| TransportError::Malformed(node, e.to_string()))?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let mut data = collected.to_bytes();
            match grpc_status(&trailers).or_else(|| grpc_status(&head.headers)) {
                Some(OK) => {}
                Some(code) => return Ok(Err((code, grpc_message(&trailers)))),
                None => return Err(TransportError::Malformed(node, "no grpc-status".into())),
            }
            if data.len() < 5 {
                return Err(TransportError::Malformed(node, "no message".into()));
            }
            let compressed = data.get_u8();
            let len = data.get_u32() as usize;
            if compressed != 0 || data.len() != len {
                return Err(TransportError::Malformed(
                    node,
                    "a compressed or cut message".into(),
                ));
            }
            Ok(Ok(data))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| TransportError::Timeout(node, timeout))?
    }
}

/// An error of a call that was handed to the connection: nothing was
/// counted only if the node refused the stream unprocessed (`REFUSED_STREAM`,
/// a `GOAWAY` that did not cover it) or the call was never written.
fn sent_error(node: SocketAddr, e: &hyper::Error) -> TransportError {
    if e.is_canceled() {
        return TransportError::Connect(node, e.to_string());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return TransportError::Connect(node, e.to_string());
            }
        }
        source = s.source();
    }
    TransportError::Malformed(node, e.to_string())
}

fn grpc_status(h: &http::HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `grpc-message`, percent-decoded.
fn grpc_message(h: &http::HeaderMap) -> String {
    let raw = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&raw[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const CHECK_BATCH: &str = "/drl.v1.RateLimiter/CheckBatch";
const REFUND: &str = "/drl.v1.RateLimiter/Refund";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

/// A check refused by the node: bad input is the request's fault, an
/// unavailable node counted nothing, anything else is unexpected.
fn refused(node: SocketAddr, code: i32, message: String) -> Result<CheckAnswer, TransportError> {
    match code {
        INVALID_ARGUMENT => Ok(CheckAnswer::Refused(message)),
        UNAVAILABLE => Err(TransportError::Unavailable(node, message)),
        other => Err(TransportError::Malformed(
            node,
            format!("gRPC status {other}: {message}"),
        )),
    }
}

impl Transport for GrpcTransport {
    async fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Vec<Result<CheckAnswer, TransportError>> {
        let n = batch.len();
        let message = proto::encode_batch(&batch, true);
        let answer = self.call(node, CHECK_BATCH, &message, timeout).await;
        let all = |r: Result<CheckAnswer, TransportError>| vec![r; n];
        match answer {
            Err(e) => all(Err(e)),
            Ok(Err((code, message))) => all(refused(node, code, message)),
            Ok(Ok(data)) => match proto::decode_batch(&data) {
                Ok(items) if items.len() == n => items
                    .into_iter()
                    .map(|item| match item {
                        Ok(answer) => Ok(answer),
                        Err((code, message)) => refused(node, code, message),
                    })
                    .collect(),
                Ok(items) => all(Err(TransportError::Malformed(
                    node,
                    format!("{} results for {n} checks", items.len()),
                ))),
                Err(e) => all(Err(TransportError::Malformed(node, e))),
            },
        }
    }

    async fn check_atomic(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Result<Vec<CheckAnswer>, TransportError> {
        let n = batch.len();
        let message = proto::encode_batch(&batch, false);
        match self.call(node, CHECK_BATCH, &message, timeout).await? {
            Err((code, message)) => {
                let one = refused(node, code, message)?;
                Ok(vec![one; n])
            }
            Ok(data) => {
                let items =
                    proto::decode_batch(&data).map_err(|e| TransportError::Malformed(node, e))?;
                if items.len() != n {
                    return Err(TransportError::Malformed(
                        node,
                        format!("{} results for {n} checks", items.len()),
                    ));
                }
                items
                    .into_iter()
                    .map(|item| item.or_else(|(code, message)| refused(node, code, message)))
                    .collect()
            }
        }
    }

    async fn refund(
        &self,
        node: SocketAddr,
        receipt: &str,
        timeout: Duration,
    ) -> Result<RefundAnswer, TransportError> {
        let message = proto::encode_refund(receipt);
        match self.call(node, REFUND, &message, timeout).await? {
            Ok(data) => {
                let (refunded, requested) =
                    proto::decode_refund(&data).map_err(|e| TransportError::Malformed(node, e))?;
                Ok(RefundAnswer::Refunded {
                    refunded,
                    requested,
                })
            }
            Err((FAILED_PRECONDITION, m)) if m.contains("issued by the node in slot") => {
                Ok(RefundAnswer::OtherNode(m))
            }
            Err((FAILED_PRECONDITION, m)) => Ok(RefundAnswer::Refused(RefundRefusal::Expired, m)),
            Err((ALREADY_EXISTS, m)) => {
                Ok(RefundAnswer::Refused(RefundRefusal::AlreadyRefunded, m))
            }
            Err((INVALID_ARGUMENT, m)) => Ok(RefundAnswer::Refused(RefundRefusal::Invalid, m)),
            Err((UNAVAILABLE, m)) => Err(TransportError::Unavailable(node, m)),
            Err((code, m)) => Err(TransportError::Malformed(
                node,
                format!("gRPC status {code}: {m}"),
            )),
        }
    }

    async fn probe(&self, node: SocketAddr, timeout: Duration) -> Result<(), TransportError> {
        let message = proto::encode_health("drl.v1.RateLimiter");
        match self.call(node, HEALTH, &message, timeout).await? {
            Ok(data) => match proto::decode_health(&data) {
                Ok(true) => Ok(()),
                Ok(false) => Err(TransportError::Unavailable(node, "not serving".into())),
                Err(e) => Err(TransportError::Malformed(node, e)),
            },
            Err((code, m)) => Err(TransportError::Malformed(
                node,
                format!("health: gRPC status {code}: {m}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "grpc-message",
            HeaderValue::from_static("check%200%3A bad%"),
        );
        assert_eq!(grpc_message(&h), "check 0: bad%");
        h.insert("grpc-status", HeaderValue::from_static("3"));
        assert_eq!(grpc_status(&h), Some(3));
    }
}
