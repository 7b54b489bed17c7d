//! Request-defined limits: a limit carried by the request (redis-cell's
//! `CL.THROTTLE`, a check's `limit`, a native gRPC check's `limit`, an
//! Envoy override) is decided by exactly its own parameters whatever the
//! rules say, counts apart from the rules and from other parameters, is
//! bounded by the operator, and never touches the rules text.
//!
//! The race that used to lose admin changes: on real processes (`drl
//! cluster`, three nodes), an admin `PUT /v1/rules` on node 0 while
//! `CL.THROTTLE` calls with new parameters hit node 1, a hundred times:
//! every PUT stays in force on every node.

mod support;

use std::time::{Duration, Instant};

use support::cluster::LocalCluster;
use support::request;

/// Rules with a catch-all that would admit far more than any `CL.THROTTLE`
/// asks; `version` makes each PUT's text distinct.
fn rules(version: usize) -> String {
    format!(
        r#"
[[rules]]
name = "catch-all-{version}"
match = {{}}
limits = [ {{ algorithm = "fixed_window", limit = 100000, window = "1m" }} ]

[[rules]]
name = "every-cell-key"
match = {{ cl_key = "*" }}
limits = [ {{ algorithm = "fixed_window", limit = 100000, window = "1m" }} ]
"#
    )
}

async fn throttle(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    args: &[u32],
) -> Vec<i64> {
    let mut cmd = redis::cmd("CL.THROTTLE");
    cmd.arg(key);
    for a in args {
        cmd.arg(*a);
    }
    cmd.query_async(con).await.unwrap()
}

#[test]
fn admin_changes_are_never_lost_to_cl_throttle_and_it_uses_its_own_limit() {
    let cluster = LocalCluster::start("request-race");
    cluster.put_rules(&rules(0), "catch-all-0");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/", cluster.resp + 1)).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let mut lost = Vec::new();
        for round in 1..=100 {
            let text = rules(round);
            let http = cluster.http;
            let put = tokio::task::spawn_blocking(move || request(http, "PUT", "/v1/rules", &text));
            // New parameters on every round, on another node, at once.
            let answer = throttle(
                &mut con,
                &format!("race-{round}"),
                &[4, 5 + round as u32, 60],
            )
            .await;
            assert_eq!(answer[0], 0, "round {round}: {answer:?}");
            let (code, body) = put.await.unwrap().unwrap();
            assert_eq!(code, 200, "round {round}: {body}");
            let marker = format!("catch-all-{round}");
            let deadline = Instant::now() + Duration::from_secs(5);
            for port in cluster.http..cluster.http + 3 {
                loop {
                    let got = request(port, "GET", "/v1/rules", "").map(|(_, b)| b);
                    if got.as_deref().is_some_and(|b| b.contains(&marker)) {
                        break;
                    }
                    if Instant::now() > deadline {
                        lost.push(format!("round {round}: node on {port} does not run it"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        assert!(lost.is_empty(), "admin changes lost:\n{}", lost.join("\n"));
        // The rules never carried a CL.THROTTLE limit.
        let (_, text) = request(cluster.http, "GET", "/v1/rules", "").unwrap();
        assert!(!text.contains("cl-throttle"), "{text}");
        // 5 per minute (a burst of 4 and 5 per 60 s) admits exactly 5,
        // spread over the nodes, with the catch-all in force.
        let mut admitted = 0;
        for i in 0..12 {
            let node = cluster.resp + (i % 3);
            let client = redis::Client::open(format!("redis://127.0.0.1:{node}/")).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let r = throttle(&mut con, "five-a-minute", &[4, 5, 60]).await;
            assert_eq!(r[1], 5, "its own limit: {r:?}");
            admitted += i64::from(r[0] == 0);
        }
        assert_eq!(admitted, 5);
    });
}

#[test]
fn http_and_grpc_checks_carry_their_own_limit_within_the_operators_bounds() {
    let cluster = LocalCluster::start("request-edges");
    cluster.put_rules(&rules(0), "catch-all-0");
    let body = |user: &str, limit: &str| format!(r#"{{"user": "{user}", "limit": {limit}}}"#);
    let three = r#"{"algorithm": "sliding_window", "limit": 3, "window": "1m"}"#;
    let mut codes = Vec::new();
    for i in 0..5 {
        let port = cluster.http + (i % 3);
        let (code, text) = request(port, "POST", "/v1/check", &body("ann", three)).unwrap();
        if code == 200 {
            assert!(
                text.contains(r#""limit":3"#) && text.contains(r#""rule":"request""#),
                "{text}"
            );
        }
        codes.push(code);
    }
    assert_eq!(codes, [200, 200, 200, 429, 429], "exactly its own 3");
    // Other parameters on the same descriptors count apart.
    let four = r#"{"algorithm": "sliding_window", "limit": 4, "window": "1m"}"#;
    let (code, text) = request(cluster.http, "POST", "/v1/check", &body("ann", four)).unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""remaining":3"#), "{text}");
    // Beyond the operator's bounds, or not a limit: 400, nothing counted.
    for bad in [
        r#"{"algorithm": "fixed_window", "limit": 5000000, "window": "1m"}"#,
        r#"{"algorithm": "fixed_window", "limit": 5, "window": "30d"}"#,
        r#"{"algorithm": "fixed_window", "limit": 5}"#,
        r#"{"algorithm": "fixed_window", "limit": 5, "window": "1m", "leak": 2}"#,
        r#"{"algorithm": "bogus"}"#,
    ] {
        let (code, text) = request(cluster.http, "POST", "/v1/check", &body("bob", bad)).unwrap();
        assert_eq!(code, 400, "{bad}: {text}");
        assert!(text.contains("limit"), "{text}");
    }
    // A string `limit` is still the descriptor field of that name.
    let (code, text) = request(
        cluster.http,
        "POST",
        "/v1/check",
        r#"{"user": "cy", "limit": "gold"}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("catch-all-0"), "decided by the rules: {text}");
    // The native gRPC check carries one the same way.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
        use drl::grpc::pb::{CheckRequest, LimitSpec};
        let mut client = RateLimiterClient::connect(format!("http://127.0.0.1:{}", cluster.grpc))
            .await
            .unwrap();
        let ask = || CheckRequest {
            descriptors: [("user".to_owned(), "dee".to_owned())].into(),
            cost: None,
            limit: Some(LimitSpec {
                algorithm: "gcra".into(),
                limit: Some(2),
                per: Some("1h".into()),
                burst: Some(2),
                ..LimitSpec::default()
            }),
        };
        let mut allowed = Vec::new();
        for _ in 0..3 {
            let r = client.check(ask()).await.unwrap().into_inner();
            allowed.push(r.allowed);
            assert_eq!(r.rule.as_deref(), Some("request"));
        }
        assert_eq!(allowed, [true, true, false]);
    });
    // The metric says how many distinct ones the node tracks.
    let (_, metrics) = request(cluster.http, "GET", "/metrics", "").unwrap();
    let sets = metrics
        .lines()
        .find(|l| l.starts_with("drl_request_limit_parameter_sets "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        sets.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<f64>().ok())
            >= Some(2.0),
        "{sets}"
    );
}
