//! Memory and speed of a large rule set, in process: `RULES` rules that
//! each match every user (one sliding-window limit each), `USERS` users.
//! Prints the resident set after the first load, after each further
//! replacement with the same rules, and the decision rate of one user.
//!
//! ```text
//! cargo run --release -p drl-core --example many_rules [-- RULES USERS REPLACEMENTS]
//! ```
//!
//! Defaults: 3000 rules, 100 users, 4 replacements.

use std::time::Instant;

use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn rules(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[rules]]\nname = \"r{i}\"\nmatch = {{ user = \"*\" }}\n\
                 limits = [ {{ algorithm = \"sliding_window\", limit = 100000, window = \"1m\" }} ]\n"
            )
        })
        .collect()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n_rules, users, replacements) = (
        args.first().copied().unwrap_or(3000),
        args.get(1).copied().unwrap_or(100),
        args.get(2).copied().unwrap_or(4),
    );
    println!(
        "rules {n_rules}, users {users}: RSS at start {:.1} MiB",
        rss_mib()
    );
    let text = rules(n_rules);
    let started = Instant::now();
    let limiter =
        Limiter::new(RuleSet::from_toml(&text).unwrap(), LimiterConfig::default()).unwrap();
    println!(
        "first load: {:.0} ms, RSS {:.1} MiB",
        started.elapsed().as_secs_f64() * 1e3,
        rss_mib()
    );
    let names: Vec<String> = (0..users).map(|u| format!("user-{u}")).collect();
    for name in &names {
        let pairs = [("user", name.as_str())];
        let d = Descriptors::new(&pairs).unwrap();
        assert!(limiter.check(&d, 1).unwrap().is_allowed());
    }
    println!("after {users} users: RSS {:.1} MiB", rss_mib());
    for i in 1..=replacements {
        let started = Instant::now();
        limiter
            .replace_rules(RuleSet::from_toml(&text).unwrap())
            .unwrap();
        println!(
            "replacement {i}: {:.0} ms, RSS {:.1} MiB",
            started.elapsed().as_secs_f64() * 1e3,
            rss_mib()
        );
    }
    let pairs = [("user", "user-0")];
    let d = Descriptors::new(&pairs).unwrap();
    let started = Instant::now();
    let mut decided = 0u64;
    let mut denied_with_quota_left = 0u64;
    while started.elapsed().as_secs_f64() < 2.0 {
        let decision = limiter.check(&d, 1).unwrap();
        if !decision.is_allowed() && decision.quota.is_some_and(|q| q.remaining > 0) {
            denied_with_quota_left += 1;
        }
        decided += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "one user, {} limits per decision: {:.0} decisions/s ({:.1} us each), {denied_with_quota_left} denied with quota left",
        n_rules,
        decided as f64 / secs,
        secs * 1e6 / decided as f64
    );
}
