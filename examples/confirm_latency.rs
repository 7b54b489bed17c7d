//! How long a request waits when it must be confirmed with the peers: three
//! real nodes in this process over QUIC on loopback (mutual TLS), a limit of
//! 1 per key so that every first request of a key is confirmed, and the same
//! number of requests on a limit far from its end, decided locally, for
//! comparison. Prints p50, p99 and max of `NodeApi::check` for both.
//!
//! `cargo run --release --example confirm_latency [requests]`

use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{Node, NodeFile, NodeHandle};
use drl_core::descriptor::Descriptors;

const RULES: &str = r#"
[[rules]]
name = "one-per-key"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 1, window = "1h" } ]

[[rules]]
name = "far-from-the-limit"
match = { ip = "*" }
key = ["ip"]
limits = [ { algorithm = "fixed_window", limit = 1000000000, window = "1h" } ]
"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(what: &str, mut t: Vec<Duration>) {
    t.sort();
    println!(
        "{what:<40} n={:<6} p50={:>8.1?} p99={:>8.1?} max={:>8.1?}",
        t.len(),
        percentile(&t, 0.50),
        percentile(&t, 0.99),
        t[t.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("drl-confirm-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(3)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    let settings = |slot: u16, seeds: Vec<String>| {
        NodeFile {
            recovery_timeout: "2s".into(),
            ..NodeFile::local(&dir, slot, seeds)
        }
        .settings(&dir)
        .unwrap()
    };
    let first = Node::start(settings(0, vec![])).await.unwrap();
    let seed = first.peer_addr().to_string();
    let mut nodes: Vec<NodeHandle> = vec![first];
    for slot in 1..3 {
        nodes.push(
            Node::start(settings(slot, vec![seed.clone()]))
                .await
                .unwrap(),
        );
    }
    let start = Instant::now();
    while !nodes.iter().all(|n| {
        let s = n.status();
        s.ready && s.live.len() == 2
    }) {
        assert!(start.elapsed() < Duration::from_secs(60), "no full mesh");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut confirmed, mut local) = (Vec::new(), Vec::new());
    for i in 0..requests {
        let api = nodes[i % 3].api();
        let user = format!("user-{i}");
        let fields = [("user", user.as_str())];
        let d = Descriptors::new(&fields).unwrap();
        let t = Instant::now();
        let decision = api.decider().check(&d, 1).await.unwrap();
        confirmed.push(t.elapsed());
        assert!(decision.is_allowed(), "a fresh key's only hit is admitted");

        let fields = [("ip", "192.0.2.1")];
        let d = Descriptors::new(&fields).unwrap();
        let t = Instant::now();
        let decision = api.decider().check(&d, 1).await.unwrap();
        local.push(t.elapsed());
        assert!(decision.is_allowed());
        // Leave the acknowledgements time to settle the local hits.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let claims: u64 = nodes
        .iter()
        .map(|n| n.status().replication.claims_sent)
        .sum();
    report("confirmed (limit 1, a fresh key each time)", confirmed);
    report("local (far from the limit)", local);
    println!("claims sent by the three nodes: {claims}");
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
