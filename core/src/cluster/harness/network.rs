//! The simulated network: per-frame latency, jitter, loss and
//! duplication, cut links, and the two failure models (the harness's
//! silence rule for replicator-driven nodes; for whole cores, only the
//! transport's idle timeout, liveness being SWIM's).

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rand::RngExt;

use super::driven::{slot, Driven};
use super::MemCluster;
use crate::slot::NodeSlot;
use crate::time::Nanos;

/// How the network misbehaves.
#[derive(Clone, Debug)]
pub struct NetFaults {
    /// One-way delay of every frame.
    pub latency: Nanos,
    /// Extra random delay, uniform in `[0, jitter)`: reorders frames.
    pub jitter: Nanos,
    /// Probability that an unreliable frame is lost.
    pub loss: f64,
    /// Probability that an unreliable frame arrives twice.
    pub duplicate: f64,
}

impl Default for NetFaults {
    fn default() -> Self {
        NetFaults {
            latency: Nanos::from_micros(200),
            jitter: Nanos::ZERO,
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct InFlight {
    pub(super) at: Nanos,
    seq: u64,
    from: NodeSlot,
    to: NodeSlot,
    bytes: Vec<u8>,
}

impl MemCluster {
    /// Cuts (or heals) both directions between nodes `a` and `b`.
    pub fn set_link(&mut self, a: usize, b: usize, up: bool) {
        self.set_one_way(a, b, up);
        self.set_one_way(b, a, up);
    }

    /// Cuts (or heals) frames from node `from` to node `to` only.
    pub fn set_one_way(&mut self, from: usize, to: usize, up: bool) {
        let link = (slot(from), slot(to));
        if up {
            self.cut.remove(&link);
        } else {
            self.cut.insert(link);
        }
    }

    /// Cuts the nodes of `group` off from everyone else (or heals them).
    pub fn isolate(&mut self, group: &[usize], cut: bool) {
        for &a in group {
            for b in 0..self.nodes.len() {
                if !group.contains(&b) {
                    self.set_link(a, b, !cut);
                }
            }
        }
    }

    pub(super) fn connect(&mut self, a: NodeSlot, b: NodeSlot) {
        self.linked.insert((a, b));
        self.heard.insert((a, b), self.now);
        let digest = self.rules_digest;
        let now = self.local_now(a.index());
        self.nodes[a.index()].repl.peer_connected(now, b, digest);
        self.flush(a.index());
    }

    /// Moves every node's outgoing frames onto the network.
    pub(super) fn flush(&mut self, node: usize) {
        let limiter = self.nodes[node].limiter.clone();
        self.nodes[node].repl.drain_events(&limiter);
        self.finish_claims(node);
        while let Some(t) = self.nodes[node].repl.poll_transmit() {
            let from = slot(node);
            if !self.nodes[node].up || self.nodes[node].paused || self.cut.contains(&(from, t.to)) {
                continue;
            }
            let copies = if t.reliable {
                1
            } else if self.rng.random::<f64>() < self.faults.loss {
                0
            } else if self.rng.random::<f64>() < self.faults.duplicate {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let jitter = if self.faults.jitter > Nanos::ZERO && !t.reliable {
                    Nanos::new(self.rng.random_range(0..self.faults.jitter.as_u64()))
                } else {
                    Nanos::ZERO
                };
                self.seq += 1;
                self.bytes_on_wire += t.bytes.len() as u64;
                self.frames_on_wire += 1;
                self.net.push(Reverse(InFlight {
                    at: self.now + self.faults.latency + jitter,
                    seq: self.seq,
                    from,
                    to: t.to,
                    bytes: t.bytes.clone(),
                }));
            }
        }
    }

    /// Runs the cluster for `dt` of reference time: every delivery and sync
    /// tick in time order.
    pub fn advance(&mut self, dt: Nanos) {
        let until = self.now + dt;
        loop {
            let next_frame = self.net.peek().map(|r| r.0.at);
            let next_tick = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].up && !self.nodes[i].paused)
                .map(|i| {
                    let local = self.nodes[i].repl.poll_timeout();
                    // Convert the node's local deadline to reference time.
                    Nanos::new((local.as_u64() as i64 - self.local_offset(i)).max(0) as u64)
                })
                .min();
            let next = match (next_frame, next_tick) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(until),
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_frame == Some(next) {
                let Some(Reverse(f)) = self.net.pop() else {
                    break;
                };
                self.deliver(f);
            } else {
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].up || self.nodes[i].paused {
                        continue;
                    }
                    let local = self.local_now(i);
                    if self.nodes[i].repl.poll_timeout() <= local {
                        self.discipline_clock(i);
                        self.sync_clock(i);
                        let limiter = self.nodes[i].limiter.clone();
                        self.nodes[i].repl.handle_timeout(local, &limiter);
                        self.flush(i);
                    }
                }
                self.detect_failures();
            }
        }
        self.now = until;
        for i in 0..self.nodes.len() {
            self.sync_clock(i);
        }
    }

    fn deliver(&mut self, f: InFlight) {
        let to = f.to.index();
        let from = &self.nodes[f.from.index()];
        if !self.nodes[to].up || !(from.up || from.left) || self.cut.contains(&(f.from, f.to)) {
            return;
        }
        if self.nodes[to].paused {
            // The socket buffers it; the process reads it on resume.
            self.nodes[to].held.push(f);
            return;
        }
        if !self.linked.contains(&(f.to, f.from)) {
            // First contact since a restart or a heal: the transport would
            // report a new connection.
            self.connect(f.to, f.from);
        }
        self.heard.insert((f.to, f.from), self.now);
        let local = self.local_now(to);
        self.sync_clock(to);
        let limiter = self.nodes[to].limiter.clone();
        let digest = self.rules_digest;
        self.nodes[to]
            .repl
            .handle_frame(local, f.from, &f.bytes, &limiter, digest);
        self.flush(to);
    }

    /// For a node driven through its whole core, the harness plays only the
    /// transport: a connection to a peer that cannot be reached for
    /// `detect_after` (the idle timeout) is lost, and one to a peer that
    /// can be reached again is redialled. Liveness is SWIM's business.
    fn transport_model(&mut self, a: usize) {
        for b in 0..self.nodes.len() {
            if a == b {
                continue;
            }
            let key = (slot(a), slot(b));
            let last = self.heard.get(&key).copied().unwrap_or(self.spec.start);
            let silent = self.now.saturating_sub(last) >= self.spec.detect_after;
            if silent && self.linked.remove(&key) {
                self.nodes[a].repl.peer_disconnected(key.1);
            } else if !silent && !self.linked.contains(&key) {
                self.connect(key.0, key.1);
            }
        }
    }

    /// The failure-detector model: a peer that cannot be reached (down, or
    /// its link to the observer cut) for `detect_after` is dead; one that
    /// can be reached again is alive. A real node's SWIM probes keep idle
    /// peers alive the same way, traffic or not.
    fn detect_failures(&mut self) {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b
                    && self.nodes[b].up
                    && !self.nodes[b].paused
                    && !self.cut.contains(&(slot(b), slot(a)))
                {
                    self.heard.insert((slot(a), slot(b)), self.now);
                }
            }
        }
        for a in 0..self.nodes.len() {
            if !self.nodes[a].up || self.nodes[a].paused {
                continue;
            }
            if matches!(self.nodes[a].repl, Driven::Core(_)) {
                self.transport_model(a);
                continue;
            }
            let mut dead = BTreeSet::new();
            for b in 0..self.nodes.len() {
                if a == b {
                    continue;
                }
                let key = (slot(a), slot(b));
                let last = self.heard.get(&key).copied().unwrap_or(self.spec.start);
                let silent = self.now.saturating_sub(last) >= self.spec.detect_after;
                let was_live = self.nodes[a]
                    .repl
                    .repl()
                    .peers()
                    .get(&key.1)
                    .is_some_and(|p| p.live);
                if silent {
                    dead.insert(key.1);
                    if was_live {
                        let limiter = self.nodes[a].limiter.clone();
                        let digest = self.rules_digest;
                        self.nodes[a]
                            .repl
                            .set_liveness(&limiter, key.1, false, digest);
                        self.nodes[a].repl.peer_disconnected(key.1);
                        self.linked.remove(&key);
                    }
                } else if !was_live {
                    let limiter = self.nodes[a].limiter.clone();
                    let digest = self.rules_digest;
                    self.nodes[a]
                        .repl
                        .set_liveness(&limiter, key.1, true, digest);
                    self.flush(a);
                    if !self.linked.contains(&key) {
                        self.connect(key.0, key.1);
                    }
                }
                // Keep probing a silent peer, as a transport reconnects.
                if silent
                    && self.now.as_u64() % (self.spec.detect_after.as_u64() / 4).max(1)
                        < self.spec.sync_interval.as_u64()
                {
                    let (local, digest) = (self.local_now(a), self.rules_digest);
                    self.nodes[a].repl.peer_connected(local, key.1, digest);
                    self.flush(a);
                }
            }
            let view = self
                .view(slot(a), &dead)
                .confirming_all(self.nodes[a].repl.repl().confirm_all(self.local_now(a)));
            if self.nodes[a].limiter.share_view().as_deref() != Some(&view) {
                self.nodes[a].limiter.set_share_view(view);
            }
        }
    }
}
