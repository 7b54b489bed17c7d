//! Unit tests of windows and rings.

use super::*;

fn spec(ms: u64, buckets: usize) -> WindowSpec {
    WindowSpec::new(Nanos::from_millis(ms), buckets).unwrap()
}

fn read(w: &BucketWindow, now: Nanos) -> Vec<u64> {
    let mut out = vec![0; w.spec().buckets()];
    w.read(now, &mut out);
    out
}

#[test]
fn buckets_follow_absolute_time() {
    let mut w = BucketWindow::new(spec(1000, 2), 3);
    let t = Nanos::from_millis(10_500);
    w.add(t, NodeSlot::new(0), 2);
    assert_eq!(read(&w, t), vec![0, 2]);
    // Next second: the hits move to the previous bucket.
    assert_eq!(read(&w, Nanos::from_millis(11_000)), vec![2, 0]);
    // Two seconds on they have dropped out on their own.
    assert_eq!(read(&w, Nanos::from_millis(12_000)), vec![0, 0]);
}

#[test]
fn advancing_wipes_only_passed_rows() {
    let mut w = BucketWindow::new(spec(1000, 3), 1);
    w.add(Nanos::from_millis(0), NodeSlot::new(0), 1);
    w.add(Nanos::from_millis(1000), NodeSlot::new(0), 2);
    w.add(Nanos::from_millis(3000), NodeSlot::new(0), 4);
    // Epoch 0 was wiped when epoch 3 took its row; epoch 1 survives.
    assert_eq!(read(&w, Nanos::from_millis(3000)), vec![2, 0, 4]);
}

#[test]
fn refunds_never_exceed_what_is_counted() {
    let mut w = BucketWindow::new(spec(1000, 2), 2);
    w.add(Nanos::from_millis(0), NodeSlot::new(0), 3);
    w.add(Nanos::from_millis(1000), NodeSlot::new(0), 1);
    let t = Nanos::from_millis(1500);
    // Through another node: newest bucket first, then the older one.
    assert_eq!(w.refund(t, NodeSlot::new(1), 10), 4);
    assert_eq!(read(&w, t), vec![0, 0]);
}

#[test]
fn merges_are_idempotent_and_ignore_expired_buckets() {
    let mut w = BucketWindow::new(spec(1000, 2), 2);
    let now = Nanos::from_millis(5_000);
    let v = PnSlot { p: 3, n: 0 };
    assert_eq!(
        w.merge(now, 1, 5, NodeSlot::new(1), v),
        MergeOutcome::Applied
    );
    assert_eq!(w.merge(now, 1, 5, NodeSlot::new(1), v), MergeOutcome::Stale);
    assert_eq!(w.merge(now, 1, 2, NodeSlot::new(1), v), MergeOutcome::Stale);
    assert_eq!(
        w.merge(now, 1, 9, NodeSlot::new(1), v),
        MergeOutcome::TooFarAhead
    );
    assert_eq!(read(&w, now), vec![0, 3]);
}

#[test]
fn counts_from_a_clock_ahead_are_not_hidden() {
    let mut w = BucketWindow::new(spec(1000, 2), 2);
    let now = Nanos::from_millis(5_500);
    w.merge(now, 1, 6, NodeSlot::new(1), PnSlot { p: 4, n: 0 });
    w.add(now, NodeSlot::new(0), 1);
    // The local hit lands in the current bucket; the one from ahead is
    // folded into it rather than hidden.
    assert_eq!(read(&w, now), vec![0, 5]);
}

#[test]
fn packed_epochs_unpack_near_now() {
    for bits in [31, 32] {
        let mask = (1u64 << bits) - 1;
        assert_eq!(unpack_epoch(10, 10, bits), 10);
        assert_eq!(unpack_epoch(10, 8, bits), 8);
        assert_eq!(unpack_epoch(10, 12, bits), 12);
        let big = (1u64 << 33) + 5;
        assert_eq!(unpack_epoch(big, ((big - 3) & mask) as u32, bits), big - 3);
        assert_eq!(unpack_epoch(big, ((big + 2) & mask) as u32, bits), big + 2);
    }
}

#[test]
fn epochs_by_reciprocal_equal_division() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for g in [
        1_000_000u64,
        1_000_000_007,
        3_600_000_000_000,
        86_400_000_000_000,
        123_456_789,
    ] {
        let spec = WindowSpec::new(Nanos::new(g), 2).unwrap();
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for t in [
                x,
                x % (g * 5),
                u64::MAX - x % g,
                (x % 1000) * g,
                ((x % 1000) * g).saturating_sub(1),
            ] {
                assert_eq!(spec.epoch(Nanos::new(t)), t / g, "t {t} g {g}");
            }
        }
        assert_eq!(spec.epoch(Nanos::MAX), u64::MAX / g);
        assert_eq!(spec.epoch(Nanos::ZERO), 0);
    }
}

#[test]
fn spec_rejects_nonsense() {
    assert!(WindowSpec::new(Nanos::new(10), 2).is_err());
    assert!(WindowSpec::new(Nanos::from_secs(1), 0).is_err());
    assert!(WindowSpec::new(Nanos::from_secs(1), MAX_BUCKETS + 1).is_err());
}

#[test]
fn slot_column_lists_one_slot_newest_first_without_zeros() {
    let mut w = BucketWindow::new(spec(1000, 3), 3);
    w.add(Nanos::from_millis(10_000), NodeSlot::new(1), 2);
    w.add(Nanos::from_millis(12_000), NodeSlot::new(1), 5);
    w.add(Nanos::from_millis(12_000), NodeSlot::new(0), 7);
    let now = Nanos::from_millis(12_500);
    let (newest, column) = Ring::slot_column(&w, w.spec(), now, NodeSlot::new(1));
    assert_eq!(newest, 12);
    assert_eq!(
        column,
        vec![(0, PnSlot { p: 5, n: 0 }), (2, PnSlot { p: 2, n: 0 })]
    );
    // A slot with nothing counted has an empty column.
    assert!(Ring::slot_column(&w, w.spec(), now, NodeSlot::new(2))
        .1
        .is_empty());
}
