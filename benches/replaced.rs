//! Our own code against the well-kept crate that could replace it, side by
//! side in the same run (DESIGN.md, "Dependencies", says what was decided).
//!
//! * `percent_decode`: a query value with escapes and `+`, decoded by
//!   `drl::http::request::percent_decode` and by `percent-encoding` (plus
//!   the `+` → space step it leaves to the caller).
//! * `latency_histogram`: 100k latencies recorded, then p50/p99/p99.9
//!   read, by `drl::cli::latency::LatencyHistogram` and by `hdrhistogram`
//!   (3 significant digits, auto-resizing).
//! * `http_client`: one `POST /v1/check` exchange on a keep-alive loopback
//!   connection to the same in-process axum server, by the hand-written
//!   client the product used before (`support/handwritten_client.rs`) and
//!   by hyper's `client::conn::http1` (what `drl::http::client` is now).

use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/handwritten_client.rs"]
mod handwritten_client;

const QUERY_VALUE: &str = "%2Fv1%2Fsearch%2Fitems+and+more%3Fq%3Dx";

fn percent(c: &mut Criterion) {
    let mut g = c.benchmark_group("percent_decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ours", |b| {
        b.iter(|| drl::http::request::percent_decode(black_box(QUERY_VALUE)).unwrap())
    });
    g.bench_function("percent_encoding", |b| {
        b.iter(|| {
            let v = black_box(QUERY_VALUE).replace('+', " ");
            percent_encoding::percent_decode_str(&v).collect::<Vec<u8>>()
        })
    });
    g.finish();
}

fn latencies() -> Vec<u64> {
    // A skewed spread from 20 µs to about 50 ms, as a loaded server shows.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            20_000 + (u.powi(4) * 50e6) as u64
        })
        .collect()
}

fn histogram(c: &mut Criterion) {
    let values = latencies();
    let mut g = c.benchmark_group("latency_histogram");
    g.throughput(Throughput::Elements(values.len() as u64));
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut h = drl::cli::latency::LatencyHistogram::default();
            for &v in &values {
                h.record(v);
            }
            [h.quantile(0.5), h.quantile(0.99), h.quantile(0.999)]
        })
    });
    g.bench_function("hdrhistogram", |b| {
        b.iter(|| {
            let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            for &v in &values {
                h.record(v).unwrap();
            }
            [
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
            ]
        })
    });
    g.finish();
    // Accuracy, printed once beside the speed: both against the exact order.
    let mut sorted = values.clone();
    sorted.sort_unstable();
    let mut ours = drl::cli::latency::LatencyHistogram::default();
    let mut hdr = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for &v in &values {
        ours.record(v);
        hdr.record(v).unwrap();
    }
    for q in [0.5, 0.99, 0.999] {
        let exact = sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
        println!(
            "q{q}: exact {exact} ns, ours {} (+{:.2}%), hdrhistogram {} (+{:.2}%)",
            ours.quantile(q),
            (ours.quantile(q) as f64 / exact as f64 - 1.0) * 100.0,
            hdr.value_at_quantile(q),
            (hdr.value_at_quantile(q) as f64 / exact as f64 - 1.0) * 100.0,
        );
    }
}

const ANSWER: &str = r#"{"allowed":true,"limit":100,"remaining":99,"reset_after_ms":1000}"#;
const BODY: &str = r#"{"user":"user-42","endpoint":"/v1/search"}"#;

fn http(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let app = axum::Router::new().route(
            "/v1/check",
            axum::routing::post(|_body: Bytes| async {
                (
                    [
                        ("content-type", "application/json"),
                        ("ratelimit-policy", "\"per-user\";q=100;w=60"),
                        ("ratelimit", "\"per-user\";r=99;t=1"),
                    ],
                    ANSWER,
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    let mut g = c.benchmark_group("http_client");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("ours", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut conn = handwritten_client::Connection::open_addr(addr)
                    .await
                    .unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    let a = conn.post_json("/v1/check", BODY).await.unwrap();
                    assert_eq!(a.status, 200);
                    black_box(a.body);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("hyper", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut conn = drl::http::client::Connection::open_addr(addr)
                    .await
                    .unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    let a = conn.post_json("/v1/check", BODY).await.unwrap();
                    assert_eq!(a.status, 200);
                    black_box(a.body);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

/// What polling the rules file costs: one `stat` per second.
fn rules_file_stamp(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("drl-bench-rules-{}.toml", std::process::id()));
    std::fs::write(&path, "[[rules]]\n").unwrap();
    let mut g = c.benchmark_group("rules_file_poll");
    g.throughput(Throughput::Elements(1));
    g.bench_function("stat", |b| {
        b.iter(|| {
            let meta = std::fs::metadata(black_box(&path)).unwrap();
            (meta.modified().unwrap(), meta.len())
        })
    });
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, percent, histogram, http, rules_file_stamp);
criterion_main!(benches);
