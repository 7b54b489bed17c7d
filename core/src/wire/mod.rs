//! The wire codec: frames nodes exchange, as written in `proto-spec/`.
//!
//! A frame is one byte of protocol version, one byte of kind, and a
//! postcard-encoded body. Decoding never panics and never trusts a length:
//! every frame is checked against the limits below before anything reads it,
//! and a frame that fails any check is refused whole (nothing of it is
//! applied). What a receiver does with a well-formed frame (which slots it
//! may carry, which epochs it may touch) is the gossip state machine's job.

use serde::{Deserialize, Serialize};

mod members;
mod refund;
mod reset;
pub use members::{Forget, Hearing, Leave, RecoveryDone, MAX_RECOVERY_ROUNDS, MAX_SUSPECTS};
pub use refund::{
    RefundAnswer, RefundAsk, RefundReply, RefundedLimit, RefusedCode, MAX_REFUND_LIMITS,
};
pub use reset::{ResetAck, ResetFrame, ResetKey, MAX_RESET_KEYS};

/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Largest frame accepted from a stream.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Most limit groups in one frame.
pub const MAX_GROUPS: usize = 4096;
/// Most keys in one group.
pub const MAX_KEYS_PER_GROUP: usize = 1 << 16;
/// Most buckets carried for one key.
pub const MAX_BUCKETS_PER_KEY: usize = 64;
/// Largest hit count a slot may report for one bucket: far above any limit a
/// rule can hold, far below the point where saturation would hide a bug.
pub const MAX_COUNT: u32 = 1 << 31;
/// Longest node name.
pub const MAX_NAME_BYTES: usize = 64;

/// Frame kinds, the second byte of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// [`Frame::Hello`].
    Hello = 1,
    /// [`Frame::Delta`].
    Delta = 2,
    /// [`Frame::Ack`].
    Ack = 3,
    /// [`Frame::Sync`].
    Sync = 4,
    /// [`Frame::Recovery`].
    Recovery = 5,
    /// [`Frame::Swim`].
    Swim = 6,
    /// [`Frame::Rules`].
    Rules = 7,
    /// [`Frame::Claim`].
    Claim = 8,
    /// [`Frame::Answer`].
    Answer = 9,
    /// [`Frame::RulesAck`].
    RulesAck = 10,
    /// [`Frame::Reset`].
    Reset = 12,
    /// [`Frame::ResetAck`].
    ResetAck = 13,
    /// [`Frame::RefundAsk`].
    RefundAsk = 14,
    /// [`Frame::RefundReply`].
    RefundReply = 15,
    /// [`Frame::Leave`].
    Leave = 16,
    /// [`Frame::Hearing`].
    Hearing = 17,
    /// [`Frame::RecoveryDone`].
    RecoveryDone = 18,
    /// [`Frame::Forget`].
    Forget = 19,
    /// [`Frame::RelayedAnswer`].
    RelayedAnswer = 20,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Delta,
            3 => Kind::Ack,
            4 => Kind::Sync,
            5 => Kind::Recovery,
            6 => Kind::Swim,
            7 => Kind::Rules,
            8 => Kind::Claim,
            9 => Kind::Answer,
            10 => Kind::RulesAck,
            12 => Kind::Reset,
            13 => Kind::ResetAck,
            14 => Kind::RefundAsk,
            15 => Kind::RefundReply,
            16 => Kind::Leave,
            17 => Kind::Hearing,
            18 => Kind::RecoveryDone,
            19 => Kind::Forget,
            20 => Kind::RelayedAnswer,
            _ => return None,
        })
    }
}

/// First frame on every connection, both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's slot.
    pub slot: u16,
    /// The sender's node name (also in its certificate).
    pub name: String,
    /// Grows every time the node starts: tells a restart from a reconnect.
    pub incarnation: u64,
    /// Digest of the sender's rules, to notice divergent rule sets.
    #[serde(with = "postcard::fixint::le")]
    pub rules_digest: u64,
    /// True while the sender is recovering its own slots after a restart.
    pub recovering: bool,
}

/// Values of one slot for some keys: a delta round, a full-state sync
/// chunk, or (for recovery) the receiver's own slot as the sender knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// Whose slot the values are.
    pub slot: u16,
    /// Delta round, or chunk number of a sync.
    pub round: u64,
    /// The sender's clock when it sent the frame, in ns since the Unix epoch.
    pub sent_at: u64,
    /// True on the last chunk of a sync or recovery.
    pub last: bool,
    /// The values, grouped by limit; at most [`MAX_GROUPS`].
    pub groups: Vec<LimitGroup>,
}

/// The keys of one limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitGroup {
    /// The limit's stable id: a digest of its rule, scope, position and
    /// parameters, so it survives a reload that keeps the limit.
    #[serde(with = "postcard::fixint::le")]
    pub limit: u64,
    /// The newest bucket epoch in the group; buckets say how far back they are.
    pub newest: u64,
    /// The keys with values in this group; at most [`MAX_KEYS_PER_GROUP`].
    pub keys: Vec<KeySlots>,
}

/// The slot's values of one key, bucket by bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlots {
    /// The 64-bit key digest; zero is reserved and refuses the frame.
    #[serde(with = "postcard::fixint::le")]
    pub key: u64,
    /// 1 to [`MAX_BUCKETS_PER_KEY`] buckets.
    pub buckets: Vec<BucketSlot>,
}

/// One bucket's value of the slot: epoch `newest − back`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSlot {
    /// How many buckets before the group's `newest` epoch: below
    /// [`MAX_BUCKETS_PER_KEY`] and at most `newest`.
    pub back: u8,
    /// The slot's hits in the bucket: an absolute value, not an increment, so
    /// merging is a maximum. At most [`MAX_COUNT`].
    pub p: u32,
    /// The slot's refunds in the bucket, absolute like `p`. At most
    /// [`MAX_COUNT`].
    pub n: u32,
}

/// Acknowledges delta rounds and echoes timestamps for clock-offset and
/// round-trip estimation (the four timestamps of NTP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The acknowledger's slot.
    pub slot: u16,
    /// Rounds received since the previous ack.
    pub rounds: Vec<u64>,
    /// `sent_at` of the newest acknowledged delta (t1).
    pub echo_sent_at: u64,
    /// When that delta arrived, by the acknowledger's clock (t2).
    pub received_at: u64,
    /// When this ack left, by the acknowledger's clock (t3).
    pub replied_at: u64,
}

/// Membership traffic, opaque to the codec (SWIM messages).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swim {
    /// One SWIM message, checked whole by the membership state machine.
    pub payload: Vec<u8>,
}

/// The rules in force cluster-wide: a last-writer-wins register ordered by
/// `(version, origin)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesFrame {
    /// Grows with every change; the higher version wins.
    pub version: u64,
    /// Slot of the node that made the change; breaks ties between equal
    /// versions.
    pub origin: u16,
    /// The rules file, as TOML; at most [`MAX_RULES_BYTES`].
    pub text: String,
}

/// One rules version's identity: its Lamport counter, the slot of the node
/// that made it, and the digest of its text. Ordered by these three fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesId {
    /// The version's counter.
    pub counter: u64,
    /// The slot of the node that made the change.
    pub origin: u16,
    /// `stable_digest` of the rules text.
    #[serde(with = "postcard::fixint::le")]
    pub digest: u64,
}

/// The answer to a [`RulesFrame`]: which version the sender offered, and
/// which version the receiver runs now that it has weighed it (the offered
/// one, a later one that wins over it, or an earlier one if it could not
/// put the offered rules in force).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesAck {
    /// The version the Rules frame carried.
    pub offered: RulesId,
    /// The version the receiver runs after it.
    pub current: RulesId,
}

/// Largest rules text carried.
pub const MAX_RULES_BYTES: usize = 512 * 1024;

/// One frame, decoded and checked against the limits above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame on every connection, both ways.
    Hello(Hello),
    /// The sender's own slot for keys that changed: merged, then acknowledged.
    Delta(Slots),
    /// Acknowledges delta rounds, with timestamps for the clock estimate.
    Ack(Ack),
    /// One chunk of the sender's whole own slot, for a peer that may have
    /// missed deltas (it said hello, or rounds to it went unacknowledged);
    /// acknowledged, and sent again if not. Snapshots store the same frames.
    Sync(Slots),
    /// The receiver's own slot as the sender knows it; accepted only while
    /// the receiver recovers after a restart.
    Recovery(Slots),
    /// A membership message.
    Swim(Swim),
    /// The rules in force cluster-wide.
    Rules(RulesFrame),
    /// Provisional hits near a limit: the sender's own values of the keys,
    /// with `round` naming the claim. Every receiver merges them and answers.
    Claim(Slots),
    /// The answer to a claim: the sender's own values of the claimed keys,
    /// with `round` echoing the claim's.
    Answer(Slots),
    /// The answer to a Rules frame: the version offered and the one in force.
    RulesAck(RulesAck),
    /// Counters an admin reset: every node clears its own slot of them once.
    Reset(ResetFrame),
    /// A node applied a reset.
    ResetAck(ResetAck),
    /// A refund taken elsewhere, for the node that issued its receipt.
    RefundAsk(RefundAsk),
    /// The issuer's answer to a forwarded refund.
    RefundReply(RefundReply),
    /// The sender is leaving the cluster cleanly: forget it now.
    Leave(Leave),
    /// Whom the sender cannot hear: a peer is fenced only when a majority
    /// cannot hear it.
    Hearing(Hearing),
    /// The sender has sent every chunk of a recovery: the rounds it names
    /// make it complete, whatever order their streams arrive in.
    RecoveryDone(RecoveryDone),
    /// The sender's operator forgot a member gone for good: forget it too.
    Forget(Forget),
    /// The answer to a claim with what the sender knows of other nodes'
    /// slots for the claimed keys: replaces [`Frame::Answer`].
    RelayedAnswer(RelayedAnswer),
}

/// The answer to a claim: the sender's own values of the claimed keys (as
/// in [`Frame::Answer`]) and, for each other node whose values of them it
/// holds (the claimant excluded), those values. Two majorities share a
/// node, so a claimant that hears from a majority learns every hit a
/// majority has acknowledged, even from a node it cannot hear itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedAnswer {
    /// The sender's own values; `slot` is the sender's, `round` echoes
    /// the claim's, `sent_at` as in [`Frame::Answer`].
    pub answer: Slots,
    /// Other nodes' values, one [`Slots`] per node (its `slot`), none the
    /// sender's own. At most [`MAX_SUSPECTS`].
    pub others: Vec<Slots>,
}

/// Why a frame was refused. The frame changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame ends before its version or kind byte.
    #[error("empty frame")]
    Empty,
    /// The frame is longer than [`MAX_FRAME_BYTES`] (its length in bytes).
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {0} (this node speaks {VERSION})")]
    UnknownVersion(u8),
    /// The kind byte names no [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body is not the postcard encoding of its kind's struct.
    #[error("malformed {kind:?} body: {reason}")]
    Malformed {
        /// The kind the frame claimed.
        kind: Kind,
        /// postcard's description of the fault.
        reason: String,
    },
    /// Bytes follow the body (how many).
    #[error("{0} trailing bytes after the body")]
    Trailing(usize),
    /// The body decoded but breaks a limit of the protocol (which one).
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

impl Frame {
    /// The kind byte this frame is sent with.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::Delta(_) => Kind::Delta,
            Frame::Ack(_) => Kind::Ack,
            Frame::Sync(_) => Kind::Sync,
            Frame::Recovery(_) => Kind::Recovery,
            Frame::Swim(_) => Kind::Swim,
            Frame::Rules(_) => Kind::Rules,
            Frame::Claim(_) => Kind::Claim,
            Frame::Answer(_) => Kind::Answer,
            Frame::RulesAck(_) => Kind::RulesAck,
            Frame::Reset(_) => Kind::Reset,
            Frame::ResetAck(_) => Kind::ResetAck,
            Frame::RefundAsk(_) => Kind::RefundAsk,
            Frame::RefundReply(_) => Kind::RefundReply,
            Frame::Leave(_) => Kind::Leave,
            Frame::Hearing(_) => Kind::Hearing,
            Frame::RecoveryDone(_) => Kind::RecoveryDone,
            Frame::Forget(_) => Kind::Forget,
            Frame::RelayedAnswer(_) => Kind::RelayedAnswer,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.kind() as u8);
        let body = match self {
            Frame::Hello(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Delta(b)
            | Frame::Sync(b)
            | Frame::Recovery(b)
            | Frame::Claim(b)
            | Frame::Answer(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Ack(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Rules(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Swim(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::RulesAck(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Reset(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::ResetAck(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::RefundAsk(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::RefundReply(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Leave(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Hearing(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::RecoveryDone(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::Forget(b) => postcard::to_extend(b, std::mem::take(out)),
            Frame::RelayedAnswer(b) => postcard::to_extend(b, std::mem::take(out)),
        };
        // Serialising plain structs into a Vec cannot fail.
        *out = body.unwrap_or_default();
    }

    /// The encoded frame, in a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes and checks one frame.
    pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let (&kind_byte, body) = rest.split_first().ok_or(DecodeError::Empty)?;
        let kind = Kind::from_byte(kind_byte).ok_or(DecodeError::UnknownKind(kind_byte))?;
        let frame = match kind {
            Kind::Hello => Frame::Hello(body_of(kind, body)?),
            Kind::Delta => Frame::Delta(body_of(kind, body)?),
            Kind::Ack => Frame::Ack(body_of(kind, body)?),
            Kind::Sync => Frame::Sync(body_of(kind, body)?),
            Kind::Recovery => Frame::Recovery(body_of(kind, body)?),
            Kind::Rules => Frame::Rules(body_of(kind, body)?),
            Kind::Swim => Frame::Swim(body_of(kind, body)?),
            Kind::Claim => Frame::Claim(body_of(kind, body)?),
            Kind::Answer => Frame::Answer(body_of(kind, body)?),
            Kind::RulesAck => Frame::RulesAck(body_of(kind, body)?),
            Kind::Reset => Frame::Reset(body_of(kind, body)?),
            Kind::ResetAck => Frame::ResetAck(body_of(kind, body)?),
            Kind::RefundAsk => Frame::RefundAsk(body_of(kind, body)?),
            Kind::RefundReply => Frame::RefundReply(body_of(kind, body)?),
            Kind::Leave => Frame::Leave(body_of(kind, body)?),
            Kind::Hearing => Frame::Hearing(body_of(kind, body)?),
            Kind::RecoveryDone => Frame::RecoveryDone(body_of(kind, body)?),
            Kind::Forget => Frame::Forget(body_of(kind, body)?),
            Kind::RelayedAnswer => Frame::RelayedAnswer(body_of(kind, body)?),
        };
        frame.check()?;
        Ok(frame)
    }

    fn check(&self) -> Result<(), DecodeError> {
        match self {
            Frame::Hello(h) if h.name.is_empty() || h.name.len() > MAX_NAME_BYTES => {
                Err(DecodeError::Invalid("node name must be 1 to 64 bytes"))
            }
            Frame::Delta(s)
            | Frame::Sync(s)
            | Frame::Recovery(s)
            | Frame::Claim(s)
            | Frame::Answer(s) => s.check(),
            Frame::Ack(a) if a.rounds.len() > 4096 => {
                Err(DecodeError::Invalid("too many acknowledged rounds"))
            }
            Frame::Rules(r) if r.text.len() > MAX_RULES_BYTES => {
                Err(DecodeError::Invalid("rules text too large"))
            }
            Frame::Reset(r) => r.check(),
            Frame::RefundAsk(r) => r.check(),
            Frame::RefundReply(r) => r.check(),
            Frame::Hearing(h) if h.silent.len() > MAX_SUSPECTS => {
                Err(DecodeError::Invalid("too many suspects"))
            }
            Frame::RecoveryDone(d)
                if d.last < d.first || d.last - d.first >= MAX_RECOVERY_ROUNDS =>
            {
                Err(DecodeError::Invalid("recovery rounds out of range"))
            }
            Frame::RecoveryDone(d) if d.vouched.len() > MAX_SUSPECTS => {
                Err(DecodeError::Invalid("too many vouched members"))
            }
            Frame::RelayedAnswer(a) => a.check(),
            _ => Ok(()),
        }
    }
}

impl RelayedAnswer {
    fn check(&self) -> Result<(), DecodeError> {
        if self.others.len() > MAX_SUSPECTS {
            return Err(DecodeError::Invalid("too many relayed slots"));
        }
        self.answer.check()?;
        for other in &self.others {
            if other.slot == self.answer.slot {
                return Err(DecodeError::Invalid(
                    "a relay carries the sender's own slot",
                ));
            }
            other.check()?;
        }
        Ok(())
    }
}

impl Slots {
    fn check(&self) -> Result<(), DecodeError> {
        if self.groups.len() > MAX_GROUPS {
            return Err(DecodeError::Invalid("too many limit groups"));
        }
        for g in &self.groups {
            if g.keys.len() > MAX_KEYS_PER_GROUP {
                return Err(DecodeError::Invalid("too many keys in a group"));
            }
            for k in &g.keys {
                if k.key == 0 {
                    return Err(DecodeError::Invalid("key digest zero is reserved"));
                }
                if k.buckets.is_empty() || k.buckets.len() > MAX_BUCKETS_PER_KEY {
                    return Err(DecodeError::Invalid("a key carries 1 to 64 buckets"));
                }
                for b in &k.buckets {
                    if usize::from(b.back) >= MAX_BUCKETS_PER_KEY || u64::from(b.back) > g.newest {
                        return Err(DecodeError::Invalid("bucket lies outside any window"));
                    }
                    if b.p > MAX_COUNT || b.n > MAX_COUNT {
                        return Err(DecodeError::Invalid("absurd count"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Number of `(key, bucket)` values carried.
    pub fn values(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.keys)
            .map(|k| k.buckets.len())
            .sum()
    }
}

fn body_of<'a, T: Deserialize<'a>>(kind: Kind, body: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| DecodeError::Malformed {
            kind,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Bytes a postcard varint of `v` takes.
pub fn varint_len(v: u64) -> usize {
    ((64 - (v | 1).leading_zeros()) as usize).div_ceil(7)
}

/// Cuts a stream of `(limit, key, buckets)` values into frames that each
/// encode to at most `max_bytes`, so that a delta fits a datagram.
pub struct SlotsPacker {
    max_bytes: usize,
    slot: u16,
    sent_at: u64,
    next_round: u64,
    current: Slots,
    size: usize,
    done: Vec<Slots>,
}

impl SlotsPacker {
    /// Frames are numbered from `first_round` on.
    pub fn new(max_bytes: usize, slot: u16, first_round: u64, sent_at: u64) -> Self {
        let mut p = SlotsPacker {
            max_bytes,
            slot,
            sent_at,
            next_round: first_round,
            current: Slots {
                slot,
                round: first_round,
                sent_at,
                last: false,
                groups: Vec::new(),
            },
            size: 0,
            done: Vec::new(),
        };
        p.size = p.header_len();
        p
    }

    fn header_len(&self) -> usize {
        // version, kind, slot, round, sent_at, last, group count (≤ 2 bytes).
        2 + varint_len(u64::from(self.slot))
            + varint_len(self.current.round)
            + varint_len(self.sent_at)
            + 1
            + 2
    }

    fn key_len(key: &KeySlots) -> usize {
        8 + 1
            + key
                .buckets
                .iter()
                .map(|b| 1 + varint_len(u64::from(b.p)) + varint_len(u64::from(b.n)))
                .sum::<usize>()
    }

    /// Adds one key's values under `limit`, whose newest epoch is `newest`,
    /// and returns the round number of the frame it went into.
    pub fn push(&mut self, limit: u64, newest: u64, key: KeySlots) -> u64 {
        let key_len = Self::key_len(&key);
        // A group costs its limit, newest epoch and key count (≤ 3 bytes).
        let same_group = matches!(self.current.groups.last(), Some(g) if g.limit == limit && g.newest == newest && g.keys.len() < MAX_KEYS_PER_GROUP);
        let group_len = if same_group {
            0
        } else {
            8 + varint_len(newest) + 3
        };
        let full = self.current.groups.len() >= MAX_GROUPS && !same_group;
        if (self.size + group_len + key_len > self.max_bytes || full)
            && !self.current.groups.is_empty()
        {
            self.flush();
            return self.push(limit, newest, key);
        }
        let round = self.current.round;
        if same_group {
            if let Some(g) = self.current.groups.last_mut() {
                g.keys.push(key);
            }
        } else {
            self.current.groups.push(LimitGroup {
                limit,
                newest,
                keys: vec![key],
            });
        }
        self.size += group_len + key_len;
        round
    }

    fn flush(&mut self) {
        self.next_round += 1;
        let next = Slots {
            slot: self.slot,
            round: self.next_round,
            sent_at: self.sent_at,
            last: false,
            groups: Vec::new(),
        };
        self.done.push(std::mem::replace(&mut self.current, next));
        self.size = self.header_len();
    }

    /// The frames, in order; the last one has `last` set. Empty when nothing
    /// was pushed.
    pub fn finish(mut self) -> Vec<Slots> {
        if !self.current.groups.is_empty() {
            self.flush();
        }
        if let Some(l) = self.done.last_mut() {
            l.last = true;
        }
        self.done
    }
}

#[cfg(test)]
mod tests;
