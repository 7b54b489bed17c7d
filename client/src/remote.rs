//! The remote client's driver: attempts with failover, the per-node
//! batchers, and the background task (probes, half-open trials, lease
//! renewals, gauges).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use drl_core::limiter::Outcome;
use drl_core::time::{Clock, Nanos};
use tokio::sync::{mpsc, oneshot};

use crate::breaker::Permit;
use crate::client::{
    degraded_decision, lock, Backend, BatchDecision, ClientError, Decision, Degraded, DegradedMode,
    Fallback, Inner, Receipt, Refunded, RetryPolicy, Source,
};
use crate::lease::{LeaseBook, LeaseKey, QuotaSeen, Spend};
use crate::metrics::{ClientMetrics, NodeLabels};
use crate::routing::NodeTable;
use crate::transport::{CheckAnswer, CheckRequest, RefundAnswer, Transport, TransportError};

pub(crate) struct Remote<T: Transport> {
    pub(crate) transport: Arc<T>,
    /// Only ever appended to, under this lock together with `table`, so an
    /// index means the same node in both. Never held with `table` locked.
    pub(crate) nodes: RwLock<Vec<Arc<RemoteNode>>>,
    /// What the node list was given as, resolved again every `dns_refresh`.
    pub(crate) names: Vec<String>,
    pub(crate) table: Mutex<NodeTable>,
    pub(crate) leases: Mutex<LeaseBook>,
    pub(crate) background: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub(crate) struct RemoteNode {
    pub(crate) addr: SocketAddr,
    pub(crate) label: String,
    pub(crate) queue: mpsc::Sender<Pending>,
}

pub(crate) struct Pending {
    pub(crate) request: CheckRequest,
    pub(crate) timeout: Duration,
    pub(crate) reply: oneshot::Sender<Result<CheckAnswer, TransportError>>,
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

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// A node's batcher task and its queue.
pub(crate) fn spawn_node<T: Transport>(
    transport: &Arc<T>,
    addr: SocketAddr,
    max_batch: usize,
    metrics: &ClientMetrics,
) -> Arc<RemoteNode> {
    let (queue, rx) = mpsc::channel(4096);
    tokio::spawn(run_batcher(
        transport.clone(),
        addr,
        rx,
        max_batch,
        metrics.clone(),
    ));
    metrics
        .breaker_state
        .get_or_create(&NodeLabels {
            node: addr.to_string(),
        })
        .set(0);
    Arc::new(RemoteNode {
        addr,
        label: addr.to_string(),
        queue,
    })
}

impl<T: Transport> Remote<T> {
    pub(crate) fn node(&self, i: usize) -> Option<Arc<RemoteNode>> {
        read(&self.nodes).get(i).cloned()
    }

    pub(crate) fn node_list(&self) -> Vec<Arc<RemoteNode>> {
        read(&self.nodes).clone()
    }

    /// Adds `addr` as a node unless it is one already; true if added.
    pub(crate) fn add(&self, inner: &Inner<T>, addr: SocketAddr) -> bool {
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        if nodes.iter().any(|n| n.addr == addr) {
            return false;
        }
        nodes.push(spawn_node(
            &self.transport,
            addr,
            inner.config.max_batch,
            &inner.metrics,
        ));
        lock(&self.table).add_node();
        true
    }

    /// Sends one check through node `i`'s batcher.
    async fn attempt(
        &self,
        i: usize,
        request: CheckRequest,
        timeout: Duration,
    ) -> Result<CheckAnswer, TransportError> {
        let Some(node) = self.node(i) else {
            return Err(TransportError::Malformed(
                SocketAddr::from(([0, 0, 0, 0], 0)),
                format!("no node {i}"),
            ));
        };
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

    fn record(&self, inner: &Inner<T>, i: usize, label: &str, before: (u64, u64)) {
        let now = inner.clock.now();
        let label = NodeLabels {
            node: label.to_owned(),
        };
        let table = lock(&self.table);
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

    /// Tries the nodes in routing order until one answers, the deadline
    /// passes, or an attempt fails in a way that may have counted the
    /// request and the retry policy forbids sending it again. `attempt`
    /// makes one attempt on node `i` within a timeout; `label` names an
    /// answer in the `calls` metric.
    async fn route<R, F, Fut>(
        &self,
        inner: &Inner<T>,
        mut attempt: F,
        label: impl Fn(&R) -> &'static str,
    ) -> Routed<R>
    where
        F: FnMut(usize, Duration) -> Fut,
        Fut: Future<Output = Result<R, TransportError>>,
    {
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
            let result = attempt(i, inner.config.attempt_timeout.min(left)).await;
            guard.armed = false;
            let elapsed = Nanos::from(started.elapsed());
            let now = inner.clock.now();
            let Some(node) = self.node(i) else {
                continue;
            };
            let node_label = &node.label;
            match result {
                Ok(answer) => {
                    lock(&self.table).handle_success(now, i, elapsed);
                    inner.metrics.call(node_label, label(&answer));
                    self.record(inner, i, node_label, before);
                    return Routed::Answered(i, answer);
                }
                Err(e) => {
                    lock(&self.table).handle_failure(now, i, elapsed);
                    inner.metrics.call(node_label, e.kind());
                    self.record(inner, i, node_label, before);
                    tracing::debug!(node = %node.addr, error = %e, "attempt failed");
                    if !e.counted_nothing() && inner.config.retry == RetryPolicy::Safe {
                        return Routed::Indeterminate(node.addr, e);
                    }
                    failed = true;
                }
            }
        }
        Routed::Unreachable
    }

    /// One check through the nodes' batchers.
    pub(crate) async fn call(
        &self,
        inner: &Inner<T>,
        request: &CheckRequest,
    ) -> Routed<CheckAnswer> {
        self.route(
            inner,
            |i, timeout| self.attempt(i, request.clone(), timeout),
            answer_label,
        )
        .await
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.node(i)
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |n| n.addr)
    }

    fn decision(
        &self,
        i: usize,
        outcome: Outcome,
        quota: Option<crate::transport::Quota>,
        receipt: Option<Arc<str>>,
    ) -> Decision {
        let addr = self.addr(i);
        Decision {
            outcome,
            quota,
            source: Source::Node(addr),
            receipt: receipt.map(|r| Receipt::new(r, Some(addr))),
        }
    }

    pub(crate) async fn check(
        &self,
        inner: &Inner<T>,
        request: CheckRequest,
    ) -> Result<Decision, ClientError> {
        let local = matches!(inner.config.degraded, DegradedMode::Local { .. });
        // Leases are for the rules' limits; a request-defined limit has none.
        let key = (local && request.limit.is_none()).then(|| LeaseKey::new(&request.fields));
        if let Some(key) = &key {
            lock(&self.leases).note_call(inner.clock.now(), key, &request.fields);
        }
        let cost = request.cost;
        match self.call(inner, &request).await {
            Routed::Answered(
                i,
                CheckAnswer::Decided {
                    outcome,
                    quota,
                    receipt,
                },
            ) => {
                if let Some(key) = &key {
                    lock(&self.leases).handle_answer(inner.clock.now(), key, quota_seen(&quota));
                }
                Ok(self.decision(i, outcome, quota, receipt))
            }
            Routed::Answered(_, CheckAnswer::Refused(message)) => {
                Err(ClientError::Refused(message))
            }
            Routed::Indeterminate(node, e) => Err(ClientError::Indeterminate {
                node,
                reason: e.to_string(),
            }),
            Routed::Unreachable => Ok(self.degraded(inner, key.as_ref(), cost)),
        }
    }

    /// An atomic batch on one node (no coalescing: it is one request).
    pub(crate) async fn check_batch(
        &self,
        inner: &Inner<T>,
        requests: Vec<CheckRequest>,
    ) -> Result<BatchDecision, ClientError> {
        let routed = self
            .route(
                inner,
                |i, timeout| {
                    let addr = self.addr(i);
                    let batch = requests.clone();
                    async move { self.transport.check_atomic(addr, batch, timeout).await }
                },
                |answers: &Vec<CheckAnswer>| answers.first().map_or("allowed", answer_label),
            )
            .await;
        match routed {
            Routed::Answered(i, answers) => {
                let mut decisions = Vec::with_capacity(answers.len());
                for a in answers {
                    match a {
                        CheckAnswer::Decided {
                            outcome,
                            quota,
                            receipt,
                        } => decisions.push(self.decision(i, outcome, quota, receipt)),
                        CheckAnswer::Refused(message) => return Err(ClientError::Refused(message)),
                    }
                }
                Ok(BatchDecision { decisions })
            }
            Routed::Indeterminate(node, e) => Err(ClientError::Indeterminate {
                node,
                reason: e.to_string(),
            }),
            Routed::Unreachable => Ok(self.degraded_batch(inner, &requests)),
        }
    }

    /// The degraded decision of a whole batch.
    fn degraded_batch(&self, inner: &Inner<T>, requests: &[CheckRequest]) -> BatchDecision {
        let (how, allowed) = match inner.config.degraded {
            DegradedMode::FailOpen => (Degraded::FailOpen, true),
            DegradedMode::FailClosed => (Degraded::FailClosed, false),
            DegradedMode::Local { otherwise } => {
                let keys: Vec<(LeaseKey, u32)> = requests
                    .iter()
                    .map(|r| (LeaseKey::new(&r.fields), r.cost))
                    .collect();
                match lock(&self.leases).try_spend_all(inner.clock.now(), &keys) {
                    Spend::Admitted { .. } => (Degraded::Lease, true),
                    Spend::Exhausted => (Degraded::Lease, false),
                    Spend::NoLease => match otherwise {
                        Fallback::Allow => (Degraded::FailOpen, true),
                        Fallback::Deny => (Degraded::FailClosed, false),
                    },
                }
            }
        };
        BatchDecision {
            decisions: requests
                .iter()
                .map(|_| degraded_decision(inner, how, allowed))
                .collect(),
        }
    }

    /// A refund: to the issuing node first, then to each other node.
    pub(crate) async fn refund(
        &self,
        inner: &Inner<T>,
        receipt: &Receipt,
    ) -> Result<Refunded, ClientError> {
        let deadline = Instant::now() + inner.config.call_timeout;
        let nodes = self.node_list();
        let mut order: Vec<usize> = lock(&self.table).route(inner.clock.now());
        for i in 0..nodes.len() {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        if let Some(issuer) = receipt
            .node()
            .and_then(|a| nodes.iter().position(|n| n.addr == a))
        {
            order.retain(|&i| i != issuer);
            order.insert(0, issuer);
        }
        let mut last = String::from("no node to send it to");
        for i in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let addr = nodes[i].addr;
            let timeout = inner.config.attempt_timeout.min(left);
            match self.transport.refund(addr, receipt.token(), timeout).await {
                Ok(RefundAnswer::Refunded {
                    refunded,
                    requested,
                }) => {
                    inner.metrics.refund("refunded");
                    return Ok(Refunded {
                        refunded,
                        requested,
                    });
                }
                Ok(RefundAnswer::OtherNode(m)) => last = m,
                Ok(RefundAnswer::Refused(why, m)) => {
                    inner.metrics.refund("refused");
                    return Err(ClientError::Refund(why, m));
                }
                Err(TransportError::Unsupported(what)) => {
                    return Err(ClientError::Unsupported(what.to_owned()))
                }
                // A receipt is spent at most once, and only by its issuer:
                // trying another node (or the same again) is always safe.
                Err(e) => last = e.to_string(),
            }
        }
        inner.metrics.refund("undelivered");
        Err(ClientError::Unavailable(format!(
            "no node refunded the receipt: {last}"
        )))
    }

    /// Refunds the leases that were never touched: of sets gone cold, or
    /// every one when the client stops (`all`).
    pub(crate) async fn return_leases(&self, inner: &Inner<T>, all: bool) {
        let returns = lock(&self.leases).poll_returns(inner.clock.now(), all);
        for (key, receipt) in returns {
            let result = self.refund(inner, &receipt).await;
            let ok = result.is_ok();
            lock(&self.leases).handle_returned(&key, ok);
            inner
                .metrics
                .leases_of_inc(if ok { "returned" } else { "return_failed" });
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

/// Where a routed call ended.
pub(crate) enum Routed<R> {
    /// Node `i` answered.
    Answered(usize, R),
    /// No node answered, and none can have counted the request.
    Unreachable,
    /// A node may have counted it, and the retry policy stopped the call.
    Indeterminate(SocketAddr, TransportError),
}

fn answer_label(a: &CheckAnswer) -> &'static str {
    match a {
        CheckAnswer::Decided { outcome, .. } => outcome_str(*outcome),
        CheckAnswer::Refused(_) => "refused",
    }
}

fn quota_seen(quota: &Option<crate::transport::Quota>) -> Option<QuotaSeen> {
    quota.as_ref().map(|q| QuotaSeen {
        limit: q.limit,
        window: Nanos::from(q.window),
        remaining: q.remaining,
    })
}

mod tasks;
pub(crate) use tasks::{run_background, run_batcher};
