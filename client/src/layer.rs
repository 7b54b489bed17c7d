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
use std::net::{IpAddr, SocketAddr};
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
    /// Decides a request of `fields` costing `cost`.
    fn decide(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, ClientError>> + Send;

    /// Whether a request whose check failed with `e` passes (the degraded
    /// mode's answer); by default it does not.
    fn pass_on_error(&self, e: &ClientError) -> bool {
        let _ = e;
        false
    }
}

impl<T: Transport> Decide for Client<T> {
    fn decide(
        &self,
        fields: Vec<(String, String)>,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, ClientError>> + Send {
        self.check_owned(fields, cost)
    }

    fn pass_on_error(&self, e: &ClientError) -> bool {
        self.on_error(e)
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

/// What the layer made of a request head.
enum Described {
    /// Not limited (exempt, or a describe closure said `None`).
    Pass,
    /// Check these fields.
    Fields(Vec<(String, String)>),
    /// A key had no value (the field's name, and why).
    Missing(String),
}

type Describer = Arc<dyn Fn(&http::request::Parts) -> Described + Send + Sync>;
type CostFn = Arc<dyn Fn(&http::request::Parts) -> u32 + Send + Sync>;
type Exempt = Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>;

mod key;
pub use key::{Cidr, Key, KeyFn};

/// Why the layer did not pass a request to the service.
#[derive(Debug)]
pub enum Rejection {
    /// Over a limit (or refused by the degraded mode): the decision.
    Limited(Decision),
    /// The request cannot be checked (bad descriptor, an endpoint the
    /// rules do not list): the reason.
    Invalid(String),
    /// A key had no value: which field, and why.
    MissingKey(String),
    /// No decision, and the degraded mode does not let it pass.
    Unavailable(ClientError),
}

/// Shapes the response to a request the layer refused
/// ([`LayerBuilder::on_rejection`]). Implemented by
/// [`DefaultRejection`] and by any `Fn(&Rejection, bool) -> Response<B>`
/// (the flag says the request was gRPC).
pub trait OnRejection<B>: Clone + Send + Sync + 'static {
    /// The response to `rejection`; `grpc` when the request was gRPC.
    fn respond(&self, rejection: &Rejection, grpc: bool) -> Response<B>;
}

/// The layer's own responses: 429 with `Retry-After` and the rate-limit
/// headers; 400 with [`ERROR_HEADER`] for an invalid request; 500 for a
/// key without a value; 503 with `Retry-After: 1` when nothing decides.
/// gRPC requests get `grpc-status` 8, 3, 13 and 14 instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRejection;

impl<B: Default> OnRejection<B> for DefaultRejection {
    fn respond(&self, rejection: &Rejection, grpc: bool) -> Response<B> {
        default_response(rejection, grpc)
    }
}

impl<B, F> OnRejection<B> for F
where
    F: Fn(&Rejection, bool) -> Response<B> + Clone + Send + Sync + 'static,
{
    fn respond(&self, rejection: &Rejection, grpc: bool) -> Response<B> {
        self(rejection, grpc)
    }
}

/// The [`DefaultRejection`] response, for handlers that change only some
/// cases.
pub fn default_response<B: Default>(rejection: &Rejection, grpc: bool) -> Response<B> {
    match rejection {
        Rejection::Limited(d) => {
            let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, grpc, 8);
            rate_limit_headers(response.headers_mut(), d);
            response
        }
        Rejection::Invalid(why) => {
            let mut response = refusal(StatusCode::BAD_REQUEST, grpc, 3);
            explain(&mut response, grpc, why);
            response
        }
        Rejection::MissingKey(why) => {
            let mut response = refusal(StatusCode::INTERNAL_SERVER_ERROR, grpc, 13);
            explain(&mut response, grpc, why);
            response
        }
        Rejection::Unavailable(_) => {
            let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, grpc, 14);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(1u64));
            response
        }
    }
}

/// The layer. Cheap to clone.
#[derive(Clone)]
pub struct RateLimitLayer<D, H = DefaultRejection> {
    decider: D,
    describe: Describer,
    cost: CostFn,
    exempt: Option<Exempt>,
    handler: H,
    headers_on_allowed: bool,
}

impl<D: Decide> RateLimitLayer<D> {
    /// A layer whose `describe` closure turns a request head into
    /// descriptor fields (`None`: the request passes unlimited); each
    /// request costs 1. [`RateLimitLayer::builder`] has key extractors
    /// instead.
    pub fn new(
        decider: D,
        describe: impl Fn(&http::request::Parts) -> Option<Vec<(String, String)>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        RateLimitLayer {
            decider,
            describe: Arc::new(move |head| match describe(head) {
                Some(fields) => Described::Fields(fields),
                None => Described::Pass,
            }),
            cost: Arc::new(|_| 1),
            exempt: None,
            handler: DefaultRejection,
            headers_on_allowed: true,
        }
    }

    /// A builder: descriptor fields from key extractors.
    ///
    /// ```no_run
    /// # async fn demo(client: drl_client::Client) {
    /// use axum::{routing::get, Router};
    /// use drl_client::{Key, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::builder(client)
    ///     .key("ip", Key::PeerIp)
    ///     .key("endpoint", Key::Path)
    ///     .exempt(|head| head.uri.path() == "/healthz")
    ///     .build();
    /// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
    /// # }
    /// ```
    pub fn builder(decider: D) -> LayerBuilder<D> {
        LayerBuilder {
            decider,
            keys: Vec::new(),
            cost: Arc::new(|_| 1),
            exempt: None,
            handler: DefaultRejection,
            headers_on_allowed: true,
        }
    }

    /// What each request costs (default 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = Arc::new(move |_| cost);
        self
    }
}

/// Builds a [`RateLimitLayer`] from key extractors. Defaults: no key (every
/// request is checked with no descriptor, which a node refuses: add at
/// least one), cost 1, nothing exempt, [`DefaultRejection`], rate-limit
/// headers on allowed responses.
pub struct LayerBuilder<D, H = DefaultRejection> {
    decider: D,
    keys: Vec<(String, Key)>,
    cost: CostFn,
    exempt: Option<Exempt>,
    handler: H,
    headers_on_allowed: bool,
}

impl<D: Decide, H> LayerBuilder<D, H> {
    /// The descriptor field `field` takes its value from `key`. A request
    /// for which a key has no value is refused
    /// ([`Rejection::MissingKey`]).
    pub fn key(mut self, field: impl Into<String>, key: Key) -> Self {
        self.keys.push((field.into(), key));
        self
    }

    /// Every request costs `cost`.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = Arc::new(move |_| cost);
        self
    }

    /// A request's cost from its head.
    pub fn cost_fn(
        mut self,
        cost: impl Fn(&http::request::Parts) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.cost = Arc::new(cost);
        self
    }

    /// Requests for which `exempt` is true pass unlimited and unchecked.
    pub fn exempt(
        mut self,
        exempt: impl Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.exempt = Some(Arc::new(exempt));
        self
    }

    /// Whether allowed responses carry `RateLimit-Policy` and `RateLimit`
    /// (default true).
    pub fn headers_on_allowed(mut self, on: bool) -> Self {
        self.headers_on_allowed = on;
        self
    }

    /// Shapes the responses to refused requests (the 429 among them).
    ///
    /// ```no_run
    /// # fn demo(client: drl_client::Client) {
    /// use drl_client::layer::{default_response, Rejection};
    /// use drl_client::{Key, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::builder(client)
    ///     .key("user", Key::header("x-user-id"))
    ///     .on_rejection(|r: &Rejection, grpc: bool| {
    ///         let mut response = default_response::<axum::body::Body>(r, grpc);
    ///         if let Rejection::Limited(_) = r {
    ///             *response.body_mut() = axum::body::Body::from("slow down\n");
    ///         }
    ///         response
    ///     })
    ///     .build();
    /// # }
    /// ```
    pub fn on_rejection<H2>(self, handler: H2) -> LayerBuilder<D, H2> {
        LayerBuilder {
            decider: self.decider,
            keys: self.keys,
            cost: self.cost,
            exempt: self.exempt,
            handler,
            headers_on_allowed: self.headers_on_allowed,
        }
    }

    /// The layer.
    pub fn build(self) -> RateLimitLayer<D, H> {
        let keys = self.keys;
        RateLimitLayer {
            decider: self.decider,
            describe: Arc::new(move |head| {
                let mut fields = Vec::with_capacity(keys.len());
                for (field, key) in &keys {
                    match key.value(head) {
                        Ok(v) => fields.push((field.clone(), v)),
                        Err(why) => return Described::Missing(format!("{field} ({key:?}): {why}")),
                    }
                }
                Described::Fields(fields)
            }),
            cost: self.cost,
            exempt: self.exempt,
            handler: self.handler,
            headers_on_allowed: self.headers_on_allowed,
        }
    }
}

impl<S, D: Clone, H: Clone> Layer<S> for RateLimitLayer<D, H> {
    type Service = RateLimit<S, D, H>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            decider: self.decider.clone(),
            describe: self.describe.clone(),
            cost: self.cost.clone(),
            exempt: self.exempt.clone(),
            handler: self.handler.clone(),
            headers_on_allowed: self.headers_on_allowed,
        }
    }
}

/// The service the layer wraps around `S`.
#[derive(Clone)]
pub struct RateLimit<S, D, H = DefaultRejection> {
    inner: S,
    decider: D,
    describe: Describer,
    cost: CostFn,
    exempt: Option<Exempt>,
    handler: H,
    headers_on_allowed: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, D, H, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S, D, H>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    D: Decide,
    H: OnRejection<ResB>,
    ReqB: Send + 'static,
    ResB: Send + 'static,
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
        let (head, body) = request.into_parts();
        let exempt = self.exempt.as_ref().is_some_and(|e| e(&head));
        let described = if exempt {
            Described::Pass
        } else {
            (self.describe)(&head)
        };
        let cost = (self.cost)(&head);
        let grpc = is_grpc(&head.headers);
        let handler = self.handler.clone();
        let headers_on_allowed = self.headers_on_allowed;
        let request = Request::from_parts(head, body);
        Box::pin(async move {
            let fields = match described {
                Described::Pass => return inner.call(request).await,
                Described::Missing(why) => {
                    return Ok(handler.respond(&Rejection::MissingKey(why), grpc))
                }
                Described::Fields(fields) => fields,
            };
            match decider.decide(fields, cost).await {
                Ok(d) if d.is_allowed() => {
                    let mut response = inner.call(request).await?;
                    if headers_on_allowed {
                        rate_limit_headers(response.headers_mut(), &d);
                    }
                    Ok(response)
                }
                Ok(d) => Ok(handler.respond(&Rejection::Limited(d), grpc)),
                Err(ClientError::Refused(why)) => {
                    Ok(handler.respond(&Rejection::Invalid(why), grpc))
                }
                Err(e) if decider.pass_on_error(&e) => inner.call(request).await,
                Err(e) => Ok(handler.respond(&Rejection::Unavailable(e), grpc)),
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
#[path = "layer_tests.rs"]
mod tests;
