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
pub use crate::transport::RefundRefusal;
use crate::transport::{CheckRequest, HttpTransport, LimitSpec, Quota, Transport};
use crate::wire::Wire;

/// What the client decides when no node answers within the call's
/// deadline. The contract of each mode (what the application sees, how much
/// it can over-admit) is in the crate's documentation, "Degraded modes".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DegradedMode {
    /// Admit everything: unbounded over-admission while cut off.
    FailOpen,
    /// Refuse everything (the default): no over-admission, no admission.
    FailClosed,
    /// Admit from the budget leased for the descriptor set while the cluster
    /// answered (see [`crate::lease`]); a set without a lease gets
    /// `otherwise`.
    Local {
        /// The decision for a set without a lease.
        otherwise: Fallback,
    },
}

/// The decision for a descriptor set with no lease in `Local` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Admit (as fail open).
    Allow,
    /// Refuse (as fail closed).
    Deny,
}

/// When a check that got no answer is sent to another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Only when the node certainly counted nothing: no connection, the
    /// connection was gone before the request was written, the node refused
    /// the stream or said it decides nothing now (recovering, draining).
    /// A check whose fate is unknown (sent, then a timeout or a reset) is
    /// not sent again: the call ends with [`ClientError::Indeterminate`].
    /// A check is never counted twice. The default.
    #[default]
    Safe,
    /// Also after a failure whose fate is unknown: a dead node never costs
    /// a decision, but a check it counted before dying is counted again by
    /// the next node (at most once per attempt; the error is on the strict
    /// side: the caller is charged twice, never admitted beyond a limit).
    AtLeastOnce,
}

/// The wire a client built by [`ClientBuilder::build`] speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// The HTTP API (`POST /v1/check`), HTTP/1.1 keep-alive connections;
    /// node addresses are HTTP ports (8400 for `drl cluster`). The default.
    #[default]
    Http,
    /// The native gRPC API (feature `grpc`): one HTTP/2 call per batch;
    /// node addresses are gRPC ports (9400 for `drl cluster`).
    #[cfg(feature = "grpc")]
    Grpc,
}

/// Everything a client can be tuned with. Defaults in brackets.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one `check`, failovers included [500 ms].
    pub call_timeout: Duration,
    /// Deadline of one attempt on one node [150 ms].
    pub attempt_timeout: Duration,
    /// Deadline of a probe [250 ms].
    pub probe_timeout: Duration,
    /// Latency EWMA and probes ([`RoutingConfig`]).
    pub routing: RoutingConfig,
    /// The per-node circuit breaker ([`BreakerConfig`]).
    pub breaker: BreakerConfig,
    /// What decides when no node answers [`DegradedMode::FailClosed`].
    pub degraded: DegradedMode,
    /// Leases of the `Local` degraded mode ([`LeaseConfig`]).
    pub lease: LeaseConfig,
    /// When a check is sent again to another node [`RetryPolicy::Safe`].
    pub retry: RetryPolicy,
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
            retry: RetryPolicy::Safe,
            max_batch: 64,
            tick: Duration::from_millis(50),
            dns_refresh: Some(Duration::from_secs(30)),
        }
    }
}

mod decision;
pub use decision::{
    BatchDecision, Check, ClientError, Decision, Degraded, Receipt, Refunded, Source,
};

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

mod builder;
use builder::validate;
pub use builder::ClientBuilder;

/// A rate-limit client. Cheap to clone; every clone shares the nodes'
/// state, the leases and the metrics.
pub struct Client<T: Transport = Wire> {
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

impl Client {
    /// A builder of a remote client.
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
    /// deadline (see [`RetryPolicy`]), and falls back to the degraded mode
    /// when none answers.
    ///
    /// Errors: [`ClientError::Refused`] when the request is invalid
    /// (nothing counted); [`ClientError::Indeterminate`] when a node got it
    /// and no answer came back (it may have been counted).
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
        self.check_request(Check {
            fields,
            cost,
            limit: None,
        })
        .await
    }

    /// Decides one [`Check`] (with a request-defined limit, if it has one).
    pub async fn check_request(&self, check: Check) -> Result<Decision, ClientError> {
        let inner = &*self.inner;
        match &inner.backend {
            Backend::Remote(r) => r.check(inner, check.request()?).await,
            Backend::Embedded(e) => e.check(inner, check).await,
        }
    }

    /// The simplest call: may `user` call `endpoint` now (cost 1)? Every
    /// failure is decided by the degraded mode: `true` when it admits
    /// (fail open, or a lease), `false` otherwise and for invalid input.
    ///
    /// ```no_run
    /// # async fn demo(client: drl_client::Client) {
    /// if client.allow("alice", "/v1/search").await {
    ///     // serve
    /// }
    /// # }
    /// ```
    pub async fn allow(&self, user: &str, endpoint: &str) -> bool {
        match self
            .check(&[("user", user), ("endpoint", endpoint)], 1)
            .await
        {
            Ok(d) => d.is_allowed(),
            Err(e) => self.on_error(&e),
        }
    }

    /// What the degraded mode says of a call that failed with `e`: an
    /// invalid request is refused; any other failure is admitted only by
    /// fail open (or `Local` with `otherwise: Allow`: there is no lease to
    /// spend for an answer that may already have been counted).
    pub fn on_error(&self, e: &ClientError) -> bool {
        if matches!(e, ClientError::Refused(_)) {
            return false;
        }
        matches!(
            self.inner.config.degraded,
            DegradedMode::FailOpen
                | DegradedMode::Local {
                    otherwise: Fallback::Allow
                }
        )
    }

    /// Decides several checks as one request, atomically: every limit of
    /// every check admits and every check is counted, or none is. The
    /// batch goes to one node (the nearest healthy one), which decides it
    /// at once as one request: one `CheckBatch` call over gRPC, one
    /// `POST /v1/check/batch` over HTTP. At most 1000 checks.
    ///
    /// When no node answers, the degraded mode decides the batch as a
    /// whole: fail open admits it, fail closed refuses it, `Local` admits
    /// it only if every check's lease covers its cost (spending them all),
    /// else `otherwise` for a batch of which no check has a lease, else
    /// refuses it.
    ///
    /// ```no_run
    /// # async fn demo(client: drl_client::Client) -> Result<(), drl_client::ClientError> {
    /// use drl_client::Check;
    ///
    /// let batch = client
    ///     .check_batch(vec![
    ///         Check::new([("user", "alice")]),
    ///         Check::new([("tenant", "acme")]).cost(10),
    ///     ])
    ///     .await?;
    /// if batch.is_allowed() { /* both counted */ }
    /// # Ok(()) }
    /// ```
    pub async fn check_batch(&self, checks: Vec<Check>) -> Result<BatchDecision, ClientError> {
        if checks.is_empty() || checks.len() > 1000 {
            return Err(ClientError::Refused(format!(
                "a batch holds 1 to 1000 checks, not {}",
                checks.len()
            )));
        }
        let inner = &*self.inner;
        match &inner.backend {
            Backend::Remote(r) => {
                let requests = checks
                    .into_iter()
                    .map(Check::request)
                    .collect::<Result<Vec<_>, _>>()?;
                r.check_batch(inner, requests).await
            }
            Backend::Embedded(e) => e.check_batch(checks).await,
        }
    }

    /// Gives back what the check that issued `receipt` charged, once. The
    /// refund goes to the node that issued the receipt (only it can refund
    /// it); if that node cannot be reached, or answers that another node
    /// issued it (HTTP 421), each other node is tried in turn (a receipt
    /// is refunded at most once, wherever it is presented, so this is
    /// safe).
    ///
    /// Errors: [`ClientError::Refund`] when a node refused it for good
    /// (already refunded, expired, not a receipt);
    /// [`ClientError::Unavailable`] when no node could take it.
    pub async fn refund(&self, receipt: &Receipt) -> Result<Refunded, ClientError> {
        let inner = &*self.inner;
        match &inner.backend {
            Backend::Remote(r) => r.refund(inner, receipt).await,
            Backend::Embedded(e) => e.refund(receipt),
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
    /// The order is that of [`Client::nodes`].
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
    ///
    /// A remote client first gives back every lease it has not touched
    /// (refunding its charge), so a stopping process wastes no quota.
    pub async fn shutdown(&self) {
        match &self.inner.backend {
            Backend::Remote(r) => {
                if let Some(task) = lock(&r.background).take() {
                    task.abort();
                }
                r.return_leases(&self.inner, true).await;
            }
            Backend::Embedded(e) => e.shutdown().await,
        }
    }
}

/// One node as the client sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Its address.
    pub addr: SocketAddr,
    /// Its breaker's state now.
    pub breaker: crate::breaker::BreakerState,
    /// Its latency EWMA; `None` before its first answer.
    pub latency: Option<Duration>,
    /// Times its breaker opened.
    pub opened: u64,
    /// Times its breaker closed again.
    pub closed: u64,
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
        receipt: None,
    }
}
