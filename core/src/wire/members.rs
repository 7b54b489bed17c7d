//! The membership frames: a clean leave, an operator's forget, whom a
//! node cannot hear (fences), and the end of a recovery.

use serde::{Deserialize, Serialize};

/// An operator forgot `member` at the sender (`POST
/// /v1/members/{slot}/forget`): every receiver that does not hold it alive
/// forgets it too, whatever side of a split it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forget {
    /// The sender's slot.
    pub slot: u16,
    /// The member forgotten.
    pub member: u16,
}

/// The end of a recovery sent to a restarted or joining node: its own slot
/// as the sender knows it, and the slots of nodes the sender cannot vouch
/// will answer themselves (members that left, died or are out of reach),
/// in Recovery frames numbered `first..=last`. The receiver counts the
/// sender as answered once it holds every one of those rounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryDone {
    /// The sender's slot.
    pub slot: u16,
    /// The first Recovery round of this recovery.
    pub first: u64,
    /// The last Recovery round of this recovery.
    pub last: u64,
    /// The members the sender hears and reaches now (the receiver
    /// excluded): their slots were not relayed, so the receiver waits for
    /// their own answers before it admits. At most [`MAX_SUSPECTS`].
    pub vouched: Vec<u16>,
}

/// Most Recovery frames one recovery may take.
pub const MAX_RECOVERY_ROUNDS: u64 = 1 << 20;

/// A node leaving the cluster cleanly (drained, scaled down): its peers
/// stop counting it as a member instead of waiting for the failure
/// detector and then the forget time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// The leaving node's slot (the sender).
    pub slot: u16,
    /// Which run of it is leaving: a newer run of the same slot is a member
    /// again.
    pub incarnation: u64,
}

/// The peers the sender has not heard from for half the fence time (its
/// suspects), sent to every peer when that set changes and every quarter
/// of the fence time. A node fences a silent peer only when a majority of
/// the cluster, itself included, reports it silent: a peer that only some
/// nodes cannot hear (a one-way or non-transitive cut) is still awaited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hearing {
    /// The sender's slot.
    pub slot: u16,
    /// The slots it has not heard from lately, ascending.
    pub silent: Vec<u16>,
}

/// Most suspects one [`Hearing`] frame may name.
pub const MAX_SUSPECTS: usize = 4096;
