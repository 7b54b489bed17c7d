//! The RESP (Redis protocol) API of a node: redis-cell's `CL.THROTTLE` and
//! `DRL.CHECK` for this cluster's rules, so that any Redis client library,
//! and `redis-benchmark`, can use the cluster.
//!
//! Off by default; `resp_listen` (`--resp-listen`) turns it on.
//! `docs/resp-api.md` is the contract: commands, reply shapes, errors.
//! Every command is decided through the node's [`crate::service::Service`],
//! the path of the HTTP and gRPC APIs, so its counts are the cluster's. A
//! refused command (`-ERR`) changes no counter.
//!
//! # Layout
//!
//! - [`parse`]: RESP2 framing of requests (arrays of bulk strings, inline
//!   commands), I/O-free, with size limits.
//! - [`reply`]: RESP2 replies.
//! - [`cell`]: `CL.THROTTLE`'s parameters as a rule of the rule set, and its
//!   reply.
//! - [`service`]: what each command does.
//! - [`server`]: threads, connections, limits, drain.

pub mod cell;
pub mod parse;
pub mod reply;
pub mod server;
pub mod service;

pub use server::{Connection, RespLimits, RespListener};
pub use service::RespService;
