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

mod diff;
mod dispatch;
mod error;
mod limit;
mod matching;
mod parse;
pub mod request;

use std::fmt;
use std::ops::Range;

pub use diff::RulesDiff;
pub use error::{RulesError, RulesErrorKind};
pub use matching::PatternError;

use crate::algorithm::Algorithm;
use crate::descriptor::{Descriptors, ENDPOINT, TIER};
use crate::key::{stable_digest, LimitId};
use dispatch::Dispatch;
use matching::{EndpointList, Matcher};

/// Most rules in one file.
pub const MAX_RULES: usize = 10_000;
/// Most limits in one list (a rule's defaults, a tier or an override).
pub const MAX_LIMITS_PER_LIST: usize = 16;
/// Most overrides in one rule: a per-customer quota table. Overrides that
/// count on the rule's own grid share its counters and key tables, so an
/// override costs its matcher and its numbers, not a table.
pub const MAX_OVERRIDES_PER_RULE: usize = 100_000;
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
    name: String,
    matcher: Matcher,
    key_fields: Vec<String>,
    /// Requests this rule matches are limited by nothing.
    unlimited: bool,
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
    pub id: LimitId,
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
    /// Shadow mode: the limit counts and reports what it would deny, but
    /// never denies.
    pub shadow: bool,
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
    /// The rule is `unlimited`: the request is limited by nothing.
    pub unlimited: bool,
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
#[error("{}", describe_endpoint(.endpoint.as_deref(), *.line))]
pub struct UnknownEndpoint {
    endpoint: Option<String>,
    line: u32,
}

/// The refusal in words a first-time user can act on: what the request
/// lacked, where the allow-list is, and the two ways out.
fn describe_endpoint(endpoint: Option<&str>, line: u32) -> String {
    let list = format!("the rules file's `endpoints` allow-list (line {line})");
    match endpoint {
        Some(e) => format!(
            "unknown endpoint {e:?}: {list} does not name it; add it to that list, \
             or remove the list to serve any endpoint"
        ),
        None => format!(
            "the request has no `{ENDPOINT}` descriptor, and {list} serves only the \
             endpoints it names: send an `{ENDPOINT}`, or remove the list to serve any request"
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

    /// Heap bytes this rule set holds: its text, rules, matchers, limits
    /// and lookup maps (the key tables its limits count in are not part of
    /// it). An estimate from the capacities of what it allocated; a custom
    /// algorithm's own state is not counted.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let strings = |v: &[String]| v.iter().map(String::capacity).sum::<usize>();
        let rules: usize = self
            .rules
            .iter()
            .map(|r| {
                r.name.capacity()
                    + r.matcher.heap_bytes()
                    + r.key_fields.capacity() * size_of::<String>()
                    + strings(&r.key_fields)
                    + r.tiers.capacity() * size_of::<(String, Range<usize>)>()
                    + r.tiers.iter().map(|(n, _)| n.capacity()).sum::<usize>()
                    + r.overrides.capacity() * size_of::<(Matcher, Range<usize>)>()
                    + r.overrides
                        .iter()
                        .map(|(m, _)| m.heap_bytes())
                        .sum::<usize>()
                    + r.override_dispatch.heap_bytes()
            })
            .sum();
        let limits: usize = self
            .limits
            .iter()
            .map(|l| {
                l.parameters.capacity()
                    + l.rule.capacity()
                    + match &l.scope {
                        Scope::Tier(name) => name.capacity(),
                        _ => 0,
                    }
            })
            .sum();
        self.source.capacity()
            + self.rules.capacity() * size_of::<CompiledRule>()
            + rules
            + self.limits.capacity() * size_of::<CompiledLimit>()
            + limits
            + self.dispatch.heap_bytes()
            + self.endpoints.as_ref().map_or(0, EndpointList::heap_bytes)
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
    #[inline]
    pub fn check_endpoint(&self, d: &Descriptors<'_>) -> Result<(), UnknownEndpoint> {
        let Some(list) = &self.endpoints else {
            return Ok(());
        };
        match d.get(ENDPOINT) {
            Some(e) if list.admits(e) => Ok(()),
            endpoint => Err(UnknownEndpoint {
                endpoint: endpoint.map(str::to_owned),
                line: list.line,
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
                    unlimited: rule.unlimited,
                });
            }
            true
        });
    }

    /// The list of `rule` that applies to `d` (which fits the rule).
    #[inline]
    fn chosen(&self, rule: &CompiledRule, d: &Descriptors<'_>) -> Range<usize> {
        if rule.overrides.is_empty() && rule.tiers.is_empty() {
            return rule.default.clone();
        }
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
mod tests;
