//! The node core's side of the rules register: changes made here (checked,
//! put in force, proposed to the peers), rules offered by peers (weighed,
//! adopted, answered), and the outcomes of this node's proposals.

use super::{CoreEvent, NodeCore};
use crate::cluster::replication::Transmit;
use crate::cluster::rules_register::{RulesOutcome, RulesTicket, RulesVersion, Weighed};
use crate::limiter::SetupError;
use crate::rules::{RuleSet, RulesError};
use crate::slot::NodeSlot;
use crate::time::Clock;
use crate::wire::{Frame, RulesAck, RulesFrame, MAX_RULES_BYTES};

/// Why new rules were refused. The rules in force stay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutRulesError {
    /// The text is not a valid rule file (line, column and field path).
    #[error(transparent)]
    Invalid(#[from] RulesError),
    /// The rules are valid but the limiter cannot hold them (a key table
    /// too large for its limit, say).
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("rules text of {0} bytes exceeds the {max}-byte limit", max = MAX_RULES_BYTES)]
    /// The rules text is longer than [`MAX_RULES_BYTES`].
    TooLarge(usize),
    /// The change was made against a version that is no longer in force
    /// (`If-Match`).
    #[error(
        "the rules in force are version {current}, not the version the change was made against"
    )]
    Stale {
        /// The version in force.
        current: RulesVersion,
    },
    /// This node sees too few live peers for a change to reach a majority.
    #[error("this node sees {live} of {size} nodes alive; a rules change needs {majority}")]
    NoQuorum {
        /// Nodes alive, this one included.
        live: usize,
        /// Nodes in the cluster.
        size: usize,
        /// Nodes a change needs.
        majority: usize,
    },
    #[error("the node is shutting down")]
    /// The node is stopping and takes no new rules.
    Stopped,
    /// The rules could not be kept on disk; they were not put in force.
    #[error("rules not kept on disk: {0}")]
    NotPersisted(String),
}

/// Rules checked by [`NodeCore::prepare_rules`], not yet in force.
pub struct PreparedRules {
    pub(super) rules: RuleSet,
    pub(super) text: String,
    pub(super) version: RulesVersion,
}

impl PreparedRules {
    /// The version these rules will carry once committed.
    pub fn version(&self) -> RulesVersion {
        self.version
    }
    /// The rules file's text.
    pub fn text(&self) -> &str {
        &self.text
    }
    /// The parsed rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }
}

fn prepare(rules: RuleSet, version: RulesVersion) -> Result<PreparedRules, PutRulesError> {
    let text = rules.source().to_owned();
    if text.len() > MAX_RULES_BYTES {
        return Err(PutRulesError::TooLarge(text.len()));
    }
    Ok(PreparedRules {
        rules,
        text,
        version,
    })
}

impl<C: Clock> NodeCore<C> {
    /// Takes parsed `rules` as the next version of the rules from this
    /// node. Refused when their text is too large to replicate, or when
    /// `expected` is given and is not the version in force. The driver
    /// keeps them on disk, then calls [`NodeCore::commit_rules`].
    pub fn prepare_rules(
        &self,
        rules: RuleSet,
        expected: Option<RulesVersion>,
    ) -> Result<PreparedRules, PutRulesError> {
        let current = self.register.version();
        if expected.is_some_and(|e| e != current) {
            return Err(PutRulesError::Stale { current });
        }
        let version = self.register.next_version(rules.source());
        prepare(rules, version)
    }

    /// Refuses a change this node could not get confirmed: it sees fewer
    /// live or connected nodes (itself included) than a majority of the
    /// cluster.
    pub fn check_quorum(&self) -> Result<(), PutRulesError> {
        let live = self.rules_audience().len() + 1;
        let majority = self.register.config().majority();
        if live < majority {
            return Err(PutRulesError::NoQuorum {
                live,
                size: self.register.config().cluster_size,
                majority,
            });
        }
        Ok(())
    }

    /// Puts prepared rules in force here and proposes them to every live
    /// peer; the proposal's outcome comes out of
    /// [`NodeCore::poll_rules_outcome`] under the returned ticket. Refused
    /// (nothing changes) when the limiter cannot hold them, or when rules
    /// that win over them arrived since they were prepared.
    pub fn commit_rules(&mut self, prepared: PreparedRules) -> Result<RulesTicket, PutRulesError> {
        let now = self.now;
        let version = prepared.version;
        if version <= self.register.version() {
            return Err(PutRulesError::Stale {
                current: self.register.version(),
            });
        }
        let result = self.put_in_force(prepared);
        let audience = self.rules_audience();
        let ticket = result.map(|()| self.register.propose(now, &audience));
        self.after_input();
        ticket
    }

    /// A proposal of this node that ended; drain after every `handle_*`.
    pub fn poll_rules_outcome(&mut self) -> Option<(RulesTicket, RulesOutcome)> {
        self.register.poll_outcome()
    }

    /// Whether `text` is already the rules in force.
    pub fn runs(&self, text: &str) -> bool {
        self.register.text() == text
    }

    /// The peers a change made here waits for: those the membership holds
    /// alive, and those connected that it has not declared alive yet (a
    /// node that has just joined), so that no node this one can reach is
    /// left out of a confirmation.
    fn rules_audience(&self) -> std::collections::BTreeSet<NodeSlot> {
        let connected = self
            .repl
            .peers()
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(&s, _)| s);
        self.live.iter().copied().chain(connected).collect()
    }

    pub(super) fn rules_digest(&self) -> u64 {
        self.register.version().digest
    }

    fn rules_frame(&self) -> Vec<u8> {
        let v = self.register.version();
        Frame::Rules(RulesFrame {
            version: v.counter,
            origin: v.origin,
            text: self.register.text().to_owned(),
        })
        .encode()
    }

    /// The rules in force, to `slot`.
    pub(super) fn send_rules(&mut self, slot: NodeSlot) {
        let bytes = self.rules_frame();
        self.outbox.push_back(Transmit {
            to: slot,
            bytes,
            reliable: true,
        });
    }

    fn put_in_force(&mut self, p: PreparedRules) -> Result<(), PutRulesError> {
        self.limiter.replace_rules(p.rules)?;
        self.register.adopt(p.version, p.text.clone());
        // Flooding: a node that adopts newer rules forwards them once, so
        // they reach nodes the origin cannot.
        let frame = self.rules_frame();
        for (&slot, peer) in self.repl.peers() {
            if peer.connected {
                self.outbox.push_back(Transmit {
                    to: slot,
                    bytes: frame.clone(),
                    reliable: true,
                });
            }
        }
        tracing::info!(version = %p.version, "rules in force");
        self.events.push_back(CoreEvent::RulesInForce {
            version: p.version,
            text: p.text,
        });
        Ok(())
    }

    /// Rules offered by `from`: put in force if they win over ours, and
    /// answered in every case with the version in force after them.
    pub(super) fn on_peer_rules(&mut self, from: NodeSlot, r: RulesFrame) {
        let (weighed, offered) = self.register.weigh(r.version, r.origin, &r.text);
        if weighed == Weighed::Newer {
            let prepared = RuleSet::from_toml(&r.text)
                .map_err(PutRulesError::from)
                .and_then(|rules| prepare(rules, offered));
            if let Err(e) = prepared.and_then(|p| self.put_in_force(p)) {
                tracing::warn!(version = %offered, error = %e, "rules from a peer refused");
            }
        }
        let ack = Frame::RulesAck(RulesAck {
            offered: offered.into(),
            current: self.register.version().into(),
        });
        self.outbox.push_back(Transmit {
            to: from,
            bytes: ack.encode(),
            reliable: true,
        });
    }
}
