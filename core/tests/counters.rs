//! The counter API on the limiter: reading a key's count per limit and per
//! node slot, and resetting it so that no merge brings the old count back.

use drl_core::cluster::store::{merge_into, ReplicaStore, SlotValues};
use drl_core::descriptor::Descriptors;
use drl_core::key::CounterKey;
use drl_core::limiter::{Check, Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::slot::NodeSlot;
use drl_core::time::{ManualClock, Nanos};
use drl_core::wire::{KeySlots, LimitGroup, Slots};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [
  { algorithm = "fixed_window", limit = 5, window = "1m" },
  { algorithm = "sliding_window", limit = 50, window = "1h" },
]
"#;

fn node(slot: u16) -> Limiter<ManualClock> {
    let config = LimiterConfig {
        own_slot: NodeSlot::new(slot),
        slots: 2,
        ..LimiterConfig::default()
    };
    Limiter::with_clock(
        RuleSet::from_toml(RULES).unwrap(),
        config,
        ManualClock::new(Nanos::from_secs(10_000)),
    )
    .unwrap()
}

fn spend(l: &Limiter<ManualClock>, user: &str, n: usize) -> usize {
    let pairs = [("user", user)];
    let d = Descriptors::new(&pairs).unwrap();
    (0..n)
        .filter(|_| l.check(&d, 1).unwrap().is_allowed())
        .count()
}

/// What `from` holds of its own slot, as one frame of values.
fn own_values(from: &Limiter<ManualClock>, slot: u16) -> Slots {
    let now = Nanos::from_secs(10_000);
    let mut groups: Vec<LimitGroup> = Vec::new();
    from.each_slot_values(
        now,
        NodeSlot::new(slot),
        &mut |k: CounterKey, v: SlotValues| {
            groups.push(LimitGroup {
                limit: k.limit.0,
                newest: v.newest,
                keys: vec![KeySlots {
                    key: k.key.0,
                    buckets: v.buckets,
                }],
            });
        },
    );
    Slots {
        slot,
        round: 0,
        sent_at: 0,
        last: true,
        groups,
    }
}

fn deliver(to: &Limiter<ManualClock>, frame: &Slots) {
    merge_into(
        to,
        Nanos::from_secs(10_000),
        4,
        NodeSlot::new(frame.slot),
        frame,
    );
}

/// Count, remaining and net hits per slot, of each limit.
type Seen = Vec<(u64, u64, Vec<(u16, i64)>)>;

fn counts(l: &Limiter<ManualClock>, user: &str) -> Seen {
    let pairs = [("user", user)];
    let check = Check::new(Descriptors::new(&pairs).unwrap(), 0);
    l.counters(&check)
        .unwrap()
        .into_iter()
        .map(|v| {
            let slots = v
                .slots
                .iter()
                .map(|&(s, n)| (s.index() as u16, n))
                .collect();
            (v.count, v.quota.remaining, slots)
        })
        .collect()
}

#[test]
fn counters_report_each_limit_and_each_slot() {
    let (a, b) = (node(0), node(1));
    assert_eq!(spend(&a, "ann", 3), 3);
    assert_eq!(spend(&b, "ann", 1), 1);
    deliver(&a, &own_values(&b, 1));
    assert_eq!(
        counts(&a, "ann"),
        vec![(4, 1, vec![(0, 3), (1, 1)]), (4, 46, vec![(0, 3), (1, 1)]),]
    );
    // Reading counts nothing and creates no key.
    assert_eq!(counts(&a, "bob"), vec![(0, 5, vec![]), (0, 50, vec![])]);
    assert_eq!(a.keys_tracked(), 2);
}

#[test]
fn a_reset_clears_the_key_and_no_merge_brings_it_back() {
    let (a, b) = (node(0), node(1));
    assert_eq!(spend(&a, "ann", 3), 3);
    assert_eq!(spend(&b, "ann", 2), 2);
    deliver(&a, &own_values(&b, 1));
    deliver(&b, &own_values(&a, 0));
    let a_before = own_values(&a, 0);
    assert_eq!(spend(&a, "ann", 5), 0, "the 1-minute limit of 5 is spent");

    // Reset on a; b does not hear of it yet (a partition).
    let pairs = [("user", "ann")];
    let check = Check::new(Descriptors::new(&pairs).unwrap(), 0);
    let record = a.reset_at(Nanos::from_secs(10_000), &check).unwrap();
    assert_eq!(record.len(), 2, "one counter per limit");
    assert_eq!(
        counts(&a, "ann")[0],
        (2, 3, vec![(1, 2)]),
        "b's hits remain until b applies the reset"
    );

    // a's own values from before the reset arrive again (a late duplicate):
    // the reset stays.
    deliver(&a, &a_before);
    assert_eq!(counts(&a, "ann")[0].0, 2);
    // b merges a's reset values: a's hits are gone there too, b's stay.
    deliver(&b, &own_values(&a, 0));
    assert_eq!(counts(&b, "ann")[0], (2, 3, vec![(1, 2)]));

    // The partition heals: b applies the record to its own slot, and the
    // values flow both ways. Stale values sent before the reset change
    // nothing.
    assert_eq!(b.reset_counters_at(Nanos::from_secs(10_000), &record), 4);
    deliver(&a, &own_values(&b, 1));
    deliver(&b, &a_before);
    for l in [&a, &b] {
        assert_eq!(counts(l, "ann"), vec![(0, 5, vec![]), (0, 50, vec![])]);
    }
    // The quota is whole again, on both nodes together.
    assert_eq!(spend(&a, "ann", 3) + spend(&b, "ann", 2), 5);
    deliver(&a, &own_values(&b, 1));
    assert_eq!(spend(&a, "ann", 1), 0);
}
