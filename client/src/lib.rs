//! `drl_client`: the client SDK of the distributed rate limiter.
//!
//! An application asks "may this request pass?" with [`Client::check`]. A
//! remote client sends the check to the nearest healthy node, fails over to
//! the next within one call's deadline, keeps a circuit breaker per node so
//! that a dead node costs at most one timeout per cool-down, and decides by
//! its [`DegradedMode`] when no node answers: fail open, fail closed, or
//! `local`, from a budget the cluster leased it while healthy. An embedded
//! client runs a cluster node in the application's own process and decides
//! with no hop, behind the same call. [`layer::RateLimitLayer`] puts either
//! in front of any tower service (axum, tonic, hyper).
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
//! # Layout
//!
//! - [`breaker`]: the circuit breaker, sans-IO (time is an input).
//! - [`routing`]: latency EWMA per node, route order, probe schedule; sans-IO.
//! - [`lease`]: leased local budgets for the `local` degraded mode; sans-IO.
//! - [`transport`]: the [`Transport`] trait and its HTTP implementation.
//! - [`client`]: the public API: configuration, decisions, errors, the
//!   builder; `remote` (private) is the async driver of a remote client
//!   (attempts, failover, batching, background probes and lease renewals),
//!   `embedded` (private) decides on an in-process node or limiter.
//! - [`layer`]: the tower layer.
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
