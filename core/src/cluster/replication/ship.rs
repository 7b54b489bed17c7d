//! Shipping deltas: every sync tick, this node's values of the keys that
//! changed go to every peer; rounds a peer has not acknowledged in time go
//! again with current values; acknowledged rounds settle their hits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{ReplicaStore, Replicator, Transmit};
use crate::cluster::store::CounterKey;
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{Frame, KeySlots, LimitGroup, Slots, SlotsPacker};

/// One key's hits shipped in a round, settled when the round is
/// acknowledged by every peer that must know them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ShipRecord {
    pub(super) counter: CounterKey,
    pub(super) hits: u32,
}

/// One shipped delta frame, waiting for acknowledgements.
pub(super) struct Round {
    pub(super) records: Vec<ShipRecord>,
    pub(super) waiting: BTreeSet<NodeSlot>,
    pub(super) sent_at: Nanos,
    pub(super) resends: u32,
}

/// Groups records by the round (frame) the packer put their key in.
fn by_round(records: Vec<(u64, ShipRecord)>) -> BTreeMap<u64, Vec<ShipRecord>> {
    let mut rounds: BTreeMap<u64, Vec<ShipRecord>> = BTreeMap::new();
    for (round, rec) in records {
        rounds.entry(round).or_default().push(rec);
    }
    rounds
}

impl Replicator {
    /// Ships what changed now, without waiting for the tick: for keys whose
    /// in-flight share is spent (the limiter's wake hook).
    pub fn ship_now(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        self.ship_deltas(now, store);
    }

    /// This node's own values of `keys`, as one frame numbered `round`.
    pub(super) fn values_frame(
        &self,
        now: Nanos,
        sent_at: Nanos,
        round: u64,
        keys: &[CounterKey],
        store: &(impl ReplicaStore + ?Sized),
    ) -> Slots {
        let groups = keys
            .iter()
            .filter_map(|&counter| {
                let v = store.slot_values(now, counter, self.cfg.own)?;
                Some(LimitGroup {
                    limit: counter.limit.0,
                    newest: v.newest,
                    keys: vec![KeySlots {
                        key: counter.key.0,
                        buckets: v.buckets,
                    }],
                })
            })
            .collect();
        Slots {
            slot: self.cfg.own.get(),
            round,
            sent_at: sent_at.as_u64(),
            last: true,
            groups,
        }
    }

    /// A packer of this node's deltas into datagram-sized frames of the
    /// next round.
    fn delta_packer(&self, now: Nanos) -> SlotsPacker {
        SlotsPacker::new(
            self.cfg.datagram_bytes,
            self.cfg.own.get(),
            self.next_round,
            now.as_u64(),
        )
    }

    pub(super) fn ship_deltas(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        let changed = store.drain_changed();
        if changed.is_empty() {
            return;
        }
        let own = self.cfg.own;
        let mut packer = self.delta_packer(now);
        let mut records: Vec<(u64, ShipRecord)> = Vec::with_capacity(changed.len());
        for counter in changed {
            let Some(shipment) = store.take_shipment(now, counter, own) else {
                continue;
            };
            if let Some(v) = shipment.values {
                let round = packer.push(
                    counter.limit.0,
                    v.newest,
                    KeySlots {
                        key: counter.key.0,
                        buckets: v.buckets,
                    },
                );
                let hits = shipment.hits;
                records.push((round, ShipRecord { counter, hits }));
                self.stats.values_sent += 1;
            }
        }
        let frames = packer.finish();
        let waiting = self.waiting_set();
        let mut by_round = by_round(records);
        for frame in frames {
            self.next_round = frame.round + 1;
            let bytes = Frame::Delta(frame.clone()).encode();
            for (&slot, p) in &mut self.peers {
                if p.connected {
                    p.sent_recently = true;
                    self.outbox.push_back(Transmit {
                        to: slot,
                        reliable: bytes.len() > self.cfg.datagram_bytes,
                        bytes: bytes.clone(),
                    });
                    self.stats.frames_sent += 1;
                    self.stats.bytes_sent += bytes.len() as u64;
                }
            }
            let records = by_round.remove(&frame.round).unwrap_or_default();
            self.unacked_hits += records.iter().map(|r| u64::from(r.hits)).sum::<u64>();
            let round = Round {
                records,
                waiting: waiting.clone(),
                sent_at: now,
                resends: 0,
            };
            let settled = round.waiting.is_empty();
            self.rounds.insert(frame.round, round);
            if settled {
                self.settle(frame.round, store);
            }
        }
    }

    /// Sends again, with current values, every round a peer has not
    /// acknowledged in time; a peer that keeps missing gets a full sync.
    pub(super) fn resend_lost(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        self.resend_sync_chunks(now);
        // A resent frame that was lost too leaves its alias behind: drop
        // those whose rounds are all settled, once they outnumber the
        // rounds still open (amortised over the resends that made them).
        if self.aliases.len() > 2 * self.rounds.len() + 1024 {
            let rounds = &self.rounds;
            self.aliases
                .retain(|_, originals| originals.iter().any(|r| rounds.contains_key(r)));
        }
        let mut per_peer: BTreeMap<NodeSlot, Vec<u64>> = BTreeMap::new();
        for (&id, r) in &self.rounds {
            if now.saturating_sub(r.sent_at) >= self.cfg.retransmit_after {
                for &slot in &r.waiting {
                    per_peer.entry(slot).or_default().push(id);
                }
            }
        }
        for (slot, ids) in per_peer {
            let Some(peer) = self.peers.get(&slot) else {
                continue;
            };
            if !peer.connected {
                continue;
            }
            let over = ids.iter().any(|id| {
                self.rounds
                    .get(id)
                    .is_some_and(|r| r.resends >= self.cfg.max_retransmits)
            });
            if over || peer.needs_sync {
                if peer.sync_out.is_none() {
                    self.full_sync(now, slot, store);
                }
                continue;
            }
            let own = self.cfg.own;
            let mut packer = self.delta_packer(now);
            // (resent frame, the lost round whose key it carries again)
            let mut alias_of: Vec<(u64, u64)> = Vec::new();
            // A key of several lost rounds goes once, with its values now.
            let mut packed: HashMap<CounterKey, u64> = HashMap::new();
            for id in &ids {
                let Some(round) = self.rounds.get_mut(id) else {
                    continue;
                };
                round.resends += 1;
                round.sent_at = now;
                for rec in &round.records {
                    let r = match packed.get(&rec.counter) {
                        Some(&r) => r,
                        None => {
                            let Some(v) = store.slot_values(now, rec.counter, own) else {
                                continue;
                            };
                            let r = packer.push(
                                rec.counter.limit.0,
                                v.newest,
                                KeySlots {
                                    key: rec.counter.key.0,
                                    buckets: v.buckets,
                                },
                            );
                            packed.insert(rec.counter, r);
                            r
                        }
                    };
                    alias_of.push((r, *id));
                }
            }
            let frames = packer.finish();
            // A resent frame may carry keys of several lost rounds; its
            // acknowledgement settles each of them for this peer.
            let mut covers: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            for (r, id) in alias_of {
                covers.entry(r).or_default().insert(id);
            }
            for frame in frames {
                self.next_round = frame.round + 1;
                let originals = covers.remove(&frame.round).unwrap_or_default();
                self.aliases
                    .insert(frame.round, originals.into_iter().collect());
                self.stats.retransmissions += 1;
                self.send(slot, Frame::Delta(frame).encode(), false);
            }
        }
    }

    /// Nobody needs `slot`'s acknowledgement for rounds before `before` any
    /// more (it left, died under a policy that does not wait, or a full
    /// sync covered them).
    pub(super) fn stop_waiting_for(
        &mut self,
        store: &(impl ReplicaStore + ?Sized),
        slot: NodeSlot,
        before: u64,
    ) {
        let done: Vec<u64> = self
            .rounds
            .range_mut(..before)
            .filter_map(|(&r, round)| {
                round.waiting.remove(&slot);
                round.waiting.is_empty().then_some(r)
            })
            .collect();
        for r in done {
            self.settle(r, store);
        }
    }

    /// Every peer that must know round `round`'s hits has them: they leave
    /// the in-flight share.
    pub(super) fn settle(&mut self, round: u64, store: &(impl ReplicaStore + ?Sized)) {
        let Some(r) = self.rounds.remove(&round) else {
            return;
        };
        for rec in r.records {
            self.unacked_hits = self.unacked_hits.saturating_sub(u64::from(rec.hits));
            if rec.hits > 0 {
                store.settle(rec.counter, rec.hits);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(limit: u64, key: u64, hits: u32) -> ShipRecord {
        let counter = CounterKey::new(crate::key::LimitId(limit), crate::key::KeyDigest(key));
        ShipRecord { counter, hits }
    }

    #[test]
    fn records_group_by_the_round_that_carries_them() {
        let grouped = by_round(vec![
            (7, rec(1, 10, 2)),
            (8, rec(1, 11, 1)),
            (7, rec(2, 10, 5)),
        ]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[&7], vec![rec(1, 10, 2), rec(2, 10, 5)]);
        assert_eq!(grouped[&8], vec![rec(1, 11, 1)]);
    }
}
