//! The key index under the key table: papaya (the crate's default) and
//! dashmap, side by side in the same group, driving the very same
//! `KeyTable<I>` so that the only difference is the index.
//!
//! Keys are random 64-bit values, as the real SipHash digests are; both
//! indexes use `BuildDigestHasher`, which takes the digest as its hash.
//! Tables hold 1M keys, laid out as a one-second sliding window (two
//! buckets) on three node slots: 64 bytes per entry, as in `benches/decision.rs`.
//!
//! * `hot_get`: `table.get(key)` on one key: index lookup, entry lock, a
//!   read of the entry, unlock.
//! * `random_get_1M`: the same on a key picked at random among the 1M.
//! * `insert_evict_1M`: `table.get_or_insert(new_key, now)` on a full table,
//!   so every insert also evicts one live key (CLOCK) and removes it from
//!   the index.
//!
//! `2_threads` reports wall time ÷ (2 · iters): the time per operation of
//! both threads together (criterion's throughput is their combined rate).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use drl_core::key::KeyDigest;
use drl_core::limiter::index::{BuildDigestHasher, DashMapIndex, KeyIndex};
use drl_core::limiter::KeyTable;
use drl_core::time::Nanos;
use drl_core::window::WindowSpec;

const KEYS: usize = 1_000_000;
const SLOTS: usize = 3;

/// dashmap behind the same trait as papaya.
/// The papaya index the product used before this benchmark picked dashmap:
/// lock-free reads through a pinned guard.
struct PapayaIndex(papaya::HashMap<u64, u32, BuildDigestHasher>);

impl KeyIndex for PapayaIndex {
    fn with_capacity(capacity: usize) -> Self {
        // The same initial size as `DashMapIndex`: both grow as keys arrive.
        PapayaIndex(
            papaya::HashMap::builder()
                .capacity(capacity.min(1 << 16))
                .hasher(BuildDigestHasher)
                .build(),
        )
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        self.0.pin().get(&key).copied()
    }
    fn insert_if_absent(&self, key: u64, entry: u32) -> Result<(), u32> {
        match self.0.pin().try_insert(key, entry) {
            Ok(_) => Ok(()),
            Err(e) => Err(*e.current),
        }
    }
    fn remove_if(&self, key: u64, entry: u32) -> bool {
        matches!(
            self.0.pin().remove_if(&key, |_, &v| v == entry),
            Ok(Some(_))
        )
    }
    fn replace(&self, key: u64, old: u32, new: u32) -> bool {
        self.0
            .pin()
            .update(key, |&v| if v == old { new } else { v })
            .is_some_and(|&v| v == new)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Marsaglia's xorshift64: a handful of cycles, never zero, and its outputs
/// do not repeat within a stream, so they also serve as fresh keys.
struct XorShift(u64);

impl XorShift {
    fn new(stream: u64) -> Self {
        XorShift(
            0x9E37_79B9_7F4A_7C15 ^ (stream.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
        )
    }
    #[inline]
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A number below `n` (multiply-shift: no division).
    #[inline]
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The stored keys: splitmix64 of 0..n, spread like digests and never zero
/// in practice (splitmix64 is a bijection; zero has one preimage, skipped).
fn stored_keys(n: usize) -> Vec<u64> {
    (1..).map(splitmix64).filter(|&k| k != 0).take(n).collect()
}

fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn full_table<I: KeyIndex>(keys: &[u64], now: Nanos) -> KeyTable<I> {
    let spec = WindowSpec::new(Nanos::from_secs(1), 2).expect("valid spec");
    let table = KeyTable::<I>::new(spec, SLOTS, keys.len()).expect("valid table");
    for &k in keys {
        drop(table.get_or_insert(KeyDigest(k), now));
    }
    assert_eq!(table.len(), keys.len());
    table
}

/// See the module docs; thread `t` of round `round` draws from stream
/// `round · threads + t`, so no two samples replay the same keys.
fn run_threads(
    threads: usize,
    round: u64,
    iters: u64,
    op: impl Fn(&mut XorShift) -> u64 + Sync,
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

/// One thread, one stream that runs on across warm-up and samples
/// (criterion calls the routine once per sample).
fn bench_1_thread(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    op: impl Fn(&mut XorShift) -> u64,
) {
    let mut rng = XorShift::new(u64::MAX);
    group.bench_function(format!("{id}/1_thread"), |b| b.iter(|| op(&mut rng)));
}

fn bench_2_threads(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    op: impl Fn(&mut XorShift) -> u64 + Sync,
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
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

/// A locked read of one entry; `u64::MAX` when the key is not tracked.
#[inline]
fn locked_read<I: KeyIndex>(table: &KeyTable<I>, key: u64) -> u64 {
    table.get(KeyDigest(key)).map_or(u64::MAX, |e| e.key().0)
}

/// Runs every workload on both indexes, each workload in one group.
fn keymap(c: &mut Criterion) {
    let now = Nanos::from_secs(1_700_000_000);
    let keys = stored_keys(KEYS);
    let papaya = full_table::<PapayaIndex>(&keys, now);
    let dash = full_table::<DashMapIndex>(&keys, now);
    let hot = keys[42];

    {
        let mut group = c.benchmark_group("keymap/hot_get");
        configure(&mut group);
        bench_1_thread(&mut group, "papaya", |_| locked_read(&papaya, hot));
        bench_1_thread(&mut group, "dashmap", |_| locked_read(&dash, hot));
        bench_2_threads(&mut group, "papaya", |_| locked_read(&papaya, hot));
        bench_2_threads(&mut group, "dashmap", |_| locked_read(&dash, hot));
        group.finish();
    }
    {
        let mut group = c.benchmark_group("keymap/random_get_1M");
        configure(&mut group);
        let pick = |rng: &mut XorShift| keys[rng.below(KEYS)];
        bench_1_thread(&mut group, "papaya", |rng| locked_read(&papaya, pick(rng)));
        bench_1_thread(&mut group, "dashmap", |rng| locked_read(&dash, pick(rng)));
        bench_2_threads(&mut group, "papaya", |rng| locked_read(&papaya, pick(rng)));
        bench_2_threads(&mut group, "dashmap", |rng| locked_read(&dash, pick(rng)));
        group.finish();
    }
    {
        let mut group = c.benchmark_group("keymap/insert_evict_1M");
        configure(&mut group);
        let insert_papaya =
            |rng: &mut XorShift| papaya.get_or_insert(KeyDigest(rng.next_u64()), now).key().0;
        let insert_dash =
            |rng: &mut XorShift| dash.get_or_insert(KeyDigest(rng.next_u64()), now).key().0;
        bench_1_thread(&mut group, "papaya", insert_papaya);
        bench_1_thread(&mut group, "dashmap", insert_dash);
        bench_2_threads(&mut group, "papaya", insert_papaya);
        bench_2_threads(&mut group, "dashmap", insert_dash);
        group.finish();
        for (name, len, evictions) in [
            (
                "papaya",
                papaya.len(),
                papaya.stats().evictions.load(Ordering::Relaxed),
            ),
            (
                "dashmap",
                dash.len(),
                dash.stats().evictions.load(Ordering::Relaxed),
            ),
        ] {
            assert!(len <= KEYS, "{name}: {len} keys in a table of {KEYS}");
            assert!(
                evictions > 0,
                "{name}: inserts into a full table must evict"
            );
        }
    }
}

criterion_group!(benches, keymap);
criterion_main!(benches);
