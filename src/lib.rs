//! `drl`: a distributed rate limiter.
//!
//! Every node answers "may this request pass?" locally, in memory, from
//! replicated counters: per-key PN-counters with one slot per node, kept in
//! time-bucketed windows. Each algorithm (sliding and fixed window, token
//! bucket, leaky bucket, GCRA) is a pure function of those merged windows and
//! the clock. DESIGN.md explains the model and its bounds.
//!
//! # Layout
//!
//! - [`core`]: the I/O-free core. Time ([`core::time`]), the slot counter
//!   ([`core::slot`]), bucketed windows ([`core::window`]), the algorithms
//!   ([`core::algorithm`]), descriptors, key digests and rules
//!   ([`core::rules`]). Never touches a socket, a task or the system clock.
//! - [`limiter`]: the in-process limiter: one fixed-capacity key table per
//!   limit, with per-entry locks, CLOCK eviction and idle expiry.
//! - [`cluster`]: the cluster's state machines, also I/O-free: delta
//!   replication, SWIM membership, snapshots, and an in-memory cluster on
//!   virtual time for tests and simulations.
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
//! - [`clock`]: the one place that reads real time.
//! - [`cli`]: the commands behind the `drl` binary.
//!
//! # Example
//!
//! ```
//! use drl::core::rules::RuleSet;
//! use drl::limiter::{Limiter, LimiterConfig};
//!
//! let rules = RuleSet::from_toml(r#"
//!     [[rules]]
//!     name = "per-user"
//!     match = { user = "*" }
//!     limits = [ { algorithm = "sliding_window", limit = 2, window = "1m" } ]
//! "#).unwrap();
//! let limiter = Limiter::new(rules, LimiterConfig::default()).unwrap();
//! assert!(limiter.allow_request("alice", "/search"));
//! assert!(limiter.allow_request("alice", "/search"));
//! assert!(!limiter.allow_request("alice", "/search"));
//! assert!(limiter.allow_request("bob", "/search"));
//! ```

#![warn(missing_docs, unreachable_pub)]

pub mod cli;
pub mod clock;
pub mod cluster;
pub mod core;
pub mod grpc;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod middleware;
pub mod net;
pub mod node;
pub mod resp;
