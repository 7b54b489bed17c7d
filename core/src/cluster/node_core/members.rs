//! Who is in the cluster: members join when SWIM reports them up, leave
//! when they say so (a Leave frame), and are forgotten after
//! `forget_after` once declared dead, by nodes in the majority only. The
//! member set drives majorities, recovery, rules quorums and shares
//! (DESIGN.md, "Membership").

use std::collections::BTreeSet;

use super::{CoreConfig, CoreEvent, NodeCore};
use crate::cluster::membership::MemberEvent;
use crate::peer_set::PeerSet;
use crate::share::ShareView;
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::wire::Frame;

/// A member declared dead, or leaving.
#[derive(Clone, Copy, Debug)]
pub(super) struct Down {
    since: Nanos,
    /// It said it was leaving: forgotten after [`LEAVE_GRACE`].
    left: bool,
}

/// Why an operator's forget was refused. It changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForgetError {
    /// The node cannot forget itself.
    #[error("a node cannot forget itself")]
    Itself,
    /// The slot is not a member this node knows.
    #[error("{0} is not a member")]
    NotMember(NodeSlot),
    /// The failure detector holds the member alive.
    #[error("{0} is alive: stop it first (a clean stop leaves by itself)")]
    Alive(NodeSlot),
}

/// How long a member declared dead stays one, unless configured otherwise:
/// long enough for a paused node or a short partition to come back without
/// a membership change, short enough that a crashed node's share returns
/// within half a minute.
pub const DEFAULT_FORGET_AFTER: Nanos = Nanos::from_secs(30);

/// How long a member that left cleanly is still counted: its last deltas
/// (sent just before its leave) are merged meanwhile.
const LEAVE_GRACE: Nanos = Nanos::from_millis(200);

impl Down {
    /// A member declared dead from `now` on (or remembered from a
    /// previous run and not heard from yet).
    pub(super) fn dead(now: Nanos) -> Self {
        Down {
            since: now,
            left: false,
        }
    }

    fn wait(&self, forget_after: Nanos) -> Nanos {
        if self.left {
            LEAVE_GRACE
        } else {
            forget_after
        }
    }
}

/// The share view of node `cfg.slot` among `others` (see
/// [`NodeCore::share_view`]). `live`: the peers believed alive.
pub fn members_view(
    cfg: &CoreConfig,
    others: &BTreeSet<NodeSlot>,
    live: &PeerSet,
    minority: bool,
) -> ShareView {
    let members: PeerSet = others.iter().copied().collect();
    ShareView::for_cluster(
        cfg.slot.get(),
        members,
        live,
        minority,
        cfg.policy,
        cfg.inflight_ppm,
        cfg.sync_interval * 2,
    )
}

impl<C: Clock> NodeCore<C> {
    /// `from` is leaving cleanly: forgotten after a short grace (its last
    /// deltas may still be on their way), whatever side of a split this
    /// node is on (a leaving node admits nothing more).
    pub(super) fn on_leave(&mut self, now: Nanos, from: NodeSlot, incarnation: u64) {
        let current = self.repl.peers().get(&from).and_then(|p| p.incarnation);
        if current.is_some_and(|c| c > incarnation) || !self.members.contains(&from) {
            return; // a newer run of it is a member, or it is not one
        }
        tracing::info!(slot = from.get(), "a member is leaving the cluster");
        self.down.insert(
            from,
            Down {
                since: now,
                left: true,
            },
        );
        // It admits nothing more and shipped its last deltas before this:
        // nobody waits for its acknowledgements or answers during the
        // grace (its share stays reserved until it is forgotten).
        self.stop_waiting_for_member(now, from);
        self.limiter.set_share_view(self.share_view());
    }

    /// `slot` is dead or leaving: refunds, rules changes and replication no
    /// longer wait for it (its share stays reserved until it is forgotten).
    fn stop_waiting_for_member(&mut self, now: Nanos, slot: NodeSlot) {
        self.live.remove(&slot);
        self.refunds.on_down(slot);
        self.register.handle_peer_down(now, slot);
        self.repl
            .set_liveness(&*self.limiter, slot, false, self.rules_digest());
    }

    /// When the next member is due to be forgotten: only members
    /// [`forget_due`](Self::forget_due) would forget now (a node in the
    /// minority forgets only those that left), so that a deadline it
    /// cannot act on never becomes a timer that fires at once, forever.
    /// The next input after it regains a majority re-arms the rest.
    pub(super) fn next_forget(&self) -> Option<Nanos> {
        let minority = self.repl.in_minority();
        self.down
            .values()
            .filter(|d| d.left || !minority)
            .map(|d| d.since + d.wait(self.cfg.forget_after))
            .min()
    }

    /// Forgets the members whose time has come: a member that left cleanly
    /// after its grace; one declared dead after `forget_after`, but only
    /// while this node is in the majority (a minority forgetting the
    /// majority would make itself a cluster of its own).
    pub(super) fn forget_due(&mut self, now: Nanos) {
        let due: Vec<NodeSlot> = self
            .down
            .iter()
            .filter(|(_, d)| {
                now >= d.since + d.wait(self.cfg.forget_after)
                    && (d.left || !self.repl.in_minority())
            })
            .map(|(&s, _)| s)
            .collect();
        if due.is_empty() {
            return;
        }
        for slot in due {
            self.forget(
                now,
                slot,
                "member forgotten: its share is no longer reserved",
            );
        }
        self.membership_changed(now);
        self.dial_peers();
    }

    /// Drops `slot` from the members: its share is no longer reserved and
    /// majorities no longer count it. Its counts stay in every counter.
    fn forget(&mut self, now: Nanos, slot: NodeSlot, why: &'static str) {
        self.down.remove(&slot);
        if !self.members.remove(&slot) {
            return;
        }
        tracing::info!(slot = slot.get(), "{why}");
        self.known.remove(&slot);
        self.live.remove(&slot);
        self.addrs.remove(&slot);
        self.refunds.on_down(slot);
        self.register.handle_peer_down(now, slot);
        self.repl.remove_peer(&*self.limiter, slot);
    }

    /// An operator forgets a member now, whatever side of a split this node
    /// is on, and tells every other member to do the same: for members
    /// known to be gone for good when half the cluster or more was lost at
    /// once, which the survivors, in the minority, would otherwise wait
    /// for forever. Refused for this node itself, a slot that is not a
    /// member, and a member the failure detector holds alive (forgetting a
    /// running node would stop reserving its share while it admits). A
    /// member that is only cut off, forgotten on both sides of a split,
    /// lets each side admit the whole limit: the caller must know it is
    /// gone.
    pub fn handle_forget(&mut self, now: Nanos, slot: NodeSlot) -> Result<(), ForgetError> {
        self.saw(now);
        if slot == self.cfg.slot {
            return Err(ForgetError::Itself);
        }
        if !self.members.contains(&slot) {
            return Err(ForgetError::NotMember(slot));
        }
        if self.live.contains(&slot) {
            return Err(ForgetError::Alive(slot));
        }
        self.forget(now, slot, "member forgotten by an operator");
        self.membership_changed(now);
        self.dial_peers();
        self.send_to_members(Frame::Forget(crate::wire::Forget {
            slot: self.cfg.slot.get(),
            member: slot.get(),
        }));
        self.after_input();
        Ok(())
    }

    /// A peer's operator forgot `member`: so does this node, unless the
    /// member is this node or one it holds alive.
    pub(super) fn on_forget(&mut self, now: Nanos, from: NodeSlot, member: NodeSlot) {
        if member == self.cfg.slot || self.live.contains(&member) {
            tracing::warn!(
                from = from.get(),
                member = member.get(),
                "a peer forgot a member this node holds alive: not forgotten here"
            );
            return;
        }
        if self.members.contains(&member) {
            self.forget(now, member, "member forgotten by an operator on a peer");
            self.membership_changed(now);
            self.dial_peers();
        }
    }

    /// Keeps connections to every peer this node has reached or heard of
    /// and not forgotten: a seed that answered is kept before membership
    /// names it (closing it would cut the path its membership news takes).
    fn dial_peers(&mut self) {
        let peers = self.addrs.iter().map(|(s, a)| (*s, *a)).collect();
        self.events.push_back(CoreEvent::DialPeers(peers));
    }

    /// Majorities, recovery, rules quorums and shares follow the members.
    fn membership_changed(&mut self, now: Nanos) {
        self.repl.set_expected_peers(self.members.len(), now);
        self.register.set_cluster_size(self.members.len() + 1);
        self.limiter.set_share_view(self.share_view());
        self.events
            .push_back(CoreEvent::Members(self.members.iter().copied().collect()));
    }

    pub(super) fn on_member_event(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Up(m) | MemberEvent::Rejoined(m) => {
                if m.slot == self.cfg.slot {
                    return;
                }
                self.down.remove(&m.slot);
                if self.members.insert(m.slot) {
                    tracing::info!(slot = m.slot.get(), name = %m.name, "a member joined");
                    let now = self.now;
                    self.membership_changed(now);
                }
                self.addrs.insert(m.slot, m.addr);
                self.known.insert(m.slot);
                self.live.insert(m.slot);
                self.repl.add_peer(m.slot);
                self.repl
                    .set_liveness(&*self.limiter, m.slot, true, self.rules_digest());
                self.events.push_back(CoreEvent::MemberUp {
                    slot: m.slot,
                    name: m.name,
                });
            }
            MemberEvent::Down(m) => {
                let now = self.now;
                self.down.entry(m.slot).or_insert(Down::dead(now));
                self.stop_waiting_for_member(now, m.slot);
                self.events.push_back(CoreEvent::MemberDown {
                    slot: m.slot,
                    name: m.name,
                });
            }
        }
        self.dial_peers();
        self.limiter.set_share_view(self.share_view());
    }
}
