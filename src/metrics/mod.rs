//! Prometheus metrics of a node, served at `GET /metrics`.
//!
//! Two kinds of numbers meet here. Decisions and their latency are counted on
//! the request path, so they are kept in lock-free atomics ([`DecisionCounters`],
//! [`LatencyHistogram`]) that a check touches with a handful of relaxed
//! increments. Everything else (keys, evictions, gossip, peers, divergence,
//! overshoot, rules) is read from the node's published status at scrape time
//! by `NodeCollector`, so it costs nothing between scrapes.
//!
//! # Estimated overshoot
//!
//! `drl_overshoot_estimate_ratio{policy}` is the fraction of a limit that the
//! cluster may admit beyond it at this moment, from this node's point of view
//! (in-flight deltas, bounded by the in-flight budget, are not included):
//!
//! - `strict`: 0. A node cut off from its peers keeps reserving their shares.
//! - `bounded`: `bounded_fraction` while this node is in the minority (it may
//!   spend that much on its own), else 0.
//! - `available`: `(known − live) / (known + 1)`, where `known` and `live`
//!   count the peers: the share of the limit that the sides this node no
//!   longer hears from may spend without it knowing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

mod node;

use crate::node::NodeApi;
use drl_core::key::LimitId;
use drl_core::limiter::Outcome;
pub use node::overshoot_estimate;
use node::NodeCollector;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which API a decision came through: the `protocol` label of the decision
/// metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The HTTP API.
    Http,
    /// The gRPC API.
    Grpc,
    /// The RESP API.
    Resp,
}

/// How many protocols decide.
const PROTOCOL_COUNT: usize = 3;

const PROTOCOLS: [Protocol; PROTOCOL_COUNT] = [Protocol::Http, Protocol::Grpc, Protocol::Resp];

impl Protocol {
    fn index(self) -> usize {
        match self {
            Protocol::Http => 0,
            Protocol::Grpc => 1,
            Protocol::Resp => 2,
        }
    }

    /// The label's value: `http`, `grpc` or `resp`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Resp => "resp",
        }
    }
}

/// Every metric of one node.
pub struct Metrics {
    registry: Registry,
    decisions: Arc<DecisionCounters>,
    latency: Arc<LatencyHistograms>,
    rejected: Arc<RejectCounters>,
    grpc_rejected: Arc<GrpcRejectCounters>,
    shed: Arc<ShedCounters>,
}

impl Metrics {
    /// Registers every metric of the node behind `api`.
    pub fn new(api: NodeApi) -> Metrics {
        let decisions = Arc::new(DecisionCounters::default());
        let latency = Arc::new(LatencyHistograms::default());
        let rejected = Arc::new(RejectCounters::default());
        let grpc_rejected = Arc::new(GrpcRejectCounters::default());
        let shed = Arc::new(ShedCounters::default());
        let mut registry = Registry::with_prefix("drl");
        registry.register_collector(Box::new(decisions.clone()));
        registry.register_collector(Box::new(latency.clone()));
        registry.register_collector(Box::new(rejected.clone()));
        registry.register_collector(Box::new(grpc_rejected.clone()));
        registry.register_collector(Box::new(shed.clone()));
        registry.register_collector(Box::new(NodeCollector { api }));
        Metrics {
            registry,
            decisions,
            latency,
            rejected,
            grpc_rejected,
            shed,
        }
    }

    /// Counts one HTTP decision of the limit `limit_id` (of rule `rule`), or
    /// of no limit (`None`: no rule matched).
    pub fn count_decision(&self, outcome: Outcome, limit: Option<(LimitId, &str)>) {
        self.decisions.count(Protocol::Http, outcome, limit);
    }

    /// [`Metrics::count_decision`] for a decision made through `protocol`.
    pub fn count_decision_via(
        &self,
        protocol: Protocol,
        outcome: Outcome,
        limit: Option<(LimitId, &str)>,
    ) {
        self.decisions.count(protocol, outcome, limit);
    }

    /// Counts a request the limit `id` of rule `rule`, in shadow mode,
    /// would have denied.
    pub fn count_shadow_via(&self, protocol: Protocol, id: LimitId, rule: &str) {
        self.decisions.count_shadow(protocol, id, rule);
    }

    /// Records how long one `Limiter::check` of an HTTP request took.
    pub fn observe_latency(&self, took: Duration) {
        self.latency.observe(Protocol::Http, took);
    }

    /// [`Metrics::observe_latency`] for a check made through `protocol`.
    pub fn observe_latency_via(&self, protocol: Protocol, took: Duration) {
        self.latency.observe(protocol, took);
    }

    /// Counts a gRPC call refused before any decision, by status code name
    /// (`invalid_argument`, `unavailable`, ...).
    pub fn count_grpc_rejected(&self, code: &str) {
        self.grpc_rejected.count(code);
    }

    /// Counts a request shed by overload admission on `protocol`'s
    /// listener, by reason (`in_flight`, `queue`).
    pub fn count_shed(&self, protocol: Protocol, reason: &str) {
        self.shed.count(protocol, reason);
    }

    /// Counts a request refused before any decision, by HTTP status.
    pub fn count_rejected(&self, status: u16) {
        self.rejected.count(status);
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; a collector error would leave a
        // truncated page, which Prometheus reports as a scrape error.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const RESULTS: [(Outcome, &str); 3] = [
    (Outcome::Allowed, "allowed"),
    (Outcome::Denied, "denied"),
    (Outcome::Never, "never"),
];

fn result_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Allowed => 0,
        Outcome::Denied => 1,
        Outcome::Never => 2,
    }
}

/// Decisions by result and by the rule of the deciding limit. Keyed by limit
/// id on the request path (a sharded map lookup, no allocation after the
/// first decision of a limit); folded by rule name at scrape time.
#[derive(Default)]
pub struct DecisionCounters {
    by_limit: dashmap::DashMap<LimitId, Arc<LimitCounts>>,
    /// By protocol.
    unmatched: [AtomicU64; PROTOCOL_COUNT],
}

struct LimitCounts {
    rule: String,
    /// By protocol, then by result.
    counts: [[AtomicU64; 3]; PROTOCOL_COUNT],
    /// Requests the limit would have denied in shadow mode, by protocol.
    shadow: [AtomicU64; PROTOCOL_COUNT],
}

impl DecisionCounters {
    fn count(&self, protocol: Protocol, outcome: Outcome, limit: Option<(LimitId, &str)>) {
        let Some((id, rule)) = limit else {
            self.unmatched[protocol.index()].fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.of(id, rule).counts[protocol.index()][result_index(outcome)]
            .fetch_add(1, Ordering::Relaxed);
    }

    fn count_shadow(&self, protocol: Protocol, id: LimitId, rule: &str) {
        self.of(id, rule).shadow[protocol.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn of(&self, id: LimitId, rule: &str) -> Arc<LimitCounts> {
        match self.by_limit.get(&id) {
            Some(c) => c.clone(),
            None => self
                .by_limit
                .entry(id)
                .or_insert_with(|| {
                    Arc::new(LimitCounts {
                        rule: rule.to_owned(),
                        counts: Default::default(),
                        shadow: Default::default(),
                    })
                })
                .clone(),
        }
    }

    /// `(rule, protocol) → would-be denials` of limits in shadow mode.
    fn shadow_totals(&self) -> BTreeMap<(String, &'static str), u64> {
        let mut totals = BTreeMap::new();
        for entry in self.by_limit.iter() {
            let c = entry.value();
            for p in PROTOCOLS {
                let n = c.shadow[p.index()].load(Ordering::Relaxed);
                if n > 0 {
                    *totals.entry((c.rule.clone(), p.label())).or_insert(0) += n;
                }
            }
        }
        totals
    }

    /// `(result, rule, protocol) → count`; rule `""` is "no rule matched".
    fn totals(&self) -> BTreeMap<(&'static str, String, &'static str), u64> {
        let mut totals = BTreeMap::new();
        for entry in self.by_limit.iter() {
            let c = entry.value();
            for p in PROTOCOLS {
                for (i, (_, result)) in RESULTS.iter().enumerate() {
                    *totals
                        .entry((*result, c.rule.clone(), p.label()))
                        .or_insert(0) += c.counts[p.index()][i].load(Ordering::Relaxed);
                }
            }
        }
        for p in PROTOCOLS {
            totals.insert(
                ("allowed", String::new(), p.label()),
                self.unmatched[p.index()].load(Ordering::Relaxed),
            );
        }
        totals
    }
}

impl fmt::Debug for DecisionCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionCounters").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for DecisionCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "decisions",
            "Rate-limit decisions by result, by the rule of the deciding limit (rule=\"\" when no rule matched) and by API (protocol=\"http\", \"grpc\" or \"resp\").",
            None,
            MetricType::Counter,
        )?;
        for ((result, rule, protocol), n) in self.totals() {
            let labels = [
                ("result", result),
                ("rule", rule.as_str()),
                ("protocol", protocol),
            ];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "shadow_denials",
            "Requests a rule in shadow mode would have denied (it counted them and let them pass), by rule and API.",
            None,
            MetricType::Counter,
        )?;
        for ((rule, protocol), n) in self.shadow_totals() {
            let labels = [("rule", rule.as_str()), ("protocol", protocol)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: a local decision
/// takes well under a microsecond, so the scale starts at 250 ns.
const LATENCY_BOUNDS_NS: [u64; 16] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
    1_000_000, 4_000_000, 16_000_000, 64_000_000,
];

/// A fixed-bucket histogram of decision latency, updated with relaxed atomic
/// increments (no lock on the request path).
#[derive(Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// One [`LatencyHistogram`] per protocol.
#[derive(Default)]
pub struct LatencyHistograms {
    by_protocol: [LatencyHistogram; PROTOCOL_COUNT],
}

impl LatencyHistograms {
    fn observe(&self, protocol: Protocol, took: Duration) {
        self.by_protocol[protocol.index()].observe(took);
    }
}

impl fmt::Debug for LatencyHistograms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistograms").finish_non_exhaustive()
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram").finish_non_exhaustive()
    }
}

impl LatencyHistogram {
    /// `(sum in seconds, count, per-bucket counts)`.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        // The encoder wants each bucket's own count; it accumulates them.
        let mut count = 0u64;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let bound = LATENCY_BOUNDS_NS
                .get(i)
                .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
            buckets.push((bound, n));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl prometheus_client::collector::Collector for LatencyHistograms {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "decision_duration_seconds",
            "Time spent in Limiter::check per request, measured in the HTTP or gRPC handler.",
            None,
            MetricType::Histogram,
        )?;
        for p in PROTOCOLS {
            let (sum, count, buckets) = self.by_protocol[p.index()].snapshot();
            let labels = [("protocol", p.label())];
            family
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
        Ok(())
    }
}

/// Requests refused before any decision (bad input, recovering, ...).
#[derive(Default)]
pub struct RejectCounters {
    /// Index by status: 400, 401, 403, 404, 405, 413, 503, other.
    counts: [AtomicU64; 8],
}

const REJECT_CODES: [u16; 7] = [400, 401, 403, 404, 405, 413, 503];

impl RejectCounters {
    fn count(&self, status: u16) {
        let i = REJECT_CODES
            .iter()
            .position(|&c| c == status)
            .unwrap_or(REJECT_CODES.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for RejectCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectCounters").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for RejectCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "http_rejected",
            "HTTP requests answered with an error before any decision, by status code.",
            None,
            MetricType::Counter,
        )?;
        for (i, c) in self.counts.iter().enumerate() {
            let code = REJECT_CODES
                .get(i)
                .map_or_else(|| "other".to_owned(), |c| c.to_string());
            let labels = [("code", code.as_str())];
            ConstCounter::new(c.load(Ordering::Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// gRPC status codes a node answers a refused call with, as label values.
const GRPC_REJECT_CODES: [&str; 4] = [
    "invalid_argument",
    "unavailable",
    "resource_exhausted",
    "unimplemented",
];

/// gRPC calls refused before any decision, by status code.
#[derive(Default)]
pub struct GrpcRejectCounters {
    /// Index by [`GRPC_REJECT_CODES`], then "other".
    counts: [AtomicU64; 5],
}

impl GrpcRejectCounters {
    fn count(&self, code: &str) {
        let i = GRPC_REJECT_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(GRPC_REJECT_CODES.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for GrpcRejectCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcRejectCounters").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for GrpcRejectCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "grpc_rejected",
            "gRPC calls (or checks of a batch) answered with an error before any decision, by status code.",
            None,
            MetricType::Counter,
        )?;
        for (i, c) in self.counts.iter().enumerate() {
            let code = GRPC_REJECT_CODES.get(i).copied().unwrap_or("other");
            let labels = [("code", code)];
            ConstCounter::new(c.load(Ordering::Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The `reason` labels of `drl_shed_total`.
const SHED_REASONS: [&str; 2] = ["in_flight", "queue"];

/// Requests shed by overload admission, by protocol and reason.
#[derive(Default)]
pub struct ShedCounters {
    counts: [[AtomicU64; SHED_REASONS.len()]; PROTOCOL_COUNT],
}

impl ShedCounters {
    fn count(&self, protocol: Protocol, reason: &str) {
        let r = SHED_REASONS
            .iter()
            .position(|&c| c == reason)
            .unwrap_or(SHED_REASONS.len() - 1);
        self.counts[protocol.index()][r].fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for ShedCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedCounters").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for ShedCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "shed",
            "Requests (RESP: commands) answered at once without a decision because the listener was overloaded (HTTP 503, gRPC UNAVAILABLE, RESP TRYAGAIN), by protocol and reason: in_flight (max_in_flight reached) or queue (waited longer than queue_deadline).",
            None,
            MetricType::Counter,
        )?;
        for p in PROTOCOLS {
            for (i, reason) in SHED_REASONS.iter().enumerate() {
                let labels = [("protocol", p.label()), ("reason", reason)];
                ConstCounter::new(self.counts[p.index()][i].load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drl_core::share::SharePolicy;

    #[test]
    fn overshoot_follows_the_policy() {
        assert_eq!(overshoot_estimate(SharePolicy::Strict, true, 2, 0), 0.0);
        let bounded = SharePolicy::Bounded {
            fraction_ppm: 50_000,
        };
        assert_eq!(overshoot_estimate(bounded, false, 2, 0), 0.0);
        assert!((overshoot_estimate(bounded, true, 2, 0) - 0.05).abs() < 1e-12);
        assert_eq!(overshoot_estimate(SharePolicy::Available, false, 2, 2), 0.0);
        assert!(
            (overshoot_estimate(SharePolicy::Available, false, 2, 0) - 2.0 / 3.0).abs() < 1e-12
        );
    }

    #[test]
    fn latency_buckets_are_upper_bounds() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_nanos(250));
        h.observe(Duration::from_nanos(251));
        h.observe(Duration::from_secs(1));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(
            h.buckets[LATENCY_BOUNDS_NS.len()].load(Ordering::Relaxed),
            1
        );
    }
}
