//! `drl`: the server of the distributed rate limiter.
//!
//! Every node answers "may this request pass?" locally, in memory, from
//! replicated counters: per-key PN-counters with one slot per node, kept in
//! time-bucketed windows. What a node decides lives in the I/O-free
//! [`drl_core`] crate; this crate is the shell around it: the QUIC transport
//! between nodes, the node's async driver, the protocol front-ends (HTTP,
//! gRPC, RESP, axum middleware) and the `drl` command. DESIGN.md explains
//! the model and its bounds.
//!
//! # Layout
//!
//! - [`net`]: the QUIC transport with mutual TLS, and development
//!   certificates.
//! - [`node`]: a cluster node, the thin async shell that drives the state
//!   machines from the transport and timers.
//! - [`grpc`]: the gRPC API: Envoy's rate limit service v3, the native
//!   `drl.v1.RateLimiter` and health, beside the HTTP API.
//! - [`resp`]: the RESP (Redis protocol) API: redis-cell's `CL.THROTTLE`
//!   and `DRL.CHECK`, off by default.
//! - [`http`]: the HTTP API (HTTP/1.1, and h2c on request); [`metrics`]: its Prometheus metrics;
//!   [`middleware`]: rate limiting for axum routes.
//! - [`cli`]: the commands behind the `drl` binary.

//!
#![warn(missing_docs, unreachable_pub)]

pub mod cli;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod middleware;
pub mod net;
pub mod node;
pub mod resp;
