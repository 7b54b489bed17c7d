//! What the client counts, for the application to export.
//!
//! The families live in a `prometheus-client` registry that the application
//! adds to its own with [`ClientMetrics::register`] (they then appear under
//! its `/metrics`), and can be read directly for tests and logs.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `drl_client_calls_total` | counter | `node`, `result` (allowed, denied, never, refused, timeout, connect_error, unavailable, malformed) |
//! | `drl_client_failovers_total` | counter | |
//! | `drl_client_breaker_state` | gauge | `node` (0 closed, 1 half-open, 2 open) |
//! | `drl_client_breaker_opened_total` | counter | `node` |
//! | `drl_client_degraded_decisions_total` | counter | `mode` (fail_open, fail_closed, lease), `allowed` |
//! | `drl_client_leases_total` | counter | `result` (granted, denied, failed, returned, return_failed) |
//! | `drl_client_refunds_total` | counter | `result` (refunded, refused, undelivered) |
//! | `drl_client_probes_total` | counter | `node`, `result` (ok, failed) |
//! | `drl_client_batches_total`, `drl_client_batched_checks_total` | counter | |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a per-node result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The node's address.
    pub node: String,
    /// What happened.
    pub result: String,
}

/// Labels of a per-node value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node's address.
    pub node: String,
}

/// Labels of a degraded decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    /// `fail_open`, `fail_closed` or `lease`.
    pub mode: String,
    /// `true` or `false`.
    pub allowed: String,
}

/// Labels of a result alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What happened.
    pub result: String,
}

/// The client's counters (table in the module's documentation). Cheap to
/// clone (shared).
#[derive(Clone, Debug, Default)]
pub struct ClientMetrics {
    /// `drl_client_calls_total`.
    pub calls: Family<CallLabels, Counter>,
    /// `drl_client_failovers_total`.
    pub failovers: Counter,
    /// `drl_client_breaker_state`.
    pub breaker_state: Family<NodeLabels, Gauge>,
    /// `drl_client_breaker_opened_total`.
    pub breaker_opened: Family<NodeLabels, Counter>,
    /// `drl_client_degraded_decisions_total`.
    pub degraded: Family<DegradedLabels, Counter>,
    /// `drl_client_leases_total`.
    pub leases: Family<ResultLabels, Counter>,
    /// `drl_client_refunds_total`.
    pub refunds: Family<ResultLabels, Counter>,
    /// `drl_client_batches_total`.
    pub batches: Counter,
    /// `drl_client_batched_checks_total`.
    pub batched_checks: Counter,
    /// `drl_client_probes_total`.
    pub probes: Family<CallLabels, Counter>,
}

impl ClientMetrics {
    /// Adds every family to `registry` under the `drl_client` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("drl_client");
        r.register(
            "calls",
            "Attempts on a node, by node and result",
            self.calls.clone(),
        );
        r.register(
            "failovers",
            "Calls moved to another node after a failure",
            self.failovers.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker per node: 0 closed, 1 half-open, 2 open",
            self.breaker_state.clone(),
        );
        r.register(
            "breaker_opened",
            "Times a node's breaker opened",
            self.breaker_opened.clone(),
        );
        r.register(
            "degraded_decisions",
            "Decisions made without any node, by mode and result",
            self.degraded.clone(),
        );
        r.register("leases", "Lease checks, by result", self.leases.clone());
        r.register("refunds", "Refunds, by result", self.refunds.clone());
        r.register(
            "probes",
            "Probes of idle nodes and half-open trials, by node and result (ok, failed)",
            self.probes.clone(),
        );
        r.register(
            "batches",
            "Batches of checks sent to a node",
            self.batches.clone(),
        );
        r.register(
            "batched_checks",
            "Checks sent in batches",
            self.batched_checks.clone(),
        );
    }

    /// Attempts on `node` that ended in `result`.
    pub fn calls_of(&self, node: &str, result: &str) -> u64 {
        self.calls
            .get_or_create(&CallLabels {
                node: node.to_owned(),
                result: result.to_owned(),
            })
            .get()
    }

    /// Attempts on `node`, whatever the result.
    pub fn attempts_on(&self, node: &str) -> u64 {
        [
            "allowed",
            "denied",
            "never",
            "refused",
            "timeout",
            "connect_error",
            "unavailable",
            "malformed",
        ]
        .iter()
        .map(|r| self.calls_of(node, r))
        .sum()
    }

    /// Degraded decisions in `mode` (fail_open, fail_closed, lease).
    pub fn degraded_of(&self, mode: &str, allowed: bool) -> u64 {
        self.degraded
            .get_or_create(&DegradedLabels {
                mode: mode.to_owned(),
                allowed: allowed.to_string(),
            })
            .get()
    }

    /// Times `node`'s breaker opened.
    pub fn breaker_opened_of(&self, node: &str) -> u64 {
        self.breaker_opened
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .get()
    }

    /// Lease checks (and returns) that ended in `result`.
    pub fn leases_of(&self, result: &str) -> u64 {
        self.leases
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .get()
    }

    /// Probes of `node` that succeeded (`ok`) or failed.
    pub fn probes_of(&self, node: &str, ok: bool) -> u64 {
        self.probes
            .get_or_create(&CallLabels {
                node: node.to_owned(),
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .get()
    }

    pub(crate) fn probe(&self, node: &str, ok: bool) {
        self.probes
            .get_or_create(&CallLabels {
                node: node.to_owned(),
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    pub(crate) fn leases_of_inc(&self, result: &str) {
        self.leases
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub(crate) fn refund(&self, result: &str) {
        self.refunds
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub(crate) fn call(&self, node: &str, result: &str) {
        self.calls
            .get_or_create(&CallLabels {
                node: node.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_under_the_prefix() {
        let m = ClientMetrics::default();
        m.call("127.0.0.1:1", "allowed");
        m.failovers.inc();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"drl_client_calls_total{node="127.0.0.1:1",result="allowed"} 1"#));
        assert!(text.contains("drl_client_failovers_total 1"));
        assert_eq!(m.attempts_on("127.0.0.1:1"), 1);
    }
}
