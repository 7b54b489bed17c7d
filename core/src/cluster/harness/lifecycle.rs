//! What happens to a simulated node's process: SIGSTOP and SIGCONT, a
//! crash and a restart, a join with a slot never used before, a clean
//! leave.

use std::cmp::Reverse;

use super::driven::{slot, Driven};
use super::MemCluster;
use crate::limiter::{Decision, Outcome};

impl MemCluster {
    /// Stops `node` as SIGSTOP does: it runs nothing (no timer, no frame,
    /// no request) and forgets nothing; frames sent to it wait, and its
    /// clock keeps running.
    pub fn pause(&mut self, node: usize) {
        self.nodes[node].paused = true;
    }

    /// Resumes a paused node (SIGCONT): its timers fire late and the
    /// frames that arrived meanwhile are read, in arrival order.
    pub fn resume(&mut self, node: usize) {
        self.nodes[node].paused = false;
        self.sync_clock(node);
        for mut f in std::mem::take(&mut self.nodes[node].held) {
            f.at = self.now;
            self.net.push(Reverse(f));
        }
    }

    /// True while `node` is paused.
    pub fn is_paused(&self, node: usize) -> bool {
        self.nodes[node].paused
    }

    /// False between a crash of `node` and its restart.
    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].up
    }

    /// Stops a node dead: it sends and receives nothing and loses its memory.
    pub fn crash(&mut self, node: usize) {
        self.nodes[node].up = false;
        // Its waiting clients get no answer: they count as refused.
        for (_, (id, provisional)) in std::mem::take(&mut self.nodes[node].waiting) {
            let decision = Decision {
                outcome: Outcome::Denied,
                ..provisional
            };
            self.completed.push((id, node, decision, self.now));
        }
    }

    /// A new node joins (whole-core clusters only): the next slot, never
    /// used before, empty memory, knowing nobody; the transport connects
    /// it to every node it can reach, and membership does the rest.
    /// Returns its index.
    pub fn join(&mut self) -> Result<usize, String> {
        if !self.spec.whole_core {
            return Err("joins need whole-core nodes (membership)".into());
        }
        let node = self.nodes.len();
        if node >= self.spec.nodes + self.spec.spare_slots {
            return Err(format!(
                "no spare slot for a join ({} nodes, {} spare)",
                self.spec.nodes, self.spec.spare_slots
            ));
        }
        let fresh = self.boot_from(slot(node), 1, true, None)?;
        self.nodes.push(fresh);
        self.sync_clock(node);
        for peer in 0..node {
            if self.nodes[peer].up {
                self.connect(slot(node), slot(peer));
            }
        }
        Ok(node)
    }

    /// `node` leaves cleanly (whole-core clusters only), as a drained node
    /// stops: it ships what is pending, tells its peers it is leaving and
    /// exits. Its clients fail over.
    pub fn leave(&mut self, node: usize) {
        let local = self.local_now(node);
        if let Driven::Core(core) = &mut self.nodes[node].repl {
            core.finish(local);
        }
        self.flush(node);
        self.crash(node);
        self.nodes[node].left = true;
    }

    /// Starts a crashed node again: new process, next incarnation, empty
    /// memory, recovering its own slot from its peers before it admits.
    pub fn restart(&mut self, node: usize) -> Result<(), String> {
        self.restart_from(node, None)
    }

    /// As [`MemCluster::restart`], merging `snapshot` before anything else.
    pub fn restart_from(&mut self, node: usize, snapshot: Option<&[u8]>) -> Result<(), String> {
        let incarnation = self.nodes[node].incarnation + 1;
        let skew = self.nodes[node].skew;
        let me = slot(node);
        let mut fresh = self.boot_from(me, incarnation, true, snapshot)?;
        fresh.skew = skew;
        self.nodes[node] = fresh;
        self.sync_clock(node);
        for peer in (0..self.nodes.len()).filter(|&p| p != node).map(slot) {
            self.linked.remove(&(me, peer));
            self.linked.remove(&(peer, me));
        }
        // A starting node dials every peer it knows.
        for peer in 0..self.nodes.len() {
            if peer != node && self.nodes[peer].up {
                self.connect(me, slot(peer));
            }
        }
        Ok(())
    }
}

impl MemCluster {
    /// An operator forgets member `slot` at `node` (whole-core clusters
    /// only; see [`NodeCore::handle_forget`](crate::cluster::node_core::NodeCore::handle_forget)).
    pub fn forget_member(&mut self, node: usize, slot: usize) -> Result<(), String> {
        let local = self.local_now(node);
        let Driven::Core(core) = &mut self.nodes[node].repl else {
            return Err("forgetting needs whole-core nodes (membership)".into());
        };
        let result = core.handle_forget(local, super::driven::slot(slot));
        self.flush(node);
        result.map_err(|e| e.to_string())
    }

    /// The members `node` counts, itself excluded (whole-core clusters;
    /// empty otherwise).
    pub fn members(&self, node: usize) -> Vec<usize> {
        match &self.nodes[node].repl {
            Driven::Core(core) => core.members().iter().map(|s| s.index()).collect(),
            Driven::Replicator(..) => Vec::new(),
        }
    }
}
