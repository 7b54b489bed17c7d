//! Delta replication between nodes, as a sans-IO state machine.
//!
//! Every sync interval the replicator drains the limiter's journal of keys
//! changed here, reads the *absolute* values of this node's own slot in each
//! key's live buckets, and sends them to every peer, cut into datagram-sized
//! frames. Peers merge them (per-slot maximum) and acknowledge each frame.
//! Because values are absolute, a lost frame is repaired by retransmitting
//! the current values, and duplicates or reordering change nothing.
//!
//! Acknowledgements also settle in-flight hits: the hits a node admitted that
//! its peers have not yet confirmed. A frame's hits are settled once every
//! peer that must know them has acknowledged it (see [`SharePolicy`]); until
//! then they count against the node's in-flight share.
//!
//! When a peer connects (first time, after a partition, or after restarting)
//! it is sent a full-state sync of this node's own slots over reliable
//! streams, and, if it says it is recovering, a recovery sync of *its own*
//! slot as this node knows it, so a restart never resets anyone's quota.
//!
//! # Calling order
//!
//! After any `handle_*` call or [`Replicator::peer_connected`], drain
//! [`Replicator::poll_transmit`], then re-arm the timer from
//! [`Replicator::poll_timeout`] and call [`Replicator::handle_timeout`] when
//! it expires. Time is always an argument; nothing here reads a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::core::share::SharePolicy;
use crate::core::slot::{NodeSlot, PnSlot};
use crate::core::time::Nanos;
use crate::core::window::{MergeOutcome, Ring, SlotGrid};
use crate::core::wire::{
    Ack, BucketSlot, DecodeError, Frame, Hello, KeySlots, RulesFrame, Slots, SlotsPacker,
};
use crate::limiter::{Entry, Limiter};

/// Settings of the replicator.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub own: NodeSlot,
    pub name: String,
    /// How often deltas are shipped (default 5 ms).
    pub sync_interval: Nanos,
    /// A frame not acknowledged after this long is sent again.
    pub retransmit_after: Nanos,
    /// After this many resends a peer gets a full-state sync instead.
    pub max_retransmits: u32,
    /// Largest delta frame (fits one QUIC datagram).
    pub datagram_bytes: usize,
    /// Largest full-sync chunk (sent on a stream).
    pub chunk_bytes: usize,
    /// How many buckets ahead of the local clock a peer's value may be.
    pub max_ahead: u64,
    /// How long a restarted node waits for *every* peer's answer; after it,
    /// the answers of a majority are enough (see [`Replicator::check_recovered`]).
    /// It never opens the gate on its own.
    pub recovery_timeout: Nanos,
    /// How long a claim (provisional hits near a limit) waits for every
    /// peer's answer before the request is refused.
    pub claim_timeout: Nanos,
    /// A claim not answered after this long is sent again to the peers
    /// that have not answered.
    pub claim_resend: Nanos,
    /// The other members of the configured cluster (`cluster_size − 1`).
    /// Zero for a node alone.
    pub expected_peers: usize,
    /// The node merged a verified snapshot at start: under `available` it
    /// may then open with no peer reachable.
    pub snapshot_restored: bool,
    /// A peer's answer counts for recovery only once its rules have arrived
    /// too (a node sends its rules on every new connection), so a restarted
    /// node never admits on rules older than the cluster's.
    pub await_rules: bool,
    pub policy: SharePolicy,
}

impl ReplicationConfig {
    pub fn new(own: NodeSlot, name: impl Into<String>) -> Self {
        ReplicationConfig {
            own,
            name: name.into(),
            sync_interval: Nanos::from_millis(5),
            retransmit_after: Nanos::from_millis(30),
            max_retransmits: 20,
            datagram_bytes: 1100,
            chunk_bytes: 60_000,
            max_ahead: 1,
            recovery_timeout: Nanos::from_secs(3),
            claim_timeout: Nanos::from_millis(50),
            claim_resend: Nanos::from_millis(10),
            expected_peers: 0,
            snapshot_restored: false,
            await_rules: false,
            policy: SharePolicy::Strict,
        }
    }
}

/// Bytes for one peer. `reliable` frames go on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: u16,
    pub bytes: Vec<u8>,
    pub reliable: bool,
}

/// What an accepted frame leaves for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Handled here (merged, acknowledged, answered).
    Applied,
    /// A membership payload, for the membership state machine.
    Swim(Vec<u8>),
    /// Rules a peer put in force, for the node to weigh against its own.
    Rules(RulesFrame),
}

/// Why an incoming frame was refused. The frame changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("frame from slot {from} carries slot {carried}: nodes only send their own slot")]
    ForeignSlot { from: u16, carried: u16 },
    #[error("slot {0} is outside the cluster")]
    UnknownSlot(u16),
    #[error("recovery data arrived while not recovering")]
    UnexpectedRecovery,
    #[error("hello names slot {claimed} on the connection of slot {from}")]
    HelloMismatch { from: u16, claimed: u16 },
}

/// How a claim ended, for the caller to decide the request it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimEvent {
    /// Every peer waited for answered; `answered` has a bit per peer slot
    /// whose own counts of the keys are now merged.
    Answered { ticket: u64, answered: u64 },
    /// Not every peer answered within the claim timeout.
    Expired { ticket: u64 },
}

/// An answered claim waiting for the outcome of later conflicting claims.
struct Yielding {
    keys: Vec<(u64, u64)>,
    /// Peers whose later claims it waits on, bit per slot.
    blocking: u64,
    /// Who answered the claim, bit per slot.
    answered: u64,
    deadline: Nanos,
}

/// A claim waiting for its answers.
struct OpenClaim {
    /// When its hits were counted, by this node's clock: sent with every
    /// copy of the claim (it orders conflicting claims).
    started: Nanos,
    keys: Vec<(u64, u64)>,
    waiting: BTreeSet<u16>,
    answered: u64,
    deadline: Nanos,
    resend_at: Nanos,
}

/// Counters the node exports as metrics.
#[derive(Clone, Debug, Default)]
pub struct ReplicationStats {
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub frames_refused: u64,
    pub values_sent: u64,
    pub values_merged: u64,
    pub values_stale: u64,
    pub values_too_far_ahead: u64,
    pub retransmissions: u64,
    pub full_syncs: u64,
    pub rules_mismatches: u64,
    pub claims_sent: u64,
    pub claims_answered: u64,
    pub claims_expired: u64,
}

/// What this node knows about one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerState {
    pub connected: bool,
    /// Alive according to the failure detector.
    pub live: bool,
    pub incarnation: Option<u64>,
    pub name: String,
    /// Estimated `peer clock − our clock`, smoothed.
    pub clock_offset_ns: i64,
    pub rtt: Nanos,
    /// When the last frame from the peer arrived.
    pub last_heard: Option<Nanos>,
    needs_sync: bool,
    /// Our full sync to this peer under way, if any.
    sync_out: Option<SyncOut>,
    /// The peer finished sending us our own slot after our restart.
    recovered_from: bool,
    /// We hold the peer's whole state since it last came (back) up: its
    /// full sync has arrived. Until then its admissions while we could not
    /// hear it may be unknown here, and requests are confirmed.
    pub synced_from: bool,
    /// We stopped waiting for this peer (declared dead) and settled rounds
    /// it never acknowledged: it may have missed our admissions. The next
    /// frame from it starts a full sync to it, and until that completes its
    /// frames are not acknowledged, so that its own admissions stay within
    /// its in-flight share while it decides on stale counts.
    owed_sync: bool,
    /// The peer's rules arrived since this node started.
    rules_heard: bool,
}

struct Round {
    /// `(limit, key, hits settled when acknowledged)`.
    records: Vec<(u64, u64, u32)>,
    waiting: BTreeSet<u16>,
    sent_at: Nanos,
    resends: u32,
}

/// A full-state sync to one peer: complete once every chunk is acknowledged.
#[derive(Clone, Debug)]
struct SyncOut {
    /// Rounds below this are covered by the sync's values.
    start: u64,
    /// Unacknowledged chunks: round → (frame, when last sent).
    pending: BTreeMap<u64, (Vec<u8>, Nanos)>,
}

/// The replication state machine of one node.
pub struct Replicator {
    cfg: ReplicationConfig,
    incarnation: u64,
    peers: BTreeMap<u16, PeerState>,
    next_round: u64,
    rounds: BTreeMap<u64, Round>,
    /// Resent frame → the lost rounds whose keys it carries again.
    aliases: HashMap<u64, Vec<u64>>,
    outbox: VecDeque<Transmit>,
    next_tick: Nanos,
    recovering: bool,
    recovery_started: Option<Nanos>,
    stats: ReplicationStats,
    /// Hits shipped and not yet settled, over all rounds.
    unacked_hits: u64,
    claims: BTreeMap<u64, OpenClaim>,
    claim_events: VecDeque<ClaimEvent>,
    /// Answered claims that yield to later claims of these peers: ticket →
    /// (peers waited for, bit per slot; who answered; deadline).
    yielding: BTreeMap<u64, Yielding>,
}

impl Replicator {
    /// `recovering`: this node has restarted and must recover its own slots
    /// before it admits.
    pub fn new(cfg: ReplicationConfig, incarnation: u64, recovering: bool, now: Nanos) -> Self {
        Replicator {
            next_tick: now + cfg.sync_interval,
            cfg,
            incarnation,
            peers: BTreeMap::new(),
            // Round numbers start from the incarnation so that a restarted
            // node never reuses a number a peer may still be acknowledging.
            next_round: incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15) & !0xffff_ffff,
            rounds: BTreeMap::new(),
            aliases: HashMap::new(),
            outbox: VecDeque::new(),
            recovering,
            recovery_started: recovering.then_some(now),
            stats: ReplicationStats::default(),
            unacked_hits: 0,
            claims: BTreeMap::new(),
            claim_events: VecDeque::new(),
            yielding: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &ReplicationConfig {
        &self.cfg
    }
    pub fn stats(&self) -> &ReplicationStats {
        &self.stats
    }
    pub fn peers(&self) -> &BTreeMap<u16, PeerState> {
        &self.peers
    }
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }
    /// Hits this node admitted and shipped that some peer it waits for has
    /// not acknowledged yet: its divergence from the cluster.
    pub fn unacked_hits(&self) -> u64 {
        self.unacked_hits
    }

    /// Per peer, how many of our rounds it has not acknowledged yet. Counted
    /// on demand (status publication), not kept up on every acknowledgement.
    pub fn unacked_rounds_by_peer(&self) -> BTreeMap<u16, usize> {
        let mut counts: BTreeMap<u16, usize> = self.peers.keys().map(|&s| (s, 0)).collect();
        for round in self.rounds.values() {
            for slot in &round.waiting {
                *counts.entry(*slot).or_default() += 1;
            }
        }
        counts
    }

    /// Rounds still waiting for some peer's acknowledgement.
    pub fn unacked_rounds(&self) -> usize {
        self.rounds.len()
    }

    /// Adds a member of the cluster (from configuration or membership).
    pub fn add_peer(&mut self, slot: u16) {
        if slot != self.own() {
            self.peers.entry(slot).or_insert_with(|| PeerState {
                live: true,
                ..PeerState::default()
            });
        }
    }

    /// Removes a member that left for good: nobody waits for it any more.
    pub fn remove_peer(&mut self, limiter: &Limiter<impl crate::core::time::Clock>, slot: u16) {
        self.peers.remove(&slot);
        self.stop_waiting_for(limiter, slot, u64::MAX);
        self.stop_claims_waiting_for(slot);
    }

    fn own(&self) -> u16 {
        self.cfg.own.index() as u16
    }

    /// True when this node and the live peers are at most half the cluster.
    pub fn in_minority(&self) -> bool {
        let live = 1 + self.peers.values().filter(|p| p.live).count();
        // Configured members count even before they are heard from.
        let members = 1 + self.peers.len().max(self.cfg.expected_peers);
        live * 2 <= members && members > 1
    }

    /// Whether frames must wait for `slot`'s acknowledgement before their
    /// hits are settled.
    fn must_wait_for(&self, peer: &PeerState) -> bool {
        peer.live || (self.cfg.policy != SharePolicy::Available && self.in_minority())
    }

    /// The failure detector's verdict on a peer changed.
    pub fn set_liveness(
        &mut self,
        limiter: &Limiter<impl crate::core::time::Clock>,
        slot: u16,
        live: bool,
        rules_digest: u64,
    ) {
        let Some(p) = self.peers.get_mut(&slot) else {
            return;
        };
        let returned = live && !p.live;
        p.live = live;
        if returned {
            // Back from the dead (a healed partition): what it admitted
            // while we could not hear it may be unknown here, and nobody
            // resends it (we had stopped waiting for each other). Ask for
            // its whole state again; confirm every request until it arrives.
            p.synced_from = false;
            if p.connected {
                self.introduce(slot, rules_digest);
            }
        }
        if !live {
            let waiting = self.peers.get(&slot).is_some_and(|p| self.must_wait_for(p));
            if !waiting {
                if let Some(p) = self.peers.get_mut(&slot) {
                    p.owed_sync = true;
                }
                self.stop_waiting_for(limiter, slot, u64::MAX);
                self.stop_claims_waiting_for(slot);
            }
        }
    }

    /// A connection to `slot` is up: introduce ourselves.
    pub fn peer_connected(&mut self, now: Nanos, slot: u16, rules_digest: u64) {
        self.add_peer(slot);
        if let Some(p) = self.peers.get_mut(&slot) {
            p.connected = true;
            p.last_heard = Some(now);
            p.synced_from = false;
        }
        self.introduce(slot, rules_digest);
    }

    /// True while some live peer's whole state has not reached us since it
    /// came (back) up: the limiter then confirms every request.
    pub fn unsynced_live(&self) -> bool {
        self.peers.values().any(|p| p.live && !p.synced_from)
    }

    /// Our hello: the peer answers it with its whole own state.
    fn introduce(&mut self, slot: u16, rules_digest: u64) {
        let hello = Frame::Hello(Hello {
            slot: self.own(),
            name: self.cfg.name.clone(),
            incarnation: self.incarnation,
            rules_digest,
            recovering: self.recovering,
        });
        self.send(slot, hello.encode(), true);
    }

    pub fn peer_disconnected(&mut self, slot: u16) {
        if let Some(p) = self.peers.get_mut(&slot) {
            p.connected = false;
            p.sync_out = None;
        }
    }

    fn send(&mut self, to: u16, bytes: Vec<u8>, reliable: bool) {
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        let reliable = reliable || bytes.len() > self.cfg.datagram_bytes;
        self.outbox.push_back(Transmit {
            to,
            bytes,
            reliable,
        });
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    pub fn poll_timeout(&self) -> Nanos {
        self.claims
            .values()
            .map(|c| c.deadline.min(c.resend_at))
            .chain(self.yielding.values().map(|y| y.deadline))
            .fold(self.next_tick, Nanos::min)
    }

    /// An answered claim that the limiter refused only because of peers'
    /// later claims (`blocking`, bit per slot) that may still be undecided:
    /// decide it again ([`ClaimEvent::Answered`] once more) as soon as a
    /// frame from one of them arrives, or refuse it at `deadline`.
    pub fn yield_to(
        &mut self,
        ticket: u64,
        keys: Vec<(u64, u64)>,
        blocking: u64,
        answered: u64,
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
    fn heard_from(&mut self, slot: u16, keys: Option<&[(u64, u64)]>) {
        if self.yielding.is_empty() || usize::from(slot) >= 64 {
            return;
        }
        let again: Vec<(u64, u64)> = self
            .yielding
            .iter()
            .filter(|(_, y)| {
                y.blocking & (1 << slot) != 0
                    && keys.is_none_or(|ks| ks.iter().any(|k| y.keys.contains(k)))
            })
            .map(|(&t, y)| (t, y.answered))
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
    /// `keys` (`(limit, key)`, already counted in the limiter) and to answer
    /// with its own counts of them. Returns the claim's ticket; the outcome
    /// comes from [`Replicator::poll_claim_event`].
    /// `started` is when the request's hits were counted.
    pub fn claim<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        started: Nanos,
        keys: Vec<(u64, u64)>,
        limiter: &Limiter<C>,
    ) -> u64 {
        let ticket = self.next_round;
        self.next_round += 1;
        let waiting = self.waiting_set();
        if waiting.is_empty() {
            self.claim_events.push_back(ClaimEvent::Answered {
                ticket,
                answered: 0,
            });
            return ticket;
        }
        let claim = OpenClaim {
            started,
            keys,
            waiting,
            answered: 0,
            deadline: now + self.cfg.claim_timeout,
            resend_at: now + self.cfg.claim_resend,
        };
        let frame = self.values_frame(now, started, ticket, &claim.keys, limiter);
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

    /// This node's own values of `keys`, as one frame numbered `round`.
    fn values_frame<C: crate::core::time::Clock>(
        &self,
        now: Nanos,
        sent_at: Nanos,
        round: u64,
        keys: &[(u64, u64)],
        limiter: &Limiter<C>,
    ) -> Slots {
        let mut groups = Vec::with_capacity(keys.len());
        for &(limit, key) in keys {
            let Some(table) = limiter.table_by_id(limit) else {
                continue;
            };
            let Some(entry) = table.get(key) else {
                continue;
            };
            if let Some((newest, buckets)) = own_values(&entry, now, self.cfg.own) {
                groups.push(crate::core::wire::LimitGroup {
                    limit,
                    newest,
                    keys: vec![KeySlots { key, buckets }],
                });
            }
        }
        Slots {
            slot: self.own(),
            round,
            sent_at: sent_at.as_u64(),
            last: true,
            groups,
        }
    }

    /// A peer asks us to confirm its provisional hits: merge them, hold the
    /// keys under confirmation here too, and answer with our own counts.
    fn on_claim<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        s: &Slots,
        limiter: &Limiter<C>,
    ) {
        self.merge_slots(now, from, s, limiter);
        let keys: Vec<(u64, u64)> = s
            .groups
            .iter()
            .flat_map(|g| g.keys.iter().map(move |k| (g.limit, k.key)))
            .collect();
        limiter.hold_keys(now, &keys, Some((from, Nanos::new(s.sent_at))));
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
        let answer = self.values_frame(now, ours, s.round, &keys, limiter);
        self.send(from, Frame::Answer(answer).encode(), false);
    }

    /// A peer's answer to one of our claims.
    fn on_answer<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        s: &Slots,
        limiter: &Limiter<C>,
    ) {
        self.merge_slots(now, from, s, limiter);
        let Some(claim) = self.claims.get_mut(&s.round) else {
            return;
        };
        if s.sent_at != 0 {
            // The answerer has its own claim pending on these keys.
            limiter.hold_keys(now, &claim.keys, Some((from, Nanos::new(s.sent_at))));
        }
        if claim.waiting.remove(&from) {
            claim.answered |= 1 << from;
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
    fn stop_claims_waiting_for(&mut self, slot: u16) {
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
    fn claim_timers<C: crate::core::time::Clock>(&mut self, now: Nanos, limiter: &Limiter<C>) {
        let (events, stats) = (&mut self.claim_events, &mut self.stats);
        self.claims.retain(|&ticket, c| {
            let live = c.deadline > now;
            if !live {
                stats.claims_expired += 1;
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
                Frame::Claim(self.values_frame(now, started, ticket, &keys, limiter)).encode();
            for slot in waiting {
                if self.peers.get(&slot).is_some_and(|p| p.connected) {
                    self.stats.retransmissions += 1;
                    self.send(slot, bytes.clone(), false);
                }
            }
        }
    }

    /// Handles one frame that arrived from the (authenticated) peer `from`,
    /// and says what it leaves for the caller (a membership payload, rules).
    pub fn handle_frame<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        bytes: &[u8],
        limiter: &Limiter<C>,
        rules_digest: u64,
    ) -> Result<Delivered, FrameError> {
        let result = self.apply_frame(now, from, bytes, limiter, rules_digest);
        match &result {
            Ok(_) => self.stats.frames_received += 1,
            Err(_) => self.stats.frames_refused += 1,
        }
        result
    }

    fn apply_frame<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        bytes: &[u8],
        limiter: &Limiter<C>,
        rules_digest: u64,
    ) -> Result<Delivered, FrameError> {
        if usize::from(from) >= limiter.config().slots || from == self.own() {
            return Err(FrameError::UnknownSlot(from));
        }
        let frame = Frame::decode(bytes)?;
        // Check everything about the frame before any state changes.
        match &frame {
            Frame::Hello(h) if h.slot != from => {
                return Err(FrameError::HelloMismatch {
                    from,
                    claimed: h.slot,
                })
            }
            Frame::Delta(s) | Frame::Sync(s) | Frame::Claim(s) | Frame::Answer(s)
                if s.slot != from =>
            {
                return Err(FrameError::ForeignSlot {
                    from,
                    carried: s.slot,
                })
            }
            Frame::Recovery(s) if s.slot != self.own() => {
                return Err(FrameError::ForeignSlot {
                    from,
                    carried: s.slot,
                })
            }
            Frame::Recovery(_) if !self.recovering => return Err(FrameError::UnexpectedRecovery),
            Frame::Ack(a) if a.slot != from => {
                return Err(FrameError::ForeignSlot {
                    from,
                    carried: a.slot,
                })
            }
            _ => {}
        }
        self.add_peer(from);
        if let Some(p) = self.peers.get_mut(&from) {
            p.last_heard = Some(now);
        }
        // A peer we settled rounds without is back: our whole state first.
        if self
            .peers
            .get(&from)
            .is_some_and(|p| p.owed_sync && p.sync_out.is_none())
        {
            self.full_sync(now, from, limiter);
        }
        // After this frame is applied, claims yielding to `from` on the keys
        // it carries decide again.
        let carried: Option<Vec<(u64, u64)>> = match &frame {
            Frame::Delta(s) | Frame::Sync(s) | Frame::Claim(s) | Frame::Answer(s)
                if !self.yielding.is_empty() =>
            {
                Some(
                    s.groups
                        .iter()
                        .flat_map(|g| g.keys.iter().map(move |k| (g.limit, k.key)))
                        .collect(),
                )
            }
            _ => None,
        };
        match frame {
            Frame::Hello(h) => self.on_hello(now, from, h, limiter, rules_digest),
            Frame::Delta(s) => {
                self.merge_slots(now, from, &s, limiter);
                self.note_received(now, from, &s);
            }
            Frame::Sync(s) => {
                self.merge_slots(now, from, &s, limiter);
                self.note_received(now, from, &s);
                if s.last {
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.synced_from = true;
                    }
                }
            }
            Frame::Recovery(s) => {
                self.merge_slots(now, self.own(), &s, limiter);
                self.note_received(now, from, &s);
                if s.last {
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.recovered_from = true;
                    }
                    self.check_recovered(now, limiter);
                }
            }
            Frame::Ack(a) => self.on_ack(now, from, &a, limiter),
            Frame::Claim(s) => self.on_claim(now, from, &s, limiter),
            Frame::Answer(s) => self.on_answer(now, from, &s, limiter),
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
        }
        if let Some(keys) = carried {
            self.heard_from(from, Some(&keys));
        }
        Ok(Delivered::Applied)
    }

    fn on_hello<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        h: Hello,
        limiter: &Limiter<C>,
        rules_digest: u64,
    ) {
        if h.rules_digest != rules_digest {
            self.stats.rules_mismatches += 1;
        }
        let mut returned = false;
        if let Some(p) = self.peers.get_mut(&from) {
            p.incarnation = Some(h.incarnation);
            p.name = h.name;
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
        self.full_sync(now, from, limiter);
        if h.recovering {
            self.recovery_sync(now, from, limiter);
        }
    }

    /// Acknowledges a frame at once: the sooner the sender hears, the sooner
    /// its in-flight hits settle. The ack echoes the frame's timestamp.
    fn note_received(&mut self, now: Nanos, from: u16, s: &Slots) {
        if self.peers.get(&from).is_some_and(|p| p.owed_sync) {
            // Not until it holds our state (see `PeerState::owed_sync`).
            return;
        }
        let ack = Frame::Ack(Ack {
            slot: self.own(),
            rounds: vec![s.round],
            echo_sent_at: s.sent_at,
            received_at: now.as_u64(),
            replied_at: now.as_u64(),
        });
        self.send(from, ack.encode(), false);
    }

    /// Merges the values of `slot` carried by `s`.
    fn merge_slots<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        slot: u16,
        s: &Slots,
        limiter: &Limiter<C>,
    ) {
        let merged = merge_into(limiter, now, self.cfg.max_ahead, slot, s);
        self.stats.values_merged += merged.applied;
        self.stats.values_stale += merged.stale;
        self.stats.values_too_far_ahead += merged.too_far_ahead;
    }

    fn on_ack<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        from: u16,
        a: &Ack,
        limiter: &Limiter<C>,
    ) {
        // Clock offset and round trip from the echoed timestamps (NTP's four).
        let (t1, t2, t3, t4) = (
            a.echo_sent_at as i128,
            a.received_at as i128,
            a.replied_at as i128,
            now.as_u64() as i128,
        );
        if t1 > 0 && t4 >= t1 && t3 >= t2 {
            let offset = ((t2 - t1) + (t3 - t4)) / 2;
            let rtt = ((t4 - t1) - (t3 - t2)).max(0);
            if let Some(p) = self.peers.get_mut(&from) {
                p.clock_offset_ns = if p.rtt == Nanos::ZERO {
                    offset as i64
                } else {
                    (p.clock_offset_ns as i128 * 7 / 8 + offset / 8) as i64
                };
                p.rtt = Nanos::new(rtt as u64);
            }
        }
        let acked: Vec<u64> = a
            .rounds
            .iter()
            .flat_map(|r| self.aliases.remove(r).unwrap_or_else(|| vec![*r]))
            .collect();
        for original in acked {
            if let Some(sync) = self.peers.get_mut(&from).and_then(|p| p.sync_out.as_mut()) {
                if sync.pending.remove(&original).is_some() && sync.pending.is_empty() {
                    // The peer holds our whole state as of the sync's start.
                    let start = sync.start;
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.sync_out = None;
                        p.needs_sync = false;
                        p.owed_sync = false;
                    }
                    self.stop_waiting_for(limiter, from, start);
                }
            }
            let Some(round) = self.rounds.get_mut(&original) else {
                continue;
            };
            round.waiting.remove(&from);
            if self
                .rounds
                .get(&original)
                .is_some_and(|r| r.waiting.is_empty())
            {
                self.settle(original, limiter);
            }
        }
    }

    /// Nobody needs `slot`'s acknowledgement for rounds before `before` any
    /// more (it left, died under a policy that does not wait, or a full
    /// sync covered them).
    fn stop_waiting_for<C: crate::core::time::Clock>(
        &mut self,
        limiter: &Limiter<C>,
        slot: u16,
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
            self.settle(r, limiter);
        }
    }

    fn settle<C: crate::core::time::Clock>(&mut self, round: u64, limiter: &Limiter<C>) {
        let Some(r) = self.rounds.remove(&round) else {
            return;
        };
        for (limit, key, hits) in r.records {
            self.unacked_hits = self.unacked_hits.saturating_sub(u64::from(hits));
            if hits == 0 {
                continue;
            }
            if let Some(table) = limiter.table_by_id(limit) {
                if let Some(mut e) = table.get(key) {
                    e.settle(hits);
                }
            }
        }
    }

    /// Opens the recovery gate once this node has the counts it needs.
    ///
    /// - Every configured peer answered: open at once.
    /// - After `recovery_timeout`, under `strict` and `bounded`: the peers
    ///   that answered and this node make a majority of the *configured*
    ///   cluster (`⌊n/2⌋` answers). A lone restarted node, or one whose peers
    ///   are all silent, never opens: it would decide as if its own slot and
    ///   its peers' were empty.
    /// - After `recovery_timeout`, under `available`: every peer reachable
    ///   now (connected and live) answered, and at least one did, or the
    ///   node merged a verified snapshot.
    ///
    /// Time alone never opens it.
    fn check_recovered<C: crate::core::time::Clock>(&mut self, now: Nanos, limiter: &Limiter<C>) {
        if !self.recovering {
            return;
        }
        if self.recovery_complete(now) {
            self.recovering = false;
            limiter.set_admitting(true);
        }
    }

    /// Whether the recovery gate may open now (see `check_recovered`).
    pub fn recovery_complete(&self, now: Nanos) -> bool {
        let answered = self.peers.values().filter(|p| self.answered(p)).count();
        if answered >= self.cfg.expected_peers {
            return true;
        }
        let waited = self
            .recovery_started
            .is_some_and(|t| now.saturating_sub(t) >= self.cfg.recovery_timeout);
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
            _ => answered >= self.majority_answers(),
        }
    }

    /// The peer sent back our slot (and its rules, when awaited).
    fn answered(&self, p: &PeerState) -> bool {
        p.recovered_from && (p.rules_heard || !self.cfg.await_rules)
    }

    /// Answers that make, with this node, a majority of the configured
    /// cluster.
    fn majority_answers(&self) -> usize {
        (self.cfg.expected_peers + 1) / 2
    }

    /// The sync tick: acknowledge what arrived, ship what changed, resend
    /// what was lost.
    pub fn handle_timeout<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        limiter: &Limiter<C>,
    ) {
        self.claim_timers(now, limiter);
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.cfg.sync_interval;
        limiter.prune_confirming(now);
        self.check_recovered(now, limiter);
        self.ship_deltas(now, limiter);
        self.resend_lost(now, limiter);
    }

    /// Which peers a frame sent now must hear back from.
    fn waiting_set(&self) -> BTreeSet<u16> {
        self.peers
            .iter()
            .filter(|(_, p)| self.must_wait_for(p))
            .map(|(&s, _)| s)
            .collect()
    }

    /// Ships what changed now, without waiting for the tick: for keys whose
    /// in-flight share is spent (the limiter's wake hook).
    pub fn ship_now<C: crate::core::time::Clock>(&mut self, now: Nanos, limiter: &Limiter<C>) {
        self.ship_deltas(now, limiter);
    }

    fn ship_deltas<C: crate::core::time::Clock>(&mut self, now: Nanos, limiter: &Limiter<C>) {
        let Some(journal) = limiter.journal() else {
            return;
        };
        let changed = journal.drain();
        if changed.is_empty() {
            return;
        }
        let mut packer = SlotsPacker::new(
            self.cfg.datagram_bytes,
            self.own(),
            self.next_round,
            now.as_u64(),
        );
        let mut records: Vec<(u64, (u64, u64, u32))> = Vec::with_capacity(changed.len());
        for (limit, key) in changed {
            let Some(table) = limiter.table_by_id(limit) else {
                continue;
            };
            let Some(mut entry) = table.get(key) else {
                continue;
            };
            if !entry.take_dirty() {
                continue;
            }
            let hits = entry.ship();
            if let Some((newest, slots)) = own_values(&entry, now, self.cfg.own) {
                let round = packer.push(
                    limit,
                    newest,
                    KeySlots {
                        key,
                        buckets: slots,
                    },
                );
                records.push((round, (limit, key, hits)));
                self.stats.values_sent += 1;
            }
        }
        let frames = packer.finish();
        let waiting = self.waiting_set();
        let mut by_round: BTreeMap<u64, Vec<(u64, u64, u32)>> = BTreeMap::new();
        for (round, rec) in records {
            by_round.entry(round).or_default().push(rec);
        }
        for frame in frames {
            self.next_round = frame.round + 1;
            let bytes = Frame::Delta(frame.clone()).encode();
            for (&slot, p) in &self.peers {
                if p.connected {
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
            self.unacked_hits += records.iter().map(|r| u64::from(r.2)).sum::<u64>();
            let round = Round {
                records,
                waiting: waiting.clone(),
                sent_at: now,
                resends: 0,
            };
            if round.waiting.is_empty() {
                self.rounds.insert(frame.round, round);
                self.settle(frame.round, limiter);
            } else {
                self.rounds.insert(frame.round, round);
            }
        }
    }

    /// Sends again, with current values, every round a peer has not
    /// acknowledged in time; a peer that keeps missing gets a full sync.
    fn resend_lost<C: crate::core::time::Clock>(&mut self, now: Nanos, limiter: &Limiter<C>) {
        self.resend_sync_chunks(now);
        let due: Vec<(u64, u16)> = self
            .rounds
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.sent_at) >= self.cfg.retransmit_after)
            .flat_map(|(&id, r)| r.waiting.iter().map(move |&s| (id, s)))
            .collect();
        let mut per_peer: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
        for (id, slot) in due {
            per_peer.entry(slot).or_default().push(id);
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
                    self.full_sync(now, slot, limiter);
                }
                continue;
            }
            let mut packer = SlotsPacker::new(
                self.cfg.datagram_bytes,
                self.own(),
                self.next_round,
                now.as_u64(),
            );
            let mut alias_of: Vec<(u64, u64)> = Vec::new();
            for id in &ids {
                let Some(round) = self.rounds.get_mut(id) else {
                    continue;
                };
                round.resends += 1;
                round.sent_at = now;
                for &(limit, key, _) in &round.records {
                    let Some(table) = limiter.table_by_id(limit) else {
                        continue;
                    };
                    let Some(entry) = table.get(key) else {
                        continue;
                    };
                    if let Some((newest, slots)) = own_values(&entry, now, self.cfg.own) {
                        let r = packer.push(
                            limit,
                            newest,
                            KeySlots {
                                key,
                                buckets: slots,
                            },
                        );
                        alias_of.push((r, *id));
                    }
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

    /// Full-sync chunks travel on streams, but their acknowledgements are
    /// datagrams: a chunk not acknowledged in time is sent again.
    fn resend_sync_chunks(&mut self, now: Nanos) {
        let mut again = Vec::new();
        for (&slot, p) in self.peers.iter_mut() {
            let Some(sync) = p.sync_out.as_mut().filter(|_| p.connected) else {
                continue;
            };
            for (bytes, sent) in sync.pending.values_mut() {
                if now.saturating_sub(*sent) >= self.cfg.retransmit_after {
                    *sent = now;
                    again.push((slot, bytes.clone()));
                }
            }
        }
        for (slot, bytes) in again {
            self.stats.retransmissions += 1;
            self.send(slot, bytes, true);
        }
    }

    /// Our whole own state, in stream-sized chunks, to `to`.
    fn full_sync<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        to: u16,
        limiter: &Limiter<C>,
    ) {
        self.stats.full_syncs += 1;
        let start = self.next_round;
        let own = self.cfg.own;
        let frames = self.collect_slots(now, limiter, start, |entry| own_values(entry, now, own));
        if let Some(p) = self.peers.get_mut(&to) {
            p.sync_out = Some(SyncOut {
                start,
                pending: BTreeMap::new(),
            });
        }
        self.send_sync_frames(now, to, frames, false);
    }

    /// The peer's own slot as we know it, for its recovery after a restart.
    fn recovery_sync<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        to: u16,
        limiter: &Limiter<C>,
    ) {
        let start = self.next_round;
        let theirs = NodeSlot::new(to);
        let mut frames =
            self.collect_slots(now, limiter, start, |entry| own_values(entry, now, theirs));
        for f in &mut frames {
            f.slot = to;
        }
        if frames.is_empty() {
            // Nothing known of its slot: still say so, so it need not wait.
            frames.push(Slots {
                slot: to,
                round: start,
                sent_at: now.as_u64(),
                last: true,
                groups: Vec::new(),
            });
        }
        self.send_sync_frames(now, to, frames, true);
    }

    fn collect_slots<C: crate::core::time::Clock>(
        &mut self,
        now: Nanos,
        limiter: &Limiter<C>,
        start: u64,
        mut values: impl FnMut(&Entry<'_>) -> Option<(u64, Vec<BucketSlot>)>,
    ) -> Vec<Slots> {
        let mut packer = SlotsPacker::new(self.cfg.chunk_bytes, self.own(), start, now.as_u64());
        for (limit, table) in limiter.tables() {
            table.for_each(|entry| {
                if let Some((newest, slots)) = values(entry) {
                    packer.push(
                        limit,
                        newest,
                        KeySlots {
                            key: entry.key(),
                            buckets: slots,
                        },
                    );
                }
            });
        }
        packer.finish()
    }

    fn send_sync_frames(&mut self, now: Nanos, to: u16, mut frames: Vec<Slots>, recovery: bool) {
        if frames.is_empty() {
            frames.push(Slots {
                slot: self.own(),
                round: self.next_round,
                sent_at: now.as_u64(),
                last: true,
                groups: Vec::new(),
            });
        }
        for frame in frames {
            self.next_round = frame.round + 1;
            let round = frame.round;
            let bytes = if recovery {
                Frame::Recovery(frame)
            } else {
                Frame::Sync(frame)
            }
            .encode();
            if !recovery {
                if let Some(sync) = self.peers.get_mut(&to).and_then(|p| p.sync_out.as_mut()) {
                    sync.pending.insert(round, (bytes.clone(), now));
                }
            }
            self.send(to, bytes, true);
        }
    }
}

/// What merging a frame's values did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub applied: u64,
    pub stale: u64,
    pub too_far_ahead: u64,
}

/// Merges the values of `slot` that `s` carries into the limiter's tables,
/// each with a per-slot maximum. Limits the limiter does not know are
/// skipped (the rules may be mid-reload). Gossip and snapshots both land here.
pub fn merge_into<C: crate::core::time::Clock>(
    limiter: &Limiter<C>,
    now: Nanos,
    max_ahead: u64,
    slot: u16,
    s: &Slots,
) -> Merged {
    let node = NodeSlot::new(slot);
    let mut merged = Merged::default();
    for group in &s.groups {
        let Some(table) = limiter.table_by_id(group.limit) else {
            continue;
        };
        let spec = *table.spec();
        for k in &group.keys {
            let mut entry = table.get_or_insert(k.key, now);
            for b in &k.buckets {
                let epoch = group.newest - u64::from(b.back);
                let value = PnSlot { p: b.p, n: b.n };
                match Ring::merge(&mut entry, &spec, now, max_ahead, epoch, node, value) {
                    MergeOutcome::Applied => merged.applied += 1,
                    MergeOutcome::Stale => merged.stale += 1,
                    MergeOutcome::TooFarAhead => merged.too_far_ahead += 1,
                }
            }
        }
    }
    merged
}

/// This node's (or `slot`'s) values in the entry's live buckets, as
/// `(newest epoch, buckets)`; `None` when all are zero.
fn own_values(entry: &Entry<'_>, now: Nanos, slot: NodeSlot) -> Option<(u64, Vec<BucketSlot>)> {
    let spec = entry.spec();
    let now_epoch = spec.epoch(now);
    let newest = entry.newest(now_epoch);
    let b = spec.buckets() as u64;
    let mut out = Vec::new();
    for back in 0..b.min(newest + 1) {
        let epoch = newest - back;
        let row = (epoch % b) as usize;
        let v = entry.get(row, slot.index());
        if v != PnSlot::ZERO {
            out.push(BucketSlot {
                back: back as u8,
                p: v.p,
                n: v.n,
            });
        }
    }
    (!out.is_empty()).then_some((newest, out))
}
