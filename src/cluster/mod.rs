#[cfg(any(test, feature = "harness"))]
pub mod harness;
pub mod membership;
pub mod node_core;
pub mod replication;
pub mod snapshot;
pub mod store;
