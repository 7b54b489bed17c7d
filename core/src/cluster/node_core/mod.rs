//! A node's orchestration as one sans-IO state machine: replication,
//! membership, the rules register, the recovery gate and the share view.
//!
//! [`NodeCore`] is what a node *decides*; the node's driver (`crate::node`)
//! only moves bytes and time: it hands the core what the transport reports
//! (connections, frames), the time, the wake-ups of the limiter and the
//! operator's commands, and carries out what the core asks (frames to send,
//! peers to dial, rules to keep on disk). Nothing here opens a socket,
//! spawns a task, reads a clock or touches a file.
//!
//! # Calling order
//!
//! 1. Feed inputs: [`NodeCore::handle_connected`],
//!    [`NodeCore::handle_disconnected`], [`NodeCore::handle_frame`],
//!    [`NodeCore::handle_wake`], [`NodeCore::handle_confirm`] (a request
//!    near its limit, counted provisionally by the limiter),
//!    [`NodeCore::commit_rules`] (after [`NodeCore::prepare_rules`]; its
//!    outcome from [`NodeCore::poll_rules_outcome`]),
//!    [`NodeCore::handle_reset`] (an admin counter reset),
//!    [`NodeCore::handle_forward_refund`] (a refund of a receipt a peer
//!    issued), and
//!    [`NodeCore::handle_timeout`] once [`NodeCore::poll_timeout`] has
//!    passed.
//! 2. Drain [`NodeCore::poll_confirmed`] (decided confirmations: hand each
//!    to whoever waits on its ticket, or [`NodeCore::handle_abandoned`] if
//!    nobody does), [`NodeCore::poll_reset_done`] (answered resets),
//!    [`NodeCore::poll_refund_done`] (answered refund forwards),
//!    [`NodeCore::poll_event`] (recovered, rules in force,
//!    the peers to dial), then [`NodeCore::poll_transmit`].
//! 3. Re-arm the timer from [`NodeCore::poll_timeout`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::cluster::confirm::{Confirmations, Confirmed, Ticket};
use crate::cluster::membership::{Member, Membership, MembershipConfig};
use crate::cluster::refunds::Forwards;
use crate::cluster::replication::{
    Delivered, ReplicationConfig, ReplicationEvent, Replicator, SilencePolicy, Transmit,
};
use crate::cluster::resets::{ResetDone, Resets};
use crate::cluster::rules_register::{RegisterConfig, RulesRegister};
use crate::key::CounterKey;
use crate::limiter::{Limiter, Pending};
use crate::peer_set::PeerSet;
use crate::share::{SharePolicy, ShareView};
use crate::slot::NodeSlot;
use crate::time::{Clock, Nanos};
use crate::wire::{Frame, Kind, Swim};

pub use crate::cluster::rules_register::{RulesOutcome, RulesTicket, RulesVersion};
use members::Down;
pub use members::{members_view, ForgetError, DEFAULT_FORGET_AFTER};
pub use rules::{PreparedRules, PutRulesError};

/// What the core settles on its own.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This node's name.
    pub name: String,
    /// This node's slot.
    pub slot: NodeSlot,
    /// The other members this node knows of before it hears from anyone:
    /// those it remembered from its last run (a real node keeps them in its
    /// data directory), or every other node of a simulated cluster. More
    /// join as they are heard of; recovery waits for all of them.
    pub members: BTreeSet<NodeSlot>,
    /// With no other member known, this node may start a new cluster of its
    /// own: at once (`Some(0)`: it has no seeds), after waiting this long for
    /// a peer to show up, or never (`None`).
    pub alone_after: Option<Nanos>,
    /// How long a member declared dead stays a member (its share reserved,
    /// counted in every majority) before a node in the majority forgets it.
    /// A member that leaves cleanly is forgotten at once.
    pub forget_after: Nanos,
    /// How a limit is shared while peers cannot be reached.
    pub policy: SharePolicy,
    /// In-flight budget per limit, in millionths of the limit.
    pub inflight_ppm: u32,
    /// How often deltas are shipped to peers.
    pub sync_interval: Nanos,
    /// How long recovery waits for every peer before a majority is enough.
    pub recovery_timeout: Nanos,
    /// A verified snapshot was merged before the core started.
    pub snapshot_restored: bool,
    /// This run's incarnation (process start in ms): higher than any earlier
    /// run's.
    pub incarnation: u64,
    /// The address peers reach this node on.
    pub peer_addr: SocketAddr,
    /// The node starts without its counts and must recover them before it
    /// admits (a real node always does; a simulated cluster's first boot
    /// does not).
    pub recovering: bool,
    /// The longest a confirmation waits on a silent peer.
    pub confirm_timeout: Nanos,
    /// When a silent peer stops being waited for.
    pub silence: SilencePolicy,
}

/// What the core asks of its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// The recovery gate opened: the node admits from now on.
    Recovered,
    /// These rules are in force now (from a peer, or committed here): keep
    /// them on disk.
    RulesInForce {
        /// The version now in force.
        version: RulesVersion,
        /// The rules file's text.
        text: String,
    },
    /// The peers to keep connections to changed.
    DialPeers(Vec<(NodeSlot, SocketAddr)>),
    /// A member joined or came back.
    MemberUp {
        /// Its slot.
        slot: NodeSlot,
        /// Its name.
        name: String,
    },
    /// A member left or was declared dead.
    MemberDown {
        /// Its slot.
        slot: NodeSlot,
        /// Its name.
        name: String,
    },
    /// The membership changed: these are the other members now (keep them
    /// on disk: a restarted node waits for them before it admits).
    Members(Vec<NodeSlot>),
}

/// One node's cluster state machine (see the module docs for the calling
/// order).
pub struct NodeCore<C: Clock = crate::clock::SystemClock> {
    cfg: CoreConfig,
    limiter: Arc<Limiter<C>>,
    repl: Replicator,
    membership: Membership,
    register: RulesRegister,
    /// Peer slot → its peer address, as learned from connections.
    addrs: BTreeMap<NodeSlot, SocketAddr>,
    known: BTreeSet<NodeSlot>,
    live: BTreeSet<NodeSlot>,
    /// The other members: remembered, joined or heard of, not forgotten.
    members: BTreeSet<NodeSlot>,
    /// Members declared dead, since when, and whether they left cleanly.
    down: BTreeMap<NodeSlot, Down>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<CoreEvent>,
    confirmations: Confirmations,
    resets: Resets,
    refunds: Forwards,
    /// The latest time an input brought.
    now: Nanos,
}

impl<C: Clock> NodeCore<C> {
    /// A core for a node that has just started (it recovers before it
    /// admits), running `rules` at `version`.
    pub fn new(
        cfg: CoreConfig,
        limiter: Arc<Limiter<C>>,
        rules_text: String,
        rules_version: RulesVersion,
        now: Nanos,
    ) -> Self {
        let mut rc = ReplicationConfig::new(cfg.slot, cfg.name.clone());
        rc.sync_interval = cfg.sync_interval;
        rc.policy = cfg.policy;
        rc.recovery_timeout = cfg.recovery_timeout;
        rc.expected_peers = cfg.members.len();
        rc.alone_after = if cfg.members.is_empty() {
            cfg.alone_after
        } else {
            None
        };
        rc.snapshot_restored = cfg.snapshot_restored;
        rc.confirm_timeout = cfg.confirm_timeout;
        rc.silence = cfg.silence;
        // Ready only with the peers' rules in hand: a restarted node must not
        // decide on rules older than the cluster's.
        rc.await_rules = true;
        // A peer's hold on a claimed key must outlast the claimant's wait.
        limiter.set_confirm_hold(rc.claim_timeout * 2);
        let repl = Replicator::new(rc, cfg.incarnation, cfg.recovering, now);
        let me = Member::new(cfg.name.clone(), cfg.slot, cfg.peer_addr, cfg.incarnation);
        let membership = Membership::new(
            me,
            MembershipConfig::lan((cfg.members.len() as u32 + 1).max(3)),
            cfg.incarnation ^ u64::from(cfg.slot.get()),
        );
        let core = NodeCore {
            limiter,
            repl,
            membership,
            register: RulesRegister::new(
                RegisterConfig::new(cfg.slot, cfg.members.len() + 1),
                rules_text,
                rules_version,
            ),
            addrs: BTreeMap::new(),
            known: BTreeSet::new(),
            live: BTreeSet::new(),
            members: cfg.members.clone(),
            // A remembered member is down until heard from: one that never
            // comes back is forgotten like any dead member, instead of
            // being reserved (and counted in majorities) for ever.
            down: cfg.members.iter().map(|&s| (s, Down::dead(now))).collect(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            confirmations: Confirmations::new(),
            resets: Resets::new(cfg.slot, cfg.incarnation),
            refunds: Forwards::new(cfg.slot),
            now,
            cfg,
        };
        core.limiter.set_share_view(core.share_view());
        core
    }

    /// The share view of this node: every member is one whether or not it
    /// is heard from now, so a node that hears nobody still reserves its
    /// peers' shares and never decides as if alone.
    pub fn share_view(&self) -> ShareView {
        members_view(
            &self.cfg,
            &self.members,
            &self.live_mask(),
            self.repl.in_minority(),
        )
        .confirming_all(self.repl.confirm_all(self.now))
    }

    /// The other members: remembered, joined or heard of, not forgotten.
    pub fn members(&self) -> &BTreeSet<NodeSlot> {
        &self.members
    }

    fn live_mask(&self) -> PeerSet {
        self.live.iter().copied().collect()
    }

    /// The replication state machine, for stats and tests.
    pub fn replicator(&self) -> &Replicator {
        &self.repl
    }
    /// Adds a configured member before it is heard from (a simulated
    /// cluster knows all its members from the start).
    pub fn add_peer(&mut self, slot: NodeSlot) {
        self.repl.add_peer(slot);
    }
    /// The membership state machine.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }
    /// The version of the rules in force.
    pub fn rules_version(&self) -> RulesVersion {
        self.register.version()
    }
    /// The text of the rules in force.
    pub fn rules_text(&self) -> &str {
        self.register.text()
    }
    /// Every peer slot ever seen up since start.
    pub fn known(&self) -> &BTreeSet<NodeSlot> {
        &self.known
    }
    /// Peer slots the membership holds alive now.
    pub fn live(&self) -> &BTreeSet<NodeSlot> {
        &self.live
    }
    /// Whether `addr` belongs to a peer this node already knows.
    pub fn is_known_addr(&self, addr: SocketAddr) -> bool {
        addr == self.cfg.peer_addr || self.addrs.values().any(|a| *a == addr)
    }

    /// A connection to `slot` came up.
    pub fn handle_connected(&mut self, now: Nanos, slot: NodeSlot, addr: SocketAddr) {
        self.saw(now);
        self.addrs.insert(slot, addr);
        self.repl.peer_connected(now, slot, self.rules_digest());
        // Resets it has not acknowledged reach it before new counts do.
        self.resets.on_connected(slot);
        // A peer that missed a rules change learns it here.
        self.send_rules(slot);
        self.after_input();
    }

    /// The connection to `slot` closed.
    pub fn handle_disconnected(&mut self, slot: NodeSlot) {
        self.repl.peer_disconnected(slot);
        if !self.live.contains(&slot) {
            // Waited for only as a connected peer: no longer.
            self.register.handle_peer_down(self.now, slot);
        }
        self.after_input();
    }

    /// A frame from the authenticated peer `from`. Refused frames change
    /// nothing and are counted by the replicator.
    pub fn handle_frame(&mut self, now: Nanos, from: NodeSlot, bytes: &[u8]) {
        self.saw(now);
        let hello = bytes.get(1) == Some(&(Kind::Hello as u8));
        match self
            .repl
            .handle_frame(now, from, bytes, &*self.limiter, self.rules_digest())
        {
            Ok(Delivered::Swim(swim)) => {
                // Malformed membership payloads are refused inside.
                let _ = self.membership.handle_data(now, &swim);
            }
            Ok(Delivered::Reset(reset)) => {
                if let Some(keys) = self.resets.on_reset(now, from, &reset) {
                    let cleared = self.limiter.reset_counters_at(now, &keys);
                    tracing::info!(
                        origin = reset.origin,
                        seq = reset.seq,
                        counters = keys.len(),
                        cleared,
                        "counters reset by a peer"
                    );
                }
            }
            Ok(Delivered::ResetAck(ack)) => self.resets.on_ack(now, from, &ack),
            Ok(Delivered::RefundAsk(ask)) => self.on_refund_ask(now, from, ask),
            Ok(Delivered::RefundReply(reply)) => self.on_refund_reply(from, &reply),
            Ok(Delivered::Leave(leave)) => self.on_leave(now, from, leave.incarnation),
            Ok(Delivered::Forget(f)) => self.on_forget(now, from, NodeSlot::new(f.member)),
            Ok(Delivered::Rules(rules)) => self.on_peer_rules(from, rules),
            Ok(Delivered::RulesAck(ack)) => {
                self.register
                    .handle_ack(now, from, ack.offered, ack.current)
            }
            Ok(Delivered::Applied) if hello => {
                self.introduce(now, from);
                for slot in self.repl.take_rules_wanted() {
                    self.send_rules(slot);
                }
            }
            Ok(Delivered::Applied) => {}
            Err(e) => tracing::debug!(from = from.get(), error = %e, "frame refused"),
        }
        self.after_input();
    }

    /// A request that `Limiter::begin_at` counted provisionally near its
    /// limit: the peers confirm it (see [`Confirmations`]), and its
    /// decision comes out of [`NodeCore::poll_confirmed`] under the
    /// returned ticket.
    pub fn handle_confirm(&mut self, now: Nanos, pending: Pending) -> Ticket {
        self.saw(now);
        let ticket = self
            .confirmations
            .begin(now, pending, &mut self.repl, &self.limiter);
        self.after_input();
        ticket
    }

    /// A request whose confirmation ended; drain after every `handle_*`.
    pub fn poll_confirmed(&mut self) -> Option<Confirmed> {
        self.confirmations.poll_confirmed()
    }

    /// Nobody waits for `confirmed` any more: an admitted request nobody
    /// was told about is given back.
    pub fn handle_abandoned(&mut self, now: Nanos, confirmed: &Confirmed) {
        self.saw(now);
        self.confirmations
            .abandon(now, confirmed, &mut self.repl, &self.limiter);
    }

    /// Requests waiting for their peers' answers.
    pub fn confirming(&self) -> usize {
        self.confirmations.waiting()
    }

    /// A key's in-flight share is spent: ship at once.
    pub fn handle_wake(&mut self, now: Nanos) {
        self.saw(now);
        self.repl.ship_now(now, &*self.limiter);
    }

    /// Keeps the latest time an input brought, for the work an input
    /// without a time of its own sets off.
    fn saw(&mut self, now: Nanos) {
        self.now = self.now.max(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Nanos {
        let repl = self.repl.poll_timeout();
        [
            self.membership.poll_timeout(),
            self.register.poll_timeout(),
            self.resets.poll_timeout(),
            self.refunds.poll_timeout(),
            self.next_forget(),
        ]
        .into_iter()
        .flatten()
        .fold(repl, Nanos::min)
    }

    /// Runs what is due at `now`: membership probes, the sync tick, resends
    /// and claim deadlines.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.saw(now);
        self.membership.handle_timeout(now);
        self.repl.handle_timeout(now, &*self.limiter);
        self.resets.handle_timeout(now);
        self.refunds.handle_timeout(now);
        self.forget_due(now);
        // Proposals still waiting: the rules again to whoever has not
        // answered.
        for slot in self.register.handle_timeout(now) {
            self.send_rules(slot);
        }
        self.after_input();
    }

    /// An admin reset of `counters`: clears this node's own slot of them
    /// now and sends the record to every other configured node, which
    /// clears its own slot once (see [`crate::cluster::resets`]). Returns
    /// the ticket its answer comes out of [`NodeCore::poll_reset_done`]
    /// under, and the hits cleared here.
    pub fn handle_reset(&mut self, now: Nanos, counters: &[CounterKey]) -> (u64, u64) {
        self.saw(now);
        let cleared = self.limiter.reset_counters_at(now, counters);
        let others = self.members.clone();
        let ticket = self.resets.begin(now, counters, &others, &self.live);
        self.after_input();
        (ticket, cleared)
    }

    /// The next answered reset: which peers had applied it.
    pub fn poll_reset_done(&mut self) -> Option<ResetDone> {
        self.resets.poll_done()
    }

    /// A node that has lost every member announces itself again to the
    /// peers it knows (SWIM stops probing when alone). Called on the
    /// driver's discovery tick.
    pub fn handle_discovery(&mut self, now: Nanos) {
        self.saw(now);
        if !self.membership.members().is_empty() {
            return;
        }
        let peers: Vec<Member> = self
            .addrs
            .iter()
            .filter_map(|(&slot, &addr)| {
                let peer = self.repl.peers().get(&slot)?;
                (!peer.name.is_empty()).then(|| {
                    Member::new(peer.name.clone(), slot, addr, peer.incarnation.unwrap_or(0))
                })
            })
            .collect();
        for member in peers {
            self.membership.announce(now, member);
        }
        self.after_input();
    }

    /// Ships what is pending, tells every member this node is leaving, and
    /// leaves the membership: a clean stop. The members forget this node
    /// at once (after a short grace for its last deltas) instead of
    /// reserving its share until the forget time.
    pub fn finish(&mut self, now: Nanos) {
        self.saw(now);
        self.repl
            .handle_timeout(now.max(self.repl.poll_timeout()), &*self.limiter);
        self.send_to_members(Frame::Leave(crate::wire::Leave {
            slot: self.cfg.slot.get(),
            incarnation: self.cfg.incarnation,
        }));
        self.membership.leave(now);
        self.after_input();
    }

    /// `frame` to every member, on a stream.
    fn send_to_members(&mut self, frame: Frame) {
        let bytes = frame.encode();
        for &to in &self.members {
            self.outbox.push_back(Transmit {
                to,
                bytes: bytes.clone(),
                reliable: true,
            });
        }
    }

    /// What the driver must act on, in order; `None` when there is nothing.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// Peers whose connections the transport should close and dial again:
    /// silent on an open link for the link silence.
    pub fn take_links_to_reset(&mut self) -> Vec<NodeSlot> {
        self.repl.take_links_to_reset()
    }

    /// Frames for peers: replication, membership and rules.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.outbox.pop_front() {
            return Some(t);
        }
        self.repl.poll_transmit()
    }

    /// After a peer's hello: make sure membership knows it.
    fn introduce(&mut self, now: Nanos, slot: NodeSlot) {
        let (Some(peer), Some(&addr)) = (self.repl.peers().get(&slot), self.addrs.get(&slot))
        else {
            return;
        };
        let Some(incarnation) = peer.incarnation else {
            return;
        };
        if !self.membership.is_alive(slot) {
            self.membership
                .announce(now, Member::new(peer.name.clone(), slot, addr, incarnation));
        }
    }

    /// Moves membership output into the outbox and events, reports the
    /// recovery gate opening, and decides the confirmations whose claims
    /// ended.
    fn after_input(&mut self) {
        while let Some(event) = self.membership.poll_event() {
            self.on_member_event(event);
        }
        self.send_refund_asks();
        while let Some((to, frame)) = self.resets.poll_send() {
            self.outbox.push_back(Transmit {
                to,
                bytes: Frame::Reset(frame).encode(),
                reliable: true,
            });
        }
        while let Some((to, ack)) = self.resets.poll_ack() {
            self.outbox.push_back(Transmit {
                to,
                bytes: Frame::ResetAck(ack).encode(),
                reliable: true,
            });
        }
        while let Some((to, payload)) = self.membership.poll_transmit() {
            self.outbox.push_back(Transmit {
                to: to.slot,
                bytes: Frame::Swim(Swim { payload }).encode(),
                reliable: false,
            });
        }
        while let Some(event) = self.repl.poll_event() {
            match event {
                ReplicationEvent::Recovered => {
                    // The gate opens here: the limiter admits from now on.
                    self.limiter.set_admitting(true);
                    self.events.push_back(CoreEvent::Recovered);
                }
            }
        }
        // A returning peer's whole state arrived (or a peer came back):
        // confirm every request exactly while some live peer is unsynced.
        let unsynced = self.repl.confirm_all(self.now);
        if self
            .limiter
            .share_view()
            .is_some_and(|v| v.confirm_all != unsynced)
        {
            self.limiter.set_share_view(self.share_view());
        }
        let now = self.now;
        self.confirmations
            .settle(now, &mut self.repl, &self.limiter);
    }
}

mod members;
mod refunds;
impl<C: Clock> NodeCore<C> {
    /// One tick of the clock discipline at raw (uncorrected) time `raw`:
    /// steers the node's clock correction toward the cluster's time and
    /// opens or closes the limiter's clock gate (`cluster::clock_sync`).
    pub fn discipline_clock(
        &mut self,
        raw: Nanos,
        sync: &mut crate::cluster::clock_sync::ClockDiscipline,
    ) -> crate::cluster::clock_sync::ClockStatus {
        let status = sync.handle_timeout(raw, &mut self.repl);
        self.limiter.set_clock_in_bounds(status.in_bounds);
        status
    }
}

mod rules;

#[cfg(test)]
mod tests;
