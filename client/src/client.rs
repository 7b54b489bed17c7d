//! The client: one `check` call, whether the cluster is remote or embedded.
//!
//! A remote client is the async driver around three sans-IO pieces:
//! [`NodeTable`] (latency EWMA and a circuit breaker per node),
//! [`LeaseBook`] (leased local budgets) and the degraded-mode policy. One
//! background task per client probes idle nodes, gives open breakers their
//! half-open trial and renews leases; one task per node coalesces the checks
//! waiting for that node into batches for the [`Transport`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use drl::core::descriptor::Descriptors;
use drl::core::time::{Clock, Nanos};
use drl::limiter::{CheckError, Limiter, Outcome};
use drl::node::{Node, NodeError, NodeHandle, NodeSettings};
use tokio::sync::{mpsc, oneshot};

use crate::breaker::{BreakerConfig, Permit};
use crate::lease::{LeaseBook, LeaseConfig, LeaseKey, QuotaSeen, Spend};
use crate::metrics::{ClientMetrics, DegradedLabels, NodeLabels};
use crate::routing::{NodeTable, RoutingConfig};
use crate::transport::{
    CheckAnswer, CheckRequest, HttpTransport, Quota, Transport, TransportError,
};

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
    fn as_str(self) -> &'static str {
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
    #[error("embedded node: {0}")]
    Node(#[from] NodeError),
}

/// Monotonic time since the client was built.
#[derive(Clone, Copy, Debug)]
struct MonoClock(Instant);

impl Clock for MonoClock {
    fn now(&self) -> Nanos {
        Nanos::from(self.0.elapsed())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
    /// is resolved when the client is built, and every address it resolves
    /// to becomes a node (a headless service's DNS name lists every pod).
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
        for a in &self.addrs {
            let host = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
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
        Client::with_nodes(nodes, self.config, transport)
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

struct Inner<T: Transport> {
    config: ClientConfig,
    clock: MonoClock,
    metrics: ClientMetrics,
    backend: Backend<T>,
}

enum Backend<T: Transport> {
    Remote(Remote<T>),
    Embedded(Embedded),
}

struct Remote<T: Transport> {
    transport: Arc<T>,
    nodes: Vec<RemoteNode>,
    table: Mutex<NodeTable>,
    leases: Mutex<LeaseBook>,
    background: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct RemoteNode {
    addr: SocketAddr,
    label: String,
    queue: mpsc::Sender<Pending>,
}

struct Pending {
    request: CheckRequest,
    timeout: Duration,
    reply: oneshot::Sender<Result<CheckAnswer, TransportError>>,
}

struct Embedded {
    limiter: Arc<Limiter>,
    node: tokio::sync::Mutex<Option<NodeHandle>>,
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

    /// Embedded mode: starts a cluster node in this process (the same
    /// [`Node`] that `drl node` runs, joining its peers over QUIC) and
    /// decides on it, with no hop. [`Client::shutdown`] stops it cleanly.
    pub async fn embedded(
        settings: NodeSettings,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let node = Node::start(settings).await?;
        Ok(Client::from_node(node, config))
    }

    /// Embedded mode over a node the application started itself.
    pub fn from_node(node: NodeHandle, config: ClientConfig) -> Self {
        let limiter = node.limiter.clone();
        Client::new_embedded(limiter, Some(node), config)
    }

    /// Embedded mode over a limiter alone (one process, no cluster).
    pub fn from_limiter(limiter: Arc<Limiter>, config: ClientConfig) -> Self {
        Client::new_embedded(limiter, None, config)
    }

    fn new_embedded(limiter: Arc<Limiter>, node: Option<NodeHandle>, config: ClientConfig) -> Self {
        Client {
            inner: Arc::new(Inner {
                config,
                clock: MonoClock(Instant::now()),
                metrics: ClientMetrics::default(),
                backend: Backend::Embedded(Embedded {
                    limiter,
                    node: tokio::sync::Mutex::new(node),
                }),
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
        if nodes.is_empty() {
            return Err(ClientError::NoNodes);
        }
        validate(&config)?;
        let transport = Arc::new(transport);
        let metrics = ClientMetrics::default();
        let mut remote_nodes = Vec::with_capacity(nodes.len());
        for addr in &nodes {
            let (queue, rx) = mpsc::channel(4096);
            tokio::spawn(run_batcher(
                transport.clone(),
                *addr,
                rx,
                config.max_batch,
                metrics.clone(),
            ));
            remote_nodes.push(RemoteNode {
                addr: *addr,
                label: addr.to_string(),
                queue,
            });
            metrics
                .breaker_state
                .get_or_create(&NodeLabels {
                    node: addr.to_string(),
                })
                .set(0);
        }
        let inner = Arc::new(Inner {
            backend: Backend::Remote(Remote {
                transport,
                nodes: remote_nodes,
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
            Backend::Remote(r) => r.check(inner, fields.into(), cost).await,
            Backend::Embedded(e) => e.check(inner, &fields, cost),
        }
    }

    /// The client's metrics.
    pub fn metrics(&self) -> &ClientMetrics {
        &self.inner.metrics
    }

    /// The node addresses, in the order given (remote mode).
    pub fn nodes(&self) -> Vec<SocketAddr> {
        match &self.inner.backend {
            Backend::Remote(r) => r.nodes.iter().map(|n| n.addr).collect(),
            Backend::Embedded(_) => Vec::new(),
        }
    }

    /// The state of each node's breaker and its latency EWMA (remote mode).
    pub fn node_states(&self) -> Vec<NodeView> {
        let now = self.inner.clock.now();
        match &self.inner.backend {
            Backend::Remote(r) => {
                let table = lock(&r.table);
                r.nodes
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
            Backend::Embedded(e) => Some(e.limiter.clone()),
            Backend::Remote(_) => None,
        }
    }

    /// Stops the client's tasks; an embedded node is stopped cleanly (final
    /// delta, leave, snapshot). Later checks of a remote client go to the
    /// degraded mode only if no node answers; an embedded one refuses
    /// through its degraded mode.
    pub async fn shutdown(&self) {
        match &self.inner.backend {
            Backend::Remote(r) => {
                if let Some(task) = lock(&r.background).take() {
                    task.abort();
                }
            }
            Backend::Embedded(e) => {
                if let Some(node) = e.node.lock().await.take() {
                    node.shutdown().await;
                }
            }
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

/// Releases a half-open trial whose attempt was dropped mid-way.
struct TrialGuard<'a> {
    table: &'a Mutex<NodeTable>,
    node: usize,
    armed: bool,
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.table).handle_abandoned(self.node);
        }
    }
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "allowed",
        Outcome::Denied => "denied",
        Outcome::Never => "never",
    }
}

impl<T: Transport> Remote<T> {
    /// Sends one check through node `i`'s batcher.
    async fn attempt(
        &self,
        i: usize,
        request: CheckRequest,
        timeout: Duration,
    ) -> Result<CheckAnswer, TransportError> {
        let node = &self.nodes[i];
        let (reply, answer) = oneshot::channel();
        let send = async {
            node.queue
                .send(Pending {
                    request,
                    timeout,
                    reply,
                })
                .await
                .map_err(|_| TransportError::Malformed(node.addr, "client stopped".into()))?;
            answer
                .await
                .map_err(|_| TransportError::Malformed(node.addr, "answer lost".into()))?
        };
        tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| TransportError::Timeout(node.addr, timeout))?
    }

    fn record(&self, inner: &Inner<T>, i: usize, before: (u64, u64)) {
        let now = inner.clock.now();
        let table = lock(&self.table);
        let label = NodeLabels {
            node: self.nodes[i].label.clone(),
        };
        if let Some(s) = table.breaker_state(now, i) {
            inner
                .metrics
                .breaker_state
                .get_or_create(&label)
                .set(s.gauge());
        }
        if table.transitions(i).0 > before.0 {
            inner.metrics.breaker_opened.get_or_create(&label).inc();
        }
    }

    /// Tries the nodes in routing order until one decides or the deadline
    /// passes. `None`: no node answered.
    async fn call(&self, inner: &Inner<T>, request: &CheckRequest) -> Option<(usize, CheckAnswer)> {
        let deadline = Instant::now() + inner.config.call_timeout;
        let order = lock(&self.table).route(inner.clock.now());
        let mut failed = false;
        for i in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let (permit, before) = {
                let mut table = lock(&self.table);
                let before = table.transitions(i);
                (table.poll_permit(inner.clock.now(), i), before)
            };
            if permit == Permit::Refused {
                continue;
            }
            if failed {
                inner.metrics.failovers.inc();
            }
            let mut guard = TrialGuard {
                table: &self.table,
                node: i,
                armed: permit == Permit::Trial,
            };
            let started = Instant::now();
            let result = self
                .attempt(i, request.clone(), inner.config.attempt_timeout.min(left))
                .await;
            guard.armed = false;
            let elapsed = Nanos::from(started.elapsed());
            let now = inner.clock.now();
            let label = &self.nodes[i].label;
            match result {
                Ok(answer) => {
                    lock(&self.table).handle_success(now, i, elapsed);
                    let result = match &answer {
                        CheckAnswer::Decided { outcome, .. } => outcome_str(*outcome),
                        CheckAnswer::Refused(_) => "refused",
                    };
                    inner.metrics.call(label, result);
                    self.record(inner, i, before);
                    return Some((i, answer));
                }
                Err(e) => {
                    lock(&self.table).handle_failure(now, i, elapsed);
                    inner.metrics.call(label, e.kind());
                    self.record(inner, i, before);
                    tracing::debug!(node = %self.nodes[i].addr, error = %e, "attempt failed");
                    failed = true;
                }
            }
        }
        None
    }

    async fn check(
        &self,
        inner: &Inner<T>,
        fields: Arc<[(String, String)]>,
        cost: u32,
    ) -> Result<Decision, ClientError> {
        let local = matches!(inner.config.degraded, DegradedMode::Local { .. });
        let key = local.then(|| LeaseKey::new(&fields));
        if let Some(key) = &key {
            lock(&self.leases).note_call(inner.clock.now(), key, &fields);
        }
        let request = CheckRequest { fields, cost };
        match self.call(inner, &request).await {
            Some((i, CheckAnswer::Decided { outcome, quota })) => {
                if let Some(key) = &key {
                    let seen = quota.as_ref().map(|q| QuotaSeen {
                        limit: q.limit,
                        window: Nanos::from(q.window),
                        remaining: q.remaining,
                    });
                    lock(&self.leases).handle_answer(inner.clock.now(), key, seen);
                }
                Ok(Decision {
                    outcome,
                    quota,
                    source: Source::Node(self.nodes[i].addr),
                })
            }
            Some((_, CheckAnswer::Refused(message))) => Err(ClientError::Refused(message)),
            None => Ok(self.degraded(inner, key.as_ref(), cost)),
        }
    }

    fn degraded(&self, inner: &Inner<T>, key: Option<&LeaseKey>, cost: u32) -> Decision {
        let (how, allowed) = match inner.config.degraded {
            DegradedMode::FailOpen => (Degraded::FailOpen, true),
            DegradedMode::FailClosed => (Degraded::FailClosed, false),
            DegradedMode::Local { otherwise } => {
                let spend = match key {
                    Some(k) => lock(&self.leases).try_spend(inner.clock.now(), k, cost),
                    None => Spend::NoLease,
                };
                match (spend, otherwise) {
                    (Spend::Admitted { .. }, _) => (Degraded::Lease, true),
                    (Spend::Exhausted, _) => (Degraded::Lease, false),
                    (Spend::NoLease, Fallback::Allow) => (Degraded::FailOpen, true),
                    (Spend::NoLease, Fallback::Deny) => (Degraded::FailClosed, false),
                }
            }
        };
        degraded_decision(inner, how, allowed)
    }
}

fn degraded_decision<T: Transport>(inner: &Inner<T>, how: Degraded, allowed: bool) -> Decision {
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

impl Embedded {
    fn check<T: Transport>(
        &self,
        inner: &Inner<T>,
        fields: &[(String, String)],
        cost: u32,
    ) -> Result<Decision, ClientError> {
        match limiter_decision(&self.limiter, fields, cost) {
            // The node has not recovered its counts yet: nobody can decide.
            Err(ClientError::Unavailable(_)) => {
                let (how, allowed) = match inner.config.degraded {
                    DegradedMode::FailOpen
                    | DegradedMode::Local {
                        otherwise: Fallback::Allow,
                    } => (Degraded::FailOpen, true),
                    DegradedMode::FailClosed
                    | DegradedMode::Local {
                        otherwise: Fallback::Deny,
                    } => (Degraded::FailClosed, false),
                };
                Ok(degraded_decision(inner, how, allowed))
            }
            other => other,
        }
    }
}

/// A decision of an in-process limiter, in the client's terms.
/// `Unavailable` while a clustered limiter recovers its counts.
pub(crate) fn limiter_decision(
    limiter: &Limiter,
    fields: &[(String, String)],
    cost: u32,
) -> Result<Decision, ClientError> {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let d = Descriptors::new(&pairs).map_err(|e| ClientError::Refused(e.to_string()))?;
    match limiter.check(&d, cost) {
        Ok(decision) => {
            let quota = decision.quota.map(|q| {
                let rules = limiter.rules();
                Quota {
                    rule: rules
                        .limits()
                        .get(q.limit_index)
                        .map(|l| l.rule.clone())
                        .unwrap_or_default(),
                    limit: q.limit,
                    window: Duration::from(q.period),
                    remaining: q.remaining,
                    reset_after: Duration::from(q.reset_after),
                    retry_after: (decision.outcome != Outcome::Never)
                        .then(|| Duration::from(q.retry_after)),
                }
            });
            Ok(Decision {
                outcome: decision.outcome,
                quota,
                source: Source::Embedded,
            })
        }
        Err(e @ CheckError::Recovering) => Err(ClientError::Unavailable(e.to_string())),
        Err(e) => Err(ClientError::Refused(e.to_string())),
    }
}

/// Coalesces the checks waiting for one node into batches.
async fn run_batcher<T: Transport>(
    transport: Arc<T>,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    metrics: ClientMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        metrics.batches.inc();
        metrics.batched_checks.inc_by(batch.len() as u64);
        let timeout = batch
            .iter()
            .map(|p| p.timeout)
            .max()
            .unwrap_or(Duration::from_millis(1));
        let transport = transport.clone();
        tokio::spawn(async move {
            let (requests, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.request, p.reply)).unzip();
            let results = transport.check_batch(addr, requests, timeout).await;
            // A reply left without a result reads as a lost answer.
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        });
    }
}

/// Probes, half-open trials, lease renewals and gauges, every `tick`.
async fn run_background<T: Transport>(inner: Weak<Inner<T>>) {
    let tick = match inner.upgrade() {
        Some(i) => i.config.tick,
        None => return,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Backend::Remote(remote) = &strong.backend else {
            return;
        };
        let now = strong.clock.now();
        let due = lock(&remote.table).poll_probe(now);
        for (i, _) in due {
            let weak = inner.clone();
            tokio::spawn(async move { probe(weak, i).await });
        }
        {
            let table = lock(&remote.table);
            for (i, n) in remote.nodes.iter().enumerate() {
                if let Some(s) = table.breaker_state(now, i) {
                    strong
                        .metrics
                        .breaker_state
                        .get_or_create(&NodeLabels {
                            node: n.label.clone(),
                        })
                        .set(s.gauge());
                }
            }
        }
        if matches!(strong.config.degraded, DegradedMode::Local { .. }) {
            let renewals = {
                let mut leases = lock(&remote.leases);
                leases.handle_timeout(now);
                leases.poll_renewals(now)
            };
            for r in renewals {
                let weak = inner.clone();
                tokio::spawn(async move { renew(weak, r).await });
            }
        }
    }
}

async fn probe<T: Transport>(inner: Weak<Inner<T>>, i: usize) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let Backend::Remote(remote) = &strong.backend else {
        return;
    };
    let addr = remote.nodes[i].addr;
    let before = lock(&remote.table).transitions(i);
    let started = Instant::now();
    let result = remote
        .transport
        .probe(addr, strong.config.probe_timeout)
        .await;
    let elapsed = Nanos::from(started.elapsed());
    let now = strong.clock.now();
    {
        let mut table = lock(&remote.table);
        match &result {
            Ok(()) => table.handle_success(now, i, elapsed),
            Err(_) => table.handle_failure(now, i, elapsed),
        }
        table.handle_probe_done(i);
    }
    let label = &remote.nodes[i].label;
    strong.metrics.probe(label, result.is_ok());
    remote.record(&strong, i, before);
}

async fn renew<T: Transport>(inner: Weak<Inner<T>>, r: crate::lease::Renewal) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let Backend::Remote(remote) = &strong.backend else {
        return;
    };
    let request = CheckRequest {
        fields: r.fields.clone(),
        cost: r.cost,
    };
    let answer = remote.call(&strong, &request).await;
    let now = strong.clock.now();
    let mut leases = lock(&remote.leases);
    match answer {
        Some((
            _,
            CheckAnswer::Decided {
                outcome: Outcome::Allowed,
                quota: Some(q),
            },
        )) => {
            // The lease lives as long as the cluster remembers its charge:
            // until the quota is whole again (a fixed window's end), at most
            // one window.
            let life = if q.reset_after.is_zero() {
                q.window
            } else {
                q.reset_after.min(q.window)
            };
            leases.handle_grant(now, &r.key, true, Nanos::from(life));
            strong.metrics.leases_of_inc("granted");
        }
        Some((_, CheckAnswer::Decided { .. })) | Some((_, CheckAnswer::Refused(_))) => {
            leases.handle_grant(now, &r.key, false, Nanos::ZERO);
            strong.metrics.leases_of_inc("denied");
        }
        None => {
            leases.handle_renewal_failed(&r.key);
            strong.metrics.leases_of_inc("failed");
        }
    }
}
