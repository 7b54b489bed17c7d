//! An operator forgets members gone for good: when half the cluster or more
//! is lost at once, the survivors are in the minority and forget nobody by
//! themselves (a minority that did would make itself a cluster of its own);
//! `handle_forget` at one survivor forgets them there and, through a Forget
//! frame, at every other survivor.

use drl_core::cluster::harness::{ClusterSpec, MemCluster};
use drl_core::time::Nanos;

fn cluster(nodes: usize, seed: u64) -> MemCluster {
    let rules = r#"
        [[rules]]
        name = "per-user"
        match = { user = "*" }
        limits = [ { algorithm = "sliding_window", limit = 100, window = "1h" } ]
    "#;
    let mut spec = ClusterSpec::new(nodes, rules, seed);
    spec.whole_core = true;
    let mut c = MemCluster::new(spec).unwrap();
    c.advance(Nanos::from_secs(2));
    c
}

fn admitted(c: &mut MemCluster, node: usize, user: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if c.check(node, &[("user", user)], 1)
            .is_ok_and(|d| d.is_allowed())
        {
            ok += 1;
        }
        c.advance(Nanos::from_millis(10));
    }
    ok
}

#[test]
fn survivors_of_a_lost_majority_wait_until_an_operator_forgets_the_dead() {
    let mut c = cluster(5, 61);
    for n in [2, 3, 4] {
        c.crash(n);
    }
    // Detection, and far past the forget time: a minority forgets nobody.
    c.advance(drl_core::cluster::node_core::DEFAULT_FORGET_AFTER + Nanos::from_secs(10));
    assert_eq!(c.members(0), vec![1, 2, 3, 4]);
    assert!(c.replicator(0).in_minority());
    let before = admitted(&mut c, 0, "fresh", 10);
    assert!(
        before <= 2,
        "the minority admits at most its in-flight share under strict: {before}"
    );

    // Refused: this node itself, a stranger, a member held alive.
    assert!(c.forget_member(0, 0).is_err());
    assert!(c.forget_member(0, 9).is_err());
    assert!(c.forget_member(0, 1).is_err());
    assert_eq!(c.members(0), vec![1, 2, 3, 4], "a refusal changed nothing");

    for n in [2, 3, 4] {
        c.forget_member(0, n).unwrap();
    }
    c.advance(Nanos::from_millis(50));
    assert_eq!(c.members(0), vec![1]);
    assert_eq!(c.members(1), vec![0], "the Forget frames reached node 1");
    assert!(!c.replicator(0).in_minority() && !c.replicator(1).in_minority());
    let after = admitted(&mut c, 0, "fresh", 60) + admitted(&mut c, 1, "fresh", 60);
    assert_eq!(
        before + after,
        100,
        "the two survivors share the whole limit"
    );
}
