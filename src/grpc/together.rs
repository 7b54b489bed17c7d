//! Several descriptor sets decided as one request (the descriptors of one
//! Envoy `ShouldRateLimit` call): each set gets its own decision, and if any
//! of them is refused, none of them counts.
//!
//! The limiter decides one set atomically (it holds every entry of a check
//! while it counts). Across sets it offers no such lock, so this checks them
//! in order and, when one refuses, gives back what the sets before it took,
//! before the answer is sent. A concurrent request may meanwhile see those
//! hits counted and be refused because of them; it can never be admitted
//! beyond a limit because of them.

use drl_core::descriptor::Descriptors;
use drl_core::limiter::{CheckError, Decision, Limiter, Outcome};
use drl_core::time::Clock;

/// Decides `checks` (descriptor set and cost) together. On `Err` nothing
/// was counted: every set is checked against the endpoint list and the
/// recovery gate before any is counted.
pub fn check_together<C: Clock>(
    limiter: &Limiter<C>,
    checks: &[(Descriptors<'_>, u32)],
) -> Result<Vec<Decision>, CheckError> {
    let rules = limiter.rules();
    for (d, _) in checks {
        rules.check_endpoint(d)?;
    }
    if !limiter.is_admitting() {
        return Err(CheckError::Recovering);
    }
    let mut decisions = Vec::with_capacity(checks.len());
    for (d, cost) in checks {
        match limiter.check(d, *cost) {
            Ok(decision) => decisions.push(decision),
            Err(e) => {
                // The rules or the node's state changed under us.
                give_back(limiter, checks, &mut decisions);
                return Err(e);
            }
        }
    }
    if decisions.iter().any(|d| d.outcome != Outcome::Allowed) {
        give_back(limiter, checks, &mut decisions);
    }
    Ok(decisions)
}

/// Refunds every allowed decision in `decisions` (the first
/// `decisions.len()` of `checks`), and reports its quota as it is again.
fn give_back<C: Clock>(
    limiter: &Limiter<C>,
    checks: &[(Descriptors<'_>, u32)],
    decisions: &mut [Decision],
) {
    for ((d, cost), decision) in checks.iter().zip(decisions.iter_mut()) {
        if decision.outcome != Outcome::Allowed || *cost == 0 || decision.quota.is_none() {
            continue;
        }
        // A refund right after the check finds its hits in the current
        // window; it can only fail if the rules changed in between, and
        // then the counters it would touch are gone too.
        let _ = limiter.refund(d, *cost);
        if let Some(q) = &mut decision.quota {
            q.remaining = q.remaining.saturating_add(u64::from(*cost)).min(q.limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drl_core::limiter::LimiterConfig;
    use drl_core::rules::RuleSet;
    use drl_core::time::{ManualClock, Nanos};

    fn limiter() -> Limiter<ManualClock> {
        let rules = RuleSet::from_toml(
            r#"
[[rules]]
name = "per-ip"
match = { ip = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1m" } ]
[[rules]]
name = "per-path"
match = { path = "*" }
limits = [ { algorithm = "fixed_window", limit = 2, window = "1m" } ]
"#,
        )
        .unwrap();
        Limiter::with_clock(
            rules,
            LimiterConfig::default(),
            ManualClock::new(Nanos::from_secs(1)),
        )
        .unwrap()
    }

    fn remaining(limiter: &Limiter<ManualClock>, fields: &[(&str, &str)]) -> u64 {
        let d = Descriptors::new(fields).unwrap();
        limiter.check(&d, 0).unwrap().quota.unwrap().remaining
    }

    #[test]
    fn one_refusal_leaves_every_set_uncounted() {
        let limiter = limiter();
        let ip = [("ip", "10.0.0.1")];
        let path = [("path", "/a")];
        let checks = [
            (Descriptors::new(&ip).unwrap(), 1),
            (Descriptors::new(&path).unwrap(), 1),
        ];
        for _ in 0..2 {
            let d = check_together(&limiter, &checks).unwrap();
            assert!(d.iter().all(|d| d.outcome == Outcome::Allowed));
        }
        assert_eq!(remaining(&limiter, &ip), 3);
        // The path is spent: the ip must not pay for the refused request.
        let d = check_together(&limiter, &checks).unwrap();
        assert_eq!(d[0].outcome, Outcome::Allowed);
        assert_eq!(d[1].outcome, Outcome::Denied);
        assert_eq!(d[0].quota.unwrap().remaining, 3, "reported as it is again");
        assert_eq!(remaining(&limiter, &ip), 3);
        assert_eq!(remaining(&limiter, &path), 0);
    }

    #[test]
    fn a_bad_set_anywhere_counts_nothing() {
        let limiter = limiter();
        let rules = RuleSet::from_toml(
            r#"
endpoints = ["/ok"]
[[rules]]
name = "per-ip"
match = { ip = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1m" } ]
"#,
        )
        .unwrap();
        limiter.replace_rules(rules).unwrap();
        let good = [("ip", "10.0.0.1"), ("endpoint", "/ok")];
        let bad = [("ip", "10.0.0.1"), ("endpoint", "/nope")];
        let checks = [
            (Descriptors::new(&good).unwrap(), 1),
            (Descriptors::new(&bad).unwrap(), 1),
        ];
        assert!(matches!(
            check_together(&limiter, &checks),
            Err(CheckError::UnknownEndpoint(_))
        ));
        assert_eq!(remaining(&limiter, &good), 5);
    }
}
