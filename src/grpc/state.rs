//! What every gRPC call shares: the node, its metrics, and the way a
//! limiter error becomes a gRPC status.

use std::time::Instant;

use tonic::{Code, Status};

use crate::http::AppState;
use crate::metrics::{Metrics, Protocol};
use crate::node::NodeApi;
use drl_core::limiter::{Check, CheckError, Decided, Decision, QuotaState};

/// Cheap to clone: a [`NodeApi`] and the HTTP API's state, whose metrics
/// the gRPC services count into (one `/metrics` page, a `protocol` label).
#[derive(Clone)]
pub struct GrpcState {
    api: NodeApi,
    http: AppState,
}

impl GrpcState {
    /// The state of the gRPC services of the node behind `api`, counting
    /// into `http`'s metrics.
    pub fn new(api: NodeApi, http: AppState) -> GrpcState {
        GrpcState { api, http }
    }

    /// The node.
    pub fn api(&self) -> &NodeApi {
        &self.api
    }

    /// The metrics shared with the HTTP API.
    pub fn metrics(&self) -> &Metrics {
        self.http.metrics()
    }

    /// A request of one or more checks through the node's decision path
    /// (which confirms with its peers near a limit), timed into the
    /// decision latency histogram. The decisions are not counted yet: the
    /// caller knows whether they stand.
    pub async fn decide(&self, checks: &[Check<'_>]) -> Result<Decided, CheckError> {
        let start = Instant::now();
        let result = self.api.decider().decide(checks).await;
        self.metrics()
            .observe_latency_via(Protocol::Grpc, start.elapsed());
        result
    }

    /// Counts a decision that stands, under the rule of its deciding limit.
    pub fn count(&self, decision: &Decision) {
        let limit = decision.quota.map(|q| (q.limit_id, rule_name(&q)));
        self.metrics()
            .count_decision_via(Protocol::Grpc, decision.outcome, limit);
    }

    /// The status a refused call is answered with, counted as a refusal.
    pub fn refuse(&self, status: Status) -> Status {
        self.metrics()
            .count_grpc_rejected(code_label(status.code()));
        status
    }

    /// [`GrpcState::refuse`] for a limiter error.
    pub fn refuse_check(&self, e: CheckError) -> Status {
        self.refuse(check_status(&e))
    }
}

/// `INVALID_ARGUMENT` for bad input, `UNAVAILABLE` while the node recovers
/// (a client may retry elsewhere). Either way nothing was counted.
pub fn check_status(e: &CheckError) -> Status {
    match e {
        CheckError::Descriptor(_) | CheckError::UnknownEndpoint(_) => {
            Status::invalid_argument(e.to_string())
        }
        CheckError::Recovering => Status::unavailable(e.to_string()),
    }
}

/// The rule of the deciding limit, as the decision names it (the rules may
/// have been replaced since the check; the name was taken when it decided).
pub fn rule_name(q: &QuotaState) -> &'static str {
    q.rule.as_str()
}

/// The `code` label of `drl_grpc_rejected_total`.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unimplemented => "unimplemented",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drl_core::descriptor::DescriptorError;

    #[test]
    fn bad_input_and_recovery_map_to_distinct_codes() {
        let bad = CheckError::Descriptor(DescriptorError::NoFields);
        assert_eq!(check_status(&bad).code(), Code::InvalidArgument);
        assert_eq!(
            check_status(&CheckError::Recovering).code(),
            Code::Unavailable
        );
        assert_eq!(code_label(Code::InvalidArgument), "invalid_argument");
        assert_eq!(code_label(Code::Internal), "other");
    }
}
