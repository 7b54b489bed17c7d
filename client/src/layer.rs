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

/// A custom key: a request head's value for a field, or `None`.
pub type KeyFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

type Describer = Arc<dyn Fn(&http::request::Parts) -> Described + Send + Sync>;
type CostFn = Arc<dyn Fn(&http::request::Parts) -> u32 + Send + Sync>;
type Exempt = Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>;

/// Where a descriptor field's value comes from ([`LayerBuilder::key`]).
#[derive(Clone)]
pub enum Key {
    /// The peer's IP address: a `SocketAddr` in the request's extensions
    /// (with feature `axum`, also axum's `ConnectInfo<SocketAddr>`: serve
    /// with `into_make_service_with_connect_info::<SocketAddr>()`).
    PeerIp,
    /// The client's address from `X-Forwarded-For`, trusted only when the
    /// peer is one of the listed proxies: the rightmost address that is
    /// not a trusted proxy. From any other peer the header is ignored and
    /// the peer's IP is the key (a client cannot forge it).
    ForwardedFor(Arc<[Cidr]>),
    /// A header's value (text).
    Header(http::HeaderName),
    /// The `n`th segment of the path (0 is the first after `/`).
    PathSegment(usize),
    /// The whole path.
    Path,
    /// A custom closure; `None` means no value.
    Custom(Arc<KeyFn>),
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::PeerIp => f.write_str("PeerIp"),
            Key::ForwardedFor(t) => write!(f, "ForwardedFor({} trusted)", t.len()),
            Key::Header(h) => write!(f, "Header({h})"),
            Key::PathSegment(n) => write!(f, "PathSegment({n})"),
            Key::Path => f.write_str("Path"),
            Key::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is one
/// address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or `addr`.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (a, p) = text.split_once('/').unwrap_or((text, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{text:?}: prefix length 0 to {max}"))?
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
                IpAddr::V6(v) => match v.to_ipv4_mapped() {
                    Some(v4) => (u128::from(u32::from(v4)) << 96, 32),
                    None => (u128::from(v), 128),
                },
            }
        };
        let ((a, la), (b, lb)) = (bits(self.addr), bits(ip));
        if la != lb {
            return false;
        }
        let p = u32::from(self.prefix);
        let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
        a & mask == b & mask
    }
}

impl Key {
    /// A header's value.
    pub fn header(name: &'static str) -> Key {
        Key::Header(http::HeaderName::from_static(name))
    }

    /// The client's address from `X-Forwarded-For` when the peer is one of
    /// `trusted` (addresses or ranges); errors name a bad entry.
    pub fn forwarded_for<I, S>(trusted: I) -> Result<Key, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = trusted
            .into_iter()
            .map(|t| Cidr::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Key::ForwardedFor(list.into()))
    }

    /// A custom closure.
    pub fn custom(
        f: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Key {
        Key::Custom(Arc::new(f))
    }

    fn value(&self, head: &http::request::Parts) -> Result<String, &'static str> {
        match self {
            Key::PeerIp => peer_ip(head)
                .map(|ip| ip.to_string())
                .ok_or("no peer address in the request's extensions"),
            Key::ForwardedFor(trusted) => {
                let peer = peer_ip(head).ok_or("no peer address in the request's extensions")?;
                if !trusted.iter().any(|c| c.contains(peer)) {
                    return Ok(peer.to_string());
                }
                let hops: Vec<IpAddr> = head
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .filter_map(|a| a.trim().parse().ok())
                    .collect();
                let client = hops
                    .iter()
                    .rev()
                    .find(|ip| !trusted.iter().any(|c| c.contains(**ip)))
                    .or(hops.first())
                    .copied()
                    .unwrap_or(peer);
                Ok(client.to_string())
            }
            Key::Header(name) => head
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or("header absent, empty or not text"),
            Key::PathSegment(n) => head
                .uri
                .path()
                .split('/')
                .filter(|s| !s.is_empty())
                .nth(*n)
                .map(str::to_owned)
                .ok_or("the path has no such segment"),
            Key::Path => Ok(head.uri.path().to_owned()),
            Key::Custom(f) => f(head).ok_or("the custom key gave no value"),
        }
    }
}

fn peer_ip(head: &http::request::Parts) -> Option<IpAddr> {
    if let Some(a) = head.extensions.get::<SocketAddr>() {
        return Some(a.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(a) = head
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(a.0.ip());
    }
    None
}

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
mod tests {
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
}
