//! The remote client's driver: attempts with failover, the per-node
//! batchers, and the background task (probes, half-open trials, lease
//! renewals, gauges).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use drl::core::time::{Clock, Nanos};
use drl::limiter::Outcome;
use tokio::sync::{mpsc, oneshot};

use crate::breaker::Permit;
use crate::client::{
    degraded_decision, lock, Backend, ClientError, Decision, Degraded, DegradedMode, Fallback,
    Inner, Source,
};
use crate::lease::{LeaseBook, LeaseKey, QuotaSeen, Spend};
use crate::metrics::{ClientMetrics, NodeLabels};
use crate::routing::NodeTable;
use crate::transport::{CheckAnswer, CheckRequest, Transport, TransportError};

pub(crate) struct Remote<T: Transport> {
    pub(crate) transport: Arc<T>,
    pub(crate) nodes: Vec<RemoteNode>,
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

    pub(crate) async fn check(
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

pub(crate) async fn probe<T: Transport>(inner: Weak<Inner<T>>, i: usize) {
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
