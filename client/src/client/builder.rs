//! [`ClientBuilder`]: a remote client's settings, checked before it starts.

use super::*;

/// Builds a remote client. Every setting has a default: only the node
/// addresses are required.
///
/// | setting | default |
/// | --- | --- |
/// | [`protocol`](Self::protocol) | HTTP |
/// | [`call_timeout`](Self::call_timeout) | 500 ms, failovers included |
/// | [`attempt_timeout`](Self::attempt_timeout) | 150 ms per node |
/// | [`degraded`](Self::degraded) | fail closed |
/// | [`retry`](Self::retry) | [`RetryPolicy::Safe`] |
/// | [`bearer_token`](Self::bearer_token) | none |
/// | `tls` (feature `tls`) | plaintext |
/// | everything else | [`ClientConfig::default`] |
///
/// ```no_run
/// # async fn demo() -> Result<(), drl_client::ClientError> {
/// use std::time::Duration;
/// use drl_client::{Client, DegradedMode};
///
/// let client = Client::builder()
///     .nodes(["10.0.0.1:8400", "10.0.0.2:8400"])
///     .call_timeout(Duration::from_millis(200))
///     .degraded(DegradedMode::FailOpen)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct ClientBuilder {
    addrs: Vec<String>,
    config: ClientConfig,
    protocol: Protocol,
    bearer: Option<String>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
}

impl ClientBuilder {
    /// A node address, `host:port` (an `http://` or `grpc://` prefix is
    /// accepted). A name is resolved when the client is built and again
    /// every [`ClientConfig::dns_refresh`]; every address it resolves to
    /// becomes a node (a headless service's DNS name lists every pod).
    pub fn node(mut self, addr: impl Into<String>) -> Self {
        self.addrs.push(addr.into());
        self
    }

    /// Several node addresses (see [`ClientBuilder::node`]).
    pub fn nodes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.addrs.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Every setting at once.
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// What decides when no node answers.
    pub fn degraded(mut self, mode: DegradedMode) -> Self {
        self.config.degraded = mode;
        self
    }

    /// The wire: HTTP (default) or gRPC (feature `grpc`).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Deadline of a whole call, failovers included.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// Deadline of one attempt on one node.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = timeout;
        self
    }

    /// When a check that got no answer is sent to another node.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.config.retry = retry;
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request (for a
    /// gateway or proxy in front of the nodes that checks it).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// Speaks TLS to the nodes (features `grpc` and `tls`; the protocol
    /// becomes gRPC, the only API a node serves over TLS).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.tls = Some(tls);
        self.protocol = Protocol::Grpc;
        self
    }

    /// Resolves the addresses and starts the client's tasks over the
    /// chosen protocol.
    pub async fn build(self) -> Result<Client, ClientError> {
        let bad_token = |e: crate::transport::TransportError| ClientError::Config(e.to_string());
        let wire = match self.protocol {
            Protocol::Http => {
                let mut t = HttpTransport::new(self.config.attempt_timeout, self.config.max_batch);
                if let Some(token) = &self.bearer {
                    t = t.with_bearer_token(token).map_err(bad_token)?;
                }
                Wire::Http(t)
            }
            #[cfg(feature = "grpc")]
            Protocol::Grpc => {
                let mut t = crate::grpc::GrpcTransport::new()
                    .connect_timeout(self.config.attempt_timeout.max(Duration::from_millis(100)));
                if let Some(token) = &self.bearer {
                    t = t.bearer_token(token).map_err(bad_token)?;
                }
                #[cfg(feature = "tls")]
                if let Some(tls) = &self.tls {
                    t = t.tls(tls).map_err(|e| ClientError::Config(e.to_string()))?;
                }
                Wire::Grpc(t)
            }
        };
        self.build_with(wire).await
    }

    /// The same over a transport of the caller's (the protocol, token and
    /// TLS settings of this builder are then the transport's business).
    pub async fn build_with<T: Transport>(self, transport: T) -> Result<Client<T>, ClientError> {
        let mut nodes: Vec<SocketAddr> = Vec::new();
        let mut names = Vec::new();
        for a in &self.addrs {
            let host = a
                .strip_prefix("http://")
                .or_else(|| a.strip_prefix("grpc://"))
                .or_else(|| a.strip_prefix("https://"))
                .unwrap_or(a)
                .trim_end_matches('/');
            if host.parse::<SocketAddr>().is_err() {
                names.push(host.to_owned());
            }
            let found = tokio::net::lookup_host(host)
                .await
                .map_err(|e| ClientError::Resolve(a.clone(), e.to_string()))?;
            for addr in found {
                if !nodes.contains(&addr) {
                    nodes.push(addr);
                }
            }
        }
        if nodes.is_empty() {
            return Err(ClientError::NoNodes);
        }
        Client::start_remote(nodes, names, self.config, transport)
    }
}

pub(super) fn validate(c: &ClientConfig) -> Result<(), ClientError> {
    let bad = |m: &str| Err(ClientError::Config(m.to_owned()));
    if c.call_timeout.is_zero() || c.attempt_timeout.is_zero() || c.probe_timeout.is_zero() {
        return bad("timeouts must be above zero");
    }
    if !(c.routing.ewma_alpha > 0.0 && c.routing.ewma_alpha <= 1.0) {
        return bad("ewma_alpha must be in (0, 1]");
    }
    if !(c.lease.share > 0.0 && c.lease.share <= 1.0) {
        return bad("lease share must be in (0, 1]");
    }
    if c.max_batch == 0 || c.tick.is_zero() {
        return bad("max_batch and tick must be above zero");
    }
    Ok(())
}
