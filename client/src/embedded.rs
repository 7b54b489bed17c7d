//! Embedded mode: decisions on a limiter in this process (a cluster node
//! the application runs, or a lone limiter), in the client's terms.

use std::time::Duration;

#[cfg(feature = "node")]
use drl::node::NodeHandle;
use drl_core::decide::Decider;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Check as CoreCheck, CheckError, Limiter, Outcome};

use crate::client::{
    degraded_decision, BatchDecision, Check, ClientError, Decision, Degraded, DegradedMode,
    Fallback, Inner, Receipt, RefundRefusal, Refunded, Source,
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
        check: Check,
    ) -> Result<Decision, ClientError> {
        let (fields, cost) = embedded_parts(check)?;
        match decide_with_receipt(&self.decider, &fields, cost).await {
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

/// The fields and cost of a check an embedded client can make: the
/// in-process limiter decides by its rules alone.
fn embedded_parts(check: Check) -> Result<(Vec<(String, String)>, u32), ClientError> {
    let (fields, cost, limit) = check.into_parts();
    if limit.is_some() {
        return Err(ClientError::Unsupported(
            "request-defined limits in embedded mode (the node's rules decide)".into(),
        ));
    }
    Ok((fields, cost))
}

impl Embedded {
    /// An atomic batch on the in-process decision path.
    pub(crate) async fn check_batch(
        &self,
        checks: Vec<Check>,
    ) -> Result<BatchDecision, ClientError> {
        let parts = checks
            .into_iter()
            .map(embedded_parts)
            .collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<Vec<(&str, &str)>> = parts
            .iter()
            .map(|(f, _)| f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect())
            .collect();
        let mut list = Vec::with_capacity(parts.len());
        for (p, (_, cost)) in pairs.iter().zip(&parts) {
            let d = Descriptors::new(p).map_err(|e| ClientError::Refused(e.to_string()))?;
            list.push(CoreCheck::new(d, *cost));
        }
        let decided = match self.decider.decide(&list).await {
            Ok(d) => d,
            Err(e @ CheckError::Recovering) => return Err(ClientError::Unavailable(e.to_string())),
            Err(e) => return Err(ClientError::Refused(e.to_string())),
        };
        let limiter = self.decider.limiter();
        let mut decisions = Vec::with_capacity(list.len());
        for (check, d) in list.iter().zip(decided.each()) {
            let receipt = self
                .decider
                .receipt(check, d)
                .map(|r| Receipt::new(r, None));
            let mut out = client_decision(limiter, Ok(*d))?;
            out.receipt = receipt;
            decisions.push(out);
        }
        Ok(BatchDecision { decisions })
    }

    /// A refund on the in-process limiter.
    pub(crate) fn refund(&self, receipt: &Receipt) -> Result<Refunded, ClientError> {
        use drl_core::limiter::RefundError as E;
        // An embedded decider has no peers to forward to: its refund never
        // waits.
        let outcome = drl_core::decide::block_on_ready(self.decider.refund(receipt.token()))
            .unwrap_or(Err(E::Unreachable { slot: 0 }));
        match outcome {
            Ok(o) => Ok(Refunded {
                refunded: o.refunded(),
                requested: o.requested,
            }),
            Err(e @ E::Invalid(_)) => {
                Err(ClientError::Refund(RefundRefusal::Invalid, e.to_string()))
            }
            Err(e @ E::AlreadyRefunded) => Err(ClientError::Refund(
                RefundRefusal::AlreadyRefunded,
                e.to_string(),
            )),
            Err(e @ (E::OtherRun | E::Expired | E::OtherNode { .. })) => {
                Err(ClientError::Refund(RefundRefusal::Expired, e.to_string()))
            }
            Err(e) => Err(ClientError::Unavailable(e.to_string())),
        }
    }
}

/// [`decide`] with the check's receipt, if it was allowed and counted.
async fn decide_with_receipt(
    decider: &Decider,
    fields: &[(String, String)],
    cost: u32,
) -> Result<Decision, ClientError> {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let d = Descriptors::new(&pairs).map_err(|e| ClientError::Refused(e.to_string()))?;
    let check = CoreCheck::new(d, cost);
    let result = decider
        .decide(std::slice::from_ref(&check))
        .await
        .map(|decided| decided.decision());
    let receipt = result
        .as_ref()
        .ok()
        .and_then(|d| decider.receipt(&check, d))
        .map(|r| Receipt::new(r, None));
    let mut out = client_decision(decider.limiter(), result)?;
    out.receipt = receipt;
    Ok(out)
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
                receipt: None,
            })
        }
        Err(e @ CheckError::Recovering) => Err(ClientError::Unavailable(e.to_string())),
        Err(e) => Err(ClientError::Refused(e.to_string())),
    }
}
