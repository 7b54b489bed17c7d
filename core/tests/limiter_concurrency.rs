//! The in-process limiter under contention.
//!
//! Threads hammer one key with the clock held still, so the window never
//! moves and the exact answer is known: the limit is reached exactly (never
//! more, never fewer when demand exceeds it), and the counter read back from
//! the key table equals the number of allowed decisions: no hit lost, none
//! counted twice.

use drl_core::key::KeyDigest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use drl_core::descriptor::{Descriptors, USER};
use drl_core::key::key_digest;
use drl_core::limiter::{Limiter, LimiterConfig, Outcome};
use drl_core::rules::RuleSet;
use drl_core::slot::PnSlot;
use drl_core::time::{Clock, ManualClock, Nanos};
use drl_core::window::{Ring, SlotGrid};

const THREADS: usize = 8;
/// Mid-second, early in a minute, in 2023: no window is clipped at the Unix
/// epoch, and a step of a couple of seconds stays inside the same minute.
const NOW: Nanos = Nanos::new(1_700_000_040_500_000_000);

type TestLimiter = Limiter<Arc<ManualClock>>;

fn limiter(rules: &str, config: LimiterConfig) -> TestLimiter {
    let rules =
        RuleSet::from_toml(rules).unwrap_or_else(|e| panic!("rules do not parse: {e}\n{rules}"));
    Limiter::with_clock(rules, config, Arc::new(ManualClock::new(NOW))).expect("limiter")
}

fn three_slots() -> LimiterConfig {
    LimiterConfig {
        slots: 3,
        ..LimiterConfig::default()
    }
}

fn one_rule(limits: &str) -> String {
    format!(
        r#"
[[rules]]
name = "per-user"
match = {{ user = "*" }}
key = ["user"]
limits = [ {limits} ]
"#
    )
}

/// The net count of `user`'s key under the limit at `index`, read straight
/// from the key table, and the slot values behind it summed over the rows.
fn counted(l: &TestLimiter, index: usize, user: &str) -> (u64, Vec<PnSlot>) {
    let rules = l.rules();
    let key = key_digest(l.config().seed, rules.limits()[index].id, [user]);
    let table = l.table(index).expect("table");
    let spec = *table.spec();
    let Some(entry) = table.get(key) else {
        return (0, vec![PnSlot::ZERO; l.config().slots]);
    };
    let mut out = vec![0; spec.buckets()];
    Ring::read(&entry, &spec, l.clock().now(), &mut out);
    let slots = (0..l.config().slots)
        .map(|s| {
            (0..spec.buckets()).fold(PnSlot::ZERO, |acc, row| {
                let v = entry.get(row, s);
                PnSlot {
                    p: acc.p + v.p,
                    n: acc.n + v.n,
                }
            })
        })
        .collect();
    (out.iter().sum(), slots)
}

/// `THREADS` threads each make `per_thread` checks of `cost` for `user`,
/// starting together. Returns how many were allowed.
fn hammer(l: &TestLimiter, user: &str, per_thread: usize, cost: u32) -> u64 {
    let allowed = AtomicU64::new(0);
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let fields = [(USER, user)];
                let d = Descriptors::new(&fields).unwrap();
                start.wait();
                for _ in 0..per_thread {
                    let decision = l.check(&d, cost).expect("check");
                    if decision.is_allowed() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(decision.outcome, Outcome::Denied);
                    }
                }
            });
        }
    });
    allowed.into_inner()
}

fn remaining(l: &TestLimiter, user: &str) -> u64 {
    let fields = [(USER, user)];
    let d = Descriptors::new(&fields).unwrap();
    let decision = l.check(&d, 0).expect("check");
    decision.quota.expect("a limit applies").remaining
}

fn admits_exactly_the_limit(limit_toml: &str, limit: u64) {
    let l = limiter(&one_rule(limit_toml), three_slots());
    // Demand: 8 × 200 = 1600, over three times the limit.
    let allowed = hammer(&l, "alice", 200, 1);
    assert_eq!(allowed, limit, "{limit_toml}");
    let (net, slots) = counted(&l, 0, "alice");
    assert_eq!(net, allowed, "counter vs allowed decisions, {limit_toml}");
    // Every hit went to this node's own slot, none elsewhere.
    assert_eq!(
        slots[0],
        PnSlot {
            p: limit as u32,
            n: 0
        }
    );
    assert_eq!(&slots[1..], &[PnSlot::ZERO, PnSlot::ZERO]);
    assert_eq!(remaining(&l, "alice"), 0);
    // Cost 0 counts nothing.
    assert_eq!(counted(&l, 0, "alice").0, limit);
    // Another key is untouched.
    assert_eq!(counted(&l, 0, "bob").0, 0);
}

#[test]
fn sliding_window_admits_exactly_the_limit_under_contention() {
    admits_exactly_the_limit(
        r#"{ algorithm = "sliding_window", limit = 500, window = "1s" }"#,
        500,
    );
    admits_exactly_the_limit(
        r#"{ algorithm = "sliding_window", limit = 333, window = "1s", precision = 4 }"#,
        333,
    );
}

#[test]
fn fixed_window_admits_exactly_the_limit_under_contention() {
    admits_exactly_the_limit(
        r#"{ algorithm = "fixed_window", limit = 500, window = "1s" }"#,
        500,
    );
}

#[test]
fn token_bucket_admits_exactly_the_capacity_under_contention() {
    // A refill of one token an hour: with the clock still, the burst is all.
    admits_exactly_the_limit(
        r#"{ algorithm = "token_bucket", capacity = 500, refill = 1, per = "1h" }"#,
        500,
    );
}

#[test]
fn gcra_admits_exactly_the_burst_under_contention() {
    admits_exactly_the_limit(
        r#"{ algorithm = "gcra", limit = 1, per = "1h", burst = 250 }"#,
        250,
    );
}

/// Mixed costs: whatever is admitted is counted exactly and stays within
/// the limit, and the leftover is smaller than the largest cost.
#[test]
fn mixed_costs_are_counted_exactly() {
    let l = limiter(
        &one_rule(r#"{ algorithm = "sliding_window", limit = 1000, window = "1s" }"#),
        three_slots(),
    );
    let admitted = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..THREADS {
            let l = &l;
            let admitted = &admitted;
            s.spawn(move || {
                let fields = [(USER, "carol")];
                let d = Descriptors::new(&fields).unwrap();
                for i in 0..200 {
                    let cost = 1 + ((t + i) % 3) as u32;
                    if l.check(&d, cost).unwrap().is_allowed() {
                        admitted.fetch_add(u64::from(cost), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let admitted = admitted.into_inner();
    let (net, _) = counted(&l, 0, "carol");
    assert_eq!(net, admitted);
    assert!(
        admitted <= 1000 && admitted > 1000 - 3,
        "admitted {admitted}"
    );
}

/// Two limits on one request: when one denies, the other counts nothing.
fn two_limits(limits: &str, per_second: usize, per_minute: usize) {
    let l = limiter(&one_rule(limits), three_slots());
    let allowed = hammer(&l, "dave", 50, 1);
    assert_eq!(allowed, 10, "{limits}");
    assert_eq!(
        counted(&l, per_second, "dave").0,
        10,
        "per-second counter, {limits}"
    );
    assert_eq!(
        counted(&l, per_minute, "dave").0,
        10,
        "per-minute counter, {limits}"
    );

    // Two seconds on (same minute): the per-second limit is fresh, the
    // per-minute one has 5 left and now does the denying.
    l.clock().advance(Nanos::from_secs(2));
    let allowed = hammer(&l, "dave", 50, 1);
    assert_eq!(allowed, 5, "{limits}");
    assert_eq!(
        counted(&l, per_second, "dave").0,
        5,
        "per-second counter, {limits}"
    );
    assert_eq!(
        counted(&l, per_minute, "dave").0,
        15,
        "per-minute counter, {limits}"
    );
}

#[test]
fn a_denial_by_one_limit_counts_nothing_in_the_other() {
    let second = r#"{ algorithm = "sliding_window", limit = 10, window = "1s" }"#;
    let minute = r#"{ algorithm = "sliding_window", limit = 15, window = "1m" }"#;
    two_limits(&format!("{second}, {minute}"), 0, 1);
    two_limits(&format!("{minute}, {second}"), 1, 0);
    let fixed_minute = r#"{ algorithm = "fixed_window", limit = 15, window = "1m" }"#;
    two_limits(&format!("{fixed_minute}, {second}"), 1, 0);
}

/// Refunds racing with checks: the counter ends at admitted − refunded.
#[test]
fn refunds_racing_with_checks_are_counted_exactly() {
    let l = limiter(
        &one_rule(r#"{ algorithm = "sliding_window", limit = 50, window = "1s" }"#),
        three_slots(),
    );
    let admitted = AtomicU64::new(0);
    let refunded = AtomicU64::new(0);
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        for t in 0..THREADS {
            let (l, admitted, refunded, start) = (&l, &admitted, &refunded, &start);
            s.spawn(move || {
                let fields = [(USER, "erin")];
                let d = Descriptors::new(&fields).unwrap();
                start.wait();
                for i in 0..400 {
                    if t % 4 == 3 {
                        // Blind refunders: give back whatever is there.
                        let given = l.refund(&d, 1 + (i % 2) as u32).unwrap();
                        refunded.fetch_add(u64::from(given), Ordering::Relaxed);
                    } else if l.check(&d, 1).unwrap().is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        if i % 3 == 0 {
                            let given = l.refund(&d, 1).unwrap();
                            refunded.fetch_add(u64::from(given), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let (admitted, refunded) = (admitted.into_inner(), refunded.into_inner());
    let (net, slots) = counted(&l, 0, "erin");
    assert!(
        refunded > 0 && admitted > 50,
        "admitted {admitted}, refunded {refunded}"
    );
    assert_eq!(
        net,
        admitted - refunded,
        "admitted {admitted}, refunded {refunded}"
    );
    assert_eq!(u64::from(slots[0].p), admitted);
    assert_eq!(u64::from(slots[0].n), refunded);
    assert!(net <= 50);
}

/// A flood of distinct keys against a capped table: it stays within its cap
/// by evicting, and nothing panics.
#[test]
fn a_key_flood_stays_within_max_keys() {
    let l = limiter(
        &one_rule(r#"{ algorithm = "sliding_window", limit = 5, window = "1s" }"#),
        LimiterConfig {
            max_keys: 1000,
            slots: 3,
            ..LimiterConfig::default()
        },
    );
    const FLOOD_THREADS: usize = 4;
    const USERS: usize = 100_000;
    let allowed = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..FLOOD_THREADS {
            let (l, allowed) = (&l, &allowed);
            s.spawn(move || {
                for u in (t..USERS).step_by(FLOOD_THREADS) {
                    let user = format!("user-{u}");
                    let fields = [(USER, user.as_str())];
                    let d = Descriptors::new(&fields).unwrap();
                    if l.check(&d, 1).unwrap().is_allowed() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert!(
        l.keys_tracked() <= 1000,
        "{} keys tracked",
        l.keys_tracked()
    );
    assert!(l.evictions() > 0);
    // Every first request of a fresh user is allowed.
    assert_eq!(allowed.into_inner(), USERS as u64);
    // The table still works: a tracked key counts. A new key starts from
    // the evicted keys' sketch, which after a flood this size holds every
    // cell: it may inherit one hit (what each flooding user used), no more.
    let fields = [(USER, "zoe")];
    let d = Descriptors::new(&fields).unwrap();
    let admitted = (0..6)
        .filter(|_| l.check(&d, 1).unwrap().is_allowed())
        .count();
    assert!((4..=5).contains(&admitted), "{admitted} admitted");
    assert!(!l.check(&d, 1).unwrap().is_allowed());
    assert_eq!(counted(&l, 0, "zoe").0, 5);
}

/// True when another thread can lock `key`'s entry while `held` (a guard
/// of that entry) is still alive. Releases `held` before returning.
fn entry_lock_is_violated(
    table: &drl_core::limiter::KeyTable,
    key: u64,
    held: drl_core::limiter::Entry<'_>,
) -> bool {
    use std::sync::mpsc;
    use std::time::Duration;

    thread::scope(|s| {
        let (got_in, entered) = mpsc::channel();
        s.spawn(move || {
            let entry = table.get(KeyDigest(key));
            got_in.send(entry.is_some()).unwrap();
        });
        let intruded = entered.recv_timeout(Duration::from_millis(300)).is_ok();
        drop(held);
        if !intruded {
            // Once released, the waiter gets in.
            assert_eq!(entered.recv_timeout(Duration::from_secs(10)), Ok(true));
        }
        intruded
    })
}

fn small_table() -> drl_core::limiter::KeyTable {
    let spec = drl_core::window::WindowSpec::new(Nanos::from_secs(1), 2).unwrap();
    drl_core::limiter::KeyTable::new(spec, 3, 16).unwrap()
}

/// Mutual exclusion of a key table entry, first on the hot path: creating a
/// key sweeps two entries (amortised expiry), and the sweep can land on the
/// entry just created, still held by the creator. A busy entry must be
/// skipped, not released.
#[test]
fn a_new_keys_entry_stays_locked_by_its_creator() {
    let table = small_table();
    let held = table.get_or_insert(KeyDigest(0x5eed), NOW);
    assert!(
        !entry_lock_is_violated(&table, 0x5eed, held),
        "another thread locked a new key's entry while its creator held it"
    );
}

/// The same through an explicit sweep over a held entry.
#[test]
fn a_sweep_that_finds_an_entry_busy_leaves_it_locked() {
    let table = small_table();
    for key in 1..=3 {
        drop(table.get_or_insert(KeyDigest(key), NOW));
    }
    let held = table.get(KeyDigest(2)).expect("tracked");
    table.sweep(NOW, 16);
    assert!(
        !entry_lock_is_violated(&table, 2, held),
        "another thread locked the entry while it was held: the sweep's failed try-lock released it"
    );
}
