//! The core's side of refunds forwarded to the node that issued the
//! receipt (see [`crate::cluster::refunds`]).

use super::NodeCore;
use crate::cluster::refunds::{answer_of, ForwardDone};
use crate::cluster::replication::Transmit;
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::wire::{Frame, RefundAsk, RefundReply};

impl<C: Clock> NodeCore<C> {
    /// A refund this node took for a receipt the node in `issuer` issued:
    /// forwarded to it if it is a live peer. The answer comes out of
    /// [`NodeCore::poll_refund_done`] under the returned ticket, within
    /// [`crate::cluster::refunds::FORWARD_TIMEOUT`].
    pub fn handle_forward_refund(&mut self, now: Nanos, issuer: NodeSlot, receipt: String) -> u64 {
        self.saw(now);
        let reachable = self.live.contains(&issuer);
        let ticket = self.refunds.begin(now, issuer, receipt, reachable);
        self.after_input();
        ticket
    }

    /// The next forwarded refund that ended.
    pub fn poll_refund_done(&mut self) -> Option<ForwardDone> {
        self.refunds.poll_done()
    }

    /// A peer forwards a refund of one of this node's receipts: apply it
    /// as if the client had come here, and answer.
    pub(super) fn on_refund_ask(&mut self, now: Nanos, from: NodeSlot, ask: RefundAsk) {
        let result = self.limiter.refund_receipt_at(now, &ask.receipt);
        if let Ok(outcome) = &result {
            tracing::debug!(
                from = from.get(),
                refunded = outcome.refunded(),
                "refund forwarded by a peer"
            );
        }
        let reply = answer_of(self.cfg.slot, &ask, &result);
        self.outbox.push_back(Transmit {
            to: from,
            bytes: Frame::RefundReply(reply).encode(),
            reliable: true,
        });
    }

    /// The issuer answered one of our forwards.
    pub(super) fn on_refund_reply(&mut self, from: NodeSlot, reply: &RefundReply) {
        self.refunds.on_reply(from, reply);
    }

    /// Asks waiting to go out, into the outbox.
    pub(super) fn send_refund_asks(&mut self) {
        while let Some((to, ask)) = self.refunds.poll_send() {
            self.outbox.push_back(Transmit {
                to,
                bytes: Frame::RefundAsk(ask).encode(),
                reliable: true,
            });
        }
    }
}
