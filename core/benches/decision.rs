//! One rate-limit decision: drl side by side with governor's keyed limiter,
//! in the same process, the same criterion group and on the same workload.
//!
//! Both limiters are set so high (10⁹ per second) that they allow nearly
//! every request: what is measured is the decision path, not denial.
//!
//! * drl: the full public path, `Limiter::check_at(now, &Descriptors::new(&[("user", key)])?, 1)`
//!   against one rule keyed by `user` with one sliding-window limit, on a
//!   three-slot cluster (`LimiterConfig { slots: 3, .. }`). That is
//!   descriptor validation, rule matching, the key digest (rapidhash), the
//!   key index, the entry lock, the window read, the algorithm and the
//!   count.
//! * governor: `RateLimiter::check_key(&key)` on its default keyed store
//!   (`DashMapStateStore<String>`, SipHash-1-3 via `RandomState`), given the
//!   same `String` keys.
//!
//! # Time
//!
//! The main comparison freezes time on both sides: drl gets one fixed `now`
//! (read once from the system clock at start) and governor runs on its
//! `FakeRelativeClock` (one relaxed atomic load per check). The two real
//! clocks are not alike (drl's `SystemClock` is `clock_gettime`, governor's
//! default `QuantaClock` is `rdtsc`), and which clock a server reads is the
//! driver's choice, not the decision's; freezing both compares the decision
//! paths alone. For reference the hot-key group also runs both limiters on
//! their own real clocks (`drl-check-system-clock`, `governor-keyed-quanta-clock`)
//! and drl's one-call `allow_request(user, endpoint)`, which reads the clock too.
//! `drl-handle` is the pre-resolved path (`Limiter::handle`, then
//! `Handle::check_at` per decision): no descriptors, matching or digest,
//! and the key's entry found where it was last time; with two threads each
//! thread resolves its own handle on the same key.
//!
//! # Threads
//!
//! `2_threads` runs on two threads at once, each doing `iters` checks on its
//! own key stream (the same hot key for both in the hot-key group). The time
//! reported is wall time ÷ (2 · iters): the time per check of both threads
//! together, so criterion's throughput is the combined rate and the figure
//! compares directly with `1_thread` (perfect scaling halves it).
//!
//! # Keys
//!
//! Key strings are built once, before anything is measured. Random-key
//! groups fill both limiters with every key first, then check keys picked by
//! an inline xorshift, the same generator and seeds for both limiters. The
//! limiters for 10M keys take a few GB; each is dropped before the next is
//! built.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use drl_core::clock::SystemClock;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::time::{Clock as _, Nanos};
use governor::clock::{Clock as GovernorClock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

const RATE_PER_SEC: u32 = 1_000_000_000;

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000000, window = "1s" } ]
"#;

/// Room for the largest key set without eviction.
const MAX_KEYS: usize = 11_000_000;

type GovernorFrozen = RateLimiter<
    String,
    DashMapStateStore<String>,
    FakeRelativeClock,
    NoOpMiddleware<<FakeRelativeClock as GovernorClock>::Instant>,
>;

fn drl_limiter() -> Limiter {
    let rules = RuleSet::from_toml(RULES).expect("bench rules parse");
    let config = LimiterConfig {
        slots: 3,
        max_keys: MAX_KEYS,
        ..LimiterConfig::default()
    };
    Limiter::new(rules, config).expect("bench limiter builds")
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(RATE_PER_SEC).expect("non-zero"))
}

fn governor_frozen() -> GovernorFrozen {
    RateLimiter::dashmap_with_clock(quota(), FakeRelativeClock::default())
}

#[inline]
fn drl_check(limiter: &Limiter, now: Nanos, user: &str) -> bool {
    let fields = [("user", user)];
    let d = Descriptors::new(&fields).expect("bench keys are valid descriptors");
    limiter
        .check_at(now, &d, 1)
        .expect("no endpoint list")
        .is_allowed()
}

/// Marsaglia's xorshift64: a handful of cycles, identical for both limiters.
struct XorShift(u64);

impl XorShift {
    fn new(stream: u64) -> Self {
        XorShift(
            0x9E37_79B9_7F4A_7C15 ^ (stream.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
        )
    }
    /// A number below `n` (multiply-shift: no division).
    #[inline]
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        ((u128::from(x) * n as u128) >> 64) as usize
    }
}

/// Runs `op` `iters` times on each of `threads` threads started together and
/// returns wall time ÷ `threads`: the time per operation of all threads
/// together (see the module docs). Thread `t` of round `round` draws from
/// stream `round · threads + t`, so no two samples replay the same keys.
fn run_threads(
    threads: usize,
    round: u64,
    iters: u64,
    op: impl Fn(&mut XorShift) -> bool + Sync,
) -> Duration {
    let start_line = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (op, start_line) = (&op, &start_line);
                s.spawn(move || {
                    let mut rng = XorShift::new(round * threads as u64 + t as u64);
                    start_line.wait();
                    for _ in 0..iters {
                        black_box(op(&mut rng));
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for w in workers {
            w.join().expect("bench thread panicked");
        }
        start.elapsed() / threads as u32
    })
}

/// One thread, one key stream that runs on across warm-up and samples
/// (criterion calls the routine once per sample).
fn bench_1_thread(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    op: impl Fn(&mut XorShift) -> bool,
) {
    let mut rng = XorShift::new(u64::MAX);
    group.bench_function(format!("{id}/1_thread"), |b| b.iter(|| op(&mut rng)));
}

fn bench_2_threads(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    op: impl Fn(&mut XorShift) -> bool + Sync,
) {
    let mut round = 0;
    group.bench_function(format!("{id}/2_threads"), |b| {
        b.iter_custom(|iters| {
            round += 1;
            run_threads(2, round, iters, &op)
        })
    });
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

/// Fills a limiter by calling `insert` on every key, split over two threads.
fn populate(keys: &[String], insert: impl Fn(&String) -> bool + Sync) {
    let insert = &insert;
    thread::scope(|s| {
        for half in keys.chunks(keys.len().div_ceil(2)) {
            s.spawn(move || {
                for k in half {
                    assert!(insert(k), "population must be allowed");
                }
            });
        }
    });
}

fn hot_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision/hot_key");
    configure(&mut group);
    let user = "user-00000042";
    let now = SystemClock::raw().now();

    // Fresh limiters per run: a frozen clock never frees quota, so each stays
    // far below its 10⁹ hits.
    for threads in [1, 2] {
        let drl = drl_limiter();
        let op = |_: &mut XorShift| drl_check(&drl, now, user);
        match threads {
            1 => bench_1_thread(&mut group, "drl", op),
            _ => bench_2_threads(&mut group, "drl", op),
        }
        assert!(drl_check(&drl, now, user), "drl must still allow");

        let gov = governor_frozen();
        let key = user.to_owned();
        let op = |_: &mut XorShift| gov.check_key(&key).is_ok();
        match threads {
            1 => bench_1_thread(&mut group, "governor", op),
            _ => bench_2_threads(&mut group, "governor", op),
        }
        assert!(gov.check_key(&key).is_ok(), "governor must still allow");
    }

    // drl's pre-resolved handle (`Limiter::handle`, then `Handle::check_at`):
    // what a caller that checks one key repeatedly pays. A handle belongs
    // to one caller: with two threads each resolves its own, on the same key.
    let drl = drl_limiter();
    {
        let fields = [("user", user)];
        let d = Descriptors::new(&fields).expect("valid");
        let handle = std::cell::RefCell::new(drl.handle(&d).expect("no endpoint list"));
        bench_1_thread(&mut group, "drl-handle", |_| {
            handle
                .borrow_mut()
                .check_at(now, 1)
                .expect("no endpoint list")
                .is_allowed()
        });
    }
    drop(drl);
    let drl = drl_limiter();
    let mut round = 0;
    group.bench_function("drl-handle/2_threads", |b| {
        b.iter_custom(|iters| {
            round += 1;
            let start_line = Barrier::new(3);
            thread::scope(|s| {
                let workers: Vec<_> = (0..2)
                    .map(|_| {
                        let (drl, start_line) = (&drl, &start_line);
                        s.spawn(move || {
                            let fields = [("user", user)];
                            let d = Descriptors::new(&fields).expect("valid");
                            let mut handle = drl.handle(&d).expect("no endpoint list");
                            start_line.wait();
                            for _ in 0..iters {
                                black_box(handle.check_at(now, 1).expect("no endpoint list"));
                            }
                        })
                    })
                    .collect();
                start_line.wait();
                let start = Instant::now();
                for w in workers {
                    w.join().expect("bench thread panicked");
                }
                start.elapsed() / 2
            })
        })
    });
    assert!(drl_check(&drl, now, user), "drl must still allow");
    drop(drl);

    // Reference: each limiter on its own real clock.
    let drl = drl_limiter();
    let fields = [("user", user)];
    bench_1_thread(&mut group, "drl-check-system-clock", |_| {
        let d = Descriptors::new(&fields).expect("valid");
        drl.check(&d, 1).expect("no endpoint list").is_allowed()
    });
    bench_1_thread(&mut group, "drl-allow_request-system-clock", |_| {
        drl.allow_request(user, "/v1/search")
    });
    assert!(
        drl.allow_request(user, "/v1/search"),
        "drl must still allow"
    );
    drop(drl);

    let gov: RateLimiter<String, _, _> = RateLimiter::keyed(quota());
    let key = user.to_owned();
    bench_1_thread(&mut group, "governor-keyed-quanta-clock", |_| {
        gov.check_key(&key).is_ok()
    });
    assert!(gov.check_key(&key).is_ok(), "governor must still allow");
    group.finish();
}

fn random_keys(c: &mut Criterion, count: usize, label: &str) {
    let keys: Vec<String> = (0..count).map(|i| format!("user-{i:08}")).collect();
    let now = SystemClock::raw().now();
    let mut group = c.benchmark_group(format!("decision/random_{label}"));
    configure(&mut group);

    {
        let drl = drl_limiter();
        populate(&keys, |k| drl_check(&drl, now, k));
        assert_eq!(drl.keys_tracked(), count);
        assert_eq!(drl.evictions(), 0);
        let op = |rng: &mut XorShift| drl_check(&drl, now, &keys[rng.below(count)]);
        bench_1_thread(&mut group, "drl", op);
        bench_2_threads(&mut group, "drl", op);
        assert_eq!(drl.keys_tracked(), count, "drl kept every key");
    }
    {
        let gov = governor_frozen();
        populate(&keys, |k| gov.check_key(k).is_ok());
        assert_eq!(gov.len(), count);
        let op = |rng: &mut XorShift| gov.check_key(&keys[rng.below(count)]).is_ok();
        bench_1_thread(&mut group, "governor", op);
        bench_2_threads(&mut group, "governor", op);
    }
    group.finish();
}

fn random_1m(c: &mut Criterion) {
    random_keys(c, 1_000_000, "1M");
}

fn random_10m(c: &mut Criterion) {
    random_keys(c, 10_000_000, "10M");
}

criterion_group!(benches, hot_key, random_1m, random_10m);
criterion_main!(benches);
