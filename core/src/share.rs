//! Per-node shares: how much a node may admit that its peers do not yet know.
//!
//! A node cannot see its peers' newest admissions; it can bound them. Every
//! node caps, per key, the hits it has admitted that its peers have not yet
//! acknowledged (its *in-flight* hits) at its *share* `q_i` of an in-flight
//! budget `Q`, and, when it decides, counts every peer `j` it must not assume
//! idle as if `q_j` more hits had already arrived. Since a peer's unseen hits
//! are at most its unacknowledged hits, which it keeps at most `q_j`, every
//! admission keeps the true cluster-wide count within the limit: the
//! reservation replaces the peers' unknown with its bound.
//!
//! Shares follow traffic (flow-proportional) with a uniform prior:
//! `q_j = max(1, Q·(P_j + L/n) / 2L)`, where `P_j` is slot `j`'s hits in the
//! key's window, `L` the limit and `n` the number of nodes. The denominator is
//! a constant, so a share only grows with `P_j`; and a node computes its own
//! cap from its *acknowledged* hits, which every peer it waits for has seen.
//! Hence every peer's reservation for a node is at least that node's own cap,
//! however far their views have drifted apart (a partition included): the
//! safety argument needs nothing else. While `ΣP ≤ L` the shares sum to at
//! most `Q`.

use crate::peer_set::PeerSet;
use crate::slot::NodeSlot;
use crate::time::Nanos;

/// What a node does about peers it cannot reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharePolicy {
    /// Never assume an unreachable peer idle: keep reserving its share. A node
    /// cut off from the majority admits no more than its own in-flight share
    /// until it hears from its peers again. No overshoot beyond in-flight
    /// deltas.
    Strict,
    /// After the failure detector declares a peer dead, stop reserving for it
    /// and stop waiting for its acknowledgements. Every side of a split brain
    /// may spend the whole remaining budget.
    Available,
    /// As strict, but a node cut off from the majority may admit up to
    /// `fraction_ppm` millionths of the limit (its share of it) beyond its
    /// in-flight share.
    Bounded {
        /// The allowance, in millionths of each limit's quota.
        fraction_ppm: u32,
    },
}

impl SharePolicy {
    /// The policy's name in configuration files and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            SharePolicy::Strict => "strict",
            SharePolicy::Available => "available",
            SharePolicy::Bounded { .. } => "bounded",
        }
    }
}

/// The cluster as the decision path needs to see it. Built by the node
/// driver from membership; swapped in whole when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareView {
    /// This node's slot.
    pub own: u16,
    /// Every member of the cluster, this node included.
    pub members: PeerSet,
    /// Peers whose share is reserved when deciding.
    pub reserve: PeerSet,
    /// True when this node cannot reach a majority of the members.
    pub minority: bool,
    /// What to do about peers this node cannot reach.
    pub policy: SharePolicy,
    /// The in-flight budget `Q` as millionths of each limit's quota.
    pub inflight_ppm: u32,
    /// Roughly how long an acknowledgement takes: the wait suggested to a
    /// request refused only because this node's in-flight share is spent.
    pub ack_wait: Nanos,
    /// Some live peer's state has not fully reached this node since it came
    /// (back) up: local counts may miss its admissions, so every request is
    /// confirmed with the peers (whose answers carry their counts).
    pub confirm_all: bool,
}

impl ShareView {
    /// A single node: no peers, nothing to reserve.
    pub fn alone(own: u16) -> Self {
        ShareView {
            own,
            members: PeerSet::single(NodeSlot::new(own)),
            reserve: PeerSet::new(),
            minority: false,
            policy: SharePolicy::Strict,
            inflight_ppm: 20_000,
            ack_wait: Nanos::from_millis(10),
            confirm_all: false,
        }
    }

    /// The view of node `own` in a cluster whose `members` (this node
    /// included) are known and of which `live` are believed alive: under
    /// `available` only live peers are reserved, otherwise every member is.
    pub fn for_cluster(
        own: u16,
        members: PeerSet,
        live: &PeerSet,
        minority: bool,
        policy: SharePolicy,
        inflight_ppm: u32,
        ack_wait: Nanos,
    ) -> Self {
        let mut members = members;
        members.insert(NodeSlot::new(own));
        let mut reserve = match policy {
            SharePolicy::Available => live.intersection(&members),
            _ => members.clone(),
        };
        reserve.remove(NodeSlot::new(own));
        ShareView {
            own,
            members,
            reserve,
            minority,
            policy,
            inflight_ppm,
            ack_wait,
            confirm_all: false,
        }
    }

    /// The same view, confirming every request while `on`.
    pub fn confirming_all(mut self, on: bool) -> Self {
        self.confirm_all = on;
        self
    }

    /// Members of the cluster, this node included: the `n` of the share
    /// formula.
    pub fn node_count(&self) -> u64 {
        self.members.len() as u64
    }

    /// The in-flight budget `Q` of a limit whose quota is `quota`: a fraction
    /// of it, but at least one hit per node so that every node can admit.
    pub fn budget(&self, quota: u64, max_inflight: u64) -> u64 {
        let fraction = (quota.saturating_mul(u64::from(self.inflight_ppm))).div_ceil(1_000_000);
        fraction.max(self.node_count()).min(max_inflight)
    }
}

/// Per-slot hit totals of one key's window, as [`Shares`] reads them: on
/// the stack up to 64 slots (every cluster the masks this replaced could
/// describe decides without allocating), on the heap past that.
pub type SlotTotals = smallvec::SmallVec<[u64; 64]>;

/// Shares of one key, computed from the per-slot hit totals of its window.
pub struct Shares<'a> {
    view: &'a ShareView,
    budget: u64,
    quota: u64,
    totals: &'a [u64],
}

impl<'a> Shares<'a> {
    /// `totals[j]` is slot `j`'s hits over the key's live buckets; `quota`
    /// the limit's quota `L`.
    pub fn new(view: &'a ShareView, budget: u64, quota: u64, totals: &'a [u64]) -> Self {
        Shares {
            view,
            budget,
            quota: quota.max(1),
            totals,
        }
    }

    /// The share of a slot with `p` hits: `max(1, Q·(p + L/n) / 2L)`,
    /// computed as `Q·(n·p + L) / (2·n·L)` in integers.
    fn share(&self, p: u64) -> u64 {
        let n = u128::from(self.view.node_count());
        let l = u128::from(self.quota);
        let q = u128::from(self.budget) * (n * u128::from(p) + l) / (2 * n * l);
        (q.min(u128::from(u64::MAX)) as u64).max(1)
    }

    /// `q_j` as seen from here: the most in-flight hits slot `j` may have.
    pub fn of(&self, slot: usize) -> u64 {
        self.share(self.totals.get(slot).copied().unwrap_or(0))
    }

    /// Hits to count as already arrived on behalf of peers.
    pub fn reserved(&self) -> u64 {
        self.reserved_for(&self.view.reserve)
    }

    /// Hits to count on behalf of the peers in `peers` only (slots past
    /// the key's window, which no counter of it has, are not counted).
    pub fn reserved_for(&self, peers: &PeerSet) -> u64 {
        peers
            .below(self.totals.len())
            .filter(|&j| j.get() != self.view.own)
            .map(|j| self.of(j.index()))
            .sum()
    }

    /// The most in-flight hits this node may have for the key, given that
    /// `acked` of its hits are known to every peer it waits for.
    pub fn own_cap(&self, acked: u64) -> u64 {
        let base = self.share(acked);
        match self.view.policy {
            SharePolicy::Bounded { fraction_ppm } if self.view.minority => {
                // The cut-off node's part of the allowed excess.
                let extra = u128::from(self.quota) * u128::from(fraction_ppm)
                    / 1_000_000
                    / u128::from(self.view.node_count());
                base + extra as u64
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(mask: u64) -> PeerSet {
        (0..64)
            .filter(|j| mask & (1 << j) != 0)
            .map(NodeSlot::new)
            .collect()
    }

    fn view(members: u64, reserve: u64) -> ShareView {
        ShareView {
            members: set(members),
            reserve: set(reserve),
            ..ShareView::alone(0)
        }
    }

    #[test]
    fn shares_follow_traffic_and_stay_within_the_budget() {
        let v = view(0b111, 0b110);
        // Limit 1000, budget 100, three nodes: q = 100·(3p + 1000)/6000.
        let totals = [900, 50, 50];
        let s = Shares::new(&v, 100, 1000, &totals);
        assert_eq!(s.of(0), 61);
        assert_eq!(s.of(1), 19);
        assert_eq!(s.of(2), 19);
        assert!(s.of(0) + s.of(1) + s.of(2) <= 100);
        assert_eq!(s.reserved(), 38);
    }

    #[test]
    fn a_peers_reservation_never_falls_below_a_nodes_own_cap() {
        // Node 2 computes its cap from what its peers surely saw (its
        // acknowledged hits); they reserve from what they saw, which is at
        // least that, whatever else each side has seen.
        let v = view(0b111, 0b011);
        for acked in [0u64, 10, 400] {
            for seen_by_peer in [acked, acked + 5, acked + 300] {
                let own = Shares::new(&v, 30, 1000, &[0, 0, 0]).own_cap(acked);
                let peer_totals = [700, 250, seen_by_peer];
                let reserved = Shares::new(&v, 30, 1000, &peer_totals).of(2);
                assert!(reserved >= own, "acked {acked}, seen {seen_by_peer}");
            }
        }
    }

    #[test]
    fn a_quiet_key_splits_evenly_and_every_node_gets_at_least_one() {
        let v = view(0b111, 0b110);
        let s = Shares::new(&v, 60, 1000, &[0, 0, 0]);
        assert_eq!((s.of(0), s.of(1), s.of(2)), (10, 10, 10));
        let s = Shares::new(&v, 3, 10, &[0, 0, 0]);
        assert_eq!((s.of(0), s.of(1), s.of(2)), (1, 1, 1));
        assert_eq!(v.budget(10, 1000), 3, "at least one per node");
        assert_eq!(v.budget(100_000, 1000), 1000, "capped");
        assert_eq!(v.budget(10_000, 100_000), 200, "2% of the quota");
    }

    #[test]
    fn bounded_policy_lets_a_cut_off_node_spend_its_fraction() {
        let mut v = view(0b111, 0b110);
        v.policy = SharePolicy::Bounded {
            fraction_ppm: 90_000,
        };
        let totals = [0, 0, 0];
        assert_eq!(Shares::new(&v, 60, 1000, &totals).own_cap(0), 10);
        v.minority = true;
        // 9% of 1000, of which this node's third.
        assert_eq!(Shares::new(&v, 60, 1000, &totals).own_cap(0), 10 + 30);
    }

    #[test]
    fn alone_there_is_nothing_to_reserve() {
        let v = ShareView::alone(3);
        let s = Shares::new(&v, 10, 100, &[0, 0, 0, 7]);
        assert!(v.members.is_just(NodeSlot::new(3)));
        assert_eq!(s.reserved(), 0);
        // The limiter skips shares entirely when alone; the formula still holds.
        assert_eq!(s.own_cap(7), 5);
    }

    #[test]
    fn peers_past_slot_63_are_reserved_like_any_other() {
        let members = PeerSet::first(300);
        let dead: PeerSet = [64u16, 299].into_iter().map(NodeSlot::new).collect();
        let live = members.difference(&dead);
        let strict = ShareView::for_cluster(
            70,
            members.clone(),
            &live,
            false,
            SharePolicy::Strict,
            20_000,
            Nanos::from_millis(10),
        );
        assert_eq!(strict.node_count(), 300);
        assert_eq!(strict.reserve.len(), 299);
        assert!(!strict.reserve.contains(NodeSlot::new(70)));
        let available = ShareView::for_cluster(
            70,
            members,
            &live,
            false,
            SharePolicy::Available,
            20_000,
            Nanos::from_millis(10),
        );
        assert_eq!(available.reserve.len(), 297, "neither itself nor the dead");
        // Budget 300 over 300 nodes, limit 3000: q = 300·(300p + 3000)/1.8M.
        let mut totals = vec![0u64; 300];
        totals[299] = 6000;
        let s = Shares::new(&strict, 300, 3000, &totals);
        assert_eq!(s.of(0), 1);
        assert_eq!(s.of(299), 300 * (300 * 6000 + 3000) / (2 * 300 * 3000));
        assert_eq!(s.reserved(), 298 + s.of(299));
        let a = Shares::new(&available, 300, 3000, &totals);
        assert_eq!(a.reserved(), 297, "slot 299 is dead, not reserved");
        // A window narrower than the view reserves only the slots it has.
        assert_eq!(
            Shares::new(&strict, 300, 3000, &totals[..100]).reserved(),
            99
        );
    }
}
