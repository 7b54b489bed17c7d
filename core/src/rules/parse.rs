//! From rule-file text to checked rules.
//!
//! Two passes over the text: toml's own parser finds syntax errors and yields
//! a spanned tree, and serde reads that tree into the `Raw*` structs below
//! (every table `deny_unknown_fields`, so a typo is an error). Everything
//! serde cannot express (names, patterns, algorithm parameters, limits on
//! counts) is then checked while compiling, using the spans kept in
//! [`Spanned`] fields to say where.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use crate::descriptor::{self, DOMAIN, TIER};

use super::dispatch::Dispatch;
use super::error::{line_column, locate, toml_key, RulesError, RulesErrorKind};
use super::limit::{count_shape, limit_id, LimitOwner, RawLimit};
use super::matching::{check_field_name, EndpointList, Matcher, Pattern};
use super::{
    CompiledLimit, CompiledRule, RuleName, Scope, MAX_LIMITS_PER_LIST, MAX_OVERRIDES_PER_RULE,
    MAX_RULES, MAX_RULE_NAME_LEN,
};

type RawMatch = Spanned<BTreeMap<Spanned<String>, Spanned<String>>>;
type RawLimits = Spanned<Vec<Spanned<RawLimit>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    /// Shorthand for `domain = "<pattern>"` in `match`: the rule applies only
    /// to requests of that rate limit domain.
    domain: Option<Spanned<String>>,
    // Required, even when empty: a rule that matches everything should be
    // written as such (`match = {}`), not be the accident of a missing line.
    #[serde(rename = "match")]
    matcher: RawMatch,
    key: Option<Spanned<Vec<Spanned<String>>>>,
    limits: Option<RawLimits>,
    #[serde(default)]
    tiers: BTreeMap<Spanned<String>, Spanned<RawTier>>,
    #[serde(default)]
    overrides: Vec<Spanned<RawOverride>>,
    /// Count, and report would-be denials, but never deny.
    #[serde(default)]
    shadow_mode: bool,
    /// The requests this rule matches are limited by nothing.
    unlimited: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(rename = "match")]
    matcher: RawMatch,
    limits: RawLimits,
}

/// What [`super::RuleSet`] is made of, besides its source.
pub(super) struct Compiled {
    pub(super) endpoints: Option<EndpointList>,
    pub(super) rules: Vec<CompiledRule>,
    pub(super) limits: Vec<CompiledLimit>,
}

pub(super) fn compile(text: &str) -> Result<Compiled, RulesError> {
    let tree = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(text.len()..text.len());
        RulesError::at(
            text,
            span,
            "",
            RulesErrorKind::Syntax(e.message().to_owned()),
        )
    })?;
    let raw = RawFile::deserialize(toml::Deserializer::from(tree)).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // The tree went into serde; parsing again is cheaper than keeping a
        // copy for the rare failure.
        let path = DeTable::parse(text)
            .map(|tree| locate(tree.get_ref(), span.start))
            .unwrap_or_default();
        RulesError::at(
            text,
            span,
            path,
            RulesErrorKind::Shape(e.message().to_owned()),
        )
    })?;
    Compiler {
        text,
        limits: Vec::new(),
    }
    .file(raw)
}

struct Compiler<'t> {
    text: &'t str,
    limits: Vec<CompiledLimit>,
}

impl Compiler<'_> {
    fn err(&self, span: Range<usize>, path: impl Into<String>, kind: RulesErrorKind) -> RulesError {
        RulesError::at(self.text, span, path, kind)
    }

    fn file(mut self, raw: RawFile) -> Result<Compiled, RulesError> {
        let endpoints = raw.endpoints.map(|list| self.endpoints(list)).transpose()?;
        if let Some(extra) = raw.rules.get(MAX_RULES) {
            return Err(self.err(
                extra.span(),
                format!("rules[{MAX_RULES}]"),
                RulesErrorKind::TooManyRules,
            ));
        }
        let mut seen: HashMap<String, (usize, Range<usize>)> = HashMap::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, rule) in raw.rules.into_iter().enumerate() {
            let rule = rule.into_inner();
            let name = &rule.name;
            if let Some((first, first_span)) = seen.get(name.get_ref().as_str()) {
                let kind = RulesErrorKind::DuplicateRuleName {
                    name: name.get_ref().clone(),
                    first: *first,
                    first_line: line_column(self.text, first_span.start).0,
                };
                return Err(self.err(name.span(), format!("rules[{i}].name"), kind));
            }
            seen.insert(name.get_ref().clone(), (i, name.span()));
            rules.push(self.rule(i, rule)?);
        }
        Ok(Compiled {
            endpoints,
            rules,
            limits: self.limits,
        })
    }

    fn endpoints(&self, list: Spanned<Vec<Spanned<String>>>) -> Result<EndpointList, RulesError> {
        if list.get_ref().is_empty() {
            return Err(self.err(list.span(), "endpoints", RulesErrorKind::NoEndpoints));
        }
        let span_start = list.span().start;
        let patterns = list
            .into_inner()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::parse(p.get_ref())
                    .map_err(|e| self.err(p.span(), format!("endpoints[{i}]"), e.into()))
            })
            .collect::<Result<_, _>>()?;
        let line = self.text[..span_start.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1;
        Ok(EndpointList::new(
            patterns,
            u32::try_from(line).unwrap_or(u32::MAX),
        ))
    }

    fn rule(&mut self, i: usize, raw: RawRule) -> Result<CompiledRule, RulesError> {
        let at = format!("rules[{i}]");
        let name = raw.name.get_ref().as_str();
        let name_ok = !name.is_empty()
            && name.len() <= MAX_RULE_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            let kind = RulesErrorKind::BadRuleName(name.chars().take(MAX_RULE_NAME_LEN).collect());
            return Err(self.err(raw.name.span(), format!("{at}.name"), kind));
        }
        let mut matcher = self.matcher(&format!("{at}.match"), &raw.matcher)?;
        if let Some(domain) = &raw.domain {
            let domain_at = format!("{at}.domain");
            let pattern = Pattern::parse(domain.get_ref())
                .map_err(|e| self.err(domain.span(), domain_at.as_str(), e.into()))?;
            matcher = matcher
                .with_field(DOMAIN, pattern)
                .ok_or_else(|| self.err(domain.span(), domain_at, RulesErrorKind::DomainTwice))?;
        }
        let key_fields = match &raw.key {
            Some(key) => self.key(&at, key, &matcher)?,
            // Sorted by name, as the TOML table already is.
            None => matcher.names().map(str::to_owned).collect(),
        };
        let has_limits = raw.limits.is_some() || !raw.tiers.is_empty() || !raw.overrides.is_empty();
        let unlimited = raw.unlimited.as_ref().is_some_and(|u| *u.get_ref());
        if unlimited && (has_limits || raw.shadow_mode) {
            let span = raw.unlimited.as_ref().map_or(raw.name.span(), |u| u.span());
            return Err(self.err(
                span,
                format!("{at}.unlimited"),
                RulesErrorKind::UnlimitedWithLimits,
            ));
        }
        if !has_limits && !unlimited {
            return Err(self.err(raw.name.span(), at, RulesErrorKind::RuleWithoutLimits));
        }
        if let Some(extra) = raw.overrides.get(MAX_OVERRIDES_PER_RULE) {
            let path = format!("{at}.overrides[{MAX_OVERRIDES_PER_RULE}]");
            return Err(self.err(extra.span(), path, RulesErrorKind::TooManyOverrides));
        }

        let rule = LimitOwner {
            name,
            key_fields: &key_fields,
            shadow: raw.shadow_mode,
        };
        let default = match &raw.limits {
            Some(limits) => self.limits(&rule, Scope::Default, &format!("{at}.limits"), limits)?,
            None => 0..0,
        };
        let mut tiers = Vec::with_capacity(raw.tiers.len());
        for (tier, body) in &raw.tiers {
            let tier_at = format!("{at}.tiers.{}", toml_key(tier.get_ref()));
            if let Err(e) = descriptor::value_from_bytes(TIER, tier.get_ref().as_bytes()) {
                return Err(self.err(tier.span(), tier_at, RulesErrorKind::BadTierName(e)));
            }
            let scope = Scope::Tier(tier.get_ref().clone());
            let range = self.limits(
                &rule,
                scope,
                &format!("{tier_at}.limits"),
                &body.get_ref().limits,
            )?;
            tiers.push((tier.get_ref().clone(), range));
        }
        let mut overrides = Vec::with_capacity(raw.overrides.len());
        for (j, body) in raw.overrides.iter().enumerate() {
            let body = body.get_ref();
            let over_at = format!("{at}.overrides[{j}]");
            let matcher = self.matcher(&format!("{over_at}.match"), &body.matcher)?;
            let range = self.limits(
                &rule,
                Scope::Override(j),
                &format!("{over_at}.limits"),
                &body.limits,
            )?;
            overrides.push((matcher, range));
        }
        Ok(CompiledRule {
            name: name.to_owned(),
            matcher,
            key_fields,
            unlimited,
            default,
            tiers,
            override_dispatch: Dispatch::new(overrides.iter().map(|(m, _)| m)),
            overrides,
        })
    }

    fn matcher(&self, at: &str, raw: &RawMatch) -> Result<Matcher, RulesError> {
        let mut fields = Vec::with_capacity(raw.get_ref().len());
        for (name, pattern) in raw.get_ref() {
            let field_at = format!("{at}.{}", toml_key(name.get_ref()));
            check_field_name(name.get_ref()).map_err(|e| {
                self.err(
                    name.span(),
                    field_at.as_str(),
                    RulesErrorKind::BadFieldName(e),
                )
            })?;
            let pattern = Pattern::parse(pattern.get_ref())
                .map_err(|e| self.err(pattern.span(), field_at, e.into()))?;
            fields.push((name.get_ref().clone(), pattern));
        }
        Ok(Matcher::new(fields))
    }

    fn key(
        &self,
        at: &str,
        raw: &Spanned<Vec<Spanned<String>>>,
        matcher: &Matcher,
    ) -> Result<Vec<String>, RulesError> {
        let mut fields: Vec<String> = Vec::with_capacity(raw.get_ref().len());
        for (j, field) in raw.get_ref().iter().enumerate() {
            let name = field.get_ref();
            let err = |kind| self.err(field.span(), format!("{at}.key[{j}]"), kind);
            check_field_name(name).map_err(|e| err(RulesErrorKind::BadFieldName(e)))?;
            if fields.contains(name) {
                return Err(err(RulesErrorKind::DuplicateKeyField(name.clone())));
            }
            if !matcher.contains(name) {
                return Err(err(RulesErrorKind::KeyFieldNotMatched(name.clone())));
            }
            fields.push(name.clone());
        }
        Ok(fields)
    }

    /// Compiles one limit list into [`Self::limits`], returning its range.
    fn limits(
        &mut self,
        rule: &LimitOwner<'_>,
        scope: Scope,
        at: &str,
        raw: &RawLimits,
    ) -> Result<Range<usize>, RulesError> {
        let list = raw.get_ref();
        if list.is_empty() {
            return Err(self.err(raw.span(), at, RulesErrorKind::NoLimits));
        }
        if let Some(extra) = list.get(MAX_LIMITS_PER_LIST) {
            let path = format!("{at}[{MAX_LIMITS_PER_LIST}]");
            return Err(self.err(extra.span(), path, RulesErrorKind::TooManyLimits));
        }
        let start = self.limits.len();
        for (position, entry) in list.iter().enumerate() {
            let built = entry.get_ref().build(entry.span()).map_err(|e| {
                let path = match e.key {
                    Some(key) => format!("{at}[{position}].{key}"),
                    None => format!("{at}[{position}]"),
                };
                self.err(e.span, path, e.kind)
            })?;
            let id = limit_id(rule, position, &count_shape(&built.algorithm));
            self.limits.push(CompiledLimit {
                id,
                parameters: built.normalized,
                index: self.limits.len(),
                rule: rule.name.to_owned(),
                rule_name: RuleName::intern(rule.name),
                scope: scope.clone(),
                shadow: rule.shadow,
                algorithm: built.algorithm,
            });
        }
        Ok(start..self.limits.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::ParamError;
    use crate::time::DurationError;

    /// Two valid rules, so that the broken one below is `rules[2]` on line 9.
    const PREAMBLE: &str = r#"[[rules]]
name = "first"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 1, window = "1s" } ]
[[rules]]
name = "second"
match = {}
limits = [ { algorithm = "gcra", limit = 1, per = "1s" } ]
"#;

    fn error(text: &str) -> RulesError {
        match compile(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts where an error points: path, line and column.
    #[track_caller]
    fn assert_at(e: &RulesError, path: &str, line: usize, column: usize) {
        assert_eq!(
            (e.path(), e.line(), e.column()),
            (path, line, column),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\nmatch = {{}}\n"
        ));
        assert!(matches!(e.kind(), RulesErrorKind::Syntax(_)), "{e:?}");
        assert_eq!((e.path(), e.line()), ("", 10), "{e}");
        let e = error("endpoints = [\"/a\",\n  \"/b\"\n  oops]\n");
        assert!(matches!(e.kind(), RulesErrorKind::Syntax(_)), "{e:?}");
        assert_eq!(e.line(), 3, "{e}");
        // A key given twice is a syntax error in TOML.
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"a\"\nname = \"b\"\n"
        ));
        assert_eq!(e.line(), 11, "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_at_the_key() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nmatch = {{}}\nlimts = []\n"
        ));
        assert!(
            matches!(e.kind(), RulesErrorKind::Shape(m) if m.contains("unknown field `limts`")),
            "{e}"
        );
        assert_at(&e, "rules[2].limts", 12, 1);

        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nmatch = {{}}\nlimits = [\n  {{ algorithm = \"gcra\", limt = 1, per = \"1s\" }},\n]\n"
        ));
        assert_at(&e, "rules[2].limits[0].limt", 13, 25);

        let e = error(&format!(
            "{PREAMBLE}[rules.tiers.gold]\nlimits = []\nburst = 1\n"
        ));
        assert_at(&e, "rules[1].tiers.gold.burst", 11, 1);

        let e = error("endpoint = [\"/a\"]\n");
        assert_at(&e, "endpoint", 1, 1);
    }

    #[test]
    fn wrong_types_and_missing_keys_point_at_the_value_or_table() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nmatch = {{}}\nlimits = [ {{ algorithm = \"gcra\", limit = -1, per = \"1s\" }} ]\n"
        ));
        assert_at(&e, "rules[2].limits[0].limit", 12, 42);
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nlimits = []\n"
        ));
        assert!(
            matches!(e.kind(), RulesErrorKind::Shape(m) if m.contains("`match`")),
            "{e}"
        );
        assert_eq!(e.path(), "rules[2]", "{e}");
    }

    #[test]
    fn zero_limits_are_refused_at_the_field() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nmatch = {{}}\nlimits = [\n  {{ algorithm = \"sliding_window\", limit = 5, window = \"1s\" }},\n  {{ algorithm = \"sliding_window\", limit = 0, window = \"1s\" }},\n]\n"
        ));
        assert_eq!(
            e.kind(),
            &RulesErrorKind::Param(ParamError::Zero { field: "limit" })
        );
        assert_at(&e, "rules[2].limits[1].limit", 14, 43);
        assert_eq!(
            e.to_string(),
            "rules[2].limits[1].limit: `limit` must be greater than zero (line 14, column 43)"
        );
    }

    #[test]
    fn bad_durations_are_refused_at_the_value() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"third\"\nmatch = {{}}\nlimits = [\n  {{ algorithm = \"fixed_window\", limit = 5, window = \"2w\" }},\n]\n"
        ));
        assert_eq!(
            e.kind(),
            &RulesErrorKind::Duration(DurationError::UnknownUnit("w".into()))
        );
        assert_eq!(
            e.to_string(),
            "rules[2].limits[0].window: unknown duration unit \"w\": use ns, us, ms, s, m, h or d (line 13, column 53)"
        );
    }

    #[test]
    fn duplicate_rule_names_name_the_first() {
        let e = error(&format!(
            "{PREAMBLE}[[rules]]\nname = \"first\"\nmatch = {{}}\nlimits = [ {{ algorithm = \"gcra\", limit = 1, per = \"1s\" }} ]\n"
        ));
        assert_eq!(
            e.kind(),
            &RulesErrorKind::DuplicateRuleName {
                name: "first".into(),
                first: 0,
                first_line: 2
            }
        );
        assert_at(&e, "rules[2].name", 10, 8);
    }

    #[test]
    fn bad_field_names_and_patterns_are_refused_where_written() {
        let rule = |body: &str| {
            format!("{PREAMBLE}[[rules]]\nname = \"third\"\n{body}\nlimits = [ {{ algorithm = \"gcra\", limit = 1, per = \"1s\" }} ]\n")
        };
        let e = error(&rule("match = { User = \"*\" }"));
        assert!(matches!(e.kind(), RulesErrorKind::BadFieldName(_)), "{e}");
        assert_at(&e, "rules[2].match.User", 11, 11);
        let e = error(&rule("match = { user = \"\" }"));
        assert!(matches!(e.kind(), RulesErrorKind::Pattern(_)), "{e}");
        assert_at(&e, "rules[2].match.user", 11, 18);
        let e = error(&rule("match = { user = \"*\" }\nkey = [\"user\", \"ip\"]"));
        assert_eq!(e.kind(), &RulesErrorKind::KeyFieldNotMatched("ip".into()));
        assert_at(&e, "rules[2].key[1]", 12, 16);
        let e = error(&rule(
            "match = { user = \"*\" }\nkey = [\"user\", \"user\"]",
        ));
        assert_eq!(e.kind(), &RulesErrorKind::DuplicateKeyField("user".into()));
        let e = error(&rule("match = { \"a b\" = \"*\" }"));
        assert_eq!(e.path(), "rules[2].match.\"a b\"", "{e}");
    }

    #[test]
    fn rule_names_and_limit_lists_are_checked() {
        let e = error("[[rules]]\nname = \"has space\"\nmatch = {}\nlimits = [ { algorithm = \"gcra\", limit = 1, per = \"1s\" } ]\n");
        assert!(matches!(e.kind(), RulesErrorKind::BadRuleName(_)), "{e}");
        assert_at(&e, "rules[0].name", 2, 8);
        let e = error("[[rules]]\nname = \"r\"\nmatch = {}\nlimits = []\n");
        assert_eq!(e.kind(), &RulesErrorKind::NoLimits);
        assert_at(&e, "rules[0].limits", 4, 10);
        let e = error("[[rules]]\nname = \"r\"\nmatch = {}\n");
        assert_eq!(e.kind(), &RulesErrorKind::RuleWithoutLimits);
        let entry = "{ algorithm = \"gcra\", limit = 1, per = \"1s\" },\n";
        let e = error(&format!(
            "[[rules]]\nname = \"r\"\nmatch = {{}}\nlimits = [\n{}]\n",
            entry.repeat(17)
        ));
        assert_eq!(e.kind(), &RulesErrorKind::TooManyLimits);
        assert_at(&e, "rules[0].limits[16]", 21, 1);
        let e = error("[[rules]]\nname = \"r\"\nmatch = {}\nlimits = [ { algorithm = \"token_bucket\", capacity = 1, leak = 1, per = \"1s\" } ]\n");
        assert!(
            matches!(
                e.kind(),
                RulesErrorKind::ForeignParameter { field: "leak", .. }
            ),
            "{e}"
        );
        assert_at(&e, "rules[0].limits[0].leak", 4, 63);
        let e = error("[[rules]]\nname = \"r\"\nmatch = {}\nlimits = [ { algorithm = \"token_bucket\", capacity = 1, per = \"1s\" } ]\n");
        assert!(
            matches!(
                e.kind(),
                RulesErrorKind::MissingParameter {
                    field: "refill",
                    ..
                }
            ),
            "{e}"
        );
        assert_at(&e, "rules[0].limits[0]", 4, 12);
    }

    #[test]
    fn tier_and_override_errors_carry_their_path() {
        let base = "[[rules]]\nname = \"r\"\nmatch = { user = \"*\" }\n";
        let e = error(&format!("{base}[rules.tiers.paid]\nlimits = [ {{ algorithm = \"gcra\", limit = 0, per = \"1s\" }} ]\n"));
        assert_at(&e, "rules[0].tiers.paid.limits[0].limit", 5, 42);
        let e = error(&format!(
            "{base}[[rules.overrides]]\nmatch = {{ user = \"bob\" }}\nlimits = [ {{ algorithm = \"gcra\", limit = 1, per = \"1x\" }} ]\n"
        ));
        assert_at(&e, "rules[0].overrides[0].limits[0].per", 6, 51);
        let e = error(&format!(
            "{base}[[rules.overrides]]\nmatch = {{ User = \"bob\" }}\nlimits = [ {{ algorithm = \"gcra\", limit = 1, per = \"1s\" }} ]\n"
        ));
        assert_at(&e, "rules[0].overrides[0].match.User", 5, 11);
    }

    #[test]
    fn endpoint_lists_are_checked() {
        let e = error("endpoints = []\n");
        assert_eq!(e.kind(), &RulesErrorKind::NoEndpoints);
        assert_at(&e, "endpoints", 1, 13);
        let e = error("endpoints = [\"/a\", \"\"]\n");
        assert_at(&e, "endpoints[1]", 1, 20);
        let e = error("endpoints = \"/a\"\n");
        assert_at(&e, "endpoints", 1, 13);
    }

    #[test]
    fn too_many_rules_and_overrides_are_refused() {
        let rule = "[[rules]]\nname = \"r#\"\nmatch = {}\nlimits = [ { algorithm = \"gcra\", limit = 1, per = \"1s\" } ]\n";
        let text: String = (0..=MAX_RULES)
            .map(|i| rule.replace('#', &i.to_string()))
            .collect();
        let e = error(&text);
        assert_eq!(e.kind(), &RulesErrorKind::TooManyRules);
        assert_eq!(e.path(), format!("rules[{MAX_RULES}]"));

        let over = "[[rules.overrides]]\nmatch = { user = \"u\" }\nlimits = [ { algorithm = \"gcra\", limit = 1, per = \"1s\" } ]\n";
        let text = format!(
            "[[rules]]\nname = \"r\"\nmatch = {{}}\n{}",
            over.repeat(MAX_OVERRIDES_PER_RULE + 1)
        );
        let e = error(&text);
        assert_eq!(e.kind(), &RulesErrorKind::TooManyOverrides);
        assert_eq!(
            e.path(),
            format!("rules[0].overrides[{MAX_OVERRIDES_PER_RULE}]")
        );
    }

    #[test]
    fn error_positions_never_panic_on_odd_input() {
        for text in [
            "\u{feff}x",
            "é = ",
            "[[rules]]\nname = \"é\"\nmatch = {}\n",
            "\"\"\"",
            "a = 1\n\u{0}",
        ] {
            let _ = compile(text);
        }
    }
}
