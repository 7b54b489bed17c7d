//! What every protocol front-end of a node shares: one [`Service`].
//!
//! HTTP, gRPC (native and Envoy's), RESP and the operations listener sit
//! side by side over the same `Service` and never import each other: it
//! holds the node's decision path ([`Decider`], the one way to the
//! counters), the node's status and admin API, the metrics every protocol
//! counts into (with a `protocol` label), and the admin token. A clone is
//! one reference count.

pub mod headers;

use std::sync::Arc;
use std::time::Instant;

use drl_core::decide::Decider;
use drl_core::limiter::{Check, CheckError, Decided, Decision};

use crate::metrics::{Metrics, Protocol};
use crate::node::tokens::AdminTokens;
use crate::node::NodeApi;

/// The shared state of a node's front-ends (see the module docs).
#[derive(Clone)]
pub struct Service(Arc<Shared>);

struct Shared {
    node: NodeApi,
    metrics: Metrics,
    /// No token: the admin routes answer 403.
    admin_tokens: AdminTokens,
}

impl Service {
    /// The service of the node behind `node`.
    pub fn new(node: NodeApi) -> Service {
        let admin_tokens = node.settings.admin_tokens.clone();
        let metrics = Metrics::new(node.clone());
        Service(Arc::new(Shared {
            node,
            metrics,
            admin_tokens,
        }))
    }

    /// The node: status, readiness, rules admin.
    pub fn node(&self) -> &NodeApi {
        &self.0.node
    }

    /// The node's decision path.
    pub fn decider(&self) -> &Decider {
        self.0.node.decider()
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The admin tokens by holder (none: the admin routes are closed).
    pub fn admin_tokens(&self) -> &AdminTokens {
        &self.0.admin_tokens
    }

    /// Decides a request of one or more checks through the node's decision
    /// path, timed into `protocol`'s latency histogram. The decisions are
    /// not counted yet: the caller knows whether they stand
    /// ([`Service::count`]).
    pub async fn decide(
        &self,
        protocol: Protocol,
        checks: &[Check<'_>],
    ) -> Result<Decided, CheckError> {
        let start = Instant::now();
        let result = self.decider().decide(checks).await;
        self.0
            .metrics
            .observe_latency_via(protocol, start.elapsed());
        result
    }

    /// What a refused check is told: the error, and for a request outside
    /// the `endpoints` allow-list also the rules file the list is in (the
    /// error names its line), so the one to edit is never a guess.
    pub fn describe_check_error(&self, e: &CheckError) -> String {
        match e {
            CheckError::UnknownEndpoint(_) => format!(
                "{e} (rules file: {}; GET /v1/rules shows the rules in force)",
                self.0.node.settings.rules.display()
            ),
            _ => e.to_string(),
        }
    }

    /// Counts a decision that stands, under the rule of its deciding limit,
    /// and what a rule in shadow mode would have denied (also logged).
    pub fn count(&self, protocol: Protocol, decision: &Decision) {
        let limit = decision.quota.map(|q| (q.limit_id, q.rule.as_str()));
        self.0
            .metrics
            .count_decision_via(protocol, decision.outcome, limit);
        if let Some(s) = decision.shadow {
            self.0
                .metrics
                .count_shadow_via(protocol, s.limit_id, s.rule.as_str());
            tracing::debug!(
                rule = s.rule.as_str(),
                limit = s.limit,
                remaining = s.remaining,
                protocol = protocol.label(),
                "shadow mode: would have denied"
            );
        }
    }
}
