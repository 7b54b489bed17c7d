//! Dead links: a connection can stay open while nothing crosses it one way
//! (after a network heals, a QUIC sender may sit in exponential probe
//! back-off for seconds, up to its idle timeout). A peer that this node
//! has not heard from for
//! [`ReplicationConfig::link_silence`](super::ReplicationConfig) while its
//! connection was open is named for the transport to reset: both ends then
//! dial again, and a fresh connection starts with no back-off. Each end
//! watches what it receives, so a link dead in either direction is reset
//! by the end that stopped hearing.
//!
//! Only under fencing: heartbeats then keep every open link busy (a frame
//! at least every quarter of the fence time), so silence on a link means
//! something.

use super::Replicator;
use crate::slot::NodeSlot;
use crate::time::Nanos;

impl Replicator {
    /// Names every connected peer silent on its link for the link silence,
    /// at most once per link silence each; skipped on a late tick (this
    /// node was stopped: its peers only look silent).
    pub(super) fn find_dead_links(&mut self, now: Nanos) {
        if self.cfg.silence.fence_after().is_none() {
            return;
        }
        let silence = self.cfg.link_silence;
        let late = self
            .last_link_check
            .is_some_and(|prev| now.saturating_sub(prev) > Nanos::new(silence.as_u64() / 4));
        self.last_link_check = Some(now);
        if late {
            // Frames and acknowledgements that came meanwhile are still
            // to be read: every link's silence counts from now.
            self.link_quiet_from = Some(now);
            return;
        }
        let quiet = |at: Option<Nanos>| at.is_none_or(|t| now.saturating_sub(t) >= silence);
        let mut dead: Vec<NodeSlot> = Vec::new();
        for (&slot, p) in self.peers.iter_mut() {
            if !p.connected {
                continue;
            }
            // A link gets the whole silence from when it (or its last
            // reset) came up.
            let since = p
                .connected_at
                .max(p.link_reset_at)
                .max(self.link_quiet_from);
            if !quiet(since) {
                continue;
            }
            if quiet(p.last_heard) {
                p.link_reset_at = Some(now);
                dead.push(slot);
            }
        }
        self.stats.links_reset += dead.len() as u64;
        self.links_to_reset.extend(dead);
    }

    /// Peers whose connections the transport should close and dial again
    /// (see the module documentation).
    pub fn take_links_to_reset(&mut self) -> Vec<NodeSlot> {
        std::mem::take(&mut self.links_to_reset)
    }
}
