//! Small limits are exact on real nodes over QUIC, and what the HTTP answers
//! say (`remaining`, `RateLimit`, `Retry-After`) agrees with what was
//! admitted: sequential requests spread over every node of a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::http::client::{Answer, Connection};
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{NodeApi, NodeFile};
use drl::server::{RunError, Server};
use serde_json::Value;

const RULES: &str = r#"
[[rules]]
name = "free-tier"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 5, window = "1s" } ]

[[rules]]
name = "login-per-ip"
match = { ip = "*" }
key = ["ip"]
limits = [ { algorithm = "gcra", limit = 10, per = "1m", burst = 3 } ]
"#;

fn cluster_dir(name: &str, nodes: u16) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-small-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(nodes)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

struct TestNode {
    addr: SocketAddr,
    api: NodeApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    async fn start(dir: &Path, slot: u16, seeds: Vec<String>) -> (TestNode, String) {
        let file = NodeFile {
            recovery_timeout: "2s".into(),
            ..NodeFile::local(dir, slot, seeds)
        };
        let node = Server::start(file.settings(dir).unwrap()).await.unwrap();
        let addr = node.http_addr();
        let peer = node.node().peer_addr().to_string();
        let api = node.node().api();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        (
            TestNode {
                addr,
                api,
                stop: Some(stop),
                task,
            },
            peer,
        )
    }

    async fn check(&self, body: &str) -> Answer {
        let mut conn = Connection::open_addr(self.addr).await.unwrap();
        conn.request(
            "POST",
            "/v1/check",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
        .unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// `size` nodes, every one seeded with the first, ready and fully meshed.
async fn cluster(name: &str, size: u16) -> Vec<TestNode> {
    let dir = cluster_dir(name, size);
    let (first, seed) = TestNode::start(&dir, 0, vec![]).await;
    let mut nodes = vec![first];
    for slot in 1..size {
        nodes.push(TestNode::start(&dir, slot, vec![seed.clone()]).await.0);
    }
    let start = Instant::now();
    while !nodes.iter().all(|n| {
        let s = n.api.status();
        // Live by SWIM (which gossip can say without a connection) and
        // connected: a claim reaches only connected peers.
        s.ready
            && s.live.len() == usize::from(size) - 1
            && s.peers.values().filter(|p| p.connected).count() == usize::from(size) - 1
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no full mesh of {size} nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes
}

/// The value of `name` in a `RateLimit` header (`"rule";r=4;t=1`).
fn param(header: &str, name: &str) -> Option<u64> {
    header
        .split(';')
        .find_map(|p| p.trim().strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Sends `offered` requests with `body`, one after another, round robin over
/// the nodes, and checks every answer against what was admitted before it.
async fn sequential(nodes: &[TestNode], body: &str, offered: usize, limit: u64) -> u64 {
    let mut admitted = 0u64;
    for i in 0..offered {
        let a = nodes[i % nodes.len()].check(body).await;
        let json: Value = serde_json::from_slice(&a.body).unwrap();
        let rate = a.header("ratelimit").expect("RateLimit header").to_owned();
        match a.status {
            200 => {
                admitted += 1;
                assert_eq!(json["remaining"], limit - admitted, "answer {i}: {json}");
                assert_eq!(
                    param(&rate, "r"),
                    Some(limit - admitted),
                    "answer {i}: {rate}"
                );
            }
            429 => {
                assert!(
                    admitted >= limit,
                    "request {i} refused after {admitted} admitted"
                );
                assert_eq!(json["remaining"], 0, "answer {i}: {json}");
                assert_eq!(param(&rate, "r"), Some(0));
                let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
                assert!(retry >= 1, "a refusal says when to come back");
            }
            s => panic!("status {s}: {}", a.text()),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_nodes_admit_exactly_five_of_a_five_per_second_limit() {
    let nodes = cluster("seven", 7).await;
    let admitted = sequential(&nodes, r#"{"user":"free-user"}"#, 12, 5).await;
    assert_eq!(admitted, 5);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_admit_exactly_the_gcra_burst() {
    let nodes = cluster("gcra", 3).await;
    let admitted = sequential(&nodes, r#"{"ip":"203.0.113.9"}"#, 6, 3).await;
    assert_eq!(admitted, 3);
    for n in nodes {
        n.shutdown().await;
    }
}
