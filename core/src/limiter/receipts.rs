//! Refunds by receipt: the only refund a caller outside the process can ask
//! for.
//!
//! An allowed check of cost > 0 through [`Limiter::check_with_receipt`]
//! (or any check followed by `Limiter::issue_receipt_at`) gets a sealed
//! [`Receipt`] naming every limit and key it counted. A refund
//! through [`Limiter::refund_receipt`] presents it and gives back exactly
//! that cost on exactly those keys, once:
//!
//! - forged or altered receipts fail the MAC (400);
//! - a receipt is spent on the node that issued it, in the same run of that
//!   node (slot and boot id match): the spent set is node-local, so this
//!   rule is what stops one receipt from being refunded on two nodes, or on
//!   one node before and after a restart;
//! - a receipt is good while its charge is still in a limit's window; a
//!   limit whose window has passed (or that the rules no longer have) is
//!   refunded 0 and said so;
//! - the spent set holds at most [`MAX_SPENT`] receipts until their windows
//!   pass: a node with that many unexpired spent receipts refuses further
//!   refunds (fail closed) rather than forget one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Check, CheckError, Decision, Limiter};
use crate::descriptor::Descriptors;
use crate::key::{CounterKey, LimitId};
use crate::receipt::{Charge, Receipt, ReceiptError, ReceiptKey, MAX_CHARGES};
use crate::time::{Clock, Nanos};
use crate::window::Ring;

/// Most spent receipts a node remembers at once (about 20 MiB at worst).
pub const MAX_SPENT: usize = 1 << 20;

/// This node's receipt state: the sealing key, its identity in receipts,
/// the nonce counter and the spent set.
pub(super) struct Receipts {
    key: ReceiptKey,
    boot: u64,
    nonce: AtomicU64,
    spent: Mutex<SpentSet>,
}

impl Receipts {
    pub(super) fn new(key: ReceiptKey, boot: u64, capacity: usize) -> Receipts {
        Receipts {
            key,
            boot,
            nonce: AtomicU64::new(1),
            spent: Mutex::new(SpentSet::new(capacity)),
        }
    }
}

/// Nonces of spent receipts with the time each can be forgotten.
struct SpentSet {
    capacity: usize,
    until: HashMap<u64, Nanos>,
}

impl SpentSet {
    fn new(capacity: usize) -> SpentSet {
        SpentSet {
            capacity,
            until: HashMap::new(),
        }
    }

    /// Marks `nonce` spent until `until`. `Err` if it already was, or if the
    /// set is full of unexpired receipts.
    fn spend(&mut self, now: Nanos, nonce: u64, until: Nanos) -> Result<(), RefundError> {
        if let Some(&u) = self.until.get(&nonce) {
            if u > now {
                return Err(RefundError::AlreadyRefunded);
            }
        }
        if self.until.len() >= self.capacity {
            self.until.retain(|_, u| *u > now);
            if self.until.len() >= self.capacity {
                return Err(RefundError::LedgerFull);
            }
        }
        self.until.insert(nonce, until);
        Ok(())
    }
}

/// What one limit of a receipt gave back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitRefund {
    /// The limit's stable id, as the receipt names it.
    pub limit_id: LimitId,
    /// Hits given back: the receipt's cost, or less when some of its
    /// window has passed; 0 when the limit is gone or its window passed.
    pub refunded: u32,
}

/// What a refund changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundOutcome {
    /// The cost the receipt charged.
    pub requested: u32,
    /// One entry per limit the receipt names, in its order.
    pub limits: Vec<LimitRefund>,
}

impl RefundOutcome {
    /// The smallest amount given back over the receipt's limits.
    pub fn refunded(&self) -> u32 {
        self.limits.iter().map(|l| l.refunded).min().unwrap_or(0)
    }
}

/// Why a refund was refused. Nothing was refunded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundError {
    /// Forged, altered or not a receipt at all.
    #[error(transparent)]
    Invalid(#[from] ReceiptError),
    /// Issued by another node: only the issuer knows whether it was spent.
    #[error("this receipt was issued by the node in slot {slot}: refund it there")]
    OtherNode {
        /// The issuing node's slot.
        slot: u16,
    },
    /// Issued by this node before it restarted: its spent set is gone.
    #[error("this receipt was issued before this node restarted and can no longer be refunded")]
    OtherRun,
    /// Spent already, and its windows have not passed.
    #[error("this receipt was already refunded")]
    AlreadyRefunded,
    /// Every limit it names has left its window (or is gone).
    #[error("every window this receipt charged has passed: there is nothing to give back")]
    Expired,
    /// [`MAX_SPENT`] unexpired spent receipts: refused rather than forget
    /// one (fail closed). Retry once some windows have passed.
    #[error("this node holds too many unexpired spent receipts to accept another refund now")]
    LedgerFull,
    /// The node is still recovering its counts after a restart.
    #[error("this node is recovering its counts after a restart and refunds nothing yet")]
    Recovering,
    /// Issued by another node, which did not answer the forwarded refund
    /// in time (down, paused or cut off). Whether it applied the refund is
    /// not known; a retry is safe: a receipt is refunded once however often
    /// it is presented.
    #[error("this receipt was issued by the node in slot {slot}, which did not answer in time: retry later (a receipt is never refunded twice)")]
    Unreachable {
        /// The issuing node's slot.
        slot: u16,
    },
}

impl<C: Clock> Limiter<C> {
    /// [`Limiter::check`], and when the request was allowed at a cost above
    /// zero, the sealed receipt a refund must present (see
    /// `Limiter::issue_receipt_at` for when there is none).
    pub fn check_with_receipt(
        &self,
        d: &Descriptors<'_>,
        cost: u32,
    ) -> Result<(Decision, Option<String>), CheckError> {
        let now = self.clock.now();
        let decision = self.check_at(now, d, cost)?;
        let receipt = self.issue_receipt_at(now, &Check::new(*d, cost), &decision);
        Ok((decision, receipt))
    }

    /// The receipt of a check already decided (by [`Limiter::check`] or a
    /// node's own decision path) at `now`: pass exactly that check (its
    /// descriptors, cost and any limit it carried) and its decision.
    /// Trusted, in-process: a receipt lets
    /// its holder give `cost` back. `None` when the check was not allowed,
    /// cost 0, no limit counted it, it counted more than
    /// [`MAX_CHARGES`] limits, or the rules changed since the decision (the
    /// receipt would name other limits).
    pub(crate) fn issue_receipt_at(
        &self,
        now: Nanos,
        check: &Check<'_>,
        decision: &Decision,
    ) -> Option<String> {
        let (d, cost) = (&check.descriptors, check.cost);
        if !decision.is_allowed() || cost == 0 {
            return None;
        }
        let mut charges = Vec::new();
        match &check.limit {
            Some(limit) => charges.push(Charge {
                limit_id: limit.limit().id,
                key: self.request_key(d, limit),
            }),
            None => {
                let compiled = self.compiled.load();
                compiled.rules.for_each_match(d, |m| {
                    let values = m.key_fields.iter().map(|f| d.get(f).unwrap_or(""));
                    charges.push(Charge {
                        limit_id: m.limit.id,
                        key: self.hasher.key(m.limit.id, values),
                    });
                });
            }
        }
        let decided_by_these = decision
            .quota
            .is_some_and(|q| charges.iter().any(|c| c.limit_id == q.limit_id));
        if !decided_by_these || charges.len() > MAX_CHARGES {
            return None;
        }
        let receipt = Receipt {
            node: self.config.own_slot.index() as u16,
            boot: self.receipts.boot,
            issued: now,
            cost,
            nonce: self.receipts.nonce.fetch_add(1, Ordering::Relaxed),
            charges,
        };
        receipt.seal(&self.receipts.key)
    }

    /// Refunds what the check that issued `receipt` charged: its cost on
    /// each of its limits' keys, once. This is the one refund entry point
    /// for callers outside the process (HTTP, gRPC).
    pub fn refund_receipt(&self, receipt: &str) -> Result<RefundOutcome, RefundError> {
        self.refund_receipt_at(self.clock.now(), receipt)
    }

    /// [`Limiter::refund_receipt`] at an explicit time.
    pub fn refund_receipt_at(
        &self,
        now: Nanos,
        receipt: &str,
    ) -> Result<RefundOutcome, RefundError> {
        let r = Receipt::open(receipt, &self.receipts.key)?;
        if usize::from(r.node) != self.config.own_slot.index() {
            return Err(RefundError::OtherNode { slot: r.node });
        }
        if r.boot != self.receipts.boot {
            return Err(RefundError::OtherRun);
        }
        if !self.is_admitting() {
            return Err(RefundError::Recovering);
        }
        let compiled = self.compiled.load();
        // The receipt stays spendable while any of its charges is live.
        let mut until = Nanos::ZERO;
        let mut live = Vec::with_capacity(r.charges.len());
        for c in &r.charges {
            let table = compiled
                .by_id
                .get(&c.limit_id)
                .map(|&i| &compiled.tables[i]);
            let in_window = table.filter(|t| {
                let spec = t.spec();
                spec.epoch(r.issued) + spec.buckets() as u64 > spec.epoch(now) && r.issued <= now
            });
            if let Some(t) = in_window {
                let end = r.issued + t.spec().span();
                until = until.max(end);
            }
            live.push((c, in_window));
        }
        if live.iter().all(|(_, t)| t.is_none()) {
            return Err(RefundError::Expired);
        }
        self.receipts
            .spent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(now, r.nonce, until)?;
        let mut limits = Vec::with_capacity(live.len());
        for (c, table) in live {
            let refunded = match table.and_then(|t| t.get(c.key)) {
                Some(mut entry) => {
                    let spec = entry.spec();
                    let given = Ring::refund(&mut entry, &spec, now, self.config.own_slot, r.cost);
                    if given > 0 && entry.mark_dirty() {
                        if let Some(cluster) = &self.cluster {
                            cluster
                                .journal
                                .push(CounterKey::new(c.limit_id, entry.key()));
                        }
                    }
                    given
                }
                None => 0,
            };
            limits.push(LimitRefund {
                limit_id: c.limit_id,
                refunded,
            });
        }
        Ok(RefundOutcome {
            requested: r.cost,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_spent_once_until_it_expires() {
        let mut s = SpentSet::new(2);
        let t = Nanos::from_secs(10);
        assert_eq!(s.spend(t, 1, Nanos::from_secs(20)), Ok(()));
        assert_eq!(
            s.spend(t, 1, Nanos::from_secs(20)),
            Err(RefundError::AlreadyRefunded)
        );
        assert_eq!(s.spend(t, 2, Nanos::from_secs(12)), Ok(()));
        // Full of unexpired receipts: refuse rather than forget.
        assert_eq!(
            s.spend(t, 3, Nanos::from_secs(20)),
            Err(RefundError::LedgerFull)
        );
        // Once nonce 2's window passed its room is reused.
        assert_eq!(
            s.spend(Nanos::from_secs(13), 3, Nanos::from_secs(20)),
            Ok(())
        );
        assert_eq!(s.until.len(), 2);
    }
}
