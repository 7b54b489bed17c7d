//! Field patterns: how a rule, an override or the endpoint list decides that a
//! request is theirs.
//!
//! A pattern is parsed once, when the rule file is loaded; matching is then a
//! comparison of borrowed strings and never allocates, because it runs on
//! every request.

use crate::descriptor::{self, DescriptorError, Descriptors, MAX_VALUE_LEN};

/// Why a pattern string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("an empty pattern matches nothing: use \"*\" for any value")]
    /// The pattern is empty.
    Empty,
    #[error("pattern is {len} bytes long, but descriptor values stop at {MAX_VALUE_LEN}, so it could never match")]
    /// The pattern is longer than any descriptor value can be.
    TooLong {
        /// The pattern's length in bytes.
        len: usize,
    },
    #[error("pattern contains a control character, which descriptor values never do")]
    /// The pattern has a control character.
    ControlCharacter,
}

/// One field pattern: `"*"`, `"prefix*"` or an exact value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Pattern {
    /// The field must be present, with any value.
    Any,
    /// The value starts with this (non-empty) text.
    Prefix(String),
    Exact(String),
}

impl Pattern {
    pub(super) fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text == "*" {
            return Ok(Pattern::Any);
        }
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.is_empty() {
            return Err(PatternError::Empty);
        }
        // A pattern that no valid descriptor value could satisfy is a typo;
        // refusing it here beats a rule that silently never applies.
        match descriptor::value_from_bytes("pattern", body.as_bytes()) {
            Ok(_) => {}
            Err(DescriptorError::TooLong { len, .. }) => return Err(PatternError::TooLong { len }),
            Err(_) => return Err(PatternError::ControlCharacter),
        }
        Ok(if prefix {
            Pattern::Prefix(body.to_owned())
        } else {
            Pattern::Exact(body.to_owned())
        })
    }

    /// Heap bytes this pattern holds.
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Pattern::Any => 0,
            Pattern::Prefix(t) | Pattern::Exact(t) => t.capacity(),
        }
    }

    pub(super) fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Exact(e) => value == e,
        }
    }
}

/// A descriptor field name, checked against the descriptor naming rule.
pub(super) fn check_field_name(name: &str) -> Result<(), DescriptorError> {
    // `descriptor` owns the naming rule; asking it through a one-field set
    // keeps a single definition instead of a copy that could drift.
    Descriptors::new(&[(name, "x")]).map(|_| ())
}

/// All `field = pattern` pairs of one `match` table; every one must hold.
/// An empty matcher matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Matcher {
    /// Sorted by field name, each name once.
    fields: Vec<(String, Pattern)>,
}

impl Matcher {
    /// `fields` must be sorted by name without repeats (a TOML table is).
    pub(super) fn new(fields: Vec<(String, Pattern)>) -> Matcher {
        debug_assert!(fields.windows(2).all(|w| w[0].0 < w[1].0));
        Matcher { fields }
    }

    pub(super) fn matches(&self, d: &Descriptors<'_>) -> bool {
        self.fields
            .iter()
            .all(|(name, pattern)| d.get(name).is_some_and(|v| pattern.matches(v)))
    }

    /// Adds `name = pattern`, keeping the fields sorted. `None` if the
    /// matcher already names the field.
    pub(super) fn with_field(mut self, name: &str, pattern: Pattern) -> Option<Matcher> {
        match self.fields.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(_) => None,
            Err(at) => {
                self.fields.insert(at, (name.to_owned(), pattern));
                Some(self)
            }
        }
    }

    /// Every `(field, pattern)`, sorted by field name.
    pub(super) fn fields(&self) -> impl Iterator<Item = (&str, &Pattern)> {
        self.fields.iter().map(|(n, p)| (n.as_str(), p))
    }

    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_str())
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _)| n == name)
    }

    /// Heap bytes this matcher holds (see `RuleSet::heap_bytes`).
    pub(super) fn heap_bytes(&self) -> usize {
        self.fields.capacity() * std::mem::size_of::<(String, Pattern)>()
            + self
                .fields
                .iter()
                .map(|(n, p)| n.capacity() + p.heap_bytes())
                .sum::<usize>()
    }
}

/// The `endpoints` list: a request's `endpoint` must fit one of them.
/// Exact endpoints are looked up in a hash set, so a long list of them
/// costs one lookup; prefixes are tried in turn.
#[derive(Clone, Debug)]
pub(super) struct EndpointList {
    /// The line of the rules text where the list is written, for refusals
    /// that tell what to change.
    pub(super) line: u32,
    any: bool,
    exact: std::collections::HashSet<Box<str>, rapidhash::fast::RandomState>,
    prefixes: Vec<String>,
}

impl EndpointList {
    pub(super) fn new(patterns: Vec<Pattern>, line: u32) -> EndpointList {
        let mut list = EndpointList {
            line,
            any: false,
            exact: Default::default(),
            prefixes: Vec::new(),
        };
        for p in patterns {
            match p {
                Pattern::Any => list.any = true,
                Pattern::Exact(e) => {
                    list.exact.insert(e.into());
                }
                Pattern::Prefix(p) => list.prefixes.push(p),
            }
        }
        list
    }

    /// Heap bytes this list holds (a hash set slot is the boxed text and a
    /// control byte).
    pub(super) fn heap_bytes(&self) -> usize {
        self.exact.capacity() * (std::mem::size_of::<Box<str>>() + 1)
            + self.exact.iter().map(|e| e.len()).sum::<usize>()
            + self.prefixes.capacity() * std::mem::size_of::<String>()
            + self.prefixes.iter().map(String::capacity).sum::<usize>()
    }

    pub(super) fn admits(&self, endpoint: &str) -> bool {
        self.any
            || self.exact.contains(endpoint)
            || self
                .prefixes
                .iter()
                .any(|p| endpoint.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_pattern_forms() {
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Any));
        assert_eq!(Pattern::parse("/v1/*"), Ok(Pattern::Prefix("/v1/".into())));
        assert_eq!(Pattern::parse("alice"), Ok(Pattern::Exact("alice".into())));
        // A star elsewhere is literal text.
        assert_eq!(Pattern::parse("a*b"), Ok(Pattern::Exact("a*b".into())));
    }

    #[test]
    fn refuses_patterns_that_could_never_match() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("**"), Ok(Pattern::Prefix("*".into())));
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            Pattern::parse(&long),
            Err(PatternError::TooLong {
                len: MAX_VALUE_LEN + 1
            })
        );
        assert_eq!(Pattern::parse("a\tb*"), Err(PatternError::ControlCharacter));
    }

    #[test]
    fn matches_values() {
        let any = Pattern::Any;
        let prefix = Pattern::parse("/v1/items/*").unwrap();
        let exact = Pattern::parse("/v1/search").unwrap();
        assert!(any.matches("whatever"));
        assert!(prefix.matches("/v1/items/42"));
        assert!(prefix.matches("/v1/items/"));
        assert!(!prefix.matches("/v1/items"));
        assert!(exact.matches("/v1/search"));
        assert!(!exact.matches("/v1/search/x"));
    }

    #[test]
    fn matcher_needs_every_field() {
        let m = Matcher::new(vec![
            ("endpoint".into(), Pattern::parse("/v1/*").unwrap()),
            ("user".into(), Pattern::Any),
        ]);
        let both = [("user", "bob"), ("endpoint", "/v1/x")];
        let no_user = [("endpoint", "/v1/x")];
        let wrong = [("user", "bob"), ("endpoint", "/v2/x")];
        assert!(m.matches(&Descriptors::new(&both).unwrap()));
        assert!(!m.matches(&Descriptors::new(&no_user).unwrap()));
        assert!(!m.matches(&Descriptors::new(&wrong).unwrap()));
        assert!(Matcher::default().matches(&Descriptors::new(&no_user).unwrap()));
    }

    #[test]
    fn field_names_follow_descriptor_rules() {
        assert!(check_field_name("api_key").is_ok());
        assert!(check_field_name("User").is_err());
        assert!(check_field_name("").is_err());
        assert!(check_field_name(&"a".repeat(65)).is_err());
    }
}
