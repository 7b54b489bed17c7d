//! The client: one `check` call, whether the cluster is remote or embedded.
//!
//! A remote client is the async driver around three sans-IO pieces:
//! [`NodeTable`] (latency EWMA and a circuit breaker per node),
//! [`LeaseBook`] (leased local budgets) and the degraded-mode policy. One
//! background task per client probes idle nodes, gives open breakers their
//! half-open trial and renews leases; one task per node coalesces the checks
//! waiting for that node into batches for the [`Transport`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

#[cfg(feature = "node")]
use drl::node::{Node, NodeError, NodeHandle, NodeSettings};
use drl_core::decide::Decider;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, Outcome};
use drl_core::time::{Clock, Nanos};

use crate::breaker::BreakerConfig;
use crate::embedded::{Embedded, EmbeddedNode};
use crate::lease::{LeaseBook, LeaseConfig, LeaseKey};
use crate::metrics::{ClientMetrics, DegradedLabels};
use crate::remote::{run_background, spawn_node, Remote};
use crate::routing::{NodeTable, RoutingConfig};
use crate::transport::{HttpTransport, Quota, Transport};

/// What the client decides when no node answers within the call's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DegradedMode {
    /// Admit everything.
    FailOpen,
    /// Refuse everything.
    FailClosed,
    /// Admit from the budget leased for the descriptor set while the cluster
    /// answered (see [`crate::lease`]); a set without a lease gets
    /// `otherwise`.
    Local { otherwise: Fallback },
}

/// The decision for a descriptor set with no lease in `Local` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Allow,
    Deny,
}

/// Everything a client can be tuned with.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one `check`, failovers included.
    pub call_timeout: Duration,
    /// Deadline of one attempt on one node.
    pub attempt_timeout: Duration,
    /// Deadline of a probe.
    pub probe_timeout: Duration,
    pub routing: RoutingConfig,
    pub breaker: BreakerConfig,
    pub degraded: DegradedMode,
    pub lease: LeaseConfig,
    /// Most checks coalesced into one batch.
    pub max_batch: usize,
    /// How often the background task probes, renews and refreshes gauges.
    pub tick: Duration,
    /// How often the node names given to the builder are resolved again
    /// (new addresses become nodes); `None`: only when built.
    pub dns_refresh: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            call_timeout: Duration::from_millis(500),
            attempt_timeout: Duration::from_millis(150),
            probe_timeout: Duration::from_millis(250),
            routing: RoutingConfig::default(),
            breaker: BreakerConfig::default(),
            degraded: DegradedMode::FailClosed,
            lease: LeaseConfig::default(),
            max_batch: 64,
            tick: Duration::from_millis(50),
            dns_refresh: Some(Duration::from_secs(30)),
        }
    }
}

/// Who decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The node at that address.
    Node(SocketAddr),
    /// The node running in this process.
    Embedded,
    /// No node answered; the degraded mode decided.
    Degraded(Degraded),
}

/// Which degraded rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degraded {
    FailOpen,
    FailClosed,
    /// From (or, when spent, against) the descriptor set's lease.
    Lease,
}

impl Degraded {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Degraded::FailOpen => "fail_open",
            Degraded::FailClosed => "fail_closed",
            Degraded::Lease => "lease",
        }
    }
}

/// A decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The deciding limit; `None` when no rule limits the request, or when
    /// the degraded mode decided.
    pub quota: Option<Quota>,
    pub source: Source,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }
}

/// Why a client could not be built, or a check could not be made. A check
/// that fails changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node address given")]
    NoNodes,
    #[error("cannot resolve {0:?}: {1}")]
    Resolve(String, String),
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The request itself is invalid (descriptors, endpoint, cost): no node
    /// would take it, and nothing was counted.
    #[error("refused: {0}")]
    Refused(String),
    /// No decision can be made now (an in-process limiter recovering its
    /// counts). Nothing was counted.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The embedded node could not start (feature `node`).
    #[cfg(feature = "node")]
    #[error("embedded node: {0}")]
    Node(#[from] NodeError),
}

/// Monotonic time since the client was built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MonoClock(Instant);

impl Clock for MonoClock {
    fn now(&self) -> Nanos {
        Nanos::from(self.0.elapsed())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a remote client.
#[derive(Debug, Default)]
pub struct ClientBuilder {
    addrs: Vec<String>,
    config: ClientConfig,
}

impl ClientBuilder {
    /// A node address, `host:port` (an `http://` prefix is accepted). A name
    /// is resolved when the client is built and again every
    /// [`ClientConfig::dns_refresh`]; every address it resolves to becomes a
    /// node (a headless service's DNS name lists every pod).
    pub fn node(mut self, addr: impl Into<String>) -> Self {
        self.addrs.push(addr.into());
        self
    }

    pub fn nodes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.addrs.extend(addrs.into_iter().map(Into::into));
        self
    }

    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    pub fn degraded(mut self, mode: DegradedMode) -> Self {
        self.config.degraded = mode;
        self
    }

    /// Resolves the addresses and starts the client's tasks over HTTP.
    pub async fn build(self) -> Result<Client, ClientError> {
        let transport = HttpTransport::new(self.config.attempt_timeout, self.config.max_batch);
        self.build_with(transport).await
    }

    /// The same over another transport.
    pub async fn build_with<T: Transport>(self, transport: T) -> Result<Client<T>, ClientError> {
        let mut nodes: Vec<SocketAddr> = Vec::new();
        let mut names = Vec::new();
        for a in &self.addrs {
            let host = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
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

/// A rate-limit client. Cheap to clone; every clone shares the nodes'
/// state, the leases and the metrics.
pub struct Client<T: Transport = HttpTransport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Client<T> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
        }
    }
}

pub(crate) struct Inner<T: Transport> {
    pub(crate) config: ClientConfig,
    pub(crate) clock: MonoClock,
    pub(crate) metrics: ClientMetrics,
    pub(crate) backend: Backend<T>,
}

// One per client, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend<T: Transport> {
    Remote(Remote<T>),
    Embedded(Box<Embedded>),
}

impl<T: Transport> Drop for Inner<T> {
    fn drop(&mut self) {
        if let Backend::Remote(r) = &self.backend {
            if let Some(task) = lock(&r.background).take() {
                task.abort();
            }
        }
    }
}

impl Client<HttpTransport> {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Embedded mode (feature `node`): starts a cluster node in this process (the same
    /// [`Node`] that `drl node` runs, joining its peers over QUIC) and
    /// decides on it, with no hop. [`Client::shutdown`] stops it cleanly.
    #[cfg(feature = "node")]
    pub async fn embedded(
        settings: NodeSettings,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let node = Node::start(settings).await?;
        Ok(Client::from_node(node, config))
    }

    /// Embedded mode over a node the application started itself (feature
    /// `node`).
    #[cfg(feature = "node")]
    pub fn from_node(node: NodeHandle, config: ClientConfig) -> Self {
        let decider = node.decider();
        Client::new_embedded(decider, Some(node), config)
    }

    /// Embedded mode over a limiter alone (one process, no cluster).
    pub fn from_limiter(limiter: Arc<Limiter>, config: ClientConfig) -> Self {
        Client::new_embedded(Decider::local(limiter), None, config)
    }

    /// Embedded mode over any decision path in this process: a node's
    /// (`NodeHandle::decider` of a node the application runs and stops
    /// itself), or a limiter's. Decisions are the node's own, confirmed with
    /// its peers near a limit.
    pub fn from_decider(decider: Decider, config: ClientConfig) -> Self {
        Client::new_embedded(decider, None, config)
    }

    fn new_embedded(decider: Decider, node: Option<EmbeddedNode>, config: ClientConfig) -> Self {
        Client {
            inner: Arc::new(Inner {
                config,
                clock: MonoClock(Instant::now()),
                metrics: ClientMetrics::default(),
                backend: Backend::Embedded(Box::new(Embedded {
                    decider,
                    node: tokio::sync::Mutex::new(node),
                })),
            }),
        }
    }
}

impl<T: Transport> Client<T> {
    /// A remote client over `transport` to `nodes`. Must be called within a
    /// tokio runtime (it starts the client's tasks).
    pub fn with_nodes(
        nodes: Vec<SocketAddr>,
        config: ClientConfig,
        transport: T,
    ) -> Result<Self, ClientError> {
        Client::start_remote(nodes, Vec::new(), config, transport)
    }

    fn start_remote(
        nodes: Vec<SocketAddr>,
        names: Vec<String>,
        config: ClientConfig,
        transport: T,
    ) -> Result<Self, ClientError> {
        if nodes.is_empty() {
            return Err(ClientError::NoNodes);
        }
        validate(&config)?;
        let transport = Arc::new(transport);
        let metrics = ClientMetrics::default();
        let remote_nodes: Vec<_> = nodes
            .iter()
            .map(|addr| spawn_node(&transport, *addr, config.max_batch, &metrics))
            .collect();
        let inner = Arc::new(Inner {
            backend: Backend::Remote(Remote {
                transport,
                nodes: RwLock::new(remote_nodes),
                names,
                table: Mutex::new(NodeTable::new(nodes.len(), config.routing, config.breaker)),
                leases: Mutex::new(LeaseBook::new(config.lease)),
                background: Mutex::new(None),
            }),
            clock: MonoClock(Instant::now()),
            metrics,
            config,
        });
        let task = tokio::spawn(run_background(Arc::downgrade(&inner)));
        if let Backend::Remote(r) = &inner.backend {
            *lock(&r.background) = Some(task);
        }
        Ok(Client { inner })
    }

    /// Decides one request described by `fields`, costing `cost`. Goes to
    /// the nearest healthy node, fails over to the next within the call's
    /// deadline, and falls back to the degraded mode when none answers.
    /// An error means the request is invalid; nothing was counted.
    pub async fn check(&self, fields: &[(&str, &str)], cost: u32) -> Result<Decision, ClientError> {
        let owned: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        self.check_owned(owned, cost).await
    }

    /// [`Client::check`] with owned fields.
    pub async fn check_owned(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> Result<Decision, ClientError> {
        let inner = &*self.inner;
        match &inner.backend {
            Backend::Remote(r) => {
                // The node's own checks of the descriptors, before anything
                // is sent or noted: bad input is an error even while cut
                // off, and changes nothing.
                let pairs: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                Descriptors::new(&pairs).map_err(|e| ClientError::Refused(e.to_string()))?;
                r.check(inner, fields.into(), cost).await
            }
            Backend::Embedded(e) => e.check(inner, &fields, cost).await,
        }
    }

    /// The client's metrics.
    pub fn metrics(&self) -> &ClientMetrics {
        &self.inner.metrics
    }

    /// The node addresses, in the order given (remote mode).
    pub fn nodes(&self) -> Vec<SocketAddr> {
        match &self.inner.backend {
            Backend::Remote(r) => r.node_list().iter().map(|n| n.addr).collect(),
            Backend::Embedded(_) => Vec::new(),
        }
    }

    /// Adds a node at run time (from the application's own discovery); the
    /// client measures and uses it like the others. False if it is one
    /// already, or the client is embedded.
    pub fn add_node(&self, addr: SocketAddr) -> bool {
        match &self.inner.backend {
            Backend::Remote(r) => r.add(&self.inner, addr),
            Backend::Embedded(_) => false,
        }
    }

    /// The state of each node's breaker and its latency EWMA (remote mode).
    pub fn node_states(&self) -> Vec<NodeView> {
        let now = self.inner.clock.now();
        match &self.inner.backend {
            Backend::Remote(r) => {
                let nodes = r.node_list();
                let table = lock(&r.table);
                nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| NodeView {
                        addr: n.addr,
                        breaker: table
                            .breaker_state(now, i)
                            .unwrap_or(crate::breaker::BreakerState::Closed),
                        latency: table.latency(i).map(Duration::from),
                        opened: table.transitions(i).0,
                        closed: table.transitions(i).1,
                    })
                    .collect()
            }
            Backend::Embedded(_) => Vec::new(),
        }
    }

    /// The live lease of a descriptor set: (left, granted).
    pub fn lease_of(&self, fields: &[(&str, &str)]) -> Option<(u64, u64)> {
        let Backend::Remote(r) = &self.inner.backend else {
            return None;
        };
        let owned: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        lock(&r.leases).lease(self.inner.clock.now(), &LeaseKey::new(&owned))
    }

    /// The limiter of an embedded client.
    pub fn embedded_limiter(&self) -> Option<Arc<Limiter>> {
        match &self.inner.backend {
            Backend::Embedded(e) => Some(e.decider.limiter().clone()),
            Backend::Remote(_) => None,
        }
    }

    /// Stops the client's background task; an embedded node is stopped
    /// cleanly (final delta, leave, snapshot). Later checks of a remote
    /// client still go to the nodes (without probes or lease renewals);
    /// those of an embedded client are decided by the degraded mode, since
    /// its limiter is no longer part of the cluster.
    pub async fn shutdown(&self) {
        match &self.inner.backend {
            Backend::Remote(r) => {
                if let Some(task) = lock(&r.background).take() {
                    task.abort();
                }
            }
            Backend::Embedded(e) => e.shutdown().await,
        }
    }
}

/// One node as the client sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub addr: SocketAddr,
    pub breaker: crate::breaker::BreakerState,
    pub latency: Option<Duration>,
    pub opened: u64,
    pub closed: u64,
}

fn validate(c: &ClientConfig) -> Result<(), ClientError> {
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

pub(crate) fn degraded_decision<T: Transport>(
    inner: &Inner<T>,
    how: Degraded,
    allowed: bool,
) -> Decision {
    inner
        .metrics
        .degraded
        .get_or_create(&DegradedLabels {
            mode: how.as_str().to_owned(),
            allowed: allowed.to_string(),
        })
        .inc();
    Decision {
        outcome: if allowed {
            Outcome::Allowed
        } else {
            Outcome::Denied
        },
        quota: None,
        source: Source::Degraded(how),
    }
}
