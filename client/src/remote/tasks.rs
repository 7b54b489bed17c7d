//! The client's background tasks: batching, probes, lease renewals and
//! address re-resolution.

use super::*;

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
