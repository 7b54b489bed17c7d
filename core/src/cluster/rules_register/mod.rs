//! The rules register: which rules version is in force, how versions are
//! ordered cluster-wide, and when a change made on this node may be
//! reported as in force everywhere.
//!
//! Every version has an identity, [`RulesVersion`]: a Lamport counter (one
//! more than the highest this node has seen), the slot of the node that made
//! it, and the digest of its text. Versions are totally ordered by those
//! three fields, and every node keeps the greatest it has seen: two changes
//! made at once on two nodes end the same way everywhere.
//!
//! A change made here is a *proposal*: it is in force here at once, and
//! sent to every live peer (the node core counts a connected peer the
//! membership has not declared alive yet as live), which answers with a `RulesAck` naming the
//! version it runs after weighing it. The proposal ends with one
//! [`RulesOutcome`]:
//!
//! - [`RulesOutcome::Confirmed`]: every peer that was live when it was made
//!   (and is still) runs it, and with this node they are a majority of the
//!   configured cluster. Nothing can replace it but a later version, since
//!   every node that runs it only ever moves to greater ones.
//! - [`RulesOutcome::Superseded`]: some node runs a greater version, made
//!   without this one (a concurrent change) or after it; the proposal is no
//!   longer in force anywhere once that version has spread.
//! - [`RulesOutcome::Unconfirmed`]: the confirmation timeout passed, or too
//!   many peers went down, before every live peer answered or a majority
//!   could: the outcome is unknown (the version is in force here and may
//!   still win everywhere).
//!
//! # Calling order
//!
//! [`RulesRegister::weigh`] then [`RulesRegister::adopt`] for rules from a
//! peer; [`RulesRegister::next_version`], [`RulesRegister::adopt`] and
//! [`RulesRegister::propose`] for a change made here;
//! [`RulesRegister::handle_ack`] and [`RulesRegister::handle_peer_down`] as
//! they come; [`RulesRegister::handle_timeout`] once
//! [`RulesRegister::poll_timeout`] has passed; then drain
//! [`RulesRegister::poll_outcome`]. Nothing here does I/O: the node core
//! sends the frames.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;

use crate::key::stable_digest;
use crate::slot::NodeSlot;
use crate::time::Nanos;
use crate::wire::RulesId;

/// The identity of a rules version and its place in the cluster's total
/// order: the counter first, then the origin, then the digest (which only
/// decides between two texts a node gave the same counter, as a node that
/// lost its kept rules may).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RulesVersion {
    /// One more than the greatest counter the origin had seen.
    pub counter: u64,
    /// The slot of the node that made the change.
    pub origin: u16,
    /// `stable_digest` of the rules text.
    pub digest: u64,
}

impl RulesVersion {
    /// Version `counter` from the node in slot `origin`, of the rules text
    /// whose digest is `digest`.
    pub fn new(counter: u64, origin: u16, digest: u64) -> Self {
        RulesVersion {
            counter,
            origin,
            digest,
        }
    }

    /// The version of `text` as `counter` from `origin`.
    pub fn of_text(counter: u64, origin: u16, text: &str) -> Self {
        Self::new(counter, origin, stable_digest(text.as_bytes()))
    }

    /// The version as an HTTP entity tag, quotes included:
    /// `"<counter>.<origin>.<digest as 16 hex digits>"`.
    pub fn etag(&self) -> String {
        format!("\"{self}\"")
    }

    /// Parses an entity tag written by [`RulesVersion::etag`] (quotes
    /// optional). `None` for anything else.
    pub fn from_etag(tag: &str) -> Option<RulesVersion> {
        let tag = tag.trim();
        let inner = tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(tag);
        let mut parts = inner.split('.');
        let counter = parts.next()?.parse().ok()?;
        let origin = parts.next()?.parse().ok()?;
        let digest = parts.next().filter(|d| d.len() == 16)?;
        let digest = u64::from_str_radix(digest, 16).ok()?;
        parts
            .next()
            .is_none()
            .then_some(RulesVersion::new(counter, origin, digest))
    }
}

impl fmt::Display for RulesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{:016x}", self.counter, self.origin, self.digest)
    }
}

impl From<RulesVersion> for RulesId {
    fn from(v: RulesVersion) -> RulesId {
        RulesId {
            counter: v.counter,
            origin: v.origin,
            digest: v.digest,
        }
    }
}

impl From<RulesId> for RulesVersion {
    fn from(v: RulesId) -> RulesVersion {
        RulesVersion::new(v.counter, v.origin, v.digest)
    }
}

/// Names one proposal made on this node, to match its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RulesTicket(pub u64);

/// How a proposal made on this node ended (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesOutcome {
    /// Every live peer runs the version, and with this node they are a
    /// majority of the cluster.
    Confirmed {
        /// The version proposed.
        version: RulesVersion,
        /// The peers that confirmed it.
        peers: Vec<NodeSlot>,
    },
    /// A greater version is in force on some node.
    Superseded {
        /// The version proposed.
        version: RulesVersion,
        /// The greatest version seen instead.
        winner: RulesVersion,
    },
    /// Not confirmed by every live peer, or not by a majority, in time.
    Unconfirmed {
        /// The version proposed (in force here, maybe elsewhere).
        version: RulesVersion,
        /// The peers that confirmed it.
        confirmed: Vec<NodeSlot>,
        /// Live peers that did not answer in time.
        silent: Vec<NodeSlot>,
        /// Peers that answered with an older version: they could not put
        /// the rules in force (their log says why).
        refused: Vec<NodeSlot>,
        /// Nodes (this one included) a confirmation needs.
        majority: usize,
    },
}

/// How rules offered by a peer compare with the version in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighed {
    /// Greater: put them in force.
    Newer,
    /// The version in force: nothing to do but answer.
    Same,
    /// Smaller: keep ours and answer with it.
    Older,
}

/// Settings of the register.
#[derive(Clone, Copy, Debug)]
pub struct RegisterConfig {
    /// This node's slot.
    pub own: NodeSlot,
    /// Members of the cluster, this node included (follows membership).
    pub cluster_size: usize,
    /// How long a proposal waits for its answers.
    pub confirm_timeout: Nanos,
    /// How often a proposal is sent again to peers that have not answered.
    pub resend_interval: Nanos,
}

impl RegisterConfig {
    /// Defaults for the node in `own` of a cluster of `cluster_size`:
    /// answers within 5 s, sent again every second (a stream is not lost
    /// while its connection lives; a new connection carries the rules anyway).
    pub fn new(own: NodeSlot, cluster_size: usize) -> Self {
        RegisterConfig {
            own,
            cluster_size,
            confirm_timeout: Nanos::from_secs(5),
            resend_interval: Nanos::from_secs(1),
        }
    }

    /// Nodes, this one included, that make a majority of the cluster.
    pub fn majority(&self) -> usize {
        self.cluster_size / 2 + 1
    }
}

struct Proposal {
    ticket: RulesTicket,
    version: RulesVersion,
    /// Live peers when it was made, still live, not answered yet.
    waiting: BTreeSet<NodeSlot>,
    confirmed: Vec<NodeSlot>,
    refused: Vec<NodeSlot>,
    deadline: Nanos,
    next_resend: Nanos,
}

/// The rules in force and this node's proposals (see the module docs).
pub struct RulesRegister {
    cfg: RegisterConfig,
    version: RulesVersion,
    text: String,
    proposals: Vec<Proposal>,
    outcomes: VecDeque<(RulesTicket, RulesOutcome)>,
    next_ticket: u64,
}

impl RulesRegister {
    /// A register running `text` at `version`.
    pub fn new(cfg: RegisterConfig, text: String, version: RulesVersion) -> Self {
        RulesRegister {
            cfg,
            version,
            text,
            proposals: Vec::new(),
            outcomes: VecDeque::new(),
            next_ticket: 1,
        }
    }

    /// The version in force.
    pub fn version(&self) -> RulesVersion {
        self.version
    }
    /// The text in force.
    pub fn text(&self) -> &str {
        &self.text
    }
    /// The cluster's membership changed: majorities count `nodes` (this one
    /// included) from now on.
    pub fn set_cluster_size(&mut self, nodes: usize) {
        self.cfg.cluster_size = nodes.max(1);
    }

    /// The register's settings.
    pub fn config(&self) -> &RegisterConfig {
        &self.cfg
    }
    /// Proposals still waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.proposals.len()
    }

    /// The version a change made here now gets: the next counter, this
    /// node, the digest of `text`.
    pub fn next_version(&self, text: &str) -> RulesVersion {
        RulesVersion::of_text(
            self.version.counter.saturating_add(1),
            self.cfg.own.get(),
            text,
        )
    }

    /// Where the rules `text` offered as `counter` from `origin` stand
    /// against the version in force, and their full version.
    pub fn weigh(&self, counter: u64, origin: u16, text: &str) -> (Weighed, RulesVersion) {
        let offered = RulesVersion::of_text(counter, origin, text);
        let weighed = match offered.cmp(&self.version) {
            std::cmp::Ordering::Greater => Weighed::Newer,
            std::cmp::Ordering::Equal => Weighed::Same,
            std::cmp::Ordering::Less => Weighed::Older,
        };
        (weighed, offered)
    }

    /// Puts `text` at `version` in force, if it is greater than the version
    /// in force (otherwise nothing changes and `false` is returned). Every
    /// proposal it is greater than is superseded.
    pub fn adopt(&mut self, version: RulesVersion, text: String) -> bool {
        if version <= self.version {
            return false;
        }
        self.version = version;
        self.text = text;
        let outcomes = &mut self.outcomes;
        self.proposals.retain(|p| {
            if p.version < version {
                outcomes.push_back((
                    p.ticket,
                    RulesOutcome::Superseded {
                        version: p.version,
                        winner: version,
                    },
                ));
                false
            } else {
                true
            }
        });
        true
    }

    /// Registers the version in force, just made here, as a proposal
    /// awaiting the answers of the `live` peers. With no peer to wait for
    /// it is decided at once (confirmed in a cluster of one).
    pub fn propose(&mut self, now: Nanos, live: &BTreeSet<NodeSlot>) -> RulesTicket {
        let ticket = RulesTicket(self.next_ticket);
        self.next_ticket += 1;
        let mut waiting = live.clone();
        waiting.remove(&self.cfg.own);
        self.proposals.push(Proposal {
            ticket,
            version: self.version,
            waiting,
            confirmed: Vec::new(),
            refused: Vec::new(),
            deadline: now + self.cfg.confirm_timeout,
            next_resend: now + self.cfg.resend_interval,
        });
        self.settle(now);
        ticket
    }

    /// Peer `from` answered the Rules frame of `offered`: it runs `current`.
    pub fn handle_ack(&mut self, now: Nanos, from: NodeSlot, offered: RulesId, current: RulesId) {
        let (offered, current) = (RulesVersion::from(offered), RulesVersion::from(current));
        let mut superseded = None;
        for p in self.proposals.iter_mut().filter(|p| p.version == offered) {
            if !p.waiting.remove(&from) {
                continue;
            }
            match current.cmp(&offered) {
                std::cmp::Ordering::Equal => p.confirmed.push(from),
                std::cmp::Ordering::Less => p.refused.push(from),
                std::cmp::Ordering::Greater => superseded = Some(current),
            }
        }
        if let Some(winner) = superseded {
            self.supersede(offered, winner);
        }
        self.settle(now);
    }

    /// Peer `slot` is down: no proposal waits for it any more.
    pub fn handle_peer_down(&mut self, now: Nanos, slot: NodeSlot) {
        for p in &mut self.proposals {
            p.waiting.remove(&slot);
        }
        self.settle(now);
    }

    /// Ends the proposals whose deadline passed, and returns the peers the
    /// version in force must be sent to again (those a proposal still
    /// waits for).
    pub fn handle_timeout(&mut self, now: Nanos) -> BTreeSet<NodeSlot> {
        let mut resend = BTreeSet::new();
        for p in &mut self.proposals {
            if now >= p.next_resend && p.version == self.version {
                resend.extend(p.waiting.iter().copied());
                p.next_resend = now + self.cfg.resend_interval;
            }
        }
        self.settle(now);
        resend
    }

    /// When [`RulesRegister::handle_timeout`] must next be called, if a
    /// proposal waits.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.proposals
            .iter()
            .map(|p| p.next_resend.min(p.deadline))
            .min()
    }

    /// A proposal that ended; drain after every input.
    pub fn poll_outcome(&mut self) -> Option<(RulesTicket, RulesOutcome)> {
        self.outcomes.pop_front()
    }

    fn supersede(&mut self, version: RulesVersion, winner: RulesVersion) {
        let outcomes = &mut self.outcomes;
        self.proposals.retain(|p| {
            if p.version == version {
                outcomes.push_back((p.ticket, RulesOutcome::Superseded { version, winner }));
                false
            } else {
                true
            }
        });
    }

    /// Ends every proposal whose outcome is known at `now`.
    fn settle(&mut self, now: Nanos) {
        let majority = self.cfg.majority();
        let outcomes = &mut self.outcomes;
        self.proposals.retain_mut(|p| {
            let settled = p.waiting.is_empty() || now >= p.deadline;
            if !settled {
                return true;
            }
            let confirmed = std::mem::take(&mut p.confirmed);
            let outcome = if p.waiting.is_empty()
                && p.refused.is_empty()
                && confirmed.len() + 1 >= majority
            {
                RulesOutcome::Confirmed {
                    version: p.version,
                    peers: confirmed,
                }
            } else {
                RulesOutcome::Unconfirmed {
                    version: p.version,
                    confirmed,
                    silent: p.waiting.iter().copied().collect(),
                    refused: std::mem::take(&mut p.refused),
                    majority,
                }
            };
            outcomes.push_back((p.ticket, outcome));
            false
        });
    }
}

#[cfg(test)]
mod tests;
