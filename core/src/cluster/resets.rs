//! Counter resets across the cluster: a reset record reaches every node
//! once, however it is delayed, duplicated or cut off.
//!
//! The node that takes an admin reset clears its own slot of the counters
//! (`Limiter::reset_counters_at`), names the record `(origin, seq)` and
//! sends it to every known peer. Each peer clears its own slot once per
//! record and acknowledges every copy it receives. The origin sends the
//! record again to the peers that have not acknowledged it, every
//! [`RESEND_EVERY`] and as soon as a peer connects, until every known peer
//! has (or [`KEEP_FOR`] has passed). A peer partitioned away during the
//! reset therefore clears its slot when the partition heals, before or
//! with its first frames, and no merge brings the old count back: clearing
//! raises a slot's components, and merge is a maximum.
//!
//! The admin request is answered when every peer that was live when it
//! began has acknowledged, or after [`ANSWER_WITHIN`]: the answer names the
//! peers that have not applied it yet (they will, when they are reached).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::key::{CounterKey, KeyDigest, LimitId};
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::{ResetAck, ResetFrame, ResetKey};

/// How often an unacknowledged record is sent again.
pub const RESEND_EVERY: Nanos = Nanos::from_millis(250);
/// How long the admin request waits for the live peers' acknowledgements.
pub const ANSWER_WITHIN: Nanos = Nanos::from_millis(1_000);
/// How long a record is sent to peers that have not acknowledged it, and
/// how long a node remembers the records it applied (a copy arriving later
/// is applied again, clearing only what was counted since).
pub const KEEP_FOR: Nanos = Nanos::from_secs(24 * 3600);
/// How often applied records are looked at for expiry.
const PRUNE_EVERY: Nanos = Nanos::from_secs(60);
/// Most records kept, outgoing and applied each; the oldest are forgotten
/// first.
pub const MAX_RECORDS: usize = 4096;

/// The answer to an admin reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetDone {
    /// The ticket [`Resets::begin`] gave.
    pub ticket: u64,
    /// The peers that applied the reset before the answer.
    pub acked: Vec<NodeSlot>,
    /// The known peers that had not: they apply it when they are reached.
    pub pending: Vec<NodeSlot>,
}

struct Outgoing {
    frame: ResetFrame,
    began: Nanos,
    /// Peers live when the reset began: the answer waits for them.
    awaited: BTreeSet<NodeSlot>,
    /// Peers the record goes to until they acknowledge.
    targets: BTreeSet<NodeSlot>,
    acked: BTreeSet<NodeSlot>,
    answered: bool,
    next_send: Nanos,
}

impl Outgoing {
    fn unacked(&self) -> impl Iterator<Item = NodeSlot> + '_ {
        self.targets.difference(&self.acked).copied()
    }
}

/// One node's resets: those it sends and those it applied.
pub struct Resets {
    own: NodeSlot,
    next_seq: u64,
    outgoing: BTreeMap<u64, Outgoing>,
    /// `(origin, seq)` → when applied.
    applied: BTreeMap<(u16, u64), Nanos>,
    done: VecDeque<ResetDone>,
    sends: VecDeque<(NodeSlot, ResetFrame)>,
    acks: VecDeque<(NodeSlot, ResetAck)>,
    /// When the applied records are next looked at for expiry: the core's
    /// timer fires every sync tick, far more often than records expire.
    next_prune: Nanos,
}

impl Resets {
    /// Resets of the node in `own`, whose run started at `incarnation` (ms):
    /// sequence numbers start from it, so that no run reuses an earlier
    /// run's record names.
    pub fn new(own: NodeSlot, incarnation: u64) -> Self {
        Resets {
            own,
            next_seq: incarnation.saturating_mul(1 << 16),
            outgoing: BTreeMap::new(),
            applied: BTreeMap::new(),
            done: VecDeque::new(),
            sends: VecDeque::new(),
            acks: VecDeque::new(),
            next_prune: Nanos::ZERO,
        }
    }

    /// A reset of `keys` that this node has just applied to its own slot:
    /// sends it to `known` peers and answers once those in `live` have
    /// acknowledged. Returns the ticket of its [`ResetDone`].
    pub fn begin(
        &mut self,
        now: Nanos,
        keys: &[CounterKey],
        known: &BTreeSet<NodeSlot>,
        live: &BTreeSet<NodeSlot>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = ResetFrame {
            origin: self.own.get(),
            seq,
            keys: keys
                .iter()
                .map(|k| ResetKey {
                    limit: k.limit.0,
                    key: k.key.0,
                })
                .collect(),
        };
        let targets: BTreeSet<NodeSlot> =
            known.iter().copied().filter(|&s| s != self.own).collect();
        let awaited = live.intersection(&targets).copied().collect();
        for &to in &targets {
            self.sends.push_back((to, frame.clone()));
        }
        self.outgoing.insert(
            seq,
            Outgoing {
                frame,
                began: now,
                awaited,
                targets,
                acked: BTreeSet::new(),
                answered: false,
                next_send: now + RESEND_EVERY,
            },
        );
        self.forget_beyond_capacity();
        self.settle(now);
        seq
    }

    /// A peer's reset record: the keys to clear from this node's own slot,
    /// or `None` when this record was applied already. Either way the
    /// record is acknowledged.
    pub fn on_reset(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        frame: &ResetFrame,
    ) -> Option<Vec<CounterKey>> {
        self.acks.push_back((
            from,
            ResetAck {
                slot: self.own.get(),
                origin: frame.origin,
                seq: frame.seq,
            },
        ));
        if self
            .applied
            .insert((frame.origin, frame.seq), now)
            .is_some()
        {
            return None;
        }
        while self.applied.len() > MAX_RECORDS {
            let oldest = self
                .applied
                .iter()
                .min_by_key(|(_, &at)| at)
                .map(|(&id, _)| id);
            if let Some(id) = oldest {
                self.applied.remove(&id);
            }
        }
        Some(
            frame
                .keys
                .iter()
                .map(|k| CounterKey::new(LimitId(k.limit), KeyDigest(k.key)))
                .collect(),
        )
    }

    /// A peer acknowledged one of this node's records.
    pub fn on_ack(&mut self, now: Nanos, from: NodeSlot, ack: &ResetAck) {
        if ack.origin != self.own.get() {
            return;
        }
        if let Some(out) = self.outgoing.get_mut(&ack.seq) {
            if out.targets.contains(&from) {
                out.acked.insert(from);
            }
        }
        self.settle(now);
    }

    /// A peer connected: the records it has not acknowledged go to it now.
    pub fn on_connected(&mut self, slot: NodeSlot) {
        for out in self.outgoing.values() {
            if out.targets.contains(&slot) && !out.acked.contains(&slot) {
                self.sends.push_back((slot, out.frame.clone()));
            }
        }
    }

    /// The earliest time [`Resets::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.outgoing
            .values()
            .map(|o| {
                if o.answered {
                    o.next_send
                } else {
                    o.next_send.min(o.began + ANSWER_WITHIN)
                }
            })
            .min()
    }

    /// Sends records again, answers the requests whose wait is over and
    /// forgets what is done or too old.
    pub fn handle_timeout(&mut self, now: Nanos) {
        for out in self.outgoing.values_mut() {
            if out.next_send <= now {
                out.next_send = now + RESEND_EVERY;
                for to in out.targets.difference(&out.acked) {
                    self.sends.push_back((*to, out.frame.clone()));
                }
            }
        }
        if now >= self.next_prune {
            self.next_prune = now + PRUNE_EVERY;
            self.applied
                .retain(|_, at| now.saturating_sub(*at) < KEEP_FOR);
        }
        if !self.outgoing.is_empty() {
            self.settle(now);
        }
    }

    /// The next answered reset.
    pub fn poll_done(&mut self) -> Option<ResetDone> {
        self.done.pop_front()
    }

    /// The next reset record to send, and to whom.
    pub fn poll_send(&mut self) -> Option<(NodeSlot, ResetFrame)> {
        self.sends.pop_front()
    }

    /// The next acknowledgement to send, and to whom.
    pub fn poll_ack(&mut self) -> Option<(NodeSlot, ResetAck)> {
        self.acks.pop_front()
    }

    /// Records still going to some peer.
    pub fn outstanding(&self) -> usize {
        self.outgoing.len()
    }

    fn settle(&mut self, now: Nanos) {
        for (&seq, out) in self.outgoing.iter_mut() {
            if out.answered {
                continue;
            }
            let all_live = out.awaited.is_subset(&out.acked);
            if all_live || now >= out.began + ANSWER_WITHIN {
                out.answered = true;
                self.done.push_back(ResetDone {
                    ticket: seq,
                    acked: out.acked.iter().copied().collect(),
                    pending: out.unacked().collect(),
                });
            }
        }
        self.outgoing.retain(|_, o| {
            !(o.answered && o.acked.is_superset(&o.targets))
                && now.saturating_sub(o.began) < KEEP_FOR
        });
    }

    fn forget_beyond_capacity(&mut self) {
        while self.outgoing.len() > MAX_RECORDS {
            let Some((&oldest, _)) = self.outgoing.iter().next() else {
                break;
            };
            if let Some(out) = self.outgoing.remove(&oldest) {
                if !out.answered {
                    self.done.push_back(ResetDone {
                        ticket: oldest,
                        acked: out.acked.iter().copied().collect(),
                        pending: out.unacked().collect(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(s: &[u16]) -> BTreeSet<NodeSlot> {
        s.iter().map(|&i| NodeSlot::new(i)).collect()
    }

    fn key(k: u64) -> CounterKey {
        CounterKey::new(LimitId(7), KeyDigest(k))
    }

    #[test]
    fn answers_once_the_live_peers_acknowledge_and_resends_to_the_rest() {
        let mut a = Resets::new(NodeSlot::new(0), 1);
        let t0 = Nanos::from_secs(100);
        let ticket = a.begin(t0, &[key(1)], &slots(&[1, 2]), &slots(&[1]));
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_send()).collect();
        assert_eq!(sent.len(), 2);
        assert!(a.poll_done().is_none());
        let mut b = Resets::new(NodeSlot::new(1), 1);
        assert_eq!(
            b.on_reset(t0, NodeSlot::new(0), &sent[0].1),
            Some(vec![key(1)])
        );
        // A duplicate is acknowledged but not applied again.
        assert_eq!(b.on_reset(t0, NodeSlot::new(0), &sent[0].1), None);
        let (to, ack) = b.poll_ack().unwrap();
        assert_eq!(to, NodeSlot::new(0));
        a.on_ack(t0, NodeSlot::new(1), &ack);
        let done = a.poll_done().unwrap();
        assert_eq!(done.ticket, ticket);
        assert_eq!(done.acked, vec![NodeSlot::new(1)]);
        assert_eq!(done.pending, vec![NodeSlot::new(2)]);
        // Node 2 gets it again on every resend and when it connects.
        a.handle_timeout(t0 + RESEND_EVERY);
        let again: Vec<_> = std::iter::from_fn(|| a.poll_send()).collect();
        assert_eq!(
            again.iter().map(|(s, _)| s.get()).collect::<Vec<_>>(),
            vec![2]
        );
        a.on_connected(NodeSlot::new(2));
        assert_eq!(a.poll_send().map(|(s, _)| s.get()), Some(2));
        a.on_ack(
            t0,
            NodeSlot::new(2),
            &ResetAck {
                slot: 2,
                origin: 0,
                seq: ticket,
            },
        );
        assert_eq!(a.outstanding(), 0);
    }

    #[test]
    fn answers_after_the_wait_when_a_live_peer_is_silent() {
        let mut a = Resets::new(NodeSlot::new(0), 1);
        let t0 = Nanos::from_secs(100);
        a.begin(t0, &[key(1)], &slots(&[1]), &slots(&[1]));
        assert_eq!(a.poll_timeout(), Some(t0 + RESEND_EVERY));
        a.handle_timeout(t0 + ANSWER_WITHIN);
        let done = a.poll_done().unwrap();
        assert!(done.acked.is_empty());
        assert_eq!(done.pending, vec![NodeSlot::new(1)]);
        assert_eq!(a.outstanding(), 1, "still sent until acknowledged");
    }

    #[test]
    fn a_lone_node_answers_at_once_and_later_runs_do_not_reuse_names() {
        let mut a = Resets::new(NodeSlot::new(0), 1_000);
        let t = a.begin(
            Nanos::from_secs(1),
            &[key(1)],
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert_eq!(a.poll_done().map(|d| d.ticket), Some(t));
        let mut later = Resets::new(NodeSlot::new(0), 1_001);
        let t2 = later.begin(
            Nanos::from_secs(2),
            &[key(1)],
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert!(t2 > t);
    }

    #[test]
    fn acks_for_other_origins_or_strangers_change_nothing() {
        let mut a = Resets::new(NodeSlot::new(0), 1);
        let t0 = Nanos::from_secs(100);
        let seq = a.begin(t0, &[key(1)], &slots(&[1]), &slots(&[1]));
        a.on_ack(
            t0,
            NodeSlot::new(1),
            &ResetAck {
                slot: 1,
                origin: 3,
                seq,
            },
        );
        a.on_ack(
            t0,
            NodeSlot::new(5),
            &ResetAck {
                slot: 5,
                origin: 0,
                seq,
            },
        );
        assert!(a.poll_done().is_none());
    }
}
