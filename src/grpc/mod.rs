//! The gRPC API of a node (tonic), beside the HTTP and RESP APIs and over
//! the same [`crate::service::Service`]: the same decision path and metrics.
//!
//! | service | what |
//! | --- | --- |
//! | `envoy.service.ratelimit.v3.RateLimitService` | Envoy's rate limit service (RLS v3): Envoy, Istio, Envoy Gateway and friends use the cluster with no code |
//! | `drl.v1.RateLimiter` | the native API: `Check`, `CheckBatch`, `Refund` (`proto-spec/drl/v1/ratelimiter.proto`) |
//! | `grpc.health.v1.Health` | SERVING once the node admits (it has recovered its counts) |
//!
//! `docs/grpc-api.md` is the contract: the mapping of Envoy's domain and
//! descriptors onto ours, statuses, headers and errors. A refused call (a
//! gRPC error status) changes no counter.
//!
//! # Layout
//!
//! - [`envoy_request`]: parsing Envoy's request into descriptor sets.
//! - [`envoy_service`], [`native`]: the services.
//! - [`state`]: what the services share; errors to statuses.
//! - [`server`]: binding, health, serving, draining.

pub mod envoy_request;
pub mod envoy_service;
pub mod native;
pub mod server;
pub mod state;

pub use server::{GrpcError, GrpcListener};
pub use state::GrpcState;

/// The generated messages, server and client of `drl.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("drl.v1");
}
