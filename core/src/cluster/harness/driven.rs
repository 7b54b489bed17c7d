//! What the harness drives for one node: its replicator and
//! confirmations alone (liveness from the harness's rule), or its whole
//! core, as a real node runs it.

use std::sync::Arc;

use crate::cluster::confirm::{Confirmations, Confirmed, Ticket};
use crate::cluster::node_core::NodeCore;
use crate::cluster::replication::{ReplicationEvent, Replicator};
use crate::limiter::Pending;
use crate::slot::NodeSlot;
use crate::time::{ManualClock, Nanos};

use super::SimLimiter;

/// What the harness drives for one node.
pub(super) enum Driven {
    /// The replicator and the node's confirmations, without the rest of
    /// the core; liveness comes from the harness's rule.
    Replicator(Box<Replicator>, Confirmations),
    /// The node's whole core, as a real node runs it.
    Core(Box<NodeCore<Arc<ManualClock>>>),
}

/// The slot of the simulated node at `node` (nodes hold slots in order).
pub(super) fn slot(node: usize) -> NodeSlot {
    NodeSlot::new(u16::try_from(node).expect("a simulated cluster has fewer than 65,536 nodes"))
}

pub(super) fn node_name(slot: NodeSlot) -> String {
    format!("node-{}", slot.get())
}

/// The address a simulated node's membership knows it by.
pub(super) fn sim_addr(slot: NodeSlot) -> std::net::SocketAddr {
    let [hi, lo] = slot.get().to_be_bytes();
    std::net::SocketAddr::from(([10, 0, hi, lo], 7400))
}

impl Driven {
    pub(super) fn repl(&self) -> &Replicator {
        match self {
            Driven::Replicator(r, _) => r,
            Driven::Core(c) => c.replicator(),
        }
    }
    /// One tick of the node's clock discipline at raw time `raw`.
    pub(super) fn discipline_clock(
        &mut self,
        raw: Nanos,
        sync: &mut crate::cluster::clock_sync::ClockDiscipline,
        limiter: &SimLimiter,
    ) {
        match self {
            Driven::Replicator(r, _) => {
                let status = sync.handle_timeout(raw, r);
                limiter.set_clock_in_bounds(status.in_bounds);
            }
            Driven::Core(c) => {
                c.discipline_clock(raw, sync);
            }
        }
    }
    pub(super) fn ship_now(&mut self, now: Nanos, limiter: &SimLimiter) {
        match self {
            Driven::Replicator(r, _) => r.ship_now(now, limiter),
            Driven::Core(c) => c.handle_wake(now),
        }
    }
    /// A request counted provisionally near its limit: the peers confirm
    /// it, as the node's core does.
    pub(super) fn confirm(&mut self, now: Nanos, pending: Pending, limiter: &SimLimiter) -> Ticket {
        match self {
            Driven::Replicator(r, c) => c.begin(now, pending, r, limiter),
            Driven::Core(core) => core.handle_confirm(now, pending),
        }
    }
    /// After any input: the confirmations whose claims ended are decided.
    pub(super) fn settle(&mut self, now: Nanos, limiter: &SimLimiter) {
        if let Driven::Replicator(r, c) = self {
            c.settle(now, r, limiter);
        }
    }
    pub(super) fn poll_confirmed(&mut self) -> Option<Confirmed> {
        match self {
            Driven::Replicator(_, c) => c.poll_confirmed(),
            Driven::Core(core) => core.poll_confirmed(),
        }
    }
    pub(super) fn peer_connected(&mut self, now: Nanos, slot: NodeSlot, digest: u64) {
        match self {
            Driven::Replicator(r, _) => r.peer_connected(now, slot, digest),
            Driven::Core(c) => c.handle_connected(now, slot, sim_addr(slot)),
        }
    }
    pub(super) fn peer_disconnected(&mut self, slot: NodeSlot) {
        match self {
            Driven::Replicator(r, _) => r.peer_disconnected(slot),
            Driven::Core(c) => c.handle_disconnected(slot),
        }
    }
    /// What the replicator alone reports is the driver's to act on: the
    /// recovery gate opening lets the limiter admit (a whole core does that
    /// itself).
    pub(super) fn drain_events(&mut self, limiter: &SimLimiter) {
        if let Driven::Replicator(r, _) = self {
            while let Some(event) = r.poll_event() {
                match event {
                    ReplicationEvent::Recovered => limiter.set_admitting(true),
                }
            }
        }
    }
    pub(super) fn poll_transmit(&mut self) -> Option<crate::cluster::replication::Transmit> {
        match self {
            Driven::Replicator(r, _) => r.poll_transmit(),
            Driven::Core(c) => {
                // The harness's network is a full mesh: nothing to dial.
                while c.poll_event().is_some() {}
                c.poll_transmit()
            }
        }
    }
    /// The harness's failure-detector verdict (replicator mode only: a
    /// whole core has its own).
    pub(super) fn set_liveness(
        &mut self,
        limiter: &SimLimiter,
        slot: NodeSlot,
        live: bool,
        digest: u64,
    ) {
        if let Driven::Replicator(r, _) = self {
            r.set_liveness(limiter, slot, live, digest);
        }
    }
    pub(super) fn poll_timeout(&self) -> Nanos {
        match self {
            Driven::Replicator(r, _) => r.poll_timeout(),
            Driven::Core(c) => c.poll_timeout(),
        }
    }
    pub(super) fn handle_timeout(&mut self, now: Nanos, limiter: &SimLimiter) {
        match self {
            Driven::Replicator(r, _) => r.handle_timeout(now, limiter),
            Driven::Core(c) => c.handle_timeout(now),
        }
    }
    pub(super) fn handle_frame(
        &mut self,
        now: Nanos,
        from: NodeSlot,
        bytes: &[u8],
        limiter: &SimLimiter,
        digest: u64,
    ) {
        match self {
            Driven::Replicator(r, _) => {
                // Refused frames are counted by the replicator.
                let _ = r.handle_frame(now, from, bytes, limiter, digest);
            }
            Driven::Core(c) => c.handle_frame(now, from, bytes),
        }
    }
}
