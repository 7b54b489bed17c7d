//! The one entry point every protocol decides through.
//!
//! HTTP, gRPC (native and Envoy's rate limit service), RESP, the axum
//! middleware and the SDK's embedded mode all decide a request with
//! [`Decider::decide`]: the request's checks are evaluated together by the
//! limiter (`Limiter::begin_at`); far from every limit that is the
//! decision; near one, the provisional hits go to the node's core to be
//! confirmed by the peers ([`Confirm`]), and the answer waits for them, one
//! round trip at most the claim timeout. There is no other path from a
//! protocol to the counters (the limiter's evaluation and confirmation
//! steps are not public outside this crate), so no protocol can decide
//! differently.
//!
//! ```
//! use std::sync::Arc;
//! use drl_core::decide::Decider;
//! use drl_core::descriptor::Descriptors;
//! use drl_core::limiter::{Check, Limiter, LimiterConfig};
//! use drl_core::rules::RuleSet;
//!
//! let rules = RuleSet::from_toml(r#"
//!     [[rules]]
//!     name = "per-user"
//!     match = { user = "*" }
//!     limits = [ { algorithm = "fixed_window", limit = 1, window = "1m" } ]
//!     [[rules]]
//!     name = "per-route"
//!     match = { endpoint = "*" }
//!     limits = [ { algorithm = "fixed_window", limit = 100, window = "1m" } ]
//! "#).unwrap();
//! let decider = Decider::local(Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap()));
//! let user = [("user", "alice")];
//! let route = [("endpoint", "/search")];
//! let checks = [
//!     Check::new(Descriptors::new(&user).unwrap(), 1),
//!     Check::new(Descriptors::new(&route).unwrap(), 1),
//! ];
//! let first = futures_lite_block_on(decider.decide(&checks)).unwrap();
//! assert!(first.is_allowed());
//! // Alice is spent: the second request is refused, and the route is not
//! // charged for it.
//! let second = futures_lite_block_on(decider.decide(&checks)).unwrap();
//! assert!(!second.is_allowed());
//! assert_eq!(second.each()[1].quota.unwrap().remaining, 99);
//! # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     drl_core::decide::block_on_ready(f).expect("a local decision never waits")
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::clock::SystemClock;
use crate::descriptor::Descriptors;
use crate::limiter::{
    Begun, Check, CheckError, Decided, Decision, Limiter, Pending, RefundError, RefundOutcome,
};
use crate::time::Clock;

/// What [`Confirm::confirm`] returns: the request's decision, once the
/// peers have answered, or why there is none.
pub type ConfirmFuture = Pin<Box<dyn Future<Output = Result<Decided, Unconfirmed>> + Send>>;

/// Why a request sent to be confirmed came back undecided. Either way it is
/// refused, for one acknowledgement wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unconfirmed {
    /// Nobody will decide it (the node is stopping): its provisional hits
    /// are given back here.
    Dropped,
    /// The node still holds it but took too long: it decides it later and
    /// gives its hits back then, since nobody waits for the answer.
    Late,
}

/// Where a request near its limit is confirmed with the peers: a node's
/// core, reached through its driver (the server implements it; the
/// in-memory harness drives the same core directly).
pub trait Confirm: Send + Sync {
    /// Hands a request that the limiter counted provisionally to the
    /// node's core; the future resolves to its decision. If the future is
    /// dropped first, the node gives back an admitted request nobody was
    /// told of.
    fn confirm(&self, pending: Pending) -> ConfirmFuture;
}

/// What [`Commit::commit`] returns: resolves once what was counted before
/// the call is on disk (or the journal gave up on it, degraded).
pub type CommitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a decision that counted hits waits for the write-ahead journal
/// to make them durable before it is answered (a node's `sync`
/// durability; the server implements it).
pub trait Commit: Send + Sync {
    /// Called after a decision counted hits; the answer waits for the
    /// future. Called on the decision path: it must not block.
    fn commit(&self) -> CommitFuture;
}

/// What [`ForwardRefund::forward`] returns: the issuer's answer.
pub type RefundFuture = Pin<Box<dyn Future<Output = Result<RefundOutcome, RefundError>> + Send>>;

/// Where a refund of a receipt another node issued goes: to the issuer,
/// over the peer connection (the server implements it; see
/// `cluster::refunds`).
pub trait ForwardRefund: Send + Sync {
    /// Asks the node in `slot`, which issued `receipt`, to apply its
    /// refund; resolves to the issuer's answer, or
    /// [`RefundError::Unreachable`].
    fn forward(&self, slot: u16, receipt: String) -> RefundFuture;
}

/// The one decision path (see the module docs). Cheap to clone: four
/// reference counts at most.
pub struct Decider<C: Clock = SystemClock> {
    limiter: Arc<Limiter<C>>,
    confirm: Option<Arc<dyn Confirm>>,
    commit: Option<Arc<dyn Commit>>,
    forward: Option<Arc<dyn ForwardRefund>>,
}

impl<C: Clock> Clone for Decider<C> {
    fn clone(&self) -> Self {
        Decider {
            limiter: self.limiter.clone(),
            confirm: self.confirm.clone(),
            commit: self.commit.clone(),
            forward: self.forward.clone(),
        }
    }
}

impl<C: Clock> From<Arc<Limiter<C>>> for Decider<C> {
    fn from(limiter: Arc<Limiter<C>>) -> Self {
        Decider::local(limiter)
    }
}

impl<C: Clock> Decider<C> {
    /// Decisions from an in-process limiter with no peers (an embedded
    /// application's, a test's): every request is decided at once.
    pub fn local(limiter: Arc<Limiter<C>>) -> Self {
        Decider {
            limiter,
            confirm: None,
            commit: None,
            forward: None,
        }
    }

    /// Decisions of a cluster node: requests near a limit are confirmed
    /// through `confirm`.
    pub fn clustered(limiter: Arc<Limiter<C>>, confirm: Arc<dyn Confirm>) -> Self {
        Decider {
            limiter,
            confirm: Some(confirm),
            commit: None,
            forward: None,
        }
    }

    /// Decisions that count hits are answered only once `commit` says
    /// they are durable (a node's `sync` durability).
    pub fn with_commit(mut self, commit: Arc<dyn Commit>) -> Self {
        self.commit = Some(commit);
        self
    }

    /// Refunds of receipts other nodes issued go to them through
    /// `forward` (a cluster node's peer connections).
    pub fn with_forward(mut self, forward: Arc<dyn ForwardRefund>) -> Self {
        self.forward = Some(forward);
        self
    }

    /// The limiter decisions are made by (its rules, its metrics).
    pub fn limiter(&self) -> &Arc<Limiter<C>> {
        &self.limiter
    }

    /// Decides a request of one or more checks together: allowed only if
    /// every limit of every check allows, and then every check is counted;
    /// otherwise nothing is. Near a limit the answer waits for the peers'
    /// confirmation (one round trip, at most the claim timeout).
    ///
    /// On `Err` nothing was counted: bad input, an endpoint the rules do
    /// not know, or a node still recovering its counts.
    pub async fn decide(&self, checks: &[Check<'_>]) -> Result<Decided, CheckError> {
        let decided = self.decide_counted(checks).await?;
        if let Some(commit) = &self.commit {
            if decided.is_allowed() && checks.iter().any(|c| c.cost > 0) {
                commit.commit().await;
            }
        }
        Ok(decided)
    }

    async fn decide_counted(&self, checks: &[Check<'_>]) -> Result<Decided, CheckError> {
        let now = self.limiter.clock().now();
        let pending = match self.limiter.begin_at(now, checks)? {
            Begun::Decided(decided) => return Ok(decided),
            Begun::Confirm(pending) => *pending,
        };
        let unconfirmed = match &self.confirm {
            Some(confirm) => match confirm.confirm(pending.clone()).await {
                Ok(decided) => return Ok(decided),
                Err(why) => why,
            },
            // A limiter that is a cluster member but has no core to confirm
            // with.
            None => Unconfirmed::Dropped,
        };
        if unconfirmed == Unconfirmed::Dropped {
            self.limiter.give_back(self.limiter.clock().now(), &pending);
        }
        Ok(self.limiter.refused_pending(&pending))
    }

    /// [`Decider::decide`] for a request of one check.
    pub async fn check(&self, d: &Descriptors<'_>, cost: u32) -> Result<Decision, CheckError> {
        let check = Check::new(*d, cost);
        self.decide(std::slice::from_ref(&check))
            .await
            .map(|decided| decided.decision())
    }

    /// The sealed receipt of `check`, decided just now as `decision`: what
    /// a refund must present to give its cost back. `None` when the check
    /// was not allowed, cost nothing, or counted no limit.
    pub fn receipt(&self, check: &Check<'_>, decision: &Decision) -> Option<String> {
        let now = self.limiter.clock().now();
        self.limiter.issue_receipt_at(now, check, decision)
    }

    /// Gives back what the check that issued `receipt` charged, once. A
    /// receipt another node issued is refunded there: the refund is
    /// forwarded to the issuer (one round trip) and its answer returned;
    /// without a way to forward (an embedded limiter) it is refused
    /// [`RefundError::OtherNode`]. A receipt that does not open with the
    /// cluster's key never leaves this node.
    pub async fn refund(&self, receipt: &str) -> Result<RefundOutcome, RefundError> {
        match self.limiter.refund_receipt(receipt) {
            Err(RefundError::OtherNode { slot }) => match &self.forward {
                Some(forward) => forward.forward(slot, receipt.to_owned()).await,
                None => Err(RefundError::OtherNode { slot }),
            },
            other => other,
        }
    }
}

/// Polls `f` once and returns its output if it is ready: enough for a
/// [`Decider::local`], whose decisions never wait, to be used from
/// synchronous code (a CLI, a test, a doc example). `None` if `f` would
/// wait.
pub fn block_on_ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::LimiterConfig;
    use crate::rules::RuleSet;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the commits asked for; each is durable at once.
    #[derive(Default)]
    struct Counting(AtomicU32);

    impl Commit for Counting {
        fn commit(&self) -> CommitFuture {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready(()))
        }
    }

    #[test]
    fn only_decisions_that_count_wait_for_the_commit() {
        let rules = RuleSet::from_toml(
            "[[rules]]\nname = \"u\"\nmatch = { user = \"*\" }\n\
             limits = [ { algorithm = \"fixed_window\", limit = 1, window = \"1m\" } ]\n",
        )
        .unwrap();
        let commits = Arc::new(Counting::default());
        let decider = Decider::local(Arc::new(
            Limiter::new(rules, LimiterConfig::default()).unwrap(),
        ))
        .with_commit(commits.clone());
        let f = [("user", "a")];
        let d = Descriptors::new(&f).unwrap();
        let decide = |cost| block_on_ready(decider.check(&d, cost)).unwrap().unwrap();
        assert!(decide(0).is_allowed());
        assert_eq!(commits.0.load(Ordering::SeqCst), 0, "cost 0 counts nothing");
        assert!(decide(1).is_allowed());
        assert_eq!(commits.0.load(Ordering::SeqCst), 1);
        assert!(!decide(1).is_allowed());
        assert_eq!(
            commits.0.load(Ordering::SeqCst),
            1,
            "a refusal counts nothing"
        );
    }
}
