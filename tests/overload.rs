//! Overload admission on a real node: over its in-flight cap a decision
//! listener answers at once, and says when to come back (HTTP 503 with
//! `Retry-After`, gRPC `UNAVAILABLE` with `retry-after`), while probes and
//! the operations listener are still answered and nothing is counted.
//! Deterministic: the cap is 1 and one request is held in flight by a body
//! that has not arrived yet; no timing decides the outcome.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::grpc::envoy_service::EnvoyRateLimit;
use drl::grpc::GrpcState;
use drl::http::client::{Answer, Connection};
use drl::listen::AdmissionLimits;
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::NodeFile;
use drl::server::{RunError, Server, ServerLimits};
use drl::service::Service;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 100, window = "1h" } ]
"#;

fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-overload-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(1)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

/// One request in flight at most, and no queue deadline: only the cap
/// sheds, so the test does not depend on how busy the machine is.
fn cap_of_one() -> AdmissionLimits {
    AdmissionLimits {
        max_in_flight: 1,
        queue_deadline: Duration::ZERO,
        retry_after: Duration::from_secs(2),
    }
}

struct TestNode {
    addr: SocketAddr,
    admin: SocketAddr,
    service: Service,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    async fn start() -> TestNode {
        let dir = scratch();
        let file = NodeFile {
            recovery_timeout: "100ms".into(),
            listen_admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..NodeFile::local(&dir, 0, vec![])
        };
        let limits = ServerLimits {
            admission: cap_of_one(),
            ..ServerLimits::default()
        };
        let node = Server::start_with_limits(file.settings(&dir).unwrap(), limits)
            .await
            .unwrap();
        let (addr, admin) = (node.http_addr(), node.admin_addr().unwrap());
        let service = node.service().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        let n = TestNode {
            addr,
            admin,
            service,
            stop: Some(stop),
            task,
        };
        let start = Instant::now();
        while get(n.admin, "/readyz").await.status != 200 {
            assert!(start.elapsed() < Duration::from_secs(15), "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("shutdown within 15 s")
            .unwrap()
            .unwrap();
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    let mut c = Connection::open_addr(addr).await.unwrap();
    c.set_timeout(Duration::from_secs(10));
    c.get(path).await.unwrap()
}

/// The counter of `name` with exactly these labels on the metrics page.
fn metric(page: &str, name: &str, labels: &str) -> u64 {
    let head = format!("{name}{{{labels}}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&head))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {head} in\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_in_flight_cap_answers_503_with_retry_after() {
    let node = TestNode::start().await;

    // Hold the only place: a check whose body has not arrived in full.
    let mut held = TcpStream::connect(node.addr).await.unwrap();
    let body = r#"{"user":"held"}"#;
    held.write_all(
        format!(
            "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            &body[..4]
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The node admits the held request when its head is in; wait until it
    // is (the gauge of the only place), without sleeping a guessed time.
    let start = Instant::now();
    loop {
        let shed = get(node.addr, "/v1/allow?user=probe").await;
        if shed.status == 503 {
            // Over the cap: answered at once, with when to come back.
            assert_eq!(shed.header("retry-after"), Some("2"), "{shed:?}");
            let error = shed.json()["error"].as_str().unwrap_or("").to_owned();
            assert!(
                error.contains("overloaded") && error.contains("max_in_flight"),
                "{error}"
            );
            break;
        }
        // Admitted before the held request was: it counted one hit.
        assert_eq!(shed.status, 200, "{shed:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A full check is shed the same way, and counts nothing.
    let mut c = Connection::open_addr(node.addr).await.unwrap();
    let answer = c
        .post_json("/v1/check", r#"{"user":"shed"}"#)
        .await
        .unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("2"));
    // Probes are never shed, on either listener.
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
    assert_eq!(get(node.admin, "/healthz").await.status, 200);
    let page = get(node.admin, "/metrics").await.text();
    assert!(
        metric(
            &page,
            "drl_shed_total",
            r#"protocol="http",reason="in_flight""#
        ) >= 2,
        "{page}"
    );

    // The held request completes, and gives its place back.
    held.write_all(&body.as_bytes()[4..]).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"allowed\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf))
            .await
            .expect("the held request is answered")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let answer = c
        .post_json("/v1/check", r#"{"user":"shed"}"#)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    // The shed check counted nothing: this is its first hit.
    assert_eq!(answer.json()["remaining"], 99, "{answer:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_listener_over_its_cap_answers_unavailable_with_retry_after() {
    let node = TestNode::start().await;
    let state = GrpcState::with_admission(node.service.clone(), cap_of_one());
    let envoy = EnvoyRateLimit::new(state.clone());
    let request = || {
        tonic::Request::new(RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user".into(),
                    value: "grpc".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    let held = state.admit().expect("the only place");
    let status = envoy.should_rate_limit(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("overloaded"), "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()),
        Some("2000")
    );
    drop(held);
    let answer = envoy.should_rate_limit(request()).await.unwrap();
    assert_eq!(answer.get_ref().statuses.len(), 1);
    assert_eq!(answer.get_ref().statuses[0].limit_remaining, 99);
    node.shutdown().await;
}
