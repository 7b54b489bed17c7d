//! Limit-size matrices: one key, every limit size on every cluster size.
//!
//! A matrix file (`matrices/*.toml`) names limit sizes, cluster sizes and
//! ways of spreading one key's requests over the nodes (all to one node,
//! round robin, random). Every combination runs twice on the in-memory
//! cluster, with a fixed window (exact per aligned window, so "admitted"
//! and "the limit" compare without any estimator in between):
//!
//! - *sequential*: `2·L` requests one after another, each sent `gap` after
//!   the previous answer, all inside one window. Exact means admitted =
//!   `L`, and the first answer says `L − 1` left.
//! - *concurrent*: Poisson arrivals at twice the limit for several windows.
//!   Overshoot is the most admissions of any aligned window over `L` (the
//!   design promises none in a healthy cluster); utilisation is admitted
//!   over `min(L, offered)`, per window, averaged.
//!
//! The same matrix can run the earlier design (refuse near the limit
//! instead of confirming), which is how the two were compared.

use std::path::Path;

use drl_core::cluster::harness::{ClusterSpec, MemCluster, Submitted};
use drl_core::time::Nanos;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// A matrix, as read from its file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    pub name: String,
    pub description: String,
    pub limits: Vec<u64>,
    pub nodes: Vec<usize>,
    pub spreads: Vec<Spread>,
    /// Pause between an answer and the next sequential request (ms).
    pub gap_ms: u64,
    /// Aligned windows of concurrent load at twice the limit; small limits
    /// run more windows so that they see at least `min_offered` requests.
    pub windows: u64,
    pub min_offered: u64,
    /// The CI version: fewer sizes.
    pub quick: Option<MatrixQuick>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixQuick {
    pub limits: Vec<u64>,
    pub nodes: Vec<usize>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Spread {
    /// Every request to node 0.
    One,
    RoundRobin,
    Random,
}

impl Spread {
    fn name(self) -> &'static str {
        match self {
            Spread::One => "one node",
            Spread::RoundRobin => "round robin",
            Spread::Random => "random",
        }
    }
}

/// What every cell of a matrix is held to (`bounds.toml`, `[matrix.*]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixBounds {
    /// Sequential traffic admitted exactly, and `L − 1` on the first answer.
    pub sequential_exact: bool,
    /// Most admissions of any aligned window over the limit, at 2× load.
    pub overshoot_max: u64,
    /// Utilisation at 2× load for limits of at least `large_from`...
    pub utilisation_min_large: f64,
    /// ...and below it.
    pub utilisation_min_small: f64,
    pub large_from: u64,
    pub why: String,
}

/// The figures of one combination.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub limit: u64,
    pub nodes: usize,
    pub spread: Spread,
    pub sequential_offered: u64,
    pub sequential_admitted: u64,
    /// `remaining` on the first answer.
    pub first_remaining: u64,
    /// Sequential requests that waited for a confirmation.
    pub sequential_confirmed: u64,
    pub concurrent_offered: u64,
    pub concurrent_admitted: u64,
    /// Most admissions of any aligned window, over the limit.
    pub overshoot: u64,
    pub utilisation: f64,
}

impl Cell {
    pub fn exact(&self) -> bool {
        self.sequential_admitted == self.limit.min(self.sequential_offered)
            && self.first_remaining == self.limit - 1
    }
}

impl Matrix {
    pub fn load(path: &Path) -> Result<Matrix, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let m: Matrix = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if m.limits.is_empty() || m.nodes.is_empty() || m.spreads.is_empty() {
            return Err(format!("{}: limits, nodes and spreads", path.display()));
        }
        let most = drl_core::slot::SLOT_SPACE;
        if m.limits.contains(&0) || m.nodes.iter().any(|&n| n == 0 || n > most) {
            return Err(format!("{}: limits ≥ 1, 1 to {most} nodes", path.display()));
        }
        Ok(m)
    }

    /// The CI version.
    pub fn quick(&self) -> Matrix {
        let mut m = self.clone();
        if let Some(q) = &self.quick {
            m.limits = q.limits.clone();
            m.nodes = q.nodes.clone();
        }
        m
    }

    /// Runs every combination (`confirm`: the design in force, or the
    /// earlier one).
    pub fn run(&self, seed: u64, confirm: bool) -> Result<Vec<Cell>, String> {
        let mut cells = Vec::new();
        for &nodes in &self.nodes {
            for &limit in &self.limits {
                for &spread in &self.spreads {
                    cells.push(self.cell(seed, confirm, limit, nodes, spread)?);
                }
            }
        }
        Ok(cells)
    }

    fn cell(
        &self,
        seed: u64,
        confirm: bool,
        limit: u64,
        nodes: usize,
        spread: Spread,
    ) -> Result<Cell, String> {
        let seed = seed ^ limit.rotate_left(20) ^ (nodes as u64).rotate_left(40);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pick = {
            let mut i = 0usize;
            move |rng: &mut StdRng| {
                i += 1;
                match spread {
                    Spread::One => 0,
                    Spread::RoundRobin => (i - 1) % nodes,
                    Spread::Random => rng.random_range(0..nodes),
                }
            }
        };

        // Sequential: one window of an hour holds every request.
        let mut c = cluster(nodes, limit, "1h", seed, confirm)?;
        let offered = 2 * limit;
        let (mut admitted, mut first_remaining, mut confirmed) = (0, 0, 0);
        for i in 0..offered {
            let node = pick(&mut rng);
            let before = c.replicator(node).stats().claims_sent;
            let d = c
                .check(node, &[("user", "k")], 1)
                .map_err(|e| e.to_string())?;
            confirmed += u64::from(c.replicator(node).stats().claims_sent > before);
            if i == 0 {
                first_remaining = d.quota.map_or(0, |q| q.remaining);
            }
            admitted += u64::from(d.is_allowed());
            c.advance(Nanos::from_millis(self.gap_ms));
        }

        // Concurrent: Poisson at twice the limit, per aligned second.
        let windows = self.windows.max(self.min_offered.div_ceil(2 * limit));
        let mut c = cluster(nodes, limit, "1s", seed, confirm)?;
        let start = c.now();
        let rate = 2.0 * limit as f64;
        let mut t = 0.0f64;
        let mut per_window = vec![(0u64, 0u64); windows as usize];
        let end = windows as f64 * 1e9;
        let mut waiting = std::collections::BTreeMap::new();
        let tally = |w: &mut Vec<(u64, u64)>, at: u64, allowed: bool| {
            let i = (at / 1_000_000_000) as usize;
            if let Some(x) = w.get_mut(i) {
                x.1 += u64::from(allowed);
            }
        };
        loop {
            let u: f64 = rng.random::<f64>();
            t += -(1.0 - u).ln() / rate * 1e9;
            if t >= end {
                break;
            }
            let at = Nanos::new(t as u64);
            let now = c.now() - start;
            if at > now {
                c.advance(at - now);
            }
            for (id, _, d, judged) in c.take_completed() {
                if waiting.remove(&id).is_some() {
                    // Counted in the window it was judged in.
                    tally(&mut per_window, (judged - start).as_u64(), d.is_allowed());
                }
            }
            let i = (at.as_u64() / 1_000_000_000) as usize;
            per_window[i].0 += 1;
            let node = pick(&mut rng);
            match c
                .submit(node, &[("user", "k")], 1)
                .map_err(|e| e.to_string())?
            {
                Submitted::Done(d) => tally(&mut per_window, at.as_u64(), d.is_allowed()),
                Submitted::Waiting(id) => {
                    waiting.insert(id, at.as_u64());
                }
            }
        }
        while !waiting.is_empty() {
            c.advance(Nanos::from_millis(1));
            for (id, _, d, judged) in c.take_completed() {
                if waiting.remove(&id).is_some() {
                    tally(&mut per_window, (judged - start).as_u64(), d.is_allowed());
                }
            }
        }
        let concurrent_offered = per_window.iter().map(|w| w.0).sum();
        let concurrent_admitted = per_window.iter().map(|w| w.1).sum();
        let overshoot = per_window
            .iter()
            .map(|w| w.1.saturating_sub(limit))
            .max()
            .unwrap_or(0);
        let used: Vec<f64> = per_window
            .iter()
            .filter(|w| w.0 > 0)
            .map(|w| w.1 as f64 / w.0.min(limit) as f64)
            .collect();
        let utilisation = used.iter().sum::<f64>() / used.len().max(1) as f64;
        Ok(Cell {
            limit,
            nodes,
            spread,
            sequential_offered: offered,
            sequential_admitted: admitted,
            first_remaining,
            sequential_confirmed: confirmed,
            concurrent_offered,
            concurrent_admitted,
            overshoot,
            utilisation,
        })
    }
}

/// A healthy cluster with one fixed-window rule, its clock at the start of
/// an aligned hour (so that no window boundary falls inside a run).
fn cluster(
    nodes: usize,
    limit: u64,
    window: &str,
    seed: u64,
    confirm: bool,
) -> Result<MemCluster, String> {
    let rules = format!(
        r#"
        [[rules]]
        name = "one-key"
        match = {{ user = "*" }}
        limits = [ {{ algorithm = "fixed_window", limit = {limit}, window = "{window}" }} ]
        "#
    );
    let mut spec = ClusterSpec::new(nodes, &rules, seed);
    spec.start = Nanos::from_secs(1_700_000_000 / 3600 * 3600 + 3600);
    spec.confirm = confirm;
    spec.max_keys = 16;
    MemCluster::new(spec)
}

/// The cells as a Markdown table.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| nodes | limit | spread | sequential: admitted / offered (expected) | first `remaining` | confirmed | 2× load: overshoot | utilisation |\n|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        out.push_str(&format!(
            "| {} | {} | {} | {} / {} ({}){} | {} | {} | {} | {:.1} % |\n",
            c.nodes,
            c.limit,
            c.spread.name(),
            c.sequential_admitted,
            c.sequential_offered,
            c.limit,
            if c.exact() { "" } else { " **not exact**" },
            c.first_remaining,
            c.sequential_confirmed,
            c.overshoot,
            c.utilisation * 100.0
        ));
    }
    out
}

/// The cells that break `bounds`, each with what it measured.
pub fn broken(cells: &[Cell], bounds: &MatrixBounds) -> Vec<String> {
    let mut out = Vec::new();
    for c in cells {
        let at = format!("{} nodes, limit {}, {}", c.nodes, c.limit, c.spread.name());
        if bounds.sequential_exact && !c.exact() {
            out.push(format!(
                "{at}: sequential admitted {} of {} (expected {}), first remaining {}",
                c.sequential_admitted,
                c.sequential_offered,
                c.limit.min(c.sequential_offered),
                c.first_remaining
            ));
        }
        if c.overshoot > bounds.overshoot_max {
            out.push(format!("{at}: overshoot {}", c.overshoot));
        }
        let floor = if c.limit >= bounds.large_from {
            bounds.utilisation_min_large
        } else {
            bounds.utilisation_min_small
        };
        if c.utilisation < floor {
            out.push(format!(
                "{at}: utilisation {:.1} % < {:.0} %",
                c.utilisation * 100.0,
                floor * 100.0
            ));
        }
    }
    out
}
