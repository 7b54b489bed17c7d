//! What `drl load` measured and how it is shown: the [`LoadReport`] of a
//! run, with the reasons of its errors, the progress line printed while it
//! runs, and the final report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::latency::LatencyHistogram;
use super::load::LoadArgs;

/// Most distinct error reasons a report keeps (each with its count).
const MAX_ERROR_REASONS: usize = 8;

/// What one run measured.
#[derive(Clone, Default)]
pub struct LoadReport {
    /// From the start of the load (connections already open) until every
    /// connection stopped.
    pub elapsed: Duration,
    /// Answers 200: the request was allowed.
    pub allowed: u64,
    /// Answers 429: the request was denied.
    pub denied: u64,
    /// Answers that said the node was overloaded and counted nothing (HTTP
    /// 503 with `Retry-After`, RESP `-TRYAGAIN`): shed, not errors.
    pub shed: u64,
    /// Answers other than 200, 429 and a shed, and failed exchanges.
    pub errors: u64,
    /// Why: up to eight distinct reasons (`"400: unknown
    /// endpoint ..."`, `"timeout"`, `"connection: ..."`) with their counts.
    pub error_reasons: Vec<(String, u64)>,
    /// Latency of every decision (allowed or denied), in nanoseconds,
    /// measured from when the request was due (see the module docs).
    pub latency: LatencyHistogram,
    /// Latency of the shed answers, measured the same way.
    pub shed_latency: LatencyHistogram,
}

impl LoadReport {
    /// Requests that got a decision, allowed or denied; errors excluded.
    pub fn decisions(&self) -> u64 {
        self.allowed + self.denied
    }
    /// Decisions per second of [`elapsed`](Self::elapsed).
    pub fn per_second(&self) -> f64 {
        self.decisions() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub(super) fn merge(&mut self, other: &LoadReport) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.shed += other.shed;
        self.errors += other.errors;
        for (reason, n) in &other.error_reasons {
            self.note_error_reason(reason, *n);
        }
        self.latency.merge(&other.latency);
        self.shed_latency.merge(&other.shed_latency);
    }

    /// Counts one error with its reason.
    pub(super) fn error(&mut self, reason: &str) {
        self.errors += 1;
        self.note_error_reason(reason, 1);
    }

    fn note_error_reason(&mut self, reason: &str, n: u64) {
        if let Some(r) = self.error_reasons.iter_mut().find(|(r, _)| r == reason) {
            r.1 += n;
        } else if self.error_reasons.len() < MAX_ERROR_REASONS {
            self.error_reasons.push((reason.to_owned(), n));
        }
    }
}

/// The reason of a refusal: its status and the `error` of its JSON body.
pub(super) fn refusal_reason(status: u16, body: Option<&[u8]>) -> String {
    let said = body
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| v["error"].as_str().map(str::to_owned));
    match said {
        Some(e) => format!("{status}: {e}"),
        None => format!("{status}"),
    }
}

/// Counts of the run so far, shared with the progress printer.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) allowed: AtomicU64,
    pub(super) denied: AtomicU64,
    pub(super) shed: AtomicU64,
    pub(super) errors: AtomicU64,
}

impl Progress {
    /// Prints one line to stderr every `every` until `stop` is set.
    pub(super) async fn print_every(
        self: Arc<Self>,
        every: Duration,
        start: Instant,
        stop: Arc<AtomicBool>,
    ) {
        let mut next = start + every;
        loop {
            tokio::time::sleep_until(next.into()).await;
            if stop.load(Ordering::Relaxed) {
                return;
            }
            next += every;
            let (a, d, s, e) = (
                self.allowed.load(Ordering::Relaxed),
                self.denied.load(Ordering::Relaxed),
                self.shed.load(Ordering::Relaxed),
                self.errors.load(Ordering::Relaxed),
            );
            errln!(
                "[{:>5.1}s] decisions: {}  allowed: {a}  denied: {d}  shed: {s}  errors: {e}",
                start.elapsed().as_secs_f64(),
                a + d
            );
        }
    }
}

pub(super) fn print_report(args: &LoadArgs, r: &LoadReport) {
    let us = |q: f64| r.latency.quantile(q) as f64 / 1000.0;
    outln!(
        "{} connections to {} node(s) for {:.1}s{}",
        args.connections,
        args.node.len(),
        r.elapsed.as_secs_f64(),
        args.rate
            .map(|x| format!(" at a target of {x:.0}/s"))
            .unwrap_or_default()
    );
    outln!(
        "decisions: {} ({:.0}/s)  allowed: {}  denied: {}  shed: {}  errors: {}",
        r.decisions(),
        r.per_second(),
        r.allowed,
        r.denied,
        r.shed,
        r.errors
    );
    for (reason, n) in &r.error_reasons {
        outln!("  error ({n}x): {reason}");
    }
    outln!(
        "latency: p50 {:.0}us  p90 {:.0}us  p99 {:.0}us  p99.9 {:.0}us  max {:.0}us",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        r.latency.max() as f64 / 1000.0
    );
    let shed_us = |q: f64| r.shed_latency.quantile(q) as f64 / 1000.0;
    if r.shed > 0 {
        outln!(
            "shed answers: p50 {:.0}us  p99 {:.0}us  max {:.0}us",
            shed_us(0.5),
            shed_us(0.99),
            r.shed_latency.max() as f64 / 1000.0
        );
    }
    // One line for scripts.
    outln!(
        "result: decisions_per_sec={:.0} allowed={} denied={} errors={} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} shed={} shed_p99_ms={:.3}",
        r.per_second(),
        r.allowed,
        r.denied,
        r.errors,
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        r.shed,
        shed_us(0.99) / 1000.0
    );
}
