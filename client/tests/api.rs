//! The SDK's calls against real nodes, over gRPC and HTTP alike: checks with
//! receipts, refunds (routed to the issuing node), atomic batches,
//! request-defined limits, TLS with client certificates, the bearer token,
//! the retry policy, and lease returns.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, Proxy, TestNode};
use drl_client::{
    limits, Check, Client, ClientConfig, ClientError, DegradedMode, Fallback, GrpcTransport,
    HttpTransport, LeaseConfig, Outcome, Protocol, Receipt, RefundRefusal, RetryPolicy, Source,
    TlsConfig, Wire,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 3, window = "1h" } ]
"#;

fn protocols() -> [Protocol; 2] {
    [Protocol::Grpc, Protocol::Http]
}

fn addr_of(n: &TestNode, p: Protocol) -> String {
    match p {
        Protocol::Grpc => n.grpc.to_string(),
        Protocol::Http => n.http.to_string(),
    }
}

async fn client(nodes: &[&TestNode], p: Protocol) -> Client {
    Client::builder()
        .nodes(nodes.iter().map(|n| addr_of(n, p)))
        .protocol(p)
        .call_timeout(Duration::from_secs(5))
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

/// What `user` has left, asked with cost 0 (counts nothing).
async fn remaining(c: &Client, user: &str) -> u64 {
    let d = c.check(&[("user", user)], 0).await.unwrap();
    d.quota.unwrap().remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_refunds_and_atomic_batches_over_both_protocols() {
    let cluster = Cluster::new("api", 1, RULES, false);
    let nodes = cluster.start(&[]).await;
    for p in protocols() {
        let c = client(&[&nodes[0]], p).await;
        let user = format!("alice-{p:?}");
        let d = c.check(&[("user", &user)], 2).await.unwrap();
        assert!(d.is_allowed(), "{p:?}");
        assert_eq!(
            d.source,
            Source::Node(addr_of(&nodes[0], p).parse().unwrap())
        );
        let q = d.quota.clone().unwrap();
        assert_eq!((q.rule.as_str(), q.limit, q.remaining), ("per-user", 3, 1));
        let receipt = d.receipt.clone().expect("an allowed check has a receipt");
        let denied = c.check(&[("user", &user)], 2).await.unwrap();
        assert_eq!(denied.outcome, Outcome::Denied);
        assert!(denied.receipt.is_none());
        assert!(denied.quota.unwrap().retry_after.unwrap() > Duration::ZERO);

        // The refund gives the 2 back, once.
        let r = c.refund(&receipt).await.unwrap();
        assert_eq!((r.refunded, r.requested), (2, 2), "{p:?}");
        assert_eq!(remaining(&c, &user).await, 3);
        let again = c.refund(&receipt).await.unwrap_err();
        assert!(
            matches!(
                again,
                ClientError::Refund(RefundRefusal::AlreadyRefunded, _)
            ),
            "{p:?}: {again}"
        );
        assert!(again.decision_known());
        let forged = Receipt::new("not-a-receipt", None);
        assert!(matches!(
            c.refund(&forged).await.unwrap_err(),
            ClientError::Refund(RefundRefusal::Invalid, _)
        ));
        assert_eq!(remaining(&c, &user).await, 3, "refusals gave nothing back");

        // Atomic batches: all counted, or none.
        let other = format!("bob-{p:?}");
        let ok = c
            .check_batch(vec![
                Check::new([("user", user.as_str())]).cost(2),
                Check::new([("user", other.as_str())]),
            ])
            .await
            .unwrap();
        assert!(ok.is_allowed(), "{p:?}: {ok:?}");
        assert!(ok.decisions.iter().all(|d| d.receipt.is_some()));
        let refused = c
            .check_batch(vec![
                Check::new([("user", other.as_str())]),
                Check::new([("user", user.as_str())]).cost(2),
            ])
            .await
            .unwrap();
        assert!(!refused.is_allowed(), "{p:?}");
        assert!(refused.decisions.iter().all(|d| !d.is_allowed()));
        assert!(refused.decisions.iter().all(|d| d.receipt.is_none()));
        assert_eq!(
            remaining(&c, &other).await,
            2,
            "{p:?}: the refused batch left bob's count as it was"
        );
        assert_eq!(remaining(&c, &user).await, 1);
        // A bad check refuses the whole batch, counting nothing.
        let bad = c
            .check_batch(vec![
                Check::new([("user", other.as_str())]),
                Check::new([("Bad Name", "x")]),
            ])
            .await
            .unwrap_err();
        assert!(matches!(bad, ClientError::Refused(_)), "{bad}");
        assert_eq!(remaining(&c, &other).await, 2);

        // A request-defined limit, decided alone and counted apart.
        let own = || Check::new([("user", user.as_str())]).limit(limits::fixed_window(2, "1h"));
        for _ in 0..2 {
            let d = c.check_request(own()).await.unwrap();
            assert!(d.is_allowed(), "{p:?}");
            assert_eq!(d.quota.unwrap().rule, "request");
        }
        assert_eq!(
            c.check_request(own()).await.unwrap().outcome,
            Outcome::Denied
        );
        let too_big = Check::new([("user", "x")]).limit(limits::fixed_window(2, "400d"));
        assert!(matches!(
            c.check_request(too_big).await.unwrap_err(),
            ClientError::Refused(_)
        ));
    }
    for n in nodes {
        n.stop().await;
    }
}

/// A receipt presented to a node that did not issue it gets 421 (gRPC:
/// FAILED_PRECONDITION naming the slot): the client takes it to the others
/// until the issuer refunds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_reaches_the_node_that_issued_the_receipt() {
    let cluster = Cluster::new("refund", 2, RULES, false);
    let nodes = cluster.start(&[]).await;
    for p in protocols() {
        let c = client(&[&nodes[0], &nodes[1]], p).await;
        let user = format!("carol-{p:?}");
        let d = c.check(&[("user", &user)], 1).await.unwrap();
        let issued = d.receipt.unwrap();
        let issuer = issued.node().unwrap();
        let other: SocketAddr = [&nodes[0], &nodes[1]]
            .iter()
            .map(|n| addr_of(n, p).parse().unwrap())
            .find(|a| *a != issuer)
            .unwrap();
        // The wrong node first, as a receipt kept without its node (or
        // read back from storage with a stale address) would be.
        let misdirected = Receipt::new(issued.token(), Some(other));
        let r = c.refund(&misdirected).await.unwrap();
        assert_eq!((r.refunded, r.requested), (1, 1), "{p:?}");
        assert!(matches!(
            c.refund(&issued).await.unwrap_err(),
            ClientError::Refund(RefundRefusal::AlreadyRefunded, _)
        ));
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_custom_ca_and_a_client_certificate() {
    let cluster = Cluster::new("tls", 1, RULES, false);
    let certs = cluster.dir.join("certs");
    let clients = cluster.dir.join("client-certs");
    drl::net::generate_dev_certs(&clients, &drl::net::local_cluster_specs(1)).unwrap();
    let tls = drl::node::GrpcTls {
        cert: certs.join("node-0.pem"),
        key: certs.join("node-0-key.pem"),
        client_ca: Some(clients.join("ca.pem")),
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let node = cluster.start_node_tls(0, any, vec![], Some(tls)).await;
    common::wait_mesh(std::slice::from_ref(&node)).await;
    let trust = || {
        TlsConfig::from_ca_file(certs.join("ca.pem"))
            .unwrap()
            .server_name("node-0")
    };
    let with_cert = trust()
        .client_identity_files(clients.join("node-0.pem"), clients.join("node-0-key.pem"))
        .unwrap();
    let good = Client::builder()
        .node(node.grpc.to_string())
        .tls(with_cert)
        .attempt_timeout(Duration::from_secs(2))
        .call_timeout(Duration::from_secs(4))
        .build()
        .await
        .unwrap();
    let d = good.check(&[("user", "tls")], 1).await.unwrap();
    assert_eq!(d.source, Source::Node(node.grpc));
    assert_eq!(d.quota.unwrap().remaining, 2);

    // No client certificate: the handshake fails, nothing is sent; fail
    // closed decides.
    let anonymous = Client::builder()
        .node(node.grpc.to_string())
        .tls(trust())
        .attempt_timeout(Duration::from_secs(2))
        .call_timeout(Duration::from_secs(4))
        .build()
        .await
        .unwrap();
    let d = anonymous.check(&[("user", "tls")], 1).await;
    match d {
        Ok(d) => assert!(matches!(d.source, Source::Degraded(_)) && !d.is_allowed()),
        // The handshake can also fail once the request is on its way
        // (TLS 1.3 checks the client certificate after the client's
        // finish): the node refused it before any decision.
        Err(e) => assert!(!e.decision_known(), "{e}"),
    }
    let d = good.check(&[("user", "tls")], 1).await.unwrap();
    assert_eq!(
        d.quota.unwrap().remaining,
        1,
        "the refused client counted nothing"
    );
    node.stop().await;
}

/// Both transports send the bearer token with every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_goes_with_every_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).to_lowercase());
                let body = r#"{"allowed":true,"outcome":"allowed","rule":null}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    let c = Client::builder()
        .node(addr.to_string())
        .bearer_token("s3cret")
        .build()
        .await
        .unwrap();
    assert!(c.check(&[("user", "t")], 1).await.unwrap().is_allowed());
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|r| r.starts_with("post /v1/check") && r.contains("authorization: bearer s3cret")),
        "{seen:?}"
    );
    assert!(HttpTransport::default()
        .with_bearer_token("bad\ntoken")
        .is_err());
    assert!(GrpcTransport::new().bearer_token("bad\ntoken").is_err());
}

/// The safe policy never sends a check whose fate is unknown to a second
/// node; at-least-once does (and would count it twice had the first node
/// counted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_may_have_counted_is_not_sent_again_by_default() {
    let cluster = Cluster::new("retry", 2, RULES, false);
    let nodes = cluster.start(&[]).await;
    // Node 0 nearest; node 1 behind 30 ms more.
    let near = Proxy::start(nodes[0].http).await;
    let far = Proxy::start(nodes[1].http).await;
    far.set_delay(Duration::from_millis(30));
    let make = |retry| {
        let config = ClientConfig {
            attempt_timeout: Duration::from_millis(400),
            call_timeout: Duration::from_secs(3),
            retry,
            ..ClientConfig::default()
        };
        Client::with_nodes(
            vec![near.addr, far.addr],
            config,
            Wire::Http(HttpTransport::default()),
        )
        .unwrap()
    };
    let safe = make(RetryPolicy::Safe);
    let eager = make(RetryPolicy::AtLeastOnce);
    for c in [&safe, &eager] {
        for _ in 0..30 {
            c.check(&[("user", "warm")], 0).await.unwrap();
        }
        let states = c.node_states();
        // Measured and nearer, or the far one not measured yet (an
        // unmeasured node comes last).
        let near_first = match (states[0].latency, states[1].latency) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            _ => false,
        };
        assert!(near_first, "the near node is nearest: {states:?}");
    }
    // The near node now takes requests and never answers.
    near.set_blackhole(true);
    let e = safe.check(&[("user", "dave")], 1).await.unwrap_err();
    assert!(matches!(e, ClientError::Indeterminate { .. }), "{e}");
    assert!(!e.decision_known());
    assert!(!safe.on_error(&e), "fail closed refuses it");
    let d = eager.check(&[("user", "erin")], 1).await.unwrap();
    assert_eq!(d.source, Source::Node(far.addr));
    assert!(eager.metrics().failovers.get() >= 1);
    // Nothing reached node 0 (the proxy swallowed it), so the far node's
    // counts tell the whole story: the safe client's check went nowhere
    // else; the eager one's was counted once, there.
    let direct = client(&[&nodes[1]], Protocol::Http).await;
    assert_eq!(remaining(&direct, "dave").await, 3);
    assert_eq!(remaining(&direct, "erin").await, 2);
    near.set_blackhole(false);
    for n in nodes {
        n.stop().await;
    }
}

/// A lease the client never used is given back (its receipt refunded)
/// when the client stops, so the quota it held is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_lease_is_returned_on_shutdown() {
    let rules = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 1000, window = "1h" } ]
"#;
    let cluster = Cluster::new("lease-return", 1, rules, false);
    let nodes = cluster.start(&[]).await;
    let config = ClientConfig {
        degraded: DegradedMode::Local {
            otherwise: Fallback::Deny,
        },
        lease: LeaseConfig {
            share: 0.05,
            max_lease: 20,
            hot_calls: 5,
            max_keys: 100,
        },
        tick: Duration::from_millis(20),
        ..ClientConfig::default()
    };
    let c = Client::with_nodes(
        vec![nodes[0].grpc],
        config,
        Wire::Grpc(GrpcTransport::new()),
    )
    .unwrap();
    for _ in 0..10 {
        assert!(c.check(&[("user", "erin")], 1).await.unwrap().is_allowed());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (left, granted) = loop {
        if let Some(l) = c.lease_of(&[("user", "erin")]) {
            break l;
        }
        assert!(tokio::time::Instant::now() < deadline, "no lease granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(left, granted);
    let probe = client(&[&nodes[0]], Protocol::Grpc).await;
    let with_lease = remaining(&probe, "erin").await;
    c.shutdown().await;
    let after = remaining(&probe, "erin").await;
    println!(
        "lease return: {granted} leased, remaining {with_lease} before shutdown, {after} after"
    );
    assert_eq!(after, with_lease + granted, "the lease came back whole");
    assert_eq!(c.metrics().leases_of("returned"), 1);
    assert_eq!(c.lease_of(&[("user", "erin")]), None);
    for n in nodes {
        n.stop().await;
    }
}
