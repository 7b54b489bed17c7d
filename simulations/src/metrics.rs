//! From a run's records to figures: overshoot against the exact oracle,
//! decision error against the single-node reference, utilisation,
//! convergence and bytes on the wire.
//!
//! Figures are a flat map `name → value` (so that bounds can name them),
//! computed over all keys and again per traffic group. Ratios are fractions
//! (0.01 is 1%); times are milliseconds.

use std::collections::BTreeMap;

use drl_core::time::Nanos;

use crate::oracle::{overshoot, percentile};
use crate::probe::ProbeKind;
use crate::run::{RunOutput, Served};
use crate::scenario::Scenario;

pub type Figures = BTreeMap<String, f64>;

/// Rounds to 6 significant decimals so that JSON stays readable; the
/// rounding is deterministic, so replays stay byte-identical.
pub fn round(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let digits = 6 - v.abs().log10().ceil() as i32;
    let scale = 10f64.powi(digits.clamp(0, 12));
    (v * scale).round() / scale
}

fn ms(t: Nanos) -> f64 {
    t.as_u64() as f64 / 1e6
}

/// What one key contributed.
#[derive(Default)]
struct KeyStats {
    requests: u64,
    admitted: u64,
    denied: u64,
    unavailable: u64,
    reference_admitted: u64,
    false_allow: u64,
    false_deny: u64,
    share_capped: u64,
    false_deny_share_capped: u64,
    samples: Vec<f64>,
    excess: u64,
    baseline_samples: Vec<f64>,
    baseline_excess: u64,
    algo_excess: u64,
    algo_would_admit: u64,
    algo_would_admit_share_capped: u64,
    algo_overshoot: f64,
    utilisation: Option<f64>,
    side: Option<SideStats>,
}

#[derive(Default, Clone, Copy)]
struct SideStats {
    majority: Option<f64>,
    minority: Option<f64>,
    total: f64,
    /// Hits the cut-off side admitted during the cut.
    minority_admitted: u64,
}

/// Most admissions any window of length `w` holds among `times`.
fn max_in_window(times: &[u64], w: u64) -> u64 {
    let (mut lo, mut best) = (0, 0);
    for (i, &t) in times.iter().enumerate() {
        while times[lo] + w <= t {
            lo += 1;
        }
        best = best.max((i - lo + 1) as u64);
    }
    best
}

fn key_stats(s: &Scenario, out: &RunOutput, records: &[u32]) -> KeyStats {
    let spec = &s.limit;
    let quota = spec.quota();
    let period = spec.period().as_u64();
    let origin = out.origin;
    let mut k = KeyStats::default();
    let (mut admitted, mut reference, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    let mut offered: BTreeMap<u64, u64> = BTreeMap::new();
    let partition = s.partition();
    let (mut maj_adm, mut maj_off, mut min_adm, mut min_off) = (0u64, 0u64, 0u64, 0u64);
    for &i in records {
        let r = &out.records[i as usize];
        let t = origin + r.at;
        k.requests += 1;
        *offered.entry(t / period).or_default() += 1;
        let allowed = r.served == Served::Allowed;
        match r.served {
            Served::Allowed => {
                k.admitted += 1;
                admitted.push(t);
            }
            Served::Denied => k.denied += 1,
            Served::Unavailable => k.unavailable += 1,
        }
        if r.reference {
            k.reference_admitted += 1;
            reference.push(t);
        }
        if r.algo_refused {
            k.algo_excess += 1;
            refused.push(t);
        }
        if r.share_capped {
            k.share_capped += 1;
        }
        if r.algo_would_admit {
            k.algo_would_admit += 1;
            if r.share_capped {
                k.algo_would_admit_share_capped += 1;
            }
        }
        match (allowed, r.reference) {
            (true, false) => k.false_allow += 1,
            (false, true) => {
                k.false_deny += 1;
                if r.share_capped {
                    k.false_deny_share_capped += 1;
                }
            }
            _ => {}
        }
        if let Some((group, cut, heal)) = &partition {
            if r.at >= cut.as_u64() && r.at < heal.as_u64() {
                if group.contains(&r.target) {
                    min_off += 1;
                } else {
                    maj_off += 1;
                }
                if allowed {
                    if group.contains(&r.node) {
                        min_adm += 1;
                    } else {
                        maj_adm += 1;
                    }
                }
            }
        }
    }
    let o = overshoot(spec, &admitted);
    k.samples = o.samples;
    k.excess = o.excess;
    let b = overshoot(spec, &reference);
    k.baseline_samples = b.samples;
    k.baseline_excess = b.excess;
    k.algo_overshoot = max_in_window(&refused, period) as f64 / quota as f64;
    let denominator = match spec.envelope() {
        Some((capacity, refill, per)) => {
            let envelope =
                capacity as f64 + refill as f64 * s.duration.as_u64() as f64 / per.as_u64() as f64;
            (k.requests as f64).min(envelope)
        }
        _ => offered.values().map(|&o| o.min(quota)).sum::<u64>() as f64,
    };
    if denominator > 0.0 {
        k.utilisation = Some(k.admitted as f64 / denominator);
    }
    if let Some((_, cut, heal)) = &partition {
        let allowance =
            spec.rate_per_period() as f64 * (*heal - *cut).as_u64() as f64 / period as f64;
        let util = |adm: u64, off: u64| {
            let d = (off as f64).min(allowance);
            (d > 0.0).then(|| adm as f64 / d)
        };
        k.side = Some(SideStats {
            majority: util(maj_adm, maj_off),
            minority: util(min_adm, min_off),
            total: (maj_adm + min_adm) as f64 / allowance.max(1.0),
            minority_admitted: min_adm,
        });
    }
    k
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Figures of a set of keys.
fn key_figures(stats: &[&KeyStats]) -> Figures {
    let mut f = Figures::new();
    let sum = |g: fn(&KeyStats) -> u64| stats.iter().map(|k| g(k)).sum::<u64>();
    let requests = sum(|k| k.requests);
    let admitted = sum(|k| k.admitted);
    let frac = |n: u64| n as f64 / requests.max(1) as f64;
    f.insert("requests".into(), requests as f64);
    f.insert("admitted".into(), admitted as f64);
    f.insert("denied".into(), sum(|k| k.denied) as f64);
    f.insert("unavailable".into(), sum(|k| k.unavailable) as f64);
    f.insert(
        "reference_admitted".into(),
        sum(|k| k.reference_admitted) as f64,
    );

    let samples = sorted(
        stats
            .iter()
            .flat_map(|k| k.samples.iter().copied())
            .collect(),
    );
    let baseline = sorted(
        stats
            .iter()
            .flat_map(|k| k.baseline_samples.iter().copied())
            .collect(),
    );
    for (name, v) in [("overshoot", &samples), ("baseline_overshoot", &baseline)] {
        f.insert(format!("{name}_p50"), percentile(v, 0.5));
        f.insert(format!("{name}_p99"), percentile(v, 0.99));
        f.insert(format!("{name}_max"), percentile(v, 1.0));
    }
    f.insert(
        "extra_overshoot_p99".into(),
        percentile(&samples, 0.99) - percentile(&baseline, 0.99),
    );
    f.insert(
        "extra_overshoot_max".into(),
        percentile(&samples, 1.0) - percentile(&baseline, 1.0),
    );
    let excess = sum(|k| k.excess);
    f.insert("excess_requests".into(), excess as f64);
    f.insert(
        "excess_fraction".into(),
        excess as f64 / admitted.max(1) as f64,
    );
    f.insert(
        "baseline_excess_requests".into(),
        sum(|k| k.baseline_excess) as f64,
    );
    f.insert("algo_excess_requests".into(), sum(|k| k.algo_excess) as f64);
    f.insert(
        "algo_overshoot_max".into(),
        stats.iter().map(|k| k.algo_overshoot).fold(0.0, f64::max),
    );
    f.insert("false_allow".into(), frac(sum(|k| k.false_allow)));
    f.insert("false_deny".into(), frac(sum(|k| k.false_deny)));
    f.insert(
        "decision_error".into(),
        frac(sum(|k| k.false_allow) + sum(|k| k.false_deny)),
    );
    // False denials less false allowances: how many fewer the cluster
    // admitted than the reference, per request.
    f.insert(
        "net_decision_error".into(),
        (sum(|k| k.reference_admitted) as f64 - admitted as f64) / requests.max(1) as f64,
    );
    f.insert(
        "false_deny_share_capped".into(),
        frac(sum(|k| k.false_deny_share_capped)),
    );
    f.insert("share_capped".into(), frac(sum(|k| k.share_capped)));
    // The same question asked of the algorithm holding the cluster's own
    // admitted history: free of the divergence between two histories.
    f.insert("history_false_allow".into(), frac(sum(|k| k.algo_excess)));
    f.insert(
        "history_false_deny".into(),
        frac(sum(|k| k.algo_would_admit)),
    );
    f.insert(
        "history_false_deny_share_capped".into(),
        frac(sum(|k| k.algo_would_admit_share_capped)),
    );
    let util: Vec<f64> = stats.iter().filter_map(|k| k.utilisation).collect();
    f.insert("utilisation_mean".into(), mean(&util));
    f.insert(
        "utilisation_min".into(),
        util.iter().copied().fold(f64::INFINITY, f64::min).min(1e9),
    );
    let sides: Vec<SideStats> = stats.iter().filter_map(|k| k.side).collect();
    if !sides.is_empty() {
        let maj: Vec<f64> = sides.iter().filter_map(|s| s.majority).collect();
        let min: Vec<f64> = sides.iter().filter_map(|s| s.minority).collect();
        let tot: Vec<f64> = sides.iter().map(|s| s.total).collect();
        if !maj.is_empty() {
            f.insert("majority_utilisation".into(), mean(&maj));
        }
        if !min.is_empty() {
            f.insert("minority_utilisation".into(), mean(&min));
        }
        f.insert("cut_total_utilisation".into(), mean(&tot));
        f.insert(
            "minority_admitted_max".into(),
            sides.iter().map(|s| s.minority_admitted).max().unwrap_or(0) as f64,
        );
    }
    f
}

/// Every figure of a run: over all keys, and per traffic group.
pub fn figures(s: &Scenario, out: &RunOutput) -> (Figures, Vec<(String, usize, Figures)>) {
    let keys = out.traffic.keys.len();
    let mut by_key: Vec<Vec<u32>> = vec![Vec::new(); keys];
    for (i, r) in out.records.iter().enumerate() {
        by_key[r.key as usize].push(i as u32);
    }
    let stats: Vec<KeyStats> = by_key.iter().map(|r| key_stats(s, out, r)).collect();
    let all: Vec<&KeyStats> = stats.iter().collect();
    let mut overall = key_figures(&all);
    let groups = if s.traffic.len() > 1 {
        s.traffic
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let mine: Vec<&KeyStats> = stats
                    .iter()
                    .zip(&out.traffic.group_of)
                    .filter(|(_, &grp)| grp as usize == gi)
                    .map(|(k, _)| k)
                    .collect();
                (g.name.clone(), mine.len(), key_figures(&mine))
            })
            .collect()
    } else {
        Vec::new()
    };
    cluster_figures(s, out, &mut overall);
    for v in overall.values_mut() {
        *v = round(*v);
    }
    let groups = groups
        .into_iter()
        .map(|(n, k, mut f)| {
            for v in f.values_mut() {
                *v = round(*v);
            }
            (n, k, f)
        })
        .collect();
    (overall, groups)
}

fn cluster_figures(s: &Scenario, out: &RunOutput, f: &mut Figures) {
    for (kind, name) in [
        (ProbeKind::Write, "write"),
        (ProbeKind::Heal, "heal"),
        (ProbeKind::Restart, "restart"),
    ] {
        let probes: Vec<_> = out.probes.iter().filter(|p| p.kind == kind).collect();
        if probes.is_empty() {
            continue;
        }
        let times = sorted(probes.iter().filter_map(|p| p.latency()).map(ms).collect());
        let expired = probes.iter().filter(|p| p.expired).count();
        let open = probes.iter().filter(|p| p.done.is_none()).count();
        f.insert(format!("convergence_{name}_probes"), probes.len() as f64);
        f.insert(format!("convergence_{name}_expired"), expired as f64);
        f.insert(format!("convergence_{name}_unconverged"), open as f64);
        if !times.is_empty() {
            f.insert(
                format!("convergence_{name}_p50_ms"),
                percentile(&times, 0.5),
            );
            f.insert(
                format!("convergence_{name}_p99_ms"),
                percentile(&times, 0.99),
            );
            f.insert(
                format!("convergence_{name}_max_ms"),
                percentile(&times, 1.0),
            );
        }
    }
    if !out.restarts.is_empty() {
        let worst = out
            .restarts
            .iter()
            .map(|r| r.1.map_or(f64::INFINITY, ms))
            .fold(0.0, f64::max);
        f.insert("restart_admitting_ms".into(), worst.min(1e12));
    }
    f.insert("failovers".into(), out.failovers as f64);
    f.insert("bytes_on_wire".into(), out.bytes_on_wire as f64);
    f.insert("frames_on_wire".into(), out.frames_on_wire as f64);
    // Gossip cost: what one node sends per sync interval, on average (every
    // frame counted once per copy put on the wire, claims and their answers
    // included).
    let node_syncs =
        s.nodes as f64 * (s.duration.as_u64() as f64 / s.sync_interval.as_u64() as f64);
    f.insert(
        "bytes_per_node_per_sync".into(),
        out.bytes_on_wire as f64 / node_syncs.max(1.0),
    );
    f.insert(
        "frames_per_node_per_sync".into(),
        out.frames_on_wire as f64 / node_syncs.max(1.0),
    );
    f.insert("changed_key_rounds".into(), out.values_sent as f64);
    f.insert("full_syncs".into(), out.full_syncs as f64);
    f.insert("retransmissions".into(), out.retransmissions as f64);
    let per = out.bytes_on_wire as f64 / out.values_sent.max(1) as f64;
    f.insert("bytes_per_changed_key".into(), per);
    f.insert(
        "bytes_per_changed_key_per_peer".into(),
        per / (s.nodes.max(2) - 1) as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_six_significant_digits() {
        assert_eq!(round(0.0123456789), 0.0123457);
        assert_eq!(round(123456.789), 123457.0);
        assert_eq!(round(0.0), 0.0);
        assert_eq!(max_in_window(&[1, 2, 3, 10, 11], 5), 3);
        assert_eq!(max_in_window(&[], 5), 0);
    }
}
