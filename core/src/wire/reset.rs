//! The counter reset frames: an admin reset of some counters, which every
//! node applies once to its own slot, and its acknowledgement.

use serde::{Deserialize, Serialize};

use super::DecodeError;

/// Most counters one reset names.
pub const MAX_RESET_KEYS: usize = 1024;

/// Counters to reset, sent by the node that took the admin request to every
/// peer until each has acknowledged it. `(origin, seq)` names the record: a
/// node applies a record once, however often it arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetFrame {
    /// Slot of the node that took the request (the sender).
    pub origin: u16,
    /// The origin's sequence number of this record, unique across its runs.
    pub seq: u64,
    /// 1 to [`MAX_RESET_KEYS`] counters.
    pub keys: Vec<ResetKey>,
}

/// One counter: a limit's stable id and a key digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetKey {
    /// The limit's stable id.
    #[serde(with = "postcard::fixint::le")]
    pub limit: u64,
    /// The 64-bit key digest; zero is reserved and refuses the frame.
    #[serde(with = "postcard::fixint::le")]
    pub key: u64,
}

/// A node applied (or had already applied) the reset `(origin, seq)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetAck {
    /// The acknowledging node's slot (the sender).
    pub slot: u16,
    /// The record's origin.
    pub origin: u16,
    /// The record's sequence number.
    pub seq: u64,
}

impl ResetFrame {
    pub(super) fn check(&self) -> Result<(), DecodeError> {
        if self.keys.is_empty() || self.keys.len() > MAX_RESET_KEYS {
            return Err(DecodeError::Invalid("a reset names 1 to 1024 counters"));
        }
        if self.keys.iter().any(|k| k.key == 0) {
            return Err(DecodeError::Invalid("key digest zero is reserved"));
        }
        Ok(())
    }
}
