//! Envoy's rate limit service (RLS v3) over real sockets, with a tonic
//! client generated from Envoy's own protos (`envoy-types`): statuses,
//! headers, costs, refusals that change nothing, domain-scoped rules, and one
//! key spread over three nodes staying within its limit.

mod grpc_support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::{Entry, RateLimitOverride},
    RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use tonic::transport::Channel;

use grpc_support::{cluster, cluster_dir, GrpcNode};

const RULES: &str = r#"
[[rules]]
name = "edge-per-ip"
domain = "edge"
match = { remote_address = "*" }
limits = [ { algorithm = "fixed_window", limit = 3, window = "1m" } ]

[[rules]]
name = "per-path"
match = { path = "*" }
limits = [ { algorithm = "fixed_window", limit = 10, window = "1h" } ]

[[rules]]
name = "per-client"
match = { client = "*" }
limits = [ { algorithm = "sliding_window", limit = 5, window = "10s" } ]
"#;

type Client = RateLimitServiceClient<Channel>;

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(client: &mut Client, r: RateLimitRequest) -> RateLimitResponse {
    client.should_rate_limit(r).await.unwrap().into_inner()
}

fn header<'r>(r: &'r RateLimitResponse, name: &str) -> Option<&'r str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

async fn one_node(name: &str) -> (GrpcNode, Client) {
    let dir = cluster_dir(name, 1, RULES);
    let node = GrpcNode::start(&dir, 0, vec![]).await;
    node.wait_ready().await;
    let client = Client::connect(node.grpc_url()).await.unwrap();
    (node, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_then_over_limit_with_statuses_and_headers() {
    let (node, mut client) = one_node("over").await;
    let ip = || vec![descriptor(&[("remote_address", "10.0.0.1")])];
    for left in (0..3u32).rev() {
        let r = ask(&mut client, request("edge", ip(), 0)).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!(limit.requests_per_unit, 3);
        assert_eq!(limit.unit, Unit::Minute as i32);
        assert_eq!(limit.name, "edge-per-ip");
        assert_eq!(s.limit_remaining, left);
        let reset = s.duration_until_reset.as_ref().unwrap();
        assert!(reset.seconds <= 60 && (reset.seconds > 0 || reset.nanos > 0));
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some("\"edge-per-ip\";q=3;w=60")
        );
        assert!(header(&r, "ratelimit")
            .unwrap()
            .starts_with(&format!("\"edge-per-ip\";r={left};t=")));
        assert_eq!(header(&r, "retry-after"), None);
    }
    let r = ask(&mut client, request("edge", ip(), 0)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another address has its own counter.
    let r = ask(
        &mut client,
        request(
            "edge",
            vec![descriptor(&[("remote_address", "10.0.0.2")])],
            1,
        ),
    )
    .await;
    assert_eq!(r.overall_code, Code::Ok as i32);

    let metrics = node.metrics().await;
    assert!(
        metrics.contains(
            "drl_decisions_total{result=\"allowed\",rule=\"edge-per-ip\",protocol=\"grpc\"} 4"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "drl_decisions_total{result=\"denied\",rule=\"edge-per-ip\",protocol=\"grpc\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("drl_decision_duration_seconds_count{protocol=\"grpc\"} 5"),
        "{metrics}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_descriptor_gets_a_status_and_one_refusal_counts_none() {
    let (node, mut client) = one_node("statuses").await;
    let both = || {
        vec![
            descriptor(&[("path", "/a")]),
            descriptor(&[("remote_address", "10.1.1.1")]),
            descriptor(&[("unknown_key", "whatever")]),
        ]
    };
    // Spend the address (3 per minute) through its own descriptor.
    for _ in 0..3 {
        let r = ask(
            &mut client,
            request(
                "edge",
                vec![descriptor(&[("remote_address", "10.1.1.1")])],
                1,
            ),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    for _ in 0..4 {
        let r = ask(&mut client, request("edge", both(), 1)).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(r.statuses.len(), 3);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
        assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
        assert_eq!(r.statuses[2].code, Code::Ok as i32);
        assert_eq!(r.statuses[2].current_limit, None, "no rule matched");
        // The path was not charged for the refused request.
        assert_eq!(r.statuses[0].limit_remaining, 10);
        assert!(header(&r, "retry-after").is_some());
    }
    // The path still has all 10.
    let r = ask(
        &mut client,
        request("edge", vec![descriptor(&[("path", "/a")])], 1),
    )
    .await;
    assert_eq!(r.statuses[0].limit_remaining, 9);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_is_the_cost() {
    let (node, mut client) = one_node("hits").await;
    let path = |p: &str| vec![descriptor(&[("path", p)])];
    let r = ask(&mut client, request("d", path("/h"), 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 9, "0 means 1");
    let r = ask(&mut client, request("d", path("/h"), 4)).await;
    assert_eq!(r.statuses[0].limit_remaining, 5);
    let r = ask(&mut client, request("d", path("/h"), 6)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "6 > 5 left");
    assert_eq!(r.statuses[0].limit_remaining, 5, "nothing counted");
    // A descriptor's own hits_addend wins over the request's.
    let mut own = descriptor(&[("path", "/h")]);
    own.hits_addend = Some(UInt64Value { value: 5 });
    let r = ask(&mut client, request("d", vec![own], 1)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    // More than the limit can ever admit.
    let r = ask(&mut client, request("d", path("/other"), 11)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(header(&r, "retry-after"), None, "retrying cannot succeed");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_descriptors_pass_and_rules_keep_to_their_domain() {
    let (node, mut client) = one_node("domain").await;
    for _ in 0..20 {
        let r = ask(
            &mut client,
            request("edge", vec![descriptor(&[("nobody", "knows")])], 1),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].current_limit, None);
        assert!(r.response_headers_to_add.is_empty());
    }
    // `edge-per-ip` is scoped to the domain `edge`: not applied elsewhere.
    for _ in 0..5 {
        let r = ask(
            &mut client,
            request(
                "internal",
                vec![descriptor(&[("remote_address", "10.2.2.2")])],
                1,
            ),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].current_limit, None);
    }
    node.shutdown().await;
}

/// A descriptor's own limit (Envoy's override) is a request-defined limit:
/// exactly its own number, whatever rule matches the descriptor, counted
/// apart from the rule's counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_override_is_the_descriptors_own_limit() {
    let (node, mut client) = one_node("override").await;
    let mut over = descriptor(&[("path", "/o")]);
    over.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: Unit::Minute as i32,
    });
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = ask(&mut client, request("edge", vec![over.clone()], 1)).await;
        codes.push(r.statuses[0].code);
        if r.overall_code == Code::Ok as i32 {
            let limit = r.statuses[0].current_limit.as_ref().unwrap();
            assert_eq!(
                (limit.requests_per_unit, limit.unit),
                (2, Unit::Minute as i32)
            );
        }
    }
    let (ok, over_limit) = (Code::Ok as i32, Code::OverLimit as i32);
    assert_eq!(codes, [ok, ok, over_limit, over_limit]);
    // The rule of the path (10 an hour) was not charged by them.
    let plain = ask(
        &mut client,
        request("edge", vec![descriptor(&[("path", "/o")])], 1),
    )
    .await;
    assert_eq!(plain.statuses[0].limit_remaining, 9);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_and_change_nothing() {
    let (node, mut client) = one_node("malformed").await;
    let good = || descriptor(&[("path", "/m")]);
    // An override of an unknown unit cannot be a limit.
    let mut over = good();
    over.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    let cases = vec![
        request("", vec![good()], 1),
        request("edge", vec![], 1),
        request("edge", vec![good(), descriptor(&[])], 1),
        request("edge", vec![good(), descriptor(&[("Bad-Key", "v")])], 1),
        request("edge", vec![good(), descriptor(&[("path", "")])], 1),
        request("edge", vec![good(), descriptor(&[("domain", "x")])], 1),
        request("edge", vec![good(), over], 1),
        request("bad\u{7f}domain", vec![good()], 1),
    ];
    for r in cases {
        let e = client.should_rate_limit(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{r:?}: {e:?}");
        assert!(!e.message().is_empty());
    }
    let r = ask(&mut client, request("edge", vec![good()], 1)).await;
    assert_eq!(r.statuses[0].limit_remaining, 9, "nothing was counted");
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("drl_grpc_rejected_total{code=\"invalid_argument\"} 8"),
        "{metrics}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (node, _) = one_node("health").await;
    let channel = tonic::transport::Channel::from_shared(node.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "",
        "envoy.service.ratelimit.v3.RateLimitService",
        "drl.v1.RateLimiter",
    ] {
        let start = std::time::Instant::now();
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "{service}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_over_three_nodes_stays_within_its_limit() {
    let nodes = cluster("spread", 3, RULES).await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(node.grpc_url()).await.unwrap());
    }
    // per-path: 10 per hour, asked 40 times round robin.
    let mut allowed = 0;
    for i in 0..40 {
        let client = &mut clients[i % 3];
        let r = ask(
            client,
            request("edge", vec![descriptor(&[("path", "/spread")])], 1),
        )
        .await;
        if r.overall_code == Code::Ok as i32 {
            allowed += 1;
        }
    }
    assert!(allowed <= 10, "admitted {allowed} of a limit of 10");
    assert!(allowed >= 3, "admitted only {allowed}");
    for node in nodes {
        node.shutdown().await;
    }
}
