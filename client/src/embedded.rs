//! Embedded mode: decisions on a limiter in this process (a cluster node
//! the application runs, or a lone limiter), in the client's terms.

use std::time::Duration;

#[cfg(feature = "node")]
use drl::node::NodeHandle;
use drl_core::decide::Decider;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{CheckError, Limiter, Outcome};

use crate::client::{
    degraded_decision, ClientError, Decision, Degraded, DegradedMode, Fallback, Inner, Source,
};
use crate::transport::{Quota, Transport};

/// The cluster node this process runs (feature `node`); without the
/// feature there is none to hold.
#[cfg(feature = "node")]
pub(crate) type EmbeddedNode = NodeHandle;
#[cfg(not(feature = "node"))]
pub(crate) type EmbeddedNode = std::convert::Infallible;

pub(crate) struct Embedded {
    /// The decision path of the node this process runs (which confirms
    /// with its peers near a limit), or of a lone limiter.
    pub(crate) decider: Decider,
    /// Without the `node` feature there is never a node to stop.
    #[cfg_attr(not(feature = "node"), allow(dead_code))]
    pub(crate) node: tokio::sync::Mutex<Option<EmbeddedNode>>,
}

impl Embedded {
    /// Stops the embedded node cleanly, if there is one: its limiter then
    /// admits nothing (the degraded mode decides).
    pub(crate) async fn shutdown(&self) {
        #[cfg(feature = "node")]
        if let Some(node) = self.node.lock().await.take() {
            node.shutdown().await;
            self.decider.limiter().set_admitting(false);
        }
    }

    pub(crate) async fn check<T: Transport>(
        &self,
        inner: &Inner<T>,
        fields: &[(String, String)],
        cost: u32,
    ) -> Result<Decision, ClientError> {
        match decide(&self.decider, fields, cost).await {
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

/// A decision of the in-process decision path, in the client's terms.
/// `Unavailable` while a clustered limiter recovers its counts.
pub(crate) async fn decide(
    decider: &Decider,
    fields: &[(String, String)],
    cost: u32,
) -> Result<Decision, ClientError> {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let d = Descriptors::new(&pairs).map_err(|e| ClientError::Refused(e.to_string()))?;
    let result = decider.check(&d, cost).await;
    client_decision(decider.limiter(), result)
}

fn client_decision(
    limiter: &Limiter,
    result: Result<drl_core::limiter::Decision, CheckError>,
) -> Result<Decision, ClientError> {
    match result {
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
