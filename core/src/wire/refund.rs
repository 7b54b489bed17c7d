//! The refund forwarding frames: a node that took a refund of a receipt
//! another node issued asks the issuer to apply it, and the issuer answers
//! with what it gave back (or why it gave nothing).

use serde::{Deserialize, Serialize};

use super::DecodeError;
use crate::receipt::MAX_TEXT;

/// Most limits a refund answer names (a receipt's most charges).
pub const MAX_REFUND_LIMITS: usize = crate::receipt::MAX_CHARGES;

/// A refund taken by the sender for a receipt the receiver issued. The
/// receiver applies it as if it had taken it itself: its spent set makes a
/// repeated ask (a retry, a duplicate) refund nothing twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundAsk {
    /// The asking node's slot (the sender).
    pub slot: u16,
    /// The asker's name for this ask, echoed by the answer.
    pub id: u64,
    /// The receipt, as the client presented it (at most the longest
    /// receipt's text).
    pub receipt: String,
}

/// The issuer's answer to a [`RefundAsk`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundReply {
    /// The answering node's slot (the sender).
    pub slot: u16,
    /// The ask's `id`.
    pub id: u64,
    /// What the refund changed, or why it changed nothing.
    pub outcome: RefundAnswer,
}

/// What a forwarded refund did at the issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundAnswer {
    /// Given back: the receipt's cost, and per limit of the receipt (in its
    /// order) the limit's stable id and the hits given back.
    Refunded {
        /// The cost the receipt charged.
        requested: u32,
        /// `(limit id, refunded)`, at most [`MAX_REFUND_LIMITS`].
        limits: Vec<RefundedLimit>,
    },
    /// Nothing was given back, for the reason the code names (see
    /// [`RefusedCode`]).
    Refused(u8),
}

/// One limit of a forwarded refund's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundedLimit {
    /// The limit's stable id.
    #[serde(with = "postcard::fixint::le")]
    pub limit: u64,
    /// Hits given back on it.
    pub refunded: u32,
}

/// Why the issuer refunded nothing, as carried by [`RefundAnswer::Refused`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusedCode {
    /// The receipt does not open with the cluster's key.
    Invalid = 1,
    /// The receiver did not issue it either.
    OtherNode = 2,
    /// Issued before the issuer restarted.
    OtherRun = 3,
    /// Refunded already.
    AlreadyRefunded = 4,
    /// Every window it charged has passed.
    Expired = 5,
    /// The issuer's spent set is full.
    LedgerFull = 6,
    /// The issuer is recovering after a restart.
    Recovering = 7,
}

impl RefusedCode {
    /// The code a byte stands for; `None` for a byte no code has (the
    /// frame is refused rather than read as some other refusal).
    pub fn from_byte(b: u8) -> Option<RefusedCode> {
        Some(match b {
            1 => RefusedCode::Invalid,
            2 => RefusedCode::OtherNode,
            3 => RefusedCode::OtherRun,
            4 => RefusedCode::AlreadyRefunded,
            5 => RefusedCode::Expired,
            6 => RefusedCode::LedgerFull,
            7 => RefusedCode::Recovering,
            _ => return None,
        })
    }
}

impl RefundAsk {
    pub(super) fn check(&self) -> Result<(), DecodeError> {
        if self.receipt.is_empty() || self.receipt.len() > MAX_TEXT {
            return Err(DecodeError::Invalid(
                "a refund ask carries one receipt's text",
            ));
        }
        Ok(())
    }
}

impl RefundReply {
    pub(super) fn check(&self) -> Result<(), DecodeError> {
        match &self.outcome {
            RefundAnswer::Refunded { limits, .. } if limits.len() > MAX_REFUND_LIMITS => Err(
                DecodeError::Invalid("a refund answer names at most 32 limits"),
            ),
            RefundAnswer::Refused(code) if RefusedCode::from_byte(*code).is_none() => {
                Err(DecodeError::Invalid("unknown refund refusal code"))
            }
            _ => Ok(()),
        }
    }
}
