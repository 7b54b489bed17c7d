//! The client against real nodes over real sockets: failover when the
//! nearest node dies mid-load, circuit breakers on a hung node, the `local`
//! degraded mode while every node is stopped, and routing away from a
//! slowed node.
//!
//! Timing figures are printed (run with `--nocapture`), never asserted
//! tightly: assertions are on counts, with generous deadlines.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{percentile, Cluster, Proxy, TestNode};
use drl_client::{
    BreakerConfig, BreakerState, Client, ClientConfig, DegradedMode, Fallback, HttpTransport,
    LeaseConfig, RetryPolicy, RoutingConfig, Source, Wire,
};
use drl_core::time::Nanos;

const GENEROUS: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 10000000, window = "1h" } ]
"#;

fn config(attempt_ms: u64, threshold: u32, cool_ms: u64, probe_ms: u64) -> ClientConfig {
    ClientConfig {
        call_timeout: Duration::from_secs(3),
        attempt_timeout: Duration::from_millis(attempt_ms),
        probe_timeout: Duration::from_millis(attempt_ms),
        routing: RoutingConfig {
            ewma_alpha: 0.2,
            probe_interval: Nanos::from_millis(probe_ms),
        },
        breaker: BreakerConfig {
            failure_threshold: NonZeroU32::new(threshold).unwrap(),
            cool_down: Nanos::from_millis(cool_ms),
            success_threshold: NonZeroU32::MIN,
        },
        degraded: DegradedMode::FailClosed,
        lease: LeaseConfig::default(),
        // These tests kill and hang nodes under calls in flight: a call
        // whose attempt may have been counted still moves on (the safe
        // policy is tested on its own below).
        retry: RetryPolicy::AtLeastOnce,
        max_batch: 64,
        tick: Duration::from_millis(20),
        dns_refresh: None,
    }
}

async fn client_to(addrs: &[SocketAddr], config: ClientConfig) -> Client {
    let transport = HttpTransport::new(Duration::from_millis(500), 64);
    Client::with_nodes(addrs.to_vec(), config, Wire::Http(transport)).unwrap()
}

/// The proxy that took the most attempts so far.
fn busiest(client: &Client, proxies: &[Proxy]) -> usize {
    (0..proxies.len())
        .max_by_key(|&i| client.metrics().attempts_on(&proxies[i].addr.to_string()))
        .unwrap()
}

fn attempts(client: &Client, proxies: &[Proxy]) -> Vec<u64> {
    proxies
        .iter()
        .map(|p| client.metrics().attempts_on(&p.addr.to_string()))
        .collect()
}

#[derive(Clone, Copy)]
struct Sample {
    started: Duration,
    latency: Duration,
    failed: bool,
}

/// `workers` tasks calling `check` until `stop`; every call is recorded.
fn load(
    client: &Client,
    workers: usize,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Sample>>>, Vec<tokio::task::JoinHandle<()>>) {
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let tasks = (0..workers)
        .map(|w| {
            let client = client.clone();
            let samples = samples.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 100_000 {
                    let user = format!("u{w}-{}", n % 50);
                    let t = Instant::now();
                    let r = client.check(&[("user", user.as_str())], 1).await;
                    let failed = match &r {
                        Ok(d) => !d.is_allowed() || !matches!(d.source, Source::Node(_)),
                        Err(_) => true,
                    };
                    samples.lock().unwrap().push(Sample {
                        started: t.duration_since(origin),
                        latency: t.elapsed(),
                        failed,
                    });
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    (samples, tasks)
}

async fn proxies_for(nodes: &[TestNode]) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for n in nodes {
        proxies.push(Proxy::start(n.http).await);
    }
    proxies
}

/// Kill the node the client uses most, mid-load: with failover on, no call
/// fails; the client stops sending to the dead node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nearest_node_mid_load_fails_no_call() {
    let cluster = Cluster::new("kill", 3, GENEROUS, false);
    let mut nodes = cluster.start(&[]).await;
    let proxies = proxies_for(&nodes).await;
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    // Node 0 is the nearest: the others are 10 ms further away.
    for p in &proxies[1..] {
        p.set_delay(Duration::from_millis(10));
    }
    let client = client_to(&addrs, config(200, 3, 1000, 200)).await;

    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, tasks) = load(&client, 4, origin, stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The node the calls go to now (node 0 unless the machine is so loaded
    // that its queueing outweighs 10 ms).
    let recent = attempts(&client, &proxies);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = attempts(&client, &proxies);
    let victim = (0..3).max_by_key(|&i| before[i] - recent[i]).unwrap();
    let killed_at = origin.elapsed();
    proxies[victim].kill();
    let node = nodes.remove(victim);
    let stopping = tokio::spawn(node.stop());

    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = attempts(&client, &proxies);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    stopping.await.unwrap();
    let after = attempts(&client, &proxies);

    let samples = samples.lock().unwrap().clone();
    let failed = samples.iter().filter(|s| s.failed).count();
    let mut all: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    let mut switch: Vec<Duration> = samples
        .iter()
        .filter(|s| s.started >= killed_at && s.started < killed_at + Duration::from_secs(1))
        .map(|s| s.latency)
        .collect();
    let metrics = client.metrics();
    println!(
        "failover: {} calls, {} failed, {} failovers; p50 {:?}, p99 {:?}; during the switch (1 s after the kill) {} calls, p99 {:?}, max {:?}; attempts per node before {:?}, after {:?}",
        samples.len(),
        failed,
        metrics.failovers.get(),
        percentile(&mut all, 0.5),
        percentile(&mut all, 0.99),
        switch.len(),
        percentile(&mut switch, 0.99),
        switch.last().copied().unwrap_or_default(),
        before,
        after,
    );
    assert!(samples.len() > 200, "load ran: {} calls", samples.len());
    assert_eq!(failed, 0, "calls that failed with failover on");
    // The survivors took the load after the kill.
    let survivors: u64 = (0..3)
        .filter(|&i| i != victim)
        .map(|i| after[i] - before[i])
        .sum();
    assert!(survivors > 100, "survivors served {survivors}");
    // Once its breaker opened, the dead node got at most its half-open
    // trial once per cool-down (1 s here; probes usually take it).
    assert!(
        after[victim] - settled[victim] <= 2,
        "calls still sent to the dead node: {} in 1 s",
        after[victim] - settled[victim]
    );
    assert!(metrics.breaker_opened_of(&addrs[victim].to_string()) >= 1);
    assert!(
        metrics.failovers.get() >= 1,
        "the calls in flight failed over"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// A node that accepts connections but never answers costs one timeout per
/// cool-down once its breaker is open, not one per call; its breaker
/// closes again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_a_hung_node_and_closes_when_it_answers() {
    let cluster = Cluster::new("breaker", 2, GENEROUS, false);
    let nodes = cluster.start(&[]).await;
    let proxies = proxies_for(&nodes).await;
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let threshold = 2;
    let cool_down = Duration::from_millis(1000);
    let client = client_to(
        &addrs,
        config(100, threshold, cool_down.as_millis() as u64, 200),
    )
    .await;

    for _ in 0..100 {
        let d = client.check(&[("user", "warm")], 1).await.unwrap();
        assert!(matches!(d.source, Source::Node(_)));
    }
    let hung = busiest(&client, &proxies);
    let label = addrs[hung].to_string();
    proxies[hung].set_blackhole(true);

    let hang = Duration::from_secs(3);
    let failures_before = failures_on(&client, &label);
    let start = Instant::now();
    let mut calls = 0;
    let mut degraded = 0;
    let mut latencies = Vec::new();
    while start.elapsed() < hang {
        let t = Instant::now();
        let d = client.check(&[("user", "hung")], 1).await.unwrap();
        latencies.push(t.elapsed());
        if !matches!(d.source, Source::Node(_)) {
            degraded += 1;
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failures = failures_on(&client, &label) - failures_before;
    let cool_downs = (start.elapsed().as_millis() / cool_down.as_millis()) as u64;
    let slow = latencies
        .iter()
        .filter(|l| **l >= Duration::from_millis(100))
        .count();
    println!(
        "breaker: {calls} calls in {:?} while one node hung; {failures} timed-out attempts and probes on it; {} failovers; {slow} calls took the 100 ms attempt timeout; p50 {:?}, p99 {:?}",
        start.elapsed(),
        client.metrics().failovers.get(),
        percentile(&mut latencies.clone(), 0.5),
        percentile(&mut latencies, 0.99),
    );
    assert_eq!(degraded, 0, "the other node answered every call");
    assert!(client.metrics().breaker_opened_of(&label) >= 1);
    // Open, or half-open while a trial is in flight or due; never closed.
    assert_ne!(client.node_states()[hung].breaker, BreakerState::Closed);
    // `threshold` failures open it; then one trial per cool-down; one
    // more for a probe and a call that were in flight together.
    let bound = u64::from(threshold) + cool_downs + 2;
    assert!(
        failures <= bound,
        "{failures} timeouts on the hung node, bound {bound}, over {calls} calls"
    );
    assert!(calls > 10 * bound as usize, "{calls} calls");

    proxies[hung].set_blackhole(false);
    let start = Instant::now();
    while client.node_states()[hung].breaker != BreakerState::Closed {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "breaker did not close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "breaker: closed {:?} after the node answered again",
        start.elapsed()
    );
    assert!(client.node_states()[hung].closed >= 1);
    for n in nodes {
        n.stop().await;
    }
}

fn failures_on(client: &Client, node: &str) -> u64 {
    let m = client.metrics();
    ["timeout", "connect_error", "unavailable", "malformed"]
        .iter()
        .map(|r| m.calls_of(node, r))
        .sum::<u64>()
        + m.probes_of(node, false)
}

const LEASED: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 10000, window = "1h" } ]
"#;

/// In `local` mode the client admits no more than its lease while every
/// node is stopped, and the cluster, back from its snapshots, has counted
/// what it admitted (the lease was charged up front).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_stays_within_its_lease_while_every_node_is_stopped() {
    let cluster = Cluster::new("lease", 2, LEASED, true);
    let nodes = cluster.start(&[]).await;
    let https: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let mut cfg = config(200, 1, 500, 200);
    cfg.degraded = DegradedMode::Local {
        otherwise: Fallback::Deny,
    };
    cfg.lease = LeaseConfig {
        share: 0.1,
        max_lease: 20,
        hot_calls: 20,
        max_keys: 1000,
    };
    let client = client_to(&https, cfg).await;

    let warm = 30u64;
    for _ in 0..warm {
        let d = client.check(&[("user", "alice")], 1).await.unwrap();
        assert!(d.is_allowed() && matches!(d.source, Source::Node(_)));
    }
    let start = Instant::now();
    while client.lease_of(&[("user", "alice")]) != Some((20, 20)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no lease: {:?}",
            client.lease_of(&[("user", "alice")])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for n in nodes {
        n.stop().await;
    }
    let mut admitted = 0u64;
    let mut sources = Vec::new();
    for _ in 0..60 {
        let d = client.check(&[("user", "alice")], 1).await.unwrap();
        assert!(
            matches!(d.source, Source::Degraded(_)),
            "no node runs: {:?}",
            d.source
        );
        admitted += u64::from(d.is_allowed());
        sources.push(d.source);
    }
    let mut bob = 0;
    for _ in 0..10 {
        bob += u64::from(
            client
                .check(&[("user", "bob")], 1)
                .await
                .unwrap()
                .is_allowed(),
        );
    }
    let granted = client.metrics().leases_of("granted");
    println!(
        "lease: {admitted} of 60 admitted while cut off, lease 20, {granted} lease(s) granted, bob (no lease) {bob} of 10"
    );
    assert_eq!(admitted, 20, "exactly the lease, and no more");
    assert_eq!(bob, 0, "no lease: the fallback denies");
    assert_eq!(client.metrics().degraded_of("lease", true), 20);
    assert_eq!(granted, 1);
    client.shutdown().await;

    // Every node back, from its snapshot, on its old address.
    let nodes = cluster.start(&https).await;
    let expected = warm + 20 * granted;
    let start = Instant::now();
    loop {
        let counts: Vec<u64> = nodes.iter().map(TestNode::counted).collect();
        if counts.iter().all(|&c| c == expected) {
            println!("lease: the cluster counts {counts:?}, expected {expected}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "cluster counts {counts:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in nodes {
        n.stop().await;
    }
}

/// With one node slowed by a delaying proxy, the client moves its calls to
/// the faster nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_move_off_a_slowed_node() {
    let cluster = Cluster::new("slow", 3, GENEROUS, false);
    let nodes = cluster.start(&[]).await;
    let proxies = proxies_for(&nodes).await;
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let client = client_to(&addrs, config(1000, 3, 1000, 100)).await;

    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, tasks) = load(&client, 2, origin, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slowed = busiest(&client, &proxies);
    proxies[slowed].set_delay(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mid = attempts(&client, &proxies);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let end = attempts(&client, &proxies);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let window: Vec<u64> = end.iter().zip(&mid).map(|(e, m)| e - m).collect();
    let total: u64 = window.iter().sum();
    let latencies: Vec<Option<Duration>> = client.node_states().iter().map(|n| n.latency).collect();
    println!(
        "slow node: node {slowed} delayed 50 ms; calls per node in the last 1.5 s {window:?}; latency EWMAs {latencies:?}"
    );
    assert!(total > 100, "load ran: {total}");
    assert!(
        window[slowed] * 20 <= total,
        "the slowed node still took {} of {total} calls",
        window[slowed]
    );
    assert_eq!(
        samples.lock().unwrap().iter().filter(|s| s.failed).count(),
        0
    );
    for n in nodes {
        n.stop().await;
    }
}

/// A node added at run time (the application's own discovery, or a DNS
/// name resolving to a new address) is measured and used; when the first
/// node stops, it takes every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_at_run_time_takes_over() {
    let cluster = Cluster::new("added", 2, GENEROUS, false);
    let mut nodes = cluster.start(&[]).await;
    let client = client_to(&[nodes[0].http], config(200, 2, 1000, 100)).await;
    assert!(client.add_node(nodes[1].http));
    assert!(!client.add_node(nodes[1].http), "already a node");
    assert_eq!(client.nodes(), vec![nodes[0].http, nodes[1].http]);
    for _ in 0..20 {
        let d = client.check(&[("user", "add")], 1).await.unwrap();
        assert!(matches!(d.source, Source::Node(_)));
    }
    let first = nodes.remove(0);
    first.stop().await;
    let mut on_added = 0;
    for _ in 0..50 {
        let d = client.check(&[("user", "add")], 1).await.unwrap();
        assert!(d.is_allowed(), "{:?}", d.source);
        on_added += u64::from(d.source == Source::Node(nodes[0].http));
    }
    assert_eq!(on_added, 50, "every call served by the added node");
    assert!(client.node_states()[1].latency.is_some(), "measured");
    for n in nodes {
        n.stop().await;
    }
}
