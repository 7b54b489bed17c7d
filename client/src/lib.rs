//! `drl_client`: the client SDK of the distributed rate limiter.
//!
//! An application asks "may this request pass?" with [`Client::check`] (or
//! the simplest [`Client::allow`]). A remote client sends the check to the
//! nearest healthy node (latency EWMA), fails over to the next within one
//! call's deadline when that is safe ([`RetryPolicy`]), keeps a circuit
//! breaker per node so that a dead node costs at most one timeout per
//! cool-down, and decides by its [`DegradedMode`] when no node answers. An
//! embedded client decides in the application's own process, behind the
//! same calls. [`RateLimitLayer`] puts either in front of any tower service
//! (axum, tonic, hyper).
//!
//! ```no_run
//! # async fn demo() -> Result<(), drl_client::ClientError> {
//! use drl_client::{Client, DegradedMode, Fallback};
//!
//! let client = Client::builder()
//!     .nodes(["127.0.0.1:8400", "127.0.0.1:8401", "127.0.0.1:8402"])
//!     .degraded(DegradedMode::Local { otherwise: Fallback::Deny })
//!     .build()
//!     .await?;
//! let decision = client.check(&[("user", "alice"), ("endpoint", "/v1/search")], 1).await?;
//! if decision.is_allowed() { /* serve */ }
//! # Ok(()) }
//! ```
//!
//! # Calls
//!
//! | call | what |
//! | --- | --- |
//! | [`Client::allow`] | `allow(user, endpoint) -> bool`; every failure decided by the degraded mode |
//! | [`Client::check`], [`Client::check_request`] | one decision, with the deciding limit ([`Quota`]) and a [`Receipt`] |
//! | [`Client::check_batch`] | several checks as one atomic request: all counted, or none |
//! | [`Client::refund`] | gives an allowed check's cost back, by its receipt, on the node that issued it |
//! | [`Check::limit`] | a request-defined limit ([`limits`]) instead of the node's rules |
//!
//! # Transports and features
//!
//! | feature | adds | crates (default build: 63) |
//! | --- | --- | --- |
//! | (default) | HTTP/1.1 transport ([`HttpTransport`]), the layer | 63 |
//! | `grpc` | gRPC transport (`GrpcTransport`): `CheckBatch` per batch over HTTP/2, `grpc.health.v1` probes | 70 |
//! | `tls` | TLS for gRPC: rustls on ring, a custom CA, client certificates (`TlsConfig`) | 80 |
//! | `axum` | [`Key::PeerIp`] reads axum's `ConnectInfo` | 88 (with `tls`) |
//! | `node` | embedded mode with a whole cluster node in the process (the server crate) | – |
//!
//! Pick the protocol per client with [`ClientBuilder::protocol`]; every
//! transport pools its connections (HTTP: keep-alive, up to `max_batch`
//! idle per node; gRPC: two multiplexed HTTP/2 connections per node),
//! gives every attempt its own deadline ([`ClientConfig::attempt_timeout`],
//! sent to the node as `grpc-timeout` over gRPC) and can send a bearer
//! token ([`ClientBuilder::bearer_token`]; a node checks none on its
//! decision routes today: it is for a gateway in front of them).
//!
//! # Errors and retries
//!
//! [`ClientError::decision_known`] tells the one case where the
//! application cannot know what was counted: [`ClientError::Indeterminate`],
//! a node got the request and no answer came back. With the default
//! [`RetryPolicy::Safe`], a check is sent to another node only when the
//! first certainly counted nothing (no connection; the connection was gone
//! before the request was written; HTTP 503 or gRPC `UNAVAILABLE`), so a
//! check is never counted twice; the price is that a check in flight to a
//! node that dies (or hangs) ends with `Indeterminate` rather than failing
//! over. [`RetryPolicy::AtLeastOnce`] fails over in that case too, and may
//! count such a check twice (the caller is then charged twice: an error on
//! the strict side). Refunds are always retried on another node: a receipt
//! is refunded at most once wherever it is presented.
//!
//! # Degraded modes: the contract
//!
//! When no node can answer a call within [`ClientConfig::call_timeout`]
//! (every breaker open, every connection refused), the mode decides and the
//! [`Decision`] says so ([`Source::Degraded`], no quota, no receipt).
//! [`Client::allow`] and the layer also decide an
//! [`ClientError::Indeterminate`] call by the mode ([`Client::on_error`]).
//!
//! | mode | the application sees | over-admission while cut off |
//! | --- | --- | --- |
//! | [`DegradedMode::FailOpen`] | every call allowed | unbounded: every request passes |
//! | [`DegradedMode::FailClosed`] (default) | every call denied (the layer: 429, `Retry-After: 1`) | none |
//! | [`DegradedMode::Local`] | allowed from the descriptor set's lease until it is spent, then denied; sets without a lease get `otherwise` | none beyond what the cluster counted: a lease's hits were charged to the cluster before it was used; at most `min(max_lease, share × remaining, recent demand)` per hot set per client per lease (defaults 100 and 5 %) |
//!
//! Leases (the `Local` mode, [`lease`]): while the cluster answers, a set
//! called [`LeaseConfig::hot_calls`] times within a window of its limit is
//! hot, and the client charges a lease of `k` hits to the cluster with an
//! ordinary check. A lease is spent only while no node answers; when the
//! cluster comes back the client decides on the nodes again and the lease
//! is left alone. A lease never touched is given back (its check's receipt
//! refunded) when its set goes cold and when the client is shut down
//! ([`Client::shutdown`]); a lease partly spent expires with its window (at
//! most one window of its limit). So the cost of `Local` is the unused part
//! of leases: at most `k` hits per hot set, per client, per window. The
//! tests `degraded_modes_decide_when_no_node_answers`,
//! `local_mode_stays_within_its_lease_while_every_node_is_stopped` and
//! `an_untouched_lease_is_returned_on_shutdown` hold the client to this;
//! `examples/sdk_bench.rs` measures each mode through a 10 s outage of a
//! whole `drl cluster` (docs/report.md, "Client SDK").
//!
//! # Layout
//!
//! - [`breaker`]: the circuit breaker, sans-IO (time is an input).
//! - [`routing`]: latency EWMA per node, route order, probe schedule; sans-IO.
//! - [`lease`]: leased local budgets for the `local` degraded mode; sans-IO.
//! - [`transport`]: the [`Transport`] trait and its HTTP implementation;
//!   `grpc` (feature `grpc`) the gRPC one, with a hand-written protobuf
//!   codec of the few messages it needs; `tls` (feature `tls`).
//! - [`client`]: the public API: configuration, decisions, errors, the
//!   builder; `remote` (private) is the async driver of a remote client
//!   (attempts, failover, batching, background probes, lease renewals and
//!   returns), `embedded` (private) decides on an in-process node or
//!   limiter.
//! - [`layer`]: the tower layer and its builder.
//! - [`limits`]: request-defined limits.
//! - [`metrics`]: counters the application can export.

#![warn(missing_docs, unreachable_pub)]

pub mod breaker;
pub mod client;
mod embedded;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod layer;
pub mod lease;
pub mod limits;
pub mod metrics;
#[cfg(feature = "grpc")]
mod proto;
mod remote;
pub mod routing;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
mod wire;

pub use breaker::{BreakerConfig, BreakerState};
pub use client::{
    BatchDecision, Check, Client, ClientBuilder, ClientConfig, ClientError, Decision, Degraded,
    DegradedMode, Fallback, NodeView, Protocol, Receipt, RefundRefusal, Refunded, RetryPolicy,
    Source,
};
pub use drl_core::limiter::Outcome;
#[cfg(feature = "grpc")]
pub use grpc::GrpcTransport;
pub use layer::{Decide, Key, RateLimitLayer};
pub use lease::LeaseConfig;
pub use metrics::ClientMetrics;
pub use routing::RoutingConfig;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
pub use transport::{
    CheckAnswer, CheckRequest, HttpTransport, LimitSpec, Quota, RefundAnswer, Transport,
    TransportError,
};
pub use wire::Wire;
