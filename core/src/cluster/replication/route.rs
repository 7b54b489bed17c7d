//! Frame routing: an incoming frame is checked whole before anything
//! changes, then handed to the part that handles its kind.

use super::claim::carried_keys;
use super::{ReplicaStore, Replicator};
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{
    DecodeError, Forget, Frame, Leave, RefundAsk, RefundReply, ResetAck, ResetFrame, RulesAck,
    RulesFrame, Slots,
};

/// What an accepted frame leaves for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Handled here (merged, acknowledged, answered).
    Applied,
    /// A membership payload, for the membership state machine.
    Swim(Vec<u8>),
    /// Rules a peer put in force, for the node to weigh against its own.
    Rules(RulesFrame),
    /// Counters a peer's admin reset, for the node to apply once.
    Reset(ResetFrame),
    /// A peer applied one of this node's resets.
    ResetAck(ResetAck),
    /// A peer's answer to our rules, for the rules register.
    RulesAck(RulesAck),
    /// A refund a peer took for a receipt this node issued.
    RefundAsk(RefundAsk),
    /// A peer's answer to a refund this node forwarded to it.
    RefundReply(RefundReply),
    /// A peer is leaving the cluster cleanly.
    Leave(Leave),
    /// A peer's operator forgot a member.
    Forget(Forget),
}

/// Why an incoming frame was refused. The frame changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    /// The frame's bytes do not decode.
    Decode(#[from] DecodeError),
    #[error("frame from {from} carries {carried}: nodes only send their own slot")]
    /// A data frame carries values of a slot other than its sender's.
    ForeignSlot {
        /// The sender.
        from: NodeSlot,
        /// The slot the frame carries.
        carried: NodeSlot,
    },
    #[error("{0} is outside the cluster")]
    /// The sender's slot is not below the cluster size.
    UnknownSlot(NodeSlot),
    #[error("recovery data arrived while not recovering")]
    /// Recovery data arrived but this node is not recovering.
    UnexpectedRecovery,
    #[error("hello names {claimed} on the connection of {from}")]
    /// A hello names a slot other than the connection's peer.
    HelloMismatch {
        /// The connection's peer.
        from: NodeSlot,
        /// The slot the hello names.
        claimed: NodeSlot,
    },
}

/// Refuses a frame whose carried slot is not `expected`.
fn carried_by(from: NodeSlot, carried: u16, expected: NodeSlot) -> Result<(), FrameError> {
    if carried == expected.get() {
        Ok(())
    } else {
        Err(FrameError::ForeignSlot {
            from,
            carried: NodeSlot::new(carried),
        })
    }
}

/// Checks everything about a decoded frame that does not depend on the
/// replicator's state beyond `recovering`.
fn check(frame: &Frame, from: NodeSlot, recovering: bool) -> Result<(), FrameError> {
    match frame {
        Frame::Hello(h) if h.slot != from.get() => Err(FrameError::HelloMismatch {
            from,
            claimed: NodeSlot::new(h.slot),
        }),
        Frame::Delta(s) | Frame::Sync(s) | Frame::Claim(s) | Frame::Answer(s) => {
            carried_by(from, s.slot, from)
        }
        // The slots relayed with an answer are checked against the store
        // (and this node's own) before anything is merged.
        Frame::RelayedAnswer(a) => carried_by(from, a.answer.slot, from),
        // Recovery carries this node's own slot and the slots the sender
        // relays (members that left or died); merging takes a per-slot
        // maximum, so a relayed value raises a count at most to what its
        // owner sent.
        Frame::Recovery(_) | Frame::RecoveryDone(_) if !recovering => {
            Err(FrameError::UnexpectedRecovery)
        }
        Frame::RecoveryDone(d) => carried_by(from, d.slot, from),
        Frame::Ack(a) => carried_by(from, a.slot, from),
        // Resets are not relayed: each comes from its origin.
        Frame::Reset(r) => carried_by(from, r.origin, from),
        Frame::ResetAck(a) => carried_by(from, a.slot, from),
        Frame::RefundAsk(r) => carried_by(from, r.slot, from),
        Frame::RefundReply(r) => carried_by(from, r.slot, from),
        Frame::Leave(l) => carried_by(from, l.slot, from),
        Frame::Forget(f) => carried_by(from, f.slot, from),
        Frame::Hearing(h) => carried_by(from, h.slot, from),
        _ => Ok(()),
    }
}

impl Replicator {
    /// Handles one frame that arrived from the (authenticated) peer `from`,
    /// and says what it leaves for the caller (a membership payload, rules).
    pub fn handle_frame(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        bytes: &[u8],
        store: &(impl ReplicaStore + ?Sized),
        rules_digest: u64,
    ) -> Result<Delivered, FrameError> {
        let result = self.apply_frame(now, from, bytes, store, rules_digest);
        match &result {
            Ok(_) => self.stats.frames_received += 1,
            Err(_) => self.stats.frames_refused += 1,
        }
        result
    }

    fn apply_frame(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        bytes: &[u8],
        store: &(impl ReplicaStore + ?Sized),
        rules_digest: u64,
    ) -> Result<Delivered, FrameError> {
        if from.index() >= store.slots() || from == self.cfg.own {
            return Err(FrameError::UnknownSlot(from));
        }
        let frame = Frame::decode(bytes)?;
        // Check everything about the frame before any state changes.
        check(&frame, from, self.recovering)?;
        if let Frame::Recovery(s) = &frame {
            if usize::from(s.slot) >= store.slots() {
                return Err(FrameError::UnknownSlot(NodeSlot::new(s.slot)));
            }
        }
        if let Frame::RelayedAnswer(a) = &frame {
            for other in &a.others {
                let carried = NodeSlot::new(other.slot);
                if usize::from(other.slot) >= store.slots() {
                    return Err(FrameError::UnknownSlot(carried));
                }
                // Nobody knows this node's own counts better than it does.
                if carried == self.cfg.own {
                    return Err(FrameError::ForeignSlot { from, carried });
                }
            }
        }
        self.add_peer(from);
        let gap = self.cfg.sync_interval * 4;
        if let Some(p) = self.peers.get_mut(&from) {
            // Heard again after a silence (it was paused, cut off, or just
            // idle): what it answers now about our frames of before may
            // have been read late, so those answers do not time clocks.
            if p.last_heard.is_some_and(|t| now.saturating_sub(t) > gap) {
                p.clock_since = now;
            }
            p.last_heard = Some(now);
        }
        self.unfence(from, rules_digest);
        // A peer we settled rounds without is back: our whole state first.
        if self
            .peers
            .get(&from)
            .is_some_and(|p| p.owed_sync && p.sync_out.is_none())
        {
            self.full_sync(now, from, store);
        }
        // After this frame is applied, claims yielding to `from` on the keys
        // it carries decide again.
        let carried = match &frame {
            Frame::Delta(s) | Frame::Sync(s) | Frame::Claim(s) | Frame::Answer(s)
                if !self.yielding.is_empty() =>
            {
                Some(carried_keys(s))
            }
            Frame::RelayedAnswer(a) if !self.yielding.is_empty() => Some(carried_keys(&a.answer)),
            _ => None,
        };
        match frame {
            Frame::Hello(h) => self.on_hello(now, from, h, store, rules_digest),
            Frame::Delta(s) => {
                self.merge_slots(now, from, &s, store);
                self.note_received(now, from, &s);
            }
            Frame::Sync(s) => {
                self.merge_slots(now, from, &s, store);
                self.note_received(now, from, &s);
                if s.last {
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.synced_from = true;
                    }
                }
            }
            Frame::Recovery(s) => {
                self.merge_slots(now, NodeSlot::new(s.slot), &s, store);
                self.note_received(now, from, &s);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.recovery_rounds.insert(s.round);
                }
                self.recovery_progress(now, from);
            }
            Frame::RecoveryDone(d) => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.recovery_done = Some((d.first, d.last));
                }
                let own = self.cfg.own;
                self.awaited.extend(
                    d.vouched
                        .iter()
                        .map(|&s| NodeSlot::new(s))
                        .filter(|&s| s != own && s != from),
                );
                self.recovery_progress(now, from);
            }
            Frame::Ack(a) => self.on_ack(now, from, &a, store),
            Frame::Claim(s) => self.on_claim(now, from, &s, store),
            Frame::Answer(s) => self.on_answer(now, from, &s, store),
            Frame::RelayedAnswer(a) => {
                // What the answerer knows of others first: the claim is
                // decided on them too.
                for other in &a.others {
                    self.merge_slots(now, NodeSlot::new(other.slot), other, store);
                }
                self.stats.values_relayed_in +=
                    a.others.iter().map(Slots::values).sum::<usize>() as u64;
                self.on_answer(now, from, &a.answer, store);
            }
            Frame::Swim(s) => return Ok(Delivered::Swim(s.payload)),
            Frame::Rules(r) => {
                // Not a reason to re-check recovery now: the caller adopts
                // these rules after this returns, and the gate opens at the
                // next tick at the earliest.
                if let Some(p) = self.peers.get_mut(&from) {
                    p.rules_heard = true;
                }
                return Ok(Delivered::Rules(r));
            }
            Frame::Reset(r) => return Ok(Delivered::Reset(r)),
            Frame::ResetAck(a) => return Ok(Delivered::ResetAck(a)),
            Frame::RulesAck(a) => return Ok(Delivered::RulesAck(a)),
            Frame::RefundAsk(r) => return Ok(Delivered::RefundAsk(r)),
            Frame::RefundReply(r) => return Ok(Delivered::RefundReply(r)),
            Frame::Leave(l) => return Ok(Delivered::Leave(l)),
            Frame::Forget(f) => return Ok(Delivered::Forget(f)),
            Frame::Hearing(h) => self.on_hearing(now, from, &h),
        }
        if let Some(keys) = carried {
            self.heard_from(from, Some(&keys));
        }
        Ok(Delivered::Applied)
    }

    /// Merges the values of `slot` carried by `s`.
    pub(super) fn merge_slots(
        &mut self,
        now: Nanos,
        slot: NodeSlot,
        s: &Slots,
        store: &(impl ReplicaStore + ?Sized),
    ) {
        let merged = store.merge(now, self.cfg.max_ahead, slot, s);
        self.stats.values_merged += merged.applied;
        self.stats.values_stale += merged.stale;
        self.stats.values_too_far_ahead += merged.too_far_ahead;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Ack, Hello, RecoveryDone};

    fn slots(slot: u16) -> Slots {
        Slots {
            slot,
            round: 1,
            sent_at: 1,
            last: true,
            groups: Vec::new(),
        }
    }

    #[test]
    fn frames_must_carry_the_sender_s_own_slot() {
        let peer = NodeSlot::new(1);
        assert_eq!(check(&Frame::Delta(slots(1)), peer, false), Ok(()));
        assert_eq!(
            check(&Frame::Sync(slots(2)), peer, false),
            Err(FrameError::ForeignSlot {
                from: peer,
                carried: NodeSlot::new(2)
            })
        );
        let ack = Ack {
            slot: 0,
            rounds: vec![1],
            echo_sent_at: 0,
            received_at: 0,
            replied_at: 0,
        };
        assert!(check(&Frame::Ack(ack), peer, false).is_err());
        let hello = Hello {
            slot: 2,
            name: "n".into(),
            incarnation: 1,
            rules_digest: 0,
            recovering: false,
        };
        assert_eq!(
            check(&Frame::Hello(hello), peer, false),
            Err(FrameError::HelloMismatch {
                from: peer,
                claimed: NodeSlot::new(2)
            })
        );
    }

    #[test]
    fn recovery_relays_any_slot_and_only_while_recovering() {
        let peer = NodeSlot::new(1);
        // Our own slot, and the slot of a member that left (relayed).
        assert_eq!(check(&Frame::Recovery(slots(0)), peer, true), Ok(()));
        assert_eq!(check(&Frame::Recovery(slots(2)), peer, true), Ok(()));
        assert_eq!(
            check(&Frame::Recovery(slots(0)), peer, false),
            Err(FrameError::UnexpectedRecovery)
        );
        let done = |slot| {
            Frame::RecoveryDone(RecoveryDone {
                slot,
                first: 1,
                last: 2,
                vouched: Vec::new(),
            })
        };
        assert_eq!(check(&done(1), peer, true), Ok(()));
        assert_eq!(
            check(&done(1), peer, false),
            Err(FrameError::UnexpectedRecovery)
        );
        assert!(matches!(
            check(&done(2), peer, true),
            Err(FrameError::ForeignSlot { .. })
        ));
    }
}
