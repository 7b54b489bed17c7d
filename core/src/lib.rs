//! `drl_core`: the I/O-free core of the distributed rate limiter.
//!
//! Everything a node *decides* lives here: counters, windows, algorithms,
//! rules and keys, the in-process limiter, and the cluster's state machines
//! (replication, confirmation near a limit, membership, snapshots). Nothing
//! in this crate opens a socket, spawns a task, sleeps or touches a file;
//! time arrives as an argument ([`time::Nanos`]) and randomness as a seed.
//! The one exception is [`clock::SystemClock`], the only reader of real
//! time, which drivers pass in. That keeps every piece deterministic and
//! testable on virtual time, and lets the simulation harness run the same
//! code as a real node. The server crate (`distributed-rate-limiter`) drives
//! it over QUIC, HTTP, gRPC and RESP; the client SDK (`drl-client`) uses it
//! without any of those.
//!
//! # Features
//!
//! - `cluster` (default): the cluster's state machines and wire codec
//!   (foca, crdts, postcard, rand). A process that only decides in itself
//!   (the SDK) leaves it out.
//! - `harness`: the in-memory cluster for tests and simulations.
//!
//! # Layout
//!
//! - Counting: [`time`] (nanoseconds, the `Clock` trait), [`slot`] (one
//!   node's PN slot, the slot counter CRDT), [`window`] (rings of time
//!   buckets), [`algorithm`] (the five algorithms as pure functions of a
//!   window).
//! - Requests and rules: [`descriptor`] (validated descriptors), [`key`]
//!   (key digests and limit ids), [`rules`] (the rule file, its checks and
//!   its lookup), [`receipt`] (sealed refund receipts).
//! - Cluster arithmetic and bytes: [`share`] (per-node shares and the
//!   in-flight budget), `wire` (every frame nodes exchange; feature
//!   `cluster`).
//! - [`limiter`]: the in-process limiter, rules in and decisions out.
//! - [`decide`]: the one entry point every protocol decides through.
//! - `cluster` (feature `cluster`, on by default): one node's cluster
//!   state machine (`cluster::node_core`) and its parts, and (feature
//!   `harness`) an in-memory cluster on virtual time.
//! - [`clock`]: the one reader of real time.
//! - [`corrected`]: a clock correction toward the cluster's time, slewed.
//!
//! # Example
//!
//! ```
//! use drl_core::rules::RuleSet;
//! use drl_core::limiter::{Limiter, LimiterConfig};
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

pub mod algorithm;
pub mod clock;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod corrected;
pub mod decide;
pub mod descriptor;
pub mod fields;
pub mod key;
pub mod limiter;
pub mod peer_set;
pub mod receipt;
pub mod rules;
pub mod share;
pub mod slot;
pub mod time;
pub mod window;
#[cfg(feature = "cluster")]
pub mod wire;
