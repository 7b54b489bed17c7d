//! Refunds of receipts another node issued: forwarded to the issuer.
//!
//! Only the node that issued a receipt knows whether it was refunded
//! already (its spent set), so only it may apply the refund. A node that
//! takes a refund of a receipt issued elsewhere asks the issuer over the
//! peer connection ([`RefundAsk`]); the issuer applies it exactly as if the
//! client had come to it, and answers ([`RefundReply`]) with what it gave
//! back or why it gave nothing. The client sees the issuer's answer, from
//! whichever node it asked.
//!
//! A forward that gets no answer within [`FORWARD_TIMEOUT`] (the issuer is
//! down, paused or cut off) ends [`RefundError::Unreachable`]: the refund
//! may or may not have been applied, and a retry is safe, since the
//! issuer's spent set refunds a receipt once however often it is asked.

use std::collections::{BTreeMap, VecDeque};

use crate::key::LimitId;
use crate::limiter::{LimitRefund, RefundError, RefundOutcome};
use crate::receipt::ReceiptError;
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{RefundAnswer, RefundAsk, RefundReply, RefundedLimit, RefusedCode};

/// How long a forwarded refund waits for the issuer's answer.
pub const FORWARD_TIMEOUT: Nanos = Nanos::from_millis(500);
/// Most forwarded refunds waiting at once; more are answered
/// [`RefundError::Unreachable`] at once rather than queued without bound.
pub const MAX_WAITING: usize = 4096;

/// A forwarded refund that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardDone {
    /// The ticket [`Forwards::begin`] gave.
    pub ticket: u64,
    /// The issuer's answer, or [`RefundError::Unreachable`].
    pub result: Result<RefundOutcome, RefundError>,
}

/// One node's forwarded refunds, waiting for their issuers' answers.
pub struct Forwards {
    own: NodeSlot,
    next: u64,
    /// ticket → (issuer, deadline).
    waiting: BTreeMap<u64, (NodeSlot, Nanos)>,
    sends: VecDeque<(NodeSlot, RefundAsk)>,
    done: VecDeque<ForwardDone>,
}

impl Forwards {
    /// No forwards yet, for the node in slot `own`.
    pub fn new(own: NodeSlot) -> Forwards {
        Forwards {
            own,
            next: 1,
            waiting: BTreeMap::new(),
            sends: VecDeque::new(),
            done: VecDeque::new(),
        }
    }

    /// Forwards the refund of `receipt` to its issuer `to`, if `reachable`
    /// (a live peer); otherwise it ends unreachable at once. The answer
    /// comes out of [`Forwards::poll_done`] under the returned ticket.
    pub fn begin(&mut self, now: Nanos, to: NodeSlot, receipt: String, reachable: bool) -> u64 {
        let ticket = self.next;
        self.next += 1;
        if !reachable || to == self.own || self.waiting.len() >= MAX_WAITING {
            self.done.push_back(ForwardDone {
                ticket,
                result: Err(RefundError::Unreachable { slot: to.get() }),
            });
            return ticket;
        }
        self.waiting.insert(ticket, (to, now + FORWARD_TIMEOUT));
        self.sends.push_back((
            to,
            RefundAsk {
                slot: self.own.get(),
                id: ticket,
                receipt,
            },
        ));
        ticket
    }

    /// The answer to one of our forwards, from `from`. An answer from
    /// another node than the one asked, or to a forward that already ended,
    /// changes nothing.
    pub fn on_reply(&mut self, from: NodeSlot, reply: &RefundReply) {
        match self.waiting.get(&reply.id) {
            Some(&(to, _)) if to == from => {}
            _ => return,
        }
        self.waiting.remove(&reply.id);
        self.done.push_back(ForwardDone {
            ticket: reply.id,
            result: outcome_of(&reply.outcome, from),
        });
    }

    /// The peer `slot` is down: its forwards end unreachable now.
    pub fn on_down(&mut self, slot: NodeSlot) {
        let gone: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (to, _))| *to == slot)
            .map(|(&t, _)| t)
            .collect();
        for ticket in gone {
            self.waiting.remove(&ticket);
            self.done.push_back(ForwardDone {
                ticket,
                result: Err(RefundError::Unreachable { slot: slot.get() }),
            });
        }
    }

    /// Ends the forwards whose issuers did not answer by `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        let late: Vec<(u64, NodeSlot)> = self
            .waiting
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(&t, &(to, _))| (t, to))
            .collect();
        for (ticket, to) in late {
            self.waiting.remove(&ticket);
            self.done.push_back(ForwardDone {
                ticket,
                result: Err(RefundError::Unreachable { slot: to.get() }),
            });
        }
    }

    /// The earliest deadline of a waiting forward.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.waiting.values().map(|&(_, d)| d).min()
    }

    /// The next ask to send, and to whom.
    pub fn poll_send(&mut self) -> Option<(NodeSlot, RefundAsk)> {
        self.sends.pop_front()
    }

    /// The next forward that ended.
    pub fn poll_done(&mut self) -> Option<ForwardDone> {
        self.done.pop_front()
    }

    /// Forwards waiting for an answer.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The issuer's answer to an ask, from what its own refund did.
pub fn answer_of(
    own: NodeSlot,
    ask: &RefundAsk,
    result: &Result<RefundOutcome, RefundError>,
) -> RefundReply {
    let outcome = match result {
        Ok(o) => RefundAnswer::Refunded {
            requested: o.requested,
            limits: o
                .limits
                .iter()
                .map(|l| RefundedLimit {
                    limit: l.limit_id.0,
                    refunded: l.refunded,
                })
                .collect(),
        },
        Err(e) => RefundAnswer::Refused(match e {
            RefundError::Invalid(_) => RefusedCode::Invalid,
            RefundError::OtherNode { .. } | RefundError::Unreachable { .. } => {
                RefusedCode::OtherNode
            }
            RefundError::OtherRun => RefusedCode::OtherRun,
            RefundError::AlreadyRefunded => RefusedCode::AlreadyRefunded,
            RefundError::Expired => RefusedCode::Expired,
            RefundError::LedgerFull => RefusedCode::LedgerFull,
            RefundError::Recovering => RefusedCode::Recovering,
        } as u8),
    };
    RefundReply {
        slot: own.get(),
        id: ask.id,
        outcome,
    }
}

/// What the client is told of an issuer's answer (`from` is the issuer).
fn outcome_of(answer: &RefundAnswer, from: NodeSlot) -> Result<RefundOutcome, RefundError> {
    match answer {
        RefundAnswer::Refunded { requested, limits } => Ok(RefundOutcome {
            requested: *requested,
            limits: limits
                .iter()
                .map(|l| LimitRefund {
                    limit_id: LimitId(l.limit),
                    refunded: l.refunded,
                })
                .collect(),
        }),
        RefundAnswer::Refused(code) => Err(match RefusedCode::from_byte(*code) {
            Some(RefusedCode::Invalid) => RefundError::Invalid(ReceiptError::Invalid),
            // The issuer says it did not issue it: the receipt names it, so
            // the receipt is not one of this cluster's.
            Some(RefusedCode::OtherNode) => RefundError::Invalid(ReceiptError::Invalid),
            Some(RefusedCode::OtherRun) => RefundError::OtherRun,
            Some(RefusedCode::AlreadyRefunded) => RefundError::AlreadyRefunded,
            Some(RefusedCode::Expired) => RefundError::Expired,
            Some(RefusedCode::LedgerFull) => RefundError::LedgerFull,
            Some(RefusedCode::Recovering) => RefundError::Recovering,
            // Refused at decoding; not reached.
            None => RefundError::Unreachable { slot: from.get() },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(i: u16) -> NodeSlot {
        NodeSlot::new(i)
    }

    #[test]
    fn an_answer_from_the_issuer_ends_the_forward_with_its_outcome() {
        let mut f = Forwards::new(slot(0));
        let t = f.begin(Nanos::ZERO, slot(2), "r".into(), true);
        let (to, ask) = f.poll_send().unwrap();
        assert_eq!((to, ask.slot, ask.id), (slot(2), 0, t));
        let ok = Ok(RefundOutcome {
            requested: 3,
            limits: vec![LimitRefund {
                limit_id: LimitId(9),
                refunded: 3,
            }],
        });
        let reply = answer_of(slot(2), &ask, &ok);
        // From someone else than the issuer: ignored.
        f.on_reply(slot(1), &reply);
        assert!(f.poll_done().is_none());
        f.on_reply(slot(2), &reply);
        assert_eq!(
            f.poll_done(),
            Some(ForwardDone {
                ticket: t,
                result: ok
            })
        );
        // A duplicate answer changes nothing.
        f.on_reply(slot(2), &reply);
        assert!(f.poll_done().is_none());
        assert_eq!(f.waiting(), 0);
    }

    #[test]
    fn refusals_come_back_as_the_issuers_reason() {
        let mut f = Forwards::new(slot(0));
        for (err, expect) in [
            (RefundError::AlreadyRefunded, RefundError::AlreadyRefunded),
            (RefundError::Expired, RefundError::Expired),
            (RefundError::OtherRun, RefundError::OtherRun),
            (RefundError::Recovering, RefundError::Recovering),
            (RefundError::LedgerFull, RefundError::LedgerFull),
        ] {
            let t = f.begin(Nanos::ZERO, slot(1), "r".into(), true);
            let (_, ask) = f.poll_send().unwrap();
            f.on_reply(slot(1), &answer_of(slot(1), &ask, &Err(err)));
            assert_eq!(
                f.poll_done().unwrap(),
                ForwardDone {
                    ticket: t,
                    result: Err(expect)
                }
            );
        }
    }

    #[test]
    fn silence_ends_unreachable_at_the_deadline_and_a_down_peer_at_once() {
        let mut f = Forwards::new(slot(0));
        let a = f.begin(Nanos::ZERO, slot(1), "a".into(), true);
        let b = f.begin(Nanos::ZERO, slot(2), "b".into(), true);
        assert_eq!(f.poll_timeout(), Some(FORWARD_TIMEOUT));
        f.handle_timeout(FORWARD_TIMEOUT - Nanos::from_millis(1));
        assert!(f.poll_done().is_none());
        f.on_down(slot(2));
        assert_eq!(
            f.poll_done().unwrap(),
            ForwardDone {
                ticket: b,
                result: Err(RefundError::Unreachable { slot: 2 })
            }
        );
        f.handle_timeout(FORWARD_TIMEOUT);
        assert_eq!(
            f.poll_done().unwrap(),
            ForwardDone {
                ticket: a,
                result: Err(RefundError::Unreachable { slot: 1 })
            }
        );
        assert_eq!(f.poll_timeout(), None);
    }

    #[test]
    fn an_unreachable_issuer_is_answered_at_once_and_nothing_is_sent() {
        let mut f = Forwards::new(slot(0));
        let t = f.begin(Nanos::ZERO, slot(3), "r".into(), false);
        assert!(f.poll_send().is_none());
        assert_eq!(
            f.poll_done().unwrap(),
            ForwardDone {
                ticket: t,
                result: Err(RefundError::Unreachable { slot: 3 })
            }
        );
    }
}
