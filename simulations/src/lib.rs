//! Deterministic simulations of the distributed rate limiter.
//!
//! Each scenario (a TOML file in `scenarios/`) runs the real limiter, share
//! and replication code of N nodes on virtual time in
//! [`drl_core::cluster::harness::MemCluster`], under the scenario's traffic and
//! faults, and measures the result against an exact oracle that replays every
//! admission on the reference clock. A run is a pure function of the scenario
//! and the seed: the same seed gives byte-identical JSON.
//!
//! # Layout
//!
//! - [`scenario`]: the scenario file format, parsed and checked; `[quick]`
//!   shrinking for CI.
//! - [`traffic`]: every arrival of a run, generated up front from the seed.
//! - [`run`]: drives the cluster through arrivals and faults, beside a
//!   single-node reference limiter and an algorithm replay; convergence
//!   probes ([`probe`]).
//! - [`oracle`]: exact overshoot and excess of an admitted history.
//! - [`metrics`]: figures from a run's records.
//! - [`report`]: bounds and targets (`bounds.toml`), JSON, `summary.md`.
//! - [`plot`]: PNG of admitted versus limit over time.
//! - [`matrix`]: limit-size matrices (`matrices/`): one key, every limit
//!   size on every cluster size, sequential and at twice the limit.

pub mod matrix;
pub mod metrics;
pub mod oracle;
pub mod plot;
pub mod probe;
pub mod report;
pub mod run;
pub mod scenario;
pub mod traffic;

use std::path::{Path, PathBuf};

use report::{BoundsFile, GroupResult, ScenarioResult};
use run::RunOutput;
use scenario::Scenario;

/// The seed `all` uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 20_240_611;

/// This crate's folder: scenarios, bounds and results live under it.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every scenario file of `dir`, by name.
pub fn scenario_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every scenario of `dir`, in file-name order.
pub fn load_all(dir: &Path) -> Result<Vec<Scenario>, String> {
    scenario_files(dir)?
        .iter()
        .map(|p| Scenario::load(p))
        .collect()
}

/// Finds a scenario by its name (or file stem) in `dir`.
pub fn find(dir: &Path, name: &str) -> Result<Scenario, String> {
    let all = load_all(dir)?;
    let names: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    all.into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("no scenario {name:?}; there are: {}", names.join(", ")))
}

/// Runs one scenario and measures it.
pub fn evaluate(
    s: &Scenario,
    seed: u64,
    bounds: &BoundsFile,
) -> Result<(ScenarioResult, RunOutput), String> {
    let out = run::run(s, seed)?;
    let (figures, groups) = metrics::figures(s, &out);
    let mut notes = Vec::new();
    let expired = figures
        .get("convergence_write_expired")
        .copied()
        .unwrap_or(0.0);
    if expired > 0.0 {
        notes.push(format!(
            "{expired} sampled admissions were not counted by every live node before their bucket left the window"
        ));
    }
    let mut result = ScenarioResult {
        scenario: s.name.clone(),
        description: s.description.clone(),
        seed,
        quick: s.is_quick,
        setup: report::setup(s),
        figures,
        groups: groups
            .into_iter()
            .map(|(name, keys, figures)| GroupResult {
                name,
                keys,
                figures,
            })
            .collect(),
        checks: Vec::new(),
        notes,
    };
    report::check(&mut result, bounds);
    Ok((result, out))
}

/// Writes `<name>.json` and `<name>.png` into `dir`.
pub fn write_outputs(
    dir: &Path,
    s: &Scenario,
    result: &ScenarioResult,
    out: &RunOutput,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = dir.join(format!("{}.json", s.name));
    std::fs::write(&json, result.to_json()).map_err(|e| format!("{}: {e}", json.display()))?;
    plot::plot(s, out, &dir.join(format!("{}.png", s.name)))
}
