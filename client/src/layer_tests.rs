//! Tests of `layer.rs`.
use std::convert::Infallible;
use std::time::Duration;

use drl_core::limiter::LimiterConfig;
use drl_core::rules::RuleSet;

use super::*;
use crate::client::{Degraded, Source};
use crate::transport::Quota;
use std::net::SocketAddr;

fn limiter() -> Arc<Limiter> {
    let rules = RuleSet::from_toml(
        r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "fixed_window", limit = 2, window = "1h" } ]
        "#,
    )
    .unwrap();
    Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap())
}

#[derive(Clone)]
struct Echo;
impl Service<Request<String>> for Echo {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<String>) -> Self::Future {
        std::future::ready(Ok(Response::new("served".to_owned())))
    }
}

fn by_user(head: &http::request::Parts) -> Option<Vec<(String, String)>> {
    let user = head.headers.get("x-user")?.to_str().ok()?.to_owned();
    Some(vec![("user".into(), user)])
}

async fn send(
    svc: &mut RateLimit<Echo, Arc<Limiter>, DefaultRejection>,
    user: Option<&str>,
    grpc: bool,
) -> Response<String> {
    let mut b = Request::builder().uri("/x");
    if let Some(u) = user {
        b = b.header("x-user", u);
    }
    if grpc {
        b = b.header("content-type", "application/grpc+proto");
    }
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    svc.call(b.body(String::new()).unwrap()).await.unwrap()
}

#[tokio::test]
async fn allows_then_refuses_with_headers_and_passes_undescribed() {
    let mut svc = RateLimitLayer::new(limiter(), by_user).layer(Echo);
    for r in [1, 0] {
        let ok = send(&mut svc, Some("a"), false).await;
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.body(), "served");
        let rl = ok.headers()["ratelimit"].to_str().unwrap();
        assert!(rl.starts_with(&format!("\"per-user\";r={r};t=")), "{rl}");
        assert_eq!(ok.headers()["ratelimit-policy"], "\"per-user\";q=2;w=3600");
    }
    let no = send(&mut svc, Some("a"), false).await;
    assert_eq!(no.status(), 429);
    assert!(no.body().is_empty());
    let retry: u64 = no.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry));
    // Another user has its own counter; no description passes unlimited.
    assert_eq!(send(&mut svc, Some("b"), false).await.status(), 200);
    let free = send(&mut svc, None, false).await;
    assert_eq!(free.status(), 200);
    assert!(free.headers().get("ratelimit").is_none());
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted() {
    let mut svc = RateLimitLayer::new(limiter(), by_user).layer(Echo);
    send(&mut svc, Some("g"), true).await;
    send(&mut svc, Some("g"), true).await;
    let no = send(&mut svc, Some("g"), true).await;
    assert_eq!(no.status(), 200);
    assert_eq!(no.headers()["grpc-status"], "8");
    assert!(no.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn invalid_descriptors_are_a_400_and_count_nothing() {
    let l = limiter();
    let mut svc = RateLimitLayer::new(l.clone(), |_: &http::request::Parts| {
        Some(vec![("Bad Name".into(), "x".into())])
    })
    .layer(Echo);
    let mut b = Request::builder().uri("/x");
    b = b.header("x-user", "a");
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let r = svc.call(b.body(String::new()).unwrap()).await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn an_unlisted_endpoint_is_refused_with_what_to_change() {
    let rules = RuleSet::from_toml(
        "endpoints = [\"/v1/search\"]\n[[rules]]\nname = \"r\"\nmatch = {}\n\
         limits = [ { algorithm = \"fixed_window\", limit = 2, window = \"1h\" } ]\n",
    )
    .unwrap();
    let l = Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap());
    let mut svc = RateLimitLayer::new(l, |_: &http::request::Parts| {
        Some(vec![("endpoint".into(), "/other".into())])
    })
    .layer(Echo);
    for grpc in [false, true] {
        let mut b = Request::builder().uri("/other");
        if grpc {
            b = b.header("content-type", "application/grpc");
        }
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let r = svc.call(b.body(String::new()).unwrap()).await.unwrap();
        assert_eq!(r.status(), if grpc { 200 } else { 400 });
        let why = r.headers()[ERROR_HEADER].to_str().unwrap().to_owned();
        assert!(
            why.contains("\"/other\"") && why.contains("`endpoints` allow-list (line 1)"),
            "{why}"
        );
        if grpc {
            assert_eq!(r.headers()["grpc-status"], "3");
            assert_eq!(r.headers()["grpc-message"].to_str().unwrap(), why);
        }
    }
}

#[test]
fn degraded_refusal_says_retry_after_one_second() {
    let mut h = HeaderMap::new();
    rate_limit_headers(
        &mut h,
        &Decision {
            outcome: Outcome::Denied,
            quota: None,
            source: Source::Degraded(Degraded::FailClosed),
            receipt: None,
        },
    );
    assert_eq!(h["retry-after"], "1");
    assert!(h.get("ratelimit").is_none());
    let mut h = HeaderMap::new();
    rate_limit_headers(
        &mut h,
        &Decision {
            outcome: Outcome::Denied,
            quota: Some(Quota {
                rule: "r".into(),
                limit: 10,
                window: Duration::from_secs(60),
                remaining: 0,
                reset_after: Duration::from_millis(1500),
                retry_after: Some(Duration::from_millis(2100)),
            }),
            source: Source::Embedded,
            receipt: None,
        },
    );
    assert_eq!(h["retry-after"], "3");
    assert_eq!(h["ratelimit"], "\"r\";r=0;t=2");
    assert_eq!(h["ratelimit-policy"], "\"r\";q=10;w=60");
}

/// Sends `request` through `svc` once it is ready.
async fn call<S>(svc: &mut S, request: Request<String>) -> Response<String>
where
    S: Service<Request<String>, Response = Response<String>, Error = Infallible>,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    svc.call(request).await.unwrap()
}

fn from(peer: &str, uri: &str, headers: &[(&str, &str)]) -> Request<String> {
    let mut b = Request::builder().uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let mut r = b.body(String::new()).unwrap();
    r.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    r
}

fn ip_limiter(limit: u32) -> Arc<Limiter> {
    let rules = RuleSet::from_toml(&format!(
        "[[rules]]\nname = \"per-ip\"\nmatch = {{ ip = \"*\" }}\n\
         limits = [ {{ algorithm = \"fixed_window\", limit = {limit}, window = \"1h\" }} ]\n"
    ))
    .unwrap();
    Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap())
}

#[tokio::test]
async fn peer_ip_key_cost_and_exempt() {
    let mut svc = RateLimitLayer::builder(ip_limiter(5))
        .key("ip", Key::PeerIp)
        .cost_fn(|head| {
            if head.method == http::Method::POST {
                3
            } else {
                1
            }
        })
        .exempt(|head| head.uri.path() == "/healthz")
        .build()
        .layer(Echo);
    let post = |peer: &str| {
        let mut r = from(peer, "/x", &[]);
        *r.method_mut() = http::Method::POST;
        r
    };
    assert_eq!(call(&mut svc, post("10.0.0.1:1")).await.status(), 200);
    let second = call(&mut svc, post("10.0.0.1:2")).await;
    assert_eq!(second.status(), 429, "3 + 3 > 5, same IP, any port");
    let ok = call(&mut svc, from("10.0.0.1:3", "/x", &[])).await;
    assert_eq!(ok.status(), 200, "a GET costs 1: 4 of 5");
    assert!(ok.headers()["ratelimit"].to_str().unwrap().contains("r=1"));
    assert_eq!(call(&mut svc, post("10.0.0.2:1")).await.status(), 200);
    for _ in 0..10 {
        let h = call(&mut svc, from("10.0.0.1:4", "/healthz", &[])).await;
        assert_eq!(h.status(), 200, "exempt");
        assert!(h.headers().get("ratelimit").is_none());
    }
    // No peer address at all: the key has no value; 500 says why.
    let mut bare = Request::new(String::new());
    *bare.uri_mut() = "/x".parse().unwrap();
    let r = call(&mut svc, bare).await;
    assert_eq!(r.status(), 500);
    assert!(r.headers()[ERROR_HEADER]
        .to_str()
        .unwrap()
        .contains("ip (PeerIp)"));
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let l = ip_limiter(1);
    let mut svc = RateLimitLayer::builder(l)
        .key("ip", Key::forwarded_for(["10.1.0.0/16", "::1"]).unwrap())
        .build()
        .layer(Echo);
    let via_proxy = |client: &str| {
        from(
            "10.1.2.3:5000",
            "/",
            &[("x-forwarded-for", &format!("{client}, 10.1.9.9"))],
        )
    };
    // Through the proxy: each client its own key (the rightmost
    // untrusted hop; the second proxy 10.1.9.9 is skipped).
    assert_eq!(call(&mut svc, via_proxy("203.0.113.7")).await.status(), 200);
    assert_eq!(call(&mut svc, via_proxy("203.0.113.8")).await.status(), 200);
    assert_eq!(call(&mut svc, via_proxy("203.0.113.7")).await.status(), 429);
    // From an untrusted peer the header is ignored: the peer is the key.
    let forged = from(
        "198.51.100.1:1",
        "/",
        &[("x-forwarded-for", "203.0.113.99")],
    );
    assert_eq!(call(&mut svc, forged).await.status(), 200);
    let forged_again = from(
        "198.51.100.1:2",
        "/",
        &[("x-forwarded-for", "203.0.113.100")],
    );
    assert_eq!(call(&mut svc, forged_again).await.status(), 429);
    assert!(Key::forwarded_for(["10.0.0.0/33"]).is_err());
    assert!(Key::forwarded_for(["not an ip"]).is_err());
}

#[test]
fn cidr_ranges() {
    let c = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(c.contains("10.1.200.3".parse().unwrap()));
    assert!(!c.contains("10.2.0.1".parse().unwrap()));
    assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped");
    let all = Cidr::parse("0.0.0.0/0").unwrap();
    assert!(all.contains("192.0.2.1".parse().unwrap()));
    assert!(!all.contains("2001:db8::1".parse().unwrap()));
    let one = Cidr::parse("2001:db8::1").unwrap();
    assert!(one.contains("2001:db8::1".parse().unwrap()));
    assert!(!one.contains("2001:db8::2".parse().unwrap()));
}

#[tokio::test]
async fn header_path_segment_and_custom_keys_with_a_shaped_429() {
    let rules = RuleSet::from_toml(
        "[[rules]]\nname = \"per-tenant\"\nmatch = { tenant = \"*\" }\n\
         limits = [ { algorithm = \"fixed_window\", limit = 1, window = \"1h\" } ]\n",
    )
    .unwrap();
    let l = Arc::new(Limiter::new(rules, LimiterConfig::default()).unwrap());
    let mut svc = RateLimitLayer::builder(l)
        .key("tenant", Key::PathSegment(1))
        .key("user", Key::header("x-user"))
        .key(
            "plan",
            Key::custom(|head| {
                Some(
                    head.headers
                        .get("x-plan")
                        .map_or("free", |v| v.to_str().unwrap_or("free"))
                        .to_owned(),
                )
            }),
        )
        .headers_on_allowed(false)
        .on_rejection(|r: &Rejection, grpc: bool| {
            let mut response: Response<String> = default_response(r, grpc);
            if let Rejection::Limited(d) = r {
                *response.body_mut() = format!(
                    "{{\"error\":\"slow down\",\"rule\":\"{}\"}}",
                    d.quota.as_ref().map_or("", |q| q.rule.as_str())
                );
            }
            response
        })
        .build()
        .layer(Echo);
    let req = |uri: &str| from("10.0.0.1:1", uri, &[("x-user", "u")]);
    let ok = call(&mut svc, req("/t/acme/items")).await;
    assert_eq!(ok.status(), 200);
    assert!(ok.headers().get("ratelimit").is_none(), "headers off");
    let no = call(&mut svc, req("/t/acme/other")).await;
    assert_eq!(no.status(), 429);
    assert_eq!(
        no.body(),
        "{\"error\":\"slow down\",\"rule\":\"per-tenant\"}"
    );
    assert!(
        no.headers().get("retry-after").is_some(),
        "kept from the default"
    );
    assert_eq!(call(&mut svc, req("/t/globex")).await.status(), 200);
    let short = call(&mut svc, req("/t")).await;
    assert_eq!(short.status(), 500, "no second segment");
    let anonymous = call(&mut svc, from("10.0.0.1:1", "/t/x", &[])).await;
    assert_eq!(anonymous.status(), 500, "no x-user header");
}
