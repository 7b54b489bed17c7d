//! Arrivals: every request of a run, generated up front from the scenario's
//! traffic groups and the seed, in reference-time order.
//!
//! Each key has its own generator seeded from the run's seed and the key's
//! index, so a key's arrivals do not depend on how many other keys there are.
//! A Poisson process with a time-varying rate is drawn by thinning (draw at
//! the segment's peak rate, keep each point with probability `rate(t)/peak`).

use drl_core::time::Nanos;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::scenario::{Arrivals, Scenario, TrafficGroup};

/// One request: when (ns since the start of the run), for which key (index
/// into [`Traffic::keys`]) and at which node the client first tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub at: u64,
    pub key: u32,
    pub node: u16,
}

pub struct Traffic {
    pub arrivals: Vec<Arrival>,
    /// Key names, as sent in the `user` descriptor.
    pub keys: Vec<String>,
    /// Traffic group of each key.
    pub group_of: Vec<u16>,
}

/// SplitMix64: spreads a run seed and a key index into independent seeds.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pick_node(rng: &mut StdRng, split: &[f64]) -> u16 {
    let mut x: f64 = rng.random::<f64>();
    for (i, w) in split.iter().enumerate() {
        if x < *w {
            return i as u16;
        }
        x -= w;
    }
    (split.len() - 1) as u16
}

pub fn generate(s: &Scenario, seed: u64) -> Traffic {
    let end = s.duration.as_u64();
    let mut arrivals = Vec::new();
    let mut keys = Vec::new();
    let mut group_of = Vec::new();
    for (gi, g) in s.traffic.iter().enumerate() {
        // Zipf weights need the harmonic sum once per group, not per key.
        let weights: Vec<f64> = match g.zipf {
            None => vec![1.0; g.keys],
            Some(z) => {
                let raw: Vec<f64> = (1..=g.keys).map(|i| (i as f64).powf(-z)).collect();
                let h: f64 = raw.iter().sum();
                raw.into_iter().map(|w| w / h).collect()
            }
        };
        for (k, &weight) in weights.iter().enumerate().take(g.keys) {
            let index = keys.len() as u32;
            keys.push(format!("{}-{k}", g.name));
            group_of.push(gi as u16);
            let mut rng = StdRng::seed_from_u64(mix(seed, u64::from(index) + 1));
            let mut times = Vec::new();
            match g.arrivals {
                Arrivals::Poisson => poisson(g, weight, end, &mut rng, &mut times),
                Arrivals::Even => even(g, weight, end, &mut rng, &mut times),
            }
            for b in &g.bursts {
                for i in 0..b.count {
                    let t = b.at.as_u64() + b.over.as_u64() * i / b.count.max(1);
                    if t < end {
                        times.push((t, b.node.map(|n| n as u16)));
                    }
                }
            }
            for (t, node) in times {
                let node = node.unwrap_or_else(|| pick_node(&mut rng, &g.split));
                arrivals.push(Arrival {
                    at: t,
                    key: index,
                    node,
                });
            }
        }
    }
    // Stable: equal times keep generation order, so the result is a pure
    // function of the seed.
    arrivals.sort_by_key(|a| (a.at, a.key));
    Traffic {
        arrivals,
        keys,
        group_of,
    }
}

/// The profile's breakpoints inside `[0, end)`, as segment bounds.
fn segments(g: &TrafficGroup, end: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = g
        .profile
        .iter()
        .map(|p| p.0.as_u64())
        .filter(|&t| t < end)
        .collect();
    cuts.insert(0, 0);
    cuts.push(end);
    cuts.dedup();
    cuts.windows(2).map(|w| (w[0], w[1])).collect()
}

fn poisson(
    g: &TrafficGroup,
    weight: f64,
    end: u64,
    rng: &mut StdRng,
    out: &mut Vec<(u64, Option<u16>)>,
) {
    let rate_at = |t: Nanos| g.rate_at(t) * weight;
    for (a, b) in segments(g, end) {
        let peak = rate_at(Nanos::new(a)).max(rate_at(Nanos::new(b.saturating_sub(1))));
        if peak <= 0.0 {
            continue;
        }
        let mut t = a as f64;
        loop {
            let u: f64 = rng.random::<f64>();
            t += -(1.0 - u).ln() / peak * 1e9;
            if t >= b as f64 {
                break;
            }
            let at = t as u64;
            let keep: f64 = rng.random::<f64>();
            if keep * peak < rate_at(Nanos::new(at)) {
                out.push((at, None));
            }
        }
    }
}

fn even(
    g: &TrafficGroup,
    weight: f64,
    end: u64,
    rng: &mut StdRng,
    out: &mut Vec<(u64, Option<u16>)>,
) {
    // A random phase so that keys do not arrive in lockstep.
    let mut credit: f64 = rng.random::<f64>();
    let step = 100_000u64; // integrate the rate in 100 µs steps
    let mut t = 0u64;
    while t < end {
        let next = (t + step).min(end);
        let r = g.rate_at(Nanos::new(t)) * weight;
        let gain = r * (next - t) as f64 / 1e9;
        // Emit the arrivals that fall inside this step, evenly placed.
        let mut c = credit;
        while c + gain >= 1.0 && gain > 0.0 {
            let frac = (1.0 - c) / gain;
            let at = t + (frac * (next - t) as f64) as u64;
            out.push((at.min(next - 1), None));
            c -= 1.0;
        }
        credit = c + gain;
        t = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn scenario(arrivals: &str) -> Scenario {
        Scenario::from_toml(&format!(
            r#"
            name = "t"
            description = "d"
            nodes = 3
            duration = "4s"
            rules = '''
            [[rules]]
            name = "r"
            match = {{ user = "*" }}
            limits = [ {{ algorithm = "sliding_window", limit = 100, window = "1s" }} ]
            '''
            [[traffic]]
            keys = 3
            profile = [["0s", 0], ["1s", 0], ["1s", 2000]]
            split = [8, 1, 1]
            arrivals = "{arrivals}"
            bursts = [ {{ at = "3s", count = 10, over = "1ms", node = 2 }} ]
            "#
        ))
        .unwrap()
    }

    #[test]
    fn arrivals_follow_the_profile_split_and_seed() {
        for kind in ["poisson", "even"] {
            let s = scenario(kind);
            let t = generate(&s, 42);
            assert_eq!(t.keys.len(), 3);
            assert!(t.arrivals.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(t.arrivals.iter().all(|a| a.at >= 1_000_000_000));
            // 3 keys × 2000/s × 3 s, plus 30 burst requests.
            let n = t.arrivals.len() as f64;
            assert!((n - 18_030.0).abs() < 600.0, "{kind}: {n}");
            let at0 = t.arrivals.iter().filter(|a| a.node == 0).count() as f64;
            assert!((at0 / n - 0.8).abs() < 0.03, "{kind}: split");
            let again = generate(&s, 42);
            assert_eq!(t.arrivals, again.arrivals, "same seed, same arrivals");
            assert_ne!(t.arrivals, generate(&s, 43).arrivals);
        }
    }
}
