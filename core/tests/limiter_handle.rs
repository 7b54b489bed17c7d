//! The pre-resolved handle (`Limiter::handle` → `Handle::check`) decides
//! exactly as `Limiter::check` does, follows rule reloads, and decisions
//! name the rule that decided them.

use drl_core::descriptor::Descriptors;
use drl_core::limiter::{CheckError, Limiter, LimiterConfig, Outcome};
use drl_core::rules::RuleSet;
use drl_core::time::{ManualClock, Nanos};

const RULES: &str = r#"
endpoints = ["/v1/search", "/v1/items/*"]

[[rules]]
name = "search-per-user"
match = { endpoint = "/v1/search", user = "*" }
key = ["user"]
limits = [
  { algorithm = "sliding_window", limit = 5, window = "1s" },
  { algorithm = "fixed_window", limit = 7, window = "10s" },
]

[[rules.overrides]]
match = { user = "alice" }
limits = [ { algorithm = "token_bucket", capacity = 3, refill = 1, per = "1s" } ]

[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "gcra", limit = 9, per = "1s" } ]
"#;

fn limiter(rules: &str) -> Limiter<ManualClock> {
    let rules = RuleSet::from_toml(rules).unwrap();
    Limiter::with_clock(
        rules,
        LimiterConfig::default(),
        ManualClock::new(Nanos::ZERO),
    )
    .unwrap()
}

#[test]
fn a_handle_decides_as_check_does() {
    let (by_check, by_handle) = (limiter(RULES), limiter(RULES));
    for user in ["alice", "bob"] {
        let fields = [("endpoint", "/v1/search"), ("user", user)];
        let d = Descriptors::new(&fields).unwrap();
        let mut handle = by_handle.handle(&d).unwrap();
        assert_eq!(handle.limits(), if user == "alice" { 2 } else { 3 });
        let mut t = Nanos::ZERO;
        for i in 0..60u32 {
            // Bursts and pauses, costs 0 to 3.
            t = t + Nanos::from_millis(u64::from(i % 7) * 45);
            let cost = i % 4;
            let want = by_check.check_at(t, &d, cost).unwrap();
            let got = handle.check_at(t, cost).unwrap();
            assert_eq!(got, want, "{user} at step {i}");
        }
    }
}

#[test]
fn a_handle_follows_a_reload() {
    let l = limiter(RULES);
    let fields = [("endpoint", "/v1/search"), ("user", "bob")];
    let d = Descriptors::new(&fields).unwrap();
    let mut handle = l.handle(&d).unwrap();
    let first = handle.check_at(Nanos::ZERO, 1).unwrap();
    assert_eq!(first.quota.unwrap().rule.as_str(), "search-per-user");

    // A file where only a stricter per-user rule remains.
    l.replace_rules(
        RuleSet::from_toml(
            r#"
[[rules]]
name = "strict"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 1, window = "1s" } ]
"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        handle.check_at(Nanos::ZERO, 1).unwrap().outcome,
        Outcome::Allowed
    );
    assert_eq!(handle.limits(), 1);
    let denied = handle.check_at(Nanos::ZERO, 1).unwrap();
    assert_eq!(denied.outcome, Outcome::Denied);
    assert_eq!(denied.quota.unwrap().rule.as_str(), "strict");
    // `check` agrees with the handle after the reload.
    assert_eq!(l.check_at(Nanos::ZERO, &d, 1).unwrap(), denied);

    // A reload that lists endpoints without this one: the handle refuses.
    l.replace_rules(RuleSet::from_toml("endpoints = [\"/v2/*\"]").unwrap())
        .unwrap();
    assert!(matches!(
        handle.check_at(Nanos::ZERO, 1),
        Err(CheckError::UnknownEndpoint(_))
    ));
}

#[test]
fn a_handle_for_an_unknown_endpoint_is_refused() {
    let l = limiter(RULES);
    let fields = [("endpoint", "/v9/x"), ("user", "bob")];
    let d = Descriptors::new(&fields).unwrap();
    assert!(matches!(l.handle(&d), Err(CheckError::UnknownEndpoint(_))));
    assert_eq!(l.keys_tracked(), 0, "nothing was counted");
}

#[test]
fn a_decision_names_its_rule_across_reloads() {
    let l = limiter(RULES);
    let fields = [("endpoint", "/v1/items/4"), ("user", "carol")];
    let d = Descriptors::new(&fields).unwrap();
    let before = l.check_at(Nanos::ZERO, &d, 1).unwrap();
    // Swapping the rules' order makes the old index point elsewhere; the
    // name held by the decision does not move.
    l.replace_rules(
        RuleSet::from_toml(&format!(
            "{}\n[[rules]]\nname = \"first-now\"\nmatch = {{ ip = \"*\" }}\nlimits = [ {{ algorithm = \"gcra\", limit = 1, per = \"1s\" }} ]\n",
            RULES.replace("endpoints = [\"/v1/search\", \"/v1/items/*\"]", "")
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(before.quota.unwrap().rule.as_str(), "per-user");
    assert_eq!(before.quota.unwrap().rule.to_string(), "per-user");
}
