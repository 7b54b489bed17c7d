//! Cluster membership: who is in the cluster and who is alive, by SWIM.
//!
//! [`Membership`] wraps [foca](https://docs.rs/foca), a sans-IO SWIM
//! implementation, in this crate's state-machine shape: the driver feeds it
//! received payloads and the current time, and drains the payloads to send,
//! the next timer deadline and the membership events. foca's [`Runtime`]
//! callbacks land in internal queues; its timers become entries of a
//! deadline-ordered heap that [`Membership::handle_timeout`] fires.
//!
//! The payloads are opaque bytes that travel inside `Frame::Swim`; foca's
//! postcard codec lays them out, and [`MembershipConfig::max_packet_size`]
//! keeps each one inside a single QUIC datagram.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{
    Codec, Foca, Header, Identity, Message, NoCustomBroadcast, Notification, OwnedNotification,
    PeriodicParams, PostcardCodec, Runtime, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::slot::NodeSlot;
use crate::time::Nanos;

/// One node of the cluster, as SWIM knows it.
///
/// `name` and `slot` say which node this is; `incarnation` says which run of
/// it. A node that restarts must come back with a higher incarnation (the
/// process start time in milliseconds is a good choice), so that peers take it
/// for a rejoin rather than for stale news about the run that died. This is not
/// SWIM's own incarnation number (foca keeps that one internally, to refute
/// suspicion).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's stable name.
    pub name: String,
    /// The node's slot in every counter.
    pub slot: NodeSlot,
    /// Where peers reach the node (UDP, QUIC).
    pub addr: SocketAddr,
    /// Which run of the node: higher after every restart.
    pub incarnation: u64,
}

impl Member {
    /// A member from its parts.
    pub fn new(
        name: impl Into<String>,
        slot: NodeSlot,
        addr: SocketAddr,
        incarnation: u64,
    ) -> Self {
        Member {
            name: name.into(),
            slot,
            addr,
            incarnation,
        }
    }

    /// Whether `other` is the same node, possibly in another incarnation.
    pub fn has_same_prefix(&self, other: &Member) -> bool {
        self.slot == other.slot && self.name == other.name
    }
}

impl Identity for Member {
    /// The node itself: foca keeps one entry per node however often it
    /// restarts, and takes a second identity with the same node for a rejoin.
    type Addr = (NodeSlot, String);

    /// Declared down by the cluster: come back as the next incarnation.
    fn renew(&self) -> Option<Self> {
        let incarnation = self.incarnation.checked_add(1)?;
        Some(Member {
            incarnation,
            ..self.clone()
        })
    }

    fn addr(&self) -> Self::Addr {
        (self.slot, self.name.clone())
    }

    /// The later run wins; the address only breaks ties, so that two
    /// processes claiming the same run settle the same way everywhere.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, self.addr) > (adversary.incarnation, adversary.addr)
    }
}

/// SWIM parameters. See [`MembershipConfig::lan`] for what the defaults give.
///
/// [`Membership::new`] clamps values that foca cannot run with (zeros, a
/// `probe_rtt` not below `probe_period`); [`MembershipConfig::validate`]
/// reports them instead, for a driver that checks its configuration up front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Each node probes one peer per period.
    pub probe_period: Nanos,
    /// How long a direct probe waits before peers are asked to probe indirectly.
    pub probe_rtt: Nanos,
    /// How long an unreachable peer stays suspect before it is declared down.
    pub suspect_to_down_after: Nanos,
    /// How many times each membership change is piggybacked onto messages.
    pub max_transmissions: u8,
    /// Peers asked to probe indirectly, and peers gossiped to per round.
    pub fanout: u8,
    /// Largest payload produced or accepted, in bytes.
    pub max_packet_size: usize,
    /// How often pending membership changes are pushed to `fanout` peers.
    pub gossip_period: Nanos,
    /// How often one live peer is asked for its member list (fills gaps).
    pub announce_period: Nanos,
    /// How often two peers believed down are knocked on, so that a healed
    /// partition merges without help.
    pub announce_down_period: Nanos,
    /// How long a down node is remembered (its old incarnation stays refused).
    pub remove_down_after: Nanos,
}

impl MembershipConfig {
    /// Payload limit: a QUIC datagram carries about 1200 bytes, and the
    /// frame header and QUIC's own overhead need some of them.
    pub const DATAGRAM_PAYLOAD: usize = 1100;

    /// Settings for a LAN cluster of about `cluster_size` nodes, from foca's
    /// `Config::new_lan` (itself memberlist's LAN profile) with faster probes.
    ///
    /// A crashed node is probed by someone within about one `probe_period`
    /// (every live node probes one peer per period), found unreachable at the
    /// end of that period, suspected for `suspect_to_down_after` and then
    /// gossiped down within a `gossip_period`: about 0.5 + 0.5 + 1 + 0.2 s,
    /// so 2-3 s for up to ten nodes. The unlucky case, where every prober
    /// leaves the dead node last in its round-robin, adds up to
    /// `cluster_size - 2` more periods. Suspicion grows with `log10` of the
    /// cluster size, as in foca.
    pub fn lan(cluster_size: u32) -> Self {
        let lan = foca::Config::new_lan(NonZeroU32::new(cluster_size).unwrap_or(NonZeroU32::MIN));
        let probe_period = Nanos::from_millis(500);
        let scale = f64::from(cluster_size.max(1)).log10().max(1.0);
        let suspect_ms = (scale * 2.0 * 500.0).round() as u64;
        MembershipConfig {
            probe_period,
            probe_rtt: Nanos::from_millis(200),
            suspect_to_down_after: Nanos::from_millis(suspect_ms),
            max_transmissions: lan.max_transmissions.get().max(4),
            fanout: 3,
            max_packet_size: Self::DATAGRAM_PAYLOAD,
            gossip_period: Nanos::from_millis(200),
            announce_period: Nanos::from_secs(10),
            announce_down_period: Nanos::from_secs(10),
            remove_down_after: Nanos::from_secs(24 * 3600),
        }
    }

    /// Why foca could not run with these values, if it could not.
    pub fn validate(&self) -> Result<(), MembershipConfigError> {
        let bad = |why| Err(MembershipConfigError(why));
        if self.probe_rtt == Nanos::ZERO || self.probe_rtt >= self.probe_period {
            return bad("probe_rtt must be above zero and below probe_period");
        }
        if self.suspect_to_down_after == Nanos::ZERO || self.max_transmissions == 0 {
            return bad("suspect_to_down_after and max_transmissions must be above zero");
        }
        if self.fanout == 0 || self.max_packet_size < 256 {
            return bad("fanout must be above zero and max_packet_size at least 256");
        }
        let periods = [
            self.gossip_period,
            self.announce_period,
            self.announce_down_period,
            self.remove_down_after,
        ];
        if periods.contains(&Nanos::ZERO) {
            return bad("periods must be above zero");
        }
        Ok(())
    }

    fn to_foca(&self) -> foca::Config {
        let at_least_1ms = |n: Nanos| Duration::from(n.max(Nanos::from_millis(1)));
        let probe_period = at_least_1ms(self.probe_period);
        let probe_rtt = at_least_1ms(self.probe_rtt).min(probe_period / 2);
        let fanout = NonZeroUsize::new(usize::from(self.fanout)).unwrap_or(NonZeroUsize::MIN);
        let every = |period: Nanos, members: usize| {
            Some(PeriodicParams {
                frequency: at_least_1ms(period),
                num_members: NonZeroUsize::new(members).unwrap_or(NonZeroUsize::MIN),
            })
        };
        foca::Config {
            probe_period,
            probe_rtt,
            num_indirect_probes: fanout,
            max_transmissions: NonZeroU8::new(self.max_transmissions).unwrap_or(NonZeroU8::MIN),
            suspect_to_down_after: at_least_1ms(self.suspect_to_down_after),
            remove_down_after: Some(at_least_1ms(self.remove_down_after)),
            max_packet_size: NonZeroUsize::new(self.max_packet_size.max(256))
                .unwrap_or(NonZeroUsize::MIN),
            notify_down_members: true,
            periodic_announce: every(self.announce_period, 1),
            periodic_announce_to_down_members: every(self.announce_down_period, 2),
            periodic_gossip: every(self.gossip_period, fanout.get()),
        }
    }
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self::lan(8)
    }
}

/// A change in who is alive, as seen from this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// A node this one had not seen before.
    Up(Member),
    /// A node left, or failed probes and suspicion.
    Down(Member),
    /// A node came back as a higher incarnation: it restarted, or it learned
    /// the cluster had declared it down (a partition, a long pause) and
    /// renewed itself. Either way it missed updates, and may have lost its
    /// memory: treat it as a new peer that needs a full sync.
    Rejoined(Member),
}

/// Why [`Membership::handle_data`] refused a payload. Except for
/// [`MembershipError::Protocol`], nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("membership payload of {len} bytes exceeds the {max}-byte limit")]
    /// The payload is larger than one membership packet.
    TooLarge {
        /// The payload's length in bytes.
        len: usize,
        /// The largest payload accepted.
        max: usize,
    },
    #[error("malformed membership payload")]
    /// The payload does not decode.
    Malformed,
    /// Claims to come from this node, or asks this node to probe itself.
    #[error("membership payload names this node where it cannot")]
    Forged,
    /// foca failed mid-way (an encoding failure); some of the payload may
    /// have been applied. Not expected with well-formed identities.
    #[error("membership protocol error: {0}")]
    Protocol(String),
}

/// Why a [`MembershipConfig`] cannot run (a setup error, apart from the
/// payload errors of [`MembershipError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid membership config: {0}")]
pub struct MembershipConfigError(pub &'static str);

/// foca's side effects, queued until the driver polls them.
#[derive(Default)]
struct Effects {
    now: Nanos,
    seq: u64,
    /// foca timers by deadline. Ties fire in foca's preferred order (`Timer`
    /// orders by kind: an indirect probe before the next probe), then in the
    /// order they were scheduled.
    timers: BinaryHeap<Reverse<(Nanos, Timer<Member>, u64)>>,
    outbox: VecDeque<(Member, Vec<u8>)>,
    notes: Vec<OwnedNotification<Member>>,
}

impl Runtime<Member> for Effects {
    fn notify(&mut self, notification: Notification<'_, Member>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Member, data: &[u8]) {
        self.outbox.push_back((to, data.to_vec()));
    }

    fn submit_after(&mut self, timer: Timer<Member>, after: Duration) {
        self.seq += 1;
        let at = self.now + Nanos::from(after);
        self.timers.push(Reverse((at, timer, self.seq)));
    }
}

/// The SWIM membership state machine of one node. No I/O, no clock, no
/// threads: time and randomness (the seed) are inputs.
///
/// # Calling order
///
/// 1. Call [`announce`](Self::announce) for every known peer (static seeds
///    once their identity is known, peers found by DNS), then whenever this
///    node has no live members left (after a partition of a two-node cluster,
///    for example, SWIM stops probing and waits to be contacted).
/// 2. Feed every received `Frame::Swim` payload to
///    [`handle_data`](Self::handle_data), and call
///    [`handle_timeout`](Self::handle_timeout) when the deadline from
///    [`poll_timeout`](Self::poll_timeout) passes.
/// 3. After any `handle_*`, `announce` or `leave`: drain
///    [`poll_transmit`](Self::poll_transmit) (send each payload to its member)
///    and [`poll_event`](Self::poll_event), then re-arm the timer from
///    `poll_timeout`.
///
/// [`me`](Self::me) can change: a node that learns the cluster declared it
/// down rejoins as its next incarnation.
pub struct Membership {
    foca: Foca<Member, PostcardCodec, StdRng, NoCustomBroadcast>,
    effects: Effects,
    events: VecDeque<MemberEvent>,
    /// foca's packet limit (its config cannot be read back).
    max_packet: usize,
    left: bool,
}

impl Membership {
    /// The membership of node `me`, alone until it announces itself or is
    /// announced to. `rng_seed` seeds the choice of probe targets.
    pub fn new(me: Member, config: MembershipConfig, rng_seed: u64) -> Self {
        let config = config.to_foca();
        let max_packet = config.max_packet_size.get();
        let rng = StdRng::seed_from_u64(rng_seed);
        Membership {
            foca: Foca::new(me, config, rng, PostcardCodec),
            effects: Effects::default(),
            events: VecDeque::new(),
            max_packet,
            left: false,
        }
    }

    /// This node's own identity.
    pub fn me(&self) -> &Member {
        self.foca.identity()
    }

    /// Introduces this node to `to`, which answers with the members it
    /// knows. Only `to`'s name and slot must be right: any incarnation
    /// reaches it.
    pub fn announce(&mut self, now: Nanos, to: Member) {
        if self.left || to.has_same_prefix(self.me()) {
            return;
        }
        self.effects.now = now;
        // Fails only if our own identity does not fit in a packet.
        let _ = self.foca.announce(to, &mut self.effects);
        self.collect_events();
    }

    /// Takes one payload received from a peer. A payload that is not a
    /// well-formed SWIM message is refused whole, before anything reads it.
    pub fn handle_data(&mut self, now: Nanos, payload: &[u8]) -> Result<(), MembershipError> {
        if self.left {
            return Ok(());
        }
        let sender = self.check(payload)?;
        self.effects.now = now;
        let result = self.foca.handle_data(payload, &mut self.effects);
        // Told we are down, foca rejoined as our next incarnation and told
        // the peers it still counts as live. The sender, which declared us
        // down, is the one that must hear about it: its own answer would
        // have been addressed to the identity we just dropped.
        let rejoined =
            (self.effects.notes.iter()).any(|n| matches!(n, OwnedNotification::Rejoin(_)));
        if rejoined {
            let _ = self.foca.announce(sender, &mut self.effects);
        }
        self.collect_events();
        result.map_err(|e| MembershipError::Protocol(e.to_string()))
    }

    /// Fires every timer due at or before `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.effects.now = now;
        while self.poll_timeout().is_some_and(|at| at <= now) {
            let Some(Reverse((_, timer, _))) = self.effects.timers.pop() else {
                break;
            };
            // foca recovers from its own timer errors (a probe cycle cut
            // short, a timer from before an identity change); nothing to do.
            let _ = self.foca.handle_timer(timer, &mut self.effects);
        }
        self.collect_events();
    }

    /// The next payload to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(Member, Vec<u8>)> {
        self.effects.outbox.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.effects.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// What changed in the member list, in order; `None` when nothing did.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Leaves the cluster: tells a few peers this node is down, so that
    /// every peer sees it go within a gossip round or two. Afterwards the
    /// machine is inert (payloads are ignored, no timers); drain
    /// `poll_transmit` once more to send the farewell.
    pub fn leave(&mut self, now: Nanos) {
        if self.left {
            return;
        }
        self.effects.now = now;
        let _ = self.foca.leave_cluster(&mut self.effects);
        self.collect_events();
        self.effects.timers.clear();
        self.left = true;
    }

    /// Live members (alive or suspect), excluding this node, by slot.
    pub fn members(&self) -> Vec<Member> {
        let mut live: Vec<Member> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        live.sort_by(|a, b| (a.slot, &a.name).cmp(&(b.slot, &b.name)));
        live
    }

    /// Whether a live member (alive or suspect) holds `slot`.
    pub fn is_alive(&self, slot: NodeSlot) -> bool {
        self.foca.iter_members().any(|m| m.id().slot == slot)
    }

    /// Mirrors foca's reader, so that a bad payload fails before foca
    /// applies any part of it; returns the sender. The layout: a header,
    /// then, for messages that carry them, a big-endian `u16` count of
    /// member updates and the updates, then nothing (custom broadcasts are
    /// not used).
    fn check(&self, payload: &[u8]) -> Result<Member, MembershipError> {
        let max = self.max_packet;
        if payload.len() > max {
            return Err(MembershipError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let mut rest = payload;
        let header: Header<Member> = PostcardCodec
            .decode_header(&mut rest)
            .map_err(|_| MembershipError::Malformed)?;
        let me = self.me();
        if header.src.has_same_prefix(me) {
            return Err(MembershipError::Forged);
        }
        let probes_me = match &header.message {
            Message::PingReq { target, .. } | Message::IndirectAck { target, .. } => target == me,
            Message::IndirectPing { origin, .. } | Message::ForwardedAck { origin, .. } => {
                origin == me
            }
            _ => false,
        };
        if probes_me {
            return Err(MembershipError::Forged);
        }
        let carries_updates = !matches!(header.message, Message::Announce | Message::Broadcast);
        if carries_updates && !rest.is_empty() {
            let [hi, lo, tail @ ..] = rest else {
                return Err(MembershipError::Malformed);
            };
            rest = tail;
            for _ in 0..u16::from_be_bytes([*hi, *lo]) {
                let _: foca::Member<Member> = PostcardCodec
                    .decode_member(&mut rest)
                    .map_err(|_| MembershipError::Malformed)?;
            }
        }
        if rest.is_empty() {
            Ok(header.src)
        } else {
            Err(MembershipError::Malformed)
        }
    }

    /// Turns foca's notifications into member events. foca reports a rejoin
    /// as `Rename(old, new)`, followed by `MemberUp(new)` if the old run was
    /// down, by `MemberDown(new)` if the new one is, or by nothing.
    fn collect_events(&mut self) {
        let mut notes = std::mem::take(&mut self.effects.notes)
            .into_iter()
            .peekable();
        while let Some(note) = notes.next() {
            let event = match note {
                OwnedNotification::MemberUp(m) => MemberEvent::Up(m),
                OwnedNotification::MemberDown(m) => MemberEvent::Down(m),
                OwnedNotification::Rename(_, new) => match notes.peek() {
                    Some(OwnedNotification::MemberUp(m)) if *m == new => {
                        notes.next();
                        MemberEvent::Rejoined(new)
                    }
                    Some(OwnedNotification::MemberDown(m)) if *m == new => {
                        notes.next();
                        MemberEvent::Down(new)
                    }
                    _ if self.foca.iter_members().any(|m| *m.id() == new) => {
                        MemberEvent::Rejoined(new)
                    }
                    _ => continue,
                },
                // About this node, not a peer: `me()` and `members()` show them.
                _ => continue,
            };
            self.events.push_back(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(slot: u16) -> Member {
        let addr = SocketAddr::from(([10, 0, 0, 1], 7000 + slot));
        Member::new(format!("n{slot}"), NodeSlot::new(slot), addr, 0)
    }

    /// Moves everything `from` has to send into `to`; how many payloads.
    fn deliver(from: &mut Membership, to: &mut Membership, now: Nanos) -> usize {
        let sent: Vec<_> = std::iter::from_fn(|| from.poll_transmit()).collect();
        for (dst, payload) in &sent {
            assert!(dst.has_same_prefix(to.me()));
            assert_eq!(to.handle_data(now, payload), Ok(()));
        }
        sent.len()
    }

    #[test]
    fn renewed_identity_is_the_same_node_and_wins() {
        let old = node(1);
        let new = old.renew().unwrap();
        assert_eq!(new.incarnation, 1);
        assert!(old.has_same_prefix(&new) && old.addr() == new.addr());
        assert!(new.win_addr_conflict(&old) && !old.win_addr_conflict(&new));
        assert!(!old.has_same_prefix(&node(2)));
    }

    #[test]
    fn lan_config_is_valid_and_fits_a_datagram() {
        for n in [0, 1, 5, 8, 100] {
            let config = MembershipConfig::lan(n);
            assert_eq!(config.validate(), Ok(()));
            assert_eq!(config.to_foca().max_packet_size.get(), 1100);
        }
        assert_eq!(
            MembershipConfig::lan(5).suspect_to_down_after,
            Nanos::from_secs(1)
        );
        assert_eq!(
            MembershipConfig::lan(100).suspect_to_down_after,
            Nanos::from_secs(2)
        );
        let broken = MembershipConfig {
            probe_rtt: Nanos::from_secs(1),
            fanout: 0,
            ..MembershipConfig::default()
        };
        assert!(broken.validate().is_err());
        let clamped = broken.to_foca();
        assert!(clamped.probe_rtt < clamped.probe_period);
    }

    #[test]
    fn timers_fire_by_deadline_then_indirect_probe_first() {
        let mut effects = Effects::default();
        let later = Duration::from_millis(5);
        effects.submit_after(Timer::ProbeRandomMember(0), later);
        let (probed_id, token) = (node(2), 0);
        effects.submit_after(Timer::SendIndirectProbe { probed_id, token }, later);
        effects.submit_after(Timer::PeriodicGossip(0), Duration::from_millis(1));
        let order: Vec<String> = std::iter::from_fn(|| effects.timers.pop())
            .map(|Reverse((_, timer, _))| format!("{timer:?}"))
            .collect();
        assert!(order[0].starts_with("PeriodicGossip"));
        assert!(order[1].starts_with("SendIndirectProbe"));
        assert!(order[2].starts_with("ProbeRandomMember"));
    }

    #[test]
    fn two_nodes_meet_probe_and_part() {
        let config = MembershipConfig::default();
        let mut a = Membership::new(node(0), config.clone(), 1);
        let mut b = Membership::new(node(1), config, 2);
        assert_eq!(a.poll_timeout(), None);
        b.announce(Nanos::ZERO, a.me().clone());
        while deliver(&mut b, &mut a, Nanos::ZERO) + deliver(&mut a, &mut b, Nanos::ZERO) > 0 {}
        assert_eq!(a.poll_event(), Some(MemberEvent::Up(node(1))));
        assert_eq!(b.poll_event(), Some(MemberEvent::Up(node(0))));
        let s = NodeSlot::new;
        assert!(a.is_alive(s(1)) && b.is_alive(s(0)) && !a.is_alive(s(2)));

        let due = a.poll_timeout().expect("probing started");
        a.handle_timeout(due - Nanos::new(1));
        assert_eq!((a.poll_timeout(), a.poll_transmit()), (Some(due), None));
        a.handle_timeout(due);
        let (to, ping) = a.poll_transmit().expect("a probe or gossip");
        assert_eq!(to, node(1));
        assert_eq!(a.handle_data(due, &ping), Err(MembershipError::Forged));

        b.leave(due);
        assert_eq!(b.poll_timeout(), None);
        deliver(&mut b, &mut a, due);
        assert_eq!(a.poll_event(), Some(MemberEvent::Down(node(1))));
        assert!(a.members().is_empty());
        assert_eq!(b.handle_data(due, &ping), Ok(()));
    }
}
