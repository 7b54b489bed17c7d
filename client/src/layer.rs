//! Rate limiting as a tower [`Layer`], for any service over `http` types:
//! axum routers, tonic servers, plain hyper services.
//!
//! A user closure turns the request's head into descriptor fields (or
//! `None` to let it pass unlimited). A request over its limit gets `429`
//! with `Retry-After`, `RateLimit-Policy` and `RateLimit` (the same fields
//! as the HTTP API, docs/http-api.md); an allowed one reaches the service
//! and its response carries the rate-limit fields too. A gRPC request
//! (`content-type: application/grpc...`) is refused the gRPC way instead:
//! status 200 with `grpc-status: 8` (resource exhausted) and the same
//! fields. A request that cannot be checked (a malformed descriptor, an
//! endpoint the rules' `endpoints` list does not name) gets `400` (gRPC:
//! `grpc-status: 3`) with the reason in [`ERROR_HEADER`] (`x-drl-error`),
//! which names the rules file's line to change: the layer cannot write a
//! body of the wrapped service's own type.
//!
//! The decider is a [`Client`] (remote or embedded) or an in-process
//! [`Limiter`] (`Arc<Limiter>`).
//!
//! ```no_run
//! # async fn demo(client: drl_client::Client) {
//! use axum::{routing::get, Router};
//! use drl_client::RateLimitLayer;
//!
//! let app: Router = Router::new()
//!     .route("/v1/search", get(|| async { "results" }))
//!     .layer(RateLimitLayer::new(client, |head| {
//!         let user = head.headers.get("x-user-id")?.to_str().ok()?.to_owned();
//!         Some(vec![("user".into(), user), ("endpoint".into(), head.uri.path().to_owned())])
//!     }));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use drl_core::decide::Decider;
use drl_core::fields::RateLimitFields;
use drl_core::limiter::{Limiter, Outcome, QuotaState};
use drl_core::time::Nanos;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::client::{Client, ClientError, Decision};
use crate::embedded;
use crate::transport::Transport;

/// Something that decides: a [`Client`] or an in-process `Arc<Limiter>`.
pub trait Decide: Clone + Send + Sync + 'static {
    fn decide(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, ClientError>> + Send;
}

impl<T: Transport> Decide for Client<T> {
    fn decide(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, ClientError>> + Send {
        self.check_owned(fields, cost)
    }
}

impl Decide for Arc<Limiter> {
    fn decide(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, ClientError>> + Send {
        let decider = Decider::local(self.clone());
        async move { embedded::decide(&decider, &fields, cost).await }
    }
}

/// Descriptor fields of a request head, or `None` to let it pass.
pub type Describe = dyn Fn(&http::request::Parts) -> Option<Vec<(String, String)>> + Send + Sync;

/// The layer. Cheap to clone.
#[derive(Clone)]
pub struct RateLimitLayer<D> {
    decider: D,
    describe: Arc<Describe>,
    cost: u32,
}

impl<D: Decide> RateLimitLayer<D> {
    pub fn new(
        decider: D,
        describe: impl Fn(&http::request::Parts) -> Option<Vec<(String, String)>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        RateLimitLayer {
            decider,
            describe: Arc::new(describe),
            cost: 1,
        }
    }

    /// What each request costs (default 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }
}

impl<S, D: Clone> Layer<S> for RateLimitLayer<D> {
    type Service = RateLimit<S, D>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            decider: self.decider.clone(),
            describe: self.describe.clone(),
            cost: self.cost,
        }
    }
}

/// The service the layer wraps around `S`.
#[derive(Clone)]
pub struct RateLimit<S, D> {
    inner: S,
    decider: D,
    describe: Arc<Describe>,
    cost: u32,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, D, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S, D>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    D: Decide,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The instance that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let decider = self.decider.clone();
        let describe = self.describe.clone();
        let cost = self.cost;
        Box::pin(async move {
            let (head, body) = request.into_parts();
            let fields = describe(&head);
            let grpc = is_grpc(&head.headers);
            let request = Request::from_parts(head, body);
            let Some(fields) = fields else {
                return inner.call(request).await;
            };
            match decider.decide(fields, cost).await {
                Ok(d) if d.is_allowed() => {
                    let mut response = inner.call(request).await?;
                    rate_limit_headers(response.headers_mut(), &d);
                    Ok(response)
                }
                Ok(d) => {
                    let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, grpc, 8);
                    rate_limit_headers(response.headers_mut(), &d);
                    Ok(response)
                }
                Err(ClientError::Refused(why)) => {
                    let mut response = refusal(StatusCode::BAD_REQUEST, grpc, 3);
                    explain(&mut response, grpc, &why);
                    Ok(response)
                }
                Err(_) => {
                    let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, grpc, 14);
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(1u64));
                    Ok(response)
                }
            }
        })
    }
}

/// The header that says why a request could not be checked (an endpoint
/// the rules do not list, a malformed descriptor): the layer cannot write a
/// body of the wrapped service's type, so the reason goes in a header (and
/// in `grpc-message` for gRPC).
pub const ERROR_HEADER: &str = "x-drl-error";

/// Puts `why` on a refusal: [`ERROR_HEADER`], and `grpc-message` for gRPC.
/// Bytes a header cannot carry are replaced.
fn explain<B>(response: &mut Response<B>, grpc: bool, why: &str) {
    let text: String = why
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let Ok(value) = HeaderValue::try_from(text) else {
        return;
    };
    let h = response.headers_mut();
    if grpc {
        h.insert("grpc-message", value.clone());
    }
    h.insert(ERROR_HEADER, value);
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An empty refusal: `status`, or for gRPC a trailers-only answer with
/// `grpc-status` (8 resource exhausted, 3 invalid argument, 14
/// unavailable).
fn refusal<B: Default>(status: StatusCode, grpc: bool, grpc_status: u32) -> Response<B> {
    let mut response = Response::new(B::default());
    if grpc {
        let h = response.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_status));
        let message = match status {
            StatusCode::TOO_MANY_REQUESTS => "rate limited",
            StatusCode::BAD_REQUEST => "invalid rate-limit descriptors",
            _ => "rate limiter unavailable",
        };
        h.insert("grpc-message", HeaderValue::from_static(message));
    } else {
        *response.status_mut() = status;
    }
    response
}

/// The rate-limit fields of a decision. A degraded decision has no quota:
/// a refusal then gets `Retry-After: 1` alone.
pub fn rate_limit_headers(headers: &mut HeaderMap, d: &Decision) {
    match &d.quota {
        Some(q) => {
            let state = QuotaState {
                limit_index: 0,
                // The headers take the server's rule name as text (below);
                // interning names a server sent would keep them forever.
                rule: drl_core::rules::RuleName::from_static(""),
                limit_id: drl_core::key::LimitId(0),
                limit: q.limit,
                period: Nanos::from(q.window),
                remaining: q.remaining,
                reset_after: Nanos::from(q.reset_after),
                retry_after: Nanos::from(q.retry_after.unwrap_or_default()),
            };
            let fields = RateLimitFields::new(d.outcome, &q.rule, &state);
            let value = |text: String| HeaderValue::try_from(text).ok();
            if let Some(v) = value(fields.policy) {
                headers.insert("ratelimit-policy", v);
            }
            if let Some(v) = fields.ratelimit.and_then(value) {
                headers.insert("ratelimit", v);
            }
            if let Some(secs) = fields.retry_after {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        None if d.outcome == Outcome::Denied => {
            headers.insert(RETRY_AFTER, HeaderValue::from(1u64));
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use drl_core::limiter::LimiterConfig;
    use drl_core::rules::RuleSet;

    use super::*;
    use crate::client::{Degraded, Source};
    use crate::transport::Quota;

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
        svc: &mut RateLimit<Echo, Arc<Limiter>>,
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
            },
        );
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["ratelimit"], "\"r\";r=0;t=2");
        assert_eq!(h["ratelimit-policy"], "\"r\";q=10;w=60");
    }
}
