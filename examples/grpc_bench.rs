//! One node's gRPC API against its HTTP API, in the same run: decisions per
//! second and call latency of Envoy's `ShouldRateLimit` and of the native
//! `CheckBatch` (100 checks a call), beside `POST /v1/check` driven by the
//! project's HTTP load generator (`drl load`).
//!
//! ```text
//! cargo run --release --example grpc_bench -- http://127.0.0.1:8400 http://127.0.0.1:9400 [seconds] [concurrency]
//! ```
//!
//! `scripts/bench-grpc.sh` starts a one-node `drl cluster` and runs this.
//! Every phase keeps `concurrency` calls in flight (default 50): HTTP over
//! as many keep-alive connections, gRPC as streams of one HTTP/2
//! connection. Users are drawn uniformly from 10 000.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drl::cli::latency::LatencyHistogram;
use drl::cli::load::{generate, LoadArgs};
use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
use drl::grpc::pb::{CheckBatchRequest, CheckRequest};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;

const KEYS: u64 = 10_000;
const BATCH: usize = 100;

struct Phase {
    name: &'static str,
    decisions: u64,
    errors: u64,
    elapsed: Duration,
    latency: LatencyHistogram,
}

impl Phase {
    fn print(&self) {
        let ms = |ns: u64| ns as f64 / 1e6;
        println!(
            "| {:<34} | {:>12.0} | {:>8.3} | {:>8.3} | {:>6} |",
            self.name,
            self.decisions as f64 / self.elapsed.as_secs_f64(),
            ms(self.latency.quantile(0.50)),
            ms(self.latency.quantile(0.99)),
            self.errors
        );
    }
}

/// SplitMix64: a fixed, seeded draw of users.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs `call` from `concurrency` tasks until `seconds` pass; each call
/// returns how many decisions it carried, or `None` on error.
async fn closed_loop<F, Fut>(name: &'static str, concurrency: usize, seconds: u64, call: F) -> Phase
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<u64>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let stop = stop.clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = t as u64 + 1;
            let mut latency = LatencyHistogram::default();
            let (mut decisions, mut errors) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match call(next(&mut seed)).await {
                    Some(n) => decisions += n,
                    None => errors += 1,
                }
                latency.record(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            (decisions, errors, latency)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase = Phase {
        name,
        decisions: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: LatencyHistogram::default(),
    };
    for task in tasks {
        let (d, e, l) = task.await.expect("load task");
        phase.decisions += d;
        phase.errors += e;
        phase.latency.merge(&l);
    }
    phase.elapsed = start.elapsed();
    phase
}

fn envoy_request(user: u64) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: format!("user-{}", user % KEYS),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

fn batch_request(seed: u64) -> CheckBatchRequest {
    let mut state = seed;
    CheckBatchRequest {
        checks: (0..BATCH)
            .map(|_| CheckRequest {
                descriptors: [(
                    "user".to_owned(),
                    format!("user-{}", next(&mut state) % KEYS),
                )]
                .into(),
                cost: None,
                limit: None,
            })
            .collect(),
        // One atomic request, the default.
        independent: false,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: grpc_bench HTTP_URL GRPC_URL [seconds] [concurrency]");
        std::process::exit(2);
    }
    let (http, grpc) = (args[1].clone(), args[2].clone());
    let seconds: u64 = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let concurrency: usize = args.get(4).map_or(Ok(50), |s| s.parse())?;
    let channel = Channel::from_shared(grpc)?.connect().await?;

    let load = LoadArgs {
        node: vec![http],
        connections: concurrency,
        duration: format!("{seconds}s"),
        rate: None,
        keys: KEYS,
        user_field: "user".into(),
        fields: vec![],
        cost: 1,
        threads: 1,
        seed: 1,
        resp: false,
        cell: String::new(),
        timeout: "2s".into(),
        progress: "0s".into(),
        source: vec![],
        honor_retry_after: false,
    };
    let report = generate(&load).await?;
    let http_phase = Phase {
        name: "HTTP POST /v1/check",
        decisions: report.decisions(),
        errors: report.errors,
        elapsed: report.elapsed,
        latency: report.latency.clone(),
    };

    let envoy = RateLimitServiceClient::new(channel.clone());
    let rls = closed_loop("gRPC ShouldRateLimit", concurrency, seconds, move |user| {
        let mut client = envoy.clone();
        async move {
            client
                .should_rate_limit(envoy_request(user))
                .await
                .ok()
                .map(|_| 1)
        }
    })
    .await;

    let native = RateLimiterClient::new(channel);
    let batch = closed_loop(
        "gRPC CheckBatch (100 checks/call)",
        concurrency,
        seconds,
        move |seed| {
            let mut client = native.clone();
            async move {
                let r = client.check_batch(batch_request(seed)).await.ok()?;
                Some(r.into_inner().results.len() as u64)
            }
        },
    )
    .await;

    println!("\none node, {concurrency} calls in flight, {seconds} s per phase, {KEYS} users\n");
    println!(
        "| {:<34} | {:>12} | {:>8} | {:>8} | {:>6} |",
        "API", "decisions/s", "p50 ms", "p99 ms", "errors"
    );
    println!(
        "|{:-<36}|{:->14}|{:->10}|{:->10}|{:->8}|",
        "", "", "", "", ""
    );
    http_phase.print();
    rls.print();
    batch.print();
    println!("\n(latency is per call: a CheckBatch call carries {BATCH} decisions)");
    Ok(())
}
