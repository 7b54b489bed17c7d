//! The CRDT laws of the replicated counters, as properties.
//!
//! `SlotCounter` is a PN-counter with one slot per node, and `BucketWindow` a
//! ring of such counters per time bucket. Both must merge commutatively,
//! associatively and idempotently, and replicas that saw the same slot values
//! in any order, any number of times, must read the same. The oracle is
//! `crdts`' own machinery.
//!
//! The oracle is `crdts::PNCounter` (its value), with the two version
//! vectors it is built from (`crdts::VClock`, the state of a `GCounter`)
//! kept beside it to compare every slot, fed through crdts' op-based
//! interface and merged through its `CvRDT::merge`.

use crdts::{CmRDT, CvRDT, Dot, VClock};
use drl_core::slot::{NodeSlot, PnSlot, SlotCounter};
use drl_core::time::Nanos;
use drl_core::window::{BucketWindow, MergeOutcome, WindowSpec};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Case count: `PROPTEST_CASES` if set, else `default` (sized so that the
/// whole file stays well under the CI time budget in a debug build).
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Next to this file: tests/<name>.proptest-regressions (committed).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// SlotCounter: the join-semilattice laws.

fn slot_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0u32..1_000,
        1 => (u32::MAX - 4)..=u32::MAX,
    ]
}

/// An arbitrary replica state: whatever slot values it happened to learn.
fn counter() -> impl Strategy<Value = SlotCounter> {
    prop::collection::vec((0u16..6, slot_value(), slot_value()), 0..10).prop_map(|learned| {
        let mut c = SlotCounter::new();
        for (slot, p, n) in learned {
            c.merge_slot(NodeSlot::new(slot), PnSlot { p, n });
        }
        c
    })
}

fn join(a: &SlotCounter, b: &SlotCounter) -> SlotCounter {
    let mut c = a.clone();
    c.merge_from(b);
    c
}

fn join_cv(a: &SlotCounter, b: &SlotCounter) -> SlotCounter {
    let mut c = a.clone();
    c.validate_merge(b).expect("slot counters always merge");
    CvRDT::merge(&mut c, b.clone());
    c
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn slot_counter_merge_is_commutative(a in counter(), b in counter()) {
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join_cv(&a, &b), join_cv(&b, &a));
        prop_assert_eq!(join(&a, &b), join_cv(&a, &b));
    }

    #[test]
    fn slot_counter_merge_is_associative(a in counter(), b in counter(), c in counter()) {
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join_cv(&join_cv(&a, &b), &c), join_cv(&a, &join_cv(&b, &c)));
    }

    #[test]
    fn slot_counter_merge_is_idempotent(a in counter(), b in counter()) {
        prop_assert_eq!(join(&a, &a), a.clone());
        prop_assert_eq!(join_cv(&a, &a), a.clone());
        let ab = join(&a, &b);
        prop_assert_eq!(join(&ab, &b), ab.clone());
        prop_assert_eq!(join(&ab, &a), ab.clone());
    }

    /// The join is an upper bound: it covers both sides slot by slot, and is
    /// the least such (every slot equals one side's value).
    #[test]
    fn slot_counter_merge_is_the_least_upper_bound(a in counter(), b in counter()) {
        let ab = join(&a, &b);
        for i in 0..ab.slots().len() {
            let s = NodeSlot::new(i as u16);
            prop_assert!(ab.slot(s).covers(a.slot(s)));
            prop_assert!(ab.slot(s).covers(b.slot(s)));
            prop_assert_eq!(ab.slot(s).p, a.slot(s).p.max(b.slot(s).p));
            prop_assert_eq!(ab.slot(s).n, a.slot(s).n.max(b.slot(s).n));
        }
    }
}

// ---------------------------------------------------------------------------
// SlotCounter: delta replication with reordering, duplicates and loss.

/// One local operation by the owner of a slot.
#[derive(Clone, Copy, Debug)]
struct LocalOp {
    node: u16,
    refund: bool,
    hits: u32,
}

fn local_ops(nodes: u16) -> impl Strategy<Value = Vec<LocalOp>> {
    prop::collection::vec(
        (0..nodes, prop::bool::weighted(0.3), 1u32..20).prop_map(|(node, refund, hits)| LocalOp {
            node,
            refund,
            hits,
        }),
        1..60,
    )
}

/// The ops, and for each of `replicas` receivers a delivery schedule: indices
/// into the delta log, in any order, with repeats, some missing (lost). The
/// first receiver's schedule is complete (every delta at least once).
fn delta_scenario(
    nodes: u16,
    replicas: usize,
) -> impl Strategy<Value = (Vec<LocalOp>, Vec<usize>, Vec<Vec<usize>>)> {
    local_ops(nodes).prop_flat_map(move |ops| {
        let n = ops.len();
        let complete = (
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            prop::collection::vec(0..n, 0..n),
        )
            .prop_map(|(mut all, dups)| {
                for (k, d) in dups.into_iter().enumerate() {
                    // Duplicates land anywhere, including before the original.
                    all.insert((k * 7) % (all.len() + 1), d);
                }
                all
            });
        let lossy = prop::collection::vec(prop::collection::vec(0..n, 0..2 * n), replicas);
        (Just(ops), complete, lossy)
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn slot_counter_replicas_converge_under_reordered_duplicated_and_lost_deltas(
        (ops, complete, lossy) in delta_scenario(4, 3)
    ) {
        // Owners apply their ops and ship their own slot's value after each.
        let mut owners: Vec<SlotCounter> = (0..4).map(|_| SlotCounter::new()).collect();
        let mut deltas: Vec<(NodeSlot, PnSlot)> = Vec::new();
        let mut expected: i64 = 0;
        for op in &ops {
            let own = NodeSlot::new(op.node);
            let owner = &mut owners[usize::from(op.node)];
            if op.refund {
                owner.refund(own, op.hits);
                expected -= i64::from(op.hits);
            } else {
                owner.add(own, op.hits);
                expected += i64::from(op.hits);
            }
            deltas.push((own, owner.slot(own)));
        }
        let mut truth = SlotCounter::new();
        for o in &owners {
            truth.merge_from(o);
        }
        prop_assert_eq!(truth.value(), expected);

        // A receiver that got every delta, in any order and with repeats,
        // needs no repair.
        let mut full = SlotCounter::new();
        for &i in &complete {
            let (slot, value) = deltas[i];
            full.merge_slot(slot, value);
        }
        prop_assert_eq!(&full, &truth);

        // Lossy receivers: the owners themselves (they also hear stale values
        // of their own slot, which must not roll them back) and observers.
        let mut receivers: Vec<SlotCounter> = owners.clone();
        receivers.extend((0..lossy.len()).map(|_| SlotCounter::new()));
        for (r, receiver) in receivers.iter_mut().enumerate() {
            let schedule = &lossy[r % lossy.len()];
            for &i in schedule {
                let (slot, value) = deltas[i];
                receiver.merge_slot(slot, value);
            }
            // Whatever was lost, what arrived never overshoots the truth.
            for i in 0..receiver.slots().len() {
                let s = NodeSlot::new(i as u16);
                prop_assert!(truth.slot(s).covers(receiver.slot(s)));
            }
        }
        // Anti-entropy: a full-state merge from every owner repairs the loss.
        for receiver in receivers.iter_mut() {
            for o in &owners {
                CvRDT::merge(receiver, o.clone());
            }
        }
        for receiver in &receivers {
            prop_assert_eq!(receiver.slots(), truth.slots());
            prop_assert_eq!(receiver.value(), expected);
        }
    }
}

// ---------------------------------------------------------------------------
// SlotCounter against crdts.

/// `crdts::PNCounter`, plus the per-actor version vectors of its two halves
/// so that slots can be compared one by one.
#[derive(Clone, Debug, Default)]
struct OraclePn {
    pn: crdts::PNCounter<u16>,
    p: VClock<u16>,
    n: VClock<u16>,
}

impl OraclePn {
    /// The op `GCounter::inc_many(actor, steps)` would make.
    fn inc_many_op(clock: &VClock<u16>, actor: u16, steps: u64) -> Dot<u16> {
        Dot::new(actor, clock.get(&actor) + steps)
    }
    fn inc_many(&mut self, actor: u16, steps: u64) {
        let op = Self::inc_many_op(&self.p, actor, steps);
        self.p.apply(op);
        let op = self.pn.inc_many(actor, steps);
        self.pn.apply(op);
    }
    fn dec_many(&mut self, actor: u16, steps: u64) {
        let op = Self::inc_many_op(&self.n, actor, steps);
        self.n.apply(op);
        let op = self.pn.dec_many(actor, steps);
        self.pn.apply(op);
    }
    /// `PNCounter::read`, a `BigInt`, as an `i128`.
    fn read(&self) -> i128 {
        self.pn
            .read()
            .to_string()
            .parse()
            .expect("a PN-counter of u32 steps fits in i128")
    }
}

impl CvRDT for OraclePn {
    type Validation = std::convert::Infallible;
    fn validate_merge(&self, _other: &Self) -> Result<(), Self::Validation> {
        Ok(())
    }
    fn merge(&mut self, other: Self) {
        self.pn.merge(other.pn);
        self.p.merge(other.p);
        self.n.merge(other.n);
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// Replica `replica` counts on its own slot (actor = node slot).
    Op {
        replica: usize,
        refund: bool,
        hits: u32,
    },
    /// Replica `into` merges the full state of replica `from`.
    Merge { into: usize, from: usize },
}

fn events(replicas: usize) -> impl Strategy<Value = Vec<Event>> {
    let op =
        (0..replicas, prop::bool::weighted(0.35), 1u32..50).prop_map(|(replica, refund, hits)| {
            Event::Op {
                replica,
                refund,
                hits,
            }
        });
    let merge = (0..replicas, 0..replicas).prop_map(|(into, from)| Event::Merge { into, from });
    prop::collection::vec(prop_oneof![3 => op, 2 => merge], 0..80)
}

fn assert_agrees(
    ours: &SlotCounter,
    oracle: &OraclePn,
    actors: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(i128::from(ours.value()), oracle.read());
    for a in 0..actors {
        let slot = ours.slot(NodeSlot::new(a as u16));
        prop_assert_eq!(
            u64::from(slot.p),
            oracle.p.get(&(a as u16)),
            "p of actor {}",
            a
        );
        prop_assert_eq!(
            u64::from(slot.n),
            oracle.n.get(&(a as u16)),
            "n of actor {}",
            a
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn slot_counter_reads_as_the_crdts_pn_counter((replicas, evs) in (2usize..5).prop_flat_map(|r| (Just(r), events(r)))) {
        let mut ours: Vec<SlotCounter> = (0..replicas).map(|_| SlotCounter::new()).collect();
        let mut oracle: Vec<OraclePn> = (0..replicas).map(|_| OraclePn::default()).collect();
        let mut total: i128 = 0;
        for ev in &evs {
            match *ev {
                Event::Op { replica, refund, hits } => {
                    let own = NodeSlot::new(replica as u16);
                    if refund {
                        ours[replica].refund(own, hits);
                        oracle[replica].dec_many(replica as u16, u64::from(hits));
                        total -= i128::from(hits);
                    } else {
                        ours[replica].add(own, hits);
                        oracle[replica].inc_many(replica as u16, u64::from(hits));
                        total += i128::from(hits);
                    }
                }
                Event::Merge { into, from } => {
                    let theirs = ours[from].clone();
                    CvRDT::merge(&mut ours[into], theirs);
                    let theirs = oracle[from].clone();
                    oracle[into].merge(theirs);
                }
            }
            for r in 0..replicas {
                assert_agrees(&ours[r], &oracle[r], replicas)?;
            }
        }
        // Everyone merges everyone, in two different orders: same result, and
        // the oracle agrees on the total.
        let mut forward = SlotCounter::new();
        let mut backward = SlotCounter::new();
        let mut oracle_all = OraclePn::default();
        for r in 0..replicas {
            forward.merge_from(&ours[r]);
            backward.merge_from(&ours[replicas - 1 - r]);
            oracle_all.merge(oracle[r].clone());
        }
        prop_assert_eq!(&forward, &backward);
        assert_agrees(&forward, &oracle_all, replicas)?;
        prop_assert_eq!(i128::from(forward.value()), total);
    }
}

// ---------------------------------------------------------------------------
// BucketWindow: the same laws, per bucket, with time.

const G_MS: u64 = 100;
const BUCKETS: usize = 4;
/// A bucket-aligned start far from zero.
const T0: Nanos = Nanos::from_secs(10_000);

fn spec() -> WindowSpec {
    WindowSpec::new(Nanos::from_millis(G_MS), BUCKETS).unwrap()
}

fn read(w: &BucketWindow, now: Nanos) -> Vec<u64> {
    let mut out = vec![0; w.spec().buckets()];
    w.read(now, &mut out);
    out
}

/// What the window at `now` should hold: the hits of each live bucket.
fn expected_read(hits: &[(Nanos, u16, u32)], now: Nanos) -> Vec<u64> {
    let s = spec();
    let now_epoch = s.epoch(now);
    (0..BUCKETS)
        .map(|i| {
            let e = now_epoch + 1 + i as u64 - BUCKETS as u64;
            hits.iter()
                .filter(|(t, _, _)| s.epoch(*t) == e)
                .map(|&(_, _, h)| u64::from(h))
                .sum()
        })
        .collect()
}

/// The live slot values of a window as seen at `now`, sorted: the "slot
/// arrays" two replicas must agree on.
fn live_at(w: &BucketWindow, now: Nanos) -> Vec<(u64, NodeSlot, PnSlot)> {
    let now_epoch = spec().epoch(now);
    let mut v: Vec<_> = w
        .live_slots()
        .filter(|&(e, _, _)| e <= now_epoch && now_epoch - e < BUCKETS as u64)
        .collect();
    v.sort_by_key(|&(e, s, _)| (e, s));
    v
}

type Delta = Vec<(u64, NodeSlot, PnSlot)>;
/// What `run_nodes` returns: each node's window, the deltas it shipped, and
/// the adds it did (time, node, count).
type NodeRun = (
    Vec<BucketWindow>,
    Vec<(Nanos, Delta)>,
    Vec<(Nanos, u16, u32)>,
);

/// Adds by `nodes` nodes at increasing times, each node recording its own
/// window's full `live_slots()` after every add (the delta it would ship).
fn run_nodes(nodes: usize, adds: &[(u64, u16, u32)]) -> NodeRun {
    let mut windows: Vec<BucketWindow> = (0..nodes)
        .map(|_| BucketWindow::new(spec(), nodes))
        .collect();
    let mut deltas = Vec::new();
    let mut log = Vec::new();
    let mut sorted = adds.to_vec();
    sorted.sort_by_key(|&(t, _, _)| t);
    for (offset, node, hits) in sorted {
        let now = T0 + Nanos::new(offset);
        let node = node % nodes as u16;
        let w = &mut windows[usize::from(node)];
        w.add(now, NodeSlot::new(node), hits);
        deltas.push((now, w.live_slots().collect()));
        log.push((now, node, hits));
    }
    (windows, deltas, log)
}

fn window_adds(max_offset: u64) -> impl Strategy<Value = Vec<(u64, u16, u32)>> {
    prop::collection::vec((0..max_offset, 0u16..4, 1u32..5), 1..40)
}

proptest! {
    #![proptest_config(config(256))]

    /// Everything inside one window span: nothing expires, every delta stays
    /// live, so reordering, duplicates and loss (then repair) are the only
    /// variables.
    #[test]
    fn bucket_window_replicas_converge_within_one_span(
        nodes in 2usize..5,
        (adds, schedules) in window_adds(spec().span().as_u64()).prop_flat_map(|adds| {
            let n = adds.len();
            (Just(adds), prop::collection::vec(prop::collection::vec(0..n, 0..3 * n), 6))
        }),
    ) {
        let (windows, deltas, log) = run_nodes(nodes, &adds);
        let end = T0 + spec().span() - Nanos::new(1);
        let want = expected_read(&log, end);
        prop_assert_eq!(want.iter().sum::<u64>(), log.iter().map(|&(_, _, h)| u64::from(h)).sum::<u64>());

        // Receivers: every node's own window and an observer that starts
        // with a single slot column (and must grow).
        let mut receivers: Vec<BucketWindow> = windows.clone();
        receivers.push(BucketWindow::new(spec(), 1));
        for (r, receiver) in receivers.iter_mut().enumerate() {
            for &i in &schedules[r % schedules.len()] {
                for &(epoch, slot, value) in &deltas[i].1 {
                    let first = receiver.merge(end, 1, epoch, slot, value);
                    prop_assert_ne!(first, MergeOutcome::TooFarAhead);
                    // The same value again changes nothing.
                    prop_assert_eq!(receiver.merge(end, 1, epoch, slot, value), MergeOutcome::Stale);
                }
            }
            // Loss or not, nothing is over-counted.
            let got = read(receiver, end);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!(g <= w, "receiver {} read {:?}, truth {:?}", r, got, want);
            }
        }
        // Full-state repair from every node.
        for receiver in receivers.iter_mut() {
            for w in &windows {
                for (epoch, slot, value) in w.live_slots() {
                    receiver.merge(end, 1, epoch, slot, value);
                }
            }
        }
        let reference = live_at(&receivers[0], end);
        for (r, receiver) in receivers.iter().enumerate() {
            prop_assert_eq!(read(receiver, end), want.clone(), "receiver {}", r);
            prop_assert_eq!(live_at(receiver, end), reference.clone(), "receiver {}", r);
        }
    }

    /// Time moves on: adds over several spans, deltas delivered late (each
    /// copy with its own delay), duplicated or lost, buckets expiring at the
    /// receivers meanwhile; a full-state repair at the end.
    #[test]
    fn bucket_window_replicas_converge_as_buckets_expire(
        nodes in 2usize..5,
        (adds, deliveries) in window_adds(4 * spec().span().as_u64()).prop_flat_map(|adds| {
            let n = adds.len();
            // Per (delta, receiver): how many copies (0 = lost) and their delays.
            let copy = (0usize..4, 0..2 * spec().span().as_u64(), 0..2 * spec().span().as_u64());
            (Just(adds), prop::collection::vec(copy, n * 5))
        }),
    ) {
        let (windows, deltas, log) = run_nodes(nodes, &adds);
        let receivers_n = nodes + 1;
        // Each receiver's inbox: (arrival time, delta index).
        let mut inbox: Vec<Vec<(Nanos, usize)>> = vec![Vec::new(); receivers_n];
        for (i, (created, _)) in deltas.iter().enumerate() {
            for (r, inbox) in inbox.iter_mut().enumerate() {
                let (copies, d1, d2) = deliveries[(i * receivers_n + r) % deliveries.len()];
                let copies = copies.saturating_sub(1); // 0 or 1 copy lost; up to 2 kept
                for c in 0..copies {
                    let delay = if c == 0 { d1 } else { d2 };
                    inbox.push((*created + Nanos::new(delay), i));
                }
            }
        }
        let last = log.iter().map(|&(t, _, _)| t).max().unwrap();
        let end = inbox
            .iter()
            .flatten()
            .map(|&(t, _)| t)
            .max()
            .unwrap_or(last)
            .max(last);

        // Replay each receiver's timeline: its own adds (if it is a node) and
        // its arrivals, in time order (adds first at equal times).
        let mut receivers: Vec<BucketWindow> =
            (0..receivers_n).map(|r| BucketWindow::new(spec(), if r < nodes { nodes } else { 1 })).collect();
        for (r, receiver) in receivers.iter_mut().enumerate() {
            let mut timeline: Vec<(Nanos, u8, usize)> = Vec::new();
            for (k, &(t, node, _)) in log.iter().enumerate() {
                if usize::from(node) == r {
                    timeline.push((t, 0, k));
                }
            }
            timeline.extend(inbox[r].iter().map(|&(t, i)| (t, 1, i)));
            timeline.sort();
            for (now, kind, k) in timeline {
                if kind == 0 {
                    let (_, node, hits) = log[k];
                    receiver.add(now, NodeSlot::new(node), hits);
                } else {
                    for &(epoch, slot, value) in &deltas[k].1 {
                        // All clocks agree here: nothing can be ahead.
                        prop_assert_ne!(receiver.merge(now, 1, epoch, slot, value), MergeOutcome::TooFarAhead);
                    }
                }
            }
            let want = expected_read(&log, end);
            let got = read(receiver, end);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!(g <= w, "receiver {} read {:?}, truth {:?}", r, got, want);
            }
        }
        // Anti-entropy at `end`.
        for receiver in receivers.iter_mut() {
            for w in &windows {
                for (epoch, slot, value) in w.live_slots() {
                    receiver.merge(end, 1, epoch, slot, value);
                }
            }
        }
        let want = expected_read(&log, end);
        let reference = live_at(&receivers[0], end);
        for (r, receiver) in receivers.iter().enumerate() {
            prop_assert_eq!(read(receiver, end), want.clone(), "receiver {}", r);
            prop_assert_eq!(live_at(receiver, end), reference.clone(), "receiver {}", r);
        }
    }
}

/// The window join does not depend on which replica merges into which: two
/// windows exchanging full states end equal, whichever goes first.
#[test]
fn bucket_window_full_state_exchange_is_symmetric() {
    let s = spec();
    let now = T0 + Nanos::from_millis(250);
    let mut a = BucketWindow::new(s, 2);
    let mut b = BucketWindow::new(s, 2);
    a.add(T0, NodeSlot::new(0), 3);
    a.add(now, NodeSlot::new(0), 1);
    b.add(T0 + Nanos::from_millis(120), NodeSlot::new(1), 5);
    b.refund(now, NodeSlot::new(1), 2);

    let mut ab = a.clone();
    for (e, slot, v) in b.live_slots() {
        ab.merge(now, 1, e, slot, v);
    }
    let mut ba = b.clone();
    for (e, slot, v) in a.live_slots() {
        ba.merge(now, 1, e, slot, v);
    }
    assert_eq!(ab, ba);
    assert_eq!(read(&ab, now), vec![0, 3, 3, 1]);
}

/// The key table stores a window as sparse cells in size-class arenas; it
/// must read exactly as the owned window fed the same deltas, whatever
/// their order and duplicates, with values that need wide cells, slots past
/// 63 that need extended cells, and keys that grow through several classes
/// on the way.
fn table_deltas(slot: BoxedStrategy<u16>) -> impl Strategy<Value = Vec<(u64, u16, u32, u32)>> {
    // (bucket back from the newest, slot, p, n): p spans narrow and wide.
    prop::collection::vec(
        (
            0u64..BUCKETS as u64,
            slot,
            prop_oneof![1u32..100, 100_000u32..300_000, Just(u32::MAX)],
            0u32..3,
        ),
        1..120,
    )
}

/// Slots either side of every cell form's edge: compact (below 64) and
/// extended (64 up to `u16::MAX`).
fn wide_slot() -> BoxedStrategy<u16> {
    prop::sample::select(vec![0u16, 1, 63, 64, 255, 1000, 65534, 65535]).boxed()
}

/// Feeds `deltas` (each once, then the repeats in `order`) to a key table
/// of `width` slots and to the owned window; both must read the same.
fn table_reads_as_the_window(
    width: usize,
    deltas: &[(u64, u16, u32, u32)],
    order: &[prop::sample::Index],
) -> Result<(), TestCaseError> {
    use drl_core::limiter::KeyTable;
    use drl_core::window::Ring;
    let s = spec();
    let now = T0 + Nanos::from_millis(G_MS * BUCKETS as u64 - 1);
    let newest = s.epoch(now);
    let mut oracle = BucketWindow::new(s, width);
    let table: KeyTable = KeyTable::new(s, width, 4).unwrap();
    let feed = (0..deltas.len()).chain(order.iter().map(|i| i.index(deltas.len())));
    for i in feed {
        let (back, slot, p, n) = deltas[i];
        let value = PnSlot { p, n };
        let epoch = newest - back;
        let mut e = table.get_or_insert(drl_core::key::KeyDigest(7), now);
        let got = Ring::merge(&mut e, &s, now, 1, epoch, NodeSlot::new(slot), value);
        let want = oracle.merge(now, 1, epoch, NodeSlot::new(slot), value);
        prop_assert_eq!(got, want);
    }
    let e = table.get(drl_core::key::KeyDigest(7)).unwrap();
    let mut out = vec![0; BUCKETS];
    Ring::read(&e, &s, now, &mut out);
    prop_assert_eq!(out, read(&oracle, now));
    let mut shares = vec![0u64; width];
    let mut want_shares = vec![0u64; width];
    Ring::slot_hits(&e, &s, now, &mut shares);
    Ring::slot_hits(&oracle, &s, now, &mut want_shares);
    prop_assert_eq!(shares, want_shares);
    prop_assert_eq!(table.len(), 1);
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn key_table_reads_as_the_owned_window_under_reordered_duplicated_deltas(
        deltas in table_deltas((0u16..8).boxed()),
        order in prop::collection::vec(any::<prop::sample::Index>(), 1..240),
    ) {
        table_reads_as_the_window(8, &deltas, &order)?;
    }

    #[test]
    fn key_table_reads_as_the_owned_window_with_slots_up_to_the_last(
        deltas in table_deltas(wide_slot()),
        order in prop::collection::vec(any::<prop::sample::Index>(), 1..240),
    ) {
        table_reads_as_the_window(65_536, &deltas, &order)?;
    }
}
