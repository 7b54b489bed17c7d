//! Unit tests of the node core: two cores driven by hand, no I/O.

use super::*;
use crate::limiter::LimiterConfig;
use crate::time::ManualClock;

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
    let rules = RuleSet::from_toml(RULES).unwrap();
    let digest = rules.digest();
    let config = LimiterConfig {
        own_slot: NodeSlot::new(slot),
        slots: 2,
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
        cluster_size: 2,
        policy: SharePolicy::Strict,
        inflight_ppm: 20_000,
        sync_interval: Nanos::from_millis(5),
        recovery_timeout: Nanos::from_secs(1),
        snapshot_restored: false,
        incarnation: 1,
        peer_addr: SocketAddr::from(([127, 0, 0, 1], 7400 + slot)),
        recovering: true,
    };
    let core = NodeCore::new(
        cfg,
        limiter.clone(),
        RULES.into(),
        RulesVersion::new(0, slot),
        digest,
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
    let prepared = cores[0]
        .prepare_rules(RuleSet::from_toml(&text).unwrap())
        .unwrap();
    assert_eq!(cores[0].commit_rules(prepared), RulesVersion::new(1, 0));
    pump(&mut cores, now);
    assert!(events(&mut cores[1]).contains(&CoreEvent::RulesInForce {
        version: RulesVersion::new(1, 0),
        text: text.clone(),
    }));
    assert_eq!(cores[1].rules_version(), RulesVersion::new(1, 0));
    assert!(cores[1].runs(&text));
    // Rules too large to replicate change nothing.
    let padded = format!("{text}\n#{}\n", "x".repeat(MAX_RULES_BYTES));
    assert_eq!(
        cores[0]
            .prepare_rules(RuleSet::from_toml(&padded).unwrap())
            .err(),
        Some(PutRulesError::TooLarge(padded.len()))
    );
    assert_eq!(cores[0].rules_version(), RulesVersion::new(1, 0));
}
