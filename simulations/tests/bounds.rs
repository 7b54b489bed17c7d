//! CI's simulation run: a short seeded version (`[quick]`) of every scenario,
//! held to the bounds of `bounds.toml`. A failure prints the seed and the
//! command that replays it.

use simulations::report::BoundsFile;
use simulations::scenario::Scenario;
use simulations::{crate_dir, evaluate, find, load_all, DEFAULT_SEED};

fn bounds() -> BoundsFile {
    BoundsFile::load(&crate_dir().join("bounds.toml")).expect("bounds.toml parses")
}

fn quick(name: &str) -> Scenario {
    find(&crate_dir().join("scenarios"), name)
        .and_then(|s| s.quick())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn holds_its_bounds(name: &str) {
    let seed = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let s = quick(name);
    let (result, _) = evaluate(&s, seed, &bounds()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let bounds: Vec<_> = result.checks.iter().filter(|c| c.kind == "bound").collect();
    assert!(!bounds.is_empty(), "{name} has no bound in bounds.toml");
    let mut broken = Vec::new();
    for c in &result.checks {
        let line = format!(
            "{name} {} {} {:?} {} {}: {}",
            c.kind, c.metric, c.measured, c.op, c.limit, c.why
        );
        println!("{} {line}", if c.pass { "ok  " } else { "FAIL" });
        if c.kind == "bound" && !c.pass {
            broken.push(line);
        }
    }
    assert!(
        broken.is_empty(),
        "seed {seed}: bounds broken (replay: cargo run -p simulations -- run {name} --quick --seed {seed}):\n{}",
        broken.join("\n")
    );
}

macro_rules! scenario_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                holds_its_bounds($name);
            }
        )*
        const TESTED: &[&str] = &[$($name),*];
    };
}

scenario_tests! {
    healthy => "healthy",
    hot_node => "hot-node",
    partition_strict => "partition-strict",
    partition_available => "partition-available",
    partition_bounded => "partition-bounded",
    crash_restart => "crash-restart",
    skew_50ms => "skew-50ms",
    skew_250ms => "skew-250ms",
    flash_crowd => "flash-crowd",
    flash_crowd_precise => "flash-crowd-precise",
    scale => "scale",
    scale_256 => "scale-256",
    gossip_256 => "gossip-256",
    token_bucket => "token-bucket",
    lossy_network => "lossy-network",
    zipf_3 => "zipf-3",
    zipf_20 => "zipf-20",
    gcra => "gcra",
    leaky_bucket => "leaky-bucket",
    skew_5n_plus_50ms => "skew-5n-plus-50ms",
    skew_5n_minus_50ms => "skew-5n-minus-50ms",
    skew_5n_plus_250ms => "skew-5n-plus-250ms",
    skew_5n_minus_250ms => "skew-5n-minus-250ms",
    skew_5n_plus_500ms => "skew-5n-plus-500ms",
    skew_5n_minus_500ms => "skew-5n-minus-500ms",
    loss_2pct_7n => "loss-2pct-7n",
    loss_5pct_7n => "loss-5pct-7n",
    pause_3n => "pause-3n",
    churn => "churn",
}

#[test]
fn every_scenario_is_tested_and_bounded() {
    let b = bounds();
    for s in load_all(&crate_dir().join("scenarios")).unwrap() {
        assert!(TESTED.contains(&s.name.as_str()), "{} has no test", s.name);
        assert!(b.bounds.contains_key(&s.name), "{} has no bounds", s.name);
        assert!(s.quick.is_some(), "{} has no [quick] table", s.name);
    }
    for name in b.bounds.keys().chain(b.targets.keys()) {
        assert!(TESTED.contains(&name.as_str()), "bounds for unknown {name}");
    }
}

#[test]
fn the_same_seed_replays_byte_for_byte() {
    let s = quick("lossy-network");
    let b = bounds();
    let first = evaluate(&s, 7, &b).unwrap().0.to_json();
    let again = evaluate(&s, 7, &b).unwrap().0.to_json();
    assert_eq!(first, again);
    let other = evaluate(&s, 8, &b).unwrap().0.to_json();
    assert_ne!(first, other, "the seed reaches the traffic and the network");
}

/// The harness measures itself: a one-node "cluster" runs the same limiter
/// as the single-node reference, so every decision must agree and the
/// overshoot must equal the baseline.
#[test]
fn a_one_node_cluster_agrees_with_the_reference_exactly() {
    let mut s = quick("healthy");
    s.nodes = 1;
    for g in &mut s.traffic {
        g.split = vec![1.0];
    }
    let (r, _) = evaluate(&s, 3, &BoundsFile::default()).unwrap();
    let f = |k: &str| r.figures[k];
    assert!(f("requests") > 1000.0);
    assert_eq!(f("decision_error"), 0.0);
    assert_eq!(f("admitted"), f("reference_admitted"));
    assert_eq!(f("overshoot_max"), f("baseline_overshoot_max"));
    assert_eq!(f("algo_excess_requests"), 0.0);
    assert_eq!(f("history_false_deny"), 0.0);
}
