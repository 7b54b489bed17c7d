//! The rule features users of Envoy's ratelimit service and Limitador
//! expect: shadow mode (counts and reports, never denies), unlimited rules
//! (exempt what they match from every limit), and per-customer quotas
//! (overrides that share their rule's counter, so thousands of them cost
//! one key table and a customer who changes plan keeps what they spent).

use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Decision, Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::{ManualClock, Nanos};

fn limiter(rules: &str) -> Limiter<ManualClock> {
    Limiter::with_clock(
        RuleSet::from_toml(rules).unwrap(),
        LimiterConfig::default(),
        ManualClock::new(Nanos::from_secs(1_000)),
    )
    .unwrap()
}

fn check(l: &Limiter<ManualClock>, fields: &[(&str, &str)]) -> Decision {
    l.check(&Descriptors::new(fields).unwrap(), 1).unwrap()
}

#[test]
fn shadow_mode_counts_and_reports_but_never_denies() {
    let l = limiter(
        r#"
[[rules]]
name = "trial"
shadow_mode = true
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 2, window = "1m" } ]

[[rules]]
name = "real"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 100, window = "1m" } ]
"#,
    );
    let mut shadowed = 0;
    for i in 0..5 {
        let d = check(&l, &[("user", "ann")]);
        assert!(d.is_allowed(), "request {i}: shadow mode never denies");
        let q = d.quota.unwrap();
        assert_eq!(q.rule.as_str(), "real", "a shadow limit never decides");
        assert_eq!(q.remaining, 99 - i);
        match d.shadow {
            Some(s) => {
                assert_eq!(s.rule.as_str(), "trial");
                assert_eq!(s.remaining, 0);
                shadowed += 1;
            }
            None => assert!(i < 2, "request {i} would have been denied"),
        }
    }
    assert_eq!(shadowed, 3, "the third request on would have been denied");
}

#[test]
fn an_unlimited_rule_exempts_what_it_matches_from_every_limit() {
    let l = limiter(
        r#"
[[rules]]
name = "internal"
match = { service = "billing" }
unlimited = true

[[rules]]
name = "everyone"
match = {}
limits = [ { algorithm = "fixed_window", limit = 1, window = "1m" } ]
"#,
    );
    for _ in 0..10 {
        let d = check(&l, &[("service", "billing")]);
        assert!(d.is_allowed());
        assert_eq!(d.quota, None, "no limit applies");
    }
    // Nothing was counted under the catch-all.
    assert!(check(&l, &[("service", "search")]).is_allowed());
    assert!(!check(&l, &[("service", "search")]).is_allowed());
    // A rule is either unlimited or limits.
    let both = RuleSet::from_toml(
        r#"
[[rules]]
name = "confused"
match = {}
unlimited = true
limits = [ { algorithm = "fixed_window", limit = 1, window = "1m" } ]
"#,
    )
    .unwrap_err();
    assert!(both.to_string().contains("unlimited"), "{both}");
}

#[test]
fn a_customers_own_quota_shares_the_rules_counter() {
    let rules = |gold: &str| {
        format!(
            r#"
[[rules]]
name = "per-customer"
match = {{ customer = "*" }}
limits = [ {{ algorithm = "sliding_window", limit = 3, window = "1h" }} ]

[[rules.overrides]]
match = {{ customer = "{gold}" }}
limits = [ {{ algorithm = "sliding_window", limit = 5, window = "1h" }} ]
"#
        )
    };
    let l = limiter(&rules("someone-else"));
    let acme = [("customer", "acme")];
    assert_eq!(check(&l, &acme).quota.unwrap().remaining, 2);
    assert_eq!(check(&l, &acme).quota.unwrap().remaining, 1);
    // Acme moves to the gold plan: the same counter, a larger quota.
    l.replace_rules(RuleSet::from_toml(&rules("acme")).unwrap())
        .unwrap();
    let d = check(&l, &acme);
    assert_eq!(d.quota.unwrap().limit, 5);
    assert_eq!(d.quota.unwrap().remaining, 2, "what acme spent is kept");
    assert!(check(&l, &acme).is_allowed());
    assert!(check(&l, &acme).is_allowed());
    assert!(!check(&l, &acme).is_allowed());
}

#[test]
fn ten_thousand_customer_quotas_cost_one_key_table() {
    let mut text = String::from(
        "[[rules]]\nname = \"per-customer\"\nmatch = { customer = \"*\" }\n\
         limits = [ { algorithm = \"fixed_window\", limit = 1, window = \"1h\" } ]\n",
    );
    for c in 0..10_000 {
        text.push_str(&format!(
            "[[rules.overrides]]\nmatch = {{ customer = \"c{c}\" }}\n\
             limits = [ {{ algorithm = \"fixed_window\", limit = {}, window = \"1h\" }} ]\n",
            c + 2
        ));
    }
    let l = limiter(&text);
    assert_eq!(l.rules().limits().len(), 10_001);
    assert_eq!(l.tables().len(), 1, "one counter, one key table");
    // Each customer gets exactly its own number.
    for c in [0usize, 4_321, 9_999] {
        let who = format!("c{c}");
        let fields = [("customer", who.as_str())];
        let admitted = (0..c + 5)
            .filter(|_| check(&l, &fields).is_allowed())
            .count();
        assert_eq!(admitted, c + 2, "customer {who}");
    }
    let nobody = [("customer", "walk-in")];
    assert!(check(&l, &nobody).is_allowed());
    assert!(!check(&l, &nobody).is_allowed());
}
