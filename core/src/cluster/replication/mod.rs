//! Delta replication between nodes, as a sans-IO state machine.
//!
//! Every sync interval the replicator drains the store's journal of keys
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
//! The replicator reads and writes counts only through a [`ReplicaStore`]
//! (the limiter implements it). The code is split by message kind:
//!
//! | module | messages |
//! |---|---|
//! | `ship` | deltas of changed keys, their resends, settlement |
//! | `ack` | acknowledgements and the clock estimator they feed |
//! | `sync` | hellos, full syncs, recovery syncs and the recovery gate |
//! | `claim` | claims near a limit and their answers |
//! | `route` | checking an incoming frame and handing it to the above |
//!
//! # Calling order
//!
//! After any `handle_*` call or [`Replicator::peer_connected`], drain
//! [`Replicator::poll_event`], [`Replicator::poll_claim_event`] and
//! [`Replicator::poll_transmit`], then re-arm the timer from
//! [`Replicator::poll_timeout`] and call [`Replicator::handle_timeout`] when
//! it expires. Time is always an argument; nothing here reads a clock.

mod ack;
mod claim;
mod fence;
mod links;
mod route;
mod ship;
mod sync;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

pub use self::ack::ClockEstimate;
pub use self::claim::ClaimEvent;
pub use self::route::{Delivered, FrameError};
pub use crate::cluster::store::{merge_into, Merged, ReplicaStore};

use self::claim::{OpenClaim, Yielding};
use self::ship::Round;
use self::sync::SyncOut;
use crate::share::SharePolicy;
use crate::slot::NodeSlot;
use crate::time::Nanos;

/// Settings of the replicator.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// This node's slot.
    pub own: NodeSlot,
    /// This node's name, sent in hellos.
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
    /// the answers of a majority are enough (see
    /// [`Replicator::recovery_complete`]). It never opens the gate on its own.
    pub recovery_timeout: Nanos,
    /// How long a claim (provisional hits near a limit) waits for every
    /// peer's answer before the request is refused, when every peer it
    /// waits for is still heard from (slow, not silent).
    pub claim_timeout: Nanos,
    /// The longest a claim waits on a *silent* peer: one not heard from
    /// for half the fence time (without fencing: since the claim left).
    /// Past it the request is refused at once.
    pub confirm_timeout: Nanos,
    /// When this node stops waiting for a peer that has gone silent.
    pub silence: SilencePolicy,
    /// A claim not answered after this long is sent again to the peers
    /// that have not answered.
    pub claim_resend: Nanos,
    /// The other members this node knows of: remembered from its last run,
    /// or heard of since (kept current with [`Replicator::set_expected_peers`]).
    /// Zero for a node alone.
    pub expected_peers: usize,
    /// A node that knows of no other member may open alone, as the first
    /// node of a new cluster: at once (`Some(0)`), after waiting this long
    /// for a peer to show up, or never (`None`).
    pub alone_after: Option<Nanos>,
    /// The node merged a verified snapshot at start: under `available` it
    /// may then open with no peer reachable.
    pub snapshot_restored: bool,
    /// A peer's answer counts for recovery only once its rules have arrived
    /// too (a node sends its rules on every new connection), so a restarted
    /// node never admits on rules older than the cluster's.
    pub await_rules: bool,
    /// Which peers must acknowledge hits before they are settled.
    pub policy: SharePolicy,
    /// A connected peer silent this long on its link, either way, has its
    /// connections reset (under fencing only; see `links.rs`).
    pub link_silence: Nanos,
}

impl ReplicationConfig {
    /// Defaults for node `own`: 5 ms sync, 30 ms resend, `strict` sharing,
    /// no peers expected.
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
            confirm_timeout: Nanos::from_millis(5),
            silence: SilencePolicy::DEFAULT,
            claim_resend: Nanos::from_millis(10),
            expected_peers: 0,
            alone_after: Some(Nanos::ZERO),
            snapshot_restored: false,
            await_rules: false,
            policy: SharePolicy::Strict,
            link_silence: Nanos::from_secs(1),
        }
    }
}

/// When a node stops waiting for the acknowledgements and claim answers of
/// a peer that has gone silent (paused, crashed, cut off). See DESIGN.md,
/// "A silent peer".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SilencePolicy {
    /// Only once the failure detector declares it dead (seconds): the
    /// behaviour before fencing, kept for comparison.
    Detector,
    /// After `after` without a frame from it, when a majority of the
    /// cluster (this node included) reports it silent: it is *fenced*
    /// (its acknowledgements and answers are no longer awaited) until a
    /// frame from it arrives. Every connected peer is sent a heartbeat when
    /// nothing else went to it for a quarter of `after`.
    Fence {
        /// Silence after which a peer is fenced.
        after: Nanos,
    },
    /// As `Fence`, and in addition a node decides locally only while every
    /// peer it waits for has acknowledged a frame it sent within three
    /// quarters of `after` (a lease); without one it confirms every
    /// request.
    FenceLease {
        /// Silence after which a peer is fenced.
        after: Nanos,
    },
}

impl SilencePolicy {
    /// Fencing after 60 ms, corroborated by a majority (DESIGN.md, "A
    /// silent peer").
    pub const DEFAULT: SilencePolicy = SilencePolicy::FENCE_60MS;

    /// Fencing after 60 ms of silence (`fence_after = "60ms"`).
    pub const FENCE_60MS: SilencePolicy = SilencePolicy::Fence {
        after: Nanos::from_millis(60),
    };

    /// The silence after which a peer is fenced, if it ever is.
    pub fn fence_after(self) -> Option<Nanos> {
        match self {
            SilencePolicy::Detector => None,
            SilencePolicy::Fence { after } | SilencePolicy::FenceLease { after } => Some(after),
        }
    }
}

/// Bytes for one peer. `reliable` frames go on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The peer the bytes are for.
    pub to: NodeSlot,
    /// One encoded frame.
    pub bytes: Vec<u8>,
    /// Send on a stream rather than as a datagram (always so for frames
    /// larger than a datagram).
    pub reliable: bool,
}

/// What the replicator reports to its owner, besides claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// The recovery gate opened: this node holds the counts it needs and
    /// may admit from now on (the owner tells the limiter).
    Recovered,
}

/// Counters the node exports as metrics.
#[derive(Clone, Debug, Default)]
pub struct ReplicationStats {
    /// Frames queued for peers.
    pub frames_sent: u64,
    /// Bytes queued for peers.
    pub bytes_sent: u64,
    /// Frames received from peers and accepted.
    pub frames_received: u64,
    /// Frames refused with a [`FrameError`].
    pub frames_refused: u64,
    /// Counter values shipped in delta frames.
    pub values_sent: u64,
    /// Received values that raised a local value.
    pub values_merged: u64,
    /// Received values no larger than the local one (duplicates, reorders).
    pub values_stale: u64,
    /// Received values dropped for a bucket too far ahead of the local clock.
    pub values_too_far_ahead: u64,
    /// Frames sent again: deltas, full syncs and claims.
    pub retransmissions: u64,
    /// Full-state syncs started towards a peer.
    pub full_syncs: u64,
    /// Hellos whose rules digest differed from ours.
    pub rules_mismatches: u64,
    /// Claims sent (near a limit).
    pub claims_sent: u64,
    /// Claims every waited-for peer answered.
    pub claims_answered: u64,
    /// Claims that timed out unanswered.
    pub claims_expired: u64,
    /// Of those, claims refused after `confirm_timeout` because a peer
    /// they waited for was silent.
    pub claims_silent: u64,
    /// Times a silent peer was fenced.
    pub peers_fenced: u64,
    /// Heartbeats sent to peers nothing else went to.
    pub heartbeats_sent: u64,
    /// Sync ticks that came more than half the fence time late (this node
    /// was stopped or starved): no peer was fenced on them.
    pub late_ticks: u64,
    /// Times a silent peer was not fenced because a majority did not report
    /// it silent (a one-way or partial cut): it is still awaited.
    pub fences_withheld: u64,
    /// Recovery frames sent with the slots of nodes that may not answer a
    /// recovering node themselves (members that left, died or are out of
    /// reach).
    pub recovery_frames_relayed: u64,
    /// Hellos sent again to peers that had not answered this node's
    /// recovery within `recovery_timeout`.
    pub recovery_retries: u64,
    /// Hearing reports sent (whom this node cannot hear).
    pub hearing_sent: u64,
    /// Values of other nodes' slots that claim answers carried to this
    /// node (see [`crate::wire::RelayedAnswer`]).
    pub values_relayed_in: u64,
    /// Times a peer's connections were named for a reset: silent one way
    /// for the link silence while open.
    pub links_reset: u64,
}

/// What this node knows about one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerState {
    /// A connection to the peer is open.
    pub connected: bool,
    /// Alive according to the failure detector.
    pub live: bool,
    /// The peer's incarnation from its last hello; none before one arrives.
    pub incarnation: Option<u64>,
    /// The peer's name from its last hello.
    pub name: String,
    /// Estimated `peer clock − our clock`, smoothed.
    pub clock_offset_ns: i64,
    /// The last measured round trip.
    pub rtt: Nanos,
    /// When the last frame from the peer arrived.
    pub last_heard: Option<Nanos>,
    /// Silent for longer than the fence time: its acknowledgements and
    /// answers are not awaited until a frame from it arrives.
    pub fenced: bool,
    /// A frame to the peer was queued since the last heartbeat check.
    sent_recently: bool,
    /// The shortest round trip to the peer seen (see [`ClockEstimate`]).
    rtt_floor: Nanos,
    /// Clock samples of our frames sent before this are not taken: the
    /// peer (or this node) was silent or stopped around then, and frames
    /// read late would skew the estimate by up to the silence.
    clock_since: Nanos,
    /// The peer's newest report of whom it cannot hear, and when it came.
    reported_silent: Option<(Nanos, Vec<NodeSlot>)>,
    /// This peer's silence was found uncorroborated (counted once per
    /// silence in [`ReplicationStats::fences_withheld`]).
    withheld: bool,
    /// When the newest frame of ours the peer acknowledged left (our clock).
    acked_sent: Option<Nanos>,
    needs_sync: bool,
    /// Our full sync to this peer under way, if any.
    sync_out: Option<SyncOut>,
    /// The peer finished sending us our own slot after our restart.
    recovered_from: bool,
    /// Rounds of the peer's Recovery frames received so far, and the
    /// range its RecoveryDone names: complete when the first holds the
    /// second (streams deliver frames in any order).
    recovery_rounds: BTreeSet<u64>,
    recovery_done: Option<(u64, u64)>,
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
    /// When the peer's connection last came up.
    connected_at: Option<Nanos>,
    /// When its connections were last named for a reset.
    link_reset_at: Option<Nanos>,
}

impl PeerState {
    /// The clock estimate as the acknowledgements left it.
    fn clock(&self) -> ClockEstimate {
        ClockEstimate {
            floor: self.rtt_floor,
            offset_ns: self.clock_offset_ns,
            rtt: self.rtt,
        }
    }
}

/// The replication state machine of one node.
pub struct Replicator {
    cfg: ReplicationConfig,
    incarnation: u64,
    peers: BTreeMap<NodeSlot, PeerState>,
    next_round: u64,
    rounds: BTreeMap<u64, Round>,
    /// Resent frame → the lost rounds whose keys it carries again.
    aliases: HashMap<u64, Vec<u64>>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<ReplicationEvent>,
    next_tick: Nanos,
    recovering: bool,
    recovery_started: Option<Nanos>,
    stats: ReplicationStats,
    /// Hits shipped and not yet settled, over all rounds.
    unacked_hits: u64,
    claims: BTreeMap<u64, OpenClaim>,
    claim_events: VecDeque<ClaimEvent>,
    /// Answered claims that yield to later claims of these peers.
    yielding: BTreeMap<u64, Yielding>,
    /// When peers without other traffic are next sent a heartbeat.
    next_beat: Nanos,
    /// When silent peers were last looked for.
    last_fence_check: Option<Nanos>,
    /// When dead links were last looked for, and from when a link's
    /// silence counts (reset by a late tick: this node was stopped).
    last_link_check: Option<Nanos>,
    link_quiet_from: Option<Nanos>,
    /// Peers whose connections the transport should reset.
    links_to_reset: Vec<NodeSlot>,
    /// The suspects last reported to the peers, and when that report is
    /// next repeated.
    suspects_sent: Vec<NodeSlot>,
    next_hearing: Nanos,
    /// Members a recovery answer vouched for: the gate waits for their own
    /// answers too (until `recovery_timeout`, then a majority suffices).
    awaited: BTreeSet<NodeSlot>,
    /// When a recovering node next asks its silent peers again.
    next_recovery_retry: Nanos,
    /// The rules digest of the last hello sent.
    rules_digest: u64,
    /// Peers that asked for our rules again.
    rules_wanted: Vec<NodeSlot>,
}

impl Replicator {
    /// `recovering`: this node has restarted and must recover its own slots
    /// before it admits.
    pub fn new(cfg: ReplicationConfig, incarnation: u64, recovering: bool, now: Nanos) -> Self {
        let cfg_recovery_timeout = cfg.recovery_timeout;
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
            events: VecDeque::new(),
            recovering,
            recovery_started: recovering.then_some(now),
            stats: ReplicationStats::default(),
            unacked_hits: 0,
            claims: BTreeMap::new(),
            claim_events: VecDeque::new(),
            yielding: BTreeMap::new(),
            next_beat: now,
            last_fence_check: None,
            last_link_check: None,
            link_quiet_from: None,
            links_to_reset: Vec::new(),
            suspects_sent: Vec::new(),
            next_hearing: now,
            awaited: BTreeSet::new(),
            next_recovery_retry: now + cfg_recovery_timeout,
            rules_digest: 0,
            rules_wanted: Vec::new(),
        }
    }

    /// The configuration this replicator was built with.
    pub fn config(&self) -> &ReplicationConfig {
        &self.cfg
    }
    /// Counters for metrics.
    pub fn stats(&self) -> &ReplicationStats {
        &self.stats
    }
    /// Every peer of the configured cluster, by slot.
    pub fn peers(&self) -> &BTreeMap<NodeSlot, PeerState> {
        &self.peers
    }
    /// True from a start as recovering until the recovery gate opens
    /// (see [`ReplicationEvent::Recovered`]).
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
    pub fn unacked_rounds_by_peer(&self) -> BTreeMap<NodeSlot, usize> {
        let mut counts: BTreeMap<NodeSlot, usize> = self.peers.keys().map(|&s| (s, 0)).collect();
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
    pub fn add_peer(&mut self, slot: NodeSlot) {
        if slot != self.cfg.own {
            self.peers.entry(slot).or_insert_with(|| PeerState {
                live: true,
                ..PeerState::default()
            });
        }
    }

    /// The other members this node knows of changed (one joined, or one was
    /// forgotten): majorities and recovery count them from now on.
    pub fn set_expected_peers(&mut self, peers: usize, now: Nanos) {
        self.cfg.expected_peers = peers;
        self.check_recovered(now);
    }

    /// Removes a member that left for good: nobody waits for it any more.
    pub fn remove_peer(&mut self, store: &(impl ReplicaStore + ?Sized), slot: NodeSlot) {
        self.peers.remove(&slot);
        self.awaited.remove(&slot);
        self.stop_waiting_for(store, slot, u64::MAX);
        self.stop_claims_waiting_for(slot);
    }

    /// True when this node and the live peers are at most half the cluster.
    pub fn in_minority(&self) -> bool {
        let live = 1 + self.peers.values().filter(|p| p.live && !p.fenced).count();
        // Configured members count even before they are heard from.
        let members = 1 + self.peers.len().max(self.cfg.expected_peers);
        live * 2 <= members && members > 1
    }

    /// Whether frames must wait for `peer`'s acknowledgement before their
    /// hits are settled.
    fn must_wait_for(&self, peer: &PeerState) -> bool {
        (peer.live && !peer.fenced)
            || (self.cfg.policy != SharePolicy::Available && self.in_minority())
    }

    /// Which peers a frame sent now must hear back from.
    fn waiting_set(&self) -> BTreeSet<NodeSlot> {
        self.peers
            .iter()
            .filter(|(_, p)| self.must_wait_for(p))
            .map(|(&s, _)| s)
            .collect()
    }

    /// The failure detector's verdict on a peer changed (whether or not it
    /// is fenced: see [`SilencePolicy`]).
    pub fn set_liveness(
        &mut self,
        store: &(impl ReplicaStore + ?Sized),
        slot: NodeSlot,
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
                self.stop_waiting_for(store, slot, u64::MAX);
                self.stop_claims_waiting_for(slot);
            }
        }
    }

    /// A connection to `slot` is up: introduce ourselves.
    pub fn peer_connected(&mut self, now: Nanos, slot: NodeSlot, rules_digest: u64) {
        self.add_peer(slot);
        if let Some(p) = self.peers.get_mut(&slot) {
            p.connected = true;
            p.connected_at = Some(now);
            p.last_heard = Some(now);
            p.synced_from = false;
        }
        self.introduce(slot, rules_digest);
    }

    /// The peer's connection closed: it is marked disconnected and its
    /// unfinished full sync is dropped.
    pub fn peer_disconnected(&mut self, slot: NodeSlot) {
        if let Some(p) = self.peers.get_mut(&slot) {
            p.connected = false;
            p.sync_out = None;
        }
    }

    /// True while some live peer's whole state has not reached us since it
    /// came (back) up: the limiter then confirms every request.
    pub fn unsynced_live(&self) -> bool {
        self.peers.values().any(|p| p.live && !p.synced_from)
    }

    fn send(&mut self, to: NodeSlot, bytes: Vec<u8>, reliable: bool) {
        self.sent_to(to);
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        let reliable = reliable || bytes.len() > self.cfg.datagram_bytes;
        self.outbox.push_back(Transmit {
            to,
            bytes,
            reliable,
        });
    }

    /// The next frame to send, in order; `None` when the queue is empty.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// What happened since the last call (the recovery gate opening).
    pub fn poll_event(&mut self) -> Option<ReplicationEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called:
    /// the next sync tick, or an earlier claim deadline or resend.
    pub fn poll_timeout(&self) -> Nanos {
        self.claims
            .values()
            .map(|c| {
                c.silence_check
                    .map_or(c.deadline, |at| at.min(c.deadline))
                    .min(c.resend_at)
            })
            .chain(self.yielding.values().map(|y| y.deadline))
            .fold(self.next_tick, Nanos::min)
    }

    /// The sync tick: acknowledge what arrived, ship what changed, resend
    /// what was lost.
    pub fn handle_timeout(&mut self, now: Nanos, store: &(impl ReplicaStore + ?Sized)) {
        self.claim_timers(now, store);
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.cfg.sync_interval;
        store.prune_confirming(now);
        self.check_recovered(now);
        self.retry_recovery(now);
        self.fence_silent(now, store);
        self.find_dead_links(now);
        self.ship_deltas(now, store);
        self.resend_lost(now, store);
        self.heartbeats(now);
    }
}
