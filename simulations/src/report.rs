//! Results: the JSON of one scenario, the bounds and targets it is held to,
//! and the markdown summary of a whole run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use drl_core::share::SharePolicy;
use serde::{Deserialize, Serialize};

use crate::metrics::Figures;
use crate::scenario::{FaultAction, Scenario};

/// One bound or target: `max`, `min` or both, and where it comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// In place of `max` / `min` for the shrunken CI run, when its shorter
    /// times change what the derivation gives.
    pub quick_max: Option<f64>,
    pub quick_min: Option<f64>,
    pub why: String,
}

/// `simulations/bounds.toml`: scenario → metric → limit. `bounds` are what
/// the design guarantees and CI enforces; `targets` are the goals,
/// reported as met or missed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundsFile {
    #[serde(default)]
    pub bounds: BTreeMap<String, BTreeMap<String, Limit>>,
    #[serde(default)]
    pub targets: BTreeMap<String, BTreeMap<String, Limit>>,
    /// Limit-size matrix → what every one of its cells is held to.
    #[serde(default)]
    pub matrix: BTreeMap<String, crate::matrix::MatrixBounds>,
}

impl BoundsFile {
    pub fn load(path: &Path) -> Result<BoundsFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Check {
    /// `bound` (enforced) or `target` (reported).
    pub kind: String,
    pub metric: String,
    /// `<=` or `>=`.
    pub op: String,
    pub limit: f64,
    pub measured: Option<f64>,
    pub pass: bool,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    pub nodes: usize,
    pub policy: String,
    pub bounded_fraction: Option<f64>,
    pub duration_s: f64,
    pub sync_interval_ms: f64,
    pub inflight_ppm: u32,
    pub detect_after_ms: f64,
    /// What each node runs: `core` (its whole `NodeCore`: real SWIM,
    /// rules replication) or `replicator` (the failure-detector stand-in).
    pub driver: String,
    pub algorithm: String,
    pub quota: u64,
    pub period_s: f64,
    pub keys: usize,
    pub network: String,
    pub faults: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupResult {
    pub name: String,
    pub keys: usize,
    pub figures: Figures,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub quick: bool,
    pub setup: Setup,
    pub figures: Figures,
    pub groups: Vec<GroupResult>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    /// A figure by name; `group.metric` reads a traffic group's.
    pub fn figure(&self, metric: &str) -> Option<f64> {
        match metric.split_once('.') {
            Some((group, m)) => self
                .groups
                .iter()
                .find(|g| g.name == group)
                .and_then(|g| g.figures.get(m).copied()),
            None => self.figures.get(metric).copied(),
        }
    }

    pub fn bounds_pass(&self) -> bool {
        self.checks
            .iter()
            .filter(|c| c.kind == "bound")
            .all(|c| c.pass)
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("results serialize");
        s.push('\n');
        s
    }
}

fn secs(t: drl_core::time::Nanos) -> f64 {
    t.as_u64() as f64 / 1e9
}

fn describe(action: &FaultAction) -> String {
    match action {
        FaultAction::Isolate(g) => format!("isolate {g:?}"),
        FaultAction::Heal(g) => format!("heal {g:?}"),
        FaultAction::Link { a, b, up } => {
            format!("link {a}<->{b} {}", if *up { "up" } else { "cut" })
        }
        FaultAction::OneWay { from, to, up } => {
            format!("one-way {from}->{to} {}", if *up { "up" } else { "cut" })
        }
        FaultAction::Crash(n) => format!("crash {n}"),
        FaultAction::Restart(n) => format!("restart {n}"),
        FaultAction::Join => "join".into(),
        FaultAction::Leave(n) => format!("leave {n}"),
        FaultAction::Pause(n) => format!("pause {n}"),
        FaultAction::Resume(n) => format!("resume {n}"),
        FaultAction::Skew { node, offset_ns } => {
            format!("skew node {node} {:+}ms", *offset_ns as f64 / 1e6)
        }
        FaultAction::Network(f) => network(f),
    }
}

fn network(f: &drl_core::cluster::harness::NetFaults) -> String {
    format!(
        "latency {}ms, jitter {}ms, loss {}, duplicate {}",
        f.latency.as_u64() as f64 / 1e6,
        f.jitter.as_u64() as f64 / 1e6,
        f.loss,
        f.duplicate
    )
}

pub fn setup(s: &Scenario) -> Setup {
    Setup {
        nodes: s.nodes,
        policy: s.policy.name().to_owned(),
        bounded_fraction: match s.policy {
            SharePolicy::Bounded { fraction_ppm } => Some(f64::from(fraction_ppm) / 1e6),
            _ => None,
        },
        duration_s: secs(s.duration),
        sync_interval_ms: s.sync_interval.as_u64() as f64 / 1e6,
        inflight_ppm: s.inflight_ppm,
        detect_after_ms: s.detect_after.as_u64() as f64 / 1e6,
        driver: if s.whole_core { "core" } else { "replicator" }.to_owned(),
        algorithm: s.limit.name().to_owned(),
        quota: s.limit.quota(),
        period_s: secs(s.limit.period()),
        keys: s.total_keys(),
        network: network(&s.network),
        faults: s
            .faults
            .iter()
            .map(|f| format!("{}s: {}", secs(f.at), describe(&f.action)))
            .collect(),
    }
}

/// Checks `result` against the bounds and targets of its scenario.
pub fn check(result: &mut ScenarioResult, bounds: &BoundsFile) {
    let mut checks = Vec::new();
    for (kind, table) in [("bound", &bounds.bounds), ("target", &bounds.targets)] {
        let Some(limits) = table.get(&result.scenario) else {
            continue;
        };
        for (metric, l) in limits {
            let measured = result.figure(metric);
            let (max, min) = if result.quick {
                (l.quick_max.or(l.max), l.quick_min.or(l.min))
            } else {
                (l.max, l.min)
            };
            for (op, limit) in [("<=", max), (">=", min)] {
                let Some(limit) = limit else { continue };
                let pass =
                    measured.is_some_and(|m| if op == "<=" { m <= limit } else { m >= limit });
                checks.push(Check {
                    kind: kind.to_owned(),
                    metric: metric.clone(),
                    op: op.to_owned(),
                    limit,
                    measured,
                    pass,
                    why: l.why.clone(),
                });
            }
        }
    }
    result.checks = checks;
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:.2}%", v * 100.0),
        None => "–".into(),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "–".into(),
    }
}

/// The markdown summary of a set of results.
pub fn summary(results: &[ScenarioResult], seed: u64, quick: bool) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Simulation results\n");
    let _ = writeln!(
        m,
        "Generated by `cargo run --release -p simulations -- all{}` with seed {seed}; \
         every figure replays exactly from the seed (`-- run <scenario> --seed {seed}`). \
         Definitions are in `simulations/README.md`; bounds and targets in \
         `simulations/bounds.toml`. Overshoot and utilisation are fractions of the \
         limit (for the token bucket, of its capacity); bytes are frame bytes as the \
         in-memory harness counts them, without QUIC, UDP or IP headers.\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(m, "## Overshoot and decisions\n");
    let _ = writeln!(
        m,
        "| scenario | nodes | policy | requests | overshoot p50 / p99 / max | single-node baseline p99 / max | excess requests | beyond the algorithm (requests, max) | false allow | false deny (share-capped) | same-history false allow / deny (share-capped) |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let mut rows = vec![(r.scenario.clone(), r.figures.clone())];
        for g in &r.groups {
            rows.push((format!("{} / {}", r.scenario, g.name), g.figures.clone()));
        }
        for (name, f) in rows {
            let g = |k: &str| f.get(k).copied();
            let _ = writeln!(
                m,
                "| {name} | {} | {} | {} | {} / {} / {} | {} / {} | {} ({}) | {} ({}) | {} | {} ({}) | {} / {} ({}) |",
                r.setup.nodes,
                r.setup.policy,
                num(g("requests"), 0),
                pct(g("overshoot_p50")),
                pct(g("overshoot_p99")),
                pct(g("overshoot_max")),
                pct(g("baseline_overshoot_p99")),
                pct(g("baseline_overshoot_max")),
                num(g("excess_requests"), 0),
                pct(g("excess_fraction")),
                num(g("algo_excess_requests"), 0),
                pct(g("algo_overshoot_max")),
                pct(g("false_allow")),
                pct(g("false_deny")),
                pct(g("false_deny_share_capped")),
                pct(g("history_false_allow")),
                pct(g("history_false_deny")),
                pct(g("history_false_deny_share_capped")),
            );
        }
    }
    let _ = writeln!(m, "\n## Utilisation, convergence and bytes\n");
    let _ = writeln!(
        m,
        "| scenario | utilisation mean (min) | majority / minority / both sides during the cut | write convergence p50 / p99 / max (ms) | heal p99 (ms) | restart p99 (ms), admitting after (ms) | bytes per changed key per sync (per peer) |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    for r in results {
        let g = |k: &str| r.figures.get(k).copied();
        let side = if g("cut_total_utilisation").is_some() {
            format!(
                "{} / {} / {}",
                pct(g("majority_utilisation")),
                pct(g("minority_utilisation")),
                pct(g("cut_total_utilisation"))
            )
        } else {
            "–".into()
        };
        let restart = if g("restart_admitting_ms").is_some() {
            format!(
                "{}, {}",
                num(g("convergence_restart_p99_ms"), 2),
                num(g("restart_admitting_ms"), 2)
            )
        } else {
            "–".into()
        };
        let _ = writeln!(
            m,
            "| {} | {} ({}) | {} | {} / {} / {} | {} | {} | {} ({}) |",
            r.scenario,
            pct(g("utilisation_mean")),
            pct(g("utilisation_min")),
            side,
            num(g("convergence_write_p50_ms"), 2),
            num(g("convergence_write_p99_ms"), 2),
            num(g("convergence_write_max_ms"), 2),
            num(g("convergence_heal_p99_ms"), 2),
            restart,
            num(g("bytes_per_changed_key"), 1),
            num(g("bytes_per_changed_key_per_peer"), 1),
        );
    }
    let _ = writeln!(m, "\n## Bounds (enforced by CI) and targets (reported)\n");
    let _ = writeln!(
        m,
        "| scenario | kind | metric | measured | limit | result |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|");
    for r in results {
        for c in &r.checks {
            let _ = writeln!(
                m,
                "| {} | {} | `{}` | {} | {} {} | {} |",
                r.scenario,
                c.kind,
                c.metric,
                num(c.measured, 6),
                c.op,
                c.limit,
                match (c.pass, c.kind.as_str()) {
                    (true, _) => "met",
                    (false, "bound") => "**BROKEN**",
                    (false, _) => "missed",
                }
            );
        }
    }
    let notes: Vec<(&str, &String)> = results
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| (r.scenario.as_str(), n)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(m, "\n## Notes\n");
        for (s, n) in notes {
            let _ = writeln!(m, "- {s}: {n}");
        }
    }
    m
}
