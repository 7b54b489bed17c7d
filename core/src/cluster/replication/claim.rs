//! Claims: near a limit, a node counts a request's hits provisionally and
//! asks every peer it waits for to merge them and answer with its own
//! counts of the keys, and with what it holds of the counts of nodes the
//! claimant cannot hear, so that no two nodes spend the last of a quota on
//! stale counts.
//! Conflicting claims are settled in favour of the earlier.

use std::collections::{BTreeMap, BTreeSet};

use super::{ReplicaStore, Replicator};
use crate::cluster::store::CounterKey;
use crate::key::{KeyDigest, LimitId};
use crate::peer_set::PeerSet;
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{Frame, KeySlots, LimitGroup, RelayedAnswer, Slots, MAX_SUSPECTS};

/// How a claim ended, for the caller to decide the request it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimEvent {
    /// Every peer waited for answered; `answered` holds the peer slots
    /// whose own counts of the keys are now merged.
    Answered {
        /// The ticket [`Replicator::claim`](super::Replicator::claim) returned.
        ticket: u64,
        /// The peer slots that answered.
        answered: PeerSet,
    },
    /// Not every peer answered within the claim timeout.
    Expired {
        /// The ticket of the claim that expired.
        ticket: u64,
    },
}

/// An answered claim waiting for the outcome of later conflicting claims.
pub(super) struct Yielding {
    pub(super) keys: Vec<CounterKey>,
    /// Peers whose later claims it waits on.
    pub(super) blocking: PeerSet,
    /// Who answered the claim.
    pub(super) answered: PeerSet,
    pub(super) deadline: Nanos,
}

/// A claim waiting for its answers.
pub(super) struct OpenClaim {
    /// When its hits were counted, by this node's clock: sent with every
    /// copy of the claim (it orders conflicting claims).
    pub(super) started: Nanos,
    pub(super) keys: Vec<CounterKey>,
    pub(super) waiting: BTreeSet<NodeSlot>,
    pub(super) answered: PeerSet,
    pub(super) deadline: Nanos,
    pub(super) resend_at: Nanos,
    /// When the claim left.
    pub(super) sent: Nanos,
    /// From when the claim gives up on a silent peer (`sent` plus the
    /// confirm timeout).
    pub(super) patience: Nanos,
    /// The first look for silent peers, for the timer (cleared once done;
    /// later looks come with the sync ticks).
    pub(super) silence_check: Option<Nanos>,
}

/// The counters a frame carries.
pub(super) fn carried_keys(s: &Slots) -> Vec<CounterKey> {
    s.groups
        .iter()
        .flat_map(|g| {
            g.keys
                .iter()
                .map(move |k| CounterKey::new(LimitId(g.limit), KeyDigest(k.key)))
        })
        .collect()
}

impl Replicator {
    /// An answered claim that the limiter refused only because of peers'
    /// later claims (from the peers in `blocking`) that may still be undecided:
    /// decide it again ([`ClaimEvent::Answered`] once more) as soon as a
    /// frame from one of them arrives, or refuse it at `deadline`.
    pub fn yield_to(
        &mut self,
        ticket: u64,
        keys: Vec<CounterKey>,
        blocking: PeerSet,
        answered: PeerSet,
        deadline: Nanos,
    ) {
        self.yielding.insert(
            ticket,
            Yielding {
                keys,
                blocking,
                answered,
                deadline,
            },
        );
    }

    /// Values from `slot` arrived (for `keys`, or for anything when `None`):
    /// yielding claims blocked by it on those keys decide again.
    pub(super) fn heard_from(&mut self, slot: NodeSlot, keys: Option<&[CounterKey]>) {
        if self.yielding.is_empty() {
            return;
        }
        let again: Vec<(u64, PeerSet)> = self
            .yielding
            .iter()
            .filter(|(_, y)| {
                y.blocking.contains(slot)
                    && keys.is_none_or(|ks| ks.iter().any(|k| y.keys.contains(k)))
            })
            .map(|(&t, y)| (t, y.answered.clone()))
            .collect();
        for (ticket, answered) in again {
            self.yielding.remove(&ticket);
            self.claim_events
                .push_back(ClaimEvent::Answered { ticket, answered });
        }
    }

    /// How a claim ended: drain after every `handle_*` call.
    pub fn poll_claim_event(&mut self) -> Option<ClaimEvent> {
        self.claim_events.pop_front()
    }

    /// Claims waiting for answers.
    pub fn open_claims(&self) -> usize {
        self.claims.len()
    }

    /// Asks every peer this node waits for to merge its provisional hits on
    /// `keys` (already counted in the store) and to answer with its own
    /// counts of them. Returns the claim's ticket; the outcome comes from
    /// [`Replicator::poll_claim_event`].
    /// `started` is when the request's hits were counted.
    pub fn claim(
        &mut self,
        now: Nanos,
        started: Nanos,
        keys: Vec<CounterKey>,
        store: &(impl ReplicaStore + ?Sized),
    ) -> u64 {
        let ticket = self.next_round;
        self.next_round += 1;
        let waiting = self.waiting_set();
        if waiting.is_empty() {
            self.claim_events.push_back(ClaimEvent::Answered {
                ticket,
                answered: PeerSet::new(),
            });
            return ticket;
        }
        let claim = OpenClaim {
            started,
            keys,
            waiting,
            answered: PeerSet::new(),
            deadline: now + self.cfg.claim_timeout,
            resend_at: now + self.cfg.claim_resend,
            sent: now,
            patience: now + self.cfg.confirm_timeout.min(self.cfg.claim_timeout),
            silence_check: Some(now + self.cfg.confirm_timeout.min(self.cfg.claim_timeout)),
        };
        let frame = self.values_frame(now, started, ticket, &claim.keys, store);
        let bytes = Frame::Claim(frame).encode();
        for &slot in &claim.waiting {
            if self.peers.get(&slot).is_some_and(|p| p.connected) {
                self.send(slot, bytes.clone(), false);
            }
        }
        self.stats.claims_sent += 1;
        self.claims.insert(ticket, claim);
        ticket
    }

    /// A peer asks us to confirm its provisional hits: merge them, hold the
    /// keys under confirmation here too, and answer with our own counts.
    pub(super) fn on_claim(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        s: &Slots,
        store: &(impl ReplicaStore + ?Sized),
    ) {
        self.merge_slots(now, from, s, store);
        let keys = carried_keys(s);
        store.hold_keys(now, &keys, Some((from, Nanos::new(s.sent_at))));
        // If we have a claim of our own pending on these keys, the answer
        // says when its hits were counted (0 if none): a conflict between
        // the two is then settled in favour of the earlier one on both sides.
        let ours = self
            .claims
            .values()
            .filter(|c| c.keys.iter().any(|k| keys.contains(k)))
            .map(|c| c.started)
            .min()
            .unwrap_or(Nanos::ZERO);
        let answer = self.values_frame(now, ours, s.round, &keys, store);
        let others = self.relayed_values(now, from, s.round, &keys, store);
        let frame = if others.is_empty() {
            Frame::Answer(answer)
        } else {
            Frame::RelayedAnswer(RelayedAnswer { answer, others })
        };
        self.send(from, frame.encode(), false);
    }

    /// What this node holds, for `keys`, of the slots of the nodes the
    /// claimant last reported it cannot hear (one [`Slots`] per node): the
    /// claimant decides without their own answers (it fenced them, or
    /// holds them dead), and any majority it hears from includes a node
    /// that acknowledged what they settled. Nothing when it hears everyone;
    /// every other slot without fencing (no reports then).
    fn relayed_values(
        &self,
        now: Nanos,
        claimant: NodeSlot,
        round: u64,
        keys: &[CounterKey],
        store: &(impl ReplicaStore + ?Sized),
    ) -> Vec<Slots> {
        let own = self.cfg.own;
        // Without fencing nobody reports whom it cannot hear: every slot.
        let reports = self.cfg.silence.fence_after().is_some();
        let unheard: &[NodeSlot] = self
            .peers
            .get(&claimant)
            .and_then(|p| p.reported_silent.as_ref())
            .map_or(&[], |(_, silent)| silent.as_slice());
        if reports && unheard.is_empty() {
            return Vec::new();
        }
        let relay = |slot: NodeSlot| {
            slot != own && slot != claimant && (!reports || unheard.contains(&slot))
        };
        let mut by_slot: BTreeMap<NodeSlot, Vec<LimitGroup>> = BTreeMap::new();
        for &counter in keys {
            store.key_slot_values(now, counter, &relay, &mut |slot, v| {
                by_slot.entry(slot).or_default().push(LimitGroup {
                    limit: counter.limit.0,
                    newest: v.newest,
                    keys: vec![KeySlots {
                        key: counter.key.0,
                        buckets: v.buckets,
                    }],
                });
            });
        }
        by_slot
            .into_iter()
            .take(MAX_SUSPECTS)
            .map(|(slot, groups)| Slots {
                slot: slot.get(),
                round,
                sent_at: 0,
                last: true,
                groups,
            })
            .collect()
    }

    /// A peer's answer to one of our claims.
    pub(super) fn on_answer(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        s: &Slots,
        store: &(impl ReplicaStore + ?Sized),
    ) {
        self.merge_slots(now, from, s, store);
        let Some(claim) = self.claims.get_mut(&s.round) else {
            return;
        };
        if s.sent_at != 0 {
            // The answerer has its own claim pending on these keys.
            store.hold_keys(now, &claim.keys, Some((from, Nanos::new(s.sent_at))));
        }
        if claim.waiting.remove(&from) {
            claim.answered.insert(from);
        }
        self.resolve_claim(s.round);
    }

    fn resolve_claim(&mut self, ticket: u64) {
        if self
            .claims
            .get(&ticket)
            .is_some_and(|c| c.waiting.is_empty())
        {
            if let Some(c) = self.claims.remove(&ticket) {
                self.stats.claims_answered += 1;
                self.claim_events.push_back(ClaimEvent::Answered {
                    ticket,
                    answered: c.answered,
                });
            }
        }
    }

    /// A peer we no longer wait for (declared dead under a policy that does
    /// not wait for it, or gone): its answer is no longer needed; the
    /// limiter counts its in-flight share instead.
    pub(super) fn stop_claims_waiting_for(&mut self, slot: NodeSlot) {
        let tickets: Vec<u64> = self
            .claims
            .iter_mut()
            .filter_map(|(&t, c)| c.waiting.remove(&slot).then_some(t))
            .collect();
        for t in tickets {
            self.resolve_claim(t);
        }
        self.heard_from(slot, None);
    }

    /// Expires claims past their deadline and resends the others to the
    /// peers that have not answered yet.
    pub(super) fn claim_timers(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        let (events, stats, peers) = (&mut self.claim_events, &mut self.stats, &self.peers);
        // A peer is silent when unheard from for half the fence time (it
        // is then suspected; a peer fenced is not waited for at all), or,
        // without fencing, since the claim left.
        let quiet = self
            .cfg
            .silence
            .fence_after()
            .map(|after| Nanos::new(after.as_u64() / 2));
        self.claims.retain(|&ticket, c| {
            // A claim waits on a silent peer no longer than the confirm
            // timeout; on a slow one that is still heard from, up to the
            // claim timeout.
            let since = quiet.map_or(c.sent, |q| now.saturating_sub(q));
            let silent = c.patience <= now
                && c.waiting.iter().any(|slot| {
                    peers
                        .get(slot)
                        .is_none_or(|p| p.last_heard.is_none_or(|t| t < since))
                });
            if c.silence_check.is_some_and(|at| at <= now) {
                c.silence_check = None;
            }
            let live = c.deadline > now && !silent;
            if !live {
                stats.claims_expired += 1;
                if silent {
                    stats.claims_silent += 1;
                }
                events.push_back(ClaimEvent::Expired { ticket });
            }
            live
        });
        self.yielding.retain(|&ticket, y| {
            let live = y.deadline > now;
            if !live {
                events.push_back(ClaimEvent::Expired { ticket });
            }
            live
        });
        let due: Vec<u64> = self
            .claims
            .iter()
            .filter(|(_, c)| c.resend_at <= now)
            .map(|(&t, _)| t)
            .collect();
        for ticket in due {
            let Some(claim) = self.claims.get_mut(&ticket) else {
                continue;
            };
            claim.resend_at = now + self.cfg.claim_resend;
            let (keys, waiting, started) =
                (claim.keys.clone(), claim.waiting.clone(), claim.started);
            let bytes =
                Frame::Claim(self.values_frame(now, started, ticket, &keys, store)).encode();
            for slot in waiting {
                if self.peers.get(&slot).is_some_and(|p| p.connected) {
                    self.stats.retransmissions += 1;
                    self.send(slot, bytes.clone(), false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{KeySlots, LimitGroup};

    #[test]
    fn a_frame_carries_every_key_of_every_group() {
        let group = |limit, keys: &[u64]| LimitGroup {
            limit,
            newest: 1,
            keys: keys
                .iter()
                .map(|&key| KeySlots {
                    key,
                    buckets: Vec::new(),
                })
                .collect(),
        };
        let s = Slots {
            slot: 1,
            round: 1,
            sent_at: 0,
            last: true,
            groups: vec![group(3, &[10, 11]), group(4, &[10])],
        };
        let c = |l, k| CounterKey::new(LimitId(l), KeyDigest(k));
        assert_eq!(carried_keys(&s), vec![c(3, 10), c(3, 11), c(4, 10)]);
    }
}
