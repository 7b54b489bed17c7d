//! Unit tests of the rule file: parsing, checks and matching.

use super::*;
use crate::algorithm::RateAlgorithm;
use crate::time::Nanos;

/// The example of the format description, verbatim.
const EXAMPLE: &str = r#"
endpoints = ["/v1/search", "/v1/items/*"]

[[rules]]
name = "search-per-user"
match = { endpoint = "/v1/search", user = "*" }
key = ["user"]
limits = [
  { algorithm = "sliding_window", limit = 10, window = "1s" },
  { algorithm = "sliding_window", limit = 1000, window = "1h", precision = 60 },
]

[rules.tiers.paid]
limits = [ { algorithm = "sliding_window", limit = 100, window = "1s" } ]

[[rules.overrides]]
match = { user = "alice" }
limits = [ { algorithm = "token_bucket", capacity = 50, refill = 50, per = "1s" } ]
"#;

#[test]
fn a_domain_scopes_a_rule() {
    let rules = RuleSet::from_toml(
        r#"
[[rules]]
name = "edge-per-ip"
domain = "edge"
match = { ip = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1s" } ]
[[rules]]
name = "any-per-ip"
match = { ip = "*" }
limits = [ { algorithm = "fixed_window", limit = 7, window = "1s" } ]
"#,
    )
    .unwrap();
    let names = |fields: &[(&str, &str)]| -> Vec<String> {
        matches(&rules, fields).into_iter().map(|m| m.0).collect()
    };
    assert_eq!(
        names(&[("domain", "edge"), ("ip", "1.2.3.4")]),
        ["edge-per-ip", "any-per-ip"]
    );
    assert_eq!(
        names(&[("domain", "internal"), ("ip", "1.2.3.4")]),
        ["any-per-ip"]
    );
    assert_eq!(names(&[("ip", "1.2.3.4")]), ["any-per-ip"]);
    // The domain is part of the default key: the same ip in another
    // domain's rule would count apart.
    let d = [("domain", "edge"), ("ip", "1.2.3.4")];
    let d = Descriptors::new(&d).unwrap();
    let mut keys = Vec::new();
    rules.for_each_match(&d, |m| keys.push(m.key_fields.to_vec()));
    assert_eq!(keys[0], ["domain", "ip"]);
    assert_eq!(keys[1], ["ip"]);
}

#[test]
fn a_domain_is_checked_like_a_pattern_and_named_once() {
    let twice = r#"
[[rules]]
name = "r"
domain = "edge"
match = { domain = "edge" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1s" } ]
"#;
    let e = RuleSet::from_toml(twice).unwrap_err();
    assert_eq!(e.kind(), &RulesErrorKind::DomainTwice, "{e}");
    assert!(e.to_string().contains("rules[0].domain"), "{e}");
    let empty = twice.replace("match = { domain = \"edge\" }", "match = {}");
    let empty = empty.replace("domain = \"edge\"", "domain = \"\"");
    let e = RuleSet::from_toml(&empty).unwrap_err();
    assert!(matches!(e.kind(), RulesErrorKind::Pattern(_)), "{e}");
}

/// Scope and quota of every limit that applies to `fields`.
fn matches(rules: &RuleSet, fields: &[(&str, &str)]) -> Vec<(String, Scope, u64)> {
    let d = Descriptors::new(fields).unwrap();
    let mut out = Vec::new();
    rules.for_each_match(&d, |m| {
        out.push((
            m.limit.rule.clone(),
            m.limit.scope.clone(),
            m.limit.algorithm.quota(),
        ));
    });
    out
}

fn search(user: &str) -> Vec<(&'static str, &str)> {
    vec![("endpoint", "/v1/search"), ("user", user)]
}

#[test]
fn example_applies_overrides_then_tiers_then_defaults() {
    let rules = RuleSet::from_toml(EXAMPLE).unwrap();
    let rule = || "search-per-user".to_owned();
    assert_eq!(
        matches(&rules, &search("alice")),
        [(rule(), Scope::Override(0), 50)]
    );
    // The override wins over the tier.
    let mut alice_paid = search("alice");
    alice_paid.push(("tier", "paid"));
    assert_eq!(
        matches(&rules, &alice_paid),
        [(rule(), Scope::Override(0), 50)]
    );
    let mut bob_paid = search("bob");
    bob_paid.push(("tier", "paid"));
    assert_eq!(
        matches(&rules, &bob_paid),
        [(rule(), Scope::Tier("paid".into()), 100)]
    );
    // An unknown tier falls back to the defaults, in file order.
    let mut bob_gold = search("bob");
    bob_gold.push(("tier", "gold"));
    let defaults = [(rule(), Scope::Default, 10), (rule(), Scope::Default, 1000)];
    assert_eq!(matches(&rules, &bob_gold), defaults);
    assert_eq!(matches(&rules, &search("bob")), defaults);
    // No `user`: the rule's `user = "*"` does not fit.
    assert_eq!(matches(&rules, &[("endpoint", "/v1/search")]), []);
    assert_eq!(
        matches(&rules, &[("endpoint", "/v1/other"), ("user", "bob")]),
        []
    );
}

#[test]
fn example_limits_are_indexed_in_order() {
    let rules = RuleSet::from_toml(EXAMPLE).unwrap();
    let scopes: Vec<_> = rules.limits().iter().map(|l| l.scope.clone()).collect();
    assert_eq!(
        scopes,
        [
            Scope::Default,
            Scope::Default,
            Scope::Tier("paid".into()),
            Scope::Override(0)
        ]
    );
    for (i, l) in rules.limits().iter().enumerate() {
        assert_eq!(l.index, i);
        assert_eq!(l.rule, "search-per-user");
    }
    assert_eq!(
        rules.limits()[1].algorithm.quota_period(),
        Nanos::from_secs(3600)
    );
    assert_eq!(rules.source(), EXAMPLE);
    assert_eq!(rules.digest(), stable_digest(EXAMPLE.as_bytes()));
}

#[test]
fn prefix_star_and_empty_patterns() {
    let rules = RuleSet::from_toml(
        r#"
[[rules]]
name = "items"
match = { endpoint = "/v1/items/*" }
limits = [ { algorithm = "fixed_window", limit = 1, window = "1s" } ]

[[rules]]
name = "any-ip"
match = { ip = "*" }
limits = [ { algorithm = "fixed_window", limit = 2, window = "1s" } ]

[[rules]]
name = "everyone"
match = {}
limits = [ { algorithm = "fixed_window", limit = 3, window = "1s" } ]
"#,
    )
    .unwrap();
    let names = |fields: &[(&str, &str)]| -> Vec<String> {
        matches(&rules, fields)
            .into_iter()
            .map(|(r, _, _)| r)
            .collect()
    };
    assert_eq!(names(&[("endpoint", "/v1/items/7")]), ["items", "everyone"]);
    assert_eq!(names(&[("endpoint", "/v1/items")]), ["everyone"]);
    assert_eq!(
        names(&[("endpoint", "/v1/items/7"), ("ip", "10.0.0.1")]),
        ["items", "any-ip", "everyone"]
    );
    assert_eq!(names(&[("user", "x")]), ["everyone"]);
}

#[test]
fn key_fields_default_to_the_sorted_match_fields() {
    let rules = RuleSet::from_toml(
        r#"
[[rules]]
name = "implicit"
match = { user = "*", endpoint = "/v1/*" }
limits = [ { algorithm = "gcra", limit = 10, per = "1s" } ]

[[rules]]
name = "explicit"
match = { user = "*", endpoint = "/v1/*" }
key = ["user"]
limits = [ { algorithm = "gcra", limit = 10, per = "1s" } ]

[[rules]]
name = "global"
match = {}
limits = [ { algorithm = "gcra", limit = 10, per = "1s" } ]
"#,
    )
    .unwrap();
    let d = [("user", "u"), ("endpoint", "/v1/x")];
    let d = Descriptors::new(&d).unwrap();
    let mut keys = Vec::new();
    rules.for_each_match(&d, |m| keys.push(m.key_fields.to_vec()));
    assert_eq!(
        keys,
        [
            vec!["endpoint".to_owned(), "user".to_owned()],
            vec!["user".to_owned()],
            vec![]
        ]
    );
}

#[test]
fn tiers_without_defaults_limit_only_their_tier() {
    let rules = RuleSet::from_toml(
        r#"
[[rules]]
name = "tiered"
match = { user = "*" }
[rules.tiers.free]
limits = [ { algorithm = "fixed_window", limit = 1, window = "1s" } ]
"#,
    )
    .unwrap();
    assert_eq!(matches(&rules, &[("user", "a"), ("tier", "free")]).len(), 1);
    assert_eq!(matches(&rules, &[("user", "a"), ("tier", "paid")]), []);
    assert_eq!(matches(&rules, &[("user", "a")]), []);
}

#[test]
fn limit_ids_survive_a_reparse_and_follow_the_count_grid_not_the_numbers() {
    let ids = |text: &str| -> Vec<u64> {
        RuleSet::from_toml(text)
            .unwrap()
            .limits()
            .iter()
            .map(|l| l.id.0)
            .collect()
    };
    let first = ids(EXAMPLE);
    assert_eq!(first, ids(EXAMPLE));
    // Limits: default 1s, default 1h, tier `paid` 1s, override (a bucket).
    assert_eq!(first.len(), 4);
    assert_ne!(
        first[0], first[1],
        "two positions of one list: two counters"
    );
    assert_eq!(
        first[2], first[0],
        "the tier's 1 s window at the same position shares the default's counter"
    );
    assert_ne!(first[3], first[0], "another algorithm: another counter");

    // Only the first limit's window changes: only its id moves.
    let changed = ids(&EXAMPLE.replacen(r#"window = "1s" },"#, r#"window = "2s" },"#, 1));
    assert_ne!(changed[0], first[0]);
    assert_eq!(changed[1..], first[1..]);
    // The same parameters written differently are the same limit.
    let respelled =
        ids(&EXAMPLE.replacen(r#"window = "1h", precision = 60"#, r#"window = "60m""#, 1));
    assert_ne!(
        respelled[1], first[1],
        "precision 60 differs from the default 1"
    );
    let respelled = ids(&EXAMPLE.replacen(
        r#"window = "1h", precision = 60"#,
        r#"window = "60m", precision = 60"#,
        1,
    ));
    assert_eq!(respelled, first);
    // A new number on the same grid is the same limit: counts carry over.
    let lowered = ids(&EXAMPLE.replacen("limit = 1000,", "limit = 500,", 1));
    assert_eq!(lowered, first, "lowering a limit keeps its id");
    let raised = ids(&EXAMPLE.replacen("limit = 1000,", "limit = 5000,", 1));
    assert_eq!(raised, first, "raising a limit keeps its id");
    // A new algorithm reads counts differently: a new id.
    let refixed = ids(&EXAMPLE.replacen(
        r#"{ algorithm = "sliding_window", limit = 10, window = "1s" }"#,
        r#"{ algorithm = "fixed_window", limit = 10, window = "1s" }"#,
        1,
    ));
    assert_ne!(refixed[0], first[0]);
    assert_eq!(refixed[1..], first[1..]);
    // Renaming the rule or changing its key makes new counters.
    assert_ne!(
        ids(&EXAMPLE.replace("search-per-user", "search"))[0],
        first[0]
    );
    let rekeyed = EXAMPLE.replace(r#"key = ["user"]"#, r#"key = ["endpoint", "user"]"#);
    assert_ne!(ids(&rekeyed)[0], first[0]);
}

#[test]
fn endpoints_list_refuses_unknown_and_missing_endpoints() {
    let rules = RuleSet::from_toml(EXAMPLE).unwrap();
    let check = |fields: &[(&str, &str)]| rules.check_endpoint(&Descriptors::new(fields).unwrap());
    assert_eq!(check(&[("endpoint", "/v1/search")]), Ok(()));
    assert_eq!(check(&[("endpoint", "/v1/items/42")]), Ok(()));
    let unknown = check(&[("endpoint", "/v1/items")]).unwrap_err();
    assert_eq!(unknown.endpoint(), Some("/v1/items"));
    // The refusal says where the list is and what to change.
    let line = EXAMPLE
        .lines()
        .position(|l| l.starts_with("endpoints = "))
        .unwrap()
        + 1;
    assert_eq!(
        unknown.to_string(),
        format!(
            "unknown endpoint \"/v1/items\": the rules file's `endpoints` allow-list \
             (line {line}) does not name it; add it to that list, or remove the list to serve \
             any endpoint"
        )
    );
    let missing = check(&[("user", "alice")]).unwrap_err();
    assert_eq!(missing.endpoint(), None);
    let said = missing.to_string();
    assert!(said.contains("no `endpoint`"), "{said}");
    assert!(said.contains(&format!("(line {line})")), "{said}");
    assert!(said.contains("remove the list"), "{said}");

    let open = RuleSet::from_toml("[[rules]]\nname = 'r'\nmatch = {}\nlimits = [{ algorithm = 'gcra', limit = 1, per = '1s' }]").unwrap();
    assert_eq!(
        open.check_endpoint(&Descriptors::new(&[("user", "a")]).unwrap()),
        Ok(())
    );
}

#[test]
fn empty_rule_set_limits_nothing() {
    let rules = RuleSet::empty();
    let d = [("user", "a"), ("endpoint", "/x")];
    let d = Descriptors::new(&d).unwrap();
    let mut n = 0;
    rules.for_each_match(&d, |_| n += 1);
    assert_eq!(n, 0);
    assert_eq!(rules.check_endpoint(&d), Ok(()));
    assert_eq!(rules.source(), "");
    assert_eq!(rules.digest(), stable_digest(b""));
    assert!(rules.limits().is_empty());
    // A file without rules is as empty.
    assert!(RuleSet::from_toml("").unwrap().limits().is_empty());
}

#[test]
fn deployed_example_parses() {
    let text = include_str!("../../../deploy/rules.example.toml");
    let rules = RuleSet::from_toml(text).unwrap();
    // Every limit entry was built, and every algorithm has one.
    let entries = text
        .lines()
        .filter(|l| l.trim_start().starts_with("{ algorithm"))
        .count();
    assert_eq!(rules.limits().len(), entries);
    let mut names: Vec<_> = rules.limits().iter().map(|l| l.algorithm.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "fixed_window",
            "gcra",
            "leaky_bucket",
            "sliding_window",
            "token_bucket"
        ]
    );
    for name in [
        "sliding_window",
        "fixed_window",
        "token_bucket",
        "leaky_bucket",
        "gcra",
    ] {
        let entry = format!("{{ algorithm = \"{name}\"");
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(&entry)),
            "{name} missing"
        );
    }
    assert!(rules
        .limits()
        .iter()
        .any(|l| l.scope == Scope::Tier("free".into())));
    assert!(rules
        .limits()
        .iter()
        .any(|l| l.scope == Scope::Tier("paid".into())));
    assert!(rules
        .limits()
        .iter()
        .any(|l| matches!(l.scope, Scope::Override(_))));
    let d = [("endpoint", "/nowhere")];
    assert!(rules
        .check_endpoint(&Descriptors::new(&d).unwrap())
        .is_err());
}

#[test]
fn rule_sets_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RuleSet>();
    assert_send_sync::<UnknownEndpoint>();
    assert_send_sync::<RulesError>();
}
