//! Unit tests of the key table.

use super::*;

use crate::slot::NodeSlot;

fn table(capacity: usize) -> KeyTable {
    KeyTable::new(
        WindowSpec::new(Nanos::from_secs(1), 2).unwrap(),
        3,
        capacity,
    )
    .unwrap()
}

fn hits(t: &KeyTable, key: u64, now: Nanos) -> u64 {
    let mut out = [0u64; 2];
    match t.get(KeyDigest(key)) {
        Some(e) => Ring::read(&e, t.spec(), now, &mut out),
        None => return 0,
    }
    out.iter().sum()
}

#[test]
fn a_new_key_is_one_cache_line_whatever_the_cluster_size() {
    for slots in [1, 3, 50, 64, 65, 256, 1001, 65_536] {
        let t: KeyTable = KeyTable::new(
            WindowSpec::new(Nanos::from_secs(60), 61).unwrap(),
            slots,
            16,
        )
        .unwrap();
        let now = Nanos::from_secs(1_000_000);
        let mut e = t.get_or_insert(KeyDigest(7), now);
        let spec = e.spec();
        Ring::add(&mut e, &spec, now, NodeSlot::new((slots - 1) as u16), 3);
        // Slot 63 and below: one word; from 64 on, an extended cell of two.
        let words = if slots <= 64 { 1 } else { 2 };
        assert_eq!(e.footprint(), (words, 64), "{slots} slots");
        let mut out = [0u64; 61];
        Ring::read(&e, &spec, now, &mut out);
        assert_eq!(out.iter().sum::<u64>(), 3);
        drop(e);
        assert_eq!(t.bytes(), 64 + INDEX_BYTES_PER_KEY);
    }
}

#[test]
fn the_memo_never_reads_as_cells_and_any_write_drops_it() {
    // 11 buckets × 3 slots: the cells outgrow class 0 and its tail.
    let t: KeyTable =
        KeyTable::new(WindowSpec::new(Nanos::from_secs(1), 11).unwrap(), 3, 4).unwrap();
    let now = Nanos::from_secs(1_000);
    let epoch = t.spec().epoch(now);
    let mut want = std::collections::BTreeMap::new();
    let memo = Summary {
        oldest: 4,
        newer: 77,
    };
    for (i, (row, slot)) in (0..11)
        .flat_map(|r| (0..3).map(move |s| (r, s)))
        .enumerate()
    {
        let mut e = t.get_or_insert(KeyDigest(9), now);
        e.set_memo(epoch, memo);
        let room = cells::used(e.cells()) + MEMO_WORDS < e.cells().len();
        assert_eq!(e.memo(epoch), room.then_some(memo), "step {i}");
        assert_eq!(e.memo(epoch + 1), None, "a memo is for its bucket only");
        // Cells and memo side by side: every value reads back.
        for (&(r, s), &v) in &want {
            assert_eq!(e.get(r, s).p, v, "step {i}");
        }
        let v = 1 + i as u32 * 9_000; // wide from the 15th on
        e.set(row, slot, PnSlot { p: v, n: 0 });
        want.insert((row, slot), v);
        assert_eq!(e.memo(epoch), None, "a write drops the memo");
    }
    let e = t.get(KeyDigest(9)).unwrap();
    for (&(r, s), &v) in &want {
        assert_eq!(e.get(r, s).p, v);
    }
}

#[test]
fn keys_grow_into_larger_classes_and_keep_every_value() {
    let spec = WindowSpec::new(Nanos::from_secs(1), 11).unwrap();
    let t: KeyTable = KeyTable::new(spec, 50, 64).unwrap();
    let now = Nanos::from_secs(1_000);
    let mut oracle = crate::window::BucketWindow::new(spec, 50);
    let epoch = spec.epoch(now);
    // Every slot of every bucket, values narrow and wide.
    for back in (0..11u64).rev() {
        for slot in 0..50u16 {
            let value = PnSlot {
                p: if slot % 7 == 0 {
                    1 << 20
                } else {
                    1 + u32::from(slot)
                },
                n: u32::from(slot % 3 == 0),
            };
            let e_epoch = epoch - back;
            let mut e = t.get_or_insert(KeyDigest(42), now);
            Ring::merge(&mut e, &spec, now, 1, e_epoch, NodeSlot::new(slot), value);
            oracle.merge(now, 1, e_epoch, NodeSlot::new(slot), value);
        }
    }
    let mut out = vec![0u64; 11];
    let mut want = vec![0u64; 11];
    Ring::read(&t.get(KeyDigest(42)).unwrap(), &spec, now, &mut out);
    oracle.read(now, &mut want);
    assert_eq!(out, want);
    assert!(t.stats().grown.load(Ordering::Relaxed) >= 4);
    assert_eq!(t.len(), 1);
    assert_eq!(t.keys_per_class().iter().sum::<u32>(), 1);
    // Only the key's own class is charged, not the ones it passed.
    let (_, bytes) = t.get(KeyDigest(42)).unwrap().footprint();
    assert_eq!(t.bytes(), bytes + INDEX_BYTES_PER_KEY);
    // And it expires like any other key, giving its memory back.
    assert_eq!(t.sweep(now + Nanos::from_secs(12), 64), 1);
    assert_eq!(t.bytes(), 0);
}

#[test]
fn a_key_moving_to_a_larger_class_loses_no_concurrent_hit() {
    let spec = WindowSpec::new(Nanos::from_secs(1), 11).unwrap();
    let t: std::sync::Arc<KeyTable> = std::sync::Arc::new(KeyTable::new(spec, 8, 64).unwrap());
    let now = Nanos::from_secs(5_000);
    let threads: Vec<_> = (0..4u16)
        .map(|slot| {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in 0..2_000u64 {
                    let at = now + Nanos::from_millis(i % 1000);
                    let mut e = t.get_or_insert(KeyDigest(99), at);
                    // Slot and bucket spread so the key grows meanwhile.
                    let epoch = spec.epoch(now) - (i % 11);
                    let v = e.get((epoch % 11) as usize, usize::from(slot));
                    Ring::merge(
                        &mut e,
                        &spec,
                        now,
                        1,
                        epoch,
                        NodeSlot::new(slot),
                        PnSlot { p: v.p + 1, n: 0 },
                    );
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let mut out = vec![0u64; 11];
    Ring::read(&t.get(KeyDigest(99)).unwrap(), &spec, now, &mut out);
    assert_eq!(out.iter().sum::<u64>(), 8_000);
    assert_eq!(t.len(), 1);
}

#[test]
fn the_memory_budget_evicts_across_tables_and_keeps_usage() {
    // The tables' eviction sketches (256 KiB each at this capacity) are
    // charged too, once there is one.
    const LIMIT: usize = 512 * 1024;
    let budget = std::sync::Arc::new(MemoryBudget::new(Some(LIMIT)));
    let spec = WindowSpec::new(Nanos::from_secs(1), 2).unwrap();
    let a = std::sync::Arc::new(
        KeyTable::<DashMapIndex>::new(spec, 3, 8000)
            .unwrap()
            .with_budget(budget.clone()),
    );
    let b = std::sync::Arc::new(
        KeyTable::<DashMapIndex>::new(spec, 3, 8000)
            .unwrap()
            .with_budget(budget.clone()),
    );
    budget.register(std::sync::Arc::downgrade(&a) as std::sync::Weak<dyn Reclaim>);
    budget.register(std::sync::Arc::downgrade(&b) as std::sync::Weak<dyn Reclaim>);
    let now = Nanos::from_secs(100);
    for key in 1..=7_000u64 {
        let mut e = a.get_or_insert(KeyDigest(key), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 2);
    }
    let per_key = 64 + INDEX_BYTES_PER_KEY;
    // A filled the budget; the sketch of what it evicted is charged too.
    assert!(budget.used() <= LIMIT + per_key, "{}", budget.used());
    assert!(a.len() < 7_000 && a.len() > 100, "{}", a.len());
    assert_eq!(
        a.stats().evictions.load(Ordering::Relaxed),
        0,
        "not by max_keys"
    );
    assert!(budget.evictions() > 0);
    let a_before = a.len();
    // B's new keys are paid for by A, which holds the most.
    for key in 1..=50u64 {
        drop(b.get_or_insert(KeyDigest(key), now));
    }
    assert_eq!(b.len(), 50);
    assert!(a.len() < a_before);
    assert!(budget.used() <= LIMIT + per_key);
    // An evicted key of A comes back with its usage, not a fresh budget.
    assert!(hits(&a, 1, now) >= 2 || a.get(KeyDigest(1)).is_none());
    drop(a.get_or_insert(KeyDigest(1), now));
    assert!(hits(&a, 1, now) >= 2, "{}", hits(&a, 1, now));
    // Dropping a table gives its bytes back.
    drop(a);
    assert_eq!(budget.used(), b.bytes());
    assert!(
        budget.used() <= 50 * per_key + 256 * 1024,
        "{}",
        budget.used()
    );
}

#[test]
fn keys_keep_their_own_counts() {
    let t = table(16);
    let now = Nanos::from_secs(100);
    for key in 1..=5u64 {
        let mut e = t.get_or_insert(KeyDigest(key), now);
        Ring::add(
            &mut e,
            &WindowSpec::new(Nanos::from_secs(1), 2).unwrap(),
            now,
            NodeSlot::new(1),
            key as u32,
        );
    }
    for key in 1..=5u64 {
        assert_eq!(hits(&t, key, now), key);
    }
    assert_eq!(t.len(), 5);
}

#[test]
fn a_full_table_evicts_instead_of_growing() {
    let t = table(8);
    let spec = *t.spec();
    let now = Nanos::from_secs(100);
    for key in 1..=100u64 {
        let mut e = t.get_or_insert(KeyDigest(key), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
    }
    assert!(t.len() <= 8, "{} keys tracked", t.len());
    assert!(t.stats().evictions.load(Ordering::Relaxed) >= 92);
    // The newest key survived.
    assert_eq!(hits(&t, 100, now), 1);
}

#[test]
fn an_evicted_key_comes_back_with_its_usage_not_a_fresh_budget() {
    let t = table(64);
    let spec = *t.spec();
    let now = Nanos::from_secs(100);
    let victim = 0xdead_beef;
    {
        let mut e = t.get_or_insert(KeyDigest(victim), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 9);
    }
    // A flood of new keys, each hit once, pushes the victim out.
    for key in 1..=1_000u64 {
        let mut e = t.get_or_insert(KeyDigest(key), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
    }
    assert!(t.get(KeyDigest(victim)).is_none(), "the victim was evicted");
    assert!(t.stats().evictions.load(Ordering::Relaxed) > 0);
    drop(t.get_or_insert(KeyDigest(victim), now));
    assert!(hits(&t, victim, now) >= 9, "{}", hits(&t, victim, now));
    assert!(t.stats().restored.load(Ordering::Relaxed) >= 1);
    // Once its window has passed the key owes nothing.
    let later = Nanos::from_secs(103);
    for key in 2_000..2_100u64 {
        drop(t.get_or_insert(KeyDigest(key), later));
    }
    drop(t.get(KeyDigest(victim)));
    let fresh = 0x1234_5678;
    drop(t.get_or_insert(KeyDigest(fresh), later));
    assert_eq!(hits(&t, fresh, later), 0);
}

#[test]
fn restored_estimates_do_not_feed_on_themselves() {
    // A flood far larger than the sketch: every fresh key collides with
    // evicted ones. Each key was hit once, so no estimate may exceed 1
    // however many rounds of eviction and restoring go by.
    let t = table(64);
    let spec = *t.spec();
    let now = Nanos::from_secs(100);
    for key in 1..=20_000u64 {
        let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut e = t.get_or_insert(KeyDigest(key), now);
        let before = {
            let mut out = [0u64; 2];
            Ring::read(&e, &spec, now, &mut out);
            out.iter().sum::<u64>()
        };
        assert!(before <= 1, "a fresh key starts at {before}");
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
    }
    assert!(t.stats().restored.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_full_table_frees_idle_keys_before_live_ones() {
    let t = table(8);
    let spec = *t.spec();
    let old = Nanos::from_secs(100);
    for key in 1..=4u64 {
        let mut e = t.get_or_insert(KeyDigest(key), old);
        Ring::add(&mut e, &spec, old, NodeSlot::new(0), 1);
    }
    let now = Nanos::from_secs(103);
    for key in 5..=8u64 {
        let mut e = t.get_or_insert(KeyDigest(key), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
    }
    for key in 9..=12u64 {
        drop(t.get_or_insert(KeyDigest(key), now));
    }
    for key in 5..=8u64 {
        assert_eq!(hits(&t, key, now), 1, "live key {key} was kept");
    }
    assert_eq!(t.stats().evictions.load(Ordering::Relaxed), 0);
}

#[test]
fn expired_keys_are_swept_and_their_entries_reused() {
    let t = table(4);
    let spec = *t.spec();
    let now = Nanos::from_secs(100);
    for key in 1..=4u64 {
        let mut e = t.get_or_insert(KeyDigest(key), now);
        Ring::add(&mut e, &spec, now, NodeSlot::new(0), 1);
    }
    let later = Nanos::from_secs(103);
    assert_eq!(t.sweep(later, 10), 4);
    assert!(t.is_empty());
    let _ = t.get_or_insert(KeyDigest(77), later);
    assert_eq!(t.len(), 1);
    assert_eq!(t.stats().evictions.load(Ordering::Relaxed), 0);
    assert_eq!(t.stats().expirations.load(Ordering::Relaxed), 4);
}

#[test]
fn inflight_hits_move_from_unshipped_to_settled() {
    let t = table(4);
    let mut e = t.get_or_insert(KeyDigest(9), Nanos::from_secs(100));
    e.add_unshipped(3);
    assert_eq!(e.inflight(), 3);
    assert_eq!(e.ship(), 3);
    e.add_unshipped(2);
    assert_eq!(e.inflight(), 5);
    e.settle(3);
    assert_eq!(e.inflight(), 2);
    e.settle(10);
    assert_eq!(e.inflight(), 2, "unshipped hits cannot be settled");
    assert!(e.mark_dirty());
    assert!(!e.mark_dirty());
    assert!(e.take_dirty());
    e.set_confirming(true);
    assert!(e.is_confirming());
    assert_eq!(e.inflight(), 2, "flags leave the counters alone");
    e.set_confirming(false);
    assert!(!e.is_confirming());
    e.add_unshipped(MAX_INFLIGHT);
    assert!(!e.is_confirming(), "saturated counters stay in their bits");
}

#[test]
fn epochs_survive_the_lock_bit() {
    let t = table(4);
    let spec = *t.spec();
    let now = Nanos::from_secs(1 << 33);
    let mut e = t.get_or_insert(KeyDigest(5), now);
    Ring::add(&mut e, &spec, now, NodeSlot::new(2), 4);
    drop(e);
    assert_eq!(hits(&t, 5, now), 4);
    assert_eq!(hits(&t, 5, now + Nanos::from_secs(1)), 4);
    assert_eq!(hits(&t, 5, now + Nanos::from_secs(2)), 0);
}

#[test]
fn bad_sizes_are_refused() {
    let spec = WindowSpec::new(Nanos::from_secs(1), 2).unwrap();
    assert_eq!(
        KeyTable::<DashMapIndex>::new(spec, 3, 0).err(),
        Some(TableError::ZeroCapacity)
    );
    assert_eq!(
        KeyTable::<DashMapIndex>::new(spec, 0, 1).err(),
        Some(TableError::ZeroSlots)
    );
    assert_eq!(
        KeyTable::<DashMapIndex>::new(spec, 65_537, 1).err(),
        Some(TableError::TooManySlots)
    );
    assert!(KeyTable::<DashMapIndex>::new(spec, 65_536, 1).is_ok());
}

/// Memory per key for a key every node touches in every bucket of a
/// one-second sliding window of precision 10 (11 buckets): the worst case
/// of a hot key, which DESIGN.md ("Past 64 nodes") reports. Slots below 64
/// take a word per value, the others two; the entry is the smallest size
/// class (a power of two of words) that holds the header and the cells.
/// `cargo test -p drl-core --lib memory_of_a_key_every_node_touches -- --nocapture`
/// prints the table.
#[test]
fn memory_of_a_key_every_node_touches() {
    // 100 ms buckets, 11 of them: what `window = "1s", precision = 10` keeps.
    let spec = WindowSpec::new(Nanos::from_millis(100), 11).unwrap();
    let buckets = spec.buckets();
    println!("nodes | cell words | entry bytes | bytes per key (with the index)");
    for nodes in [3usize, 20, 64, 256] {
        let t: KeyTable = KeyTable::new(spec, nodes, 4).unwrap();
        let now = Nanos::from_secs(1_000);
        let epoch = spec.epoch(now);
        for back in (0..buckets as u64).rev() {
            for slot in 0..nodes {
                let mut e = t.get_or_insert(KeyDigest(1), now);
                let value = PnSlot {
                    p: 1 + slot as u32,
                    n: 0,
                };
                Ring::merge(
                    &mut e,
                    &spec,
                    now,
                    1,
                    epoch - back,
                    NodeSlot::new(slot as u16),
                    value,
                );
            }
        }
        let e = t.get(KeyDigest(1)).unwrap();
        let (words, bytes) = e.footprint();
        drop(e);
        let want_words = buckets * (nodes.min(64) + 2 * nodes.saturating_sub(64));
        assert_eq!(words, want_words, "{nodes} nodes");
        let class = (HEADER_WORDS + want_words)
            .next_power_of_two()
            .max(CLASS0_WORDS);
        assert_eq!(bytes, class * 4, "{nodes} nodes");
        assert_eq!(t.bytes(), bytes + INDEX_BYTES_PER_KEY);
        println!(
            "{nodes:5} | {words:10} | {bytes:11} | {}",
            bytes + INDEX_BYTES_PER_KEY
        );
    }
}
