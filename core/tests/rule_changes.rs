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

/// `n` rules that each match every user, one sliding-window limit each.
fn many(n: usize) -> RuleSet {
    let text: String = (0..n)
        .map(|r| {
            format!(
                "[[rules]]\nname = \"r{r}\"\nmatch = {{ user = \"*\" }}\n\
                 limits = [ {{ algorithm = \"sliding_window\", limit = 100000, window = \"1h\" }} ]\n"
            )
        })
        .collect();
    RuleSet::from_toml(&text).unwrap()
}

#[test]
fn the_rules_memory_is_counted_and_a_change_gives_it_back() {
    let l = limiter();
    let one = l.rules_memory();
    assert!(one > 0, "a rule set and its table hold memory");
    let budget_keys = l.memory().used();

    l.replace_rules(many(3_000)).unwrap();
    let big = l.rules_memory();
    // Each rule holds at least its table (a few hundred bytes) and its
    // compiled limit.
    assert!(big > one + 3_000 * 500, "{big} bytes for 3,000 rules");
    assert!(hit(&l, 1).0);
    assert_eq!(l.keys_tracked(), 3_000, "one key per matching limit");
    assert!(l.memory().used() > budget_keys);

    // Back to the first rules: the 3,000 rules, their tables and their keys
    // are given back (nothing else holds them).
    l.replace_rules(rules("sliding_window", 1000, "1h"))
        .unwrap();
    assert_eq!(l.rules_memory(), one);
    assert_eq!(l.memory().used(), budget_keys);
}

#[test]
fn the_rules_memory_counts_against_max_memory() {
    // Room for the rules and the keys of ten users (fifty keys each):
    // twenty users must evict, which they would not if the rules (more
    // than the ten users' keys) were not counted.
    let clock = Arc::new(ManualClock::new(Nanos::from_secs(1_700_000_000)));
    let probe = Limiter::with_clock(many(50), LimiterConfig::default(), clock.clone()).unwrap();
    let rules_bytes = probe.rules_memory();
    drop(probe);
    let per_user = 50 * (64 + drl_core::limiter::table::INDEX_BYTES_PER_KEY);
    assert!(rules_bytes > 10 * per_user, "{rules_bytes} bytes of rules");
    let config = LimiterConfig {
        max_memory: Some(rules_bytes + 10 * per_user),
        ..LimiterConfig::default()
    };
    let l = Limiter::with_clock(many(50), config, clock).unwrap();
    for u in 0..20 {
        let user = format!("u{u}");
        let f = [("user", user.as_str())];
        assert!(l
            .check(&Descriptors::new(&f).unwrap(), 1)
            .unwrap()
            .is_allowed());
    }
    assert!(
        l.memory().evictions() > 0,
        "keys evicted to keep rules and keys within max_memory"
    );
    assert!(l.keys_tracked() < 20 * 50);
}
