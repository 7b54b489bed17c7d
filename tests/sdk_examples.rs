//! The SDK's two examples (`client/examples/`), run as they are against a
//! real `drl cluster` of three processes: the axum service limits per user
//! through the layer; the worker's atomic batches and refunds leave the
//! cluster's counts equal to the jobs it reports done.

mod support;

#[path = "../client/examples/web_service.rs"]
#[allow(dead_code)]
mod web_service;
#[path = "../client/examples/worker.rs"]
#[allow(dead_code)]
mod worker;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::cluster::LocalCluster;
use support::request;

const RULES: &str = r#"
# sdk-examples
endpoints = ["/v1/search", "/v1/export"]

[[rules]]
name = "search-per-user"
match = { endpoint = "/v1/search", user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 3, window = "1h" } ]

[[rules]]
name = "per-tenant"
match = { tenant = "*" }
limits = [ { algorithm = "fixed_window", limit = 15, window = "1h" } ]

[[rules]]
name = "export"
match = { quota = "export" }
limits = [ { algorithm = "fixed_window", limit = 1000, window = "1h" } ]
"#;

/// GET `path` on `addr` as `user` (if any): status and head.
fn get(addr: std::net::SocketAddr, path: &str, user: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let user = user.map_or(String::new(), |u| format!("x-user-id: {u}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\n{user}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    (code, text.to_lowercase())
}

/// The cluster-wide count of the one counter `descriptors` reach.
fn counted(port: u16, descriptors: &str) -> u64 {
    let (code, text) = request(port, "POST", "/v1/counters", descriptors).unwrap();
    assert_eq!(code, 200, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["counters"][0]["count"].as_u64().unwrap_or(0)
}

#[test]
fn the_examples_run_against_a_drl_cluster() {
    let cluster = LocalCluster::start("sdk-examples");
    cluster.put_rules(RULES, "sdk-examples");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The axum service: three searches per user, then 429 with the
    // rate-limit headers; no user header is the layer's 500.
    let http_nodes: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", cluster.http + i))
        .collect();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let service = runtime.spawn(web_service::serve(http_nodes, listener));
    let mut first = (0, String::new());
    for _ in 0..50 {
        first = get(addr, "/v1/search", Some("alice"));
        if first.0 != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(first.0, 200, "{}", first.1);
    assert!(
        first.1.contains("ratelimit: \"search-per-user\";r=2"),
        "{}",
        first.1
    );
    assert_eq!(get(addr, "/v1/search", Some("alice")).0, 200);
    assert_eq!(get(addr, "/v1/search", Some("alice")).0, 200);
    let (code, head) = get(addr, "/v1/search", Some("alice"));
    assert_eq!(code, 429, "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    assert_eq!(get(addr, "/v1/search", Some("bob")).0, 200);
    assert_eq!(get(addr, "/v1/search", None).0, 500);
    service.abort();

    // The worker: 60 jobs over 3 tenants (15 each at most), every 10th
    // failing and refunded.
    let grpc_nodes: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", cluster.grpc + i))
        .collect();
    let report = runtime
        .block_on(worker::work(grpc_nodes, 60, 3, 10))
        .unwrap();
    println!("worker: {report:?}");
    // 15 admissions per tenant at most; refunded ones gave theirs back and
    // were admitted again later.
    assert_eq!(report.done + report.refunded + report.refused, 60);
    assert!(report.refunded >= 1 && report.refused >= 1, "{report:?}");
    // Counts replicate within a few sync intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let export = counted(
            cluster.http,
            r#"{"endpoint":"/v1/export","quota":"export"}"#,
        );
        let tenants: u64 = (0..3)
            .map(|t| {
                counted(
                    cluster.http,
                    &format!(r#"{{"endpoint":"/v1/export","tenant":"tenant-{t}"}}"#),
                )
            })
            .sum();
        if export == report.done && tenants == report.done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster counted export {export}, tenants {tenants}; the worker did {} jobs",
            report.done
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
