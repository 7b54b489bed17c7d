//! The tower layer in front of a real axum server, deciding through a
//! client of a real node; and embedded mode, where the application is a
//! cluster node itself.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::{routing::get, Router};
use common::Cluster;
use drl::http::client::{Answer, Connection};
use drl::node::NodeFile;
use drl_client::{Client, ClientConfig, Degraded, DegradedMode, RateLimitLayer, Source};

const RULES: &str = r#"
[[rules]]
name = "search-per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 3, window = "1h" } ]
"#;

async fn serve(app: Router) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, stop)
}

async fn get_as(addr: SocketAddr, user: Option<&str>) -> Answer {
    let mut conn = Connection::open_addr(addr).await.unwrap();
    let headers: Vec<(&str, &str)> = user.map(|u| ("x-user-id", u)).into_iter().collect();
    conn.request("GET", "/v1/search", &headers, b"")
        .await
        .unwrap()
}

/// An axum service behind the layer, the layer behind a client of a real
/// node: allowed requests reach the handler with the rate-limit fields, the
/// fourth gets 429 with `Retry-After`; with the node gone, the degraded
/// mode answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_protects_an_axum_service_through_a_client() {
    let cluster = Cluster::new("layer", 1, RULES, false);
    let nodes = cluster.start(&[]).await;
    let config = ClientConfig {
        degraded: DegradedMode::FailClosed,
        ..ClientConfig::default()
    };
    let client = Client::builder()
        .node(format!("http://{}", nodes[0].http))
        .config(config)
        .build()
        .await
        .unwrap();
    let app = Router::new()
        .route("/v1/search", get(|| async { "results" }))
        .layer(RateLimitLayer::new(client.clone(), |head| {
            let user = head.headers.get("x-user-id")?.to_str().ok()?.to_owned();
            Some(vec![("user".into(), user)])
        }));
    let (addr, stop) = serve(app).await;

    for left in [2, 1, 0] {
        let a = get_as(addr, Some("ann")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.text(), "results");
        assert_eq!(
            a.header("ratelimit-policy"),
            Some("\"search-per-user\";q=3;w=3600")
        );
        let rl = a.header("ratelimit").unwrap();
        assert!(
            rl.starts_with(&format!("\"search-per-user\";r={left};t=")),
            "{rl}"
        );
        assert!(a.header("retry-after").is_none());
    }
    let denied = get_as(addr, Some("ann")).await;
    assert_eq!(denied.status, 429);
    assert_ne!(denied.text(), "results");
    let retry: u64 = denied.header("retry-after").unwrap().parse().unwrap();
    // A sliding window's wait can pass its length (docs/http-api.md).
    assert!((1..=7200).contains(&retry), "{retry}");
    assert!(denied.header("ratelimit").unwrap().contains("r=0"));
    // Another user counts apart; an undescribed request passes unlimited.
    assert_eq!(get_as(addr, Some("bo")).await.status, 200);
    let free = get_as(addr, None).await;
    assert_eq!(free.status, 200);
    assert!(free.header("ratelimit").is_none());

    // The cluster gone, `fail_closed` refuses, and says when to come back.
    for n in nodes {
        n.stop().await;
    }
    let cut = get_as(addr, Some("cy")).await;
    assert_eq!(cut.status, 429);
    assert_eq!(cut.header("retry-after"), Some("1"));
    assert!(client.metrics().degraded_of("fail_closed", false) >= 1);
    let _ = stop.send(());
}

const WIDER: &str = r#"
[[rules]]
name = "search-per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 50, window = "1h" } ]
"#;

/// Embedded mode: the application's client is a node of the cluster (the
/// same `Node`, over QUIC). It decides in process; its admissions reach the
/// other node, which counts them against the same user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_client_is_a_node_of_the_cluster() {
    let cluster = Cluster::new("embedded", 2, WIDER, false);
    let remote = cluster
        .start_node(0, SocketAddr::from(([127, 0, 0, 1], 0)), vec![])
        .await;
    let settings = NodeFile {
        recovery_timeout: "1s".into(),
        ..NodeFile::local(&cluster.dir, 1, vec![remote.peer.to_string()])
    }
    .settings(&cluster.dir)
    .unwrap();
    let embedded = Client::embedded(settings, ClientConfig::default())
        .await
        .unwrap();
    let start = Instant::now();
    while !(remote.api.status().live.len() == 1
        && embedded.embedded_limiter().unwrap().is_admitting())
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no cluster");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Three admissions in process (retrying a refusal of the in-flight
    // share until the peer acknowledges).
    let mut admitted = 0;
    while admitted < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{admitted} admitted"
        );
        let d = embedded.check(&[("user", "dee")], 1).await.unwrap();
        assert_eq!(d.source, Source::Embedded);
        if d.is_allowed() {
            admitted += 1;
            assert_eq!(d.quota.as_ref().unwrap().rule, "search-per-user");
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The other node counts them.
    let start = Instant::now();
    while remote.counted() != 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "remote counts {}",
            remote.counted()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client::builder()
        .node(remote.http.to_string())
        .build()
        .await
        .unwrap();
    let d = client.check(&[("user", "dee")], 1).await.unwrap();
    assert_eq!(d.source, Source::Node(remote.http));
    assert!(d.is_allowed());
    let left = d.quota.unwrap().remaining;
    assert!(
        left < 50 - 3,
        "the remote node saw the embedded admissions: {left} left"
    );
    // Invalid descriptors are an error and count nothing, in both modes.
    assert!(embedded.check(&[("Bad", "x")], 1).await.is_err());
    assert!(client.check(&[("Bad", "x")], 1).await.is_err());

    embedded.shutdown().await;
    let d = embedded.check(&[("user", "dee")], 1).await.unwrap();
    assert_eq!(d.source, Source::Degraded(Degraded::FailClosed), "stopped");
    remote.stop().await;
}

/// An embedded node that has not recovered its counts (its peer never
/// answers) decides nothing itself: the degraded mode answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_node_recovering_answers_by_the_degraded_mode() {
    let cluster = Cluster::new("recovering", 2, WIDER, false);
    let settings = NodeFile {
        recovery_timeout: "60s".into(),
        ..NodeFile::local(&cluster.dir, 0, vec![])
    }
    .settings(&cluster.dir)
    .unwrap();
    let config = ClientConfig {
        degraded: DegradedMode::FailOpen,
        ..ClientConfig::default()
    };
    let embedded = Client::embedded(settings, config).await.unwrap();
    let d = embedded.check(&[("user", "eve")], 1).await.unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.source, Source::Degraded(Degraded::FailOpen));
    assert_eq!(embedded.metrics().degraded_of("fail_open", true), 1);
    embedded.shutdown().await;
}

/// The layer on a plain hyper server (no axum), wrapping an in-process
/// limiter: the same statuses and fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_wraps_a_plain_hyper_service_with_an_in_process_limiter() {
    use std::sync::Arc;

    use bytes::Bytes;
    use drl_core::limiter::{Limiter, LimiterConfig};
    use drl_core::rules::RuleSet;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower_layer::Layer;

    #[derive(Clone)]
    struct Hello;
    impl tower_service::Service<http::Request<Incoming>> for Hello {
        type Response = http::Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<Incoming>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Full::new(Bytes::from_static(
                b"hello",
            )))))
        }
    }

    let limiter = Arc::new(
        Limiter::new(RuleSet::from_toml(RULES).unwrap(), LimiterConfig::default()).unwrap(),
    );
    let service = RateLimitLayer::new(limiter, |head| {
        let user = head.headers.get("x-user-id")?.to_str().ok()?.to_owned();
        Some(vec![("user".into(), user)])
    })
    .layer(Hello);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    for left in [2, 1, 0] {
        let a = get_as(addr, Some("hy")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "hello");
        assert!(a
            .header("ratelimit")
            .unwrap()
            .starts_with(&format!("\"search-per-user\";r={left};")));
    }
    let denied = get_as(addr, Some("hy")).await;
    assert_eq!(denied.status, 429);
    assert!(denied.header("retry-after").is_some());
    assert!(denied.header("ratelimit-policy").is_some());
    server.abort();
}
