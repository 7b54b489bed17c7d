//! What a large rule set costs one decision, side by side in one run. The
//! decision is the full path (`Limiter::check_at` from descriptors), 10⁹ a
//! second so that nothing is denied; time is frozen.
//!
//! * `rule_scale`: a rule with one limit, against 10,000 per-customer
//!   limits, written either as one rule with a quota of its own for each
//!   customer (`[[rules.overrides]]`) or as 10,000 rules keyed on an exact
//!   customer (`match = { customer = "c123" }`), for one customer. Rules
//!   that do not match must cost nothing: the target is at most 1.5× the
//!   one-rule figure.
//! * `many_matching`: 1, 100 and 3,000 rules that each match every user
//!   (`match = { user = "*" }`, one sliding-window limit each), for one
//!   user, on a limiter without peers. Criterion's throughput is in
//!   limits: the cost per matching limit. (A cluster node's decision is
//!   not measured here: without peers to acknowledge its hits, its
//!   in-flight share runs out after a few thousand decisions.)
//!
//! ```text
//! cargo bench -p drl-core --bench rule_scale
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use drl_core::clock::SystemClock;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::Clock;

const CUSTOMERS: usize = 10_000;

const LIMIT: &str = "{ algorithm = \"sliding_window\", limit = 1000000000, window = \"1s\" }";

fn overrides(count: usize) -> String {
    let mut text = format!(
        "[[rules]]\nname = \"per-customer\"\nmatch = {{ customer = \"*\" }}\nlimits = [ {LIMIT} ]\n"
    );
    for c in 0..count {
        text.push_str(&format!(
            "[[rules.overrides]]\nmatch = {{ customer = \"c{c}\" }}\n\
             limits = [ {{ algorithm = \"sliding_window\", limit = {}, window = \"1s\" }} ]\n",
            1_000_000_000 + c
        ));
    }
    text
}

fn exact_rules(count: usize) -> String {
    let mut text = String::new();
    for c in 0..count {
        text.push_str(&format!(
            "[[rules]]\nname = \"c{c}\"\nmatch = {{ customer = \"c{c}\" }}\nlimits = [ {LIMIT} ]\n"
        ));
    }
    text
}

fn matching_rules(count: usize) -> String {
    let mut text = String::new();
    for r in 0..count {
        text.push_str(&format!(
            "[[rules]]\nname = \"r{r}\"\nmatch = {{ user = \"*\" }}\nlimits = [ {LIMIT} ]\n"
        ));
    }
    text
}

fn limiter(text: &str) -> Limiter {
    let config = LimiterConfig {
        slots: 3,
        ..LimiterConfig::default()
    };
    Limiter::new(RuleSet::from_toml(text).unwrap(), config).unwrap()
}

fn rule_scale(c: &mut Criterion) {
    let now = SystemClock::raw().now();
    let one = limiter(&overrides(0));
    let many_overrides = limiter(&overrides(CUSTOMERS));
    let many_rules = limiter(&exact_rules(CUSTOMERS));
    let mut group = c.benchmark_group("rule_scale");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // A customer in the middle of the list, and one with none.
    for (name, l, customer) in [
        ("one_rule", &one, "c5000"),
        ("10000_overrides/listed", &many_overrides, "c5000"),
        ("10000_overrides/unlisted", &many_overrides, "someone-else"),
        ("10000_rules/listed", &many_rules, "c5000"),
        ("10000_rules/unlisted", &many_rules, "someone-else"),
    ] {
        let fields = [("customer", customer)];
        group.bench_function(name, |b| {
            b.iter(|| {
                let d = Descriptors::new(black_box(&fields)).unwrap();
                l.check_at(now, &d, 1).unwrap().is_allowed()
            })
        });
    }
    group.finish();
}

fn many_matching(c: &mut Criterion) {
    let now = SystemClock::raw().now();
    let mut group = c.benchmark_group("many_matching");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for count in [1, 100, 3_000] {
        let text = matching_rules(count);
        group.throughput(Throughput::Elements(count as u64));
        let l = limiter(&text);
        let fields = [("user", "user-42")];
        let d = Descriptors::new(&fields).unwrap();
        let decision = l.check_at(now, &d, 1).unwrap();
        assert!(decision.is_allowed(), "{count}: {decision:?}");
        assert_eq!(l.keys_tracked(), count, "one key per matching limit");
        group.bench_function(format!("{count}_rules"), |b| {
            b.iter(|| {
                let d = Descriptors::new(black_box(&fields)).unwrap();
                l.check_at(now, &d, 1).unwrap().is_allowed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rule_scale, many_matching);
criterion_main!(benches);
