//! Exact at every limit size (the small-limits issue): in a healthy cluster
//! a limit of L admits exactly min(offered, L) of sequential traffic, for
//! every L and cluster size, however the traffic is spread over the nodes;
//! a bucket's burst is its burst; the first answer says `L - cost` left.
//! Run on the in-memory cluster: real limiters and replicators, virtual time.

use drl_core::cluster::harness::{ClusterSpec, MemCluster};
use drl_core::time::Nanos;

fn sliding(limit: u64) -> String {
    sliding_over(limit, "1s")
}

fn sliding_over(limit: u64, window: &str) -> String {
    format!(
        r#"
        [[rules]]
        name = "small"
        match = {{ user = "*" }}
        limits = [ {{ algorithm = "sliding_window", limit = {limit}, window = "{window}" }} ]
    "#
    )
}

/// Sends `offered` requests of one user, one every `gap`, to the nodes in
/// the order `pick` gives, and counts what was admitted.
fn sequential(
    c: &mut MemCluster,
    offered: usize,
    gap: Nanos,
    mut pick: impl FnMut(usize) -> usize,
) -> (usize, Vec<u64>) {
    let mut admitted = 0;
    let mut remaining = Vec::new();
    for i in 0..offered {
        let node = pick(i);
        let d = c.check(node, &[("user", "u")], 1).unwrap();
        if d.is_allowed() {
            admitted += 1;
        }
        remaining.push(d.quota.map_or(0, |q| q.remaining));
        c.advance(gap);
    }
    (admitted, remaining)
}

#[test]
fn every_small_limit_is_exact_on_every_cluster_size_and_spread() {
    for nodes in [1usize, 2, 3, 7, 20] {
        for limit in [1u64, 3, 5, 10] {
            for spread in ["one", "round-robin", "random"] {
                let mut c = MemCluster::new(ClusterSpec::new(nodes, &sliding(limit), 7)).unwrap();
                let mut x = 0x9e37_79b9u64;
                let (admitted, remaining) = sequential(
                    &mut c,
                    limit as usize * 2,
                    Nanos::from_millis(2),
                    |i| match spread {
                        "one" => 0,
                        "round-robin" => i % nodes,
                        _ => {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % nodes as u64) as usize
                        }
                    },
                );
                assert_eq!(
                    admitted, limit as usize,
                    "{nodes} nodes, limit {limit}, {spread}: admitted {admitted}"
                );
                assert_eq!(
                    remaining[0],
                    limit - 1,
                    "{nodes} nodes, limit {limit}, {spread}: first answer"
                );
            }
        }
    }
}

#[test]
fn a_gcra_burst_is_its_burst_on_three_nodes() {
    let rules = r#"
        [[rules]]
        name = "login-per-ip"
        match = { ip = "*" }
        key = ["ip"]
        limits = [ { algorithm = "gcra", limit = 10, per = "1m", burst = 3 } ]
    "#;
    let mut c = MemCluster::new(ClusterSpec::new(3, rules, 11)).unwrap();
    let mut admitted = 0;
    for i in 0..6 {
        let d = c.check(i % 3, &[("ip", "10.0.0.1")], 1).unwrap();
        if i == 0 {
            assert_eq!(d.quota.unwrap().remaining, 2, "first answer: burst - 1");
        }
        admitted += usize::from(d.is_allowed());
        c.advance(Nanos::from_millis(2));
    }
    assert_eq!(admitted, 3);
}

#[test]
fn a_large_limit_far_from_its_end_decides_without_waiting() {
    let mut c = MemCluster::new(ClusterSpec::new(3, &sliding_over(1000, "1h"), 3)).unwrap();
    let before = c.replicator(0).stats().claims_sent;
    // 500 a second: within what one node may have in flight per sync tick.
    for _ in 0..100 {
        assert!(c.check(0, &[("user", "u")], 1).unwrap().is_allowed());
        c.advance(Nanos::from_millis(2));
    }
    assert_eq!(
        c.replicator(0).stats().claims_sent,
        before,
        "no claim far from the limit"
    );
    // The end of the window is reached exactly, with claims near it.
    let (admitted, _) = sequential(&mut c, 1000, Nanos::from_millis(2), |i| i % 3);
    assert_eq!(admitted, 900);
    assert!(c.replicator(0).stats().claims_sent > 0);
}

#[test]
fn the_earlier_design_refuses_small_limits_in_large_clusters() {
    // Kept for comparison: reserving a share for every peer swallows a
    // limit smaller than the cluster.
    let mut spec = ClusterSpec::new(7, &sliding(5), 5);
    spec.confirm = false;
    let mut c = MemCluster::new(spec).unwrap();
    let (admitted, _) = sequential(&mut c, 10, Nanos::from_millis(2), |_| 0);
    assert_eq!(admitted, 0);
}
