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

/// Coalesces the checks waiting for one node into batches.
pub(crate) async fn run_batcher<T: Transport>(
    transport: Arc<T>,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    metrics: ClientMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        // Let callers that are ready on this runtime queue their checks
        // too: one yield, no timer, so a lone check is not delayed.
        tokio::task::yield_now().await;
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
pub(crate) async fn run_background<T: Transport>(inner: Weak<Inner<T>>) {
    let tick = match inner.upgrade() {
        Some(i) => i.config.tick,
        None => return,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The names were resolved when the client was built.
    let mut next_resolve: Option<Instant> = inner
        .upgrade()
        .and_then(|i| i.config.dns_refresh)
        .map(|every| Instant::now() + every);
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
            let nodes = remote.node_list();
            let table = lock(&remote.table);
            for (i, n) in nodes.iter().enumerate() {
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
        if let Some(every) = strong.config.dns_refresh {
            if !remote.names.is_empty() && next_resolve.is_none_or(|t| Instant::now() >= t) {
                next_resolve = Some(Instant::now() + every);
                let weak = inner.clone();
                tokio::spawn(async move { resolve(weak).await });
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
            let weak = inner.clone();
            tokio::spawn(async move {
                if let Some(strong) = weak.upgrade() {
                    if let Backend::Remote(remote) = &strong.backend {
                        remote.return_leases(&strong, false).await;
                    }
                }
            });
        }
    }
}

pub(crate) async fn probe<T: Transport>(inner: Weak<Inner<T>>, i: usize) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let Backend::Remote(remote) = &strong.backend else {
        return;
    };
    let Some(node) = remote.node(i) else {
        return;
    };
    let addr = node.addr;
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
    strong.metrics.probe(&node.label, result.is_ok());
    remote.record(&strong, i, &node.label, before);
}

pub(crate) async fn renew<T: Transport>(inner: Weak<Inner<T>>, r: crate::lease::Renewal) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let Backend::Remote(remote) = &strong.backend else {
        return;
    };
    let request = CheckRequest {
        fields: r.fields.clone(),
        cost: r.cost,
        limit: None,
    };
    let answer = remote.call(&strong, &request).await;
    let now = strong.clock.now();
    let mut leases = lock(&remote.leases);
    match answer {
        Routed::Answered(
            i,
            CheckAnswer::Decided {
                outcome: Outcome::Allowed,
                quota: Some(q),
                receipt,
            },
        ) => {
            // The lease lives as long as the cluster remembers its charge:
            // until the quota is whole again (a fixed window's end), at most
            // one window.
            let life = if q.reset_after.is_zero() {
                q.window
            } else {
                q.reset_after.min(q.window)
            };
            let receipt = receipt.map(|t| Receipt::new(t, Some(remote.addr(i))));
            leases.handle_grant(now, &r.key, true, Nanos::from(life), receipt);
            strong.metrics.leases_of_inc("granted");
        }
        Routed::Answered(..) => {
            leases.handle_grant(now, &r.key, false, Nanos::ZERO, None);
            strong.metrics.leases_of_inc("denied");
        }
        Routed::Unreachable | Routed::Indeterminate(..) => {
            leases.handle_renewal_failed(&r.key);
            strong.metrics.leases_of_inc("failed");
        }
    }
}

/// Resolves the client's names again and adds the addresses that are new.
/// Addresses that vanished stay: their breakers keep them out of the way.
pub(crate) async fn resolve<T: Transport>(inner: Weak<Inner<T>>) {
    let Some(names) = inner.upgrade().and_then(|i| match &i.backend {
        Backend::Remote(r) => Some(r.names.clone()),
        Backend::Embedded(_) => None,
    }) else {
        return;
    };
    for name in names {
        let found = match tokio::net::lookup_host(name.as_str()).await {
            Ok(found) => found.collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(%name, error = %e, "resolution failed");
                continue;
            }
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if let Backend::Remote(remote) = &strong.backend {
            for addr in found {
                if remote.add(&strong, addr) {
                    tracing::info!(%name, %addr, "node added");
                }
            }
        }
    }
}
