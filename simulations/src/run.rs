//! The runner: drives a [`MemCluster`] through a scenario on virtual time.
//!
//! Every arrival goes to its node (failing over to the next node, as the
//! client SDK does, when that node is down or still recovering); faults
//! apply at their times; open convergence probes are polled every
//! [`POLL`]. Beside the cluster run two plain single-node limiters on the
//! reference clock:
//!
//! - the *reference*, fed every arrival: what an exact single node would
//!   have decided (decision error, baseline overshoot);
//! - the *replay*, fed only the cluster's admissions, keeping those its
//!   algorithm admits: how many of them the algorithm itself, seeing all of
//!   them at once, would have refused (overshoot against the algorithm's own
//!   semantics, free of the sliding-window estimator's approximation).
//!
//! Nothing here reads a real clock or an unseeded generator: the output is a
//! pure function of the scenario and the seed.

use std::collections::BTreeSet;
use std::sync::Arc;

use drl_core::cluster::harness::{ClusterSpec, MemCluster, Submitted};
use drl_core::descriptor::Descriptors;
use drl_core::key::{key_digest, KeySeed};
use drl_core::limiter::{CheckError, Decision, Limiter, LimiterConfig, Outcome};
use drl_core::rules::RuleSet;
use drl_core::time::{Clock, ManualClock, Nanos};

use crate::probe::{live_values, read_slot, Probe, ProbeKind, Target};
use crate::scenario::{FaultAction, Scenario};
use crate::traffic::{self, Traffic};

/// How often open probes are polled (the resolution of convergence times).
pub const POLL: Nanos = Nanos::from_micros(250);
/// At most this many keys are followed after a heal or a restart.
const MAX_PROBED_KEYS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Allowed,
    Denied,
    /// No node could answer (every one down or recovering).
    Unavailable,
}

/// What happened to one arrival.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// Reference time, ns since the start of the run.
    pub at: u64,
    pub key: u32,
    /// The node the client tried first.
    pub target: u16,
    /// The node that answered.
    pub node: u16,
    pub served: Served,
    /// Denied only because the node's in-flight share was spent (the
    /// decision's `retry_after` is the acknowledgement wait).
    pub share_capped: bool,
    /// The exact single-node reference admitted it.
    pub reference: bool,
    /// Admitted by the cluster, refused by the algorithm replayed on the
    /// cluster's admitted history (a greedy limiter over it).
    pub algo_refused: bool,
    /// Refused by the cluster, though the algorithm replayed on the
    /// cluster's admitted history would have admitted it.
    pub algo_would_admit: bool,
}

/// Everything a run leaves for the metrics.
pub struct RunOutput {
    pub traffic: Traffic,
    pub records: Vec<Record>,
    pub probes: Vec<Probe>,
    /// `(restart time, time until admitting)` per restart.
    pub restarts: Vec<(Nanos, Option<Nanos>)>,
    pub failovers: u64,
    pub bytes_on_wire: u64,
    pub frames_on_wire: u64,
    /// `(key, sync round)` changes shipped, over all nodes and incarnations.
    pub values_sent: u64,
    pub full_syncs: u64,
    pub retransmissions: u64,
    /// Reference time of the run's start (absolute ns; bucket-aligned).
    pub origin: u64,
    pub ack_wait: Nanos,
}

fn cluster_spec(s: &Scenario, seed: u64) -> ClusterSpec {
    let mut spec = ClusterSpec::new(s.nodes, &s.rules, seed);
    spec.policy = s.policy;
    spec.sync_interval = s.sync_interval;
    spec.inflight_ppm = s.inflight_ppm;
    spec.detect_after = s.detect_after;
    spec.max_keys = s.max_keys.max(s.total_keys() + 1);
    spec.confirm = s.confirm;
    spec.whole_core = s.whole_core;
    spec.spare_slots = s
        .faults
        .iter()
        .filter(|f| matches!(f.action, FaultAction::Join))
        .count();
    if !s.correct_clocks {
        spec.max_clock_offset = None;
    }
    // A clock offset from the very start is the node's clock as it boots
    // (its timers start on it), not a step while it runs.
    for f in &s.faults {
        if let FaultAction::Skew { node, offset_ns } = f.action {
            if f.at == Nanos::ZERO {
                spec.clock_offsets.resize(s.nodes, 0);
                spec.clock_offsets[node] = offset_ns;
            }
        }
    }
    spec
}

/// The mirror of the network faults in force, to know when the cluster is
/// whole (write probes are taken only then).
#[derive(Default)]
struct FaultState {
    cut: BTreeSet<(u16, u16)>,
    down: BTreeSet<usize>,
}

struct Runner<'s> {
    s: &'s Scenario,
    c: MemCluster,
    origin: Nanos,
    reference: Limiter<Arc<ManualClock>>,
    replay: Limiter<Arc<ManualClock>>,
    digests: Vec<u64>,
    state: FaultState,
    probes: Vec<Probe>,
    open: Vec<usize>,
    next_probe: Nanos,
    /// When open probes are polled next.
    poll_at: Nanos,
    restarts: Vec<(Nanos, Option<Nanos>)>,
    waiting_admit: Vec<(usize, usize)>,
    values_sent_before: u64,
    full_syncs_before: u64,
    retransmissions_before: u64,
    /// Requests waiting for their claim's answers: id → (arrival, what the
    /// reference decided).
    waiting: std::collections::BTreeMap<u64, (traffic::Arrival, bool)>,
}

pub fn run(s: &Scenario, seed: u64) -> Result<RunOutput, String> {
    let traffic = traffic::generate(s, seed);
    let spec = cluster_spec(s, seed);
    let c = MemCluster::new(spec)?;
    let origin = c.now();
    let rules = || RuleSet::from_toml(&s.rules).map_err(|e| e.to_string());
    let single = |clock| {
        Limiter::with_clock(rules()?, LimiterConfig::default(), clock).map_err(|e| e.to_string())
    };
    let reference = single(Arc::new(ManualClock::new(origin)))?;
    let replay = single(Arc::new(ManualClock::new(origin)))?;
    let limit_id = reference.rules().limits()[0].id;
    let digests = traffic
        .keys
        .iter()
        .map(|k| key_digest(KeySeed::default(), limit_id, [k.as_str()]).0)
        .collect();
    let mut r = Runner {
        s,
        c,
        origin,
        reference,
        replay,
        digests,
        state: FaultState::default(),
        probes: Vec::new(),
        open: Vec::new(),
        next_probe: Nanos::ZERO,
        poll_at: Nanos::ZERO,
        restarts: Vec::new(),
        waiting_admit: Vec::new(),
        values_sent_before: 0,
        full_syncs_before: 0,
        retransmissions_before: 0,
        waiting: std::collections::BTreeMap::new(),
    };
    r.c.faults = s.network.clone();
    let records = r.drive(&traffic)?;
    let (mut values_sent, mut full_syncs, mut retransmissions) = (
        r.values_sent_before,
        r.full_syncs_before,
        r.retransmissions_before,
    );
    for n in 0..r.c.node_count() {
        let st = r.c.replicator(n).stats();
        values_sent += st.values_sent;
        full_syncs += st.full_syncs;
        retransmissions += st.retransmissions;
    }
    let failovers = records.iter().filter(|x| x.node != x.target).count() as u64;
    Ok(RunOutput {
        records,
        probes: r.probes,
        restarts: r.restarts,
        failovers,
        bytes_on_wire: r.c.bytes_on_wire,
        frames_on_wire: r.c.frames_on_wire,
        values_sent,
        full_syncs,
        retransmissions,
        origin: origin.as_u64(),
        ack_wait: s.sync_interval * 2,
        traffic,
    })
}

impl Runner<'_> {
    fn now(&self) -> Nanos {
        self.c.now() - self.origin
    }

    fn advance_to(&mut self, t: Nanos) {
        let now = self.now();
        if t > now {
            self.c.advance(t - now);
        }
    }

    fn drive(&mut self, traffic: &Traffic) -> Result<Vec<Record>, String> {
        let s = self.s;
        let mut records = Vec::with_capacity(traffic.arrivals.len());
        let (mut ai, mut fi) = (0, 0);
        loop {
            let next_fault = s.faults.get(fi).map(|f| f.at);
            let next_arrival = traffic.arrivals.get(ai).map(|a| Nanos::new(a.at));
            let next_poll = (!self.open.is_empty() || !self.waiting_admit.is_empty())
                .then(|| self.poll_at.max(self.now()));
            let Some(t) = [next_fault, next_poll, next_arrival]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if t >= s.duration {
                break;
            }
            self.advance_to(t);
            self.collect(traffic, &mut records)?;
            if next_fault == Some(t) {
                let action = s.faults[fi].action.clone();
                fi += 1;
                self.apply(&action)?;
            } else if next_poll == Some(t) {
                self.poll();
                self.poll_at = t + POLL;
            } else {
                let a = traffic.arrivals[ai];
                ai += 1;
                if let Some(record) = self.arrival(traffic, a)? {
                    records.push(record);
                }
            }
        }
        self.advance_to(s.duration);
        // Requests still waiting get their answers (at most a claim timeout).
        let mut guard = 0;
        while !self.waiting.is_empty() && guard < 1000 {
            self.c.advance(Nanos::from_millis(1));
            self.collect(traffic, &mut records)?;
            guard += 1;
        }
        self.poll();
        // Completions arrive in decision order; the metrics read arrivals.
        records.sort_by_key(|r| r.at);
        Ok(records)
    }

    /// Records the requests whose confirmation ended.
    fn collect(&mut self, traffic: &Traffic, records: &mut Vec<Record>) -> Result<(), String> {
        for (id, node, decision, judged) in self.c.take_completed() {
            if let Some((a, reference)) = self.waiting.remove(&id) {
                // A confirmed request is judged, and counted, as of its
                // arrival (or a little later if a bucket ended meanwhile):
                // replay it there.
                let record = self.record(traffic, a, reference, Some((node, decision)), judged)?;
                records.push(record);
            }
        }
        Ok(())
    }

    fn poll(&mut self) {
        let now = self.now();
        let c = &self.c;
        let probes = &mut self.probes;
        self.open.retain(|&i| !probes[i].poll(c, now));
        let (restarts, c) = (&mut self.restarts, &self.c);
        self.waiting_admit.retain(|&(node, i)| {
            if c.is_up(node) && c.limiter(node).is_admitting() {
                restarts[i].1 = Some(now - restarts[i].0);
                false
            } else {
                true
            }
        });
    }

    fn whole(&self) -> bool {
        self.state.cut.is_empty()
            && self.state.down.is_empty()
            && (0..self.c.node_count()).all(|n| self.c.limiter(n).is_admitting())
    }

    fn apply(&mut self, action: &FaultAction) -> Result<(), String> {
        let n = self.c.node_count() as u16;
        let named = match action {
            FaultAction::Crash(x)
            | FaultAction::Restart(x)
            | FaultAction::Leave(x)
            | FaultAction::Pause(x)
            | FaultAction::Resume(x)
            | FaultAction::Skew { node: x, .. } => Some(*x),
            _ => None,
        };
        if named.is_some_and(|x| x >= usize::from(n)) {
            return Err(format!("{action:?} names a node that has not joined"));
        }
        match action {
            FaultAction::Isolate(group) | FaultAction::Heal(group) => {
                let cut = matches!(action, FaultAction::Isolate(_));
                let nodes: Vec<usize> = group.iter().map(|&g| usize::from(g)).collect();
                self.c.isolate(&nodes, cut);
                for &a in group {
                    for b in (0..n).filter(|b| !group.contains(b)) {
                        for link in [(a, b), (b, a)] {
                            if cut {
                                self.state.cut.insert(link);
                            } else {
                                self.state.cut.remove(&link);
                            }
                        }
                    }
                }
                if !cut {
                    self.heal_probes();
                }
            }
            &FaultAction::Link { a, b, up } => {
                self.c.set_link(a.into(), b.into(), up);
                for link in [(a, b), (b, a)] {
                    if up {
                        self.state.cut.remove(&link);
                    } else {
                        self.state.cut.insert(link);
                    }
                }
                if up {
                    self.heal_probes();
                }
            }
            &FaultAction::OneWay { from, to, up } => {
                self.c.set_one_way(from.into(), to.into(), up);
                if up {
                    self.state.cut.remove(&(from, to));
                    self.heal_probes();
                } else {
                    self.state.cut.insert((from, to));
                }
            }
            &FaultAction::Crash(node) => {
                self.c.crash(node);
                self.state.down.insert(node);
            }
            &FaultAction::Restart(node) => {
                let st = self.c.replicator(node).stats();
                self.values_sent_before += st.values_sent;
                self.full_syncs_before += st.full_syncs;
                self.retransmissions_before += st.retransmissions;
                // What the live peers know at the restart, for every slot.
                let targets = self.restart_targets(node);
                self.c.restart(node)?;
                self.state.down.remove(&node);
                let now = self.now();
                for t in targets {
                    self.open.push(self.probes.len());
                    self.probes.push(Probe::new(ProbeKind::Restart, now, t));
                }
                self.restarts.push((now, None));
                self.waiting_admit.push((node, self.restarts.len() - 1));
            }
            FaultAction::Join => {
                self.c.join()?;
            }
            &FaultAction::Leave(node) => {
                self.c.leave(node);
                self.state.down.insert(node);
            }
            &FaultAction::Pause(node) => {
                self.c.pause(node);
                self.state.down.insert(node);
            }
            &FaultAction::Resume(node) => {
                self.c.resume(node);
                self.state.down.remove(&node);
            }
            &FaultAction::Skew { node, offset_ns } => self.c.set_skew(node, offset_ns),
            FaultAction::Network(f) => self.c.faults = f.clone(),
        }
        Ok(())
    }

    /// Per key, every live node's own slot as of now, to be counted by
    /// every other live node.
    fn heal_probes(&mut self) {
        let n = self.c.node_count();
        let now = self.now();
        for k in 0..self.digests.len().min(MAX_PROBED_KEYS) {
            let key = self.digests[k];
            let mut targets = Vec::new();
            for owner in (0..n).filter(|&o| self.c.is_up(o)) {
                for (epoch, p) in live_values(&self.c, owner, key, owner) {
                    for node in (0..n).filter(|&x| x != owner && self.c.is_up(x)) {
                        targets.push(Target {
                            node,
                            key,
                            slot: owner,
                            epoch,
                            p,
                        });
                    }
                }
            }
            if !targets.is_empty() {
                self.open.push(self.probes.len());
                self.probes.push(Probe::new(ProbeKind::Heal, now, targets));
            }
        }
    }

    /// Per key, the highest value of every slot any live peer holds.
    fn restart_targets(&self, restarted: usize) -> Vec<Vec<Target>> {
        let n = self.c.node_count();
        let mut out = Vec::new();
        for k in 0..self.digests.len().min(MAX_PROBED_KEYS) {
            let key = self.digests[k];
            let mut best: std::collections::BTreeMap<(usize, u64), u32> = Default::default();
            for peer in (0..n).filter(|&p| p != restarted && self.c.is_up(p)) {
                for slot in 0..n {
                    for (epoch, p) in live_values(&self.c, peer, key, slot) {
                        let v = best.entry((slot, epoch)).or_insert(0);
                        *v = (*v).max(p);
                    }
                }
            }
            let targets: Vec<Target> = best
                .into_iter()
                .map(|((slot, epoch), p)| Target {
                    node: restarted,
                    key,
                    slot,
                    epoch,
                    p,
                })
                .collect();
            if !targets.is_empty() {
                out.push(targets);
            }
        }
        out
    }

    fn arrival(
        &mut self,
        traffic: &Traffic,
        a: traffic::Arrival,
    ) -> Result<Option<Record>, String> {
        let name = traffic.keys[a.key as usize].as_str();
        let fields = [("user", name)];
        let d = Descriptors::new(&fields).map_err(|e| e.to_string())?;
        let t_ref = self.origin + Nanos::new(a.at);
        let reference = self
            .reference
            .check_at(t_ref, &d, 1)
            .map_err(|e| e.to_string())?
            .is_allowed();
        let n = self.c.node_count();
        // Nodes that joined later take their part of the traffic: the
        // first node asked is spread over every node there is.
        let first = if n > self.s.nodes {
            (a.node as usize + (a.at / 1_000) as usize) % n
        } else {
            a.node as usize
        };
        let mut answer = None;
        for i in 0..n {
            let node = (first + i) % n;
            match self.c.submit(node, &fields, 1) {
                Ok(Submitted::Done(decision)) => {
                    answer = Some((node, decision));
                    break;
                }
                Ok(Submitted::Waiting(id)) => {
                    self.waiting.insert(id, (a, reference));
                    return Ok(None);
                }
                Err(CheckError::Recovering) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        let now = self.c.now();
        self.record(traffic, a, reference, answer, now).map(Some)
    }

    /// What happened to arrival `a`, answered at reference time `when`.
    fn record(
        &mut self,
        traffic: &Traffic,
        a: traffic::Arrival,
        reference: bool,
        answer: Option<(usize, Decision)>,
        when: Nanos,
    ) -> Result<Record, String> {
        let name = traffic.keys[a.key as usize].as_str();
        let fields = [("user", name)];
        let d = Descriptors::new(&fields).map_err(|e| e.to_string())?;
        let t_ref = when;
        let ack_wait = self.s.sync_interval * 2;
        let (node, served, share_capped) = match answer {
            None => (a.node as usize, Served::Unavailable, false),
            Some((node, d)) => match d.outcome {
                Outcome::Allowed => (node, Served::Allowed, false),
                _ => (
                    node,
                    Served::Denied,
                    d.quota.is_some_and(|q| q.retry_after == ack_wait),
                ),
            },
        };
        let (mut algo_refused, mut algo_would_admit) = (false, false);
        if served != Served::Allowed {
            // Would the algorithm, holding exactly the cluster's admissions,
            // have admitted it? Ask, then give the hit back.
            let replayed = self
                .replay
                .check_at(t_ref, &d, 1)
                .map_err(|e| e.to_string())?;
            if replayed.is_allowed() {
                algo_would_admit = true;
                self.replay
                    .refund_at(t_ref, &d, 1)
                    .map_err(|e| e.to_string())?;
            }
        } else {
            let replayed = self
                .replay
                .check_at(t_ref, &d, 1)
                .map_err(|e| e.to_string())?;
            // A greedy limiter over the cluster's admissions: what the
            // algorithm refuses is not counted, so the replay holds the
            // largest history the algorithm allows.
            algo_refused = !replayed.is_allowed();
            self.maybe_probe_write(node, a.key as usize);
        }
        Ok(Record {
            at: a.at,
            key: a.key,
            target: a.node,
            node: node as u16,
            served,
            share_capped,
            reference,
            algo_refused,
            algo_would_admit,
        })
    }

    /// Follows one admission in every `probe_every`, while the cluster is
    /// whole, until every other node counts it.
    fn maybe_probe_write(&mut self, node: usize, key: usize) {
        let now = self.now();
        if now < self.next_probe || !self.whole() || self.c.node_count() < 2 {
            return;
        }
        self.next_probe = now + self.s.probe_every;
        let digest = self.digests[key];
        let lim = self.c.limiter(node);
        let Some(table) = lim.table(0) else {
            return;
        };
        let epoch = table.spec().epoch(lim.clock().now());
        let Some(p) = read_slot(&self.c, node, digest, node, epoch) else {
            return;
        };
        let targets = (0..self.c.node_count())
            .filter(|&x| x != node)
            .map(|x| Target {
                node: x,
                key: digest,
                slot: node,
                epoch,
                p,
            })
            .collect();
        self.open.push(self.probes.len());
        self.probes.push(Probe::new(ProbeKind::Write, now, targets));
    }
}
