//! What a node that joins learns of the members that went before it: the
//! members that answer its recovery relay the slots of members that left
//! or died, so the newcomer cannot admit their spends again.

use drl_core::cluster::harness::{ClusterSpec, MemCluster};
use drl_core::slot::NodeSlot;
use drl_core::time::{Clock, Nanos};

const LIMIT: u64 = 300;

/// Three whole nodes (SWIM, rules, replication) with room for two joins,
/// one hourly sliding-window limit per user.
fn cluster(seed: u64) -> MemCluster {
    let rules = format!(
        r#"
        [[rules]]
        name = "per-user"
        match = {{ user = "*" }}
        limits = [ {{ algorithm = "sliding_window", limit = {LIMIT}, window = "1h" }} ]
    "#
    );
    let mut spec = ClusterSpec::new(3, &rules, seed);
    spec.whole_core = true;
    spec.spare_slots = 2;
    let mut c = MemCluster::new(spec).unwrap();
    c.advance(Nanos::from_secs(2));
    c
}

/// `n` requests of user `u` round-robin over `nodes`, one every 10 ms
/// (slower than acknowledgements, so no in-flight share refuses one).
fn spend(c: &mut MemCluster, nodes: &[usize], n: usize) -> u64 {
    let mut admitted = 0;
    for i in 0..n {
        if c.check(nodes[i % nodes.len()], &[("user", "u")], 1)
            .is_ok_and(|d| d.is_allowed())
        {
            admitted += 1;
        }
        c.advance(Nanos::from_millis(10));
    }
    admitted
}

/// Net hits in the current window as `node` has merged them, all slots.
fn counted(c: &MemCluster, node: usize) -> u64 {
    let table = c.limiter(node).table(0).unwrap();
    let now = c.limiter(node).clock().as_ref().now();
    let mut total = 0;
    table.for_each(|e| {
        let mut out = vec![0u64; e.spec().buckets()];
        drl_core::window::Ring::read(e, &e.spec(), now, &mut out);
        total += out.iter().sum::<u64>();
    });
    total
}

/// `node` has dropped `gone` from its peers (forgotten).
fn forgot(c: &MemCluster, node: usize, gone: usize) -> bool {
    !c.replicator(node)
        .peers()
        .contains_key(&NodeSlot::new(gone as u16))
}

/// A new node joins and opens its gate; returns it.
fn join_and_open(c: &mut MemCluster) -> usize {
    let n = c.join().unwrap();
    c.advance(Nanos::from_secs(1));
    assert!(c.limiter(n).is_admitting(), "the newcomer opened");
    n
}

/// The newcomer counts the departed member's spends, and the cluster
/// admits only the rest of the limit.
fn the_rest_only(c: &mut MemCluster, newcomer: usize, spent: u64) {
    assert_eq!(
        counted(c, newcomer),
        spent,
        "the newcomer counts what the departed member spent"
    );
    let after = spend(c, &[newcomer], 400);
    assert_eq!(
        spent + after,
        LIMIT,
        "{spent} spent before, {after} after through the newcomer"
    );
}

#[test]
fn a_node_that_joins_after_a_clean_leave_counts_the_leaver_s_spends() {
    let mut c = cluster(41);
    let spent = spend(&mut c, &[2], 120);
    assert_eq!(spent, 120);
    c.advance(Nanos::from_millis(200));
    c.leave(2);
    c.advance(Nanos::from_secs(1));
    assert!(
        forgot(&c, 0, 2) && forgot(&c, 1, 2),
        "forgotten after the grace"
    );
    let n = join_and_open(&mut c);
    assert!(c.replicator(0).stats().recovery_frames_relayed > 0);
    the_rest_only(&mut c, n, spent);
}

#[test]
fn a_node_that_joins_after_a_crash_counts_the_dead_member_s_spends() {
    let mut c = cluster(43);
    let spent = spend(&mut c, &[2], 90);
    assert_eq!(spent, 90);
    c.advance(Nanos::from_millis(200));
    c.crash(2);
    // Declared dead by SWIM, not yet forgotten: its share stays reserved.
    c.advance(Nanos::from_secs(5));
    assert!(!c.replicator(0).peers()[&NodeSlot::new(2)].live);
    let n = join_and_open(&mut c);
    assert_eq!(counted(&c, n), spent, "relayed while declared dead");
}

#[test]
fn a_node_that_joins_after_a_member_is_forgotten_counts_its_spends() {
    let mut c = cluster(47);
    let spent = spend(&mut c, &[1, 2], 100);
    assert_eq!(spent, 100);
    c.advance(Nanos::from_millis(200));
    c.crash(2);
    // Detection (2 to 3 s) and the forget time.
    c.advance(drl_core::cluster::node_core::DEFAULT_FORGET_AFTER + Nanos::from_secs(5));
    assert!(forgot(&c, 0, 2) && forgot(&c, 1, 2), "forgotten");
    let n = join_and_open(&mut c);
    the_rest_only(&mut c, n, spent);
}

#[test]
fn a_newcomer_waits_for_the_members_its_seed_vouches_for_and_asks_again() {
    let mut c = cluster(53);
    let spent = spend(&mut c, &[1], 100);
    assert_eq!(spent, 100);
    c.advance(Nanos::from_millis(200));
    // The newcomer reaches node 0 only; its first frames to and from the
    // others are lost.
    c.set_link(3, 1, false);
    c.set_link(3, 2, false);
    let n = c.join().unwrap();
    c.advance(Nanos::from_secs(1));
    assert!(
        !c.limiter(n).is_admitting(),
        "node 0 vouched for nodes 1 and 2: the newcomer waits for them"
    );
    c.set_link(3, 1, true);
    c.set_link(3, 2, true);
    // It asks the silent members again after the recovery timeout (3 s).
    c.advance(Nanos::from_secs(3));
    assert!(c.limiter(n).is_admitting(), "opened once they answered");
    assert!(c.replicator(n).stats().recovery_retries > 0);
    the_rest_only(&mut c, n, spent);
}
