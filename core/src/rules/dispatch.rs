//! Which matchers a request could fit, found without trying each one.
//!
//! A [`Dispatch`] files every matcher of a list (the rules of a file, the
//! overrides of a rule) under one of its fields, chosen when the rules are
//! loaded:
//!
//! * a field with an exact pattern (`endpoint = "/v1/search"`) files it under
//!   that value: a request reaches it through one hash lookup of its own
//!   value, whatever the number of rules;
//! * otherwise a field with a prefix, else a wildcard (`user = "*"`), files
//!   it under that field's name: every request carrying the field tries it;
//! * a matcher with no field (`match = {}`) is tried by every request.
//!
//! The candidates are then checked in full ([`Matcher::matches`]) in list
//! order, so the answer is exactly that of trying every matcher in turn:
//! filing only skips matchers whose filed field cannot fit. The work per
//! request is a few string comparisons per descriptor field (against the
//! distinct field names filed on), one hash per exact-filed field present,
//! and the candidates themselves; only prefix and wildcard matchers on one
//! field name are tried one by one.

use std::collections::HashMap;

use rapidhash::fast::RandomState;
use smallvec::SmallVec;

use super::matching::{Matcher, Pattern};
use crate::descriptor::Descriptors;

/// Candidates inline before a lookup spills to the heap.
const INLINE_CANDIDATES: usize = 16;

/// Set on a filed position when finding it already proves the match: the
/// matcher has no field but the one it is filed under, with a wildcard or
/// the exact value looked up. The caller then skips the full check.
pub(super) const PROVEN: u32 = 1 << 31;

/// Matchers filed by field (see the module docs). Positions are those of
/// the list the dispatch was built from.
#[derive(Debug, Default)]
pub(super) struct Dispatch {
    fields: Vec<FieldFiling>,
    /// Matchers with no field: candidates for every request.
    always: Vec<u32>,
    /// Number of matchers filed.
    len: usize,
}

/// The matchers filed under one field name.
#[derive(Debug)]
struct FieldFiling {
    name: Box<str>,
    /// Filed under an exact value of the field.
    exact: HashMap<Box<str>, Vec<u32>, RandomState>,
    /// Filed under the field's presence (a prefix or wildcard pattern).
    present: Vec<u32>,
}

impl Dispatch {
    /// Files `matchers` (in list order).
    pub(super) fn new<'m>(matchers: impl IntoIterator<Item = &'m Matcher>) -> Dispatch {
        let mut dispatch = Dispatch::default();
        for (i, matcher) in matchers.into_iter().enumerate() {
            let i = u32::try_from(i)
                .ok()
                .filter(|&i| i < PROVEN)
                .expect("lists are far shorter than 2^31");
            dispatch.len += 1;
            let exact = matcher.fields().find_map(|(name, p)| match p {
                Pattern::Exact(v) => Some((name, v.as_str())),
                _ => None,
            });
            let sole = matcher.fields().count() == 1;
            if let Some((name, value)) = exact {
                dispatch
                    .filing(name)
                    .exact
                    .entry(value.into())
                    .or_default()
                    .push(if sole { i | PROVEN } else { i });
                continue;
            }
            let present = matcher
                .fields()
                .find(|(_, p)| matches!(p, Pattern::Prefix(_)))
                .or_else(|| matcher.fields().next());
            match present {
                Some((name, p)) => {
                    let proven = sole && *p == Pattern::Any;
                    dispatch
                        .filing(name)
                        .present
                        .push(if proven { i | PROVEN } else { i });
                }
                None => dispatch.always.push(i | PROVEN),
            }
        }
        dispatch
    }

    /// Heap bytes this dispatch holds (a hash map slot is its key, its
    /// list and a control byte).
    pub(super) fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Box<str>, Vec<u32>)>() + 1;
        self.fields.capacity() * std::mem::size_of::<FieldFiling>()
            + self
                .fields
                .iter()
                .map(|f| {
                    f.name.len()
                        + f.exact.capacity() * slot
                        + f.exact
                            .iter()
                            .map(|(k, v)| k.len() + v.capacity() * 4)
                            .sum::<usize>()
                        + f.present.capacity() * 4
                })
                .sum::<usize>()
            + self.always.capacity() * 4
    }

    fn filing(&mut self, name: &str) -> &mut FieldFiling {
        let at = match self.fields.iter().position(|f| short_eq(&f.name, name)) {
            Some(at) => at,
            None => {
                self.fields.push(FieldFiling {
                    name: name.into(),
                    exact: HashMap::default(),
                    present: Vec::new(),
                });
                self.fields.len() - 1
            }
        };
        &mut self.fields[at]
    }

    /// Calls `f` with the position of every matcher filed where `d` could
    /// fit, in ascending order, until `f` returns `false`; with it, whether
    /// the match is already proven (else the caller checks it in full).
    #[inline]
    pub(super) fn candidates(&self, d: &Descriptors<'_>, mut f: impl FnMut(usize, bool) -> bool) {
        if self.len == 0 {
            return;
        }
        // The lists the request reaches, each already in list order: one
        // list (the common case: one rule filed under one field) is walked
        // as it is; several are merged and sorted.
        let mut lists: SmallVec<[&[u32]; 4]> = SmallVec::new();
        if !self.always.is_empty() {
            lists.push(&self.always);
        }
        for (name, value) in d.iter() {
            let Some(filing) = self.fields.iter().find(|f| short_eq(&f.name, name)) else {
                continue;
            };
            if !filing.present.is_empty() {
                lists.push(&filing.present);
            }
            if !filing.exact.is_empty() {
                if let Some(list) = filing.exact.get(value) {
                    lists.push(list);
                }
            }
        }
        match lists.as_slice() {
            [] => {}
            [one] => walk(one, &mut f),
            several => {
                let mut found = Candidates::new();
                for list in several {
                    found.extend(list);
                }
                found.sort();
                walk(found.as_slice(), &mut f);
            }
        }
    }
}

/// Calls `f` with each filed position of `list` until it returns `false`.
#[inline]
fn walk(list: &[u32], f: &mut impl FnMut(usize, bool) -> bool) {
    for &i in list {
        if !f((i & !PROVEN) as usize, i & PROVEN != 0) {
            return;
        }
    }
}

/// String equality without a call into `memcmp`: field names are short.
#[inline]
pub(crate) fn short_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// A list of matcher positions on the stack for the common case.
struct Candidates {
    inline: [u32; INLINE_CANDIDATES],
    len: usize,
    spill: Vec<u32>,
}

impl Candidates {
    fn new() -> Self {
        Candidates {
            inline: [0; INLINE_CANDIDATES],
            len: 0,
            spill: Vec::new(),
        }
    }

    #[inline]
    fn extend(&mut self, items: &[u32]) {
        if items.is_empty() {
            return;
        }
        if self.spill.is_empty() && self.len + items.len() <= INLINE_CANDIDATES {
            for &i in items {
                self.inline[self.len] = i;
                self.len += 1;
            }
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline[..self.len]);
            }
            self.spill.extend_from_slice(items);
        }
    }

    fn as_slice(&self) -> &[u32] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    #[inline]
    fn sort(&mut self) {
        // Each matcher is filed once, so there are no repeats to remove.
        let by_position = |i: &u32| i & !PROVEN;
        if self.spill.is_empty() {
            if self.len > 1 {
                self.inline[..self.len].sort_unstable_by_key(by_position);
            }
        } else {
            self.spill.sort_unstable_by_key(by_position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(fields: &[(&str, &str)]) -> Matcher {
        let mut fields: Vec<(String, Pattern)> = fields
            .iter()
            .map(|(n, p)| ((*n).to_owned(), Pattern::parse(p).unwrap()))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Matcher::new(fields)
    }

    fn candidates(dispatch: &Dispatch, fields: &[(&str, &str)]) -> Vec<usize> {
        let d = Descriptors::new(fields).unwrap();
        let mut out = Vec::new();
        dispatch.candidates(&d, |i, _| {
            out.push(i);
            true
        });
        out
    }

    #[test]
    fn files_by_exact_value_then_by_presence() {
        let matchers = [
            matcher(&[("endpoint", "/a"), ("user", "*")]),
            matcher(&[("user", "*")]),
            matcher(&[]),
            matcher(&[("endpoint", "/b")]),
            matcher(&[("endpoint", "/v1/*")]),
        ];
        let dispatch = Dispatch::new(&matchers);
        assert_eq!(
            candidates(&dispatch, &[("endpoint", "/a"), ("user", "u")]),
            // 4 is a candidate (filed under `endpoint`), not a match.
            [0, 1, 2, 4]
        );
        assert_eq!(candidates(&dispatch, &[("endpoint", "/b")]), [2, 3, 4]);
        assert_eq!(candidates(&dispatch, &[("endpoint", "/v1/x")]), [2, 4]);
        assert_eq!(candidates(&dispatch, &[("ip", "1")]), [2]);
    }

    #[test]
    fn a_thousand_exact_rules_give_one_candidate() {
        let names: Vec<String> = (0..1000).map(|i| format!("/e/{i}")).collect();
        let matchers: Vec<Matcher> = names
            .iter()
            .map(|n| matcher(&[("endpoint", n), ("user", "*")]))
            .collect();
        let dispatch = Dispatch::new(&matchers);
        assert_eq!(
            candidates(&dispatch, &[("endpoint", "/e/517"), ("user", "u")]),
            [517]
        );
        assert!(candidates(&dispatch, &[("endpoint", "/none")]).is_empty());
    }

    #[test]
    fn many_candidates_spill_and_stay_sorted() {
        let matchers: Vec<Matcher> = (0..40)
            .map(|i| {
                if i % 2 == 0 {
                    matcher(&[("user", "*")])
                } else {
                    matcher(&[("ip", "*")])
                }
            })
            .collect();
        let dispatch = Dispatch::new(&matchers);
        let all = candidates(&dispatch, &[("ip", "1"), ("user", "u")]);
        assert_eq!(all, (0..40).collect::<Vec<_>>());
        // Stopping early.
        let d = [("ip", "1"), ("user", "u")];
        let d = Descriptors::new(&d).unwrap();
        let mut first = None;
        dispatch.candidates(&d, |i, _| {
            first = Some(i);
            false
        });
        assert_eq!(first, Some(0));
    }

    mod against_one_by_one {
        use proptest::prelude::*;

        use crate::descriptor::Descriptors;
        use crate::rules::RuleSet;

        const FIELDS: [&str; 4] = ["endpoint", "ip", "tier", "user"];
        const VALUES: [&str; 5] = ["a", "ab", "b", "/v1/x", "/v1/y"];

        /// A pattern: `*`, a prefix or an exact value.
        fn pattern() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("*".to_owned()),
                prop::sample::select(&["a*", "/v1/*", "/*"][..]).prop_map(str::to_owned),
                prop::sample::select(&VALUES[..]).prop_map(str::to_owned),
            ]
        }

        /// A `match` table: up to three distinct fields.
        fn matcher() -> impl Strategy<Value = String> {
            prop::collection::btree_map(prop::sample::select(&FIELDS[..]), pattern(), 0..3)
                .prop_map(|m| {
                    let body: Vec<String> =
                        m.iter().map(|(f, p)| format!("{f} = \"{p}\"")).collect();
                    format!("{{ {} }}", body.join(", "))
                })
        }

        fn rule_file() -> impl Strategy<Value = String> {
            let rule = (
                matcher(),
                prop::collection::vec(matcher(), 0..4),
                any::<bool>(),
                prop::option::of(prop::sample::select(&["edge", "a"][..])),
            );
            prop::collection::vec(rule, 0..12).prop_map(|rules| {
                let limit = "{ algorithm = \"fixed_window\", limit = 5, window = \"1s\" }";
                let mut text = String::new();
                for (i, (m, overrides, tier, domain)) in rules.iter().enumerate() {
                    text += &format!("[[rules]]\nname = \"r{i}\"\nmatch = {m}\nkey = []\n");
                    if let Some(domain) = domain {
                        // Only where the match does not name `domain`.
                        text += &format!("domain = \"{domain}\"\n");
                    }
                    text += &format!("limits = [ {limit} ]\n");
                    if *tier {
                        text += &format!("[rules.tiers.b]\nlimits = [ {limit} ]\n");
                    }
                    for o in overrides {
                        text +=
                            &format!("[[rules.overrides]]\nmatch = {o}\nlimits = [ {limit} ]\n");
                    }
                }
                text
            })
        }

        fn request() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
            const REQUEST_FIELDS: [&str; 5] = ["domain", "endpoint", "ip", "tier", "user"];
            prop::collection::btree_map(
                prop::sample::select(&REQUEST_FIELDS[..]),
                prop::sample::select(&["a", "ab", "b", "edge", "/v1/x", "/v2/z"][..]),
                1..5,
            )
            .prop_map(|m| m.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn dispatch_matches_exactly_what_trying_every_rule_matches(
                text in rule_file(),
                requests in prop::collection::vec(request(), 1..16),
            ) {
                let rules = RuleSet::from_toml(&text).expect("generated rules parse");
                for fields in &requests {
                    let d = Descriptors::new(fields).unwrap();
                    let mut found = Vec::new();
                    rules.for_each_match(&d, |m| found.push(m.limit.index));
                    prop_assert_eq!(found, rules.matches_one_by_one(&d), "{:?}", fields);
                }
            }
        }
    }
}
