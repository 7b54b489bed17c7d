//! The full decision path of one check, stage by stage, beside governor's
//! keyed check in the same run: what each stage costs on its own, so that
//! a change to one stage is measured where it is made.
//!
//! One rule keyed by `user` with one sliding-window limit (precision 10,
//! 10⁹ a second), three slots, time frozen; the hot key is
//! `user-00000042`:
//!
//! * `descriptors`: `Descriptors::new` of one field (validation);
//! * `rules`: `RuleSet::for_each_rule_match` for those descriptors (the
//!   rule lookup, and the list the rule chose);
//! * `key`: `KeyHasher::values` of the key field, then `for_limit`;
//! * `table`: `KeyTable::get_or_insert` of the hot key (its entry found and
//!   locked), and of a random key among 1M already in the table;
//! * `window`: reading the hot key's window (`Ring::read`) and the sliding
//!   window's verdict on it (`decide`), without the memo a hot key keeps;
//! * `full`: `Descriptors::new` and `Limiter::check_at`, the sum of the
//!   above with the memo, counting and the decision's report;
//! * `governor`: `RateLimiter::check_key` on its keyed store, frozen clock.
//!
//! ```text
//! cargo bench -p drl-core --bench stages
//! ```

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use drl_core::algorithm::RateAlgorithm;
use drl_core::clock::SystemClock;
use drl_core::descriptor::Descriptors;
use drl_core::key::{KeyDigest, KeyHasher, KeySeed};
use drl_core::limiter::{KeyTable, Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::Clock;
use drl_core::window::{Ring, WindowCounts, MAX_BUCKETS};
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000000, window = "1s" } ]
"#;

const USER: &str = "user-00000042";
const RANDOM_KEYS: u64 = 1_000_000;

fn stages(c: &mut Criterion) {
    let now = SystemClock::raw().now();
    let rules = RuleSet::from_toml(RULES).unwrap();
    let limit = &rules.limits()[0];
    let hasher = KeyHasher::new(KeySeed::default());
    let fields = [("user", USER)];
    let d = Descriptors::new(&fields).unwrap();
    let key = hasher.for_limit(limit.id, hasher.values([USER]));
    let spec = limit.algorithm.window();
    let table: KeyTable = KeyTable::new(spec, 3, RANDOM_KEYS as usize + 1).unwrap();
    drop(table.get_or_insert(key, now));
    // Random keys: digests spread as real ones are (never zero).
    let random = |i: u64| KeyDigest(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for i in 0..RANDOM_KEYS {
        drop(table.get_or_insert(random(i), now));
    }
    let limiter = Limiter::new(
        RuleSet::from_toml(RULES).unwrap(),
        LimiterConfig {
            slots: 3,
            ..LimiterConfig::default()
        },
    )
    .unwrap();
    let governor = RateLimiter::dashmap_with_clock(
        Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap()),
        FakeRelativeClock::default(),
    );
    let gov_key = USER.to_owned();

    let mut group = c.benchmark_group("stages");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("descriptors", |b| {
        b.iter(|| Descriptors::new(black_box(&fields)).is_ok())
    });
    group.bench_function("rules", |b| {
        b.iter(|| {
            let mut limits = 0;
            rules.for_each_rule_match(black_box(&d), |m| limits += m.limits.len());
            limits
        })
    });
    group.bench_function("key", |b| {
        b.iter(|| hasher.for_limit(limit.id, hasher.values([black_box(USER)])))
    });
    group.bench_function("table/hot", |b| {
        b.iter(|| table.get_or_insert(black_box(key), now).footprint())
    });
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    group.bench_function("table/random_1M", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            table
                .get_or_insert(random(x % RANDOM_KEYS), now)
                .footprint()
        })
    });
    group.bench_function("window", |b| {
        let entry = table.get_or_insert(key, now);
        let mut nets = [0u64; MAX_BUCKETS];
        let nets = &mut nets[..spec.buckets()];
        b.iter(|| {
            Ring::read(&entry, &spec, now, nets);
            limit
                .algorithm
                .decide(&WindowCounts { spec, now, nets }, 1)
                .is_allowed()
        })
    });
    group.bench_function("full", |b| {
        b.iter(|| {
            let d = Descriptors::new(black_box(&fields)).unwrap();
            limiter.check_at(now, &d, 1).unwrap().is_allowed()
        })
    });
    group.bench_function("governor", |b| {
        b.iter(|| governor.check_key(black_box(&gov_key)).is_ok())
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
