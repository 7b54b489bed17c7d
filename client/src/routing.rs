//! Which node a call goes to: latency-aware routing over circuit breakers.
//!
//! Sans-IO. Each node keeps an EWMA of the round trips of real calls and of
//! probes, and a [`CircuitBreaker`]. [`NodeTable::route`] orders the nodes a
//! call may try: nodes whose breaker is closed, nearest (lowest EWMA) first,
//! then nodes whose breaker would grant a half-open trial; nodes with an open
//! breaker are left out. Nodes never measured come after measured ones.
//!
//! Calling order, per attempt: `route(now)` once per call, then for each
//! node tried `poll_permit(now, i)` → (attempt) → `handle_success(now, i,
//! rtt)` / `handle_failure(now, i, elapsed)`. Probes: `poll_probe(now)`
//! names the nodes due a probe (idle for `probe_interval`, or an open breaker
//! past its cool-down, where the probe is the half-open trial); their result
//! goes through the same `handle_*` calls.

use drl_core::time::Nanos;

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, Permit};

/// Routing parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutingConfig {
    /// Weight of a new round trip in the EWMA, in (0, 1].
    pub ewma_alpha: f64,
    /// A node with no call for this long is probed.
    pub probe_interval: Nanos,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            ewma_alpha: 0.2,
            probe_interval: Nanos::from_millis(500),
        }
    }
}

#[derive(Clone, Debug)]
struct NodeState {
    ewma_ns: Option<f64>,
    breaker: CircuitBreaker,
    last_result: Option<Nanos>,
    probing: bool,
}

/// The nodes of one client, by index.
#[derive(Clone, Debug)]
pub struct NodeTable {
    config: RoutingConfig,
    breaker: BreakerConfig,
    nodes: Vec<NodeState>,
}

impl NodeTable {
    /// A table of `nodes` nodes, none measured yet.
    pub fn new(nodes: usize, routing: RoutingConfig, breaker: BreakerConfig) -> Self {
        let mut table = NodeTable {
            config: routing,
            breaker,
            nodes: Vec::with_capacity(nodes),
        };
        for _ in 0..nodes {
            table.add_node();
        }
        table
    }

    /// Adds a node (never measured, breaker closed); returns its index.
    /// Indices of existing nodes do not change.
    pub fn add_node(&mut self) -> usize {
        self.nodes.push(NodeState {
            ewma_ns: None,
            breaker: CircuitBreaker::new(self.breaker),
            last_result: None,
            probing: false,
        });
        self.nodes.len() - 1
    }

    /// Nodes in the table.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when there is no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The nodes a call may try, in order.
    pub fn route(&self, now: Nanos) -> Vec<usize> {
        let mut closed: Vec<(f64, usize)> = Vec::with_capacity(self.nodes.len());
        let mut trial = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match n.breaker.state(now) {
                BreakerState::Closed => closed.push((n.ewma_ns.unwrap_or(f64::INFINITY), i)),
                BreakerState::HalfOpen if n.breaker.would_permit(now) => trial.push(i),
                _ => {}
            }
        }
        closed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        closed.into_iter().map(|(_, i)| i).chain(trial).collect()
    }

    /// Takes the breaker's permit for one attempt on node `i`.
    pub fn poll_permit(&mut self, now: Nanos, i: usize) -> Permit {
        match self.nodes.get_mut(i) {
            Some(n) => n.breaker.poll_permit(now),
            None => Permit::Refused,
        }
    }

    fn sample(&mut self, i: usize, rtt: Nanos) {
        let alpha = self.config.ewma_alpha;
        if let Some(n) = self.nodes.get_mut(i) {
            let x = rtt.as_u64() as f64;
            n.ewma_ns = Some(match n.ewma_ns {
                None => x,
                Some(e) => e + alpha * (x - e),
            });
        }
    }

    /// An attempt (call or probe) on node `i` answered after `rtt`.
    pub fn handle_success(&mut self, now: Nanos, i: usize, rtt: Nanos) {
        self.sample(i, rtt);
        if let Some(n) = self.nodes.get_mut(i) {
            n.breaker.handle_success(now);
            n.last_result = Some(now);
        }
    }

    /// An attempt on node `i` failed after `elapsed`. A slow failure (a
    /// timeout) also counts as a round trip, so that a node that hangs
    /// looks far as well as broken.
    pub fn handle_failure(&mut self, now: Nanos, i: usize, elapsed: Nanos) {
        self.sample(i, elapsed);
        if let Some(n) = self.nodes.get_mut(i) {
            n.breaker.handle_failure(now);
            n.last_result = Some(now);
        }
    }

    /// An attempt with a granted permit was dropped before its result.
    pub fn handle_abandoned(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.breaker.handle_abandoned();
        }
    }

    /// Nodes due a probe now; each is marked as being probed until its
    /// result is reported with [`Self::handle_probe_done`]. A node whose
    /// breaker is open and cooled down gets its half-open trial here.
    pub fn poll_probe(&mut self, now: Nanos) -> Vec<(usize, Permit)> {
        let interval = self.config.probe_interval;
        let mut due = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if n.probing {
                continue;
            }
            let idle = match n.last_result {
                None => true,
                Some(t) => now >= t.saturating_add(interval),
            };
            let state = n.breaker.state(now);
            let wanted = match state {
                BreakerState::Closed => idle,
                BreakerState::HalfOpen => n.breaker.would_permit(now),
                BreakerState::Open => false,
            };
            if !wanted {
                continue;
            }
            let permit = n.breaker.poll_permit(now);
            if permit != Permit::Refused {
                n.probing = true;
                due.push((i, permit));
            }
        }
        due
    }

    /// The probe of node `i` is over (its result was reported already).
    pub fn handle_probe_done(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.probing = false;
        }
    }

    /// Node `i`'s breaker state.
    pub fn breaker_state(&self, now: Nanos, i: usize) -> Option<BreakerState> {
        self.nodes.get(i).map(|n| n.breaker.state(now))
    }

    /// Breaker openings and closings of node `i`.
    pub fn transitions(&self, i: usize) -> (u64, u64) {
        self.nodes
            .get(i)
            .map(|n| n.breaker.transitions())
            .unwrap_or((0, 0))
    }

    /// The EWMA of node `i`'s round trips.
    pub fn latency(&self, i: usize) -> Option<Nanos> {
        self.nodes
            .get(i)
            .and_then(|n| n.ewma_ns)
            .map(|e| Nanos::new(e.max(0.0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn table(n: usize) -> NodeTable {
        NodeTable::new(
            n,
            RoutingConfig {
                ewma_alpha: 0.5,
                probe_interval: Nanos::from_millis(100),
            },
            BreakerConfig {
                failure_threshold: NonZeroU32::new(2).unwrap(),
                cool_down: Nanos::from_millis(1000),
                success_threshold: NonZeroU32::new(1).unwrap(),
            },
        )
    }

    fn ms(n: u64) -> Nanos {
        Nanos::from_millis(n)
    }

    #[test]
    fn nearest_first_and_unmeasured_last() {
        let mut t = table(3);
        t.handle_success(ms(0), 1, Nanos::from_micros(300));
        t.handle_success(ms(0), 2, Nanos::from_micros(200));
        assert_eq!(t.route(ms(1)), vec![2, 1, 0]);
    }

    #[test]
    fn ewma_moves_calls_off_a_node_that_slows_down() {
        let mut t = table(2);
        t.handle_success(ms(0), 0, Nanos::from_micros(100));
        t.handle_success(ms(0), 1, Nanos::from_micros(200));
        assert_eq!(t.route(ms(1))[0], 0);
        for k in 0..4 {
            t.handle_success(ms(2 + k), 0, ms(20));
        }
        assert_eq!(t.route(ms(10))[0], 1);
        // And back once it is fast again.
        for k in 0..12 {
            t.handle_success(ms(20 + k), 0, Nanos::from_micros(50));
        }
        assert_eq!(t.route(ms(40))[0], 0);
    }

    #[test]
    fn open_breaker_leaves_the_route_and_half_open_comes_last() {
        let mut t = table(2);
        t.handle_success(ms(0), 0, Nanos::from_micros(100));
        t.handle_success(ms(0), 1, Nanos::from_micros(900));
        t.handle_failure(ms(1), 0, ms(1));
        t.handle_failure(ms(2), 0, ms(1));
        assert_eq!(t.route(ms(3)), vec![1]);
        // After the cool-down node 0 is offered as a trial, after node 1.
        assert_eq!(t.route(ms(1002)), vec![1, 0]);
        assert_eq!(t.poll_permit(ms(1002), 0), Permit::Trial);
        // Its trial is taken: no second one.
        assert_eq!(t.route(ms(1003)), vec![1]);
        t.handle_success(ms(1004), 0, Nanos::from_micros(100));
        // Closed again and, with its EWMA back under node 1's, first.
        assert_eq!(t.route(ms(1005)), vec![0, 1]);
    }

    #[test]
    fn idle_nodes_are_probed_and_busy_ones_not() {
        let mut t = table(3);
        // Never measured: all due.
        let due: Vec<usize> = t.poll_probe(ms(0)).into_iter().map(|p| p.0).collect();
        assert_eq!(due, vec![0, 1, 2]);
        // Being probed: not again.
        assert!(t.poll_probe(ms(1)).is_empty());
        for i in 0..3 {
            t.handle_success(ms(2), i, Nanos::from_micros(100));
            t.handle_probe_done(i);
        }
        // Node 0 keeps serving calls; 1 and 2 go idle.
        t.handle_success(ms(90), 0, Nanos::from_micros(100));
        let due: Vec<usize> = t.poll_probe(ms(110)).into_iter().map(|p| p.0).collect();
        assert_eq!(due, vec![1, 2]);
    }

    #[test]
    fn probe_of_a_cooled_down_node_is_its_trial() {
        let mut t = table(1);
        t.handle_failure(ms(0), 0, ms(5));
        t.handle_failure(ms(1), 0, ms(5));
        assert!(t.poll_probe(ms(500)).is_empty());
        assert_eq!(t.poll_probe(ms(1001)), vec![(0, Permit::Trial)]);
        t.handle_success(ms(1002), 0, Nanos::from_micros(100));
        t.handle_probe_done(0);
        assert_eq!(t.breaker_state(ms(1003), 0), Some(BreakerState::Closed));
    }

    #[test]
    fn added_node_is_unmeasured_and_keeps_indices() {
        let mut t = table(1);
        t.handle_success(ms(0), 0, Nanos::from_micros(100));
        assert_eq!(t.add_node(), 1);
        assert_eq!(t.route(ms(1)), vec![0, 1]);
        assert_eq!(t.poll_probe(ms(1)), vec![(1, Permit::Granted)]);
        t.handle_success(ms(2), 1, Nanos::from_micros(50));
        assert_eq!(t.route(ms(3)), vec![1, 0]);
    }
}
