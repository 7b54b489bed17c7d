//! `drl.v1.RateLimiter`: the native API, the HTTP API's decisions over gRPC.
//!
//! `Check` answers what `POST /v1/check` answers. `CheckBatch` decides many
//! checks in one call: by default atomically, as one request through the
//! node's decision path (all limits of all checks, or nothing counted);
//! with `independent`, each check on its own, like Gubernator's
//! `GetRateLimits`, where a bad one gets its own error without failing the
//! call. `Refund` calls the very function behind `POST /v1/refund`.

use tonic::{Code, Request, Response, Status};

use super::pb::rate_limiter_server::RateLimiter;
use super::pb::{
    check_result, CheckBatchRequest, CheckBatchResponse, CheckError as PbCheckError, CheckRequest,
    CheckResponse, CheckResult, Outcome as PbOutcome, RefundRequest, RefundResponse,
};
use super::state::{check_status, rule_name, GrpcState};
use drl_core::descriptor::Descriptors;

use drl_core::limiter::{Check, Decision, Outcome};
use drl_core::rules::request::LimitSpec;

/// Most checks in one `CheckBatch` call (Gubernator's limit too).
pub const MAX_BATCH: usize = 1_000;

/// The native service of one node.
#[derive(Clone)]
pub struct NativeRateLimiter {
    state: GrpcState,
}

impl NativeRateLimiter {
    /// The service over `state`'s node; wrap it in the generated
    /// `RateLimiterServer` to serve it.
    pub fn new(state: GrpcState) -> NativeRateLimiter {
        NativeRateLimiter { state }
    }

    /// One check; the error is the status the check is refused with.
    async fn check_one(&self, request: &CheckRequest) -> Result<CheckResponse, Status> {
        let pairs = pairs(request);
        let d = Descriptors::new(&pairs).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let check = self.check_of(d, request)?;
        let decided = self
            .state
            .decide(std::slice::from_ref(&check))
            .await
            .map_err(|e| self.state.check_status(&e))?;
        let decision = decided.decision();
        self.state.count(&decision);
        Ok(self.answer_with_receipt(&check, &decision))
    }

    /// The check of `request`'s descriptors `d`, with the request's own
    /// limit if it carries one.
    fn check_of<'d>(
        &self,
        d: Descriptors<'d>,
        request: &CheckRequest,
    ) -> Result<Check<'d>, Status> {
        let cost = request.cost.unwrap_or(1);
        let spec = request.limit.as_ref().map(|spec| LimitSpec {
            algorithm: spec.algorithm.clone(),
            limit: spec.limit,
            window: spec.window.clone(),
            precision: spec.precision,
            capacity: spec.capacity,
            refill: spec.refill,
            leak: spec.leak,
            per: spec.per.clone(),
            burst: spec.burst,
            granularity: spec.granularity.clone(),
        });
        self.state
            .service()
            .decider()
            .limiter()
            .request_check(d, cost, spec.as_ref())
            .map_err(|e| check_status(&e))
    }

    /// The answer to one decided check, with the sealed receipt a refund
    /// must show (the same as `POST /v1/check`'s).
    fn answer_with_receipt(&self, check: &Check<'_>, decision: &Decision) -> CheckResponse {
        let mut response = answer(decision);
        if let Some(receipt) = self.state.service().decider().receipt(check, decision) {
            response.receipt = receipt.into_bytes();
        }
        response
    }

    /// Every check of a batch as one request: all counted, or none.
    async fn check_atomically(
        &self,
        requests: &[CheckRequest],
    ) -> Result<Vec<CheckResult>, Status> {
        let pairs: Vec<Vec<(&str, &str)>> = requests.iter().map(pairs).collect();
        let mut checks = Vec::with_capacity(requests.len());
        for (i, (pairs, r)) in pairs.iter().zip(requests).enumerate() {
            let d = Descriptors::new(pairs)
                .map_err(|e| Status::invalid_argument(format!("check {i}: {e}")))?;
            let check = self
                .check_of(d, r)
                .map_err(|s| Status::invalid_argument(format!("check {i}: {}", s.message())))?;
            checks.push(check);
        }
        let decided = self
            .state
            .decide(&checks)
            .await
            .map_err(|e| self.state.check_status(&e))?;
        let refused = decided.decision();
        let results = checks
            .iter()
            .zip(decided.each())
            .map(|(check, decision)| {
                self.state.count(decision);
                let response = if refused.is_allowed() {
                    self.answer_with_receipt(check, decision)
                } else {
                    not_counted(decision, &refused)
                };
                CheckResult {
                    result: Some(check_result::Result::Decision(response)),
                }
            })
            .collect();
        Ok(results)
    }
}

/// A check of a refused atomic batch: nothing was counted for it, whatever
/// its own limits said.
fn not_counted(decision: &Decision, batch: &Decision) -> CheckResponse {
    if decision.outcome != Outcome::Allowed {
        return answer(decision);
    }
    let mut response = answer(decision);
    response.allowed = false;
    response.outcome = PbOutcome::Denied as i32;
    response.retry_after_ms = batch.quota.map(|q| q.retry_after.as_millis_ceil());
    response.message =
        Some("not counted: another check of this atomic batch was refused".to_owned());
    response
}

/// A map's entries in name order, so that errors (duplicates cannot occur,
/// a bad name) are reported the same way every time.
fn pairs(request: &CheckRequest) -> Vec<(&str, &str)> {
    let mut pairs: Vec<(&str, &str)> = request
        .descriptors
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs
}

#[tonic::async_trait]
impl RateLimiter for NativeRateLimiter {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let _in_flight = self.state.admit()?;
        self.check_one(request.get_ref())
            .await
            .map(Response::new)
            .map_err(|s| self.state.refuse(s))
    }

    async fn check_batch(
        &self,
        request: Request<CheckBatchRequest>,
    ) -> Result<Response<CheckBatchResponse>, Status> {
        let _in_flight = self.state.admit()?;
        let checks = &request.get_ref().checks;
        if checks.len() > MAX_BATCH {
            return Err(self.state.refuse(Status::invalid_argument(format!(
                "at most {MAX_BATCH} checks fit in one batch, got {}",
                checks.len()
            ))));
        }
        if !request.get_ref().independent {
            let results = self
                .check_atomically(checks)
                .await
                .map_err(|s| self.state.refuse(s))?;
            return Ok(Response::new(CheckBatchResponse { results }));
        }
        let mut results = Vec::with_capacity(checks.len());
        for c in checks {
            let result = match self.check_one(c).await {
                Ok(decision) => check_result::Result::Decision(decision),
                Err(status) => {
                    let status = self.state.refuse(status);
                    check_result::Result::Error(PbCheckError {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    })
                }
            };
            results.push(CheckResult {
                result: Some(result),
            });
        }
        Ok(Response::new(CheckBatchResponse { results }))
    }

    async fn refund(
        &self,
        request: Request<RefundRequest>,
    ) -> Result<Response<RefundResponse>, Status> {
        let request = request.get_ref();
        // Only what a check of this node charged, once, by its receipt: the
        // same protections as `POST /v1/refund`.
        let receipt = std::str::from_utf8(&request.receipt).map_err(|_| {
            self.state
                .refuse(Status::invalid_argument("the receipt is not text"))
        })?;
        if receipt.is_empty() {
            return Err(self.state.refuse(Status::invalid_argument(
                "a refund needs the receipt of the allowed check it gives back",
            )));
        }
        let outcome = self
            .state
            .service()
            .decider()
            .refund(receipt)
            .await
            .map_err(|e| self.state.refuse(refund_status(&e)))?;
        Ok(Response::new(RefundResponse {
            refunded: outcome.refunded(),
            requested: outcome.requested,
        }))
    }
}

/// The full decision, as `POST /v1/check` gives it.
pub fn answer(decision: &Decision) -> CheckResponse {
    let allowed = decision.outcome == Outcome::Allowed;
    let outcome = match decision.outcome {
        Outcome::Allowed => PbOutcome::Allowed,
        Outcome::Denied => PbOutcome::Denied,
        Outcome::Never => PbOutcome::Never,
    };
    let Some(q) = decision.quota else {
        return CheckResponse {
            allowed,
            outcome: outcome as i32,
            ..Default::default()
        };
    };
    let rule = rule_name(&q);
    let never = decision.outcome == Outcome::Never;
    CheckResponse {
        allowed,
        outcome: outcome as i32,
        rule: Some(rule.to_owned()),
        limit: Some(q.limit),
        window_ms: Some(q.period.as_millis_ceil()),
        remaining: Some(q.remaining),
        reset_ms: (!never).then(|| q.reset_after.as_millis_ceil()),
        retry_after_ms: match decision.outcome {
            Outcome::Allowed => Some(0),
            Outcome::Denied => Some(q.retry_after.as_millis_ceil()),
            Outcome::Never => None,
        },
        message: never.then(|| {
            format!(
                "the cost exceeds what rule `{rule}` can ever admit ({} per {}): retrying cannot succeed",
                q.limit, q.period
            )
        }),
        // Filled in by `answer_with_receipt`, which holds the descriptors
        // and cost a receipt seals.
        receipt: Vec::new(),
    }
}

/// The gRPC code of a batch item's error, for tests and clients.
pub fn item_code(error: &PbCheckError) -> Code {
    Code::from_i32(error.code)
}

/// How a refused refund is answered; nothing was given back.
fn refund_status(e: &drl_core::limiter::RefundError) -> Status {
    use drl_core::limiter::RefundError as E;
    match e {
        E::Invalid(_) => Status::invalid_argument(e.to_string()),
        E::OtherNode { .. } | E::OtherRun | E::Expired => {
            Status::failed_precondition(e.to_string())
        }
        E::AlreadyRefunded => Status::already_exists(e.to_string()),
        E::LedgerFull | E::Recovering | E::Unreachable { .. } => Status::unavailable(e.to_string()),
    }
}
