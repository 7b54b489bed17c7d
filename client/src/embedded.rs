//! Embedded mode: decisions on a limiter in this process (a cluster node
//! the application runs, or a lone limiter), in the client's terms.

use std::sync::Arc;
use std::time::Duration;

use drl::node::{NodeApi, NodeHandle};
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{CheckError, Limiter, Outcome};

use crate::client::{
    degraded_decision, ClientError, Decision, Degraded, DegradedMode, Fallback, Inner, Source,
};
use crate::transport::{Quota, Transport};

pub(crate) struct Embedded {
    pub(crate) limiter: Arc<Limiter>,
    /// The node's own check, which confirms with the peers near a limit;
    /// `None` for a lone limiter.
    pub(crate) api: Option<NodeApi>,
    pub(crate) node: tokio::sync::Mutex<Option<NodeHandle>>,
}

impl Embedded {
    pub(crate) async fn check<T: Transport>(
        &self,
        inner: &Inner<T>,
        fields: &[(String, String)],
        cost: u32,
    ) -> Result<Decision, ClientError> {
        let decided = match &self.api {
            Some(api) => node_decision(api, fields, cost).await,
            None => limiter_decision(&self.limiter, fields, cost),
        };
        match decided {
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
    client_decision(limiter, limiter.check(&d, cost))
}

/// A decision of the node this process runs: near a limit it waits for
/// its peers' confirmation, as the node's own API does.
async fn node_decision(
    api: &NodeApi,
    fields: &[(String, String)],
    cost: u32,
) -> Result<Decision, ClientError> {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let d = Descriptors::new(&pairs).map_err(|e| ClientError::Refused(e.to_string()))?;
    let result = api.check(&d, cost).await;
    client_decision(&api.limiter, result)
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
