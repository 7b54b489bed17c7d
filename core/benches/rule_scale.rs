//! What a large rule set costs one decision: a rule with one limit, against
//! the same rule with a quota of its own for each of 10,000 customers
//! (`[[rules.overrides]]`, one per customer), side by side in one run. The
//! decision is the full path (`Limiter::check_at` from descriptors) for one
//! customer, 10⁹ a second so that nothing is denied; time is frozen.
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

fn rules(overrides: usize) -> String {
    let mut text = String::from(
        "[[rules]]\nname = \"per-customer\"\nmatch = { customer = \"*\" }\n\
         limits = [ { algorithm = \"sliding_window\", limit = 1000000000, window = \"1s\" } ]\n",
    );
    for c in 0..overrides {
        text.push_str(&format!(
            "[[rules.overrides]]\nmatch = {{ customer = \"c{c}\" }}\n\
             limits = [ {{ algorithm = \"sliding_window\", limit = {}, window = \"1s\" }} ]\n",
            1_000_000_000 + c
        ));
    }
    text
}

fn limiter(overrides: usize) -> Limiter {
    let config = LimiterConfig {
        slots: 3,
        ..LimiterConfig::default()
    };
    Limiter::new(RuleSet::from_toml(&rules(overrides)).unwrap(), config).unwrap()
}

fn rule_scale(c: &mut Criterion) {
    let now = SystemClock::raw().now();
    let one = limiter(0);
    let many = limiter(CUSTOMERS);
    let mut group = c.benchmark_group("rule_scale");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // A customer in the middle of the override list, and one with none.
    for (name, l, customer) in [
        ("one_rule", &one, "c5000"),
        ("10000_overrides/listed", &many, "c5000"),
        ("10000_overrides/unlisted", &many, "someone-else"),
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

criterion_group!(benches, rule_scale);
criterion_main!(benches);
