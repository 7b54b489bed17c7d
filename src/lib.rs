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
//! - [`service`]: what every front-end shares: the node's decision path
//!   (`drl_core::decide::Decider`), status, metrics and admin token, and
//!   the rate-limit header fields of a decision.
//! - The front-ends, side by side over one [`service::Service`], none
//!   importing another: [`http`] (the HTTP API, HTTP/1.1 and h2c),
//!   [`grpc`] (Envoy's rate limit service v3, the native
//!   `drl.v1.RateLimiter` and health), [`resp`] (redis-cell's
//!   `CL.THROTTLE` and `DRL.CHECK`, off by default); [`listen`], the
//!   accept loops and connection caps HTTP and RESP share; [`middleware`],
//!   rate limiting for a Rust service's own axum routes.
//! - [`server`]: the composition root: binds every listener, starts the
//!   node, serves, drains.
//! - [`metrics`]: the Prometheus metrics of every protocol.
//! - [`cli`]: the commands behind the `drl` binary.

//!
#![warn(missing_docs, unreachable_pub)]

pub mod cli;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod middleware;
pub mod net;
pub mod node;
pub mod resp;
pub mod server;
pub mod service;
