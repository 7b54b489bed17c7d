//! Cluster benchmarks over real QUIC on loopback (three release-built nodes
//! in one process):
//!
//! - bytes on the wire per changed key per sync, QUIC and UDP payload
//!   overhead included (the transport's UDP byte counters), at 10k and 100k
//!   changing keys;
//! - convergence: time from an admission on one node until both other nodes
//!   count it, p50 and p99.
//!
//! `cargo bench --bench cluster` prints a markdown table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{Node, NodeFile, NodeHandle};
use drl_core::descriptor::Descriptors;
use drl_core::key::key_digest;
use drl_core::time::Clock;
use drl_core::window::Ring;

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 1000000, window = "1h" } ]
"#;

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drl-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(3)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

async fn start(dir: &std::path::Path, slot: u16, seeds: Vec<String>) -> NodeHandle {
    let file = NodeFile {
        recovery_timeout: "1s".into(),
        max_keys: 1 << 18,
        ..NodeFile::local(dir, slot, seeds)
    };
    Node::start(file.settings(dir).unwrap()).await.unwrap()
}

/// Does `node` count at least one hit of `user`?
fn counts(node: &NodeHandle, user: &str) -> bool {
    let limiter = &node.limiter;
    let rules = limiter.rules();
    let limit = &rules.limits()[0];
    let key = key_digest(limiter.config().seed, limit.id, [user]);
    let table = limiter.table(0).unwrap();
    let Some(entry) = table.get(key) else {
        return false;
    };
    let now = limiter.clock().now();
    let mut nets = [0u64; 2];
    Ring::read(&entry, table.spec(), now, &mut nets);
    nets.iter().sum::<u64>() > 0
}

fn admit(node: &NodeHandle, user: &str) {
    let fields = [("user", user)];
    let d = Descriptors::new(&fields).unwrap();
    assert!(node.limiter.check(&d, 1).unwrap().is_allowed());
}

fn tx_bytes(node: &NodeHandle) -> u64 {
    node.transport()
        .connected()
        .into_iter()
        .filter_map(|s| node.transport().stats(s))
        .map(|s| s.udp_tx_bytes)
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = dir();
    let first = start(&dir, 0, vec![]).await;
    let seed = first.peer_addr().to_string();
    let nodes = vec![
        first,
        start(&dir, 1, vec![seed.clone()]).await,
        start(&dir, 2, vec![seed]).await,
    ];
    let t = Instant::now();
    while !nodes
        .iter()
        .all(|n| n.status().ready && n.status().live.len() == 2)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "cluster did not form"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sync = nodes[0].settings.sync_interval;
    println!("| measurement | value |\n|---|---|");

    for keys in [10_000usize, 100_000] {
        // Let earlier traffic settle, then count only this batch.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = tx_bytes(&nodes[0]);
        let before_values = nodes[0].status().replication.values_sent;
        let users: Vec<String> = (0..keys).map(|i| format!("bytes-{keys}-{i}")).collect();
        for u in &users {
            admit(&nodes[0], u);
        }
        let last = users.last().unwrap().clone();
        let t = Instant::now();
        while !(counts(&nodes[1], &last) && counts(&nodes[2], &last)) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "changes did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = tx_bytes(&nodes[0]) - before;
        let status = nodes[0].status();
        let changes = status.replication.values_sent - before_values;
        // Two peers receive every change.
        let per_key = sent as f64 / 2.0 / changes.max(1) as f64;
        println!("| bytes per changed key per sync, {keys} keys (QUIC included, per peer) | {per_key:.1} B ({changes} key changes, {sent} UDP payload bytes to 2 peers) |");
    }

    let mut samples = Vec::new();
    for i in 0..500 {
        let user = format!("converge-{i}");
        let start = Instant::now();
        admit(&nodes[i % 3], &user);
        let others: Vec<&NodeHandle> = (0..3).filter(|&n| n != i % 3).map(|n| &nodes[n]).collect();
        while !others.iter().all(|n| counts(n, &user)) {
            tokio::task::yield_now().await;
            if start.elapsed() > Duration::from_secs(5) {
                panic!("admission {i} never converged");
            }
        }
        samples.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    let p99 = percentile(&samples, 0.99);
    println!(
        "| convergence p50 (sync interval {}) | {:.2} ms |",
        sync,
        p50.as_secs_f64() * 1e3
    );
    println!(
        "| convergence p99 | {:.2} ms ({:.2} sync intervals) |",
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / Duration::from(sync).as_secs_f64()
    );
    for n in nodes {
        n.shutdown().await;
    }
}
