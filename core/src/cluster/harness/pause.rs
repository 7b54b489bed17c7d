//! The pause scenario: one node stopped (SIGSTOP semantics) while a key is
//! offered at a fraction of its limit through the others, then resumed
//! and offered through every node above its limit. It measures what a
//! silent peer costs: refusals an exact limiter would not have made,
//! the longest stretch without an admission, decision latency, and
//! admissions beyond the limit after the resume.

use std::collections::BTreeMap;

use super::{ClusterSpec, MemCluster, Submitted};
use crate::time::Nanos;

/// One run of the pause scenario.
#[derive(Clone, Debug)]
pub struct PauseRun {
    /// The cluster (its rules must hold a `fixed_window` limit of `limit`
    /// per `window` on `user = "*"`; see [`PauseRun::rules`]).
    pub spec: ClusterSpec,
    /// The limit per window.
    pub limit: u32,
    /// The window.
    pub window: Nanos,
    /// Which node is paused.
    pub paused: usize,
    /// Offered rate through the live nodes while it is paused, as a
    /// fraction of the limit's rate.
    pub offered: f64,
    /// Healthy time before the pause.
    pub before: Nanos,
    /// How long the node stays paused.
    pub pause: Nanos,
    /// After the resume: offered through every node at this fraction of
    /// the limit's rate, for this long.
    pub after_offered: f64,
    /// How long the after-resume load lasts.
    pub after: Nanos,
}

/// What a pause cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PauseFigures {
    /// Requests offered while the node was paused.
    pub offered: u64,
    /// Of those, refused although the window's admissions (cluster-wide,
    /// as an exact limiter counts them) left room.
    pub false_denials: u64,
    /// The longest stretch without an admission while paused.
    pub longest_gap: Nanos,
    /// The time between two offered requests: the shortest gap there can
    /// be; `longest_gap` beyond it is a stall.
    pub interval: Nanos,
    /// The 99th percentile of decision latency while paused (submission
    /// to answer, simulated time).
    pub p99: Nanos,
    /// The longest decision while paused.
    pub max_latency: Nanos,
    /// After the resume: the most admitted in one window, and the limit.
    pub after_max_window: u64,
    /// After the resume: admissions beyond the limit, summed over windows.
    pub overshoot: u64,
    /// After the resume: refusals with room left in the window.
    pub after_false_denials: u64,
}

impl PauseRun {
    /// Rules with one fixed-window limit of `limit` per `window` per user.
    pub fn rules(limit: u32, window: &str) -> String {
        format!(
            r#"
            [[rules]]
            name = "per-user"
            match = {{ user = "*" }}
            limits = [ {{ algorithm = "fixed_window", limit = {limit}, window = "{window}" }} ]
            "#
        )
    }

    /// Runs the scenario.
    pub fn run(&self) -> Result<PauseFigures, String> {
        let mut c = MemCluster::new(self.spec.clone())?;
        let nodes = self.spec.nodes;
        let live: Vec<usize> = (0..nodes).filter(|&n| n != self.paused).collect();
        let all: Vec<usize> = (0..nodes).collect();
        let mut state = Tally::new(self.limit, self.window);
        // Align on a window boundary so that windows are whole.
        let w = self.window.as_u64();
        let start = Nanos::new((c.now().as_u64() / w + 1) * w);
        c.advance(start.saturating_sub(c.now()));
        self.offer(&mut c, &mut state, &live, self.offered, self.before);
        c.pause(self.paused);
        state.reset(c.now());
        self.offer(&mut c, &mut state, &live, self.offered, self.pause);
        let mut figures = state.pause_figures(c.now());
        figures.interval = self.interval(self.offered);
        c.resume(self.paused);
        let mut after = Tally::new(self.limit, self.window);
        after.reset(c.now());
        self.offer(&mut c, &mut after, &all, self.after_offered, self.after);
        // Late answers.
        c.advance(Nanos::from_millis(200));
        after.collect(&mut c);
        figures.after_max_window = after.windows.values().copied().max().unwrap_or(0);
        figures.overshoot = after
            .windows
            .values()
            .map(|&n| n.saturating_sub(u64::from(self.limit)))
            .sum();
        figures.after_false_denials = after.false_denials;
        Ok(figures)
    }

    /// The time between two requests offered at `fraction` of the rate.
    fn interval(&self, fraction: f64) -> Nanos {
        let per_sec = f64::from(self.limit) / (self.window.as_u64() as f64 / 1e9) * fraction;
        Nanos::new((1e9 / per_sec) as u64)
    }

    /// Offers requests round-robin over `through` at `fraction` of the
    /// limit's rate for `span`, in steps of 100 µs.
    fn offer(
        &self,
        c: &mut MemCluster,
        tally: &mut Tally,
        through: &[usize],
        fraction: f64,
        span: Nanos,
    ) {
        let every = self.interval(fraction);
        let step = Nanos::from_micros(100);
        let end = c.now() + span;
        let mut next = c.now();
        let mut i = 0usize;
        while c.now() < end {
            while next <= c.now() {
                let node = through[i % through.len()];
                i += 1;
                let now = c.now();
                match c.submit(node, &[("user", "paused")], 1) {
                    Ok(Submitted::Done(d)) => tally.decided(now, now, d.is_allowed()),
                    Ok(Submitted::Waiting(id)) => {
                        tally.waiting.insert(id, now);
                    }
                    Err(_) => {}
                }
                next = next + every;
            }
            c.advance(step);
            tally.collect(c);
        }
    }
}

/// Decisions as they come.
struct Tally {
    limit: u64,
    window: u64,
    /// Request id → submitted at.
    waiting: BTreeMap<u64, Nanos>,
    /// Admissions per window start (exact, cluster-wide).
    windows: BTreeMap<u64, u64>,
    offered: u64,
    false_denials: u64,
    latencies: Vec<u64>,
    since: Nanos,
    last_admit: Nanos,
    longest_gap: Nanos,
}

impl Tally {
    fn new(limit: u32, window: Nanos) -> Self {
        Tally {
            limit: u64::from(limit),
            window: window.as_u64(),
            waiting: BTreeMap::new(),
            windows: BTreeMap::new(),
            offered: 0,
            false_denials: 0,
            latencies: Vec::new(),
            since: Nanos::ZERO,
            last_admit: Nanos::ZERO,
            longest_gap: Nanos::ZERO,
        }
    }

    fn reset(&mut self, now: Nanos) {
        self.offered = 0;
        self.false_denials = 0;
        self.latencies.clear();
        self.since = now;
        self.last_admit = now;
        self.longest_gap = Nanos::ZERO;
    }

    fn decided(&mut self, submitted: Nanos, at: Nanos, allowed: bool) {
        if submitted >= self.since {
            self.offered += 1;
            self.latencies.push(at.saturating_sub(submitted).as_u64());
        }
        let window = at.as_u64() / self.window * self.window;
        let count = self.windows.entry(window).or_default();
        if allowed {
            *count += 1;
            if at >= self.since {
                self.longest_gap = self.longest_gap.max(at.saturating_sub(self.last_admit));
                self.last_admit = at;
            }
        } else if *count < self.limit && submitted >= self.since {
            self.false_denials += 1;
        }
    }

    fn collect(&mut self, c: &mut MemCluster) {
        let now = c.now();
        for (id, _, d, _) in c.take_completed() {
            if let Some(submitted) = self.waiting.remove(&id) {
                self.decided(submitted, now, d.is_allowed());
            }
        }
    }

    fn pause_figures(&self, now: Nanos) -> PauseFigures {
        let mut lat = self.latencies.clone();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .map_or(Nanos::ZERO, Nanos::new)
        };
        PauseFigures {
            offered: self.offered,
            false_denials: self.false_denials,
            longest_gap: self.longest_gap.max(now.saturating_sub(self.last_admit)),
            p99: pct(0.99),
            max_latency: lat.last().copied().map_or(Nanos::ZERO, Nanos::new),
            ..PauseFigures::default()
        }
    }
}
