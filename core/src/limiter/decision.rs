//! What a check answers: the outcome, and the deciding limit's quota as the
//! APIs report it (remaining, reset, retry-after).
//!
//! A request is one or more [`Check`]s (a descriptor set and its cost)
//! decided together: each check gets its own [`Decision`], and the request
//! as a whole a [`Decided`], allowed only if every check is.

use crate::algorithm::{RateAlgorithm, Verdict};
use crate::descriptor::Descriptors;
use crate::key::LimitId;
use std::sync::Arc;

use crate::rules::request::RequestLimit;
use crate::rules::{CompiledLimit, RuleName};
use crate::time::Nanos;

/// One descriptor set of a request and the hits it costs. A request of
/// several checks (an Envoy call with several descriptors, a batch) is
/// decided atomically: every limit of every check allows, or nothing is
/// counted.
#[derive(Clone, Debug)]
pub struct Check<'a> {
    /// Who is asking for what.
    pub descriptors: Descriptors<'a>,
    /// Hits to count; 0 reports the state without counting.
    pub cost: u32,
    /// A limit the request carries: when present the check is decided by it
    /// alone, counted under the descriptors and the limit's parameters,
    /// and the rules do not apply to it (see `rules::request`).
    pub limit: Option<Arc<RequestLimit>>,
}

impl<'a> Check<'a> {
    /// A check of `cost` hits on `descriptors`, against the rules.
    pub fn new(descriptors: Descriptors<'a>, cost: u32) -> Self {
        Check {
            descriptors,
            cost,
            limit: None,
        }
    }

    /// A check of `cost` hits on `descriptors` against a limit of its own.
    pub fn with_limit(descriptors: Descriptors<'a>, cost: u32, limit: Arc<RequestLimit>) -> Self {
        Check {
            descriptors,
            cost,
            limit: Some(limit),
        }
    }
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every matching limit allows; the hit is counted.
    Allowed,
    /// Some limit denies; nothing is counted.
    Denied,
    /// The cost is larger than a matching limit can ever admit.
    Never,
}

impl Outcome {
    /// How a decision is ranked against another: `Never` beats a denial,
    /// a denial beats an allowance.
    fn rank(self) -> u8 {
        match self {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Never => 2,
        }
    }
}

/// The decision for one check, described by the limit that decided it:
/// the one that denied (the longest wait if several did), or when all
/// allowed the one with the least left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allowed, denied, or never admissible.
    pub outcome: Outcome,
    /// The deciding limit, or `None` when no limit applied.
    pub quota: Option<QuotaState>,
    /// A limit of a rule in shadow mode that would have denied the request
    /// (it counted, but does not deny): the one with the longest wait.
    pub shadow: Option<QuotaState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Where the deciding limit stands for the request's key, as the API
/// reports it (remaining quota, reset and retry times).
pub struct QuotaState {
    /// Position of the limit in the rule set that decided (`RuleSet::limits`).
    pub limit_index: usize,
    /// Name of the rule the deciding limit belongs to, taken when the
    /// decision was made (so it stays right across a reload).
    pub rule: RuleName,
    /// The limit's stable id.
    pub limit_id: LimitId,
    /// The limit's quota per period.
    pub limit: u64,
    /// The limit's period.
    pub period: Nanos,
    /// Cost units left in the quota after this request (when denied: left
    /// now, less than the cost).
    pub remaining: u64,
    /// Time until the quota is whole again if nothing else arrives.
    pub reset_after: Nanos,
    /// Zero when allowed.
    pub retry_after: Nanos,
}

impl Decision {
    /// The decision of a check no limit applies to: allowed.
    pub const UNLIMITED: Decision = Decision {
        outcome: Outcome::Allowed,
        quota: None,
        shadow: None,
    };

    /// True when the request was admitted.
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }

    /// The decision of one limit's verdict.
    #[inline]
    pub(super) fn of(limit: &CompiledLimit, verdict: Verdict) -> Decision {
        // `absorb` into `UNLIMITED`, built in place: this is the answer of
        // nearly every decision.
        let (outcome, candidate) = quota_of(limit, verdict);
        if limit.shadow {
            Decision {
                outcome: Outcome::Allowed,
                quota: None,
                shadow: (outcome != Outcome::Allowed).then_some(candidate),
            }
        } else {
            Decision {
                outcome,
                quota: Some(candidate),
                shadow: None,
            }
        }
    }

    /// Folds one limit's verdict into the decision: `Never` beats a denial,
    /// a denial beats an allowance, a longer wait beats a shorter one, and
    /// among allowances the one with least left describes the decision.
    #[inline]
    pub(super) fn absorb(&mut self, limit: &CompiledLimit, verdict: Verdict) {
        let (outcome, candidate) = quota_of(limit, verdict);
        if limit.shadow {
            // Counted, reported, never deciding.
            if outcome != Outcome::Allowed
                && self
                    .shadow
                    .is_none_or(|s| candidate.retry_after > s.retry_after)
            {
                self.shadow = Some(candidate);
            }
            return;
        }
        self.absorb_quota(outcome, candidate);
    }

    /// Folds another decision into this one, by the rule of
    /// [`Decision::absorb`].
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(super) fn absorb_decision(&mut self, other: &Decision) {
        if let Some(q) = other.quota {
            self.absorb_quota(other.outcome, q);
        }
        if let Some(s) = other.shadow {
            if self
                .shadow
                .is_none_or(|mine| s.retry_after > mine.retry_after)
            {
                self.shadow = Some(s);
            }
        }
    }

    fn absorb_quota(&mut self, outcome: Outcome, candidate: QuotaState) {
        let replace = match &self.quota {
            None => true,
            Some(cur) => {
                let (new_rank, cur_rank) = (outcome.rank(), self.outcome.rank());
                new_rank > cur_rank
                    || (new_rank == cur_rank
                        && match outcome {
                            Outcome::Allowed => candidate.remaining < cur.remaining,
                            _ => candidate.retry_after > cur.retry_after,
                        })
            }
        };
        if replace {
            self.outcome = outcome;
            self.quota = Some(candidate);
        }
    }

    /// This check's decision when it would have been allowed but another
    /// check of the same request was not: nothing was counted, so its
    /// quota is reported as it stands, `cost` higher.
    pub(super) fn not_counted(mut self, cost: u32) -> Decision {
        if let Some(q) = self.quota.as_mut() {
            q.remaining = q.remaining.saturating_add(u64::from(cost)).min(q.limit);
        }
        self
    }
}

/// The decision of a whole request: one [`Decision`] per check, and the
/// request's own, allowed only when every check is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    overall: Decision,
    /// One per check when the request had any number but one; for one
    /// check it is empty (its decision is `overall`), so a single check
    /// allocates nothing.
    each: Vec<Decision>,
    single: bool,
}

impl Decided {
    /// The decision of a request of one check.
    pub fn single(decision: Decision) -> Self {
        Decided {
            overall: decision,
            each: Vec::new(),
            single: true,
        }
    }

    /// A request's decision from its parts (as a remote node reported
    /// them): the request's own and each check's, in order.
    pub fn from_parts(overall: Decision, each: Vec<Decision>) -> Self {
        let checks = each.len();
        Decided::new(overall, each, checks)
    }

    /// The decision of a request of `checks` checks: for one, `overall`
    /// alone; otherwise `each` holds theirs, in the request's order.
    pub(super) fn new(overall: Decision, each: Vec<Decision>, checks: usize) -> Self {
        if checks == 1 {
            return Decided::single(overall);
        }
        Decided {
            overall,
            each,
            single: false,
        }
    }

    /// The request's decision: allowed when every check is; otherwise the
    /// refusal with the strongest reason (never over denied, then the
    /// longest wait).
    pub fn decision(&self) -> Decision {
        self.overall
    }

    /// True when the request was admitted (every check allowed and counted).
    pub fn is_allowed(&self) -> bool {
        self.overall.is_allowed()
    }

    /// Each check's decision, in the request's order.
    pub fn each(&self) -> &[Decision] {
        if self.single {
            std::slice::from_ref(&self.overall)
        } else {
            &self.each
        }
    }
}

/// The outcome of one limit's verdict and the quota report it makes.
#[inline]
fn quota_of(limit: &CompiledLimit, verdict: Verdict) -> (Outcome, QuotaState) {
    let algorithm = &limit.algorithm;
    let (outcome, remaining, reset_after, retry_after) = match verdict {
        Verdict::Allow {
            remaining,
            reset_after,
        } => (Outcome::Allowed, remaining, reset_after, Nanos::ZERO),
        Verdict::Deny {
            remaining,
            retry_after,
            reset_after,
        } => (Outcome::Denied, remaining, reset_after, retry_after),
        Verdict::Never { .. } => (Outcome::Never, 0, Nanos::ZERO, Nanos::MAX),
    };
    let candidate = QuotaState {
        limit_index: limit.index,
        limit_id: limit.id,
        rule: limit.rule_name,
        limit: algorithm.quota(),
        period: algorithm.quota_period(),
        remaining,
        reset_after,
        retry_after,
    };
    (outcome, candidate)
}
