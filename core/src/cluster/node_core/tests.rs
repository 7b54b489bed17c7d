//! Unit tests of the node core: two cores driven by hand, no I/O.

use super::*;
use crate::limiter::LimiterConfig;
use crate::rules::RuleSet;
use crate::time::ManualClock;
use crate::wire::MAX_RULES_BYTES;

const RULES: &str = r#"
    [[rules]]
    name = "per-user"
    match = { user = "*" }
    limits = [ { algorithm = "sliding_window", limit = 100, window = "1h" } ]
"#;

type TestCore = NodeCore<Arc<ManualClock>>;

fn core(
    slot: u16,
    clock: &Arc<ManualClock>,
    now: Nanos,
) -> (TestCore, Arc<Limiter<Arc<ManualClock>>>) {
    core_among(slot, &[1 - slot], DEFAULT_FORGET_AFTER, clock, now)
}

/// A core at `slot` that remembers `members` from an earlier run.
fn core_among(
    slot: u16,
    members: &[u16],
    forget_after: Nanos,
    clock: &Arc<ManualClock>,
    now: Nanos,
) -> (TestCore, Arc<Limiter<Arc<ManualClock>>>) {
    let rules = RuleSet::from_toml(RULES).unwrap();
    let config = LimiterConfig {
        own_slot: NodeSlot::new(slot),
        slots: members.len() + 1,
        ..LimiterConfig::default()
    };
    let limiter = Arc::new(
        Limiter::with_clock(rules, config, clock.clone())
            .and_then(|l| l.clustered(ShareView::alone(slot)))
            .unwrap(),
    );
    let cfg = CoreConfig {
        name: format!("node-{slot}"),
        slot: NodeSlot::new(slot),
        members: members.iter().map(|&m| NodeSlot::new(m)).collect(),
        alone_after: None,
        forget_after,
        policy: SharePolicy::Strict,
        inflight_ppm: 20_000,
        sync_interval: Nanos::from_millis(5),
        recovery_timeout: Nanos::from_secs(1),
        snapshot_restored: false,
        incarnation: 1,
        peer_addr: SocketAddr::from(([127, 0, 0, 1], 7400 + slot)),
        recovering: true,
        confirm_timeout: Nanos::from_millis(5),
        silence: SilencePolicy::DEFAULT,
    };
    let core = NodeCore::new(
        cfg,
        limiter.clone(),
        RULES.into(),
        RulesVersion::of_text(0, slot, RULES),
        now,
    );
    (core, limiter)
}

/// Delivers every pending frame between the two cores until none is left.
fn pump(cores: &mut [TestCore; 2], now: Nanos) {
    loop {
        let mut moved = false;
        for from in [NodeSlot::new(0), NodeSlot::new(1)] {
            while let Some(t) = cores[from.index()].poll_transmit() {
                cores[t.to.index()].handle_frame(now, from, &t.bytes);
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
}

fn events(core: &mut TestCore) -> Vec<CoreEvent> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

/// Two cores, connected and recovered from each other.
fn pair(clock: &Arc<ManualClock>) -> ([TestCore; 2], Nanos) {
    let mut now = clock.now();
    let (a, _) = core(0, clock, now);
    let (b, _) = core(1, clock, now);
    let mut cores = [a, b];
    for (me, peer) in [(0u16, 1u16), (1, 0)] {
        cores[usize::from(me)].handle_connected(
            now,
            NodeSlot::new(peer),
            SocketAddr::from(([127, 0, 0, 1], 7400 + peer)),
        );
    }
    for _ in 0..8 {
        now = now + Nanos::from_millis(5);
        for c in cores.iter_mut() {
            c.handle_timeout(now);
        }
        pump(&mut cores, now);
    }
    (cores, now)
}

#[test]
fn concurrent_changes_on_two_cores_end_with_one_winner_and_one_told_it_lost() {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let (mut cores, now) = pair(&clock);
    assert!(cores.iter().all(|c| c.check_quorum().is_ok()));
    let texts = [
        RULES.replace("limit = 100", "limit = 7"),
        RULES.replace("limit = 100", "limit = 9"),
    ];
    let mut tickets = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let prepared = cores[i]
            .prepare_rules(RuleSet::from_toml(text).unwrap(), None)
            .unwrap();
        tickets.push((prepared.version(), cores[i].commit_rules(prepared).unwrap()));
    }
    // Both made version 1 without seeing the other: node 1's wins.
    assert_eq!(tickets[0].0.counter, tickets[1].0.counter);
    pump(&mut cores, now);
    assert!(cores.iter().all(|c| c.runs(&texts[1])));
    assert_eq!(
        cores[0].poll_rules_outcome(),
        Some((
            tickets[0].1,
            RulesOutcome::Superseded {
                version: tickets[0].0,
                winner: tickets[1].0
            }
        ))
    );
    assert!(matches!(
        cores[1].poll_rules_outcome(),
        Some((t, RulesOutcome::Confirmed { .. })) if t == tickets[1].1
    ));
    // A frame of an unknown kind, or a malformed answer, changes nothing.
    let before = cores[0].rules_version();
    cores[0].handle_frame(now, NodeSlot::new(1), &[1, 200, 1, 2, 3]);
    cores[0].handle_frame(now, NodeSlot::new(1), &[1, 10, 0xff]);
    assert_eq!(cores[0].rules_version(), before);
}

#[test]
fn a_core_alone_in_a_cluster_of_two_refuses_changes_it_cannot_get_confirmed() {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let (a, _) = core(0, &clock, clock.now());
    assert_eq!(
        a.check_quorum(),
        Err(PutRulesError::NoQuorum {
            live: 1,
            size: 2,
            majority: 2
        })
    );
}

#[test]
fn two_cores_recover_from_each_other_and_agree_on_rules_without_io() {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let mut now = clock.now();
    let (a, la) = core(0, &clock, now);
    let (b, lb) = core(1, &clock, now);
    let mut cores = [a, b];
    // Nobody heard: time alone opens nothing.
    for _ in 0..400 {
        now = now + Nanos::from_millis(5);
        cores[0].handle_timeout(now);
    }
    assert!(!la.is_admitting());
    assert!(!events(&mut cores[0]).contains(&CoreEvent::Recovered));
    cores[0].handle_connected(
        now,
        NodeSlot::new(1),
        SocketAddr::from(([127, 0, 0, 1], 7401)),
    );
    cores[1].handle_connected(
        now,
        NodeSlot::new(0),
        SocketAddr::from(([127, 0, 0, 1], 7400)),
    );
    pump(&mut cores, now);
    for _ in 0..4 {
        now = now + Nanos::from_millis(5);
        for c in cores.iter_mut() {
            c.handle_timeout(now);
        }
        pump(&mut cores, now);
    }
    assert!(la.is_admitting() && lb.is_admitting());
    for c in cores.iter_mut() {
        assert!(events(c).contains(&CoreEvent::Recovered));
    }
    // A rule change on one core reaches the other.
    let text = RULES.replace("limit = 100", "limit = 50");
    let v1 = RulesVersion::of_text(1, 0, &text);
    let prepared = cores[0]
        .prepare_rules(RuleSet::from_toml(&text).unwrap(), None)
        .unwrap();
    assert_eq!(prepared.version(), v1);
    let ticket = cores[0].commit_rules(prepared).unwrap();
    assert_eq!(cores[0].poll_rules_outcome(), None, "waits for node 1");
    pump(&mut cores, now);
    assert!(events(&mut cores[1]).contains(&CoreEvent::RulesInForce {
        version: v1,
        text: text.clone(),
    }));
    assert_eq!(cores[1].rules_version(), v1);
    assert!(cores[1].runs(&text));
    // Node 1's answer confirms the change.
    assert_eq!(
        cores[0].poll_rules_outcome(),
        Some((
            ticket,
            RulesOutcome::Confirmed {
                version: v1,
                peers: vec![NodeSlot::new(1)]
            }
        ))
    );
    // A change made against an older version is refused and changes nothing.
    let stale = cores[1].prepare_rules(
        RuleSet::from_toml(RULES).unwrap(),
        Some(RulesVersion::of_text(0, 1, RULES)),
    );
    assert_eq!(stale.err(), Some(PutRulesError::Stale { current: v1 }));
    // Rules too large to replicate change nothing.
    let padded = format!("{text}\n#{}\n", "x".repeat(MAX_RULES_BYTES));
    assert_eq!(
        cores[0]
            .prepare_rules(RuleSet::from_toml(&padded).unwrap(), None)
            .err(),
        Some(PutRulesError::TooLarge(padded.len()))
    );
    assert_eq!(cores[0].rules_version(), v1);
}

#[test]
fn a_leaving_member_is_no_longer_waited_for_and_is_forgotten_after_the_grace() {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let (mut cores, mut now) = pair(&clock);
    assert!(cores[0].replicator().peers()[&NodeSlot::new(1)].live);
    cores[1].finish(now);
    // Only its Leave frame arrives (not SWIM's farewell gossip).
    while let Some(t) = cores[1].poll_transmit() {
        if t.bytes.get(1) == Some(&(crate::wire::Kind::Leave as u8)) {
            cores[0].handle_frame(now, NodeSlot::new(1), &t.bytes);
        }
    }
    // At once: nothing waits for it any more, its share is still reserved.
    assert!(!cores[0].replicator().peers()[&NodeSlot::new(1)].live);
    assert_eq!(cores[0].members(), &[NodeSlot::new(1)].into());
    for _ in 0..60 {
        now = now + Nanos::from_millis(5);
        cores[0].handle_timeout(now);
        while cores[0].poll_transmit().is_some() {}
    }
    assert!(cores[0].members().is_empty());
}

#[test]
fn a_remembered_member_that_never_comes_back_is_forgotten_by_the_majority_only() {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let forget = Nanos::from_secs(2);
    let mut now = clock.now();
    // All three restarted; node 2 never comes back.
    let mut cores: Vec<TestCore> = [(0u16, [1u16, 2]), (1, [0, 2])]
        .iter()
        .map(|(slot, members)| core_among(*slot, members, forget, &clock, now).0)
        .collect();
    let (mut lone, _) = core_among(0, &[1, 2], forget, &clock, now);
    for (me, peer) in [(0u16, 1u16), (1, 0)] {
        cores[usize::from(me)].handle_connected(
            now,
            NodeSlot::new(peer),
            SocketAddr::from(([127, 0, 0, 1], 7400 + peer)),
        );
    }
    let all: BTreeSet<NodeSlot> = [1, 2].map(NodeSlot::new).into();
    let start = now;
    let mut step = |cores: &mut Vec<TestCore>, lone: &mut TestCore, until: Nanos| {
        while now < until {
            now = now + Nanos::from_millis(5);
            clock.set(now);
            lone.handle_timeout(now);
            while lone.poll_transmit().is_some() {}
            for c in cores.iter_mut() {
                c.handle_timeout(now);
            }
            // Frames between nodes 0 and 1; those to node 2 are lost.
            loop {
                let mut moved = false;
                for from in 0..2 {
                    while let Some(t) = cores[from].poll_transmit() {
                        if let Some(to) = cores.get_mut(t.to.index()) {
                            to.handle_frame(now, NodeSlot::new(from as u16), &t.bytes);
                            moved = true;
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }
    };
    step(&mut cores, &mut lone, start + Nanos::from_secs(1));
    assert_eq!(
        cores[0].members(),
        &all,
        "still reserved before forget_after"
    );
    step(
        &mut cores,
        &mut lone,
        start + forget + Nanos::from_millis(500),
    );
    assert_eq!(cores[0].members(), &[NodeSlot::new(1)].into());
    assert_eq!(cores[1].members(), &[NodeSlot::new(0)].into());
    assert!(events(&mut cores[0]).contains(&CoreEvent::Members(vec![NodeSlot::new(1)])));
    // A node that hears nobody is a minority: it forgets no one, and the
    // forget it cannot carry out is not a timer due at once (which would
    // make its driver spin).
    assert_eq!(lone.members(), &all);
    assert!(lone.poll_timeout() > now, "a past deadline would spin");
}
