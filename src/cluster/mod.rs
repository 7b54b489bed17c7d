pub mod harness;
pub mod membership;
pub mod replication;
pub mod snapshot;
