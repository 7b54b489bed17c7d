//! What every gRPC call shares: the node's [`Service`], counted under the
//! `grpc` protocol label, and the way a limiter error becomes a gRPC
//! status.

use std::sync::Arc;

use tonic::{Code, Status};

use crate::listen::{Admission, AdmissionLimits, InFlight, Lag};
use crate::metrics::Protocol;
use crate::service::Service;
use drl_core::limiter::{Check, CheckError, Decided, Decision, QuotaState};

/// Cheap to clone: the node's [`Service`] and the listener's admission.
#[derive(Clone)]
pub struct GrpcState {
    service: Service,
    admission: Arc<Admission>,
    /// How far behind the runtime serving the calls is (none without a
    /// queue deadline; its probe is started by the listener).
    lag: Option<Arc<Lag>>,
}

impl GrpcState {
    /// The state of the gRPC services over `service`, shedding calls under
    /// `limits`.
    pub fn with_admission(service: Service, limits: AdmissionLimits) -> GrpcState {
        let lag = (!limits.queue_deadline.is_zero()).then(Lag::new);
        GrpcState {
            service,
            admission: Admission::new(limits),
            lag,
        }
    }

    /// The measure of the serving runtime's lag, whose probe the listener
    /// runs.
    pub fn lag(&self) -> Option<&Arc<Lag>> {
        self.lag.as_ref()
    }

    /// Admits one call, or answers `UNAVAILABLE` at once (with
    /// `retry-after` and `grpc-retry-pushback-ms` metadata) when the
    /// listener is overloaded; nothing is counted then.
    pub fn admit(&self) -> Result<InFlight, Status> {
        self.admission.admit(self.lag.as_deref()).map_err(|shed| {
            self.service
                .metrics()
                .count_shed(Protocol::Grpc, shed.label());
            let secs = self.admission.retry_after_secs();
            let mut status = Status::unavailable(shed.message(secs));
            let metadata = status.metadata_mut();
            metadata.insert("retry-after", secs.into());
            metadata.insert("grpc-retry-pushback-ms", (secs * 1_000).into());
            status
        })
    }

    /// The node's shared service.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// A request of one or more checks through the node's decision path
    /// (which confirms with its peers near a limit), timed into the
    /// decision latency histogram. The decisions are not counted yet: the
    /// caller knows whether they stand.
    pub async fn decide(&self, checks: &[Check<'_>]) -> Result<Decided, CheckError> {
        self.service.decide(Protocol::Grpc, checks).await
    }

    /// Counts a decision that stands, under the rule of its deciding limit.
    pub fn count(&self, decision: &Decision) {
        self.service.count(Protocol::Grpc, decision);
    }

    /// The status a refused call is answered with, counted as a refusal.
    pub fn refuse(&self, status: Status) -> Status {
        self.service
            .metrics()
            .count_grpc_rejected(code_label(status.code()));
        status
    }

    /// [`GrpcState::refuse`] for a limiter error, in the words of
    /// [`Service::describe_check_error`].
    pub fn refuse_check(&self, e: CheckError) -> Status {
        self.refuse(self.check_status(&e))
    }

    /// The status of a limiter error, in the words of
    /// [`Service::describe_check_error`]; not counted (the caller refuses
    /// with it).
    pub fn check_status(&self, e: &CheckError) -> Status {
        Status::new(check_status(e).code(), self.service.describe_check_error(e))
    }
}

/// `INVALID_ARGUMENT` for bad input, `UNAVAILABLE` while the node recovers
/// (a client may retry elsewhere). Either way nothing was counted.
pub fn check_status(e: &CheckError) -> Status {
    match e {
        CheckError::Descriptor(_)
        | CheckError::UnknownEndpoint(_)
        | CheckError::RequestLimit(_) => Status::invalid_argument(e.to_string()),
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
