//! The cluster layer, sans-IO: the state machines that keep a node's counts
//! in step with its peers. The server's async driver (`node`) owns them and feeds
//! them time, frames and connections.
//!
//! | module | what |
//! |---|---|
//! | [`node_core`] | one node's orchestration: replication, confirmation, membership, rules, recovery gate |
//! | [`confirm`] | requests near a limit waiting for their peers' answers, by ticket |
//! | [`replication`] | deltas, acknowledgements, syncs and claims between peers |
//! | [`rules_register`] | the rules in force, their cluster-wide order, and the confirmation of a change |
//! | [`membership`] | who is in the cluster and alive (SWIM) |
//! | [`clock_sync`] | steers the clock correction toward the cluster's time; the clock gate |
//! | [`resets`] | admin counter resets, applied once by every node |
//! | [`refunds`] | refunds of receipts another node issued, forwarded to the issuer |
//! | [`store`] | the view of the key tables replication reads and writes |
//! | [`snapshot`] | local snapshots for a whole-cluster restart |
//! | [`wal`] | the write-ahead journal of this node's slot values: records and their replay |
//! | `harness` | an in-memory cluster on virtual time (tests, `harness` feature) |

pub mod clock_sync;
pub mod confirm;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
pub mod membership;
pub mod node_core;
pub mod refunds;
pub mod replication;
pub mod resets;
pub mod rules_register;
pub mod snapshot;
pub mod store;
pub mod wal;
