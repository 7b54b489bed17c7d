//! A deterministic in-memory cluster: real limiters and replicators on
//! virtual time, joined by a network that loses, duplicates, delays,
//! reorders and partitions frames as told.
//!
//! This is the sans-IO core driven directly: the same decision, share and
//! replication code a node runs, with the QUIC transport replaced by a queue
//! and the failure detector by a rule (a peer unheard from for
//! `detect_after` is declared dead). With `ClusterSpec::whole_core` each
//! node runs its whole `NodeCore` instead, as a real node does: real SWIM
//! decides liveness, rules replicate, and the harness plays only the
//! transport. Everything random comes from seeded generators, so a run is
//! replayed exactly from its seed. Tests use it, and
//! so does the simulation harness.

mod driven;
mod lifecycle;
mod network;
mod pause;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use driven::{node_name, sim_addr, slot, Driven};
use network::InFlight;
pub use network::NetFaults;
pub use pause::{PauseFigures, PauseRun};

use crate::cluster::confirm::{Confirmations, Ticket};
use crate::cluster::node_core::{CoreConfig, NodeCore, RulesVersion, DEFAULT_FORGET_AFTER};
use crate::cluster::replication::{ReplicationConfig, Replicator, SilencePolicy};
use crate::descriptor::Descriptors;
use crate::limiter::{Begun, Check, CheckError, Decision, Limiter, LimiterConfig};
use crate::peer_set::PeerSet;
use crate::rules::RuleSet;
use crate::share::{SharePolicy, ShareView};
use crate::slot::NodeSlot;
use crate::time::{ManualClock, Nanos};

/// Settings of a simulated cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// How many nodes: slots `0..nodes`.
    pub nodes: usize,
    /// The rules file (TOML) every node starts with.
    pub rules: String,
    /// How a limit is shared while peers cannot be reached.
    pub policy: SharePolicy,
    /// How often deltas are shipped.
    pub sync_interval: Nanos,
    /// In-flight budget per limit, in millionths of the limit.
    pub inflight_ppm: u32,
    /// A peer unheard from this long is declared dead.
    pub detect_after: Nanos,
    /// Most keys tracked per limit, per node.
    pub max_keys: usize,
    /// Seed of every random choice (network faults, membership), so that a
    /// run can be replayed.
    pub seed: u64,
    /// Reference time at the start (Unix epoch ns).
    pub start: Nanos,
    /// How long a restarted node waits for every peer's answer before a
    /// majority's is enough (it never opens on time alone).
    pub recovery_timeout: Nanos,
    /// Near a limit, confirm provisional hits with the peers (the design in
    /// force) rather than refuse them for an acknowledgement wait (the
    /// earlier design, kept for comparison).
    pub confirm: bool,
    /// Drive every node through its whole [`NodeCore`] (real SWIM
    /// membership and rules replication, as a node runs it) instead of the
    /// replicator with the harness's silence rule for failures.
    pub whole_core: bool,
    /// When a node stops waiting for a silent peer.
    pub silence: SilencePolicy,
    /// The longest a confirmation waits on a silent peer.
    pub confirm_timeout: Nanos,
    /// Slots for nodes that join later ([`MemCluster::join`]): every
    /// node's table holds `nodes + spare_slots` slots.
    pub spare_slots: usize,
    /// Steer every node's clock toward the cluster's and close a node's
    /// clock gate beyond this offset (`cluster::clock_sync`); `None` leaves
    /// every clock as it is (the earlier design, kept for comparison).
    pub max_clock_offset: Option<Nanos>,
    /// Each node's raw clock minus the reference clock from its boot on,
    /// in ns (missing entries: zero): a node that starts with a wrong
    /// clock, rather than one whose clock steps while it runs
    /// ([`MemCluster::set_skew`]).
    pub clock_offsets: Vec<i64>,
}

impl ClusterSpec {
    /// `nodes` nodes on `rules`: strict sharing, 5 ms sync, 2% in-flight,
    /// confirmation on, replicators only (not whole cores).
    pub fn new(nodes: usize, rules: &str, seed: u64) -> Self {
        ClusterSpec {
            nodes,
            rules: rules.to_owned(),
            policy: SharePolicy::Strict,
            sync_interval: Nanos::from_millis(5),
            inflight_ppm: 20_000,
            detect_after: Nanos::from_millis(1500),
            max_keys: 1 << 16,
            seed,
            start: Nanos::from_secs(1_700_000_000),
            recovery_timeout: Nanos::from_secs(3),
            confirm: true,
            whole_core: false,
            silence: SilencePolicy::DEFAULT,
            confirm_timeout: Nanos::from_millis(5),
            max_clock_offset: Some(crate::cluster::clock_sync::DEFAULT_MAX_CLOCK_OFFSET),
            clock_offsets: Vec::new(),
            spare_slots: 0,
        }
    }
}

type SimLimiter = Limiter<Arc<ManualClock>>;

struct SimNode {
    limiter: Arc<SimLimiter>,
    /// Set by the limiter when a key's in-flight share is spent.
    wake: Arc<std::sync::atomic::AtomicBool>,
    repl: Driven,
    clock: Arc<ManualClock>,
    /// This node's raw clock minus the reference clock, in ns.
    skew: i64,
    /// Steers the node's clock correction (when clocks are corrected).
    clock_sync: crate::cluster::clock_sync::ClockDiscipline,
    up: bool,
    /// Stopped (SIGSTOP): runs nothing, loses nothing; frames for it wait.
    paused: bool,
    /// Frames that arrived while paused, read when it resumes.
    held: Vec<InFlight>,
    /// Left the cluster cleanly: down, but what it sent before is still
    /// delivered.
    left: bool,
    incarnation: u64,
    /// Requests waiting for their confirmation: ticket → request id and
    /// what it would be answered if admitted.
    waiting: BTreeMap<Ticket, (u64, Decision)>,
}

/// What became of a submitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Decided at once.
    Done(Decision),
    /// Waiting for the peers' answers; its decision comes out of
    /// [`MemCluster::take_completed`] under this id.
    Waiting(u64),
}

/// A cluster of simulated nodes.
pub struct MemCluster {
    spec: ClusterSpec,
    rules_digest: u64,
    now: Nanos,
    nodes: Vec<SimNode>,
    net: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: StdRng,
    /// Faults applied to every frame sent from now on.
    pub faults: NetFaults,
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeSlot, NodeSlot)>,
    /// `(observer, peer)` → when the observer last heard from the peer.
    heard: BTreeMap<(NodeSlot, NodeSlot), Nanos>,
    /// `(observer, peer)` pairs currently believed connected.
    linked: BTreeSet<(NodeSlot, NodeSlot)>,
    /// Bytes carried between nodes, by kind of traffic.
    pub bytes_on_wire: u64,
    /// Frames carried between nodes.
    pub frames_on_wire: u64,
    next_request: u64,
    /// Requests decided after waiting: (id, node, decision, when).
    completed: Vec<(u64, usize, Decision, Nanos)>,
}

impl MemCluster {
    /// Builds the cluster at `spec.start`, every node up. Errors if the
    /// rules do not parse or a limiter cannot hold them.
    pub fn new(spec: ClusterSpec) -> Result<Self, String> {
        let rules = RuleSet::from_toml(&spec.rules).map_err(|e| e.to_string())?;
        let rules_digest = rules.digest();
        let mut c = MemCluster {
            now: spec.start,
            rng: StdRng::seed_from_u64(spec.seed),
            rules_digest,
            nodes: Vec::new(),
            net: BinaryHeap::new(),
            seq: 0,
            faults: NetFaults::default(),
            cut: BTreeSet::new(),
            heard: BTreeMap::new(),
            linked: BTreeSet::new(),
            bytes_on_wire: 0,
            frames_on_wire: 0,
            next_request: 0,
            completed: Vec::new(),
            spec,
        };
        for node in 0..c.spec.nodes {
            let node = c.boot(slot(node), 1, false)?;
            c.nodes.push(node);
        }
        for a in 0..c.spec.nodes {
            for b in 0..c.spec.nodes {
                if a != b {
                    c.connect(slot(a), slot(b));
                }
            }
        }
        Ok(c)
    }

    fn boot(
        &mut self,
        slot: NodeSlot,
        incarnation: u64,
        recovering: bool,
    ) -> Result<SimNode, String> {
        self.boot_from(slot, incarnation, recovering, None)
    }

    fn boot_from(
        &mut self,
        slot: NodeSlot,
        incarnation: u64,
        recovering: bool,
        snapshot: Option<&[u8]>,
    ) -> Result<SimNode, String> {
        // The first nodes know each other from the start; a later one
        // (a join) knows nobody until it is connected.
        let founders = slot.index() < self.spec.nodes;
        let members: BTreeSet<NodeSlot> = if founders {
            (0..self.spec.nodes as u16)
                .map(NodeSlot::new)
                .filter(|&s| s != slot)
                .collect()
        } else {
            BTreeSet::new()
        };
        let rules = RuleSet::from_toml(&self.spec.rules).map_err(|e| e.to_string())?;
        let local = Nanos::new((self.now.as_u64() as i64 + self.skew_of(slot)).max(0) as u64);
        let clock = Arc::new(ManualClock::new(local));
        let config = LimiterConfig {
            own_slot: slot,
            slots: self.spec.nodes + self.spec.spare_slots,
            max_keys: self.spec.max_keys,
            ..LimiterConfig::default()
        };
        let limiter = Limiter::with_clock(rules, config, clock.clone())
            .and_then(|l| l.clustered(self.view(slot, &BTreeSet::new())))
            .map_err(|e| e.to_string())?;
        limiter.set_admitting(!recovering);
        if let Some(bytes) = snapshot {
            crate::cluster::snapshot::restore(&limiter, local, bytes).map_err(|e| e.to_string())?;
        }
        let wake = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = wake.clone();
        limiter.set_wake(move || flag.store(true, std::sync::atomic::Ordering::Relaxed));
        let mut rc = ReplicationConfig::new(slot, node_name(slot));
        rc.sync_interval = self.spec.sync_interval;
        rc.policy = self.spec.policy;
        rc.expected_peers = self.spec.nodes - 1;
        rc.recovery_timeout = self.spec.recovery_timeout;
        rc.snapshot_restored = snapshot.is_some();
        rc.silence = self.spec.silence;
        rc.confirm_timeout = self.spec.confirm_timeout;
        limiter.set_confirm_hold(rc.claim_timeout * 2);
        let limiter = Arc::new(limiter);
        let repl = if self.spec.whole_core {
            let cfg = CoreConfig {
                name: node_name(slot),
                slot,
                alone_after: founders.then_some(Nanos::ZERO),
                members: members.clone(),
                forget_after: DEFAULT_FORGET_AFTER,
                policy: self.spec.policy,
                inflight_ppm: self.spec.inflight_ppm,
                sync_interval: self.spec.sync_interval,
                recovery_timeout: self.spec.recovery_timeout,
                snapshot_restored: snapshot.is_some(),
                incarnation,
                peer_addr: sim_addr(slot),
                recovering,
                confirm_timeout: self.spec.confirm_timeout,
                silence: self.spec.silence,
            };
            let mut core = NodeCore::new(
                cfg,
                limiter.clone(),
                self.spec.rules.clone(),
                RulesVersion::new(0, 0, self.rules_digest),
                local,
            );
            for &peer in &members {
                core.add_peer(peer);
            }
            Driven::Core(Box::new(core))
        } else {
            let mut repl = Replicator::new(rc, incarnation, recovering, local);
            for peer in 0..self.spec.nodes {
                repl.add_peer(self::slot(peer));
            }
            Driven::Replicator(Box::new(repl), Confirmations::new())
        };
        Ok(SimNode {
            limiter,
            wake,
            repl,
            clock,
            skew: self.skew_of(slot),
            clock_sync: crate::cluster::clock_sync::ClockDiscipline::new(
                crate::corrected::ClockCorrection::new(),
                self.spec.max_clock_offset.unwrap_or(Nanos::MAX),
            ),
            up: true,
            paused: false,
            held: Vec::new(),
            left: false,
            incarnation,
            waiting: BTreeMap::new(),
        })
    }

    fn view(&self, own: NodeSlot, dead: &BTreeSet<NodeSlot>) -> ShareView {
        let members = PeerSet::first(self.spec.nodes);
        let live = members.difference(&dead.iter().copied().collect());
        let minority = live.len() * 2 <= self.spec.nodes && self.spec.nodes > 1;
        ShareView::for_cluster(
            own.get(),
            members,
            &live,
            minority,
            self.spec.policy,
            self.spec.inflight_ppm,
            self.spec.sync_interval * 2,
        )
    }

    /// The reference time.
    pub fn now(&self) -> Nanos {
        self.now
    }
    /// How many nodes the cluster has, up or not.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    /// The limiter of `node`.
    pub fn limiter(&self, node: usize) -> &SimLimiter {
        &self.nodes[node].limiter
    }
    /// The replicator of `node`.
    pub fn replicator(&self, node: usize) -> &Replicator {
        self.nodes[node].repl.repl()
    }
    /// Puts `text` in force through `node` as an operator would (whole-core
    /// clusters only: the replicator alone has no rules register, and a
    /// call on another cluster panics).
    pub fn put_rules(
        &mut self,
        node: usize,
        text: &str,
    ) -> Result<crate::cluster::node_core::RulesVersion, crate::cluster::node_core::PutRulesError>
    {
        let Driven::Core(core) = &mut self.nodes[node].repl else {
            panic!("only whole-core clusters replicate rules");
        };
        let rules = RuleSet::from_toml(text)?;
        let prepared = core.prepare_rules(rules, None)?;
        let version = prepared.version();
        // The harness does not wait for the outcome: tests read the
        // versions in force instead.
        core.commit_rules(prepared)?;
        self.flush(node);
        Ok(version)
    }

    /// The version of the rules in force at `node` (whole-core clusters).
    pub fn rules_version(&self, node: usize) -> Option<crate::cluster::node_core::RulesVersion> {
        match &self.nodes[node].repl {
            Driven::Core(core) => Some(core.rules_version()),
            Driven::Replicator(..) => None,
        }
    }

    /// Sets a node's clock offset from the reference clock.
    pub fn set_skew(&mut self, node: usize, skew_ns: i64) {
        self.nodes[node].skew = skew_ns;
        self.sync_clock(node);
    }

    fn skew_of(&self, slot: NodeSlot) -> i64 {
        self.nodes.get(slot.index()).map_or_else(
            || {
                self.spec
                    .clock_offsets
                    .get(slot.index())
                    .copied()
                    .unwrap_or(0)
            },
            |n| n.skew,
        )
    }

    fn raw_now(&self, node: usize) -> Nanos {
        Nanos::new((self.now.as_u64() as i64 + self.nodes[node].skew).max(0) as u64)
    }

    /// The node's clock as it decides by: its raw clock, corrected.
    fn local_now(&self, node: usize) -> Nanos {
        let raw = self.raw_now(node);
        self.nodes[node].clock_sync.correction().corrected(raw)
    }

    /// The node's clock minus the reference clock now, in ns (skew and
    /// correction), to convert its times to reference time.
    fn local_offset(&self, node: usize) -> i64 {
        let raw = self.raw_now(node);
        self.nodes[node]
            .skew
            .saturating_add(self.nodes[node].clock_sync.correction().offset_at(raw))
    }

    /// One tick of the node's clock discipline (when clocks are corrected).
    fn discipline_clock(&mut self, node: usize) {
        if self.spec.max_clock_offset.is_none() {
            return;
        }
        let raw = self.raw_now(node);
        let n = &mut self.nodes[node];
        n.repl.discipline_clock(raw, &mut n.clock_sync, &n.limiter);
    }

    /// Where `node`'s clock stands against the cluster's.
    pub fn clock_status(&self, node: usize) -> crate::cluster::clock_sync::ClockStatus {
        self.nodes[node].clock_sync.status()
    }

    fn sync_clock(&self, node: usize) {
        self.nodes[node].clock.set(self.local_now(node));
    }

    /// A request at `node` now, answered as a client would see it: a
    /// request that needs its peers' confirmation runs the cluster until
    /// they answer (a round trip), so time moves on.
    pub fn check(
        &mut self,
        node: usize,
        fields: &[(&str, &str)],
        cost: u32,
    ) -> Result<Decision, CheckError> {
        match self.submit(node, fields, cost)? {
            Submitted::Done(d) => Ok(d),
            Submitted::Waiting(id) => loop {
                if let Some(i) = self.completed.iter().position(|c| c.0 == id) {
                    return Ok(self.completed.remove(i).2);
                }
                self.advance(Nanos::from_micros(50));
            },
        }
    }

    /// A request at `node` now, without waiting: decided at once, or
    /// waiting for its claim's answers (see [`MemCluster::take_completed`]).
    pub fn submit(
        &mut self,
        node: usize,
        fields: &[(&str, &str)],
        cost: u32,
    ) -> Result<Submitted, CheckError> {
        self.submit_all(node, &[(fields, cost)])
    }

    /// A request of several checks (descriptor fields and cost each) at
    /// `node` now, decided together as `Limiter::begin_at` decides them;
    /// its decision is the request's (allowed only if every check is).
    pub fn submit_all(
        &mut self,
        node: usize,
        checks: &[(&[(&str, &str)], u32)],
    ) -> Result<Submitted, CheckError> {
        if !self.nodes[node].up || self.nodes[node].paused {
            return Err(CheckError::Recovering);
        }
        let checks = checks
            .iter()
            .map(|&(fields, cost)| Ok(Check::new(Descriptors::new(fields)?, cost)))
            .collect::<Result<Vec<_>, CheckError>>()?;
        self.sync_clock(node);
        let local = self.local_now(node);
        let limiter = self.nodes[node].limiter.clone();
        let outcome = if self.spec.confirm {
            limiter.begin_at(local, &checks)?
        } else {
            Begun::Decided(limiter.check_all_at(local, &checks)?)
        };
        if self.nodes[node]
            .wake
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // The node ships at once, as its driver would.
            self.nodes[node].repl.ship_now(local, &limiter);
            self.flush(node);
        }
        match outcome {
            Begun::Decided(decided) => Ok(Submitted::Done(decided.decision())),
            Begun::Confirm(pending) => {
                let id = self.next_request;
                self.next_request += 1;
                let provisional = pending.provisional.decision();
                let ticket = self.nodes[node].repl.confirm(local, *pending, &limiter);
                self.nodes[node].waiting.insert(ticket, (id, provisional));
                self.flush(node);
                Ok(Submitted::Waiting(id))
            }
        }
    }

    /// Requests decided after waiting since the last call: `(id, node,
    /// decision, when it was judged and counted, on the reference clock)`.
    pub fn take_completed(&mut self) -> Vec<(u64, usize, Decision, Nanos)> {
        std::mem::take(&mut self.completed)
    }

    /// Requests still waiting for answers, over all nodes.
    pub fn waiting(&self) -> usize {
        self.nodes.iter().map(|n| n.waiting.len()).sum()
    }

    /// Hands the requests whose confirmation ended at `node` to their
    /// simulated clients.
    fn finish_claims(&mut self, node: usize) {
        let local = self.local_now(node);
        let limiter = self.nodes[node].limiter.clone();
        self.nodes[node].repl.settle(local, &limiter);
        while let Some(confirmed) = self.nodes[node].repl.poll_confirmed() {
            let Some((id, _)) = self.nodes[node].waiting.remove(&confirmed.ticket) else {
                continue;
            };
            // When it was judged, on the reference clock.
            let skew = self.local_offset(node);
            let judged = confirmed.pending.judged_at.as_u64() as i64;
            let when = Nanos::new((judged - skew).max(0) as u64);
            self.completed
                .push((id, node, confirmed.decided.decision(), when));
        }
    }

    /// A node's snapshot now (every slot of every live key), as the node
    /// writes it.
    pub fn snapshot(&self, node: usize) -> Vec<u8> {
        crate::cluster::snapshot::capture(&self.nodes[node].limiter, self.local_now(node))
    }

    /// Net hits counted for the key of `fields` at `node` now, from its
    /// merged view (cost-0 check: counts nothing).
    pub fn remaining(&mut self, node: usize, fields: &[(&str, &str)]) -> Option<u64> {
        self.check(node, fields, 0)
            .ok()
            .and_then(|d| d.quota.map(|q| q.remaining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "fixed_window", limit = 1000, window = "1h" } ]
    "#;

    #[test]
    fn hits_on_one_node_reach_the_others() {
        let mut c = MemCluster::new(ClusterSpec::new(3, RULES, 1)).unwrap();
        for _ in 0..10 {
            assert!(c.check(0, &[("user", "u")], 1).unwrap().is_allowed());
            // Leave time for acknowledgements: the in-flight share is small.
            c.advance(Nanos::from_millis(10));
        }
        c.advance(Nanos::from_millis(20));
        for n in 0..3 {
            let d = c.check(n, &[("user", "u")], 0).unwrap();
            // Counted hits plus the shares reserved for the other nodes.
            let q = d.quota.unwrap();
            assert!(q.remaining <= 990, "node {n}: {q:?}");
        }
        // All in-flight hits were acknowledged and settled.
        let t = c.limiter(0).table(0).unwrap();
        let mut inflight = 0;
        t.for_each(|e| inflight += e.inflight());
        assert_eq!(inflight, 0);
    }
}
