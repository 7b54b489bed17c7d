//! The key digest: candidate seeded hashes on key-shaped inputs, side by side.
//!
//! Every candidate digests what a request's key is made of: a limit id and
//! the length-prefixed values of the limit's key fields, under a 128-bit
//! seed fixed before measuring (as a cluster's shared seed is).
//!
//! * `siphash13`: the previous key digest, keyed SipHash-1-3 (`siphasher`),
//!   one pass over limit id, lengths and values.
//! * `rapidhash_v3`: the key digest in use (`drl_core::key::KeyHasher`):
//!   rapidhash v3 (protected) of the values, then a bijective mix with the
//!   limit id.
//! * `foldhash_fast`, `foldhash_quality`, `ahash`: the same stream of writes
//!   as SipHash through each crate's seeded `Hasher`.
//!
//! Inputs: one short id (`user-00000042`, 13 bytes), a 36-byte API key, and
//! two values (`user`, `endpoint`).

use std::hash::{BuildHasher, Hasher};
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use drl_core::key::{KeyHasher, KeySeed};
use siphasher::sip::SipHasher13;

const LIMIT_ID: u64 = 0x5eed_1d00_cafe_f00d;

fn stream(h: &mut impl Hasher, values: &[&str]) -> u64 {
    h.write_u64(LIMIT_ID);
    for v in values {
        h.write_u32(v.len() as u32);
        h.write(v.as_bytes());
    }
    h.finish()
}

fn key_hash(c: &mut Criterion) {
    let seed = KeySeed(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    let rapid = KeyHasher::new(seed);
    let fold_fast = foldhash::fast::FixedState::with_seed(seed.0 ^ seed.1);
    let fold_quality = foldhash::quality::FixedState::with_seed(seed.0 ^ seed.1);
    let ahash = ahash::RandomState::with_seeds(seed.0, seed.1, seed.0 ^ 1, seed.1 ^ 1);

    let inputs: [(&str, Vec<&str>); 3] = [
        ("user_13B", vec!["user-00000042"]),
        ("api_key_36B", vec!["3f2b8c1e-9a47-4d6b-b0c2-7e51a9d3f804"]),
        ("user_and_endpoint", vec!["user-00000042", "/v1/search"]),
    ];
    for (label, values) in &inputs {
        let mut group = c.benchmark_group(format!("key_hash/{label}"));
        group
            .throughput(Throughput::Elements(1))
            .sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        let values = values.as_slice();
        group.bench_function("siphash13", |b| {
            b.iter(|| {
                let mut h = SipHasher13::new_with_keys(seed.0, seed.1);
                stream(&mut h, black_box(values))
            })
        });
        group.bench_function("rapidhash_v3", |b| {
            b.iter(|| {
                rapid.key(
                    drl_core::key::LimitId(LIMIT_ID),
                    black_box(values).iter().copied(),
                )
            })
        });
        group.bench_function("foldhash_fast", |b| {
            b.iter(|| stream(&mut fold_fast.build_hasher(), black_box(values)))
        });
        group.bench_function("foldhash_quality", |b| {
            b.iter(|| stream(&mut fold_quality.build_hasher(), black_box(values)))
        });
        group.bench_function("ahash", |b| {
            b.iter(|| stream(&mut ahash.build_hasher(), black_box(values)))
        });
        group.finish();
    }
}

criterion_group!(benches, key_hash);
criterion_main!(benches);
