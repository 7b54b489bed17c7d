//! Every way into the counters decides the same: small limits are exact,
//! and a request of several limits is decided atomically (confirmed
//! together near a limit, nothing charged when any denies), whichever
//! protocol carries it.
//!
//! - On real processes (`drl cluster`, three nodes): Envoy's
//!   `ShouldRateLimit` with two descriptors (per user 5/h, per route
//!   100/h), twenty requests round robin: exactly five admitted, and the
//!   route charged exactly five.
//! - On three in-process nodes over real QUIC and real sockets: the same
//!   through the axum middleware and the SDK's embedded mode, and the
//!   small-limit matrix (every limit admits exactly `min(offered, L)` of
//!   sequential traffic, sent to one node, round robin or at random, and
//!   its first answer says `L − 1` left) through HTTP, native gRPC, Envoy's
//!   gRPC, RESP, the middleware and the SDK. `examples/protocol_matrix.rs`
//!   runs the full matrix (limits to 1000, up to 50 nodes).

mod paths_support;
mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;

use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
use drl::grpc::pb::CheckRequest;

use paths_support::{descriptor, matrix_rules, Nodes, Path, PATHS};
use support::cluster::LocalCluster;
use support::scratch;

/// Per user 5 an hour, per route 100 an hour.
const TWO_LIMITS: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 5, window = "1h" } ]

[[rules]]
name = "per-route"
match = { route = "*" }
limits = [ { algorithm = "sliding_window", limit = 100, window = "1h" } ]
"#;

/// What Envoy sends for a route with a per-user and a per-route action.
fn two_descriptors(user: &str, route: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![
            descriptor(&[("user", user)]),
            descriptor(&[("route", route)]),
        ],
        hits_addend: 1,
    }
}

/// What the per-route limit has left, as node `grpc` sees it (a check of
/// cost 0 counts nothing).
async fn route_remaining(grpc: u16, route: &str) -> u64 {
    let mut native = RateLimiterClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let answer = native
        .check(CheckRequest {
            descriptors: [("route".to_owned(), route.to_owned())].into(),
            cost: Some(0),
            limit: None,
        })
        .await
        .unwrap()
        .into_inner();
    answer.remaining.unwrap()
}

/// Waits until every node sees the route with `expected` left: what was
/// charged on one node reaches the others within a few sync intervals.
async fn route_settles(grpc_ports: impl Iterator<Item = u16>, route: &str, expected: u64) {
    for port in grpc_ports {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = route_remaining(port, route).await;
            if left == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node on {port} sees {left} left of the route, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[test]
fn envoy_with_two_descriptors_is_exact_on_real_processes() {
    let cluster = LocalCluster::start("envoy-two");
    cluster.put_rules(TWO_LIMITS, "per-route");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for port in cluster.grpc..cluster.grpc + 3 {
            let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(RateLimitServiceClient::new(channel));
        }
        let mut admitted = 0;
        for i in 0..20 {
            let answer = clients[i % 3]
                .should_rate_limit(two_descriptors("alice", "/search"))
                .await
                .unwrap()
                .into_inner();
            let ok = answer.overall_code == Code::Ok as i32;
            if ok {
                admitted += 1;
                assert!(
                    answer.statuses.iter().all(|s| s.code == Code::Ok as i32),
                    "{answer:?}"
                );
            } else {
                // The user is over its limit; the route, which had room,
                // says so, and was not charged.
                assert_eq!(answer.statuses[0].code, Code::OverLimit as i32);
                assert_eq!(answer.statuses[1].code, Code::Ok as i32);
            }
        }
        assert_eq!(admitted, 5, "a per-user limit of 5 over three nodes");
        route_settles(cluster.grpc..cluster.grpc + 3, "/search", 95).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_admits_small_limits_exactly() {
    let limits = [1u64, 3, 5, 10, 100];
    let nodes = Nodes::start(scratch("matrix"), 3, &matrix_rules(&limits)).await;
    let mut failures = Vec::new();
    for kind in PATHS {
        let mut path = Path::open(kind, &nodes).await;
        for &limit in &limits {
            for spread in ["one", "round-robin", "random"] {
                let user = format!("{}-{limit}-{spread}", path.name());
                let tier = format!("l{limit}");
                let mut x = 0x9e37_79b9u64 ^ limit;
                let mut admitted = 0;
                let mut first = None;
                for i in 0..limit * 2 {
                    let node = match spread {
                        "one" => 0,
                        "round-robin" => (i % 3) as usize,
                        _ => {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % 3) as usize
                        }
                    };
                    let (ok, left) = path.ask(node, &[("tier", &tier), ("user", &user)]).await;
                    first.get_or_insert(left);
                    admitted += u64::from(ok);
                }
                if admitted != limit || first != Some(limit - 1) {
                    failures.push(format!(
                        "{kind}, limit {limit}, {spread}: admitted {admitted} of {}, first answer {first:?} left",
                        limit * 2
                    ));
                }
            }
        }
    }
    nodes.stop().await;
    assert!(failures.is_empty(), "not exact:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limits_are_confirmed_together_through_the_middleware_and_the_sdk() {
    for kind in ["middleware", "sdk-embedded"] {
        let nodes = Nodes::start(scratch(kind), 3, TWO_LIMITS).await;
        let mut path = Path::open(kind, &nodes).await;
        let mut admitted = 0;
        for i in 0..20 {
            let (ok, _) = path
                .ask(i % 3, &[("user", "alice"), ("route", "/search")])
                .await;
            admitted += u64::from(ok);
        }
        assert_eq!(
            admitted, 5,
            "{kind}: a per-user limit of 5 over three nodes"
        );
        // The route was charged for the five admitted only, on every node.
        route_left_everywhere(&nodes, "/search", 95, kind).await;
        nodes.stop().await;
    }
}

/// `POST /v1/check/batch` of `body` on `conn`.
async fn post_batch(
    conn: &mut drl::http::client::Connection,
    body: &str,
) -> drl::http::client::Answer {
    conn.request(
        "POST",
        "/v1/check/batch",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await
    .unwrap()
}

/// What `route` has left on every node, once they agree on `expected`.
async fn route_left_everywhere(nodes: &Nodes, route: &str, expected: u64, what: &str) {
    for (i, r) in nodes.servers.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pairs = [("route", route)];
            let d = drl_core::descriptor::Descriptors::new(&pairs).unwrap();
            let left = r
                .decider
                .check(&d, 0)
                .await
                .unwrap()
                .quota
                .unwrap()
                .remaining;
            if left == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: node {i} sees {left} left of the route, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_batch_is_atomic_over_three_nodes_and_independent_checks_stand_alone() {
    let nodes = Nodes::start(scratch("http-batch"), 3, TWO_LIMITS).await;
    let mut conns = Vec::new();
    for r in &nodes.servers {
        conns.push(
            drl::http::client::Connection::open_addr(r.http)
                .await
                .unwrap(),
        );
    }
    let batch = |independent: bool, checks: serde_json::Value| {
        serde_json::json!({ "checks": checks, "independent": independent }).to_string()
    };
    // Atomic: the user's limit of 5 and the route's of 100, round robin.
    let atomic = batch(
        false,
        serde_json::json!([{ "user": "alice" }, { "route": "/search" }]),
    );
    let mut admitted = 0;
    for i in 0..20 {
        let a = post_batch(&mut conns[i % 3], &atomic).await;
        let v: serde_json::Value = serde_json::from_str(&a.text()).unwrap();
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{v}");
        match a.status {
            200 => {
                admitted += 1;
                assert_eq!(v["allowed"], true);
                assert!(results
                    .iter()
                    .all(|r| r["allowed"] == true && r["receipt"].is_string()));
            }
            429 => {
                assert_eq!(v["allowed"], false);
                // The route admitted it, but was not charged.
                assert_eq!(results[1]["allowed"], false, "{v}");
                assert!(results[1]["message"]
                    .as_str()
                    .unwrap()
                    .contains("not counted"));
                assert!(results.iter().all(|r| r.get("receipt").is_none()));
            }
            other => panic!("status {other}: {v}"),
        }
    }
    assert_eq!(admitted, 5, "a per-user limit of 5 over three nodes");
    route_left_everywhere(&nodes, "/search", 95, "atomic batches").await;

    // A check that cannot be decided refuses an atomic batch whole.
    let bad = batch(
        false,
        serde_json::json!([{ "route": "/search" }, { "Bad Name": "x" }]),
    );
    let a = post_batch(&mut conns[0], &bad).await;
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("check 1"), "{}", a.text());
    route_left_everywhere(&nodes, "/search", 95, "a refused batch").await;

    // Independent: the bad check gets its own error, the others count.
    let independent = batch(
        true,
        serde_json::json!([{ "route": "/search" }, { "Bad Name": "x" }, { "user": "alice" }]),
    );
    let a = post_batch(&mut conns[1], &independent).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v: serde_json::Value = serde_json::from_str(&a.text()).unwrap();
    assert_eq!(v["results"][0]["allowed"], true, "{v}");
    assert_eq!(v["results"][1]["status"], 400, "{v}");
    assert_eq!(v["results"][2]["allowed"], false, "alice is spent: {v}");
    route_left_everywhere(&nodes, "/search", 94, "independent checks").await;

    // Malformed bodies change nothing.
    for body in [
        "",
        "{}",
        r#"{"checks": []}"#,
        r#"{"checks": [{"route": "/search"}], "atomic": true}"#,
        r#"{"checks": {"route": "/search"}}"#,
    ] {
        let a = post_batch(&mut conns[2], body).await;
        assert_eq!(a.status, 400, "{body:?}: {}", a.text());
    }
    let too_many = batch(
        false,
        serde_json::Value::Array(vec![serde_json::json!({ "route": "/search" }); 1001]),
    );
    let a = post_batch(&mut conns[2], &too_many).await;
    assert_eq!(a.status, 400, "{}", a.text());
    route_left_everywhere(&nodes, "/search", 94, "refused bodies").await;
    nodes.stop().await;
}
