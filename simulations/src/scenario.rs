//! Scenarios as data: one TOML file each, parsed into a checked [`Scenario`].
//!
//! A scenario names the cluster (nodes, share policy, sync settings), the
//! rule every request is checked against (inline rule-file TOML, exactly
//! one rule with one limit, matched on the `user` descriptor), the traffic
//! (groups of keys with a rate profile, a split over nodes, bursts) and the
//! faults (partitions and heals, one-way and two-way link cuts, network
//! misbehaviour, crashes and restarts, clock offsets), each at a time.
//! Parsing checks everything, so a run never fails half-way on a typo.
//!
//! `[quick]` says how to shrink a scenario for CI: times are multiplied by
//! `time_scale`, key counts by `key_scale`, and `nodes` may be lowered.

use std::path::Path;

use drl_core::cluster::harness::NetFaults;
use drl_core::rules::RuleSet;
use drl_core::share::SharePolicy;
use drl_core::time::{parse_duration, Nanos};
use serde::Deserialize;

/// The one limit of a scenario's rule, as the oracle needs it.
#[derive(Clone, Debug, PartialEq)]
pub enum LimitSpec {
    /// At most `limit` hits in every window `(t − window, t]`.
    Sliding {
        limit: u64,
        window: Nanos,
        precision: u32,
    },
    /// At most `limit` hits in every aligned window `[k·w, (k+1)·w)`.
    Fixed { limit: u64, window: Nanos },
    /// At most `capacity + refill·(t − s)/per` hits in every `(s, t]`.
    TokenBucket {
        capacity: u64,
        refill: u64,
        per: Nanos,
    },
    /// A meter that holds `capacity` and leaks `leak` per `per`: the same
    /// envelope as a token bucket of that capacity and refill.
    LeakyBucket {
        capacity: u64,
        leak: u64,
        per: Nanos,
    },
    /// `limit` per `per` with a tolerance of `burst` cells: the envelope of
    /// a token bucket of capacity `burst` refilled by `limit` per `per`.
    Gcra { limit: u64, per: Nanos, burst: u64 },
}

impl LimitSpec {
    /// The quota overshoot is measured against: the limit, or the bucket's
    /// capacity.
    pub fn quota(&self) -> u64 {
        match *self {
            LimitSpec::Sliding { limit, .. } | LimitSpec::Fixed { limit, .. } => limit,
            _ => self.envelope().map_or(0, |(capacity, _, _)| capacity),
        }
    }
    /// The period samples are grouped by and the limit refers to.
    pub fn period(&self) -> Nanos {
        match *self {
            LimitSpec::Sliding { window, .. } | LimitSpec::Fixed { window, .. } => window,
            _ => self.envelope().map_or(Nanos::ZERO, |(_, _, per)| per),
        }
    }
    /// What the limit admits per period in the long run.
    pub fn rate_per_period(&self) -> u64 {
        match *self {
            LimitSpec::Sliding { limit, .. } | LimitSpec::Fixed { limit, .. } => limit,
            _ => self.envelope().map_or(0, |(_, rate, _)| rate),
        }
    }
    /// For the three drain meters, the burst-plus-rate envelope they all
    /// enforce: `(capacity, rate, per)`, at most `capacity + rate·(t − s)/per`
    /// hits in every `(s, t]`. `None` for the two window algorithms.
    pub fn envelope(&self) -> Option<(u64, u64, Nanos)> {
        match *self {
            LimitSpec::TokenBucket {
                capacity,
                refill,
                per,
            } => Some((capacity, refill, per)),
            LimitSpec::LeakyBucket {
                capacity,
                leak,
                per,
            } => Some((capacity, leak, per)),
            LimitSpec::Gcra { limit, per, burst } => Some((burst, limit, per)),
            LimitSpec::Sliding { .. } | LimitSpec::Fixed { .. } => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            LimitSpec::Sliding { .. } => "sliding_window",
            LimitSpec::Fixed { .. } => "fixed_window",
            LimitSpec::TokenBucket { .. } => "token_bucket",
            LimitSpec::LeakyBucket { .. } => "leaky_bucket",
            LimitSpec::Gcra { .. } => "gcra",
        }
    }
}

/// How arrivals are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// A Poisson process with the profile's rate.
    #[default]
    Poisson,
    /// Evenly spaced at the profile's rate, from a random phase.
    Even,
}

/// `count` extra requests per key of the group, evenly spread over `over`.
#[derive(Clone, Debug, PartialEq)]
pub struct Burst {
    pub at: Nanos,
    pub count: u64,
    pub over: Nanos,
    /// All at this node; by the group's split when `None`.
    pub node: Option<usize>,
}

/// A set of keys that share a traffic shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficGroup {
    pub name: String,
    pub keys: usize,
    /// Piecewise-linear requests per second per key: `(time, rate)` points,
    /// constant before the first and after the last.
    pub profile: Vec<(Nanos, f64)>,
    /// Weight of each node (sums to 1).
    pub split: Vec<f64>,
    pub arrivals: Arrivals,
    pub bursts: Vec<Burst>,
    /// Zipf exponent: when set, the profile's rate is the whole group's and
    /// the `k`-th key (from 0) gets the share `(k+1)^-s / H`.
    pub zipf: Option<f64>,
}

impl TrafficGroup {
    /// The per-key rate at `t` (requests per second).
    pub fn rate_at(&self, t: Nanos) -> f64 {
        let p = &self.profile;
        if t <= p[0].0 {
            return p[0].1;
        }
        for w in p.windows(2) {
            let ((t0, r0), (t1, r1)) = (w[0], w[1]);
            if t <= t1 {
                if t1 == t0 {
                    return r1;
                }
                let f = (t - t0).as_u64() as f64 / (t1 - t0).as_u64() as f64;
                return r0 + (r1 - r0) * f;
            }
        }
        p[p.len() - 1].1
    }
}

/// One thing that happens to the cluster at a time.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// Cut `nodes` off from every other node.
    Isolate(Vec<u16>),
    /// Heal what `Isolate` of the same nodes cut.
    Heal(Vec<u16>),
    /// Cut or heal both directions between two nodes.
    Link {
        a: u16,
        b: u16,
        up: bool,
    },
    /// Cut or heal one direction only: `from`'s frames no longer reach `to`.
    OneWay {
        from: u16,
        to: u16,
        up: bool,
    },
    Crash(usize),
    Restart(usize),
    /// A new node joins, with the next slot never used (membership
    /// finds it; whole-core only).
    Join,
    /// The node leaves cleanly (drained): it tells its peers and exits.
    Leave(usize),
    /// The node stops running (SIGSTOP): no timer fires, nothing is sent,
    /// frames for it wait unread; clients fail over to the next node.
    Pause(usize),
    /// The paused node runs again (SIGCONT): its timers fire late and it
    /// reads what arrived meanwhile.
    Resume(usize),
    /// A node's clock minus the reference clock.
    Skew {
        node: usize,
        offset_ns: i64,
    },
    /// Replace the network's behaviour.
    Network(NetFaults),
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub at: Nanos,
    pub action: FaultAction,
}

#[derive(Clone, Debug)]
pub struct Quick {
    pub time_scale: f64,
    pub key_scale: f64,
    pub nodes: Option<usize>,
}

/// A checked scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub nodes: usize,
    pub policy: SharePolicy,
    pub duration: Nanos,
    pub sync_interval: Nanos,
    pub inflight_ppm: u32,
    pub detect_after: Nanos,
    pub max_keys: usize,
    pub rules: String,
    pub limit: LimitSpec,
    pub network: NetFaults,
    pub traffic: Vec<TrafficGroup>,
    pub faults: Vec<Fault>,
    /// How often an admission is followed until every node counts it.
    pub probe_every: Nanos,
    pub quick: Option<Quick>,
    /// True once [`Scenario::quick`] has shrunk it.
    pub is_quick: bool,
    /// Near a limit, confirm provisional hits with the peers (default); off
    /// runs the earlier design, which refuses them for an ack wait.
    pub confirm: bool,
    /// Run every node's whole `NodeCore` (real SWIM membership, rules
    /// replication, the recovery gate as a node runs it) rather than the
    /// replicator with the "silence means dead" rule. `whole_core` in the
    /// file; by default on for scenarios that crash, restart, partition or
    /// cut links, off for the others.
    pub whole_core: bool,
    /// Steer every node's clock toward the cluster's (the design in force);
    /// `correct_clocks = false` in the file leaves clocks as they are (the
    /// earlier design, for comparison).
    pub correct_clocks: bool,
}

// ---- the file format -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    description: String,
    nodes: usize,
    #[serde(default = "default_policy")]
    policy: String,
    bounded_fraction: Option<f64>,
    duration: String,
    sync_interval: Option<String>,
    inflight_ppm: Option<u32>,
    detect_after: Option<String>,
    max_keys: Option<usize>,
    probe_every: Option<String>,
    rules: String,
    network: Option<NetworkFile>,
    traffic: Vec<TrafficFile>,
    #[serde(default)]
    faults: Vec<FaultFile>,
    quick: Option<QuickFile>,
    confirm: Option<bool>,
    whole_core: Option<bool>,
    correct_clocks: Option<bool>,
}

fn default_policy() -> String {
    "strict".to_owned()
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    latency: Option<String>,
    jitter: Option<String>,
    loss: Option<f64>,
    duplicate: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficFile {
    name: Option<String>,
    keys: usize,
    rate: Option<f64>,
    profile: Option<Vec<(String, f64)>>,
    split: Option<Vec<f64>>,
    #[serde(default)]
    arrivals: Arrivals,
    #[serde(default)]
    bursts: Vec<BurstFile>,
    zipf: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BurstFile {
    at: String,
    count: u64,
    over: String,
    node: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFile {
    at: String,
    action: String,
    nodes: Option<Vec<u16>>,
    node: Option<usize>,
    a: Option<u16>,
    b: Option<u16>,
    from: Option<u16>,
    to: Option<u16>,
    up: Option<bool>,
    offset: Option<String>,
    latency: Option<String>,
    jitter: Option<String>,
    loss: Option<f64>,
    duplicate: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickFile {
    time_scale: Option<f64>,
    key_scale: Option<f64>,
    nodes: Option<usize>,
}

/// The rule file as far as the oracle reads it.
#[derive(Deserialize)]
struct RulesPeek {
    rules: Vec<RulePeek>,
}
#[derive(Deserialize)]
struct RulePeek {
    #[serde(rename = "match")]
    matcher: toml::Table,
    limits: Vec<LimitPeek>,
}
#[derive(Deserialize)]
struct LimitPeek {
    algorithm: String,
    limit: Option<u64>,
    window: Option<String>,
    precision: Option<u32>,
    capacity: Option<u64>,
    refill: Option<u64>,
    leak: Option<u64>,
    burst: Option<u64>,
    per: Option<String>,
}

fn duration(field: &str, text: &str) -> Result<Nanos, String> {
    parse_duration(text).map_err(|e| format!("{field} = {text:?}: {e}"))
}

/// `"+50ms"`, `"-250ms"` or `"0ms"`.
fn signed_duration(field: &str, text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'-') => (-1, &t[1..]),
        Some(b'+') => (1, &t[1..]),
        _ => (1, t),
    };
    let d = duration(field, rest)?;
    i64::try_from(d.as_u64())
        .map(|v| sign * v)
        .map_err(|_| format!("{field} = {text:?}: too large"))
}

fn network(n: &NetworkFile, base: &NetFaults) -> Result<NetFaults, String> {
    let mut out = base.clone();
    if let Some(l) = &n.latency {
        out.latency = duration("latency", l)?;
    }
    if let Some(j) = &n.jitter {
        out.jitter = duration("jitter", j)?;
    }
    for (name, v) in [("loss", n.loss), ("duplicate", n.duplicate)] {
        if let Some(p) = v {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} = {p}: a probability is between 0 and 1"));
            }
        }
    }
    if let Some(p) = n.loss {
        out.loss = p;
    }
    if let Some(p) = n.duplicate {
        out.duplicate = p;
    }
    Ok(out)
}

fn limit_spec(rules: &str) -> Result<LimitSpec, String> {
    RuleSet::from_toml(rules).map_err(|e| format!("rules: {e}"))?;
    let peek: RulesPeek = toml::from_str(rules).map_err(|e| format!("rules: {e}"))?;
    let [rule] = peek.rules.as_slice() else {
        return Err("rules: a scenario has exactly one rule".into());
    };
    if !rule.matcher.contains_key("user") {
        return Err("rules: the rule must match on `user` (traffic sends user = <key>)".into());
    }
    let [l] = rule.limits.as_slice() else {
        return Err("rules: the rule has exactly one limit".into());
    };
    let need = |v: Option<u64>, f: &str| v.ok_or_else(|| format!("rules: `{f}` is missing"));
    let need_d = |v: &Option<String>, f: &str| -> Result<Nanos, String> {
        duration(
            f,
            v.as_deref()
                .ok_or_else(|| format!("rules: `{f}` is missing"))?,
        )
    };
    match l.algorithm.as_str() {
        "sliding_window" => Ok(LimitSpec::Sliding {
            limit: need(l.limit, "limit")?,
            window: need_d(&l.window, "window")?,
            precision: l.precision.unwrap_or(1),
        }),
        "fixed_window" => Ok(LimitSpec::Fixed {
            limit: need(l.limit, "limit")?,
            window: need_d(&l.window, "window")?,
        }),
        "token_bucket" => Ok(LimitSpec::TokenBucket {
            capacity: need(l.capacity, "capacity")?,
            refill: need(l.refill, "refill")?,
            per: need_d(&l.per, "per")?,
        }),
        "leaky_bucket" => Ok(LimitSpec::LeakyBucket {
            capacity: need(l.capacity, "capacity")?,
            leak: need(l.leak, "leak")?,
            per: need_d(&l.per, "per")?,
        }),
        "gcra" => {
            let limit = need(l.limit, "limit")?;
            Ok(LimitSpec::Gcra {
                limit,
                per: need_d(&l.per, "per")?,
                // As the rules default it: a burst of the whole limit.
                burst: l.burst.unwrap_or(limit),
            })
        }
        other => Err(format!("rules: the oracle does not know {other}")),
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        let f: ScenarioFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if f.nodes == 0 || f.nodes > drl_core::slot::SLOT_SPACE {
            return Err(format!(
                "nodes = {}: between 1 and {}",
                f.nodes,
                drl_core::slot::SLOT_SPACE
            ));
        }
        let policy = match (f.policy.as_str(), f.bounded_fraction) {
            ("strict", None) => SharePolicy::Strict,
            ("available", None) => SharePolicy::Available,
            ("bounded", Some(x)) if (0.0..=1.0).contains(&x) => SharePolicy::Bounded {
                fraction_ppm: (x * 1e6).round() as u32,
            },
            ("bounded", _) => {
                return Err("policy = \"bounded\" needs bounded_fraction in [0, 1]".into())
            }
            (_, Some(_)) => return Err("bounded_fraction is for policy = \"bounded\"".into()),
            (p, None) => return Err(format!("policy = {p:?}: one of strict, available, bounded")),
        };
        let limit = limit_spec(&f.rules)?;
        let defaults = drl_core::cluster::harness::ClusterSpec::new(f.nodes, "", 0);
        let mut traffic = Vec::new();
        for (i, t) in f.traffic.iter().enumerate() {
            traffic.push(traffic_group(i, t, f.nodes)?);
        }
        if traffic.is_empty() {
            return Err("a scenario needs at least one [[traffic]] group".into());
        }
        let mut faults = Vec::new();
        // Nodes that join take the next indices; a fault may name them
        // (the run refuses one that names a node not joined yet).
        let joins = f.faults.iter().filter(|x| x.action == "join").count();
        for fault in &f.faults {
            faults.push(parse_fault(fault, f.nodes + joins)?);
        }
        // Stable: faults at the same time apply in file order.
        faults.sort_by_key(|f| f.at);
        let quick = f.quick.map(|q| Quick {
            time_scale: q.time_scale.unwrap_or(1.0),
            key_scale: q.key_scale.unwrap_or(1.0),
            nodes: q.nodes,
        });
        // Restarts and partitions run the node's whole core by default.
        let topology = faults.iter().any(|f| {
            matches!(
                f.action,
                FaultAction::Crash(_)
                    | FaultAction::Restart(_)
                    | FaultAction::Pause(_)
                    | FaultAction::Resume(_)
                    | FaultAction::Join
                    | FaultAction::Leave(_)
                    | FaultAction::Isolate(_)
                    | FaultAction::Heal(_)
                    | FaultAction::Link { .. }
                    | FaultAction::OneWay { .. }
            )
        });
        let s = Scenario {
            name: f.name,
            description: f.description,
            nodes: f.nodes,
            policy,
            duration: duration("duration", &f.duration)?,
            sync_interval: f
                .sync_interval
                .as_deref()
                .map(|d| duration("sync_interval", d))
                .transpose()?
                .unwrap_or(defaults.sync_interval),
            inflight_ppm: f.inflight_ppm.unwrap_or(defaults.inflight_ppm),
            detect_after: f
                .detect_after
                .as_deref()
                .map(|d| duration("detect_after", d))
                .transpose()?
                .unwrap_or(defaults.detect_after),
            max_keys: f.max_keys.unwrap_or(defaults.max_keys),
            probe_every: f
                .probe_every
                .as_deref()
                .map(|d| duration("probe_every", d))
                .transpose()?
                .unwrap_or(Nanos::from_millis(50)),
            rules: f.rules,
            limit,
            network: network(&f.network.unwrap_or_default(), &NetFaults::default())?,
            traffic,
            faults,
            quick,
            is_quick: false,
            confirm: f.confirm.unwrap_or(true),
            whole_core: f.whole_core.unwrap_or(topology),
            correct_clocks: f.correct_clocks.unwrap_or(true),
        };
        if s.duration == Nanos::ZERO {
            return Err("duration must be positive".into());
        }
        let keys: usize = s.traffic.iter().map(|g| g.keys).sum();
        if keys > s.max_keys {
            return Err(format!(
                "{keys} keys do not fit max_keys = {}: evictions would reset counts",
                s.max_keys
            ));
        }
        Ok(s)
    }

    /// The shrunken version run by CI (`[quick]`), or the scenario itself
    /// when it has no `[quick]` table.
    pub fn quick(&self) -> Result<Scenario, String> {
        let mut s = self.clone();
        s.is_quick = true;
        let Some(q) = &self.quick else {
            return Ok(s);
        };
        let scale = |t: Nanos| Nanos::new((t.as_u64() as f64 * q.time_scale).round() as u64);
        s.duration = scale(s.duration);
        for f in &mut s.faults {
            f.at = scale(f.at);
        }
        for g in &mut s.traffic {
            g.keys = ((g.keys as f64 * q.key_scale).round() as usize).max(1);
            for p in &mut g.profile {
                p.0 = scale(p.0);
            }
            for b in &mut g.bursts {
                b.at = scale(b.at);
            }
        }
        if let Some(n) = q.nodes {
            if n == 0 || n > s.nodes {
                return Err(format!("quick.nodes = {n}: between 1 and {}", s.nodes));
            }
            s = s.with_nodes(n).map_err(|e| format!("quick.nodes: {e}"))?;
        }
        Ok(s)
    }

    /// The same scenario on `n` nodes (traffic spread evenly over them):
    /// for scenarios without faults and with an even split, such as the
    /// scale measurements (`run <scenario> --nodes N`).
    pub fn with_nodes(&self, n: usize) -> Result<Scenario, String> {
        if n == 0 || n > drl_core::slot::SLOT_SPACE {
            return Err(format!(
                "nodes = {n}: between 1 and {}",
                drl_core::slot::SLOT_SPACE
            ));
        }
        let mut s = self.clone();
        s.nodes = n;
        for g in &mut s.traffic {
            if g.split.len() != n {
                let uniform = g.split.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-12);
                if !uniform {
                    return Err("a new node count needs a uniform traffic split".into());
                }
                g.split = vec![1.0 / n as f64; n];
            }
            if g.bursts.iter().any(|b| b.node.is_some_and(|x| x >= n)) {
                return Err("the new node count leaves a burst without its node".into());
            }
        }
        if !s.faults.is_empty() {
            return Err("a new node count is for scenarios without faults".into());
        }
        Ok(s)
    }

    /// Every `(cut, heal)` interval of the first isolated group, if any:
    /// the partition the per-side figures describe.
    pub fn partition(&self) -> Option<(Vec<u16>, Nanos, Nanos)> {
        let (group, cut) = self.faults.iter().find_map(|f| match &f.action {
            FaultAction::Isolate(g) => Some((g.clone(), f.at)),
            _ => None,
        })?;
        let heal = self
            .faults
            .iter()
            .find_map(|f| match &f.action {
                FaultAction::Heal(g) if *g == group && f.at >= cut => Some(f.at),
                _ => None,
            })
            .unwrap_or(self.duration);
        Some((group, cut, heal.min(self.duration)))
    }

    /// The largest difference between two nodes' clock offsets.
    pub fn relative_skew(&self) -> Nanos {
        let mut offsets = vec![0i64; self.nodes];
        for f in &self.faults {
            if let FaultAction::Skew { node, offset_ns } = f.action {
                offsets[node] = offset_ns;
            }
        }
        let hi = offsets.iter().copied().max().unwrap_or(0);
        let lo = offsets.iter().copied().min().unwrap_or(0);
        Nanos::new((hi - lo) as u64)
    }

    pub fn total_keys(&self) -> usize {
        self.traffic.iter().map(|g| g.keys).sum()
    }
}

fn traffic_group(i: usize, t: &TrafficFile, nodes: usize) -> Result<TrafficGroup, String> {
    let name = t.name.clone().unwrap_or_else(|| format!("group{i}"));
    let at = |what: &str| format!("traffic {name:?}: {what}");
    if t.keys == 0 {
        return Err(at("keys must be at least 1"));
    }
    let profile = match (&t.profile, t.rate) {
        (Some(_), Some(_)) => return Err(at("give rate or profile, not both")),
        (None, None) => return Err(at("give rate or profile")),
        (None, Some(r)) => vec![(Nanos::ZERO, r)],
        (Some(points), None) => {
            let mut out = Vec::new();
            for (time, rate) in points {
                out.push((duration("profile time", time)?, *rate));
            }
            if out.is_empty() || out.windows(2).any(|w| w[1].0 < w[0].0) {
                return Err(at("profile points must be non-empty and in time order"));
            }
            out
        }
    };
    if profile.iter().any(|p| !(p.1 >= 0.0 && p.1.is_finite())) {
        return Err(at("rates must be finite and non-negative"));
    }
    let split = match &t.split {
        None => vec![1.0 / nodes as f64; nodes],
        Some(w)
            if w.len() == nodes && w.iter().all(|x| *x >= 0.0) && w.iter().sum::<f64>() > 0.0 =>
        {
            let sum: f64 = w.iter().sum();
            w.iter().map(|x| x / sum).collect()
        }
        Some(_) => return Err(at("split needs one non-negative weight per node")),
    };
    let zipf = match t.zipf {
        Some(z) if !(z > 0.0 && z.is_finite()) => {
            return Err(at("zipf must be a positive exponent"))
        }
        z => z,
    };
    let mut bursts = Vec::new();
    for b in &t.bursts {
        if b.node.is_some_and(|n| n >= nodes) {
            return Err(at("burst node out of range"));
        }
        bursts.push(Burst {
            at: duration("burst at", &b.at)?,
            count: b.count,
            over: duration("burst over", &b.over)?,
            node: b.node,
        });
    }
    Ok(TrafficGroup {
        name,
        keys: t.keys,
        profile,
        split,
        arrivals: t.arrivals,
        bursts,
        zipf,
    })
}

fn parse_fault(f: &FaultFile, nodes: usize) -> Result<Fault, String> {
    let at = duration("fault at", &f.at)?;
    let ctx = |m: &str| format!("fault {:?} at {}: {m}", f.action, f.at);
    let node_ok = |n: usize| {
        if n < nodes {
            Ok(n)
        } else {
            Err(ctx("node out of range"))
        }
    };
    let need_node = || f.node.ok_or_else(|| ctx("needs `node`")).and_then(node_ok);
    let pair = |x: Option<u16>, y: Option<u16>, nx: &str, ny: &str| -> Result<(u16, u16), String> {
        let (x, y) = (
            x.ok_or_else(|| ctx(&format!("needs `{nx}`")))?,
            y.ok_or_else(|| ctx(&format!("needs `{ny}`")))?,
        );
        node_ok(x as usize)?;
        node_ok(y as usize)?;
        if x == y {
            return Err(ctx("a link joins two different nodes"));
        }
        Ok((x, y))
    };
    let group = || -> Result<Vec<u16>, String> {
        let g = f.nodes.clone().ok_or_else(|| ctx("needs `nodes`"))?;
        if g.is_empty() || g.len() >= nodes {
            return Err(ctx("`nodes` must be a non-empty proper subset"));
        }
        for &n in &g {
            node_ok(n as usize)?;
        }
        Ok(g)
    };
    let up = || f.up.ok_or_else(|| ctx("needs `up`"));
    let action = match f.action.as_str() {
        "isolate" => FaultAction::Isolate(group()?),
        "heal" => FaultAction::Heal(group()?),
        "link" => {
            let (a, b) = pair(f.a, f.b, "a", "b")?;
            FaultAction::Link { a, b, up: up()? }
        }
        "one_way" => {
            let (from, to) = pair(f.from, f.to, "from", "to")?;
            FaultAction::OneWay {
                from,
                to,
                up: up()?,
            }
        }
        "crash" => FaultAction::Crash(need_node()?),
        "restart" => FaultAction::Restart(need_node()?),
        "join" => FaultAction::Join,
        "leave" => FaultAction::Leave(need_node()?),
        "pause" => FaultAction::Pause(need_node()?),
        "resume" => FaultAction::Resume(need_node()?),
        "skew" => FaultAction::Skew {
            node: need_node()?,
            offset_ns: signed_duration(
                "offset",
                f.offset.as_deref().ok_or_else(|| ctx("needs `offset`"))?,
            )?,
        },
        "network" => FaultAction::Network(network(
            &NetworkFile {
                latency: f.latency.clone(),
                jitter: f.jitter.clone(),
                loss: f.loss,
                duplicate: f.duplicate,
            },
            &NetFaults::default(),
        )?),
        other => {
            return Err(ctx(&format!(
            "unknown action {other:?}: isolate, heal, link, one_way, crash, restart, join, leave, pause, resume, skew, network"
        )))
        }
    };
    Ok(Fault { at, action })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "t"
        description = "d"
        nodes = 3
        duration = "2s"
        rules = '''
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "sliding_window", limit = 100, window = "1s" } ]
        '''
        [[traffic]]
        keys = 2
        profile = [["0s", 0], ["1s", 0], ["1010ms", 1000]]
        [[faults]]
        at = "500ms"
        action = "skew"
        node = 1
        offset = "-50ms"
    "#;

    #[test]
    fn a_scenario_parses_and_shrinks() {
        let s = Scenario::from_toml(BASE).unwrap();
        assert_eq!(
            s.limit,
            LimitSpec::Sliding {
                limit: 100,
                window: Nanos::from_secs(1),
                precision: 1
            }
        );
        assert_eq!(s.relative_skew(), Nanos::from_millis(50));
        let g = &s.traffic[0];
        assert_eq!(g.rate_at(Nanos::from_millis(500)), 0.0);
        assert!((g.rate_at(Nanos::from_millis(1005)) - 500.0).abs() < 1e-9);
        assert_eq!(g.rate_at(Nanos::from_secs(5)), 1000.0);
        assert!((g.split.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let q = s.quick().unwrap();
        assert!(q.is_quick);
        assert_eq!(q.duration, s.duration, "no [quick]: unchanged");
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        let bad = BASE.replace("offset = \"-50ms\"", "offset = \"-50\"");
        assert!(Scenario::from_toml(&bad).unwrap_err().contains("offset"));
        let bad = BASE.replace("node = 1", "node = 7");
        assert!(Scenario::from_toml(&bad)
            .unwrap_err()
            .contains("out of range"));
        // GCRA without `per` is refused by the rules themselves.
        let bad = BASE.replace("sliding_window", "gcra");
        assert!(Scenario::from_toml(&bad).is_err());
        let bad = BASE.replace("keys = 2", "keys = 2\nrate = 5");
        assert!(Scenario::from_toml(&bad).unwrap_err().contains("not both"));
    }

    #[test]
    fn any_node_count_is_accepted_and_a_scenario_can_be_resized() {
        let one = r#"
name = "n"
description = "d"
nodes = 300
duration = "1s"
rules = '''
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 10, window = "1s" } ]
'''

[[traffic]]
name = "user"
keys = 2
rate = 10
"#;
        let s = Scenario::from_toml(one).unwrap();
        assert_eq!(s.nodes, 300);
        let n = s.with_nodes(1000).unwrap();
        assert_eq!(n.nodes, 1000);
        assert_eq!(n.traffic[0].split.len(), 1000);
        assert!(s.with_nodes(0).is_err());
        assert!(s.with_nodes(65_537).is_err());
        // A scenario with faults keeps its node count.
        assert!(Scenario::from_toml(BASE).unwrap().with_nodes(8).is_err());
    }
}
