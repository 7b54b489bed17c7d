//! What a rules change changes, rule by rule, for the audit log and the
//! admin API's guard against a change that would limit nothing.

use std::collections::HashMap;
use std::fmt;

use super::{CompiledRule, RuleSet, Scope};

/// The rules a change adds, removes and changes, by name, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RulesDiff {
    /// Rules only the new set has.
    pub added: Vec<String>,
    /// Rules only the old set has.
    pub removed: Vec<String>,
    /// Rules both have, with a different match, key, tier, override,
    /// limit or flag.
    pub changed: Vec<String>,
}

impl RulesDiff {
    /// What replacing `old` by `new` changes. Linear in the sizes of both.
    pub fn between(old: &RuleSet, new: &RuleSet) -> RulesDiff {
        let before: HashMap<&str, &CompiledRule> =
            old.rules.iter().map(|r| (r.name.as_str(), r)).collect();
        let after: HashMap<&str, &CompiledRule> =
            new.rules.iter().map(|r| (r.name.as_str(), r)).collect();
        let (old_limits, new_limits) = (limits_by_rule(old), limits_by_rule(new));
        let mut diff = RulesDiff::default();
        for rule in &new.rules {
            let name = rule.name.as_str();
            match before.get(name) {
                None => diff.added.push(rule.name.clone()),
                Some(b) if !same_rule(b, rule) || old_limits.get(name) != new_limits.get(name) => {
                    diff.changed.push(rule.name.clone())
                }
                Some(_) => {}
            }
        }
        diff.removed = old
            .rules
            .iter()
            .filter(|r| !after.contains_key(r.name.as_str()))
            .map(|r| r.name.clone())
            .collect();
        diff
    }

    /// The same diff with each list cut to its first `max` names and a
    /// last entry saying how many more there were: a log line's worth.
    pub fn capped(&self, max: usize) -> RulesDiff {
        let cut = |names: &[String]| {
            let mut out: Vec<String> = names.iter().take(max).cloned().collect();
            if names.len() > max {
                out.push(format!("... and {} more", names.len() - max));
            }
            out
        };
        RulesDiff {
            added: cut(&self.added),
            removed: cut(&self.removed),
            changed: cut(&self.changed),
        }
    }

    /// No rule added, removed or changed (the endpoint list or comments
    /// may still differ).
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for RulesDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "added [{}] removed [{}] changed [{}]",
            self.added.join(", "),
            self.removed.join(", "),
            self.changed.join(", ")
        )
    }
}

type LimitShape<'s> = (&'s Scope, &'s str, bool);

/// Each rule's limits, by rule name, as what a change can alter.
fn limits_by_rule(set: &RuleSet) -> HashMap<&str, Vec<LimitShape<'_>>> {
    let mut by_rule: HashMap<&str, Vec<LimitShape<'_>>> = HashMap::new();
    for l in &set.limits {
        by_rule.entry(l.rule.as_str()).or_default().push((
            &l.scope,
            l.parameters.as_str(),
            l.shadow,
        ));
    }
    by_rule
}

fn same_rule(a: &CompiledRule, b: &CompiledRule) -> bool {
    a.matcher == b.matcher
        && a.key_fields == b.key_fields
        && a.unlimited == b.unlimited
        && a.tiers
            .iter()
            .map(|(t, _)| t)
            .eq(b.tiers.iter().map(|(t, _)| t))
        && a.overrides
            .iter()
            .map(|(m, _)| m)
            .eq(b.overrides.iter().map(|(m, _)| m))
}

impl RuleSet {
    /// The rules deny nothing: no limit, or only limits in shadow mode.
    /// The admin API asks for an explicit flag before it puts such rules
    /// in force.
    pub fn denies_nothing(&self) -> bool {
        self.limits.iter().all(|l| l.shadow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> RuleSet {
        RuleSet::from_toml(text).unwrap()
    }

    const A: &str = "[[rules]]\nname = \"a\"\nmatch = { user = \"*\" }\n\
                     limits = [ { algorithm = \"fixed_window\", limit = 5, window = \"1s\" } ]\n";
    const B: &str = "[[rules]]\nname = \"b\"\nmatch = { ip = \"*\" }\n\
                     limits = [ { algorithm = \"fixed_window\", limit = 5, window = \"1s\" } ]\n";

    #[test]
    fn names_what_was_added_removed_and_changed() {
        let old = set(&format!("{A}{B}"));
        assert!(RulesDiff::between(&old, &old).is_empty());
        let c = B.replace("name = \"b\"", "name = \"c\"");
        let new = set(&format!("{}{c}", A.replace("limit = 5", "limit = 6")));
        let diff = RulesDiff::between(&old, &new);
        assert_eq!(diff.added, vec!["c"]);
        assert_eq!(diff.removed, vec!["b"]);
        assert_eq!(diff.changed, vec!["a"]);
        assert_eq!(diff.to_string(), "added [c] removed [b] changed [a]");
        let long = RulesDiff {
            added: (0..5).map(|i| format!("r{i}")).collect(),
            ..RulesDiff::default()
        };
        assert_eq!(long.capped(2).added, vec!["r0", "r1", "... and 3 more"]);
        assert_eq!(long.capped(5), long);
        // A new match with the same limits is a change too.
        let moved = set(&A.replace("user = \"*\"", "user = \"x*\""));
        assert_eq!(RulesDiff::between(&set(A), &moved).changed, vec!["a"]);
        // Only comments differ: nothing changed.
        let commented = set(&format!("# note\n{A}"));
        assert!(RulesDiff::between(&set(A), &commented).is_empty());
    }

    #[test]
    fn empty_unlimited_or_shadow_only_rules_deny_nothing() {
        assert!(set("").denies_nothing());
        assert!(
            set("[[rules]]\nname = \"free\"\nmatch = { user = \"*\" }\nunlimited = true\n")
                .denies_nothing()
        );
        assert!(set(&A.replace("limits =", "shadow_mode = true\nlimits =")).denies_nothing());
        assert!(!set(A).denies_nothing());
    }
}
