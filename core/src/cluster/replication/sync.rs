//! Whole-state syncs: the hello a node sends on every new connection, the
//! full sync of this node's own slot that answers it, the recovery sync of
//! a restarted peer's own slot, and the recovery gate they open.

use std::collections::BTreeMap;

use super::{ReplicaStore, ReplicationEvent, Replicator};
use crate::key::CounterKey;
use crate::share::SharePolicy;
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{Frame, Hello, KeySlots, RecoveryDone, Slots, SlotsPacker};

/// A full-sync chunk not yet acknowledged.
#[derive(Clone, Debug)]
pub(super) struct PendingChunk {
    pub(super) bytes: Vec<u8>,
    /// When it was last sent.
    pub(super) sent_at: Nanos,
}

/// A full-state sync to one peer: complete once every chunk is acknowledged.
#[derive(Clone, Debug)]
pub(super) struct SyncOut {
    /// Rounds below this are covered by the sync's values.
    pub(super) start: u64,
    /// Unacknowledged chunks by round.
    pub(super) pending: BTreeMap<u64, PendingChunk>,
}

/// Which slot a sync carries, and so which frame kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncKind {
    /// This node's own slot, for a peer that (re)connected.
    Full,
    /// The peer's own slot as this node knows it, for its recovery.
    Recovery,
}

/// Answers that make, with this node, a majority of a configured cluster
/// of `expected_peers + 1` nodes.
fn majority_answers(expected_peers: usize) -> usize {
    expected_peers.div_ceil(2)
}

impl Replicator {
    /// While recovering, every `recovery_timeout`: the hello again to each
    /// connected peer that has not answered, so that an answer (or rules)
    /// lost at start is sent again instead of waited for.
    pub(super) fn retry_recovery(&mut self, now: Nanos) {
        if !self.recovering || now < self.next_recovery_retry {
            return;
        }
        self.next_recovery_retry = now + self.cfg.recovery_timeout;
        let silent: Vec<NodeSlot> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected && !self.answered(p))
            .map(|(&s, _)| s)
            .collect();
        for slot in silent {
            self.stats.recovery_retries += 1;
            self.introduce(slot, self.rules_digest);
        }
    }

    /// Peers that asked for our rules again (see `on_hello`), for the
    /// owner of the rules to send them.
    pub fn take_rules_wanted(&mut self) -> Vec<NodeSlot> {
        std::mem::take(&mut self.rules_wanted)
    }

    /// Our hello: the peer answers it with its whole own state.
    pub(super) fn introduce(&mut self, slot: NodeSlot, rules_digest: u64) {
        self.rules_digest = rules_digest;
        let hello = Frame::Hello(Hello {
            slot: self.cfg.own.get(),
            name: self.cfg.name.clone(),
            incarnation: self.incarnation,
            rules_digest,
            recovering: self.recovering,
        });
        self.send(slot, hello.encode(), true);
    }

    pub(super) fn on_hello(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        h: Hello,
        store: &(impl ReplicaStore + ?Sized),
        rules_digest: u64,
    ) {
        if h.rules_digest != rules_digest {
            self.stats.rules_mismatches += 1;
        }
        let mut returned = false;
        if let Some(p) = self.peers.get_mut(&from) {
            if h.recovering && p.incarnation == Some(h.incarnation) && p.connected {
                // Asked again (its recovery is taking long): our rules
                // too, in case they were what it missed.
                self.rules_wanted.push(from);
            }
            p.incarnation = Some(h.incarnation);
            p.name = h.name;
            if !p.connected {
                p.connected_at = Some(now);
            }
            p.connected = true;
            returned = !p.live;
            p.live = true;
            if returned {
                p.synced_from = false;
            }
        }
        if returned {
            // We had it for dead: ask for its whole state too.
            self.introduce(from, rules_digest);
        }
        // Whatever the peer missed while apart (or ever, if it restarted):
        // our whole own state, reliably.
        self.full_sync(now, from, store);
        if h.recovering {
            self.recovery_sync(now, from, store);
        }
    }

    /// Full-sync chunks travel on streams, but their acknowledgements are
    /// datagrams: a chunk not acknowledged in time is sent again.
    pub(super) fn resend_sync_chunks(&mut self, now: Nanos) {
        let mut again = Vec::new();
        for (&slot, p) in self.peers.iter_mut() {
            let Some(sync) = p.sync_out.as_mut().filter(|_| p.connected) else {
                continue;
            };
            for chunk in sync.pending.values_mut() {
                if now.saturating_sub(chunk.sent_at) >= self.cfg.retransmit_after {
                    chunk.sent_at = now;
                    again.push((slot, chunk.bytes.clone()));
                }
            }
        }
        for (slot, bytes) in again {
            self.stats.retransmissions += 1;
            self.send(slot, bytes, true);
        }
    }

    /// Our whole own state, in stream-sized chunks, to `to`.
    pub(super) fn full_sync(
        &mut self,
        now: Nanos,
        to: NodeSlot,
        store: &(impl ReplicaStore + ?Sized),
    ) {
        self.stats.full_syncs += 1;
        let start = self.next_round;
        let frames = self.collect_slots(now, store, start, self.cfg.own);
        if let Some(p) = self.peers.get_mut(&to) {
            p.sync_out = Some(SyncOut {
                start,
                pending: BTreeMap::new(),
            });
        }
        self.send_sync_frames(now, to, frames, SyncKind::Full);
    }

    /// The peer's own slot as we know it, for its recovery after a restart
    /// or its first start, then the slots of nodes that may not answer it
    /// themselves (see [`relays`](Self::relays)), then a RecoveryDone
    /// naming the rounds: the peer counts this node as answered once it
    /// holds them all.
    fn recovery_sync(&mut self, now: Nanos, to: NodeSlot, store: &(impl ReplicaStore + ?Sized)) {
        let first = self.next_round;
        let mut frames = self.collect_recovery(now, store, first, to);
        self.stats.recovery_frames_relayed +=
            frames.iter().filter(|f| f.slot != to.get()).count() as u64;
        if frames.is_empty() {
            // Nothing known of its slot or anyone else's: still say so, so
            // it need not wait.
            frames.push(Slots {
                slot: to.get(),
                round: first,
                sent_at: now.as_u64(),
                last: false,
                groups: Vec::new(),
            });
        }
        let last = first + frames.len() as u64 - 1;
        if let Some(f) = frames.last_mut() {
            f.last = true;
        }
        self.send_sync_frames(now, to, frames, SyncKind::Recovery);
        let vouched = self
            .peers
            .keys()
            .filter(|&&s| s != to && !self.relays(s, to))
            .map(|s| s.get())
            .collect();
        let done = Frame::RecoveryDone(RecoveryDone {
            slot: self.cfg.own.get(),
            first,
            last,
            vouched,
        });
        self.send(to, done.encode(), true);
    }

    /// Whether a recovery sent to `to` relays `slot`'s values: every slot
    /// but this node's and `to`'s own, unless its owner is a member this
    /// node hears and reaches now (it answers `to` itself). A member that
    /// left, was forgotten, died, is fenced or is out of reach is relayed,
    /// so a node that joins after it went still learns what it spent.
    /// Merging is a per-slot maximum: a relayed value can raise a count
    /// to what its owner sent, never above.
    fn relays(&self, slot: NodeSlot, to: NodeSlot) -> bool {
        slot != self.cfg.own
            && slot != to
            && !self
                .peers
                .get(&slot)
                .is_some_and(|p| p.live && p.connected && !p.fenced)
    }

    /// `to`'s own values and those of the slots [`relays`](Self::relays)
    /// picks for it, in one pass over the store, in chunks numbered from
    /// `start`, each chunk of one slot.
    fn collect_recovery(
        &self,
        now: Nanos,
        store: &(impl ReplicaStore + ?Sized),
        start: u64,
        to: NodeSlot,
    ) -> Vec<Slots> {
        let mut packers: BTreeMap<NodeSlot, SlotsPacker> = BTreeMap::new();
        let wanted = |slot: NodeSlot| slot == to || self.relays(slot, to);
        store.each_relayed_values(now, &wanted, &mut |slot, CounterKey { limit, key }, v| {
            packers
                .entry(slot)
                .or_insert_with(|| {
                    SlotsPacker::new(self.cfg.chunk_bytes, slot.get(), 0, now.as_u64())
                })
                .push(
                    limit.0,
                    v.newest,
                    KeySlots {
                        key: key.0,
                        buckets: v.buckets,
                    },
                );
        });
        let mut frames: Vec<Slots> = packers
            .into_values()
            .flat_map(SlotsPacker::finish)
            .collect();
        for (round, f) in (start..).zip(&mut frames) {
            f.round = round;
            f.last = false;
        }
        frames
    }

    /// A Recovery frame or the RecoveryDone of `from` arrived: once every
    /// round the latter names is here, `from` has answered.
    pub(super) fn recovery_progress(&mut self, now: Nanos, from: NodeSlot) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let Some((first, last)) = p.recovery_done else {
            return;
        };
        let held = p.recovery_rounds.range(first..=last).count() as u64;
        if held == last - first + 1 {
            p.recovered_from = true;
            p.recovery_rounds.clear();
            self.check_recovered(now);
        }
    }

    /// `slot`'s values of every key, in chunks numbered from `start`.
    fn collect_slots(
        &self,
        now: Nanos,
        store: &(impl ReplicaStore + ?Sized),
        start: u64,
        slot: NodeSlot,
    ) -> Vec<Slots> {
        let mut packer = SlotsPacker::new(
            self.cfg.chunk_bytes,
            self.cfg.own.get(),
            start,
            now.as_u64(),
        );
        store.each_slot_values(now, slot, &mut |CounterKey { limit, key }, v| {
            packer.push(
                limit.0,
                v.newest,
                KeySlots {
                    key: key.0,
                    buckets: v.buckets,
                },
            );
        });
        packer.finish()
    }

    fn send_sync_frames(
        &mut self,
        now: Nanos,
        to: NodeSlot,
        mut frames: Vec<Slots>,
        kind: SyncKind,
    ) {
        if frames.is_empty() {
            frames.push(Slots {
                slot: self.cfg.own.get(),
                round: self.next_round,
                sent_at: now.as_u64(),
                last: true,
                groups: Vec::new(),
            });
        }
        for frame in frames {
            self.next_round = frame.round + 1;
            let round = frame.round;
            let bytes = match kind {
                SyncKind::Recovery => Frame::Recovery(frame),
                SyncKind::Full => Frame::Sync(frame),
            }
            .encode();
            if kind == SyncKind::Full {
                if let Some(sync) = self.peers.get_mut(&to).and_then(|p| p.sync_out.as_mut()) {
                    let chunk = PendingChunk {
                        bytes: bytes.clone(),
                        sent_at: now,
                    };
                    sync.pending.insert(round, chunk);
                }
            }
            self.send(to, bytes, true);
        }
    }

    /// Opens the recovery gate once this node has the counts it needs, and
    /// reports it ([`ReplicationEvent::Recovered`]).
    ///
    /// - No other member known (none remembered, none heard of): open only
    ///   as the first node of a new cluster, after `alone_after`.
    /// - Every known member answered: open at once.
    /// - After `recovery_timeout`, under `strict` and `bounded`: the peers
    ///   that answered and this node make a majority of the *known*
    ///   members (`⌊n/2⌋` answers). A lone restarted node, or one whose peers
    ///   are all silent, never opens: it would decide as if its own slot and
    ///   its peers' were empty.
    /// - After `recovery_timeout`, under `available`: every peer reachable
    ///   now (connected and live) answered, and at least one did, or the
    ///   node merged a verified snapshot.
    ///
    /// Time alone never opens it, but for a node that knows of no member and
    /// may start a new cluster.
    pub(super) fn check_recovered(&mut self, now: Nanos) {
        if self.recovering && self.recovery_complete(now) {
            self.recovering = false;
            self.events.push_back(ReplicationEvent::Recovered);
        }
    }

    /// Whether the recovery gate may open now (see `check_recovered`).
    pub fn recovery_complete(&self, now: Nanos) -> bool {
        let answered = self.peers.values().filter(|p| self.answered(p)).count();
        let elapsed = self
            .recovery_started
            .map_or(Nanos::ZERO, |t| now.saturating_sub(t));
        if self.cfg.expected_peers == 0 && answered == 0 {
            // Nobody known: the first node of a new cluster, when allowed.
            return self.cfg.alone_after.is_some_and(|d| elapsed >= d);
        }
        // Every known member answered, and every member the answers vouched
        // for (one a seed hears, that this node has not met yet) too.
        let vouched_answered = self
            .awaited
            .iter()
            .all(|s| self.peers.get(s).is_some_and(|p| self.answered(p)));
        if answered >= self.cfg.expected_peers && vouched_answered {
            return true;
        }
        let waited = self.recovery_started.is_some() && elapsed >= self.cfg.recovery_timeout;
        if !waited {
            return false;
        }
        match self.cfg.policy {
            SharePolicy::Available => {
                let reachable_silent = self
                    .peers
                    .values()
                    .any(|p| p.connected && p.live && !self.answered(p));
                !reachable_silent && (answered > 0 || self.cfg.snapshot_restored)
            }
            _ => answered >= majority_answers(self.cfg.expected_peers),
        }
    }

    /// The peer sent back our slot (and its rules, when awaited).
    fn answered(&self, p: &super::PeerState) -> bool {
        p.recovered_from && (p.rules_heard || !self.cfg.await_rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_counts_this_node() {
        // Alone: nobody to hear from.
        assert_eq!(majority_answers(0), 0);
        // 2 nodes: the other one; 3 nodes: one of two; 5 nodes: two of four.
        assert_eq!(majority_answers(1), 1);
        assert_eq!(majority_answers(2), 1);
        assert_eq!(majority_answers(4), 2);
        assert_eq!(majority_answers(5), 3);
    }
}
