//! Convergence probes: how long until nodes count what another node counted.
//!
//! A probe is a set of targets "node `n` holds at least `p` hits of slot `s`
//! in bucket `e` of key `k`", read from the node's own key table (its merged
//! view). The runner polls open probes on virtual time; a probe converges
//! when its last target is met. Targets on a node that is down are dropped
//! (only live nodes must count), and a target whose bucket has left the
//! node's window meanwhile is dropped too, flagging the probe as *expired*
//! (it never converged within the window, so its time is not a convergence
//! time).

use drl_core::cluster::harness::MemCluster;
use drl_core::time::{Clock, Nanos};
use drl_core::window::SlotGrid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// One admission, until every other live node counts it.
    Write,
    /// One key after a partition heals, until every node counts every
    /// other node's hits as of the heal.
    Heal,
    /// One key after a restart, until the restarted node counts every
    /// slot (its own included) as the cluster knew it at the restart.
    Restart,
}

#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub node: usize,
    pub key: u64,
    pub slot: usize,
    pub epoch: u64,
    pub p: u32,
}

#[derive(Clone, Debug)]
pub struct Probe {
    pub kind: ProbeKind,
    pub started: Nanos,
    pub targets: Vec<Target>,
    pub done: Option<Nanos>,
    pub expired: bool,
}

enum Seen {
    Met,
    NotYet,
    Gone,
}

/// The value of `slot` in bucket `epoch` of `key` as `node` sees it.
pub fn read_slot(c: &MemCluster, node: usize, key: u64, slot: usize, epoch: u64) -> Option<u32> {
    let lim = c.limiter(node);
    let table = lim.table(0)?;
    let spec = *table.spec();
    let now_epoch = spec.epoch(lim.clock().now());
    let entry = table.get(drl_core::key::KeyDigest(key))?;
    let newest = entry.newest(now_epoch);
    let b = spec.buckets() as u64;
    (epoch <= newest && newest - epoch < b).then(|| entry.get((epoch % b) as usize, slot).p)
}

/// Every live bucket of `slot` of `key` as `node` sees it: `(epoch, p)`.
pub fn live_values(c: &MemCluster, node: usize, key: u64, slot: usize) -> Vec<(u64, u32)> {
    let lim = c.limiter(node);
    let Some(table) = lim.table(0) else {
        return Vec::new();
    };
    let spec = *table.spec();
    let now_epoch = spec.epoch(lim.clock().now());
    let Some(entry) = table.get(drl_core::key::KeyDigest(key)) else {
        return Vec::new();
    };
    let newest = entry.newest(now_epoch);
    let b = spec.buckets() as u64;
    (newest.saturating_sub(b - 1)..=newest)
        .filter(|&e| newest - e < b && e + b > now_epoch)
        .map(|e| (e, entry.get((e % b) as usize, slot).p))
        .filter(|&(_, p)| p > 0)
        .collect()
}

fn seen(c: &MemCluster, t: &Target) -> Seen {
    if !c.is_up(t.node) {
        return Seen::Gone;
    }
    let lim = c.limiter(t.node);
    let Some(table) = lim.table(0) else {
        return Seen::Gone;
    };
    let spec = *table.spec();
    let now_epoch = spec.epoch(lim.clock().now());
    if t.epoch + spec.buckets() as u64 <= now_epoch {
        return Seen::Gone;
    }
    match read_slot(c, t.node, t.key, t.slot, t.epoch) {
        Some(p) if p >= t.p => Seen::Met,
        _ => Seen::NotYet,
    }
}

impl Probe {
    pub fn new(kind: ProbeKind, started: Nanos, targets: Vec<Target>) -> Self {
        Probe {
            kind,
            started,
            targets,
            done: None,
            expired: false,
        }
    }

    /// Checks the open targets; true once the probe is finished.
    pub fn poll(&mut self, c: &MemCluster, now: Nanos) -> bool {
        if self.done.is_some() {
            return true;
        }
        let mut expired = false;
        self.targets.retain(|t| match seen(c, t) {
            Seen::Met => false,
            Seen::NotYet => true,
            Seen::Gone => {
                // A down node need not count; an expired bucket never will.
                expired |= c.is_up(t.node);
                false
            }
        });
        self.expired |= expired;
        if self.targets.is_empty() {
            self.done = Some(now);
        }
        self.done.is_some()
    }

    /// Time to converge, if it did within the window.
    pub fn latency(&self) -> Option<Nanos> {
        match (self.done, self.expired) {
            (Some(d), false) => Some(d - self.started),
            _ => None,
        }
    }
}
