//! A rule change never hands out fresh budgets: a limit is identified by its
//! rule, place, algorithm and bucket grid, not by its numbers, so lowering
//! or raising a limit keeps what clients spent; only a new window or
//! algorithm starts counts over.

use std::sync::Arc;

use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::{ManualClock, Nanos};

fn rules(algorithm: &str, limit: u32, window: &str) -> RuleSet {
    RuleSet::from_toml(&format!(
        r#"
[[rules]]
name = "per-user"
match = {{ user = "*" }}
limits = [ {{ algorithm = "{algorithm}", limit = {limit}, window = "{window}" }} ]
"#
    ))
    .unwrap()
}

fn limiter() -> Limiter<Arc<ManualClock>> {
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    Limiter::with_clock(
        rules("sliding_window", 1000, "1h"),
        LimiterConfig::default(),
        clock,
    )
    .unwrap()
}

fn hit(l: &Limiter<Arc<ManualClock>>, cost: u32) -> (bool, u64) {
    let f = [("user", "u")];
    let d = l.check(&Descriptors::new(&f).unwrap(), cost).unwrap();
    (d.is_allowed(), d.quota.map_or(0, |q| q.remaining))
}

fn spend_800(l: &Limiter<Arc<ManualClock>>) {
    for _ in 0..800 {
        assert!(hit(l, 1).0);
    }
    assert_eq!(hit(l, 0).1, 200);
}

#[test]
fn lowering_a_limit_keeps_what_was_spent() {
    let l = limiter();
    spend_800(&l);
    l.replace_rules(rules("sliding_window", 500, "1h")).unwrap();
    let (allowed, remaining) = hit(&l, 1);
    assert!(!allowed, "800 spent of a new limit of 500: denied");
    assert_eq!(remaining, 0);
}

#[test]
fn raising_a_limit_keeps_what_was_spent() {
    let l = limiter();
    spend_800(&l);
    l.replace_rules(rules("sliding_window", 2000, "1h"))
        .unwrap();
    assert_eq!(hit(&l, 0).1, 1200, "2000 − the 800 spent");
    // And back down again: still the same counts.
    l.replace_rules(rules("sliding_window", 1000, "1h"))
        .unwrap();
    assert_eq!(hit(&l, 0).1, 200);
}

#[test]
fn a_new_window_or_algorithm_starts_counts_over() {
    let l = limiter();
    spend_800(&l);
    l.replace_rules(rules("sliding_window", 1000, "2h"))
        .unwrap();
    assert_eq!(hit(&l, 0).1, 1000, "a new window: new counts");
    let l = limiter();
    spend_800(&l);
    l.replace_rules(rules("fixed_window", 1000, "1h")).unwrap();
    assert_eq!(hit(&l, 0).1, 1000, "a new algorithm: new counts");
}
