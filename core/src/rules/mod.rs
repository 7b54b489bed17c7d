//! Rules: which limits apply to a request, read once from a TOML file.
//!
//! A [`RuleSet`] is parsed whole from text ([`RuleSet::from_toml`]) and is
//! immutable afterwards; a reload builds a new one and swaps it in. Once built
//! it is valid: every pattern, key field and algorithm was checked at load, so
//! the per-request path ([`RuleSet::for_each_match`]) only compares strings,
//! never fails and never allocates.
//!
//! # The file
//!
//! ```toml
//! endpoints = ["/v1/search", "/v1/items/*"]   # optional allow-list of `endpoint`s
//!
//! [[rules]]
//! name = "search-per-user"
//! match = { endpoint = "/v1/search", user = "*" }
//! key = ["user"]                # default: the fields of `match`, sorted by name
//! limits = [ { algorithm = "sliding_window", limit = 10, window = "1s" } ]
//!
//! [rules.tiers.paid]            # for requests whose `tier` is "paid"
//! limits = [ { algorithm = "sliding_window", limit = 100, window = "1s" } ]
//!
//! [[rules.overrides]]           # first fitting override wins over tiers
//! match = { user = "alice" }
//! limits = [ { algorithm = "token_bucket", capacity = 50, refill = 50, per = "1s" } ]
//! ```
//!
//! A rule may name a rate limit domain (`domain = "edge"`, beside `name`):
//! it is shorthand for `domain = "edge"` in its `match`, so the rule applies
//! only to requests whose `domain` field is `edge` (the gRPC API puts Envoy's
//! RLS `domain` there; HTTP clients may send the field too). A rule without
//! a domain applies to requests of every domain, and to those with none.
//!
//! Patterns are `"*"` (present, any value), `"abc*"` (starts with `abc`) or an
//! exact value. Every field named in `key` must also be named in `match` (use
//! `"*"` to require it), so a counted request always carries its key values.
//! `deploy/rules.example.toml` shows every algorithm and its fields.
//!
//! # Which limits apply
//!
//! Every rule whose `match` fits contributes the limits of exactly one of its
//! lists, and every one of them must allow the request:
//!
//! 1. the first override whose `match` fits, else
//! 2. the tier named by the request's `tier` field, if the rule has it, else
//! 3. the rule's own `limits`.
//!
//! A rule that has tiers but no `limits` of its own therefore limits nothing
//! for requests with no `tier` or a tier it does not list: list a default if
//! such requests must be limited too.

mod dispatch;
mod error;
mod limit;
mod matching;
mod parse;

use std::fmt;
use std::ops::Range;

pub use error::{RulesError, RulesErrorKind};
pub use matching::PatternError;

use crate::algorithm::Algorithm;
use crate::descriptor::{Descriptors, ENDPOINT, TIER};
use crate::key::stable_digest;
use dispatch::Dispatch;
use matching::{EndpointList, Matcher};

/// Most rules in one file.
pub const MAX_RULES: usize = 10_000;
/// Most limits in one list (a rule's defaults, a tier or an override).
pub const MAX_LIMITS_PER_LIST: usize = 16;
/// Most overrides in one rule.
pub const MAX_OVERRIDES_PER_RULE: usize = 1_000;
/// Longest rule name.
pub const MAX_RULE_NAME_LEN: usize = 64;

/// A parsed, checked set of rules. Immutable; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RuleSet {
    source: String,
    digest: u64,
    endpoints: Option<EndpointList>,
    rules: Vec<CompiledRule>,
    /// The rules' matchers filed for lookup (see `dispatch`).
    dispatch: Dispatch,
    limits: Vec<CompiledLimit>,
}

/// One rule, with its limit lists as ranges of [`RuleSet::limits`].
#[derive(Debug)]
struct CompiledRule {
    matcher: Matcher,
    key_fields: Vec<String>,
    default: Range<usize>,
    /// Sorted by tier name, for binary search.
    tiers: Vec<(String, Range<usize>)>,
    overrides: Vec<(Matcher, Range<usize>)>,
    /// The overrides' matchers filed for lookup.
    override_dispatch: Dispatch,
}

/// Which list of its rule a limit belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The rule's own `limits`.
    Default,
    /// `rules.tiers.<name>`.
    Tier(String),
    /// `rules.overrides[i]`.
    Override(usize),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Default => f.write_str("default"),
            Scope::Tier(name) => write!(f, "tier {name:?}"),
            Scope::Override(i) => write!(f, "override {i}"),
        }
    }
}

/// One limit of one list of one rule.
#[derive(Debug)]
pub struct CompiledLimit {
    /// Digest of the rule name, the scope, the position in its list, the key
    /// fields, the algorithm kind and its bucket grid (window, precision or
    /// granularity), *not* its numbers. A reload that lowers or raises a
    /// limit, a capacity or a rate on the same grid keeps the id, and so the
    /// counts clients already spent; a new window or algorithm (whose counts
    /// would read differently) gives a new id and starts counts over.
    pub id: u64,
    /// The parameters with defaults filled in and durations in nanoseconds.
    pub parameters: String,
    /// Position in [`RuleSet::limits`].
    pub index: usize,
    /// Name of the rule the limit belongs to.
    pub rule: String,
    /// The same name, interned: what a decision reports.
    pub rule_name: RuleName,
    /// Which requests share a counter.
    pub scope: Scope,
    /// The algorithm and its parameters.
    pub algorithm: Algorithm,
}

/// A rule's name, interned for the life of the process: a decision names
/// its rule by this, a copy of one pointer, with no reference count to
/// touch on the decision path and nothing to look up (by index, which a
/// reload could make stale) afterwards. Interning keeps one copy of each
/// distinct name ever loaded (at most [`MAX_RULE_NAME_LEN`] bytes each).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleName(&'static str);

impl RuleName {
    /// The interned copy of `name`.
    pub fn intern(name: &str) -> RuleName {
        use std::collections::HashSet;
        use std::sync::{Mutex, OnceLock};
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(&known) = names.get(name) {
            return RuleName(known);
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.insert(leaked);
        RuleName(leaked)
    }

    /// A name known at compile time, without interning.
    pub const fn from_static(name: &'static str) -> RuleName {
        RuleName(name)
    }

    /// The name.
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Debug for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The limits one rule applies to a request, with the descriptor fields
/// whose values pick their counters: the same fields for every limit of the
/// rule, so the key material is hashed once per rule.
#[derive(Clone, Copy, Debug)]
pub struct RuleMatch<'s> {
    /// The rule's limits, in rule order.
    pub limits: &'s [CompiledLimit],
    /// The descriptor fields that pick the counter.
    pub key_fields: &'s [String],
}

/// A limit that applies to a request, with the descriptor fields whose
/// values pick its counter. Every key field is present in the request (the
/// rule's `match` requires it).
#[derive(Clone, Copy, Debug)]
pub struct LimitMatch<'s> {
    /// The limit.
    pub limit: &'s CompiledLimit,
    /// The descriptor fields that pick its counter.
    pub key_fields: &'s [String],
}

/// The request's endpoint is not in the `endpoints` list, or it named none.
/// A client error: nothing was counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_endpoint(.endpoint.as_deref()))]
pub struct UnknownEndpoint {
    endpoint: Option<String>,
}

fn describe_endpoint(endpoint: Option<&str>) -> String {
    match endpoint {
        Some(e) => format!("unknown endpoint {e:?}"),
        None => format!(
            "the request has no `{ENDPOINT}` descriptor, and only listed endpoints are served"
        ),
    }
}

impl UnknownEndpoint {
    /// The refused endpoint; `None` when the request carried none.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }
}

impl RuleSet {
    /// Parses and checks a whole rule file. On error nothing is built.
    pub fn from_toml(text: &str) -> Result<RuleSet, RulesError> {
        let parsed = parse::compile(text)?;
        Ok(RuleSet {
            source: text.to_owned(),
            digest: stable_digest(text.as_bytes()),
            endpoints: parsed.endpoints,
            dispatch: Dispatch::new(parsed.rules.iter().map(|r| &r.matcher)),
            rules: parsed.rules,
            limits: parsed.limits,
        })
    }

    /// No rules and no endpoint list: every request is allowed.
    pub fn empty() -> RuleSet {
        RuleSet {
            source: String::new(),
            digest: stable_digest(b""),
            endpoints: None,
            rules: Vec::new(),
            dispatch: Dispatch::default(),
            limits: Vec::new(),
        }
    }

    /// The text this set was parsed from (`""` for [`RuleSet::empty`]).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// [`stable_digest`] of [`RuleSet::source`]: nodes compare digests to
    /// see whether they run the same rules.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Every limit of every rule, rule by rule in file order; within a rule
    /// its defaults, then its tiers by name, then its overrides in order.
    pub fn limits(&self) -> &[CompiledLimit] {
        &self.limits
    }

    /// Refuses requests for endpoints outside the `endpoints` list; admits
    /// everything when the file has no such list.
    pub fn check_endpoint(&self, d: &Descriptors<'_>) -> Result<(), UnknownEndpoint> {
        let Some(list) = &self.endpoints else {
            return Ok(());
        };
        match d.get(ENDPOINT) {
            Some(e) if list.admits(e) => Ok(()),
            endpoint => Err(UnknownEndpoint {
                endpoint: endpoint.map(str::to_owned),
            }),
        }
    }

    /// Calls `f` once for each limit that applies to `d`, in the order of
    /// [`RuleSet::limits`]. Never allocates: this runs on every request.
    pub fn for_each_match<'s>(&'s self, d: &Descriptors<'_>, mut f: impl FnMut(LimitMatch<'s>)) {
        self.for_each_rule_match(d, |m| {
            for limit in m.limits {
                f(LimitMatch {
                    limit,
                    key_fields: m.key_fields,
                });
            }
        });
    }

    /// Calls `f` once for each rule that applies to `d`, with the limits of
    /// the list it chose, in the order of [`RuleSet::limits`]. Only the
    /// rules filed where `d` can fit are tried (see `dispatch`): the work
    /// does not grow with the number of rules keyed on exact values.
    /// Allocates only when more than 16 rules are candidates at once.
    pub fn for_each_rule_match<'s>(
        &'s self,
        d: &Descriptors<'_>,
        mut f: impl FnMut(RuleMatch<'s>),
    ) {
        self.dispatch.candidates(d, |i, proven| {
            let rule = &self.rules[i];
            if proven || rule.matcher.matches(d) {
                f(RuleMatch {
                    limits: &self.limits[self.chosen(rule, d)],
                    key_fields: &rule.key_fields,
                });
            }
            true
        });
    }

    /// The list of `rule` that applies to `d` (which fits the rule).
    fn chosen(&self, rule: &CompiledRule, d: &Descriptors<'_>) -> Range<usize> {
        let mut chosen = None;
        rule.override_dispatch.candidates(d, |j, proven| {
            let (matcher, range) = &rule.overrides[j];
            if proven || matcher.matches(d) {
                chosen = Some(range.clone());
                return false;
            }
            true
        });
        if let Some(range) = chosen {
            return range;
        }
        d.get(TIER)
            .and_then(|tier| {
                let i = rule
                    .tiers
                    .binary_search_by(|(name, _)| name.as_str().cmp(tier))
                    .ok()?;
                Some(rule.tiers[i].1.clone())
            })
            .unwrap_or_else(|| rule.default.clone())
    }

    /// The limits that apply to `d` found by trying every rule and every
    /// override in turn: what the dispatch must agree with.
    #[cfg(test)]
    fn matches_one_by_one(&self, d: &Descriptors<'_>) -> Vec<usize> {
        let mut out = Vec::new();
        for rule in &self.rules {
            if !rule.matcher.matches(d) {
                continue;
            }
            let chosen = rule
                .overrides
                .iter()
                .find(|(matcher, _)| matcher.matches(d))
                .map(|(_, range)| range)
                .or_else(|| {
                    let tier = d.get(TIER)?;
                    let i = rule
                        .tiers
                        .binary_search_by(|(name, _)| name.as_str().cmp(tier))
                        .ok()?;
                    Some(&rule.tiers[i].1)
                })
                .unwrap_or(&rule.default);
            out.extend(chosen.clone());
        }
        out
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

#[cfg(test)]
mod tests {
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
                .map(|l| l.id)
                .collect()
        };
        let first = ids(EXAMPLE);
        assert_eq!(first, ids(EXAMPLE));
        let mut unique = first.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), first.len(), "ids must differ between limits");

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
        let check =
            |fields: &[(&str, &str)]| rules.check_endpoint(&Descriptors::new(fields).unwrap());
        assert_eq!(check(&[("endpoint", "/v1/search")]), Ok(()));
        assert_eq!(check(&[("endpoint", "/v1/items/42")]), Ok(()));
        let unknown = check(&[("endpoint", "/v1/items")]).unwrap_err();
        assert_eq!(unknown.endpoint(), Some("/v1/items"));
        assert_eq!(unknown.to_string(), r#"unknown endpoint "/v1/items""#);
        let missing = check(&[("user", "alice")]).unwrap_err();
        assert_eq!(missing.endpoint(), None);
        assert!(missing.to_string().contains("no `endpoint`"), "{missing}");

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
}
