//! Errors of rule files, each pinned to a place in the source.
//!
//! A rule file is written by hand and reloaded in production, so an error must
//! lead straight to the mistake: every [`RulesError`] carries the 1-based line
//! and column, the field path (`rules[2].limits[0].window`) and the reason.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use crate::algorithm::ParamError;
use crate::descriptor::DescriptorError;
use crate::time::DurationError;

use super::matching::PatternError;
use super::{MAX_LIMITS_PER_LIST, MAX_OVERRIDES_PER_RULE, MAX_RULES, MAX_RULE_NAME_LEN};

/// Why a rule file was refused, and where. Nothing was loaded: a running
/// limiter keeps its previous rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind} (line {line}, column {column})", path_prefix(.path))]
pub struct RulesError {
    path: String,
    line: usize,
    column: usize,
    kind: RulesErrorKind,
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl RulesError {
    /// An error about the source bytes `span` of `text`.
    pub(super) fn at(
        text: &str,
        span: Range<usize>,
        path: impl Into<String>,
        kind: RulesErrorKind,
    ) -> Self {
        let (line, column) = line_column(text, span.start);
        RulesError {
            path: path.into(),
            line,
            column,
            kind,
        }
    }

    /// The field path, as `rules[2].limits[0].window`; empty when the file
    /// could not be read as TOML at all.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// 1-based line of the offending text.
    pub fn line(&self) -> usize {
        self.line
    }
    /// 1-based column, in characters.
    pub fn column(&self) -> usize {
        self.column
    }
    /// What is wrong, for callers that act on the kind of mistake.
    pub fn kind(&self) -> &RulesErrorKind {
        &self.kind
    }
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesErrorKind {
    /// The text is not TOML.
    #[error("{0}")]
    Syntax(String),
    /// TOML, but not of the rule file's shape: an unknown key, a missing key,
    /// a value of the wrong type.
    #[error("{0}")]
    Shape(String),
    /// A duration (`window`, `per`, ...) that does not parse.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// The algorithm refused its parameters.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// `algorithm` names none of the five algorithms.
    #[error("unknown algorithm {0:?}: use sliding_window, fixed_window, token_bucket, leaky_bucket or gcra")]
    UnknownAlgorithm(String),
    /// A limit carries a parameter its algorithm does not take (`leak` on a
    /// token bucket): refused rather than ignored, since it shows a mistake.
    #[error("{algorithm} has no parameter `{field}`: it takes {accepted}")]
    ForeignParameter {
        /// The parameter given.
        field: &'static str,
        /// The limit's algorithm.
        algorithm: &'static str,
        /// The parameters it does take, as a list for the message.
        accepted: &'static str,
    },
    /// A limit lacks a parameter its algorithm needs.
    #[error("{algorithm} needs `{field}`")]
    MissingParameter {
        /// The parameter missing.
        field: &'static str,
        /// The limit's algorithm.
        algorithm: &'static str,
    },
    /// A rule name that is empty, too long or has characters outside
    /// `A-Z a-z 0-9 _ . -`.
    #[error("rule name {0:?} is not valid: use 1 to {MAX_RULE_NAME_LEN} characters of A-Z, a-z, 0-9, _, . and -")]
    BadRuleName(String),
    /// Two rules with one name: names identify rules in decisions and metrics.
    #[error("rule name {name:?} is already used by rules[{first}] (line {first_line})")]
    DuplicateRuleName {
        /// The name.
        name: String,
        /// Index of the rule that has it first, in `rules`.
        first: usize,
        /// 1-based line of that rule's name.
        first_line: usize,
    },
    /// A field name in `match` or `key` that is not a valid descriptor field.
    #[error(transparent)]
    BadFieldName(DescriptorError),
    /// A field listed twice in `key`.
    #[error("key field `{0}` is listed twice")]
    DuplicateKeyField(String),
    /// A `key` field that `match` does not name, so a counted request might
    /// lack it.
    #[error("key field `{0}` is not named in `match`: add `{0} = \"*\"` there, so that every counted request carries it")]
    KeyFieldNotMatched(String),
    /// A `match` pattern that does not parse.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// A tier name that no request's `tier` field could carry.
    #[error("tier name is not a valid `tier` value: {0}")]
    BadTierName(DescriptorError),
    /// A rule with both a `domain` and `domain` in its `match`.
    #[error("the rule names `domain` both in `match` and as its own `domain`: keep one")]
    DomainTwice,
    /// An empty `limits` list.
    #[error("a limit list needs at least one limit")]
    NoLimits,
    /// A list of more than [`MAX_LIMITS_PER_LIST`] limits.
    #[error("at most {MAX_LIMITS_PER_LIST} limits fit in one list")]
    TooManyLimits,
    /// A file of more than [`MAX_RULES`] rules.
    #[error("at most {MAX_RULES} rules fit in one file")]
    TooManyRules,
    /// `unlimited = true` beside limits or `shadow_mode`: a rule either
    /// limits or exempts.
    #[error("an unlimited rule exempts the requests it matches from every limit: it takes no `limits`, `tiers`, `overrides` or `shadow_mode`")]
    UnlimitedWithLimits,
    /// A rule with more than [`MAX_OVERRIDES_PER_RULE`] overrides.
    #[error("at most {MAX_OVERRIDES_PER_RULE} overrides fit in one rule")]
    TooManyOverrides,
    /// A rule with nothing to apply: no `limits`, no tier, no override.
    #[error("a rule needs `limits`, a tier or an override")]
    RuleWithoutLimits,
    /// `endpoints = []`, which would refuse every request.
    #[error(
        "`endpoints` is empty, which would refuse every request: remove it to admit any endpoint"
    )]
    NoEndpoints,
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
/// Never panics: an offset past the end or inside a character is clamped.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    // Count characters by their first bytes; UTF-8 continuation bytes are 10xxxxxx.
    let column = 1 + before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count();
    (line, column)
}

/// A key as it would be written in a TOML path: bare if it can be.
pub(super) fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// The field path of the deepest key or value of `table` whose source span
/// holds byte `offset`, for errors that serde reports with a span only.
///
/// The whole tree is searched rather than only the branch that contains the
/// offset, because toml spans a `[table]` by its header line alone: the keys
/// under it lie outside its span.
pub(super) fn locate(table: &DeTable<'_>, offset: usize) -> String {
    let mut best = (0, String::new());
    let mut path = Vec::new();
    search_table(table, offset, &mut path, &mut best);
    best.1
}

/// One step of a path: a table key or an array index.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn render(path: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&toml_key(key));
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn search_table<'a>(
    table: &'a DeTable<'_>,
    offset: usize,
    path: &mut Vec<Step<'a>>,
    best: &mut (usize, String),
) {
    for (key, value) in table.iter() {
        path.push(Step::Key(key.get_ref()));
        if (key.span().contains(&offset) || value.span().contains(&offset)) && path.len() > best.0 {
            *best = (path.len(), render(path));
        }
        search_value(value.get_ref(), offset, path, best);
        path.pop();
    }
}

fn search_value<'a>(
    value: &'a DeValue<'_>,
    offset: usize,
    path: &mut Vec<Step<'a>>,
    best: &mut (usize, String),
) {
    match value {
        DeValue::Table(table) => search_table(table, offset, path, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                path.push(Step::Index(i));
                if item.span().contains(&offset) && path.len() > best.0 {
                    *best = (path.len(), render(path));
                }
                search_value(item.get_ref(), offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines_and_columns() {
        let text = "ab\ncdé f\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 1), (1, 2));
        assert_eq!(line_column(text, 3), (2, 1));
        // `é` is two bytes but one column.
        assert_eq!(line_column(text, 7), (2, 4));
        assert_eq!(line_column(text, 8), (2, 5));
        assert_eq!(line_column(text, 10), (3, 1));
        assert_eq!(line_column(text, 999), (3, 1));
    }

    #[test]
    fn message_names_the_path_and_place() {
        let text = "x\n  window = \"1w\"";
        let e = RulesError::at(
            text,
            13..17,
            "rules[2].limits[0].window",
            RulesErrorKind::Duration(DurationError::UnknownUnit("w".into())),
        );
        assert_eq!(
            e.to_string(),
            "rules[2].limits[0].window: unknown duration unit \"w\": use ns, us, ms, s, m, h or d (line 2, column 12)"
        );
        let e = RulesError::at(text, 0..1, "", RulesErrorKind::Syntax("bad".into()));
        assert_eq!(e.to_string(), "bad (line 1, column 1)");
    }
}
