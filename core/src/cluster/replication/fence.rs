//! Silent peers: a peer that has sent nothing for the fence time, and that
//! a majority of the cluster (this node included) reports silent, is
//! fenced (its acknowledgements and claim answers are no longer awaited)
//! until a frame from it arrives. Nodes tell each other whom they cannot
//! hear in [`Hearing`] frames; a peer that others still hear is awaited,
//! so a one-way or non-transitive cut never lets two nodes that cannot
//! hear each other both stop waiting.
//! Heartbeats keep idle peers heard; acknowledgements of them give the
//! leases of [`SilencePolicy::FenceLease`].
//!
//! Why fencing a silent peer is safe under every policy: the fenced peer
//! never stops waiting for us in turn while it cannot hear a majority, so
//! its hits we have not merged stay within its in-flight share, which we
//! keep reserving; and when it can hear a majority, it hears us (see
//! DESIGN.md, "A silent peer").

use super::{ReplicaStore, Replicator, SilencePolicy};
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{Frame, Hearing, Slots};

impl Replicator {
    /// Fences every live peer silent for the fence time that a majority of
    /// the cluster, this node included, reports silent.
    pub(super) fn fence_silent(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        let Some(after) = self.cfg.silence.fence_after() else {
            return;
        };
        // A node that was itself stopped (a pause, a starved scheduler)
        // accuses nobody on waking: its timer may run before it has read
        // what its peers sent meanwhile. Every peer counts as just heard.
        let late = self
            .last_fence_check
            .is_some_and(|prev| now.saturating_sub(prev) > Nanos::new(after.as_u64() / 2));
        self.last_fence_check = Some(now);
        if late {
            self.stats.late_ticks += 1;
            for p in self.peers.values_mut() {
                if p.last_heard.is_some() {
                    p.last_heard = Some(now);
                }
                // Answers to frames sent before the stop were read late.
                p.clock_since = now;
            }
            return;
        }
        let heard = |last: Option<Nanos>| last.is_some_and(|t| now.saturating_sub(t) < after);
        self.report_hearing(now, after);
        let members = 1 + self.peers.len().max(self.cfg.expected_peers);
        // How many nodes, this one included, say `slot` is silent: itself,
        // and every peer it hears whose report within the fence time names
        // it. A majority of them is needed to fence it.
        let silent_to = |slot: NodeSlot| {
            1 + self
                .peers
                .iter()
                .filter(|(&q, p)| {
                    q != slot
                        && p.live
                        && !p.fenced
                        && heard(p.last_heard)
                        && p.reported_silent.as_ref().is_some_and(|(at, set)| {
                            now.saturating_sub(*at) < after && set.contains(&slot)
                        })
                })
                .count()
        };
        let mut silent = Vec::new();
        let mut withheld = Vec::new();
        for (&slot, p) in &self.peers {
            if !p.live || p.fenced || heard(p.last_heard) {
                continue;
            }
            if silent_to(slot) * 2 > members {
                silent.push(slot);
            } else {
                // Others still hear it (or this node is in a minority): it
                // may still be admitting on what they tell it, so it is
                // awaited, as a node cut off from the majority must be.
                withheld.push(slot);
            }
        }
        for (&slot, p) in self.peers.iter_mut() {
            let now_withheld = withheld.contains(&slot);
            if now_withheld && !p.withheld {
                self.stats.fences_withheld += 1;
            }
            p.withheld = now_withheld;
        }
        for slot in silent {
            if let Some(p) = self.peers.get_mut(&slot) {
                p.fenced = true;
                // Rounds it never acknowledged settle now: it may have
                // missed them, so it gets our whole state when it returns.
                p.owed_sync = true;
            }
            self.stats.peers_fenced += 1;
            self.stop_waiting_for(store, slot, u64::MAX);
            self.stop_claims_waiting_for(slot);
        }
    }

    /// Tells every connected peer whom this node has not heard from for
    /// half the fence time, when that changes and every quarter of the
    /// fence time while anyone is suspected.
    fn report_hearing(&mut self, now: Nanos, after: Nanos) {
        let quiet = Nanos::new(after.as_u64() / 2);
        let suspects: Vec<NodeSlot> = self
            .peers
            .iter()
            .filter(|(_, p)| p.last_heard.is_none_or(|t| now.saturating_sub(t) >= quiet))
            .map(|(&s, _)| s)
            .collect();
        let changed = suspects != self.suspects_sent;
        if !changed && (suspects.is_empty() || now < self.next_hearing) {
            return;
        }
        self.next_hearing = now + Nanos::new(after.as_u64() / 4);
        let bytes = Frame::Hearing(Hearing {
            slot: self.cfg.own.get(),
            silent: suspects.iter().map(|s| s.get()).collect(),
        })
        .encode();
        self.suspects_sent = suspects;
        let to: Vec<NodeSlot> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(&s, _)| s)
            .collect();
        for slot in to {
            self.stats.hearing_sent += 1;
            // On a stream: a report that nobody is silent any more must
            // not be lost, or a stale one could corroborate a fence.
            self.send(slot, bytes.clone(), true);
        }
    }

    /// `from` reported whom it cannot hear.
    pub(super) fn on_hearing(&mut self, now: Nanos, from: NodeSlot, h: &Hearing) {
        if let Some(p) = self.peers.get_mut(&from) {
            let set = h.silent.iter().map(|&s| NodeSlot::new(s)).collect();
            p.reported_silent = Some((now, set));
        }
    }

    /// A frame from `from` arrived: a fenced peer is awaited again, and
    /// asked for its whole state (confirm every request until it is here).
    pub(super) fn unfence(&mut self, from: NodeSlot, rules_digest: u64) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if !p.fenced {
            return;
        }
        p.fenced = false;
        p.synced_from = false;
        if p.connected {
            self.introduce(from, rules_digest);
        }
    }

    /// Records that a frame to `to` was queued.
    pub(super) fn sent_to(&mut self, to: NodeSlot) {
        if let Some(p) = self.peers.get_mut(&to) {
            p.sent_recently = true;
        }
    }

    /// Every quarter of the fence time, sends an empty delta to every
    /// connected peer nothing else went to since the last such check (so
    /// a peer hears from us at least every half fence time): it keeps this
    /// node heard, and its acknowledgement renews the lease.
    pub(super) fn heartbeats(&mut self, now: Nanos) {
        let Some(after) = self.cfg.silence.fence_after() else {
            return;
        };
        if now < self.next_beat {
            return;
        }
        self.next_beat = now + Nanos::new(after.as_u64() / 4);
        let due: Vec<NodeSlot> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected && !p.sent_recently)
            .map(|(&s, _)| s)
            .collect();
        for p in self.peers.values_mut() {
            p.sent_recently = false;
        }
        if due.is_empty() {
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        let bytes = Frame::Delta(Slots {
            slot: self.cfg.own.get(),
            round,
            sent_at: now.as_u64(),
            last: true,
            groups: Vec::new(),
        })
        .encode();
        for slot in due {
            self.stats.heartbeats_sent += 1;
            self.send(slot, bytes.clone(), false);
        }
    }

    /// An acknowledgement from `from` echoed a frame of ours that left at
    /// `sent` (our clock).
    pub(super) fn note_acked(&mut self, from: NodeSlot, sent: Nanos) {
        if let Some(p) = self.peers.get_mut(&from) {
            if p.acked_sent.is_none_or(|t| t < sent) {
                p.acked_sent = Some(sent);
            }
        }
    }

    /// Under [`SilencePolicy::FenceLease`]: false when some peer this node
    /// waits for has not acknowledged a frame sent within the lease (three
    /// quarters of the fence time); the node then confirms every request.
    /// Always true under the other policies.
    pub fn lease_fresh(&self, now: Nanos) -> bool {
        let SilencePolicy::FenceLease { after } = self.cfg.silence else {
            return true;
        };
        let lease = Nanos::new(after.as_u64() / 4 * 3);
        self.peers
            .values()
            .filter(|p| self.must_wait_for(p))
            .all(|p| p.acked_sent.is_some_and(|s| now.saturating_sub(s) < lease))
    }

    /// Whether the limiter must confirm every request: some live peer's
    /// whole state has not arrived since it came back, or the lease is not
    /// fresh.
    pub fn confirm_all(&self, now: Nanos) -> bool {
        self.unsynced_live() || !self.lease_fresh(now)
    }

    /// Peers fenced now.
    pub fn fenced(&self) -> usize {
        self.peers.values().filter(|p| p.fenced).count()
    }
}
