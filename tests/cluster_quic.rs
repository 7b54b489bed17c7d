//! Real nodes over real QUIC sockets on loopback: mutual TLS, SWIM
//! membership, delta replication and shares, end to end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{
    Node, NodeFile, NodeHandle, NodeSettings, PutRulesError, RulesChange, RulesOutcome,
};
use drl_core::descriptor::Descriptors;
use drl_core::rules::RuleSet;
use drl_core::wire::MAX_RULES_BYTES;

fn parsed(text: &str) -> RuleSet {
    RuleSet::from_toml(text).expect("valid rules")
}

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 600, window = "1h" } ]
"#;

fn scratch(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Certificates for `nodes` nodes of one cluster CA, and a rules file.
fn cluster_dir(name: &str, nodes: u16) -> PathBuf {
    let dir = scratch(name);
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(nodes)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

fn settings(dir: &Path, slot: u16, seeds: Vec<String>) -> NodeSettings {
    let file = NodeFile {
        recovery_timeout: "2s".into(),
        ..NodeFile::local(dir, slot, seeds)
    };
    file.settings(dir).unwrap()
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts three nodes, the second and third seeded with the first, and
/// waits until every node is ready and sees the other two alive.
async fn three_nodes(dir: &Path) -> Vec<NodeHandle> {
    let first = Node::start(settings(dir, 0, vec![])).await.unwrap();
    let seed = first.peer_addr().to_string();
    let mut nodes = vec![first];
    for slot in 1..3 {
        nodes.push(
            Node::start(settings(dir, slot, vec![seed.clone()]))
                .await
                .unwrap(),
        );
    }
    wait_for("a full mesh", Duration::from_secs(15), || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.ready && s.live.len() == 2
        })
    })
    .await;
    nodes
}

async fn check(node: &NodeHandle, user: &str) -> bool {
    let fields = [("user", user)];
    let d = Descriptors::new(&fields).unwrap();
    node.api()
        .decider()
        .check(&d, 1)
        .await
        .is_ok_and(|d| d.is_allowed())
}

/// Hits counted in `node`'s merged view, over every key (tests use one).
fn counted(node: &NodeHandle) -> u64 {
    let now = drl_core::time::Clock::now(node.limiter.clock());
    let mut total = 0;
    node.limiter.table(0).unwrap().for_each(|e| {
        let mut nets = vec![0u64; e.spec().buckets()];
        drl_core::window::Ring::read(e, &e.spec(), now, &mut nets);
        total += nets.iter().sum::<u64>();
    });
    total
}

/// Sends requests for `user` to `node` until `n` are admitted.
async fn admit(node: &NodeHandle, user: &str, n: u64) {
    let start = Instant::now();
    let mut admitted = 0;
    while admitted < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {admitted} of {n} admitted"
        );
        if check(node, user).await {
            admitted += 1;
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// Sends `per_node` requests for `user` to each node from its own thread,
/// all at once, pacing each thread by `gap`. Returns the admitted count.
async fn hammer(nodes: &[&NodeHandle], user: &str, per_node: usize, gap: Duration) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for node in nodes {
        let api = node.api();
        let admitted = admitted.clone();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let fields = [("user", user.as_str())];
            let d = Descriptors::new(&fields).unwrap();
            for _ in 0..per_node {
                if api
                    .decider()
                    .check(&d, 1)
                    .await
                    .is_ok_and(|d| d.is_allowed())
                {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(gap).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_hammered_through_three_nodes_stays_within_the_limit() {
    let dir = cluster_dir("hammer", 3);
    let nodes = three_nodes(&dir).await;
    let refs: Vec<&NodeHandle> = nodes.iter().collect();
    // Demand: 3 × 700 = 2100 requests for a limit of 600.
    let admitted = hammer(&refs, "alice", 700, Duration::from_micros(500)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(admitted <= 600, "admitted {admitted} > limit 600");
    assert!(admitted >= 570, "admitted {admitted} < 95% of 600");
    // Every node converged on the same count.
    for n in &nodes {
        assert_eq!(counted(n), admitted, "node {}", n.settings.slot);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_window_and_restarted_does_not_reset_the_quota() {
    let dir = cluster_dir("restart", 3);
    let mut nodes = three_nodes(&dir).await;
    // Node 2 takes 300 of the 600.
    admit(&nodes[2], "bob", 300).await;
    let first = 300;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counted(&nodes[0]), 300);
    let victim = nodes.pop().unwrap();
    victim.kill().await;
    let seed = nodes[0].peer_addr().to_string();
    let restarted = Node::start(settings(&dir, 2, vec![seed])).await.unwrap();
    assert!(
        !check(&restarted, "bob").await || restarted.status().ready,
        "admitted before recovering"
    );
    wait_for("recovery", Duration::from_secs(10), || {
        restarted.status().ready
    })
    .await;
    assert_eq!(counted(&restarted), 300, "its own 300 hits came back");
    nodes.push(restarted);
    let refs: Vec<&NodeHandle> = nodes.iter().collect();
    let second = hammer(&refs, "bob", 300, Duration::from_micros(500)).await;
    assert!(
        first + second <= 600,
        "{first} + {second} > 600: the restart reset the quota"
    );
    assert!(
        first + second >= 570,
        "{first} + {second}: utilisation too low"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_certificate_cannot_join_or_inject() {
    let dir = cluster_dir("foreign", 3);
    let nodes = three_nodes(&dir).await;
    assert!(check(&nodes[0], "carol").await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = counted(&nodes[0]);

    // Same names and slots, certificates from another CA.
    let rogue_dir = cluster_dir("rogue", 3);
    let mut s = settings(&rogue_dir, 1, vec![nodes[0].peer_addr().to_string()]);
    s.rules = dir.join("rules.toml");
    let rogue = Node::start(s).await.unwrap();
    rogue.limiter.set_admitting(true);
    for _ in 0..50 {
        check(&rogue, "carol").await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        rogue.status().live.is_empty(),
        "the rogue joined: {:?}",
        rogue.status().live
    );
    assert!(rogue.transport().connected().is_empty());
    for n in &nodes {
        assert_eq!(counted(n), before, "counts were injected");
        assert_eq!(n.status().live.len(), 2);
    }
    rogue.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_on_one_node_reaches_every_node_and_concurrent_edits_agree() {
    let dir = cluster_dir("rules", 3);
    let nodes = three_nodes(&dir).await;
    let strict = RULES.replace("limit = 600", "limit = 5");
    let change = |text: &str| RulesChange::new(parsed(text), "test");
    let outcome = nodes[1].put_rules(change(&strict)).await.unwrap();
    let RulesOutcome::Confirmed { version, peers } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(peers.len(), 2, "every live peer confirmed");
    let start = Instant::now();
    wait_for("the new rules everywhere", Duration::from_secs(1), || {
        nodes.iter().all(|n| n.limiter.rules().source() == strict)
    })
    .await;
    let spread = start.elapsed();
    assert!(spread < Duration::from_secs(1), "took {spread:?}");
    wait_for(
        "the new version in every status",
        Duration::from_secs(1),
        || nodes.iter().all(|n| n.status().rules_version >= version),
    )
    .await;

    // Rules too large to replicate are refused and change nothing (invalid
    // text never gets this far: the node takes parsed rules).
    let padded = format!("{strict}\n#{}\n", "x".repeat(MAX_RULES_BYTES));
    let err = nodes[0].put_rules(change(&padded)).await.unwrap_err();
    assert_eq!(err, PutRulesError::TooLarge(padded.len()));
    assert!(nodes.iter().all(|n| n.limiter.rules().source() == strict));

    // Two nodes edit at once: every node ends with the same text, that of
    // the greater version, and a change that lost is told so.
    let a = RULES.replace("limit = 600", "limit = 7");
    let b = RULES.replace("limit = 600", "limit = 9");
    let (oa, ob) = tokio::join!(
        nodes[0].put_rules(change(&a)),
        nodes[2].put_rules(change(&b))
    );
    let (oa, ob) = (oa.unwrap(), ob.unwrap());
    let winner = match (&oa, &ob) {
        (
            RulesOutcome::Confirmed { version: va, .. },
            RulesOutcome::Confirmed { version: vb, .. },
        ) => {
            // One after the other: the later one is in force.
            if va > vb {
                a
            } else {
                b
            }
        }
        (RulesOutcome::Confirmed { .. }, RulesOutcome::Superseded { .. }) => a,
        (RulesOutcome::Superseded { .. }, RulesOutcome::Confirmed { .. }) => b,
        other => panic!("{other:?}"),
    };
    wait_for("agreement", Duration::from_secs(2), || {
        nodes.iter().all(|n| n.limiter.rules().source() == winner)
    })
    .await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_duplicated_and_reordered_datagrams_do_not_change_the_converged_counts() {
    let dir = cluster_dir("chaos", 3);
    let chaos = |seed| drl::node::Chaos {
        loss: 0.2,
        duplicate: 0.2,
        reorder: 0.3,
        max_delay: Duration::from_millis(30),
        seed,
    };
    let mut s0 = settings(&dir, 0, vec![]);
    s0.chaos = Some(chaos(1));
    let first = Node::start(s0).await.unwrap();
    let seed = first.peer_addr().to_string();
    let mut nodes = vec![first];
    for slot in 1..3 {
        let mut s = settings(&dir, slot, vec![seed.clone()]);
        s.chaos = Some(chaos(u64::from(slot) + 1));
        nodes.push(Node::start(s).await.unwrap());
    }
    wait_for("a full mesh", Duration::from_secs(20), || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.ready && s.live.len() == 2
        })
    })
    .await;
    // 200 hits on 40 users, spread over the nodes.
    let mut admitted = 0;
    for i in 0..200usize {
        let user = format!("chaos-{}", i % 40);
        let node = &nodes[i % 3];
        let start = Instant::now();
        while !check(node, &user).await {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "hit {i} never admitted"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        admitted += 1;
    }
    wait_for(
        "convergence through the faults",
        Duration::from_secs(10),
        || nodes.iter().all(|n| counted(n) == admitted),
    )
    .await;
    // The faults must have been exercised (status is published every 50 ms).
    wait_for(
        "the faults to show in the replication counters",
        Duration::from_secs(2),
        || {
            let faults: u64 = nodes
                .iter()
                .map(|n| {
                    let s = n.status().replication;
                    s.retransmissions + s.values_stale
                })
                .sum();
            faults > 0
        },
    )
    .await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_measure_round_trips_and_clock_offsets() {
    let dir = cluster_dir("clocks", 3);
    let nodes = three_nodes(&dir).await;
    for i in 0..30 {
        check(&nodes[i % 3], &format!("clock-{i}")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in &nodes {
        let s = n.status();
        for (slot, p) in &s.peers {
            // One machine, one clock: the estimate must be near zero.
            assert!(
                p.clock_offset_ns.abs() < 5_000_000,
                "peer {slot}: offset {} ns",
                p.clock_offset_ns
            );
            assert!(
                p.rtt > drl_core::time::Nanos::ZERO,
                "peer {slot}: no round trip measured"
            );
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}
