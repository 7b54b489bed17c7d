//! Coalescing of concurrent checks into batches, through the `Transport`
//! seam over the real HTTP transport; DNS names; the degraded modes when
//! no node can be reached at all.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Cluster;
use drl_client::{
    CheckAnswer, CheckRequest, Client, ClientConfig, Degraded, DegradedMode, Fallback,
    HttpTransport, Source, Transport, TransportError,
};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000, window = "1h" } ]
"#;

/// The HTTP transport, recording the size of every batch it is handed.
#[derive(Clone, Default)]
struct Recording {
    http: HttpTransport,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Transport for Recording {
    async fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Vec<Result<CheckAnswer, TransportError>> {
        self.batches.lock().unwrap().push(batch.len());
        self.http.check_batch(node, batch, timeout).await
    }

    async fn probe(&self, node: SocketAddr, timeout: Duration) -> Result<(), TransportError> {
        self.http.probe(node, timeout).await
    }
}

/// Checks issued together to one node are handed to the transport in
/// batches, and each caller gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_to_one_node_are_coalesced() {
    let cluster = Cluster::new("batch", 1, RULES, false);
    let nodes = cluster.start(&[]).await;
    let transport = Recording::default();
    let batches = transport.batches.clone();
    // Deadlines far above a loaded machine's connection setup: this test
    // is about coalescing, and a timed-out check is not retried.
    let config = ClientConfig {
        attempt_timeout: Duration::from_secs(3),
        call_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let client = Client::with_nodes(vec![nodes[0].http], config, transport).unwrap();

    let rounds = 5;
    let callers = 64;
    for _ in 0..rounds {
        let calls: Vec<_> = (0..callers)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let user = format!("b{i}");
                    let d = client.check(&[("user", user.as_str())], 1).await.unwrap();
                    (d.is_allowed(), d.quota.map(|q| q.remaining))
                })
            })
            .collect();
        for c in calls {
            let (allowed, remaining) = c.await.unwrap();
            assert!(allowed);
            assert!(remaining.is_some());
        }
    }
    let sizes = batches.lock().unwrap().clone();
    let checks: usize = sizes.iter().sum();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    println!(
        "batching: {checks} checks in {} batches, largest {largest}",
        sizes.len()
    );
    assert_eq!(checks, rounds * callers);
    assert!(
        sizes.len() < checks,
        "no two concurrent checks were coalesced: {sizes:?}"
    );
    assert_eq!(client.metrics().batched_checks.get(), checks as u64);
    for n in nodes {
        n.stop().await;
    }
}

/// A DNS name becomes every address it resolves to; the one the node does
/// not listen on (if `localhost` also names ::1) is failed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_resolves_to_nodes() {
    let cluster = Cluster::new("dns", 1, RULES, false);
    let nodes = cluster.start(&[]).await;
    let client = Client::builder()
        .node(format!("localhost:{}", nodes[0].http.port()))
        .build()
        .await
        .unwrap();
    assert!(
        client.nodes().contains(&nodes[0].http),
        "{:?}",
        client.nodes()
    );
    for _ in 0..5 {
        let d = client.check(&[("user", "dns")], 1).await.unwrap();
        assert_eq!(d.source, Source::Node(nodes[0].http));
    }
    assert!(Client::builder()
        .node("no-such-host.invalid:1")
        .build()
        .await
        .is_err());
    assert!(Client::builder().build().await.is_err());
    for n in nodes {
        n.stop().await;
    }
}

/// With no node reachable, each degraded mode decides as configured, and a
/// dead address costs one refused connection per cool-down, not one per
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_modes_decide_when_no_node_answers() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cases = [
        (DegradedMode::FailOpen, true, Degraded::FailOpen),
        (DegradedMode::FailClosed, false, Degraded::FailClosed),
        (
            DegradedMode::Local {
                otherwise: Fallback::Allow,
            },
            true,
            Degraded::FailOpen,
        ),
        (
            DegradedMode::Local {
                otherwise: Fallback::Deny,
            },
            false,
            Degraded::FailClosed,
        ),
    ];
    for (mode, allowed, how) in cases {
        let config = ClientConfig {
            degraded: mode,
            ..ClientConfig::default()
        };
        let client = Client::builder()
            .node(dead.to_string())
            .config(config)
            .build()
            .await
            .unwrap();
        for _ in 0..50 {
            let d = client.check(&[("user", "x")], 1).await.unwrap();
            assert_eq!(d.is_allowed(), allowed, "{mode:?}");
            assert_eq!(d.source, Source::Degraded(how), "{mode:?}");
            assert!(d.quota.is_none());
        }
        // Bad descriptors are refused before anything, even cut off.
        assert!(matches!(
            client.check(&[("Not A Name", "x")], 1).await,
            Err(drl_client::ClientError::Refused(_))
        ));
        assert!(client.check(&[], 1).await.is_err());
        let m = client.metrics();
        assert_eq!(m.degraded_of(how_label(how), allowed), 50);
        // Default threshold 3, cool-down 2 s: 50 calls cost at most 3
        // attempts and a probe or two.
        let label = dead.to_string();
        let attempts = m.attempts_on(&label) + m.probes_of(&label, false);
        assert!(attempts <= 5, "{attempts} attempts on a dead address");
    }
}

fn how_label(how: Degraded) -> &'static str {
    match how {
        Degraded::FailOpen => "fail_open",
        Degraded::FailClosed => "fail_closed",
        Degraded::Lease => "lease",
    }
}
