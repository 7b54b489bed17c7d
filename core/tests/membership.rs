//! SWIM membership on an in-memory network with virtual time.
//!
//! `Net` runs N `Membership` machines over a message queue with a fixed
//! delivery delay. It can crash a node (drop its traffic, stop its timers) and
//! partition the cluster (drop traffic between groups at delivery time). The
//! loop always jumps to the earliest of the next delivery and the next timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;

use drl_core::cluster::membership::{Member, MemberEvent, Membership, MembershipConfig};
use drl_core::slot::NodeSlot;
use drl_core::time::Nanos;
use rand::{RngExt, SeedableRng};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const DELAY: u64 = MS;

fn identity(slot: usize, incarnation: u64) -> Member {
    let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + slot as u16));
    Member::new(
        format!("node-{slot}"),
        NodeSlot::new(slot as u16),
        addr,
        incarnation,
    )
}

/// (delivery time, send order, from, to, payload)
type InFlight = (u64, u64, usize, usize, Vec<u8>);

struct Net {
    now: u64,
    seed: u64,
    nodes: Vec<Membership>,
    crashed: Vec<bool>,
    group: Vec<u8>,
    queue: BinaryHeap<Reverse<InFlight>>,
    sent: u64,
    /// (time, observer, event)
    events: Vec<(u64, usize, MemberEvent)>,
}

impl Net {
    fn new(n: usize, seed: u64) -> Self {
        let nodes = (0..n)
            .map(|i| {
                Membership::new(
                    identity(i, 0),
                    MembershipConfig::lan(n as u32),
                    seed + i as u64,
                )
            })
            .collect();
        Net {
            now: 0,
            seed,
            nodes,
            crashed: vec![false; n],
            group: vec![0; n],
            queue: BinaryHeap::new(),
            sent: 0,
            events: Vec::new(),
        }
    }

    /// `n` nodes, each announced to node 0 only, run until `settle`.
    fn joined(n: usize, seed: u64, settle: u64) -> Self {
        let mut net = Net::new(n, seed);
        for i in 1..n {
            net.announce(i, 0);
        }
        net.run_for(settle);
        net
    }

    fn announce(&mut self, from: usize, to: usize) {
        let target = self.nodes[to].me().clone();
        self.nodes[from].announce(Nanos::new(self.now), target);
        self.drain(from);
    }

    fn drain(&mut self, i: usize) {
        while let Some((to, payload)) = self.nodes[i].poll_transmit() {
            assert!(payload.len() <= MembershipConfig::DATAGRAM_PAYLOAD);
            self.sent += 1;
            let at = self.now + DELAY;
            self.queue
                .push(Reverse((at, self.sent, i, to.slot.index(), payload)));
        }
        while let Some(event) = self.nodes[i].poll_event() {
            self.events.push((self.now, i, event));
        }
    }

    fn next_timer(&self) -> Option<u64> {
        (0..self.nodes.len())
            .filter(|&i| !self.crashed[i])
            .filter_map(|i| self.nodes[i].poll_timeout())
            .map(Nanos::as_u64)
            .min()
    }

    fn run_for(&mut self, span: u64) {
        let end = self.now + span;
        loop {
            let next_msg = self.queue.peek().map(|Reverse(m)| m.0);
            let next = match (next_msg, self.next_timer()) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(u64::MAX),
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            let now = Nanos::new(self.now);
            while self.queue.peek().is_some_and(|Reverse(m)| m.0 <= self.now) {
                let Some(Reverse((_, _, from, to, payload))) = self.queue.pop() else {
                    break;
                };
                let cut =
                    self.crashed[from] || self.crashed[to] || self.group[from] != self.group[to];
                if !cut {
                    let result = self.nodes[to].handle_data(now, &payload);
                    assert_eq!(result, Ok(()), "node {to} refused a payload from {from}");
                    self.drain(to);
                }
            }
            for i in 0..self.nodes.len() {
                let due = self.nodes[i].poll_timeout().is_some_and(|t| t <= now);
                if !self.crashed[i] && due {
                    self.nodes[i].handle_timeout(now);
                    self.drain(i);
                }
            }
        }
    }

    fn live_slots(&self, i: usize) -> Vec<u16> {
        self.nodes[i]
            .members()
            .iter()
            .map(|m| m.slot.get())
            .collect()
    }

    /// When `observer` first saw an event matching `pred` at or after `since`.
    fn first(
        &self,
        observer: usize,
        since: u64,
        pred: impl Fn(&MemberEvent) -> bool,
    ) -> Option<u64> {
        self.events
            .iter()
            .find(|(t, o, e)| *o == observer && *t >= since && pred(e))
            .map(|(t, _, _)| *t)
    }
}

fn is_down(slot: usize) -> impl Fn(&MemberEvent) -> bool {
    move |e| matches!(e, MemberEvent::Down(m) if m.slot.index() == slot)
}

fn is_back(slot: usize, incarnation: u64) -> impl Fn(&MemberEvent) -> bool {
    move |e| {
        matches!(e, MemberEvent::Up(m) | MemberEvent::Rejoined(m)
            if m.slot.index() == slot && m.incarnation >= incarnation)
    }
}

fn others(n: usize, me: usize) -> Vec<u16> {
    (0..n).filter(|&i| i != me).map(|i| i as u16).collect()
}

#[test]
fn five_nodes_announced_to_one_all_see_all() {
    let mut net = Net::joined(5, 1, 0);
    // Four probe periods.
    net.run_for(2 * SEC);
    for i in 0..5 {
        assert_eq!(
            net.live_slots(i),
            others(5, i),
            "node {i} at {} ms",
            net.now / MS
        );
        for j in others(5, i) {
            let up = net.first(i, 0, is_back(usize::from(j), 0));
            assert!(up.is_some(), "node {i} never saw node {j} up");
        }
    }
}

/// Crashes node 4 after the cluster settled; returns the slowest detection.
fn crash_detection(seed: u64) -> (Net, u64) {
    let mut net = Net::joined(5, seed, 3 * SEC);
    let crash_at = net.now;
    net.crashed[4] = true;
    net.run_for(8 * SEC);
    let mut slowest = 0;
    for i in 0..4 {
        let seen = net.first(i, crash_at, is_down(4));
        let took = seen.unwrap_or_else(|| panic!("seed {seed}: node {i} never saw node 4 down"))
            - crash_at;
        slowest = slowest.max(took);
        assert!(!net.nodes[i].is_alive(NodeSlot::new(4)));
        assert_eq!(net.live_slots(i), others(4, i), "seed {seed}: node {i}");
    }
    (net, slowest)
}

#[test]
fn crashed_node_is_down_everywhere_within_the_bound() {
    let mut worst = 0;
    for seed in 1..=10 {
        let (_, slowest) = crash_detection(seed);
        assert!(
            slowest < 4 * SEC,
            "seed {seed}: detection took {} ms",
            slowest / MS
        );
        worst = worst.max(slowest);
    }
    println!("slowest detection over 10 seeds: {} ms", worst / MS);
}

#[test]
fn graceful_leave_is_seen_within_a_second() {
    let mut net = Net::joined(5, 3, 3 * SEC);
    let left_at = net.now;
    net.nodes[4].leave(Nanos::new(left_at));
    net.drain(4);
    assert_eq!(net.nodes[4].poll_timeout(), None);
    net.run_for(SEC);
    for i in 0..4 {
        let seen = net.first(i, left_at, is_down(4));
        assert!(
            seen.is_some_and(|t| t - left_at < SEC),
            "node {i}: {seen:?}"
        );
        assert_eq!(net.live_slots(i), others(4, i));
    }
}

fn restart(net: &mut Net, slot: usize, incarnation: u64, announce_to: usize) {
    let config = MembershipConfig::lan(net.nodes.len() as u32);
    let seed = net.seed + 100 + incarnation;
    net.nodes[slot] = Membership::new(identity(slot, incarnation), config, seed);
    net.crashed[slot] = false;
    net.announce(slot, announce_to);
}

#[test]
fn restarted_node_rejoins_with_next_incarnation() {
    let (mut net, _) = crash_detection(5);
    let back_at = net.now;
    restart(&mut net, 4, 1, 2);
    net.run_for(3 * SEC);
    for i in 0..4 {
        assert!(net.first(i, back_at, is_back(4, 1)).is_some(), "node {i}");
        assert!(net.nodes[i].is_alive(NodeSlot::new(4)));
        assert_eq!(net.live_slots(i), others(5, i));
    }
    assert_eq!(net.live_slots(4), others(5, 4));
    assert_eq!(net.nodes[4].me().incarnation, 1);
}

#[test]
fn quick_restart_before_detection_is_a_rejoin() {
    let mut net = Net::joined(5, 6, 3 * SEC);
    net.crashed[4] = true;
    net.run_for(100 * MS);
    let back_at = net.now;
    restart(&mut net, 4, 1, 0);
    net.run_for(3 * SEC);
    for i in 0..4 {
        let rejoined =
            |e: &MemberEvent| matches!(e, MemberEvent::Rejoined(m) if m.slot == NodeSlot::new(4));
        assert!(net.first(i, back_at, rejoined).is_some(), "node {i}");
        assert_eq!(net.live_slots(i), others(5, i));
    }
}

/// Splits {0,1,2} | {3,4} for 10 s, checks each side dropped the other, then
/// heals (and, if `reannounce`, has 0 and 3 announce to each other). Returns
/// how long until every node saw every other alive again.
fn partition_then_heal(seed: u64, reannounce: bool) -> u64 {
    let mut net = Net::joined(5, seed, 3 * SEC);
    let split_at = net.now;
    net.group = vec![0, 0, 0, 1, 1];
    net.run_for(10 * SEC);
    for i in 0..5 {
        let (own, other): (Vec<usize>, Vec<usize>) = (0..5)
            .filter(|&j| j != i)
            .partition(|&j| net.group[j] == net.group[i]);
        let own: Vec<u16> = own.into_iter().map(|j| j as u16).collect();
        assert_eq!(net.live_slots(i), own, "seed {seed}: node {i} split");
        for j in other {
            let seen = net.first(i, split_at, is_down(j));
            assert!(seen.is_some(), "seed {seed}: node {i} never saw {j} down");
        }
    }
    net.group = vec![0; 5];
    if reannounce {
        net.announce(0, 3);
        net.announce(3, 0);
    }
    let healed_at = net.now;
    let all_see_all = |net: &Net| (0..5).all(|i| net.live_slots(i) == others(5, i));
    while !all_see_all(&net) {
        assert!(net.now - healed_at < 30 * SEC, "seed {seed}: never healed");
        net.run_for(10 * MS);
    }
    let took = net.now - healed_at;
    // And it stays whole: nobody flaps once everyone has rejoined.
    net.run_for(5 * SEC);
    assert!(all_see_all(&net), "seed {seed}: split again");
    took
}

#[test]
fn partition_heals_after_reannounce() {
    let worst = (1..=5).map(|seed| partition_then_heal(seed, true)).max();
    assert!(worst.is_some_and(|t| t < 2 * SEC), "{worst:?}");
}

/// Without help, nodes knock on members they believe down every
/// `announce_down_period` (10 s).
#[test]
fn partition_heals_on_its_own() {
    let worst = (1..=5).map(|seed| partition_then_heal(seed, false)).max();
    assert!(worst.is_some_and(|t| t < 13 * SEC), "{worst:?}");
}

#[test]
fn garbage_is_refused_without_changing_members() {
    let mut net = Net::joined(3, 8, 0);
    net.crashed[2] = true;
    net.run_for(2 * SEC);
    // Node 0's answer to node 2's announce lists node 1: a payload with updates.
    let seed_node = net.nodes[0].me().clone();
    net.nodes[2].announce(Nanos::new(net.now), seed_node);
    let (_, announce) = net.nodes[2].poll_transmit().expect("an announce");
    let now = Nanos::new(net.now);
    net.nodes[0]
        .handle_data(now, &announce)
        .expect("a valid announce");
    let feed = std::iter::from_fn(|| net.nodes[0].poll_transmit())
        .find(|(to, _)| to.slot == NodeSlot::new(2))
        .map(|(_, payload)| payload)
        .expect("a feed for node 2");

    let node = &mut net.nodes[2];
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut garbage: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![0xff; 2000]];
    garbage.extend((0..200).map(|_| {
        (0..rng.random_range(1..300))
            .map(|_| rng.random())
            .collect()
    }));
    let mut padded = feed.clone();
    padded.push(0);
    garbage.push(padded);
    for bytes in &garbage {
        assert!(node.handle_data(now, bytes).is_err(), "accepted {bytes:?}");
        assert!(node.members().is_empty());
        assert_eq!(node.poll_event(), None);
    }
    // Every prefix but the bare header (a valid feed without updates) is refused.
    let accepted = (0..feed.len())
        .filter(|&len| {
            let mut probe = Membership::new(identity(2, 0), MembershipConfig::default(), 1);
            let ok = probe.handle_data(now, &feed[..len]).is_ok();
            assert!(
                ok || probe.members().is_empty(),
                "prefix of {len} bytes changed state"
            );
            ok
        })
        .count();
    assert!(accepted <= 1, "{accepted} truncated payloads accepted");
    assert!(node.handle_data(now, &feed[..feed.len() - 1]).is_err());

    node.handle_data(now, &feed).expect("the whole feed");
    assert_eq!(
        node.members()
            .iter()
            .map(|m| m.slot.get())
            .collect::<Vec<_>>(),
        [0, 1]
    );
}

#[test]
fn same_seed_same_events() {
    let run = |seed| {
        let (mut net, _) = crash_detection(seed);
        restart(&mut net, 4, 1, 1);
        net.run_for(3 * SEC);
        net.events
    };
    let first = run(42);
    assert!(first.len() > 20);
    assert_eq!(first, run(42));
}
