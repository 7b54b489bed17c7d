//! The axum middleware over a real socket: allowed requests reach the
//! handler with rate-limit headers, the rest get 429 with `Retry-After`.

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use drl::middleware::{rate_limit, RateLimitState};
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_with(addr: std::net::SocketAddr, path: &str, user: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let user = user
        .map(|u| format!("x-user-id: {u}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n{user}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.to_ascii_lowercase())
}

#[tokio::test]
async fn the_middleware_limits_per_user_with_headers() {
    let rules = RuleSet::from_toml(
        r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        key = ["user"]
        limits = [ { algorithm = "fixed_window", limit = 2, window = "1h" } ]
    "#,
    )
    .unwrap();
    let limiter = Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap());
    let state = RateLimitState::new(limiter, |req| {
        let user = req.headers().get("x-user-id")?.to_str().ok()?.to_owned();
        Some(vec![("user".into(), user)])
    });
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(axum::middleware::from_fn_with_state(state, rate_limit));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (status, body) = get_with(addr, "/hello", Some("ann")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("ratelimit-policy: \"per-user\";q=2;w=3600"),
        "{body}"
    );
    assert!(body.contains("ratelimit: \"per-user\";r=1;"), "{body}");
    assert!(body.ends_with("hello"));
    assert_eq!(get_with(addr, "/hello", Some("ann")).await.0, 200);
    let (status, body) = get_with(addr, "/hello", Some("ann")).await;
    assert_eq!(status, 429);
    assert!(body.contains("retry-after: "), "{body}");
    assert!(!body.contains("hello"), "the handler must not run");
    // Another user has their own quota; no user id means no limit.
    assert_eq!(get_with(addr, "/hello", Some("bob")).await.0, 200);
    for _ in 0..5 {
        assert_eq!(get_with(addr, "/hello", None).await.0, 200);
    }
    // An invalid id is a client error, and counts nothing.
    let long = "x".repeat(300);
    assert_eq!(get_with(addr, "/hello", Some(&long)).await.0, 400);
}
